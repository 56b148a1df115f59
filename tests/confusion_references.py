"""A brute-force confusion matrix, the reference the counting tests of both backends compare with."""

from __future__ import annotations

import numpy as np


def brute_force_confusion_matrix(predictions, references, num_labels, ignore_index) -> np.ndarray:
    """`(num_labels, num_labels)` int64 counts of maps (any sequence of them, or a batch), one pixel at a time.

    A pixel counts where its reference is in ``[0, num_labels)`` and differs from `ignore_index`; its prediction must
    then be a class (a test that built anything else has a bug of its own).
    """
    expected = np.zeros((num_labels, num_labels), dtype=np.int64)
    for prediction, reference in zip(predictions, references):
        prediction, reference = np.asarray(prediction).ravel(), np.asarray(reference).ravel().astype(np.int64)
        keep = (reference >= 0) & (reference < num_labels) & (reference != ignore_index)
        kept_predictions = prediction[keep].astype(np.int64)
        assert ((kept_predictions >= 0) & (kept_predictions < num_labels)).all(), "test maps predict a non-class"
        np.add.at(expected, (reference[keep], kept_predictions), 1)
    return expected
