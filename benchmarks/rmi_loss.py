"""Benchmark: RMILoss against plain cross-entropy, forward + backward, time and peak memory, with a stage breakdown.

    python benchmarks/rmi_loss.py                      # 19 and 65 classes on (1, C, 512, 1024) logits, CPU
    python benchmarks/rmi_loss.py --output rmi.json    # also write every figure as JSON

Time: every method runs in the same process with the same torch thread count, interleaved round by round (so
machine load hits them alike), after untimed warm-up rounds; the table gives the median over rounds and the median of
the per-round ratio to cross-entropy (``ignore_index=255``) on the same logits and labels. Memory: each (classes,
method) runs once in a fresh subprocess; the peak resident set size is read after one forward + backward (VmHWM, after
resetting it through /proc/self/clear_refs so that import-time peaks do not count; ``resource.getrusage`` where that
is unavailable), and the figure "loss memory" is that peak minus the resident size just before the loss (inputs
already built).
On CUDA, ``torch.cuda.max_memory_allocated`` replaces the RSS.

Labels: a blocky random class map (1/8 resolution, nearest-upsampled) with ~10% pixels at 255. "all classes" draws
from every class, the worst case for RMI, which computes the region statistics only for the (image, class) pairs whose
label map is not constant; "half the classes" draws each image from a random half of them, closer to real data
(a Cityscapes image shows ~10 of 19 classes). Logits: 1.5·N(0,1) − 2, plus 4 on the label's class.

The stage breakdown calls the loss's internal steps (private helpers of ``rmi_loss``) one by one, forward + backward
each, on the intermediate tensors of a real call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from hms_segmentation import rmi_loss
from hms_segmentation.rmi_loss import RMILoss
from process_memory import peak_resident_mib, reset_peak_resident, resident_mib

IGNORE_INDEX = 255
METHODS = {
    "cross_entropy": "F.cross_entropy(ignore_index=255), all classes",
    "rmi": "RMILoss, all classes",
    "rmi_bce_only": "RMILoss(do_rmi=False), all classes",
    "cross_entropy_half_classes": "F.cross_entropy(ignore_index=255), half the classes",
    "rmi_half_classes": "RMILoss, half the classes",
}
BASELINES = {
    method: "cross_entropy_half_classes" if method.endswith("_half_classes") else "cross_entropy" for method in METHODS
}
"""Each method's ratio is to cross-entropy on the same inputs."""


def make_inputs(
    batch_size: int, num_classes: int, height: int, width: int, half_classes: bool, device: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits `(B, C, H, W)` float32 and labels `(B, H, W)` int64, built without large temporaries."""
    generator = torch.Generator().manual_seed(seed)
    block_shape = (batch_size, height // 8 + 1, width // 8 + 1)
    if half_classes:
        half = num_classes // 2
        subsets = torch.stack([torch.randperm(num_classes, generator=generator)[:half] for _ in range(batch_size)])
        picks = torch.randint(0, half, block_shape, generator=generator)
        blocks = torch.gather(subsets.view(batch_size, -1, 1), 1, picks.view(batch_size, -1, 1)).view(block_shape)
    else:
        blocks = torch.randint(0, num_classes, block_shape, generator=generator)
    labels = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, :height, :width].contiguous()
    labels[torch.rand(batch_size, height, width, generator=generator) < 0.1] = IGNORE_INDEX
    logits = torch.randn(batch_size, num_classes, height, width, generator=generator).mul_(1.5).sub_(2.0)
    boost = torch.full((batch_size, 1, height, width), 4.0)
    logits.scatter_add_(1, labels.clamp(max=num_classes - 1).unsqueeze(1), boost)
    return logits.to(device), labels.to(device)


def loss_function(method: str, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if method.startswith("cross_entropy"):
        return lambda logits, labels: F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    criterion = RMILoss(num_classes=num_classes)
    do_rmi = method != "rmi_bce_only"
    return lambda logits, labels: criterion(logits, labels, do_rmi=do_rmi)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_backward(function, logits: torch.Tensor, labels: torch.Tensor) -> None:
    logits.grad = None
    function(logits, labels).backward()


def uses_half_classes(method: str) -> bool:
    return method.endswith("_half_classes")


def time_methods(args: argparse.Namespace, num_classes: int) -> dict[str, dict]:
    inputs = {}
    for half_classes in (False, True):
        logits, labels = make_inputs(args.batch_size, num_classes, args.height, args.width, half_classes, args.device)
        inputs[half_classes] = (logits.requires_grad_(True), labels)
    functions = {method: loss_function(method, num_classes) for method in METHODS}
    for _ in range(args.warmup):
        for method, function in functions.items():
            forward_backward(function, *inputs[uses_half_classes(method)])
    seconds = {method: [] for method in METHODS}
    for _ in range(args.repeats):
        for method, function in functions.items():
            synchronize(args.device)
            start = time.perf_counter()
            forward_backward(function, *inputs[uses_half_classes(method)])
            synchronize(args.device)
            seconds[method].append(time.perf_counter() - start)
    results = {}
    for method, values in seconds.items():
        ratios = [value / baseline for value, baseline in zip(values, seconds[BASELINES[method]])]
        results[method] = {
            "median_ms": 1000 * statistics.median(values),
            "min_ms": 1000 * min(values),
            "ratio_to_cross_entropy": statistics.median(ratios),
            "all_ms": [1000 * value for value in values],
        }
    return results


def time_stages(args: argparse.Namespace, num_classes: int) -> dict[str, float]:
    """Median forward + backward milliseconds of each internal step of RMILoss (all classes)."""
    criterion = RMILoss(num_classes=num_classes)
    logits, labels = make_inputs(args.batch_size, num_classes, args.height, args.width, False, args.device)
    valid = (labels >= 0) & (labels < num_classes)
    safe_labels = labels.masked_fill(~valid, 0).unsqueeze(1)
    valid_mask = valid.to(logits.dtype).unsqueeze(1)
    pool_size = criterion._fused_pool_size()
    with torch.no_grad():
        pooled_probs = rmi_loss._SigmoidTerms.apply(logits, safe_labels, valid_mask, pool_size)[1]
        pooled_onehot = criterion._pooled_onehot(safe_labels.squeeze(1), valid)
        height, width = pooled_probs.shape[-2:]
        maps = (pooled_onehot.reshape(-1, 1, height, width), pooled_probs.reshape(-1, 1, height, width))
        covariance = rmi_loss._RegionCovariance.apply(*maps, criterion.rmi_radius, None)

    # Leaves and upstream gradients are made once: the timings hold the stage's own work only.
    logits_leaf, prob_maps_leaf, covariance_leaf = (
        tensor.detach().clone().requires_grad_(True) for tensor in (logits, maps[1], covariance)
    )
    ones_like_pooled, ones_like_covariance = map(torch.ones_like, (pooled_probs, covariance))

    def sigmoid_terms() -> None:
        logits_leaf.grad = None
        bce_sum, pooled = rmi_loss._SigmoidTerms.apply(logits_leaf, safe_labels, valid_mask, pool_size)
        torch.autograd.backward([bce_sum, pooled], [torch.ones_like(bce_sum), ones_like_pooled])

    def label_pooling() -> None:
        criterion._pooled_onehot(safe_labels.squeeze(1), valid)

    def region_covariance() -> None:
        prob_maps_leaf.grad = None
        out = rmi_loss._RegionCovariance.apply(maps[0], prob_maps_leaf, criterion.rmi_radius, None)
        out.backward(ones_like_covariance)

    def log_det() -> None:
        covariance_leaf.grad = None
        rmi_loss._conditional_half_log_det(covariance_leaf).sum().backward()

    stages = {
        "sigmoid, BCE, average pooling of the probabilities (full resolution, in bands)": sigmoid_terms,
        "pooled one-hot labels (pixel counts)": label_pooling,
        "region vectors + covariance matmuls": region_covariance,
        "conditional covariance, Cholesky, solve, log-det": log_det,
    }
    results = {}
    for name, stage in stages.items():
        values = []
        for index in range(args.warmup + args.repeats):
            synchronize(args.device)
            start = time.perf_counter()
            stage()
            synchronize(args.device)
            if index >= args.warmup:
                values.append(time.perf_counter() - start)
        results[name] = 1000 * statistics.median(values)
    return results


def measure_memory_in_this_process(args: argparse.Namespace, num_classes: int, method: str) -> dict[str, float]:
    logits, labels = make_inputs(
        args.batch_size, num_classes, args.height, args.width, uses_half_classes(method), args.device
    )
    logits.requires_grad_(True)
    function = loss_function(method, num_classes)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        forward_backward(function, logits, labels)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        reset_peak_resident()  # import-time peaks do not count
        before = resident_mib()
        forward_backward(function, logits, labels)
        peak = peak_resident_mib()
    return {"before_mib": before, "peak_mib": peak, "loss_mib": peak - before}


def measure_memory(args: argparse.Namespace, num_classes: int, method: str) -> dict[str, float]:
    """Run :func:`measure_memory_in_this_process` in a fresh interpreter, so that earlier runs do not hide the peak."""
    command = [sys.executable, __file__, "--memory-child", f"{num_classes}:{method}"]
    command += ["--batch-size", str(args.batch_size), "--height", str(args.height), "--width", str(args.width)]
    command += ["--device", args.device]
    command += ["--threads", str(args.threads)] if args.threads else []
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def parallel_op_microseconds(device: str) -> float:
    """Median time of one small multi-threaded operation (an in-place multiply of 2**20 floats).

    On this 2-core machine: ~30 µs when both cores are free, up to milliseconds when other work (possibly outside
    this VM, so not in the load average) holds one. RMILoss runs hundreds of such operations per call and
    cross-entropy a handful, so its ratio grows with this figure; compare ratios only from runs where it stayed low.
    """
    values = torch.ones(2**20, device=device)
    times = []
    for index in range(220):
        synchronize(device)
        start = time.perf_counter()
        values.mul_(1.0)
        synchronize(device)
        if index >= 20:
            times.append(time.perf_counter() - start)
    return round(1e6 * statistics.median(times), 1)


def machine_description(device: str) -> dict[str, str | int]:
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    description = {"cpu": model, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    description["torch"] = torch.__version__
    if hasattr(os, "getloadavg"):  # other work on a shared machine slows every method, not always alike
        description["load_average_1min_at_start"] = round(os.getloadavg()[0], 2)
    description["parallel_op_us_at_start"] = parallel_op_microseconds(device)
    if device.startswith("cuda"):
        description["gpu"] = torch.cuda.get_device_name()
    return description


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classes", type=int, nargs="+", default=[19, 65], help="class counts (default: 19 65)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (default: 9)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--skip-memory", action="store_true", help="do not run the memory subprocesses")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        num_classes, method = args.memory_child.split(":")
        print(json.dumps(measure_memory_in_this_process(args, int(num_classes), method)))
        return

    results = {
        "command": " ".join(["python", "benchmarks/rmi_loss.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(args.device),
        "shape": {"batch_size": args.batch_size, "height": args.height, "width": args.width},
        "repeats": args.repeats,
        "methods": METHODS,
        "classes": {},
    }
    for num_classes in args.classes:
        entry = {"time": time_methods(args, num_classes), "stages_ms": time_stages(args, num_classes)}
        if not args.skip_memory:
            entry["memory"] = {method: measure_memory(args, num_classes, method) for method in METHODS}
        results["classes"][str(num_classes)] = entry
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    results["machine"]["parallel_op_us_at_end"] = parallel_op_microseconds(args.device)

    print(format_table(results, args.skip_memory))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.output}")


def format_table(results: dict, skip_memory: bool) -> str:
    shape = results["shape"]
    memory_header = "" if skip_memory else " peak RSS (MiB) | loss memory (MiB) |"
    lines = [
        f"forward + backward on ({shape['batch_size']}, C, {shape['height']}, {shape['width']}) float32 logits, "
        f"median of {results['repeats']} interleaved rounds; × cross-entropy on the same inputs; {results['machine']}",
        "",
        f"| C | method | median (ms) | min (ms) | × cross-entropy |{memory_header}",
        "|---|---|---:|---:|---:|" + ("" if skip_memory else "---:|---:|"),
    ]
    for num_classes, entry in results["classes"].items():
        for method, description in METHODS.items():
            timing = entry["time"][method]
            row = (
                f"| {num_classes} | {description} | {timing['median_ms']:.0f} | {timing['min_ms']:.0f} "
                f"| {timing['ratio_to_cross_entropy']:.2f} |"
            )
            if not skip_memory:
                memory = entry["memory"][method]
                row += f" {memory['peak_mib']:.0f} | {memory['loss_mib']:.0f} |"
            lines.append(row)
    lines += ["", "RMILoss stages (all classes), forward + backward, median ms:", ""]
    lines += ["| C | stage | ms |", "|---|---|---:|"]
    for num_classes, entry in results["classes"].items():
        lines += [f"| {num_classes} | {stage} | {ms:.1f} |" for stage, ms in entry["stages_ms"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
