"""Image processor of HMS models: images (and label maps) in, normalised `pixel_values` out, label maps back.

This module travels to the Hugging Face Hub as remote code next to the weights, so it imports only transformers,
PIL, numpy and its flat sibling `label_tables`; it reads image files on its own (pixel limit, EXIF orientation, mode
conversion, errors naming the file) instead of borrowing `hms_segmentation.data.io`, which does not travel.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    ChannelDimension,
    ImageInput,
    PILImageResampling,
    SizeDict,
    get_image_size,
    infer_channel_dimension_format,
    make_flat_list_of_images,
)
from transformers.processing_utils import ImagesKwargs, Unpack

from .label_tables import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, MAX_IMAGE_PIXELS

DEFAULT_MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # Pillow's own decompression-bomb guard stays on as well

_EXIF_ORIENTATION_TAG = 0x0112
_LABEL_MODES = ("L", "P", "I;16", "I;16B", "I;16L", "I;16N")


class HMSImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    size_divisor (`int`, *optional*, defaults to `self.size_divisor`):
        Output height and width are rounded to the nearest multiple of this (at least one multiple).
    max_image_pixels (`int`, *optional*, defaults to `self.max_image_pixels`):
        Images with more pixels (width * height) are refused with a `ValueError`, before decoding when read from a file.
    ignore_index (`int`, *optional*, defaults to `self.ignore_index`):
        Label value of pixels to skip; padded label pixels get it.
    num_labels (`int`, *optional*, defaults to `self.num_labels`):
        When set, label maps may only hold `0..num_labels-1` and `ignore_index`; other values raise a `ValueError`.
    inference_scales (`list[float]`, *optional*, defaults to `self.inference_scales`):
        When set, the output carries `scales`, which the model chains instead of `config.inference_scales`.
    max_long_side (`int`, *optional*, defaults to `self.max_long_side`):
        Images whose longer side exceeds this are shrunk (aspect ratio kept) so that it equals this, before the
        `size_divisor` rounding; smaller images are left alone. `None` never shrinks.
    """

    size_divisor: int
    max_image_pixels: int
    ignore_index: int
    num_labels: int | None
    inference_scales: list[float] | None
    max_long_side: int | None


class HMSImageProcessor(PilBackend):
    r"""
    Prepares images for [`HMSForSemanticSegmentation`] with transformers' PIL backend (no torchvision needed), and
    turns its logits back into label maps at the original image size.

    Steps, per image:

    1. Read: paths are opened here (pixel limit checked on the header, before decoding; truncated, empty or non-image
       files raise a `ValueError` naming the file). EXIF orientation is applied to PIL images. Grayscale, palette,
       RGBA/LA (alpha dropped, as the training data reader does), CMYK and 16-bit grayscale (scaled to 8 bits) become
       RGB; 32-bit modes (`I`, `F`) are refused.
    2. Resize (policy):
       - keep the size (`do_resize=False`, the default, as the reference evaluates at full resolution),
       - shortest edge (`size={"shortest_edge": n}`, optionally with `"longest_edge"`), aspect ratio kept,
       - fixed size (`size={"height": h, "width": w}`),
       then, with `max_long_side`, images whose longer side still exceeds it are shrunk to it (the memory-saving
       alternative to tiled inference, as the reference resizes large Mapillary images for evaluation; see the README),
       then height and width are rounded to the nearest multiple of `size_divisor` (at least one), in the same single
       bilinear resize. With `size_divisor=64`, every scale `s` for which `64 * s` is a multiple of 32 (0.5, 1, 1.5,
       2, ...) gives feature maps that line up exactly with the trunk's stride-32 branch and never rounds to zero
       pixels; degenerate images (3x5, 1x4000) are thus enlarged to one multiple. `size_divisor=1` disables it.
    3. Rescale by `rescale_factor` (1/255) and normalise with the ImageNet mean/std of the reference.
    4. Batch: images of different sizes are padded at the bottom/right to the largest (`do_pad=True`, the default) with
       zeros (the mean colour after normalisation); the output then has `pixel_mask` (1 = image, 0 = padding) and
       label maps are padded with `ignore_index`. Padding is seen by the network (it can shift predictions near the
       border slightly); for exact per-image results process images one at a time, or pass `do_pad=False` with
       `return_tensors=None` to get a list of differently sized arrays.

    Label maps (`segmentation_maps`) hold one class id per pixel (mode L or P, or a 2-D integer array); they follow the
    image's orientation and resizing with nearest-neighbour sampling, so `ignore_index` (255) stays 255.

    Args:
        do_resize (`bool`, *optional*, defaults to `False`, or `True` when `size` is given):
            Whether to resize to `size`; without, only the `size_divisor` rounding applies.
        size (`dict[str, int]`, *optional*):
            `{"shortest_edge": n}` (optionally with `"longest_edge"`), or `{"height": h, "width": w}`. Giving it
            (to the constructor or to a call) turns `do_resize` on unless `do_resize` is given too.
        size_divisor (`int`, *optional*, defaults to 64):
            Output sides are rounded to the nearest multiple of this.
        resample (`PILImageResampling`, *optional*, defaults to `BILINEAR`):
            Filter used to resize images (label maps always use nearest).
        do_rescale, rescale_factor, do_normalize, image_mean, image_std:
            As in every transformers image processor; the defaults are the reference's (1/255, ImageNet mean/std).
        do_pad (`bool`, *optional*, defaults to `True`):
            Pad a batch of different sizes to a common size and return `pixel_mask`.
        max_image_pixels (`int`, *optional*, defaults to 178956970):
            Refuse larger images with a clear error rather than exhausting memory.
        ignore_index (`int`, *optional*, defaults to 255):
            Label value to skip; used for padded label pixels.
        num_labels (`int`, *optional*):
            Validate that label maps hold only `0..num_labels-1` and `ignore_index`.
        inference_scales (`list[float]`, *optional*):
            Scales for the model to chain (output key `scales`); `None` leaves the choice to `config.inference_scales`.
        max_long_side (`int`, *optional*):
            Shrink images whose longer side exceeds this (aspect ratio kept); `None` keeps every size.
    """

    valid_kwargs = HMSImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_MEAN
    image_std = IMAGENET_STD
    size = None
    default_to_square = False
    do_resize = False
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_pad = True
    do_convert_rgb = True
    size_divisor = 64
    max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS
    ignore_index = IGNORE_INDEX
    num_labels = None
    inference_scales = None
    max_long_side = None

    def __init__(self, **kwargs: Unpack[HMSImageProcessorKwargs]) -> None:
        super().__init__(**_size_turns_on_resizing(kwargs))
        _positive_int("size_divisor", self.size_divisor)
        _positive_int("max_image_pixels", self.max_image_pixels)
        if self.max_long_side is not None:
            _positive_int("max_long_side", self.max_long_side)
        if self.inference_scales is not None:
            self.inference_scales = _checked_scales(self.inference_scales, self.size_divisor)
        _check_label_settings(self.ignore_index, self.num_labels)

    def preprocess(
        self,
        images: ImageInput | str | os.PathLike | Sequence[str | os.PathLike],
        segmentation_maps: ImageInput | str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        **kwargs: Unpack[HMSImageProcessorKwargs],
    ) -> BatchFeature:
        r"""
        Args:
            images: One image or a list: paths, PIL images, `(height, width, 3)` / `(3, height, width)` uint8 arrays or
                tensors, or `(height, width)` grayscale arrays.
            segmentation_maps: Optional label maps, one per image, of the same (shown) size as their image.

        Returns:
            [`BatchFeature`] with `pixel_values` `(batch, 3, height, width)`; `original_sizes` `(batch, 2)`, each
            image's `(height, width)` as shown (after its EXIF orientation, before resizing), the `target_sizes` of
            `post_process_semantic_segmentation`; `labels` `(batch, height, width)` int64 when `segmentation_maps` are
            given; `pixel_mask` `(batch, height, width)` when `do_pad`; `scales` when `inference_scales` is set.
            `model(**inputs)` takes it as it is (the model ignores `original_sizes` and `pixel_mask`).
        """
        return super().preprocess(images, segmentation_maps, **_size_turns_on_resizing(kwargs))

    def fetch_images(self, image_url_or_urls: Any, max_image_pixels: int | None = None) -> Any:
        """Open paths (str or `os.PathLike`) with the checks of this processor; URLs go through transformers."""
        max_image_pixels = self.max_image_pixels if max_image_pixels is None else max_image_pixels
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item, max_image_pixels) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, os.PathLike) or (
            isinstance(image_url_or_urls, str) and not image_url_or_urls.startswith(("http://", "https://"))
        ):
            return open_image_file(image_url_or_urls, max_image_pixels)
        return super().fetch_images(image_url_or_urls)

    def _prepare_images_structure(
        self, images: ImageInput, expected_ndims: int = 3, max_image_pixels: int | None = None
    ) -> list[Any]:
        """A flat list of images; unlike transformers' helper, 2-D (grayscale) arrays count as images too."""
        images = self.fetch_images(images, max_image_pixels)
        if getattr(images, "ndim", None) == 2:
            return [images]
        if isinstance(images, (list, tuple)) and any(getattr(image, "ndim", None) == 2 for image in images):
            # element by element: transformers' helper judges a list by its first element, so a leading 2-D array
            # made it refuse [gray, rgb] while it took [rgb, gray]
            return [
                flat
                for index, image in enumerate(images)
                for flat in (
                    [image] if getattr(image, "ndim", None) == 2
                    else _flat_images(image, expected_ndims, f"images[{index}]")
                )
            ]
        return _flat_images(images, expected_ndims)

    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        max_image_pixels: int | None = None,
        name: str | None = None,
        do_rescale: bool = False,
        **kwargs: Any,
    ) -> np.ndarray:
        """
        One image as a `(channels, height, width)` array: upright, RGB, refused beyond `max_image_pixels`. A 3-D array
        without `input_data_format` has its channel axis found by `infer_channel_layout`; with `do_rescale`, float
        values all in [0, 1] (already rescaled, so about to be divided by 255 again) raise a warning naming the image.
        """
        max_image_pixels = self.max_image_pixels if max_image_pixels is None else max_image_pixels
        name = name or _describe(image, "image")
        if isinstance(image, Image.Image):
            check_pixel_limit(image.size, max_image_pixels, name)
            image = apply_exif_orientation(image)
            if do_convert_rgb:
                image = convert_pil_to_rgb(image, name)
        else:
            if hasattr(image, "detach"):  # a torch tensor, possibly on an accelerator
                image = image.detach().cpu()
                # numpy has no bfloat16; float32 holds every 8- or 16-bit pixel value exactly
                image = (image.float() if image.dtype.is_floating_point else image).numpy()
            image = np.asarray(image)
            if image.dtype == np.uint16:  # as a 16-bit PNG file is read
                image = sixteen_bit_to_eight_bit(image)
            if image.ndim == 2 and do_convert_rgb:  # grayscale; transformers' conversion expects a channel axis
                image, input_data_format = np.repeat(image[..., None], 3, axis=-1), ChannelDimension.LAST
            elif image.ndim == 3 and input_data_format is None:
                input_data_format = infer_channel_layout(image.shape)
            if image.ndim == 3 and do_convert_rgb:
                layout = ChannelDimension(input_data_format or infer_channel_dimension_format(image))
                channel_axis = 0 if layout == ChannelDimension.FIRST else -1
                if image.shape[channel_axis] == 4:
                    # RGBA: alpha dropped, as for a PIL image and in the training reader (transformers' conversion
                    # would blend the colours onto white wherever alpha < 255)
                    image = np.take(image, [0, 1, 2], axis=channel_axis)
            is_float = np.issubdtype(image.dtype, np.floating) and image.size > 0
            if do_rescale and is_float and 0 <= image.min() <= image.max() <= 1:
                warnings.warn(
                    f"{name}: float pixel values all in [0, 1] look already rescaled, and do_rescale=True rescales "
                    "them again (by 1/255 by default); pass do_rescale=False, or values in 0..255 (uint8)",
                    stacklevel=2,
                )
            height, width = get_image_size(image, channel_dim=input_data_format)
            check_pixel_limit((width, height), max_image_pixels, name)
        return super().process_image(image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format)

    def _preprocess_image_like_inputs(
        self,
        images: ImageInput,
        segmentation_maps: ImageInput | None,
        do_convert_rgb: bool,
        input_data_format: ChannelDimension | None,
        return_tensors: str | None,
        **kwargs: Any,
    ) -> BatchFeature:
        size_divisor = _positive_int("size_divisor", kwargs["size_divisor"])
        max_image_pixels = _positive_int("max_image_pixels", kwargs["max_image_pixels"])
        max_long_side = kwargs.get("max_long_side")
        if max_long_side is not None:
            _positive_int("max_long_side", max_long_side)
        _check_label_settings(kwargs["ignore_index"], kwargs["num_labels"])
        raw_images = self._prepare_images_structure(images, max_image_pixels=max_image_pixels)
        names = [_describe(image, f"images[{index}]") for index, image in enumerate(raw_images)]
        arrays = [
            self.process_image(
                image, do_convert_rgb, input_data_format, max_image_pixels=max_image_pixels, name=name,
                do_rescale=kwargs["do_rescale"],
            )
            for image, name in zip(raw_images, names)
        ]
        original_sizes = [array.shape[-2:] for array in arrays]
        output_sizes = [
            get_output_size(height, width, kwargs["size"] if kwargs["do_resize"] else None, size_divisor, max_long_side)
            for height, width in original_sizes
        ]
        pixel_values = []
        for array, original, target in zip(arrays, original_sizes, output_sizes):
            if tuple(original) != target:
                if np.issubdtype(array.dtype, np.floating):
                    array = resize_float_channels(array, target, kwargs["resample"])
                else:
                    array = self.resize(array, SizeDict(height=target[0], width=target[1]), kwargs["resample"])
            if kwargs["do_rescale"]:
                array = self.rescale(array, kwargs["rescale_factor"])
            if kwargs["do_normalize"]:
                array = self.normalize(array, kwargs["image_mean"], kwargs["image_std"])
            pixel_values.append(array.astype(np.float32))

        labels = None
        if segmentation_maps is not None:
            labels = self._prepare_segmentation_maps(
                segmentation_maps, names, original_sizes, output_sizes, max_image_pixels,
                kwargs["ignore_index"], kwargs["num_labels"],
            )

        # upright sizes: `Image.open(path).size` is the stored one, transposed for EXIF orientations 5 to 8
        data: dict[str, Any] = {"original_sizes": [tuple(int(side) for side in size) for size in original_sizes]}
        if kwargs["do_pad"]:
            pad_size = kwargs["pad_size"] or SizeDict(
                height=max(size[0] for size in output_sizes), width=max(size[1] for size in output_sizes)
            )
            data["pixel_values"], data["pixel_mask"] = self.pad(pixel_values, pad_size=pad_size, return_mask=True)
            if labels is not None:
                labels = [_pad_label(label, pad_size, kwargs["ignore_index"]) for label in labels]
        else:
            if return_tensors is not None and len(set(output_sizes)) > 1:
                raise ValueError(
                    f"images of different output sizes {sorted(set(output_sizes))} cannot be stacked into one tensor "
                    "with do_pad=False; pass do_pad=True (padding + pixel_mask) or return_tensors=None (a list)"
                )
            data["pixel_values"] = pixel_values
        if labels is not None:
            data["labels"] = labels
        if kwargs["inference_scales"] is not None:
            data["scales"] = _checked_scales(kwargs["inference_scales"], size_divisor)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _prepare_segmentation_maps(
        self,
        segmentation_maps: Any,
        image_names: list[str],
        original_sizes: list[tuple[int, int]],
        output_sizes: list[tuple[int, int]],
        max_image_pixels: int,
        ignore_index: int,
        num_labels: int | None,
    ) -> list[np.ndarray]:
        """Label maps read, checked against their image, resized (nearest) to the image's output size."""
        if getattr(segmentation_maps, "ndim", 0) == 3 and len(image_names) > 1:
            segmentation_maps = list(segmentation_maps)  # a stacked (batch, height, width) array or tensor
        elif not isinstance(segmentation_maps, (list, tuple)):
            segmentation_maps = [segmentation_maps]
        if len(segmentation_maps) != len(image_names):
            raise ValueError(
                f"segmentation_maps must give one label map per image: got {len(segmentation_maps)} for "
                f"{len(image_names)} image(s)"
            )
        labels = []
        for index, (source, image_name, original, target) in enumerate(
            zip(segmentation_maps, image_names, original_sizes, output_sizes)
        ):
            name = _describe(source, f"segmentation_maps[{index}]")
            label = read_label_map(source, max_image_pixels, name)
            if label.shape != tuple(original):
                raise ValueError(
                    f"label map {name} is {label.shape[1]}x{label.shape[0]} (width x height) but its image "
                    f"{image_name} is {original[1]}x{original[0]}: expected the same size"
                )
            if num_labels is not None:
                _check_label_values(label, num_labels, ignore_index, name)
            if label.shape != tuple(target):
                label = np.asarray(
                    Image.fromarray(label).resize((target[1], target[0]), Image.Resampling.NEAREST)
                )
            labels.append(label.astype(np.int64))
        return labels

    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: Sequence[tuple[int, int]] | Any | None = None,
        pixel_mask: Any | None = None,
    ) -> list[Any]:
        """
        Turn the model's logits into one label map per image.

        Args:
            outputs ([`HMSSemanticSegmenterOutput`] or a mapping with `logits`):
                `logits` of shape `(batch, num_labels, height, width)`.
            target_sizes (`list[tuple[int, int]]` or tensor `(batch, 2)`, *optional*):
                `(height, width)` per image, usually the original sizes: pass the processor output's `original_sizes`,
                which follow the EXIF orientation (`Image.open(path).size` does not); the logits are resized (bilinear)
                to it before the argmax. Without, the maps keep the logits' size.
            pixel_mask (tensor `(batch, height, width)`, *optional*):
                The `pixel_mask` of a padded batch: each prediction is first cropped to its image's unpadded area.

        Returns:
            `list[torch.Tensor]`: `batch` label maps `(height, width)` of class ids (int64).
        """
        import torch
        from torch.nn import functional as F

        logits = outputs["logits"] if isinstance(outputs, dict) or hasattr(outputs, "keys") else outputs.logits
        if target_sizes is not None and len(target_sizes) != len(logits):
            raise ValueError(
                f"target_sizes must give one (height, width) per image: got {len(target_sizes)} for a batch of "
                f"{len(logits)}"
            )
        if pixel_mask is not None and len(pixel_mask) != len(logits):
            raise ValueError(
                f"pixel_mask must have one mask per image: got {len(pixel_mask)} for a batch of {len(logits)}"
            )
        label_maps = []
        for index, image_logits in enumerate(logits):
            if pixel_mask is not None:
                mask = torch.as_tensor(pixel_mask[index]).bool()
                height, width = int(mask.any(dim=1).sum()), int(mask.any(dim=0).sum())
                image_logits = image_logits[:, :height, :width]
            if target_sizes is not None:
                size = tuple(int(side) for side in target_sizes[index])
                if tuple(image_logits.shape[-2:]) != size:
                    image_logits = F.interpolate(image_logits[None], size=size, mode="bilinear", align_corners=False)[0]
            label_maps.append(image_logits.argmax(dim=0))
        return label_maps


def get_output_size(
    height: int, width: int, size: SizeDict | dict | None, size_divisor: int, max_long_side: int | None = None
) -> tuple[int, int]:
    """
    `(height, width)` of an image after the resize policy and the rounding to `size_divisor`.

    Args:
        height, width: The image's size.
        size: `None` (keep), `{"shortest_edge": n}` (+ optional `"longest_edge"`), or `{"height": h, "width": w}`.
        size_divisor: Each side is rounded to the nearest multiple of it, and to at least one multiple.
        max_long_side: When the size after `size` has a longer side above this, both sides shrink by the same
            factor so that it equals this (before the rounding). `None`: no limit.
    """
    size = SizeDict(**size) if isinstance(size, dict) else size
    if size is None:
        target = (height, width)
    elif size.height and size.width:
        target = (size.height, size.width)
    elif size.shortest_edge:
        factor = size.shortest_edge / min(height, width)
        if size.longest_edge:
            factor = min(factor, size.longest_edge / max(height, width))
        target = (height * factor, width * factor)
    else:
        raise ValueError(
            f"size must be {{'shortest_edge': n}} (optionally with 'longest_edge') or {{'height': h, 'width': w}}, "
            f"got {dict(size)}"
        )
    if max_long_side is not None and max(target) > max_long_side:
        factor = max_long_side / max(target)
        target = (target[0] * factor, target[1] * factor)
    # half up, not Python's half-to-even, so that 160 -> 192 and 96 -> 128 alike
    return tuple(max(size_divisor, math.floor(side / size_divisor + 0.5) * size_divisor) for side in target)


def shrink_to_long_side(pixel_values: Any, max_long_side: int | None, size_divisor: int = 64) -> Any:
    """
    The `max_long_side` policy on a batch tensor (batch, channels, height, width), for callers that hold tensors
    already (evaluation, demo, auto-labelling): when the longer side exceeds `max_long_side`, a bilinear resize to the
    size `get_output_size` gives (aspect ratio kept, sides rounded to `size_divisor`); otherwise `pixel_values`
    unchanged. Antialiased, as PIL's resize of the processor's images is: the two agree within one 8-bit level.
    """
    if max_long_side is None:
        return pixel_values
    _positive_int("max_long_side", max_long_side)
    height, width = pixel_values.shape[-2:]
    if max(height, width) <= max_long_side:
        return pixel_values
    from torch.nn import functional as F

    size = get_output_size(height, width, None, size_divisor, max_long_side)
    # without antialiasing a shrink by 4 aliases fine detail (up to 86 levels from the processor's pixels)
    return F.interpolate(pixel_values, size=size, mode="bilinear", align_corners=False, antialias=True)


def _size_turns_on_resizing(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with `do_resize=True` added when they give a `size` but no `do_resize`: resizing is off by default
    (the reference evaluates at full resolution), and a `size` that silently did nothing would surprise everyone."""
    if kwargs.get("size") is not None and "do_resize" not in kwargs:
        return {**kwargs, "do_resize": True}
    return kwargs


def infer_channel_layout(shape: tuple[int, ...]) -> ChannelDimension | None:
    """
    Where the channel axis of a 3-D image array of `shape` is, reading it as RGB whenever only one axis holds 3.

    transformers' own rule takes the first axis whenever it could be a channel axis (1, 3 or 4 values), so it reads a
    1-pixel-high `(1, width, 3)` or a 3-pixel-wide `(4, 3, 3)` RGB array as channels-first and returns a transposed or
    cropped image without a word. Here: channels-last when the last axis has 3 and the first does not (channels-first
    the other way round); otherwise the axis that alone can be a channel axis (1, 3 or 4: grayscale, RGB, RGBA);
    `None` when both can (e.g. `(3, width, 3)`), left to transformers, which warns and takes the first.
    """
    first, last = shape[0], shape[-1]
    if (first == 3) != (last == 3):
        return ChannelDimension.LAST if last == 3 else ChannelDimension.FIRST
    channel_counts = (1, 3, 4)
    if (first in channel_counts) != (last in channel_counts):
        return ChannelDimension.LAST if last in channel_counts else ChannelDimension.FIRST
    return None


def open_image_file(path: str | os.PathLike, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """
    Open and decode an image file, refusing what cannot or should not be decoded.

    Raises:
        FileNotFoundError: `path` is not a file.
        ValueError: The file is empty, not an image, truncated/corrupt, or larger than `max_image_pixels` (checked on
            the header, before decoding) or Pillow's decompression-bomb limit. The message names the file.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"{name}: no such image file")
    if os.path.getsize(name) == 0:
        raise ValueError(f"{name}: expected an image file, found an empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # the pixel limit below gives the clearer message; Pillow's hard limit still raises on its own
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(name)
    except Image.DecompressionBombError as error:
        raise ValueError(f"{name}: refused to decode a possible decompression bomb ({error})") from None
    except UnidentifiedImageError:
        raise ValueError(
            f"{name}: expected an image file (PNG, JPEG, ...), found data that no image decoder reads"
        ) from None
    except OSError as error:
        raise ValueError(f"{name}: cannot read the image ({error})") from None
    check_pixel_limit(image.size, max_image_pixels, name)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{name}: the image file is truncated or corrupt ({error})") from None
    return image


def check_pixel_limit(size: tuple[int, int], max_image_pixels: int, name: str) -> None:
    """Raise a `ValueError` naming `name` when `size` (width, height) has more than `max_image_pixels` pixels."""
    width, height = size
    if width * height > max_image_pixels:
        raise ValueError(
            f"{name}: refused a {width}x{height} image ({width * height:,} pixels), more than "
            f"max_image_pixels={max_image_pixels:,}; a file this large is usually a decompression bomb (raise "
            "max_image_pixels if it is genuine)"
        )


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """The image as it is shown: rotated/flipped as its EXIF orientation tag says (unchanged when there is none)."""
    if image.getexif().get(_EXIF_ORIENTATION_TAG, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def convert_pil_to_rgb(image: Image.Image, name: str) -> Image.Image:
    """8-bit RGB from any PIL mode we can interpret, the one conversion of images at inference and in the training data
    alike: 16-bit grayscale is scaled down, 32-bit modes are refused, and transparency is dropped, never composited:
    an alpha channel is discarded and a colour key (a PNG ``tRNS`` chunk, kept by Pillow in ``info["transparency"]``)
    is forgotten, so that the stored colours are what the model sees (transformers' own conversion would paint
    colour-keyed pixels white)."""
    if image.mode in ("I", "F"):
        raise ValueError(
            f"{name}: expected an 8- or 16-bit image, found mode {image.mode} (32-bit pixels of unknown range); "
            "convert it to 8-bit RGB first"
        )
    if image.mode.startswith("I;16"):
        image = Image.fromarray(sixteen_bit_to_eight_bit(np.asarray(image, dtype=np.uint16)))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow warns when such a palette image goes straight to RGB
    if image.mode != "RGB":
        image = image.convert("RGB")  # Pillow carries a colour key over as an RGB one
    if "transparency" in image.info:
        image = image.copy()  # the caller's image keeps its info
        del image.info["transparency"]
    return image


def sixteen_bit_to_eight_bit(pixels: np.ndarray) -> np.ndarray:
    """16-bit pixel values 0..65535 onto 0..255 (x >> 8, the high byte: the full range onto the full range), the one
    conversion of 16-bit images and arrays, at inference and in the training data alike. The high byte because Pillow
    decodes 16-bit colour files (48-bit PNG, TIFF) to 8-bit RGB that way, before any code of ours sees them: grey and
    colour, files and arrays then all agree (x * 255 // 65535 differs from it by one level in half of the values)."""
    return (pixels >> 8).astype(np.uint8)


def read_label_map(source: Any, max_image_pixels: int, name: str) -> np.ndarray:
    """A label map (path, PIL image, array or tensor) as a `(height, width)` uint8 array of class ids, upright."""
    if isinstance(source, (str, os.PathLike)):
        source = open_image_file(source, max_image_pixels)
    if isinstance(source, Image.Image):
        if source.mode not in _LABEL_MODES:
            raise ValueError(
                f"{name}: expected a single-channel label map (mode L or P, one class id per pixel), found mode "
                f"{source.mode} with {len(source.getbands())} channel(s); convert colour-coded labels to ids first"
            )
        check_pixel_limit(source.size, max_image_pixels, name)
        label = np.asarray(apply_exif_orientation(source))
    else:
        if hasattr(source, "detach"):
            source = source.detach().cpu().numpy()
        label = np.asarray(source)
        if label.ndim == 3 and 1 in (label.shape[0], label.shape[-1]):
            label = label.reshape(label.shape[1:] if label.shape[0] == 1 else label.shape[:-1])
        if label.ndim != 2:
            raise ValueError(
                f"{name}: expected a label map of shape (height, width) with one class id per pixel, found shape "
                f"{label.shape}"
            )
        if not np.issubdtype(label.dtype, np.integer):
            raise ValueError(f"{name}: expected integer class ids, found dtype {label.dtype}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(
            f"{name}: expected class ids in 0..255, found values from {int(label.min())} to {int(label.max())}"
        )
    return label.astype(np.uint8)


def resize_float_channels(array: np.ndarray, size: tuple[int, int], resample: Any) -> np.ndarray:
    """
    Resize a float `(channels, height, width)` image to `size` `(height, width)` channel by channel as 32-bit float
    PIL images, with the same filter as 8-bit images: transformers' PIL path would go through uint8, refusing float
    values outside [0, 1] and rounding the rest to 8 bits.
    """
    filter_ = Image.Resampling(int(resample))
    return np.stack([
        np.asarray(Image.fromarray(channel.astype(np.float32)).resize((size[1], size[0]), filter_))  # mode F
        for channel in array
    ])


def _check_label_settings(ignore_index: Any, num_labels: Any) -> None:
    """Refuse an `ignore_index` that no uint8 label map can hold (transformers' -100, 300), or that is one of the
    `num_labels` class ids (its pixels would be skipped, and padding would look like that class)."""
    is_integer = isinstance(ignore_index, (int, np.integer)) and not isinstance(ignore_index, bool)
    if not is_integer or not 0 <= ignore_index <= 255:
        raise ValueError(
            f"ignore_index must be an integer in 0..255 (label maps are read as uint8 class ids, and padded label "
            f"pixels get it), got {ignore_index!r}"
        )
    if num_labels is None:
        return
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer or None, got {num_labels!r}")
    if ignore_index < num_labels:
        raise ValueError(
            f"ignore_index={ignore_index} is one of the class ids 0..{num_labels - 1} of num_labels={num_labels}; "
            "expected a value outside them (255 by default)"
        )


def _check_label_values(label: np.ndarray, num_labels: int, ignore_index: int, name: str) -> None:
    counts = np.bincount(label.ravel(), minlength=256)
    allowed = np.zeros(256, dtype=bool)
    allowed[:num_labels] = True
    allowed[ignore_index] = True
    unknown = np.flatnonzero((counts > 0) & ~allowed)
    if unknown.size:
        raise ValueError(
            f"{name}: expected class ids 0..{num_labels - 1} or {ignore_index} (ignore), found {unknown.tolist()} in "
            f"{int(counts[unknown].sum())} pixel(s)"
        )


def _flat_images(images: Any, expected_ndims: int, name: str = "images") -> list[Any]:
    """transformers' `make_flat_list_of_images`, with an error that names `name` and the input's structure instead of
    printing every pixel of it."""
    try:
        return make_flat_list_of_images(images, expected_ndims=expected_ndims)
    except ValueError:
        raise ValueError(
            f"{name}: expected an image (PIL image, path, (height, width[, channels]) array or tensor) or a list of "
            f"them, found {_structure(images)}"
        ) from None


def _structure(value: Any) -> str:
    """A short description of an input: types and shapes, never values."""
    if isinstance(value, (list, tuple)):
        shown = ", ".join(_structure(item) for item in value[:4])
        return f"{type(value).__name__} of {len(value)} [{shown}{', ...' if len(value) > 4 else ''}]"
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__} of shape {tuple(shape)}" if shape is not None else type(value).__name__


def _pad_label(label: np.ndarray, pad_size: SizeDict, ignore_index: int) -> np.ndarray:
    height, width = label.shape
    return np.pad(label, ((0, pad_size.height - height), (0, pad_size.width - width)), constant_values=ignore_index)


def _checked_scales(scales: Any, size_divisor: int) -> list[float]:
    """Scales as floats, each positive and turning a `size_divisor` multiple into a whole number of pixels."""
    values = [float(scale) for scale in ([scales] if isinstance(scales, (int, float)) else scales)]
    if not values or any(not (scale > 0 and math.isfinite(scale)) for scale in values):
        raise ValueError(f"inference_scales must be a non-empty list of positive numbers, got {scales!r}")
    fractional = [scale for scale in values if abs(size_divisor * scale - round(size_divisor * scale)) > 1e-6]
    if fractional:
        raise ValueError(
            f"inference_scales {fractional} turn a side that is a multiple of size_divisor={size_divisor} into a "
            "fractional number of pixels; choose a size_divisor for which size_divisor * scale is a whole number"
        )
    return values


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _describe(source: Any, fallback: str) -> str:
    """A name for an input in messages: its path, the file a PIL image came from, or its position."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return getattr(source, "filename", "") or fallback


__all__ = ["HMSImageProcessor"]
