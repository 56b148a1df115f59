"""Command-line arguments of the training scripts, as dataclasses for `HfArgumentParser` (also from YAML/JSON).

Defaults are the paper's record recipe (NVIDIA/semantic-segmentation `scripts/train_cityscapes_sota.yml`, 16 GPUs x 1
image): SGD with momentum 0.9, weight decay 1e-4, learning rate 0.01 with polynomial decay (power 2.0 for Cityscapes,
1.0 for Mapillary), training scales 0.5,1.0, evaluation scales 0.5,1.0,2.0, RMI loss, class-uniform share 0.5, and the
reference's default of 2 images per device. Its 1024x2048 crop is `--crop_size 1024 --crop_width 2048`; its fp16 and
SyncBatchNorm are `--fp16 --sync_bn` (off by default, so that the defaults run on a CPU). For Mapillary Vistas the data
defaults follow `scripts/train_mapillary.yml` (`MAPILLARY_RECIPE`). Where the reference decays the learning rate once
per epoch, this decays it at every optimizer step by default (`--poly_decay_unit epoch` is the reference's).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml
from transformers import HfArgumentParser, TrainingArguments

from ..configuration_hms import MODEL_PRESETS, validate_scales
from ..data.mapillary import MAPILLARY_VERSIONS
from ..data.transforms import PAD_FILLS, PAD_PLACEMENTS
from ..hub import check_model_source
from ..label_tables import CITYSCAPES_ID2LABEL

DATASETS = ("synthetic", "cityscapes", "mapillary")
RECORD_AUTO_LABEL_CLASSES = (3, 4, 6, 7, 9, 11, 12, 13, 14, 15, 16, 17, 18)
"""The Cityscapes trainIds whose class-uniform crops also come from the auto-labelled frames in NVIDIA's record recipe
(``coarse_boost_classes`` of `scripts/train_cityscapes_sota.yml`: wall, fence, traffic light, traffic sign, terrain,
person, rider, car, truck, bus, train, motorcycle, bicycle)."""
MAPILLARY_RECIPE = {"pre_size": 2177, "eval_long_side": 2177, "blur_probability": 1.0}
"""`DataArguments` defaults for Mapillary Vistas: NVIDIA's `scripts/train_mapillary.yml` (``pre_size 2177``, which
also sets its evaluation size, and ``gblur``). Its learning rate, 5e-3, is `--learning_rate 0.005`."""
OTHER_RECIPE = {"pre_size": 0, "eval_long_side": 0, "blur_probability": 0.0}
"""`DataArguments` defaults for Cityscapes and the synthetic set (the Cityscapes recipe): full size, no blur."""
TRAINING_STAGES = (0, 1, 2, 3)
POLY_DECAY_UNITS = ("step", "epoch")
EPOCH_DECAY_WITHOUT_EPOCHS = ("--poly_decay_unit epoch decays the LR at the end of each epoch, and a streamed training "
                              "set has no epoch length: use --poly_decay_unit step with --streaming")


@dataclass
class ModelArguments:
    """Which model to train and how it is initialised."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "save_pretrained folder or Hub id to fine-tune; otherwise a preset is built"}
    )
    preset: str = field(default="hrnet_small_ocr", metadata={"help": f"model preset when training from scratch: {sorted(MODEL_PRESETS)}"})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "re-initialise the class and auxiliary heads when the dataset has another label set"},
    )
    imagenet_trunk: str | None = field(
        default=None,
        metadata={"help": "local ImageNet trunk file (HRNet ImageNet .pth; torchvision ResNet-50 or MobileNetV2 state dict)"},
    )
    backbone: str | None = field(
        default=None,
        metadata={"help": "Hub id or folder of a transformers backbone (e.g. microsoft/resnet-50) to train from scratch "
                          "with its pretrained weights under DeepLabV3+ (replaces --preset)"},
    )
    training_stage: int = field(
        default=0,
        metadata={"help": "staged recipe for small GPUs: 1 = trunk + head at a single scale (attention frozen), "
                          "2 = only the attention head on the two-scale path, 3 = trunk + head with the attention frozen; "
                          "0 = everything at once (the paper's recipe). Stages 2 and 3 start from the previous "
                          "stage's output (--model_name_or_path)"},
    )
    freeze_trunk: bool = field(default=False, metadata={"help": "train only the decoder and attention heads"})
    trunk_learning_rate_multiplier: float = field(default=1.0, metadata={"help": "LR of the trunk relative to the heads"})
    training_scales: str = field(default="0.5,1.0", metadata={"help": "scales of each training step"})
    eval_scales: str = field(default="0.5,1.0,2.0", metadata={"help": "scales chained at evaluation"})
    primary_loss: str = field(default="rmi", metadata={"help": "rmi or cross_entropy"})
    sync_bn: bool = field(default=False, metadata={"help": "SyncBatchNorm across processes (distributed runs)"})

    def __post_init__(self) -> None:
        if self.training_stage not in TRAINING_STAGES:
            raise ValueError(f"--training_stage must be one of {TRAINING_STAGES}, got {self.training_stage!r}")
        if self.backbone is not None and self.model_name_or_path is not None:
            raise ValueError("give either --backbone (a new model on a pretrained backbone) or --model_name_or_path")
        if self.model_name_or_path is not None:  # before the dataset is read (or generated, which takes minutes)
            check_model_source(self.model_name_or_path, "--model_name_or_path")
        if self.model_name_or_path is None and self.preset not in MODEL_PRESETS:
            raise ValueError(f"--preset must be one of {sorted(MODEL_PRESETS)}, got {self.preset!r}")
        # YAML turns "1.0" into a number and "[0.5, 1.0]" into a list: keep one canonical string
        self.training_scales = ",".join(map(str, validate_scales(parse_scales(self.training_scales), "--training_scales")))
        self.eval_scales = ",".join(map(str, validate_scales(parse_scales(self.eval_scales), "--eval_scales")))


def check_choices(arguments: object) -> None:
    """Refuse a value outside a field's ``choices``: a YAML/JSON file bypasses argparse, which checks them on the
    command line only (the value would otherwise fail late, or be ignored, under another name)."""
    for spec in fields(arguments):
        choices = spec.metadata.get("choices")
        value = getattr(arguments, spec.name)
        if choices is not None and value not in choices:
            raise ValueError(f"--{spec.name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def optim_arguments(optim_args: str | None) -> dict[str, str]:
    """``--optim_args`` as transformers reads it (``"key=value,key=value"``), as a dict of strings."""
    if not optim_args:
        return {}
    return dict(pair.split("=", 1) for pair in optim_args.replace(" ", "").split(",") if "=" in pair)


@dataclass
class DataArguments:
    """Which data to train and evaluate on, and the augmentation."""

    dataset: str = field(default="synthetic", metadata={"help": f"one of {DATASETS}"})
    data_dir: str | None = field(
        default=None,
        metadata={"help": "dataset root (official layout), parquet shards or Hub id; synthetic: where it is generated"},
    )
    mapillary_version: str = field(
        default="v1.2",
        metadata={"help": "Mapillary: which labels, v1.2 (65 classes, built-in table) or v2.0 (124 classes, needs the "
                          "dataset's config_v2.0.json)", "choices": list(MAPILLARY_VERSIONS)},
    )
    train_split: str = field(default="train")
    eval_split: str = field(default="val")
    streaming: bool = field(default=False, metadata={"help": "stream the training split (IterableDataset; needs max_steps)"})
    shuffle_buffer_size: int = field(
        default=256,
        metadata={"help": "--streaming: rows held to shuffle the stream, whose shard order is shuffled too, both anew "
                          "every epoch; a row holds its encoded image when read from parquet shards or the Hub "
                          "(1: shard order only)"},
    )
    crop_size: int = field(default=1024, metadata={"help": "training crop height (and width, unless --crop_width)"})
    crop_width: int | None = field(
        default=None, metadata={"help": "training crop width (default: --crop_size, a square crop; the reference's "
                                        "Cityscapes recipe crops 1024x2048)"},
    )
    scale_min: float = field(default=0.5)
    scale_max: float = field(default=2.0)
    pre_size: int | None = field(
        default=None,
        metadata={"help": "training images are first scaled so that their long side has this many pixels, the random "
                          "scale then relative to it (the reference's --pre_size); default: 2177 for Mapillary (its "
                          "recipe: frames of very different sizes), none otherwise; 0 = none"},
    )
    eval_long_side: int | None = field(
        default=None,
        metadata={"help": "evaluation images and labels are resized so that their long side has this many pixels, as "
                          "the reference evaluates Mapillary; default: 2177 for Mapillary, full size otherwise; 0 = "
                          "full size"},
    )
    color_jitter: float = field(
        default=0.25,
        metadata={"help": "strength of the brightness, contrast, saturation and hue jitter (the reference's --color_aug, "
                          "0.25); 0 turns it off"},
    )
    hue_jitter: float | None = field(
        default=None,
        metadata={"help": "largest hue shift, in turns of the hue circle (at most 0.5); default: --color_jitter, as the "
                          "reference's one --color_aug"},
    )
    blur_probability: float | None = field(
        default=None,
        metadata={"help": "share of training crops given a Gaussian blur (the reference's --gblur: 1); default: 1 for "
                          "Mapillary (its recipe), 0 otherwise"},
    )
    train_sample_dtype: str = field(
        default="uint8",
        metadata={"help": "uint8: training crops and labels travel as 8 bits (4 MB per 1024x1024 sample instead of 20 MB) "
                          "and are normalised on the device, same values; float32: normalised on the CPU",
                  "choices": ["uint8", "float32"]},
    )
    crop_padding: str = field(
        default="random",
        metadata={"help": "where an image side shorter than the crop lands in it: random (anywhere; the reference's "
                          "--translate_aug_fix) or centre (the reference's recipes: padded evenly, centred give or "
                          "take a pixel)", "choices": list(PAD_PLACEMENTS)},
    )
    crop_pad_fill: str = field(
        default="mean",
        metadata={"help": "colour of that padding: mean (the normalisation mean, 0 once normalised) or black (the "
                          "reference's); its labels are ignored either way", "choices": list(PAD_FILLS)},
    )
    class_uniform_fraction: float = field(
        default=0.5,
        metadata={"help": "share of crops centred on class centroids, in equal shares per class (the reference's "
                          "CLASS_UNIFORM_PCT)"},
    )
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    skip_bad_samples: bool = field(default=False, metadata={"help": "skip (and count) unreadable samples instead of stopping"})
    auto_label_ratio: float = field(
        default=0.0,
        metadata={"help": "Cityscapes/synthetic: share of training samples drawn from the auto-labelled train_extra frames "
                          "(gtCoarse/train_extra/*_gtAuto_labelTrainIds.png, see `hms-segmentation autolabel`), the rest "
                          "from the fine train split; 0 = fine only, 1 = auto-labels only"},
    )
    auto_label_classes: str | None = field(
        default=None,
        metadata={"help": "Cityscapes/synthetic, the reference's record recipe: the auto-labelled train_extra frames serve "
                          "only as class-uniform crops of these trainIds (comma-separated; NVIDIA's coarse_boost_classes: "
                          f"{','.join(map(str, RECORD_AUTO_LABEL_CLASSES))}), the fine frames make the epoch; the "
                          "alternative to --auto_label_ratio"},
    )
    auto_label_epochs: int | None = field(
        default=None,
        metadata={"help": "with --auto_label_classes: the epochs that use the auto-labelled crops, the later ones train on "
                          "the fine frames only (the reference's max_cu_epoch: 150 of 175); default every epoch"},
    )
    synthetic_train_frames: int = field(default=200, metadata={"help": "synthetic: frames generated for train"})
    synthetic_val_frames: int = field(default=40, metadata={"help": "synthetic: frames generated for val"})
    synthetic_height: int = field(default=256)
    synthetic_width: int = field(default=512)

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {DATASETS}, got {self.dataset!r}")
        for name, value in (MAPILLARY_RECIPE if self.dataset == "mapillary" else OTHER_RECIPE).items():
            if getattr(self, name) is None:  # not given: the dataset's recipe
                setattr(self, name, value)
        for name in ("pre_size", "eval_long_side"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be a number of pixels (0 = off), got {getattr(self, name)}")
        if self.dataset != "synthetic" and self.data_dir is None:
            raise ValueError(f"--data_dir is required for --dataset {self.dataset}")
        if self.mapillary_version not in MAPILLARY_VERSIONS:  # a YAML/JSON file bypasses argparse's choices
            raise ValueError(f"--mapillary_version must be one of {MAPILLARY_VERSIONS}, got {self.mapillary_version!r}")
        # checked here, before the dataset is read (or generated, which takes minutes), and named as on the command line
        if self.crop_size < 1:
            raise ValueError(f"--crop_size must be a positive number of pixels, got {self.crop_size}")
        if self.crop_width is not None and self.crop_width < 1:
            raise ValueError(f"--crop_width must be a positive number of pixels, got {self.crop_width}")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"need 0 < --scale_min <= --scale_max, got --scale_min {self.scale_min} --scale_max "
                             f"{self.scale_max}")
        for name in ("synthetic_train_frames", "synthetic_val_frames", "synthetic_height", "synthetic_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.shuffle_buffer_size < 1:
            raise ValueError(f"--shuffle_buffer_size must be at least 1 (1: shard order only), got "
                             f"{self.shuffle_buffer_size}")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1 (or left out for every sample), got {getattr(self, name)}")
        if self.color_jitter < 0:
            raise ValueError(f"--color_jitter must be >= 0, got {self.color_jitter}")
        if not 0 <= self.hue <= 0.5:  # half a turn is every hue, as in the reference
            raise ValueError(f"the hue jitter must be in [0, 0.5] turns, got {self.hue} (--hue_jitter, which defaults "
                             "to --color_jitter)")
        if not 0 <= self.blur_probability <= 1:
            raise ValueError(f"--blur_probability must be in [0, 1], got {self.blur_probability}")
        if self.crop_padding not in PAD_PLACEMENTS:
            raise ValueError(f"--crop_padding must be {' or '.join(PAD_PLACEMENTS)}, got {self.crop_padding!r}")
        if self.crop_pad_fill not in PAD_FILLS:
            raise ValueError(f"--crop_pad_fill must be {' or '.join(PAD_FILLS)}, got {self.crop_pad_fill!r}")
        if not 0 <= self.class_uniform_fraction <= 1:
            raise ValueError(f"--class_uniform_fraction must be in [0, 1], got {self.class_uniform_fraction}")
        if not 0 <= self.auto_label_ratio <= 1:
            raise ValueError(f"--auto_label_ratio must be in [0, 1], got {self.auto_label_ratio}")
        if self.auto_label_ratio > 0 and self.dataset == "mapillary":
            raise ValueError("--auto_label_ratio needs --dataset cityscapes or synthetic (auto-labels in the Cityscapes "
                             "layout), got --dataset mapillary")
        self._check_auto_label_classes()
        check_choices(self)  # the fields without a check of their own above (a file's values bypass argparse)

    @property
    def hue(self) -> float:
        """The hue jitter in effect: `hue_jitter`, or `color_jitter` when it is not given."""
        return self.color_jitter if self.hue_jitter is None else self.hue_jitter

    def _check_auto_label_classes(self) -> None:
        if self.auto_label_classes is None:
            if self.auto_label_epochs is not None:
                raise ValueError("--auto_label_epochs needs --auto_label_classes (the classes the auto-labelled crops "
                                 "serve)")
            return
        # YAML reads "3" as a number and "[3, 4]" as a list: keep one canonical string
        values = self.auto_label_classes
        values = values if isinstance(values, (list, tuple)) else str(values).split(",")
        try:
            classes = sorted({int(value) for value in values if str(value).strip()})
        except ValueError:
            raise ValueError(f"--auto_label_classes must be comma-separated trainIds, got {self.auto_label_classes!r}") from None
        if not classes or not all(0 <= class_id < len(CITYSCAPES_ID2LABEL) for class_id in classes):
            raise ValueError(f"--auto_label_classes must be Cityscapes trainIds in 0..{len(CITYSCAPES_ID2LABEL) - 1}, "
                             f"got {self.auto_label_classes!r}")
        self.auto_label_classes = ",".join(map(str, classes))
        conflicts = {"--dataset mapillary": self.dataset == "mapillary", "--streaming": self.streaming,
                     f"--auto_label_ratio {self.auto_label_ratio}": self.auto_label_ratio > 0,
                     "--class_uniform_fraction 0": self.class_uniform_fraction == 0}
        for flag, conflicting in conflicts.items():
            if conflicting:
                raise ValueError(f"--auto_label_classes (auto-labelled frames as class-uniform crops of a map-style "
                                 f"Cityscapes or synthetic training set) cannot be combined with {flag}")
        if self.auto_label_epochs is not None and self.auto_label_epochs < 1:
            raise ValueError(f"--auto_label_epochs must be at least 1 (or left out for every epoch), got "
                             f"{self.auto_label_epochs}")


@dataclass
class HMSTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the paper's defaults, plus SGD momentum and the polynomial decay power."""

    learning_rate: float = field(default=0.01, metadata={"help": "initial LR of SGD"})
    optim: str = field(
        default="sgd",
        metadata={"help": "sgd (the default): the reference's SGD with --momentum; any other name of transformers' "
                          "--optim builds that optimizer over the same parameter groups"},
    )
    lr_scheduler_type: str = field(
        default="polynomial",
        metadata={"help": "polynomial (the default): the reference's poly decay to zero, power --poly_power; any other "
                          "transformers scheduler name (linear, cosine, ...) uses that one"},
    )
    weight_decay: float = field(default=1e-4)
    momentum: float | None = field(
        default=None, metadata={"help": "momentum of --optim sgd (default 0.9, the reference's); other optimizers take "
                                        "their settings from --optim_args"},
    )
    poly_power: float | None = field(
        default=None, metadata={"help": "power of the polynomial LR decay (default 2.0; 1.0 for Mapillary); "
                                        "--lr_scheduler_type polynomial only"}
    )
    poly_decay_unit: str = field(
        default="step",
        metadata={"help": "step (the default): the poly decay lowers the LR at every optimizer step; epoch: it holds for "
                          "an epoch and decays at its end, as the reference's scheduler (stepped once per epoch)",
                  "choices": POLY_DECAY_UNITS},
    )
    max_grad_norm: float = field(default=0.0, metadata={"help": "gradient clipping (0: none, as the reference)"})
    remove_unused_columns: bool = field(default=False)
    per_device_train_batch_size: int = field(
        default=2, metadata={"help": "training images per device (the reference: 2; its record recipe 1 at 1024x2048)"}
    )
    per_device_eval_batch_size: int = field(default=1)
    dataloader_drop_last: bool = field(
        default=True,
        metadata={"help": "training: drop each epoch's last, incomplete batch, as the reference does (a batch of one "
                          "image cannot train the DeepLabV3+ image-pooling BatchNorm); evaluation never drops images"},
    )
    batch_eval_metrics: bool = field(default=True, metadata={"help": "stream the confusion matrix over eval batches"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "allow writing into a non-empty output folder that holds no checkpoint"}
    )
    stop_on_nonfinite_loss: bool = field(
        default=True, metadata={"help": "stop at a NaN/Inf loss, naming the step; if false, skip the step and count it"}
    )
    eval_visuals: int = field(
        default=0,
        metadata={"help": "at each evaluation, picture this many validation images (spread over the split, the same "
                          "ones each time) into <output_dir>/visuals/step-<step>/ with an index.html: input, ground "
                          "truth, prediction, each scale's prediction, attention and share, as the reference shows its "
                          "validation images (0: none)"},
    )
    eval_visuals_keep: int = field(
        default=1,
        metadata={"help": "how many evaluations' pictures --eval_visuals keeps, the latest (1, the default: as the "
                          "reference, which overwrites its pictures; 7.5-10 MB per 1024x2048 image); 0: all"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.label_smoothing_factor:  # the model computes its own loss (RMI or cross-entropy, + auxiliary terms)
            raise ValueError(f"--label_smoothing_factor {self.label_smoothing_factor} does not apply: the model computes "
                             "its own loss (--primary_loss rmi or cross_entropy)")
        if self.lr_scheduler_type == "polynomial" and self.lr_scheduler_kwargs:
            raise ValueError(f"--lr_scheduler_kwargs {self.lr_scheduler_kwargs} with the polynomial schedule: its power "
                             "is --poly_power and it decays to zero, as the reference")
        # settings of the reference's optimizer and schedule, refused with others rather than silently unused
        optim, schedule = (str(getattr(value, "value", value)) for value in (self.optim, self.lr_scheduler_type))
        if self.momentum is not None and optim != "sgd":
            raise ValueError(f"--momentum {self.momentum:g} applies to --optim sgd; --optim {optim} takes its settings "
                             "from --optim_args")
        if optim == "sgd" and self.momentum is not None and "momentum" in optim_arguments(self.optim_args):
            raise ValueError(f"the SGD momentum is given twice: --momentum {self.momentum:g} and --optim_args "
                             f"{self.optim_args}; keep one")
        if optim == "sgd" and self.momentum is None:
            self.momentum = float(optim_arguments(self.optim_args).get("momentum", 0.9))
        if self.poly_power is not None and schedule != "polynomial":
            raise ValueError(f"--poly_power {self.poly_power:g} applies to the polynomial schedule, not "
                             f"--lr_scheduler_type {schedule}")
        if self.poly_decay_unit not in POLY_DECAY_UNITS:
            raise ValueError(f"--poly_decay_unit must be one of {', '.join(POLY_DECAY_UNITS)}, got {self.poly_decay_unit!r}")
        if self.poly_decay_unit == "epoch" and self.lr_scheduler_type != "polynomial":
            raise ValueError(f"--poly_decay_unit epoch applies to the polynomial schedule, not --lr_scheduler_type "
                             f"{getattr(self.lr_scheduler_type, 'value', self.lr_scheduler_type)}")
        if self.poly_decay_unit == "epoch" and self.warmup_steps:
            raise ValueError(f"--poly_decay_unit epoch follows the reference's schedule, which has no warmup; got "
                             f"--warmup_steps {self.warmup_steps:g}: drop it, or decay per step")
        if self.remove_unused_columns:  # the Trainer would drop what forward() does not take: the augmentation plans
            raise ValueError("--remove_unused_columns true would drop the colour-jitter plans and blur sigmas that "
                             "training batches carry beside pixel_values and labels (they hold nothing else); leave it "
                             "false")
        if self.train_sampling_strategy not in ("random", "sequential"):
            raise ValueError(f"--train_sampling_strategy {self.train_sampling_strategy} groups samples by token length; "
                             "segmentation crops all have one size: use random (the default) or sequential")
        language_model_only = {"--neftune_noise_alpha": self.neftune_noise_alpha is not None,
                               "--use_liger_kernel": self.use_liger_kernel,
                               "--include_num_input_tokens_seen": self.include_num_input_tokens_seen not in ("no", False)}
        for flag, is_set in language_model_only.items():
            if is_set:
                raise ValueError(f"{flag} works on the token embeddings or token counts of a language model; an HMS "
                                 "model takes images: leave it unset")
        if self.eval_visuals < 0:
            raise ValueError(f"--eval_visuals must be >= 0 (0: no pictures), got {self.eval_visuals}")
        if self.eval_visuals_keep < 0:
            raise ValueError(f"--eval_visuals_keep must be >= 0 (0: keep all), got {self.eval_visuals_keep}")
        if self.do_predict:
            raise ValueError("--do_predict: these scripts have no prediction split; predict with hms-segmentation "
                             "autolabel (label maps) or evaluate (scores), or pipeline('image-segmentation', ...)")


def parse_scales(text: str | float | list[float]) -> list[float]:
    if isinstance(text, (int, float)):
        return [float(text)]
    if isinstance(text, (list, tuple)):
        return [float(s) for s in text]
    try:
        return [float(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"scales must be comma-separated numbers, got {text!r}") from None


def parse_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, HMSTrainingArguments]:
    """Parse the command line: flags, or a `.yaml`/`.yml`/`.json` file holding the same keys followed by any flags,
    which take precedence over the file (``recipes/mapillary.yaml --data_dir /data/mapillary``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, HMSTrainingArguments))
    if argv and Path(argv[0]).suffix in (".yaml", ".yml", ".json"):
        # the file's values become the parser's defaults, so the flags after it still parse (and win) as usual
        parser.set_defaults(**read_argument_file(Path(argv[0]), {action.dest for action in parser._actions} - {"help"}))
        argv = argv[1:]
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if data_args.streaming and training_args.poly_decay_unit == "epoch":  # refused now, not after loading the data
        raise ValueError(EPOCH_DECAY_WITHOUT_EPOCHS)
    return model_args, data_args, training_args


def read_argument_file(path: Path, known: set[str]) -> dict:
    """The keys and values of a YAML or JSON argument file, each key checked to be an argument."""
    path = path.resolve()
    if not path.is_file():
        raise FileNotFoundError(f"argument file {path} does not exist")
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"argument file {path} is not valid {path.suffix[1:].upper()}: {error}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"argument file {path} must map argument names to values, found a {type(values).__name__}")
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"argument file {path}: no argument is named {', '.join(map(repr, unknown))} (see "
                         "`hms-segmentation train --help`)")
    return values
