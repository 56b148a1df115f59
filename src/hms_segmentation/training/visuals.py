"""Pictures of an evaluation, as the reference's ``--dump_assets`` (and ``--dump_topn``): for some images of the split,
spread over it or the worst predicted, the input, the ground truth, the scored prediction, the two blended, and each
scale's own prediction and attention map, with an ``index.html`` that shows them side by side.

    hms-segmentation evaluate --model runs/cityscapes --scales 0.5,1.0,2.0 --save-visuals visuals/ --num-visuals 20
    hms-segmentation evaluate --model runs/cityscapes --scales 0.5,1.0,2.0 --save-visuals worst/ --visuals-select worst
"""

from __future__ import annotations

import html
import math
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from ..data.io import write_png_atomically
from ..label_tables import IMAGENET_MEAN, IMAGENET_STD
from ..modeling_hms import HMSSemanticSegmenterOutput, attentions_at_size, hierarchical_scale_weights

INDEX_FILE = "index.html"
COMPOSITE_WEIGHT = 0.4
"""Weight of the prediction's colours over the input in the composite (the reference's ``Image.blend(..., 0.4)``)."""
THUMBNAIL_WIDTH = 384
"""Width of the pictures on the index page (the reference's page and TensorBoard grid show them 384 pixels high)."""
SELECTIONS = ("spread", "worst")
"""`--visuals-select`: images spread evenly over the split, or those with the largest share of wrong pixels."""


def visualized_indices(num_images: int, count: int) -> list[int]:
    """`count` indices spread evenly over `num_images` images, from the first (every image when `count` is 0 or at
    least `num_images`), like the reference's one image in every ``len // dump_num``."""
    if count < 0:
        raise ValueError(f"--num-visuals must be >= 0 (0: every image), got {count}")
    if count == 0 or count >= num_images:
        return list(range(num_images))
    return list(range(0, num_images, num_images // count))[:count]


def worst_indices(error_rates: Sequence[float], count: int) -> list[int]:
    """The indices of the `count` largest error rates (all when `count` is 0), largest first, ties by index; an image
    without labelled pixels (rate NaN) is never among the worst."""
    visualized_indices(0, count)  # checks the count
    order = sorted(range(len(error_rates)), key=lambda index: (
        -error_rates[index] if not math.isnan(error_rates[index]) else math.inf, index))
    return order[:count] if count else order


def attention_scales(scales: Sequence[float], scale_fusion: str) -> list[float]:
    """The scales whose attention map the fusion reads: HMSA's chain never reads the highest scale's (it starts the
    chain), the explicit baseline reads all of them, average and max pooling none."""
    ascending = sorted(scales)
    if scale_fusion == "hierarchical":
        return ascending[:-1]
    return ascending if scale_fusion == "explicit" else []


def denormalized_image(pixel_values: torch.Tensor) -> np.ndarray:
    """`(3, H, W)` pixel values normalised with the ImageNet mean and std -> `(H, W, 3)` uint8 RGB."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    image = (pixel_values.detach().float().cpu() * std + mean).mul(255).round().clamp(0, 255)
    return image.to(torch.uint8).permute(1, 2, 0).numpy()


def colour_labels(labels: torch.Tensor | np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """`(H, W)` class ids -> RGB image in `palette`'s colours; ids without a colour (255: ignored) are black."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[: len(palette)] = palette
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return Image.fromarray(colours[labels.astype(np.uint8)])


def grey_picture(values: torch.Tensor) -> Image.Image:
    """`(H, W)` values in [0, 1] -> an 8-bit greyscale image (white: 1)."""
    return Image.fromarray(values.mul(255).round().to(torch.uint8).cpu().numpy())


class VisualsWriter:
    """Writes the pictures of some evaluated images into `directory` and an index page over them.

    For an image with id `i`: ``i_input.png``, ``i_gt.png`` (ground truth), ``i_prediction.png`` (the scored,
    multi-scale prediction), ``i_composited.png`` (the prediction over the input), and per scale `s` ``i_pred_<s>x.png``
    (that scale's own prediction) and, for the scales whose attention the fusion reads, ``i_attn_<s>x.png`` (white:
    this scale's prediction is taken; black: the higher scales' fusion is), and with HMSA's chain
    ``i_weight_<s>x.png``, the share of each scale in the result (`hierarchical_scale_weights`; white: this scale
    decided the pixel). All at the size of the labels.

    Args:
        directory: Where the pictures go (created if missing).
        palette: Colour of each training id.
        scales: The evaluated scale list.
        scale_fusion: The model's ``config.scale_fusion`` (which attention maps mean something).
        count: How many images to picture (0: all).
        select: One of `SELECTIONS`: which images.
        align_corners: The model's ``config.align_corners``, for resizing per-scale maps to the labels' size.
    """

    def __init__(self, directory: Path, palette: Sequence[Sequence[int]], scales: Sequence[float], scale_fusion: str,
                 count: int = 10, select: str = "spread", align_corners: bool = False):
        if select not in SELECTIONS:
            raise ValueError(f"--visuals-select must be one of {', '.join(SELECTIONS)}, got {select!r}")
        visualized_indices(0, count)  # checks the count
        self.directory = directory
        self.palette = palette
        self.scales = sorted(scales)
        self.attention_scales = attention_scales(scales, scale_fusion)
        # one scale alone decides everything: a white picture says nothing
        self.weight_scales = self.scales if scale_fusion == "hierarchical" and len(self.scales) > 1 else []
        self.count = count
        self.select = select
        self.align_corners = align_corners
        self.pictured: list[tuple[str, float]] = []
        """`(id, error rate)` of each image pictured so far, in the index page's order."""

    def candidates(self, num_images: int) -> list[int]:
        """The images that may be pictured, known before the evaluation: those chosen when spread, else any."""
        return visualized_indices(num_images, self.count) if self.select == "spread" else list(range(num_images))

    def choose(self, error_rates: Sequence[float]) -> list[int]:
        """The images to picture, given each image's share of wrongly predicted labelled pixels."""
        if self.select == "spread":
            return visualized_indices(len(error_rates), self.count)
        return worst_indices(error_rates, self.count)

    def file_names(self, sample_id: str) -> dict[str, str]:
        """Column title -> file name of each picture of `sample_id`, in the index page's order."""
        stem = sample_id.replace("/", "_").replace("\\", "_")  # an id names a file here, not a path
        names = {"input": f"{stem}_input.png", "ground truth": f"{stem}_gt.png",
                 "prediction": f"{stem}_prediction.png", "composited": f"{stem}_composited.png"}
        names.update({f"prediction {scale}x": f"{stem}_pred_{scale}x.png" for scale in self.scales})
        names.update({f"attention {scale}x": f"{stem}_attn_{scale}x.png" for scale in self.attention_scales})
        names.update({f"weight {scale}x": f"{stem}_weight_{scale}x.png" for scale in self.weight_scales})
        return names

    def paths(self, sample_ids: Sequence[str]) -> list[Path]:
        """Every file that writing `sample_ids` and the index creates."""
        return [self.directory / name for sample_id in sample_ids for name in self.file_names(sample_id).values()] + [
            self.directory / INDEX_FILE]

    def write(self, sample_id: str, pixel_values: torch.Tensor, labels: torch.Tensor, prediction: torch.Tensor,
              outputs: HMSSemanticSegmenterOutput) -> None:
        """
        Args:
            sample_id: The image's id (file names start with it).
            pixel_values (`torch.Tensor` of shape `(3, H, W)`): The normalised input as evaluated.
            labels (`torch.Tensor` of shape `(h, w)`): Ground-truth training ids, 255 ignored.
            prediction (`torch.Tensor` of shape `(h, w)`): The scored prediction.
            outputs: The model's output for this image alone, called with ``output_attentions=True`` (batch of 1).
        """
        size = tuple(labels.shape[-2:])
        names = self.file_names(sample_id)
        image = Image.fromarray(denormalized_image(pixel_values))
        if (image.height, image.width) != size:  # a --max_long_side input: pictures at the labels' size
            image = image.resize(size[::-1], Image.Resampling.BILINEAR)
        predicted = colour_labels(prediction, self.palette)
        pictures = {"input": image, "ground truth": colour_labels(labels, self.palette), "prediction": predicted,
                    "composited": Image.blend(image, predicted, COMPOSITE_WEIGHT)}
        attentions = [attention[0] for attention in attentions_at_size(outputs.attentions, size, self.align_corners)]
        for scale, logits, attention in zip(outputs.scales, outputs.scale_logits, attentions):
            logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=self.align_corners)
            pictures[f"prediction {scale}x"] = colour_labels(logits.argmax(1)[0], self.palette)
            if scale in self.attention_scales:
                pictures[f"attention {scale}x"] = grey_picture(attention)
        if self.weight_scales:
            for scale, weight in zip(outputs.scales, hierarchical_scale_weights(attentions)):
                pictures[f"weight {scale}x"] = grey_picture(weight)
        for title, picture in pictures.items():
            write_png_atomically(self.directory / names[title], picture)

    def write_index(self, title: str) -> Path:
        """An HTML page with one row of pictures per image of `pictured` (written by `write`), each named with its
        share of wrongly predicted labelled pixels."""
        columns = list(self.file_names("").keys())
        rows = []
        for sample_id, error_rate in self.pictured:
            cells = "".join(f'<td><a href="{urllib.parse.quote(name)}"><img src="{urllib.parse.quote(name)}" '
                            f'width="{THUMBNAIL_WIDTH}" alt="{html.escape(column)}"></a></td>'
                            for column, name in self.file_names(sample_id).items())
            error = "no labelled pixel" if math.isnan(error_rate) else f"{100 * error_rate:.1f}% of pixels wrong"
            rows.append(f"<tr><th>{html.escape(sample_id)}<br>{error}</th>{cells}</tr>")
        header = "".join(f"<th>{html.escape(column)}</th>" for column in columns)
        page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>\n"
                f"<body><h1>{html.escape(title)}</h1>\n<table>\n<tr><th>image</th>{header}</tr>\n"
                + "\n".join(rows) + "\n</table></body></html>\n")
        path = self.directory / INDEX_FILE
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.partial")
        temporary.write_text(page, encoding="utf-8")
        temporary.replace(path)
        return path
