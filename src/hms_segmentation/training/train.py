"""Train (and evaluate) an HMS model with `transformers.Trainer`.

    hms-segmentation train --output_dir runs/synthetic --max_steps 200 --crop_size 256
    python -m hms_segmentation.training.train config.yaml            # the same keys in a YAML/JSON file
    accelerate launch -m hms_segmentation.training.train ...          # or torchrun --nproc_per_node N -m ...

In the style of the transformers example scripts: dataclass arguments (`arguments.py`), the model from a preset or
`from_pretrained`, the data from `hms_segmentation.data`, and the Trainer running the loop. What HMSA adds: SGD with
momentum and polynomial decay, per-term loss logging, a stop (or counted skip) on a non-finite loss, and a streamed
confusion matrix for mIoU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
import shutil
from pathlib import Path

import torch
import transformers
from transformers import Trainer, TrainerCallback, default_data_collator, get_scheduler, set_seed
from transformers.trainer_utils import has_length

from ..configuration_hms import HMSConfig
from ..convert_nvidia import load_imagenet_trunk
from ..data.transforms import normalize_pixel_values
from ..evaluation import make_compute_metrics, preprocess_logits_for_metrics
from ..hub import check_can_publish, push_to_hub, result_from_trainer_metrics, write_hub_files
from ..image_processing_hms import HMSImageProcessor
from ..modeling_hms import HMSForSemanticSegmentation
from .arguments import (
    EPOCH_DECAY_WITHOUT_EPOCHS,
    DataArguments,
    HMSTrainingArguments,
    ModelArguments,
    parse_arguments,
    parse_scales,
)
from .datasets import build_datasets, check_same_size, dataset_label_ids
from .evaluate import save_evaluation_visuals

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def saved_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Copies of `model`'s buffers (BatchNorm statistics): the state a skipped non-finite step must leave as it was."""
    return [buffer.detach().clone() for buffer in model.buffers()]


def skip_nonfinite_step(model: torch.nn.Module, buffers: list[torch.Tensor]) -> torch.Tensor:
    """
    Undo what a forward with a non-finite loss changed and return the loss to back-propagate instead: zero, with a zero
    gradient for every trainable parameter.

    The non-finite loss times zero would not do: its backward runs through the non-finite forward (0 x inf = NaN) and
    the optimizer would write NaN into every weight; and the forward already put its non-finite batch statistics into
    the BatchNorm running statistics, which `buffers` (from `saved_buffers`, taken before the forward) restore. Every
    parameter gets its (zero) gradient, as distributed data parallel expects one from each. Momentum and weight decay
    still apply at the optimizer step; the batch adds nothing.
    """
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers):
            buffer.copy_(saved)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    return torch.stack([parameter.sum() * 0.0 for parameter in trainable]).sum()


def build_model(model_args: ModelArguments, id2label: dict[int, str]) -> HMSForSemanticSegmentation:
    """A preset model, or a pretrained one adapted to the dataset's label set."""
    label_settings = {"id2label": id2label, "label2id": {name: index for index, name in id2label.items()}}
    scale_settings = {
        "training_scales": parse_scales(model_args.training_scales),
        "inference_scales": parse_scales(model_args.eval_scales),
        "primary_loss": model_args.primary_loss,
    }
    if model_args.training_stage == 1:
        scale_settings["training_scales"] = STAGE_ONE_SCALES
    elif model_args.training_stage in (2, 3) and len(scale_settings["training_scales"]) < 2:
        raise ValueError(f"--training_stage {model_args.training_stage} trains on two or more scales, got "
                         f"--training_scales {model_args.training_scales}")
    if model_args.backbone is not None:
        config = HMSConfig(backbone=model_args.backbone, use_pretrained_backbone=True, **label_settings, **scale_settings)
        model = HMSForSemanticSegmentation(config)
    elif model_args.model_name_or_path is None:
        config = HMSConfig.from_preset(model_args.preset, **label_settings, **scale_settings)
        model = HMSForSemanticSegmentation(config)
    else:
        pretrained_labels = HMSConfig.from_pretrained(model_args.model_name_or_path).num_labels
        if pretrained_labels != len(id2label) and not model_args.ignore_mismatched_sizes:
            raise ValueError(
                f"{model_args.model_name_or_path} predicts {pretrained_labels} classes, the dataset has {len(id2label)}: "
                "pass --ignore_mismatched_sizes to re-initialise the class and auxiliary heads for the dataset's "
                "classes (trunk and attention head are kept)"
            )
        model = HMSForSemanticSegmentation.from_pretrained(
            model_args.model_name_or_path,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **label_settings,
            **scale_settings,
        )
    if model_args.imagenet_trunk:
        ignored = load_imagenet_trunk(model, model_args.imagenet_trunk)
        logger.info("loaded ImageNet trunk weights from %s (ignored %d classifier keys)", model_args.imagenet_trunk, len(ignored))
    if model_args.freeze_trunk:
        freeze(model.backbone)
    for name in STAGE_FROZEN_MODULES[model_args.training_stage]:
        freeze(getattr(model, name))
    if model_args.sync_bn and torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.cuda.is_available():
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            # PyTorch's SyncBatchNorm runs on CUDA only; CPU processes keep their own batch statistics
            logger.warning("--sync_bn needs CUDA devices; on CPU every process keeps its own BatchNorm statistics")
    return model


STAGE_ONE_SCALES = [1.0]
STAGE_FROZEN_MODULES: dict[int, tuple[str, ...]] = {
    0: (),
    1: ("scale_attention_head",),  # one scale: nothing to fuse, the attention head would get no gradient
    2: ("backbone", "decode_head"),
    3: ("scale_attention_head",),
}
"""The staged recipe for small GPUs: what each `--training_stage` keeps fixed."""


def freeze(module: torch.nn.Module) -> None:
    """
    Keep `module` fixed while the rest trains: no gradients, and BatchNorm statistics that stop moving too (the
    module stays in eval mode when the model is put in training mode).
    """
    module.requires_grad_(False)
    for sub in module.modules():
        # nn.Module.train(mode) recurses through children; pinning each submodule's own `train` keeps them in eval
        sub.train = functools.partial(_stay_in_eval_mode, sub)
    module.eval()


def _stay_in_eval_mode(module: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    module.training = False
    return module


def sgd_parameter_groups(model: torch.nn.Module, learning_rate: float, trunk_multiplier: float) -> list[dict]:
    """Trunk and heads as two groups, so the trunk can learn at `trunk_multiplier` x the heads' LR."""
    trunk = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")]
    heads = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    groups = [{"params": heads, "lr": learning_rate}]
    if trunk:
        groups.append({"params": trunk, "lr": learning_rate * trunk_multiplier})
    return groups


def create_optimizer(
    model: torch.nn.Module, args: HMSTrainingArguments, trunk_multiplier: float = 1.0
) -> torch.optim.Optimizer:
    """``--optim sgd`` (the default): the reference's SGD, momentum ``--momentum``, weight decay on every parameter,
    with what ``--optim_args`` adds (``nesterov``, ``dampening``, as transformers' SGD reads them). Any other
    ``--optim``: the optimizer the Trainer would build for it, over the same parameter groups (so
    ``--trunk_learning_rate_multiplier`` and a frozen trunk still hold)."""
    groups = sgd_parameter_groups(model, args.learning_rate, trunk_multiplier)
    if args.optim == "sgd":
        _, optim_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)  # parses --optim_args
        optim_kwargs.pop("lr", None)
        settings = {"weight_decay": args.weight_decay, **optim_kwargs, "momentum": args.momentum}
        return torch.optim.SGD(groups, lr=args.learning_rate, **settings)
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return optimizer_cls(groups, **{"weight_decay": args.weight_decay, **optimizer_kwargs})


def create_scheduler(
    optimizer: torch.optim.Optimizer, args: HMSTrainingArguments, total_steps: int, steps_per_epoch: int | None = None
) -> torch.optim.lr_scheduler.LRScheduler:
    """``--lr_scheduler_type polynomial`` (the default): the reference's poly decay to zero, power ``--poly_power``
    (2.0 when unset), after the optional warmup; with ``--poly_decay_unit epoch`` the LR holds for an epoch of
    `steps_per_epoch` optimizer steps and decays at its end, as the reference's scheduler does. Any other type:
    transformers' scheduler of that name."""
    warmup_steps = args.get_warmup_steps(total_steps)
    if args.lr_scheduler_type == "polynomial":
        power = 2.0 if args.poly_power is None else args.poly_power
        if args.poly_decay_unit == "epoch":
            if steps_per_epoch is None:
                raise ValueError(EPOCH_DECAY_WITHOUT_EPOCHS)
            return torch.optim.lr_scheduler.LambdaLR(optimizer, epoch_poly_schedule(total_steps, steps_per_epoch, power))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(total_steps, warmup_steps, power))
    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps,
                         num_training_steps=total_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)


def poly_schedule(total_steps: int, warmup_steps: int, power: float):
    """LR factor of the reference's poly decay, `(1 - step / total) ** power`, after an optional linear warmup."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return (1.0 - progress) ** power

    return factor


def optimizer_steps_per_epoch(batches: int, accumulation_steps: int) -> int:
    """Optimizer steps in an epoch of `batches` batches, counted as the Trainer counts them: the last one on what is
    left when the batches do not divide by the accumulation steps."""
    return max(1, math.ceil(batches / accumulation_steps))


def epoch_poly_schedule(total_steps: int, steps_per_epoch: int, power: float):
    """LR factor of the reference's poly decay counted in epochs, `(1 - epoch / epochs) ** power` for every step of an
    epoch, `epochs` being the epochs that `total_steps` begin (its LambdaLR steps once at each epoch's end)."""
    epochs = math.ceil(total_steps / steps_per_epoch)

    def factor(step: int) -> float:
        return (1.0 - min(step // steps_per_epoch, epochs) / epochs) ** power

    return factor


def image_processor_for(model_args: ModelArguments, data_args: DataArguments | None = None) -> HMSImageProcessor:
    """The image processor the trained model is saved with: that of the fine-tuned folder when it has one (its
    settings carry over), else the default one; with `data_args` evaluated at a long side (`eval_long_side`: 2177 for
    Mapillary, the reference's evaluation), the processor shrinks images to it too, so that a pipeline sees images as
    the run's evaluation (and the card's figures) did."""
    source = model_args.model_name_or_path
    if source is not None and (Path(source) / "preprocessor_config.json").is_file():
        processor = HMSImageProcessor.from_pretrained(source)
    else:
        processor = HMSImageProcessor()
    if data_args is not None and data_args.eval_long_side:
        processor.max_long_side = data_args.eval_long_side
    return processor


def write_model_card(
    output_dir: str | Path,
    config: HMSConfig,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: HMSTrainingArguments,
    metrics: dict[str, float],
    eval_images: int,
    image_processor: HMSImageProcessor | None = None,
) -> None:
    """``README.md`` of a training run's output folder: the recipe and, when the run ended with an evaluation, its
    results (model-index included), so that the folder is ready for `hms-segmentation push` as it is; with the image
    processor (default: `image_processor_for(model_args, data_args)`)."""
    evaluation = None
    if "eval_mean_iou" in metrics:
        evaluation = {"dataset": data_args.dataset, "split": data_args.eval_split, "source": "all_results.json",
                      "results": [result_from_trainer_metrics(metrics, "eval", config.inference_scales, eval_images)]}
        if data_args.eval_long_side:
            evaluation["eval_long_side"] = data_args.eval_long_side
    start = model_args.model_name_or_path or model_args.backbone or f"preset {model_args.preset}"
    details = {
        "started from": start + (f", ImageNet trunk {model_args.imagenet_trunk}" if model_args.imagenet_trunk else ""),
        "optimizer steps": metrics.get("train_steps", "n/a"),
        "images per step": training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
        * training_args.world_size,
        "crop": f"{data_args.crop_size}x{data_args.crop_width or data_args.crop_size}",
        "augmentation": augmentation_description(data_args),
        "optimizer": optimizer_description(training_args),
        "precision": "fp16" if training_args.fp16 else "bf16" if training_args.bf16 else "fp32",
    }
    image_processor = image_processor or image_processor_for(model_args, data_args)
    write_hub_files(output_dir, config, image_processor=image_processor, evaluation=evaluation,
                    dataset=data_args.dataset, split=data_args.eval_split, training_details=details,
                    model_name=Path(output_dir).resolve().name)


def augmentation_description(args: DataArguments) -> str:
    """One line on the training augmentation `build_datasets` sets up from `args`."""
    scale = f"random scale {args.scale_min:g}-{args.scale_max:g}"
    scale += f" of a {args.pre_size}-pixel long side" if args.pre_size else ""
    parts = [scale, "horizontal flip", f"colour jitter {args.color_jitter:g} (hue {args.hue:g})"]
    if args.blur_probability:
        parts.append(f"Gaussian blur on {args.blur_probability:.0%} of the crops")
    if args.class_uniform_fraction:
        parts.append(f"{args.class_uniform_fraction:.0%} of the crops class-uniform")
    placement = "centred" if args.crop_padding == "centre" else "at random"
    fill = "black" if args.crop_pad_fill == "black" else "the mean colour"
    parts.append(f"frames smaller than the crop placed {placement} and padded with {fill}")
    return ", ".join(parts)


def optimizer_description(args: HMSTrainingArguments) -> str:
    """One line on the optimizer and schedule `create_optimizer` and `create_scheduler` build from `args`."""
    optim, schedule = (str(getattr(value, "value", value)) for value in (args.optim, args.lr_scheduler_type))
    name = f"SGD (momentum {args.momentum})" if optim == "sgd" else optim
    per_epoch = " once per epoch" if args.poly_decay_unit == "epoch" else ""
    decay = f"poly decay (power {args.poly_power}){per_epoch}" if schedule == "polynomial" else f"{schedule} schedule"
    steps = args.warmup_steps  # transformers reads a value below 1 as a share of the steps
    warmup = f" after {steps:.0%} of the steps as warmup" if 0 < steps < 1 else f" after {steps:g} warmup steps"
    warmup = warmup if steps else ""
    return f"{name}, learning rate {args.learning_rate}, weight decay {args.weight_decay}, {decay}{warmup}"


def configure_logging(training_args: HMSTrainingArguments) -> None:
    """``--log_level`` / ``--log_level_replica`` / ``--log_on_each_node`` for this package's messages and transformers'
    (as the Trainer applies them). Left passive, this package logs info on the main process(es), warnings elsewhere,
    and transformers keeps its own verbosity."""
    level = training_args.get_process_log_level()
    transformers.utils.logging.set_verbosity(level)
    chosen = training_args.log_level if training_args.should_log else training_args.log_level_replica
    if chosen == "passive":
        level = logging.INFO if training_args.should_log else logging.WARNING
    logging.getLogger("hms_segmentation").setLevel(level)


def hub_repository(training_args: HMSTrainingArguments) -> str | None:
    """With ``--push_to_hub``: the repository the finished model folder goes to (``--hub_model_id``, else the output
    folder's name), checked before any training (offline mode, token, id). The Trainer's own pushes are turned off:
    they would publish ``training_args.bin`` (a pickle) and a generic card; `publish_model_folder` sends the model
    folder as `hms-segmentation push` does, once, at the end (``--hub_strategy`` end or every_save, the default;
    checkpoints are never published)."""
    if not training_args.push_to_hub:
        return None
    if not training_args.do_train:
        raise ValueError("--push_to_hub publishes the model this run trains: it needs --do_train (to publish an existing "
                         "model folder: hms-segmentation push FOLDER REPO_ID)")
    strategy = getattr(training_args.hub_strategy, "value", training_args.hub_strategy)  # a HubStrategy
    if strategy not in ("every_save", "end"):
        raise ValueError(f"--hub_strategy {strategy}: checkpoints are never published (they hold "
                         "pickles); the finished model folder is, once at the end (--hub_strategy end or every_save)")
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).resolve().name
    check_can_publish(repo_id, training_args.hub_token)
    training_args.push_to_hub = False
    return repo_id


def publish_model_folder(training_args: HMSTrainingArguments, repo_id: str) -> str:
    """Publish the run's output folder (weights, config, remote code, image processor, card) to `repo_id`."""
    url = push_to_hub(training_args.output_dir, repo_id, private=bool(training_args.hub_private_repo),
                      token=training_args.hub_token, revision=training_args.hub_revision,
                      commit_message="Upload HMS model trained with hms-segmentation")
    logger.info("published %s -> %s", training_args.output_dir, url)
    return url


def collate_samples(samples: list[dict]) -> dict[str, torch.Tensor]:
    """The Trainer's `default_data_collator`, after :func:`check_same_size` (a clear error instead of torch's)."""
    return default_data_collator(check_same_size(samples))


def normalize_uint8_pixel_values(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch the model takes: uint8 ``pixel_values`` (training samples of ``TrainAugmentationOptions(
    output_dtype="uint8")``) colour-jittered by their ``color_jitter`` plans, blurred by their ``blur_sigma`` and
    normalised with the ImageNet mean/std where they are, i.e. on the device after the DataLoader's transfer; any
    other batch is returned as it is. Both training loops call this before the forward."""
    pixel_values = inputs.get("pixel_values")
    if pixel_values is None or pixel_values.dtype != torch.uint8:
        return inputs
    inputs = dict(inputs)
    inputs["pixel_values"] = normalize_pixel_values(pixel_values, color_jitter=inputs.pop("color_jitter", None),
                                                    blur_sigma=inputs.pop("blur_sigma", None))
    return inputs


class SetEpochCallback(TrainerCallback):
    """Reseed augmentation, class-uniform plan and stream order at every epoch (and on resume)."""

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        dataset = getattr(train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(int(state.epoch or 0))


def write_evaluation_visuals(model: HMSForSemanticSegmentation, eval_dataset, training_args: HMSTrainingArguments,
                             step: int, palette: tuple[tuple[int, int, int], ...]) -> Path:
    """`--eval_visuals N` (one process): pictures N images of the evaluation split, the same ones each time, into
    `<output_dir>/visuals/step-<step>/`, then removes the pictures of earlier evaluations beyond the
    `--eval_visuals_keep` latest. Returns the new folder."""
    root = Path(training_args.output_dir) / "visuals"
    folder = root / f"step-{step}"
    save_evaluation_visuals(model, eval_dataset, folder, training_args.eval_visuals, palette,
                            f"{training_args.output_dir}, step {step}")
    if training_args.eval_visuals_keep:
        steps = sorted(int(match[1]) for path in root.iterdir() if (match := re.fullmatch(r"step-(\d+)", path.name)))
        for old in steps[:-training_args.eval_visuals_keep]:
            if old != step:  # an evaluation of a resumed run at an earlier step is still the newest
                shutil.rmtree(root / f"step-{old}")
    return folder


class EvaluationVisualsCallback(TrainerCallback):
    """`--eval_visuals N`: after each evaluation, the first process pictures N images of the evaluation split with the
    model as evaluated (`write_evaluation_visuals`)."""

    def __init__(self, eval_dataset, palette: tuple[tuple[int, int, int], ...]):
        self.eval_dataset = eval_dataset
        self.palette = palette

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            write_evaluation_visuals(model, self.eval_dataset, args, state.global_step, self.palette)


class HMSTrainer(Trainer):
    """`Trainer` with the reference's optimiser and schedule, loss-term logging and a non-finite-loss guard."""

    def __init__(self, *args, trunk_learning_rate_multiplier: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.trunk_learning_rate_multiplier = trunk_learning_rate_multiplier
        self._loss_term_sums: dict[str, float] = {}
        self._loss_term_count = 0
        self.skipped_nonfinite_steps = 0

    def get_eval_dataloader(self, eval_dataset=None):
        with self._every_batch_kept():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._every_batch_kept():
            return super().get_test_dataloader(test_dataset)

    def evaluation_loop(self, *args, **kwargs):
        # a streaming compute_metrics (make_compute_metrics) keeps counts between calls: an evaluation interrupted
        # earlier in this process must not add its partial counts to this one
        getattr(self.compute_metrics, "reset", lambda: None)()
        return super().evaluation_loop(*args, **kwargs)

    @contextlib.contextmanager
    def _every_batch_kept(self):
        # `Trainer` applies --dataloader_drop_last (ours defaults to true, for training) to evaluation and prediction
        # too, where a metric must count every image
        drop_last = self.args.dataloader_drop_last
        self.args.dataloader_drop_last = False
        try:
            yield
        finally:
            self.args.dataloader_drop_last = drop_last

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = create_optimizer(model or self.model, self.args, self.trunk_learning_rate_multiplier)
        return self.optimizer

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        # optimizer steps per epoch, counted as the Trainer counts them, for --poly_decay_unit epoch
        self._steps_per_epoch = (optimizer_steps_per_epoch(len(loader), self.args.gradient_accumulation_steps)
                                 if has_length(loader) else None)
        return loader

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = create_scheduler(optimizer or self.optimizer, self.args, num_training_steps,
                                                 steps_per_epoch=getattr(self, "_steps_per_epoch", None))
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        buffers = saved_buffers(model) if model.training and not self.args.stop_on_nonfinite_loss else None
        outputs = model(**normalize_uint8_pixel_values(inputs))
        loss = outputs.loss
        if not torch.isfinite(loss):
            step = self.state.global_step + 1
            if self.args.stop_on_nonfinite_loss:
                raise NonFiniteLossError(
                    f"the training loss is {loss.item()} at step {step}; lower the learning rate, check the labels, "
                    "or pass --stop_on_nonfinite_loss false to skip such steps"
                )
            self.skipped_nonfinite_steps += 1
            logger.warning("non-finite loss at step %d skipped (%d so far)", step, self.skipped_nonfinite_steps)
            loss = skip_nonfinite_step(model, buffers) if buffers is not None else loss.nan_to_num(0.0, 0.0, 0.0) * 0.0
        elif model.training and outputs.loss_terms:
            for name, value in outputs.loss_terms.items():
                self._loss_term_sums[name] = self._loss_term_sums.get(name, 0.0) + float(value.detach())
            self._loss_term_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: every process is here (the Trainer gathers the loss for it)
            for name, mean in pooled_means(self._loss_term_sums, self._loss_term_count).items():
                logs[f"loss_{name}"] = round(mean, 4)
            self._loss_term_sums, self._loss_term_count = {}, 0
        if self.skipped_nonfinite_steps:
            logs["skipped_nonfinite_steps"] = self.skipped_nonfinite_steps
        super().log(logs, start_time)


def pooled_means(sums: dict[str, float], count: int) -> dict[str, float]:
    """Per-name means of `sums`, totals over `count` steps, pooled over all processes when several run.

    Every process must call it at the same point (it gathers); one that saw no finite step contributes nothing.
    """
    pooled = [(sums, count)]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pooled = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(pooled, (sums, count))
    total_count = sum(n for _, n in pooled)
    totals: dict[str, float] = {}
    for part, _ in pooled:
        for name, value in part.items():
            totals[name] = totals.get(name, 0.0) + value
    return {name: value / total_count for name, value in totals.items()} if total_count else {}


COMPLETE_CHECKPOINT_FILES = ("trainer_state.json", "hms_checkpoint.json")
"""Written last into a checkpoint (by Trainer / by the Accelerate script): a folder without one is incomplete."""


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest `checkpoint-<step>` folder that was written completely; half-written ones are skipped."""
    candidates = []
    for folder in Path(output_dir).glob("checkpoint-*"):
        suffix = folder.name.split("-", 1)[1]
        if folder.is_dir() and suffix.isdigit():
            if any(_is_complete_json(folder / name) for name in COMPLETE_CHECKPOINT_FILES):
                candidates.append((int(suffix), folder))
            else:
                logger.warning("ignoring %s: it was not written completely (the run stopped while saving)", folder)
    return str(max(candidates)[1]) if candidates else None


def _is_complete_json(path: Path) -> bool:
    """`path` exists and parses: a marker cut short by a kill while it was being written does not count."""
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def check_resumable(checkpoint: str | Path, flag: str) -> str:
    """`checkpoint` as given, once it holds the optimizer state a resumed run needs.

    Raises:
        ValueError: A Trainer checkpoint saved with ``--save_only_model`` (weights and trainer_state.json only): resuming
            from it would restart the LR schedule at the step count it records and lose the momentum.
    """
    folder = Path(checkpoint)
    if (folder / "trainer_state.json").is_file() and not any(folder.glob("optimizer.*")):
        raise ValueError(
            f"{flag} {folder}: the checkpoint holds the weights only (saved with --save_only_model), no optimizer or "
            "LR scheduler state, so it cannot resume the run where it stopped; fine-tune from it instead "
            f"(--model_name_or_path {folder}, a new --output_dir), or remove the run's checkpoint-* folders to start "
            "over"
        )
    return str(checkpoint)


def check_output_dir(training_args: HMSTrainingArguments) -> str | None:
    """The checkpoint to resume from, if any; refuse to reuse a non-empty output folder otherwise.

    Raises:
        FileExistsError: `--output_dir` is a file, or a non-empty folder without a checkpoint to resume (and no
            `--overwrite_output_dir`).
        ValueError: The checkpoint to resume from holds no optimizer state (see `check_resumable`).
    """
    output_dir = Path(training_args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"--output_dir {output_dir} is a file; expected a folder (new, empty, or an earlier run's)")
    if training_args.resume_from_checkpoint:
        return check_resumable(training_args.resume_from_checkpoint, "--resume_from_checkpoint")
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return None
    last = last_complete_checkpoint(output_dir)
    if last is not None and training_args.do_train:
        check_resumable(last, f"--output_dir {output_dir} would resume from its last checkpoint,")
        logger.info("resuming from %s", last)
        return last
    if not training_args.overwrite_output_dir:
        raise FileExistsError(
            f"output folder {output_dir} is not empty and holds no checkpoint to resume; "
            "pass --overwrite_output_dir to write into it anyway, or choose another --output_dir"
        )
    return None


def check_one_full_batch(train_dataset, training_args: HMSTrainingArguments) -> None:
    """Refuse a map-style training split too small for one full batch on every process: with the last incomplete
    batch dropped (``--dataloader_drop_last``, the default) an epoch would hold no step, and the run would end at once."""
    if not training_args.dataloader_drop_last or not hasattr(train_dataset, "__len__"):
        return
    batch, processes = training_args.per_device_train_batch_size, training_args.world_size
    if len(train_dataset) < batch * processes:
        raise ValueError(
            f"the training split has {len(train_dataset)} sample(s), fewer than one full batch on every process "
            f"(--per_device_train_batch_size {batch} x {processes} process(es)); lower the batch size, or pass "
            "--dataloader_drop_last false to train on incomplete batches"
        )


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: HMSTrainingArguments,
    callbacks: list[TrainerCallback] | None = None,
) -> dict[str, float]:
    """Train and/or evaluate as the arguments say (extra `TrainerCallback`s welcome); returns the final metrics."""
    configure_logging(training_args)
    set_seed(training_args.seed)
    resume_from = check_output_dir(training_args)
    repo_id = hub_repository(training_args)
    data = build_datasets(data_args, seed=training_args.seed, do_eval=training_args.do_eval)
    if training_args.do_train:
        check_one_full_batch(data.train, training_args)
    if training_args.poly_power is None and training_args.lr_scheduler_type == "polynomial":
        training_args.poly_power = data.poly_power
    model = build_model(model_args, data.id2label)
    visuals_callback = ([EvaluationVisualsCallback(data.eval, dataset_label_ids(data_args)[1])]
                        if training_args.eval_visuals and data.eval is not None else [])
    trainer = HMSTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train if training_args.do_train else None,
        eval_dataset=data.eval,
        data_collator=collate_samples,
        compute_metrics=make_compute_metrics(len(data.id2label), model.config.ignore_index, data.id2label),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        callbacks=[SetEpochCallback(), *visuals_callback, *(callbacks or [])],
        trunk_learning_rate_multiplier=model_args.trunk_learning_rate_multiplier,
        processing_class=image_processor_for(model_args, data_args),  # saved with the model and every checkpoint
    )
    metrics: dict[str, float] = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=resume_from)
        trainer.save_model()
        metrics.update(result.metrics)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval and data.eval is not None:
        eval_metrics = trainer.evaluate()
        metrics.update(eval_metrics)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    if training_args.do_train and trainer.is_world_process_zero():
        metrics.setdefault("train_steps", trainer.state.global_step)
        write_model_card(training_args.output_dir, model.config, model_args, data_args, training_args, metrics,
                         len(data.eval) if data.eval is not None else 0, image_processor=trainer.processing_class)
        if repo_id is not None:
            publish_model_folder(training_args, repo_id)
    return metrics


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, training_args = parse_arguments(argv)
    run_training(model_args, data_args, training_args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
