"""Distributed streaming: every rank reads a disjoint part of each epoch, reshuffled per epoch; DataLoader workers."""

from __future__ import annotations

import pytest
import torch
from data_fixtures import SYNTHETIC_TRAIN, synthetic_cityscapes  # noqa: F401

from hms_segmentation.data import (
    CityscapesOptions,
    SegmentationTrainingStream,
    SegmentationTrainTransform,
    TrainAugmentationOptions,
    load_cityscapes,
    split_stream_for_rank,
)


def _epoch_ids(stream, epoch: int) -> list[str]:
    ids = stream.select_columns(["id"])  # a derived stream starts at epoch 0: set the epoch on it
    ids.set_epoch(epoch)
    return [row["id"] for row in ids]


def test_two_ranks_read_disjoint_parts_whose_union_is_the_epoch(synthetic_cityscapes):
    stream = load_cityscapes(synthetic_cityscapes, "train", streaming=True, options=CityscapesOptions(num_shards=4))
    everything = sorted(_epoch_ids(stream, 0))
    ranks = [split_stream_for_rank(stream, rank, 2, seed=13, shuffle_buffer_size=4) for rank in range(2)]
    orders = []
    for epoch in range(3):
        first, second = (_epoch_ids(rank, epoch) for rank in ranks)
        assert not set(first) & set(second)
        assert sorted(first + second) == everything and len(everything) == SYNTHETIC_TRAIN
        assert len(first) == len(second) == SYNTHETIC_TRAIN // 2
        orders.append(first + second)
    assert orders[0] != orders[1] != orders[2]  # the shuffle is reseeded every epoch
    again = [_epoch_ids(split_stream_for_rank(stream, rank, 2, seed=13, shuffle_buffer_size=4), 1) for rank in (0, 1)]
    assert again[0] + again[1] == orders[1]  # ... deterministically


def test_shards_must_divide_among_ranks(synthetic_cityscapes):
    stream = load_cityscapes(synthetic_cityscapes, "train", streaming=True, options=CityscapesOptions(num_shards=3))
    with pytest.raises(ValueError, match="3 shards, not a multiple of world_size=2"):
        split_stream_for_rank(stream, 0, 2)
    with pytest.raises(ValueError, match="rank must be in"):
        split_stream_for_rank(stream, 2, 2)


def test_dataloader_workers_each_read_their_own_shards(synthetic_cityscapes):
    """2 ranks x 2 workers: every frame of the epoch is augmented exactly once, as without workers."""
    stream = load_cityscapes(synthetic_cityscapes, "train", streaming=True, options=CityscapesOptions(num_shards=4))
    transform = SegmentationTrainTransform(TrainAugmentationOptions(crop_size=(16, 32)))

    def fingerprints(num_workers: int) -> list[float]:
        values = []
        for rank in range(2):
            training = SegmentationTrainingStream(split_stream_for_rank(stream, rank, 2, seed=0), transform,
                                                  num_labels=19, seed=5)
            training.set_epoch(1)
            loader = torch.utils.data.DataLoader(training, batch_size=None, num_workers=num_workers)
            values += [round(float(sample["pixel_values"].sum()), 2) for sample in loader]
        return sorted(values)

    without_workers = fingerprints(0)
    assert len(without_workers) == SYNTHETIC_TRAIN and len(set(without_workers)) == SYNTHETIC_TRAIN
    assert fingerprints(2) == without_workers  # crops are seeded by sample id, not by position or worker


def test_a_frame_repeated_within_a_streamed_epoch_gets_another_crop_each_time(synthetic_cityscapes):
    """Fine frames mixed with more auto-labelled ones repeat within an epoch: each repeat is a new augmentation."""
    import datasets

    stream = load_cityscapes(synthetic_cityscapes, "train", streaming=True, options=CityscapesOptions(num_shards=1))
    twice = datasets.concatenate_datasets([stream, stream])
    transform = SegmentationTrainTransform(TrainAugmentationOptions(crop_size=(16, 32)))
    training = SegmentationTrainingStream(twice, transform, num_labels=19, seed=5)
    training.set_epoch(0)
    samples = [sample["pixel_values"].numpy().tobytes() for sample in training]
    assert len(samples) == 2 * SYNTHETIC_TRAIN and len(set(samples)) == 2 * SYNTHETIC_TRAIN
    once = SegmentationTrainingStream(stream, transform, num_labels=19, seed=5)
    once.set_epoch(0)
    assert [sample["pixel_values"].numpy().tobytes() for sample in once] == samples[:SYNTHETIC_TRAIN]  # first meetings


def test_the_streamed_training_set_is_shuffled_anew_every_epoch(tmp_path):
    from hms_segmentation.training.arguments import DataArguments
    from hms_segmentation.training.datasets import build_datasets

    def epoch_orders(seed: int, **options) -> list[list[str]]:
        args = DataArguments(data_dir=str(tmp_path / "data"), synthetic_train_frames=8, synthetic_val_frames=1,
                             synthetic_height=32, synthetic_width=64, streaming=True, crop_size=16,
                             class_uniform_fraction=0.0, **options)
        stream = build_datasets(args, seed=seed, do_eval=False).train.stream
        orders = []
        for epoch in range(3):
            stream.set_epoch(epoch)
            orders.append([row["id"] for row in stream.rows])
        return orders

    orders = epoch_orders(seed=0)
    listed = sorted(orders[0])  # the files are listed city by city, frame by frame
    assert all(sorted(order) == listed and len(order) == 8 for order in orders)
    assert orders[0] != listed and orders[0] != orders[1] != orders[2]
    assert epoch_orders(seed=0) == orders and epoch_orders(seed=1) != orders  # seeded by the training seed
    assert epoch_orders(seed=0, shuffle_buffer_size=1)[0] != orders[0]  # (1: the shard order alone)
    with pytest.raises(ValueError, match="--shuffle_buffer_size must be at least 1"):
        DataArguments(shuffle_buffer_size=0)
