"""Chained multi-scale inference on one image: saves the label map and each scale's attention map.

`hms-segmentation demo [--model DIR_OR_PRESET] [--image PATH] [--scales 0.5,1.0,2.0] [--output-dir DIR]`

With a preset name instead of a trained folder, the weights are random: the label map is then meaningless, but the
command shows the whole inference path and its outputs. Train (or convert NVIDIA's weights) for real predictions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from .configuration_hms import MODEL_PRESETS, HMSConfig, validate_scales
from .data.io import load_image
from .data.transforms import SegmentationEvalTransform
from .hub import load_hms_model
from .label_tables import CITYSCAPES_PALETTE
from .image_processing_hms import shrink_to_long_side
from .inference_options import add_large_input_arguments, large_input_settings
from .modeling_hms import HMSForSemanticSegmentation, attentions_at_size, hierarchical_scale_weights

def street_scene(height: int = 256, width: int = 512, seed: int = 0) -> Image.Image:
    """A simple street-like test picture (sky, buildings, road, poles) when no image is given."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), dtype=np.float32)
    horizon = height * 0.45
    image[: int(horizon)] = [70, 130, 180]
    image[int(horizon):] = [128, 64, 128]
    for left in range(0, width, width // 6):
        top = int(horizon * rng.uniform(0.2, 0.7))
        image[top:int(horizon), left:left + width // 8] = [70, 70, 70]
    for pole in rng.integers(0, width, size=4):
        image[int(height * 0.2):int(height * 0.8), pole:pole + 3] = [153, 153, 153]
    image += rng.normal(0, 8, image.shape)
    return Image.fromarray(image.clip(0, 255).astype(np.uint8))


def normalize(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float tensor normalised with the reference's ImageNet mean/std, exactly as `hms-segmentation evaluate`
    and `autolabel` normalise (`SegmentationEvalTransform`), so that the demo shows what they score."""
    return SegmentationEvalTransform()(image)["pixel_values"]


def palette_for(num_labels: int) -> tuple[tuple[int, int, int], ...]:
    """The Cityscapes colours for a 19-class model; otherwise fixed pseudo-random colours, one per class."""
    if num_labels == len(CITYSCAPES_PALETTE):
        return CITYSCAPES_PALETTE
    return tuple(tuple(int(c) for c in np.random.default_rng(i).integers(0, 256, 3)) for i in range(num_labels))


def colorize(labels: np.ndarray, palette: tuple[tuple[int, int, int], ...]) -> Image.Image:
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[: len(palette)] = palette
    return Image.fromarray(colours[labels.astype(np.uint8)])


def load_model(model: str) -> tuple[HMSForSemanticSegmentation, bool]:
    """A trained folder / Hub id, or a preset name (random weights). Returns the model and whether it is trained.

    Raises `ValueError` for what is not an HMS model with all its weights (see `load_hms_model`), `OSError` when the
    Hub cannot be reached."""
    if model in MODEL_PRESETS:
        torch.manual_seed(0)
        return HMSForSemanticSegmentation(HMSConfig.from_preset(model)).eval(), False
    return load_hms_model(model).eval(), True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hms-segmentation demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hrnet_small_ocr",
                        help=f"save_pretrained folder or Hub id, or a preset with random weights: {sorted(MODEL_PRESETS)}")
    parser.add_argument("--image", type=Path, default=None, help="input image (default: a generated street scene)")
    parser.add_argument("--scales", default="0.5,1.0,2.0", help="comma-separated inference scales")
    parser.add_argument("--output-dir", type=Path, default=Path("demo_output"))
    parser.add_argument("--overwrite", action="store_true", help="allow replacing files in a non-empty output folder")
    add_large_input_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        scales = validate_scales([s for s in args.scales.split(",") if s.strip()], "--scales")
        image = load_image(args.image) if args.image is not None else street_scene()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.output_dir.exists() and not args.output_dir.is_dir():
        print(f"error: --output-dir {args.output_dir} is a file; expected a folder", file=sys.stderr)
        return 2
    if args.output_dir.exists() and any(args.output_dir.iterdir()) and not args.overwrite:
        print(f"error: output folder {args.output_dir} is not empty; pass --overwrite or choose another", file=sys.stderr)
        return 2
    try:
        model, trained = load_model(args.model)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # offline, or no such Hub repository
        print(f"error: --model {args.model} could not be loaded: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    if not trained:
        print(f"note: preset {args.model!r} has random weights: the labels below are not a real segmentation.")
    try:
        tiling, max_long_side = large_input_settings(args, model.config)
        pixel_values = shrink_to_long_side(normalize(image).unsqueeze(0), max_long_side)
        start = time.perf_counter()
        with torch.inference_mode():
            outputs = model(pixel_values, scales=scales, output_attentions=True, **tiling)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if outputs.logits.shape[-2:] != (image.height, image.width):  # shrunk by --max_long_side: label the full image
        outputs.logits = F.interpolate(outputs.logits, size=(image.height, image.width), mode="bilinear",
                                       align_corners=model.config.align_corners)
    seconds = time.perf_counter() - start

    args.output_dir.mkdir(parents=True, exist_ok=True)
    labels = outputs.logits.argmax(dim=1)[0].numpy()
    palette = palette_for(model.config.num_labels)
    Image.fromarray(labels.astype(np.uint8)).save(args.output_dir / "labels.png")
    colorize(labels, palette).save(args.output_dir / "labels_color.png")
    image.save(args.output_dir / "input.png")
    for scale, attention in zip(outputs.scales, outputs.attentions):
        attention_map = (attention[0, 0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(attention_map).save(args.output_dir / f"attention_{scale}x.png")
    shares = {}
    if model.config.scale_fusion == "hierarchical":  # each scale's share of the result, at the image's size
        resized = [attention[0] for attention in
                   attentions_at_size(outputs.attentions, (image.height, image.width), model.config.align_corners)]
        for scale, weight in zip(outputs.scales, hierarchical_scale_weights(resized)):
            grey = weight.mul(255).round().to(torch.uint8).numpy()
            Image.fromarray(grey).save(args.output_dir / f"weight_{scale}x.png")
            shares[f"{scale}x"] = round(float(weight.mean()), 4)
    summary = {
        "model": args.model,
        "trained": trained,
        "image_size": [image.height, image.width],
        "scales": list(outputs.scales),
        "seconds": round(seconds, 3),
        "scale_shares": shares,
        "classes_present": {model.config.id2label[int(c)]: int((labels == c).sum()) for c in np.unique(labels)},
    }
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    decided = "".join(f", {scale} decided {100 * share:.0f}%" for scale, share in shares.items())
    print(f"chained inference over scales {list(outputs.scales)} on a {image.width}x{image.height} image "
          f"took {seconds:.2f} s{decided}; wrote labels.png, labels_color.png, attention_<scale>x.png"
          f"{' and weight_<scale>x.png (its share of the result)' if shares else ''} to {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
