"""Training augmentations of the reference recipe and the evaluation preprocessing, with PIL, numpy and torch only.

Training (NVIDIA/semantic-segmentation recipe): random scale in [0.5, 2.0], random crop to `crop_size` with padding
(image padded with the mean colour, label with the ignore index), horizontal flip, colour jitter (brightness,
contrast, saturation, in random order), optional Gaussian blur and additive Gaussian noise, then normalisation with the
ImageNet mean/std. Labels are only ever resized with nearest-neighbour sampling, so they never gain a class that was
not in the file.

Scaling and cropping are done in one step: only the part of the image that ends up in the crop is resampled
(`PIL.Image.resize(..., box=...)`), which is much cheaper than resizing a 2048x1024 frame to 4096x2048 and cropping.

Outputs use the names the model's forward takes: ``pixel_values`` float32 `(3, height, width)` and ``labels`` int64
`(height, width)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageStat

from ..label_tables import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from .io import load_image, load_label


LUMA = np.array([0.299, 0.587, 0.114])
"""ITU-R 601 luma weights, as PIL's ``convert("L")``: the grey level used by contrast and saturation."""


RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def sample_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random generator of one training sample: a pure function of (seed, epoch, index), whatever the workers."""
    return np.random.default_rng([seed, epoch, index])


def _pair(size: int | tuple[int, int], name: str) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height < 1 or width < 1:
        raise ValueError(f"{name} must be positive (height, width), got {size}")
    return int(height), int(width)


def _normalize(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(3, H, W) values in 0..255 -> (value / 255 - mean) / std, in one multiply-add per channel."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], dtype=torch.float32).view(3, 1, 1)
    return pixels.mul_(scale).sub_(shift)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float32 (3, H, W) in 0..255 (numpy's transposing copy is the fastest route on CPU)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1), dtype=np.float32))


def _labels_tensor(label: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))


@dataclass
class TrainAugmentationOptions:
    """The reference training augmentation; defaults follow NVIDIA/semantic-segmentation.

    Args:
        crop_size: Output `(height, width)` (or one int for a square crop).
        scale_min: Smallest random scale factor.
        scale_max: Largest random scale factor.
        flip_probability: Probability of a horizontal flip.
        brightness: Brightness factor drawn from [max(0, 1 - brightness), 1 + brightness]; 0 disables.
        contrast: Contrast factor, same rule; blends with the mean grey level.
        saturation: Saturation factor, same rule; blends with the grey image.
        blur_probability: Probability of a Gaussian blur (the reference's ``--gblur`` blurs every crop: 1.0).
        blur_sigma: Range of the blur's standard deviation, in pixels.
        noise_std: Standard deviation of additive Gaussian noise, in 0..255 units; 0 disables.
        noise_probability: Probability of adding that noise to a crop.
        image_mean: Normalisation mean (images scaled to [0, 1]); also the colour of image padding.
        image_std: Normalisation standard deviation.
        ignore_index: Label value of padding (and of ignored pixels).
        image_resample: ``"bicubic"`` (the reference) or ``"bilinear"`` (about 40% cheaper to scale a 1024x1024 crop)
            for images; labels always use nearest.
    """

    crop_size: int | tuple[int, int] = (1024, 1024)
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip_probability: float = 0.5
    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.25
    blur_probability: float = 0.0
    blur_sigma: tuple[float, float] = (0.15, 1.3)
    noise_std: float = 0.0
    noise_probability: float = 0.5
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    ignore_index: int = IGNORE_INDEX
    image_resample: Literal["bicubic", "bilinear"] = "bicubic"

    def __post_init__(self) -> None:
        self.crop_size = _pair(self.crop_size, "crop_size")
        if self.image_resample not in RESAMPLING:
            raise ValueError(f"image_resample must be one of {sorted(RESAMPLING)}, got {self.image_resample!r}")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"need 0 < scale_min <= scale_max, got scale_min={self.scale_min}, "
                             f"scale_max={self.scale_max}")
        for name in ("flip_probability", "blur_probability", "noise_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def _crop_origin(scaled: int, crop: int, center: int | None, rng: np.random.Generator) -> int:
    """Top/left of the crop in scaled-image pixels; negative when the image is smaller than the crop (padding)."""
    low, high = min(0, scaled - crop), max(0, scaled - crop)
    if center is None:
        return int(rng.integers(low, high + 1))
    # As in the reference: any crop that contains the centroid, then pushed back inside the image.
    return int(np.clip(rng.integers(center - crop + 1, center + 1), low, high))


class SegmentationTrainTransform:
    """Random scale, crop (optionally around a class centroid), flip, colour jitter, blur, noise, normalise.

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
        self.pad_color = tuple(int(round(255 * mean)) for mean in self.options.image_mean)

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
            ``pixel_values``: float32 `(3, crop_height, crop_width)`; ``labels``: int64 `(crop_height, crop_width)`.
        """
        options = self.options
        if image.size != (label.shape[1], label.shape[0]):
            raise ValueError(f"image is {image.size[0]}x{image.size[1]} but label is {label.shape[1]}x{label.shape[0]}"
                             " (width x height): expected the same size")
        image, label = self._scale_and_crop(image, label, rng, centroid)
        if rng.random() < options.flip_probability:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            label = label[:, ::-1]
        if options.blur_probability and rng.random() < options.blur_probability:
            image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*options.blur_sigma)))
        pixels = _to_tensor(self._color_jitter(image, rng))
        if options.noise_std and rng.random() < options.noise_probability:
            noise_generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
            pixels.add_(torch.randn(pixels.shape, generator=noise_generator), alpha=options.noise_std).clamp_(0, 255)
        return {"pixel_values": _normalize(pixels, options.image_mean, options.image_std),
                "labels": _labels_tensor(label)}

    def _scale_and_crop(self, image: Image.Image, label: np.ndarray, rng: np.random.Generator,
                        centroid: tuple[int, int] | None) -> tuple[Image.Image, np.ndarray]:
        crop_height, crop_width = self.options.crop_size
        scale = rng.uniform(self.options.scale_min, self.options.scale_max)
        width, height = image.size
        scaled_width, scaled_height = max(1, int(width * scale)), max(1, int(height * scale))
        center_x, center_y = (None, None) if centroid is None else (int(centroid[0] * scale), int(centroid[1] * scale))
        left = _crop_origin(scaled_width, crop_width, center_x, rng)
        top = _crop_origin(scaled_height, crop_height, center_y, rng)
        # The part of the crop covered by the scaled image, in crop pixels, and the source box it comes from.
        x0, x1 = max(0, -left), min(crop_width, scaled_width - left)
        y0, y1 = max(0, -top), min(crop_height, scaled_height - top)
        box = ((left + x0) * width / scaled_width, (top + y0) * height / scaled_height,
               (left + x1) * width / scaled_width, (top + y1) * height / scaled_height)
        size = (x1 - x0, y1 - y0)
        image_part = image.resize(size, RESAMPLING[self.options.image_resample], box=box)
        label_part = np.asarray(Image.fromarray(label).resize(size, Image.Resampling.NEAREST, box=box))
        if size == (crop_width, crop_height):
            return image_part, label_part
        padded_image = Image.new("RGB", (crop_width, crop_height), self.pad_color)
        padded_image.paste(image_part, (x0, y0))
        padded_label = np.full((crop_height, crop_width), self.options.ignore_index, np.uint8)
        padded_label[y0:y1, x0:x1] = label_part
        return padded_image, padded_label

    def _color_jitter(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Brightness, contrast and saturation in a random order (as torchvision / the reference).

        The three are affine in RGB, so their composition is one 3x4 colour matrix that PIL applies in a single uint8
        pass (clamped once at the end, where PIL's ImageEnhance clamps after each step).
        """
        options = self.options
        steps = [(name, strength) for name, strength in (("brightness", options.brightness),
                 ("contrast", options.contrast), ("saturation", options.saturation)) if strength > 0]
        if not steps:
            return image
        factors = [rng.uniform(max(0.0, 1 - strength), 1 + strength) for _, strength in steps]
        matrix, offset = np.eye(3), np.zeros(3)  # the colour after the steps so far: matrix @ rgb + offset
        mean_rgb = np.asarray(ImageStat.Stat(image).mean) if options.contrast > 0 else None
        for position in rng.permutation(len(steps)):
            name, factor = steps[position][0], factors[position]
            if name == "brightness":
                step_matrix, step_offset = factor * np.eye(3), np.zeros(3)
            elif name == "contrast":  # blend with the mean grey level of the current image
                mean_grey = LUMA @ (matrix @ mean_rgb + offset)
                step_matrix, step_offset = factor * np.eye(3), np.full(3, (1 - factor) * mean_grey)
            else:  # saturation: blend with the grey image
                step_matrix, step_offset = factor * np.eye(3) + (1 - factor) * np.outer(np.ones(3), LUMA), np.zeros(3)
            matrix, offset = step_matrix @ matrix, step_matrix @ offset + step_offset
        return image.convert("RGB", tuple(np.concatenate([matrix, offset[:, None]], axis=1).ravel().tolist()))


@dataclass
class EvalPreprocessingOptions:
    """Evaluation preprocessing: resize (optional) and normalise, nothing random.

    Args:
        size: Resize to this `(height, width)` (bilinear for images, nearest for labels); `None` keeps the size.
        resize_labels: Also resize labels to `size`; else labels keep the original resolution for evaluation.
        image_mean: Normalisation mean (images scaled to [0, 1]).
        image_std: Normalisation standard deviation.
    """

    size: int | tuple[int, int] | None = None
    resize_labels: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.size is not None:
            self.size = _pair(self.size, "size")


class SegmentationEvalTransform:
    """Resize (optional) and normalise one image and its label, for evaluation and inference."""

    def __init__(self, options: EvalPreprocessingOptions | None = None):
        self.options = options or EvalPreprocessingOptions()

    def __call__(self, image: Image.Image, label: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Returns ``pixel_values`` float32 `(3, H, W)` and, with a label, ``labels`` int64 `(H, W)`."""
        options = self.options
        if options.size is not None:
            height, width = options.size
            image = image.resize((width, height), Image.Resampling.BILINEAR)
            if label is not None and options.resize_labels:
                label = np.asarray(Image.fromarray(label).resize((width, height), Image.Resampling.NEAREST))
        output = {"pixel_values": _normalize(_to_tensor(image), options.image_mean, options.image_std)}
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
