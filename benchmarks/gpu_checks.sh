#!/usr/bin/env bash
# The GPU figures that BENCHMARKS.md still lacks, in one run sized for a lent GPU (about 8 minutes, estimated):
#   1. mean IoU on the GPU: ConfusionMatrixAccumulator on 100 maps of 1024x2048 already in GPU memory (issue 6,
#      point 4: "well under a millisecond per map"), beside the CPU methods of the same script;
#   2. the training step of HRNet-W48 + OCR at 1024 crops, fp32 and fp16 autocast, RMI and cross-entropy (issue 6,
#      point 8: samples/s and peak memory);
#   3. the README's quickstart at a toy budget with the model on the GPU (where the Trainer puts it), down to the
#      prediction figure, which is drawn on the CPU;
#   4. the training blur on the device (benchmarks/blur.py adds a CUDA row when a GPU is visible);
#   5. `hms-segmentation evaluate --precision fp16` of the quickstart's model, against fp32 in the same run, the
#      half-precision run also with --scale-shares and --save-visuals (the per-class shares and pictures from GPU maps);
#   6. in a run of its own (`compile`, up to 7 minutes: the compilation of W48's training step is most of it): the
#      W48 fp16 RMI training step under torch.compile (inductor, what --torch_compile does) against eager.
#
#   bash benchmarks/gpu_checks.sh OUTPUT_DIR            # steps 1-5, on a machine with a CUDA GPU
#   bash benchmarks/gpu_checks.sh OUTPUT_DIR compile    # step 6 only, on the same machine
#   bash benchmarks/gpu_checks.sh OUTPUT_DIR --smoke    # steps 1-6 on CPU at toy sizes (checks the script)
#
# Each step has its own time limit, and all of them together stay within GPU_CHECKS_BUDGET_S seconds (default 540: a
# lent machine stops a command at 10 minutes), so a step that hangs leaves the others their time, and a step that no
# longer fits is skipped, said so, rather than cut off. OUTPUT_DIR receives at most six small files, none in a
# subfolder (a lent machine sends back 8 files at most): the benchmarks' JSON, gpu_checks[_compile].log (everything
# printed) and quickstart_evaluate_<device>.tar.gz (quickstart report and figure, the evaluate tables, the pictures).
# The quickstart's model and data stay in GPU_CHECKS_WORK_DIR (default: a new temporary folder, named in the log).
# The package runs from this checkout's src/ (no install needed); PYTHON (default python3) must hold torch, and the
# quickstart and evaluate steps also need `datasets`.
set -uo pipefail
output_dir=${1:?usage: bash benchmarks/gpu_checks.sh OUTPUT_DIR [compile|--smoke]}
mode=${2:-}
case "$mode" in
    ""|compile|--smoke) ;;
    *) echo "gpu_checks.sh: the second argument must be compile or --smoke, got '$mode'" >&2; exit 2 ;;
esac
# OUTPUT_DIR is taken relative to where the script is called from, before the cd into the repository
if ! mkdir -p "$output_dir" || ! output_dir=$(cd "$output_dir" && pwd); then
    echo "gpu_checks.sh: cannot create the output folder $1" >&2; exit 2
fi
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
budget=${GPU_CHECKS_BUDGET_S:-540}
log="$output_dir/gpu_checks$([ "$mode" = compile ] && echo _compile).log"

main() {
    if [ "$mode" = "--smoke" ]; then
        device=cpu; maps="--num-images 3 --typed-images 2 --height 64 --width 128"; mean_iou_device=""
        train="--preset hrnet_small_ocr --crop-size 128 --batch-size 2 --steps 1 --precision fp32"
        blur="--size 64 --repeats 3"; half=bf16
        # crops of 128, not 64: see BENCHMARKS.md, "torch.compile in training"
        compiled="--preset hrnet_small_ocr --crop-size 128 --batch-size 2 --steps 1 --precision fp32"
    else
        device=cuda; maps="--num-images 100 --typed-images 10"; mean_iou_device="--device cuda"
        train="--preset hrnet_w48_ocr --crop-size 1024 --batch-size 2 --steps 5 --precision fp32 fp16"
        blur="--repeats 15"; half=fp16
        compiled="--preset hrnet_w48_ocr --crop-size 1024 --batch-size 2 --steps 5 --precision fp16"
    fi
    echo "gpu_checks.sh ${mode:-(steps 1-5)}: $(date -u '+%Y-%m-%d %H:%M UTC'), $("$python" --version 2>&1)," \
        "budget ${budget} s"
    "$python" - "$device" <<'EOF' || return 1
import sys
try:
    import torch
    import hms_segmentation  # noqa: F401
except ImportError as error:
    sys.exit(f"gpu_checks.sh: {error}: the steps cannot run")
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_checks.sh: no CUDA GPU visible to torch")
print(f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", CPU"))
try:
    import datasets  # noqa: F401
except ImportError:
    print("warning: `datasets` is missing: the quickstart and evaluate steps will fail", flush=True)
EOF
    status=0
    if [ "$mode" = "compile" ]; then
        step 420 "$python" benchmarks/train_step.py --device "$device" $compiled --losses rmi --variants eager compile \
            --output "$output_dir/train_step_compile_$device.json"
        return $status
    fi
    work_dir=${GPU_CHECKS_WORK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_checks.XXXXXX")}
    mkdir -p "$work_dir" || return 1
    echo "work folder (quickstart model and data, evaluate outputs): $work_dir"
    # cityscapesscripts (when installed) checks values on 5 maps only: its CPU time is not the point here
    step 240 "$python" benchmarks/mean_iou.py $maps --cityscapes-images 5 --rounds 5 $mean_iou_device \
        --output "$output_dir/mean_iou_$device.json"
    step 300 "$python" benchmarks/train_step.py --device "$device" $train --losses rmi cross_entropy \
        --output "$output_dir/train_step_$device.json"
    quickstart="$work_dir/quickstart_$device"
    step 180 "$python" -m hms_segmentation.training.quickstart --output-dir "$quickstart" --overwrite \
        --max-steps 4 --batch-size 2 --crop-size 64 --train-frames 4 --val-frames 2 --frame-height 64 --frame-width 128
    step 60 "$python" benchmarks/blur.py $blur --output "$output_dir/blur_$device.json"
    for precision in fp32 $half; do
        step 120 "$python" -m hms_segmentation.training.evaluate --model "$quickstart/model" \
            --data-dir "$quickstart/data" --scales 1.0 0.5,1.0 --precision $precision --no-progress \
            --output-dir "$work_dir/evaluate_${device}_$precision" --overwrite
    done
    step 120 "$python" -m hms_segmentation.training.evaluate --model "$quickstart/model" --data-dir "$quickstart/data" \
        --scales 0.5,1.0,2.0 --precision $half --scale-shares --save-visuals "$work_dir/visuals_$device" \
        --num-visuals 2 --visuals-select worst --no-progress --output-dir "$work_dir/shares_$device" --overwrite
    # one archive of the small outputs of steps 3 and 5 (the model and the data stay behind)
    if [ -d "$quickstart" ]; then
        (cd "$work_dir" && find "quickstart_$device" -maxdepth 1 -type f -print0 \
            | tar -czf "$output_dir/quickstart_evaluate_$device.tar.gz" --null -T - \
                $(ls -d "evaluate_${device}_fp32" "evaluate_${device}_$half" "shares_$device" "visuals_$device" \
                    2>/dev/null)) || status=1
    fi
    if [ "$mode" = "--smoke" ]; then
        step 420 "$python" benchmarks/train_step.py --device "$device" $compiled --losses rmi --variants eager compile \
            --output "$output_dir/train_step_compile_$device.json"
    fi
    return $status
}

# step LIMIT COMMAND...: runs COMMAND for at most LIMIT seconds, less if the budget has less left (then skips it if
# under 30 s are left); a failure, a timeout or a skip sets status=1 and the next step runs.
step() {
    local limit=$1 left=$((budget - SECONDS)) started=$SECONDS code
    shift
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 30 ]; then
        echo "=== skipped (${left} s of the ${budget} s budget left): $*"
        status=1
        return
    fi
    echo "=== at ${SECONDS} s, at most ${limit} s: $*"
    timeout -k 10 "$limit" "$@"
    code=$?
    [ "$code" -eq 124 ] && echo "=== timed out after ${limit} s"
    echo "=== exit code $code after $((SECONDS - started)) s"
    [ "$code" -eq 0 ] || status=1
}

main 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
