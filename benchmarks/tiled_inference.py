"""Tiled inference: peak memory tiled vs untiled, and what tiles cost in accuracy.

Memory: one 2048x4096 input chained over scales 0.5, 1.0, 2.0 (the 2.0 scale runs the trunk on 4096x8192 pixels),
untiled and tiled, each variant in a fresh process so that its peak resident memory (VmHWM) is its own; with CUDA,
the peak allocated GPU memory too. Random weights: memory does not depend on them.

Accuracy: tiled vs untiled predictions of trained / converted weights, for several tile sizes (overlap a quarter
of the tile, `tile_pixel_budget` = one tile, so every scale larger than a tile is tiled):
- synthetic set (labels): label agreement with the untiled prediction, and mIoU tiled minus untiled;
- street photos (no labels) with the converted parity weights: label agreement, and the mIoU of the tiled labels
  scored against the untiled ones.

    python benchmarks/tiled_inference.py --part memory
    python benchmarks/tiled_inference.py --part memory --height 1024 --width 2048 --memory-tiles 1024 512
    python benchmarks/tiled_inference.py --part memory --memory-tiles 512 --no-untiled   # one more row, kept beside

Memory rows are merged into the output file by (input, tiling): a rerun replaces its own rows and keeps the others.
    python benchmarks/tiled_inference.py --part accuracy --synthetic-model /tmp/qs/model --synthetic-data /tmp/qs/data \\
        --parity-dir ../shared/parity/hrnet_ocr --photos ../shared/data/street_photos/*.jpg
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from pathlib import Path

from process_memory import peak_resident_mib

SCALES = (0.5, 1.0, 2.0)


def _measure_memory(preset: str, height: int, width: int, tiling: dict, threads: int, device: str, queue) -> None:
    import torch

    from hms_segmentation import HMSConfig, HMSForSemanticSegmentation

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = HMSForSemanticSegmentation(HMSConfig.from_preset(preset)).eval().to(device)
    pixel_values = torch.randn(1, 3, height, width, device=device)
    baseline_mib = peak_resident_mib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        cuda_baseline = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.inference_mode():
        logits = model(pixel_values, scales=list(SCALES), **tiling).logits
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {
        "input": [1, 3, height, width],
        "tiling": tiling or None,
        "threads": threads,
        "date": time.strftime("%Y-%m-%d"),
        "load_average_1min_at_start": os.getloadavg()[0],
        "seconds": seconds,
        "peak_rss_mib": peak_resident_mib(),
        "peak_rss_above_model_and_input_mib": peak_resident_mib() - baseline_mib,
        "logits_shape": list(logits.shape),
    }
    if device == "cuda":
        row["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row["peak_cuda_above_model_and_input_mib"] = (torch.cuda.max_memory_allocated() - cuda_baseline) / 2**20
    queue.put(row)


def memory_rows(args: argparse.Namespace) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    variants = ([{}] if args.untiled else []) + [
        {"tile_pixel_budget": size * size, "tile_size": size, "tile_overlap": size // 4} for size in args.memory_tiles
    ]
    rows = []
    for tiling in variants:
        queue = context.Queue()
        process = context.Process(
            target=_measure_memory,
            args=(args.preset, args.height, args.width, tiling, args.threads, args.device, queue),
        )
        process.start()
        process.join()
        if process.exitcode != 0:
            rows.append({"tiling": tiling or None, "error": f"process exited with {process.exitcode} (out of memory?)"})
        else:
            rows.append(queue.get())
        print(rows[-1], flush=True)
    return rows


def _predict(model, pixel_values, tiling: dict):
    import torch

    with torch.inference_mode():
        return model(pixel_values, scales=list(SCALES), **tiling).logits.argmax(dim=1)


def _agreement_rows(model, samples, tile_sizes: list[int], num_labels: int, ignore_index: int) -> list[dict]:
    """samples: (pixel_values (1, 3, h, w), labels (1, h, w) or None). Untiled first, then each tile size."""
    from hms_segmentation.evaluation import ConfusionMatrixAccumulator

    untiled, seconds_untiled = [], 0.0
    for pixel_values, _ in samples:
        start = time.perf_counter()
        untiled.append(_predict(model, pixel_values, {}))
        seconds_untiled += time.perf_counter() - start

    def miou(predictions, references) -> float:
        accumulator = ConfusionMatrixAccumulator(num_labels, ignore_index=ignore_index)
        for prediction, reference in zip(predictions, references):
            accumulator.update(prediction, reference)
        return float(accumulator.compute()["mean_iou"])

    labels = [label for _, label in samples]
    has_labels = all(label is not None for label in labels)
    untiled_miou = miou(untiled, labels) if has_labels else None
    rows = [{"tile_size": None, "seconds": seconds_untiled, "mean_iou": untiled_miou}]
    for size in tile_sizes:
        tiling = {"tile_pixel_budget": size * size, "tile_size": size, "tile_overlap": size // 4}
        tiled, seconds = [], 0.0
        for pixel_values, _ in samples:
            start = time.perf_counter()
            tiled.append(_predict(model, pixel_values, tiling))
            seconds += time.perf_counter() - start
        agree = sum(int((a == b).sum()) for a, b in zip(tiled, untiled)) / sum(a.numel() for a in untiled)
        row = {
            "tile_size": size,
            "tile_overlap": size // 4,
            "seconds": seconds,
            "label_agreement": agree,
            "miou_against_untiled_labels": miou(tiled, untiled),
        }
        if has_labels:
            row["mean_iou"] = miou(tiled, labels)
            row["mean_iou_minus_untiled"] = row["mean_iou"] - untiled_miou
        rows.append(row)
        print(row, flush=True)
    return rows


def synthetic_rows(args: argparse.Namespace) -> dict:
    from hms_segmentation import HMSForSemanticSegmentation
    from hms_segmentation.training.arguments import DataArguments
    from hms_segmentation.training.datasets import build_eval_dataset

    model = HMSForSemanticSegmentation.from_pretrained(args.synthetic_model).eval()
    dataset, _ = build_eval_dataset(
        DataArguments(dataset="synthetic", data_dir=args.synthetic_data, eval_split="val",
                      max_eval_samples=args.max_samples)
    )
    samples = [(s["pixel_values"][None], s["labels"][None]) for s in (dataset[i] for i in range(len(dataset)))]
    return {
        "model": str(args.synthetic_model),
        "images": len(samples),
        "image_size": list(samples[0][0].shape[-2:]),
        "rows": _agreement_rows(model, samples, args.synthetic_tiles, model.config.num_labels,
                                model.config.ignore_index),
    }


def street_rows(args: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import load_file

    from hms_segmentation.convert_nvidia import convert_nvidia_state_dict
    from hms_segmentation.image_processing_hms import HMSImageProcessor

    stored = Path(args.parity_dir) / "reference_state_dict.safetensors"
    if not stored.exists():
        raise SystemExit(f"error: {stored} not found (only stored parity weights are supported here)")
    state_dict = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(stored)).items()}
    model = convert_nvidia_state_dict(state_dict, dataset="cityscapes").eval()
    processor = HMSImageProcessor()
    samples = [(processor(str(photo), return_tensors="pt")["pixel_values"], None) for photo in args.photos]
    torch.manual_seed(0)
    return {
        "weights": str(args.parity_dir),
        "photos": [Path(p).name for p in args.photos],
        "image_size": list(samples[0][0].shape[-2:]),
        "rows": _agreement_rows(model, samples, args.street_tiles, model.config.num_labels, model.config.ignore_index),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("memory", "accuracy", "all"), default="all")
    parser.add_argument("--preset", default="hrnet_small_ocr", help="memory part: model preset (random weights)")
    parser.add_argument("--height", type=int, default=2048)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--memory-tiles", type=int, nargs="*", default=[1024, 512], help="tile sides, memory part")
    parser.add_argument("--untiled", action=argparse.BooleanOptionalAction, default=True,
                        help="memory part: also measure the untiled forward (the slowest and largest row)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--synthetic-model", type=Path, default=None, help="trained model folder (quickstart's model/)")
    parser.add_argument("--synthetic-data", type=Path, default=None, help="its synthetic dataset root")
    parser.add_argument("--synthetic-tiles", type=int, nargs="+", default=[128, 192, 256, 384, 512])
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--parity-dir", type=Path, default=None, help="shared/parity/hrnet_ocr (converted weights)")
    parser.add_argument("--photos", type=Path, nargs="*", default=[], help="street photos (no labels)")
    parser.add_argument("--street-tiles", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--output", type=Path, default=None,
                        help="write the results as JSON here (default: print them only, so that a trial run never "
                             "overwrites the recorded figures in benchmarks/results/)")
    args = parser.parse_args(argv)

    import torch

    record = {
        "benchmark": "tiled_inference",
        "scales": list(SCALES),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.output is not None and args.output.exists():  # keep the other part's results when only one part is rerun
        record = {**json.loads(args.output.read_text()), **record}
    torch.set_num_threads(args.threads)
    if args.part in ("memory", "all"):
        new_rows = memory_rows(args)
        # rows of other inputs / variants measured earlier stay; a rerun of the same input and variant replaces its row
        measured = {(tuple(row["input"]), json.dumps(row["tiling"], sort_keys=True)) for row in new_rows}
        previous = record.get("memory", {})
        same_setup = previous.get("preset") == args.preset and previous.get("device") == args.device
        old_rows = [{"input": row.get("input", previous.get("input")), **row} for row in previous.get("rows", [])]
        kept = [
            row for row in old_rows
            if same_setup and (tuple(row["input"]), json.dumps(row["tiling"], sort_keys=True)) not in measured
        ]
        record["memory"] = {"preset": args.preset, "device": args.device, "rows": kept + new_rows}
        print(f"\n{args.preset}, input 1x3x{args.height}x{args.width}, scales {SCALES}, {args.device}")
        print(f"{'variant':<34}{'seconds':>9}{'peak RSS MiB':>14}{'above model+input':>19}")
        for row in new_rows:
            name = "untiled" if row["tiling"] is None else "tile {tile_size}, overlap {tile_overlap}".format(**row["tiling"])
            if "error" in row:
                print(f"{name:<34}{row['error']}")
                continue
            print(f"{name:<34}{row['seconds']:>9.1f}{row['peak_rss_mib']:>14.0f}"
                  f"{row['peak_rss_above_model_and_input_mib']:>19.0f}"
                  + (f"  CUDA peak {row['peak_cuda_mib']:.0f} MiB" if "peak_cuda_mib" in row else ""))
    if args.part in ("accuracy", "all"):
        if args.synthetic_model is not None:
            record["synthetic"] = synthetic_rows(args)
        if args.parity_dir is not None and args.photos:
            record["street_photos"] = street_rows(args)
        for key in ("synthetic", "street_photos"):
            if key not in record:
                continue
            print(f"\n{key}: {record[key].get('images', len(record[key].get('photos', [])))} images of "
                  f"{record[key]['image_size']}, scales {SCALES}, overlap = tile / 4, budget = one tile")
            print(f"{'tile':>6}{'agreement %':>13}{'mIoU vs untiled labels':>24}{'mIoU - untiled':>16}{'seconds':>9}")
            for row in record[key]["rows"]:
                if row["tile_size"] is None:
                    print(f"{'none':>6}{'100.00':>13}{'100.00':>24}{'':>16}{row['seconds']:>9.1f}")
                    continue
                delta = row.get("mean_iou_minus_untiled")
                print(f"{row['tile_size']:>6}{100 * row['label_agreement']:>13.2f}"
                      f"{100 * row['miou_against_untiled_labels']:>24.2f}"
                      f"{'' if delta is None else f'{100 * delta:+.2f}':>16}{row['seconds']:>9.1f}")
    if args.output is None:
        print("not written: pass --output FILE to keep these results as JSON")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
