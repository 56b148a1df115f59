"""Datasets, augmentations and sampling for HMSA training: Cityscapes, Mapillary Vistas, Hub/parquet, synthetic.

The usual path::

    from hms_segmentation.data import (
        CityscapesOptions, SegmentationTrainTransform, SegmentationTrainingStream, TrainAugmentationOptions,
        load_cityscapes, split_stream_for_rank,
    )

    stream = load_cityscapes("/data/cityscapes", "train", streaming=True, options=CityscapesOptions(num_shards=64))
    stream = split_stream_for_rank(stream, rank, world_size, seed=0)
    train = SegmentationTrainingStream(stream, SegmentationTrainTransform(TrainAugmentationOptions(crop_size=1024)),
                                       num_labels=19)
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for batch in torch.utils.data.DataLoader(train, batch_size=2, num_workers=4):
            ...  # batch["pixel_values"]: (2, 3, 1024, 1024), batch["labels"]: (2, 1024, 1024)

Without a dataset at hand, ``python -m hms_segmentation.data.synthesize --output-dir data_synthetic`` writes a
procedural street-scene dataset in the Cityscapes layout.
"""

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> submodule. Submodules load on first use, so that ``python -m hms_segmentation.data.synthesize`` starts
# fast (no torch / datasets import) and runpy does not find the module already imported by this package.
_PUBLIC_NAMES = {
    "BadSampleError": "io",
    "CityscapesOptions": "cityscapes",
    "ClassCentroidIndex": "class_uniform",
    "ClassUniformOptions": "class_uniform",
    "ColumnMapping": "hub",
    "EvalPreprocessingOptions": "transforms",
    "ImageHeader": "io",
    "LabelMapping": "io",
    "LoaderOptions": "builder",
    "MapillaryLabelSet": "mapillary",
    "SEGMENTATION_FEATURES": "builder",
    "SampleFiles": "builder",
    "SegmentationEvalTransform": "transforms",
    "SegmentationTrainTransform": "transforms",
    "SegmentationTrainingDataset": "training",
    "SegmentationTrainingStream": "training",
    "SyntheticDatasetOptions": "synthesize",
    "TrainAugmentationOptions": "transforms",
    "cityscapes_label_mapping": "cityscapes",
    "class_uniform_centroids": "class_uniform",
    "find_cityscapes_samples": "cityscapes",
    "find_mapillary_samples": "mapillary",
    "load_cityscapes": "cityscapes",
    "load_hub_dataset": "hub",
    "load_image": "io",
    "load_label": "io",
    "load_mapillary": "mapillary",
    "load_sample": "io",
    "mapillary_label_set": "mapillary",
    "read_image_header": "io",
    "read_label_header": "io",
    "sample_generator": "transforms",
    "split_stream_for_rank": "training",
    "synthesize_cityscapes": "synthesize",
    "write_parquet_shards": "hub",
}

__all__ = sorted(_PUBLIC_NAMES)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC_NAMES:
        return getattr(importlib.import_module(f".{_PUBLIC_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:
    from .builder import SEGMENTATION_FEATURES, LoaderOptions, SampleFiles
    from .cityscapes import CityscapesOptions, cityscapes_label_mapping, find_cityscapes_samples, load_cityscapes
    from .class_uniform import ClassCentroidIndex, ClassUniformOptions, class_uniform_centroids
    from .hub import ColumnMapping, load_hub_dataset, write_parquet_shards
    from .io import (
        BadSampleError,
        ImageHeader,
        LabelMapping,
        load_image,
        load_label,
        load_sample,
        read_image_header,
        read_label_header,
    )
    from .mapillary import MapillaryLabelSet, find_mapillary_samples, load_mapillary, mapillary_label_set
    from .synthesize import SyntheticDatasetOptions, synthesize_cityscapes
    from .training import SegmentationTrainingDataset, SegmentationTrainingStream, split_stream_for_rank
    from .transforms import (
        EvalPreprocessingOptions,
        SegmentationEvalTransform,
        SegmentationTrainTransform,
        TrainAugmentationOptions,
        sample_generator,
    )
