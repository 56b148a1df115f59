"""Tiled inference (issue 12): one tile is the untiled run, overlapping tiles of a local trunk reproduce it, odd sizes
and oversized tiles work, bad settings fail clearly, and the option reaches the forward, the config and the CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from tiny_configs import TINY_HRNET

from hms_segmentation import HMSConfig, HMSForSemanticSegmentation, modeling_hms
from hms_segmentation.image_processing_hms import HMSImageProcessor, shrink_to_long_side
from hms_segmentation.tiled_inference import blending_window_1d, segment_in_tiles, tile_starts, tile_windows


@pytest.fixture(scope="module")
def tiny_model() -> HMSForSemanticSegmentation:
    torch.manual_seed(0)
    return HMSForSemanticSegmentation(HMSConfig(**TINY_HRNET)).eval()


class ToyConvolutionalTrunk(nn.Module):
    """A fully convolutional stand-in for `segment_single_scale`: two 3x3 convs (receptive radius 2), no global
    context, so tiles differ from the whole image only within 2 pixels of a tile border."""

    def __init__(self, num_labels: int = 5):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2 * num_labels + 1, 3, padding=1))
        self.num_labels = num_labels

    def forward(self, pixel_values: torch.Tensor, keep_auxiliary: bool = True):
        out = self.body(pixel_values)
        logits, auxiliary_logits = out[:, : self.num_labels], out[:, self.num_labels : 2 * self.num_labels]
        return logits, auxiliary_logits if keep_auxiliary else None, torch.sigmoid(out[:, -1:]), None


def pointwise_segment(pixel_values: torch.Tensor):
    """Strictly local (per pixel): any tiling must give back exactly the untiled maps."""
    logits = torch.cat([pixel_values, pixel_values.square()], dim=1)
    return logits, None, torch.sigmoid(pixel_values[:, :1]), None


def _assert_outputs_close(tiled, untiled, atol: float) -> None:
    for name, a, b in zip(("logits", "auxiliary_logits", "attention"), tiled, untiled):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


# --- the blending ---------------------------------------------------------------------------------------------


def test_tiles_cover_the_axis_with_the_last_tile_flush_with_the_end():
    assert tile_starts(100, 40, 10) == [0, 30, 60]
    assert tile_starts(37, 64, 8) == [0]  # a tile larger than the axis is clipped to it
    assert tile_starts(8192, 1024, 256)[-1] == 8192 - 1024


def test_window_is_strictly_positive_and_sums_to_at_least_one():
    window = blending_window_1d(64, 16, ramp_start=True, ramp_end=True, dtype=torch.float32, device="cpu")
    assert window.min() > 0 and window.max() == 1
    for length, tile, overlap in [(100, 40, 10), (97, 32, 12), (1000, 256, 64)]:
        starts = tile_starts(length, tile, overlap)
        total = torch.zeros(length, dtype=torch.float64)
        for window, start in zip(tile_windows(tile, starts, overlap, torch.float64, "cpu"), starts):
            total[start : start + tile] += window
        assert total.min() >= 1 - 1e-12


# --- point 4 of the issue ---------------------------------------------------------------------------------------


def test_one_tile_equals_untiled_exactly(tiny_model):
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        untiled = tiny_model.segment_single_scale(pixel_values)[:3]
        for tile_size in [(64, 96), 128, (100, 200)]:
            tiled = segment_in_tiles(tiny_model.segment_single_scale, pixel_values, tile_size, tile_overlap=16)
            for a, b in zip(tiled, untiled):
                assert torch.equal(a, b)


def test_overlapping_tiles_reproduce_untiled_outputs_for_a_fully_convolutional_trunk():
    trunk = ToyConvolutionalTrunk().eval()
    pixel_values = torch.randn(1, 3, 150, 230)
    with torch.no_grad():
        untiled = trunk(pixel_values)[:3]
        tiled = segment_in_tiles(trunk, pixel_values, tile_size=96, tile_overlap=48)
        # the window gives a tile's 2 border pixels a weight below sin^2(pi/2 * 1.5 / 48) ~ 2.4e-3
        _assert_outputs_close(tiled, untiled, atol=5e-3)
        # without the window, the border pixels' error is the full tile-edge discrepancy
        border_error = (trunk(pixel_values[..., :96, :96])[0][..., :, 94:] - untiled[0][..., :96, 94:96]).abs().max()
        assert border_error > 10 * (tiled[0] - untiled[0]).abs().max()


def test_overlapping_tiles_reproduce_the_chained_forward_for_a_fully_convolutional_trunk(tiny_model):
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_HRNET)).eval()
    model.segment_single_scale = ToyConvolutionalTrunk(model.config.num_labels).eval()
    pixel_values = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        untiled = model(pixel_values, scales=[0.5, 1.0, 2.0], output_attentions=True, output_auxiliary_logits=True)
        tiled = model(pixel_values, scales=[0.5, 1.0, 2.0], output_attentions=True, output_auxiliary_logits=True,
                      tile_pixel_budget=64 * 64, tile_size=64, tile_overlap=32)
    torch.testing.assert_close(tiled.logits, untiled.logits, atol=1e-2, rtol=0)
    torch.testing.assert_close(tiled.auxiliary_logits, untiled.auxiliary_logits, atol=1e-2, rtol=0)
    with torch.no_grad():  # without per-scale outputs the chain writes over the tiled maps: same result
        in_place = model(pixel_values, scales=[0.5, 1.0, 2.0], tile_pixel_budget=64 * 64, tile_size=64, tile_overlap=32)
    torch.testing.assert_close(in_place.logits, tiled.logits, atol=1e-6, rtol=0)
    # the tiled scale 2.0 answers at scale 1.0's size, where the chain consumes it: compare with the untiled map resized
    assert [tuple(a.shape[-2:]) for a in tiled.attentions] == [(48, 64), (96, 128), (96, 128)]
    for a, b in zip(tiled.attentions, untiled.attentions):
        torch.testing.assert_close(a, _resize(b, a.shape[-2:]), atol=1e-2, rtol=0)


def _resize(tensor: torch.Tensor, size, align_corners: bool = False) -> torch.Tensor:
    return F.interpolate(tensor, size=tuple(size), mode="bilinear", align_corners=align_corners)


# --- tiles blended at a lower resolution (a scale above 1) ----------------------------------------------------------


def test_one_tile_at_a_lower_resolution_equals_the_resized_untiled_outputs_exactly(tiny_model):
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        untiled = tiny_model.segment_single_scale(pixel_values)[:3]
        for align_corners in (False, True):
            tiled = segment_in_tiles(tiny_model.segment_single_scale, pixel_values, 128, tile_overlap=16,
                                     output_size=(32, 48), align_corners=align_corners)
            for a, b in zip(tiled, untiled):
                assert torch.equal(a, _resize(b, (32, 48), align_corners))


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize(
    "size, output_size, tile_size, overlap",
    [((128, 192), (64, 96), 64, 16), ((90, 134), (45, 67), 40, 9), ((37, 53), (20, 30), 16, 5),
     ((200, 300), (20, 30), 16, 12), ((64, 96), (64, 48), 32, 8)],
)
def test_tiles_at_a_lower_resolution_sample_where_the_resize_of_the_whole_map_does(
    size, output_size, tile_size, overlap, align_corners
):
    pixel_values = torch.randn(2, 3, *size)
    tiled = segment_in_tiles(pointwise_segment, pixel_values, tile_size, overlap, output_size, align_corners)
    untiled = pointwise_segment(pixel_values)[:3]
    expected = [None if out is None else _resize(out, output_size, align_corners) for out in untiled]
    # PyTorch computes the sampling points in float32 (align_corners=True: up to ~1e-5 px off), these in float64;
    # the squared values reach ~20
    _assert_outputs_close(tiled, expected, atol=1e-3 if align_corners else 1e-4)


def test_tiles_without_overlap_at_a_lower_resolution_cover_every_output_pixel():
    ramp = torch.linspace(0, 1, 100)  # a smooth image: 0.01 per pixel along both axes
    pixel_values = (ramp[:, None] + ramp[None, :]).expand(1, 3, 100, 100)
    tiled = segment_in_tiles(pointwise_segment, pixel_values, 32, 0, output_size=(37, 61))
    assert all(torch.isfinite(out).all() for out in tiled if out is not None)
    # a sample between two tiles takes the nearer tile's border pixel instead of interpolating across the seam:
    # off by at most half a pixel's change (here <= 0.01 for x, 0.04 for x^2 where x <= 2)
    expected = [None if out is None else _resize(out, (37, 61)) for out in pointwise_segment(pixel_values)[:3]]
    _assert_outputs_close(tiled, expected, atol=0.05)


class _OutputShapes(TorchDispatchMode):
    """Records the shape of every tensor any operation returns while active."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for out in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(out, torch.Tensor):
                self.shapes.append(tuple(out.shape))
        return result


def test_a_tiled_scale_above_one_never_allocates_maps_of_its_own_size_and_matches_full_resolution_blending(
    monkeypatch,
):
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_HRNET)).eval()
    model.segment_single_scale = ToyConvolutionalTrunk(model.config.num_labels).eval()
    pixel_values = torch.randn(1, 3, 96, 128)
    tiling = {"tile_pixel_budget": 64 * 64, "tile_size": 64, "tile_overlap": 32, "output_auxiliary_logits": True}

    def maps_of_scale_two(shapes):
        # the resized input (3 channels) must exist at scale 2.0's size; no output map may
        return [shape for shape in shapes if shape[-2:] == (192, 256) and shape[1] != 3]

    with torch.no_grad(), _OutputShapes() as recorded:
        reduced = model(pixel_values, scales=[0.5, 1.0, 2.0], **tiling)
    assert maps_of_scale_two(recorded.shapes) == []

    # before: every tile blended at scale 2.0's own size, the chain then resizing the blend
    def full_resolution_tiles(segment, pixel_values, tile_size, tile_overlap, output_size=None, align_corners=False):
        return segment_in_tiles(segment, pixel_values, tile_size, tile_overlap)

    monkeypatch.setattr(modeling_hms, "segment_in_tiles", full_resolution_tiles)
    with torch.no_grad(), _OutputShapes() as recorded:
        full = model(pixel_values, scales=[0.5, 1.0, 2.0], **tiling)
    assert maps_of_scale_two(recorded.shapes)  # the check above does see such maps when they exist
    torch.testing.assert_close(reduced.logits, full.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(reduced.auxiliary_logits, full.auxiliary_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "scales, fusion, expected",
    [
        ([0.5, 1.0, 2.0], "hierarchical", {2.0: (96, 128)}),
        # 1.5 is tiled too, so it is reduced as well and 2.0 goes on to 1.0's size
        ([1.0, 1.5, 2.0], "hierarchical", {1.5: (96, 128), 2.0: (96, 128)}),
        ([0.5, 2.0], "hierarchical", {2.0: (96, 128)}),  # no scale in [1, 2): the input's size
        ([0.5, 1.0, 2.0], "average", {2.0: (96, 128)}),  # the baselines fuse at the input's size
    ],
)
def test_a_tiled_scale_above_one_is_blended_where_the_fusion_consumes_it(scales, fusion, expected):
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_HRNET, scale_fusion=fusion)).eval()
    model.segment_single_scale = ToyConvolutionalTrunk(model.config.num_labels).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 96, 128), scales=scales, output_attentions=True,
                        tile_pixel_budget=96 * 128, tile_size=96, tile_overlap=32)
    sizes = {scale: tuple(a.shape[-2:]) for scale, a in zip(outputs.scales, outputs.attentions)}
    assert {scale: size for scale, size in sizes.items() if scale > 1} == expected
    assert outputs.logits.shape[-2:] == (96, 128)


@pytest.mark.parametrize(
    "size, tile_size, overlap",
    [((37, 53), 16, 5), ((37, 53), (64, 20), 7), ((1, 200), 32, 8), ((45, 67), 45, 0), ((45, 67), 1000, 10)],
)
def test_odd_sizes_and_tiles_larger_than_the_image_work(size, tile_size, overlap):
    pixel_values = torch.randn(2, 3, *size)
    tiled = segment_in_tiles(pointwise_segment, pixel_values, tile_size, overlap)
    _assert_outputs_close(tiled, pointwise_segment(pixel_values)[:3], atol=1e-5)


def test_odd_sizes_through_the_model(tiny_model):
    pixel_values = torch.randn(1, 3, 45, 67)
    with torch.no_grad():
        outputs = tiny_model(pixel_values, scales=[0.5, 1.0, 2.0], output_attentions=True,
                             tile_pixel_budget=40 * 40, tile_size=40, tile_overlap=9)
    assert outputs.logits.shape == (1, 5, 45, 67) and torch.isfinite(outputs.logits).all()
    # scale 2.0 (90x134) runs as tiles blended at scale 1.0's size
    assert [tuple(a.shape[-2:]) for a in outputs.attentions] == [(22, 33), (45, 67), (45, 67)]
    assert [tuple(a.shape[-2:]) for a in outputs.scale_logits] == [(22, 33), (45, 67), (45, 67)]


def test_a_pixel_budget_smaller_than_one_tile_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match=r"tile_pixel_budget=1,000 is smaller than one tile of tile_size=64x64"):
        tiny_model(torch.randn(1, 3, 32, 32), tile_pixel_budget=1000, tile_size=64, tile_overlap=8)
    with pytest.raises(ValueError, match="tile_pixel_budget"):
        HMSConfig(**TINY_HRNET, tile_pixel_budget=1000, tile_size=64, tile_overlap=8)


@pytest.mark.parametrize(
    "settings, name",
    [({"tile_size": 0}, "tile_size"), ({"tile_size": [64, 64, 64]}, "tile_size"), ({"tile_overlap": -1}, "tile_overlap"),
     ({"tile_size": 64, "tile_overlap": 64}, "tile_overlap"), ({"tile_pixel_budget": 0}, "tile_pixel_budget"),
     ({"tile_pixel_budget": 2.5e6}, "tile_pixel_budget")],
)
def test_bad_tile_settings_name_the_field(settings, name):
    with pytest.raises(ValueError, match=name):
        HMSConfig(**TINY_HRNET, **settings)


# --- the forward: config, per call, training, hidden states ------------------------------------------------------


def _count_segment_calls(model: HMSForSemanticSegmentation) -> list[tuple[int, int]]:
    sizes: list[tuple[int, int]] = []
    segment = type(model).segment_single_scale

    def counting(pixel_values, **kwargs):
        sizes.append(tuple(pixel_values.shape[-2:]))
        return segment(model, pixel_values, **kwargs)

    model.segment_single_scale = counting
    return sizes


def test_config_option_tiles_only_the_scales_above_the_budget():
    config = HMSConfig(**TINY_HRNET, tile_pixel_budget=64 * 64, tile_size=64, tile_overlap=16)
    assert HMSConfig.from_dict(config.to_dict()).tile_pixel_budget == 64 * 64  # survives save/load
    model = HMSForSemanticSegmentation(config).eval()
    sizes = _count_segment_calls(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 96), scales=[0.5, 1.0, 2.0])
    # 2.0 -> 128x192: 3 x 4 tiles of 64x64; 1.0 -> 64x96: 1 x 2 tiles; 0.5 -> 32x48: at once
    assert sizes == [(64, 64)] * 12 + [(64, 64)] * 2 + [(32, 48)]


def test_per_call_option_overrides_the_config_and_training_never_tiles(tiny_model):
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_HRNET)).eval()
    sizes = _count_segment_calls(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 96), scales=[1.0])
        assert sizes == [(64, 96)]  # config: off
        model(torch.randn(1, 3, 64, 96), scales=[1.0], tile_pixel_budget=48 * 48, tile_size=48, tile_overlap=8)
        assert sizes[1:] == [(48, 48)] * 6  # 2 rows (0, 16) x 3 columns (0, 40, 48)
    model.train()
    sizes.clear()
    model(torch.randn(2, 3, 64, 96), scales=[0.5, 1.0], tile_pixel_budget=48 * 48, tile_size=48, tile_overlap=8)
    assert sizes == [(64, 96), (32, 48)]


def test_tile_size_in_a_call_without_a_pixel_budget_is_refused_not_ignored(tiny_model):
    for settings in ({"tile_size": 32}, {"tile_overlap": 8}):
        with pytest.raises(ValueError, match=rf"{next(iter(settings))} has no effect: tiling is off"):
            tiny_model(torch.randn(1, 3, 64, 64), scales=[1.0], **settings)


def test_hidden_states_of_a_tiled_scale_are_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match=r"output_hidden_states is not available for scales run as tiles \(\[2.0\]"):
        tiny_model(torch.randn(1, 3, 64, 64), scales=[1.0, 2.0], output_hidden_states=True,
                   tile_pixel_budget=64 * 64, tile_size=64, tile_overlap=16)


# --- the long-side policy and the command lines -------------------------------------------------------------------


def test_max_long_side_shrinks_only_larger_images():
    processor = HMSImageProcessor(max_long_side=256)
    large, small = np.zeros((300, 500, 3), np.uint8), np.zeros((100, 200, 3), np.uint8)
    assert processor(large, return_tensors="pt")["pixel_values"].shape[-2:] == (128, 256)
    assert processor(small, return_tensors="pt")["pixel_values"].shape[-2:] == (128, 192)  # size_divisor only
    assert HMSImageProcessor()(large, max_long_side=128, return_tensors="pt")["pixel_values"].shape[-2:] == (64, 128)
    assert shrink_to_long_side(torch.zeros(1, 3, 300, 500), 256).shape[-2:] == (128, 256)
    with pytest.raises(ValueError, match="max_long_side"):
        HMSImageProcessor(max_long_side=0)


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory) -> tuple[Path, Path]:
    from hms_segmentation.training.arguments import DataArguments
    from hms_segmentation.training.datasets import ensure_synthetic_dataset

    root = tmp_path_factory.mktemp("tiling")
    data_dir = root / "data"
    ensure_synthetic_dataset(DataArguments(data_dir=str(data_dir), synthetic_train_frames=1, synthetic_val_frames=2,
                                           synthetic_height=64, synthetic_width=128))
    torch.manual_seed(0)
    HMSForSemanticSegmentation(HMSConfig(**{**TINY_HRNET, "num_labels": 19})).save_pretrained(root / "model")
    return root / "model", data_dir


def test_evaluate_cli_takes_tiling_and_long_side_flags(tiny_synthetic, tmp_path, capsys):
    from hms_segmentation.training.evaluate import main as evaluate_main

    model_dir, data_dir = tiny_synthetic
    argv = ["--model", str(model_dir), "--data_dir", str(data_dir), "--scales", "0.5,1.0,2.0", "--device", "cpu"]
    tiled = ["--tile_pixel_budget", str(48 * 48), "--tile_size", "48", "--tile_overlap", "16", "--max_long_side", "96"]
    assert evaluate_main(argv + tiled + ["--output_dir", str(tmp_path / "tiled")]) == 0
    row = json.loads((tmp_path / "tiled" / "results.json").read_text())["results"][0]
    assert row["tile_pixel_budget"] == 48 * 48 and row["tile_size"] == 48 and row["max_long_side"] == 96
    assert 0 <= row["mean_iou"] <= 1 and row["images"] == 2
    assert evaluate_main(argv + ["--tile_pixel_budget", "100", "--tile_size", "48", "--tile_overlap", "16"]) == 2
    assert "tile_pixel_budget=100 is smaller than one tile" in capsys.readouterr().err


def test_demo_takes_tiling_and_long_side_flags(tmp_path, capsys):
    from hms_segmentation.demo import main as demo_main

    argv = ["--model", "hrnet_small_ocr", "--scales", "0.5,1.0", "--output-dir", str(tmp_path / "out")]
    flags = ["--tile_pixel_budget", str(64 * 64), "--tile_size", "64", "--tile_overlap", "16", "--max_long_side", "192"]
    assert demo_main(argv + flags) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["image_size"] == [256, 512]  # the label map has the image's size even when shrunk
    assert demo_main(argv + ["--overwrite", "--tile_pixel_budget", "100", "--tile_size", "64", "--tile_overlap", "16"]) == 2
    assert "tile_pixel_budget=100 is smaller than one tile" in capsys.readouterr().err


def test_tile_size_or_overlap_without_a_pixel_budget_is_refused_not_ignored():
    import argparse

    from hms_segmentation.inference_options import add_large_input_arguments, large_input_settings

    parser = argparse.ArgumentParser()
    add_large_input_arguments(parser)
    untiled_config = HMSConfig(**TINY_HRNET)  # tile_pixel_budget None: tiling off
    for argv, option in [(["--tile-size", "512"], "--tile-size 512"),
                         (["--tile_overlap", "64"], "--tile-overlap 64"),
                         # smaller than the config's overlap (256): was answered about an overlap never given
                         (["--tile-size", "128"], "--tile-size 128")]:
        with pytest.raises(ValueError, match=f"{option} has no effect: tiling is off .*pass --tile-pixel-budget"):
            large_input_settings(parser.parse_args(argv), untiled_config)
    tiling, _ = large_input_settings(parser.parse_args(["--tile-size", "512", "--tile-pixel-budget", "262144"]),
                                     untiled_config)
    assert tiling == {"tile_pixel_budget": 262144, "tile_size": 512, "tile_overlap": None}
    tiled_config = HMSConfig(**TINY_HRNET, tile_pixel_budget=512 * 512, tile_size=512, tile_overlap=128)
    assert large_input_settings(parser.parse_args(["--tile-size", "256"]), tiled_config)[0]["tile_size"] == 256
    assert large_input_settings(parser.parse_args([]), untiled_config)[0] == dict.fromkeys(
        ("tile_pixel_budget", "tile_size", "tile_overlap"))
