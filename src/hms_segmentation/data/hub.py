"""Hub datasets and parquet shards: loading them with the same columns as local layouts, and writing local copies.

A Hub dataset (or a folder / glob of parquet shards) is usable when it has an image column, a label column holding
**training ids** (0..num_labels-1, 255 = ignore; a single-channel image) and optionally an id column. Columns named
differently are renamed with a `ColumnMapping`, e.g. ``ColumnMapping(label="semantic_segmentation")``.

`write_parquet_shards` writes a dataset built from a local layout to
``<output_dir>/data/<split>-NNNNN-of-MMMMM.parquet`` with the image and label bytes embedded: the layout the Hub
expects (upload the folder with ``huggingface_hub.upload_folder``), readable with the loaders here or with
``load_dataset(output_dir, streaming=True)``.

Column mapping, for the record: ``image`` <- `ColumnMapping.image`, ``label`` <- `ColumnMapping.label`, ``id`` <-
`ColumnMapping.id` (or ``<split>_<row>`` when `None`); other columns are dropped.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from .builder import SEGMENTATION_FEATURES

RAW_IMAGE_FEATURES = datasets.Features(
    {"image": datasets.Image(decode=False), "label": datasets.Image(decode=False), "id": datasets.Value("string")}
)
"""`SEGMENTATION_FEATURES` without decoding: rows give ``{"path", "bytes"}`` for the training transforms to read."""


@dataclass(frozen=True)
class ColumnMapping:
    """Which columns of a Hub dataset hold our ``image``, ``label`` and ``id``.

    Args:
        image: Column with the RGB image.
        label: Column with the label map of training ids (single channel).
        id: Column with a unique sample id, or `None` to number the rows (``<split>_000000``, ...).
    """

    image: str = "image"
    label: str = "label"
    id: str | None = "id"


def is_official_layout(source: str | os.PathLike, marker: str) -> bool:
    """Whether `source` is a local folder containing the sub-folder `marker` (e.g. ``leftImg8bit``)."""
    path = Path(source)
    return path.is_dir() and (path / marker).is_dir()


SPLIT_ALIASES = {"val": "validation", "validation": "val", "train": "training", "training": "train"}
"""Other names of a split in shard names (Cityscapes says ``val``, the Hub ``validation``; Mapillary ``training``)."""

_SHARD_NAME = re.compile(r"^(?P<split>.+)-\d{5}-of-\d{5}\.parquet$")
"""Hub shard naming, ``<split>-NNNNN-of-MMMMM.parquet`` (what `write_parquet_shards` writes)."""


def _parquet_files(source: str | os.PathLike, split: str) -> list[str] | None:
    """Local parquet shards of `split` in a folder, a glob, or `None` when `source` is no local path.

    In a folder, shards named after the split (Hub naming ``<split>-NNNNN-of-MMMMM.parquet``, or its alias, e.g.
    ``validation`` for ``val``) are used; every ``*.parquet`` only when no file is named after any split.

    Raises:
        ValueError: The folder holds shards of other splits only (the message lists them).
    """
    text = os.fspath(source)
    if any(character in text for character in "*?["):
        return sorted(glob.glob(text, recursive=True))
    path = Path(text)
    if path.is_file() and path.suffix == ".parquet":
        return [str(path)]
    if path.is_dir():
        for name in (split, SPLIT_ALIASES.get(split)):
            files = sorted(path.rglob(f"{name}-*.parquet")) if name else []
            if files:
                return [str(file) for file in files]
        files = sorted(path.rglob("*.parquet"))
        splits = sorted({match["split"] for file in files if (match := _SHARD_NAME.match(file.name))})
        if splits:
            raise ValueError(f"{source}: expected parquet shards of split {split!r} ({split}-NNNNN-of-MMMMM.parquet), "
                             f"found shards of split(s) {splits} only")
        return [str(file) for file in files]
    if not path.exists() and (path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1):
        raise ValueError(f"{source} not found: expected a dataset folder in its official layout, parquet shards or a "
                         "Hub dataset id (owner/name)")
    return None


def load_hub_dataset(
    source: str | os.PathLike,
    split: str = "train",
    *,
    streaming: bool = False,
    column_mapping: ColumnMapping | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load a Hub dataset id, a folder of parquet shards or a glob of them, as columns ``image``, ``label``, ``id``.

    Raises:
        ValueError: A local path without parquet files (or with shards of other splits only), a local path that
            does not exist, or missing columns (the message lists the columns found).
    """
    column_mapping = column_mapping or ColumnMapping()
    parquet_files = _parquet_files(source, split)
    if parquet_files is not None:
        if not parquet_files:
            raise ValueError(f"{source}: expected a dataset folder in its official layout or parquet shards "
                             f"({split}-*.parquet), found neither")
        dataset = datasets.load_dataset("parquet", data_files={split: parquet_files}, split=split, streaming=streaming,
                                        cache_dir=os.fspath(cache_dir) if cache_dir else None)
    else:
        dataset = _load_split_or_alias(os.fspath(source), split, streaming=streaming,
                                       cache_dir=os.fspath(cache_dir) if cache_dir else None)
    return _standard_columns(dataset, column_mapping, split, source)


def _load_split_or_alias(source: str, split: str, **kwargs) -> datasets.Dataset | datasets.IterableDataset:
    """`datasets.load_dataset(source, split=split)`, else the split under its other name (`SPLIT_ALIASES`): Mapillary's
    own names are ``training`` / ``validation``, a Hub copy of it may say ``train``; Cityscapes says ``val``."""
    try:
        return datasets.load_dataset(source, split=split, **kwargs)
    except ValueError as error:  # datasets: 'Unknown split "training". Should be one of [...]'
        alias = SPLIT_ALIASES.get(split)
        if alias is None:
            raise
        try:
            return datasets.load_dataset(source, split=alias, **kwargs)
        except ValueError:
            raise error from None


def _standard_columns(
    dataset: datasets.Dataset | datasets.IterableDataset, column_mapping: ColumnMapping, split: str, source: object
) -> datasets.Dataset | datasets.IterableDataset:
    """Keep, rename (and number, without an id column) the columns, and cast them to `SEGMENTATION_FEATURES`."""
    columns = list(dataset.column_names or dataset.features or [])
    wanted = {"image": column_mapping.image, "label": column_mapping.label}
    if column_mapping.id is not None:
        wanted["id"] = column_mapping.id
    missing = [name for name in wanted.values() if name not in columns]
    if missing:
        raise ValueError(f"{source}: expected columns {sorted(wanted.values())} (see ColumnMapping), "
                         f"found {columns}; missing {missing}")
    dataset = dataset.select_columns(list(wanted.values()))
    dataset = dataset.rename_columns({old: new for new, old in wanted.items() if old != new})
    if column_mapping.id is None:
        dataset = dataset.map(lambda row, index: {"id": f"{split}_{index:06d}"}, with_indices=True)
    return dataset.cast(SEGMENTATION_FEATURES)


def _embedded(value: dict) -> dict:
    """An image value with its file's bytes inside, and only the file name as path (no local paths on the Hub)."""
    if value.get("bytes") is None:
        with open(value["path"], "rb") as file:
            return {"path": os.path.basename(value["path"]), "bytes": file.read()}
    return {"path": os.path.basename(value["path"]) if value.get("path") else None, "bytes": value["bytes"]}


def write_parquet_shards(
    dataset: datasets.Dataset | datasets.IterableDataset,
    output_dir: str | os.PathLike,
    *,
    split: str = "train",
    num_shards: int = 8,
    rows_per_group: int = 32,
) -> list[Path]:
    """Write a dataset (e.g. from `load_cityscapes` or `load_mapillary`) as parquet shards with embedded files.

    Map-style datasets are cut into contiguous shards; streaming ones are dealt round-robin.

    The shards are first written to a hidden folder beside ``data/`` and moved in only once every one is complete, so
    the dataset may stream from the very shards it replaces (resharding in place), and an error while writing (a bad
    sample, a missing file) leaves the earlier shards as they were.

    Args:
        dataset: A dataset with the columns ``image``, ``label`` and ``id``.
        output_dir: Gets ``data/<split>-00000-of-000NN.parquet``; existing shards of this split are replaced (those of
            other splits are kept).
        split: Split name used in the file names.
        num_shards: Number of files; a multiple of world size x dataloader workers lets every rank and worker
            stream its own files.
        rows_per_group: Rows per parquet row group (the unit a streaming reader fetches).

    Returns:
        The shard paths.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    length = len(dataset) if isinstance(dataset, datasets.Dataset) else None
    if length is not None and length < num_shards:
        raise ValueError(f"num_shards ({num_shards}) must not exceed the number of rows ({length})")
    dataset = dataset.select_columns(["image", "label", "id"]).cast(RAW_IMAGE_FEATURES)
    output = Path(output_dir) / "data"
    names = [f"{split}-{index:05d}-of-{num_shards:05d}.parquet" for index in range(num_shards)]
    output.parent.mkdir(parents=True, exist_ok=True)
    # Same filesystem as data/, so the final moves are renames; hidden, and the staged files carry a suffix that no
    # shard pattern matches, so a folder left behind by a killed process is never read as shards.
    staging = Path(tempfile.mkdtemp(prefix=f".{split}-shards-", dir=output.parent))
    try:
        staged = [staging / f"{name}.partial" for name in names]
        _write_shard_files(dataset, staged, length, rows_per_group)
        output.mkdir(exist_ok=True)
        # exact split match: the shards of another split (say ``train-extra`` beside ``train``) are kept
        stale = [path for path in output.glob("*.parquet") if path.name not in names
                 and (match := _SHARD_NAME.match(path.name)) and match["split"] == split]
        # New shards first (a rename replaces a same-named old shard atomically), stale ones after: an interruption
        # in between leaves extra old shards beside a complete new set, never fewer rows than before.
        for source, name in zip(staged, names):
            os.replace(source, output / name)
        for path in stale:
            path.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [output / name for name in names]


def _write_shard_files(
    dataset: datasets.Dataset | datasets.IterableDataset, paths: list[Path], length: int | None, rows_per_group: int
) -> None:
    """Deal the rows of `dataset` over the files `paths` (contiguously when `length` is known, else round-robin)."""
    num_shards = len(paths)
    schema = SEGMENTATION_FEATURES.arrow_schema
    writers: dict[int, pq.ParquetWriter] = {}
    buffers: dict[int, list[dict]] = {index: [] for index in range(num_shards)}

    def flush(index: int) -> None:
        if buffers[index]:
            if index not in writers:
                writers[index] = pq.ParquetWriter(paths[index], schema)
            writers[index].write_table(pa.Table.from_pylist(buffers[index], schema=schema))
            buffers[index] = []

    try:
        for row_index, row in enumerate(dataset):
            shard = row_index * num_shards // length if length is not None else row_index % num_shards
            buffers[shard].append({"image": _embedded(row["image"]), "label": _embedded(row["label"]), "id": row["id"]})
            if len(buffers[shard]) >= rows_per_group:
                flush(shard)
        for index in range(num_shards):
            flush(index)
    finally:
        for writer in writers.values():
            writer.close()
    for path in paths:
        if not path.exists():  # fewer rows than shards in a stream: keep the advertised shard count
            pq.write_table(schema.empty_table(), path)
