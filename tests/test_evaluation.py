"""Mean IoU: exact parity with `evaluate`'s mean_iou and Cityscapes' pixel-level evaluator, streaming, errors, Trainer.

Two references are written here, faithfully, so that they run without their packages:

- :func:`evaluate_reference_mean_iou`, the algorithm of `evaluate`'s ``mean_iou`` (per-image ``np.histogram`` of the
  intersection, prediction and label, summed; the Hub script cannot be loaded offline);
- :func:`cityscapes_reference_scores`, ``cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling`` on arrays
  (its pure-Python confusion matrix, ``getIouScoreForLabel`` and ``getScoreAverage``).

Where ``cityscapesscripts`` is installed, the real evaluator is run on PNG files as well and must agree with both.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from confusion_references import brute_force_confusion_matrix
from PIL import Image
from transformers import EvalPrediction

from hms_segmentation import evaluation
from hms_segmentation.evaluation import (
    MEAN_IOU_METRIC_PATH,
    ConfusionMatrixAccumulator,
    make_compute_metrics,
    mean_iou,
    metrics_from_confusion_matrix,
    preprocess_logits_for_metrics,
)
from hms_segmentation.label_tables import (
    CITYSCAPES_ID2LABEL,
    CITYSCAPES_LABELS,
    CITYSCAPES_TRAIN_LABELS,
    IGNORE_INDEX,
    cityscapes_label_id_to_train_id,
)

NUM_CITYSCAPES_CLASSES = len(CITYSCAPES_TRAIN_LABELS)
SAMPLE_LABEL_IDS = "cityscapes_sample/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png"
METRIC_KEYS = ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy")


# ---------------------------------------------------------------------------------------------------------------------
# References


def evaluate_reference_mean_iou(
    results, gt_seg_maps, num_labels, ignore_index, nan_to_num=None, label_map=None, reduce_labels=False
) -> dict:
    """`evaluate`'s ``mean_iou`` (``total_intersect_and_union`` + ``mean_iou``), step for step, on numpy arrays."""
    total_area_intersect = np.zeros((num_labels,), dtype=np.float64)
    total_area_union = np.zeros((num_labels,), dtype=np.float64)
    total_area_pred_label = np.zeros((num_labels,), dtype=np.float64)
    total_area_label = np.zeros((num_labels,), dtype=np.float64)
    for pred_label, label in zip(results, gt_seg_maps):
        label = np.array(label)  # evaluate maps labels in place on its own (Arrow-decoded) copy
        if label_map is not None:
            for old_id, new_id in label_map.items():
                label[label == old_id] = new_id
        pred_label = np.array(pred_label)
        if reduce_labels:
            label[label == 0] = 255
            label = label - 1
            label[label == 254] = 255
        mask = np.not_equal(label, ignore_index)
        pred_label = pred_label[mask]
        label = np.array(label)[mask]
        intersect = pred_label[pred_label == label]
        area_intersect = np.histogram(intersect, bins=num_labels, range=(0, num_labels - 1))[0]
        area_pred_label = np.histogram(pred_label, bins=num_labels, range=(0, num_labels - 1))[0]
        area_label = np.histogram(label, bins=num_labels, range=(0, num_labels - 1))[0]
        total_area_intersect += area_intersect
        total_area_union += area_pred_label + area_label - area_intersect
        total_area_pred_label += area_pred_label
        total_area_label += area_label
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = total_area_intersect / total_area_union
        acc = total_area_intersect / total_area_label
        metrics = {
            "mean_iou": np.nanmean(iou),
            "mean_accuracy": np.nanmean(acc),
            "overall_accuracy": total_area_intersect.sum() / total_area_label.sum(),
            "per_category_iou": iou,
            "per_category_accuracy": acc,
        }
    if nan_to_num is not None:
        metrics = {key: np.nan_to_num(value, nan=nan_to_num) for key, value in metrics.items()}
    return metrics


def cityscapes_reference_scores(prediction_label_ids, ground_truth_label_ids) -> tuple[dict[str, float], float]:
    """``evaluateImgLists`` of evalPixelLevelSemanticLabeling on arrays: (classScores by name, averageScoreClasses)."""
    id2label = {label.id: label for label in CITYSCAPES_LABELS}
    eval_labels = [label.id for label in CITYSCAPES_LABELS if label.id >= 0]  # generateMatrix
    conf_matrix = np.zeros(shape=(max(eval_labels) + 1, max(eval_labels) + 1), dtype=np.ulonglong)
    for prediction_np, ground_truth_np in zip(prediction_label_ids, ground_truth_label_ids):
        assert prediction_np.shape == ground_truth_np.shape
        encoding_value = max(ground_truth_np.max(), prediction_np.max()).astype(np.int32) + 1  # evaluatePair
        encoded = (ground_truth_np.astype(np.int32) * encoding_value) + prediction_np
        values, cnt = np.unique(encoded, return_counts=True)
        for value, c in zip(values, cnt):
            pred_id = value % encoding_value
            gt_id = int((value - pred_id) / encoding_value)
            assert gt_id in eval_labels, f"Unknown label with id {gt_id}"
            conf_matrix[gt_id][pred_id] += c
    class_scores = {}
    for label_id in eval_labels:  # getIouScoreForLabel
        label = id2label[label_id]
        if label.ignore_in_eval:
            class_scores[label.name] = float("nan")
            continue
        tp = np.longlong(conf_matrix[label_id, label_id])
        fn = np.longlong(conf_matrix[label_id, :].sum()) - tp
        not_ignored = [other for other in eval_labels if not id2label[other].ignore_in_eval and not other == label_id]
        fp = np.longlong(conf_matrix[not_ignored, label_id].sum())
        denom = tp + fp + fn
        class_scores[label.name] = float("nan") if denom == 0 else float(tp) / denom
    valid_scores, score_sum = 0, 0.0  # getScoreAverage
    for score in class_scores.values():
        if not math.isnan(score):
            valid_scores += 1
            score_sum += score
    return class_scores, (score_sum / valid_scores if valid_scores else float("nan"))


def run_cityscapes_scripts(tmp_path: Path, prediction_label_ids, ground_truth_files) -> tuple[dict[str, float], float]:
    """The real evaluator on PNG files (skips when cityscapesscripts is not installed)."""
    module = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    args = copy.copy(module.args)
    args.evalInstLevelScore = args.evalPixelAccuracy = args.JSONOutput = args.colorized = False
    args.quiet = True
    args.bold = args.nocol = ""
    prediction_files = []
    for index, prediction in enumerate(prediction_label_ids):
        path = tmp_path / f"pred_{index}.png"
        Image.fromarray(prediction.astype(np.uint8)).save(path)
        prediction_files.append(str(path))
    results = module.evaluateImgLists(prediction_files, [str(path) for path in ground_truth_files], args)
    return results["classScores"], results["averageScoreClasses"]


# ---------------------------------------------------------------------------------------------------------------------
# Helpers

LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _label_id, _train_id in cityscapes_label_id_to_train_id().items():
    LABEL_ID_TO_TRAIN_ID[_label_id] = _train_id
TRAIN_ID_TO_LABEL_ID = np.array([label.id for label in CITYSCAPES_TRAIN_LABELS], dtype=np.uint8)


def blocky_maps(
    seed: int, shape: tuple[int, int], num_labels: int, block: int = 4, ignore_fraction: float = 0.1,
    ignore_index: int = IGNORE_INDEX, prediction_noise: float = 0.3,
) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, reference) int64 maps: blocky classes, some ``ignore_index`` references, noisy predictions."""
    rng = np.random.default_rng(seed)
    height, width = shape
    blocks = rng.integers(0, num_labels, size=(height // block + 1, width // block + 1))
    reference = np.repeat(np.repeat(blocks, block, 0), block, 1)[:height, :width]
    prediction = np.where(rng.random(shape) < prediction_noise, rng.integers(0, num_labels, size=shape), reference)
    reference = np.where(rng.random(shape) < ignore_fraction, ignore_index, reference)
    return prediction, reference


def assert_metrics_identical(actual: dict, expected: dict) -> None:
    """Same keys, bit-identical floats (NaN where NaN)."""
    assert tuple(actual) == METRIC_KEYS
    for key in METRIC_KEYS:
        np.testing.assert_array_equal(np.asarray(actual[key]), np.asarray(expected[key]), err_msg=key, strict=False)
    for key in METRIC_KEYS[:3]:
        assert isinstance(actual[key], float), key
    for key in METRIC_KEYS[3:]:
        assert isinstance(actual[key], np.ndarray) and actual[key].dtype == np.float64, key


@pytest.fixture(params=["numba", "torch"])
def backend(request) -> str:
    """Both ways of counting on CPU: the compiled kernel and ``torch.bincount`` must give the same numbers."""
    return request.param


@pytest.fixture(scope="module")
def cityscapes_sample(shared_data_dir: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """(labelIds file, labelIds map, a deterministic prediction in trainIds) of the shared Cityscapes sample."""
    path = shared_data_dir / SAMPLE_LABEL_IDS
    label_ids = np.array(Image.open(path))
    train_ids = LABEL_ID_TO_TRAIN_ID[label_ids]
    # perturb the ground truth: a class on ignored pixels, shifted boundaries, a false "car" box, salt, swapped classes
    prediction = np.where(train_ids == IGNORE_INDEX, label_ids % NUM_CITYSCAPES_CLASSES, train_ids)
    prediction = np.roll(prediction, shift=(2, 3), axis=(0, 1))
    prediction[40:70, 100:160] = 13
    prediction[::7, ::5] = (prediction[::7, ::5] + 1) % NUM_CITYSCAPES_CLASSES
    prediction[prediction == 8] = 9  # vegetation predicted as terrain
    return path, label_ids, prediction.astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# evaluate parity


def test_documented_example_of_evaluate():
    """The example in `evaluate`'s mean_iou docstring, with its printed output (255 predicted on ignored pixels)."""
    predicted = [np.array([[1, 2], [3, 4], [5, 255]]), np.array([[2, 7], [9, 2], [3, 6]]),
                 np.array([[2, 2, 3], [8, 2, 4], [3, 255, 2]])]
    actual = [np.array([[0, 3], [5, 4], [6, 255]]), np.array([[1, 7], [9, 2], [3, 6]]),
              np.array([[1, 2, 2], [8, 2, 1], [3, 255, 1]])]
    results = mean_iou(predicted, actual, num_labels=10, ignore_index=255, reduce_labels=False)
    assert results["mean_iou"] == 0.47750000000000004
    assert results["mean_accuracy"] == 0.5916666666666666
    assert results["overall_accuracy"] == 0.5263157894736842
    np.testing.assert_allclose(results["per_category_iou"], [0, 0, 0.375, 0.4, 0.5, 0, 0.5, 1, 1, 1], rtol=0)
    assert_metrics_identical(results, evaluate_reference_mean_iou(predicted, actual, 10, 255))


@pytest.mark.parametrize(
    "num_labels, dtype, ignore_index, reduce_labels, nan_to_num",
    [
        (19, np.uint8, 255, False, None),
        (19, np.int64, 255, False, 0),
        (7, np.int32, 3, False, None),  # ignore_index inside the class range
        (150, np.uint8, 255, True, None),  # ADE20k-style: 0 is background
        (300, np.int64, 255, False, -1),  # more classes than uint8 holds; 255.. absent from both
        (300, np.int32, 255, False, None),
    ],
)
def test_matches_evaluate_reference(num_labels, dtype, ignore_index, reduce_labels, nan_to_num, backend):
    # references stay in [0, num_labels) or equal ignore_index: evaluate counts the prediction of any other value
    pairs = [blocky_maps(seed, shape, min(num_labels, 255), ignore_index=ignore_index)
             for seed, shape in enumerate([(33, 47), (64, 64), (5, 80)])]
    predictions = [prediction.astype(dtype) for prediction, _ in pairs]
    references = [reference.astype(dtype) for _, reference in pairs]
    if reduce_labels:  # evaluate keeps 255 predictions out of the histogram; keep predictions in range
        predictions = [np.clip(prediction, 0, num_labels - 1) for prediction in predictions]
    expected = evaluate_reference_mean_iou(predictions, references, num_labels, ignore_index, nan_to_num,
                                           reduce_labels=reduce_labels)
    if backend == "numba" and num_labels > 255:
        with pytest.raises(ValueError, match=r"at most 255 classes, got num_labels=300"):
            mean_iou(predictions, references, num_labels, ignore_index, nan_to_num, reduce_labels, backend=backend)
        backend = "auto"  # falls back to torch
    actual = mean_iou(predictions, references, num_labels, ignore_index, nan_to_num, reduce_labels, backend=backend)
    assert_metrics_identical(actual, expected)
    if num_labels > 255:  # classes 255.. never occur: NaN as in evaluate, or the nan_to_num value
        absent = actual["per_category_iou"][255:]
        assert np.isnan(absent).all() if nan_to_num is None else (absent == nan_to_num).all()


def test_reversed_read_only_and_numpy_integer_arguments(backend):
    """Maps that numpy views with negative strides (np.flip, [::-1]) or read-only (np.asarray of a PIL image), and a
    numpy integer as num_labels, are valid input to `evaluate`'s metric: the same numbers, and no warning."""
    prediction, reference = blocky_maps(0, (21, 35), 19)
    expected = evaluate_reference_mean_iou([prediction[::-1, ::-1]], [reference[::-1, ::-1]], 19, 255)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_metrics_identical(mean_iou([np.flip(prediction)], [np.flip(reference)], 19, backend=backend), expected)
        flipped = mean_iou(prediction[None, ::-1, ::-1], reference[None, ::-1, ::-1], np.int64(19), backend=backend)
        assert_metrics_identical(flipped, expected)
        read_only = [np.asarray(Image.fromarray(reference.astype(np.uint8)))]
        assert not read_only[0].flags.writeable
        metrics = mean_iou([reference.astype(np.uint8)], read_only, 19, backend=backend)
        assert metrics["overall_accuracy"] == 1.0
    assert ConfusionMatrixAccumulator(np.uint8(5), backend=backend).num_labels == 5
    assert type(ConfusionMatrixAccumulator(np.int64(5), backend=backend).num_labels) is int


def test_input_forms_agree():
    """Lists of numpy / torch maps, batched tensors, non-contiguous and mixed dtypes give the same numbers."""
    pairs = [blocky_maps(seed, (40, 56), 19) for seed in range(4)]
    predictions = np.stack([prediction for prediction, _ in pairs])
    references = np.stack([reference for _, reference in pairs])
    expected = evaluate_reference_mean_iou(predictions, references, 19, 255)
    forms = {
        "numpy list": (list(predictions), list(references)),
        "numpy batch": (predictions, references),
        "torch batch uint8/int64": (torch.from_numpy(predictions).to(torch.uint8), torch.from_numpy(references)),
        "torch list int16/uint8": ([torch.from_numpy(p).to(torch.int16) for p in predictions],
                                   [torch.from_numpy(r).to(torch.uint8) for r in references]),
        "transposed": (torch.from_numpy(predictions).transpose(1, 2), torch.from_numpy(references).transpose(1, 2)),
        "uint16 numpy": (predictions.astype(np.uint16), references.astype(np.uint16)),
        "int8 numpy": (predictions.astype(np.int8), references.astype(np.uint8)),
    }
    for name, (prediction_input, reference_input) in forms.items():
        assert_metrics_identical(mean_iou(prediction_input, reference_input, 19), expected)


# ---------------------------------------------------------------------------------------------------------------------
# Accumulator


@pytest.mark.parametrize("reference_dtype", [torch.uint8, torch.int16, torch.int64])
@pytest.mark.parametrize("ignore_index", [255, 0, -100])
def test_confusion_matrix_counts(reference_dtype, ignore_index, backend):
    """Exact counts; references 255, negative or >= num_labels are skipped, ``ignore_index`` even inside the range."""
    generator = torch.Generator().manual_seed(1)
    num_labels = 6
    predictions = torch.randint(0, num_labels, (3, 17, 29), generator=generator)
    low = 0 if reference_dtype == torch.uint8 else -120
    references = torch.randint(low, 256, (3, 17, 29), generator=generator)
    references[references > 40] %= num_labels  # mostly valid classes
    references = references.to(reference_dtype)
    accumulator = ConfusionMatrixAccumulator(num_labels, ignore_index=ignore_index, backend=backend)
    accumulator.update(predictions.to(torch.uint8), references)
    expected = brute_force_confusion_matrix(predictions.numpy(), references.numpy(), num_labels, ignore_index)
    assert accumulator.confusion_matrix.dtype == torch.int64
    np.testing.assert_array_equal(accumulator.confusion_matrix.numpy(), expected)


@pytest.mark.parametrize("num_labels", [19, 40])  # 40: the keys no longer fit int16
@pytest.mark.parametrize("chunk_pixels", [None, 100])  # 100: every map of a batch counted on its own
def test_reused_buffers_follow_shape_and_dtype_changes(num_labels, chunk_pixels, monkeypatch, backend):
    """One accumulator fed maps of changing sizes (odd pixel counts too) and dtypes: the cached keys stay right."""
    if chunk_pixels is not None:
        monkeypatch.setattr(evaluation, "_CPU_CHUNK_PIXELS", chunk_pixels)
    shapes_and_dtypes = [((2, 30, 41), np.uint8), ((5, 7), np.int64), ((1, 64, 64), np.uint8), ((3, 9, 13), np.int32),
                         ((11, 3), np.uint8)]
    updates = []
    for seed, (shape, reference_dtype) in enumerate(shapes_and_dtypes):
        prediction, reference = blocky_maps(seed, shape[-2:], num_labels)
        if len(shape) == 3:  # a batch: the map and shifted copies of it
            prediction = np.stack([np.roll(prediction, shift, axis=1) for shift in range(shape[0])])
            reference = np.stack([np.roll(reference, 2 * shift, axis=0) for shift in range(shape[0])])
        updates.append((prediction.astype(np.uint8), reference.astype(reference_dtype)))
    accumulator = ConfusionMatrixAccumulator(num_labels, backend=backend)
    for prediction, reference in updates:
        accumulator.update(prediction, reference)
    expected = brute_force_confusion_matrix([p for p, _ in updates], [r for _, r in updates], num_labels, IGNORE_INDEX)
    np.testing.assert_array_equal(accumulator.confusion_matrix.numpy(), expected)


def test_streaming_equals_one_shot_and_reset():
    pairs = [blocky_maps(seed, (24, 40), 19) for seed in range(6)]
    accumulator = ConfusionMatrixAccumulator(19)
    for start in range(0, 6, 2):  # batches of 2
        batch = pairs[start : start + 2]
        accumulator.update(torch.from_numpy(np.stack([p for p, _ in batch])), np.stack([r for _, r in batch]))
    expected = evaluate_reference_mean_iou([p for p, _ in pairs], [r for _, r in pairs], 19, 255)
    assert_metrics_identical(accumulator.compute(), expected)
    assert_metrics_identical(accumulator.compute(), expected)  # compute does not consume
    accumulator.all_reduce()  # no process group: nothing happens
    assert_metrics_identical(accumulator.compute(), expected)
    accumulator.reset()
    assert int(accumulator.confusion_matrix.sum()) == 0
    accumulator.update(*pairs[0])
    assert_metrics_identical(accumulator.compute(), evaluate_reference_mean_iou([pairs[0][0]], [pairs[0][1]], 19, 255))


def test_empty_and_degenerate(backend):
    accumulator = ConfusionMatrixAccumulator(4, backend=backend)
    metrics = accumulator.compute()  # nothing seen: every class absent
    assert math.isnan(metrics["mean_iou"]) and math.isnan(metrics["overall_accuracy"])
    accumulator.update(torch.zeros(0, 5, 5, dtype=torch.long), torch.zeros(0, 5, 5, dtype=torch.long))
    accumulator.update(np.zeros((3, 3), np.uint8), np.full((3, 3), 255, np.uint8))  # all ignored
    assert int(accumulator.confusion_matrix.sum()) == 0
    assert metrics_from_confusion_matrix(torch.eye(3, dtype=torch.long) * 5, nan_to_num=0)["mean_iou"] == 1.0


def test_errors_name_the_problem(backend):
    accumulator = ConfusionMatrixAccumulator(19, backend=backend)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    predictions = torch.zeros(2, 4, 4, dtype=torch.long)
    predictions.view(-1)[5] = 19
    with pytest.raises(ValueError, match=r"\[0, 19\).*found 1 pixel\(s\) with values from 19 to 19"):
        accumulator.update(predictions, labels)
    with pytest.raises(ValueError, match=r"values from -1 to -1"):
        accumulator.update(torch.full((4, 4), -1), torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"same shape, got \(2, 4, 4\) and \(2, 4, 5\)"):
        accumulator.update(labels, torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch_size, height, width\), got shape \(1, 2, 4, 4\)"):
        accumulator.update(labels[None], labels[None])
    with pytest.raises(TypeError, match=r"`predictions` must hold integer class indices, got dtype torch.float32"):
        accumulator.update(torch.zeros(2, 4, 4), labels)
    with pytest.raises(TypeError, match=r"`references` must hold integer class indices, got a numpy array of dtype"):
        accumulator.update(labels, np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match=r"as many maps, got 2 and 1"):
        mean_iou([labels[0], labels[1]], [labels[0]], num_labels=19)
    with pytest.raises(ValueError, match=r"`num_labels` must be a positive integer, got 0"):
        ConfusionMatrixAccumulator(0)
    with pytest.raises(ValueError, match=r"`backend` must be one of 'auto', 'numba', 'torch', got 'cuda'"):
        ConfusionMatrixAccumulator(19, backend="cuda")
    assert int(accumulator.confusion_matrix.sum()) == 0  # failed updates add nothing


def test_out_of_range_predictions_on_skipped_pixels_are_ignored(backend):
    """As in evaluate: predictions of ignored (or out-of-range) references are not looked at, whatever they hold."""
    references = torch.tensor([[0, 1, 255], [2, -100, 7]])
    predictions = torch.tensor([[0, 2, 255], [2, -5, 1000]])
    accumulator = ConfusionMatrixAccumulator(3, backend=backend)
    accumulator.update(predictions, references)
    assert accumulator.confusion_matrix.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]


def _all_reduce_worker(rank: int, world_size: int, init_file: str, output_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        accumulator = ConfusionMatrixAccumulator(19)
        accumulator.update(*blocky_maps(rank, (20, 30), 19))
        accumulator.all_reduce()
        torch.save(accumulator.confusion_matrix, os.path.join(output_dir, f"{rank}.pt"))
        accumulator.all_reduce()  # a second call (e.g. by a caller and by a helper) must not add the totals again
        torch.save(accumulator.confusion_matrix, os.path.join(output_dir, f"{rank}_twice.pt"))
        accumulator.update(*blocky_maps(rank + 10, (20, 30), 19))  # more maps after a reduction, reduced again
        accumulator.all_reduce()
        torch.save(accumulator.confusion_matrix, os.path.join(output_dir, f"{rank}_more.pt"))
        accumulator.reset()  # a new evaluation: nothing of the earlier one comes back
        accumulator.all_reduce()
        torch.save(accumulator.confusion_matrix, os.path.join(output_dir, f"{rank}_reset.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_over_processes(tmp_path):
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = ConfusionMatrixAccumulator(19)
    for rank in range(2):
        expected.update(*blocky_maps(rank, (20, 30), 19))
    more = copy.deepcopy(expected)
    for rank in range(2):
        more.update(*blocky_maps(rank + 10, (20, 30), 19))
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"{rank}.pt"), expected.confusion_matrix)
        assert torch.equal(torch.load(tmp_path / f"{rank}_twice.pt"), expected.confusion_matrix)
        assert torch.equal(torch.load(tmp_path / f"{rank}_more.pt"), more.confusion_matrix)
        assert int(torch.load(tmp_path / f"{rank}_reset.pt").sum()) == 0


# ---------------------------------------------------------------------------------------------------------------------
# Cityscapes parity


def _assert_matches_cityscapes(ours: dict, class_scores: dict[str, float], average: float) -> None:
    """Per class bit-identical; the mean identical up to float summation order (sequential vs numpy's nanmean)."""
    for train_id, name in CITYSCAPES_ID2LABEL.items():
        np.testing.assert_array_equal(ours["per_category_iou"][train_id], class_scores[name], err_msg=name)
    ignored = [label.name for label in CITYSCAPES_LABELS if label.id >= 0 and label.ignore_in_eval]
    assert all(math.isnan(class_scores[name]) for name in ignored)
    valid = [iou for iou in ours["per_category_iou"].tolist() if not math.isnan(iou)]
    assert sum(valid) / len(valid) == average  # the same mean, summed in the evaluator's order
    assert ours["mean_iou"] == pytest.approx(average, rel=4e-16, abs=0)


def test_cityscapes_sample_matches_cityscapes_evaluator(cityscapes_sample):
    _, label_ids, prediction = cityscapes_sample
    ours = mean_iou([prediction], [LABEL_ID_TO_TRAIN_ID[label_ids]], NUM_CITYSCAPES_CLASSES)
    class_scores, average = cityscapes_reference_scores([TRAIN_ID_TO_LABEL_ID[prediction]], [label_ids])
    _assert_matches_cityscapes(ours, class_scores, average)
    assert 0.1 < ours["mean_iou"] < 0.9  # the perturbation leaves a meaningful, imperfect score
    assert np.isnan(ours["per_category_iou"]).any()  # classes absent from the image stay NaN, as in the evaluator


def synthetic_cityscapes_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    """(prediction in trainIds, ground truth in labelIds 0..33, ignored ids included) of three sizes."""
    pairs = []
    for seed, shape in enumerate([(48, 96), (31, 57), (64, 40)]):
        noisy_label_ids, ground_truth = blocky_maps(seed + 10, shape, 34, ignore_fraction=0)
        prediction = LABEL_ID_TO_TRAIN_ID[noisy_label_ids]
        prediction = np.where(prediction == IGNORE_INDEX, noisy_label_ids % NUM_CITYSCAPES_CLASSES, prediction)
        pairs.append((prediction.astype(np.uint8), ground_truth.astype(np.uint8)))
    return pairs


def test_synthetic_maps_match_cityscapes_evaluator():
    pairs = synthetic_cityscapes_pairs()
    ours = mean_iou([p for p, _ in pairs], [LABEL_ID_TO_TRAIN_ID[g] for _, g in pairs], NUM_CITYSCAPES_CLASSES)
    class_scores, average = cityscapes_reference_scores([TRAIN_ID_TO_LABEL_ID[p] for p, _ in pairs],
                                                        [g for _, g in pairs])
    _assert_matches_cityscapes(ours, class_scores, average)


def test_real_cityscapes_scripts(tmp_path, cityscapes_sample):
    """cityscapesscripts itself (when installed) on the sample file and on synthetic PNGs: same per-class IoU."""
    path, label_ids, prediction = cityscapes_sample
    pairs = [(prediction, label_ids)] + synthetic_cityscapes_pairs()
    ground_truth_files = [path]
    for index, (_, ground_truth) in enumerate(pairs[1:]):
        ground_truth_files.append(tmp_path / f"gt_{index}_labelIds.png")
        Image.fromarray(ground_truth).save(ground_truth_files[-1])
    class_scores, average = run_cityscapes_scripts(tmp_path, [TRAIN_ID_TO_LABEL_ID[p] for p, _ in pairs],
                                                   ground_truth_files)
    ours = mean_iou([p for p, _ in pairs], [LABEL_ID_TO_TRAIN_ID[g] for _, g in pairs], NUM_CITYSCAPES_CLASSES)
    _assert_matches_cityscapes(ours, class_scores, average)
    reference_scores, reference_average = cityscapes_reference_scores([TRAIN_ID_TO_LABEL_ID[p] for p, _ in pairs],
                                                                      [g for _, g in pairs])
    assert reference_average == average
    np.testing.assert_array_equal(list(reference_scores.values()), [class_scores[n] for n in reference_scores])


# ---------------------------------------------------------------------------------------------------------------------
# Local evaluate module

_EVALUATE_SCRIPT = """
import json, sys
import evaluate, numpy as np
cases = json.loads(sys.stdin.read())
metric = evaluate.load(sys.argv[1])
out = []
for case in cases:
    kwargs = dict(case["kwargs"])
    if "label_map" in kwargs:
        kwargs["label_map"] = {int(k): v for k, v in kwargs["label_map"].items()}
    result = metric.compute(predictions=[np.array(p) for p in case["predictions"]],
                            references=[np.array(r) for r in case["references"]], **kwargs)
    out.append({k: np.asarray(v).tolist() for k, v in result.items()})
print(json.dumps(out))
"""


def test_local_evaluate_module_offline(tmp_path):
    pytest.importorskip("evaluate")
    cases = []
    for seed, kwargs in enumerate([
        {"num_labels": 19, "ignore_index": 255},
        {"num_labels": 12, "ignore_index": 255, "reduce_labels": True, "nan_to_num": 0},
        {"num_labels": 19, "ignore_index": 255, "label_map": {"3": 4, "4": 5}},  # mappings chain, as in evaluate
    ]):
        pairs = [blocky_maps(seed * 3 + i, shape, kwargs["num_labels"]) for i, shape in enumerate([(12, 20), (9, 7)])]
        cases.append({"kwargs": kwargs, "predictions": [p.tolist() for p, _ in pairs],
                      "references": [r.tolist() for _, r in pairs]})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", _EVALUATE_SCRIPT, str(MEAN_IOU_METRIC_PATH)],
                            input=json.dumps(cases), capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = json.loads(result.stdout.strip().splitlines()[-1])
    for case, output in zip(cases, outputs):
        kwargs = dict(case["kwargs"])
        if "label_map" in kwargs:
            kwargs["label_map"] = {int(k): v for k, v in kwargs["label_map"].items()}
        expected = evaluate_reference_mean_iou(
            [np.array(p) for p in case["predictions"]], [np.array(r) for r in case["references"]], **kwargs
        )
        for key in METRIC_KEYS:  # JSON round trip: NaN -> NaN, floats exact (repr round-trips)
            np.testing.assert_array_equal(np.asarray(output[key], dtype=np.float64), expected[key], err_msg=key)


# ---------------------------------------------------------------------------------------------------------------------
# Trainer helpers


def _logits_and_labels(seed: int, batch_size: int = 2, num_labels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch_size, num_labels, 6, 8, generator=generator)
    labels = torch.randint(0, num_labels, (batch_size, 12, 16), generator=generator)
    labels[:, :2] = IGNORE_INDEX
    labels[:, -1] = -100  # Trainer padding
    return logits, labels


def test_preprocess_logits_for_metrics():
    logits, labels = _logits_and_labels(0)
    predictions = preprocess_logits_for_metrics((logits, torch.zeros(1)), labels)
    assert predictions.shape == labels.shape and predictions.dtype == torch.int32
    upsampled = torch.nn.functional.interpolate(logits, size=(12, 16), mode="bilinear", align_corners=False)
    assert torch.equal(predictions.long(), upsampled.argmax(1))
    assert torch.equal(preprocess_logits_for_metrics(upsampled, labels).long(), upsampled.argmax(1))  # no resize
    with pytest.raises(ValueError, match=r"\(batch_size, num_labels, height, width\), got \(5, 6, 8\)"):
        preprocess_logits_for_metrics(logits[0], labels)


def test_compute_metrics_streams_like_one_shot():
    id2label = {0: "road", 1: "sky", 2: "car", 3: "person", 4: "tree"}
    compute_metrics = make_compute_metrics(5, id2label=id2label)
    assert "compute_result" in inspect.signature(compute_metrics).parameters  # what Trainer checks
    batches = [_logits_and_labels(seed) for seed in range(3)]
    all_predictions = torch.cat([preprocess_logits_for_metrics(logits, labels) for logits, labels in batches])
    all_labels = torch.cat([labels for _, labels in batches])
    expected = mean_iou(all_predictions, all_labels, 5)
    for evaluation in range(2):  # the accumulator resets after each evaluation
        for index, (logits, labels) in enumerate(batches):
            predictions = preprocess_logits_for_metrics(logits, labels) if evaluation == 0 else logits  # raw logits too
            metrics = compute_metrics(EvalPrediction(predictions, labels), compute_result=index == len(batches) - 1)
            assert metrics == {} or index == len(batches) - 1
        assert metrics["mean_iou"] == expected["mean_iou"]
        assert metrics["overall_accuracy"] == expected["overall_accuracy"]
        for train_id, name in id2label.items():
            np.testing.assert_array_equal(metrics[f"iou_{name}"], expected["per_category_iou"][train_id])
            np.testing.assert_array_equal(metrics[f"accuracy_{name}"], expected["per_category_accuracy"][train_id])
        assert all(isinstance(value, float) for value in metrics.values())
    one_shot = make_compute_metrics(5)(EvalPrediction(all_predictions.numpy(), all_labels.numpy()))
    assert one_shot["mean_iou"] == expected["mean_iou"] and "iou_0" in one_shot


class _TinySegmenter(torch.nn.Module):
    """Logits at half the label resolution, as a segmentation model with an output stride would give."""

    def __init__(self, num_labels: int) -> None:
        super().__init__()
        self.classifier = torch.nn.Conv2d(3, num_labels, kernel_size=1)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.classifier(torch.nn.functional.avg_pool2d(pixel_values, 2))
        output = {"logits": logits}
        if labels is not None:
            upsampled = torch.nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear")
            output["loss"] = torch.nn.functional.cross_entropy(upsampled, labels, ignore_index=IGNORE_INDEX)
        return output


def test_trainer_batch_eval_metrics(tmp_path):
    """End to end through transformers.Trainer(batch_eval_metrics=True): same numbers as on all maps at once."""
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = _TinySegmenter(4).eval()
    generator = torch.Generator().manual_seed(3)
    dataset = [{"pixel_values": torch.randn(3, 10, 14, generator=generator),
                "labels": torch.randint(0, 4, (10, 14), generator=generator).index_fill_(0, torch.tensor([0]), 255)}
               for _ in range(5)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, batch_eval_metrics=True,
                             report_to="none", use_cpu=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, eval_dataset=dataset, compute_metrics=make_compute_metrics(4),
                      preprocess_logits_for_metrics=preprocess_logits_for_metrics)
    metrics = trainer.evaluate()
    predictions, references = [], []
    with torch.no_grad():
        for start in range(0, len(dataset), 2):  # the Trainer's batches, so that the logits are bit-identical
            labels = torch.stack([sample["labels"] for sample in dataset[start : start + 2]])
            logits = model(torch.stack([sample["pixel_values"] for sample in dataset[start : start + 2]]))["logits"]
            predictions.append(preprocess_logits_for_metrics(logits, labels))
            references.append(labels)
    expected = mean_iou(predictions, references, 4)
    assert metrics["eval_mean_iou"] == expected["mean_iou"]
    assert metrics["eval_overall_accuracy"] == expected["overall_accuracy"]
    assert {f"eval_iou_{index}" for index in range(4)} <= set(metrics)


def test_an_interrupted_evaluation_leaves_no_counts_in_the_next_one(tmp_path):
    """The streaming compute_metrics keeps counts between calls; HMSTrainer resets it as each evaluation starts."""
    from transformers import EvalPrediction

    from hms_segmentation import HMSConfig, HMSForSemanticSegmentation
    from hms_segmentation.training.arguments import HMSTrainingArguments
    from hms_segmentation.training.train import HMSTrainer
    from tiny_configs import TINY_RESNET

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(3)
    dataset = [{"pixel_values": torch.randn(3, 32, 48, generator=generator),
                "labels": torch.randint(0, 5, (32, 48), generator=generator)} for _ in range(4)]
    args = HMSTrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, batch_eval_metrics=True,
                                report_to="none", use_cpu=True, dataloader_num_workers=0)
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_RESNET, inference_scales=[1.0])).eval()
    trainer = HMSTrainer(model=model, args=args, eval_dataset=dataset, compute_metrics=make_compute_metrics(5),
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics)
    expected = trainer.evaluate()
    # an evaluation stopped after its first batch (an exception, Ctrl-C in a notebook) left these counts behind
    trainer.compute_metrics(EvalPrediction(np.zeros((2, 32, 48), np.int64), np.ones((2, 32, 48), np.int64)),
                            compute_result=False)
    again = trainer.evaluate()
    assert again["eval_mean_iou"] == expected["eval_mean_iou"]
    assert again["eval_overall_accuracy"] == expected["eval_overall_accuracy"]


def test_inference_mode_and_normal_mode_mix():
    """Updates inside and outside ``torch.inference_mode()`` on one accumulator (evaluation loops use both)."""
    prediction, reference = blocky_maps(0, (16, 24), 19)
    accumulator = ConfusionMatrixAccumulator(19)
    with torch.inference_mode():
        accumulator.update(prediction, reference)
    accumulator.update(prediction, reference)
    accumulator.all_reduce()
    with torch.inference_mode():
        accumulator.update(prediction, reference)
        accumulator.reset()
        accumulator.update(prediction, reference)
    accumulator.update(prediction, reference)
    expected = 2 * brute_force_confusion_matrix([prediction], [reference], 19, IGNORE_INDEX)
    np.testing.assert_array_equal(accumulator.confusion_matrix.numpy(), expected)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 19-class tiny model: the `evaluate` command's argument checks do not depend on its weights."""
    from tiny_configs import TINY_HRNET, save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"), TINY_HRNET, num_labels=19)


def _odd_cityscapes(shared_data_dir: Path, root: Path, image: str) -> Path:
    """A one-frame Cityscapes val split in the official layout, whose image is the given file of odd_inputs."""
    odd = shared_data_dir / "odd_inputs"
    (root / "leftImg8bit/val/city").mkdir(parents=True)
    (root / "gtFine/val/city").mkdir(parents=True)
    (root / "leftImg8bit/val/city/city_000000_000001_leftImg8bit.png").write_bytes((odd / image).read_bytes())
    (root / "gtFine/val/city/city_000000_000001_gtFine_labelIds.png").write_bytes(
        (odd / "label_ok_labelIds.png").read_bytes())
    return root


def test_evaluate_command_refuses_bad_scales_and_datasets_naming_them(tiny_model_dir, shared_data_dir, tmp_path,
                                                                      capsys):
    from hms_segmentation.training.evaluate import main as evaluate_main

    good = _odd_cityscapes(shared_data_dir, tmp_path / "good", "rgb_ok.png")
    argv = ["--model", str(tiny_model_dir), "--dataset", "cityscapes", "--device", "cpu"]
    for scales in ("0", "-1", "0.5,0"):
        assert evaluate_main(argv + ["--data-dir", str(good), "--scales", "1.0", scales]) == 2
        assert f"--scales {scales} must be a non-empty list of positive, finite numbers" in capsys.readouterr().err
    broken = _odd_cityscapes(shared_data_dir, tmp_path / "broken", "truncated.png")
    assert evaluate_main(argv + ["--data-dir", str(broken), "--scales", "1.0"]) == 2
    assert "city_000000_000001_leftImg8bit.png: the file is truncated or corrupt" in capsys.readouterr().err
    (tmp_path / "empty/leftImg8bit/val").mkdir(parents=True)
    assert evaluate_main(argv + ["--data-dir", str(tmp_path / "empty"), "--scales", "1.0"]) == 2
    assert "leftImg8bit/val holds no images" in capsys.readouterr().err
    assert evaluate_main(argv + ["--data-dir", str(tmp_path / "typo"), "--scales", "1.0"]) == 2
    assert f"{tmp_path / 'typo'} not found" in capsys.readouterr().err


def test_evaluate_command_never_replaces_a_results_file_without_overwrite(tiny_model_dir, shared_data_dir, tmp_path,
                                                                          capsys):
    from hms_segmentation.training.evaluate import main as evaluate_main

    data = _odd_cityscapes(shared_data_dir, tmp_path / "data", "rgb_ok.png")
    output = tmp_path / "results"
    output.mkdir()
    (output / "results.md").write_text("my notes")
    argv = ["--model", str(tiny_model_dir), "--dataset", "cityscapes", "--data-dir", str(data), "--scales", "1.0",
            "--device", "cpu", "--output-dir", str(output)]
    assert evaluate_main(argv) == 2
    assert "results.md exists; pass --overwrite" in capsys.readouterr().err
    assert (output / "results.md").read_text() == "my notes" and not (output / "results.json").exists()
    assert evaluate_main(argv + ["--overwrite"]) == 0
    record = json.loads((output / "results.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN
    assert record["results"][0]["images"] == 1 and record["eval_long_side"] is None  # Cityscapes: full size
    assert evaluate_main(argv + ["--overwrite", "--eval-long-side", "48"]) == 0  # the reference's Mapillary protocol
    assert json.loads((output / "results.json").read_text())["eval_long_side"] == 48
    assert evaluate_main(argv + ["--overwrite", "--eval-long-side", "-1"]) == 2
    assert "--eval_long_side must be a number of pixels (0 = off), got -1" in capsys.readouterr().err


def test_evaluate_command_refuses_an_output_folder_it_could_not_write_before_evaluating(tiny_model_dir, tmp_path,
                                                                                        capsys, monkeypatch):
    """A folder under a file (or without write access) was found only when the results were written, after the
    evaluation, which lost them."""
    from hms_segmentation.training import evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "_evaluate_and_report", lambda *args: pytest.fail("evaluated anyway"))
    (tmp_path / "notes.txt").write_text("keep me")
    argv = ["--model", str(tiny_model_dir), "--device", "cpu", "--scales", "1.0"]
    target = tmp_path / "notes.txt" / "results"
    assert evaluate_module.main(argv + ["--output-dir", str(target)]) == 2
    assert f"--output-dir {target} cannot be created: {tmp_path / 'notes.txt'} is a file" in capsys.readouterr().err
    for flag in ("--save-predictions", "--save-visuals"):
        assert evaluate_module.main(argv + [flag, str(tmp_path / "notes.txt" / "deeper" / "pictures")]) == 2
        assert f"{flag} {tmp_path / 'notes.txt' / 'deeper' / 'pictures'} cannot be created" in capsys.readouterr().err
    monkeypatch.setattr(evaluate_module.os, "access", lambda path, mode: Path(path) != tmp_path)  # read-only tmp_path
    assert evaluate_module.main(argv + ["--output-dir", str(tmp_path / "new" / "results")]) == 2
    assert f"cannot be created: {tmp_path} is not writable" in capsys.readouterr().err
    assert evaluate_module.main(argv + ["--output-dir", str(tmp_path)]) == 2
    assert f"--output-dir {tmp_path} is not writable" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me" and not (tmp_path / "new").exists()


def test_metrics_are_written_as_strict_json_with_null_for_undefined_values():
    from hms_segmentation.evaluation import metrics_to_json

    text = metrics_to_json({"mean_iou": np.float32(0.5), "iou": np.array([0.25, np.nan]),
                            "rows": [{"x": float("inf")}, (1, "a", None, True)]})
    assert json.loads(text, parse_constant=pytest.fail) == {"mean_iou": 0.5, "iou": [0.25, None],
                                                            "rows": [{"x": None}, [1, "a", None, True]]}


def test_maps_given_as_nested_lists_may_be_empty(backend):
    """``np.asarray`` makes float64 of an empty list: a map of zero width given as lists is still a label map."""
    maps = [[[0, 1], [1, 1]], [[], [], []]]  # 2x2, then 3x0
    metrics = mean_iou(maps, maps, num_labels=2, backend=backend)
    np.testing.assert_array_equal(metrics["per_category_iou"], [1.0, 1.0])
    with pytest.raises(TypeError, match="must hold integer class indices, got a numpy array of dtype float64"):
        mean_iou([[[0.5, 1.0]]], [[[0, 1]]], num_labels=2, backend=backend)


def test_maps_reach_a_cpu_accumulator_by_a_synchronous_copy(monkeypatch):
    """A non-blocking copy from a GPU to the CPU returns before the data is there: the CPU counting would read it too
    early (no GPU here: the copies' arguments are checked)."""
    non_blocking = []
    original_to = torch.Tensor.to

    def spying_to(self, *args, **kwargs):
        non_blocking.append(bool(kwargs.get("non_blocking", False)))
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spying_to)
    accumulator = ConfusionMatrixAccumulator(3, device="cpu")
    accumulator.update(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 2, 2]]))
    assert len(non_blocking) >= 2 and not any(non_blocking)
    assert accumulator.confusion_matrix.sum() == 3
