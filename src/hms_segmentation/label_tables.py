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


def cityscapes_label_id_to_train_id() -> dict[int, int]:
    """Map every non-negative Cityscapes ``labelId`` (0..33) to its trainId (0..18, or 255 = ignore)."""
    return {label.id: (label.train_id if 0 <= label.train_id < IGNORE_INDEX else IGNORE_INDEX)
            for label in CITYSCAPES_LABELS if label.id >= 0}
