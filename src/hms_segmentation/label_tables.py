"""Label tables of the datasets HMSA was trained on, kept as data in one place.

This module travels to the Hub with the model files (flat, no package-relative imports beyond siblings), so the
model config can name its classes without the training code.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = 255
"""Label value that the loss and the metrics skip (Cityscapes "ignore", Mapillary "void" after remapping)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Normalisation of the reference (``DATASET.MEAN`` / ``DATASET.STD``), applied to images scaled to [0, 1]."""

MAX_IMAGE_PIXELS = 178_956_970
"""Largest image (width * height) any entry point decodes: Pillow's hard decompression-bomb limit (twice its warning
threshold). Real street photos (Mapillary, up to ~25 MP) are far below; a larger header is almost always a bomb."""


@dataclass(frozen=True)
class CityscapesLabel:
    name: str
    id: int
    train_id: int
    category: str
    category_id: int
    has_instances: bool
    ignore_in_eval: bool
    color: tuple[int, int, int]


# The official Cityscapes label table (cityscapesScripts ``labels.py``): name, id, trainId, category, categoryId,
# hasInstances, ignoreInEval, color.
CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = tuple(
    CityscapesLabel(*row)
    for row in (
        ("unlabeled", 0, 255, "void", 0, False, True, (0, 0, 0)),
        ("ego vehicle", 1, 255, "void", 0, False, True, (0, 0, 0)),
        ("rectification border", 2, 255, "void", 0, False, True, (0, 0, 0)),
        ("out of roi", 3, 255, "void", 0, False, True, (0, 0, 0)),
        ("static", 4, 255, "void", 0, False, True, (0, 0, 0)),
        ("dynamic", 5, 255, "void", 0, False, True, (111, 74, 0)),
        ("ground", 6, 255, "void", 0, False, True, (81, 0, 81)),
        ("road", 7, 0, "flat", 1, False, False, (128, 64, 128)),
        ("sidewalk", 8, 1, "flat", 1, False, False, (244, 35, 232)),
        ("parking", 9, 255, "flat", 1, False, True, (250, 170, 160)),
        ("rail track", 10, 255, "flat", 1, False, True, (230, 150, 140)),
        ("building", 11, 2, "construction", 2, False, False, (70, 70, 70)),
        ("wall", 12, 3, "construction", 2, False, False, (102, 102, 156)),
        ("fence", 13, 4, "construction", 2, False, False, (190, 153, 153)),
        ("guard rail", 14, 255, "construction", 2, False, True, (180, 165, 180)),
        ("bridge", 15, 255, "construction", 2, False, True, (150, 100, 100)),
        ("tunnel", 16, 255, "construction", 2, False, True, (150, 120, 90)),
        ("pole", 17, 5, "object", 3, False, False, (153, 153, 153)),
        ("polegroup", 18, 255, "object", 3, False, True, (153, 153, 153)),
        ("traffic light", 19, 6, "object", 3, False, False, (250, 170, 30)),
        ("traffic sign", 20, 7, "object", 3, False, False, (220, 220, 0)),
        ("vegetation", 21, 8, "nature", 4, False, False, (107, 142, 35)),
        ("terrain", 22, 9, "nature", 4, False, False, (152, 251, 152)),
        ("sky", 23, 10, "sky", 5, False, False, (70, 130, 180)),
        ("person", 24, 11, "human", 6, True, False, (220, 20, 60)),
        ("rider", 25, 12, "human", 6, True, False, (255, 0, 0)),
        ("car", 26, 13, "vehicle", 7, True, False, (0, 0, 142)),
        ("truck", 27, 14, "vehicle", 7, True, False, (0, 0, 70)),
        ("bus", 28, 15, "vehicle", 7, True, False, (0, 60, 100)),
        ("caravan", 29, 255, "vehicle", 7, True, True, (0, 0, 90)),
        ("trailer", 30, 255, "vehicle", 7, True, True, (0, 0, 110)),
        ("train", 31, 16, "vehicle", 7, True, False, (0, 80, 100)),
        ("motorcycle", 32, 17, "vehicle", 7, True, False, (0, 0, 230)),
        ("bicycle", 33, 18, "vehicle", 7, True, False, (119, 11, 32)),
        ("license plate", -1, -1, "vehicle", 7, False, True, (0, 0, 142)),
    )
)

CITYSCAPES_TRAIN_LABELS: tuple[CityscapesLabel, ...] = tuple(
    sorted((label for label in CITYSCAPES_LABELS if 0 <= label.train_id < IGNORE_INDEX), key=lambda lb: lb.train_id)
)
"""The 19 evaluated classes, ordered by trainId."""

CITYSCAPES_ID2LABEL: dict[int, str] = {label.train_id: label.name for label in CITYSCAPES_TRAIN_LABELS}
CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = tuple(label.color for label in CITYSCAPES_TRAIN_LABELS)


def cityscapes_train_id_to_label_id() -> dict[int, int]:
    """Map each trainId (0..18) to its Cityscapes ``labelId``: the ids the benchmark server and cityscapesScripts'
    evaluator read from predictions."""
    return {label.train_id: label.id for label in CITYSCAPES_TRAIN_LABELS}


def cityscapes_label_id_to_train_id() -> dict[int, int]:
    """Map every non-negative Cityscapes ``labelId`` (0..33) to its trainId (0..18, or 255 = ignore)."""
    return {label.id: (label.train_id if 0 <= label.train_id < IGNORE_INDEX else IGNORE_INDEX)
            for label in CITYSCAPES_LABELS if label.id >= 0}


@dataclass(frozen=True)
class MapillaryLabel:
    name: str
    readable: str
    color: tuple[int, int, int]
    has_instances: bool
    evaluate: bool


# Mapillary Vistas v1.2: the ``labels`` list of the dataset's ``config.json`` (name, readable, color, instances,
# evaluate); the position in the list is the id stored in the v1.2 label PNGs. Transcribed from Mask2Former's
# ``register_mapillary_vistas.py`` (MIT); the colours equal the palette embedded in the official label PNGs. Used when a
# local copy has no config.json of its own.
MAPILLARY_V12_LABELS: tuple[MapillaryLabel, ...] = tuple(
    MapillaryLabel(*row)
    for row in (
        ("animal--bird", "Bird", (165, 42, 42), True, True),
        ("animal--ground-animal", "Ground Animal", (0, 192, 0), True, True),
        ("construction--barrier--curb", "Curb", (196, 196, 196), False, True),
        ("construction--barrier--fence", "Fence", (190, 153, 153), False, True),
        ("construction--barrier--guard-rail", "Guard Rail", (180, 165, 180), False, True),
        ("construction--barrier--other-barrier", "Barrier", (90, 120, 150), False, True),
        ("construction--barrier--wall", "Wall", (102, 102, 156), False, True),
        ("construction--flat--bike-lane", "Bike Lane", (128, 64, 255), False, True),
        ("construction--flat--crosswalk-plain", "Crosswalk - Plain", (140, 140, 200), True, True),
        ("construction--flat--curb-cut", "Curb Cut", (170, 170, 170), False, True),
        ("construction--flat--parking", "Parking", (250, 170, 160), False, True),
        ("construction--flat--pedestrian-area", "Pedestrian Area", (96, 96, 96), False, True),
        ("construction--flat--rail-track", "Rail Track", (230, 150, 140), False, True),
        ("construction--flat--road", "Road", (128, 64, 128), False, True),
        ("construction--flat--service-lane", "Service Lane", (110, 110, 110), False, True),
        ("construction--flat--sidewalk", "Sidewalk", (244, 35, 232), False, True),
        ("construction--structure--bridge", "Bridge", (150, 100, 100), False, True),
        ("construction--structure--building", "Building", (70, 70, 70), False, True),
        ("construction--structure--tunnel", "Tunnel", (150, 120, 90), False, True),
        ("human--person", "Person", (220, 20, 60), True, True),
        ("human--rider--bicyclist", "Bicyclist", (255, 0, 0), True, True),
        ("human--rider--motorcyclist", "Motorcyclist", (255, 0, 100), True, True),
        ("human--rider--other-rider", "Other Rider", (255, 0, 200), True, True),
        ("marking--crosswalk-zebra", "Lane Marking - Crosswalk", (200, 128, 128), True, True),
        ("marking--general", "Lane Marking - General", (255, 255, 255), False, True),
        ("nature--mountain", "Mountain", (64, 170, 64), False, True),
        ("nature--sand", "Sand", (230, 160, 50), False, True),
        ("nature--sky", "Sky", (70, 130, 180), False, True),
        ("nature--snow", "Snow", (190, 255, 255), False, True),
        ("nature--terrain", "Terrain", (152, 251, 152), False, True),
        ("nature--vegetation", "Vegetation", (107, 142, 35), False, True),
        ("nature--water", "Water", (0, 170, 30), False, True),
        ("object--banner", "Banner", (255, 255, 128), True, True),
        ("object--bench", "Bench", (250, 0, 30), True, True),
        ("object--bike-rack", "Bike Rack", (100, 140, 180), True, True),
        ("object--billboard", "Billboard", (220, 220, 220), True, True),
        ("object--catch-basin", "Catch Basin", (220, 128, 128), True, True),
        ("object--cctv-camera", "CCTV Camera", (222, 40, 40), True, True),
        ("object--fire-hydrant", "Fire Hydrant", (100, 170, 30), True, True),
        ("object--junction-box", "Junction Box", (40, 40, 40), True, True),
        ("object--mailbox", "Mailbox", (33, 33, 33), True, True),
        ("object--manhole", "Manhole", (100, 128, 160), True, True),
        ("object--phone-booth", "Phone Booth", (142, 0, 0), True, True),
        ("object--pothole", "Pothole", (70, 100, 150), False, True),
        ("object--street-light", "Street Light", (210, 170, 100), True, True),
        ("object--support--pole", "Pole", (153, 153, 153), True, True),
        ("object--support--traffic-sign-frame", "Traffic Sign Frame", (128, 128, 128), True, True),
        ("object--support--utility-pole", "Utility Pole", (0, 0, 80), True, True),
        ("object--traffic-light", "Traffic Light", (250, 170, 30), True, True),
        ("object--traffic-sign--back", "Traffic Sign (Back)", (192, 192, 192), True, True),
        ("object--traffic-sign--front", "Traffic Sign (Front)", (220, 220, 0), True, True),
        ("object--trash-can", "Trash Can", (140, 140, 20), True, True),
        ("object--vehicle--bicycle", "Bicycle", (119, 11, 32), True, True),
        ("object--vehicle--boat", "Boat", (150, 0, 255), True, True),
        ("object--vehicle--bus", "Bus", (0, 60, 100), True, True),
        ("object--vehicle--car", "Car", (0, 0, 142), True, True),
        ("object--vehicle--caravan", "Caravan", (0, 0, 90), True, True),
        ("object--vehicle--motorcycle", "Motorcycle", (0, 0, 230), True, True),
        ("object--vehicle--on-rails", "On Rails", (0, 80, 100), False, True),
        ("object--vehicle--other-vehicle", "Other Vehicle", (128, 64, 64), True, True),
        ("object--vehicle--trailer", "Trailer", (0, 0, 110), True, True),
        ("object--vehicle--truck", "Truck", (0, 0, 70), True, True),
        ("object--vehicle--wheeled-slow", "Wheeled Slow", (0, 0, 192), True, True),
        ("void--car-mount", "Car Mount", (32, 32, 32), False, True),
        ("void--ego-vehicle", "Ego Vehicle", (120, 10, 10), False, True),
        ("void--unlabeled", "Unlabeled", (0, 0, 0), False, False),
    )
)

MAPILLARY_V12_TRAIN_LABELS: tuple[MapillaryLabel, ...] = tuple(
    label for label in MAPILLARY_V12_LABELS if label.evaluate
)
"""The 65 evaluated classes (all but ``void--unlabeled``), ordered by label id; their training id is their position."""

MAPILLARY_V12_ID2LABEL: dict[int, str] = {
    index: label.readable for index, label in enumerate(MAPILLARY_V12_TRAIN_LABELS)
}
MAPILLARY_V12_PALETTE: tuple[tuple[int, int, int], ...] = tuple(label.color for label in MAPILLARY_V12_TRAIN_LABELS)
