#!/usr/bin/env bash
# The GPU figures that BENCHMARKS.md still lacks, in one run sized for a lent GPU (about 8 minutes on one H200):
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
# Each step has its own time limit, so one that hangs leaves the others their time; every JSON lands in OUTPUT_DIR.
#
#   bash benchmarks/gpu_checks.sh OUTPUT_DIR            # steps 1-5, on a machine with a CUDA GPU and the package
#   bash benchmarks/gpu_checks.sh OUTPUT_DIR compile    # step 6 only, on the same machine
#   bash benchmarks/gpu_checks.sh OUTPUT_DIR --smoke    # steps 1-6 on CPU at toy sizes (checks the script)
set -uo pipefail
cd "$(dirname "$0")/.."
output_dir=${1:?usage: bash benchmarks/gpu_checks.sh OUTPUT_DIR [compile|--smoke]}
mode=${2:-}
case "$mode" in
    ""|compile|--smoke) ;;
    *) echo "gpu_checks.sh: the second argument must be compile or --smoke, got '$mode'" >&2; exit 2 ;;
esac
mkdir -p "$output_dir"
export PYTHONUNBUFFERED=1
if [ "$mode" = "--smoke" ]; then
    device=cpu; maps="--num-images 3 --typed-images 2 --height 64 --width 128"; mean_iou_device=""
    train="--preset hrnet_small_ocr --crop-size 128 --batch-size 2 --steps 1 --precision fp32"; blur="--size 64 --repeats 3"; half=bf16
    compiled="--preset hrnet_small_ocr --crop-size 128 --batch-size 2 --steps 1 --precision fp32"  # see BENCHMARKS.md: not 64
else
    device=cuda; maps="--num-images 100 --typed-images 10"; mean_iou_device="--device cuda"
    train="--preset hrnet_w48_ocr --crop-size 1024 --batch-size 2 --steps 5 --precision fp32 fp16"; blur="--repeats 15"; half=fp16
    compiled="--preset hrnet_w48_ocr --crop-size 1024 --batch-size 2 --steps 5 --precision fp16"
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')" || exit 1
fi
status=0
compiled_step() {
    timeout 420 python benchmarks/train_step.py --device "$device" $compiled --losses rmi --variants eager compile \
        --output "$output_dir/train_step_compile_$device.json" || status=1
}
if [ "$mode" = "compile" ]; then
    compiled_step
    exit $status
fi
# cityscapesscripts (when installed) checks values on 5 maps only: its CPU time is not the point here
timeout 240 python benchmarks/mean_iou.py $maps --cityscapes-images 5 --rounds 5 $mean_iou_device \
    --output "$output_dir/mean_iou_$device.json" || status=1
timeout 300 python benchmarks/train_step.py --device "$device" $train --losses rmi cross_entropy \
    --output "$output_dir/train_step_$device.json" || status=1
timeout 180 python -m hms_segmentation.training.quickstart --output-dir "$output_dir/quickstart_$device" --overwrite \
    --max-steps 4 --batch-size 2 --crop-size 64 --train-frames 4 --val-frames 2 --frame-height 64 --frame-width 128 \
    || status=1
timeout 60 python benchmarks/blur.py $blur --output "$output_dir/blur_$device.json" || status=1
quickstart="$output_dir/quickstart_$device"
for precision in fp32 $half; do
    timeout 120 python -m hms_segmentation.training.evaluate --model "$quickstart/model" --data-dir "$quickstart/data" \
        --scales 1.0 0.5,1.0 --precision $precision --no-progress --output-dir "$output_dir/evaluate_${device}_$precision" \
        --overwrite || status=1
done
timeout 120 python -m hms_segmentation.training.evaluate --model "$quickstart/model" --data-dir "$quickstart/data" \
    --scales 0.5,1.0,2.0 --precision $half --scale-shares --save-visuals "$output_dir/visuals_$device" --num-visuals 2 \
    --visuals-select worst --no-progress --output-dir "$output_dir/shares_$device" --overwrite || status=1
if [ "$mode" = "--smoke" ]; then
    compiled_step
fi
exit $status
