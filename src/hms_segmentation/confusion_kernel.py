"""Compiled CPU counting of a confusion matrix over label maps, for :class:`~.evaluation.ConfusionMatrixAccumulator`.

A scalar histogram pays one load-increment-store per pixel (about 0.7 ns with ``torch.bincount``), several times a
memory copy of the two maps. Label maps are piecewise constant, so this kernel (numba, compiled on first use and
cached on disk) counts differences instead of pixels:

- Row ``y`` of an ``H``-row map is row ``y - 1`` with some pixels changed. A pixel pair (reference, prediction) that
  appears at row ``y`` of a column and stays there until row ``z`` contributes ``z - y`` pixels, which is what
  ``+ (H - y)`` at its appearance and ``- (H - z)`` at its replacement add up to. So only the pixels that differ from
  the pixel above are looked at: ``+ (H - y)`` for the new pair, ``- (H - y)`` for the old one, and the first row is
  all new. A row where most words differ from the row above (noise) is counted on its own instead, ``+ 1`` per
  pixel, so that noise costs about one update per pixel, as a plain histogram does, not two.
- Both maps are read 8 pixels at a time as 64-bit words (one ``uint8`` per pixel): a word equal to the word above is
  skipped after one comparison, and a word of 8 equal pixels counts as one key with weight 8.
- Per-pixel increments go to 4 interleaved sub-histograms (``lane = column % 4``), summed once per call: consecutive
  increments of one counter would otherwise wait on each other.

Every pixel pair maps to a key through a 65536-entry table built from (``num_labels``, ``ignore_index``): ``r * n + p``
for an evaluated pixel (reference in ``[0, n)`` and not ``ignore_index``) with a valid prediction, ``n * n`` for a
skipped pixel, and ``n * n + 1`` for an evaluated pixel whose prediction is outside ``[0, n)`` (the caller raises).
Maps of another integer dtype, or whose width is not a multiple of 8, are narrowed row by row into a padded ``uint8``
scratch pair first (values outside ``[0, n)`` become 255, which the table treats like any other out-of-range value),
so ``num_labels`` must be at most 255 (:data:`MAX_NUM_LABELS`). Counts are exact ``int64``.
"""

from __future__ import annotations

from concurrent.futures import Executor

import numpy as np
from numba import njit

MAX_NUM_LABELS = 255
"""Largest class count the ``uint8`` pixel keys hold (255 is left as the out-of-range value)."""
MIN_PIXELS_PER_THREAD = 1 << 18
"""Below this many pixels per thread, more threads cost more (handing work to a thread) than they save."""
_OUT_OF_RANGE = 255
_LANES = 4
_WORD_PIXELS = 8
_BYTE = np.uint64(0xFF)
_REPEATED_BYTE = np.uint64(0x0101010101010101)
_SHIFT = np.uint64(8)


def key_table(num_labels: int, ignore_index: int) -> np.ndarray:
    """`(65536,)` ``uint16`` keys indexed by ``reference << 8 | prediction`` (both ``uint8``); see the module docstring."""
    if not 1 <= num_labels <= MAX_NUM_LABELS:
        raise ValueError(f"the compiled counter supports 1 to {MAX_NUM_LABELS} classes, got num_labels={num_labels}")
    values = np.arange(256)
    references, predictions = values[:, None], values[None, :]
    evaluated = (references < num_labels) & (references != ignore_index)
    keys = np.where(predictions < num_labels, references * num_labels + predictions, num_labels * num_labels + 1)
    keys = np.where(evaluated, keys, num_labels * num_labels)
    return keys.astype(np.uint16).reshape(-1)


def num_keys(num_labels: int) -> int:
    """Length of the count vector: ``n * n`` pairs, then skipped pixels, then evaluated pixels with a bad prediction."""
    return num_labels * num_labels + 2


@njit(nogil=True, cache=True, boundscheck=False)
def _add_row(counts, table, predictions, references, prediction_words, reference_words, above_predictions,
             above_references, above_prediction_words, above_reference_words, changed, changed_blocks, rows_left,
             above_carried):
    """Count one row; returns whether its pixels were carried down (added with weight `rows_left`, see below).

    `predictions`, `references` `(width,)` ``uint8`` and `prediction_words`, `reference_words` `(width // 8,)`
    ``uint64`` view the row, `above_*` the row above. `changed` is scratch: a flag byte per word, zero in the padding
    after the last, that `changed_blocks` views 8 at a time. `rows_left` is the number of rows from this one to the
    bottom of the map; `above_carried` says how the row above was counted (False for the first row).

    A carried row's pixels count for every row below until a row takes them back. When fewer than half of the words
    differ from the row above, and that row was carried, only the differing words are looked at: their new pixels
    carried (``+ rows_left``), the old ones taken back (``- rows_left``). A row where most words differ (noise, a new
    object) is counted on its own, once: ``+ 1`` per pixel, after taking back the row above if it was carried, which
    costs one update per pixel instead of two on the rows that follow.

    Flat on purpose: numba reference-counts the arrays handed to a helper, which per word (or per row) costs more
    than the counting.
    """
    words = prediction_words.shape[0]
    mostly_changed = False
    if above_carried:
        for x in range(words):  # branch-free, so that it vectorises: most words equal the word above
            changed[x] = ((prediction_words[x] ^ above_prediction_words[x])
                          | (reference_words[x] ^ above_reference_words[x])) != 0
        count = 0
        for block in range(changed_blocks.shape[0]):  # a word's byte sum is the top byte of its product by 0x01..01
            count += (changed_blocks[block] * _REPEATED_BYTE) >> np.uint64(56)
        mostly_changed = 2 * count > words
    if not above_carried or mostly_changed:
        changed[:words] = 1
    carried = not mostly_changed
    weight = rows_left if carried else 1
    above_weight = rows_left if above_carried else 0
    for block in range(changed_blocks.shape[0]):
        if changed_blocks[block] == 0:  # 8 unchanged words
            continue
        for x in range(_WORD_PIXELS * block, _WORD_PIXELS * block + _WORD_PIXELS):
            if changed[x] == 0:
                continue
            if above_weight != 0:
                prediction_word = above_prediction_words[x]
                reference_word = above_reference_words[x]
                prediction = prediction_word & _BYTE
                reference = reference_word & _BYTE
                if ((prediction_word ^ prediction * _REPEATED_BYTE)
                        | (reference_word ^ reference * _REPEATED_BYTE)) == 0:
                    counts[_LANES, table[(reference << _SHIFT) | prediction]] -= _WORD_PIXELS * above_weight
                else:
                    for j in range(_WORD_PIXELS):
                        i = _WORD_PIXELS * x + j
                        key = table[(np.intp(above_references[i]) << 8) | np.intp(above_predictions[i])]
                        counts[_LANES + (j & (_LANES - 1)), key] -= above_weight
            prediction_word = prediction_words[x]
            reference_word = reference_words[x]
            prediction = prediction_word & _BYTE
            reference = reference_word & _BYTE
            if ((prediction_word ^ prediction * _REPEATED_BYTE) | (reference_word ^ reference * _REPEATED_BYTE)) == 0:
                counts[0, table[(reference << _SHIFT) | prediction]] += _WORD_PIXELS * weight
            else:
                for j in range(_WORD_PIXELS):
                    i = _WORD_PIXELS * x + j
                    key = table[(np.intp(references[i]) << 8) | np.intp(predictions[i])]
                    counts[j & (_LANES - 1), key] += weight
    return carried


@njit(nogil=True, cache=True, boundscheck=False)
def _count_words(predictions, references, prediction_words, reference_words, table, counts, changed,
                 changed_blocks):
    """``uint8`` maps `(batch, height, width)` read in place; `*_words` `(batch, height, width // 8)` view them."""
    height = predictions.shape[1]
    for b in range(predictions.shape[0]):
        carried = False
        for y in range(height):
            above = max(y - 1, 0)
            carried = _add_row(counts, table, predictions[b, y], references[b, y], prediction_words[b, y],
                               reference_words[b, y], predictions[b, above], references[b, above],
                               prediction_words[b, above], reference_words[b, above], changed, changed_blocks,
                               height - y, carried)


@njit(nogil=True, cache=True, boundscheck=False)
def _narrow_row(source, target, last_class):
    """``target[:width] = source`` where in ``[0, last_class]``, else 255; the padding after it is left as it is.

    `last_class` has the dtype of `source`, so that the comparisons stay in that width (vectorised 2-8x wider).
    """
    for x in range(source.shape[0]):
        value = source[x]
        target[x] = value if (value >= 0) & (value <= last_class) else _OUT_OF_RANGE


@njit(nogil=True, cache=True, boundscheck=False)
def _count_narrowed(predictions, references, table, counts, last_prediction, last_reference, scratch_predictions,
                    scratch_references, scratch_prediction_words, scratch_reference_words, changed, changed_blocks):
    """Maps of any integer dtype or width `(batch, height, width)`, narrowed a row at a time into scratch rows.

    `scratch_predictions`, `scratch_references` `(2, padded_width)` ``uint8`` and `scratch_*_words`
    `(2, padded_width // 8)` ``uint64`` view the same memory: row 0 holds even image rows, row 1 odd ones. The
    padding (prediction 0, reference 255) is a skipped pixel in every word.
    """
    height = predictions.shape[1]
    for b in range(predictions.shape[0]):
        carried = False
        for y in range(height):
            row, above = y & 1, (y + 1) & 1
            _narrow_row(predictions[b, y], scratch_predictions[row], last_prediction)
            _narrow_row(references[b, y], scratch_references[row], last_reference)
            carried = _add_row(counts, table, scratch_predictions[row], scratch_references[row],
                               scratch_prediction_words[row], scratch_reference_words[row], scratch_predictions[above],
                               scratch_references[above], scratch_prediction_words[above],
                               scratch_reference_words[above], changed, changed_blocks, height - y, carried)


def count_keys(
    predictions: np.ndarray,
    references: np.ndarray,
    num_labels: int,
    table: np.ndarray,
    num_threads: int = 1,
    executor: Executor | None = None,
) -> np.ndarray:
    """Per-key pixel counts of a batch of maps (see :func:`num_keys` for the layout).

    Args:
        predictions (`np.ndarray` of shape `(batch_size, height, width)`):
            Predicted classes, any integer dtype (C-contiguous ``uint8`` maps of a width divisible by 8 are read in
            place; others are narrowed row by row).
        references (`np.ndarray`, same shape):
            Reference classes, any integer dtype.
        num_labels (`int`):
            Number of classes, at most :data:`MAX_NUM_LABELS`.
        table (`np.ndarray`):
            ``key_table(num_labels, ignore_index)``.
        num_threads (`int`, *optional*, defaults to 1):
            Threads to count with: whole maps, or bands of rows of each map, each counted on its own (the kernel
            releases the GIL). Fewer when there are less than :data:`MIN_PIXELS_PER_THREAD` pixels per thread.
        executor (`concurrent.futures.Executor`, *optional*):
            Runs all parts but the first (which runs in the calling thread); needed when `num_threads` > 1.

    Returns:
        `np.ndarray` of shape `(num_labels * num_labels + 2,)`, ``int64``.
    """
    if predictions.ndim != 3 or predictions.shape != references.shape:
        raise ValueError(f"expected two batches of maps of one shape (batch, height, width), got {predictions.shape} "
                         f"and {references.shape}")
    parts = _parts(*predictions.shape, num_threads if executor is not None else 1)
    futures = [executor.submit(_count_parts, predictions, references, num_labels, table, part) for part in parts[1:]]
    counts = _count_parts(predictions, references, num_labels, table, parts[0])
    for future in futures:
        counts += future.result()
    return counts


def _parts(batch: int, height: int, width: int, num_threads: int) -> list[list[tuple[slice, slice]]]:
    """Work for each thread: (maps, rows) slices, each selecting a C-contiguous block of a C-contiguous batch.

    Whole maps when there are at least as many maps as threads, else a band of rows of every map per thread.
    """
    threads = max(1, min(num_threads, batch * height * width // MIN_PIXELS_PER_THREAD))
    if threads == 1:
        return [[(slice(None), slice(None))]]
    if batch >= threads:
        bounds = [batch * index // threads for index in range(threads + 1)]
        return [[(slice(bounds[k], bounds[k + 1]), slice(None))] for k in range(threads)]
    threads = min(threads, height)
    bounds = [height * index // threads for index in range(threads + 1)]
    return [[(slice(b, b + 1), slice(bounds[k], bounds[k + 1])) for b in range(batch)] for k in range(threads)]


def _count_parts(predictions: np.ndarray, references: np.ndarray, num_labels: int, table: np.ndarray,
                 parts: list[tuple[slice, slice]]) -> np.ndarray:
    """:func:`count_keys` of the blocks ``predictions[maps, rows]`` listed in `parts`, summed, in this thread."""
    counts = np.zeros((2 * _LANES, num_keys(num_labels)), dtype=np.int64)  # added, subtracted
    for maps, rows in parts:
        _count_block(predictions[maps, rows], references[maps, rows], num_labels, table, counts)
    return counts.sum(axis=0)


def _count_block(predictions: np.ndarray, references: np.ndarray, num_labels: int, table: np.ndarray,
                 counts: np.ndarray) -> None:
    """Add the counts of a batch of maps (or of a band of rows of one map, counted as a map) to `counts`."""
    batch, height, width = predictions.shape
    if not (batch and height and width):
        return
    words = -(-width // _WORD_PIXELS)
    changed_blocks = np.zeros(-(-words // _WORD_PIXELS), dtype=np.uint64)  # a flag byte per word, 8 per block
    changed = changed_blocks.view(np.uint8)
    if _readable_as_words(predictions) and _readable_as_words(references):
        _count_words(predictions, references, predictions.view(np.uint64).reshape(batch, height, words),
                     references.view(np.uint64).reshape(batch, height, words), table, counts, changed,
                     changed_blocks)
    else:
        prediction_words = np.zeros((2, words), dtype=np.uint64)
        reference_words = np.full_like(prediction_words, _REPEATED_BYTE * _OUT_OF_RANGE)  # padding: skipped
        _count_narrowed(np.ascontiguousarray(predictions), np.ascontiguousarray(references), table, counts,
                        _last_class(num_labels, predictions.dtype), _last_class(num_labels, references.dtype),
                        prediction_words.view(np.uint8), reference_words.view(np.uint8), prediction_words,
                        reference_words, changed, changed_blocks)


def _last_class(num_labels: int, dtype: np.dtype) -> np.generic:
    """``num_labels - 1`` as a scalar of `dtype`, capped at its maximum (then every value >= 0 is in range)."""
    return dtype.type(min(num_labels - 1, np.iinfo(dtype).max))


def _readable_as_words(array: np.ndarray) -> bool:
    return array.dtype == np.uint8 and array.flags.c_contiguous and array.shape[-1] % _WORD_PIXELS == 0
