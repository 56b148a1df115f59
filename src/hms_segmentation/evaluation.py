"""Exact, streaming mean IoU for semantic segmentation: a confusion matrix accumulated with ``torch.bincount``.

The numbers are those of the `evaluate` ``mean_iou`` metric (same keys, same float64 arithmetic, NaN for a class absent
from both predictions and references) and, per class, those of the Cityscapes pixel-level evaluator
(``cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling``) once trainIds are mapped to labelIds, its mean up to
the last bit (it sums the classes in another order); the tests check both. The counts are exact int64. On CPU they
come from a compiled kernel (:mod:`.confusion_kernel`, numba) that reads the two maps once and counts only where a
pixel differs from the one above it; elsewhere (GPU, more than 255 classes, numba missing) from ``torch.bincount``.

Standalone, on any device, with or without ``torch.distributed``::

    from hms_segmentation.evaluation import ConfusionMatrixAccumulator

    accumulator = ConfusionMatrixAccumulator(num_labels=19, device="cuda")
    for batch in dataloader:
        logits = model(pixel_values=batch["pixel_values"].cuda()).logits            # (B, 19, H, W)
        accumulator.update(logits.argmax(dim=1), batch["labels"].cuda())           # (B, H, W) each
    accumulator.all_reduce()  # SUM over processes when torch.distributed is initialised, else nothing
    metrics = accumulator.compute()  # {"mean_iou": float, ..., "per_category_iou": np.ndarray (19,)}

On lists of maps, like ``evaluate.load("mean_iou").compute(...)`` but fast::

    from hms_segmentation.evaluation import mean_iou

    metrics = mean_iou(predictions, references, num_labels=19, ignore_index=255)

With ``transformers.Trainer``, streaming (only one batch of predictions is held at a time, and never the logits)::

    from transformers import Trainer, TrainingArguments
    from hms_segmentation.evaluation import make_compute_metrics, preprocess_logits_for_metrics

    trainer = Trainer(
        model=model,
        args=TrainingArguments(..., batch_eval_metrics=True),
        eval_dataset=eval_dataset,
        compute_metrics=make_compute_metrics(model.config.num_labels, id2label=model.config.id2label),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )
    trainer.evaluate()  # {"eval_mean_iou": ..., "eval_iou_road": ..., "eval_accuracy_road": ..., ...}

``preprocess_logits_for_metrics`` resizes the logits to the label size (bilinear) and keeps only their argmax, so the
Trainer never holds logits; ``make_compute_metrics`` adds each batch to a confusion matrix and returns the metrics on
the last one. The Trainer gathers predictions and labels from every process before calling it, so it must not (and
does not) all-reduce. It also works without ``batch_eval_metrics`` (one call on everything, at a memory cost).

The local `evaluate` module ``hms_segmentation/metrics/mean_iou`` (see :data:`MEAN_IOU_METRIC_PATH`) wraps
:func:`mean_iou` for code that expects ``evaluate.load(...)``; unlike ``evaluate.load("mean_iou")`` it needs no Hub.

Differences from `evaluate`'s ``mean_iou``, all on inputs it handles silently: a prediction outside
``[0, num_labels)`` at an evaluated pixel raises here (there it is dropped from the prediction histogram; at a skipped
pixel both ignore it); a reference outside ``[0, num_labels)`` is skipped with its prediction like ``ignore_index``
(there it is dropped from the reference histogram only, and its prediction still counts); ``label_map`` is left to the
`evaluate` module.
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .label_tables import IGNORE_INDEX

MEAN_IOU_METRIC_PATH = Path(__file__).resolve().parent / "metrics" / "mean_iou"
"""Local `evaluate` module: ``evaluate.load(str(MEAN_IOU_METRIC_PATH))`` works offline."""

LabelMaps = torch.Tensor | np.ndarray | Sequence[Any]
"""One map `(H, W)`, a batch `(B, H, W)`, or a sequence of maps or batches (sizes may differ between items)."""

_LANES = 4
"""Interleaved sub-histograms in the confusion-matrix ``bincount`` (see ``ConfusionMatrixAccumulator._count``)."""
_CPU_CHUNK_PIXELS = 1 << 21
"""Pixels counted per ``bincount`` on CPU (one Cityscapes map): its int16 scratch maps then fit in cache."""
_BACKENDS = ("auto", "numba", "torch")
_INT16_MAX = torch.iinfo(torch.int16).max
_INT32_MAX = torch.iinfo(torch.int32).max


def _compiled_counter() -> ModuleType | None:
    """:mod:`.confusion_kernel`, or None without numba (imported on first use: numba takes ~0.2 s to import)."""
    try:
        from . import confusion_kernel
    except ImportError:  # numba is not installed, or has no build for this platform: torch.bincount counts
        return None
    except RuntimeError as error:  # numba found no writable folder for its cache (package and home read-only)
        warnings.warn(f"the compiled mean-IoU counter is unavailable ({error}); counting with torch.bincount "
                      "instead (set NUMBA_CACHE_DIR to a writable folder to use it)", RuntimeWarning, stacklevel=3)
        return None
    return confusion_kernel


def metrics_from_confusion_matrix(
    confusion_matrix: torch.Tensor | np.ndarray, nan_to_num: float | None = None
) -> dict[str, float | np.ndarray]:
    """IoU and accuracy from a confusion matrix, with the arithmetic of `evaluate`'s ``mean_iou``.

    Args:
        confusion_matrix (`torch.Tensor` or `np.ndarray` of shape `(num_labels, num_labels)`):
            Pixel counts, rows = reference class, columns = predicted class.
        nan_to_num (`float`, *optional*):
            Replace NaN (a class absent from both references and predictions) by this value, as `evaluate` does.

    Returns:
        `dict`: ``mean_iou``, ``mean_accuracy``, ``overall_accuracy`` (floats) and ``per_category_iou``,
        ``per_category_accuracy`` (float64 arrays of shape `(num_labels,)`).
    """
    if isinstance(confusion_matrix, torch.Tensor):
        confusion_matrix = confusion_matrix.detach().cpu().numpy()
    confusion_matrix = np.asarray(confusion_matrix)
    if confusion_matrix.ndim != 2 or confusion_matrix.shape[0] != confusion_matrix.shape[1]:
        raise ValueError(
            f"`confusion_matrix` must be square (num_labels, num_labels), got shape {confusion_matrix.shape}"
        )
    # float64 totals, then the same divisions and nanmean as evaluate, so that the floats are bit-identical
    area_intersect = np.diag(confusion_matrix).astype(np.float64)
    area_label = confusion_matrix.sum(axis=1).astype(np.float64)
    area_pred_label = confusion_matrix.sum(axis=0).astype(np.float64)
    area_union = area_pred_label + area_label - area_intersect
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice" when no class is present
        iou = area_intersect / area_union
        accuracy = area_intersect / area_label
        metrics: dict[str, float | np.ndarray] = {
            "mean_iou": float(np.nanmean(iou)),
            "mean_accuracy": float(np.nanmean(accuracy)),
            "overall_accuracy": float(area_intersect.sum() / area_label.sum()),
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
        }
    if nan_to_num is not None:
        metrics = {key: _nan_to_num(value, nan_to_num) for key, value in metrics.items()}
    return metrics


def _nan_to_num(value: float | np.ndarray, nan: float) -> float | np.ndarray:
    return np.nan_to_num(value, nan=nan) if isinstance(value, np.ndarray) else float(np.nan_to_num(value, nan=nan))


def _as_label_tensor(labels: Any, name: str) -> torch.Tensor:
    """A torch view (no copy where possible) of an integer label map; rejects floats with a message for humans."""
    if not isinstance(labels, torch.Tensor):
        array = np.asarray(labels)
        if array.size == 0 and not isinstance(labels, np.ndarray):
            array = array.astype(np.int64)  # numpy makes float64 of an empty list: there is no value to reject
        if array.dtype.kind == "u" and array.dtype.itemsize > 1:
            array = array.astype(np.int64)  # torch has few kernels for uint16/32/64
        elif array.dtype == np.bool_:
            array = array.astype(np.uint8)
        if array.dtype.kind not in "iu":
            raise TypeError(f"`{name}` must hold integer class indices, got a numpy array of dtype {array.dtype}")
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        if any(stride < 0 for stride in array.strides):  # np.flip, [::-1]: torch views no negative strides
            array = np.ascontiguousarray(array)
        if array.flags.writeable:
            labels = torch.from_numpy(array)
        else:  # np.asarray of a PIL image: torch warns that writing would be undefined, and the maps are only read
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
                labels = torch.from_numpy(array)
    if labels.dtype in (torch.uint16, torch.uint32, torch.uint64):
        labels = labels.to(torch.int64)
    elif labels.dtype == torch.bool:
        labels = labels.to(torch.uint8)
    if labels.is_floating_point() or labels.is_complex():
        hint = " (pass the argmax over the class dimension, e.g. via `preprocess_logits_for_metrics`)"
        raise TypeError(f"`{name}` must hold integer class indices, got dtype {labels.dtype}{hint}")
    return labels


def _reduce_labels(references: torch.Tensor) -> torch.Tensor:
    """`evaluate`'s ``reduce_labels``, step for step: 0 -> 255, then minus one, then 254 -> 255."""
    if references.dtype == torch.int8:
        references = references.to(torch.int16)  # 255 must fit
    references = references.masked_fill(references == 0, 255) - 1
    return references.masked_fill(references == 254, 255)


class ConfusionMatrixAccumulator:
    """Streaming confusion matrix of integer label maps, on any device, exact (int64 counts).

    Rows are reference classes, columns predicted classes. A pixel counts when its reference lies in
    ``[0, num_labels)`` and differs from ``ignore_index``; the prediction of such a pixel must lie in
    ``[0, num_labels)`` (elsewhere it is not looked at, as in `evaluate`).

    Args:
        num_labels (`int`):
            Number of classes.
        ignore_index (`int`, *optional*, defaults to 255):
            Reference value skipped, with its prediction. References outside ``[0, num_labels)`` (e.g. the ``-100``
            that the Trainer pads with) are skipped as well.
        device (`torch.device` or `str`, *optional*):
            Where the matrix lives and the counting runs; by default the device of the first :meth:`update`.
        reduce_labels (`bool`, *optional*, defaults to `False`):
            Apply `evaluate`'s ``reduce_labels`` to the references first (0 -> 255, others minus one).
        backend (`str`, *optional*, defaults to `"auto"`):
            How CPU maps are counted: ``"numba"``, the compiled kernel of :mod:`.confusion_kernel` (up to 255
            classes; about 4x faster than ``bincount`` on Cityscapes-sized label maps, 1.1-1.2x on white noise; compiled on
            first use, then cached on disk); ``"torch"``, ``torch.bincount``; ``"auto"``, the kernel when numba is
            installed and ``num_labels <= 255``, else ``torch``. Maps on other devices are always counted with
            ``torch.bincount``. All give the same counts.
        num_threads (`int`, *optional*):
            Threads of the compiled counter (bands of rows, or maps, counted side by side; at least 2^18 pixels per
            thread); by default ``torch.get_num_threads()`` when the accumulator is made.

    Example:

        >>> accumulator = ConfusionMatrixAccumulator(num_labels=3)
        >>> accumulator.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [1, 255]]))
        >>> accumulator.confusion_matrix.tolist()
        [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
        >>> round(accumulator.compute()["mean_iou"], 4)
        0.5
    """

    def __init__(
        self,
        num_labels: int,
        ignore_index: int = IGNORE_INDEX,
        device: torch.device | str | None = None,
        reduce_labels: bool = False,
        backend: str = "auto",
        num_threads: int | None = None,
    ) -> None:
        # any integer type: `evaluate`'s metric takes e.g. a numpy int64 (`labels.max() + 1`)
        if isinstance(num_labels, bool) or not isinstance(num_labels, numbers.Integral) or num_labels < 1:
            raise ValueError(f"`num_labels` must be a positive integer, got {num_labels!r}")
        num_labels = int(num_labels)
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise ValueError(f"`num_threads` must be a positive integer or None, got {num_threads!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"`backend` must be one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}")
        kernel = _compiled_counter() if backend != "torch" else None
        if backend == "numba" and kernel is None:
            raise ImportError("`backend='numba'` needs numba (`pip install numba`); `backend='auto'` falls back to torch")
        if backend == "numba" and num_labels > kernel.MAX_NUM_LABELS:
            raise ValueError(
                f"`backend='numba'` counts at most {kernel.MAX_NUM_LABELS} classes, got num_labels={num_labels}"
                " (use backend='torch' or 'auto')"
            )
        self.num_labels = num_labels
        self.ignore_index = int(ignore_index)
        self.reduce_labels = reduce_labels
        use_kernel = kernel is not None and num_labels <= kernel.MAX_NUM_LABELS
        self.backend = "numba" if use_kernel else "torch"
        self._key_table = kernel.key_table(num_labels, self.ignore_index) if use_kernel else None
        self.num_threads = num_threads or torch.get_num_threads()
        self._executor: ThreadPoolExecutor | None = None  # the compiled counter's extra threads, made when first needed
        self.device = torch.device(device) if device is not None else None
        self.confusion_matrix: torch.Tensor | None = None
        self._counted_elsewhere: torch.Tensor | None = None  # other processes' counts, added by all_reduce
        self._buffers: dict[str, torch.Tensor] = {}  # scratch maps of _count, kept between updates
        if self.device is not None:
            self.reset()

    def reset(self) -> None:
        """Zero the counts (the device, once known, is kept)."""
        self._counted_elsewhere = None
        with torch.inference_mode(False):  # see _buffer
            self.confusion_matrix = torch.zeros(
                self.num_labels, self.num_labels, dtype=torch.int64, device=self.device or torch.device("cpu")
            )

    @torch.no_grad()
    def update(self, predictions: torch.Tensor | np.ndarray, references: torch.Tensor | np.ndarray) -> None:
        """Add one map or a batch of maps.

        Args:
            predictions (`torch.Tensor` or `np.ndarray` of shape `(batch_size, height, width)` or `(height, width)`):
                Predicted class indices, any integer dtype (``uint8`` and ``int16`` are the fastest).
            references (`torch.Tensor` or `np.ndarray`, same shape):
                Reference class indices, any integer dtype; ``ignore_index`` and values outside ``[0, num_labels)``
                are skipped.

        Raises:
            `TypeError`: non-integer maps (e.g. logits).
            `ValueError`: shapes that differ or are not 2-D/3-D, or a prediction outside ``[0, num_labels)`` at an
                evaluated pixel.
        """
        predictions = _as_label_tensor(predictions, "predictions")
        references = _as_label_tensor(references, "references")
        if predictions.shape != references.shape:
            raise ValueError(
                f"`predictions` and `references` must have the same shape, got {tuple(predictions.shape)} and "
                f"{tuple(references.shape)}"
            )
        if predictions.ndim not in (2, 3):
            raise ValueError(
                f"expected label maps of shape (height, width) or (batch_size, height, width), got shape "
                f"{tuple(predictions.shape)}"
            )
        if self.device is None:
            self.device = predictions.device
            self.reset()
        elif self.confusion_matrix is None:
            self.reset()
        # asynchronous only towards an accelerator: a non-blocking copy to the CPU returns before the data is there,
        # and the CPU counting below would read it too early
        non_blocking = self.device.type != "cpu"
        predictions = predictions.to(self.device, non_blocking=non_blocking)
        references = references.to(self.device, non_blocking=non_blocking)
        if predictions.numel() == 0:
            return
        if self.reduce_labels:
            references = _reduce_labels(references)
        if predictions.ndim == 2:
            predictions, references = predictions[None], references[None]
        if self.backend == "numba" and self.device.type == "cpu":
            self.confusion_matrix += self._count_compiled(predictions, references)
            return
        predictions = self._checked_predictions(predictions, references)
        # on CPU, a few maps at a time keep the scratch maps of _count in cache (a whole batch is ~20% slower)
        step = max(1, _CPU_CHUNK_PIXELS // predictions[0].numel()) if self.device.type == "cpu" else len(predictions)
        for start in range(0, len(predictions), step):
            self.confusion_matrix += self._count(predictions[start : start + step], references[start : start + step])

    def _checked_predictions(self, predictions: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """Raise on a prediction outside ``[0, num_labels)`` at an evaluated pixel; zero those at skipped pixels.

        One min/max reduction on the usual path. A prediction outside the range where the reference is skipped is
        tolerated, as `evaluate` does (its documented example predicts 255 there); it is set to 0 so that it cannot
        spill into another bin.
        """
        n = self.num_labels
        low, high = (int(value) for value in torch.aminmax(predictions))
        if low >= 0 and high < n:
            return predictions
        invalid = (predictions < 0) | (predictions >= n)
        evaluated = (references >= 0) & (references < n) & (references != self.ignore_index)
        wrong = predictions[invalid & evaluated]
        if wrong.numel():
            raise ValueError(
                f"`predictions` must be class indices in [0, {n}) (num_labels={n}) wherever the reference is "
                f"evaluated, found {wrong.numel()} pixel(s) with values from {int(wrong.min())} to {int(wrong.max())}"
            )
        return predictions.masked_fill(invalid, 0)

    def _count_compiled(self, predictions: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """`(num_labels, num_labels)` int64 counts of a CPU batch `(B, H, W)` by the compiled kernel.

        The kernel also counts evaluated pixels whose prediction is outside ``[0, num_labels)``; when there are any,
        :meth:`_checked_predictions` finds them again to raise its message (no range pass on the usual path).
        """
        n = self.num_labels
        if self.num_threads > 1 and self._executor is None:
            self._executor = ThreadPoolExecutor(self.num_threads - 1, thread_name_prefix="mean-iou")
        counts = _compiled_counter().count_keys(predictions.numpy(), references.numpy(), n, self._key_table,
                                                num_threads=self.num_threads, executor=self._executor)
        if counts[n * n + 1]:
            self._checked_predictions(predictions, references)  # raises
        return torch.from_numpy(counts[: n * n].reshape(n, n))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_executor"] = None  # threads cannot be pickled or copied; a copy makes its own when it needs them
        return state

    def _count(self, predictions: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """`(num_labels, num_labels)` int64 counts of one batch: one ``bincount`` of ``lane + row * n + prediction``.

        - No boolean mask: every pixel gets a key, and references outside ``[0, n)`` fall in rows cut afterwards (a
          masked copy costs far more than the extra bins). Negative or large references (e.g. the Trainer's -100
          padding) are clamped into two extra rows first.
        - Keys in the narrowest integer type (int16 for up to 32 classes) and all arithmetic in that type: a wider
          input is cast first, since mixed-dtype arithmetic into a narrower output is ~20x slower on CPU.
        - Consecutive pixels count into ``_LANES`` interleaved sub-histograms, summed at the end: label maps come in
          long runs of one key, and incrementing one counter over and over waits on the previous increment (~2x).
        """
        n = self.num_labels
        rows, first_row = max(n, 256), 0  # reference r -> row r; rows >= n (e.g. 255) are discarded
        if references.dtype != torch.uint8:
            low, high = (int(value) for value in torch.aminmax(references))
            if low < 0 or high >= rows:
                rows, first_row = n + 2, 1  # clamped to [-1, n], shifted a row: row 0 < 0, row n + 1 >= n
                if references.dtype == torch.int8:
                    references = references.to(torch.int16)  # so that n fits the clamp
                references = references.clamp(-1, n)
        lane_bins = rows * n
        max_key = _LANES * lane_bins - 1
        dtype = torch.int16 if max_key <= _INT16_MAX else torch.int32 if max_key <= _INT32_MAX else torch.int64
        numel = references.numel()
        keys = self._buffer("keys", numel, dtype).view(references.shape)
        references = self._narrowed(references, keys)
        offsets = self._lane_offsets(numel, dtype, lane_bins, row_shift=first_row * n).view(keys.shape)
        torch.add(offsets, references, alpha=n, out=keys)  # lane + row * n
        keys.add_(self._narrowed(predictions, self._buffer("predictions", numel, dtype).view(keys.shape)))
        counts = torch.bincount(keys.view(-1), minlength=_LANES * lane_bins)
        counts = counts.view(_LANES, rows, n).sum(dim=0)[first_row : first_row + n]
        if 0 <= self.ignore_index < n:
            counts[self.ignore_index] = 0
        return counts

    @staticmethod
    def _narrowed(tensor: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """`tensor` itself when arithmetic with `buffer` stays in the buffer's dtype, else a copy cast into `buffer`."""
        return tensor if torch.promote_types(tensor.dtype, buffer.dtype) == buffer.dtype else buffer.copy_(tensor)

    def _buffer(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat scratch tensor kept between updates (fresh maps cost page faults on every call), grown as needed.

        Made outside inference mode: an inference tensor could not be written to by a later update that runs
        outside ``torch.inference_mode()``.
        """
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != self.device:
            with torch.inference_mode(False):
                buffer = self._buffers[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return buffer[:numel]

    def _lane_offsets(self, numel: int, dtype: torch.dtype, lane_bins: int, row_shift: int) -> torch.Tensor:
        """``(index % _LANES) * lane_bins + row_shift`` for ``index < numel``; periodic, so a prefix of a cached one."""
        name = f"offsets_{lane_bins}_{row_shift}"
        offsets = self._buffers.get(name)
        if offsets is None or offsets.numel() < numel or offsets.dtype != dtype or offsets.device != self.device:
            with torch.inference_mode(False):  # see _buffer
                lanes = torch.arange(_LANES, dtype=torch.int64, device=self.device) * lane_bins + row_shift
                offsets = self._buffers[name] = lanes.to(dtype).repeat(-(-numel // _LANES))
        return offsets[:numel]

    def all_reduce(self) -> None:
        """Sum the counts over all processes (``torch.distributed``, when initialised; otherwise nothing).

        Call it after the last :meth:`update` and before :meth:`compute`: every process then holds the totals. Each
        call sums the processes' own counts, so calling it again (with or without updates in between) never adds the
        totals twice. Not needed on what ``transformers.Trainer`` hands to ``compute_metrics`` (already gathered).
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self.confusion_matrix is None:
            self.reset()
        counts = self.confusion_matrix
        own = counts if self._counted_elsewhere is None else counts - self._counted_elsewhere  # this process's
        device = counts.device
        if dist.get_backend() == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())  # NCCL reduces CUDA tensors only
        totals = own.to(device, copy=True)
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        totals = totals.to(counts.device)
        self._counted_elsewhere = totals - own
        counts.copy_(totals)

    def compute(self, nan_to_num: float | None = None) -> dict[str, float | np.ndarray]:
        """The metrics of everything added since the last :meth:`reset` (see :func:`metrics_from_confusion_matrix`)."""
        if self.confusion_matrix is None:
            self.reset()
        return metrics_from_confusion_matrix(self.confusion_matrix, nan_to_num=nan_to_num)


def _paired_items(predictions: LabelMaps, references: LabelMaps) -> list[tuple[Any, Any]]:
    """Split the arguments of :func:`mean_iou` into (prediction, reference) pairs of maps or batches."""
    if isinstance(predictions, (torch.Tensor, np.ndarray)) and getattr(predictions, "dtype", None) != object:
        return [(predictions, references)]
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(
            f"`predictions` and `references` must hold as many maps, got {len(predictions)} and {len(references)}"
        )
    return list(zip(predictions, references))


def mean_iou(
    predictions: LabelMaps,
    references: LabelMaps,
    num_labels: int,
    ignore_index: int = IGNORE_INDEX,
    nan_to_num: float | None = None,
    reduce_labels: bool = False,
    backend: str = "auto",
) -> dict[str, float | np.ndarray]:
    """Mean IoU over label maps, with the keys and numbers of `evaluate`'s ``mean_iou`` metric.

    Args:
        predictions (`torch.Tensor`, `np.ndarray` or a sequence of them):
            Predicted class indices: a batch `(batch_size, height, width)`, one map `(height, width)`, or a sequence of
            maps (or batches) whose sizes may differ from item to item.
        references (same structure as `predictions`):
            Reference class indices; ``ignore_index`` and values outside ``[0, num_labels)`` are skipped.
        num_labels (`int`):
            Number of classes.
        ignore_index (`int`, *optional*, defaults to 255):
            Reference value to skip.
        nan_to_num (`float`, *optional*):
            Replace NaN (a class absent from both predictions and references) by this value.
        reduce_labels (`bool`, *optional*, defaults to `False`):
            Reduce every reference by one and turn 0 into 255 (ADE20k-style background), as `evaluate` does.
        backend (`str`, *optional*, defaults to `"auto"`):
            How the pixels are counted on CPU (see :class:`ConfusionMatrixAccumulator`); the numbers do not change.

    Returns:
        `dict`: ``mean_iou``, ``mean_accuracy``, ``overall_accuracy`` (floats), ``per_category_iou`` and
        ``per_category_accuracy`` (float64 arrays of shape `(num_labels,)`, NaN for a class absent from both).
    """
    accumulator = ConfusionMatrixAccumulator(
        num_labels, ignore_index=ignore_index, reduce_labels=reduce_labels, backend=backend
    )
    for prediction, reference in _paired_items(predictions, references):
        accumulator.update(prediction, reference)
    return accumulator.compute(nan_to_num=nan_to_num)


def preprocess_logits_for_metrics(
    logits: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor | None, align_corners: bool = False
) -> torch.Tensor:
    """``Trainer(preprocess_logits_for_metrics=...)``: logits -> predicted class indices at the label size.

    Args:
        logits (`torch.Tensor` of shape `(batch_size, num_labels, h, w)`, or a tuple whose first item is that):
            Class logits; the Trainer passes a tuple when the model returns more than one output.
        labels (`torch.Tensor` of shape `(batch_size, height, width)`, *optional*):
            Target maps; the logits are resized (bilinear) to their size when it differs.
        align_corners (`bool`, *optional*, defaults to `False`):
            ``align_corners`` of the resize (``HMSConfig.align_corners``).

    Returns:
        `torch.Tensor` of shape `(batch_size, height, width)`, dtype ``int32``: signed, so that the Trainer can pad it
        with -100, and a type that both gloo and NCCL gather across processes (neither takes ``int16``).
    """
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if logits.ndim != 4:
        raise ValueError(f"`logits` must have shape (batch_size, num_labels, height, width), got {tuple(logits.shape)}")
    if labels is not None and tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
        logits = F.interpolate(logits, size=tuple(labels.shape[-2:]), mode="bilinear", align_corners=align_corners)
    return logits.argmax(dim=1).to(torch.int32)


def make_compute_metrics(
    num_labels: int,
    ignore_index: int = IGNORE_INDEX,
    id2label: Mapping[int, str] | None = None,
    nan_to_num: float | None = None,
) -> Callable[..., dict[str, float]]:
    """``Trainer(compute_metrics=...)`` that streams: ``(eval_pred, compute_result: bool = True) -> dict``.

    Each call adds ``eval_pred.predictions`` (class indices from :func:`preprocess_logits_for_metrics`, or logits,
    which are then reduced the same way) against ``eval_pred.label_ids`` to a :class:`ConfusionMatrixAccumulator`.
    With ``TrainingArguments(batch_eval_metrics=True)`` the Trainer calls it once per batch and passes
    ``compute_result=True`` on the last one; without, it calls it once on everything (the default ``True``).

    Args:
        num_labels (`int`):
            Number of classes.
        ignore_index (`int`, *optional*, defaults to 255):
            Label value to skip (the Trainer's -100 padding is skipped too).
        id2label (`Mapping[int, str]`, *optional*):
            Class names for the per-class keys; class indices when absent.
        nan_to_num (`float`, *optional*):
            Replace NaN (class absent from both predictions and labels) by this value.

    Returns:
        A callable returning ``{}`` until ``compute_result`` is true, then ``mean_iou``, ``mean_accuracy``,
        ``overall_accuracy``, ``iou_<class name>`` and ``accuracy_<class name>`` as floats (and a reset, ready for the
        next evaluation). Its ``reset()`` drops the counts of an evaluation that stopped before its last batch (the
        training scripts' ``HMSTrainer`` calls it as each evaluation starts).
    """
    accumulator = ConfusionMatrixAccumulator(num_labels, ignore_index=ignore_index)
    id2label = id2label or {}
    names = [str(id2label.get(index, id2label.get(str(index), index))) for index in range(num_labels)]

    def compute_metrics(eval_pred: Any, compute_result: bool = True) -> dict[str, float]:
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(predictions, (tuple, list)) or _is_floating(predictions):
            predictions = preprocess_logits_for_metrics(_as_tensor(predictions), _as_tensor(labels))
        # the -100 that the Trainer pads both with (maps of different sizes) falls on skipped labels: tolerated
        accumulator.update(predictions, labels)
        if not compute_result:
            return {}
        metrics = accumulator.compute(nan_to_num=nan_to_num)
        accumulator.reset()
        per_category_iou = metrics.pop("per_category_iou")
        per_category_accuracy = metrics.pop("per_category_accuracy")
        for name, iou, accuracy in zip(names, per_category_iou.tolist(), per_category_accuracy.tolist()):
            metrics[f"iou_{name}"] = iou
            metrics[f"accuracy_{name}"] = accuracy
        return metrics

    compute_metrics.reset = accumulator.reset
    return compute_metrics


def metrics_to_json(metrics: Any) -> str:
    """`metrics` (dicts, lists, numbers, numpy values) as strict, indented JSON: the NaN of a class absent from an
    evaluation (and any infinity) becomes ``null``, since ``NaN`` is not JSON (browsers' and jq's parsers refuse it)."""

    def finite(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        if isinstance(value, np.ndarray):
            return finite(value.tolist())
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return json.dumps(finite(metrics), indent=2, allow_nan=False)


def _as_tensor(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return type(value)(_as_tensor(item) for item in value)
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))


def _is_floating(value: Any) -> bool:
    return value.is_floating_point() if isinstance(value, torch.Tensor) else np.asarray(value).dtype.kind == "f"
