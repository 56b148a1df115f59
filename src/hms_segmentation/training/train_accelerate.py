"""Train an HMS model with one explicit loop on `accelerate` (the counterpart of the Trainer script).

    accelerate launch -m hms_segmentation.training.train_accelerate --output_dir runs/acc --max_steps 200 ...
    torchrun --nproc_per_node 2 -m hms_segmentation.training.train_accelerate ...

It takes the same arguments, with the same defaults, as `hms_segmentation.training.train`, and on the same seed and
data order gives the same training as the Trainer script. Checkpoints are `accelerator.save_state` folders
(`checkpoint-<step>`); `--resume_from_checkpoint` (or a rerun in the same `--output_dir`) continues from the last one
at the same LR-schedule position and data order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    LoggerType,
    ProjectConfiguration,
    TorchDynamoPlugin,
)
from accelerate.utils.memory import clear_device_cache
from tqdm.auto import tqdm
from transformers.trainer_pt_utils import AcceleratorConfig
from transformers.trainer_utils import enable_full_determinism, set_seed

from ..evaluation import metrics_to_json

from .arguments import DataArguments, HMSTrainingArguments, ModelArguments, parse_arguments
from .datasets import build_datasets, dataset_label_ids
from .evaluate import evaluate_scales
from .train import (
    NonFiniteLossError,
    build_model,
    check_one_full_batch,
    check_output_dir,
    configure_logging,
    create_optimizer,
    create_scheduler,
    hub_repository,
    normalize_uint8_pixel_values,
    optimizer_steps_per_epoch,
    pooled_means,
    publish_model_folder,
    saved_buffers,
    skip_nonfinite_step,
    write_evaluation_visuals,
    write_model_card,
)

logger = logging.getLogger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")

# The TrainingArguments this loop follows. Any other must keep its default here (`check_followed_arguments`): the
# Trainer script follows them all. (--tf32, --ddp_backend and --ddp_timeout act when the arguments are parsed.)
FOLLOWED_TRAINING_ARGUMENTS = frozenset({
    # the run
    "output_dir", "overwrite_output_dir", "do_train", "do_eval", "resume_from_checkpoint", "ignore_data_skip", "seed",
    "data_seed", "full_determinism", "use_cpu", "local_rank", "fp16", "bf16", "tf32", "stop_on_nonfinite_loss",
    "torch_compile", "torch_compile_backend", "torch_compile_mode", "torch_empty_cache_steps",
    "activation_checkpointing", "activation_checkpointing_kwargs", "gradient_checkpointing",
    "gradient_checkpointing_kwargs",
    # batches and data loading
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "train_sampling_strategy", "dataloader_drop_last", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
    "dataloader_in_order",
    # optimisation
    "num_train_epochs", "max_steps", "learning_rate", "momentum", "weight_decay", "optim", "optim_args", "adam_beta1",
    "adam_beta2", "adam_epsilon", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "poly_power",
    "poly_decay_unit", "max_grad_norm", "label_smoothing_factor",
    # many processes
    "ddp_backend", "ddp_timeout", "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers",
    "ddp_static_graph",
    # logging, evaluation, checkpoints, publishing
    "logging_strategy", "logging_steps", "logging_first_step", "log_level", "log_level_replica", "log_on_each_node",
    "disable_tqdm", "report_to", "run_name", "eval_strategy", "eval_steps", "eval_delay", "eval_on_start",
    "eval_visuals", "eval_visuals_keep",
    "save_strategy", "save_steps", "save_total_limit", "push_to_hub", "hub_model_id", "hub_token", "hub_private_repo",
    "hub_strategy", "hub_revision", "hub_always_push",
})


_EVALUATION_PRECISIONS = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}
"""accelerate's mixed precision -> `evaluate_scales`' precision."""


def _mixed_precision(args: HMSTrainingArguments) -> str:
    return "fp16" if args.fp16 else "bf16" if args.bf16 else "no"


def _step_of(checkpoint: str) -> int:
    match = CHECKPOINT_PATTERN.match(Path(checkpoint).name)
    if match is None:
        raise ValueError(f"--resume_from_checkpoint must name a checkpoint-<step> folder, got {checkpoint}")
    return int(match.group(1))


def _legacy_scheduler_state(checkpoint: str | None) -> Path | None:
    """The scheduler file of a checkpoint written when the scheduler went through `accelerator.prepare`, if it is one.

    Those checkpoints keep it as `scheduler.bin`, where a registered scheduler is `custom_checkpoint_0.pkl`; they
    resume with the state read from there.
    """
    if not checkpoint:
        return None
    folder = Path(checkpoint)
    legacy = folder / "scheduler.bin"
    return legacy if legacy.is_file() and not (folder / "custom_checkpoint_0.pkl").is_file() else None


def evaluate(
    model: torch.nn.Module, eval_dataset: torch.utils.data.Dataset, accelerator: Accelerator, id2label: dict[int, str],
    batch_size: int = 1, show_progress: bool = True, visuals: tuple[HMSTrainingArguments, int, tuple] | None = None,
) -> dict[str, float]:
    """Chained multi-scale evaluation (`config.inference_scales`) under the run's mixed precision, as `eval_*` metrics:
    `evaluate_scales`, in which each process evaluates every `num_processes`-th image and the confusion matrices are
    summed (a loader from `accelerator.prepare` would pad the last batches with repeated images, counted twice).
    `visuals`: `(args, step, palette)` for `--eval_visuals`, pictured by the main process as the Trainer script does."""
    # No DDP: ranks may see different numbers of batches here. Not compiled either: each image size and scale of
    # the full-size chain would be one more compilation.
    network = accelerator.unwrap_model(model, keep_torch_compile=False)
    network.eval()
    result = evaluate_scales(network, eval_dataset, network.config.inference_scales, device=accelerator.device,
                             id2label=id2label, precision=_EVALUATION_PRECISIONS[accelerator.mixed_precision],
                             progress=show_progress and accelerator.is_local_main_process, batch_size=batch_size,
                             batch_size_flag="--per_device_eval_batch_size")
    if visuals is not None and visuals[0].eval_visuals and accelerator.is_main_process:
        write_evaluation_visuals(network, eval_dataset, *visuals)
    network.train()
    metrics = {f"eval_{key}": result[key] for key in ("mean_iou", "mean_accuracy", "overall_accuracy")}
    metrics.update({f"eval_iou_{name}": iou for name, iou in result["per_category_iou"].items()})
    return metrics


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    args: HMSTrainingArguments,
    on_train_end: Callable[[torch.nn.Module, Accelerator], None] | None = None,
) -> dict[str, float]:
    """Train (and evaluate) as the arguments say. `on_train_end(model, accelerator)` runs on every process after the
    last step, before saving (e.g. to inspect the per-process model)."""
    check_followed_arguments(args)
    configure_logging(args)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=_mixed_precision(args),
        cpu=args.use_cpu,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.data_seed),
        kwargs_handlers=[_ddp_options(args)],
        log_with=_trackers(args.report_to),
        # --torch_compile: the training forward (and its loss) is compiled when the model is prepared, as the Trainer's
        dynamo_plugin=(TorchDynamoPlugin(backend=args.torch_compile_backend, mode=args.torch_compile_mode)
                       if args.torch_compile else None),
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=str(Path(args.output_dir) / "runs")),
    )
    _seed(args)
    resume_from = check_output_dir(args) if accelerator.is_main_process else None
    resume_from = _broadcast_object(resume_from)
    repo_id = hub_repository(args)
    data = build_datasets(data_args, seed=args.seed, do_eval=args.do_eval)
    if args.do_train:
        check_one_full_batch(data.train, args)
    if args.poly_power is None and args.lr_scheduler_type == "polynomial":
        args.poly_power = data.poly_power
    model = build_model(model_args, data.id2label)
    # seeded again once the model is built, as Trainer.__init__ does: the same random state from here on (dropout
    # masks, the data order), so that both scripts train alike on one seed
    _seed(args)
    evaluating = args.do_eval and data.eval is not None
    palette = dataset_label_ids(data_args)[1] if args.eval_visuals else ()  # of the --eval_visuals pictures
    if not args.do_train:  # as the Trainer script: only the evaluation, of the model as given
        return _evaluate_only(model, data, accelerator, args, palette) if evaluating else {}
    if args.activation_checkpointing:  # or its old name --gradient_checkpointing; as the Trainer does
        model.activation_checkpointing_enable(args.activation_checkpointing_kwargs)
    base_optimizer = create_optimizer(model, args, model_args.trunk_learning_rate_multiplier)
    is_map_style = hasattr(data.train, "__len__")
    train_loader = torch.utils.data.DataLoader(
        data.train,
        batch_size=args.per_device_train_batch_size,
        shuffle=is_map_style and args.train_sampling_strategy != "sequential",
        drop_last=args.dataloader_drop_last,
        **_loader_options(args),
    )
    model, optimizer, train_loader = accelerator.prepare(model, base_optimizer, train_loader)
    # Counted as the Trainer counts them: batches of this process per epoch, and optimizer steps per epoch, the last
    # one on what is left when the batches do not divide by the accumulation steps (`accumulate` syncs at the end
    # of the loader)
    batches_per_epoch = len(train_loader) if is_map_style else None
    steps_per_epoch = (optimizer_steps_per_epoch(batches_per_epoch, args.gradient_accumulation_steps) if is_map_style
                       else None)
    if args.max_steps <= 0:
        if steps_per_epoch is None:
            raise ValueError("a streaming training set needs --max_steps")
        args.max_steps = math.ceil(args.num_train_epochs * steps_per_epoch)
    scheduler = create_scheduler(base_optimizer, args, args.max_steps, steps_per_epoch=steps_per_epoch)
    # The scheduler is not prepared: accelerate's wrapper steps it once per process on every optimizer step (it
    # assumes a schedule counted in per-process batches), which on N processes would run the poly decay N times too
    # fast. Like the Trainer, it steps once per optimizer step; it is registered so save_state/load_state keep it.
    legacy_scheduler = _legacy_scheduler_state(resume_from)
    if legacy_scheduler is None:
        accelerator.register_for_checkpointing(scheduler)

    global_step, epoch = 0, 0
    if resume_from:
        accelerator.load_state(resume_from)
        global_step = _step_of(resume_from)
    if legacy_scheduler is not None:
        scheduler.load_state_dict(torch.load(legacy_scheduler, weights_only=False))
        accelerator.register_for_checkpointing(scheduler)
    if steps_per_epoch:
        epoch = global_step // steps_per_epoch
    logging_by_steps = args.logging_steps and args.logging_strategy == "steps"  # or "epoch" (at its end), or "no"
    log_every = _interval(args.logging_steps, args.max_steps) if logging_by_steps else 0
    save_every = _interval(args.save_steps, args.max_steps) if args.save_strategy == "steps" and args.save_steps else 0
    eval_every = _interval(args.eval_steps, args.max_steps) if evaluating and args.eval_strategy == "steps" else 0
    show_progress = accelerator.is_local_main_process and not args.disable_tqdm
    output_dir = Path(args.output_dir)
    metric_sums: dict[str, float] = {}
    metric_count, skipped_nonfinite = 0, 0
    history: list[dict[str, float]] = []

    # --report_to: the Trainer's integrations, through accelerate's trackers (TensorBoard, W&B, MLflow, ...)
    accelerator.init_trackers(args.run_name or "hms-segmentation", config=_hyperparameters(model_args, data_args, args))

    def log_evaluation(**position: int) -> None:
        metrics = evaluate(model, data.eval, accelerator, data.id2label, args.per_device_eval_batch_size,
                           show_progress, visuals=(args, position.get("step", global_step), palette))
        history.append({**metrics, **position})
        accelerator.log({**metrics, **{k: v for k, v in position.items() if k != "step"}},
                        step=position.get("step", global_step))

    def log_training(learning_rate: float) -> None:
        nonlocal metric_sums, metric_count
        means = pooled_means(metric_sums, metric_count)  # over all processes, as the Trainer logs
        logs = {("loss" if k == "loss" else f"loss_{k}"): v for k, v in means.items()}
        logs.update(step=global_step, learning_rate=learning_rate, skipped_nonfinite_steps=skipped_nonfinite)
        history.append(logs)
        accelerator.log({k: v for k, v in logs.items() if k != "step"}, step=global_step)
        if "loss" in logs:  # absent when every step since the last log was skipped as non-finite
            progress.set_postfix(loss=f"{logs['loss']:.4f}")
        metric_sums, metric_count = {}, 0

    progress = tqdm(total=args.max_steps, initial=global_step, disable=not show_progress)
    if evaluating and args.eval_on_start and global_step == 0:
        log_evaluation(step=0)
    model.train()
    while global_step < args.max_steps:
        if hasattr(data.train, "set_epoch"):
            data.train.set_epoch(epoch)
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        loader, done_in_epoch = train_loader, 0  # batches
        if global_step and not args.ignore_data_skip:  # (--ignore_data_skip: a resumed epoch starts over, as the Trainer's)
            if steps_per_epoch:
                done_in_epoch = max(0, (global_step - epoch * steps_per_epoch) * args.gradient_accumulation_steps)
            else:  # a stream chains its epochs into one iteration (`ConsecutiveEpochs`): skip every batch trained so far
                done_in_epoch = global_step * args.gradient_accumulation_steps
            if done_in_epoch > 0:
                loader = accelerator.skip_first_batches(train_loader, done_in_epoch)
        batch_index = None
        for batch_index, batch in enumerate(loader, start=done_in_epoch):
            with accelerator.accumulate(model):
                buffers = None if args.stop_on_nonfinite_loss else saved_buffers(model)
                outputs = model(**normalize_uint8_pixel_values(batch))
                loss = outputs.loss
                if not torch.isfinite(loss):
                    if args.stop_on_nonfinite_loss:
                        raise NonFiniteLossError(f"the training loss is {loss.item()} at step {global_step + 1}")
                    skipped_nonfinite += 1
                    loss = skip_nonfinite_step(model, buffers)
                else:
                    for name, value in outputs.loss_terms.items():
                        metric_sums[name] = metric_sums.get(name, 0.0) + float(value.detach())
                    metric_sums["loss"] = metric_sums.get("loss", 0.0) + float(loss.detach())
                    metric_count += 1
                accelerator.backward(loss * window_scale(batch_index, batches_per_epoch, args.gradient_accumulation_steps))
                if accelerator.sync_gradients and args.max_grad_norm and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            learning_rate = scheduler.get_last_lr()[0]  # the LR this step used, as the Trainer logs it
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the Trainer keeps the schedule in place too
                scheduler.step()
            global_step += 1
            progress.update(1)
            if args.torch_empty_cache_steps and global_step % args.torch_empty_cache_steps == 0:
                clear_device_cache()
            if log_every and global_step % log_every == 0 or args.logging_first_step and global_step == 1:
                log_training(learning_rate)
            if eval_every and global_step % eval_every == 0 and global_step >= args.eval_delay:
                log_evaluation(step=global_step)
            if save_every and global_step % save_every == 0:
                save_checkpoint(accelerator, output_dir, global_step, args.save_total_limit)
            if global_step >= args.max_steps:
                break
        if batch_index is None:
            raise ValueError(f"the training split gave no batch of {args.per_device_train_batch_size} sample(s) in epoch "
                             f"{epoch}: is it empty (or every sample bad)?")
        # the epoch ran to its end (and the last step may have ended both)
        if global_step < args.max_steps or steps_per_epoch and global_step % steps_per_epoch == 0:
            if args.logging_strategy == "epoch":
                log_training(learning_rate)
            if evaluating and args.eval_strategy == "epoch" and epoch + 1 >= args.eval_delay:
                log_evaluation(step=global_step, epoch=epoch + 1)
            if args.save_strategy == "epoch":
                save_checkpoint(accelerator, output_dir, global_step, args.save_total_limit)
        epoch += 1
    progress.close()

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    if on_train_end is not None:
        on_train_end(unwrapped, accelerator)
    unwrapped.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save)
    # Drop the DDP wrapper now. Left alive, its C++ reducer holds the last reference to the process group once
    # `end_training` has destroyed it, and frees it later while holding the GIL: with gloo that deadlocks whenever a
    # worker thread is still releasing the tensors of the last collective (seen once in ~8 two-process runs).
    del model
    accelerator.free_memory()
    metrics: dict[str, float] = {"train_steps": global_step}
    if evaluating:
        metrics.update(evaluate(unwrapped, data.eval, accelerator, data.id2label, args.per_device_eval_batch_size,
                                show_progress, visuals=(args, global_step, palette)))
    if accelerator.is_main_process:
        (Path(args.output_dir) / "log_history.json").write_text(metrics_to_json(history))
        (Path(args.output_dir) / "all_results.json").write_text(metrics_to_json(metrics))
        write_model_card(args.output_dir, unwrapped.config, model_args, data_args, args, metrics,
                         len(data.eval) if data.eval is not None else 0)
        if repo_id is not None:
            publish_model_folder(args, repo_id)
    accelerator.end_training()
    return metrics


def check_followed_arguments(args: HMSTrainingArguments) -> None:
    """Refuse any TrainingArguments value this loop would not follow (the Trainer script follows them all): set, it
    would be ignored without a word."""
    if args.load_best_model_at_end or args.save_strategy == "best":
        raise ValueError("--load_best_model_at_end and --save_strategy best need the Trainer script (hms-segmentation "
                         "train); this script saves the model of its last step")
    if args.lr_scheduler_type == "reduce_lr_on_plateau":
        raise ValueError("--lr_scheduler_type reduce_lr_on_plateau steps on evaluation metrics: use the Trainer script "
                         "(hms-segmentation train)")
    unfollowed = [f"--{field.name} {getattr(getattr(args, field.name), 'value', getattr(args, field.name))}"
                  for field in dataclasses.fields(args)
                  if field.init and field.name not in FOLLOWED_TRAINING_ARGUMENTS and _is_set(args, field)]
    if unfollowed:
        raise ValueError(f"{', '.join(unfollowed)}: this script does not follow "
                         f"{'this argument' if len(unfollowed) == 1 else 'these arguments'}; use the Trainer script "
                         "(hms-segmentation train), which follows every TrainingArguments flag, or leave "
                         f"{'it' if len(unfollowed) == 1 else 'them'} at the default")


def _is_set(args: HMSTrainingArguments, field: dataclasses.Field) -> bool:
    """Whether `field` differs from its default (an empty value counts as unset, as TrainingArguments normalises
    some: `debug` '' becomes [], `accelerator_config` None becomes the default `AcceleratorConfig`)."""
    value = getattr(args, field.name)
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        return True
    if field.name == "accelerator_config":
        return value is not None and value != AcceleratorConfig()
    unset = (None, "", [], {})
    return value != default and not (value in unset and default in unset)


def _ddp_options(args: HMSTrainingArguments) -> DistributedDataParallelKwargs:
    """DistributedDataParallel's options from --ddp_*, with the Trainer's default for unused parameters (looked for,
    unless activation checkpointing is on)."""
    find_unused = args.ddp_find_unused_parameters
    if find_unused is None:
        find_unused = not args.activation_checkpointing
    options = {"find_unused_parameters": find_unused}
    for name in ("bucket_cap_mb", "broadcast_buffers", "static_graph"):
        if getattr(args, f"ddp_{name}") is not None:
            options[name] = getattr(args, f"ddp_{name}")
    return DistributedDataParallelKwargs(**options)


def _loader_options(args: HMSTrainingArguments) -> dict:
    """The training DataLoader's --dataloader_* options, as the Trainer passes them."""
    return {
        "num_workers": args.dataloader_num_workers,
        "pin_memory": args.dataloader_pin_memory,
        "persistent_workers": args.dataloader_persistent_workers,
        "prefetch_factor": args.dataloader_prefetch_factor,
        "multiprocessing_context": args.dataloader_multiprocessing_context,
        "in_order": args.dataloader_in_order,
    }


def _evaluate_only(model: torch.nn.Module, data, accelerator: Accelerator, args: HMSTrainingArguments,
                   palette: tuple) -> dict[str, float]:
    """--do_eval without --do_train: the model as given, evaluated; its metrics in ``all_results.json``."""
    model = model.to(accelerator.device)
    metrics = evaluate(model, data.eval, accelerator, data.id2label, args.per_device_eval_batch_size,
                       not args.disable_tqdm, visuals=(args, 0, palette))
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "all_results.json").write_text(metrics_to_json(metrics))
    accelerator.end_training()
    return metrics


def _trackers(report_to: list | None) -> list | None:
    """accelerate's trackers for ``--report_to`` (names, or `GeneralTracker` objects); `None` when nothing reports.
    The Trainer knows more integrations than accelerate: those are named in a clear error."""
    if not report_to:
        return None
    supported = {logger.value for logger in LoggerType}
    unsupported = [name for name in report_to if isinstance(name, str) and name not in supported]
    if unsupported:
        raise ValueError(f"--report_to {' '.join(unsupported)}: this script reports through accelerate, which knows "
                         f"{sorted(supported - {'all'})}; use the Trainer script (hms-segmentation train) for the others")
    return list(report_to)


def _hyperparameters(
    model_args: ModelArguments, data_args: DataArguments, args: HMSTrainingArguments
) -> dict[str, bool | int | float | str]:
    """The run's arguments as trackers store them: scalars only (others as text, unset values left out), and the
    training arguments as the Trainer reports them (`to_sanitized_dict`: tokens redacted)."""
    values: dict[str, bool | int | float | str] = {}
    for name, value in [*vars(model_args).items(), *vars(data_args).items(), *args.to_sanitized_dict().items()]:
        if not name.startswith("_") and value is not None and name not in values:
            values[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return values


def window_scale(batch_index: int, batches_per_epoch: int | None, accumulation_steps: int) -> float:
    """Factor on the loss of batch `batch_index` of an epoch so that each optimizer step averages its own batches.

    `accelerator.backward` divides every loss by `accumulation_steps`; an epoch whose batches do not divide by it
    ends on a shorter window, whose batches then need `accumulation_steps / window` (what the Trainer does).
    """
    if batches_per_epoch is None:
        return 1.0
    window_start = batch_index - batch_index % accumulation_steps
    return accumulation_steps / min(accumulation_steps, batches_per_epoch - window_start)


def _interval(steps: float, max_steps: int) -> int:
    """A `--logging_steps` / `--save_steps` / `--eval_steps` value in steps: below 1 it is a share of the run, as the
    Trainer reads it."""
    return max(1, math.ceil(max_steps * steps)) if steps < 1 else int(steps)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, total_limit: int | None = None) -> Path:
    """`save_state` into a staging folder, then rename it to `checkpoint-<step>`: a kill never leaves half a checkpoint.
    With `total_limit`, only that many checkpoints are kept (`--save_total_limit`): this one and the most recently
    written others."""
    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / f"tmp-checkpoint-{step}"
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()  # every process writes its own RNG state into the folder before it is renamed
    if accelerator.is_main_process:
        (staging / "hms_checkpoint.json").write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)  # an older save of the same step, superseded by this complete one
        os.replace(staging, final)
        if total_limit:
            # the oldest written go first, as the Trainer rotates them, and never the one just saved: a run resumed
            # from an earlier checkpoint saves steps below those of the checkpoints it left behind
            others = sorted((folder for folder in output_dir.iterdir() if CHECKPOINT_PATTERN.match(folder.name)
                             and folder.is_dir() and folder != final), key=lambda folder: folder.stat().st_mtime)
            for folder in others[: max(0, len(others) - (total_limit - 1))]:
                shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    return final


def _seed(args: HMSTrainingArguments) -> None:
    """`--seed` for every random generator, as the Trainer seeds them (`--full_determinism`: deterministic kernels
    too)."""
    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)


def _broadcast_object(value):
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        holder = [value]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]
    return value


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run_training(*parse_arguments(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
