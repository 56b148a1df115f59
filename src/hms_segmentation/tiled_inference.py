"""Tiled inference: run one scale of the attention chain as overlapping tiles, so that its peak memory depends on the
tile size rather than the image size.

At inference, [`HMSForSemanticSegmentation`] hands a scale whose resized input has more than `tile_pixel_budget`
pixels to `segment_in_tiles` instead of running the trunk on it at once. Each tile's class logits, auxiliary logits
and attention map are weighted with a smooth, strictly positive window (a raised-cosine ramp across the overlap,
flat inside) and summed; the sums are divided by the summed window weights. The blended maps then enter the attention
chain as an untiled scale's maps do. A scale above 1 is blended directly at the lower resolution where the chain
consumes it (`output_size`), so no map of its own, larger size is ever held: peak memory is then the input-sized maps
of the chain plus one tile's activations, whatever the scale.

Tiles are an approximation: a fully convolutional trunk sees less context at tile borders (the window hides most of
that), and OCR's object-context step pools class regions over the whole input it sees, i.e. over one tile. The cost
is measured in BENCHMARKS.md ("Tiled inference"), where the default tile settings come from.

This module travels to the Hugging Face Hub as remote code: it imports only torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

SegmentFunction = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]]
"""`segment_single_scale`: pixel_values (batch, 3, h, w) -> (logits, auxiliary_logits or None, attention, features)."""


@dataclass(frozen=True)
class TilingSettings:
    """
    When and how a scale runs as tiles.

    Args:
        pixel_budget: A scale whose resized input has more than this many pixels (height * width, per image) runs as
            tiles. At least one tile's pixels.
        tile_size: (height, width) of a tile in pixels of the resized input; clipped to the input where it is smaller.
        tile_overlap: Pixels shared by neighbouring tiles along each axis; `0 <= tile_overlap < min(tile_size)`.
    """

    pixel_budget: int
    tile_size: tuple[int, int]
    tile_overlap: int

    def __post_init__(self) -> None:
        tile_height, tile_width = self.tile_size
        if self.tile_overlap >= min(self.tile_size):
            raise ValueError(
                f"tile_overlap must be smaller than tile_size, got tile_overlap={self.tile_overlap} for tiles of "
                f"{tile_height}x{tile_width}"
            )
        if self.pixel_budget < tile_height * tile_width:
            raise ValueError(
                f"tile_pixel_budget={self.pixel_budget:,} is smaller than one tile of tile_size={tile_height}x"
                f"{tile_width} ({tile_height * tile_width:,} pixels): a tiled scale would still exceed the budget. "
                "Raise tile_pixel_budget or lower tile_size"
            )

    def applies_to(self, height: int, width: int) -> bool:
        """Whether an input of (height, width) exceeds the pixel budget and therefore runs as tiles."""
        return height * width > self.pixel_budget


def settings_without_effect(
    pixel_budget: int | None, config_pixel_budget: int | None, tile_size: object, tile_overlap: object
) -> list[str]:
    """The names of `tile_size` / `tile_overlap` given (not `None`) while tiling stays off (no pixel budget given, none
    in the config): they would change nothing, so the callers refuse them rather than run untiled, silently."""
    if pixel_budget is not None or config_pixel_budget is not None:
        return []
    return [name for name, value in (("tile_size", tile_size), ("tile_overlap", tile_overlap)) if value is not None]


def tiling_settings(
    pixel_budget: int | None, tile_size: int | tuple[int, int] | list[int], tile_overlap: int
) -> TilingSettings | None:
    """
    Checked [`TilingSettings`] from the config's or a call's values; `None` when `pixel_budget` is `None` (tiling
    off; `tile_size` and `tile_overlap` are checked all the same). Errors name the argument (`tile_pixel_budget`,
    `tile_size`, `tile_overlap`).
    """
    tile_size = check_tile_size(tile_size)
    tile_overlap = check_tile_overlap(tile_overlap)
    if tile_overlap >= min(tile_size):
        raise ValueError(f"tile_overlap must be smaller than tile_size, got tile_overlap={tile_overlap} for {tile_size}")
    if pixel_budget is None:
        return None
    return TilingSettings(check_tile_pixel_budget(pixel_budget), tile_size, tile_overlap)


def check_tile_pixel_budget(value: object) -> int:
    """`value` as a positive int, else a `ValueError` naming `tile_pixel_budget`."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"tile_pixel_budget must be a positive integer (pixels per image) or None, got {value!r}")
    return value


def check_tile_size(value: object) -> tuple[int, int]:
    """`value` (one side, or (height, width)) as a (height, width) tuple of positive ints, else a `ValueError`."""
    sides = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(sides, (list, tuple))
        or len(sides) != 2
        or any(isinstance(side, bool) or not isinstance(side, int) or side <= 0 for side in sides)
    ):
        raise ValueError(f"tile_size must be a positive integer or a (height, width) pair of them, got {value!r}")
    return int(sides[0]), int(sides[1])


def check_tile_overlap(value: object) -> int:
    """`value` as a non-negative int, else a `ValueError` naming `tile_overlap`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"tile_overlap must be a non-negative integer (pixels), got {value!r}")
    return value


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """
    First pixel of each tile along an axis of `length` pixels: steps of `tile - overlap` from 0, the last tile flush
    with the end (so it may overlap its neighbour by more). `tile` is clipped to `length`; one start when it fits.
    """
    tile = min(tile, length)
    if tile == length:
        return [0]
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"tile_overlap={overlap} must be smaller than the tile side {tile}")
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def blending_window_1d(
    tile: int, overlap: int, ramp_start: bool, ramp_end: bool, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """
    Weights (tile,) for one axis of one tile: 1 inside, falling along `sin^2` to near 0 (never 0) over the `overlap`
    pixels at the start (`ramp_start`) and/or end (`ramp_end`), the sides where a neighbouring tile overlaps; sides
    on the image border stay at 1. Two ramps crossing in an overlap of exactly `overlap` pixels sum to 1
    (`sin^2 + cos^2`), and to at least 1 in a wider overlap, so the blend is well conditioned; the least reliable
    pixels, at a tile's inner borders, weigh least.
    """
    weights = torch.ones(tile, dtype=torch.float64, device=device)
    if overlap > 0:
        ramp = torch.sin(0.5 * math.pi * (torch.arange(overlap, dtype=torch.float64, device=device) + 0.5) / overlap)
        ramp = ramp.square()
        if ramp_start:
            weights[:overlap] = torch.minimum(weights[:overlap], ramp)
        if ramp_end:
            weights[-overlap:] = torch.minimum(weights[-overlap:], ramp.flip(0))
    return weights.to(dtype)


def tile_windows(
    tile: int, starts: list[int], overlap: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """The 1-D blending window of each tile along an axis (no ramp on the image borders)."""
    last = len(starts) - 1
    return [
        blending_window_1d(tile, overlap, ramp_start=index > 0, ramp_end=index < last, dtype=dtype, device=device)
        for index in range(len(starts))
    ]


def segment_in_tiles(
    segment: SegmentFunction,
    pixel_values: torch.Tensor,
    tile_size: int | tuple[int, int],
    tile_overlap: int,
    output_size: tuple[int, int] | None = None,
    align_corners: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """
    Run `segment` (the model's `segment_single_scale`) on overlapping tiles of `pixel_values` and blend the outputs,
    at the input's resolution or at a smaller `output_size`.

    Tiles of `tile_size` (clipped to the input) start every `tile_size - tile_overlap` pixels, the last row/column
    flush with the border. Every output map is blended as `sum_t w_t * out_t / sum_t w_t` with the separable window
    `w = window(rows) x window(columns)` of `blending_window_1d`; as the window is strictly positive and the summed
    weights are at least 1, every pixel is well defined. When one tile covers the input, `segment` runs once on it
    and its outputs return unchanged (resized once to `output_size`, exactly as the attention chain would resize
    them).

    With `output_size` smaller than the input, no map of the input's size is ever made: each tile's outputs and window
    are resampled bilinearly onto the part of the `output_size` grid that the tile covers (the output pixels whose
    sampling point, where `F.interpolate(..., size=output_size, mode="bilinear", align_corners=align_corners)` samples
    the whole map, lies between the tile's first and last pixel centres) and blended there. That is what keeps a
    scale above 1 at the memory of its tiles: the attention chain only ever consumes it at a lower resolution.

    Args:
        segment: pixel_values (batch, 3, h, w) -> (logits (batch, num_labels, h, w), auxiliary_logits (same) or
            `None`, attention (batch, 1, h, w), features); features are dropped.
        pixel_values: (batch, 3, height, width), one scale's (already resized) input.
        tile_size: Tile side, or (height, width), in pixels.
        tile_overlap: Pixels shared by neighbouring tiles, smaller than the (clipped) tile sides.
        output_size: (out_height, out_width) of the returned maps, at most (height, width); default the input's.
        align_corners: `align_corners` of the bilinear resampling to `output_size`.

    Returns:
        `logits` (batch, num_labels, out_height, out_width), `auxiliary_logits` (same, or `None`), `attention`
        (batch, 1, out_height, out_width).
    """
    tile_height, tile_width = check_tile_size(tile_size)
    tile_overlap = check_tile_overlap(tile_overlap)
    height, width = pixel_values.shape[-2:]
    output_height, output_width = (height, width) if output_size is None else (int(output_size[0]), int(output_size[1]))
    if not (0 < output_height <= height and 0 < output_width <= width):
        raise ValueError(
            f"output_size must be positive and at most the input's {height}x{width}, got {output_height}x{output_width}"
        )
    tile_height, tile_width = min(tile_height, height), min(tile_width, width)
    if (tile_height < height and tile_overlap >= tile_height) or (tile_width < width and tile_overlap >= tile_width):
        raise ValueError(
            f"tile_overlap={tile_overlap} must be smaller than the tile sides {tile_height}x{tile_width} "
            f"(tile_size clipped to the input of {height}x{width})"
        )
    row_starts = tile_starts(height, tile_height, tile_overlap)
    column_starts = tile_starts(width, tile_width, tile_overlap)
    if len(row_starts) == 1 and len(column_starts) == 1:
        logits, auxiliary_logits, attention, _ = segment(pixel_values)
        output_size = (output_height, output_width)
        return (
            _resize(logits, output_size, align_corners),
            None if auxiliary_logits is None else _resize(auxiliary_logits, output_size, align_corners),
            _resize(attention, output_size, align_corners),
        )

    row_placements = _axis_placements(height, output_height, tile_height, row_starts, tile_overlap, align_corners)
    column_placements = _axis_placements(width, output_width, tile_width, column_starts, tile_overlap, align_corners)
    # float64 windows, cast per tile: the summed weights are exact however many tiles overlap
    row_weights = _windows_on_output_grid(tile_height, row_starts, tile_overlap, row_placements, pixel_values.device)
    column_weights = _windows_on_output_grid(
        tile_width, column_starts, tile_overlap, column_placements, pixel_values.device
    )
    sums: list[torch.Tensor | None] = []
    for row, (top, rows) in enumerate(zip(row_starts, row_placements)):
        for column, (left, columns) in enumerate(zip(column_starts, column_placements)):
            if rows.start == rows.stop or columns.start == columns.stop:
                continue  # the output grid samples nothing inside this tile (a strongly reduced output)
            tile = pixel_values[..., top : top + tile_height, left : left + tile_width]
            outputs = segment(tile)[:3]  # (logits, auxiliary_logits, attention); the tile's features are dropped
            if not sums:
                sums = [
                    None if out is None else out.new_zeros(*out.shape[:2], output_height, output_width)
                    for out in outputs
                ]
            window = (row_weights[row][:, None] * column_weights[column][None, :]).to(outputs[0].dtype)
            for total, output in zip(sums, outputs):
                if total is not None:
                    resampled = columns.resample(rows.resample(output, -2), -1)
                    total[..., rows.start : rows.stop, columns.start : columns.stop] += resampled * window
            del outputs

    # The windows are separable, so the summed weights are an outer product of two 1-D sums.
    logits_sum, auxiliary_sum, attention_sum = sums
    total_weight = (
        _summed_weights(row_weights, row_placements, output_height)[:, None]
        * _summed_weights(column_weights, column_placements, output_width)[None, :]
    ).to(logits_sum.dtype)
    return (
        logits_sum.div_(total_weight),
        None if auxiliary_sum is None else auxiliary_sum.div_(total_weight),
        attention_sum.div_(total_weight),
    )


@dataclass(frozen=True)
class _AxisPlacement:
    """
    Where one tile lands along one axis of the output grid: output pixels `[start, stop)`, each the linear
    interpolation of the tile's pixels `lower` and `upper` (tile coordinates) with weight `upper_weight` on `upper`.
    `lower` is `None` when the output grid is the input grid: the tile's pixels are the output pixels.
    """

    start: int
    stop: int
    lower: torch.Tensor | None = None
    upper: torch.Tensor | None = None
    upper_weight: torch.Tensor | None = None

    def resample(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """`tensor` (a tile's map, or its 1-D window) resampled along `dim` onto this placement's output pixels."""
        if self.lower is None:
            return tensor
        lower, upper = self.lower.to(tensor.device), self.upper.to(tensor.device)
        weight = self.upper_weight.to(device=tensor.device, dtype=tensor.dtype)
        weight = weight.reshape(-1, *([1] * (-dim - 1))) if dim < 0 else weight
        return torch.lerp(tensor.index_select(dim, lower), tensor.index_select(dim, upper), weight)


def _axis_placements(
    length: int, output_length: int, tile: int, starts: list[int], overlap: int, align_corners: bool
) -> list[_AxisPlacement]:
    """
    The placement of each tile (of `tile` pixels at `starts`) along an axis of `length` input pixels resampled to
    `output_length`. Output pixel `i` samples input coordinate `x_i` as PyTorch's bilinear resize does; a tile takes
    the `i` whose `x_i` lies within `[start, start + tile - 1]`, where it interpolates between two of its own pixels
    exactly as the resize of the whole map would. Tiles that overlap by at least a pixel cover the axis that way;
    without overlap, samples between two tiles' border pixels would belong to neither, so each tile then reaches
    half a pixel further, clamped to its border pixel (as the resize clamps at the image border).
    """
    if output_length == length:
        return [_AxisPlacement(start, start + tile) for start in starts]
    index = torch.arange(output_length, dtype=torch.float64)
    if align_corners:
        source = index * ((length - 1) / (output_length - 1) if output_length > 1 else 0.0)
    else:
        source = (index + 0.5) * (length / output_length) - 0.5
    source = source.clamp_(0, length - 1)  # float rounding must not push the last sample past the last tile
    margin = 0.5 if overlap == 0 else 0.0
    placements = []
    for start in starts:
        first = int(torch.searchsorted(source, start - margin))
        stop = int(torch.searchsorted(source, start + tile - 1 + margin, right=True))
        local = source[first:stop].clamp(start, start + tile - 1) - start
        lower = local.floor()
        upper_weight = local - lower
        lower = lower.long()
        upper = (lower + 1).clamp_(max=tile - 1)
        placements.append(_AxisPlacement(first, stop, lower, upper, upper_weight))
    return placements


def _windows_on_output_grid(
    tile: int, starts: list[int], overlap: int, placements: list[_AxisPlacement], device: torch.device
) -> list[torch.Tensor]:
    """Each tile's 1-D blending window along an axis (float64), resampled onto the output pixels it covers."""
    windows = tile_windows(tile, starts, overlap, torch.float64, device)
    return [placement.resample(window, 0) for window, placement in zip(windows, placements)]


def _resize(tensor: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    return torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=align_corners)


def _summed_weights(weights: list[torch.Tensor], placements: list[_AxisPlacement], length: int) -> torch.Tensor:
    total = weights[0].new_zeros(length)
    for tile_weights, placement in zip(weights, placements):
        total[placement.start : placement.stop] += tile_weights
    return total
