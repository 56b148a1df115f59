"""Training datasets for `torch.utils.data.DataLoader` / `transformers.Trainer`: read, augment, sample.

- `SegmentationTrainingDataset` wraps a map-style `datasets.Dataset` (random access; class-uniform epoch plans).
- `SegmentationTrainingStream` wraps a streaming `datasets.IterableDataset` (each DataLoader worker reads its own
  shards; class-uniform crops chosen per image).
- `ConsecutiveEpochs` chains a stream's epochs into one iteration, so that a resumed run finds its place in it.
- `split_stream_for_rank` gives every distributed rank a disjoint part of a stream, reshuffled each epoch.

Both yield ``{"pixel_values": (3, H, W) float32, "labels": (H, W) int64}``, or, with
``TrainAugmentationOptions(output_dtype="uint8")``, uint8 crops and labels (plus a ``color_jitter`` plan) to be
colour-jittered and normalised on the device (see `hms_segmentation.data.transforms.normalize_pixel_values`). Images
are read with `hms_segmentation.data.io` (EXIF, modes, errors naming the file). With ``skip_bad_samples=True`` a sample that fails to read is skipped, logged with its
file name, and counted; a stream reports its count at the end of each epoch.
Call ``set_epoch(epoch)`` before each epoch: it reseeds the augmentation, the class-uniform plan and the stream shuffle.
"""

from __future__ import annotations

import collections
import logging
import zlib
from collections.abc import Iterator
from typing import TypeVar

import datasets
import numpy as np
import torch
from PIL import Image
from datasets.distributed import split_dataset_by_node

from .builder import SkippedSamples
from .class_uniform import ClassCentroidIndex
from .io import DEFAULT_MAX_PIXELS, BadSampleError, LabelMapping, load_sample
from .transforms import SegmentationTrainTransform, sample_generator

logger = logging.getLogger(__name__)

DatasetOrStream = TypeVar("DatasetOrStream", datasets.Dataset, datasets.IterableDataset)


def _undecoded(dataset: DatasetOrStream) -> DatasetOrStream:
    """The same rows with images as ``{"path", "bytes"}``: our reader decodes them (once, with our checks)."""
    for column in ("image", "label"):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


class _AugmentedRows:
    """What both training datasets share: undecoded rows, reading with our checks, and the augmentation settings.

    Args:
        dataset: Rows with ``image``, ``label`` (training ids) and ``id``, e.g. from `load_cityscapes`.
        transform: The training augmentation.
        num_labels: Number of classes; label values must be below it or 255.
        seed: Seed of the augmentation (and of the class-uniform plans).
        class_centroids: Enables class-uniform crops (see `ClassCentroidIndex.build`).
        class_uniform_fraction: Fraction of crops centred on a class centroid.
        skip_bad_samples: Skip (log and count) samples that fail to read instead of raising.
        max_pixels: Refuse files whose header claims more pixels than this.
    """

    def __init__(
        self,
        dataset: datasets.Dataset | datasets.IterableDataset,
        transform: SegmentationTrainTransform,
        *,
        num_labels: int,
        seed: int = 0,
        class_centroids: ClassCentroidIndex | None = None,
        class_uniform_fraction: float = 0.5,
        skip_bad_samples: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.rows = _undecoded(dataset)
        self.transform = transform
        self.label_mapping = LabelMapping.identity(num_labels)
        self.seed = seed
        self.class_centroids = class_centroids
        self.class_uniform_fraction = class_uniform_fraction
        self.skip_bad_samples = skip_bad_samples
        self.max_pixels = max_pixels
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        raise NotImplementedError

    def _read(self, row: dict) -> tuple[Image.Image, np.ndarray]:
        return load_sample(row["image"], row["label"], self.label_mapping, max_pixels=self.max_pixels)


class SegmentationTrainingDataset(_AugmentedRows, torch.utils.data.Dataset):
    """Augmented training samples from a map-style dataset (arguments: see `_AugmentedRows`, plus the two below).

    With class centroids, each epoch follows a plan of random and class-uniform crops (see
    `ClassCentroidIndex.plan_epoch`). With ``skip_bad_samples``, a row that fails to read is logged, counted in
    `skipped` and replaced by the next row, so batches keep their size.

    Args:
        centroid_rows_from: Rows from this index on are only reached through class-uniform crops, and an epoch has
            one sample per row before it (the reference's record recipe: auto-labelled frames after the fine ones,
            their centroids restricted to some classes with `ClassCentroidIndex.restricted`). `None`: every row is
            an ordinary sample.
        centroid_rows_epochs: With `centroid_rows_from`: the epochs (counted from 0) that use those rows' centroids;
            later epochs leave them out (the reference's ``max_cu_epoch``, 150 of 175). `None`: every epoch.
    """

    skipped = 0  # bad samples met in this process during the current epoch

    def __init__(
        self,
        dataset: datasets.Dataset,
        transform: SegmentationTrainTransform,
        *,
        centroid_rows_from: int | None = None,
        centroid_rows_epochs: int | None = None,
        **options,
    ):
        if centroid_rows_from is not None and not 0 < centroid_rows_from <= len(dataset):
            raise ValueError(f"centroid_rows_from must be in [1, {len(dataset)}] (the number of rows), got "
                             f"{centroid_rows_from}")
        if centroid_rows_epochs is not None and centroid_rows_epochs < 0:
            raise ValueError(f"centroid_rows_epochs must be >= 0, got {centroid_rows_epochs}")
        self.centroid_rows_from = centroid_rows_from
        self.centroid_rows_epochs = centroid_rows_epochs
        # in shared memory: DataLoader workers, persistent ones too, keep the copy of the dataset they started with,
        # and read the epoch that the main process sets from here (as `datasets` shares a stream's epoch)
        self._shared_epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._plan_epoch: int | None = None
        super().__init__(dataset, transform, **options)

    @property
    def epoch(self) -> int:
        return int(self._shared_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Reseed augmentation and redraw the class-uniform plan (the reference rebuilds it every epoch), in this
        process and in its DataLoader workers (each redraws the same plan when it next reads a sample).

        Also closes the previous epoch: its count of skipped samples is reported (for samples read in this
        process; DataLoader workers log each skip as it happens).
        """
        if self.skipped:
            logger.warning("epoch %d: skipped %d bad sample(s) of %d (skip_bad_samples=True); see the warnings above",
                           self.epoch, self.skipped, len(self))
        self._shared_epoch.fill_(epoch)
        self.skipped = 0
        self._plan_for(epoch)

    def _plan_for(self, epoch: int) -> list[tuple[int, tuple[int, int] | None]] | None:
        """The class-uniform plan of `epoch` (`None` without class-uniform sampling), drawn once per process."""
        if self._plan_epoch != epoch:
            self.plan: list[tuple[int, tuple[int, int] | None]] | None = None
            if self.class_centroids is not None and self.class_uniform_fraction > 0:
                sample_ids = list(self.rows["id"])
                if self.centroid_rows_epochs is not None and epoch >= self.centroid_rows_epochs:
                    sample_ids = sample_ids[: self.centroid_rows_from]  # the centroid-only rows are done
                self.plan = self.class_centroids.plan_epoch(sample_ids, self.class_uniform_fraction,
                                                            np.random.default_rng([self.seed, epoch, 2**31]),
                                                            epoch_rows=self.centroid_rows_from)
            self._plan_epoch = epoch
        return self.plan

    def __len__(self) -> int:
        return len(self.rows) if self.centroid_rows_from is None else self.centroid_rows_from

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        epoch = self.epoch
        plan = self._plan_for(epoch)
        row_index, centroid = plan[index] if plan is not None else (index, None)
        for attempt in range(len(self.rows)):
            row = self.rows[(row_index + attempt) % len(self.rows)]
            try:
                image, label = self._read(row)
            except BadSampleError as error:
                if not self.skip_bad_samples:
                    raise
                self.skipped += 1
                logger.warning("skipped bad sample %s (epoch %d, %d skipped so far in this process): %s", row["id"],
                               epoch, self.skipped, error)
                centroid = None  # the centroid belonged to the bad image
                continue
            return self.transform(image, label, sample_generator(self.seed, epoch, index), centroid)
        raise ValueError(f"every one of the {len(self.rows)} samples failed to read; see the warnings above")


class SegmentationTrainingStream(_AugmentedRows, torch.utils.data.IterableDataset):
    """Augmented training samples from a streaming dataset (arguments: see `_AugmentedRows`).

    In a DataLoader, each worker reads its own shards of the stream (so give it at least as many shards as workers).
    Crops are seeded by sample id, so they do not depend on the number of workers; a frame the stream repeats within
    an epoch (fine frames mixed with more auto-labelled ones) gets another crop each time. With class centroids, a
    crop is centred on a class centroid with probability `class_uniform_fraction` (see
    `ClassCentroidIndex.choose_centroid`).
    With ``skip_bad_samples``, bad samples are skipped and their count is reported at the end of each epoch.
    """

    def set_epoch(self, epoch: int) -> None:
        """Reseed the stream's shuffle (shards and buffer) and the augmentation; shared with persistent workers."""
        self.rows.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.rows.epoch
        worker = torch.utils.data.get_worker_info()
        where = f", dataloader worker {worker.id}" if worker else ""
        skipped = SkippedSamples(f"training stream, epoch {epoch}{where}")
        seen = 0
        repeats: collections.Counter[str] = collections.Counter()
        for row in self.rows:
            seen += 1
            # Seeded by the sample id, not its position: the same crops whatever the number of workers.
            rng = sample_generator(self.seed, epoch, zlib.crc32(row["id"].encode()), repeats[row["id"]])
            repeats[row["id"]] += 1
            try:
                image, label = self._read(row)
            except BadSampleError as error:
                if not self.skip_bad_samples:
                    raise
                skipped.add(error)
                continue
            centroid = None
            if self.class_centroids is not None and rng.random() < self.class_uniform_fraction:
                centroid = self.class_centroids.choose_centroid(row["id"], rng)
            yield self.transform(image, label, rng, centroid)
        skipped.report(seen)


class ConsecutiveEpochs(torch.utils.data.IterableDataset):
    """Epochs ``first_epoch``, ``first_epoch + 1``, ... of a `SegmentationTrainingStream`, one after another in a single
    iteration that ends only when an epoch yields nothing (the training loop stops at its step count).

    A stream's length is unknown, so a run resuming at step N can only find its place by skipping N batches from the
    start of one iteration (what the Trainer, and the Accelerate script, do). With the epochs chained here, those N
    batches end exactly where the interrupted run stopped, in the right epoch with its shuffle and augmentation seeds;
    with one iteration per epoch, the skip would run out at the end of epoch 0 and the resumed run would read epochs
    it had already trained on. A batch may span two epochs, so no epoch ends on an incomplete batch.
    """

    def __init__(self, stream: SegmentationTrainingStream):
        self.stream = stream
        self.first_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration starts with."""
        self.first_epoch = epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.first_epoch
        while True:
            self.stream.set_epoch(epoch)
            produced = False
            for sample in self.stream:
                produced = True
                yield sample
            if not produced:  # nothing to read (e.g. a DataLoader worker without shards, every sample bad)
                return
            epoch += 1


def split_stream_for_rank(
    dataset: datasets.IterableDataset,
    rank: int,
    world_size: int,
    *,
    seed: int = 0,
    shuffle_buffer_size: int = 64,
    shuffle_input_shards: int = 1,
) -> datasets.IterableDataset:
    """Shuffle a stream and keep the part of one distributed rank.

    Ranks read disjoint shards whose union is the whole epoch. The shard order and the buffer shuffle use
    ``seed + epoch``: call ``set_epoch(epoch)`` (on the result, or on the `SegmentationTrainingStream` wrapping it)
    every epoch.

    Args:
        dataset: The whole stream (identical on every rank).
        rank: This process's rank.
        world_size: Number of ranks.
        seed: Shuffle seed, the same on every rank.
        shuffle_buffer_size: Samples held in the shuffle buffer (decoded lazily, so this is cheap).
        shuffle_input_shards: Shards read at once to fill the buffer. More mixes better, but `datasets` then reads
            them in threads and, for parquet shards, waits 5 s whenever an epoch's iterator closes.

    Raises:
        ValueError: The number of shards is not a multiple of `world_size` (every rank would then read every file
            and throw most of it away); rebuild with ``num_shards`` a multiple of the world size.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if dataset.num_shards % world_size:
        raise ValueError(f"the stream has {dataset.num_shards} shards, not a multiple of world_size={world_size}: "
                         "build it with num_shards a multiple of the world size (e.g. CityscapesOptions(num_shards=...)"
                         " or write_parquet_shards(..., num_shards=...))")
    shuffled = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size, max_buffer_input_shards=shuffle_input_shards)
    return split_dataset_by_node(shuffled, rank=rank, world_size=world_size)
