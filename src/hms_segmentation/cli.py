"""The `hms-segmentation` console script: one entry point, one subcommand per tool.

Each subcommand is also a module with a `main(argv)` function, runnable as `python -m <module>` so that
`accelerate launch -m` / `torchrun -m` can start it.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("hms_segmentation.training.quickstart", "synthesize data, train a small model on CPU, evaluate it"),
    "synthesize": ("hms_segmentation.data.synthesize", "write the procedural street-scene dataset (Cityscapes layout)"),
    "train": ("hms_segmentation.training.train", "train / evaluate with transformers.Trainer"),
    "train-accelerate": ("hms_segmentation.training.train_accelerate", "train with the explicit Accelerate loop"),
    "evaluate": ("hms_segmentation.training.evaluate", "mIoU of a checkpoint at one or more scale lists (+flip)"),
    "autolabel": ("hms_segmentation.autolabel", "label unlabelled images with a teacher, keeping confident pixels"),
    "demo": ("hms_segmentation.demo", "chained multi-scale inference on an image; saves labels and attention maps"),
    "export-onnx": ("hms_segmentation.export_onnx", "export the chained inference as one ONNX graph (onnxruntime)"),
    "convert-nvidia": ("hms_segmentation.convert_nvidia", "convert an NVIDIA/semantic-segmentation checkpoint"),
    "push": ("hms_segmentation.hub", "publish a model folder (weights, config, processor, code, card) in one commit"),
}


def _usage() -> str:
    lines = ["usage: hms-segmentation <subcommand> [options]", "", "subcommands:"]
    width = max(map(len, SUBCOMMANDS)) + 2  # at least two spaces between the longest name and its summary
    lines += [f"  {name:<{width}}{summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    lines += ["", "`hms-segmentation <subcommand> --help` describes each."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"hms-segmentation: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    # Parsers that take their program name from sys.argv[0] (HfArgumentParser: "train.py") then print the command the
    # user typed in their usage line and errors.
    saved_argv = list(sys.argv)
    sys.argv[:1] = [f"hms-segmentation {name}"]
    try:
        return int(module.main(rest) or 0)
    finally:
        sys.argv[:] = saved_argv


if __name__ == "__main__":
    raise SystemExit(main())
