"""Auto-labelling: a teacher model labels unlabelled images, keeping only its confident pixels as hard labels.

    hms-segmentation autolabel --model runs/teacher --input /data/cityscapes/leftImg8bit/train_extra
    accelerate launch -m hms_segmentation.autolabel --model nvidia-hms --input photos/ --output-dir photo_labels

The paper's recipe (Tao et al. 2020, section 4): run the multi-scale model (scales 0.5,1.0,2.0) over the 20k coarse
Cityscapes frames and keep, per pixel, the arg-max class where its softmax probability reaches the threshold (0.5),
else 255 (ignore). Hard 8-bit labels take ~600 MB instead of ~2 TB of soft labels, and trained better.

Output layout (read back by the data loaders):

- Cityscapes (``--input <root>/leftImg8bit/<split>``): ``<output-dir>/gtCoarse/<split>/<city>/<id>_gtAuto_labelTrainIds.png``
  with ``--output-dir`` defaulting to ``<root>``, where
  `load_cityscapes(..., options=CityscapesOptions(include_auto_labels=True))` and `DataArguments.auto_label_ratio`
  find them. By default (``--merge-coarse fill``) the human coarse label
  is kept wherever it labels a pixel and the auto-label fills the pixels it leaves unlabelled; ``boost`` is the
  reference's rule (the auto-label, with the coarse pixels of truck, bus and train added); ``replace`` writes the
  auto-label alone. ``--label-region cityscapes`` ignores the teacher outside the part of the frame the reference
  keeps (no ego vehicle, no border), before the merge.
- Any folder (searched recursively): ``<output-dir>/<relative folder>/<stem>_gtAuto_labelTrainIds.png``; pair them
  with `find_auto_labelled_folder`.

Labels are 8-bit trainIds (0..num_labels-1, 255 = ignore); ``--preview`` adds ``*_gtAuto_color.png``. Each PNG
carries a text chunk naming its source image and a fingerprint of the model and settings, so a re-run skips files it
finished, relabels nothing by accident, and never touches label files it did not write (unless ``--overwrite``).
Files are written under a hidden temporary name and renamed, so a killed run leaves no half-written label.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from tqdm.auto import tqdm

from .configuration_hms import validate_scales
from .data.builder import SampleFiles
from .data.cityscapes import AUTO_LABEL_KIND, IMAGE_SUFFIX, _label_for, cityscapes_label_mapping
from .data.io import (
    DEFAULT_MAX_PIXELS,
    TEMPORARY_SUFFIX,  # noqa: F401 - the name of a file being written, part of this module's interface
    BadSampleError,
    load_image,
    load_label,
    write_png_atomically,
    write_text_atomically,
)
from .data.transforms import SegmentationEvalTransform
from .demo import colorize, palette_for
from .hub import check_model_source, load_hms_model
from .image_processing_hms import get_output_size
from .inference_options import (
    add_compile_arguments,
    add_large_input_arguments,
    compile_for_inference,
    compile_settings,
    large_input_settings,
)
from .label_tables import IGNORE_INDEX
from .modeling_hms import HMSForSemanticSegmentation
from .training.evaluate import PRECISIONS, launched_processes, precision_autocast, predict

LABEL_SUFFIX = f"_{AUTO_LABEL_KIND}_labelTrainIds.png"
PREVIEW_SUFFIX = f"_{AUTO_LABEL_KIND}_color.png"
REPORT_FILE = "autolabel_report.json"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
PNG_TEXT_KEY = "hms-autolabel"
"""A file being written is ``.<final name>.partial``: hidden, and matching no pattern a loader or a re-run reads."""

MergeMode = Literal["fill", "boost", "replace"]
MERGE_MODES = ("fill", "boost", "replace")
CITYSCAPES_LABEL_REGION = (15, 14, 840, 2030)
"""`(top, left, bottom, right)` of the part of a 1024x2048 Cityscapes frame the reference's record recipe keeps of an
auto-label (``mask_out_cityscapes``): outside it, the ego vehicle's hood and the rectification border, the teacher's
labels are ignored. ``--label-region cityscapes``."""
COARSE_BOOST_CLASSES = (14, 15, 16)
"""Cityscapes trainIds (truck, bus, train) whose human coarse pixels the reference adds to an auto-label
(`custom_coarse_dropout_classes` of its record recipe, scripts/train_cityscapes_sota.yml): rare classes the teacher
under-segments."""


# ----------------------------------------------------------------------------------------------------------------
# The paper's rule


def confident_labels(
    logits: torch.Tensor, size: tuple[int, int], threshold: float, align_corners: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard labels of one image from its fused logits: the arg-max class where the softmax probability of that class
    is at least `threshold`, else `IGNORE_INDEX`.

    Args:
        logits: `(num_labels, h, w)` fused logits (flip-averaged by `predict`, as the reference averages logits before
            its softmax).
        size: `(height, width)` of the original image; logits of another size are resized (bilinear) first.
        threshold: Minimum probability of a kept pixel, in [0, 1] (the paper: 0.5).
        align_corners: Of the resize (`HMSConfig.align_corners`).

    Returns:
        `labels`: `(height, width)` uint8, trainIds or 255; `predicted`: `(height, width)` int64 arg-max before the
        threshold.
    """
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=align_corners)[0]
    confidence, predicted = logits.float().softmax(dim=0).max(dim=0)
    labels = torch.where(confidence >= threshold, predicted, torch.full_like(predicted, IGNORE_INDEX))
    return labels.to(torch.uint8), predicted


def keep_region(labels: np.ndarray, region: tuple[int, int, int, int] | None) -> np.ndarray:
    """`labels` `(height, width)` with every pixel outside `region` set to `IGNORE_INDEX`.

    Args:
        labels: uint8 trainIds.
        region: `(top, left, bottom, right)` in pixels, bottom and right exclusive (clipped to the image; the
            reference's Cityscapes mask is `CITYSCAPES_LABEL_REGION`); `None` keeps every pixel.
    """
    if region is None:
        return labels
    top, left, bottom, right = region
    kept = np.full_like(labels, IGNORE_INDEX)
    kept[top:bottom, left:right] = labels[top:bottom, left:right]
    return kept


def parse_label_region(text: str | None) -> tuple[int, int, int, int] | None:
    """``--label-region``: ``"TOP,LEFT,BOTTOM,RIGHT"`` pixels or ``"cityscapes"`` (`CITYSCAPES_LABEL_REGION`)."""
    if text is None:
        return None
    if text.strip().lower() == "cityscapes":
        return CITYSCAPES_LABEL_REGION
    try:
        values = tuple(int(value) for value in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not (0 <= values[0] < values[2] and 0 <= values[1] < values[3]):
        raise ValueError(f"--label-region must be TOP,LEFT,BOTTOM,RIGHT pixels with 0 <= TOP < BOTTOM and 0 <= LEFT < "
                         f"RIGHT (or 'cityscapes' for {','.join(map(str, CITYSCAPES_LABEL_REGION))}), got {text!r}")
    return values


def merge_with_coarse(auto_label: np.ndarray, coarse_label: np.ndarray | None, mode: MergeMode) -> np.ndarray:
    """Combine an auto-label with the human coarse label of the same frame (both `(height, width)` uint8 trainIds).

    ``fill``: the coarse label wins wherever it labels a pixel; the auto-label fills the pixels it leaves at 255.
    ``boost`` (the reference's record recipe): the auto-label, except that for each of `COARSE_BOOST_CLASSES` the
    auto-label predicts somewhere in the frame, the coarse pixels of that class take it; pixels the auto-label left
    at 255 (below the threshold) stay 255, as the reference thresholds after merging. ``replace``: the auto-label
    alone.
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"merge mode must be one of {MERGE_MODES}, got {mode!r}")
    if coarse_label is None or mode == "replace":
        return auto_label
    if mode == "fill":
        return np.where(coarse_label != IGNORE_INDEX, coarse_label, auto_label).astype(np.uint8)
    merged = auto_label.copy()
    confident = auto_label != IGNORE_INDEX
    for class_id in COARSE_BOOST_CLASSES:
        if (auto_label == class_id).any():
            merged[(coarse_label == class_id) & confident] = class_id
    return merged


# ----------------------------------------------------------------------------------------------------------------
# Inputs and outputs


@dataclass(frozen=True)
class AutoLabelJob:
    """One image to label, and where its label (and preview) go.

    Args:
        image_path: The input image.
        source: Its path relative to the input folder (recorded in the label PNG; names it in the report).
        label_path: The label PNG to write.
        preview_path: The coloured preview, or `None`.
        coarse_path: The human coarse label of the frame (Cityscapes layout), or `None`.
        coarse_stored_ids: ``"train_ids"`` or ``"dataset_ids"`` (Cityscapes labelIds) for `coarse_path`.
        label_taken_by: Another input of the same folder whose label has the same name (``photo.jpg`` and
            ``photo.png``), found first; this image is then not labelled but reported as failed.
    """

    image_path: Path
    source: str
    label_path: Path
    preview_path: Path | None = None
    coarse_path: Path | None = None
    coarse_stored_ids: str = "train_ids"
    label_taken_by: Path | None = None


@dataclass(frozen=True)
class AutoLabelLayout:
    """Where the images are and where their labels go.

    Args:
        kind: ``"cityscapes"`` (``<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png``) or ``"folder"`` (any images,
            recursively).
        input_dir: The folder searched for images.
        output_dir: The root the labels are written under.
        preview: Also write ``*_gtAuto_color.png``.
        merge_coarse: How the human coarse labels are merged in (``fill``, ``boost``), or not (``replace``);
            Cityscapes only, see `merge_with_coarse`.
    """

    kind: Literal["cityscapes", "folder"]
    input_dir: Path
    output_dir: Path
    preview: bool = False
    merge_coarse: MergeMode = "fill"

    @classmethod
    def detect(cls, input_dir: str | os.PathLike, output_dir: str | os.PathLike | None, layout: str = "auto",
               **kwargs: Any) -> AutoLabelLayout:
        """Cityscapes when `input_dir` is ``.../leftImg8bit/<split>`` (or `layout` says so), else a plain folder.

        Raises:
            ValueError: `input_dir` is not a folder, `layout` is unknown, a Cityscapes layout was asked for but the
                folder is not ``leftImg8bit/<split>``, a plain folder was given without `output_dir`, or `output_dir`
                is a file.
        """
        input_dir = Path(input_dir).resolve()
        if not input_dir.is_dir():
            raise ValueError(f"--input {input_dir} is not a folder")
        if layout not in ("auto", "cityscapes", "folder"):
            raise ValueError(f"--layout must be auto, cityscapes or folder, got {layout!r}")
        is_cityscapes = input_dir.parent.name == "leftImg8bit"
        if layout == "cityscapes" and not is_cityscapes:
            raise ValueError(f"--layout cityscapes expects --input <root>/leftImg8bit/<split>, got {input_dir}")
        kind = "cityscapes" if is_cityscapes and layout != "folder" else "folder"
        if output_dir is None:
            if kind == "folder":
                raise ValueError("--output-dir is required unless --input is a Cityscapes <root>/leftImg8bit/<split>")
            output_dir = input_dir.parent.parent  # next to gtCoarse, where the Cityscapes loader reads them
        elif Path(output_dir).exists() and not Path(output_dir).is_dir():
            raise ValueError(f"--output-dir {output_dir} is a file; expected a folder (it is created if missing)")
        return cls(kind, input_dir, Path(output_dir).resolve(), **kwargs)

    def jobs(self, rank: int = 0, world_size: int = 1) -> Iterator[AutoLabelJob]:
        """The images of process `rank` of `world_size` (every `world_size`-th, so ranks are disjoint), in a fixed
        order, found lazily: the folder is never listed into memory (only the label names of the current folder, to
        find two images that would share a label)."""
        folder, labels_of_folder = None, {}
        for index, image_path in enumerate(self._image_paths()):
            if image_path.parent != folder:
                folder, labels_of_folder = image_path.parent, {}
            job = self._job(image_path)
            taken_by = labels_of_folder.setdefault(job.label_path, image_path)
            if index % world_size == rank:
                yield job if taken_by == image_path else replace(job, label_taken_by=taken_by)

    def _image_paths(self) -> Iterator[Path]:
        for folder, subfolders, files in os.walk(self.input_dir):
            folder_path = Path(folder)
            # sorted for a fixed order across runs and ranks; our own output folder is never an input
            subfolders[:] = sorted(name for name in subfolders if not name.startswith(".")
                                   and (folder_path / name).resolve() != self.output_dir)
            for name in sorted(files):
                if self._is_input(name):
                    yield folder_path / name

    def _is_input(self, name: str) -> bool:
        if self.kind == "cityscapes":
            return name.endswith(IMAGE_SUFFIX)
        return (not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
                and not name.endswith((LABEL_SUFFIX, PREVIEW_SUFFIX)))

    def _job(self, image_path: Path) -> AutoLabelJob:
        source = image_path.relative_to(self.input_dir).as_posix()
        if self.kind == "cityscapes":
            split, city, file_id = self.input_dir.name, image_path.parent.name, image_path.name[: -len(IMAGE_SUFFIX)]
            stem = self.output_dir / "gtCoarse" / split / city / file_id
            coarse = _label_for(self.input_dir.parent.parent / "gtCoarse" / split, city, file_id, "gtCoarse")
        else:
            stem = self.output_dir / image_path.relative_to(self.input_dir).parent / image_path.stem
            coarse = None
        return AutoLabelJob(
            image_path=image_path, source=source, label_path=Path(f"{stem}{LABEL_SUFFIX}"),
            preview_path=Path(f"{stem}{PREVIEW_SUFFIX}") if self.preview else None,
            coarse_path=coarse[0] if coarse and self.merge_coarse != "replace" else None,
            coarse_stored_ids=coarse[1] if coarse else "train_ids",
        )


def find_auto_labelled_folder(input_dir: str | os.PathLike, output_dir: str | os.PathLike) -> list[SampleFiles]:
    """Pair the images of a plain folder with the auto-labels written for them in `output_dir`, for
    `hms_segmentation.data.builder.build_dataset` (labels hold trainIds: ``stored_ids="train_ids"``)."""
    layout = AutoLabelLayout("folder", Path(input_dir).resolve(), Path(output_dir).resolve())
    return [SampleFiles(job.source, str(job.image_path), str(job.label_path), "train_ids")
            for job in layout.jobs() if job.label_taken_by is None and job.label_path.is_file()]


def label_marker(label_path: Path) -> dict | None:
    """The text chunk of an auto-label PNG (``{"source": ..., "settings": ...}``), or `None` for any other file."""
    try:
        with Image.open(label_path) as image:
            text = image.text.get(PNG_TEXT_KEY) if image.format == "PNG" else None
    except (OSError, SyntaxError, ValueError):
        return None
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def own_marker(job: AutoLabelJob, fingerprint: str) -> dict:
    """The text chunk this command writes into `job`'s files (and `label_marker` reads back): its source image and
    the fingerprint of the model and settings."""
    return {"source": job.source, "settings": fingerprint}


def write_preview(path: Path, labels: np.ndarray, palette: tuple[tuple[int, int, int], ...], marker: str) -> int:
    """Write the coloured picture of `labels` `(height, width)` (trainIds, 255 drawn black) to `path`, marked as ours;
    returns its size in bytes."""
    return write_png_atomically(path, colorize(labels, palette), {PNG_TEXT_KEY: marker})


def existing_output(job: AutoLabelJob, fingerprint: str) -> Literal["missing", "finished", "other"]:
    """Whether `job`'s label is absent, finished by a run with the same model and settings, or another file (the
    user's own, another run's settings, or another image's): only ``missing`` is written without ``--overwrite``.

    A temporary file never counts: it has another name, and the final name only ever appears by an atomic rename.
    A label that is missing while its preview name holds a file this command did not write for this image (the
    user's own ``*_gtAuto_color.png``) is ``other`` too: writing the label would replace that file.
    """
    if not job.label_path.exists():
        if job.preview_path is not None and job.preview_path.exists():
            preview = label_marker(job.preview_path)
            if preview is None or preview.get("source") != job.source:
                return "other"
        return "missing"
    marker = label_marker(job.label_path)
    if marker == own_marker(job, fingerprint):
        return "finished"
    return "other"


# ----------------------------------------------------------------------------------------------------------------
# Reading, in DataLoader workers


class AutoLabelInputs(torch.utils.data.IterableDataset):
    """Streams the images of one process as records ready for the model; the DataLoader's workers split them.

    Each record is a dict with ``job`` and ``status``: ``"todo"`` (with ``pixel_values`` `(3, h, w)` at the network
    size, ``size`` (height, width) of the image and ``coarse``, a uint8 trainId map or `None`), ``"finished"``,
    ``"other"`` (an existing file left alone) or ``"failed"`` (with ``error``, naming the file).
    """

    def __init__(self, layout: AutoLabelLayout, fingerprint: str, *, rank: int = 0, world_size: int = 1,
                 overwrite: bool = False, size_divisor: int = 64, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.layout, self.fingerprint, self.rank, self.world_size = layout, fingerprint, rank, world_size
        self.overwrite, self.size_divisor, self.max_pixels = overwrite, size_divisor, max_pixels
        self.transform = SegmentationEvalTransform()

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        for index, job in enumerate(self.layout.jobs(self.rank, self.world_size)):
            if index % num_workers == worker_id:
                yield self.read(job)

    def read(self, job: AutoLabelJob) -> dict:
        if job.label_taken_by is not None:
            return {"job": job, "status": "failed", "error": (
                f"{job.image_path}: not labelled, its label {job.label_path.name} is that of {job.label_taken_by.name} "
                "(same name, another extension); rename one of them")}
        state = existing_output(job, self.fingerprint)
        if state != "missing" and not (self.overwrite and state == "other"):
            return {"job": job, "status": state}
        try:
            image = load_image(job.image_path, max_pixels=self.max_pixels)
            coarse = None
            if job.coarse_path is not None:
                mapping = cityscapes_label_mapping() if job.coarse_stored_ids == "dataset_ids" else None
                coarse = load_label(job.coarse_path, mapping, max_pixels=self.max_pixels)
                if coarse.shape != (image.height, image.width):
                    raise BadSampleError(f"coarse label {job.coarse_path} is {coarse.shape[1]}x{coarse.shape[0]} but "
                                         f"its image {job.image_path} is {image.width}x{image.height}",
                                         (str(job.coarse_path),))
        except BadSampleError as error:
            return {"job": job, "status": "failed", "error": str(error)}
        size = (image.height, image.width)
        network_size = get_output_size(*size, None, self.size_divisor)
        if network_size != size:
            # as HMSImageProcessor does: sides rounded to the size divisor, so every scale gives whole feature maps
            image = image.resize((network_size[1], network_size[0]), Image.Resampling.BILINEAR)
        return {"job": job, "status": "todo", "pixel_values": self.transform(image)["pixel_values"], "size": size,
                "coarse": coarse}


def _records(batch: Any) -> Any:
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Counting


@dataclass
class AutoLabelTally:
    """What one process did; `merge` adds those of all processes for the report."""

    num_labels: int
    labelled: int = 0
    finished_before: int = 0
    kept_existing: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    pixels: int = 0
    predicted_pixels: list[int] = field(default_factory=list)
    below_threshold_pixels: list[int] = field(default_factory=list)
    ignored_pixels_written: int = 0
    outside_region_pixels: int = 0
    coarse_pixels_kept: int = 0
    label_bytes: int = 0
    preview_bytes: int = 0
    soft_label_bytes: int = 0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.predicted_pixels = self.predicted_pixels or [0] * self.num_labels
        self.below_threshold_pixels = self.below_threshold_pixels or [0] * self.num_labels

    def add_image(self, predicted: torch.Tensor, thresholded: np.ndarray, auto_label: np.ndarray, written: np.ndarray,
                  label_bytes: int, preview_bytes: int) -> None:
        """Count one labelled image: `predicted` the arg-max `(H, W)`, `thresholded` after the threshold, `auto_label`
        after the label region too, `written` after merging with the coarse label."""
        below = torch.from_numpy(thresholded == IGNORE_INDEX).to(predicted.device)
        predicted_counts = torch.bincount(predicted.flatten(), minlength=self.num_labels).tolist()
        below_counts = torch.bincount(predicted[below], minlength=self.num_labels).tolist()
        self.labelled += 1
        self.pixels += auto_label.size
        self.predicted_pixels = [a + b for a, b in zip(self.predicted_pixels, predicted_counts)]
        self.below_threshold_pixels = [a + b for a, b in zip(self.below_threshold_pixels, below_counts)]
        self.ignored_pixels_written += int((written == IGNORE_INDEX).sum())
        self.outside_region_pixels += int(((auto_label == IGNORE_INDEX) & (thresholded != IGNORE_INDEX)).sum())
        self.coarse_pixels_kept += int((written != auto_label).sum())
        self.label_bytes += label_bytes
        self.preview_bytes += preview_bytes
        # the paper's alternative: one float16 probability per class and pixel
        self.soft_label_bytes += 2 * self.num_labels * auto_label.size

    @classmethod
    def merge(cls, tallies: list[AutoLabelTally]) -> AutoLabelTally:
        total = cls(tallies[0].num_labels)
        for tally in tallies:
            for name, value in asdict(tally).items():
                if name == "num_labels":
                    continue
                if name in ("predicted_pixels", "below_threshold_pixels"):
                    value = [a + b for a, b in zip(getattr(total, name), value)]
                elif name == "seconds":
                    value = max(total.seconds, value)  # processes run side by side
                else:
                    value = getattr(total, name) + value
                setattr(total, name, value)
        return total

    def report(self, id2label: dict[int, str], settings: dict) -> dict:
        per_class = {
            id2label[index]: {
                "predicted_pixels": predicted,
                "ignored_fraction": below / predicted if predicted else None,
            }
            for index, (predicted, below) in enumerate(zip(self.predicted_pixels, self.below_threshold_pixels))
        }
        return {
            **settings,
            "images": {"labelled": self.labelled, "finished_before": self.finished_before,
                       "kept_existing": len(self.kept_existing), "failed": len(self.failed)},
            "failed_files": self.failed,
            "kept_existing_files": self.kept_existing,
            "pixels": self.pixels,
            "ignored_fraction_below_threshold": sum(self.below_threshold_pixels) / self.pixels if self.pixels else None,
            "ignored_fraction_written": self.ignored_pixels_written / self.pixels if self.pixels else None,
            "confident_fraction_outside_region": self.outside_region_pixels / self.pixels if self.pixels else None,
            "coarse_pixels_kept": self.coarse_pixels_kept,
            "per_class": per_class,
            "bytes_written": {"labels": self.label_bytes, "previews": self.preview_bytes},
            "float16_soft_label_bytes": self.soft_label_bytes,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.labelled / self.seconds, 3) if self.seconds else None,
        }


def format_report(report: dict) -> str:
    """The report as a few lines of text, with the per-class table."""
    images = report["images"]
    lines = [
        f"auto-labelled {images['labelled']} image(s) in {report['seconds']:.1f} s; {images['finished_before']} "
        f"already done (skipped), {images['kept_existing']} existing file(s) left alone, {images['failed']} failed",
    ]
    lines += [f"  failed: {message}" for message in report["failed_files"][:20]]
    if images["failed"] > 20:
        lines.append(f"  ... and {images['failed'] - 20} more (see {REPORT_FILE})")
    if report["kept_existing_files"]:
        lines.append(f"  left alone (not written by this model and settings; --overwrite replaces them): "
                     f"{', '.join(report['kept_existing_files'][:5])}{' ...' if images['kept_existing'] > 5 else ''}")
    if report["pixels"]:
        lines.append(f"ignored (probability < {report['threshold']}): {100 * report['ignored_fraction_below_threshold']:.1f}% "
                     f"of pixels; ignored in the written labels: {100 * report['ignored_fraction_written']:.1f}%")
        if report.get("label_region") is not None:
            lines.append(f"confident pixels outside --label-region {','.join(map(str, report['label_region']))} "
                         f"(ignored): {100 * report['confident_fraction_outside_region']:.1f}% of pixels")
        lines.append("| class | predicted pixels | ignored |")
        lines.append("|---|---:|---:|")
        for name, row in report["per_class"].items():
            ignored = "n/a" if row["ignored_fraction"] is None else f"{100 * row['ignored_fraction']:.1f}%"
            lines.append(f"| {name} | {row['predicted_pixels']} | {ignored} |")
    written = report["bytes_written"]["labels"]
    soft = report["float16_soft_label_bytes"]
    lines.append(f"label PNGs written: {_human(written)} (+ {_human(report['bytes_written']['previews'])} previews); "
                 f"float16 soft labels would take {_human(soft)}" + (f" ({soft / written:.0f}x)" if written else ""))
    return "\n".join(lines)


def _human(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


# ----------------------------------------------------------------------------------------------------------------
# The run


def model_fingerprint(model: HMSForSemanticSegmentation, settings: dict) -> str:
    """A short hash of the weights and the labelling settings: a re-run resumes only what the same teacher, with the
    same settings, wrote."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def autolabel(
    model: HMSForSemanticSegmentation,
    layout: AutoLabelLayout,
    *,
    scales: list[float],
    flip: bool = False,
    threshold: float = 0.5,
    batch_size: int = 1,
    num_workers: int = 0,
    size_divisor: int = 64,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fingerprint: str = "",
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    progress: bool = True,
    max_long_side: int | None = None,
    tiling: dict[str, Any] | None = None,
    label_region: tuple[int, int, int, int] | None = None,
    precision: str = "fp32",
) -> AutoLabelTally:
    """Label this process's share of `layout`'s images with `model` (already on `device`, in eval mode).

    Images are read by `num_workers` DataLoader workers and batched while consecutive images have the same network
    size (no padding, so a label never depends on its batch neighbours' size). Unreadable images are counted and
    named, never fatal. With `label_region`, only pixels inside it keep the teacher's label (see `keep_region`),
    before merging with the coarse label. `precision` (a key of `PRECISIONS`) is the autocast dtype of the forward;
    the softmax and the threshold are float32 whatever it is. Returns what was done, for `AutoLabelTally.merge` and
    the report.
    """
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num_labels = model.config.num_labels
    if num_labels > IGNORE_INDEX:
        raise ValueError(f"8-bit labels hold at most {IGNORE_INDEX} classes besides ignore, the model has {num_labels}")
    autocast = precision_autocast(device, precision)
    palette = palette_for(num_labels)
    tally = AutoLabelTally(num_labels)
    inputs = AutoLabelInputs(layout, fingerprint, rank=rank, world_size=world_size, overwrite=overwrite,
                             size_divisor=size_divisor, max_pixels=max_pixels)
    loader = torch.utils.data.DataLoader(inputs, batch_size=None, num_workers=num_workers, collate_fn=_records)
    total = sum(1 for _ in layout.jobs(rank, world_size))  # names only, for the ETA
    bar = tqdm(total=total, unit="img", desc=f"auto-labelling (rank {rank}/{world_size})" if world_size > 1
               else "auto-labelling", disable=not progress, dynamic_ncols=True)

    def label_batch(batch: list[dict]) -> None:
        # made in inference mode, like the mirrored copy `predict` makes: a compiled forward then needs one graph
        with torch.inference_mode():
            pixel_values = torch.stack([record["pixel_values"] for record in batch]).to(device)
            with autocast:
                logits = predict(model, pixel_values, scales, flip, max_long_side, **(tiling or {}))
        for record, image_logits in zip(batch, logits):
            job = record["job"]
            labels, predicted = confident_labels(image_logits, record["size"], threshold, model.config.align_corners)
            thresholded = labels.cpu().numpy()
            # before the merge, as the reference masks the teacher's label and then adds the coarse pixels
            auto_label = keep_region(thresholded, label_region)
            written = merge_with_coarse(auto_label, record["coarse"], layout.merge_coarse)
            preview_bytes = 0
            marker = json.dumps(own_marker(job, fingerprint), sort_keys=True)
            if job.preview_path is not None:
                # before the label: a finished label then always has its preview (marked too, as ours)
                preview_bytes = write_preview(job.preview_path, written, palette, marker)
            label_bytes = write_png_atomically(job.label_path, Image.fromarray(written), {PNG_TEXT_KEY: marker})
            tally.add_image(predicted, thresholded, auto_label, written, label_bytes, preview_bytes)
        bar.update(len(batch))

    start = time.perf_counter()
    batch: list[dict] = []
    try:
        for record in loader:
            status = record["status"]
            if status != "todo":
                if status == "finished":
                    tally.finished_before += 1
                    job = record["job"]
                    if job.preview_path is not None and not job.preview_path.exists():
                        # --preview added on a re-run: drawn from the finished label, which needs no new forward
                        marker = json.dumps(own_marker(job, fingerprint), sort_keys=True)
                        tally.preview_bytes += write_preview(job.preview_path, load_label(job.label_path), palette,
                                                             marker)
                elif status == "other":
                    tally.kept_existing.append(str(record["job"].label_path))
                else:
                    tally.failed.append(record["error"])
                    bar.write(f"skipped: {record['error']}")
                    bar.set_postfix(failed=len(tally.failed), refresh=False)
                bar.update(1)
                continue
            if batch and (len(batch) == batch_size or batch[0]["pixel_values"].shape != record["pixel_values"].shape):
                label_batch(batch)
                batch = []
            batch.append(record)
        if batch:
            label_batch(batch)
    finally:
        bar.close()
    tally.seconds = time.perf_counter() - start
    return tally


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hms-segmentation autolabel", description=__doc__.splitlines()[0],
                                     epilog="Output layout, merging and resuming: see the module docstring / README "
                                            "section 'Auto-labelling'.")
    parser.add_argument("--model", required=True, help="save_pretrained folder or Hub id of the teacher")
    parser.add_argument("--input", required=True, type=Path,
                        help="<cityscapes root>/leftImg8bit/<split> (e.g. train_extra) or any folder of images")
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", type=Path, default=None,
                        help="root of the labels (default for Cityscapes: the dataset root, next to gtCoarse)")
    parser.add_argument("--layout", choices=("auto", "cityscapes", "folder"), default="auto")
    parser.add_argument("--scales", default="0.5,1.0,2.0", help="comma-separated inference scales")
    parser.add_argument("--flip", action="store_true", help="average with the prediction of the mirrored image")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="pixels whose top class probability is below this become 255 (ignore)")
    parser.add_argument("--merge-coarse", "--merge_coarse", dest="merge_coarse", choices=MERGE_MODES,
                        default="fill", help="Cityscapes: keep the human coarse labels and fill their unlabelled "
                                             "pixels (fill); the reference's rule, the auto-label with the coarse "
                                             "truck, bus and train pixels added (boost); or the auto-labels alone "
                                             "(replace)")
    parser.add_argument("--label-region", "--label_region", dest="label_region", default=None,
                        help="TOP,LEFT,BOTTOM,RIGHT: only pixels inside this box keep the teacher's label, the rest "
                             "become 255 before merging; 'cityscapes' is the reference's record recipe "
                             f"({','.join(map(str, CITYSCAPES_LABEL_REGION))} of a 1024x2048 frame: no ego vehicle, "
                             "no border)")
    parser.add_argument("--preview", action="store_true", help="also write a coloured *_gtAuto_color.png")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=1,
                        help="images per forward pass (per process)")
    parser.add_argument("--num-workers", "--num_workers", dest="num_workers", type=int, default=2,
                        help="DataLoader processes that read images")
    parser.add_argument("--size-divisor", "--size_divisor", dest="size_divisor", type=int, default=64,
                        help="the network sees sides rounded to a multiple of this (1: exact size)")
    parser.add_argument("--max-image-pixels", "--max_image_pixels", dest="max_image_pixels", type=int,
                        default=DEFAULT_MAX_PIXELS, help="larger images are refused (decompression bombs)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing label files this model and settings did not write (and an "
                             f"{REPORT_FILE} that is not a report)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="autocast dtype of the teacher's forward: fp32 (none), fp16 (GPUs; the reference's "
                             "inference precision) or bf16; the softmax and the threshold stay float32")
    add_large_input_arguments(parser)
    add_compile_arguments(parser)
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        scales = validate_scales([s for s in args.scales.split(",") if s.strip()], "--scales")
        if not 0 <= args.threshold <= 1:
            raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
        for name in ("batch_size", "size_divisor"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        label_region = parse_label_region(args.label_region)
        torch_compile = compile_settings(args)
        check_model_source(args.model)
        layout = AutoLabelLayout.detect(args.input, args.output_dir, args.layout, preview=args.preview,
                                        merge_coarse=args.merge_coarse)
        if next(layout.jobs(), None) is None:
            expected = (f"<city>/*{IMAGE_SUFFIX}" if layout.kind == "cityscapes"
                        else f"images ({', '.join(IMAGE_EXTENSIONS)}) in it or its sub-folders")
            raise ValueError(f"--input {layout.input_dir} holds no images to label: expected {expected}")
        report_path = layout.output_dir / REPORT_FILE
        if report_path.exists() and not args.overwrite and not _is_report(report_path):
            raise ValueError(f"{report_path} exists and is not an auto-labelling report; pass --overwrite to replace "
                             "it or choose another --output-dir")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with launched_processes(cpu=args.cpu) as state:
        return _label_and_report(args, state, scales, label_region, layout, report_path, torch_compile)


def _label_and_report(args: argparse.Namespace, state, scales: list[float], label_region, layout: AutoLabelLayout,
                      report_path: Path, torch_compile: dict[str, str | None] | None = None) -> int:
    """`main` once the arguments are checked and the processes connected: label, then report (process 0)."""
    from accelerate.utils import gather_object

    try:
        with state.main_process_first():  # one download into the Hub cache, not one per process
            model = load_hms_model(args.model, "--model")  # no teacher with tensors initialised at random
        tiling, max_long_side = large_input_settings(args, model.config)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    settings = {"scales": scales, "flip": args.flip, "threshold": args.threshold, "merge_coarse": args.merge_coarse,
                "size_divisor": args.size_divisor, "layout": layout.kind, "max_long_side": max_long_side, **tiling}
    if label_region is not None:  # only then: labels written without a region keep their fingerprint
        settings["label_region"] = list(label_region)
    if args.precision != "fp32":  # likewise: float32 labels written before this option keep theirs
        settings["precision"] = args.precision
    # not torch_compile: like the batch size, it changes at most the rounding, not the labelling (a run may resume
    # without it)
    fingerprint = model_fingerprint(model, settings)
    model = compile_for_inference(model.to(state.device).eval(), torch_compile)
    tally = autolabel(
        model, layout, scales=scales, flip=args.flip, threshold=args.threshold, batch_size=args.batch_size,
        num_workers=args.num_workers, size_divisor=args.size_divisor, overwrite=args.overwrite,
        max_pixels=args.max_image_pixels, fingerprint=fingerprint, rank=state.process_index,
        max_long_side=max_long_side, tiling=tiling, label_region=label_region, precision=args.precision,
        world_size=state.num_processes, device=state.device, progress=args.progress and state.is_main_process,
    )
    tallies = gather_object([tally])  # one per process, on every process
    if state.is_main_process:
        report = AutoLabelTally.merge(list(tallies)).report(model.config.id2label, {
            "model": args.model, "input": str(layout.input_dir), "output_dir": str(layout.output_dir),
            "layout": layout.kind, "processes": state.num_processes, "fingerprint": fingerprint,
            "precision": args.precision, "torch_compile": torch_compile, **settings})
        print(format_report(report))
        layout.output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(report_path, json.dumps(report, indent=2))
        print(f"wrote {report_path}")
    state.wait_for_everyone()
    return 0


def _is_report(path: Path) -> bool:
    """Whether `path` holds a report this command wrote (a re-run replaces it; any other file is the user's)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(report, dict) and {"fingerprint", "images", "per_class"} <= set(report)


if __name__ == "__main__":
    raise SystemExit(main())
