"""Command-line options shared by the tools that run inference (demo, evaluate, autolabel).

Large inputs: two ways to keep multi-scale inference within memory (see the README, "Large images"): run each scale
above a pixel budget as overlapping tiles (`--tile-pixel-budget`, `--tile-size`, `--tile-overlap`; defaults from the
model config), or shrink inputs whose longer side exceeds `--max-long-side` before inference.

Long jobs (evaluate, autolabel): `--torch-compile` compiles the model's forward with `torch.compile`, the inference
counterpart of the training scripts' `--torch_compile` (same option names, and a backend or mode implies it).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from .configuration_hms import HMSConfig
from .image_processing_hms import shrink_to_long_side
from .tiled_inference import settings_without_effect, tiling_settings

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
        ValueError: Naming the option and the value; also for `--tile-size` or `--tile-overlap` while tiling is off
            (no `--tile-pixel-budget` and none in `config`), where they would change nothing.
    """
    tiling = {name: getattr(args, name) for name in TILING_ARGUMENTS}
    # first: with tiling off, a tile size smaller than the config's overlap would be answered about the overlap
    unused = settings_without_effect(tiling["tile_pixel_budget"], config.tile_pixel_budget, tiling["tile_size"],
                                     tiling["tile_overlap"])
    if unused:
        raise ValueError(
            f"--{unused[0].replace('_', '-')} {tiling[unused[0]]} has no effect: tiling is off (the model config's "
            "tile_pixel_budget is None); pass --tile-pixel-budget, the pixels above which a scale runs as tiles"
        )
    tiling_settings(*(getattr(config, name) if value is None else value for name, value in tiling.items()))
    shrink_to_long_side(torch.zeros(1, 1, 1, 1), args.max_long_side)
    return tiling, args.max_long_side


def add_compile_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--torch-compile`, `--torch-compile-backend` and `--torch-compile-mode` to `parser` (one argument group)."""
    group = parser.add_argument_group(
        "torch.compile (pays on long runs of same-size images: each new input size or scale list compiles again)")
    group.add_argument("--torch-compile", "--torch_compile", dest="torch_compile", action="store_true",
                       help="compile the model's forward with torch.compile (the first batch of each input size "
                            "compiles: seconds to minutes)")
    group.add_argument("--torch-compile-backend", "--torch_compile_backend", dest="torch_compile_backend",
                       default=None, help="torch.compile backend (default: inductor); implies --torch-compile")
    group.add_argument("--torch-compile-mode", "--torch_compile_mode", dest="torch_compile_mode", default=None,
                       help="torch.compile mode, e.g. reduce-overhead or max-autotune; implies --torch-compile")


def compile_settings(args: argparse.Namespace) -> dict[str, str | None] | None:
    """`torch.compile`'s `backend` and `mode` for the parsed options, or `None` without compilation; checked now, so a
    bad backend or mode is reported before the model and any image are read.

    Raises:
        ValueError: Naming the option and the value.
    """
    if not (args.torch_compile or args.torch_compile_backend or args.torch_compile_mode):
        return None
    settings = {"backend": args.torch_compile_backend or "inductor", "mode": args.torch_compile_mode}
    # torch.compile checks the names when it wraps (it compiles nothing until called)
    for option, checked in (("--torch-compile-backend", {"backend": settings["backend"]}),
                            ("--torch-compile-mode", settings)):
        try:
            torch.compile(torch.nn.Identity(), **checked)
        except Exception as error:  # torch raises its own InvalidBackend / RuntimeError types
            raise ValueError(f"{option}: {error}") from error
    return settings


def compile_for_inference(model: torch.nn.Module, settings: dict[str, str | None] | None) -> torch.nn.Module:
    """`model` with its forward compiled in place (`nn.Module.compile`, so it stays the same object and class) when
    `settings` (from `compile_settings`) asks for it.

    Static graphs (`dynamic=False`): one per input size and scale list, each a single graph. Dynamo's automatic dynamic
    shapes would instead trace the scales of a second list as symbolic floats, which the chain's sorting of its scales
    cannot take (a graph break per call). Past `torch._dynamo.config.recompile_limit` graphs the forward runs eagerly.
    """
    if settings is not None:
        model.compile(**settings, dynamic=False)
    return model
