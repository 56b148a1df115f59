"""Training data pipeline throughput against the bare PIL decode of the same files.

Measures samples/s through a `torch.utils.data.DataLoader` (default collate), in one process and with
`--num-workers` workers, for:

- ``decode only``: `PIL.Image.open(...).load()` of each image and its label file, nothing else: the practical limit;
- ``train, streaming, float32``: `load_cityscapes(..., streaming=True)` -> `SegmentationTrainingStream` (read with
  checks, random scale 0.5-2.0, crop, flip, colour jitter, normalise) -> ``pixel_values`` float32 / ``labels`` int64;
- ``train, streaming, float32, bilinear``: the same with bilinear instead of the reference's bicubic image scaling;
- ``train, map-style, float32``: `load_cityscapes(...)` -> `SegmentationTrainingDataset`;
- ``train, ..., uint8``: the same with ``TrainAugmentationOptions(output_dtype="uint8")`` (the training scripts'
  default): ``pixel_values`` and ``labels`` uint8, normalised later on the device (not part of this measurement).

"1 process" compares CPU work per sample; with workers the samples (20 MB each at 1024x1024 in float32/int64, 4 MB in
uint8) must also travel to the main process. Measurements alternate and the best of `--repeats` is kept, since the
machine may be shared; the 1-minute load average is sampled before each measurement and reported. Since other jobs
slow the wall clock, the CPU time per sample (this process and its DataLoader workers, over whole passes) is reported
too: the ratio of CPU times is what the 1-process ratio of rates would be on a free core. Without ``--data-dir`` a
synthetic Cityscapes of 1024x2048 frames is generated first.

Example:
    python benchmarks/data_pipeline.py --num-frames 16 --crop-size 1024 --num-workers 2 --output data_pipeline.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import PIL
import torch
from PIL import Image

from hms_segmentation.data import (
    CityscapesOptions,
    SegmentationTrainingDataset,
    SegmentationTrainingStream,
    SegmentationTrainTransform,
    SyntheticDatasetOptions,
    TrainAugmentationOptions,
    find_cityscapes_samples,
    load_cityscapes,
    synthesize_cityscapes,
)


DECODE = "decode only (PIL, image + label)"


class DecodeOnly(torch.utils.data.Dataset):
    """The baseline: decode the image and the label file of each sample with PIL, return nothing heavy."""

    def __init__(self, pairs: list[tuple[str, str]]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> torch.Tensor:
        image_path, label_path = self.pairs[index]
        with Image.open(image_path) as image, Image.open(label_path) as label:
            image.load()
            label.load()
            return torch.tensor(image.size)


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that have exited (DataLoader workers, once shut down)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _measure(make_loader, epochs: int, batch_size: int) -> tuple[float, float]:
    """Samples/s over `epochs` passes, not counting the wait for the first batch (worker start-up), and CPU seconds
    per sample over the whole passes (first batch and worker start-up included)."""
    count, elapsed, cpu, total = 0, 0.0, 0.0, 0
    for epoch in range(epochs):
        cpu_start = _cpu_seconds()
        iterator = iter(make_loader(epoch))
        next(iterator)
        start = time.perf_counter()
        batches = sum(1 for _ in iterator)  # the exhausted iterator shuts its workers down: their CPU time counts
        elapsed += time.perf_counter() - start
        cpu += _cpu_seconds() - cpu_start
        count += batch_size * batches
        total += batch_size * (batches + 1)
    return count / elapsed, cpu / total


def _machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="A Cityscapes layout to read (default: generate a synthetic one in a temporary folder).")
    parser.add_argument("--split", default="train", help="Split of --data-dir to read.")
    parser.add_argument("--num-frames", type=int, default=24, help="Synthetic frames to generate (no --data-dir).")
    parser.add_argument("--height", type=int, default=1024, help="Synthetic frame height.")
    parser.add_argument("--width", type=int, default=2048, help="Synthetic frame width.")
    parser.add_argument("--crop-size", type=int, default=1024, help="Training crop (square).")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (also measured: 1 process).")
    parser.add_argument("--batch-size", type=int, default=1, help="DataLoader batch size (default collate).")
    parser.add_argument("--epochs", type=int, default=1, help="Passes over the frames per measurement.")
    parser.add_argument("--repeats", type=int, default=2, help="Alternating repetitions; the best is kept.")
    parser.add_argument("--output", type=Path, default=None,
                        help="Where to write the JSON (default: print the table only, so that a trial run overwrites "
                             "no earlier results).")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_argument_parser().parse_args(argv)
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as scratch:
        root = arguments.data_dir
        if root is None:
            root = Path(scratch) / "synthetic"
            start = time.perf_counter()
            synthesize_cityscapes(SyntheticDatasetOptions(root, num_train=arguments.num_frames, num_val=0,
                                                          height=arguments.height, width=arguments.width))
            print(f"generated {arguments.num_frames} frames of {arguments.height}x{arguments.width} in "
                  f"{time.perf_counter() - start:.1f} s")
        samples, _ = find_cityscapes_samples(root, arguments.split)
        options = CityscapesOptions(num_shards=len(samples), cache_dir=Path(scratch) / "hf_cache")
        stream = load_cityscapes(root, arguments.split, streaming=True, options=options)
        mapped = load_cityscapes(root, arguments.split, options=options)
        augmentation = {(dtype, resample): SegmentationTrainTransform(TrainAugmentationOptions(
            crop_size=arguments.crop_size, image_resample=resample, output_dtype=dtype))
            for dtype in ("float32", "uint8") for resample in ("bicubic", "bilinear")}
        training = {}
        for dtype in ("float32", "uint8"):
            training[f"train, streaming, {dtype}"] = SegmentationTrainingStream(
                stream, augmentation[dtype, "bicubic"], num_labels=19)
            training[f"train, streaming, {dtype}, bilinear"] = SegmentationTrainingStream(
                stream, augmentation[dtype, "bilinear"], num_labels=19)
            training[f"train, map-style, {dtype}"] = SegmentationTrainingDataset(
                mapped, augmentation[dtype, "bicubic"], num_labels=19)
        decode = DecodeOnly([(sample.image_path, sample.label_path) for sample in samples])

        def loader(dataset: torch.utils.data.Dataset, workers: int, epoch: int) -> torch.utils.data.DataLoader:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            shuffle = not isinstance(dataset, torch.utils.data.IterableDataset)
            return torch.utils.data.DataLoader(dataset, batch_size=arguments.batch_size, shuffle=shuffle,
                                               num_workers=workers)

        best: dict[str, dict[str, float]] = {}
        cpu_per_sample: dict[str, dict[str, float]] = {}
        load_averages: list[float] = []
        settings = {"1 process": 0, f"{arguments.num_workers} workers": arguments.num_workers}
        for _ in range(arguments.repeats):
            for setting, workers in settings.items():
                for name, dataset in {DECODE: decode, **training}.items():
                    load_averages.append(os.getloadavg()[0])
                    rate, cpu = _measure(functools.partial(loader, dataset, workers), arguments.epochs,
                                         arguments.batch_size)
                    best.setdefault(setting, {})[name] = max(best.get(setting, {}).get(name, 0.0), rate)
                    cpu_per_sample.setdefault(setting, {})[name] = min(cpu_per_sample.get(setting, {}).get(name, cpu),
                                                                       cpu)
        load_averages.append(os.getloadavg()[0])
        frame_size = Image.open(samples[0].image_path).size

    load = {"min": min(load_averages), "mean": sum(load_averages) / len(load_averages), "max": max(load_averages)}
    print(f"\n{len(samples)} frames of {frame_size[0]}x{frame_size[1]}, crop {arguments.crop_size}, batch "
          f"{arguments.batch_size}, best of {arguments.repeats}; samples/s (ratio to decode only)")
    print(f"{'pipeline':40s}" + "".join(f"{setting:>22s}" for setting in settings)
          + "".join(f"{setting + ': CPU ms':>26s}" for setting in settings))
    for name in best["1 process"]:
        cells = [f"{best[setting][name]:8.2f} ({best[setting][name] / best[setting][DECODE]:.2f})"
                 for setting in settings]
        cells += [f"{1e3 * cpu_per_sample[setting][name]:8.1f} "
                  f"({cpu_per_sample[setting][DECODE] / cpu_per_sample[setting][name]:.2f})" for setting in settings]
        print(f"{name:40s}" + "".join(f"{cell:>22s}" for cell in cells[:2])
              + "".join(f"{cell:>26s}" for cell in cells[2:]))
    print(f"1-minute load average over the measurements: min {load['min']:.2f}, mean {load['mean']:.2f}, "
          f"max {load['max']:.2f} ({os.cpu_count()} CPUs)")
    report = {
        "benchmark": "data_pipeline",
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
        "date": datetime.date.today().isoformat(),
        "machine": _machine(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "datasets": datasets.__version__,
        "frames": len(samples),
        "frame_size": list(frame_size),
        "crop_size": arguments.crop_size,
        "batch_size": arguments.batch_size,
        "load_average_1min": load,
        "samples_per_second": best,
        "ratio_to_decode": {setting: {name: rate / rates[DECODE] for name, rate in rates.items()}
                            for setting, rates in best.items()},
        "cpu_ms_per_sample": {setting: {name: 1e3 * cpu for name, cpu in times.items()}
                              for setting, times in cpu_per_sample.items()},
        "cpu_ratio_to_decode": {setting: {name: times[DECODE] / cpu for name, cpu in times.items()}
                                for setting, times in cpu_per_sample.items()},
    }
    if arguments.output is None:
        print("\nnot written: pass --output FILE to keep these results as JSON")
        return 0
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {arguments.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
