"""Mapillary Vistas from its official folder layout (or from a Hub dataset / parquet shards with the same columns).

Both releases are understood::

    v1.2 release:  <root>/config.json
                   <root>/{training,validation}/images/<key>.jpg
                   <root>/{training,validation}/labels/<key>.png
    v2.0 release:  <root>/config_v1.2.json, <root>/config_v2.0.json
                   <root>/{training,validation}/images/<key>.jpg
                   <root>/{training,validation}/v1.2/labels/<key>.png
                   <root>/{training,validation}/v2.0/labels/<key>.png

Label PNGs store the class index of the version's ``config*.json`` (8-bit palette images). Classes with
``"evaluate": false`` (v1.2: ``void--unlabeled``) become 255 = ignore; the others keep their order as training ids.
Without a config file, v1.2 falls back to the built-in table of `hms_segmentation.label_tables`.

Because the stored ids need converting, every label is decoded and re-encoded when the dataset is built (map-style,
once, cached) or read (streaming, every epoch: ~0.2 s for a 12-megapixel label). To stream Mapillary at scale, build
it map-style once and write parquet shards (`write_parquet_shards`), which hold the converted labels.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import datasets

from ..label_tables import IGNORE_INDEX, MAPILLARY_V12_LABELS, MapillaryLabel
from .builder import LoaderOptions, SampleFiles, SkippedSamples, build_dataset
from .hub import ColumnMapping, load_hub_dataset
from .io import BadSampleError, LabelMapping

MAPILLARY_VERSIONS = ("v1.2", "v2.0")
SPLIT_FOLDERS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}


@dataclass(frozen=True)
class MapillaryLabelSet:
    """The classes of one Mapillary version, and what the model config needs from them.

    Args:
        version: ``"v1.2"`` or ``"v2.0"``.
        labels: Every class, indexed by the id stored in the label PNGs.
        source: Where the list came from (a config file, or the built-in table).
    """

    version: str
    labels: tuple[MapillaryLabel, ...]
    source: str

    @property
    def train_labels(self) -> tuple[MapillaryLabel, ...]:
        """The evaluated classes, in label-id order: training id = position."""
        return tuple(label for label in self.labels if label.evaluate)

    @property
    def id2label(self) -> dict[int, str]:
        """``{training id: readable name}``, for ``config.id2label``."""
        return {index: label.readable for index, label in enumerate(self.train_labels)}

    @property
    def label2id(self) -> dict[str, int]:
        """``{readable name: training id}``, for ``config.label2id``."""
        return {name: index for index, name in self.id2label.items()}

    @property
    def palette(self) -> tuple[tuple[int, int, int], ...]:
        """Colour of each training id."""
        return tuple(label.color for label in self.train_labels)

    def train_id_to_label_id(self) -> dict[int, int]:
        """Training id -> the label id stored in the dataset's PNGs (the inverse of `label_mapping` on the evaluated
        classes)."""
        evaluated = [label_id for label_id, label in enumerate(self.labels) if label.evaluate]
        return dict(enumerate(evaluated))

    def label_mapping(self) -> LabelMapping:
        """Stored label id -> training id (non-evaluated classes -> 255)."""
        train_ids, next_id = {}, 0
        for label_id, label in enumerate(self.labels):
            train_ids[label_id] = next_id if label.evaluate else IGNORE_INDEX
            next_id += label.evaluate
        return LabelMapping.from_dict(f"Mapillary Vistas {self.version} label ids", train_ids)


def _read_config(path: Path, version: str) -> MapillaryLabelSet:
    try:
        entries = json.loads(path.read_text())["labels"]
        labels = tuple(MapillaryLabel(entry["name"], entry.get("readable", entry["name"]), tuple(entry["color"]),
                                      bool(entry.get("instances", False)), bool(entry.get("evaluate", True)))
                       for entry in entries)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: expected a Mapillary config with a 'labels' list of {{name, readable, color, "
                         f"instances, evaluate}}, could not read it ({error!r})") from None
    if not 0 < len(labels) < IGNORE_INDEX:
        raise ValueError(f"{path}: expected between 1 and {IGNORE_INDEX - 1} labels, found {len(labels)}")
    return MapillaryLabelSet(version, labels, str(path))


def mapillary_label_set(root: str | os.PathLike | None = None, version: str = "v1.2") -> MapillaryLabelSet:
    """The classes of a Mapillary version: from the dataset's own ``config*.json`` when present, else built in (v1.2).

    Raises:
        ValueError: Unknown version, or v2.0 without its ``config_v2.0.json`` (there is no built-in v2.0 table).
    """
    if version not in MAPILLARY_VERSIONS:
        raise ValueError(f"version must be one of {MAPILLARY_VERSIONS}, got {version!r}")
    candidates = [f"config_{version}.json"] + (["config.json"] if version == "v1.2" else [])
    if root is not None:
        for name in candidates:
            if (Path(root) / name).is_file():
                return _read_config(Path(root) / name, version)
    if version == "v1.2":
        return MapillaryLabelSet(version, MAPILLARY_V12_LABELS, "built-in Mapillary Vistas v1.2 table")
    raise ValueError(f"{root}: expected {candidates[0]} (the v2.0 release ships it next to training/); there is no "
                     "built-in v2.0 label table")


def _label_dir(split_dir: Path, version: str) -> Path:
    if version == "v2.0" or (split_dir / version / "labels").is_dir():
        return split_dir / version / "labels"
    return split_dir / "labels"  # the v1.2 release


def find_mapillary_samples(
    root: str | os.PathLike, split: str = "training", version: str = "v1.2", options: LoaderOptions | None = None
) -> tuple[list[SampleFiles], SkippedSamples]:
    """Pair every ``<split>/images/<key>.jpg`` with its label PNG.

    Raises:
        ValueError: Unknown split or version, missing or empty folders.
        BadSampleError: An image without a label (unless ``skip_bad_samples``).
    """
    options = options or LoaderOptions()
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"split must be one of {sorted(SPLIT_FOLDERS)} (the test split has no public labels), "
                         f"got {split!r}")
    if version not in MAPILLARY_VERSIONS:
        raise ValueError(f"version must be one of {MAPILLARY_VERSIONS}, got {version!r}")
    split_dir = Path(root) / SPLIT_FOLDERS[split]
    image_dir, label_dir = split_dir / "images", _label_dir(split_dir, version)
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise ValueError(f"{folder} not found: expected the Mapillary Vistas layout {split_dir}/images/*.jpg with "
                             f"labels in {split_dir}/{version}/labels/ (v2.0 release) or {split_dir}/labels/ (v1.2)")
    images = sorted(path for path in image_dir.iterdir() if path.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not images:
        raise ValueError(f"{image_dir} holds no images: expected <key>.jpg files")
    samples, skipped = [], SkippedSamples(f"Mapillary Vistas {version} {split} (scanning {root})")
    for image_path in images:
        label_path = label_dir / f"{image_path.stem}.png"
        if not label_path.is_file():
            error = BadSampleError(f"image {image_path} has no label: expected {label_path}", (str(image_path),))
            if not options.skip_bad_samples:
                raise error
            skipped.add(error)
            continue
        samples.append(SampleFiles(image_path.stem, str(image_path), str(label_path), "dataset_ids"))
    return samples, skipped


def load_mapillary(
    source: str | os.PathLike,
    split: str = "training",
    *,
    version: str = "v1.2",
    streaming: bool = False,
    options: LoaderOptions | None = None,
    column_mapping: ColumnMapping | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Mapillary Vistas as a `datasets` dataset with ``image``, ``label`` (training ids, 255 = ignore) and ``id``.

    Use `mapillary_label_set` for the matching ``id2label`` / ``label2id`` of the model config.

    Args:
        source: A local copy in an official layout, a folder or glob of parquet shards, or a Hub dataset id.
        split: ``"training"`` / ``"train"`` or ``"validation"`` / ``"val"``.
        version: Which labels: ``"v1.2"`` (65 classes) or ``"v2.0"`` (needs the dataset's config_v2.0.json).
        streaming: Return a streaming `IterableDataset` instead of a map-style `Dataset`.
        options: Bad-sample policy, checks, shards, cache.
        column_mapping: For Hub datasets / parquet shards whose columns are named differently.
    """
    options = options or LoaderOptions()
    root = Path(source)
    if not any((root / folder / "images").is_dir() for folder in set(SPLIT_FOLDERS.values())):
        return load_hub_dataset(source, split, streaming=streaming, column_mapping=column_mapping,
                                cache_dir=options.cache_dir)
    label_set = mapillary_label_set(root, version)
    samples, skipped = find_mapillary_samples(root, split, version, options)
    return build_dataset(samples, label_set.label_mapping(), len(label_set.train_labels), options,
                         name=f"Mapillary Vistas {version}", split=SPLIT_FOLDERS[split], streaming=streaming,
                         skipped_at_discovery=skipped)
