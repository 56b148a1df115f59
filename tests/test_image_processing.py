"""HMSImageProcessor: reading every odd input, the resize policy, label maps, batches, post-processing, saving."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hms_segmentation import HMSImageProcessor
from hms_segmentation.image_processing_hms import get_output_size
from hms_segmentation.label_tables import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from transformers import AutoImageProcessor
from transformers.modeling_outputs import SemanticSegmenterOutput

ODD_IMAGE_SIZE = (96, 160)  # (height, width) of the odd inputs unless their name says otherwise
RAW = {"do_rescale": False, "do_normalize": False, "size_divisor": 1}  # pixel values as read, no resize


@pytest.fixture(scope="module")
def odd_inputs(shared_data_dir):
    return shared_data_dir / "odd_inputs"


@pytest.fixture(scope="module")
def processor() -> HMSImageProcessor:
    return HMSImageProcessor()


def pixels(processor: HMSImageProcessor, images, **kwargs) -> torch.Tensor:
    return processor(images, return_tensors="pt", **kwargs)["pixel_values"]


# --- reading ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rgb_ok.png", "grayscale.png", "rgba.png", "palette.png", "cmyk.jpg", "gray16.png"])
def test_every_image_mode_becomes_rgb(processor, odd_inputs, name):
    values = pixels(processor, str(odd_inputs / name), **RAW)
    assert values.shape == (1, 3, *ODD_IMAGE_SIZE)
    assert 0 <= values.min() and values.max() <= 255 and values.std() > 10


def test_grayscale_16_bit_is_scaled_not_clipped_as_the_training_reader_scales_it(processor, odd_inputs):
    from hms_segmentation.data.io import load_image

    values = pixels(processor, odd_inputs / "gray16.png", **RAW)[0]
    stored = np.asarray(Image.open(odd_inputs / "gray16.png"), dtype=np.uint16)
    assert torch.equal(values[0], values[2])
    np.testing.assert_array_equal(values[0].numpy(), (stored >> 8).astype(np.float32))
    # the model sees at inference the values it was trained on (the training reader once rounded differently)
    trained_on = np.asarray(load_image(odd_inputs / "gray16.png")).transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(values.numpy(), trained_on)
    # and a 16-bit array (grayscale or RGB) is read like the file, not refused as out of range
    np.testing.assert_array_equal(pixels(processor, stored, **RAW)[0].numpy(), values.numpy())
    rgb = np.repeat(stored[..., None], 3, axis=-1)
    np.testing.assert_array_equal(pixels(processor, rgb, **RAW)[0].numpy(), values.numpy())


def test_sixteen_bit_colour_files_grey_files_and_arrays_are_scaled_alike(processor, tmp_path):
    import struct
    import zlib

    from hms_segmentation.data.io import load_image

    stored = np.random.default_rng(0).integers(0, 65536, (16, 32, 3), dtype=np.uint16)
    # a 48-bit PNG (Pillow writes none): Pillow decodes it to 8-bit RGB itself, before our conversion
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in stored)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", 32, 16, 16, 2, 0, 0, 0)  # 32x16, 16 bits per channel, RGB
    (tmp_path / "rgb48.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                         + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    Image.fromarray(stored[..., 1]).save(tmp_path / "grey16.png")
    colour_file = pixels(processor, tmp_path / "rgb48.png", **RAW)[0].numpy()
    trained_on = np.moveaxis(np.asarray(load_image(tmp_path / "rgb48.png")), -1, 0)
    np.testing.assert_array_equal(colour_file, trained_on)
    np.testing.assert_array_equal(pixels(processor, stored, **RAW)[0].numpy(), colour_file)
    np.testing.assert_array_equal(pixels(processor, tmp_path / "grey16.png", **RAW)[0, 0].numpy(), colour_file[1])


def test_rgba_and_palette_keep_their_colours_like_the_training_reader(processor, odd_inputs):
    from hms_segmentation.data.io import load_image

    for name in ("rgba.png", "palette.png", "cmyk.jpg"):
        expected = np.moveaxis(np.asarray(load_image(odd_inputs / name), dtype=np.float32), -1, 0)
        np.testing.assert_array_equal(pixels(processor, odd_inputs / name, **RAW)[0].numpy(), expected)


def test_colour_keyed_transparency_keeps_the_stored_colours_like_the_training_reader(processor, tmp_path):
    from hms_segmentation.data.io import load_image

    grey = np.random.default_rng(0).integers(0, 4, (24, 40), dtype=np.uint8) * 80
    Image.fromarray(np.repeat(grey[..., None], 3, axis=-1)).save(tmp_path / "rgb.png", transparency=(80, 80, 80))
    Image.fromarray(grey).save(tmp_path / "grey.png", transparency=80)
    Image.fromarray(grey).convert("P").save(tmp_path / "palette.png", transparency=80)
    for name in ("rgb.png", "grey.png", "palette.png"):
        assert "transparency" in Image.open(tmp_path / name).info
        stored = np.repeat(grey[None].astype(np.float32), 3, axis=0)
        trained_on = np.moveaxis(np.asarray(load_image(tmp_path / name), dtype=np.float32), -1, 0)
        np.testing.assert_array_equal(trained_on, stored)
        # transformers' conversion painted the colour-keyed pixels white (255) at inference only
        for source in (tmp_path / name, Image.open(tmp_path / name), load_image(tmp_path / name)):
            np.testing.assert_array_equal(pixels(processor, source, **RAW)[0].numpy(), stored)


def test_exif_orientation_is_applied_to_paths_and_pil_images(processor, odd_inputs):
    path = odd_inputs / "exif_orientation6.jpg"
    from_path = pixels(processor, str(path), **RAW)
    from_pil = pixels(processor, Image.open(path), **RAW)
    assert from_path.shape == (1, 3, 160, 96)  # shown size, not the stored 96x160
    assert torch.equal(from_path, from_pil)
    labels = processor(str(path), segmentation_maps=np.zeros((160, 96), np.uint8), return_tensors="pt")["labels"]
    assert labels.shape == (1, 192, 128)


@pytest.mark.parametrize("name, expected", [("tiny_3x5.png", (64, 64)), ("one_row_1x4000.png", (64, 4032))])
def test_degenerate_sizes_become_one_size_divisor_at_least(processor, odd_inputs, name, expected):
    values = pixels(processor, odd_inputs / name)
    assert values.shape[-2:] == expected and torch.isfinite(values).all()


@pytest.mark.parametrize("name", ["truncated.png", "truncated.jpg", "not_an_image.png", "empty.png"])
def test_broken_file_names_the_file(processor, odd_inputs, name):
    with pytest.raises(ValueError, match=name):
        processor(str(odd_inputs / name))


def test_decompression_bomb_is_refused_before_decoding(processor, odd_inputs):
    with pytest.raises(ValueError, match=r"bomb_40000x40000\.png.*decompression bomb"):
        processor(str(odd_inputs / "bomb_40000x40000.png"))
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own guard stays on


def test_pixel_limit_gives_a_clear_error_for_files_arrays_and_pil_images(odd_inputs):
    small_limit = HMSImageProcessor(max_image_pixels=10_000)
    for image in (odd_inputs / "rgb_ok.png", Image.open(odd_inputs / "rgb_ok.png"), np.zeros((96, 160, 3), np.uint8)):
        with pytest.raises(ValueError, match=r"160x96 image \(15,360 pixels\), more than max_image_pixels=10,000"):
            small_limit(image)
    with pytest.raises(ValueError, match="max_image_pixels=15,000"):  # per call as well
        HMSImageProcessor()(str(odd_inputs / "rgb_ok.png"), max_image_pixels=15_000)


def test_missing_file_is_named(processor, tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.png"):
        processor(str(tmp_path / "absent.png"))


@pytest.mark.parametrize(
    "layout",
    ["pil", "numpy_hwc", "numpy_chw", "torch_chw"],
)
def test_pil_numpy_and_torch_inputs_agree(processor, odd_inputs, layout):
    image = Image.open(odd_inputs / "rgb_ok.png")
    array = np.asarray(image)
    inputs = {
        "pil": image,
        "numpy_hwc": array,
        "numpy_chw": np.moveaxis(array, -1, 0).copy(),
        "torch_chw": torch.from_numpy(np.moveaxis(array, -1, 0).copy()),
    }[layout]
    torch.testing.assert_close(pixels(processor, inputs), pixels(processor, image))


@pytest.mark.parametrize("height, width", [(1, 4000), (1, 5), (4, 3), (5, 3), (7, 1)])
def test_rgb_arrays_one_row_high_or_three_pixels_wide_keep_their_layout(height, width):
    processor = HMSImageProcessor(**RAW)
    array = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = pixels(processor, Image.fromarray(array))
    assert expected.shape == (1, 3, height, width)
    channels_first = np.moveaxis(array, -1, 0).copy()
    for layout in (array, torch.from_numpy(array), channels_first, torch.from_numpy(channels_first)):
        torch.testing.assert_close(pixels(processor, layout), expected)


def test_rgba_array_drops_its_alpha_like_an_rgba_file(processor, odd_inputs, tmp_path):
    rgba = np.asarray(Image.open(odd_inputs / "rgba.png"))
    assert rgba.shape[-1] == 4
    torch.testing.assert_close(pixels(processor, rgba), pixels(processor, odd_inputs / "rgba.png"))
    # (partly) transparent pixels keep their colours in every layout, as in a file (not blended onto white)
    translucent = rgba.copy()
    translucent[..., 3] = np.random.default_rng(0).choice([0, 128, 255], translucent.shape[:2]).astype(np.uint8)
    Image.fromarray(translucent).save(tmp_path / "translucent.png")
    expected = pixels(processor, np.ascontiguousarray(translucent[..., :3]))
    torch.testing.assert_close(pixels(processor, tmp_path / "translucent.png"), expected)
    channels_first = np.moveaxis(translucent, -1, 0).copy()
    for layout in (translucent, torch.from_numpy(translucent), channels_first, torch.from_numpy(channels_first)):
        torch.testing.assert_close(pixels(processor, layout), expected)


def test_float_images_are_resized_in_float(processor):
    """The rounding to the size divisor resizes most images: float values must neither be refused (transformers' PIL
    path only takes floats in [0, 1]) nor rounded to 8 bits on the way."""
    values = np.random.default_rng(0).uniform(0, 255, (100, 150, 3))  # 100x150 -> 128x128
    resized = pixels(processor, values)
    assert resized.shape == (1, 3, 128, 128)
    eight_bit = pixels(processor, values.round().astype(np.uint8))
    assert (resized - eight_bit).abs().max() < 0.03  # 8-bit rounding, before and after the resize, at most
    torch.testing.assert_close(pixels(processor, values / 255.0, do_rescale=False), resized, rtol=0, atol=1e-5)
    shifted = pixels(processor, values + 0.25)  # a quarter of a level, kept through the resize
    torch.testing.assert_close((shifted - resized).mean(), torch.tensor(0.25 / 255 / 0.225), rtol=0.05, atol=0)


def test_float_images_already_in_zero_one_are_flagged(processor, odd_inputs):
    array = np.array(Image.open(odd_inputs / "rgb_ok.png"))
    with pytest.warns(UserWarning, match=r"\[0, 1\].*do_rescale=False"):
        pixels(processor, torch.from_numpy(array).permute(2, 0, 1).float() / 255)
    # the advice works: the pixel values of the uint8 image, but for its rounding to 8 bits after the resize (float
    # images are resized in float): within one level, 1 / 255 / std
    torch.testing.assert_close(
        pixels(processor, array / 255.0, do_rescale=False), pixels(processor, array), rtol=0, atol=1.01 / 255 / 0.224
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_float_tensors_of_any_precision_are_read(processor, dtype):
    values = torch.arange(256, dtype=torch.float32).reshape(16, 16).expand(3, 16, 16)
    # within one level: the 16x16 image is resized to 64x64, the uint8 one rounded to 8 bits after it
    torch.testing.assert_close(pixels(processor, values.to(dtype)), pixels(processor, values.to(torch.uint8)),
                               rtol=0, atol=1.01 / 255 / 0.224)
    torch.testing.assert_close(pixels(processor, values.to(dtype), **RAW), pixels(processor, values.to(torch.uint8),
                                                                                    **RAW))  # not resized: exact


def test_grayscale_array_becomes_three_channels(processor):
    values = pixels(processor, np.full((64, 64), 100, np.uint8), **RAW)
    assert values.shape == (1, 3, 64, 64) and bool((values == 100).all())


# --- resize policy and normalisation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, expected",
    [
        (None, (128, 192)),  # keep: 96x160 rounded half up to multiples of 64
        ({"shortest_edge": 256}, (256, 448)),  # 256 x 426.7 -> 448
        ({"shortest_edge": 256, "longest_edge": 320}, (192, 320)),
        ({"height": 100, "width": 200}, (128, 192)),
    ],
)
def test_resize_policies_round_to_the_size_divisor(size, expected):
    assert get_output_size(96, 160, size, size_divisor=64) == expected


@pytest.mark.parametrize("height, width", [(96, 160), (3, 5), (1, 4000), (1025, 2047), (720, 1280)])
def test_every_default_chained_scale_stays_valid(height, width):
    for side in get_output_size(height, width, None, size_divisor=64):
        for scale in (0.5, 1.0, 1.5, 2.0):
            assert (side * scale) % 32 == 0  # whole pixels, aligned with the trunk's stride-32 branch


def test_resize_policy_is_applied_by_the_processor(odd_inputs):
    resized = HMSImageProcessor(do_resize=True, size={"shortest_edge": 256})
    assert pixels(resized, odd_inputs / "rgb_ok.png").shape[-2:] == (256, 448)
    assert pixels(resized, odd_inputs / "rgb_ok.png", size={"height": 64, "width": 64}).shape[-2:] == (64, 64)


def test_a_size_alone_turns_resizing_on_unless_do_resize_says_otherwise(odd_inputs, tmp_path):
    image = odd_inputs / "rgb_ok.png"  # 96x160
    by_constructor = HMSImageProcessor(size={"shortest_edge": 256})
    assert by_constructor.do_resize and pixels(by_constructor, image).shape[-2:] == (256, 448)
    by_constructor.save_pretrained(tmp_path)
    assert pixels(HMSImageProcessor.from_pretrained(tmp_path), image).shape[-2:] == (256, 448)
    assert pixels(HMSImageProcessor(), image, size={"shortest_edge": 256}).shape[-2:] == (256, 448)
    kept = (128, 192)  # the size_divisor rounding only
    assert pixels(HMSImageProcessor(), image).shape[-2:] == kept
    assert pixels(HMSImageProcessor(), image, size={"shortest_edge": 256}, do_resize=False).shape[-2:] == kept
    assert pixels(HMSImageProcessor(size={"shortest_edge": 256}, do_resize=False), image).shape[-2:] == kept


def test_max_long_side_shrinks_tensors_as_the_processor_shrinks_images(processor):
    from hms_segmentation.image_processing_hms import shrink_to_long_side

    # fine detail (pixel noise) is what an aliasing shrink gets wrong
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 512, 3), dtype=np.uint8))
    by_processor = pixels(processor, image, max_long_side=128)
    # evaluate, demo and autolabel hold normalised full-size tensors and shrink those
    by_tensor = shrink_to_long_side(pixels(processor, image), 128)
    assert by_tensor.shape == by_processor.shape == (1, 3, 64, 128)
    one_level = 1 / (255 * min(IMAGENET_STD))  # the processor rounds its resized pixels to whole 8-bit levels
    torch.testing.assert_close(by_tensor, by_processor, atol=one_level, rtol=0)


def test_size_without_a_known_policy_is_refused():
    with pytest.raises(ValueError, match="shortest_edge"):
        get_output_size(96, 160, {"max_height": 10, "max_width": 10}, size_divisor=64)


@pytest.mark.parametrize("value", [0, -64, 2.5])
def test_size_divisor_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match="size_divisor"):
        HMSImageProcessor(size_divisor=value)


def test_normalisation_uses_the_reference_imagenet_statistics(processor):
    colour = (30, 120, 250)
    values = pixels(processor, Image.new("RGB", (64, 64), colour))[0]
    expected = [(c / 255 - mean) / std for c, mean, std in zip(colour, IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(values[:, 0, 0], torch.tensor(expected), atol=1e-6, rtol=0)
    assert processor.image_mean == IMAGENET_MEAN and processor.image_std == IMAGENET_STD


# --- label maps -------------------------------------------------------------------------------------------------


def test_label_map_follows_its_image_with_nearest_resizing(processor, odd_inputs):
    outputs = processor(str(odd_inputs / "rgb_ok.png"), segmentation_maps=str(odd_inputs / "label_ok_labelIds.png"),
                        return_tensors="pt")
    stored = np.asarray(Image.open(odd_inputs / "label_ok_labelIds.png"))
    assert outputs["labels"].shape == (1, 128, 192) and outputs["labels"].dtype == torch.int64
    assert set(outputs["labels"].unique().tolist()) <= set(np.unique(stored).tolist())


def test_ignore_index_survives_resizing(processor):
    label = np.zeros((96, 160), np.uint8)
    label[:, 80:] = IGNORE_INDEX
    label[40:50, 10:20] = 7
    labels = processor(np.zeros((96, 160, 3), np.uint8), segmentation_maps=label, return_tensors="pt")["labels"]
    assert set(labels.unique().tolist()) == {0, 7, IGNORE_INDEX}
    assert bool((labels[0, :, 100:] == IGNORE_INDEX).all())


def test_label_map_of_another_size_names_both_files(processor, odd_inputs):
    image, label = odd_inputs / "rgb_ok.png", odd_inputs / "label_size_mismatch_labelIds.png"
    with pytest.raises(ValueError, match=r"label_size_mismatch_labelIds\.png is 160x90.*rgb_ok\.png is 160x96"):
        processor(str(image), segmentation_maps=str(label))


def test_colour_label_map_is_refused(processor, odd_inputs):
    with pytest.raises(ValueError, match=r"label_rgb_instead_of_gray_labelIds\.png: expected a single-channel"):
        processor(str(odd_inputs / "rgb_ok.png"),
                  segmentation_maps=str(odd_inputs / "label_rgb_instead_of_gray_labelIds.png"))


def test_unknown_label_ids_are_refused_when_the_class_count_is_known(processor, odd_inputs):
    image = str(odd_inputs / "rgb_ok.png")
    processor(image, segmentation_maps=str(odd_inputs / "label_ok_labelIds.png"), num_labels=34)  # labelIds 0..33
    expected = r"label_unknown_ids_labelIds\.png: expected class ids 0\.\.33 or 255.*\[200\]"
    with pytest.raises(ValueError, match=expected):
        processor(image, segmentation_maps=str(odd_inputs / "label_unknown_ids_labelIds.png"), num_labels=34)


def test_one_label_map_per_image_is_required(processor):
    with pytest.raises(ValueError, match="one label map per image: got 1 for 2"):
        processor([np.zeros((64, 64, 3), np.uint8)] * 2, segmentation_maps=[np.zeros((64, 64), np.uint8)])


# --- batches and post-processing --------------------------------------------------------------------------------


def test_batch_of_different_sizes_is_padded_with_a_mask(processor):
    images = [np.zeros((96, 160, 3), np.uint8), np.zeros((64, 64, 3), np.uint8)]
    labels = [np.ones((96, 160), np.uint8), np.ones((64, 64), np.uint8)]
    outputs = processor(images, segmentation_maps=labels, return_tensors="pt")
    assert outputs["pixel_values"].shape == (2, 3, 128, 192)
    assert outputs["pixel_mask"][1].sum() == 64 * 64 and outputs["pixel_mask"][1, :64, :64].all()
    assert bool((outputs["labels"][1, 64:, :] == IGNORE_INDEX).all())
    assert bool((outputs["labels"][1, :64, :64] == 1).all())
    assert bool((outputs["pixel_values"][1, :, 64:, :] == 0).all())


def test_unpadded_batch_of_different_sizes_is_a_list_or_a_clear_error(processor):
    images = [np.zeros((96, 160, 3), np.uint8), np.zeros((64, 64, 3), np.uint8)]
    as_list = processor(images, do_pad=False)["pixel_values"]
    assert [array.shape for array in as_list] == [(3, 128, 192), (3, 64, 64)]
    with pytest.raises(ValueError, match="do_pad=True"):
        processor(images, do_pad=False, return_tensors="pt")


def test_post_processing_returns_label_maps_at_the_original_sizes(processor):
    logits = torch.zeros(2, 5, 128, 192)
    logits[0, 3] = 1.0
    logits[1, 2, :64, :64] = 1.0  # the second image's own area; the rest is padding
    logits[1, 4, 64:, :] = 9.0
    mask = torch.zeros(2, 128, 192, dtype=torch.int64)
    mask[0] = 1
    mask[1, :64, :64] = 1
    maps = processor.post_process_semantic_segmentation(
        SemanticSegmenterOutput(logits=logits), target_sizes=[(96, 160), (50, 40)], pixel_mask=mask
    )
    assert [tuple(m.shape) for m in maps] == [(96, 160), (50, 40)]
    assert bool((maps[0] == 3).all()) and bool((maps[1] == 2).all())


def test_post_processing_without_target_sizes_keeps_the_logits_size(processor):
    maps = processor.post_process_semantic_segmentation({"logits": torch.randn(1, 5, 32, 48)})
    assert maps[0].shape == (32, 48) and maps[0].dtype == torch.int64


def test_post_processing_checks_the_number_of_target_sizes(processor):
    with pytest.raises(ValueError, match="one \\(height, width\\) per image: got 1 for a batch of 2"):
        processor.post_process_semantic_segmentation({"logits": torch.randn(2, 5, 8, 8)}, target_sizes=[(4, 4)])


# --- chained scales ---------------------------------------------------------------------------------------------


def test_inference_scales_travel_with_the_inputs(processor):
    assert "scales" not in processor(np.zeros((64, 64, 3), np.uint8))
    outputs = processor(np.zeros((64, 64, 3), np.uint8), inference_scales=[0.5, 1.0], return_tensors="pt")
    assert outputs["scales"].tolist() == [0.5, 1.0]


def test_inference_scales_must_fit_the_size_divisor():
    with pytest.raises(ValueError, match=r"inference_scales \[0.3\].*size_divisor=64"):
        HMSImageProcessor(inference_scales=[0.3, 1.0])
    assert HMSImageProcessor(inference_scales=[0.3, 1.0], size_divisor=10).inference_scales == [0.3, 1.0]


# --- saving -----------------------------------------------------------------------------------------------------


def test_settings_round_trip_through_preprocessor_config(tmp_path):
    original = HMSImageProcessor(size_divisor=128, inference_scales=[0.5, 1.0], max_image_pixels=10**7, num_labels=19)
    original.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "HMSImageProcessor"
    assert saved["auto_map"] == {"AutoImageProcessor": "image_processing_hms.HMSImageProcessor"}
    assert (tmp_path / "image_processing_hms.py").is_file() and (tmp_path / "label_tables.py").is_file()
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is HMSImageProcessor
    assert (reloaded.size_divisor, reloaded.inference_scales, reloaded.max_image_pixels, reloaded.num_labels) == (
        128, [0.5, 1.0], 10**7, 19
    )


# --- upright original sizes, label settings, mixed batches ------------------------------------------------------


def exif_rotated_jpeg(path, width: int = 128, height: int = 64):
    """A JPEG stored `width` x `height` with EXIF orientation 6: shown rotated, `height` wide and `width` high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, exif=exif)
    return path


def test_original_sizes_are_the_upright_sizes_and_the_model_takes_them_along(processor, tmp_path):
    from tiny_configs import TINY_HRNET

    from hms_segmentation import HMSConfig, HMSForSemanticSegmentation

    path = exif_rotated_jpeg(tmp_path / "rotated.jpg")
    assert Image.open(path).size == (128, 64)  # what `image.height, image.width` once gave the usage code
    for source in (str(path), Image.open(path)):
        assert processor(source, return_tensors="pt")["original_sizes"].tolist() == [[128, 64]]
    plain = np.zeros((50, 40, 3), np.uint8)
    inputs = processor([Image.open(path), plain], return_tensors="pt")
    assert inputs["original_sizes"].tolist() == [[128, 64], [50, 40]] and inputs["pixel_values"].shape[-2:] == (128, 64)
    assert processor(plain, do_pad=False)["original_sizes"] == [(50, 40)]  # return_tensors=None: a list
    torch.manual_seed(0)
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_HRNET)).eval()
    with torch.no_grad():
        outputs = model(**inputs, scales=[1.0])  # original_sizes and pixel_mask travel along, unused
    label_maps = processor.post_process_semantic_segmentation(
        outputs, target_sizes=inputs["original_sizes"], pixel_mask=inputs["pixel_mask"]
    )
    assert [tuple(label_map.shape) for label_map in label_maps] == [(128, 64), (50, 40)]


@pytest.mark.parametrize("ignore_index", [-100, 300, 2.5, True])
def test_ignore_index_that_no_uint8_label_map_holds_is_refused(processor, ignore_index):
    with pytest.raises(ValueError, match=r"ignore_index must be an integer in 0\.\.255"):
        HMSImageProcessor(ignore_index=ignore_index)
    label = np.full((64, 64), 156, np.uint8)  # -100 once allowed class 156 through numpy's negative indexing
    with pytest.raises(ValueError, match=r"ignore_index must be an integer in 0\.\.255"):
        processor(np.zeros((64, 64, 3), np.uint8), segmentation_maps=label, num_labels=19, ignore_index=ignore_index)


def test_ignore_index_among_the_class_ids_or_a_bad_num_labels_is_refused(processor):
    with pytest.raises(ValueError, match=r"ignore_index=3 is one of the class ids 0\.\.4 of num_labels=5"):
        HMSImageProcessor(ignore_index=3, num_labels=5)
    with pytest.raises(ValueError, match=r"num_labels must be a positive integer or None, got 0"):
        processor(np.zeros((64, 64, 3), np.uint8), num_labels=0)
    label = np.array([[0, 4], [200, 200]], np.uint8)
    outputs = processor(np.zeros((2, 2, 3), np.uint8), segmentation_maps=label, num_labels=5, ignore_index=200, **RAW)
    assert outputs["labels"][0].tolist() == [[0, 4], [200, 200]]


@pytest.mark.parametrize("gray_first", [True, False])
def test_a_list_mixing_grayscale_and_rgb_arrays_is_one_image_per_element(processor, gray_first):
    gray, rgb = np.full((64, 32), 100, np.uint8), np.full((32, 64, 3), 50, np.uint8)
    images = [gray, rgb] if gray_first else [rgb, gray]
    outputs = processor(images, return_tensors=None, do_pad=False, **RAW)
    shapes = {array.shape for array in outputs["pixel_values"]}
    assert shapes == {(3, 64, 32), (3, 32, 64)} and len(outputs["pixel_values"]) == 2
    assert outputs["original_sizes"] == ([(64, 32), (32, 64)] if gray_first else [(32, 64), (64, 32)])


def test_an_input_that_is_no_image_is_described_not_printed(processor):
    with pytest.raises(ValueError, match=r"images\[1\]: expected an image .* found ndarray of shape \(1, 2, 3, 4, 5\)"):
        processor([np.zeros((64, 32), np.uint8), np.zeros((1, 2, 3, 4, 5), np.uint8)])
    with pytest.raises(ValueError, match=r"^images: expected an image .* found ndarray of shape \(1, 2, 3, 4, 5\)$"):
        processor(np.zeros((1, 2, 3, 4, 5), np.uint8))
