"""Class-uniform sampling: class centroids, their disk cache, and rare classes seen far more often in crops."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
from data_fixtures import hf_cache, synthetic_cityscapes  # noqa: F401
from PIL import Image

from hms_segmentation.data import (
    CityscapesOptions,
    ClassCentroidIndex,
    ClassUniformOptions,
    SegmentationTrainingDataset,
    SegmentationTrainingStream,
    SegmentationTrainTransform,
    TrainAugmentationOptions,
    class_uniform_centroids,
    load_cityscapes,
)
from hms_segmentation.data import class_uniform as class_uniform_module

NUM_LABELS = 19
CROP = TrainAugmentationOptions(crop_size=(8, 8), scale_min=1.0, scale_max=1.5)  # small: random crops rarely hit


def test_centroids_lie_on_their_class_once_per_tile():
    label = np.full((40, 60), 255, np.uint8)
    label[:, :30] = 0
    label[5:35, 40] = 5  # a thin pole
    ring = np.zeros((40, 60), bool)  # an L-shaped region: its centre of mass is not on it
    ring[30:40, 30:60] = ring[0:40, 55:60] = True
    label[ring] = 8
    centroids = class_uniform_centroids(label, NUM_LABELS, tile_size=20)
    for class_id, points in centroids.items():
        assert all(label[y, x] == class_id for x, y in points)
    assert len(centroids[0]) == 4  # 2x2 tiles over the left half
    assert 255 not in centroids
    assert len(class_uniform_centroids(label, NUM_LABELS, tile_size=1024)[5]) == 1  # border tiles are kept


@pytest.fixture
def train_set(synthetic_cityscapes, hf_cache):
    return load_cityscapes(synthetic_cityscapes, "train", options=CityscapesOptions(cache_dir=hf_cache))


def test_centroids_are_cached_with_a_version_key(train_set, tmp_path, monkeypatch):
    options = ClassUniformOptions(tile_size=32, cache_dir=tmp_path / "centroids")
    built = ClassCentroidIndex.build(train_set, NUM_LABELS, options)
    (cache_file,) = (tmp_path / "centroids").glob("class_uniform_centroids_*.json")
    cached = json.loads(cache_file.read_text())
    assert cached["version"] == class_uniform_module.CENTROIDS_VERSION and cached["tile_size"] == 32

    def fail(*args, **kwargs):
        raise AssertionError("centroids recomputed although cached")

    monkeypatch.setattr(class_uniform_module, "class_uniform_centroids", fail)
    loaded = ClassCentroidIndex.build(train_set, NUM_LABELS, options)
    assert loaded.centroids == built.centroids and loaded.images_per_class == built.images_per_class


def test_centroid_cache_is_rebuilt_when_a_label_changes(synthetic_cityscapes, tmp_path):
    root = tmp_path / "cityscapes"
    shutil.copytree(synthetic_cityscapes, root)
    options = ClassUniformOptions(tile_size=32, cache_dir=tmp_path / "centroids")
    dataset = load_cityscapes(root, "val", options=CityscapesOptions(cache_dir=tmp_path / "hf"))
    before = ClassCentroidIndex.build(dataset, NUM_LABELS, options)
    label_path = next(root.glob("gtFine/val/*/*_labelTrainIds.png"))
    Image.new("L", Image.open(label_path).size, 10).save(label_path)
    os.utime(label_path, ns=(1, 1))
    dataset = load_cityscapes(root, "val", options=CityscapesOptions(cache_dir=tmp_path / "hf"))
    after = ClassCentroidIndex.build(dataset, NUM_LABELS, options)
    changed_id = label_path.name.replace("_gtFine_labelTrainIds.png", "")
    assert set(after.centroids[changed_id]) == {10} != set(before.centroids[changed_id])
    assert len(list((tmp_path / "centroids").glob("*.json"))) == 2


def _rare_classes(dataset, count: int = 3) -> list[int]:
    """The classes with the fewest pixels in the dataset (traffic lights, signs, fences...)."""
    pixels = sum(np.bincount(np.array(row["label"]).ravel(), minlength=256) for row in dataset)[:NUM_LABELS]
    present = np.flatnonzero(pixels)
    return present[np.argsort(pixels[present])[:count]].tolist()


def _share_of_crops_with(samples, classes: list[int]) -> float:
    return float(np.mean([[class_id in sample["labels"] for class_id in classes] for sample in samples]))


def test_rare_classes_appear_far_more_often_than_with_random_crops(train_set):
    index = ClassCentroidIndex.build(train_set, NUM_LABELS, ClassUniformOptions(tile_size=32))
    rare = _rare_classes(train_set)
    transform = SegmentationTrainTransform(CROP)
    shares = {}
    for fraction in (0.0, 0.5, 1.0):
        dataset = SegmentationTrainingDataset(train_set, transform, num_labels=NUM_LABELS, class_centroids=index,
                                              class_uniform_fraction=fraction)
        samples = []
        for epoch in range(16):
            dataset.set_epoch(epoch)
            samples += [dataset[position] for position in range(len(dataset))]
        shares[fraction] = _share_of_crops_with(samples, rare)
    assert shares[1.0] > 2.5 * shares[0.0] and shares[0.0] < shares[0.5] < shares[1.0], shares


def test_streaming_class_uniform_crops_favour_rare_classes(synthetic_cityscapes, train_set):
    index = ClassCentroidIndex.build(train_set, NUM_LABELS, ClassUniformOptions(tile_size=32))
    rare = _rare_classes(train_set)
    stream = load_cityscapes(synthetic_cityscapes, "train", streaming=True, options=CityscapesOptions(num_shards=4))
    shares = {}
    for fraction in (0.0, 1.0):
        training = SegmentationTrainingStream(stream, SegmentationTrainTransform(CROP), num_labels=NUM_LABELS,
                                              class_centroids=index, class_uniform_fraction=fraction)
        samples = []
        for epoch in range(6):
            training.set_epoch(epoch)
            samples += list(training)
        shares[fraction] = _share_of_crops_with(samples, rare)
    assert shares[1.0] > 2.5 * shares[0.0], shares


def test_epoch_plan_mixes_random_and_class_uniform_crops(train_set):
    index = ClassCentroidIndex.build(train_set, NUM_LABELS, ClassUniformOptions(tile_size=32))
    ids = list(train_set["id"])
    plan = index.plan_epoch(ids, 0.5, np.random.default_rng(0))
    assert len(plan) == len(ids)
    assert sum(centroid is not None for _, centroid in plan) == len(ids) // 2
    random_rows = [row for row, centroid in plan if centroid is None]
    assert len(set(random_rows)) == len(random_rows)  # the random half has no repeats
    assert plan != index.plan_epoch(ids, 0.5, np.random.default_rng(1))


def test_epoch_plan_gives_every_class_an_equal_share_of_distinct_centroids(train_set):
    """As the reference's build_epoch: int(N * fraction / C) crops per class (the remainder one each to some
    classes, so that a dataset smaller than its class count still gets class-uniform crops), each class's centroids
    taken without replacement until all are used."""
    from collections import Counter

    index = ClassCentroidIndex.build(train_set, NUM_LABELS, ClassUniformOptions(tile_size=32))
    ids = list(train_set["id"])
    classes = sorted(class_id for class_id, entries in index.by_class.items() if entries)
    owner = {(ids.index(sample_id), tuple(point)): class_id
             for class_id, entries in index.by_class.items() for sample_id, point in entries}
    for seed in range(3):
        plan = index.plan_epoch(ids, 1.0, np.random.default_rng(seed))
        uniform = [(row, tuple(centroid)) for row, centroid in plan if centroid is not None]
        assert len(uniform) == len(ids)
        per_class = Counter(owner[row, centroid] for row, centroid in uniform)
        shares = [per_class.get(class_id, 0) for class_id in classes]  # 12 crops, 15 classes: 0 or 1 each
        assert set(per_class) <= set(classes) and max(shares) - min(shares) <= 1
        for class_id in classes:
            drawn = Counter((row, centroid) for row, centroid in uniform if owner[row, centroid] == class_id)
            available = len({(row, centroid) for (row, centroid), owned in owner.items() if owned == class_id})
            # a shuffled cycle: no centroid repeats before every one of its class is used
            assert len(drawn) == min(per_class[class_id], available)
            assert max(drawn.values(), default=0) <= -(-per_class[class_id] // available)


def test_rows_beyond_epoch_rows_give_only_their_restricted_centroids(train_set):
    """The reference's coarse boost: the last rows only add centroids of some classes; the epoch is the first rows."""
    index = ClassCentroidIndex.build(train_set, NUM_LABELS, ClassUniformOptions(tile_size=32))
    ids = list(train_set["id"])
    extra, kept = ids[4:], {1}
    restricted = index.restricted(extra, kept)
    assert all(set(restricted.centroids[sample_id]) <= kept for sample_id in extra)
    assert all(restricted.centroids[sample_id] == index.centroids[sample_id] for sample_id in ids[:4])
    plan = restricted.plan_epoch(ids, 0.5, np.random.default_rng(0), epoch_rows=4)
    assert len(plan) == 4 and sum(centroid is None for _, centroid in plan) == 2
    assert all(row < 4 for row, centroid in plan if centroid is None)
    assert restricted.plan_epoch(ids, 0.5, np.random.default_rng(0)) != plan  # default: every row, one step each
    draws = [entry for seed in range(40) for entry in restricted.plan_epoch(ids, 1.0, np.random.default_rng(seed), 4)]
    extra_draws = [(row, centroid) for row, centroid in draws if row >= 4]
    assert extra_draws and all(centroid in index.centroids[ids[row]][1] for row, centroid in extra_draws)
    with pytest.raises(ValueError, match=rf"epoch_rows must be in \[0, {len(ids)}\]"):
        restricted.plan_epoch(ids, 0.5, np.random.default_rng(0), epoch_rows=len(ids) + 1)


def test_an_unreadable_centroid_cache_is_rebuilt_not_fatal(train_set, tmp_path, caplog):
    options = ClassUniformOptions(tile_size=32, cache_dir=tmp_path / "centroids")
    built = ClassCentroidIndex.build(train_set, NUM_LABELS, options)
    (cache_file,) = (tmp_path / "centroids").glob("class_uniform_centroids_*.json")
    cache_file.write_text(cache_file.read_text()[:100])  # cut short (a full disk, a copy interrupted)
    with caplog.at_level(logging.WARNING):
        rebuilt = ClassCentroidIndex.build(train_set, NUM_LABELS, options)
    assert rebuilt.centroids == built.centroids and "is unreadable" in caplog.text
    assert json.loads(cache_file.read_text())["version"] == class_uniform_module.CENTROIDS_VERSION
    assert [path.name for path in (tmp_path / "centroids").iterdir()] == [cache_file.name]  # no temporary left


@pytest.mark.parametrize("persistent", [False, True], ids=["workers", "persistent_workers"])
def test_each_epoch_reaches_dataloader_workers_with_its_plan_and_augmentation(train_set, persistent):
    """Persistent workers keep the dataset copy they started with: the epoch set afterwards must still reach them."""
    import torch

    centroids = ClassCentroidIndex.build(train_set, NUM_LABELS)
    dataset = SegmentationTrainingDataset(train_set, SegmentationTrainTransform(CROP), num_labels=NUM_LABELS, seed=3,
                                          class_centroids=centroids, class_uniform_fraction=1.0)

    def epoch_samples(loader_or_dataset) -> list[bytes]:
        return [sample["pixel_values"].numpy().tobytes() + sample["labels"].numpy().tobytes()
                for sample in loader_or_dataset]

    expected = []
    for epoch in range(3):  # in this process, no workers
        dataset.set_epoch(epoch)
        expected.append(epoch_samples(dataset[index] for index in range(len(dataset))))
    assert expected[0] != expected[1] != expected[2]
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1, persistent_workers=persistent)
    for epoch in range(3):
        dataset.set_epoch(epoch)  # as the Trainer / accelerate do, before iterating the epoch
        assert epoch_samples(loader) == expected[epoch]


@pytest.mark.parametrize("fraction", [1.5, -0.5])
def test_epoch_plan_refuses_a_fraction_outside_zero_to_one(fraction):
    """1.5 used to give a plan of 20 steps for 10 rows (the dataset's length stayed 10), -0.5 one without any
    class-uniform crop, both silently."""
    index = ClassCentroidIndex({f"frame{i}": {i % 3: [(1, 1)]} for i in range(10)}, NUM_LABELS)
    ids = [f"frame{i}" for i in range(10)]
    with pytest.raises(ValueError, match=rf"fraction \(the class-uniform share of the crops\) must be in \[0, 1\], "
                                         rf"got {fraction}"):
        index.plan_epoch(ids, fraction, np.random.default_rng(0))
    assert len(index.plan_epoch(ids, 1.0, np.random.default_rng(0))) == 10
