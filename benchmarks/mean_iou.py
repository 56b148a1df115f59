"""Benchmark: mean IoU over 100 Cityscapes-sized label maps, ours (torch confusion matrix) against the usual ways.

    python benchmarks/mean_iou.py                      # 100 maps of 1024x2048, 19 classes, CPU, 1 torch thread
    python benchmarks/mean_iou.py --output miou.json   # also write every figure as JSON
    python benchmarks/mean_iou.py --device cuda        # adds ours on the GPU, maps already in GPU memory

Methods, all on the same uint8 maps (trainIds, 255 = ignore), all checked to give the same per-class IoU:

- ``copy``: ``np.copyto`` of both maps into preallocated buffers, the memory-bandwidth limit of any method that
  reads them once;
- ``ours``: ``ConfusionMatrixAccumulator.update`` image by image, then ``compute``, with its default CPU backend
  (the compiled kernel of ``hms_segmentation.confusion_kernel``); ``ours, batches``: the same fed ``--batch-size``
  maps at a time; ``ours, Trainer dtypes``: int32 predictions and int64 labels (what
  ``preprocess_logits_for_metrics`` and the data pipeline give), on the first ``--typed-images`` maps;
- ``ours_threads``: ``ours`` with ``num_threads=--kernel-threads`` (bands of rows of each map counted side by side);
- ``ours_torch``: the same accumulator with ``backend="torch"`` (``torch.bincount``, the way without numba);
- ``bincount_floor``: only the ``torch.bincount`` of the torch backend, on keys computed beforehand (same 4-lane
  int16 layout), on the first ``--typed-images`` maps: the part of its time that its other steps cannot reduce;
- ``ours_device``, with ``--device cuda``: the accumulator on the GPU (``torch.bincount`` there), the maps already in
  GPU memory; each round ends with ``compute``, which copies the matrix to the CPU and so waits for the GPU;
- ``ours_noise`` and ``ours_torch_noise``: both backends on ``--typed-images`` maps of white noise (uniform random
  classes, no pixel like its neighbours), the kernel's worst case: it counts where pixels differ from the pixel above;
- ``numpy``: `evaluate`'s ``mean_iou`` algorithm (per-image ``np.histogram`` of intersection, prediction and label),
  the faithful copy kept in ``tests/test_evaluation.py``;
- ``cityscapesscripts``: its ``evaluateImgLists`` / ``evaluatePair`` (its numpy path, ``np.unique`` of encoded pairs:
  the pip wheel has no Cython module) on labelIds, on the first ``--cityscapes-images`` maps (default: all) with PNG
  loading replaced by in-memory images (``np.array`` of a PIL image is still paid, as in the original); skipped when
  the package is missing.

Maps: 32x32-pixel blocks of random classes, ~8% of 16x16 blocks ignored; predictions are the references shifted by
(3, 5) pixels with ~10% of 16x16 blocks replaced by a random class, a class on ignored pixels. Each method runs over
its images once per round, rounds interleaved (machine load hits all alike); the table gives the median per-image time
over rounds. The maps stay in memory (2 x 100 x 2 MiB), so every method reads them from DRAM, not from cache.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hms_segmentation.evaluation import ConfusionMatrixAccumulator
from hms_segmentation.label_tables import CITYSCAPES_ID2LABEL, CITYSCAPES_TRAIN_LABELS, IGNORE_INDEX

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the numpy reference lives with the tests that check it
from test_evaluation import evaluate_reference_mean_iou  # noqa: E402

METHODS = {
    "copy": "np.copyto of both maps (bandwidth limit)",
    "ours": "ours: ConfusionMatrixAccumulator, per image",
    "ours_batches": "ours: ConfusionMatrixAccumulator, batches",
    "ours_trainer_dtypes": "ours: int32 predictions, int64 labels",
    "ours_threads": "ours: ConfusionMatrixAccumulator, per image, num_threads=--kernel-threads",
    "ours_torch": "ours, backend='torch' (torch.bincount), per image",
    "ours_device": "ours on the GPU (maps in GPU memory), per image",
    "ours_noise": "ours on white-noise maps (worst case)",
    "ours_torch_noise": "ours, backend='torch', on white-noise maps",
    "bincount_floor": "torch.bincount alone, on precomputed keys",
    "numpy": "numpy per-image histograms (evaluate's algorithm)",
    "cityscapesscripts": "cityscapesscripts evaluatePair (labelIds)",
}


def make_maps(
    num_images: int, height: int, width: int, num_labels: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, references) uint8 of shape `(num_images, height, width)`, built image by image."""
    predictions = torch.empty(num_images, height, width, dtype=torch.uint8)
    references = torch.empty_like(predictions)

    def blocks(generator: torch.Generator, size: int, high: int) -> torch.Tensor:
        grid = torch.randint(0, high, (height // size + 1, width // size + 1), generator=generator, dtype=torch.uint8)
        return grid.repeat_interleave(size, 0).repeat_interleave(size, 1)[:height, :width]

    for index in range(num_images):
        generator = torch.Generator().manual_seed(seed + index)
        classes = blocks(generator, 32, num_labels)
        ignored = blocks(generator, 16, 100) < 8
        references[index] = classes.masked_fill(ignored, IGNORE_INDEX)
        prediction = torch.roll(classes, shifts=(3, 5), dims=(0, 1))
        replaced = blocks(generator, 16, 100) < 10
        predictions[index] = torch.where(replaced, blocks(generator, 16, num_labels), prediction)
    return predictions, references


def time_rounds(functions: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per round for each function, rounds interleaved; one untimed warm-up call each first."""
    for function in functions.values():
        function()
    seconds: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def cityscapes_evaluator(predictions: np.ndarray, references: np.ndarray) -> Callable[[], dict[str, float]] | None:
    """A call of cityscapesscripts' evaluateImgLists on in-memory labelId images; None when it is not installed."""
    try:
        from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as module
    except ImportError:
        return None
    from PIL import Image

    train_to_label_id = np.zeros(256, dtype=np.uint8)  # 255 (ignore) -> 0 "unlabeled", ignoreInEval
    train_to_label_id[: len(CITYSCAPES_TRAIN_LABELS)] = [label.id for label in CITYSCAPES_TRAIN_LABELS]
    prediction_images = [Image.fromarray(train_to_label_id[map_]) for map_ in predictions]
    reference_images = [Image.fromarray(train_to_label_id[map_]) for map_ in references]
    args = module.CArgs()
    args.__dict__.update(module.args.__dict__)
    args.evalInstLevelScore = args.evalPixelAccuracy = args.JSONOutput = args.colorized = False
    args.quiet, args.bold, args.nocol = True, "", ""

    class InMemoryImage:  # stands in for PIL.Image in the evaluator: "opening" returns the image handed over
        @staticmethod
        def open(image: Image.Image) -> Image.Image:
            return image

    def evaluate() -> dict[str, float]:
        module.Image, original = InMemoryImage, module.Image
        try:
            return module.evaluateImgLists(prediction_images, reference_images, args)["classScores"]
        finally:
            module.Image = original

    return evaluate


def machine_description(device: str = "cpu") -> dict[str, object]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lscpu.splitlines())}
    except (OSError, subprocess.CalledProcessError):
        fields = {}
    description = {
        "cpu": fields.get("Model name", platform.processor()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "numba": _version_of("numba"),
        "python": platform.python_version(),
        # other engineers share this machine's cores: the load says how busy it was
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if torch.device(device).type == "cuda":  # which card gave the GPU row
        description["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return description


def _version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--num-labels", type=int, default=19)
    parser.add_argument("--batch-size", type=int, default=4, help="maps per update for 'ours, batches' (default: 4)")
    parser.add_argument("--typed-images", type=int, default=10, help="maps for 'ours, Trainer dtypes' (default: 10)")
    parser.add_argument("--cityscapes-images", type=int, default=100, help="maps for cityscapesscripts (default: 100)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: 1)")
    parser.add_argument("--kernel-threads", type=int, default=2,
                        help="num_threads of the compiled counter for 'ours, kernel threads' (default: 2)")
    parser.add_argument("--device", default="cpu", help="also time ours on this device, e.g. cuda (default: cpu only)")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.num_labels
    predictions, references = make_maps(args.num_images, args.height, args.width, n)
    predictions_np, references_np = predictions.numpy(), references.numpy()
    typed_predictions = predictions[: args.typed_images].to(torch.int32)
    typed_references = references[: args.typed_images].to(torch.int64)
    noise = torch.Generator().manual_seed(1)
    noise_predictions, noise_references = (
        torch.randint(0, n, (args.typed_images, args.height, args.width), generator=noise, dtype=torch.uint8)
        for _ in range(2)
    )
    copy_buffers = (np.empty_like(predictions_np[0]), np.empty_like(references_np[0]))
    lane_bins = 256 * n  # the layout of ConfusionMatrixAccumulator._count for uint8 references, 4 lanes
    lanes = (torch.arange(args.height * args.width) % 4 * lane_bins).to(torch.int16).view(args.height, args.width)
    precomputed_keys = [(lanes + references[i].to(torch.int16) * n + predictions[i]).view(-1)
                        for i in range(args.typed_images)]

    def copy() -> None:
        for prediction, reference in zip(predictions_np, references_np):
            np.copyto(copy_buffers[0], prediction)
            np.copyto(copy_buffers[1], reference)

    def ours(
        preds: torch.Tensor, refs: torch.Tensor, batch_size: int, backend: str = "auto", num_threads: int = 1
    ) -> Callable[[], dict]:
        accumulator = ConfusionMatrixAccumulator(n, backend=backend, num_threads=num_threads)

        def run() -> dict:
            accumulator.reset()
            for start in range(0, len(preds), batch_size):
                accumulator.update(preds[start : start + batch_size], refs[start : start + batch_size])
            return accumulator.compute()

        return run

    functions: dict[str, Callable[[], object]] = {
        "copy": copy,
        "ours": ours(predictions, references, 1),
        "ours_batches": ours(predictions, references, args.batch_size),
        "ours_trainer_dtypes": ours(typed_predictions, typed_references, 1),
        "ours_threads": ours(predictions, references, 1, num_threads=args.kernel_threads),
        "ours_torch": ours(predictions, references, 1, backend="torch"),
        "ours_noise": ours(noise_predictions, noise_references, 1),
        "ours_torch_noise": ours(noise_predictions, noise_references, 1, backend="torch"),
        "bincount_floor": lambda: [torch.bincount(keys, minlength=4 * lane_bins) for keys in precomputed_keys],
        "numpy": lambda: evaluate_reference_mean_iou(predictions_np, references_np, n, IGNORE_INDEX),
    }
    if torch.device(args.device).type != "cpu":
        device_maps = (predictions.to(args.device), references.to(args.device))
        functions["ours_device"] = ours(*device_maps, 1)
    images = {name: args.num_images for name in functions}
    for name in ("ours_trainer_dtypes", "bincount_floor", "ours_noise", "ours_torch_noise"):
        images[name] = len(typed_predictions)
    cityscapes = cityscapes_evaluator(predictions_np[: args.cityscapes_images], references_np[: args.cityscapes_images])
    if cityscapes is not None and args.cityscapes_images > 0:
        functions["cityscapesscripts"] = cityscapes
        images["cityscapesscripts"] = args.cityscapes_images

    checks = check_values(functions, predictions, references, args)
    seconds = time_rounds(functions, args.rounds)
    per_image_ms = {name: [1e3 * s / images[name] for s in runs] for name, runs in seconds.items()}
    median_ms = {name: statistics.median(runs) for name, runs in per_image_ms.items()}
    results = {
        "command": " ".join(["python", "benchmarks/mean_iou.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(args.device),
        "shape": {"num_images": args.num_images, "height": args.height, "width": args.width, "num_labels": n},
        "rounds": args.rounds,
        "kernel_threads": args.kernel_threads,
        "checks": checks,
        "methods": {
            name: {
                "description": METHODS[name],
                "images": images[name],
                "per_image_ms": per_image_ms[name],
                "median_per_image_ms": median_ms[name],
                "ratio_to_ours": median_ms[name] / median_ms["ours"],
                "ratio_to_copy": median_ms[name] / median_ms["copy"],
            }
            for name in functions
        },
    }
    print(format_table(results))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.output}")


def check_values(
    functions: dict, predictions: torch.Tensor, references: torch.Tensor, args: argparse.Namespace
) -> dict[str, str]:
    """Every method's per-class IoU equals ours on the same images (exactly); raises otherwise."""
    n = args.num_labels
    ours = functions["ours"]()
    numpy_metrics = functions["numpy"]()
    for key, value in ours.items():
        np.testing.assert_array_equal(value, numpy_metrics[key], err_msg=f"numpy {key}")
    for name in ("ours_batches", "ours_threads", "ours_torch"):
        for key, value in functions[name]().items():
            np.testing.assert_array_equal(value, ours[key], err_msg=f"{name} {key}")
    for key, value in functions["ours_torch_noise"]().items():
        np.testing.assert_array_equal(value, functions["ours_noise"]()[key], err_msg=f"noise maps {key}")
    typed = ConfusionMatrixAccumulator(n)
    typed.update(predictions[: args.typed_images], references[: args.typed_images])
    typed_metrics = typed.compute()
    for key, value in functions["ours_trainer_dtypes"]().items():
        np.testing.assert_array_equal(value, typed_metrics[key], err_msg=f"ours_trainer_dtypes {key}")
    floor = sum(functions["bincount_floor"]()).view(4, 256, n).sum(0)[:n]
    np.testing.assert_array_equal(floor.numpy(), typed.confusion_matrix.numpy())
    checks = {"numpy": "all keys bit-identical", "ours_batches": "all keys bit-identical",
              "ours_trainer_dtypes": "all keys bit-identical to uint8 maps",
              "ours_threads": "all keys bit-identical", "ours_torch": "all keys bit-identical",
              "ours_noise": "all keys bit-identical to backend='torch'", "bincount_floor": "same confusion matrix"}
    if "ours_device" in functions:
        for key, value in functions["ours_device"]().items():
            np.testing.assert_array_equal(value, ours[key], err_msg=f"{args.device} {key}")
        checks["ours_device"] = "all keys bit-identical"
    if "cityscapesscripts" in functions:
        subset = ConfusionMatrixAccumulator(n)
        subset.update(predictions[: args.cityscapes_images], references[: args.cityscapes_images])
        class_scores = functions["cityscapesscripts"]()
        expected = subset.compute()["per_category_iou"]
        np.testing.assert_array_equal([class_scores[CITYSCAPES_ID2LABEL[i]] for i in range(n)], expected)
        checks["cityscapesscripts"] = f"per-class IoU bit-identical on the first {args.cityscapes_images} maps"
    return checks


def format_table(results: dict) -> str:
    shape, machine = results["shape"], results["machine"]
    lines = [
        f"mean IoU over {shape['num_images']} maps of {shape['height']}x{shape['width']}, "
        f"{shape['num_labels']} classes, uint8; median per-image time of {results['rounds']} interleaved rounds; "
        f"{machine['cpu']}, {machine['torch_threads']} torch thread(s), torch {machine['torch']}, "
        f"load {machine['load_average_1min']}",
        "",
        "| method | maps | ms / map | × ours | × copy |",
        "|---|---:|---:|---:|---:|",
    ]
    for entry in results["methods"].values():
        lines.append(
            f"| {entry['description']} | {entry['images']} | {entry['median_per_image_ms']:.2f} "
            f"| {entry['ratio_to_ours']:.1f} | {entry['ratio_to_copy']:.1f} |"
        )
    lines += ["", "values: " + "; ".join(f"{name}: {check}" for name, check in results["checks"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
