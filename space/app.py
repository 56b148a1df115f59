"""Hugging Face Space: what hierarchical multi-scale attention does on a street photo.

    python space/app.py                                # http://127.0.0.1:7860
    HMS_SPACE_MODEL=hms_quickstart/model python space/app.py

Upload a photo (or pick an example), choose the inference scales and flip, and see the segmentation over the photo,
the class legend, each scale's share of the result (the attention chain of the paper, per pixel), the pixel share of
each class and the inference time. The same call is an API endpoint, `/segment`, that returns the label map and the
attention maps as PNG files (see `space/README.md`).

Settings come from environment variables, read once in `SpaceSettings.from_environment`:

- `HMS_SPACE_MODEL`: Hub id, `save_pretrained` folder or preset name (random weights) of the model
  (default `hms-segmentation/hms-hrnet-w48-cityscapes`, or the model that `space/build_space.py --model` recorded in
  `default_model.txt` next to this file). When it cannot be loaded (offline, not found, not an HMS model with all
  its weights), the app falls back to a quickstart checkpoint (`hms_quickstart/model`, from `hms-segmentation
  quickstart`) and says why, and without one it says so on the page instead of failing.
- `HMS_SPACE_FALLBACK_MODELS`: colon-separated folders tried after it (default: `hms_quickstart/model` in the
  working directory, then next to `space/`).
- `HMS_SPACE_MAX_SIDE` (768): longer uploads are downscaled to this long side before inference.
- `HMS_SPACE_MAX_FILE_MB` (10) and `HMS_SPACE_MAX_PIXELS` (40,000,000): larger files/images are refused.
- `HMS_SPACE_SCALES` ("0.5,1.0,2.0"): the scales ticked when the page opens.
- `HMS_SPACE_CONCURRENCY` (1) and `HMS_SPACE_QUEUE_SIZE` (16): requests run at once / may wait in the queue.
- `HMS_SPACE_EXAMPLES_DIR`: extra example photos (default: the project's shared street photos, when present).
- `HMS_SPACE_HOST` / `HMS_SPACE_PORT` (127.0.0.1 locally, 0.0.0.0 on a Space / 7860).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from PIL import Image

from hms_segmentation import HMSForSemanticSegmentation, HMSImageProcessor, hierarchical_scale_weights
from hms_segmentation.modeling_hms import attentions_at_size, average_with_mirrored
from hms_segmentation.data.io import load_image
from hms_segmentation.data.synthesize import render_street_scene
from hms_segmentation.demo import colorize, load_model, palette_for
from hms_segmentation.image_processing_hms import get_output_size
from hms_segmentation.tiled_inference import tiling_settings

SPACE_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = "hms-segmentation/hms-hrnet-w48-cityscapes"
QUICKSTART_MODEL = Path("hms_quickstart") / "model"
SCALE_CHOICES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Anchors of a dark-to-bright colour ramp (black, purple, red, orange, pale yellow) for the attention maps: dark = the
# scale was not trusted there, bright = it decided the pixel.
ATTENTION_RAMP = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float32)
OUTPUT_FILES_KEPT_SECONDS = 3600
# Written by `space/build_space.py --model` into the Space folder it builds; the two names must agree.
DEFAULT_MODEL_FILE = "default_model.txt"


def bundled_default_model(space_dir: Path = SPACE_DIR) -> str:
    """The default model: the one recorded in `default_model.txt` next to the app, else `DEFAULT_MODEL`.

    The file names a folder beside it (a model copied into a built Space folder) or a Hub id / preset name. Folders
    resolve against the app's folder, so the bundle works whatever the working directory.
    """
    path = space_dir / DEFAULT_MODEL_FILE
    name = path.read_text(encoding="utf-8").strip() if path.is_file() else ""
    if not name:
        return DEFAULT_MODEL
    folder = space_dir / name
    return str(folder) if folder.is_dir() else name


@dataclass(frozen=True)
class SpaceSettings:
    """Everything the app reads from its environment, read in one place."""

    model: str = field(default_factory=bundled_default_model)
    fallback_models: tuple[Path, ...] = (QUICKSTART_MODEL, SPACE_DIR.parent / QUICKSTART_MODEL)
    max_side: int = 768
    max_file_bytes: int = 10 * 2**20
    max_image_pixels: int = 40_000_000
    default_scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    concurrency_limit: int = 1
    queue_size: int = 16
    examples_dirs: tuple[Path, ...] = (SPACE_DIR.parent.parent / "shared" / "data" / "street_photos",)
    output_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "hms_space_outputs")
    host: str = "127.0.0.1"
    port: int = 7860
    # tiled inference for scales above this many pixels (off by default: uploads are already downscaled)
    tile_pixel_budget: int | None = None
    tile_size: int | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> SpaceSettings:
        defaults = cls()

        def number(name: str, default: float, kind: type = int) -> Any:
            text = environ.get(name)
            if text is None or not text.strip():
                return default
            expected = f"{name} must be a positive {'integer' if kind is int else 'number'}, got {text!r}"
            try:
                value = kind(text)
            except ValueError:
                raise ValueError(expected) from None
            if value <= 0:
                raise ValueError(expected)
            return value

        scales = defaults.default_scales
        if environ.get("HMS_SPACE_SCALES"):
            text = environ["HMS_SPACE_SCALES"]
            try:
                scales = tuple(float(s) for s in text.split(",") if s.strip())
            except ValueError:
                scales = ()
            if not scales or set(scales) - set(SCALE_CHOICES):
                raise ValueError(f"HMS_SPACE_SCALES must be taken from {list(SCALE_CHOICES)}, got {text!r}")
        fallbacks = defaults.fallback_models
        if environ.get("HMS_SPACE_FALLBACK_MODELS"):
            fallbacks = tuple(Path(p) for p in environ["HMS_SPACE_FALLBACK_MODELS"].split(os.pathsep) if p)
        examples = defaults.examples_dirs
        if environ.get("HMS_SPACE_EXAMPLES_DIR"):
            examples = tuple(Path(p) for p in environ["HMS_SPACE_EXAMPLES_DIR"].split(os.pathsep) if p)
        return cls(
            model=environ.get("HMS_SPACE_MODEL") or defaults.model,
            fallback_models=fallbacks,
            max_side=number("HMS_SPACE_MAX_SIDE", defaults.max_side),
            max_file_bytes=int(number("HMS_SPACE_MAX_FILE_MB", defaults.max_file_bytes / 2**20, float) * 2**20),
            max_image_pixels=number("HMS_SPACE_MAX_PIXELS", defaults.max_image_pixels),
            default_scales=scales,
            concurrency_limit=number("HMS_SPACE_CONCURRENCY", defaults.concurrency_limit),
            queue_size=number("HMS_SPACE_QUEUE_SIZE", defaults.queue_size),
            examples_dirs=examples,
            # a Space (SPACE_ID set) must listen on all interfaces; locally only this machine may connect
            host=environ.get("HMS_SPACE_HOST") or ("0.0.0.0" if environ.get("SPACE_ID") else defaults.host),
            port=number("HMS_SPACE_PORT", defaults.port),
            tile_pixel_budget=number("HMS_SPACE_TILE_PIXEL_BUDGET", defaults.tile_pixel_budget),
            tile_size=number("HMS_SPACE_TILE_SIZE", defaults.tile_size),
        )


@dataclass
class LoadedModel:
    """The model the page uses (None when nothing could be loaded), where it came from, and what to tell the user."""

    model: HMSForSemanticSegmentation | None
    source: str
    notice: str = ""


def configure_tiling(model: HMSForSemanticSegmentation, settings: SpaceSettings) -> None:
    """Tiled inference as the environment asks (`HMS_SPACE_TILE_PIXEL_BUDGET`, `HMS_SPACE_TILE_SIZE`)."""
    if settings.tile_pixel_budget is None and settings.tile_size is None:
        return
    config = model.config
    tiling = tiling_settings(settings.tile_pixel_budget or config.tile_pixel_budget,
                             settings.tile_size or config.tile_size, config.tile_overlap)
    if tiling is not None:
        config.tile_pixel_budget, config.tile_size = tiling.pixel_budget, list(tiling.tile_size)


def load_space_model(settings: SpaceSettings) -> LoadedModel:
    """The configured model, else the first quickstart checkpoint found; never raises for a missing checkpoint."""
    failures = []
    candidates = [settings.model] + [str(path) for path in settings.fallback_models]
    for index, candidate in enumerate(dict.fromkeys(candidates)):
        is_fallback = index > 0
        if is_fallback and not Path(candidate).is_dir():
            failures.append(f"`{candidate}`: no such folder")
            continue
        try:
            model, trained = load_model(candidate)
            configure_tiling(model, settings)
        except (OSError, ValueError) as error:  # not there, offline, not an HMS model, weights missing
            reason = str(error).strip().splitlines()[0].removeprefix(f"--model {candidate}: ")
            failures.append(f"`{candidate}`: {reason}")
            continue
        notice = ""
        if not trained:
            notice = (f"**Preset `{candidate}` has random weights**: the colours below show the inference path, "
                      "not a real segmentation.")
        elif is_fallback:
            why = failures[0].removeprefix(f"`{settings.model}`: ")
            notice = (f"The model `{settings.model}` could not be loaded ({why}), so this page uses the quickstart "
                      f"checkpoint `{candidate}` (trained for minutes on synthetic streets: expect rough labels on "
                      "photos).")
        return LoadedModel(model, candidate, notice)
    reasons = "\n".join(f"- {failure}" for failure in failures)
    notice = (
        "**No trained checkpoint could be found, so this page cannot segment images.**\n\n"
        f"Tried:\n{reasons}\n\n"
        "Set `HMS_SPACE_MODEL` to a Hub id or a `save_pretrained` folder (the Hub needs a network connection), or "
        "train one in minutes with `hms-segmentation quickstart` (it writes `hms_quickstart/model`)."
    )
    return LoadedModel(None, "", notice)


# ---------------------------------------------------------------------------------------------------------------------
# Inference and pictures.
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Segmentation:
    """One request's results; the maps have the size of the image the model was given."""

    labels: np.ndarray  # (height, width) class ids
    attentions: list[np.ndarray]  # one (height, width) map in [0, 1] per scale, ascending as `scales`
    scales: list[float]
    seconds: float


def downscale(image: Image.Image, max_side: int) -> Image.Image:
    """`image` with its longer side at most `max_side`; smaller images are returned as they are. Shrunk as
    `HMSImageProcessor(max_long_side=max_side)` shrinks it (one bilinear resize to sides rounded to the size divisor),
    so the model sees the pixels a pipeline with that setting gives it, not those of a second resize."""
    if max(image.size) <= max_side:
        return image
    height, width = get_output_size(image.height, image.width, None, HMSImageProcessor.size_divisor, max_side)
    return image.resize((width, height), Image.Resampling.BILINEAR)


def segment(model: HMSForSemanticSegmentation, image: Image.Image, scales: Sequence[float], flip: bool) -> Segmentation:
    """Chained multi-scale inference on one RGB image, averaged with the mirrored image's logits when `flip`.

    The attention maps come from the unmirrored pass; each is resized to the image's size.
    """
    processor = HMSImageProcessor()
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    size = (image.height, image.width)
    start = time.perf_counter()
    with torch.inference_mode():
        outputs = model(pixel_values, scales=list(scales), output_attentions=True)
        logits = outputs.logits
        if flip:
            logits = average_with_mirrored(model, pixel_values, logits, scales=list(scales))
        labels = processor.post_process_semantic_segmentation({"logits": logits}, target_sizes=[size])[0]
        attentions = [attention[0].numpy() for attention in attentions_at_size(outputs.attentions, size)]
    seconds = time.perf_counter() - start
    return Segmentation(labels.numpy().astype(np.uint8), attentions, list(outputs.scales), seconds)


def attention_picture(weight: np.ndarray) -> Image.Image:
    """A [0, 1] map as a colour picture: dark where the scale was not trusted, bright where it decided."""
    positions = np.linspace(0, 1, len(ATTENTION_RAMP))
    channels = [np.interp(weight, positions, ATTENTION_RAMP[:, channel]) for channel in range(3)]
    return Image.fromarray(np.stack(channels, axis=-1).round().astype(np.uint8))


def blend(image: Image.Image, colours: Image.Image, opacity: float) -> Image.Image:
    return Image.blend(image.convert("RGB"), colours, float(np.clip(opacity, 0.0, 1.0)))


def pixel_shares(labels: np.ndarray, id2label: Mapping[int, str]) -> dict[str, float]:
    counts = np.bincount(labels.ravel(), minlength=len(id2label))
    return {id2label[i]: float(count / labels.size) for i, count in enumerate(counts) if count and i in id2label}


def legend_html(id2label: Mapping[int, str], palette: Sequence[tuple[int, int, int]]) -> str:
    chips = "".join(
        f'<span class="hms-chip"><span class="hms-swatch" style="background: rgb{tuple(palette[i])}"></span>'
        f"{html.escape(name)}</span>"
        for i, name in sorted(id2label.items())
    )
    return f'<div class="hms-legend">{chips}</div>'


def write_result_files(result: Segmentation, shown_size: tuple[int, int], stem: str, output_dir: Path) -> list[Path]:
    """The label map (class ids, 8-bit PNG) and each scale's raw attention map (0..255 PNG), at the upload's size.

    The upload may have been downscaled for inference: the maps are then resized back (nearest for labels), so
    that they line up with the user's file.
    """
    prune_old_outputs(output_dir)
    folder = output_dir / uuid.uuid4().hex
    folder.mkdir(parents=True)
    labels = Image.fromarray(result.labels)
    if labels.size != shown_size:
        labels = labels.resize(shown_size, Image.Resampling.NEAREST)
    paths = [folder / f"{stem}_labels.png"]
    labels.save(paths[0])
    for scale, attention in zip(result.scales, result.attentions):
        picture = Image.fromarray((attention * 255).round().astype(np.uint8))
        if picture.size != shown_size:
            picture = picture.resize(shown_size, Image.Resampling.BILINEAR)
        paths.append(folder / f"{stem}_attention_{scale}x.png")
        picture.save(paths[-1])
    return paths


def prune_old_outputs(output_dir: Path) -> None:
    """Delete result folders older than an hour (Gradio has copied them to its own cache by then)."""
    if not output_dir.is_dir():
        return
    cutoff = time.time() - OUTPUT_FILES_KEPT_SECONDS
    for folder in output_dir.iterdir():
        if folder.is_dir() and folder.stat().st_mtime < cutoff:
            shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# Uploads.
# ---------------------------------------------------------------------------------------------------------------------


def read_upload(upload: Any, settings: SpaceSettings) -> tuple[Image.Image, str]:
    """The uploaded file as upright 8-bit RGB and the name the user knows it by; refusals raise `gr.Error`.

    `upload` is Gradio's file payload (a dict with `path` and `orig_name`); the event skips Gradio's own image
    decoding so that broken, huge or odd files reach our reader, whose messages name the problem.
    """
    if isinstance(upload, Mapping):
        path, name = upload.get("path"), upload.get("orig_name")
    else:
        path, name = upload, None
    if not path:
        raise gr.Error("Upload an image or pick an example first.")
    path = str(path)
    name = name or Path(path).name
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    if size > settings.max_file_bytes:
        raise gr.Error(f"{name}: the file has {size / 2**20:.1f} MB, more than the {settings.max_file_bytes / 2**20:g} "
                       "MB this Space accepts; upload a smaller photo (a JPEG of a few MB is plenty)")
    try:
        image = load_image(path, max_pixels=settings.max_image_pixels)
    except ValueError as error:
        # the message names Gradio's temporary copy; the user knows the file by its own name
        raise gr.Error(str(error).replace(path, name)) from None
    return image, name


def file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem)[:64] or "image"


def checked_scales(scales: Sequence[Any] | None) -> list[float]:
    values = sorted({float(scale) for scale in scales or ()})
    if not values:
        raise gr.Error("Tick at least one inference scale.")
    unknown = [value for value in values if value not in SCALE_CHOICES]
    if unknown:
        raise gr.Error(f"scales must be taken from {list(SCALE_CHOICES)}, got {unknown}")
    return values


# ---------------------------------------------------------------------------------------------------------------------
# The page.
# ---------------------------------------------------------------------------------------------------------------------

CSS = """
.hms-legend { display: flex; flex-wrap: wrap; gap: 4px 12px; font-size: 0.85em; }
.hms-chip { display: inline-flex; align-items: center; gap: 5px; }
.hms-swatch { width: 14px; height: 14px; border-radius: 3px; border: 1px solid #0003; display: inline-block; }
"""

INTRO = """\
# Hierarchical Multi-Scale Attention
Semantic segmentation that runs the network at several image scales and *learns where to trust each one*: low
scales see the whole street (large regions, context), high scales see fine detail (poles, distant signs). An
attention head at each scale decides per pixel, and the predictions are chained from the lowest scale up
([Tao, Sapra & Catanzaro, 2020](https://arxiv.org/abs/2005.10821)). Upload a street photo, choose the scales, and see
which scale decided where.
"""

ATTENTION_NOTE = """\
Bright = this scale's prediction decided the pixel, dark = the other scales did. The maps add up to one at every
pixel: the lowest scale takes its attention `a₁`, the next `(1 − a₁)·a₂`, …, the highest what is left.
"""


def example_images(settings: SpaceSettings, count: int = 3) -> list[Path]:
    """Synthetic street scenes made at start-up, then photos from the examples folders when they exist."""
    folder = Path(tempfile.mkdtemp(prefix="hms_space_examples_"))
    examples = []
    for seed in range(count):
        image, _ = render_street_scene(384, 768, np.random.default_rng([2020, seed]))
        examples.append(folder / f"synthetic_street_{seed}.png")
        Image.fromarray(image).save(examples[-1])
    for directory in settings.examples_dirs:
        if directory.is_dir():
            examples += sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    return examples


def build_demo(settings: SpaceSettings, loaded: LoadedModel, examples: Sequence[Path] = ()) -> gr.Blocks:
    """The page and its `/segment` API endpoint, for `loaded.model` (or a notice when there is none)."""
    model = loaded.model
    id2label = {int(i): name for i, name in model.config.id2label.items()} if model is not None else {}
    palette = palette_for(len(id2label)) if model is not None else ()

    def run(upload: Any, scales: Sequence[Any], flip: bool, opacity: float) -> tuple:
        if model is None:
            raise gr.Error("No model is loaded: " + loaded.notice.split("\n")[0].strip("*"))
        scales = checked_scales(scales)
        image, name = read_upload(upload, settings)
        shown_size = image.size
        working = downscale(image, settings.max_side)
        try:
            result = segment(model, working, scales, bool(flip))
        except ValueError as error:  # e.g. a scale too small for a tiny image: the model's message says which
            raise gr.Error(f"{name}: {error}") from None
        colours = colorize(result.labels, palette)
        weights = hierarchical_scale_weights(result.attentions)
        gallery = [
            (attention_picture(weight), f"{scale}x: decides {100 * weight.mean():.0f}% of the picture")
            for scale, weight in zip(result.scales, weights)
        ]
        paths = write_result_files(result, shown_size, file_stem(name), settings.output_dir)
        resized = "" if working.size == shown_size else (
            f" (uploaded {shown_size[0]}×{shown_size[1]}, downscaled to a long side of {settings.max_side})")
        summary = (f"**{result.seconds:.2f} s** for scales {', '.join(map(str, result.scales))}"
                   f"{' with flip' if flip else ''} at {working.width}×{working.height}{resized}, "
                   f"{torch.get_num_threads()} CPU threads.")
        state = (working, colours)
        return (blend(working, colours, opacity), gallery, pixel_shares(result.labels, id2label), summary,
                str(paths[0]), [str(p) for p in paths[1:]], state)

    def reblend(state: tuple | None, opacity: float) -> Any:
        if not state:
            return gr.skip()
        working, colours = state
        return blend(working, colours, opacity)

    with gr.Blocks(title="Hierarchical Multi-Scale Attention", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(loaded.notice, visible=bool(loaded.notice), elem_id="notice")
        if model is not None:
            gr.Markdown(f"Model: `{loaded.source}` ({len(id2label)} classes)", elem_id="model-source")
        state = gr.State()
        with gr.Row():
            with gr.Column(scale=2):
                image_input = gr.Image(type="filepath", label="Street photo", sources=["upload", "clipboard"],
                                       elem_id="image-input", height=300)
                scales_input = gr.CheckboxGroup(list(SCALE_CHOICES), value=list(settings.default_scales),
                                                label="Inference scales", elem_id="scales")
                flip_input = gr.Checkbox(False, label="Also average with the mirrored image (flip)", elem_id="flip")
                opacity_input = gr.Slider(0, 1, value=0.6, step=0.05, label="Overlay opacity", elem_id="opacity")
                run_button = gr.Button("Segment", variant="primary", elem_id="run", interactive=model is not None)
                if examples:
                    gr.Examples([[str(path)] for path in examples], inputs=[image_input], cache_examples=False,
                                label="Examples (synthetic street scenes first)", examples_per_page=6)
                share_output = gr.Label(label="Pixel share per class", num_top_classes=8, elem_id="share")
            with gr.Column(scale=3):
                overlay_output = gr.Image(label="Segmentation", format="png", interactive=False, elem_id="overlay",
                                          height=300)
                gr.HTML(legend_html(id2label, palette), elem_id="legend")
                timing_output = gr.Markdown(label="Inference time", elem_id="timing")
                gr.Markdown("### Which scale decided where\n" + ATTENTION_NOTE)
                attention_output = gr.Gallery(label="Weight of each scale in the result", format="png", columns=3,
                                              height="auto", object_fit="contain", elem_id="attention",
                                              interactive=False)
                with gr.Accordion("Files: label map and attention maps", open=False):
                    labels_file = gr.File(label="Label map (class ids, PNG)", elem_id="labels-file")
                    attention_files = gr.File(label="Attention maps (0-255, PNG, one per scale)",
                                              file_count="multiple", elem_id="attention-files")

        run_button.click(
            run,
            inputs=[image_input, scales_input, flip_input, opacity_input],
            outputs=[overlay_output, attention_output, share_output, timing_output, labels_file, attention_files,
                     state],
            api_name="segment",
            api_description="Segment one image: returns the overlay, the per-scale weight pictures, the pixel share "
                            "per class, a timing line, the label map PNG and one attention map PNG per scale.",
            preprocess=False,  # our reader gives the clear errors; Gradio's would fail on broken files first
            postprocess=True,
            concurrency_id="inference",
        )
        opacity_input.change(reblend, inputs=[state, opacity_input], outputs=[overlay_output],
                             api_visibility="private", queue=False)
    return demo


def launch(demo: gr.Blocks, settings: SpaceSettings, examples: Sequence[Path] = (), **kwargs: Any) -> tuple:
    """Queue with the concurrency limit, refuse oversized uploads at the door, and start serving."""
    demo.queue(default_concurrency_limit=settings.concurrency_limit, max_size=settings.queue_size)
    allowed = sorted({str(Path(path).parent) for path in examples})
    return demo.launch(max_file_size=settings.max_file_bytes, allowed_paths=allowed, css=CSS, **kwargs)


def main() -> int:
    settings = SpaceSettings.from_environment()
    loaded = load_space_model(settings)
    if loaded.notice:
        print(loaded.notice.replace("**", ""), file=sys.stderr)
    examples = example_images(settings)
    demo = build_demo(settings, loaded, examples)
    launch(demo, settings, examples, server_name=settings.host, server_port=settings.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
