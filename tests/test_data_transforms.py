"""Training augmentations (reference recipe) and evaluation preprocessing."""

from __future__ import annotations

import colorsys

import datasets
import numpy as np
import pytest
import torch
from data_fixtures import hf_cache, synthetic_cityscapes  # noqa: F401
from PIL import Image, ImageEnhance

from hms_segmentation.data import (
    CityscapesOptions,
    EvalPreprocessingOptions,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    TrainAugmentationOptions,
    load_cityscapes,
    sample_generator,
)
from hms_segmentation.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_pixel_values
from hms_segmentation.label_tables import IMAGENET_MEAN, IMAGENET_STD

NO_COLOR = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


@pytest.fixture(scope="module")
def scene() -> tuple[Image.Image, np.ndarray]:
    """A 96x160 image with smooth colour ramps and a label of a few classes (3 = a 1-pixel-wide stripe)."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:96, 0:160]
    pixels = np.stack([xs * 1.5, ys * 2.5, (xs + ys) % 256], axis=-1) + rng.normal(0, 5, (96, 160, 3))
    label = np.where(ys < 40, 10, np.where(xs < 80, 0, 1)).astype(np.uint8)
    label[:, 120] = 3
    label[90:, :10] = 255
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), label


def _denormalize(pixel_values: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((pixel_values * std + mean) * 255).permute(1, 2, 0).numpy()


def test_outputs_are_normalised_pixel_values_and_int64_labels(scene):
    sample = SegmentationTrainTransform(TrainAugmentationOptions(crop_size=(48, 64)))(*scene, sample_generator(0, 0, 0))
    assert set(sample) == {"pixel_values", "labels"}
    assert sample["pixel_values"].dtype == torch.float32 and sample["pixel_values"].shape == (3, 48, 64)
    assert sample["labels"].dtype == torch.int64 and sample["labels"].shape == (48, 64)
    assert -3 < sample["pixel_values"].min() < sample["pixel_values"].max() < 3


def test_same_seed_gives_the_same_sample_and_other_indices_differ(scene):
    transform = SegmentationTrainTransform(TrainAugmentationOptions(crop_size=48, blur_probability=0.5, noise_std=4))
    first, again = (transform(*scene, sample_generator(3, 1, 7)) for _ in range(2))
    other = transform(*scene, sample_generator(3, 1, 8))
    assert torch.equal(first["pixel_values"], again["pixel_values"]) and torch.equal(first["labels"], again["labels"])
    assert not torch.equal(first["pixel_values"], other["pixel_values"])


def test_labels_never_get_classes_that_were_not_in_the_file(scene):
    image, label = scene
    transform = SegmentationTrainTransform(TrainAugmentationOptions(crop_size=(40, 72), blur_probability=1.0,
                                                                    noise_std=10.0, noise_probability=1.0))
    allowed = set(np.unique(label).tolist()) | {255}
    for index in range(40):
        assert set(transform(image, label, sample_generator(0, 0, index))["labels"].unique().tolist()) <= allowed


@pytest.mark.parametrize("scale, resample", [(1.7, "bicubic"), (0.8, "bicubic"), (1.3, "bilinear")])
def test_scale_and_crop_resample_only_the_crop_on_a_grid_from_a_whole_source_pixel(scene, scale, resample):
    """The crop resamples only what it keeps, with PIL's filter, starting on a whole source pixel at most one pixel
    before the reference's (resize the whole image, then crop); the label is sampled on exactly that grid."""
    image, label = scene
    transform = SegmentationTrainTransform(TrainAugmentationOptions(
        crop_size=(64, 72), scale_min=scale, scale_max=scale, flip_probability=0.0, image_resample=resample, **NO_COLOR))
    sample = transform(image, label, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    rng.uniform(scale, scale)
    width, height = int(160 * scale), int(96 * scale)
    left = int(rng.integers(min(0, width - 72), max(0, width - 72) + 1))
    top = int(rng.integers(min(0, height - 64), max(0, height - 64) + 1))
    ratio_x, ratio_y = 160 / width, 96 / height
    source_left, source_top = int(np.floor(left * ratio_x)), int(np.floor(top * ratio_y))
    assert 0 <= left * ratio_x - source_left < 1 and 0 <= top * ratio_y - source_top < 1
    size = (min(72, width - left), min(64, height - top))
    box = (source_left, source_top, min(160, source_left + size[0] * ratio_x), min(96, source_top + size[1] * ratio_y))
    expected_label = np.asarray(Image.fromarray(label).resize(size, Image.Resampling.NEAREST, box=box))
    np.testing.assert_array_equal(sample["labels"].numpy()[: size[1], : size[0]], expected_label)
    pil_filter = Image.Resampling.BICUBIC if resample == "bicubic" else Image.Resampling.BILINEAR
    expected_image = np.asarray(image.resize(size, pil_filter, box=box), dtype=np.float32)
    difference = np.abs(_denormalize(sample["pixel_values"])[: size[1], : size[0]] - expected_image)
    assert difference.max() < 4.5  # PIL reads the pixels before the region, torch clamps there: first rows/columns
    assert difference[2:, 2:].max() < 2.5  # elsewhere rounding only
    assert difference.mean() < 0.5


def test_small_images_are_padded_with_ignore_labels_and_the_mean_colour(scene):
    image, label = scene
    label = np.where(label == 255, 0, label).astype(np.uint8)  # so that every 255 in the output is padding
    transform = SegmentationTrainTransform(TrainAugmentationOptions(crop_size=(128, 256), scale_min=0.5,
                                                                    scale_max=0.5, **NO_COLOR))
    sample = transform(image, label, sample_generator(0, 0, 0))
    padding = sample["labels"] == 255
    assert padding.float().mean() > 0.75  # an 80x48 image inside a 256x128 crop
    assert sample["pixel_values"][:, padding].abs().max() < 0.02  # the mean colour normalises to ~0


@pytest.mark.parametrize("output_dtype", ["float32", "uint8"])
def test_black_pad_fill_pads_as_the_reference(scene, output_dtype):
    image, label = scene
    label = np.where(label == 255, 0, label).astype(np.uint8)
    transform = SegmentationTrainTransform(TrainAugmentationOptions(
        crop_size=(128, 256), scale_min=0.5, scale_max=0.5, pad_fill="black", output_dtype=output_dtype, **NO_COLOR))
    sample = transform(image, label, sample_generator(0, 0, 0))
    padding = sample["labels"] == 255
    pixels = sample["pixel_values"][:, padding]
    if output_dtype == "uint8":
        assert pixels.max() == 0
    else:  # black, normalised: -mean / std per channel
        expected = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1)
        torch.testing.assert_close(pixels, expected.expand_as(pixels))
    assert not padding.all() and sample["pixel_values"][:, ~padding].float().std() > 0
    with pytest.raises(ValueError, match="pad_fill must be 'mean' or 'black', got 'grey'"):
        TrainAugmentationOptions(pad_fill="grey")


def test_centre_pad_placement_puts_a_small_image_where_the_references_padding_does(scene):
    """The reference's recipes pad each short side by (crop - side) // 2 + 1 and crop at random: an 80x48 image in a
    256x128 crop starts 87-89 columns and 39-41 rows in (centred, give or take a pixel); the default places it
    anywhere."""
    image, label = scene
    label = np.where(label == 255, 0, label).astype(np.uint8)

    def corners(placement: str) -> set[tuple[int, int]]:
        transform = SegmentationTrainTransform(TrainAugmentationOptions(
            crop_size=(128, 256), scale_min=0.5, scale_max=0.5, flip_probability=0.0, pad_placement=placement,
            **NO_COLOR))
        found = set()
        for index in range(40):
            rows, columns = np.nonzero((transform(image, label, sample_generator(0, index, 0))["labels"] != 255).numpy())
            found.add((int(rows.min()), int(columns.min())))
        return found

    centred = {(row, column) for row in (39, 40, 41) for column in (87, 88, 89)}
    assert corners("centre") == centred
    assert len(corners("random")) > 20 and not corners("random") <= centred
    with pytest.raises(ValueError, match="pad_placement must be 'random' or 'centre', got 'middle'"):
        TrainAugmentationOptions(pad_placement="middle")


@pytest.mark.parametrize("output_dtype", ["float32", "uint8"])
@pytest.mark.parametrize("color", [NO_COLOR, {}], ids=["no colour jitter", "colour jitter"])
def test_horizontal_flip_mirrors_image_and_label(scene, color, output_dtype):
    """Exactly: the mirroring happens in the copy into the tensor, after the (per-pixel) colour jitter."""
    image, label = scene
    options = dict(crop_size=(96, 160), scale_min=1.0, scale_max=1.0, output_dtype=output_dtype, **color)
    kept = SegmentationTrainTransform(TrainAugmentationOptions(flip_probability=0.0, **options))
    flipped = SegmentationTrainTransform(TrainAugmentationOptions(flip_probability=1.0, **options))
    a, b = kept(image, label, sample_generator(0, 0, 0)), flipped(image, label, sample_generator(0, 0, 0))
    assert torch.equal(b["labels"], a["labels"].flip(-1))
    assert torch.equal(b["pixel_values"], a["pixel_values"].flip(-1))
    np.testing.assert_array_equal(a["labels"].numpy(), label)


def test_flip_before_a_blur_mirrors_the_blurred_crop(scene):
    image, label = scene
    options = dict(crop_size=(96, 160), scale_min=1.0, scale_max=1.0, blur_probability=1.0, **NO_COLOR)
    kept = SegmentationTrainTransform(TrainAugmentationOptions(flip_probability=0.0, **options))
    flipped = SegmentationTrainTransform(TrainAugmentationOptions(flip_probability=1.0, **options))
    a, b = kept(image, label, sample_generator(0, 0, 1)), flipped(image, label, sample_generator(0, 0, 1))
    assert torch.equal(b["labels"], a["labels"].flip(-1))
    torch.testing.assert_close(b["pixel_values"], a["pixel_values"].flip(-1), atol=0.05, rtol=0)  # blur rounding


@pytest.mark.parametrize("name, enhancer", [("brightness", ImageEnhance.Brightness),
                                            ("contrast", ImageEnhance.Contrast),
                                            ("saturation", ImageEnhance.Color)])
def test_color_jitter_matches_pil_image_enhance(scene, name, enhancer):
    image, label = scene
    jitter = {**NO_COLOR, name: 0.4}
    transform = SegmentationTrainTransform(TrainAugmentationOptions(crop_size=(96, 160), scale_min=1.0, scale_max=1.0,
                                                                    flip_probability=0.0, **jitter))
    rng = np.random.default_rng(11)
    sample = transform(image, label, rng)
    replay = np.random.default_rng(11)
    replay.uniform(1.0, 1.0), replay.integers(0, 1), replay.integers(0, 1), replay.random()  # scale, crop, flip
    factor = replay.uniform(0.6, 1.4)
    expected = np.asarray(enhancer(image).enhance(factor), dtype=np.float32)
    assert np.abs(_denormalize(sample["pixel_values"]) - expected).max() < 2.5


def scipy_gaussian_filter(image: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage.gaussian_filter(image, (0, sigma, sigma), mode="nearest"), which scikit-image's `gaussian` (the
    reference's blur) calls, written out in float64: its kernel, then edge-extended correlation along each axis."""
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / sigma ** 2 * offsets ** 2)
    weights /= weights.sum()
    out = image.astype(np.float64)
    for axis in (1, 2):
        padding = [(0, 0)] * 3
        padding[axis] = (radius, radius)
        padded = np.pad(out, padding, mode="edge")
        length = out.shape[axis]
        out = sum(w * np.take(padded, np.arange(i, i + length), axis=axis) for i, w in enumerate(weights))
    return out


def test_gaussian_blur_is_the_references_kernel_per_image():
    from hms_segmentation.data.transforms import gaussian_blur_

    pixels = torch.rand(3, 3, 20, 9, generator=torch.Generator().manual_seed(0)) * 255
    sigmas = torch.tensor([0.15, 1.3, 0.0])  # the reference's range (radius 1 and 5: wider than 9 columns), and none
    blurred = gaussian_blur_(pixels.clone(), sigmas)
    for image, original, sigma in zip(blurred, pixels, sigmas.tolist()):
        expected = scipy_gaussian_filter(original.numpy(), sigma) if sigma else original.numpy()
        np.testing.assert_allclose(image.numpy(), expected, atol=1e-3, rtol=0)
    assert torch.equal(gaussian_blur_(pixels[0].clone(), sigmas[0]), blurred[0])  # one (3, H, W) image alike
    with pytest.raises(ValueError, match=r"blur_sigma must hold one value per image, 3 .*got 2"):
        gaussian_blur_(pixels.clone(), sigmas[:2])


def test_the_blur_follows_the_colour_jitter_as_in_the_reference(scene):
    """The reference's input transform is ColorJitter, then the blur; the hue shift does not commute with a blur."""
    from hms_segmentation.data.transforms import apply_color_jitter_, gaussian_blur_

    transform = SegmentationTrainTransform(TrainAugmentationOptions(
        crop_size=(48, 64), blur_probability=1.0, brightness=0, contrast=0, saturation=0, hue=0.4,
        output_dtype="uint8"))
    sample = transform(*scene, sample_generator(0, 0, 3))
    crop, plan, sigma = sample["pixel_values"].float(), sample["color_jitter"], sample["blur_sigma"]
    assert 0.15 <= float(sigma) <= 1.3 and abs(float(plan[0, 1])) > 0.05
    on_device = normalize_pixel_values(sample["pixel_values"], color_jitter=plan, blur_sigma=sigma)
    jitter_then_blur = gaussian_blur_(apply_color_jitter_(crop.clone(), plan), sigma)
    blur_then_jitter = apply_color_jitter_(gaussian_blur_(crop.clone(), sigma), plan)
    assert torch.equal(on_device, normalize_pixel_values(jitter_then_blur))
    assert not torch.allclose(on_device, normalize_pixel_values(blur_then_jitter), atol=1e-3)


def test_blur_and_noise_are_optional_and_off_by_default(scene):
    image, label = scene
    base = dict(crop_size=(96, 160), scale_min=1.0, scale_max=1.0, flip_probability=0.0, **NO_COLOR)
    plain = SegmentationTrainTransform(TrainAugmentationOptions(**base))(image, label, sample_generator(0, 0, 0))
    np.testing.assert_allclose(_denormalize(plain["pixel_values"]), np.asarray(image, np.float32), atol=1e-3)
    blurred = SegmentationTrainTransform(TrainAugmentationOptions(blur_probability=1.0, blur_sigma=(1.0, 1.0), **base))(
        image, label, sample_generator(0, 0, 0))
    noisy = SegmentationTrainTransform(TrainAugmentationOptions(noise_std=8.0, noise_probability=1.0, **base))(
        image, label, sample_generator(0, 0, 0))
    blur_change = np.abs(_denormalize(blurred["pixel_values"]) - np.asarray(image, np.float32))
    noise_change = _denormalize(noisy["pixel_values"]) - np.asarray(image, np.float32)
    assert blur_change.mean() > 0.5 and 5.0 < noise_change.std() < 10.0
    assert torch.equal(noisy["labels"], plain["labels"]) and torch.equal(blurred["labels"], plain["labels"])


def test_crop_around_a_centroid_contains_it(scene):
    image, label = scene
    transform = SegmentationTrainTransform(TrainAugmentationOptions(crop_size=(32, 32), scale_min=1.0, scale_max=1.0))
    rare = label.copy()
    rare[5, 150] = 7  # one pixel of class 7 in a corner
    for index in range(20):
        assert 7 in transform(image, rare, sample_generator(0, 0, index), centroid=(150, 5))["labels"]


def test_invalid_options_are_explained():
    with pytest.raises(ValueError, match="scale_min <= scale_max"):
        TrainAugmentationOptions(scale_min=2.0, scale_max=1.0)
    with pytest.raises(ValueError, match="crop_size must be positive"):
        TrainAugmentationOptions(crop_size=(0, 10))
    with pytest.raises(ValueError, match="flip_probability must be in"):
        TrainAugmentationOptions(flip_probability=1.5)
    with pytest.raises(ValueError, match=r"hue must be in \[0, 0.5\].*got 0.6"):
        TrainAugmentationOptions(hue=0.6)


def test_pre_size_makes_the_random_scale_relative_to_a_long_side(scene):
    """The reference's --pre_size: a 96x160 frame with pre_size 320 and scale 1 is seen at 192x320."""
    image, label = scene
    options = dict(crop_size=(192, 320), scale_min=1.0, scale_max=1.0, flip_probability=0.0, **NO_COLOR)
    sample = SegmentationTrainTransform(TrainAugmentationOptions(pre_size=320, **options))(
        image, label, np.random.default_rng(0))
    expected = np.asarray(Image.fromarray(label).resize((320, 192), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(sample["labels"].numpy(), expected)  # whole frame, no padding
    plain = SegmentationTrainTransform(TrainAugmentationOptions(**options))(image, label, np.random.default_rng(0))
    assert (plain["labels"] == 255).sum() >= 192 * 320 - 96 * 160  # without: the frame at its own size, padded
    with pytest.raises(ValueError, match="pre_size must be a positive number of pixels"):
        TrainAugmentationOptions(pre_size=0)


def test_eval_long_side_resizes_image_and_label_up_or_down(scene):
    image, label = scene
    for long_side, size in ((320, (192, 320)), (80, (48, 80)), (160, (96, 160))):
        sample = SegmentationEvalTransform(EvalPreprocessingOptions(long_side=long_side))(image, label)
        assert sample["pixel_values"].shape[-2:] == size and sample["labels"].shape == size
        assert set(sample["labels"].unique().tolist()) <= set(np.unique(label).tolist())
    with pytest.raises(ValueError, match="give size or long_side, not both"):
        EvalPreprocessingOptions(size=64, long_side=64)


def test_eval_transform_only_resizes_and_normalises(scene):
    image, label = scene
    kept = SegmentationEvalTransform()(image, label)
    np.testing.assert_allclose(_denormalize(kept["pixel_values"]), np.asarray(image, np.float32), atol=1e-3)
    np.testing.assert_array_equal(kept["labels"].numpy(), label)
    resized = SegmentationEvalTransform(EvalPreprocessingOptions(size=(48, 80)))(image, label)
    assert resized["pixel_values"].shape == (3, 48, 80) and resized["labels"].shape == (48, 80)
    assert set(resized["labels"].unique().tolist()) <= set(np.unique(label).tolist())
    full_labels = SegmentationEvalTransform(EvalPreprocessingOptions(size=(48, 80), resize_labels=False))(image, label)
    assert full_labels["labels"].shape == (96, 160)
    assert set(SegmentationEvalTransform()(image)) == {"pixel_values"}


def test_eval_transform_serves_datasets_with_transform(synthetic_cityscapes, hf_cache):
    dataset = load_cityscapes(synthetic_cityscapes, "val", options=CityscapesOptions(cache_dir=hf_cache))
    transform = SegmentationEvalTransform()
    decoded = dataset.with_transform(transform.apply_to_batch)[0:2]
    raw = dataset.cast_column("image", datasets.Image(decode=False)).with_transform(transform.apply_to_batch)[0:2]
    assert decoded["pixel_values"][0].shape == (3, 64, 128) and decoded["labels"][1].dtype == torch.int64
    assert torch.equal(decoded["pixel_values"][1], raw["pixel_values"][1])


@pytest.mark.parametrize("settings", [
    {},
    {"blur_probability": 0.5, "noise_std": 6.0, "noise_probability": 1.0},
    {"blur_probability": 0.7},  # blurred on the device, after the jitter
    {"crop_size": (128, 256), "scale_min": 0.5, "scale_max": 0.7},  # padding with the mean colour and ignore labels
    {"image_resample": "bilinear", "flip_probability": 1.0},
], ids=["reference", "blur_and_noise", "blur", "padding", "bilinear_flipped"])
def test_uint8_samples_normalised_on_the_device_equal_float32_samples(scene, settings):
    """The uint8 path hands over the 8-bit crop; `normalize_pixel_values` then gives the float path's tensor exactly."""
    settings = {"crop_size": (48, 64), **settings}
    as_float = SegmentationTrainTransform(TrainAugmentationOptions(**settings, output_dtype="float32"))
    as_uint8 = SegmentationTrainTransform(TrainAugmentationOptions(**settings, output_dtype="uint8"))
    floats = [as_float(*scene, sample_generator(5, 2, index)) for index in range(6)]
    bytes_ = [as_uint8(*scene, sample_generator(5, 2, index)) for index in range(6)]
    for float_sample, uint8_sample in zip(floats, bytes_):
        assert uint8_sample["pixel_values"].dtype == torch.uint8 and uint8_sample["labels"].dtype == torch.uint8
        assert uint8_sample["pixel_values"].shape == float_sample["pixel_values"].shape
        on_device = normalize_pixel_values(uint8_sample["pixel_values"], color_jitter=uint8_sample["color_jitter"],
                                           blur_sigma=uint8_sample.get("blur_sigma"))
        assert torch.equal(on_device, float_sample["pixel_values"])
        assert torch.equal(uint8_sample["labels"].long(), float_sample["labels"])
    batch = torch.utils.data.default_collate(bytes_)  # what the DataLoader hands to the device
    assert ("blur_sigma" in batch) == bool(settings.get("blur_probability"))
    assert torch.equal(normalize_pixel_values(batch["pixel_values"], color_jitter=batch["color_jitter"],
                                              blur_sigma=batch.get("blur_sigma")),
                       torch.stack([sample["pixel_values"] for sample in floats]))
    if settings.get("blur_probability") and not settings.get("noise_std"):  # some samples blurred, some not
        assert 0 < int((batch["blur_sigma"] > 0).sum()) < len(bytes_)


def test_color_jitter_plans_apply_per_image_in_a_batch_and_a_wrong_plan_is_named():
    from hms_segmentation.data.transforms import apply_color_jitter_

    pixels = torch.rand(2, 3, 8, 8) * 255
    plans = torch.tensor([[[1.0, 1.3], [3.0, 0.2], [0.0, 0.8], [2.0, 0.5]], [[-1.0, 1.0]] * 4])
    one = apply_color_jitter_(pixels[0].clone(), plans[0])
    both = apply_color_jitter_(pixels.clone(), plans)
    assert torch.equal(both[0], one) and torch.equal(both[1], pixels[1])  # an all -1 plan leaves the image as it is
    assert both.min() >= 0 and both.max() <= 255
    with pytest.raises(ValueError, match=r"color_jitter must be \(batch, 4, 2\)"):
        apply_color_jitter_(pixels.clone(), plans[:1])
    with pytest.raises(ValueError, match=r"color_jitter must be \(batch, 4, 2\).*got \(2, 3, 2\)"):
        apply_color_jitter_(pixels.clone(), plans[:, :3])  # a plan of the three-step format


def _colorsys_hue_shift(pixels: np.ndarray, shift: float) -> np.ndarray:
    """An independent float reference: `(H, W, 3)` 0..255 -> hue rotated by `shift` turns, pixel by pixel."""
    out = np.empty_like(pixels, dtype=np.float64)
    for index in np.ndindex(pixels.shape[:2]):
        hue, saturation, value = colorsys.rgb_to_hsv(*(pixels[index] / 255.0))
        out[index] = np.array(colorsys.hsv_to_rgb((hue + shift) % 1.0, saturation, value)) * 255.0
    return out


@pytest.mark.parametrize("shift", [0.0, 0.05, -0.25, 0.5, -0.5, 0.3333])
def test_hue_shift_rotates_hsv_hue_as_colorsys_and_keeps_greys(shift):
    from hms_segmentation.data.transforms import shift_hue_

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (12, 16, 3)).astype(np.float64)
    pixels[0, :4] = [[0, 0, 0], [255, 255, 255], [128, 128, 128], [7, 7, 7]]  # greys have no hue
    pixels[1, :3] = [[255, 0, 0], [0, 255, 0], [255, 255, 0]]  # primaries, exactly on a sector border
    image = torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32))
    shifted = shift_hue_(image.clone(), shift).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(shifted, _colorsys_hue_shift(pixels, shift), atol=2e-3)
    np.testing.assert_array_equal(shifted[0, :4], pixels[0, :4])


def test_hue_jitter_matches_the_references_pil_hsv_shift(scene):
    """The reference shifts PIL's 8-bit HSV hue band; ours is exact, so within PIL's own 8-bit round-trip error."""
    image, label = scene
    transform = SegmentationTrainTransform(TrainAugmentationOptions(crop_size=(96, 160), scale_min=1.0, scale_max=1.0,
                                                                    flip_probability=0.0, **{**NO_COLOR, "hue": 0.4}))
    sample = transform(image, label, np.random.default_rng(11))
    replay = np.random.default_rng(11)
    replay.uniform(1.0, 1.0), replay.integers(0, 1), replay.integers(0, 1), replay.random()  # scale, crop, flip
    shift = replay.uniform(-0.4, 0.4)
    hue, saturation, value = image.convert("HSV").split()
    hue = Image.fromarray(((np.asarray(hue, dtype=np.int64) + round(shift * 256)) % 256).astype(np.uint8))
    expected = np.asarray(Image.merge("HSV", (hue, saturation, value)).convert("RGB"), dtype=np.float32)
    round_trip = np.asarray(image.convert("HSV").convert("RGB"), dtype=np.float32) - np.asarray(image)
    difference = np.abs(_denormalize(sample["pixel_values"]) - expected)
    assert difference.mean() < 1.0 and difference.max() <= np.abs(round_trip).max() + 4


def test_a_hue_step_between_affine_steps_sees_their_clamped_result():
    """brightness x2 then hue: the brightness is clamped to 0..255 before the hue turns it (as the reference's 8-bit
    steps), and a contrast step after the hue blends with the mean of the hue-shifted image."""
    from hms_segmentation.data.transforms import apply_color_jitter_, shift_hue_

    pixels = torch.rand(3, 6, 6) * 255
    plan = torch.tensor([[0.0, 2.0], [3.0, 0.25], [1.0, 0.5], [-1.0, 1.0]])
    expected = shift_hue_((pixels * 2).clamp(0, 255), 0.25)
    grey = (torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1) * expected).sum(0).mean()
    expected = (expected * 0.5 + 0.5 * grey).clamp(0, 255)
    torch.testing.assert_close(apply_color_jitter_(pixels.clone(), plan), expected, atol=1e-3, rtol=0)


def test_uint8_samples_are_the_same_for_the_same_seed(scene):
    transform = SegmentationTrainTransform(TrainAugmentationOptions(crop_size=48, blur_probability=0.5, noise_std=4,
                                                                    output_dtype="uint8"))
    first, again = (transform(*scene, sample_generator(3, 1, 7)) for _ in range(2))
    other = transform(*scene, sample_generator(3, 1, 8))
    assert torch.equal(first["pixel_values"], again["pixel_values"]) and torch.equal(first["labels"], again["labels"])
    assert not torch.equal(first["pixel_values"], other["pixel_values"])


def test_normalize_pixel_values_keeps_its_input_and_names_a_wrong_shape():
    pixels = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2).clone()
    normalised = normalize_pixel_values(pixels)
    expected = (torch.tensor([0.0, 128.0, 255.0]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert normalised.dtype == torch.float32 and torch.allclose(normalised[:, 0, 0], expected, atol=1e-6)
    assert pixels.dtype == torch.uint8 and pixels[1, 0, 0] == 128
    with pytest.raises(ValueError, match=r"pixel_values must be \(\.\.\., 3, height, width\), got shape \(2, 2\)"):
        normalize_pixel_values(torch.zeros(2, 2, dtype=torch.uint8))


def test_uint8_output_needs_imagenet_normalisation_and_an_8_bit_ignore_index():
    with pytest.raises(ValueError, match="output_dtype must be 'float32' or 'uint8'"):
        TrainAugmentationOptions(output_dtype="float16")
    with pytest.raises(ValueError, match="normalised on the device with the ImageNet mean/std"):
        TrainAugmentationOptions(output_dtype="uint8", image_mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="ignore_index must be in 0..255"):
        TrainAugmentationOptions(output_dtype="uint8", ignore_index=-1)
    assert TrainAugmentationOptions(output_dtype="float32", image_mean=(0.5, 0.5, 0.5)).image_mean == (0.5, 0.5, 0.5)
