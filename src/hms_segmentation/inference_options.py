"""Command-line options for large inputs, shared by every tool that runs inference (demo, evaluate, autolabel).

Two ways to keep multi-scale inference within memory (see the README, "Large images"): run each scale above a pixel
budget as overlapping tiles (`--tile-pixel-budget`, `--tile-size`, `--tile-overlap`; defaults from the model config), or
shrink inputs whose longer side exceeds `--max-long-side` before inference.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from .configuration_hms import HMSConfig
from .image_processing_hms import shrink_to_long_side
from .tiled_inference import tiling_settings

TILING_ARGUMENTS = ("tile_pixel_budget", "tile_size", "tile_overlap")


def add_large_input_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the tiling and long-side options to `parser`, as one argument group."""
    group = parser.add_argument_group("large inputs (see the README: tiled inference or a long-side limit)")
    group.add_argument("--tile-pixel-budget", "--tile_pixel_budget", dest="tile_pixel_budget", type=int, default=None,
                       help="run each scale whose input has more pixels than this as overlapping tiles "
                            "(default: the model config's tile_pixel_budget, usually off)")
    group.add_argument("--tile-size", "--tile_size", dest="tile_size", type=int, default=None,
                       help="tile side in pixels (default: the model config's tile_size)")
    group.add_argument("--tile-overlap", "--tile_overlap", dest="tile_overlap", type=int, default=None,
                       help="pixels shared by neighbouring tiles (default: the model config's tile_overlap)")
    group.add_argument("--max-long-side", "--max_long_side", dest="max_long_side", type=int, default=None,
                       help="shrink inputs whose longer side exceeds this before inference")


def large_input_settings(args: argparse.Namespace, config: HMSConfig) -> tuple[dict[str, Any], int | None]:
    """
    The tiling keyword arguments for the model's forward (`None` values fall back to `config`) and `max_long_side`,
    checked against `config` now, so a bad value is reported before any image is read.

    Raises:
        ValueError: Naming the option and the value.
    """
    tiling = {name: getattr(args, name) for name in TILING_ARGUMENTS}
    tiling_settings(*(getattr(config, name) if value is None else value for name, value in tiling.items()))
    shrink_to_long_side(torch.zeros(1, 1, 1, 1), args.max_long_side)
    return tiling, args.max_long_side
