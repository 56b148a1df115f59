"""Cityscapes from its official folder layout (or from a Hub dataset / parquet shards with the same columns).

The layout::

    <root>/leftImg8bit/{train,val,test,train_extra}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
                                          ..._gtFine_labelTrainIds.png      (optional, from createTrainIdLabelImgs)
    <root>/gtCoarse/{train,val,train_extra}/<city>/<city>_<seq>_<frame>_gtCoarse_labelIds.png
                                                  ..._gtAuto_labelTrainIds.png  (optional, written by auto-labelling)

Labels become the 19 trainIds (255 = ignore) through the table in `hms_segmentation.label_tables`; a
``*_labelTrainIds.png`` next to a ``*_labelIds.png`` is used as-is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import datasets

from ..label_tables import CITYSCAPES_ID2LABEL, cityscapes_label_id_to_train_id
from .builder import LoaderOptions, SampleFiles, SkippedSamples, build_dataset
from .hub import ColumnMapping, is_official_layout, load_hub_dataset
from .io import BadSampleError, LabelMapping

CITYSCAPES_SPLITS = ("train", "val", "test", "train_extra")
IMAGE_SUFFIX = "_leftImg8bit.png"
AUTO_LABEL_KIND = "gtAuto"
"""Auto-labels are ``gtCoarse/<split>/<city>/<city>_<seq>_<frame>_gtAuto_labelTrainIds.png`` (`hms_segmentation.autolabel`)."""


def cityscapes_label_mapping() -> LabelMapping:
    """Cityscapes labelIds (0..33) to the 19 trainIds, 255 for the ignored classes."""
    return LabelMapping.from_dict("Cityscapes labelIds", cityscapes_label_id_to_train_id())


@dataclass
class CityscapesOptions(LoaderOptions):
    """Which Cityscapes files to use, and how to read them (see `LoaderOptions` for the reading options).

    Args:
        include_coarse: Add the ``train_extra`` frames with their ``gtCoarse`` labels (train split only).
        include_auto_labels: Add the ``train_extra`` frames that have an auto-label
            (``*_gtAuto_labelTrainIds.png`` next to the gtCoarse files); with `include_coarse`, an auto-label replaces
            the coarse label of its frame.
    """

    include_coarse: bool = False
    include_auto_labels: bool = False


def _frames(image_dir: Path) -> list[tuple[str, str, Path]]:
    """(city, file id, image path) of every frame under ``leftImg8bit/<split>``, sorted."""
    frames = []
    for image_path in sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}")):
        frames.append((image_path.parent.name, image_path.name[: -len(IMAGE_SUFFIX)], image_path))
    return frames


def _label_for(label_dir: Path, city: str, file_id: str, kind: str) -> tuple[Path, str] | None:
    """The label file of a frame: ``*_<kind>_labelTrainIds.png`` if present, else ``*_<kind>_labelIds.png``."""
    train_ids = label_dir / city / f"{file_id}_{kind}_labelTrainIds.png"
    if train_ids.is_file():
        return train_ids, "train_ids"
    label_ids = label_dir / city / f"{file_id}_{kind}_labelIds.png"
    if label_ids.is_file():
        return label_ids, "dataset_ids"
    return None


def find_cityscapes_samples(
    root: str | os.PathLike, split: str = "train", options: CityscapesOptions | None = None
) -> tuple[list[SampleFiles], SkippedSamples]:
    """Scan the official layout for one split.

    Returns:
        The samples found, and the frames left out for a missing label (only with ``skip_bad_samples``).

    Raises:
        ValueError: Unknown split, missing or empty folders, or coarse/auto labels requested for a split other
            than train.
        BadSampleError: A frame without a label file (unless ``skip_bad_samples``).
    """
    options = options or CityscapesOptions()
    root = Path(root)
    if split not in CITYSCAPES_SPLITS:
        raise ValueError(f"split must be one of {CITYSCAPES_SPLITS}, got {split!r}")
    if (options.include_coarse or options.include_auto_labels) and split != "train":
        raise ValueError(f"coarse and auto labels can only be mixed into the train split, got split={split!r}")
    skipped = SkippedSamples(f"Cityscapes {split} (scanning {root})")
    annotation = "gtCoarse" if split == "train_extra" else "gtFine"  # train_extra has coarse labels only
    samples = _scan(root, split, annotation, (annotation,), options, skipped, required=True)
    if options.include_coarse or options.include_auto_labels:
        kinds = ((AUTO_LABEL_KIND,) if options.include_auto_labels else ()) + (("gtCoarse",) if options.include_coarse else ())
        samples += _scan(root, "train_extra", "gtCoarse", kinds, options, skipped,
                         required=options.include_coarse)
    return samples, skipped


def find_auto_labelled_samples(
    root: str | os.PathLike, options: CityscapesOptions | None = None
) -> tuple[list[SampleFiles], SkippedSamples]:
    """Only the ``train_extra`` frames that have an auto-label, paired with it (for mixing them in at a chosen ratio).

    Raises:
        ValueError: ``leftImg8bit/train_extra`` is missing or empty, or no frame has an auto-label.
    """
    options = options or CityscapesOptions()
    skipped = SkippedSamples(f"Cityscapes train_extra auto-labels (scanning {root})")
    samples = _scan(Path(root), "train_extra", "gtCoarse", (AUTO_LABEL_KIND,), options, skipped, required=False)
    if not samples:
        raise ValueError(f"no auto-labels found: expected {root}/gtCoarse/train_extra/<city>/*_{AUTO_LABEL_KIND}"
                         "_labelTrainIds.png (written by `hms-segmentation autolabel`)")
    return samples, skipped


def _scan(root: Path, split: str, label_root: str, kinds: tuple[str, ...], options: CityscapesOptions,
          skipped: SkippedSamples, required: bool) -> list[SampleFiles]:
    """Pair every frame of ``leftImg8bit/<split>`` with the first label kind found (in `kinds` order)."""
    image_dir, label_dir = root / "leftImg8bit" / split, root / label_root / split
    expected = f"{root}/leftImg8bit/{split}/<city>/*{IMAGE_SUFFIX}"
    if not image_dir.is_dir():
        raise ValueError(f"{image_dir} not found: expected the Cityscapes layout {expected}")
    frames = _frames(image_dir)
    if not frames:
        raise ValueError(f"{image_dir} holds no images: expected files {expected}")
    samples = []
    for city, file_id, image_path in frames:
        found = next((label for kind in kinds if (label := _label_for(label_dir, city, file_id, kind))), None)
        if found is None:
            if not required:
                continue  # auto-labels only: frames the auto-labeller did not cover are simply not added
            names = " or ".join(f"{file_id}_{kind}_label{{TrainIds,Ids}}.png" for kind in kinds)
            error = BadSampleError(f"image {image_path} has no label: expected {names} in {label_dir / city}",
                                   (str(image_path),))
            if not options.skip_bad_samples:
                raise error
            skipped.add(error)
            continue
        label_path, stored_ids = found
        samples.append(SampleFiles(file_id, str(image_path), str(label_path), stored_ids))
    return samples


def load_cityscapes(
    source: str | os.PathLike,
    split: str = "train",
    *,
    streaming: bool = False,
    options: CityscapesOptions | None = None,
    column_mapping: ColumnMapping | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Cityscapes as a `datasets` dataset with ``image``, ``label`` (trainIds, 255 = ignore) and ``id`` columns.

    Args:
        source: A local copy in the official layout, a folder or glob of parquet shards, or a Hub dataset id.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"train_extra"``.
        streaming: Return a streaming `IterableDataset` instead of a map-style `Dataset`.
        options: Coarse/auto labels, bad-sample policy, shards, cache.
        column_mapping: For Hub datasets / parquet shards whose columns are named differently.

    Example:
        ```python
        >>> from hms_segmentation.data import load_cityscapes
        >>> train = load_cityscapes("/data/cityscapes", "train", streaming=True)
        ```
    """
    options = options or CityscapesOptions()
    if not is_official_layout(source, "leftImg8bit"):
        return load_hub_dataset(source, split, streaming=streaming, column_mapping=column_mapping,
                                cache_dir=options.cache_dir)
    samples, skipped = find_cityscapes_samples(source, split, options)
    return build_dataset(samples, cityscapes_label_mapping(), len(CITYSCAPES_ID2LABEL), options, name="Cityscapes",
                         split=split, streaming=streaming, skipped_at_discovery=skipped)
