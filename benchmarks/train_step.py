"""Training-step throughput and peak memory: forward + backward + SGD step on the two training scales.

Each configuration runs in a fresh process (peak RSS, or peak CUDA memory, is its own). Side by side in one run:
the primary loss (RMI vs cross-entropy) and, on a GPU, fp32 vs fp16 autocast.

    python benchmarks/train_step.py --preset hrnet_small_ocr --crop-size 512 --batch-size 2 --steps 5
    python benchmarks/train_step.py --device cuda --preset hrnet_w48_ocr --crop-size 1024 --batch-size 2 --precision fp16
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import time
from pathlib import Path


def _measure(config: dict, queue) -> None:
    import torch

    from hms_segmentation import HMSConfig, HMSForSemanticSegmentation

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    device = torch.device(config["device"])
    model = HMSForSemanticSegmentation(
        HMSConfig.from_preset(config["preset"], primary_loss=config["loss"])
    ).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    size = config["crop_size"]
    pixel_values = torch.randn(config["batch_size"], 3, size, size, device=device)
    labels = torch.randint(0, model.config.num_labels, (config["batch_size"], size, size), device=device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config["precision"])
    scaler = torch.amp.GradScaler(device.type, enabled=config["precision"] == "fp16")

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(pixel_values, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize()
    start = time.perf_counter()
    for _ in range(config["steps"]):
        step()
    synchronize()
    seconds = (time.perf_counter() - start) / config["steps"]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    queue.put({**config, "seconds_per_step": seconds, "samples_per_second": config["batch_size"] / seconds,
               "peak_memory_mib": peak, "memory_kind": "cuda max allocated" if device.type == "cuda" else "peak RSS"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="hrnet_small_ocr")
    parser.add_argument("--crop-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--losses", nargs="+", default=["rmi", "cross_entropy"], choices=["rmi", "cross_entropy"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/train_step.json"))
    args = parser.parse_args(argv)

    context = multiprocessing.get_context("spawn")
    rows = []
    for precision in args.precision:
        for loss in args.losses:
            config = {"preset": args.preset, "crop_size": args.crop_size, "batch_size": args.batch_size,
                      "steps": args.steps, "device": args.device, "precision": precision, "loss": loss,
                      "threads": args.threads}
            queue = context.Queue()
            process = context.Process(target=_measure, args=(config, queue))
            process.start()
            rows.append(queue.get())
            process.join()

    import torch

    print(f"{args.preset}, crop {args.crop_size}, batch {args.batch_size}, scales 0.5+1.0, {args.device}, "
          f"mean of {args.steps} steps")
    print(f"{'precision':<10}{'loss':<15}{'s/step':>9}{'samples/s':>11}{'peak MiB':>10}")
    for row in rows:
        print(f"{row['precision']:<10}{row['loss']:<15}{row['seconds_per_step']:>9.3f}"
              f"{row['samples_per_second']:>11.2f}{row['peak_memory_mib']:>10.0f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"benchmark": "train_step", "torch": torch.__version__,
                                       "machine": platform.processor() or platform.machine(),
                                       "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
