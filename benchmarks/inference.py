"""Chained multi-scale inference: latency, peak memory, and the share of time spent outside trunk/head forwards.

Rows are the product of `--precision`, `--variants` and `--scale-sets` (or the explicit `--rows`). Each row lives in
its own process, so that its peak memory is its own; the processes are started one after the other, warm up
(`torch.compile` compiles there: that first call is reported as "first call s", apart from the steady state), and
then, by default (`--schedule interleaved`), run their timed calls in interleaved rounds (row 1, row 2, ..., row 1,
row 2, ...), so that a busy machine slows every row alike. `--schedule sequential` runs each row to its end before
the next starts (for CUDA: an idle process would keep its cached GPU memory). "x fp32 eager" is the median, over
rounds, of the row's latency divided by the latency of the fp32 eager row with the same scales in the same round.

The "chain" time is everything in `HMSForSemanticSegmentation.forward` except the per-scale trunk + decoder +
attention-head forwards (`segment_single_scale`): input resizes, the attention fusion and the final resize. It is
found by timing each `segment_single_scale` call from the outside; under `torch.compile` the whole forward is one
graph whose parts cannot be timed apart, so compiled rows report the chain as n/a.

Precisions run under `torch.autocast` (fp32: no autocast). Variants: `eager`; `channels_last` (model and input in
channels-last memory format); `compile` (inductor, static shapes, as `evaluate` / `autolabel --torch-compile` compile:
`compile_for_inference`, the module compiled in place); `onnxruntime` (the graph
of `hms-segmentation export-onnx` for the row's scales, fp32, CPU only, in onnxruntime with as many intra-op threads
as torch gets; exported before the warm-up, whose time does not include the export; after each of its calls the row
waits, untimed, until onnxruntime's threads stop spinning, so they do not slow the next row). A row that fails (an op
without a kernel for that precision on that device, a compiler error) or passes `--row-timeout` is reported as
such instead of stopping the run.

Memory: on CPU the peak resident set size (VmHWM) of the row's process during the timed calls (reset after the
warm-up, so compilation does not count), and "above model" = that peak minus the resident size before the first
call; on CUDA `torch.cuda.max_memory_allocated` over the timed calls, and "above model" minus the allocated
memory before the first call.

    python benchmarks/inference.py --preset hrnet_small_ocr --height 512 --width 1024 --repeats 5
    python benchmarks/inference.py --height 256 --width 512 --precision fp32 bf16 --variants eager compile \\
        --scale-sets 1.0 0.5,1.0,2.0
    python benchmarks/inference.py --device cuda --preset hrnet_w48_ocr --height 1024 --width 2048 --repeats 10 \\
        --precision fp32 fp16 bf16 --variants eager channels_last compile --schedule sequential \\
        --output benchmarks/results/inference_w48_gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import time
import traceback
from pathlib import Path

from process_memory import peak_resident_mib, reset_peak_resident, resident_mib

DEFAULT_SCALE_SETS = ("1.0", "0.5,1.0", "0.5,1.0,2.0", "0.25,0.5,1.0,2.0")
PRECISIONS = ("fp32", "bf16", "fp16")
VARIANTS = ("eager", "channels_last", "compile", "onnxruntime")
ONNXRUNTIME_SPIN_WAIT_S = 0.1
"""Untimed pause after each onnxruntime call, so that its spinning threads are asleep before the next row is timed."""


def _row_worker(spec: dict, connection) -> None:
    """One row: build, warm up, then answer "run" with one timed call and "finish" with the peak memory."""
    try:
        import torch

        from hms_segmentation import HMSConfig, HMSForSemanticSegmentation
        from hms_segmentation.inference_options import compile_for_inference

        device = torch.device(spec["device"])
        cuda = device.type == "cuda"
        torch.set_num_threads(spec["threads"])
        torch.manual_seed(0)

        def synchronize() -> None:
            if cuda:
                torch.cuda.synchronize()

        model = HMSForSemanticSegmentation(HMSConfig.from_preset(spec["preset"])).eval().to(device)
        pixel_values = torch.randn(1, 3, spec["height"], spec["width"], device=device)
        if spec["variant"] == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)

        # Only PyTorch's uncompiled rows are instrumented: a Python timer in a compiled forward would split its graph.
        per_scale_seconds: list[float] = []
        instrumented = spec["variant"] in ("eager", "channels_last")
        if spec["variant"] == "onnxruntime":
            forward = _onnxruntime_forward(model, spec)
            del model  # the session holds its own copy of the weights
        elif instrumented:
            segment = model.segment_single_scale

            def timed_segment(x, **kwargs):
                synchronize()
                start = time.perf_counter()
                result = segment(x, **kwargs)
                synchronize()
                per_scale_seconds.append(time.perf_counter() - start)
                return result

            model.segment_single_scale = timed_segment
            forward = model
        else:
            forward = compile_for_inference(model, {"backend": "inductor", "mode": None})  # as evaluate/autolabel do

        autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["precision"]]
        scales = spec["scales"]

        def call() -> None:
            if spec["variant"] == "onnxruntime":
                forward(pixel_values)
                return
            autocast = contextlib.nullcontext() if autocast_dtype is None else torch.autocast(device.type, autocast_dtype)
            with torch.inference_mode(), autocast:
                forward(pixel_values, scales=scales)

        if cuda:
            memory_before = torch.cuda.memory_allocated() / 2**20
        else:
            memory_before = resident_mib()
        synchronize()
        start = time.perf_counter()
        call()  # warm-up; compiles for `compile`
        synchronize()
        first_call = time.perf_counter() - start
        compile_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_resident_mib()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            peak_reset = True
        else:
            peak_reset = reset_peak_resident()
        connection.send({"ready": True, "first_call_s": first_call, "peak_mib_during_warm_up": compile_peak})

        while connection.recv() == "run":
            per_scale_seconds.clear()
            synchronize()
            start = time.perf_counter()
            call()
            synchronize()
            total = time.perf_counter() - start
            chain = total - sum(per_scale_seconds) if instrumented else None
            if spec["variant"] == "onnxruntime":
                # onnxruntime's intra-op threads spin for about 20 ms after a run before they sleep: left to spin,
                # they would take a core from the next row's timed call (untimed wait, outside this row's latency)
                time.sleep(ONNXRUNTIME_SPIN_WAIT_S)
            connection.send({"total_s": total, "chain_s": chain})
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_resident_mib()
        connection.send(
            {"peak_mib": peak, "memory_before_mib": memory_before, "peak_reset_after_warm_up": peak_reset}
        )
    except Exception as error:  # reported per row, the other rows go on
        connection.send({"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                         "traceback": traceback.format_exc()[-4000:]})
    finally:
        connection.close()


def _onnxruntime_forward(model, spec: dict):
    """The row's chain exported to ONNX and loaded in onnxruntime; returns a call that runs it on a torch tensor."""
    import tempfile

    import onnxruntime

    from hms_segmentation.export_onnx import MIN_EXAMPLE_SIDES, export_onnx

    if spec["precision"] != "fp32" or spec["device"] != "cpu":
        raise ValueError("the onnxruntime variant runs the exported float32 graph on the CPU only (fp32, --device cpu)")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "hms.onnx"
        example_size = (max(MIN_EXAMPLE_SIDES[0], spec["height"]), max(MIN_EXAMPLE_SIDES[1], spec["width"]))
        export_onnx(model, path, scales=spec["scales"], example_size=example_size, check=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = spec["threads"], 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(pixel_values):
        return session.run(None, {"pixel_values": pixel_values.numpy()})

    return run


def _parse_row(text: str) -> tuple[str, str, list[float]]:
    try:
        precision, variant, scale_set = text.split(":")
    except ValueError:
        raise ValueError(f"--rows entries look like fp32:eager:0.5,1.0, got {text!r}") from None
    if precision not in PRECISIONS or variant not in VARIANTS:
        raise ValueError(f"--rows entry {text!r}: precision must be one of {PRECISIONS}, variant one of {VARIANTS}")
    return precision, variant, _parse_scales(scale_set)


def _parse_scales(scale_set: str) -> list[float]:
    scales = [float(s) for s in scale_set.split(",")]
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scale sets are comma-separated positive numbers, got {scale_set!r}")
    return scales


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _format(value, pattern: str, width: int) -> str:
    return f"{'n/a' if value is None else format(value, pattern):>{width}}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--preset", default="hrnet_small_ocr", help="model preset (random weights)")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--scale-sets", nargs="+", default=list(DEFAULT_SCALE_SETS), help="comma-separated scale lists")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS, help="autocast dtypes")
    parser.add_argument("--variants", nargs="+", default=["eager"], choices=VARIANTS)
    parser.add_argument("--rows", nargs="+", metavar="PRECISION:VARIANT:SCALES",
                        help="explicit rows, e.g. fp32:eager:1.0 bf16:compile:0.5,1.0,2.0 (instead of the product of "
                             "--precision, --variants and --scale-sets)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads per row")
    parser.add_argument("--row-timeout", type=float, default=900.0,
                        help="seconds a row may take for its warm-up or one timed call before it is reported as a timeout")
    parser.add_argument("--schedule", default="interleaved", choices=("interleaved", "sequential"),
                        help="interleaved: all row processes stay alive and take turns, round by round (for a shared "
                             "machine); sequential: each row runs all its rounds and exits before the next starts "
                             "(for CUDA, where idle processes would keep their cached GPU memory)")
    parser.add_argument("--output", type=Path, default=None,
                        help="write the results as JSON here (default: print them only, so that a trial run never "
                             "overwrites the recorded figures in benchmarks/results/)")
    args = parser.parse_args(argv)
    if args.rows:
        row_keys = [_parse_row(text) for text in args.rows]
    else:
        row_keys = [(p, v, _parse_scales(s)) for s in args.scale_sets for p in args.precision for v in args.variants]

    load_at_start = os.getloadavg()
    context = multiprocessing.get_context("spawn")
    rows, workers, per_round = [], [], []
    for precision, variant, scales in row_keys:
        spec = {"preset": args.preset, "height": args.height, "width": args.width, "scales": scales,
                "precision": precision, "variant": variant, "device": args.device, "threads": args.threads}
        row = {"scales": scales, "precision": precision, "variant": variant, "status": "ok"}
        rows.append(row)
        parent_end, child_end = context.Pipe()
        process = context.Process(target=_row_worker, args=(spec, child_end))
        process.start()
        child_end.close()
        workers.append((row, process, parent_end))
        # Warm-ups run one at a time, so compilation and first-call costs do not overlap.
        _receive(row, process, parent_end, args.row_timeout, lambda answer: row.update(answer))
        label = f"{precision} {variant} {','.join(map(str, scales))}"
        print(f"ready: {label} ({row['status']}, first call {row.get('first_call_s', float('nan')):.1f} s)", flush=True)
        per_round.append([])
        if args.schedule == "sequential":
            _run_rounds(workers[-1:], per_round[-1:], args)
    if args.schedule == "interleaved":
        _run_rounds(workers, per_round, args)
    load_at_end = os.getloadavg()

    baseline = {tuple(r["scales"]): i for i, r in enumerate(rows) if (r["precision"], r["variant"]) == ("fp32", "eager")}
    for index, row in enumerate(rows):
        rounds = per_round[index]
        if row["status"] != "ok" or not rounds:
            continue
        totals = [r["total_s"] for r in rounds]
        row["latency_s"] = statistics.median(totals)
        row["latency_s_all_rounds"] = totals
        if row["variant"] in ("compile", "onnxruntime"):
            row["chain_s"] = row["chain_share"] = None
        else:
            row["chain_s"] = statistics.median(r["chain_s"] for r in rounds)
            row["chain_share"] = statistics.median(r["chain_s"] / r["total_s"] for r in rounds)
        row["above_model_mib"] = row["peak_mib"] - row["memory_before_mib"]
        reference = baseline.get(tuple(row["scales"]))
        if reference is not None and rows[reference]["status"] == "ok" and per_round[reference]:
            pairs = zip(totals, (r["total_s"] for r in per_round[reference]))
            row["latency_vs_fp32_eager"] = statistics.median(t / b for t, b in pairs)

    import torch

    memory_name = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB"
    print(f"\n{args.preset}, input 1x3x{args.height}x{args.width}, {args.device}, {args.threads} threads, "
          f"median of {args.repeats} interleaved rounds; load average {load_at_start[0]:.2f} at start, "
          f"{load_at_end[0]:.2f} at end")
    print(f"{'precision':<10}{'variant':<15}{'scales':<18}{'first call s':>13}{'latency s':>11}{'x fp32 eager':>13}"
          f"{'chain s':>9}{'chain %':>9}{memory_name:>14}{'above model':>13}")
    for row in rows:
        head = f"{row['precision']:<10}{row['variant']:<15}{','.join(map(str, row['scales'])):<18}"
        if row["status"] != "ok":
            print(f"{head}  {row['status']}: {row.get('error', '')}")
            continue
        share = "n/a" if row["chain_share"] is None else f"{100 * row['chain_share']:.2f}%"
        print(f"{head}{row['first_call_s']:>13.2f}{row['latency_s']:>11.3f}"
              f"{_format(row.get('latency_vs_fp32_eager'), '.2f', 13)}{_format(row['chain_s'], '.4f', 9)}"
              f"{share:>9}{row['peak_mib']:>14.0f}{row['above_model_mib']:>13.0f}")
    record = {
        "benchmark": "inference",
        "preset": args.preset,
        "input": [1, 3, args.height, args.width],
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "load_average_at_start": load_at_start,
        "load_average_at_end": load_at_end,
        "memory": "torch.cuda.max_memory_allocated" if args.device == "cuda" else "VmHWM, reset after the warm-up",
        "rows": rows,
    }
    if args.output is None:
        print("not written: pass --output FILE to keep these results as JSON")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.output}")
    return 0


def _run_rounds(workers: list, per_round: list[list[dict]], args) -> None:
    """`args.repeats` timed rounds over `workers` (row by row within a round), then each row's peak memory."""
    for _ in range(args.repeats):
        for (row, process, connection), answers in zip(workers, per_round):
            if row["status"] != "ok":
                continue
            connection.send("run")
            _receive(row, process, connection, args.row_timeout, answers.append)
            if row["status"] != "ok":
                answers.clear()
    for row, process, connection in workers:
        if row["status"] == "ok":
            connection.send("finish")
            _receive(row, process, connection, args.row_timeout, lambda answer: row.update(answer))
        process.join(timeout=30)
        if process.is_alive():
            process.kill()


def _receive(row: dict, process, connection, timeout: float, on_answer) -> None:
    """Waits for the row's next answer; records an error or a timeout on the row instead of raising."""
    if not connection.poll(timeout):
        row["status"] = "timeout"
        row["error"] = f"no answer within --row-timeout={timeout:g} s"
        process.kill()
        return
    try:
        answer = connection.recv()
    except EOFError:
        row["status"] = "failed"
        row["error"] = f"process ended (exit code {process.exitcode})"
        return
    if "error" in answer:
        row["status"] = "failed"
        row["error"] = answer["error"]
        row["traceback"] = answer["traceback"]
        return
    on_answer(answer)


if __name__ == "__main__":
    raise SystemExit(main())
