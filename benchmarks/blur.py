"""Cost of the training blur (the reference's ``--gblur``) per 1024x1024 crop, against PIL's Gaussian blur.

The blur runs on the float32 tensor after the colour jitter (`hms_segmentation.data.transforms.gaussian_blur_`, the
reference's order and scikit-image kernel): on the device for uint8 samples, in the DataLoader workers for float32
ones. Before, PIL's ``ImageFilter.GaussianBlur`` blurred the 8-bit crop in the workers, before the jitter: that is the
baseline here. Each row is the median over `--repeats` runs, rows interleaved, on `--threads` torch threads, at the
smallest, middle and largest sigma of the reference's range (0.15 to 1.3 pixels).

Example:
    python benchmarks/blur.py --repeats 15 --output benchmarks/results/blur.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, ImageFilter

from hms_segmentation.data.transforms import gaussian_blur_

SIGMAS = (0.15, 0.725, 1.3)


def _median_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="Side of the square crop.")
    parser.add_argument("--repeats", type=int, default=15, help="Runs per row; the median is reported.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (PIL blurs on one).")
    parser.add_argument("--output", type=Path, default=None,
                        help="Where to write the JSON (default: print the rows only, so that a trial run overwrites "
                             "no earlier results).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_argument_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    image = Image.fromarray(crop)
    pixels = torch.from_numpy(crop).permute(2, 0, 1).float().contiguous()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for sigma in SIGMAS:
        def pil_blur(sigma=sigma):
            image.filter(ImageFilter.GaussianBlur(radius=sigma))

        timings = {"PIL GaussianBlur, 8-bit (before)": [], **{f"gaussian_blur_, float32, {d}": [] for d in devices}}
        copies = {device: pixels.to(device) for device in devices}
        for _ in range(args.repeats):  # interleaved, one run of each per round
            timings["PIL GaussianBlur, 8-bit (before)"].append(_median_ms(pil_blur, 1))
            for device in devices:
                def ours(device=device, sigma=sigma):
                    gaussian_blur_(copies[device], torch.tensor(sigma))
                    if device == "cuda":
                        torch.cuda.synchronize()
                timings[f"gaussian_blur_, float32, {device}"].append(_median_ms(ours, 1))
        baseline = statistics.median(timings["PIL GaussianBlur, 8-bit (before)"])
        for name, values in timings.items():
            median = statistics.median(values)
            rows.append({"sigma": sigma, "method": name, "ms": round(median, 2), "ratio": round(median / baseline, 2)})
    for row in rows:
        print(f"sigma {row['sigma']:<5} {row['method']:<36} {row['ms']:8.2f} ms  x{row['ratio']}")
    result = {"size": args.size, "repeats": args.repeats, "threads": args.threads, "rows": rows,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "pillow": PIL.__version__, "date": datetime.date.today().isoformat()}
    if "cuda" in devices:  # which card gave the CUDA rows
        result["gpu"] = torch.cuda.get_device_name()
    if args.output is None:
        print("not written: pass --output FILE to keep these results as JSON")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
