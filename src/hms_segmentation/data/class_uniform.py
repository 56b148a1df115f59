"""Class-uniform sampling (the reference recipe's ``CLASS_UNIFORM_PCT``): crops centred on rare classes.

Once per dataset, every label map is cut into tiles and, for each class present in a tile, one pixel of that class is
kept: the pixel nearest to the class's centre of mass in the tile. These *class centroids* are cached on disk under a
key made of a version, the settings and the size/time (or content hash) of every label, so the cache is rebuilt
whenever a label file changes.

During training a configurable fraction of crops is centred on a centroid:

- map-style: each epoch's plan, like the reference's ``build_epoch``, gives that fraction of its samples to the
  classes in equal shares, each class's crops centred on its centroids (anywhere in the dataset) taken in a shuffled
  order without replacement, and the rest to ordinary random crops of distinct images. One difference: the reference
  gives every class exactly ``int(N * fraction / C)`` crops and the remainder to random crops; here the remainder goes
  one crop each to randomly chosen classes, so that a small dataset (``N * fraction < C``) still gets its
  class-uniform share. ``C`` counts the classes that occur (the reference's epoch would shrink by an absent class's
  share);
- streaming: samples arrive one by one, so a crop is centred on a class present in the current image, chosen with
  probability proportional to 1 / (number of images that contain the class), which gives rare classes the same boost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from .hub import RAW_IMAGE_FEATURES
from .io import load_label

logger = logging.getLogger(__name__)

CENTROIDS_VERSION = 1
"""Bump when the centroid computation changes: old caches then no longer match."""

Centroid = tuple[int, int]  # (x, y) in image pixels


def class_uniform_centroids(label: np.ndarray, num_labels: int, tile_size: int = 1024) -> dict[int, list[Centroid]]:
    """Class centroids of one label map.

    Args:
        label: `(height, width)` training ids; values >= `num_labels` (ignore) are skipped.
        num_labels: Number of classes.
        tile_size: Tile edge in pixels; border tiles may be smaller (the reference drops them, which loses small
            images entirely).

    Returns:
        ``{class: [(x, y), ...]}``, one pixel of the class per tile where the class occurs; the pixel is the class's
        nearest to its centre of mass in that tile, so it always lies on the class (a plain centre of mass of a
        curved region may not).
    """
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    centroids: dict[int, list[Centroid]] = {}
    height, width = label.shape
    for top in range(0, height, tile_size):
        for left in range(0, width, tile_size):
            tile = label[top:top + tile_size, left:left + tile_size]
            flat = tile.ravel()
            counts = np.bincount(flat, minlength=256)[:num_labels]
            present = np.flatnonzero(counts)
            if present.size == 0:
                continue
            rows, columns = np.divmod(np.arange(flat.size), tile.shape[1])
            mean_y = np.bincount(flat, weights=rows, minlength=256)[present] / counts[present]
            mean_x = np.bincount(flat, weights=columns, minlength=256)[present] / counts[present]
            for class_id, center_x, center_y in zip(present.tolist(), mean_x, mean_y):
                pixels = np.flatnonzero(flat == class_id)
                nearest = pixels[np.argmin((rows[pixels] - center_y) ** 2 + (columns[pixels] - center_x) ** 2)]
                centroids.setdefault(class_id, []).append((left + int(columns[nearest]), top + int(rows[nearest])))
    return centroids


@dataclass
class ClassUniformOptions:
    """Class-uniform sampling settings (reference defaults).

    Args:
        fraction: Fraction of training crops centred on a class centroid (``CLASS_UNIFORM_PCT``); 0 disables.
        tile_size: Tile edge for the centroids (``CLASS_UNIFORM_TILE``).
        cache_dir: Where centroid files are cached; `None` computes them in memory every time.
    """

    fraction: float = 0.5
    tile_size: int = 1024
    cache_dir: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")


def _raw_rows(dataset: datasets.Dataset | datasets.IterableDataset, columns: list[str]):
    """Rows with undecoded images (``{"path", "bytes"}``), only the given columns."""
    dataset = dataset.select_columns(columns)
    return dataset.cast(datasets.Features({name: RAW_IMAGE_FEATURES[name] for name in columns}))


def _label_signature(value: dict) -> str:
    if value.get("bytes") is not None:
        return hashlib.sha1(value["bytes"]).hexdigest()
    stat = os.stat(value["path"])
    return f"{value['path']}:{stat.st_size}:{stat.st_mtime_ns}"


def _read_cache(path: Path) -> dict[str, dict[int, list[Centroid]]] | None:
    """The centroids of a cache file, or `None` when it is absent, of another version or unreadable (then rebuilt)."""
    if not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
        if cached.get("version") != CENTROIDS_VERSION:
            return None
        return {sample_id: {int(k): [tuple(p) for p in v] for k, v in per_class.items()}
                for sample_id, per_class in cached["centroids"].items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning("class centroid cache %s is unreadable (%r); computing the centroids again", path, error)
        return None


class ClassCentroidIndex:
    """Class centroids of every training image, keyed by sample id.

    Args:
        centroids: ``{sample_id: {class: [(x, y), ...]}}``.
        num_labels: Number of classes.
    """

    def __init__(self, centroids: dict[str, dict[int, list[Centroid]]], num_labels: int):
        self.centroids = centroids
        self.num_labels = num_labels
        self.by_class: dict[int, list[tuple[str, Centroid]]] = {}
        for sample_id, per_class in centroids.items():
            for class_id, points in per_class.items():
                self.by_class.setdefault(class_id, []).extend((sample_id, tuple(point)) for point in points)
        self.images_per_class = {class_id: sum(class_id in per_class for per_class in centroids.values())
                                 for class_id in self.by_class}

    @classmethod
    def build(
        cls,
        dataset: datasets.Dataset | datasets.IterableDataset,
        num_labels: int,
        options: ClassUniformOptions | None = None,
    ) -> ClassCentroidIndex:
        """Compute (or load from the cache) the centroids of every label in a dataset with ``id`` and ``label``."""
        options = options or ClassUniformOptions()
        rows = _raw_rows(dataset, ["id", "label"])
        cache_path = None
        if options.cache_dir is not None:
            key = hashlib.sha256(json.dumps(
                [CENTROIDS_VERSION, options.tile_size, num_labels,
                 [[row["id"], _label_signature(row["label"])] for row in rows]]).encode()).hexdigest()
            cache_path = Path(options.cache_dir) / f"class_uniform_centroids_{key[:20]}.json"
            cached = _read_cache(cache_path)
            if cached is not None:
                logger.info("loaded class centroids from %s", cache_path)
                return cls(cached, num_labels)
        centroids = {row["id"]: class_uniform_centroids(load_label(row["label"]), num_labels, options.tile_size)
                     for row in rows}
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            # one temporary file per process: ranks that build at the same time must not write into one file
            temporary = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            temporary.write_text(json.dumps({"version": CENTROIDS_VERSION, "tile_size": options.tile_size,
                                             "num_labels": num_labels, "centroids": centroids}))
            temporary.replace(cache_path)  # atomic: a concurrent reader never sees half a file
            logger.info("computed class centroids of %d images, cached in %s", len(centroids), cache_path)
        return cls(centroids, num_labels)

    def plan_epoch(self, sample_ids: Sequence[str], fraction: float, rng: np.random.Generator,
                   epoch_rows: int | None = None) -> list[tuple[int, Centroid | None]]:
        """One epoch of a map-style dataset: `(row index, centroid or None)` for each of its steps.

        The epoch has `epoch_rows` steps (default: one per row). `int(epoch_rows * fraction)` of them are shared
        equally by the classes that occur in the rows of `sample_ids` (the remainder, one more each, by randomly
        chosen classes), each class's share centred on its centroids in a shuffled order, without replacement until
        they are all used; the others are ordinary random crops of distinct rows among the first `epoch_rows`. The
        whole plan is shuffled. Rows beyond `epoch_rows` are thus only seen through their centroids: the reference's
        use of coarse (auto-labelled) frames, whose centroids join the fine frames' for some classes (see
        `restricted`).
        """
        if not 0.0 <= fraction <= 1.0:  # outside it, the plan would not have `epoch_rows` steps
            raise ValueError(f"fraction (the class-uniform share of the crops) must be in [0, 1], got {fraction}")
        epoch_rows = len(sample_ids) if epoch_rows is None else epoch_rows
        if not 0 <= epoch_rows <= len(sample_ids):
            raise ValueError(f"epoch_rows must be in [0, {len(sample_ids)}] (the number of rows), got {epoch_rows}")
        row_of = {sample_id: index for index, sample_id in enumerate(sample_ids)}
        entries_by_class = {class_id: [(row_of[sample_id], centroid) for sample_id, centroid in entries
                                       if sample_id in row_of] for class_id, entries in sorted(self.by_class.items())}
        classes = [class_id for class_id, entries in entries_by_class.items() if entries]
        num_uniform = int(epoch_rows * fraction) if classes else 0
        plan: list[tuple[int, Centroid | None]] = [
            (int(index), None) for index in rng.permutation(epoch_rows)[: epoch_rows - num_uniform]]
        if num_uniform:
            per_class, remainder = divmod(num_uniform, len(classes))
            counts = np.full(len(classes), per_class)
            counts[rng.permutation(len(classes))[:remainder]] += 1
            for class_id, count in zip(classes, counts):
                entries = entries_by_class[class_id]
                order = rng.permutation(len(entries))
                plan.extend(entries[order[step % len(entries)]] for step in range(count))
        return [plan[index] for index in rng.permutation(len(plan))]

    def restricted(self, sample_ids: Collection[str], classes: Collection[int]) -> ClassCentroidIndex:
        """This index with the images `sample_ids` keeping only their centroids of `classes` (e.g. auto-labelled frames
        that serve only the classes the reference boosts with them, ``COARSE_BOOST_CLASSES``)."""
        restricted_ids, kept_classes = set(sample_ids), set(classes)
        return ClassCentroidIndex({
            sample_id: {class_id: points for class_id, points in per_class.items()
                        if sample_id not in restricted_ids or class_id in kept_classes}
            for sample_id, per_class in self.centroids.items()}, self.num_labels)

    def choose_centroid(self, sample_id: str, rng: np.random.Generator) -> Centroid | None:
        """Streaming: a centroid of one of this image's classes, rarer ones (in fewer images) more likely.

        Returns `None` for an image without centroids (not in the index, or only ignored pixels).
        """
        per_class = self.centroids.get(sample_id)
        if not per_class:
            return None
        classes = sorted(per_class)
        weights = np.array([1.0 / self.images_per_class[class_id] for class_id in classes])
        class_id = classes[rng.choice(len(classes), p=weights / weights.sum())]
        points = per_class[class_id]
        return tuple(points[rng.integers(len(points))])
