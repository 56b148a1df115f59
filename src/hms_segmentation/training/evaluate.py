"""Evaluate a trained or converted checkpoint on a dataset split, at one or more scale lists, with optional flip.

    hms-segmentation evaluate --model runs/synthetic --scales 1.0 0.5,1.0,2.0 --output-dir eval_results
    hms-segmentation evaluate --model hms-cityscapes --dataset cityscapes --data-dir /data/cityscapes --flip
    hms-segmentation evaluate --model hms-mapillary --dataset mapillary --data-dir /data/mapillary --tile_pixel_budget 4194304
    accelerate launch --num_processes 8 -m hms_segmentation.training.evaluate --model hms-mapillary --dataset mapillary \
        --data-dir /data/mapillary --scales 0.25,0.5,1.0,2.0 --flip --precision fp16    # the reference's eval_mapillary.yml

Large inputs: `--tile_pixel_budget` runs every scale above that many pixels as overlapping tiles (`--tile_size`,
`--tile_overlap`), `--max_long_side` shrinks inputs first (predictions are scored at the labels' full size). Mapillary
is evaluated as the reference does, image and label resized to a long side of 2177 (`--eval-long-side`; 0 = full
size).

Every scale list is one row of the comparison: per-class IoU, mIoU, pixel accuracy and seconds per image, printed and
saved as `results.json` and `results.md` in `--output-dir`. Launched on several processes (`accelerate launch`,
`torchrun`), each evaluates every n-th image and the confusion matrices are summed, so the figures are those of one
process; the time per image is then the processes' time summed over the images (device seconds per image).
`--precision fp16` / `bf16` runs the forward under autocast (the reference evaluates in fp16); `--batch-size` images
of one size share a forward; `--num-workers` DataLoader workers decode the images. `--torch-compile` compiles the
forward (`torch.compile`; `--torch-compile-backend`, `--torch-compile-mode`): each scale list's first batch runs once
more untimed, as the compilation, reported apart ("first call s"); it pays on a long split of same-size images
(Cityscapes), while images of varying size (Mapillary) compile again per size.

`--save-predictions DIR` also writes each image's prediction as `DIR/<id>.png` (one model, one scale list): training
ids, the dataset's own label ids (`--prediction-format label_ids`: Cityscapes' labelIds, what its benchmark server and
cityscapesScripts' evaluator read, the reference's ``--dump_for_submission``) or colours, at the size the labels are
scored at. `--save-visuals DIR` pictures some images (`--num-visuals`, default 10, spread over the split, or with
`--visuals-select worst` those with the most wrong pixels; 0: all), as the reference's ``--dump_assets``: input,
ground truth, prediction, the two blended, and each scale's own prediction and attention map, with `DIR/index.html`
showing them side by side.

`--model` also takes a graph of `hms-segmentation export-onnx` (a `.onnx` file), run by onnxruntime: its scale list
and flip are the ones it was exported with (`--scales` and `--flip` default to them and must match), so `--model
torch=runs/m --model ort=runs/m/onnx/model.onnx` scores the deployed graph beside the model in one table (also a
graph that other tools changed afterwards, e.g. quantised). It has no attention maps (no `--scale-shares`,
`--save-visuals`) and runs in the precision it holds (no `--precision`, no tiling, no `--torch-compile`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from ..configuration_hms import validate_scales
from ..data.io import write_png_atomically
from ..data.mapillary import MAPILLARY_VERSIONS
from ..evaluation import ConfusionMatrixAccumulator, metrics_to_json, preprocess_logits_for_metrics
from ..export_onnx import OnnxSegmenter
from ..hub import check_model_source, load_hms_model, markdown_table, scale_list_label
from ..image_processing_hms import shrink_to_long_side
from ..inference_options import (
    TILING_ARGUMENTS,
    add_compile_arguments,
    add_large_input_arguments,
    compile_for_inference,
    compile_settings,
    large_input_settings,
)
from ..modeling_hms import (
    HMSForSemanticSegmentation,
    HMSSemanticSegmenterOutput,
    attentions_at_size,
    average_with_mirrored,
    hierarchical_scale_weights,
)
from .arguments import DATASETS, DataArguments, parse_scales
from .datasets import build_eval_dataset, check_same_size, dataset_label_ids
from .visuals import SELECTIONS, VisualsWriter, visualized_indices

if TYPE_CHECKING:
    from accelerate import PartialState

RESULT_FILES = ("results.json", "results.md")
"""What `--output-dir` receives; neither is replaced without `--overwrite`."""
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
"""`--precision`: the autocast dtype of the forward (None: float32 throughout)."""
DEFAULT_SCALE_LISTS = ["1.0", "0.5,1.0,2.0"]
"""`--scales` when not given: single scale against the paper's chain."""
PREDICTION_FORMATS = ("train_ids", "label_ids", "color")
"""`--prediction-format`: what the PNGs of `--save-predictions` hold."""


class PredictionWriter:
    """Writes predictions as `<directory>/<sample id>.png`: training ids, the dataset's label ids or colours (a
    palette PNG). Each file is written under a hidden name and renamed, so a killed run leaves no half-written one.

    Args:
        directory: Where the PNGs go (created if missing).
        prediction_format: One of `PREDICTION_FORMATS`.
        label_ids: Training id -> the dataset's label id (for ``"label_ids"``).
        palette: Colour of each training id (for ``"color"``).
    """

    def __init__(self, directory: Path, prediction_format: str, label_ids: dict[int, int],
                 palette: tuple[tuple[int, int, int], ...]):
        if prediction_format not in PREDICTION_FORMATS:
            raise ValueError(f"--prediction-format must be one of {', '.join(PREDICTION_FORMATS)}, got "
                             f"{prediction_format!r}")
        self.directory = directory
        self.prediction_format = prediction_format
        self.lookup = np.arange(256, dtype=np.uint8)  # 255 (never predicted) stays 255
        for train_id, label_id in label_ids.items():
            self.lookup[train_id] = label_id
        self.palette = [channel for colour in palette for channel in colour]

    def path(self, sample_id: str) -> Path:
        # an id is a file name here, not a path: separators would place files elsewhere
        return self.directory / (sample_id.replace("/", "_").replace("\\", "_") + ".png")

    def write(self, sample_id: str, prediction: torch.Tensor) -> None:
        """`prediction`: `(height, width)` training ids."""
        train_ids = prediction.to(device="cpu", dtype=torch.uint8).numpy()
        if self.prediction_format == "label_ids":
            image = Image.fromarray(self.lookup[train_ids])
        else:
            image = Image.fromarray(train_ids)
            if self.prediction_format == "color":
                image = image.convert("P")
                image.putpalette(self.palette)
        write_png_atomically(self.path(sample_id), image)


def precision_autocast(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager:
    """`torch.autocast` on `device`'s type in `precision`'s dtype (a key of `PRECISIONS`); no context for fp32.

    Raises:
        ValueError: `precision` is not a key of `PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype=dtype)


def predict(
    model: HMSForSemanticSegmentation,
    pixel_values: torch.Tensor,
    scales: list[float],
    flip: bool,
    max_long_side: int | None = None,
    **tiling: Any,
) -> torch.Tensor:
    """
    Fused logits (batch, num_labels, H, W), averaged with those of the mirrored image when `flip`.

    With `max_long_side`, inputs with a longer side are shrunk first (the logits then have the shrunk size);
    `tiling` (`tile_pixel_budget`, `tile_size`, `tile_overlap`) goes to the model's forward.
    """
    return predict_with_attentions(model, pixel_values, scales, flip, max_long_side, False, **tiling)[0]


def predict_with_attentions(
    model: HMSForSemanticSegmentation,
    pixel_values: torch.Tensor,
    scales: list[float],
    flip: bool,
    max_long_side: int | None = None,
    output_attentions: bool = True,
    **tiling: Any,
) -> tuple[torch.Tensor, HMSSemanticSegmenterOutput]:
    """`predict`'s logits, and the model's output for the unmirrored image (with its per-scale attention maps and
    logits when `output_attentions`)."""
    pixel_values = shrink_to_long_side(pixel_values, max_long_side)
    outputs = model(pixel_values, scales=scales, output_attentions=output_attentions, **tiling)
    logits = outputs.logits
    if flip:
        logits = average_with_mirrored(model, pixel_values, logits, scales=scales, **tiling)
    return logits, outputs


def scale_share_sums(attentions: tuple[torch.Tensor, ...], labels: torch.Tensor, num_labels: int, ignore_index: int,
                     align_corners: bool = False) -> torch.Tensor:
    """
    Per class, the summed share of each scale in the chain's result (`hierarchical_scale_weights`) over the labelled
    pixels of a batch, and the pixel count.

    Args:
        attentions: One `(batch, 1, h_s, w_s)` map per scale, ascending (the model's `attentions`).
        labels (`torch.Tensor` of shape `(batch, height, width)`): Ground-truth classes, `ignore_index` ignored.

    Returns:
        `torch.Tensor` of shape `(len(attentions) + 1, num_labels)`, float64: a row of summed shares per scale, then
        the row of pixel counts. Summed over batches (and processes), row `s` divided by the last is the mean share.
    """
    resized = attentions_at_size(attentions, labels.shape[-2:], align_corners)
    labelled = labels != ignore_index
    classes = labels[labelled]
    rows = [torch.bincount(classes, weights=weight[labelled].double(), minlength=num_labels)
            for weight in hierarchical_scale_weights(resized)]
    rows.append(torch.bincount(classes, minlength=num_labels).double())
    return torch.stack(rows)


def wait_for_device(device: torch.device) -> None:
    """Wait for the kernels queued on `device`: on a GPU they run after the call returns, so a timer stopped without
    waiting would miss them."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def evaluate_scales(
    model: HMSForSemanticSegmentation,
    dataset,
    scales: list[float],
    flip: bool = False,
    device: str | torch.device = "cpu",
    id2label: dict[int, str] | None = None,
    max_long_side: int | None = None,
    precision: str = "fp32",
    num_workers: int = 0,
    progress: bool = False,
    prediction_writer: PredictionWriter | None = None,
    visuals_writer: VisualsWriter | None = None,
    batch_size: int = 1,
    batch_size_flag: str = "--batch-size",
    scale_shares: bool = False,
    warm_up: bool = False,
    **tiling: Any,
) -> dict:
    """mIoU and per-class IoU of `model` on `dataset` at `scales`, with the time per image; classes named by
    `id2label` (the dataset's) or else the model's. `max_long_side` and `tiling` (`tile_pixel_budget`, `tile_size`,
    `tile_overlap`) as in `predict`; predictions are always scored at the labels' size. `precision` (a key of
    `PRECISIONS`) is the autocast dtype of the forward; `num_workers` DataLoader workers read and decode the images;
    `prediction_writer` (needs `dataset.sample_ids()`) saves each prediction, `visuals_writer` (likewise) pictures the
    images it chooses after the evaluation (one more prediction of each, not timed; their ids and error rates then in
    `visuals_writer.pictured`); `batch_size` images of one size go through the model together (`batch_size_flag`: the
    option an error about mixed sizes names). `scale_shares` (HMSA's chain over several scales) adds
    `"scale_shares"`: per class and over all labelled pixels, the mean share of each scale in the result
    (`hierarchical_scale_weights`, from the unmirrored pass). `warm_up` runs the first batch once more before its timed
    pass, so that a compiled model's compilation stays out of the time per image; that first call's seconds are
    `"warm_up_seconds"` (this process's).

    Under ``torch.distributed`` each process evaluates every `world_size`-th image and the counts are summed over the
    processes: every process returns the figures of the whole split."""
    device = torch.device(device)
    num_labels = model.config.num_labels
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    indices = range(rank, len(dataset), world_size)
    shard = torch.utils.data.Subset(dataset, indices)
    sample_ids = dataset.sample_ids() if prediction_writer is not None or visuals_writer is not None else None
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=functools.partial(_collate_same_size, batch_size_flag=batch_size_flag))
    autocast = precision_autocast(device, precision)
    accumulator = ConfusionMatrixAccumulator(num_labels, ignore_index=model.config.ignore_index, device=device)
    # per image: wrong and labelled pixels, to choose the images to picture (the worst ones, if asked)
    image_errors = (torch.zeros(len(dataset), 2, dtype=torch.float64, device=device) if visuals_writer is not None
                    else None)
    share_sums = None
    if scale_shares and len(scales) > 1:
        if model.config.scale_fusion != "hierarchical":
            raise ValueError(f"scale shares read HMSA's attention chain; this model fuses its scales with "
                             f"scale_fusion={model.config.scale_fusion!r}")
        share_sums = torch.zeros(len(scales) + 1, num_labels, dtype=torch.float64, device=device)
    seconds = 0.0
    warm_up_seconds = None
    with torch.inference_mode():
        bar = tqdm(total=len(shard), desc=f"evaluating {scale_list_label(scales, flip, precision)}", unit="image",
                   disable=not progress)
        done = 0
        for batch in loader:
            pixel_values = batch["pixel_values"].to(device)
            labels = batch["labels"].to(device)
            if warm_up and warm_up_seconds is None:
                start = time.perf_counter()
                with autocast:
                    predict_with_attentions(model, pixel_values, scales, flip, max_long_side, share_sums is not None,
                                            **tiling)
                wait_for_device(pixel_values.device)
                warm_up_seconds = time.perf_counter() - start
            start = time.perf_counter()
            with autocast:
                logits, outputs = predict_with_attentions(model, pixel_values, scales, flip, max_long_side,
                                                          share_sums is not None, **tiling)
            predictions = preprocess_logits_for_metrics(logits.float(), labels, model.config.align_corners)
            if share_sums is not None:
                share_sums += scale_share_sums(outputs.attentions, labels, num_labels, model.config.ignore_index,
                                               model.config.align_corners)
            del outputs
            wait_for_device(predictions.device)
            seconds += time.perf_counter() - start
            accumulator.update(predictions, labels)
            if prediction_writer is not None:
                for offset, prediction in enumerate(predictions):
                    prediction_writer.write(sample_ids[indices[done + offset]], prediction)
            if image_errors is not None:
                positions = torch.as_tensor(indices[done:done + len(predictions)], device=device)
                image_errors[positions] = wrong_and_labelled_pixels(predictions, labels, model.config.ignore_index)
            done += len(predictions)
            bar.update(len(predictions))
        bar.close()
    accumulator.all_reduce()
    seconds = _summed_over_processes(seconds, device)
    if visuals_writer is not None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(image_errors)  # each image's counts come from the one process that evaluated it
        error_rates = (image_errors[:, 0] / image_errors[:, 1]).tolist()  # NaN: no labelled pixel
        chosen = visuals_writer.choose(error_rates)
        for index in chosen:
            if index % world_size == rank:  # this process's shard, as evaluated
                picture_image(model, dataset[index], sample_ids[index], visuals_writer, scales, flip, autocast,
                              max_long_side, **tiling)
        visuals_writer.pictured = [(sample_ids[index], error_rates[index]) for index in chosen]
    metrics = accumulator.compute()
    names = [(id2label or model.config.id2label)[i] for i in range(num_labels)]
    shares = {}
    if share_sums is not None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(share_sums)
        *sums, counts = share_sums.cpu()
        ascending = sorted(scales)
        shares = {"scale_shares": {
            # None: no labelled pixel (e.g. the test split's placeholder labels)
            "all": {str(scale): float(total.sum() / counts.sum()) if counts.sum() else None
                    for scale, total in zip(ascending, sums)},
            "per_category": {name: {str(scale): float(total[c] / counts[c]) for scale, total in zip(ascending, sums)}
                             if counts[c] else None for c, name in enumerate(names)},
        }}
    return {
        "scales": scales,
        "flip": flip,
        "precision": precision,
        **({"max_long_side": max_long_side} if max_long_side is not None else {}),
        **{name: value for name, value in tiling.items() if value is not None},
        "images": len(dataset),
        "processes": world_size,
        "seconds_per_image": seconds / max(1, len(dataset)),
        **({"warm_up_seconds": warm_up_seconds} if warm_up_seconds is not None else {}),
        "mean_iou": float(metrics["mean_iou"]),
        "mean_accuracy": float(metrics["mean_accuracy"]),
        "overall_accuracy": float(metrics["overall_accuracy"]),
        "per_category_iou": {name: float(v) for name, v in zip(names, metrics["per_category_iou"].tolist())},
        **shares,
    }


def scale_share_table(results: list[dict]) -> str:
    """For each evaluated chain with `"scale_shares"`: classes as rows, scales as columns, the mean share (in %) of each
    scale in the result over the class's pixels (empty when no row has shares)."""
    tables = []
    for row in results:
        if "scale_shares" not in row:
            continue
        shares, scales = row["scale_shares"], list(row["scale_shares"]["all"])
        flip = "; flip: of the unmirrored pass" if row["flip"] else ""
        lines = [f"Share of each scale in the result ({scale_list_label(row['scales'], row['flip'], row['precision'])}"
                 f"{flip})", "", "| class | " + " | ".join(f"{s}x" for s in scales) + " |",
                 "|---|" + "---:|" * len(scales)]
        for name, per_scale in shares["per_category"].items():
            cells = ["n/a"] * len(scales) if per_scale is None else [f"{100 * per_scale[s]:.1f}" for s in scales]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        overall = ["n/a" if shares["all"][s] is None else f"**{100 * shares['all'][s]:.1f}**" for s in scales]
        lines.append("| **all pixels** | " + " | ".join(overall) + " |")
        tables.append("\n".join(lines) + "\n")
    return "\n".join(tables)


def wrong_and_labelled_pixels(predictions: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """`(batch, 2)` float64: per image, the labelled pixels predicted wrong, and the labelled pixels."""
    labelled = labels != ignore_index
    return torch.stack([((predictions != labels) & labelled).flatten(1).sum(1),
                        labelled.flatten(1).sum(1)], dim=1).double()


def picture_image(model: HMSForSemanticSegmentation, sample: dict[str, torch.Tensor], sample_id: str,
                  visuals_writer: VisualsWriter, scales: list[float], flip: bool = False,
                  autocast: contextlib.AbstractContextManager | None = None, max_long_side: int | None = None,
                  **tiling: Any) -> float:
    """Writes the pictures of one image (`sample`: `pixel_values` and `labels`, as the evaluation datasets give):
    its prediction as `predict` makes it, with the per-scale maps of its unmirrored pass. Returns the image's share of
    wrongly predicted labelled pixels (NaN without labelled pixels)."""
    pixel_values = sample["pixel_values"][None].to(model.device)
    labels = sample["labels"][None].to(model.device)
    with torch.inference_mode():
        with autocast or contextlib.nullcontext():
            logits, outputs = predict_with_attentions(model, pixel_values, scales, flip, max_long_side, **tiling)
        prediction = preprocess_logits_for_metrics(logits.float(), labels, model.config.align_corners)
        wrong, labelled = wrong_and_labelled_pixels(prediction, labels, model.config.ignore_index)[0].tolist()
    visuals_writer.write(sample_id, pixel_values[0], labels[0], prediction[0], outputs)
    return wrong / labelled if labelled else math.nan


def save_evaluation_visuals(model: HMSForSemanticSegmentation, dataset, directory: Path, count: int,
                            palette: tuple[tuple[int, int, int], ...], title: str) -> Path:
    """Pictures `count` images spread over `dataset` (`SegmentationEvalDataset`) at the model's inference scales into
    `directory`, with its index page (which it returns): what the training scripts' `--eval_visuals` writes at each
    evaluation, in this one process. The model is put back in training mode if it was."""
    writer = VisualsWriter(directory, palette, model.config.inference_scales, model.config.scale_fusion, count,
                           align_corners=model.config.align_corners)
    sample_ids, was_training = dataset.sample_ids(), model.training
    model.eval()
    try:
        for index in writer.candidates(len(dataset)):
            error_rate = picture_image(model, dataset[index], sample_ids[index], writer, model.config.inference_scales)
            writer.pictured.append((sample_ids[index], error_rate))
    finally:
        model.train(was_training)
    return writer.write_index(title)


def _collate_same_size(samples: list[dict[str, torch.Tensor]], batch_size_flag: str) -> dict[str, torch.Tensor]:
    return torch.utils.data.default_collate(check_same_size(samples, batch_size_flag))


def _summed_over_processes(value: float, device: torch.device) -> float:
    """`value` summed over the processes of ``torch.distributed`` (itself when there are none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    on_device = device if dist.get_backend() != "nccl" else torch.device("cuda", torch.cuda.current_device())
    total = torch.tensor([value], dtype=torch.float64, device=on_device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total.item())


def comparison_table(results_by_model: dict[str, list[dict]]) -> str:
    """Scale lists as rows; mIoU and pixel accuracy (in %) of each model as columns (e.g. RMI vs cross-entropy)."""
    names = list(results_by_model)
    lines = ["| scales | " + " | ".join(f"{name} mIoU | {name} pixel acc." for name in names) + " |",
             "|---|" + "---:|---:|" * len(names)]
    for row, first in enumerate(results_by_model[names[0]]):
        label = scale_list_label(first["scales"], first["flip"], first.get("precision", "fp32"))
        cells = []
        for name in names:
            result = results_by_model[name][row]
            cells += [f"{100 * result['mean_iou']:.1f}", f"{100 * result['overall_accuracy']:.1f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_model_arguments(values: list[str]) -> dict[str, str]:
    """`--model` values, `PATH` or `NAME=PATH`, as {name: path}; unnamed models are named by their path."""
    models: dict[str, str] = {}
    for value in values:
        name, _, path = value.partition("=") if "=" in value and not value.startswith("=") else (value, "", value)
        if not path:
            raise ValueError(f"--model {value!r}: expected PATH or NAME=PATH")
        if name in models:
            raise ValueError(f"--model: the name {name!r} is given twice")
        models[name] = path
    return models


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hms-segmentation evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, action="append",
                        help="save_pretrained folder, Hub id or .onnx graph of export-onnx; repeat it (optionally as "
                             "NAME=PATH, e.g. --model rmi=runs/rmi --model ce=runs/ce) to compare models column by "
                             "column in one table")
    parser.add_argument("--dataset", choices=DATASETS, default="synthetic")
    parser.add_argument("--data-dir", "--data_dir", dest="data_dir", default=None, help="dataset root (synthetic: generated there if missing)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--mapillary-version", "--mapillary_version", dest="mapillary_version", default="v1.2",
                        choices=MAPILLARY_VERSIONS, help="Mapillary labels: v1.2 or v2.0 (needs config_v2.0.json)")
    parser.add_argument("--scales", nargs="+", default=DEFAULT_SCALE_LISTS,
                        help="one or more comma-separated scale lists (default: 1.0 and 0.5,1.0,2.0; for an .onnx "
                             "graph its own)")
    parser.add_argument("--flip", action="store_true", help="average with the prediction of the mirrored image")
    parser.add_argument("--max-samples", "--max_samples", dest="max_samples", type=int, default=None)
    parser.add_argument("--eval-long-side", "--eval_long_side", dest="eval_long_side", type=int, default=None,
                        help="resize images and labels so that their long side has this many pixels, the reference's "
                             "evaluation of Mapillary; default: 2177 for Mapillary, full size otherwise; 0 = full size")
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", type=Path, default=None, help="write results.json and results.md here")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier results in --output-dir")
    parser.add_argument("--device", default=None,
                        help="default: the GPU if there is one (each launched process its own), else the CPU")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="autocast dtype of the forward: fp32 (none), fp16 (the reference's evaluation) or bf16")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=1,
                        help="images per forward; they must share one size (Cityscapes; not Mapillary, whose sizes vary)")
    parser.add_argument("--num-workers", "--num_workers", dest="num_workers", type=int, default=0,
                        help="DataLoader workers that read and decode the images (0: in the main process)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--save-predictions", "--save_predictions", dest="save_predictions", type=Path, default=None,
                        help="also write each prediction as <DIR>/<image id>.png (one --model, one --scales list); "
                             "existing files are kept unless --overwrite")
    parser.add_argument("--prediction-format", "--prediction_format", dest="prediction_format",
                        choices=PREDICTION_FORMATS, default="label_ids",
                        help="label_ids (the default): the dataset's own ids, e.g. Cityscapes' labelIds for its "
                             "benchmark server and evaluator; train_ids: the model's classes; color: a palette PNG")
    parser.add_argument("--save-visuals", "--save_visuals", dest="save_visuals", type=Path, default=None,
                        help="also write pictures of some images (input, ground truth, prediction, each scale's "
                             "prediction, attention and share) and an index.html over them into DIR (one --model, "
                             "one --scales list; the reference's --dump_assets); existing files are kept unless "
                             "--overwrite")
    parser.add_argument("--num-visuals", "--num_visuals", dest="num_visuals", type=int, default=10,
                        help="how many images --save-visuals pictures (0: every image)")
    parser.add_argument("--visuals-select", "--visuals_select", dest="visuals_select", choices=SELECTIONS,
                        default="spread", help="spread: images spread evenly over the split; worst: those with the "
                                               "largest share of wrongly predicted pixels (the reference's "
                                               "--dump_topn)")
    parser.add_argument("--scale-shares", "--scale_shares", dest="scale_shares", action="store_true",
                        help="also report, per class, how much of the result each scale decided (HMSA's chain: the "
                             "mean share of each scale over the class's pixels); keeps the per-scale maps of each "
                             "forward, so it needs more memory")
    add_large_input_arguments(parser)
    add_compile_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # checked before the model and the dataset are loaded, which can take minutes
        if args.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.max_samples is not None and args.max_samples < 1:  # (DataArguments would name its own flag)
            raise ValueError(f"--max-samples must be at least 1 (or left out for every image), got {args.max_samples}")
        scale_lists = [validate_scales(parse_scales(text), f"--scales {text}") for text in args.scales]
        torch_compile = compile_settings(args)
        data_args = DataArguments(dataset=args.dataset, data_dir=args.data_dir, eval_split=args.split,
                                  mapillary_version=args.mapillary_version,
                                  max_eval_samples=args.max_samples, eval_long_side=args.eval_long_side)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    problem = _unusable_folder(args.output_dir) if args.output_dir is not None else None
    if problem is not None:  # found now, not once the evaluation (hours, perhaps) is done
        print(f"error: --output-dir {problem}", file=sys.stderr)
        return 2
    if args.output_dir is not None and not args.overwrite:
        existing = [args.output_dir / name for name in RESULT_FILES if (args.output_dir / name).exists()]
        if existing:
            print(f"error: {existing[0]} exists; pass --overwrite or choose another --output-dir", file=sys.stderr)
            return 2
    try:
        model_paths = parse_model_arguments(args.model)
        graphs = {name: OnnxSegmenter(path) for name, path in model_paths.items() if Path(path).suffix == ".onnx"}
        for name, path in model_paths.items():
            if name not in graphs:
                check_model_source(path)
        if graphs:
            if args.scales is DEFAULT_SCALE_LISTS:
                scale_lists = [next(iter(graphs.values())).scales]
            check_graph_arguments(args, graphs.values(), scale_lists)
        for flag, folder in (("--save-predictions", args.save_predictions), ("--save-visuals", args.save_visuals)):
            if folder is not None and (len(model_paths) > 1 or len(scale_lists) > 1):
                default = " (two without --scales: 1.0 and 0.5,1.0,2.0)" if args.scales is DEFAULT_SCALE_LISTS else ""
                raise ValueError(f"{flag} saves one prediction per image: give one --model and one --scales list, "
                                 f"got {len(model_paths)} model(s) and {len(scale_lists)} scale list(s){default}")
            problem = _unusable_folder(folder) if folder is not None else None
            if problem is not None:
                raise ValueError(f"{flag} {problem}")
        visualized_indices(1, args.num_visuals)  # checks the count
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with launched_processes(cpu=args.device == "cpu") as state:
        return _evaluate_and_report(args, state, data_args, scale_lists, model_paths, graphs, torch_compile)


def check_graph_arguments(args: argparse.Namespace, graphs: Iterable[OnnxSegmenter],
                          scale_lists: list[list[float]]) -> None:
    """Refuse (`ValueError`, naming the option) what an exported graph cannot give: another scale list or flip than
    its own, another precision, attention maps, tiling."""
    for graph in graphs:
        own = ",".join(map(str, graph.scales))
        if any(sorted(scales) != sorted(graph.scales) for scales in scale_lists):  # the chain's order is its own
            raise ValueError(f"--model {graph.path} computes the chain over {own} only: pass --scales {own} (or no "
                             "--scales), or export the graph again for another list")
        if args.flip != graph.flip:
            raise ValueError(f"--model {graph.path} was exported {'with' if graph.flip else 'without'} --flip: "
                             f"evaluate it {'with' if graph.flip else 'without'} --flip")
        if args.precision != "fp32":
            raise ValueError(f"--precision {args.precision}: --model {graph.path} runs in the precision it holds; "
                             "leave --precision out")
        for flag, value in (("--scale-shares", args.scale_shares), ("--save-visuals", args.save_visuals)):
            if value:
                raise ValueError(f"{flag} needs the attention maps, which --model {graph.path} does not output: "
                                 "evaluate the model folder for them")
        if compile_settings(args) is not None:
            raise ValueError(f"--torch-compile: --model {graph.path} runs in onnxruntime, which compiles nothing of "
                             "PyTorch's; leave the torch.compile options out")
        tiling = [name for name in TILING_ARGUMENTS if getattr(args, name) is not None]
        if tiling:
            raise ValueError(f"--{tiling[0]}: --model {graph.path} is never tiled; leave the tiling options out")
    shrink_to_long_side(torch.zeros(1, 1, 1, 1), args.max_long_side)  # checks the value, as for a model


@contextlib.contextmanager
def launched_processes(cpu: bool = False) -> Iterator[PartialState]:
    """accelerate's `PartialState` of the processes `accelerate launch` / `torchrun` started (or of this one process),
    each process's group ended on leaving. Launched processes without GPUs (or asked for the CPU) form a gloo group:
    without `cpu`, accelerate would leave them unconnected, each doing all the work."""
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = PartialState(cpu=cpu or (launched and not torch.cuda.is_available()))
    try:
        yield state
    finally:
        # a launched process that exits with its process group alive can abort in gloo's teardown ("terminate called
        # without an active exception")
        if state.num_processes > 1:
            state.destroy_process_group()


def _evaluate_and_report(args: argparse.Namespace, state, data_args: DataArguments, scale_lists: list[list[float]],
                         model_paths: dict[str, str], graphs: dict[str, OnnxSegmenter],
                         torch_compile: dict[str, str | None] | None = None) -> int:
    """`main` once the arguments are checked and the processes connected: evaluate, then print and save (process 0)."""
    if state.num_processes > 1 and args.device not in (None, "cpu"):
        print(f"error: --device {args.device} with {state.num_processes} processes: each process evaluates on its "
              "own GPU; leave --device out (or pass --device cpu)", file=sys.stderr)
        return 2
    # the process's GPU when there is one (accelerate's choice: one per launched process), else the CPU
    device = torch.device(args.device or (state.device if torch.cuda.is_available() else "cpu"))
    try:
        with state.main_process_first():  # the synthetic set is generated once, not by every process
            dataset, id2label = build_eval_dataset(data_args)
    except (ValueError, FileNotFoundError) as error:  # missing or empty folders, bad samples (naming the file)
        print(f"error: --dataset {args.dataset} --data-dir {args.data_dir} --split {args.split}: {error}",
              file=sys.stderr)
        return 2
    if args.save_predictions is not None or args.save_visuals is not None:  # (Mapillary's come from its config file)
        label_ids, palette = dataset_label_ids(data_args)
    writer = visuals = None
    if args.save_predictions is not None:
        writer = PredictionWriter(args.save_predictions, args.prediction_format, label_ids, palette)
        if not _may_write([writer.path(sample_id) for sample_id in dataset.sample_ids()], "--save-predictions",
                          "predictions", args.overwrite):
            return 2
    results_by_model: dict[str, list[dict]] = {}
    for name, path in model_paths.items():
        if name in graphs:
            model = graphs[name]
        else:
            try:
                with state.main_process_first():  # one download into the Hub cache, not one per process
                    model = load_hms_model(path, "--model")  # refuses partial weights and other model types
            except ValueError as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
            model = compile_for_inference(model.to(device).eval(), torch_compile)
        if len(id2label) != model.config.num_labels:
            print(f"error: {path} predicts {model.config.num_labels} classes, the {args.dataset} split has "
                  f"{len(id2label)}", file=sys.stderr)
            return 2
        if args.scale_shares and model.config.scale_fusion != "hierarchical":
            print(f"error: --scale-shares reads HMSA's attention chain; {path} fuses its scales with scale_fusion="
                  f"{model.config.scale_fusion!r}", file=sys.stderr)
            return 2
        if args.save_visuals is not None:  # one model: its fusion says which attention maps are read
            visuals = VisualsWriter(args.save_visuals, palette, scale_lists[0], model.config.scale_fusion,
                                    args.num_visuals, args.visuals_select, model.config.align_corners)
            candidates = [dataset.sample_ids()[index] for index in visuals.candidates(len(dataset))]
            if not _may_write(visuals.paths(candidates), "--save-visuals", "pictures", args.overwrite):
                return 2
        state.wait_for_everyone()  # every process has checked before any writes
        try:
            tiling, max_long_side = (large_input_settings(args, model.config) if name not in graphs
                                     else ({}, args.max_long_side))
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        # a graph exported with --flip averages the mirrored image itself: one pass, reported as flipped
        flip = args.flip and name not in graphs
        results_by_model[name] = [
            {**evaluate_scales(model, dataset, scales, flip, device, id2label, max_long_side, args.precision,
                               args.num_workers, progress=args.progress and state.is_main_process,
                               prediction_writer=writer, visuals_writer=visuals, batch_size=args.batch_size,
                               scale_shares=args.scale_shares, warm_up=torch_compile is not None, **tiling),
             **({"flip": args.flip, "runtime": "onnxruntime"} if name in graphs else {}),
             **({"torch_compile": torch_compile} if torch_compile is not None else {})}  # (graphs refuse it)
            for scales in scale_lists
        ]
    if not state.is_main_process:  # every process holds the summed figures; one prints and writes them
        return 0
    tables = []
    for name, results in results_by_model.items():
        tables.append((f"### {name}\n\n" if len(results_by_model) > 1 else "") + markdown_table(results))
        if args.scale_shares:
            tables.append(scale_share_table(results))
    if len(results_by_model) > 1:
        tables.insert(0, "### mIoU and pixel accuracy by scale list\n\n" + comparison_table(results_by_model))
    table = "\n".join(tables)
    print(table)
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        single = len(results_by_model) == 1
        record = {"model": next(iter(model_paths.values())) if single else model_paths, "dataset": args.dataset,
                  "split": args.split, "eval_long_side": data_args.eval_long_side or None}
        if single:
            record["results"] = next(iter(results_by_model.values()))
        else:
            record["results_by_model"] = results_by_model
        results_json, results_md = (args.output_dir / name for name in RESULT_FILES)
        results_json.write_text(metrics_to_json(record))
        results_md.write_text(table)
        print(f"wrote {results_json} and {results_md}")
    if writer is not None:
        print(f"wrote {len(dataset)} predictions ({args.prediction_format}) to {args.save_predictions}")
    if visuals is not None:
        title = (f"{next(iter(model_paths.values()))}: {args.dataset} {args.split}, "
                 f"{scale_list_label(scale_lists[0], args.flip, args.precision)}"
                 f"{', worst predicted images first' if args.visuals_select == 'worst' else ''}")
        index = visuals.write_index(title)
        print(f"wrote the pictures of {len(visuals.pictured)} images to {args.save_visuals}; open {index}")
    return 0


def _unusable_folder(folder: Path) -> str | None:
    """Why files cannot be written into `folder` (created with its parents when missing), or None when they can."""
    if folder.exists():
        if not folder.is_dir():
            return f"{folder} is a file; expected a folder"
        return None if os.access(folder, os.W_OK | os.X_OK) else f"{folder} is not writable"
    ancestor = next(parent for parent in folder.absolute().parents if parent.exists())
    if not ancestor.is_dir():
        return f"{folder} cannot be created: {ancestor} is a file"
    return None if os.access(ancestor, os.W_OK | os.X_OK) else f"{folder} cannot be created: {ancestor} is not writable"


def _may_write(paths: list[Path], flag: str, what: str, overwrite: bool) -> bool:
    """Whether the files of `flag` may be written: no two of them share a name, and none exists unless `overwrite`
    (printing why not)."""
    repeated = next((path for path, count in collections.Counter(paths).items() if count > 1), None)
    if repeated is not None:
        print(f"error: two images of the split would both be saved as {repeated}: their ids must be distinct",
              file=sys.stderr)
        return False
    existing = [path for path in paths if path.exists()]
    if existing and not overwrite:
        print(f"error: {existing[0]} exists ({len(existing)} of the {len(paths)} {what} do); pass --overwrite or "
              f"choose another {flag} folder", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
