"""Cityscapes from its official layout: map-style and streaming datasets, trainIds, coarse and auto labels."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from data_fixtures import SYNTHETIC_TRAIN, SYNTHETIC_VAL, hf_cache, synthetic_cityscapes  # noqa: F401
from PIL import Image

from hms_segmentation.data import (
    BadSampleError,
    CityscapesOptions,
    cityscapes_label_mapping,
    find_cityscapes_samples,
    load_cityscapes,
)
from hms_segmentation.label_tables import cityscapes_label_id_to_train_id

SAMPLE_ID = "frankfurt_000000_000294"


def _copy_layout(source: Path, target: Path, skip_suffix: str | None = None) -> Path:
    """Copy a Cityscapes folder (small test sets only), optionally leaving out files ending in `skip_suffix`."""
    shutil.copytree(source, target, ignore=(lambda _, names: [n for n in names if n.endswith(skip_suffix)])
                    if skip_suffix else None)
    for marker in target.glob("*.json"):
        marker.unlink()
    return target


def test_map_style_dataset_has_image_label_and_id_columns(synthetic_cityscapes, hf_cache):
    dataset = load_cityscapes(synthetic_cityscapes, "train", options=CityscapesOptions(cache_dir=hf_cache))
    assert isinstance(dataset, datasets.Dataset) and len(dataset) == SYNTHETIC_TRAIN
    assert isinstance(dataset.features["image"], datasets.Image) and isinstance(dataset.features["label"],
                                                                                  datasets.Image)
    row = dataset[0]
    assert row["image"].mode == "RGB" and row["label"].size == row["image"].size
    assert row["id"].endswith("_000019") and "_leftImg8bit" not in row["id"]
    assert set(np.unique(np.array(row["label"]))) <= set(range(19)) | {255}


def test_streaming_dataset_gives_the_same_rows(synthetic_cityscapes, hf_cache):
    stream = load_cityscapes(synthetic_cityscapes, "val", streaming=True, options=CityscapesOptions(num_shards=2))
    mapped = load_cityscapes(synthetic_cityscapes, "val", options=CityscapesOptions(cache_dir=hf_cache))
    assert isinstance(stream, datasets.IterableDataset) and stream.num_shards == 2
    streamed = list(stream)
    assert [row["id"] for row in streamed] == mapped["id"][:] and len(streamed) == SYNTHETIC_VAL
    np.testing.assert_array_equal(np.array(streamed[1]["label"]), np.array(mapped[1]["label"]))


def test_label_ids_are_mapped_to_train_ids_with_the_label_table(shared_data_dir, tmp_path, hf_cache):
    """Without *_labelTrainIds.png, the real sample's labelIds go through the table of label_tables.py."""
    root = _copy_layout(shared_data_dir / "cityscapes_sample", tmp_path / "cityscapes", "_labelTrainIds.png")
    dataset = load_cityscapes(root, "val", options=CityscapesOptions(cache_dir=hf_cache))
    label_ids = np.array(Image.open(root / "gtFine/val/frankfurt" / f"{SAMPLE_ID}_gtFine_labelIds.png"))
    table = np.zeros(256, np.uint8)
    for label_id, train_id in cityscapes_label_id_to_train_id().items():
        table[label_id] = train_id
    assert dataset[0]["id"] == SAMPLE_ID
    np.testing.assert_array_equal(np.array(dataset[0]["label"]), table[label_ids])
    # mmseg resized the shipped trainIds separately: 77 pixels differ (see shared/data/README.md).
    shipped = np.array(Image.open(shared_data_dir / "cityscapes_sample/gtFine/val/frankfurt" /
                                  f"{SAMPLE_ID}_gtFine_labelTrainIds.png"))
    assert np.count_nonzero(np.array(dataset[0]["label"]) != shipped) == 77


def test_existing_label_train_ids_are_used_as_is(shared_data_dir, hf_cache):
    samples, _ = find_cityscapes_samples(shared_data_dir / "cityscapes_sample", "val")
    assert samples[0].label_path.endswith("_gtFine_labelTrainIds.png") and samples[0].stored_ids == "train_ids"
    dataset = load_cityscapes(shared_data_dir / "cityscapes_sample", "val",
                              options=CityscapesOptions(cache_dir=hf_cache))
    shipped = Image.open(samples[0].label_path)
    np.testing.assert_array_equal(np.array(dataset[0]["label"]), np.array(shipped))
    assert dataset[0]["image"].size == (256, 128)


def _add_train_extra(root: Path, frames: int, auto_labelled: int) -> None:
    """train_extra frames with gtCoarse labelIds, the first `auto_labelled` also with a gtAuto trainIds label."""
    for index in range(frames):
        file_id = f"extracity_{index:06d}_000019"
        image_dir, coarse_dir = root / "leftImg8bit/train_extra/extracity", root / "gtCoarse/train_extra/extracity"
        image_dir.mkdir(parents=True, exist_ok=True)
        coarse_dir.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 16), (90, 90, 90)).save(image_dir / f"{file_id}_leftImg8bit.png")
        Image.new("L", (32, 16), 7).save(coarse_dir / f"{file_id}_gtCoarse_labelIds.png")  # 7 = road -> trainId 0
        if index < auto_labelled:
            Image.new("L", (32, 16), 13).save(coarse_dir / f"{file_id}_gtAuto_labelTrainIds.png")  # car


def test_coarse_and_auto_labels_are_mixed_into_train(synthetic_cityscapes, tmp_path, hf_cache):
    root = _copy_layout(synthetic_cityscapes, tmp_path / "cityscapes")
    _add_train_extra(root, frames=3, auto_labelled=1)

    def label_values(options: CityscapesOptions) -> dict[str, set[int]]:
        dataset = load_cityscapes(root, "train", options=options)
        return {row["id"]: set(np.unique(np.array(row["label"])).tolist()) for row in dataset
                if row["id"].startswith("extracity")}

    assert label_values(CityscapesOptions(cache_dir=hf_cache)) == {}
    assert label_values(CityscapesOptions(include_coarse=True, cache_dir=hf_cache)) == {
        f"extracity_{index:06d}_000019": {0} for index in range(3)}
    assert label_values(CityscapesOptions(include_auto_labels=True, cache_dir=hf_cache)) == {
        "extracity_000000_000019": {13}}
    mixed = label_values(CityscapesOptions(include_coarse=True, include_auto_labels=True, cache_dir=hf_cache))
    assert mixed == {"extracity_000000_000019": {13}, "extracity_000001_000019": {0}, "extracity_000002_000019": {0}}
    assert len(load_cityscapes(root, "train", options=CityscapesOptions(include_coarse=True, cache_dir=hf_cache))) == (
        SYNTHETIC_TRAIN + 3)


def test_coarse_labels_only_go_into_train(synthetic_cityscapes):
    with pytest.raises(ValueError, match="only be mixed into the train split"):
        find_cityscapes_samples(synthetic_cityscapes, "val", CityscapesOptions(include_coarse=True))


def test_unknown_split_and_missing_layout_are_explained(synthetic_cityscapes, tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        find_cityscapes_samples(synthetic_cityscapes, "training")
    with pytest.raises(ValueError, match="train_extra not found"):
        find_cityscapes_samples(synthetic_cityscapes, "train", CityscapesOptions(include_coarse=True))
    (tmp_path / "leftImg8bit" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds no images: expected files .*_leftImg8bit\.png"):
        load_cityscapes(tmp_path, "train")


def test_map_style_cache_is_rebuilt_when_a_label_file_changes(synthetic_cityscapes, tmp_path, hf_cache):
    # Only labelIds: the converted trainIds are stored in the cached Arrow table, not read from the file later.
    root = _copy_layout(synthetic_cityscapes, tmp_path / "cityscapes", "_labelTrainIds.png")
    first = load_cityscapes(root, "val", options=CityscapesOptions(cache_dir=hf_cache))
    label_path = Path(find_cityscapes_samples(root, "val")[0][0].label_path)
    Image.new("L", Image.open(label_path).size, 23).save(label_path)  # all sky: labelId 23, trainId 10
    os.utime(label_path, ns=(1, 1))  # a different modification time, whatever the clock resolution
    second = load_cityscapes(root, "val", options=CityscapesOptions(cache_dir=hf_cache))
    assert set(np.unique(np.array(first[0]["label"]))) != {10}
    assert set(np.unique(np.array(second[0]["label"]))) == {10}


def test_label_mapping_comes_from_the_label_table():
    mapping = cityscapes_label_mapping()
    assert mapping.train_ids[7] == 0 and mapping.train_ids[26] == 13 and mapping.train_ids[0] == 255
    assert mapping.train_ids[34] == -1  # not a Cityscapes labelId
    with pytest.raises(BadSampleError, match="unknown value"):
        mapping.apply(np.array([[7, 34]], np.uint8), "x.png")
