"""Training-step throughput and peak memory: forward + backward + SGD step on the training scales.

Each configuration runs in a fresh process (peak RSS, or peak CUDA memory, is its own); `--rounds` repeats every
configuration in interleaved order and keeps the fastest round, so a busy machine slows all of them alike. Side by side
in one run: the primary loss (RMI vs cross-entropy), on a GPU fp32 vs fp16 autocast, the multi-scale fusion scheme
(`--fusions`: HMSA's hierarchical attention trains on 0.5+1.0, the baselines (explicit attention over scales, Chen et
al. 2016; average; max) train on all the scales they infer on, 0.5+1.0+2.0), and `--variants eager compile`
(`torch.compile(model)`, inductor, what `--torch_compile` does in the training scripts: its compilation is the warm-up
step, reported apart as "first step s"). Memory is the peak of the timed steps after the warm-up, and "step memory"
that peak less what was held before the warm-up (model, optimizer, inputs): on CPU the resident peak (reset after the
warm-up) less the resident size, on CUDA `torch.cuda.max_memory_allocated` less the memory allocated then; gradients,
optimizer state, compiled code and caches count, the compilation's own peak is reported apart. A configuration that
fails (out of memory, an op without a kernel) is reported as such and the others still run; the exit code is then 1.

    python benchmarks/train_step.py --preset hrnet_small_ocr --crop-size 512 --batch-size 2 --steps 5
    python benchmarks/train_step.py --device cuda --preset hrnet_w48_ocr --crop-size 1024 --batch-size 2 --precision fp16
    python benchmarks/train_step.py --fusions hierarchical explicit average max --losses cross_entropy --rounds 2
    python benchmarks/train_step.py --crop-size 512 --variants eager compile --losses rmi cross_entropy
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import time
from pathlib import Path

from process_memory import peak_resident_mib, reset_peak_resident, resident_mib

FUSION_TRAINING_SCALES = {"hierarchical": [0.5, 1.0], "explicit": [0.5, 1.0, 2.0], "average": [0.5, 1.0, 2.0],
                          "max": [0.5, 1.0, 2.0]}


def _measure(config: dict, queue) -> None:
    try:
        _measure_row(config, queue)
    except Exception as error:  # reported on its row, the other configurations go on
        import traceback

        queue.put({**config, "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                   "traceback": traceback.format_exc()[-4000:]})


def _measure_row(config: dict, queue) -> None:
    import torch

    from hms_segmentation import HMSConfig, HMSForSemanticSegmentation

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    device = torch.device(config["device"])
    model = HMSForSemanticSegmentation(HMSConfig.from_preset(
        config["preset"], primary_loss=config["loss"], scale_fusion=config["fusion"],
        training_scales=FUSION_TRAINING_SCALES[config["fusion"]],
    )).to(device).train()
    forward = torch.compile(model) if config["variant"] == "compile" else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    size = config["crop_size"]
    pixel_values = torch.randn(config["batch_size"], 3, size, size, device=device)
    labels = torch.randint(0, model.config.num_labels, (config["batch_size"], size, size), device=device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config["precision"])
    scaler = torch.amp.GradScaler(device.type, enabled=config["precision"] == "fp16")

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = forward(pixel_values, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def peak_mib() -> float:
        return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_resident_mib()

    resident_before = resident_mib()
    allocated_before = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    start = time.perf_counter()
    step()  # warm-up; compiles for `compile`
    synchronize()
    first_step = time.perf_counter() - start
    warm_up_peak = peak_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        peak_reset = True
    else:
        peak_reset = reset_peak_resident()  # where it cannot be, the warm-up's peak stays in
    start = time.perf_counter()
    for _ in range(config["steps"]):
        step()
    synchronize()
    seconds = (time.perf_counter() - start) / config["steps"]
    peak = peak_mib()
    # the growth of the peak over the set-up (model, optimizer, inputs) is what the steps need, on either device
    step_peak = peak - (allocated_before if device.type == "cuda" else resident_before)
    queue.put({**config, "seconds_per_step": seconds, "samples_per_second": config["batch_size"] / seconds,
               "first_step_seconds": first_step, "peak_memory_mib": peak, "step_memory_mib": step_peak,
               "warm_up_peak_memory_mib": warm_up_peak, "peak_reset_after_warm_up": peak_reset,
               "memory_kind": "cuda max allocated" if device.type == "cuda" else "peak RSS"})


def _result_of(process, queue, config: dict) -> dict:
    """The row `process` puts on `queue`; a process that dies without one (killed, out of host memory) gives an error
    row instead of a wait forever."""
    import queue as queue_module

    while True:
        try:
            row = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not process.is_alive():
                row = {**config, "error": f"the measurement process exited with code {process.exitcode} (see above)"}
                break
    process.join()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="hrnet_small_ocr")
    parser.add_argument("--crop-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--losses", nargs="+", default=["rmi", "cross_entropy"], choices=["rmi", "cross_entropy"])
    parser.add_argument("--fusions", nargs="+", default=["hierarchical"], choices=sorted(FUSION_TRAINING_SCALES))
    parser.add_argument("--variants", nargs="+", default=["eager"], choices=["eager", "compile"],
                        help="compile: torch.compile(model) (inductor), as --torch_compile in the training scripts")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions; the fastest round is kept")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None,
                        help="write the results as JSON here (default: print them only, so that a trial run never "
                             "overwrites the recorded figures in benchmarks/results/)")
    args = parser.parse_args(argv)

    context = multiprocessing.get_context("spawn")
    configs = [
        {"preset": args.preset, "crop_size": args.crop_size, "batch_size": args.batch_size, "steps": args.steps,
         "device": args.device, "precision": precision, "loss": loss, "fusion": fusion, "variant": variant,
         "training_scales": FUSION_TRAINING_SCALES[fusion], "threads": args.threads}
        for fusion in args.fusions for precision in args.precision for loss in args.losses
        for variant in args.variants
    ]
    best: dict[int, dict] = {}
    for _ in range(args.rounds):
        for index, config in enumerate(configs):
            queue = context.Queue()
            process = context.Process(target=_measure, args=(config, queue))
            process.start()
            row = _result_of(process, queue, config)
            if "error" in row:
                print(f"failed: {_label(config)}: {row['error']}", flush=True)
                best.setdefault(index, row)  # a successful round of the same row still wins
            elif index not in best or "error" in best[index] or (
                row["seconds_per_step"] < best[index]["seconds_per_step"]
            ):
                best[index] = row
    rows = [best[index] for index in range(len(configs))]
    measured = [row for row in rows if "error" not in row]
    baseline = measured[0] if measured else None
    for row in measured:
        row["time_vs_first"] = row["seconds_per_step"] / baseline["seconds_per_step"]
        row["step_memory_vs_first"] = row["step_memory_mib"] / baseline["step_memory_mib"]

    import torch

    print(f"{args.preset}, crop {args.crop_size}, batch {args.batch_size}, {args.device}, mean of {args.steps} steps, "
          f"best of {args.rounds} interleaved round(s); ratios against the first row that ran")
    print(f"{'fusion':<13}{'scales':<14}{'precision':<10}{'loss':<15}{'variant':<9}{'first step s':>13}{'s/step':>9}"
          f"{'samples/s':>11}{'peak MiB':>10}{'step MiB':>10}{'time x':>8}{'mem x':>7}")
    for row in rows:
        head = (f"{row['fusion']:<13}{'+'.join(map(str, row['training_scales'])):<14}{row['precision']:<10}"
                f"{row['loss']:<15}{row['variant']:<9}")
        if "error" in row:
            print(f"{head}  failed: {row['error']}")
            continue
        print(f"{head}{row['first_step_seconds']:>13.1f}{row['seconds_per_step']:>9.3f}"
              f"{row['samples_per_second']:>11.2f}{row['peak_memory_mib']:>10.0f}{row['step_memory_mib']:>10.0f}"
              f"{row['time_vs_first']:>8.2f}{row['step_memory_vs_first']:>7.2f}")
    exit_code = 1 if len(measured) < len(rows) else 0
    if args.output is None:
        print("not written: pass --output FILE to keep these results as JSON")
        return exit_code
    record = {"benchmark": "train_step", "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if torch.device(args.device).type == "cuda" and torch.cuda.is_available():
        record["device_name"] = torch.cuda.get_device_name(torch.device(args.device))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.output}")
    return exit_code


def _label(config: dict) -> str:
    return " ".join(str(config[key]) for key in ("fusion", "precision", "loss", "variant"))


if __name__ == "__main__":
    raise SystemExit(main())
