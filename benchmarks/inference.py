"""Chained multi-scale inference: latency, peak memory, and the share of time spent outside trunk/head forwards.

Each scale set runs in a fresh process so that its peak resident memory is its own. The "chain" time is everything
in `HMSForSemanticSegmentation.forward` except the per-scale trunk + decoder + attention-head forwards
(`segment_single_scale`): input resizes, the attention fusion and the final resize.

    python benchmarks/inference.py --preset hrnet_small_ocr --height 512 --width 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import statistics
import time
from pathlib import Path

DEFAULT_SCALE_SETS = ("1.0", "0.5,1.0", "0.5,1.0,2.0", "0.25,0.5,1.0,2.0")


def _measure(preset: str, height: int, width: int, scales: list[float], repeats: int, threads: int, queue) -> None:
    import torch

    from hms_segmentation import HMSConfig, HMSForSemanticSegmentation

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = HMSForSemanticSegmentation(HMSConfig.from_preset(preset)).eval()
    pixel_values = torch.randn(1, 3, height, width)
    segment = model.segment_single_scale
    per_scale_seconds: list[float] = []

    def timed_segment(x):
        start = time.perf_counter()
        result = segment(x)
        per_scale_seconds.append(time.perf_counter() - start)
        return result

    model.segment_single_scale = timed_segment
    baseline_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        model(pixel_values, scales=scales)  # warm-up
        totals, chains = [], []
        for _ in range(repeats):
            per_scale_seconds.clear()
            start = time.perf_counter()
            model(pixel_values, scales=scales)
            total = time.perf_counter() - start
            totals.append(total)
            chains.append(total - sum(per_scale_seconds))
    peak_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put(
        {
            "scales": scales,
            "latency_s": statistics.median(totals),
            "chain_s": statistics.median(chains),
            "chain_share": statistics.median(c / t for c, t in zip(chains, totals)),
            "peak_rss_mib": peak_rss_kb / 1024,
            "peak_rss_above_model_mib": (peak_rss_kb - baseline_rss_kb) / 1024,
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="hrnet_small_ocr", help="model preset (random weights)")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--scale-sets", nargs="+", default=list(DEFAULT_SCALE_SETS), help="comma-separated scale lists")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/inference.json"))
    args = parser.parse_args(argv)

    context = multiprocessing.get_context("spawn")
    rows = []
    for scale_set in args.scale_sets:
        scales = [float(s) for s in scale_set.split(",")]
        queue = context.Queue()
        process = context.Process(
            target=_measure, args=(args.preset, args.height, args.width, scales, args.repeats, args.threads, queue)
        )
        process.start()
        rows.append(queue.get())
        process.join()

    import torch

    print(f"{args.preset}, input 1x3x{args.height}x{args.width}, {args.threads} threads, median of {args.repeats}")
    print(f"{'scales':<20}{'latency s':>11}{'chain s':>10}{'chain %':>9}{'peak RSS MiB':>14}{'above model':>13}")
    for row in rows:
        print(f"{','.join(map(str, row['scales'])):<20}{row['latency_s']:>11.3f}{row['chain_s']:>10.4f}"
              f"{100 * row['chain_share']:>8.2f}%{row['peak_rss_mib']:>14.0f}{row['peak_rss_above_model_mib']:>13.0f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "inference",
        "preset": args.preset,
        "input": [1, 3, args.height, args.width],
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    args.output.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
