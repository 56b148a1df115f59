"""The compiled confusion-matrix counter (``hms_segmentation.confusion_kernel``): exact on every path it takes.

Its two paths (``uint8`` maps of a width divisible by 8 read in place as words; anything else narrowed row by row into
padded scratch rows) and its three per-word cases (unchanged from the row above, 8 equal pixels, mixed pixels) are
checked against a brute-force count on maps built to reach each of them, and against ``torch.bincount``.
"""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
import torch

from confusion_references import brute_force_confusion_matrix

from hms_segmentation import confusion_kernel, evaluation
from hms_segmentation.evaluation import ConfusionMatrixAccumulator


PATTERNS = ("noise", "stripes", "words", "bands", "blocks")


def patterned_maps(rng: np.random.Generator, shape: tuple[int, ...], num_labels: int, pattern: str, dtype) -> tuple:
    """(predictions, references) of `shape` whose rows and 8-pixel words take the kernel's different cases."""
    high = min(num_labels + 3, np.iinfo(dtype).max + 1)  # some references out of range (skipped)

    def draw(block_rows: int, block_columns: int) -> np.ndarray:
        grid = rng.integers(0, high, (*shape[:-2], shape[-2] // block_rows + 1, shape[-1] // block_columns + 1))
        return np.repeat(np.repeat(grid, block_rows, -2), block_columns, -1)[..., : shape[-2], : shape[-1]]

    if pattern == "noise":  # every word mixed, every row changed
        references, predictions = draw(1, 1), draw(1, 1)
    elif pattern == "stripes":  # identical rows: every word after the first row unchanged
        references = np.broadcast_to(draw(shape[-2] + 1, 8)[..., :1, :], shape)
        predictions = np.broadcast_to(draw(shape[-2] + 1, 3)[..., :1, :], shape)
    elif pattern == "words":  # every row changes, every word is 8 equal pixels
        references, predictions = draw(1, 8), draw(1, 8)
    elif pattern == "bands":  # bands of noisy rows (counted once) between bands of blocks (carried down)
        noisy = np.repeat(rng.random(shape[-2] // 3 + 1) < 0.5, 3)[: shape[-2], None]
        references = np.where(noisy, draw(1, 1), draw(4, 8))
        predictions = np.where(noisy, draw(1, 1), draw(3, 5))
    else:  # blocks of random sizes, some words mixed, pairs that leave a column and come back
        references, predictions = draw(*rng.integers(1, 6, 2)), draw(*rng.integers(1, 6, 2))
    references = np.where(rng.random(shape) < 0.05, 255, references)
    predictions = np.where((references >= 0) & (references < num_labels), np.minimum(predictions, num_labels - 1),
                           predictions)
    if np.dtype(dtype).kind == "i":  # negative references (e.g. the Trainer's -100) and predictions where skipped
        negative = rng.random(shape) < 0.03
        references = np.where(negative, -100 if np.iinfo(dtype).min <= -100 else -1, references)
        predictions = np.where(negative, -7, predictions)
    return np.ascontiguousarray(predictions.astype(dtype)), np.ascontiguousarray(references.astype(dtype))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.int64])
def test_exact_on_every_path(pattern, dtype):
    """Widths divisible by 8 or not (1 to 70), one row or many, batches, class counts up to 255, every row mode."""
    rng = np.random.default_rng([PATTERNS.index(pattern), np.dtype(dtype).num])  # the same maps on every run
    for trial in range(12):
        num_labels = int(rng.choice([1, 2, 5, 19, 65, 124, 255]))
        if np.dtype(dtype) == np.int8:
            num_labels = min(num_labels, 120)
        ignore_index = int(rng.choice([255, 0, num_labels - 1, -100]))
        shape = (int(rng.integers(1, 4)), int(rng.integers(1, 20)), int(rng.choice([1, 7, 8, 16, 23, 64, 70])))
        predictions, references = patterned_maps(rng, shape, num_labels, pattern, dtype)
        accumulator = ConfusionMatrixAccumulator(num_labels, ignore_index=ignore_index, backend="numba")
        accumulator.update(predictions, references)
        expected = brute_force_confusion_matrix(predictions, references, num_labels, ignore_index)
        np.testing.assert_array_equal(accumulator.confusion_matrix.numpy(), expected,
                                      err_msg=f"trial {trial}: {num_labels=} {ignore_index=} {shape=}")


def test_non_contiguous_and_strided_maps():
    rng = np.random.default_rng(3)
    predictions, references = patterned_maps(rng, (2, 24, 48), 19, "blocks", np.uint8)
    views = [(predictions.transpose(0, 2, 1), references.transpose(0, 2, 1)),  # not C-contiguous
             (predictions[:, ::2, 1::3], references[:, ::2, 1::3]),
             (torch.from_numpy(predictions).transpose(1, 2), torch.from_numpy(references).transpose(1, 2))]
    # contiguous maps that start 1 and 3 bytes past an 8-byte boundary: read as (unaligned) 64-bit words
    shifted = []
    for array, offset in ((predictions, 1), (references, 3)):
        buffer = np.zeros(offset + array.size, np.uint8)  # numpy aligns the buffer itself
        buffer[offset:] = array.ravel()
        shifted.append(buffer[offset:].reshape(array.shape))
    views.append(tuple(shifted))
    for prediction_view, reference_view in views:
        accumulator = ConfusionMatrixAccumulator(19, backend="numba")
        accumulator.update(prediction_view, reference_view)
        expected = brute_force_confusion_matrix(np.asarray(prediction_view), np.asarray(reference_view), 19, 255)
        np.testing.assert_array_equal(accumulator.confusion_matrix.numpy(), expected)


def test_cityscapes_sized_maps_equal_bincount():
    """The benchmark's 1024x2048 maps: the kernel and ``torch.bincount`` give one matrix, uint8 and Trainer dtypes."""
    rng = np.random.default_rng(0)
    predictions, references = patterned_maps(rng, (1, 1024, 2048), 19, "blocks", np.uint8)
    kernel = ConfusionMatrixAccumulator(19, backend="numba")
    kernel.update(predictions, references)
    kernel.update(predictions.astype(np.int16), references.astype(np.int64))
    bincount = ConfusionMatrixAccumulator(19, backend="torch")
    bincount.update(predictions, references)
    assert torch.equal(kernel.confusion_matrix, 2 * bincount.confusion_matrix)


def test_bad_predictions_raise_on_both_paths():
    """A prediction outside [0, n) at an evaluated pixel, in an all-equal word, a mixed word, or a narrowed row."""
    references = np.zeros((2, 16, 32), np.uint8)
    for predictions in (np.full((2, 16, 32), 19, np.uint8), np.stack([np.eye(16, 32, dtype=np.uint8) * 200] * 2),
                        np.full((2, 16, 30), 25, np.int16)):
        accumulator = ConfusionMatrixAccumulator(19, backend="numba")
        with pytest.raises(ValueError, match=r"must be class indices in \[0, 19\)"):
            accumulator.update(predictions, references[..., : predictions.shape[-1]])
        assert int(accumulator.confusion_matrix.sum()) == 0


def test_backend_choice(monkeypatch):
    assert ConfusionMatrixAccumulator(19).backend == "numba"
    assert ConfusionMatrixAccumulator(255).backend == "numba"
    assert ConfusionMatrixAccumulator(256).backend == "torch"  # keys of one byte per pixel: up to 255 classes
    assert ConfusionMatrixAccumulator(19, backend="torch").backend == "torch"
    with pytest.raises(ValueError, match=r"at most 255 classes, got num_labels=256 \(use backend='torch' or 'auto'\)"):
        ConfusionMatrixAccumulator(256, backend="numba")
    monkeypatch.setattr(evaluation, "_compiled_counter", lambda: None)  # numba not installed
    assert ConfusionMatrixAccumulator(19).backend == "torch"
    with pytest.raises(ImportError, match=r"`backend='numba'` needs numba"):
        ConfusionMatrixAccumulator(19, backend="numba")


def test_key_table():
    table = confusion_kernel.key_table(3, ignore_index=1).reshape(256, 256)  # [reference, prediction]
    assert table[2, 1] == 2 * 3 + 1 and table[0, 0] == 0
    assert table[1, 2] == table[255, 0] == table[3, 7] == 9  # skipped: ignore_index, 255, >= n
    assert table[0, 3] == table[2, 255] == 10  # evaluated, prediction out of range
    with pytest.raises(ValueError, match=r"1 to 255 classes, got num_labels=256"):
        confusion_kernel.key_table(256, 255)


def test_threads_count_independently():
    """The kernel releases the GIL and keeps no shared state: accumulators in threads count what they are given."""
    rng = np.random.default_rng(5)
    pairs = [patterned_maps(rng, (2, 64, 128), 19, "blocks", np.uint8) for _ in range(4)]
    results = [None] * len(pairs)

    def count(index: int) -> None:
        accumulator = ConfusionMatrixAccumulator(19, backend="numba")
        for _ in range(3):
            accumulator.update(*pairs[index])
        results[index] = accumulator.confusion_matrix.numpy()

    threads = [threading.Thread(target=count, args=(index,)) for index in range(len(pairs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (predictions, references), result in zip(pairs, results):
        np.testing.assert_array_equal(result, 3 * brute_force_confusion_matrix(predictions, references, 19, 255))


def test_unusable_numba_cache_falls_back_with_a_warning(monkeypatch):
    """numba raises RuntimeError on import when no folder for its cache is writable: torch counts instead, said once."""
    import sys

    import numba

    import hms_segmentation

    def njit(*args, **kwargs):
        raise RuntimeError("cannot cache function '_add_row': no locator available for file 'confusion_kernel.py'")

    monkeypatch.delitem(sys.modules, "hms_segmentation.confusion_kernel")
    monkeypatch.delattr(hms_segmentation, "confusion_kernel")
    monkeypatch.setattr(numba, "njit", njit)
    with pytest.warns(RuntimeWarning, match=r"no locator available .* counting with torch.bincount instead"):
        accumulator = ConfusionMatrixAccumulator(19)
    assert accumulator.backend == "torch"
    predictions, references = patterned_maps(np.random.default_rng(6), (1, 16, 24), 19, "blocks", np.uint8)
    accumulator.update(predictions, references)
    expected = brute_force_confusion_matrix(predictions, references, 19, 255)
    np.testing.assert_array_equal(accumulator.confusion_matrix.numpy(), expected)


@pytest.mark.parametrize("batch, height, width, num_threads", [(1, 2048, 1024, 3), (5, 64, 4096, 2), (3, 256, 1024, 4),
                                                             (1, 3, 1 << 18, 4), (2, 1, 1 << 18, 8)])
def test_parts_cover_every_row_once(batch, height, width, num_threads):
    parts = confusion_kernel._parts(batch, height, width, num_threads)
    assert 1 < len(parts) <= num_threads  # enough pixels here for several threads
    seen = np.zeros((batch, height), np.int64)
    for part in parts:
        for maps, rows in part:
            seen[maps, rows] += 1
    assert (seen == 1).all()
    assert confusion_kernel._parts(batch, 8, 8, num_threads) == [[(slice(None), slice(None))]]  # too small to share


@pytest.mark.parametrize("shape, dtype", [((1, 1100, 512), np.uint8), ((3, 256, 1024), np.uint8),
                                          ((1, 700, 803), np.int16)])
def test_threads_share_a_batch_exactly(shape, dtype):
    """Bands of rows (counted each as a map) or groups of maps on 3 threads: the single-threaded counts exactly."""
    predictions, references = patterned_maps(np.random.default_rng(7), shape, 19, "bands", dtype)
    threaded = ConfusionMatrixAccumulator(19, backend="numba", num_threads=3)
    threaded.update(predictions, references)
    threaded.update(predictions, references)  # the threads are kept between updates
    single = ConfusionMatrixAccumulator(19, backend="numba", num_threads=1)
    single.update(predictions, references)
    assert torch.equal(threaded.confusion_matrix, 2 * single.confusion_matrix)
    expected = brute_force_confusion_matrix(predictions, references, 19, 255)
    np.testing.assert_array_equal(single.confusion_matrix.numpy(), expected)
    copied = pickle.loads(pickle.dumps(threaded))  # without its threads, which it makes again when it needs them
    copied.update(predictions, references)
    assert torch.equal(copied.confusion_matrix, 3 * single.confusion_matrix)
    with pytest.raises(ValueError, match=r"`num_threads` must be a positive integer or None, got 0"):
        ConfusionMatrixAccumulator(19, num_threads=0)
