"""Mapillary Vistas from its official layouts: v1.2 / v2.0 labels, config files or the built-in v1.2 table."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from data_fixtures import hf_cache  # noqa: F401
from PIL import Image

from hms_segmentation.data import BadSampleError, LoaderOptions, load_mapillary, mapillary_label_set
from hms_segmentation.label_tables import MAPILLARY_V12_ID2LABEL, MAPILLARY_V12_LABELS

KEY = "__CRyFzoDOXn6unQ6a3DnQ"


def _link_release(shared: Path, target: Path, version: str, v12_release: bool = False) -> Path:
    """Mirror a sample with symlinks (never copies of the research data): v2.0 release layout, or the v1.2 one."""
    images = target / "training/images"
    labels = target / ("training/labels" if v12_release else f"training/{version}/labels")
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    (images / f"{KEY}.jpg").symlink_to(shared / "training/images" / f"{KEY}.jpg")
    (labels / f"{KEY}.png").symlink_to(shared / f"training/{version}/labels" / f"{KEY}.png")
    return target


def test_builtin_v12_table_gives_65_classes_for_the_model_config():
    label_set = mapillary_label_set(None, "v1.2")
    assert len(label_set.labels) == 66 and len(label_set.train_labels) == 65
    assert label_set.id2label == MAPILLARY_V12_ID2LABEL and label_set.id2label[13] == "Road"
    assert label_set.label2id["Road"] == 13 and len(label_set.palette) == 65
    mapping = label_set.label_mapping()
    assert mapping.train_ids[65] == 255 and mapping.train_ids[64] == 64 and mapping.train_ids[66] == -1


def test_v12_labels_of_the_real_sample(shared_data_dir, hf_cache):
    dataset = load_mapillary(shared_data_dir / "mapillary_sample_crop100", "training",
                             options=LoaderOptions(cache_dir=hf_cache))
    row = dataset[0]
    assert row["id"] == KEY and row["image"].size == (100, 100) and row["image"].mode == "RGB"
    assert set(np.unique(np.array(row["label"])).tolist()) == {17, 44, 45}  # building, street light, pole
    assert isinstance(dataset.features["label"], datasets.Image)


def test_full_size_sample_maps_unlabeled_to_ignore(shared_data_dir):
    stream = load_mapillary(shared_data_dir / "mapillary_sample", "train", streaming=True)
    label = np.array(next(iter(stream))["label"])
    assert label.shape == (2988, 3984)
    # README: values 3,13,17,19,23,24,27,30,32,35,44,45,47,49,50,55,61,65; 65 = void--unlabeled -> 255.
    assert set(np.unique(label).tolist()) == {3, 13, 17, 19, 23, 24, 27, 30, 32, 35, 44, 45, 47, 49, 50, 55, 61, 255}


def test_v12_release_layout_reads_its_own_config(shared_data_dir, tmp_path, hf_cache):
    root = _link_release(shared_data_dir / "mapillary_sample_crop100", tmp_path / "vistas", "v1.2", v12_release=True)
    labels = [{"name": label.name, "readable": label.readable, "color": list(label.color),
               "instances": label.has_instances, "evaluate": label.evaluate} for label in MAPILLARY_V12_LABELS]
    labels[45]["evaluate"] = False  # this copy does not evaluate poles
    (root / "config.json").write_text(json.dumps({"labels": labels, "version": "1.2"}))
    label_set = mapillary_label_set(root, "v1.2")
    assert label_set.source.endswith("config.json") and len(label_set.id2label) == 64
    dataset = load_mapillary(root, "training", options=LoaderOptions(cache_dir=hf_cache))
    assert set(np.unique(np.array(dataset[0]["label"])).tolist()) == {17, 44, 255}


def test_v20_needs_its_config_file(shared_data_dir, tmp_path, hf_cache):
    root = _link_release(shared_data_dir / "mapillary_sample_crop100", tmp_path / "vistas", "v2.0")
    with pytest.raises(ValueError, match=r"expected config_v2\.0\.json .* no built-in v2\.0 label table"):
        load_mapillary(root, "training", version="v2.0")
    # A stand-in config from the third-party v2.0 transcription (names and colours), the last class not evaluated.
    transcription = json.loads((shared_data_dir / "label_tables/mapillary_v2.0_labels_mmseg.json").read_text())
    labels = [{"name": entry["readable"], "readable": entry["readable"], "color": entry["color"],
               "evaluate": entry["readable"] != "Unlabeled"} for entry in transcription["labels"]]
    (root / "config_v2.0.json").write_text(json.dumps({"labels": labels}))
    label_set = mapillary_label_set(root, "v2.0")
    assert len(label_set.id2label) == 123
    dataset = load_mapillary(root, "training", version="v2.0", options=LoaderOptions(cache_dir=hf_cache))
    assert set(np.unique(np.array(dataset[0]["label"])).tolist()) == {27, 84, 85}


def test_missing_label_and_bad_arguments_are_explained(shared_data_dir, tmp_path):
    root = _link_release(shared_data_dir / "mapillary_sample_crop100", tmp_path / "vistas", "v1.2")
    (root / "training/images/orphan.jpg").symlink_to(shared_data_dir / "mapillary_sample_crop100/training/images" /
                                                     f"{KEY}.jpg")
    with pytest.raises(BadSampleError, match=r"orphan\.jpg has no label: expected .*v1\.2/labels/orphan\.png"):
        load_mapillary(root, "training")
    skipping = load_mapillary(root, "training", streaming=True, options=LoaderOptions(skip_bad_samples=True))
    assert [row["id"] for row in skipping] == [KEY]
    with pytest.raises(ValueError, match="split must be one of"):
        load_mapillary(root, "testing")
    with pytest.raises(ValueError, match="version must be one of"):
        mapillary_label_set(root, "v3.0")
    with pytest.raises(ValueError, match=r"validation/images not found: expected the Mapillary Vistas layout"):
        load_mapillary(root, "validation")


def test_training_data_arguments_skip_bad_mapillary_samples(shared_data_dir, tmp_path, hf_cache):
    from hms_segmentation.training.arguments import DataArguments
    from hms_segmentation.training.datasets import load_split

    root = _link_release(shared_data_dir / "mapillary_sample_crop100", tmp_path / "vistas", "v1.2")
    (root / "training/images/orphan.jpg").symlink_to(shared_data_dir / "mapillary_sample_crop100/training/images" /
                                                     f"{KEY}.jpg")
    rows, id2label, _ = load_split(DataArguments(dataset="mapillary", data_dir=str(root), skip_bad_samples=True),
                                   "train")
    assert list(rows["id"]) == [KEY] and len(id2label) == 65
    with pytest.raises(BadSampleError, match=r"orphan\.jpg has no label"):
        load_split(DataArguments(dataset="mapillary", data_dir=str(root)), "train")


def test_training_and_evaluation_arguments_choose_the_v20_labels(shared_data_dir, tmp_path, hf_cache):
    from hms_segmentation.training.arguments import DataArguments
    from hms_segmentation.training.datasets import load_split
    from hms_segmentation.training.evaluate import build_parser

    root = _link_release(shared_data_dir / "mapillary_sample_crop100", tmp_path / "vistas", "v2.0")
    transcription = json.loads((shared_data_dir / "label_tables/mapillary_v2.0_labels_mmseg.json").read_text())
    labels = [{"name": entry["readable"], "readable": entry["readable"], "color": entry["color"],
               "evaluate": entry["readable"] != "Unlabeled"} for entry in transcription["labels"]]
    (root / "config_v2.0.json").write_text(json.dumps({"labels": labels}))
    rows, id2label, poly_power = load_split(
        DataArguments(dataset="mapillary", data_dir=str(root), mapillary_version="v2.0"), "train")
    assert len(id2label) == 123 and poly_power == 1.0
    assert set(np.unique(np.array(rows[0]["label"])).tolist()) == {27, 84, 85}
    with pytest.raises(ValueError, match=r"--mapillary_version must be one of \('v1\.2', 'v2\.0'\), got 'v2'"):
        DataArguments(dataset="mapillary", data_dir=str(root), mapillary_version="v2")
    assert build_parser().parse_args(["--model", "m", "--mapillary-version", "v2.0"]).mapillary_version == "v2.0"


def test_mapillary_trains_and_evaluates_with_its_recipes_sizes(shared_data_dir, tmp_path, hf_cache):
    """train_mapillary.yml: --pre_size 2177 (training scale relative to it, and the evaluation size) and --gblur."""
    from hms_segmentation.training.arguments import DataArguments
    from hms_segmentation.training.datasets import build_datasets, build_eval_dataset

    root = _link_release(shared_data_dir / "mapillary_sample_crop100", tmp_path / "vistas", "v1.2")
    args = DataArguments(dataset="mapillary", data_dir=str(root), eval_split="train", crop_size=64)
    assert (args.pre_size, args.eval_long_side, args.blur_probability) == (2177, 2177, 1.0)
    cityscapes = DataArguments(dataset="cityscapes", data_dir=str(tmp_path))
    assert (cityscapes.pre_size, cityscapes.eval_long_side, cityscapes.blur_probability) == (0, 0, 0.0)
    options = build_datasets(args, seed=0, do_eval=False).train.transform.options
    assert (options.pre_size, options.blur_probability) == (2177, 1.0)
    image = Image.open(root / "training/images" / f"{KEY}.jpg")
    small = DataArguments(dataset="mapillary", data_dir=str(root), eval_split="train", eval_long_side=300)
    sample = build_eval_dataset(small)[0][0]
    ratio = 300 / max(image.size)
    expected = (int(image.height * ratio), int(image.width * ratio))
    assert sample["pixel_values"].shape[-2:] == expected and sample["labels"].shape == expected
    full = build_eval_dataset(DataArguments(dataset="mapillary", data_dir=str(root), eval_split="train",
                                            eval_long_side=0, pre_size=0))[0][0]
    assert full["labels"].shape == (image.height, image.width)
    with pytest.raises(ValueError, match="--pre_size must be a number of pixels"):
        DataArguments(dataset="mapillary", data_dir=str(root), pre_size=-1)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    "label, message",
    [
        ("label_size_mismatch_labelIds.png", r"is 160x96 \(width x height\) but its label .*k\.png is 160x90"),
        ("label_unknown_ids_labelIds.png", r"k\.png: expected Mapillary Vistas v1\.2 label ids .* value\(s\) \[200\]"),
        ("label_rgb_instead_of_gray_labelIds.png", r"k\.png: expected a single-channel label map .* found mode RGB"),
    ],
)
def test_odd_label_files_are_refused_naming_the_file(shared_data_dir, tmp_path, hf_cache, label, message, streaming):
    """shared/data/odd_inputs/README.md: size mismatch, unknown ids and RGB labels each get a clear error."""
    odd = shared_data_dir / "odd_inputs"
    (tmp_path / "training/images").mkdir(parents=True)
    (tmp_path / "training/v1.2/labels").mkdir(parents=True)
    (tmp_path / "training/images/k.png").symlink_to(odd / "rgb_ok.png")
    (tmp_path / "training/v1.2/labels/k.png").symlink_to(odd / label)
    with pytest.raises(BadSampleError, match=message):
        list(load_mapillary(tmp_path, "training", streaming=streaming, options=LoaderOptions(cache_dir=hf_cache)))
