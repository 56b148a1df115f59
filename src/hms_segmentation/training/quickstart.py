"""The README's main job: train and evaluate a small HMS model on the embedded synthetic dataset, on a CPU.

    hms-segmentation quickstart [--output-dir hms_quickstart] [--max-steps 600]

Generates the procedural street-scene dataset (Cityscapes layout), trains `mobilenetv2_deeplabv3plus` through the real
`Trainer` path on two scales (0.5, 1.0), evaluates single-scale (1.0) against chained multi-scale (0.5, 1.0, 2.0)
mIoU, saves the model with `save_pretrained`, and writes a picture of predictions and of each scale's share of the
multi-scale result.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.synthesize import MIN_FRAME_SIZE
from ..evaluation import make_compute_metrics, metrics_to_json, preprocess_logits_for_metrics
from ..hub import result_from_trainer_metrics, write_hub_files
from ..label_tables import CITYSCAPES_PALETTE
from ..modeling_hms import attentions_at_size, hierarchical_scale_weights
from .arguments import DataArguments, HMSTrainingArguments, ModelArguments
from .train import HMSTrainer, SetEpochCallback, build_model, collate_samples
from .datasets import build_datasets, synthetic_dataset_differences
from .visuals import colour_labels, denormalized_image, grey_picture

SINGLE_SCALE = [1.0]
MULTI_SCALE = [0.5, 1.0, 2.0]
EVALUATED_SCALES = {"single_scale": SINGLE_SCALE, "two_scale": [0.5, 1.0], "multi_scale": MULTI_SCALE}
"""Single scale, the chain over the training pair, and the paper's inference chain."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hms-segmentation quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("hms_quickstart"))
    parser.add_argument("--max-steps", type=int, default=600, help="training steps (about 0.5 s each on 2 CPU cores)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--crop-size", type=int, default=192)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--hue-jitter", type=float, default=0.0,
                        help="largest hue shift of the colour jitter, in turns; the recipe's 0.25 cost 2.2 mIoU "
                             "(chain 0.5,1.0: 38.8 against 41.0) at this budget (README; BENCHMARKS.md, Quickstart "
                             "variants)")
    parser.add_argument("--train-frames", type=int, default=200)
    parser.add_argument("--val-frames", type=int, default=30)
    parser.add_argument("--frame-height", type=int, default=256, help="height of the generated frames")
    parser.add_argument("--frame-width", type=int, default=512, help="width of the generated frames")
    parser.add_argument("--preset", default="mobilenetv2_deeplabv3plus",
                        help="model preset; MobileNetV2 reached 41.0 mIoU (chain 0.5,1.0), hrnet_small_ocr 14.9, in "
                             "the default budget (README; BENCHMARKS.md, Quickstart variants)")
    parser.add_argument("--primary-loss", default="rmi", choices=["rmi", "cross_entropy"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier quickstart")
    return parser


def save_prediction_figure(model, sample: dict[str, torch.Tensor], path: Path) -> None:
    """Input, ground truth, single-scale and multi-scale predictions, and each scale's share of the multi-scale result
    (white where that scale decided, `hierarchical_scale_weights`), side by side."""
    pixel_values = sample["pixel_values"].unsqueeze(0)
    height, width = pixel_values.shape[-2:]
    with torch.inference_mode():  # the model may sit on a GPU (where the Trainer put it); the figure is made on CPU
        single = model(pixel_values.to(model.device), scales=SINGLE_SCALE).logits.argmax(1)[0].cpu()
        multi = model(pixel_values.to(model.device), scales=MULTI_SCALE, output_attentions=True)
        multi_prediction = multi.logits.argmax(1)[0].cpu()
        attentions = [attention[0].cpu() for attention in
                      attentions_at_size(multi.attentions, (height, width), model.config.align_corners)]
    panels = [denormalized_image(pixel_values[0])] + [np.asarray(colour_labels(labels, CITYSCAPES_PALETTE))
                                                      for labels in (sample["labels"], single, multi_prediction)]
    panels += [np.asarray(grey_picture(weight).convert("RGB")) for weight in hierarchical_scale_weights(attentions)]
    rows = [np.concatenate(panels[i:i + 2], axis=1) for i in range(0, len(panels) - 1, 2)]
    if len(panels) % 2:
        rows.append(np.concatenate([panels[-1], np.zeros_like(panels[-1])], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


OUTPUTS = ("model", "run", "evaluation.json", "predictions.png", "report.json")
"""What the quickstart writes in `--output-dir` besides `data/`; none is replaced without `--overwrite`."""


def build_arguments(args: argparse.Namespace) -> tuple[DataArguments, ModelArguments, HMSTrainingArguments]:
    """The training scripts' arguments for the quickstart's settings; a `ValueError` names a bad value."""
    output_dir, run_dir = args.output_dir, args.output_dir / "run"
    data_args = DataArguments(
        dataset="synthetic",
        data_dir=str(output_dir / "data"),
        crop_size=args.crop_size,
        hue_jitter=args.hue_jitter,
        synthetic_train_frames=args.train_frames,
        synthetic_val_frames=args.val_frames,
        synthetic_height=args.frame_height,
        synthetic_width=args.frame_width,
    )
    model_args = ModelArguments(
        preset=args.preset, training_scales="0.5,1.0", eval_scales="0.5,1.0,2.0", primary_loss=args.primary_loss
    )
    training_args = HMSTrainingArguments(
        output_dir=str(run_dir),
        overwrite_output_dir=args.overwrite,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        poly_power=2.0,
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    return data_args, model_args, training_args


def check_quickstart_values(args: argparse.Namespace) -> None:
    """Refuse the values the training scripts' arguments would take but the quickstart cannot run with.

    Raises:
        ValueError: Naming the flag, what it needs and what it got.
    """
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise ValueError(f"--output-dir {args.output_dir} is a file: expected a folder (new, or an earlier "
                         "quickstart's)")
    # max_steps <= 0 would make the Trainer train 3 epochs instead, while the report says 0 steps
    for flag, value in (("--max-steps", args.max_steps), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.seed < 0:  # numpy seeds (the Trainer's, the augmentation's) are non-negative
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.learning_rate < 0:
        raise ValueError(f"--learning-rate must be >= 0, got {args.learning_rate}")
    for flag, value in (("--frame-height", args.frame_height), ("--frame-width", args.frame_width)):
        if value < MIN_FRAME_SIZE:  # the generator's smallest frame
            raise ValueError(f"{flag} must be at least {MIN_FRAME_SIZE} pixels, got {value}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    output_dir = args.output_dir
    model_dir = output_dir / "model"
    try:
        check_quickstart_values(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    existing = [name for name in OUTPUTS if (output_dir / name).exists()]
    if existing and not args.overwrite:
        print(f"error: {output_dir} already holds {', '.join(existing)} (what the quickstart writes); pass --overwrite "
              "to replace them or choose another --output-dir", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:  # the argument dataclasses check the values (named as the training scripts spell them)
        data_args, model_args, training_args = build_arguments(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    processes = training_args.world_size
    if args.train_frames < args.batch_size * processes:  # each epoch drops its incomplete last batch: no step at all
        print(f"error: --train-frames {args.train_frames} is fewer than one batch (--batch-size {args.batch_size}"
              f"{f' x {processes} processes' if processes > 1 else ''}): the run would train no step; generate more "
              "frames or lower the batch size", file=sys.stderr)
        return 2
    stale = synthetic_dataset_differences(data_args)
    if stale:  # it would be trained on as it is, while the report names the frames asked for
        print(f"error: {output_dir / 'data'} holds a synthetic dataset of other settings than those asked for ("
              + ", ".join(f"{key}={value}" for key, value in stale.items()) + "); delete that folder to generate "
              "the new one, or choose another --output-dir", file=sys.stderr)
        return 2
    print(f"[1/4] synthetic street scenes -> {output_dir / 'data'}")
    try:
        data = build_datasets(data_args, seed=args.seed)
    except FileExistsError as error:  # data/ holds files that are not a synthetic dataset: nothing was written
        print(f"error: {error}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model = build_model(model_args, data.id2label)
    trainer = HMSTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=collate_samples,
        compute_metrics=make_compute_metrics(len(data.id2label), model.config.ignore_index, data.id2label),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        callbacks=[SetEpochCallback()],
    )
    print(f"[2/4] training {args.preset} for {args.max_steps} steps on scales 0.5, 1.0")
    trainer.train()

    print("[3/4] evaluating single-scale (1.0) and the attention chains over (0.5, 1.0) and (0.5, 1.0, 2.0)")
    results = {}
    for name, scales in EVALUATED_SCALES.items():
        model.config.inference_scales = scales
        results[name] = trainer.evaluate(metric_key_prefix=name)
    model.config.inference_scales = MULTI_SCALE

    print(f"[4/4] saving the model and a prediction figure to {output_dir}")
    model.save_pretrained(model_dir)
    # Hub-ready folder: the image processor and a model card whose model-index is this evaluation
    evaluation = {"dataset": "synthetic", "split": "val", "source": "evaluation.json", "results": [
        result_from_trainer_metrics(results[name], name, scales, images=len(data.eval))
        for name, scales in EVALUATED_SCALES.items()
    ]}
    (output_dir / "evaluation.json").write_text(metrics_to_json(evaluation))
    write_hub_files(model_dir, model.config, evaluation=evaluation, model_name=f"hms-{args.preset}-quickstart",
                    training_details={k: v for k, v in vars(args).items() if k not in ("output_dir", "overwrite")})
    figure = output_dir / "predictions.png"
    save_prediction_figure(model.eval(), data.eval[0], figure)
    miou = {name: results[name][f"{name}_mean_iou"] for name in EVALUATED_SCALES}
    report = {
        "model": str(model_dir),
        "figure": str(figure),
        **{f"{name}_mean_iou": value for name, value in miou.items()},
        "steps": args.max_steps,
        "seconds": round(time.perf_counter() - started, 1),
        "per_category_iou": {
            name: {key.split("_iou_", 1)[1]: value for key, value in metrics.items() if "_iou_" in key}
            for name, metrics in results.items()
        },
    }
    (output_dir / "report.json").write_text(metrics_to_json(report))
    print()
    for name, scales in EVALUATED_SCALES.items():
        label = "single-scale" if len(scales) == 1 else "attention chain"
        print(f"mIoU {label} ({', '.join(map(str, scales))}):".ljust(40) + f"{100 * miou[name]:.1f}")
    print(f"model: {model_dir}   figure: {figure}   report: {output_dir / 'report.json'}")
    print(f"took {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
