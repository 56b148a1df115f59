"""Training augmentations of the reference recipe and the evaluation preprocessing, with PIL, numpy and torch only.

Training (NVIDIA/semantic-segmentation recipe): random scale in [0.5, 2.0], random crop to `crop_size` with padding
(image padded with the mean colour, label with the ignore index), horizontal flip, colour jitter (brightness,
contrast, saturation and hue, in random order), optional Gaussian blur and additive Gaussian noise, then normalisation
with the ImageNet mean/std. Labels are only ever resized with nearest-neighbour sampling, so they never gain a class
that was not in the file.

Scaling and cropping are done in one step: only the part of the image that ends up in the crop is resampled, which
is much cheaper than resizing a 2048x1024 frame to 4096x2048 and cropping. The image is resampled by torch's
antialiased bicubic (or bilinear) resize of 8-bit pixels, which uses PIL's filter (bicubic a = -0.5) and runs about 3x
faster than PIL's own; since it starts on a whole source pixel, each crop's sampling grid starts on one (a shift of
less than one source pixel from where the reference's resize-then-crop would put it, i.e. a slightly different random
crop), and the label is resampled (nearest) on exactly that grid. Pixels agree with PIL's resize of the same region
within 2 levels, and within 4 in the first two rows and columns of a crop that starts inside the image (torch clamps
the filter at the region's start where PIL reads the pixels before it).

Outputs use the names the model's forward takes: ``pixel_values`` float32 `(3, height, width)` and ``labels`` int64
`(height, width)`; or, with ``TrainAugmentationOptions(output_dtype="uint8")``, the augmented crop as 8-bit
``pixel_values`` uint8 `(3, height, width)` and ``labels`` uint8 (255 = ignore), a fifth of the bytes for DataLoader
workers to hand over, plus (when colour jitter is on) the sample's ``color_jitter`` plan `(4, 2)` and (when the blur
is on) its ``blur_sigma`` `()`: the colour jitter, the blur and the normalisation then run after the transfer to the
device, in that order (the reference's), in `normalize_pixel_values(pixel_values, color_jitter=..., blur_sigma=...)`
(the training scripts do this), where they cost next to nothing on a GPU. Both give the same normalised tensor: the
float path also starts from the 8-bit crop, applies the same plan and blur with the same functions
(`apply_color_jitter_`, `gaussian_blur_`; with noise on, the uint8 path applies them in the worker, since the noise
must follow them, and hands over an empty plan and a zero sigma), rounds noise to whole levels, and normalises with
the same float32 arithmetic.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from ..label_tables import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from .io import load_image, load_label


LUMA = np.array([0.299, 0.587, 0.114])
"""ITU-R 601 luma weights, as PIL's ``convert("L")``: the grey level used by contrast and saturation."""


RESAMPLING = ("bicubic", "bilinear")
"""Image resampling filters of the training scale step (`F.interpolate` modes with `antialias=True`: PIL's filters)."""


def sample_generator(seed: int, epoch: int, index: int, repeat: int = 0) -> np.random.Generator:
    """The random generator of one training sample: a pure function of (seed, epoch, index), whatever the workers.
    `repeat` > 0 gives another generator for the same sample met again in the epoch (a stream that repeats frames)."""
    return np.random.default_rng([seed, epoch, index, repeat] if repeat else [seed, epoch, index])


def _pair(size: int | tuple[int, int], name: str) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height < 1 or width < 1:
        raise ValueError(f"{name} must be positive (height, width), got {size}")
    return int(height), int(width)


def _normalize_(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """In place: float32 (..., 3, H, W) values in 0..255 -> (value / 255 - mean) / std, one multiply and one subtract
    per value. Every normalisation of training pixels goes through here, so float32 samples (normalised on the CPU) and
    uint8 samples (normalised on the device) agree bit for bit: a separate multiply and subtract, not a fused
    multiply-add, are rounded the same by IEEE float32 on CPU and GPU."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return pixels.mul_(scale).sub_(shift)


def normalize_pixel_values(
    pixel_values: torch.Tensor,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    color_jitter: torch.Tensor | None = None,
    blur_sigma: torch.Tensor | None = None,
) -> torch.Tensor:
    """8-bit pixels -> the normalised float32 pixels the model takes, on the device they are on.

    Args:
        pixel_values: uint8 `(batch, 3, height, width)` or `(3, height, width)` (e.g. samples of
            ``TrainAugmentationOptions(output_dtype="uint8")`` after the DataLoader), or float values in 0..255.
        mean: Normalisation mean (images scaled to [0, 1]).
        std: Normalisation standard deviation.
        color_jitter: The samples' ``color_jitter`` plans, `(batch, 3, 2)` or `(3, 2)`: applied first (see
            `apply_color_jitter_`), so the colour jitter of uint8 samples runs on the device too.
        blur_sigma: The samples' ``blur_sigma``, `(batch,)` or `()`: a Gaussian blur after the jitter (see
            `gaussian_blur_`; 0 leaves an image as it is).

    Returns:
        float32 `(value / 255 - mean) / std`, same shape, a new tensor (the input is left as it is).
    """
    if pixel_values.ndim < 3 or pixel_values.shape[-3] != 3:
        raise ValueError(f"pixel_values must be (..., 3, height, width), got shape {tuple(pixel_values.shape)}")
    pixels = pixel_values.to(torch.float32, copy=True)
    if color_jitter is not None:
        apply_color_jitter_(pixels, color_jitter)
    if blur_sigma is not None:
        gaussian_blur_(pixels, blur_sigma)
    return _normalize_(pixels, mean, std)


def gaussian_blur_(pixels: torch.Tensor, sigma: torch.Tensor | float, truncate: float = 4.0) -> torch.Tensor:
    """In place on float32 pixels `(batch, C, H, W)` or `(C, H, W)`: a Gaussian blur of standard deviation `sigma`
    pixels, one per image (`(batch,)` or `()`; 0 leaves the image as it is). The kernel is scikit-image's `gaussian`
    (the reference's ``--gblur``, through scipy.ndimage): separable, truncated at `int(truncate * sigma + 0.5)`
    pixels, borders extended with the nearest pixel.
    """
    images = pixels if pixels.ndim == 4 else pixels.unsqueeze(0)
    sigmas = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).tolist()
    if len(sigmas) != images.shape[0]:
        raise ValueError(f"blur_sigma must hold one value per image, {images.shape[0]} for pixels of shape "
                         f"{tuple(pixels.shape)}, got {len(sigmas)}")
    for image, image_sigma in zip(images, sigmas):
        radius = int(truncate * image_sigma + 0.5) if image_sigma > 0 else 0
        if radius == 0:  # a one-tap kernel: nothing to do
            continue
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
        weights = torch.exp(-0.5 * (offsets / image_sigma) ** 2)
        weights = (weights / weights.sum()).tolist()
        # one image at a time: the same arithmetic whatever the batch, so samples blurred in a DataLoader worker and
        # batches blurred on the device agree exactly
        rows = _correlate(F.pad(image.unsqueeze(0), (radius, radius, 0, 0), mode="replicate"), weights, dim=-1)
        image.copy_(_correlate(F.pad(rows, (0, 0, radius, radius), mode="replicate"), weights, dim=-2)[0])
    return pixels


def _correlate(padded: torch.Tensor, weights: list[float], dim: int) -> torch.Tensor:
    """`Σ_k weights[k] · padded[k : k + n]` along `dim`, `n` being its size less `len(weights) - 1`: one multiply-add
    per tap over shifted views (several times faster on CPU than a depthwise `conv2d` with a 1-D kernel)."""
    length = padded.shape[dim] - len(weights) + 1
    out = padded.narrow(dim, 0, length) * weights[0]
    for tap, weight in enumerate(weights[1:], start=1):
        out.add_(padded.narrow(dim, tap, length), alpha=weight)
    return out


COLOR_JITTER_STEPS = ("brightness", "contrast", "saturation", "hue")
"""Step ids of a colour-jitter plan: row `(step id, factor)`, id -1 = nothing."""
PAD_PLACEMENTS = ("random", "centre")
"""Where a scaled image side shorter than the crop lands in it (`TrainAugmentationOptions.pad_placement`)."""
PAD_FILLS = ("mean", "black")
"""The colour of image padding (`TrainAugmentationOptions.pad_fill`)."""


def _empty_color_jitter_plan() -> torch.Tensor:
    """A `(4, 2)` plan that changes nothing: every row `(-1, 1.0)`."""
    return torch.tensor([[-1.0, 1.0]] * len(COLOR_JITTER_STEPS))


def shift_hue_(image: torch.Tensor, shift: float) -> torch.Tensor:
    """In place on float32 RGB pixels (0..255) `(3, H, W)`: rotate each pixel's HSV hue by `shift` turns (in [-0.5,
    0.5]), keeping its saturation and value, as torchvision's and the reference's ``adjust_hue``. Those go through
    PIL's 8-bit HSV, which alone moves pixels by up to 6 levels on a round trip; this is the exact conversion (as
    ``colorsys``), on average within one level of theirs."""
    value, largest = image.max(dim=0)
    chroma = value - image.amin(dim=0)
    red, green, blue = image.unbind(0)
    # hue in sixths of a turn: the sector of the largest channel (0, 2, 4) plus the difference of the other two
    # (ties give the same hue either way; grey pixels have chroma 0 and come back as they were)
    hue = torch.where(largest == 0, green - blue, torch.where(largest == 1, blue - red, red - green))
    hue.div_(chroma.clamp(min=1e-12)).add_(largest.to(image.dtype) * 2.0 + 6.0 * (shift + 1.0)).remainder_(6.0)
    # HSV -> RGB: channel n = v - c * clamp(min(k, 4 - k), 0, 1) with k = (n + hue) mod 6 for n = 5, 3, 1 (R, G, B)
    for channel, offset in zip(image, (5.0, 3.0, 1.0)):
        k = (hue + offset).remainder_(6.0)
        torch.minimum(k, 4.0 - k, out=k).clamp_(0.0, 1.0)
        torch.sub(value, k.mul_(chroma), out=channel)
    return image


def apply_color_jitter_(pixels: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
    """In place on float32 pixels (0..255), `(batch, 3, H, W)` or `(3, H, W)`: brightness, contrast, saturation and
    hue in the order and with the factors of `plan` (`(batch, 4, 2)` or `(4, 2)`, rows `(step id, factor)` of
    `COLOR_JITTER_STEPS`, as `SegmentationTrainTransform` draws them), clamped to 0..255.

    Brightness, contrast and saturation are affine in RGB (brightness scales; contrast blends with the mean grey level
    of the image so far; saturation blends with each pixel's grey level, ITU-R 601 luma as PIL's ``ImageEnhance``), so
    a run of them is one 3x4 colour matrix per image, composed in float64 and applied in one pass (about 2.5 ms for a
    1024x1024 image on one CPU core, against 5 ms for PIL's colour-matrix convert in the data workers). The hue shift
    (`shift_hue_`) is not affine: the run before it is applied and clamped first, as the reference's 8-bit steps are.
    """
    images = pixels if pixels.ndim == 4 else pixels.unsqueeze(0)
    plans = plan if plan.ndim == 3 else plan.unsqueeze(0)
    if plans.shape[0] != images.shape[0] or plans.shape[1:] != (len(COLOR_JITTER_STEPS), 2):
        raise ValueError(f"color_jitter must be (batch, {len(COLOR_JITTER_STEPS)}, 2) for pixels of shape "
                         f"{tuple(pixels.shape)}, got {tuple(plan.shape)}")
    for image, steps in zip(images, plans.tolist()):
        names = [COLOR_JITTER_STEPS[int(step)] if step >= 0 else None for step, _ in steps]
        if not any(names):
            continue
        matrix, offset = np.eye(3), np.zeros(3)  # the colour after the affine steps so far: matrix @ rgb + offset
        mean_rgb = None  # of the image when the run of affine steps started; read when a contrast step needs it
        for name, (_, factor) in zip(names, steps):
            if name is None:
                continue
            if name == "hue":
                _apply_color_matrix_(image, matrix, offset)
                shift_hue_(image, factor)
                matrix, offset, mean_rgb = np.eye(3), np.zeros(3), None
                continue
            if name == "brightness":
                step_matrix, step_offset = factor * np.eye(3), np.zeros(3)
            elif name == "contrast":
                if mean_rgb is None:
                    mean_rgb = image.mean(dim=(-2, -1), dtype=torch.float64).cpu().numpy()
                mean_grey = LUMA @ (matrix @ mean_rgb + offset)
                step_matrix, step_offset = factor * np.eye(3), np.full(3, (1 - factor) * mean_grey)
            else:
                step_matrix, step_offset = factor * np.eye(3) + (1 - factor) * np.outer(np.ones(3), LUMA), np.zeros(3)
            matrix, offset = step_matrix @ matrix, step_matrix @ offset + step_offset
        _apply_color_matrix_(image, matrix, offset)
    return pixels


def _apply_color_matrix_(image: torch.Tensor, matrix: np.ndarray, offset: np.ndarray) -> None:
    """In place on float32 `(3, H, W)`: every pixel -> clamp(matrix @ rgb + offset, 0, 255); the identity is skipped."""
    if np.array_equal(matrix, np.eye(3)) and not offset.any():
        return
    weights = torch.as_tensor(matrix, dtype=torch.float32, device=image.device)
    shift = torch.as_tensor(offset, dtype=torch.float32, device=image.device).view(3, 1, 1)
    # a (3, 3) @ (3, pixels) matmul: several times faster than einsum on CPU, and never TF32 on CUDA by default
    image.copy_((weights @ image.reshape(3, -1)).view_as(image).add_(shift).clamp_(0, 255))


def _to_tensor(image: Image.Image, flip: bool = False) -> torch.Tensor:
    """PIL RGB -> float32 (3, H, W) in 0..255, mirrored left-right with `flip` (numpy's transposing copy is the
    fastest route on CPU, and mirrors for free)."""
    pixels = np.asarray(image).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(pixels[..., ::-1] if flip else pixels, dtype=np.float32))


def _to_uint8_tensor(image: Image.Image, flip: bool = False) -> torch.Tensor:
    """PIL RGB -> uint8 (3, H, W), mirrored left-right with `flip`; PIL's band split is about 1.5x faster than numpy's
    transposing copy for 8 bits (and PIL mirrors 8-bit pixels faster than a reversed numpy copy)."""
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.stack([np.asarray(band) for band in image.split()]))


def _labels_tensor(label: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))


@dataclass
class TrainAugmentationOptions:
    """The reference training augmentation; defaults follow NVIDIA/semantic-segmentation (its ``color_aug 0.25`` is
    brightness, contrast, saturation and hue 0.25), with this difference: the colour steps and the optional blur
    (after them, as the reference's) run in float, with one clamp per run of affine steps, where the reference rounds
    to 8 bits after each (and truncates after the blur); image padding is the mean colour
    (0 after normalisation) by default, ``pad_fill="black"`` pads with black as the reference; padded labels are
    ignored either way. An image side smaller than the
    crop lands at a random offset in it by default (the reference's ``--translate_aug_fix``); ``pad_placement="centre"``
    centres it as the reference's recipes do.

    Args:
        crop_size: Output `(height, width)` (or one int for a square crop).
        scale_min: Smallest random scale factor.
        scale_max: Largest random scale factor.
        pre_size: Long side, in pixels, the random scale is relative to: the scale factor is multiplied by
            `pre_size / max(width, height)`, so images of any size reach the crop at comparable object sizes (the
            reference's ``--pre_size``, 2177 in its Mapillary Vistas recipe). `None`: relative to the image as it is.
        flip_probability: Probability of a horizontal flip.
        brightness: Brightness factor drawn from [max(0, 1 - brightness), 1 + brightness]; 0 disables.
        contrast: Contrast factor, same rule; blends with the mean grey level.
        saturation: Saturation factor, same rule; blends with the grey image.
        hue: Hue shift drawn from [-hue, hue] turns of the HSV hue circle (at most 0.5); 0 disables.
        blur_probability: Probability of a Gaussian blur after the colour jitter (`gaussian_blur_`; the reference's
            ``--gblur`` blurs every crop: 1.0).
        blur_sigma: Range of the blur's standard deviation, in pixels (the reference's: 0.15 to 1.3).
        noise_std: Standard deviation of additive Gaussian noise, in 0..255 units; 0 disables.
        noise_probability: Probability of adding that noise to a crop.
        image_mean: Normalisation mean (images scaled to [0, 1]); also the colour of image padding by default.
        image_std: Normalisation standard deviation.
        ignore_index: Label value of padding (and of ignored pixels).
        image_resample: ``"bicubic"`` (the reference) or ``"bilinear"`` (about 30% cheaper to scale a 1024x1024 crop)
            for images; labels always use nearest.
        pad_placement: Where a scaled image side shorter than the crop lands in it: ``"random"``, anywhere (the
            reference's ``--translate_aug_fix``); ``"centre"``, as the reference's recipes, which pad each side by
            ``(crop - side) // 2 + 1`` and then crop at random: centred, give or take a pixel.
        pad_fill: Colour of the image padding: ``"mean"``, the normalisation mean (0 once normalised, so padding
            adds nothing to the first convolution); ``"black"``, the reference's ``(0, 0, 0)``.
        output_dtype: ``"float32"``: normalised ``pixel_values`` float32 and ``labels`` int64, ready for the model.
            ``"uint8"``: the augmented crop as ``pixel_values`` uint8 and ``labels`` uint8 (and the ``color_jitter``
            plan), to be colour-jittered and normalised on the device with `normalize_pixel_values` (the training
            scripts' default: 4 MB instead of 20 MB per 1024x1024 sample to hand from DataLoader workers to the main
            process and to the GPU, and the jitter off the workers). Same values either way. uint8
            needs the ImageNet `image_mean`/`image_std` (what the device side normalises with) and an `ignore_index`
            in 0..255.
    """

    crop_size: int | tuple[int, int] = (1024, 1024)
    scale_min: float = 0.5
    scale_max: float = 2.0
    pre_size: int | None = None
    flip_probability: float = 0.5
    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.25
    hue: float = 0.25
    blur_probability: float = 0.0
    blur_sigma: tuple[float, float] = (0.15, 1.3)
    noise_std: float = 0.0
    noise_probability: float = 0.5
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    ignore_index: int = IGNORE_INDEX
    image_resample: Literal["bicubic", "bilinear"] = "bicubic"
    pad_placement: Literal["random", "centre"] = "random"
    pad_fill: Literal["mean", "black"] = "mean"
    output_dtype: Literal["float32", "uint8"] = "float32"

    def __post_init__(self) -> None:
        self.crop_size = _pair(self.crop_size, "crop_size")
        if self.image_resample not in RESAMPLING:
            raise ValueError(f"image_resample must be one of {sorted(RESAMPLING)}, got {self.image_resample!r}")
        if self.pad_placement not in PAD_PLACEMENTS:
            raise ValueError(f"pad_placement must be 'random' or 'centre', got {self.pad_placement!r}")
        if self.pad_fill not in PAD_FILLS:
            raise ValueError(f"pad_fill must be 'mean' or 'black', got {self.pad_fill!r}")
        if self.output_dtype not in ("float32", "uint8"):
            raise ValueError(f"output_dtype must be 'float32' or 'uint8', got {self.output_dtype!r}")
        if self.output_dtype == "uint8":
            if (tuple(self.image_mean), tuple(self.image_std)) != (IMAGENET_MEAN, IMAGENET_STD):
                raise ValueError(f"output_dtype='uint8' is normalised on the device with the ImageNet mean/std "
                                 f"{IMAGENET_MEAN}/{IMAGENET_STD}, got image_mean={self.image_mean}, image_std="
                                 f"{self.image_std}: use output_dtype='float32' for other values")
            if not 0 <= self.ignore_index <= 255:
                raise ValueError(f"output_dtype='uint8' stores labels in 8 bits: ignore_index must be in 0..255, got "
                                 f"{self.ignore_index}")
        if self.pre_size is not None and self.pre_size < 1:
            raise ValueError(f"pre_size must be a positive number of pixels (or None), got {self.pre_size}")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"need 0 < scale_min <= scale_max, got scale_min={self.scale_min}, "
                             f"scale_max={self.scale_max}")
        for name in ("flip_probability", "blur_probability", "noise_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5] (turns of the hue circle), got {self.hue}")


def _resample_region(
    image: Image.Image, origin: tuple[int, int], ratio: tuple[float, float], size: tuple[int, int], mode: str
) -> Image.Image:
    """`size` (width, height) output pixels whose pixel `(i, j)` is centred on source point `origin + ((i + 0.5) *
    ratio_x, (j + 0.5) * ratio_y)`: the part of the image scaled by `1 / ratio` starting at source pixel `origin`.

    torch's antialiased resize of uint8 pixels (channels-last, as it is fastest) on the source region plus a few pixels
    of filter support beyond its far side; the near side starts at `origin` (where the filter is clamped)."""
    (left, top), (ratio_x, ratio_y), (out_width, out_height) = origin, ratio, size
    width, height = image.size
    # the bicubic filter reaches 2 source pixels when enlarging, 2 * ratio when shrinking (antialiasing)
    right = min(width, left + math.ceil(out_width * ratio_x) + math.ceil(2 * max(ratio_x, 1.0)) + 1)
    bottom = min(height, top + math.ceil(out_height * ratio_y) + math.ceil(2 * max(ratio_y, 1.0)) + 1)
    pixels = np.asarray(image.crop((left, top, right, bottom)))  # read-only; copying would cost more than resizing
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        region = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
    # 1 + 1e-9: the output size is floor(region * scale) in float64, which must not round the last pixel away
    scaled = F.interpolate(region, scale_factor=((1 + 1e-9) / ratio_y, (1 + 1e-9) / ratio_x), mode=mode,
                           antialias=True, recompute_scale_factor=False)
    if scaled.shape[-2] < out_height or scaled.shape[-1] < out_width:
        raise RuntimeError(f"internal error: resampling gave {tuple(scaled.shape[-2:])}, expected at least "
                           f"{(out_height, out_width)}")
    # the output is planar: merging three planes is ~10x cheaper than an interleaving copy
    return Image.merge("RGB", [Image.fromarray(plane.numpy()) for plane in scaled[0, :, :out_height, :out_width]])


def _crop_origin(scaled: int, crop: int, center: int | None, rng: np.random.Generator, centred: bool = False) -> int:
    """Top/left of the crop in scaled-image pixels; negative when the image is smaller than the crop (padding), which
    places the image anywhere in the crop, or with `centred` where the reference's padding puts it."""
    low, high = min(0, scaled - crop), max(0, scaled - crop)
    if centred and scaled < crop:
        pad = (crop - scaled) // 2 + 1
        low, high = -pad, scaled + pad - crop
    if center is None:
        return int(rng.integers(low, high + 1))
    # As in the reference: any crop that contains the centroid, then pushed back inside the image.
    return int(np.clip(rng.integers(center - crop + 1, center + 1), low, high))


class SegmentationTrainTransform:
    """Random scale, crop (optionally around a class centroid), flip, colour jitter, blur, noise, normalise (or, with
    ``output_dtype="uint8"``, leave normalising to the device).

    Args:
        options: The augmentation settings.

    Example:
        ```python
        >>> transform = SegmentationTrainTransform(TrainAugmentationOptions(crop_size=512))
        >>> sample = transform(image, label, sample_generator(seed=0, epoch=0, index=7))
        >>> sample["pixel_values"].shape, sample["labels"].shape
        (torch.Size([3, 512, 512]), torch.Size([512, 512]))
        ```
    """

    def __init__(self, options: TrainAugmentationOptions | None = None):
        self.options = options or TrainAugmentationOptions()
        self.pad_color = ((0, 0, 0) if self.options.pad_fill == "black"
                          else tuple(int(round(255 * mean)) for mean in self.options.image_mean))

    def __call__(
        self,
        image: Image.Image,
        label: np.ndarray,
        rng: np.random.Generator,
        centroid: tuple[int, int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Augment one sample.

        Args:
            image: RGB image (as returned by `hms_segmentation.data.io.load_image`).
            label: `(height, width)` uint8 training ids, same size as the image.
            rng: The sample's generator (see `sample_generator`); the same generator state gives the same output.
            centroid: `(x, y)` in image pixels that the crop must contain (class-uniform sampling), or `None`.

        Returns:
            ``pixel_values``: float32 `(3, crop_height, crop_width)`, normalised; ``labels``: int64
            `(crop_height, crop_width)`. With ``output_dtype="uint8"``: ``pixel_values`` uint8 (not normalised) and
            ``labels`` uint8.
        """
        options = self.options
        if image.size != (label.shape[1], label.shape[0]):
            raise ValueError(f"image is {image.size[0]}x{image.size[1]} but label is {label.shape[1]}x{label.shape[0]}"
                             " (width x height): expected the same size")
        image, label = self._scale_and_crop(image, label, rng, centroid)
        # The mirroring is left to the conversion into a tensor, where it is cheapest: everything after it (jitter,
        # blur, noise) runs on the tensor.
        flip = rng.random() < options.flip_probability
        if flip:
            label = label[:, ::-1]
        blur_sigma = None  # None: the blur is off; 0: it is on, but not for this sample
        if options.blur_probability:
            drawn = rng.uniform(*options.blur_sigma) if rng.random() < options.blur_probability else 0.0
            blur_sigma = float(np.float32(drawn))  # what the sample's float32 `blur_sigma` holds, used by every path
        color_jitter = self._draw_color_jitter(rng)
        noise_seed = None
        if options.noise_std and rng.random() < options.noise_probability:
            noise_seed = int(rng.integers(2**62))
        if options.output_dtype == "uint8":
            pixels = _to_uint8_tensor(image, flip)
            sample = {"pixel_values": pixels, "labels": torch.from_numpy(np.array(label, dtype=np.uint8, order="C"))}
            if noise_seed is not None:  # the noise follows the jitter and the blur, so all happen here
                pixels = pixels.float()
                if color_jitter is not None:
                    apply_color_jitter_(pixels, color_jitter)
                    color_jitter = _empty_color_jitter_plan()  # done: nothing left for the device
                if blur_sigma is not None:
                    gaussian_blur_(pixels, blur_sigma)
                    blur_sigma = 0.0
                sample["pixel_values"] = self._add_noise_(pixels, noise_seed).to(torch.uint8)
            # jittered and blurred on the device, by `normalize_pixel_values`
            if color_jitter is not None:
                sample["color_jitter"] = color_jitter
            if blur_sigma is not None:
                sample["blur_sigma"] = torch.tensor(blur_sigma, dtype=torch.float32)
            return sample
        pixels = _to_tensor(image, flip)
        if color_jitter is not None:
            apply_color_jitter_(pixels, color_jitter)
        if blur_sigma is not None:
            gaussian_blur_(pixels, blur_sigma)
        if noise_seed is not None:
            self._add_noise_(pixels, noise_seed)
        return {"pixel_values": _normalize_(pixels, options.image_mean, options.image_std),
                "labels": _labels_tensor(label)}

    def _add_noise_(self, pixels: torch.Tensor, seed: int) -> torch.Tensor:
        """In place on float32 pixels: Gaussian noise, rounded to whole 8-bit levels (so that the uint8 output holds it
        exactly and both output dtypes give the same sample) and clamped to 0..255."""
        noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(seed))
        return pixels.add_(noise, alpha=self.options.noise_std).round_().clamp_(0, 255)

    def _scale_and_crop(self, image: Image.Image, label: np.ndarray, rng: np.random.Generator,
                        centroid: tuple[int, int] | None) -> tuple[Image.Image, np.ndarray]:
        crop_height, crop_width = self.options.crop_size
        scale = rng.uniform(self.options.scale_min, self.options.scale_max)
        width, height = image.size
        if self.options.pre_size is not None:
            scale *= self.options.pre_size / max(width, height)
        scaled_width, scaled_height = max(1, int(width * scale)), max(1, int(height * scale))
        center_x, center_y = (None, None) if centroid is None else (int(centroid[0] * scale), int(centroid[1] * scale))
        centred = self.options.pad_placement == "centre"
        left = _crop_origin(scaled_width, crop_width, center_x, rng, centred)
        top = _crop_origin(scaled_height, crop_height, center_y, rng, centred)
        # The part of the crop covered by the scaled image, in crop pixels; its source region starts on a whole pixel.
        x0, x1 = max(0, -left), min(crop_width, scaled_width - left)
        y0, y1 = max(0, -top), min(crop_height, scaled_height - top)
        size = (x1 - x0, y1 - y0)
        ratio_x, ratio_y = width / scaled_width, height / scaled_height
        source_left = min(width - 1, math.floor((left + x0) * ratio_x))
        source_top = min(height - 1, math.floor((top + y0) * ratio_y))
        image_part = _resample_region(image, (source_left, source_top), (ratio_x, ratio_y), size,
                                      self.options.image_resample)
        box = (source_left, source_top, min(width, source_left + size[0] * ratio_x),
               min(height, source_top + size[1] * ratio_y))
        label_part = np.asarray(Image.fromarray(label).resize(size, Image.Resampling.NEAREST, box=box))
        if size == (crop_width, crop_height):
            return image_part, label_part
        padded_image = Image.new("RGB", (crop_width, crop_height), self.pad_color)
        padded_image.paste(image_part, (x0, y0))
        padded_label = np.full((crop_height, crop_width), self.options.ignore_index, np.uint8)
        padded_label[y0:y1, x0:x1] = label_part
        return padded_image, padded_label

    def _draw_color_jitter(self, rng: np.random.Generator) -> torch.Tensor | None:
        """The colour-jitter plan of one sample (see `apply_color_jitter_`): brightness, contrast and saturation
        factors and a hue shift, in a random order (as torchvision / the reference); `None` when all four are off."""
        options = self.options
        strengths = (options.brightness, options.contrast, options.saturation, options.hue)
        steps = [(index, strength) for index, strength in enumerate(strengths) if strength > 0]
        if not steps:
            return None
        factors = [rng.uniform(-strength, strength) if COLOR_JITTER_STEPS[index] == "hue" else
                   rng.uniform(max(0.0, 1 - strength), 1 + strength) for index, strength in steps]
        plan = _empty_color_jitter_plan()
        for row, position in enumerate(rng.permutation(len(steps))):
            plan[row] = torch.tensor([float(steps[position][0]), factors[position]])
        return plan


@dataclass
class EvalPreprocessingOptions:
    """Evaluation preprocessing: resize (optional) and normalise, nothing random.

    Args:
        size: Resize to this `(height, width)` (bilinear for images, nearest for labels); `None` keeps the size.
        long_side: Instead of `size`: resize so that the longer side has this many pixels, aspect ratio kept (sides
            truncated to whole pixels), up or down, as the reference evaluates Mapillary Vistas (2177).
        resize_labels: Also resize labels to the new size; else labels keep the original resolution for evaluation.
        image_mean: Normalisation mean (images scaled to [0, 1]).
        image_std: Normalisation standard deviation.
    """

    size: int | tuple[int, int] | None = None
    long_side: int | None = None
    resize_labels: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.size is not None:
            self.size = _pair(self.size, "size")
        if self.long_side is not None:
            if self.size is not None:
                raise ValueError(f"give size or long_side, not both (got size={self.size}, long_side={self.long_side})")
            if self.long_side < 1:
                raise ValueError(f"long_side must be a positive number of pixels (or None), got {self.long_side}")


class SegmentationEvalTransform:
    """Resize (optional) and normalise one image and its label, for evaluation and inference."""

    def __init__(self, options: EvalPreprocessingOptions | None = None):
        self.options = options or EvalPreprocessingOptions()

    def __call__(self, image: Image.Image, label: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Returns ``pixel_values`` float32 `(3, H, W)` and, with a label, ``labels`` int64 `(H, W)`."""
        options = self.options
        size = options.size
        if options.long_side is not None and max(image.size) != options.long_side:
            ratio = options.long_side / max(image.size)
            size = (max(1, int(image.height * ratio)), max(1, int(image.width * ratio)))
        if size is not None:
            height, width = size
            image = image.resize((width, height), Image.Resampling.BILINEAR)
            if label is not None and options.resize_labels:
                label = np.asarray(Image.fromarray(label).resize((width, height), Image.Resampling.NEAREST))
        output = {"pixel_values": _normalize_(_to_tensor(image), options.image_mean, options.image_std)}
        if label is not None:
            output["labels"] = _labels_tensor(label)
        return output

    def apply_to_batch(self, batch: dict[str, list]) -> dict[str, list[torch.Tensor]]:
        """For ``dataset.with_transform(transform.apply_to_batch)`` on rows with ``image`` (and ``label``).

        Values may be decoded PIL images or undecoded ``{"path", "bytes"}`` dicts, read with `load_image` /
        `load_label` (and their checks).
        """
        images = [value if isinstance(value, Image.Image) else load_image(value) for value in batch["image"]]
        labels = batch.get("label") or [None] * len(images)
        outputs = [self(image.convert("RGB"), None if label is None else
                        (np.asarray(label, dtype=np.uint8) if isinstance(label, Image.Image) else load_label(label)))
                   for image, label in zip(images, labels)]
        return {key: [output[key] for output in outputs] for key in outputs[0]}
