"""Turning a list of image/label files into a `datasets` dataset (map-style or streaming), shared by every layout.

Every dataset built here has the same columns:

- ``image``: `datasets.Image(mode="RGB")`, usually stored as the path of the original file;
- ``label``: `datasets.Image()`, single-channel **training ids** (0..num_labels-1, 255 = ignore): the original file
  when it already holds training ids, otherwise the converted map, stored as PNG bytes;
- ``id``: the file id (e.g. ``aachen_000000_000019``).

Bad samples raise `BadSampleError` naming the file(s); with ``skip_bad_samples=True`` they are left out, counted and
reported (logged) at the end of each pass over the files, so that nothing is dropped silently.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import datasets
import numpy as np
from datasets.exceptions import DatasetGenerationError

from .io import (
    DEFAULT_MAX_PIXELS,
    SIXTEEN_BIT_MODES,
    BadSampleError,
    LabelMapping,
    check_same_size,
    encode_label_png,
    load_image,
    load_label,
    read_image_header,
    read_label_header,
)

logger = logging.getLogger(__name__)

SEGMENTATION_FEATURES = datasets.Features(
    {"image": datasets.Image(mode="RGB"), "label": datasets.Image(), "id": datasets.Value("string")}
)
"""The columns of every dataset this package builds or loads (after the column mapping of Hub datasets)."""


@dataclass(frozen=True)
class SampleFiles:
    """One image and its label file, as found in a dataset layout.

    Args:
        sample_id: The file id, unique within the dataset.
        image_path: The image file.
        label_path: The label file.
        stored_ids: ``"train_ids"`` when the label file already holds training ids (used as-is, e.g. Cityscapes
            ``*_labelTrainIds.png``), ``"dataset_ids"`` when it holds the dataset's own ids that the builder's
            `LabelMapping` converts (Cityscapes ``*_labelIds.png``, Mapillary labels).
    """

    sample_id: str
    image_path: str
    label_path: str
    stored_ids: Literal["train_ids", "dataset_ids"] = "dataset_ids"


@dataclass
class SkippedSamples:
    """Samples left out of one pass because they were bad; `report` logs how many and why, at the end of the pass."""

    context: str
    reasons: list[str] = field(default_factory=list)

    def add(self, error: BadSampleError | str) -> None:
        self.reasons.append(str(error))

    def __len__(self) -> int:
        return len(self.reasons)

    def report(self, total: int | None = None, max_listed: int = 20) -> None:
        if not self.reasons:
            return
        out_of = f" of {total}" if total is not None else ""
        listed = "\n  ".join(self.reasons[:max_listed])
        more = f"\n  ... and {len(self.reasons) - max_listed} more" if len(self.reasons) > max_listed else ""
        logger.warning("%s: skipped %d bad sample(s)%s (skip_bad_samples=True):\n  %s%s", self.context,
                       len(self.reasons), out_of, listed, more)


@dataclass(frozen=True)
class SampleReader:
    """How rows are read from files: label conversion, checks, and what to do with bad samples.

    Args:
        label_mapping: Converts ``"dataset_ids"`` label files to training ids (and refuses unknown ids).
        num_labels: Number of training classes; ``"train_ids"`` files may hold 0..num_labels-1 and 255.
        verify_images: Decode every image and label (catches truncated files and unknown ids at build time);
            otherwise only headers are read, labels that need converting excepted, and decoding errors surface,
            still naming the file, when the sample is used.
        skip_bad_samples: Leave bad samples out (counted and reported) instead of raising.
        max_pixels: Refuse files whose header claims more pixels than this (decompression bombs).
    """

    label_mapping: LabelMapping
    num_labels: int
    verify_images: bool = True
    skip_bad_samples: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS

    def read_row(self, sample: SampleFiles) -> dict:
        """Check one sample and return its dataset row; raise `BadSampleError` if it is unusable."""
        header = read_image_header(sample.image_path, max_pixels=self.max_pixels)
        image: dict = {"path": sample.image_path, "bytes": None}
        if header.mode in SIXTEEN_BIT_MODES:
            # datasets' own RGB conversion would clip 16-bit values; store our 8-bit conversion instead.
            buffer = io.BytesIO()
            load_image(sample.image_path, max_pixels=self.max_pixels).save(buffer, format="PNG", compress_level=1)
            image = {"path": os.path.basename(sample.image_path), "bytes": buffer.getvalue()}
        elif self.verify_images:
            load_image(sample.image_path, max_pixels=self.max_pixels)
        label: dict = {"path": sample.label_path, "bytes": None}
        if sample.stored_ids == "train_ids" and not self.verify_images:
            # Used as-is and decoded later anyway: its values are checked then, by `load_label`.
            label_size = read_label_header(sample.label_path, max_pixels=self.max_pixels).size
        else:
            mapping = (self.label_mapping if sample.stored_ids == "dataset_ids"
                       else LabelMapping.identity(self.num_labels))
            label_array = load_label(sample.label_path, mapping, max_pixels=self.max_pixels)
            label_size = (label_array.shape[1], label_array.shape[0])
            if not mapping.is_identity:
                label = {"path": f"{sample.sample_id}_labelTrainIds.png", "bytes": encode_label_png(label_array)}
        check_same_size(header.size, label_size, sample.image_path, sample.label_path)
        return {"image": image, "label": label, "id": sample.sample_id}


def _generate_rows(shards: list[list[SampleFiles]], reader: SampleReader, context: str,
                   signature: tuple = ()) -> Iterator[dict]:
    """Rows of the given shards; `signature` (sizes and times of the files) only makes the map-style cache key."""
    skipped = SkippedSamples(context)
    total = 0
    for shard in shards:
        for sample in shard:
            total += 1
            try:
                row = reader.read_row(sample)
            except BadSampleError as error:
                if not reader.skip_bad_samples:
                    raise
                skipped.add(error)
                continue
            yield row
    skipped.report(total)


def files_signature(samples: Sequence[SampleFiles]) -> tuple:
    """Size and modification time of every file: changes whenever a file is replaced, so caches get rebuilt."""
    signature = []
    for sample in samples:
        for path in (sample.image_path, sample.label_path):
            try:
                stat = os.stat(path)
                signature.append((path, stat.st_size, stat.st_mtime_ns))
            except OSError:
                signature.append((path, -1, -1))
    return tuple(signature)


def split_into_shards(samples: Sequence[SampleFiles], num_shards: int | None) -> list[list[SampleFiles]]:
    """Contiguous, near-equal shards (streaming reads, shuffles and splits the dataset by shard)."""
    if num_shards is None:
        num_shards = min(len(samples), 64)
    if not 1 <= num_shards <= max(1, len(samples)):
        raise ValueError(f"num_shards must be between 1 and the number of samples ({len(samples)}), got {num_shards}")
    bounds = np.linspace(0, len(samples), num_shards + 1).round().astype(int)
    return [list(samples[start:end]) for start, end in zip(bounds[:-1], bounds[1:])]


@dataclass
class LoaderOptions:
    """How a dataset is read from its files (shared by every layout's loader).

    Args:
        skip_bad_samples: Leave out (count and report) bad samples instead of raising an error naming the file.
        verify_images: Map-style only: decode every image and label once at build time, so truncated files and
            unknown label ids are caught then. Streaming datasets read headers (format, size, mode, pixel limit) and
            convert the labels that need it; images and as-is labels are decoded, and checked, where they are used
            (`SegmentationTrainingStream`, `load_sample`), with the same errors naming the file.
        max_pixels: Refuse images whose header claims more pixels than this (decompression bombs).
        num_shards: Streaming only: number of shards (default min(#samples, 64)); a multiple of world size x
            dataloader workers lets every rank and worker read its own files.
        cache_dir: `datasets` cache of the map-style dataset (rebuilt whenever a file changes).
        num_proc: Map-style only: processes that read the files while building.
    """

    skip_bad_samples: bool = False
    verify_images: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    num_shards: int | None = None
    cache_dir: str | os.PathLike | None = None
    num_proc: int | None = None


def _processes_for(num_proc: int | None, num_samples: int, context: str) -> int | None:
    """`LoaderOptions.num_proc`, lowered (with a warning) to the number of samples, as `datasets` does for shards."""
    if num_proc is None:
        return None
    if num_proc < 1:
        raise ValueError(f"{context}: LoaderOptions.num_proc must be >= 1 or None, got {num_proc}")
    if num_proc > num_samples:
        # every process reads one shard of at least one sample: extra processes would have nothing to read
        logger.warning("%s: num_proc=%d is more than the %d sample(s); building with num_proc=%d", context, num_proc,
                       num_samples, num_samples)
        return num_samples
    return num_proc


def build_dataset(
    samples: Sequence[SampleFiles],
    label_mapping: LabelMapping,
    num_labels: int,
    options: LoaderOptions,
    *,
    name: str,
    split: str,
    streaming: bool = False,
    skipped_at_discovery: SkippedSamples | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Build a map-style `datasets.Dataset` or a streaming `datasets.IterableDataset` from sample files.

    Args:
        samples: The files, in a deterministic order.
        label_mapping: Converts ``"dataset_ids"`` label files to training ids.
        num_labels: Number of training classes.
        options: Checks, bad-sample policy, shards and cache.
        name: Dataset name for messages (e.g. ``"Cityscapes"``).
        split: Split name stored in the dataset info.
        streaming: Return an `IterableDataset` that reads files lazily; else an Arrow-backed `Dataset`, built once
            and cached.
        skipped_at_discovery: Samples the layout scan already left out (e.g. missing labels), reported here.
    """
    context = f"{name} {split}"
    if skipped_at_discovery is not None:
        skipped_at_discovery.report(len(samples) + len(skipped_at_discovery))
    if not samples:
        raise ValueError(f"{context}: no usable samples (every sample was bad; see the messages above)")
    split_name = datasets.NamedSplit(split)
    # Streaming decodes (and checks) each image once, where it is used, rather than twice.
    reader = SampleReader(label_mapping, num_labels, options.verify_images and not streaming, options.skip_bad_samples,
                          options.max_pixels)
    if streaming:
        return datasets.IterableDataset.from_generator(
            _generate_rows, features=SEGMENTATION_FEATURES, split=split_name,
            gen_kwargs={"shards": split_into_shards(samples, options.num_shards), "reader": reader, "context": context},
        )
    num_proc = _processes_for(options.num_proc, len(samples), context)
    try:
        dataset = datasets.Dataset.from_generator(
            _generate_rows, features=SEGMENTATION_FEATURES, split=split_name,
            cache_dir=os.fspath(options.cache_dir) if options.cache_dir else None, num_proc=num_proc,
            # One shard per process: each generator call reads its files and reports its skipped samples once.
            gen_kwargs={"shards": split_into_shards(samples, num_proc or 1), "reader": reader,
                        "context": context, "signature": files_signature(samples)},
        )
    except DatasetGenerationError as error:
        if isinstance(error.__cause__, BadSampleError):
            raise error.__cause__ from None
        raise
    if len(dataset) < len(samples):
        logger.warning("%s: %d of %d samples were left out as bad (skip_bad_samples=True) when this dataset was built",
                       context, len(samples) - len(dataset), len(samples))
    return dataset
