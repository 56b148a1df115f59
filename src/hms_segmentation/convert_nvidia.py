"""Convert NVIDIA/semantic-segmentation HMSA checkpoints (`.pth`) into `save_pretrained` folders.

Usage: `hms-segmentation convert-nvidia CHECKPOINT OUTPUT_DIR [--dataset cityscapes|mapillary] [--results JSON]`, or
`python -m hms_segmentation.convert_nvidia ...`, or `convert_nvidia_checkpoint(...)` from Python.

The output folder is ready for the Hub (`hms-segmentation push OUTPUT_DIR REPO_ID`): safetensors weights, config with
the dataset's class names, the remote-code modules, `preprocessor_config.json` and a model card.

The architecture (trunk, HRNet widths and depths, OCR channels, class count) is read from the tensor shapes, every
key is mapped through `NVIDIA_KEY_PREFIXES`, and any unmatched, missing or mis-shaped key stops the conversion with the
full list: nothing is loaded partially.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from .configuration_hms import HMSConfig
from .hub import NVIDIA_LICENSE, ORIGINAL_REPOSITORY_URL, build_model_card, save_for_hub
from .image_processing_hms import HMSImageProcessor
from .label_tables import CITYSCAPES_ID2LABEL, MAPILLARY_V12_ID2LABEL
from .modeling_hms import HMSForSemanticSegmentation

_OCR = "ocr.ocr_distri_head.object_context_block."
_CONTEXT = "decode_head.object_context."

# NVIDIA key prefix -> our key prefix; the first (longest) matching prefix wins. HRNet trunk keys keep their names.
NVIDIA_KEY_PREFIXES: tuple[tuple[str, str], ...] = (
    # dilated ResNet-50: the reference packs conv1/bn1 (+relu, maxpool) into `layer0`
    ("backbone.layer0.0.", "backbone.conv1."),
    ("backbone.layer0.1.", "backbone.bn1."),
    ("backbone.", "backbone."),
    # OCR head
    ("ocr.conv3x3_ocr.0.", "decode_head.pixel_projection.conv."),
    ("ocr.conv3x3_ocr.1.0.", "decode_head.pixel_projection.norm."),
    ("ocr.aux_head.0.", "decode_head.soft_region_head.0.conv."),
    ("ocr.aux_head.1.0.", "decode_head.soft_region_head.0.norm."),
    ("ocr.aux_head.2.", "decode_head.soft_region_head.1."),
    (_OCR + "f_pixel.0.", _CONTEXT + "query_projection.0.conv."),
    (_OCR + "f_pixel.1.0.", _CONTEXT + "query_projection.0.norm."),
    (_OCR + "f_pixel.2.", _CONTEXT + "query_projection.1.conv."),
    (_OCR + "f_pixel.3.0.", _CONTEXT + "query_projection.1.norm."),
    (_OCR + "f_object.0.", _CONTEXT + "key_projection.0.conv."),
    (_OCR + "f_object.1.0.", _CONTEXT + "key_projection.0.norm."),
    (_OCR + "f_object.2.", _CONTEXT + "key_projection.1.conv."),
    (_OCR + "f_object.3.0.", _CONTEXT + "key_projection.1.norm."),
    (_OCR + "f_down.0.", _CONTEXT + "value_projection.conv."),
    (_OCR + "f_down.1.0.", _CONTEXT + "value_projection.norm."),
    (_OCR + "f_up.0.", _CONTEXT + "output_projection.conv."),
    (_OCR + "f_up.1.0.", _CONTEXT + "output_projection.norm."),
    ("ocr.ocr_distri_head.conv_bn_dropout.0.", "decode_head.context_fusion.conv."),
    ("ocr.ocr_distri_head.conv_bn_dropout.1.0.", "decode_head.context_fusion.norm."),
    ("ocr.cls_head.", "decode_head.classifier."),
    # DeepLabV3+ head
    ("aspp.img_conv.0.", "decode_head.aspp.image_pooling.conv."),
    ("aspp.img_conv.1.", "decode_head.aspp.image_pooling.norm."),
    *(
        (f"aspp.features.{branch}.{part}.", f"decode_head.aspp.branches.{branch}.{name}.")
        for branch in range(8)
        for part, name in ((0, "conv"), (1, "norm"))
    ),
    ("bot_aspp.", "decode_head.aspp_projection."),
    ("bot_fine.", "decode_head.fine_projection."),
    ("final.0.", "decode_head.classifier.0.conv."),
    ("final.1.", "decode_head.classifier.0.norm."),
    ("final.3.", "decode_head.classifier.1.conv."),
    ("final.4.", "decode_head.classifier.1.norm."),
    ("final.6.", "decode_head.classifier.2."),
    # scale-attention head
    ("scale_attn.conv0.", "scale_attention_head.bottleneck.conv."),
    ("scale_attn.bn0.", "scale_attention_head.bottleneck.norm."),
    ("scale_attn.conv1.", "scale_attention_head.inner.conv."),
    ("scale_attn.bn1.", "scale_attention_head.inner.norm."),
    ("scale_attn.conv2.", "scale_attention_head.projection."),
)


class CheckpointConversionError(ValueError):
    """The checkpoint does not map completely onto an HMS model; the message lists every offending key."""


def nvidia_key_to_hms(key: str) -> str | None:
    """Our state-dict key for an NVIDIA key (without `module.`), or `None` when no prefix of the table matches."""
    for nvidia_prefix, hms_prefix in NVIDIA_KEY_PREFIXES:
        if key.startswith(nvidia_prefix):
            return hms_prefix + key[len(nvidia_prefix):]
    return None


def load_checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """
    Read an NVIDIA checkpoint: a `.pth` dict with `state_dict` (keys prefixed `module.`), a bare state dict, or a
    `.safetensors` file. Returns the tensors with `module.` removed.

    A `.pth` is read with `torch.load(weights_only=True)`: tensors, numbers, strings, containers and the numpy scalars
    of the training metrics (`mean_iu`, as numpy 1.x or 2.x wrote them); a file storing any other Python object is
    refused, since unpickling it could run arbitrary code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise CheckpointConversionError(f"{path}: expected a checkpoint (.pth or .safetensors), found an empty file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            checkpoint: object = load_file(str(path))
        except SafetensorError as error:
            raise CheckpointConversionError(f"{path}: not a readable safetensors file ({error})") from None
    else:
        checkpoint = _torch_load_weights_only(path)
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise CheckpointConversionError(f"{path}: expected a state dict (or a dict with 'state_dict'), found {type(checkpoint).__name__}")
    state_dict = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointConversionError(
                f"{path}: expected a state dict (tensors only) or NVIDIA's training checkpoint (weights under "
                f"'state_dict'), found a dict whose entry {key!r} is a {type(value).__name__}, not a tensor (top-level "
                f"keys: {sorted(map(str, checkpoint))[:10]})"
            )
        state_dict[key[len("module."):] if key.startswith("module.") else key] = value
    return state_dict


def _numpy_metric_globals() -> list:
    """The numpy globals a training checkpoint's metrics need (`mean_iu` is a `numpy.float64`), nothing executable."""
    import numpy as np

    allowed: list = [np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32)), type(np.dtype(np.int64))]
    scalar = getattr(getattr(np, "_core", np.core).multiarray, "scalar", None)
    if scalar is not None:
        allowed.append(scalar)

        def numpy1_scalar(*args):
            return scalar(*args)

        # Files written with numpy 1.x (NVIDIA's released checkpoints, 2020) name it `numpy.core.multiarray.scalar`;
        # numpy 2 moved it to `numpy._core`. torch matches allowed globals by `__module__` + `__qualname__`.
        numpy1_scalar.__module__, numpy1_scalar.__qualname__ = "numpy.core.multiarray", "scalar"
        allowed.append(numpy1_scalar)
    return allowed


def _torch_load_weights_only(path: Path) -> object:
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        with safe_globals(_numpy_metric_globals()) if safe_globals is not None else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch names the refused global as "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y whose module"
        refused = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", str(error), flags=re.IGNORECASE)
        if refused:
            raise CheckpointConversionError(
                f"{path}: refused to load the Python object {refused.group(1)} stored in this file: only tensors, "
                "numbers, strings and containers are read (torch.load(weights_only=True)), since unpickling other "
                "objects can run arbitrary code. If you trust the file, re-save its weights alone, e.g. "
                "torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pth')"
            ) from None
        detail = str(error).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip()
        raise CheckpointConversionError(
            f"{path}: expected a PyTorch checkpoint (.pth), found data torch.load cannot read ({detail})"
        ) from None
    except Exception as error:  # a cut-short or foreign file fails in torch.load with almost any error type
        raise CheckpointConversionError(
            f"{path}: not a readable PyTorch checkpoint (cut short, or not a .pth file?): "
            f"{type(error).__name__}: {error}"
        ) from None


def _indices(keys: list[str], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(match.group(1)) for key in keys if (match := pattern.match(key))})


def _block_type(keys: set[str], block_prefix: str) -> str:
    return "bottleneck" if f"{block_prefix}conv3.weight" in keys else "basic"


def infer_config(state_dict: Mapping[str, torch.Tensor], **config_kwargs) -> HMSConfig:
    """Build the `HMSConfig` whose model has exactly this (NVIDIA-named, prefix-free) state dict's shapes."""
    keys = sorted(state_dict)
    key_set = set(keys)

    def shape(key: str) -> torch.Size:
        if key not in state_dict:
            raise CheckpointConversionError(f"cannot infer the architecture: key {key!r} is missing")
        return state_dict[key].shape

    is_ocr = "ocr.cls_head.weight" in key_set
    if not is_ocr and not ("final.6.weight" in key_set and "backbone.layer0.0.weight" in key_set):
        ours = any(key.startswith(("decode_head.", "scale_attention_head.")) for key in keys)
        raise CheckpointConversionError(
            "cannot tell the architecture: expected the keys of ocrnet.HRNet_Mscale (`ocr.cls_head.weight`) or "
            "mscale.DeepV3R50 (`final.6.weight`, `backbone.layer0.0.weight`)"
            + ("; these are hms-segmentation key names already: load that folder with "
               "HMSForSemanticSegmentation.from_pretrained instead" if ours else f", found keys like {keys[:3]}")
        )
    if "scale_attn.conv0.weight" not in key_set:
        raise CheckpointConversionError(
            "cannot infer the architecture: expected the scale-attention head of ocrnet.HRNet_Mscale / "
            "mscale.DeepV3R50 (`scale_attn.conv0.weight`, ...); the checkpoint has none (a single-scale model such as "
            "ocrnet.HRNet, or another attention head layout, cannot be converted)"
        )
    attention = {
        "attention_bottleneck_channels": shape("scale_attn.conv0.weight")[0],
        "attention_inner_3x3": "scale_attn.conv1.weight" in key_set,
    }
    if is_ocr:
        stages = []
        layer1_blocks = _indices(keys, "backbone.layer1.")
        stages.append(
            {
                "num_modules": 1,
                "block": _block_type(key_set, "backbone.layer1.0."),
                "num_blocks": [len(layer1_blocks)],
                "num_channels": [shape("backbone.layer1.0.conv1.weight")[0]],
            }
        )
        for index in (2, 3, 4):
            modules = _indices(keys, f"backbone.stage{index}.")
            branches = _indices(keys, f"backbone.stage{index}.0.branches.")
            if not modules or not branches:
                raise CheckpointConversionError(f"cannot infer the architecture: no keys under backbone.stage{index}")
            stages.append(
                {
                    "num_modules": len(modules),
                    "block": _block_type(key_set, f"backbone.stage{index}.0.branches.0.0."),
                    "num_blocks": [len(_indices(keys, f"backbone.stage{index}.0.branches.{b}.")) for b in branches],
                    "num_channels": [shape(f"backbone.stage{index}.0.branches.{b}.0.conv1.weight")[0] for b in branches],
                }
            )
        return HMSConfig(
            trunk="hrnet_ocr",
            hrnet_preset=None,
            hrnet_stages=stages,
            hrnet_stem_channels=shape("backbone.conv1.weight")[0],
            ocr_mid_channels=shape("ocr.conv3x3_ocr.0.weight")[0],
            ocr_key_channels=shape("ocr.ocr_distri_head.object_context_block.f_pixel.0.weight")[0],
            num_labels=shape("ocr.cls_head.weight")[0],
            **attention,
            **config_kwargs,
        )
    num_dilated = len(_indices(keys, "aspp.features.")) - 1
    default_dilations = [12, 24, 36]
    if num_dilated != len(default_dilations):
        raise CheckpointConversionError(
            f"the ASPP has {num_dilated} dilated branches; only the reference's 3 (dilations 12/24/36) are known"
        )
    return HMSConfig(
        trunk="resnet50_deeplabv3plus",
        resnet_layers=[len(_indices(keys, f"backbone.layer{i}.")) for i in (1, 2, 3, 4)],
        aspp_channels=shape("aspp.img_conv.0.weight")[0],
        aspp_dilations=default_dilations,
        decoder_aspp_channels=shape("bot_aspp.weight")[0],
        decoder_fine_channels=shape("bot_fine.weight")[0],
        segmentation_head_channels=shape("final.0.weight")[0],
        num_labels=shape("final.6.weight")[0],
        **attention,
        **config_kwargs,
    )


def map_state_dict(
    state_dict: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename every key with `NVIDIA_KEY_PREFIXES` and check it against `model_state`; raise listing all problems."""
    mapped: dict[str, torch.Tensor] = {}
    unmatched, unexpected, mis_shaped = [], [], []
    for key, tensor in state_dict.items():
        ours = nvidia_key_to_hms(key)
        if ours is None:
            unmatched.append(key)
        elif ours not in model_state:
            unexpected.append(f"{key} -> {ours}")
        elif tuple(model_state[ours].shape) != tuple(tensor.shape):
            mis_shaped.append(f"{key}: checkpoint {tuple(tensor.shape)}, model {tuple(model_state[ours].shape)}")
        else:
            mapped[ours] = tensor
    missing = sorted(set(model_state) - set(mapped) - {k for k in model_state if _is_unmapped_target(k, state_dict)})
    problems = []
    for title, items in (
        ("keys no rule maps", unmatched),
        ("keys mapped to names the model does not have", unexpected),
        ("keys whose shapes differ", mis_shaped),
        ("model keys the checkpoint lacks", missing),
    ):
        if items:
            problems.append(f"{len(items)} {title}:\n  " + "\n  ".join(sorted(items)))
    if problems:
        raise CheckpointConversionError(f"{source} does not convert cleanly; nothing was loaded.\n" + "\n".join(problems))
    return mapped


def _is_unmapped_target(model_key: str, state_dict: Mapping[str, torch.Tensor]) -> bool:
    # Checkpoints saved before BatchNorm tracked batches carry no `num_batches_tracked`; it is unused in eval.
    return model_key.endswith("num_batches_tracked") and not any(k.endswith("num_batches_tracked") for k in state_dict)


MAPILLARY_INFERENCE_SCALES = (0.25, 0.5, 1.0, 2.0)
MAPILLARY_MAX_LONG_SIDE = 2177
"""How the reference evaluates its Mapillary Vistas model (`scripts/eval_mapillary.yml`: ``n_scales 0.25,0.5,1.0,2.0``,
``pre_size 2177``): a converted Mapillary folder's inference scales and its image processor's long-side limit, so
that a pipeline on a full-size Mapillary photo (often 12+ megapixels) runs as the reference does, not at scale 2.0 of
the full size."""


def dataset_for(dataset: str | None, num_labels: int) -> str | None:
    """`dataset`, else the one the class count implies (19: `cityscapes`, 65: `mapillary`), else `None`."""
    return dataset if dataset is not None else {19: "cityscapes", 65: "mapillary"}.get(num_labels)


def id2label_for(dataset: str | None, num_labels: int) -> dict[int, str]:
    """Class names for `dataset` (`cityscapes`, `mapillary`), or guessed from the class count, else generic."""
    dataset = dataset_for(dataset, num_labels)
    if dataset is None:
        return {i: f"class_{i}" for i in range(num_labels)}
    if dataset == "cityscapes":
        names = CITYSCAPES_ID2LABEL
    elif dataset == "mapillary":
        names = MAPILLARY_V12_ID2LABEL
    else:
        raise ValueError(f"dataset must be 'cityscapes' or 'mapillary', got {dataset!r}")
    if len(names) != num_labels:
        raise CheckpointConversionError(f"the checkpoint predicts {num_labels} classes, but {dataset} has {len(names)}")
    return dict(names)


def convert_nvidia_state_dict(
    state_dict: Mapping[str, torch.Tensor], dataset: str | None = None, source: str = "checkpoint"
) -> HMSForSemanticSegmentation:
    """Build the matching model and load every tensor of an NVIDIA state dict (prefix-free) into it, strictly."""
    config = infer_config(state_dict)
    config.id2label = id2label_for(dataset, config.num_labels)
    config.label2id = {name: index for index, name in config.id2label.items()}
    model = HMSForSemanticSegmentation(config)
    model_state = model.state_dict()
    mapped = map_state_dict(state_dict, model_state, source)
    model.load_state_dict({k: v.to(model_state[k].dtype) for k, v in mapped.items()}, strict=False)
    return model.eval()


def convert_nvidia_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    dataset: str | None = None,
    overwrite: bool = False,
    evaluation: str | Path | None = None,
) -> HMSForSemanticSegmentation:
    """
    Convert `checkpoint` and write a Hub-ready folder to `output_dir`: safetensors weights, config.json (with the
    dataset's id2label), the remote-code modules, preprocessor_config.json and a model card whose model-index comes
    from `evaluation` (a `hms-segmentation evaluate` results.json of this converted model), if given. A Mapillary
    model gets the reference's evaluation settings as its defaults (`MAPILLARY_INFERENCE_SCALES`,
    `MAPILLARY_MAX_LONG_SIDE`); either can be changed on the loaded config / processor.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output folder {output_dir} is an existing file, not a folder; choose another path")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {output_dir} is not empty; choose another or pass overwrite=True (--overwrite)")
    model = convert_nvidia_state_dict(load_checkpoint_state_dict(checkpoint), dataset=dataset, source=str(checkpoint))
    processor = HMSImageProcessor()
    if dataset_for(dataset, model.config.num_labels) == "mapillary":
        model.config.inference_scales = list(MAPILLARY_INFERENCE_SCALES)
        processor = HMSImageProcessor(max_long_side=MAPILLARY_MAX_LONG_SIDE)
    # the card is built (and the evaluation JSON checked) before anything is written
    card = build_model_card(
        model.config,
        evaluation=evaluation,
        dataset=dataset_for(dataset, model.config.num_labels),
        license=NVIDIA_LICENSE,
        model_name=output_dir.name,
        provenance=(
            f"The weights are NVIDIA's, converted from the released checkpoint `{Path(checkpoint).name}` of "
            f"[NVIDIA/semantic-segmentation]({ORIGINAL_REPOSITORY_URL}) with `hms-segmentation convert-nvidia`: every "
            "tensor is mapped one to one, nothing is retrained."
        ),
        training_details={"trained by": "NVIDIA, with the recipe of the paper and the original repository"},
    )
    save_for_hub(model, output_dir, image_processor=processor, card=card)
    return model


def load_imagenet_trunk(model: HMSForSemanticSegmentation, path: str | Path) -> list[str]:
    """
    Load ImageNet-pretrained trunk weights into `model.backbone`: the HRNet ImageNet file the reference uses
    (`hrnetv2_w48_imagenet_pretrained.pth`, keys possibly prefixed `model.`) or a ResNet-50 state dict in torchvision's
    key layout, or a MobileNetV2 state dict in torchvision's key layout. Every trunk tensor must be present with the
    right shape; the file's classification-head keys (and MobileNetV2's last 1x1 convolution, `features.18`, which
    DeepLabV3+ does not read) are ignored and returned. Transformers backbones load their weights through
    `HMSConfig(backbone=..., use_pretrained_backbone=True)` instead.
    """
    if model.config.trunk == "backbone_deeplabv3plus":
        raise ValueError(
            f"{path}: a transformers-backbone trunk loads pretrained weights through HMSConfig(backbone=<Hub id or "
            "folder>, use_pretrained_backbone=True), not from a state-dict file"
        )
    state_dict = load_checkpoint_state_dict(path)
    state_dict = {key[len("model."):] if key.startswith("model.") else key: value for key, value in state_dict.items()}
    trunk_state = model.backbone.state_dict()
    ignored = sorted(key for key in state_dict if key not in trunk_state)
    missing = sorted(key for key in trunk_state if key not in state_dict and not key.endswith("num_batches_tracked"))
    mis_shaped = sorted(
        f"{key}: file {tuple(state_dict[key].shape)}, model {tuple(trunk_state[key].shape)}"
        for key in trunk_state
        if key in state_dict and state_dict[key].shape != trunk_state[key].shape
    )
    if missing or mis_shaped:
        raise CheckpointConversionError(
            f"{path} does not fit the {model.config.trunk} trunk; nothing was loaded.\n"
            + (f"{len(missing)} trunk keys the file lacks:\n  " + "\n  ".join(missing) + "\n" if missing else "")
            + (f"{len(mis_shaped)} keys whose shapes differ:\n  " + "\n  ".join(mis_shaped) if mis_shaped else "")
        )
    model.backbone.load_state_dict({k: v for k, v in state_dict.items() if k in trunk_state}, strict=False)
    return ignored


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hms-segmentation convert-nvidia",
        description="Convert an NVIDIA/semantic-segmentation HMSA checkpoint into a save_pretrained folder.",
    )
    parser.add_argument("checkpoint", help="NVIDIA .pth checkpoint (or a bare state dict, or .safetensors)")
    parser.add_argument("output_dir", help="folder to write config.json and model.safetensors into")
    parser.add_argument("--dataset", choices=["cityscapes", "mapillary"], default=None,
                        help="class names to store (default: guessed from the class count)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty output folder")
    parser.add_argument("--results", type=Path, default=None,
                        help="results.json of `hms-segmentation evaluate` on the converted model, for the model card")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = convert_nvidia_checkpoint(
            args.checkpoint, args.output_dir, dataset=args.dataset, overwrite=args.overwrite, evaluation=args.results
        )
    except (CheckpointConversionError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    parameters = sum(p.numel() for p in model.parameters())
    print(f"converted {args.checkpoint} ({model.config.trunk}, {model.config.num_labels} classes, "
          f"{parameters:,} parameters) -> {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
