"""Turn `DataArguments` into training and evaluation datasets through `hms_segmentation.data`."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from ..data import (
    CityscapesOptions,
    ClassCentroidIndex,
    EvalPreprocessingOptions,
    LoaderOptions,
    SegmentationEvalTransform,
    SegmentationTrainingDataset,
    SegmentationTrainingStream,
    SegmentationTrainTransform,
    SyntheticDatasetOptions,
    TrainAugmentationOptions,
    load_cityscapes,
    load_mapillary,
    mapillary_label_set,
    synthesize_cityscapes,
)
from ..data.builder import build_dataset
from ..data.cityscapes import cityscapes_label_mapping, find_auto_labelled_samples
from ..data.synthesize import GENERATOR_VERSION, MARKER_FILE
from ..data.training import ConsecutiveEpochs
from ..label_tables import CITYSCAPES_ID2LABEL, CITYSCAPES_PALETTE, cityscapes_train_id_to_label_id
from .arguments import DataArguments

logger = logging.getLogger(__name__)

DEFAULT_SYNTHETIC_DIR = Path("data_synthetic")


@dataclass
class SegmentationData:
    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset | None
    id2label: dict[int, str]
    poly_power: float


class SegmentationEvalDataset(torch.utils.data.Dataset):
    """Evaluation samples (normalised image, full-resolution trainId labels) from a map-style dataset."""

    def __init__(self, dataset: datasets.Dataset, transform: SegmentationEvalTransform | None = None):
        self.dataset = dataset
        self.transform = transform or SegmentationEvalTransform()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.dataset[index]
        return self.transform(row["image"].convert("RGB"), np.asarray(row["label"], dtype=np.uint8))

    def sample_ids(self) -> list[str]:
        """Each sample's ``id`` (Cityscapes: ``<city>_<sequence>_<frame>``; Mapillary: the image key), in order."""
        return [str(sample_id) for sample_id in self.dataset.select_columns(["id"])["id"]]


def check_same_size(
    samples: list[dict[str, torch.Tensor]], batch_size_flag: str = "--per_device_eval_batch_size"
) -> list[dict[str, torch.Tensor]]:
    """`samples` as they are, or a clear error when their images differ in size and so cannot form one batch.

    Evaluation reads images at full resolution, and those of Mapillary Vistas (or of a Hub dataset) differ in size.
    `batch_size_flag` is the option the message names.
    """
    sizes = sorted({tuple(sample["pixel_values"].shape[-2:]) for sample in samples})
    if len(sizes) > 1:
        shown = ", ".join(f"{height}x{width}" for height, width in sizes)
        raise ValueError(f"one batch would hold images of different sizes ({shown}): images of varying size (e.g. "
                         f"Mapillary Vistas at full resolution) need {batch_size_flag} 1")
    return samples


def _synthetic_options(args: DataArguments) -> SyntheticDatasetOptions:
    return SyntheticDatasetOptions(
        output_dir=Path(args.data_dir) if args.data_dir else DEFAULT_SYNTHETIC_DIR,
        num_train=args.synthetic_train_frames,
        num_val=args.synthetic_val_frames,
        height=args.synthetic_height,
        width=args.synthetic_width,
    )


def synthetic_dataset_differences(args: DataArguments) -> dict[str, Any]:
    """The settings in which the finished synthetic dataset in `args.data_dir` differs from those `args` ask for
    (name -> the value found); empty when there is none yet or it matches."""
    options = _synthetic_options(args)
    marker = options.output_dir / MARKER_FILE
    if not marker.is_file():
        return {}
    found = json.loads(marker.read_text())
    wanted = {"version": GENERATOR_VERSION, "num_train": options.num_train, "num_val": options.num_val,
              "height": options.height, "width": options.width}
    return {key: found.get(key) for key, value in wanted.items() if found.get(key) != value}


def ensure_synthetic_dataset(args: DataArguments) -> Path:
    """Generate the embedded dataset in `args.data_dir` unless one is already there (then it is used as it is)."""
    options = _synthetic_options(args)
    root = options.output_dir
    if (root / MARKER_FILE).is_file():
        differences = synthetic_dataset_differences(args)
        if differences:
            logger.warning("using the synthetic dataset in %s as it is (%s); delete it to generate another", root,
                           ", ".join(f"{key}={value}" for key, value in differences.items()))
        return root
    logger.info("generating the synthetic street-scene dataset in %s", root)
    return synthesize_cityscapes(options)


def load_split(args: DataArguments, split: str, streaming: bool = False) -> tuple:
    """Rows of one split of the dataset named by `args`, with its `id2label` and the recipe's poly power."""
    if args.dataset in ("synthetic", "cityscapes"):
        root = ensure_synthetic_dataset(args) if args.dataset == "synthetic" else args.data_dir
        rows = load_cityscapes(root, split, streaming=streaming, options=CityscapesOptions(skip_bad_samples=args.skip_bad_samples))
        return rows, dict(CITYSCAPES_ID2LABEL), 2.0
    label_set = mapillary_label_set(args.data_dir, args.mapillary_version)
    # Mapillary names its splits training/validation
    split = {"train": "training", "val": "validation"}.get(split, split)
    rows = load_mapillary(args.data_dir, split, version=args.mapillary_version, streaming=streaming,
                          options=LoaderOptions(skip_bad_samples=args.skip_bad_samples))
    return rows, dict(label_set.id2label), 1.0


def load_auto_labelled(args: DataArguments, streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset:
    """The auto-labelled ``train_extra`` frames of the Cityscapes-layout dataset named by `args`."""
    root = ensure_synthetic_dataset(args) if args.dataset == "synthetic" else args.data_dir
    options = CityscapesOptions(skip_bad_samples=args.skip_bad_samples)
    samples, skipped = find_auto_labelled_samples(root, options)
    return build_dataset(samples, cityscapes_label_mapping(), len(CITYSCAPES_ID2LABEL), options,
                         name="Cityscapes auto-labelled", split="train_extra", streaming=streaming,
                         skipped_at_discovery=skipped)


def mix_auto_labelled(fine_rows, args: DataArguments, seed: int, streaming: bool = False) -> tuple:
    """Fine training rows mixed with the auto-labelled ``train_extra`` frames so that a share `args.auto_label_ratio`
    of the samples are auto-labelled.

    Returns:
        The mixed rows (each auto-labelled frame seen once, fine frames repeated as the ratio needs), and the distinct
        rows (fine + auto-labelled, once each) for the class-uniform index.
    """
    auto_rows = load_auto_labelled(args, streaming=streaming)
    if args.auto_label_ratio >= 1:
        return auto_rows, auto_rows
    distinct = datasets.concatenate_datasets([fine_rows, auto_rows])
    # "all_exhausted": every auto-labelled frame is used (a fixed subset would be the same one at every seed)
    mixed = datasets.interleave_datasets([fine_rows, auto_rows], probabilities=[1 - args.auto_label_ratio,
                                         args.auto_label_ratio], seed=seed, stopping_strategy="all_exhausted")
    return mixed, distinct


def build_eval_dataset(args: DataArguments) -> tuple[SegmentationEvalDataset, dict[int, str]]:
    """The evaluation split as normalised images with full-resolution labels (or both resized to
    `args.eval_long_side`, the reference's Mapillary evaluation), and its `id2label`."""
    rows, id2label, _ = load_split(args, args.eval_split)
    if args.max_eval_samples is not None:
        rows = rows.select(range(min(args.max_eval_samples, len(rows))))
    transform = SegmentationEvalTransform(EvalPreprocessingOptions(long_side=args.eval_long_side or None))
    return SegmentationEvalDataset(rows, transform), id2label


def dataset_label_ids(args: DataArguments) -> tuple[dict[int, int], tuple[tuple[int, int, int], ...]]:
    """For the dataset named by `args`: each training id's label id as the dataset stores it (Cityscapes' labelIds,
    Mapillary's config index), and each training id's colour."""
    if args.dataset in ("synthetic", "cityscapes"):
        return cityscapes_train_id_to_label_id(), CITYSCAPES_PALETTE
    label_set = mapillary_label_set(args.data_dir, args.mapillary_version)
    return label_set.train_id_to_label_id(), label_set.palette


def build_datasets(args: DataArguments, seed: int, do_eval: bool = True) -> SegmentationData:
    """The training dataset (augmented, class-uniform) and the evaluation dataset described by `args`."""
    train_rows, id2label, poly_power = load_split(args, args.train_split, streaming=args.streaming)
    num_labels = len(id2label)
    evaluation = build_eval_dataset(args)[0] if do_eval else None
    distinct_rows = None
    if args.auto_label_ratio > 0:
        train_rows, distinct_rows = mix_auto_labelled(train_rows, args, seed, streaming=args.streaming)

    if args.max_train_samples is not None:
        train_rows = train_rows.take(args.max_train_samples) if args.streaming else train_rows.select(
            range(min(args.max_train_samples, len(train_rows)))
        )
        distinct_rows = None
    centroid_rows = {}
    if args.auto_label_classes is not None:
        # the record recipe: fine frames make the epoch, auto-labelled ones follow them as centroids of some classes
        auto_rows = load_auto_labelled(args)
        shared = sorted(set(train_rows["id"]) & set(auto_rows["id"]))
        if shared:  # centroids are keyed by id: a fine frame would lose its other classes
            raise ValueError(f"--auto_label_classes: {len(shared)} auto-labelled frame(s) share their id with a fine "
                             f"training frame ({', '.join(shared[:3])}): the auto-labelled frames must be other frames "
                             "(Cityscapes' train_extra)")
        centroid_rows = {"centroid_rows_from": len(train_rows), "centroid_rows_epochs": args.auto_label_epochs}
        train_rows = datasets.concatenate_datasets([train_rows, auto_rows])
    transform = SegmentationTrainTransform(
        TrainAugmentationOptions(crop_size=(args.crop_size, args.crop_width or args.crop_size), scale_min=args.scale_min,
                                 scale_max=args.scale_max, pre_size=args.pre_size or None, brightness=args.color_jitter, contrast=args.color_jitter,
                                 saturation=args.color_jitter, hue=args.hue,
                                 blur_probability=args.blur_probability, pad_placement=args.crop_padding,
                                 pad_fill=args.crop_pad_fill, output_dtype=args.train_sample_dtype)
    )
    centroids = None
    if args.class_uniform_fraction > 0:
        # centroids are keyed by sample id: the distinct rows give them all without re-reading repeated frames
        centroids = ClassCentroidIndex.build(distinct_rows if distinct_rows is not None else train_rows, num_labels)
        if centroid_rows:
            auto_ids = train_rows.select(range(centroid_rows["centroid_rows_from"], len(train_rows)))["id"]
            centroids = centroids.restricted(auto_ids, [int(c) for c in args.auto_label_classes.split(",")])
    common = {
        "num_labels": num_labels,
        "seed": seed,
        "class_centroids": centroids,
        "class_uniform_fraction": args.class_uniform_fraction,
        "skip_bad_samples": args.skip_bad_samples,
    }
    if args.streaming:
        # files are listed in order (city by city): shuffled shards and a shuffle buffer, reseeded by every set_epoch;
        # one shard read at a time (more make datasets read in threads and wait at every epoch's end)
        train_rows = train_rows.shuffle(seed=seed, buffer_size=args.shuffle_buffer_size, max_buffer_input_shards=1)
        # epochs chained into one iteration: a resumed run skips its trained batches into the right epoch
        train = ConsecutiveEpochs(SegmentationTrainingStream(train_rows, transform, **common))
    else:
        train = SegmentationTrainingDataset(train_rows, transform, **centroid_rows, **common)
    return SegmentationData(train=train, eval=evaluation, id2label=id2label, poly_power=poly_power)
