"""A procedural street-scene dataset in the official Cityscapes layout: the default dataset for quickstarts and tests.

Every frame is a street seen along its axis, in perspective: road with lane markings, sidewalks, terrain strips,
building facades with windows, sky with clouds, trees and hedges, walls and fences, poles carrying traffic signs and
traffic lights, persons, cars, trucks and buses, sometimes the ego vehicle's hood (ignored, as in Cityscapes).
Objects shrink towards the horizon, so large regions need context and far, thin objects need resolution. Each class
has its own but noisy colours and textures, and global lighting, colour casts, shadows and sensor noise vary.

The files follow Cityscapes exactly::

    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png       (Cityscapes labelIds)
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png  (the 19 trainIds, 255 = ignore)

Frames are a pure function of `(seed, split, index)`, whatever the number of workers.

Run it with ``python -m hms_segmentation.data.synthesize --output-dir DIR`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..label_tables import CITYSCAPES_LABELS, cityscapes_label_id_to_train_id
from .io import temporary_name, write_text_atomically

logger = logging.getLogger(__name__)

MARKER_FILE = "hms_synthetic_dataset.json"
"""Written at the root of a generated dataset once every frame is written; a folder holding it may be overwritten."""

IN_PROGRESS_FILE = "hms_synthetic_dataset.in_progress.json"
"""Written at the root before the first frame (with the settings, and those of the dataset it replaces), removed at
the end: a folder holding it has our partial output only, which a later run removes and regenerates."""

GENERATOR_VERSION = 1
TRAIN_CITIES = ("synthberg", "procville", "rendermouth")
VAL_CITIES = ("validham",)
ANNOTATED_FRAME = 19  # Cityscapes annotates the 20th frame of each 30-frame snippet: <seq>_000019.

MIN_FRAME_SIZE = 32
"""Smallest frame height and width in pixels."""

LABEL_ID = {label.name: label.id for label in CITYSCAPES_LABELS if label.id >= 0}


@dataclass
class SyntheticDatasetOptions:
    """What to generate.

    Args:
        output_dir: Root of the dataset (gets ``leftImg8bit/`` and ``gtFine/``).
        num_train: Frames in the ``train`` split.
        num_val: Frames in the ``val`` split.
        height: Frame height in pixels (Cityscapes: 1024).
        width: Frame width in pixels (Cityscapes: 2048).
        seed: Seed of the whole dataset (>= 0); the same seed gives byte-identical files.
        num_workers: Processes that render frames (1 renders in this process).
    """

    output_dir: Path
    num_train: int = 300
    num_val: int = 50
    height: int = 512
    width: int = 1024
    seed: int = 0
    num_workers: int = 2

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        if self.num_train < 0 or self.num_val < 0 or self.num_train + self.num_val == 0:
            raise ValueError(f"num_train and num_val must be >= 0 and not both 0, got {self.num_train}, {self.num_val}")
        if self.height < MIN_FRAME_SIZE or self.width < MIN_FRAME_SIZE:
            raise ValueError(f"height and width must be at least {MIN_FRAME_SIZE} pixels, got "
                             f"{self.height}x{self.width}")
        if self.seed < 0:  # numpy seeds only with non-negative integers, and would fail once frames are written
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")


# ---------------------------------------------------------------------------------------------------------------------
# Appearance: base colours and texture strength per class. Colours overlap between classes on purpose (a grey car,
# a grey building), so that shape and context matter, not colour alone.
# ---------------------------------------------------------------------------------------------------------------------

BUILDING_COLORS = ((178, 160, 140), (140, 120, 105), (150, 80, 65), (205, 200, 190), (110, 110, 115), (190, 170, 120),
                   (95, 85, 80), (160, 165, 170))
CAR_COLORS = ((150, 20, 25), (25, 45, 120), (220, 220, 225), (20, 20, 22), (120, 125, 130), (60, 90, 60),
              (190, 160, 40), (170, 175, 185))
CLOTHES_COLORS = ((30, 30, 40), (60, 70, 120), (150, 30, 40), (200, 200, 190), (90, 60, 40), (40, 100, 70),
                  (220, 180, 60), (120, 120, 120))
SKIN_COLORS = ((240, 200, 170), (200, 150, 110), (140, 95, 65), (90, 60, 40))
SIGN_COLORS = ((200, 30, 30), (30, 80, 180), (235, 200, 30), (30, 130, 60))

# name: (high-frequency amplitude, low-frequency amplitude), in 0..255 units.
TEXTURE = {
    "road": (9.0, 10.0), "sidewalk": (7.0, 8.0), "building": (6.0, 14.0), "wall": (10.0, 10.0),
    "fence": (6.0, 4.0), "pole": (4.0, 3.0), "traffic light": (3.0, 2.0), "traffic sign": (3.0, 2.0),
    "vegetation": (30.0, 22.0), "terrain": (14.0, 18.0), "sky": (1.5, 4.0), "person": (6.0, 6.0),
    "car": (4.0, 6.0), "truck": (5.0, 6.0), "bus": (5.0, 6.0), "ego vehicle": (3.0, 4.0),
}


def _texture_tables() -> tuple[np.ndarray, np.ndarray]:
    high, low = np.full(256, 5.0, np.float32), np.full(256, 5.0, np.float32)
    for name, (high_amplitude, low_amplitude) in TEXTURE.items():
        high[LABEL_ID[name]], low[LABEL_ID[name]] = high_amplitude, low_amplitude
    return high, low


def _train_id_table() -> np.ndarray:
    table = np.full(256, 255, np.uint8)
    for label_id, train_id in cityscapes_label_id_to_train_id().items():
        table[label_id] = train_id
    return table


# ---------------------------------------------------------------------------------------------------------------------
# Geometry: a street along the camera axis. Ground points are addressed by depth `t` (1 at the bottom row, -> 0 at the
# horizon) and by `lateral`, the x coordinate the point would have on the bottom row. Sizes are in "near pixels"
# (pixels at t = 1) and scale with t on screen.
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class StreetLayout:
    height: int
    width: int
    horizon: float
    vanishing_x: float
    road_center: float
    road_half_width: float
    left_building_line: float
    right_building_line: float
    left_sidewalk_edge: float
    right_sidewalk_edge: float

    @classmethod
    def sample(cls, height: int, width: int, rng: np.random.Generator) -> StreetLayout:
        vanishing_x = width * rng.uniform(0.38, 0.62)
        road_half_width = width * rng.uniform(0.28, 0.45)
        road_center = vanishing_x + width * rng.uniform(-0.12, 0.12)
        left_sidewalk = road_center - road_half_width - width * rng.uniform(0.12, 0.35)
        right_sidewalk = road_center + road_half_width + width * rng.uniform(0.12, 0.35)
        left_terrain = width * rng.uniform(0.05, 0.3) if rng.random() < 0.4 else 0.0
        right_terrain = width * rng.uniform(0.05, 0.3) if rng.random() < 0.4 else 0.0
        return cls(height, width, height * rng.uniform(0.34, 0.47), vanishing_x, road_center, road_half_width,
                   left_sidewalk - left_terrain, right_sidewalk + right_terrain, left_sidewalk, right_sidewalk)

    def screen(self, t: float, lateral: float) -> tuple[float, float]:
        """Screen position (x, y) of the ground point at depth t and lateral position `lateral`."""
        return self.vanishing_x + t * (lateral - self.vanishing_x), self.horizon + t * (self.height - self.horizon)


def _value_noise(shape: tuple[int, int], cell: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise with features about `cell` pixels wide: a coarse random grid upsampled bicubically."""
    height, width = shape
    coarse = rng.standard_normal((max(2, height // cell + 2), max(2, width // cell + 2))).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)


def _fraction(values: np.ndarray) -> np.ndarray:
    """Fractional part (a faster `np.mod(values, 1)` for the repeating patterns below)."""
    return values - np.floor(values)


def _render_background(layout: StreetLayout, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sky, ground (road, sidewalks, terrain) and building facades, computed per pixel with numpy.

    Surfaces are painted as indices into a small palette and turned into colours in one gather at the end.
    """
    height, width = layout.height, layout.width
    ys = np.arange(height, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(width, dtype=np.float32)[None, :] + 0.5
    labels = np.full((height, width), LABEL_ID["sky"], np.uint8)
    paint = np.zeros((height, width), np.uint8)  # 0 = sky
    palette = np.zeros((256, 3), np.float32)
    road_paint, marking_paint, sidewalk_paint, tile_paint, curb_paint, terrain_paint = 1, 2, 3, 4, 5, 6
    window_paint = {-1: 7, 1: 8}
    building_paint = {-1: 10, 1: 130}  # first palette slot of each side's buildings (at most 120 per side)

    # Ground below the horizon, classified by lateral position.
    depth = np.clip((ys - layout.horizon) / (height - layout.horizon), 1e-3, None)  # (height, 1)
    lateral = layout.vanishing_x + (xs - layout.vanishing_x) / depth  # (height, width)
    distance = 1.0 / depth  # along the street, in near-row units
    ground = ys > layout.horizon
    offset = np.abs(lateral - layout.road_center)
    road = ground & (offset <= layout.road_half_width)
    sidewalk = ground & ~road & (lateral >= layout.left_sidewalk_edge) & (lateral <= layout.right_sidewalk_edge)
    terrain = ground & ~road & ~sidewalk
    labels[road], labels[sidewalk], labels[terrain] = LABEL_ID["road"], LABEL_ID["sidewalk"], LABEL_ID["terrain"]
    paint[road], paint[sidewalk], paint[terrain] = road_paint, sidewalk_paint, terrain_paint
    # Lane markings (labelled road, as in Cityscapes): a dashed centre line and solid edge lines, in perspective.
    marking_width = width * 0.006
    dashes = (_fraction(distance * 1.3) < 0.45) & (offset < marking_width)
    edge_lines = np.abs(offset - layout.road_half_width * 0.93) < marking_width * 0.8
    paint[road & (dashes | edge_lines)] = marking_paint
    tiles = (_fraction(distance * 4.0) < 0.08) | (_fraction(lateral / (width * 0.05)) < 0.32 * depth)
    paint[sidewalk & tiles] = tile_paint
    paint[sidewalk & (np.abs(offset - layout.road_half_width) < width * 0.015)] = curb_paint
    palette[road_paint] = rng.uniform(65, 115) * np.array(rng.uniform((0.95, 0.95, 1.0), (1.02, 1.0, 1.08)))
    palette[marking_paint] = rng.uniform(200, 240)
    palette[sidewalk_paint] = rng.uniform((150, 130, 130), (200, 185, 185))
    palette[tile_paint], palette[curb_paint] = palette[sidewalk_paint] * 0.8, palette[sidewalk_paint] * 1.1
    palette[terrain_paint] = rng.uniform((110, 130, 60), (170, 190, 110))

    # Facades rise from each building line; per column x we know which building (if any) and its top.
    left_columns = int(np.count_nonzero(xs[0] < layout.vanishing_x))
    for side in (-1, 1):
        line = layout.left_building_line if side < 0 else layout.right_building_line
        # Each side's facades only cover the columns on its side of the vanishing point: work on those alone.
        columns = slice(0, left_columns) if side < 0 else slice(left_columns, width)
        side_labels, side_paint = labels[:, columns], paint[:, columns]  # views
        facade_depth = np.clip((xs[0, columns] - layout.vanishing_x) / (line - layout.vanishing_x), 1e-3, None)
        along = 1.0 / facade_depth
        # Buildings of random length along the street, with gaps that show the sky.
        edges, building_heights, is_building = [0.0], [], []
        while edges[-1] < 120 and len(is_building) < 120:
            gap = rng.random() < 0.2
            length = rng.uniform(0.2, 0.8) if gap else rng.uniform(0.4, 2.6) * max(1.0, edges[-1] / 4)
            edges.append(edges[-1] + length)
            is_building.append(not gap)
            building_heights.append(height * rng.uniform(0.5, 2.2))
            base = np.array(BUILDING_COLORS[rng.integers(len(BUILDING_COLORS))], np.float32)
            palette[building_paint[side] + len(is_building) - 1] = np.clip(
                base * rng.uniform(0.8, 1.2) + rng.normal(0, 10, 3), 0, 255)
        index = np.clip(np.searchsorted(np.array(edges), along) - 1, 0, len(is_building) - 1)
        present = np.array(is_building)[index]
        top = layout.horizon - facade_depth * np.array(building_heights, np.float32)[index]
        bottom = layout.horizon + facade_depth * (height - layout.horizon)
        facade = present[None, :] & (ys >= top[None, :]) & (ys <= bottom[None, :])
        side_labels[facade] = LABEL_ID["building"]
        side_paint[facade] = np.broadcast_to((building_paint[side] + index).astype(np.uint8)[None, :],
                                             facade.shape)[facade]
        # Windows on a regular world grid: columns along the street, floors up the facade.
        height_above_ground = (bottom[None, :] - ys) / facade_depth[None, :]
        window_columns = _fraction(along * rng.uniform(2.5, 5.0))
        floors = _fraction(height_above_ground * (1.0 / (height * rng.uniform(0.12, 0.2))))
        windows = facade & ((window_columns > 0.25) & (window_columns < 0.75))[None, :] & (floors > 0.3) & (
            floors < 0.8) & (height_above_ground > height * 0.15)
        side_paint[windows] = window_paint[side]
        palette[window_paint[side]] = rng.uniform((30, 40, 55), (120, 140, 160))

    # Sky: deeper blue at the top, hazy towards the horizon, clouds from smooth noise; drawn only where visible.
    top_color = rng.uniform((60, 110, 170), (110, 160, 225)).astype(np.float32)
    horizon_color = rng.uniform((170, 190, 200), (225, 230, 240)).astype(np.float32)
    blend = np.clip(ys / max(layout.horizon, 1.0), 0, 1)[..., None]  # (height, 1, 1)
    gradient = top_color * (1 - blend) + horizon_color * blend
    clouds = np.clip(_value_noise((height, width), max(8, width // 10), rng) * rng.uniform(0.4, 1.0) - 0.3, 0, 1)
    rgb = palette[paint]
    sky = paint == 0
    rgb[sky] = (gradient + clouds[..., None] * (np.float32(235) - gradient))[sky]
    return rgb, labels


# ---------------------------------------------------------------------------------------------------------------------
# Objects, drawn far to near with PIL ImageDraw into the colour image and the label map at once.
# ---------------------------------------------------------------------------------------------------------------------


class SceneCanvas:
    """Paints shapes into an RGB image and a labelIds map together, so the two never disagree."""

    def __init__(self, rgb: np.ndarray, labels: np.ndarray):
        self.image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
        self.label_image = Image.fromarray(labels)
        self.draw_rgb = ImageDraw.Draw(self.image)
        self.draw_label = ImageDraw.Draw(self.label_image)

    def polygon(self, points: Sequence[tuple[float, float]], color: Sequence[float], label: str) -> None:
        self.draw_rgb.polygon(points, fill=_color(color))
        self.draw_label.polygon(points, fill=LABEL_ID[label])

    def rectangle(self, box: Sequence[float], color: Sequence[float], label: str) -> None:
        box = _ordered_box(box)
        self.draw_rgb.rectangle(box, fill=_color(color))
        self.draw_label.rectangle(box, fill=LABEL_ID[label])

    def ellipse(self, box: Sequence[float], color: Sequence[float], label: str) -> None:
        box = _ordered_box(box)
        self.draw_rgb.ellipse(box, fill=_color(color))
        self.draw_label.ellipse(box, fill=LABEL_ID[label])

    def line(self, points: Sequence[tuple[float, float]], color: Sequence[float], label: str, width: float) -> None:
        width = max(1, int(round(width)))
        self.draw_rgb.line(points, fill=_color(color), width=width)
        self.draw_label.line(points, fill=LABEL_ID[label], width=width)

    def paint(self, box: Sequence[float], color: Sequence[float]) -> None:
        """Colour detail (a window, a wheel) that keeps the label underneath."""
        self.draw_rgb.rectangle(_ordered_box(box), fill=_color(color))


def _color(color: Sequence[float]) -> tuple[int, int, int]:
    return tuple(int(np.clip(value, 0, 255)) for value in color)


def _ordered_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def _jitter(color: Sequence[int], rng: np.random.Generator, spread: float = 0.12) -> np.ndarray:
    return np.clip(np.array(color, np.float32) * rng.uniform(1 - spread, 1 + spread) + rng.normal(0, 8, 3), 0, 255)


def _draw_vehicle(canvas: SceneCanvas, layout: StreetLayout, t: float, lateral: float, kind: str,
                  rng: np.random.Generator) -> None:
    """A car, truck or bus seen from behind (traffic runs along the street)."""
    x, ground = layout.screen(t, lateral)
    size = layout.height * t
    width, tall = {"car": (0.75, 0.55), "truck": (0.9, 1.0), "bus": (0.95, 1.15)}[kind]
    width, tall = width * size * rng.uniform(0.9, 1.1), width * size * tall * rng.uniform(0.9, 1.1)
    left, right, top = x - width / 2, x + width / 2, ground - tall
    body = _jitter(CAR_COLORS[rng.integers(len(CAR_COLORS))] if kind == "car" else
                   ((230, 230, 225), (200, 40, 30), (240, 190, 40), (40, 80, 150))[rng.integers(4)], rng)
    dark = np.array((25, 25, 28), np.float32) * rng.uniform(0.8, 1.3)
    canvas.ellipse((left - width * 0.05, ground - tall * 0.06, right + width * 0.05, ground + tall * 0.04),
                   (35, 35, 38), "road")  # contact shadow
    wheel = width * 0.16
    canvas.rectangle((left + width * 0.04, ground - tall * 0.16, left + width * 0.04 + wheel, ground), dark, kind)
    canvas.rectangle((right - width * 0.04 - wheel, ground - tall * 0.16, right - width * 0.04, ground), dark, kind)
    if kind == "car":
        canvas.rectangle((left, ground - tall * 0.6, right, ground - tall * 0.12), body, kind)
        canvas.polygon([(left + width * 0.06, ground - tall * 0.58), (right - width * 0.06, ground - tall * 0.58),
                        (right - width * 0.16, top), (left + width * 0.16, top)], body, kind)
        canvas.paint((left + width * 0.2, top + tall * 0.06, right - width * 0.2, ground - tall * 0.6), dark * 1.6)
    else:
        canvas.rectangle((left, top, right, ground - tall * 0.1), body, kind)
        if kind == "bus":  # a rear window; a truck's cargo box has none, only its door seam
            canvas.paint((left + width * 0.08, top + tall * 0.05, right - width * 0.08, top + tall * 0.35), dark * 1.8)
        else:
            canvas.paint((x - width * 0.01, top + tall * 0.05, x + width * 0.01, ground - tall * 0.15), body * 0.6)
    light_y = ground - tall * (0.45 if kind == "car" else 0.3)
    for edge in (left + width * 0.03, right - width * 0.15):
        canvas.paint((edge, light_y, edge + width * 0.12, light_y + tall * 0.07), (200, 25, 20))
    canvas.paint((x - width * 0.12, ground - tall * 0.3, x + width * 0.12, ground - tall * 0.2), (225, 225, 215))


def _draw_person(canvas: SceneCanvas, layout: StreetLayout, t: float, lateral: float,
                 rng: np.random.Generator) -> None:
    x, ground = layout.screen(t, lateral)
    tall = layout.height * t * 0.75 * rng.uniform(0.85, 1.1)
    half = tall * 0.13
    trousers, shirt = (_jitter(CLOTHES_COLORS[rng.integers(len(CLOTHES_COLORS))], rng) for _ in range(2))
    skin = _jitter(SKIN_COLORS[rng.integers(len(SKIN_COLORS))], rng, 0.05)
    stride = half * rng.uniform(0.0, 0.6)
    canvas.polygon([(x - half * 0.8, ground - tall * 0.5), (x - half * 0.1, ground - tall * 0.5),
                    (x - half * 0.3 - stride, ground), (x - half * 0.8 - stride, ground)], trousers, "person")
    canvas.polygon([(x + half * 0.1, ground - tall * 0.5), (x + half * 0.8, ground - tall * 0.5),
                    (x + half * 0.8 + stride, ground), (x + half * 0.3 + stride, ground)], trousers, "person")
    canvas.rectangle((x - half, ground - tall * 0.82, x + half, ground - tall * 0.48), shirt, "person")
    for side in (-1, 1):  # arms
        canvas.rectangle((x + side * half * 1.35, ground - tall * 0.8, x + side * half, ground - tall * 0.52),
                         shirt * 0.9, "person")
    head = tall * 0.075
    canvas.ellipse((x - head, ground - tall, x + head, ground - tall * 0.84), skin, "person")
    canvas.ellipse((x - head, ground - tall * 1.01, x + head, ground - tall * 0.93), _jitter((40, 30, 25), rng),
                   "person")


def _draw_pole(canvas: SceneCanvas, layout: StreetLayout, t: float, lateral: float,
               rng: np.random.Generator) -> None:
    """A pole, sometimes carrying a traffic sign and/or a traffic light (the sign/light boxes are their own class)."""
    x, ground = layout.screen(t, lateral)
    scale = layout.height * t
    tall = scale * rng.uniform(1.3, 2.2)
    gray = _jitter((135, 135, 140), rng, 0.2)
    canvas.line([(x, ground), (x, ground - tall)], gray, "pole", scale * 0.022)
    toward_road = 1.0 if lateral < layout.road_center else -1.0
    if rng.random() < 0.45:  # traffic sign
        size = scale * rng.uniform(0.12, 0.2)
        sign_y = ground - tall * rng.uniform(0.55, 0.8)
        color = SIGN_COLORS[rng.integers(len(SIGN_COLORS))]
        box = (x - size / 2, sign_y - size / 2, x + size / 2, sign_y + size / 2)
        shape = rng.integers(3)
        if shape == 0:
            canvas.ellipse(box, color, "traffic sign")
            inset = size * 0.18
            canvas.draw_rgb.ellipse((box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset),
                                    fill=_color(_jitter((235, 235, 235), rng, 0.05)))
        elif shape == 1:
            canvas.polygon([(x, box[1]), (box[2], box[3]), (box[0], box[3])], color, "traffic sign")
        else:
            canvas.rectangle((box[0], box[1], box[2] + size * 0.3, box[3]), color, "traffic sign")
    if rng.random() < 0.35:  # traffic light, on the pole or on an arm over the road
        arm = scale * rng.uniform(0.0, 0.6) if rng.random() < 0.5 else 0.0
        light_x = x + toward_road * arm
        if arm:
            canvas.line([(x, ground - tall), (light_x, ground - tall)], gray, "pole", scale * 0.018)
        box_width, box_height = scale * 0.08, scale * 0.22
        top = ground - tall
        canvas.rectangle((light_x - box_width / 2, top, light_x + box_width / 2, top + box_height),
                         _jitter((40, 40, 35), rng), "traffic light")
        lit = rng.integers(3)
        for lamp, lamp_color in enumerate(((230, 40, 30), (240, 180, 30), (40, 220, 90))):
            color = lamp_color if lamp == lit else np.array(lamp_color) * 0.25
            center_y = top + box_height * (0.2 + 0.3 * lamp)
            radius = box_width * 0.32
            canvas.draw_rgb.ellipse((light_x - radius, center_y - radius, light_x + radius, center_y + radius),
                                    fill=_color(color))


def _draw_tree(canvas: SceneCanvas, layout: StreetLayout, t: float, lateral: float,
               rng: np.random.Generator) -> None:
    x, ground = layout.screen(t, lateral)
    scale = layout.height * t
    trunk_height, crown = scale * rng.uniform(0.5, 0.9), scale * rng.uniform(0.3, 0.6)
    canvas.line([(x, ground), (x, ground - trunk_height)], _jitter((80, 60, 40), rng), "vegetation", scale * 0.04)
    green = _jitter((70, 110, 40), rng, 0.25)
    for _ in range(3):
        dx, dy = rng.normal(0, crown * 0.3, 2)
        center_y = ground - trunk_height - crown * 0.6 + dy
        canvas.ellipse((x + dx - crown, center_y - crown * 0.8, x + dx + crown, center_y + crown * 0.8), green,
                       "vegetation")


def _draw_along_building_line(canvas: SceneCanvas, layout: StreetLayout, side: int, kind: str,
                              rng: np.random.Generator) -> None:
    """A hedge, wall or fence running along the building line over a stretch of the street."""
    line = layout.left_building_line if side < 0 else layout.right_building_line
    lateral = line + side * -layout.width * 0.01
    near = rng.uniform(0.25, 1.2)
    far = near * rng.uniform(0.2, 0.6)
    tall = layout.height * {"vegetation": rng.uniform(0.2, 0.4), "wall": rng.uniform(0.15, 0.3),
                            "fence": rng.uniform(0.2, 0.35)}[kind]
    (near_x, near_y), (far_x, far_y) = layout.screen(near, lateral), layout.screen(far, lateral)
    if kind != "fence":
        color = _jitter((60, 105, 40), rng, 0.2) if kind == "vegetation" else _jitter((150, 145, 135), rng, 0.2)
        canvas.polygon([(near_x, near_y), (far_x, far_y), (far_x, far_y - far * tall), (near_x, near_y - near * tall)],
                       color, kind)
        return
    color = _jitter((120, 105, 90), rng, 0.25)
    for rail in (0.35, 0.95):
        canvas.line([(near_x, near_y - near * tall * rail), (far_x, far_y - far * tall * rail)], color, "fence",
                    layout.height * near * 0.012)
    steps = int(rng.integers(6, 16))
    for step in range(steps + 1):
        t = 1.0 / (1.0 / near + step * (1.0 / far - 1.0 / near) / steps)  # evenly spaced along the street
        x, y = layout.screen(t, lateral)
        canvas.line([(x, y), (x, y - t * tall)], color, "fence", layout.height * t * 0.015)


def render_street_scene(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render one frame.

    Returns:
        `image`: (height, width, 3) uint8 RGB, and `label_ids`: (height, width) uint8 Cityscapes labelIds.
    """
    layout = StreetLayout.sample(height, width, rng)
    rgb, labels = _render_background(layout, rng)
    canvas = SceneCanvas(rgb, labels)

    for side in (-1, 1):
        for _ in range(int(rng.integers(0, 3))):
            _draw_along_building_line(canvas, layout, side, ("vegetation", "wall", "fence")[rng.integers(3)], rng)

    objects: list[tuple[float, str, float]] = []  # (depth, kind, lateral)
    sidewalks = ((layout.road_center - layout.road_half_width, layout.left_sidewalk_edge),  # (inner, outer) edge
                 (layout.road_center + layout.road_half_width, layout.right_sidewalk_edge))
    for inner, outer in sidewalks:
        spacing = rng.uniform(0.8, 2.0)
        distance = rng.uniform(1.0, 1.0 + spacing)
        while distance < 25:
            objects.append((1.0 / distance, "pole", inner + (outer - inner) * rng.uniform(0.1, 0.3)))
            distance += spacing * rng.uniform(0.8, 1.2)
        for _ in range(int(rng.integers(0, 4))):
            objects.append((rng.uniform(0.06, 0.6), "tree", inner + (outer - inner) * rng.uniform(0.6, 0.95)))
        for _ in range(int(rng.integers(0, 5))):
            objects.append((rng.uniform(0.06, 0.7), "person", inner + (outer - inner) * rng.uniform(0.2, 0.9)))
    for _ in range(int(rng.integers(1, 7))):
        kind = ("car", "car", "car", "car", "truck", "bus")[rng.integers(6)]
        lane = layout.road_center + layout.road_half_width * rng.uniform(-0.7, 0.7)
        objects.append((0.05 + 0.6 * rng.random() ** 1.5, kind, lane))  # more far than near traffic
    if rng.random() < 0.3:  # a pedestrian crossing the road
        objects.append((rng.uniform(0.1, 0.7), "person",
                        layout.road_center + layout.road_half_width * rng.uniform(-0.8, 0.8)))

    for t, kind, lateral in sorted(objects, key=lambda item: item[0]):
        if kind == "pole":
            _draw_pole(canvas, layout, t, lateral, rng)
        elif kind == "tree":
            _draw_tree(canvas, layout, t, lateral, rng)
        elif kind == "person":
            _draw_person(canvas, layout, t, lateral, rng)
        else:
            _draw_vehicle(canvas, layout, t, lateral, kind, rng)

    if rng.random() < 0.3:  # the ego vehicle's hood, ignored in evaluation as in Cityscapes
        hood = height * rng.uniform(0.06, 0.12)
        canvas.polygon([(0, height), (width * 0.12, height - hood), (width * 0.88, height - hood), (width, height)],
                       _jitter((40, 40, 45), rng), "ego vehicle")

    image = np.asarray(canvas.image, dtype=np.float32)
    label_ids = np.asarray(canvas.label_image, dtype=np.uint8)
    return _apply_texture_and_lighting(image, label_ids, rng), label_ids


def _apply_texture_and_lighting(image: np.ndarray, label_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class-dependent texture, global lighting and colour cast, a soft shadow and sensor noise, all vectorised."""
    height, width = label_ids.shape
    high_table, low_table = _texture_tables()
    fine = rng.standard_normal((height, width), dtype=np.float32)
    blotches = _value_noise((height, width), 4, rng)
    smooth = _value_noise((height, width), max(4, width // 40), rng)
    luminance = high_table[label_ids] * (0.6 * fine + 0.8 * blotches) + low_table[label_ids] * smooth
    image = image + luminance[..., None]
    gain = rng.uniform(0.65, 1.25) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    sun = 1.0 + rng.uniform(-0.25, 0.25) * (np.arange(width, dtype=np.float32) / width - 0.5)
    shade = np.ones((height, width), np.float32) * sun[None, :]
    if rng.random() < 0.5:  # a building's shadow over part of the ground
        slope = rng.uniform(-1.5, 1.5)
        boundary = width * rng.uniform(0.2, 0.8) + (np.arange(height, dtype=np.float32)[:, None] - height) * slope
        shadow = (np.arange(width, dtype=np.float32)[None, :] < boundary) if rng.random() < 0.5 else (
            np.arange(width, dtype=np.float32)[None, :] > boundary)
        shade = np.where(shadow, shade * rng.uniform(0.55, 0.8), shade)
    image = image * shade[..., None] * gain.astype(np.float32)
    image += rng.standard_normal((height, width, 1), dtype=np.float32) * np.float32(rng.uniform(1.5, 5.0))
    return np.clip(image, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# Writing the dataset.
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FrameTask:
    output_dir: Path
    split: str
    index: int
    city: str
    height: int
    width: int
    seed: int


def _frame_stem(task: _FrameTask) -> str:
    return f"{task.city}_{task.index:06d}_{ANNOTATED_FRAME:06d}"


def _frame_tasks(options: SyntheticDatasetOptions) -> list[_FrameTask]:
    """Every frame of the dataset described by `options`, train then val."""
    tasks = []
    for split, count, cities in (("train", options.num_train, TRAIN_CITIES), ("val", options.num_val, VAL_CITIES)):
        for index in range(count):
            tasks.append(_FrameTask(options.output_dir, split, index, cities[index % len(cities)], options.height,
                                    options.width, options.seed))
    return tasks


def _frame_files(task: _FrameTask) -> tuple[Path, Path, Path]:
    """The image, labelIds and labelTrainIds files of one frame: the only files a frame writes."""
    stem = _frame_stem(task)
    image_dir = task.output_dir / "leftImg8bit" / task.split / task.city
    label_dir = task.output_dir / "gtFine" / task.split / task.city
    return (image_dir / f"{stem}_leftImg8bit.png", label_dir / f"{stem}_gtFine_labelIds.png",
            label_dir / f"{stem}_gtFine_labelTrainIds.png")


def _write_frame(task: _FrameTask) -> None:
    split_code = {"train": 0, "val": 1}[task.split]
    rng = np.random.default_rng([task.seed, split_code, task.index])
    image, label_ids = render_street_scene(task.height, task.width, rng)
    image_path, label_ids_path, train_ids_path = _frame_files(task)
    # compress_level=1: noisy images barely compress better at higher levels, and writing is 3-4x faster.
    Image.fromarray(image).save(image_path, compress_level=1)
    Image.fromarray(label_ids).save(label_ids_path, compress_level=1)
    Image.fromarray(_train_id_table()[label_ids]).save(train_ids_path, compress_level=1)


def _settings(options: SyntheticDatasetOptions) -> dict:
    """What the marker files record: everything that decides the files (not the folder, not the worker count)."""
    return {"generator": "hms_segmentation.data.synthesize", "version": GENERATOR_VERSION,
            **{key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(options).items()
               if key not in ("output_dir", "num_workers")}}


def _write_marker(path: Path, content: dict) -> None:
    write_text_atomically(path, json.dumps(content, indent=2) + "\n")


def _recorded_options(marker: Path, output_dir: Path) -> list[SyntheticDatasetOptions]:
    """The datasets a marker file says are (partly) written in `output_dir`: its own settings and, for an
    in-progress marker, those of the dataset it was replacing.

    Raises:
        FileExistsError: The marker is no JSON written by this tool (then nothing in the folder is touched).
    """
    keys = ("num_train", "num_val", "height", "width", "seed")
    try:
        record = json.loads(marker.read_text())
        records = [record, *record.get("previous", [])]
        return [SyntheticDatasetOptions(output_dir=output_dir, **{key: int(entry[key]) for key in keys})
                for entry in records]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise FileExistsError(
            f"{marker}: expected the settings of a synthetic dataset written by this tool ({', '.join(keys)}), "
            f"could not read them ({error!r}): refusing to overwrite {output_dir}; choose an empty or new --output-dir"
        ) from None


def _remove_generated_files(options: SyntheticDatasetOptions) -> None:
    """Remove exactly the files the dataset `options` writes, then the folders left empty; nothing else."""
    folders = set()
    for task in _frame_tasks(options):
        for path in _frame_files(task):
            path.unlink(missing_ok=True)
            folders.update((path.parent, path.parent.parent, path.parent.parent.parent))  # city, split, root
    for folder in sorted(folders, key=lambda folder: len(folder.parts), reverse=True):  # deepest first
        with contextlib.suppress(OSError):  # not empty (someone else's files), or already gone
            folder.rmdir()


def _prepare_output_dir(options: SyntheticDatasetOptions) -> None:
    """Refuse to write into a non-empty folder unless it holds a synthetic dataset of ours, complete or partial, and
    remove that dataset's files (only those: anything else in the folder is kept).

    Raises:
        FileExistsError: `output_dir` is a file, or a non-empty folder without our marker files, or a marker file is
            unreadable.
    """
    output_dir = options.output_dir
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} exists and is not a folder: expected an empty or new output folder")
    complete, in_progress = output_dir / MARKER_FILE, output_dir / IN_PROGRESS_FILE
    own_temporary = {temporary_name(output_dir / name).name for name in (MARKER_FILE, IN_PROGRESS_FILE)}
    entries = [path for path in output_dir.iterdir() if path.name not in own_temporary] if output_dir.is_dir() else []
    if entries and not complete.is_file() and not in_progress.is_file():
        raise FileExistsError(
            f"{output_dir} is not empty and is not a synthetic dataset written by this tool (no {MARKER_FILE} or "
            f"{IN_PROGRESS_FILE}): refusing to overwrite it; choose an empty or new --output-dir"
        )
    previous = [recorded for marker in (complete, in_progress) if marker.is_file()
                for recorded in _recorded_options(marker, output_dir)]
    output_dir.mkdir(parents=True, exist_ok=True)
    # The in-progress marker names every dataset whose files may still be here, and is in place before the complete
    # marker goes and before any file is removed or written: if this run is interrupted at any point, the next one
    # still knows which files are ours, and `ensure_synthetic_dataset` never takes a partial folder as finished.
    unique = {json.dumps(_settings(recorded), sort_keys=True): _settings(recorded) for recorded in previous}
    _write_marker(in_progress, {**_settings(options), "previous": list(unique.values())})
    complete.unlink(missing_ok=True)
    for name in own_temporary:
        (output_dir / name).unlink(missing_ok=True)
    for recorded in previous:
        _remove_generated_files(recorded)
    kept = [root for root in ("leftImg8bit", "gtFine") if (output_dir / root).exists()]
    if kept:
        logger.warning("%s: kept the files under %s that this generator did not write (images among them are loaded "
                       "beside the new frames)", output_dir, " and ".join(f"{root}/" for root in kept))


def synthesize_cityscapes(options: SyntheticDatasetOptions) -> Path:
    """Write the synthetic dataset described by `options`; return its root folder.

    A folder holding an earlier synthetic dataset, finished or interrupted, gets its frames replaced; files that
    this generator did not write are never removed.

    Raises:
        FileExistsError: `output_dir` is not empty and was not written by this generator.
    """
    output_dir = options.output_dir
    _prepare_output_dir(options)
    tasks = _frame_tasks(options)
    for task in tasks:
        for folder in {path.parent for path in _frame_files(task)}:
            folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if options.num_workers == 1 or len(tasks) < 4:
        for task in tasks:
            _write_frame(task)
    else:
        with multiprocessing.get_context("fork").Pool(options.num_workers) as pool:
            for _ in pool.imap_unordered(_write_frame, tasks, chunksize=4):
                pass
    # complete marker before the in-progress one goes, so the folder is claimed at every moment
    _write_marker(output_dir / MARKER_FILE, _settings(options))
    (output_dir / IN_PROGRESS_FILE).unlink()
    logger.info("wrote %d frames to %s in %.1f s", len(tasks), output_dir, time.perf_counter() - start)
    return output_dir


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hms-segmentation synthesize",
        description="Write a procedural street-scene dataset in the official Cityscapes layout "
        "(leftImg8bit/ + gtFine/ with labelIds and labelTrainIds).",
    )
    defaults = SyntheticDatasetOptions(output_dir=Path("."))
    parser.add_argument("--output-dir", type=Path, required=True, help="Dataset root (must be empty, new, or a "
                        "previous synthetic dataset, which is replaced).")
    parser.add_argument("--num-train", type=int, default=defaults.num_train, help="Frames in the train split.")
    parser.add_argument("--num-val", type=int, default=defaults.num_val, help="Frames in the val split.")
    parser.add_argument("--height", type=int, default=defaults.height, help="Frame height in pixels.")
    parser.add_argument("--width", type=int, default=defaults.width, help="Frame width in pixels.")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="Seed; the same seed gives identical files.")
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers, help="Rendering processes.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (also dispatched to by the ``hms-segmentation`` console script)."""
    arguments = build_argument_parser().parse_args(argv)
    try:
        options = SyntheticDatasetOptions(**{key: value for key, value in vars(arguments).items()})
    except ValueError as error:  # a bad value: said before anything is written
        print(f"error: {error}")
        return 2
    start = time.perf_counter()
    try:
        synthesize_cityscapes(options)
    except FileExistsError as error:
        print(f"error: {error}")
        return 2
    print(f"Wrote {options.num_train} train + {options.num_val} val frames of {options.height}x{options.width} to "
          f"{options.output_dir} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
