"""Odd and broken inputs: every file of shared/data/odd_inputs, and broken samples inside a dataset layout.

Each bad input gives an error naming the file(s) with what was expected and found; with ``skip_bad_samples`` the
sample is left out, counted and reported at the end of the pass, never dropped silently.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import hf_cache, synthetic_cityscapes  # noqa: F401
from PIL import Image

from hms_segmentation.data import (
    BadSampleError,
    CityscapesOptions,
    SegmentationTrainingDataset,
    SegmentationTrainingStream,
    SegmentationTrainTransform,
    TrainAugmentationOptions,
    cityscapes_label_mapping,
    load_cityscapes,
    load_image,
    load_label,
    load_sample,
    read_image_header,
    sample_generator,
)

@pytest.fixture(scope="module")
def odd_inputs(shared_data_dir) -> Path:
    return shared_data_dir / "odd_inputs"


@pytest.mark.parametrize("name", ["rgb_ok.png", "grayscale.png", "rgba.png", "palette.png", "cmyk.jpg"])
def test_every_image_mode_is_read_as_rgb(odd_inputs, name):
    image = load_image(odd_inputs / name)
    assert image.mode == "RGB" and image.size == (160, 96)


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits(odd_inputs):
    stored = np.array(Image.open(odd_inputs / "gray16.png")).astype(np.int64)
    image = np.array(load_image(odd_inputs / "gray16.png"))
    assert image.dtype == np.uint8 and image.shape == (96, 160, 3)
    np.testing.assert_array_equal(image[..., 0], stored >> 8)  # the full range, not clipped at 255


def test_exif_orientation_is_applied_and_the_label_must_match_the_shown_size(odd_inputs, tmp_path):
    assert read_image_header(odd_inputs / "exif_orientation6.jpg").size == (96, 160)
    assert load_image(odd_inputs / "exif_orientation6.jpg").size == (96, 160)
    shown = tmp_path / "shown_labelIds.png"
    Image.new("L", (96, 160), 7).save(shown)
    image, label = load_sample(odd_inputs / "exif_orientation6.jpg", shown, cityscapes_label_mapping())
    assert label.shape == (160, 96) and image.size == (96, 160)
    stored = tmp_path / "stored_labelIds.png"
    Image.new("L", (160, 96), 7).save(stored)
    with pytest.raises(BadSampleError, match=r"is 96x160 .* but its label .*stored_labelIds\.png is 160x96"):
        load_sample(odd_inputs / "exif_orientation6.jpg", stored)


@pytest.mark.parametrize("name, size", [("tiny_3x5.png", (5, 3)), ("one_row_1x4000.png", (4000, 1))])
def test_degenerate_sizes_are_padded_to_the_crop(odd_inputs, name, size):
    image = load_image(odd_inputs / name)
    assert image.size == size
    label = np.zeros((size[1], size[0]), np.uint8)
    transform = SegmentationTrainTransform(TrainAugmentationOptions(crop_size=(32, 48)))
    sample = transform(image, label, sample_generator(0, 0, 0))
    assert sample["pixel_values"].shape == (3, 32, 48) and sample["labels"].shape == (32, 48)
    assert (sample["labels"] == 255).float().mean() > 0.5  # mostly padding, all ignored


@pytest.mark.parametrize("name", ["truncated.png", "truncated.jpg"])
def test_truncated_file_names_the_file(odd_inputs, name):
    with pytest.raises(BadSampleError, match=rf"{name}: the file is truncated or corrupt"):
        load_image(odd_inputs / name)


@pytest.mark.parametrize("name, found", [("not_an_image.png", "no image decoder recognises"),
                                         ("empty.png", "empty file")])
def test_non_image_file_names_the_file(odd_inputs, name, found):
    with pytest.raises(BadSampleError, match=rf"{name}: expected an image file.*{found}"):
        load_image(odd_inputs / name)


def test_decompression_bomb_is_refused_before_decoding(odd_inputs):
    start = time.perf_counter()
    with pytest.raises(BadSampleError, match=r"bomb_40000x40000\.png: refused to decode"):
        load_image(odd_inputs / "bomb_40000x40000.png")
    with pytest.raises(BadSampleError, match=r"bomb_40000x40000\.png: refused"):
        read_image_header(odd_inputs / "bomb_40000x40000.png")
    assert time.perf_counter() - start < 1.0  # nothing was decoded (1.6 gigapixels would take far longer)
    with pytest.raises(BadSampleError, match=r"rgb_ok\.png: refused to decode a 160x96 image .* max_pixels=1,000"):
        load_image(odd_inputs / "rgb_ok.png", max_pixels=1000)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(BadSampleError, match=r"nowhere\.png: file not found"):
        load_image(tmp_path / "nowhere.png")


def test_good_label_is_read_and_mapped(odd_inputs):
    label = load_label(odd_inputs / "label_ok_labelIds.png", cityscapes_label_mapping())
    assert label.shape == (96, 160) and set(np.unique(label)) <= set(range(19)) | {255}
    image, _ = load_sample(odd_inputs / "rgb_ok.png", odd_inputs / "label_ok_labelIds.png")
    assert image.size == (160, 96)


def test_label_size_mismatch_names_both_files_and_sizes(odd_inputs):
    with pytest.raises(BadSampleError) as error:
        load_sample(odd_inputs / "rgb_ok.png", odd_inputs / "label_size_mismatch_labelIds.png")
    message = str(error.value)
    assert "rgb_ok.png is 160x96" in message and "label_size_mismatch_labelIds.png is 160x90" in message
    assert "expected the same size" in message


def test_unknown_label_id_names_the_file_and_the_id(odd_inputs):
    with pytest.raises(BadSampleError, match=r"label_unknown_ids_labelIds\.png: expected Cityscapes labelIds "
                                             r"\(known values 0-33\), found unknown value\(s\) \[200\]"):
        load_label(odd_inputs / "label_unknown_ids_labelIds.png", cityscapes_label_mapping())


def test_rgb_label_is_refused_as_not_single_channel(odd_inputs):
    with pytest.raises(BadSampleError, match=r"label_rgb_instead_of_gray_labelIds\.png: expected a single-channel "
                                             r"label map .* found mode RGB with 3 channel"):
        load_label(odd_inputs / "label_rgb_instead_of_gray_labelIds.png")


def test_sixteen_bit_label_with_large_values_is_refused(tmp_path):
    path = tmp_path / "instanceIds.png"
    Image.fromarray(np.full((4, 4), 26001, np.uint16)).save(path)
    with pytest.raises(BadSampleError, match=r"instanceIds\.png: expected an 8-bit label map, found 16-bit values"):
        load_label(path)


# --- Broken samples inside a Cityscapes layout ------------------------------------------------------------------------

BROKEN = {  # file id -> (image file, label file) from odd_inputs, or None for "no label file"
    "broken_000000_000019": ("truncated.png", "label_ok_labelIds.png"),
    "broken_000001_000019": ("rgb_ok.png", "label_size_mismatch_labelIds.png"),
    "broken_000002_000019": ("rgb_ok.png", "label_unknown_ids_labelIds.png"),
    "broken_000003_000019": ("rgb_ok.png", "label_rgb_instead_of_gray_labelIds.png"),
    "broken_000004_000019": ("not_an_image.png", "label_ok_labelIds.png"),
    "broken_000005_000019": ("bomb_40000x40000.png", "label_ok_labelIds.png"),
    "broken_000006_000019": ("rgb_ok.png", None),
    "broken_000007_000019": ("gray16.png", "label_ok_labelIds.png"),  # fine: converted
    "broken_000008_000019": ("rgb_ok.png", "label_ok_labelIds.png"),  # fine
}


@pytest.fixture
def broken_cityscapes(odd_inputs, tmp_path) -> Path:
    """A val split of 9 frames in city 'broken', 6 of them bad in different ways."""
    image_dir, label_dir = tmp_path / "leftImg8bit/val/broken", tmp_path / "gtFine/val/broken"
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    for file_id, (image_name, label_name) in BROKEN.items():
        shutil.copy(odd_inputs / image_name, image_dir / f"{file_id}_leftImg8bit.png")
        if label_name is not None:
            shutil.copy(odd_inputs / label_name, label_dir / f"{file_id}_gtFine_labelIds.png")
    return tmp_path


def test_missing_label_names_the_image_and_the_expected_file(broken_cityscapes, hf_cache):
    with pytest.raises(BadSampleError, match=r"broken_000006_000019_leftImg8bit\.png has no label: expected "
                                             r"broken_000006_000019_gtFine_label\{TrainIds,Ids\}\.png"):
        load_cityscapes(broken_cityscapes, "val", options=CityscapesOptions(cache_dir=hf_cache))


def test_first_bad_sample_raises_naming_its_file(broken_cityscapes, hf_cache):
    (broken_cityscapes / "leftImg8bit/val/broken/broken_000006_000019_leftImg8bit.png").unlink()
    with pytest.raises(BadSampleError, match=r"broken_000000_000019_leftImg8bit\.png: the file is truncated"):
        load_cityscapes(broken_cityscapes, "val", options=CityscapesOptions(cache_dir=hf_cache))


def test_skip_bad_samples_leaves_them_out_and_reports_the_count(broken_cityscapes, hf_cache, caplog):
    with caplog.at_level(logging.WARNING):
        dataset = load_cityscapes(broken_cityscapes, "val",
                                  options=CityscapesOptions(skip_bad_samples=True, cache_dir=hf_cache))
    assert sorted(dataset["id"][:]) == ["broken_000007_000019", "broken_000008_000019"]
    report = caplog.text
    assert "skipped 1 bad sample(s) of 9" in report and "broken_000006_000019_leftImg8bit.png has no label" in report
    assert "skipped 6 bad sample(s) of 8" in report
    for reason in ("truncated", "160x90", "[200]", "single-channel", "no image decoder", "refused to decode"):
        assert reason in report
    gray16 = np.array(dataset[0]["image"])
    assert gray16.dtype == np.uint8 and gray16.max() > 200  # the 16-bit image was converted, not clipped


def test_streaming_reports_skipped_samples_at_the_end_of_each_epoch(broken_cityscapes, caplog):
    (broken_cityscapes / "leftImg8bit/val/broken/broken_000006_000019_leftImg8bit.png").unlink()
    stream = load_cityscapes(broken_cityscapes, "val", streaming=True,
                             options=CityscapesOptions(skip_bad_samples=True, num_shards=2))
    training = SegmentationTrainingStream(stream, SegmentationTrainTransform(TrainAugmentationOptions(crop_size=32)),
                                          num_labels=19, skip_bad_samples=True)
    for epoch in range(2):
        training.set_epoch(epoch)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            samples = list(training)
        assert len(samples) == 2
        # The stream checks headers and labels as it reads files; the truncated PNG has a sound header and is caught
        # when the training stream decodes it. Both report at the end of the epoch.
        reports: dict[str, int] = {}  # context -> skipped count, summed over the shards' reports
        for record in caplog.records:
            if "skipped" in record.message:
                context = record.message.split(":")[0]
                reports[context] = reports.get(context, 0) + int(record.message.split("skipped ")[1].split(" ")[0])
        assert reports == {"Cityscapes val": 5, f"training stream, epoch {epoch}": 1}
        assert "broken_000000_000019_leftImg8bit.png: the file is truncated" in caplog.text


def test_truncated_image_met_during_training_is_skipped_and_counted(synthetic_cityscapes, odd_inputs, tmp_path,
                                                                   caplog):
    """Streaming reads only headers when building: a JPEG cut in half is found when decoded for training."""
    root = tmp_path / "cityscapes"
    shutil.copytree(synthetic_cityscapes, root)
    victim = next((root / "leftImg8bit/val").glob("*/*_leftImg8bit.png"))
    cut = Image.open(odd_inputs / "truncated.jpg")
    shutil.copy(odd_inputs / "truncated.jpg", victim)
    label = victim.parent.parent.parent.parent / "gtFine/val" / victim.parent.name / victim.name.replace(
        "_leftImg8bit.png", "_gtFine_labelTrainIds.png")
    Image.new("L", cut.size, 0).save(label)
    stream = load_cityscapes(root, "val", streaming=True, options=CityscapesOptions(num_shards=1))
    transform = SegmentationTrainTransform(TrainAugmentationOptions(crop_size=32))
    with pytest.raises(BadSampleError, match=rf"{victim.name}: the file is truncated"):
        list(SegmentationTrainingStream(stream, transform, num_labels=19))
    with caplog.at_level(logging.WARNING):
        samples = list(SegmentationTrainingStream(stream, transform, num_labels=19, skip_bad_samples=True))
    assert len(samples) == 3 and "skipped 1 bad sample(s) of 4" in caplog.text and victim.name in caplog.text

    mapped = load_cityscapes(root, "val", options=CityscapesOptions(verify_images=False, cache_dir=tmp_path / "c"))
    training = SegmentationTrainingDataset(mapped, transform, num_labels=19, skip_bad_samples=True)
    with caplog.at_level(logging.WARNING):
        batch = [training[index] for index in range(len(training))]
    assert len(batch) == 4 and training.skipped == 1 and all(isinstance(s["labels"], torch.Tensor) for s in batch)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        training.set_epoch(1)  # closes epoch 0
    assert "epoch 0: skipped 1 bad sample(s) of 4" in caplog.text and training.skipped == 0
