"""Hub-style parquet shards: writing local copies (also in place), loading them (map-style and streaming), column
mapping; and `num_proc` of the map-style builder behind the loaders."""

from __future__ import annotations

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from data_fixtures import SYNTHETIC_TRAIN, hf_cache, synthetic_cityscapes  # noqa: F401
from PIL import Image

from hms_segmentation.data import (
    CityscapesOptions,
    ColumnMapping,
    LoaderOptions,
    SegmentationTrainingStream,
    SegmentationTrainTransform,
    TrainAugmentationOptions,
    load_cityscapes,
    load_hub_dataset,
    load_mapillary,
    split_stream_for_rank,
    write_parquet_shards,
)
from hms_segmentation.data.hub import RAW_IMAGE_FEATURES
from hms_segmentation.data.synthesize import SyntheticDatasetOptions, synthesize_cityscapes


@pytest.fixture
def parquet_copy(synthetic_cityscapes, hf_cache, tmp_path):
    dataset = load_cityscapes(synthetic_cityscapes, "train", options=CityscapesOptions(cache_dir=hf_cache))
    write_parquet_shards(dataset, tmp_path / "parquet", split="train", num_shards=4)
    return tmp_path / "parquet", dataset


def test_shards_follow_hub_naming_and_embed_the_files(parquet_copy):
    folder, original = parquet_copy
    shards = sorted((folder / "data").glob("*.parquet"))
    assert [shard.name for shard in shards] == [f"train-{index:05d}-of-00004.parquet" for index in range(4)]
    table = pq.read_table(shards[0])
    assert table.num_rows == SYNTHETIC_TRAIN // 4
    first = table.column("image")[0].as_py()
    assert first["bytes"][:8] == b"\x89PNG\r\n\x1a\n" and "/" not in first["path"]  # no local paths inside


@pytest.mark.parametrize("streaming", [False, True])
def test_loaders_accept_parquet_shards_with_the_same_rows(parquet_copy, streaming, hf_cache):
    folder, original = parquet_copy
    loaded = load_cityscapes(folder, "train", streaming=streaming, options=CityscapesOptions(cache_dir=hf_cache))
    assert isinstance(loaded, datasets.IterableDataset if streaming else datasets.Dataset)
    rows = {row["id"]: row for row in loaded}
    assert sorted(rows) == sorted(original["id"])
    for row in original.select(range(3)):
        np.testing.assert_array_equal(np.array(rows[row["id"]]["label"]), np.array(row["label"]))
        np.testing.assert_array_equal(np.array(rows[row["id"]]["image"]), np.array(row["image"]))
    if streaming:
        assert loaded.num_shards == 4


def test_parquet_stream_trains_on_two_ranks(parquet_copy):
    folder, _ = parquet_copy
    stream = load_hub_dataset(str(folder / "data" / "train-*.parquet"), "train", streaming=True)
    transform = SegmentationTrainTransform(TrainAugmentationOptions(crop_size=16))
    counts = [len(list(SegmentationTrainingStream(split_stream_for_rank(stream, rank, 2), transform, num_labels=19)))
              for rank in (0, 1)]
    assert counts == [SYNTHETIC_TRAIN // 2] * 2


def test_column_mapping_renames_and_numbers_rows(tmp_path):
    images = [Image.new("RGB", (8, 4), (value, 0, 0)) for value in (10, 20, 30)]
    labels = [Image.new("L", (8, 4), value) for value in (0, 1, 255)]
    foreign = datasets.Dataset.from_dict({"picture": images, "semantic_map": labels, "extra": [1, 2, 3]},
                                         features=datasets.Features({"picture": datasets.Image(),
                                                                     "semantic_map": datasets.Image(),
                                                                     "extra": datasets.Value("int32")}))
    (tmp_path / "foreign").mkdir()
    foreign.to_parquet(tmp_path / "foreign" / "train-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"expected columns \['id', 'image', 'label'\].*found \['picture', "
                                         r"'semantic_map', 'extra'\]"):
        load_hub_dataset(tmp_path / "foreign", "train")
    loaded = load_hub_dataset(tmp_path / "foreign", "train", column_mapping=ColumnMapping(
        image="picture", label="semantic_map", id=None), cache_dir=tmp_path / "cache")
    assert loaded.column_names == ["image", "label", "id"] and loaded["id"][:] == [f"train_{i:06d}" for i in range(3)]
    assert np.array(loaded[2]["label"]).max() == 255 and loaded[1]["image"].getpixel((0, 0)) == (20, 0, 0)


def test_streaming_dataset_can_be_written_round_robin(synthetic_cityscapes, tmp_path):
    stream = load_cityscapes(synthetic_cityscapes, "val", streaming=True)
    paths = write_parquet_shards(stream, tmp_path / "out", split="validation", num_shards=2)
    assert [pq.read_table(path).num_rows for path in paths] == [2, 2]


def test_mapillary_loader_accepts_parquet_shards(shared_data_dir, tmp_path):
    original = load_mapillary(shared_data_dir / "mapillary_sample_crop100", "training",
                              options=LoaderOptions(cache_dir=tmp_path / "cache"))
    write_parquet_shards(original, tmp_path / "vistas", split="training", num_shards=1)
    loaded = load_mapillary(tmp_path / "vistas", "training", options=LoaderOptions(cache_dir=tmp_path / "cache"))
    np.testing.assert_array_equal(np.array(loaded[0]["label"]), np.array(original[0]["label"]))


def test_a_folder_without_layout_or_parquet_is_explained(tmp_path):
    with pytest.raises(ValueError, match="expected a dataset folder in its official layout or parquet shards"):
        load_cityscapes(tmp_path, "train")


@pytest.mark.parametrize("streaming", [False, True])
def test_a_split_loads_only_its_own_shards_or_its_hub_alias(synthetic_cityscapes, hf_cache, tmp_path, streaming):
    train = load_cityscapes(synthetic_cityscapes, "train", options=CityscapesOptions(cache_dir=hf_cache))
    val = load_cityscapes(synthetic_cityscapes, "val", options=CityscapesOptions(cache_dir=hf_cache))
    write_parquet_shards(train, tmp_path / "both", split="train", num_shards=2)
    write_parquet_shards(val, tmp_path / "both", split="validation", num_shards=1)
    options = CityscapesOptions(cache_dir=hf_cache)
    loaded = load_cityscapes(tmp_path / "both", "val", streaming=streaming, options=options)  # Hub name: validation
    assert sorted(row["id"] for row in loaded) == sorted(val["id"])
    with pytest.raises(ValueError, match=r"expected parquet shards of split 'test'.*found shards of split\(s\) "
                                         r"\['train', 'validation'\] only"):
        load_cityscapes(tmp_path / "both", "test", streaming=streaming, options=options)


def test_a_refused_write_keeps_the_earlier_shards(synthetic_cityscapes, hf_cache, tmp_path):
    val = load_cityscapes(synthetic_cityscapes, "val", options=CityscapesOptions(cache_dir=hf_cache))
    paths = write_parquet_shards(val, tmp_path / "out", split="validation", num_shards=2)
    with pytest.raises(ValueError, match=r"num_shards \(99\) must not exceed the number of rows"):
        write_parquet_shards(val, tmp_path / "out", split="validation", num_shards=99)
    assert all(path.is_file() for path in paths)


def test_a_missing_local_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path / 'typo'} not found: expected a dataset folder"):
        load_cityscapes(tmp_path / "typo", "val")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'typo'} not found"):
        load_mapillary(tmp_path / "typo", "validation")


def _file_bytes(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.parquet"))}


def test_shards_can_be_rewritten_in_place_from_a_stream_of_themselves(parquet_copy, hf_cache):
    folder, original = parquet_copy
    other_split = folder / "data" / "validation-00000-of-00001.parquet"
    other_split.write_bytes(b"another split: never touched")
    stream = load_cityscapes(folder, "train", streaming=True, options=CityscapesOptions(cache_dir=hf_cache))
    paths = write_parquet_shards(stream, folder, split="train", num_shards=2)
    assert sorted(path.name for path in (folder / "data").glob("train-*.parquet")) == [
        "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"] == [path.name for path in paths]
    assert other_split.read_bytes() == b"another split: never touched"
    assert sorted(entry.name for entry in folder.iterdir()) == ["data"]  # no staging folder left behind
    reloaded = load_hub_dataset(str(folder / "data" / "train-*.parquet"), "train", cache_dir=hf_cache)
    rows = {row["id"]: row for row in reloaded}
    assert sorted(rows) == sorted(original["id"])
    for row in original.select(range(3)):
        np.testing.assert_array_equal(np.array(rows[row["id"]]["label"]), np.array(row["label"]))


def test_an_error_while_writing_keeps_the_earlier_shards(parquet_copy, tmp_path):
    folder, original = parquet_copy
    before = _file_bytes(folder / "data")
    raw = original.cast(RAW_IMAGE_FEATURES)

    def rows_then_a_missing_file():
        yield from (raw[index] for index in range(3))
        yield {"image": {"path": str(tmp_path / "missing.png"), "bytes": None}, "label": raw[3]["label"], "id": "x"}

    broken = datasets.IterableDataset.from_generator(rows_then_a_missing_file, features=RAW_IMAGE_FEATURES)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        write_parquet_shards(broken, folder, split="train", num_shards=2, rows_per_group=1)
    assert _file_bytes(folder / "data") == before
    assert sorted(entry.name for entry in folder.iterdir()) == ["data"]


def test_more_processes_than_samples_are_lowered_with_a_warning(tmp_path, caplog):
    root = synthesize_cityscapes(SyntheticDatasetOptions(output_dir=tmp_path / "one", num_train=1, num_val=0,
                                                         height=32, width=64, num_workers=1))
    options = CityscapesOptions(num_proc=2, cache_dir=tmp_path / "cache")
    with caplog.at_level("WARNING", logger="hms_segmentation.data.builder"):
        dataset = load_cityscapes(root, "train", options=options)
    assert len(dataset) == 1
    assert "num_proc=2 is more than the 1 sample(s); building with num_proc=1" in caplog.text
    with pytest.raises(ValueError, match=r"LoaderOptions.num_proc must be >= 1 or None, got 0"):
        load_cityscapes(root, "train", options=CityscapesOptions(num_proc=0, cache_dir=tmp_path / "cache"))


def test_a_hub_dataset_is_found_under_its_split_alias(parquet_copy, hf_cache, monkeypatch):
    """A Hub id goes to datasets.load_dataset, whose repo may name Mapillary's `training` split `train` (and the other
    way round): the loader tries the alias. A local folder in Hub layout stands in for the Hub repository here."""
    from hms_segmentation.data import hub as hub_module

    folder, dataset = parquet_copy  # data/train-NNNNN-of-00004.parquet, as on the Hub
    monkeypatch.setattr(hub_module, "_parquet_files", lambda source, split: None)  # as for a Hub id
    loaded = load_hub_dataset(folder, "training", cache_dir=hf_cache)  # what load_mapillary asks for
    assert sorted(loaded["id"]) == sorted(dataset["id"])
    with pytest.raises(ValueError, match='Unknown split "test"'):  # no alias: datasets' own error, naming the splits
        load_hub_dataset(folder, "test", cache_dir=hf_cache)
