"""Reading images and label maps: the one place where files become pixels.

Dataset builders, training transforms, evaluation, auto-labelling and demos all read through `load_image` and
`load_label`, so every entry point converts image modes, applies EXIF orientation, refuses decompression bombs and
names the file in its errors in the same way.

A *source* is a path, the raw bytes of an encoded file, a `datasets.Image(decode=False)` value
(``{"path": ..., "bytes": ...}``) or an already opened `PIL.Image.Image`.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from ..image_processing_hms import convert_pil_to_rgb
from ..label_tables import IGNORE_INDEX, MAX_IMAGE_PIXELS

ImageSource = Union[str, os.PathLike, bytes, dict, Image.Image]

DEFAULT_MAX_PIXELS = MAX_IMAGE_PIXELS

LABEL_MODES = ("L", "P")
"""Label maps hold one id per pixel: 8-bit grayscale (Cityscapes) or 8-bit palette (Mapillary) PNGs."""

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")

# EXIF orientations 5..8 swap width and height when applied.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION_TAG = 0x0112


class BadSampleError(ValueError):
    """A file (or image/label pair) that cannot be used; the message names the file(s), what was expected and found.

    Args:
        message: The human-readable explanation.
        paths: The files involved, so that a skipping loader can list them in its report.
    """

    def __init__(self, message: str, paths: tuple[str, ...] = ()):
        super().__init__(message)
        self.paths = paths


def describe_source(source: ImageSource) -> str:
    """A name for a source in messages: its path, or a short description of in-memory data."""
    if isinstance(source, dict):
        if source.get("path"):
            return str(source["path"])
        return f"<{len(source.get('bytes') or b'')} bytes in memory>"
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes in memory>"
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or f"<in-memory {source.mode} image {source.size[0]}x{source.size[1]}>"
    return os.fspath(source)


def _open(source: ImageSource, max_pixels: int) -> Image.Image:
    """Open a source lazily (header only), refusing unreadable files and oversized headers before any decoding."""
    if isinstance(source, Image.Image):
        image = source
    else:
        name = describe_source(source)
        if isinstance(source, dict):
            source = source["bytes"] if source.get("bytes") is not None else source.get("path")
            if source is None:
                raise BadSampleError(f"{name}: expected an image with a 'path' or 'bytes', found neither", (name,))
        if isinstance(source, (bytes, bytearray)):
            file: Any = io.BytesIO(source)
        else:
            file = Path(source)
            if not file.is_file():
                raise BadSampleError(f"{name}: file not found", (name,))
            if file.stat().st_size == 0:
                raise BadSampleError(f"{name}: expected an image file, found an empty file (0 bytes)", (name,))
        try:
            # Our own pixel limit below replaces Pillow's warning; its hard limit still raises on its own.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(file)
        except Image.DecompressionBombError as error:
            raise BadSampleError(f"{name}: refused to decode a possible decompression bomb ({error})",
                                 (name,)) from None
        except UnidentifiedImageError:
            raise BadSampleError(f"{name}: expected an image file (PNG, JPEG, ...), found data that no image "
                                 "decoder recognises", (name,)) from None
        except OSError as error:
            raise BadSampleError(f"{name}: the file is truncated or corrupt ({error})", (name,)) from None
    width, height = image.size
    if width * height > max_pixels:
        name = describe_source(source)
        raise BadSampleError(
            f"{name}: refused to decode a {width}x{height} image ({width * height:,} pixels), more than "
            f"max_pixels={max_pixels:,}; this is usually a decompression bomb (raise max_pixels if the file is "
            "genuine)",
            (name,),
        )
    return image


def _decode(image: Image.Image, name: str) -> Image.Image:
    """Decode the pixels now, so that a truncated file fails here, naming itself, rather than deep in a transform."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise BadSampleError(f"{name}: the file is truncated or corrupt ({error})", (name,)) from None
    return image


def _read(source: ImageSource, max_pixels: int,
          check_mode: Callable[[Image.Image, str], None]) -> tuple[Image.Image, str]:
    """Open (refusing bombs and unreadable files), check the mode, decode, orient; also return the name."""
    name = describe_source(source)
    image = _open(source, max_pixels)
    check_mode(image, name)
    return _apply_orientation(_decode(image, name)), name


def _apply_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip a decoded image as its EXIF orientation says (`exif_transpose` copies even when nothing changes)."""
    if image.getexif().get(_EXIF_ORIENTATION_TAG, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def shown_size(image: Image.Image) -> tuple[int, int]:
    """Width and height of an opened image once its EXIF orientation is applied (read from the header only)."""
    width, height = image.size
    # A PNG's EXIF chunk may follow the pixel data: asking for it would decode the whole image. Header only here;
    # `load_image` still applies a late chunk, and a label of the other size is then reported as a size mismatch.
    if image.format == "PNG" and "exif" not in image.info:
        return width, height
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG)
    except (OSError, SyntaxError, ValueError):
        return width, height  # unreadable EXIF: shown as stored, like ImageOps.exif_transpose does
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read without decoding its pixels.

    Args:
        width: Shown width (after EXIF orientation).
        height: Shown height (after EXIF orientation).
        mode: The PIL mode as stored (``"RGB"``, ``"L"``, ``"P"``, ``"I;16"``, ``"CMYK"``, ...).
        format: The file format (``"PNG"``, ``"JPEG"``, ...), or ``None`` for an in-memory image.
    """

    width: int
    height: int
    mode: str
    format: str | None

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def read_image_header(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Check that a source is a readable image of a supported mode and size, without decoding its pixels."""
    image = _open(source, max_pixels)
    _check_image_mode(image, describe_source(source))
    return ImageHeader(*shown_size(image), image.mode, image.format)


def _check_image_mode(image: Image.Image, name: str) -> None:
    if image.mode in ("I", "F"):
        raise BadSampleError(
            f"{name}: expected an 8- or 16-bit image, found mode {image.mode} (32-bit "
            f"{'integer' if image.mode == 'I' else 'float'} pixels, whose range is unknown); convert it to 8-bit RGB "
            "first",
            (name,),
        )


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image as 8-bit RGB, as it is *shown*.

    EXIF orientation is applied; grayscale, palette, RGBA, CMYK and other modes are converted to RGB by the image
    processor's `convert_pil_to_rgb` (so inference sees what training saw): 16-bit grayscale is scaled to 8 bits,
    alpha and colour keys are dropped. Errors (missing, empty, truncated or non-image files, decompression bombs,
    32-bit modes) raise `BadSampleError` naming the file.

    Args:
        source: A path, encoded bytes, a `datasets.Image(decode=False)` dict or a PIL image.
        max_pixels: Refuse images whose header claims more pixels than this, before decoding them.

    Returns:
        A decoded `PIL.Image.Image` in mode ``"RGB"``.
    """
    image, name = _read(source, max_pixels, _check_image_mode)
    return convert_pil_to_rgb(image, name)


@dataclass(frozen=True, eq=False)
class LabelMapping:
    """How the values stored in label files become training ids (0..num_labels-1, or `IGNORE_INDEX`).

    Args:
        name: What the stored values are, for messages (e.g. ``"Cityscapes labelIds"``).
        train_ids: For each stored value 0..255, its training id, or -1 where the value is not a known id.
    """

    name: str
    train_ids: np.ndarray = field(repr=False)

    @classmethod
    def from_dict(cls, name: str, mapping: dict[int, int]) -> LabelMapping:
        """Build a mapping from ``{stored value: training id}``; values absent from the dict are unknown."""
        train_ids = np.full(256, -1, dtype=np.int16)
        for stored, train_id in mapping.items():
            if 0 <= stored < 256:
                train_ids[stored] = train_id
        return cls(name, train_ids)

    @classmethod
    def identity(cls, num_labels: int, name: str = "train ids") -> LabelMapping:
        """Labels that already hold training ids: 0..num_labels-1 and `IGNORE_INDEX` are kept, all else is unknown."""
        return cls.from_dict(f"{name} (0..{num_labels - 1} and {IGNORE_INDEX})",
                             {**{index: index for index in range(num_labels)}, IGNORE_INDEX: IGNORE_INDEX})

    @property
    def is_identity(self) -> bool:
        known = self.train_ids >= 0
        return bool(np.all(self.train_ids[known] == np.flatnonzero(known)))

    def apply(self, stored: np.ndarray, name: str, counts: np.ndarray | None = None) -> np.ndarray:
        """Map a `(height, width)` uint8 array of stored values to training ids, refusing unknown values.

        Args:
            stored: The values as read from the file.
            name: The file, for messages.
            counts: Pixels per value 0..255 if already known (PIL's `histogram()` is several times faster).
        """
        counts = np.bincount(stored.ravel(), minlength=256) if counts is None else counts
        unknown = np.flatnonzero((counts > 0) & (self.train_ids < 0))
        if unknown.size:
            known = np.flatnonzero(self.train_ids >= 0)
            raise BadSampleError(
                f"{name}: expected {self.name} (known values {_ranges(known)}), found unknown "
                f"value(s) {unknown.tolist()} in {int(counts[unknown].sum())} pixel(s)",
                (name,),
            )
        if self.is_identity:
            return stored
        return self.train_ids.astype(np.uint8)[stored]


def _ranges(values: np.ndarray) -> str:
    """``[0, 1, 2, 5, 255]`` -> ``"0-2, 5, 255"``: short enough for an error message."""
    parts, start = [], None
    for index, value in enumerate(values.tolist()):
        if start is None:
            start = value
        if index + 1 == len(values) or values[index + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ", ".join(parts)


def load_label(
    source: ImageSource, mapping: LabelMapping | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Read a label map: one id per pixel, as a `(height, width)` uint8 array.

    The file must have a single channel (mode L or P; 16-bit grayscale is accepted when every value fits in 8 bits).
    A colour-coded (RGB) label map is refused rather than guessed at.

    Args:
        source: A path, encoded bytes, a `datasets.Image(decode=False)` dict or a PIL image.
        mapping: Turns stored values into training ids and refuses unknown values; `None` returns stored values.
        max_pixels: Refuse files whose header claims more pixels than this.
    """
    image, name = _read(source, max_pixels, _check_label_mode)
    if image.mode in SIXTEEN_BIT_MODES:
        stored = np.asarray(image, dtype=np.uint16)
        if stored.max(initial=0) > 255:
            raise BadSampleError(f"{name}: expected an 8-bit label map, found 16-bit values up to "
                                 f"{int(stored.max())} (an instanceIds file?)", (name,))
        stored = stored.astype(np.uint8)
        return mapping.apply(stored, name) if mapping is not None else stored
    stored = np.asarray(image, dtype=np.uint8)
    return mapping.apply(stored, name, np.asarray(image.histogram())) if mapping is not None else stored


def _check_label_mode(image: Image.Image, name: str) -> None:
    if image.mode not in LABEL_MODES + SIXTEEN_BIT_MODES:
        raise BadSampleError(
            f"{name}: expected a single-channel label map (mode L or P, one id per pixel), found mode {image.mode} "
            f"with {len(image.getbands())} channel(s); a colour-coded label must be converted to ids first",
            (name,),
        )


def read_label_header(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Check, without decoding, that a label file is a readable single-channel image; its values are checked by
    `load_label` when it is decoded."""
    image = _open(source, max_pixels)
    _check_label_mode(image, describe_source(source))
    return ImageHeader(*shown_size(image), image.mode, image.format)


def check_same_size(
    image_size: tuple[int, int], label_size: tuple[int, int], image_name: str, label_name: str
) -> None:
    """Raise `BadSampleError` naming both files unless the image and label have the same `(width, height)`."""
    if tuple(image_size) != tuple(label_size):
        raise BadSampleError(
            f"image {image_name} is {image_size[0]}x{image_size[1]} (width x height) but its label {label_name} is "
            f"{label_size[0]}x{label_size[1]}: expected the same size",
            (image_name, label_name),
        )


def load_sample(
    image_source: ImageSource,
    label_source: ImageSource,
    mapping: LabelMapping | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[Image.Image, np.ndarray]:
    """Read an image (RGB) and its label map (training ids), checking that their sizes match."""
    image = load_image(image_source, max_pixels=max_pixels)
    label = load_label(label_source, mapping, max_pixels=max_pixels)
    check_same_size(image.size, (label.shape[1], label.shape[0]), describe_source(image_source),
                    describe_source(label_source))
    return image, label


def encode_label_png(label: np.ndarray) -> bytes:
    """Encode a uint8 label map as a single-channel PNG (fast compression: labels compress well anyway)."""
    buffer = io.BytesIO()
    Image.fromarray(label).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


TEMPORARY_SUFFIX = ".partial"
"""Suffix of the hidden name a file is written under before it is renamed into place (`write_png_atomically`)."""


def temporary_name(path: Path) -> Path:
    """The hidden name a file is written under before `write_*_atomically` renames it (no reader's pattern matches
    it)."""
    return path.with_name(f".{path.name}{TEMPORARY_SUFFIX}")


def write_text_atomically(path: Path, text: str) -> None:
    """Write `text` under a hidden temporary name in the same folder, then rename it: a reader (or a re-run) sees the
    whole file or none, never half a JSON."""
    temporary = temporary_name(path)
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_png_atomically(path: Path, image: Image.Image, text: dict[str, str] | None = None) -> int:
    """Write a PNG (with `text` chunks) under a hidden temporary name in the same folder, then rename it: a reader (or
    a re-run) sees the whole file or none. Returns the bytes written. Same pixels and text give the same bytes (no
    timestamps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    try:
        image.save(temporary, format="PNG", pnginfo=info, optimize=False, compress_level=6)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path.stat().st_size
