"""Mean IoU as a local `evaluate` module, computed by ``hms_segmentation.evaluation.mean_iou``.

A drop-in for ``evaluate.load("mean_iou")`` (same arguments, same keys, same numbers) that needs no Hub access::

    import evaluate
    from hms_segmentation.evaluation import MEAN_IOU_METRIC_PATH

    metric = evaluate.load(str(MEAN_IOU_METRIC_PATH))  # works with HF_HUB_OFFLINE=1
    metric.compute(predictions=[pred], references=[label], num_labels=19, ignore_index=255)

`evaluate` copies this file into its modules cache and imports it from there, hence the absolute imports.
Maps pass through `evaluate`'s Arrow cache as nested lists of int64, which is exact but slow on large maps; for speed
call ``hms_segmentation.evaluation.mean_iou`` (or the streaming accumulator) directly.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from hms_segmentation.evaluation import mean_iou

_DESCRIPTION = """
IoU is the area of overlap between the predicted segmentation and the ground truth divided by the area of union
between the predicted segmentation and the ground truth. The mean IoU averages the IoU of every class present in the
predictions or the ground truth; the counts are summed over all maps first (one confusion matrix for the dataset).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[ndarray]`):
        Predicted class indices, each map of shape (height, width); sizes may differ between maps.
    references (`List[ndarray]`):
        Ground truth class indices, same shapes as `predictions`.
    num_labels (`int`):
        Number of classes.
    ignore_index (`int`, defaults to 255):
        Reference value skipped in the evaluation (references outside [0, num_labels) are skipped as well).
    nan_to_num (`float`, *optional*):
        If specified, NaN values (classes absent from both predictions and references) are replaced by this number.
    label_map (`dict`, *optional*):
        Old -> new reference values, applied one pair after the other as in `evaluate`'s metric.
    reduce_labels (`bool`, defaults to `False`):
        Reduce every reference by one and turn 0 into 255 (datasets whose 0 is an unevaluated background, e.g. ADE20k).

Returns:
    `Dict[str, float | ndarray]`:
    - *mean_iou* (`float`): mean of the per-class IoU, NaN classes left out.
    - *mean_accuracy* (`float`): mean of the per-class accuracy (recall), NaN classes left out.
    - *overall_accuracy* (`float`): correct pixels over evaluated pixels.
    - *per_category_iou* (`ndarray` of shape `(num_labels,)`).
    - *per_category_accuracy* (`ndarray` of shape `(num_labels,)`).

Examples (the example of `evaluate`'s ``mean_iou``, same output):

    >>> metric = evaluate.load(str(MEAN_IOU_METRIC_PATH))
    >>> predicted = [np.array([[1, 2], [3, 4], [5, 255]]), np.array([[2, 7], [9, 2], [3, 6]]),
    ...              np.array([[2, 2, 3], [8, 2, 4], [3, 255, 2]])]
    >>> actual = [np.array([[0, 3], [5, 4], [6, 255]]), np.array([[1, 7], [9, 2], [3, 6]]),
    ...           np.array([[1, 2, 2], [8, 2, 1], [3, 255, 1]])]
    >>> results = metric.compute(predictions=predicted, references=actual, num_labels=10, ignore_index=255)
    >>> results["mean_iou"], results["overall_accuracy"]
    (0.47750000000000004, 0.5263157894736842)
"""

_CITATION = """\
@software{MMSegmentation_Contributors_OpenMMLab_Semantic_Segmentation_2020,
author = {{MMSegmentation Contributors}},
license = {Apache-2.0},
month = {7},
title = {{OpenMMLab Semantic Segmentation Toolbox and Benchmark}},
url = {https://github.com/open-mmlab/mmsegmentation},
year = {2020}
}"""

# datasets >= 4 names nested lists `List`; older releases only have `Sequence`
_LabelList = getattr(datasets, "List", datasets.Sequence)
_LABEL_MAP_FEATURE = _LabelList(_LabelList(datasets.Value("int64")))  # 1st list: rows, 2nd: columns


def _apply_label_map(reference: object, label_map: dict[int, int]) -> np.ndarray:
    """`evaluate`'s ``label_map``: ``label[label == old] = new`` for each pair in order (so mappings chain)."""
    reference = np.array(reference, dtype=np.int64)
    for old_id, new_id in label_map.items():
        reference[reference == old_id] = new_id
    return reference


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": _LABEL_MAP_FEATURE, "references": _LABEL_MAP_FEATURE}),
            reference_urls=[
                "https://huggingface.co/spaces/evaluate-metric/mean_iou",
                "https://github.com/open-mmlab/mmsegmentation/blob/71c201b1813267d78764f306a297ca717827c4bf/mmseg/core/evaluation/metrics.py",
            ],
        )

    def _compute(
        self,
        predictions: list,
        references: list,
        num_labels: int,
        ignore_index: int = 255,
        nan_to_num: float | None = None,
        label_map: dict[int, int] | None = None,
        reduce_labels: bool = False,
    ) -> dict[str, float | np.ndarray]:
        predictions = [np.asarray(prediction, dtype=np.int64) for prediction in predictions]
        if label_map:
            references = [_apply_label_map(reference, label_map) for reference in references]
        else:
            references = [np.asarray(reference, dtype=np.int64) for reference in references]
        return mean_iou(
            predictions,
            references,
            num_labels=num_labels,
            ignore_index=ignore_index,
            nan_to_num=nan_to_num,
            reduce_labels=reduce_labels,
        )
