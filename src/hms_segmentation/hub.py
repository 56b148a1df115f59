"""Share HMS models on the Hugging Face Hub: Hub-ready folders, model cards, and publishing in one commit.

    hms-segmentation push FOLDER REPO_ID [--private] [--token TOKEN] [--results results.json --dataset cityscapes]

A Hub-ready folder holds the weights (safetensors only), `config.json` with an `auto_map`, `preprocessor_config.json`,
the flat modules that `trust_remote_code=True` loads (`configuration_hms.py`, `modeling_hms.py`,
`image_processing_hms.py` and every sibling they import) and a model card (`README.md`). The card's `model-index` is
built from an evaluation JSON (what `hms-segmentation evaluate --output-dir` writes as `results.json`), never typed
by hand; without one the card says that the checkpoint is not evaluated.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .configuration_hms import HMSConfig
from .image_processing_hms import HMSImageProcessor
from .modeling_hms import HMSForSemanticSegmentation

logger = logging.getLogger(__name__)

PAPER_URL = "https://arxiv.org/abs/2005.10821"
ORIGINAL_REPOSITORY_URL = "https://github.com/NVIDIA/semantic-segmentation"
PACKAGE_LICENSE = "apache-2.0"
NVIDIA_LICENSE = "bsd-3-clause"
"""License of NVIDIA/semantic-segmentation (BSD 3-Clause), which its released checkpoints come with."""

CITATION = """@article{tao2020hierarchical,
  title   = {Hierarchical Multi-Scale Attention for Semantic Segmentation},
  author  = {Tao, Andrew and Sapra, Karan and Catanzaro, Bryan},
  journal = {arXiv preprint arXiv:2005.10821},
  year    = {2020}
}"""

LOCAL_MODEL_ID = "path/to/this/folder"
"""What the usage code of a card loads when the card is written before its repository is known; `push_to_hub`
replaces it with the repository id."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Files that may execute code when loaded: never published, never read by `push_to_hub`."""
ONNX_FOLDER = "onnx"
"""Where `hms-segmentation export-onnx` writes into a model folder, and `push_to_hub` publishes from (the layout of ONNX
files in Hub repositories)."""


@dataclass(frozen=True)
class DatasetDescription:
    """How a dataset is named in a model card: `name` for readers, `card_id` for the metadata and the model-index."""

    name: str
    card_id: str
    url: str | None = None


KNOWN_DATASETS: dict[str, DatasetDescription] = {
    "cityscapes": DatasetDescription("Cityscapes", "cityscapes", "https://www.cityscapes-dataset.com"),
    "mapillary": DatasetDescription(
        "Mapillary Vistas v1.2", "mapillary-vistas", "https://www.mapillary.com/dataset/vistas"
    ),
    "synthetic": DatasetDescription(
        "synthetic street scenes (hms-segmentation quickstart)", "hms-synthetic-street-scenes"
    ),
}
"""The datasets of `hms-segmentation train/evaluate --dataset`; any other name is used as given."""


def describe_dataset(dataset: str) -> DatasetDescription:
    """`KNOWN_DATASETS[dataset]`, or for another name that name, with a metadata id made of its lowercase letters,
    digits, ``_.-`` and dashes."""
    return KNOWN_DATASETS.get(dataset) or DatasetDescription(
        dataset, re.sub(r"[^a-z0-9_.-]+", "-", dataset.lower()).strip("-"))


class HubPublishingError(RuntimeError):
    """Publishing cannot start or did not finish; the message says why and what to do."""


# --- evaluation results -----------------------------------------------------------------------------------------


def load_evaluation_results(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """
    Read and check an evaluation JSON as `hms-segmentation evaluate --output-dir` writes it (`results.json`):
    `{"results": [{"scales": [...], "flip": bool, "mean_iou": float in [0, 1], "images": int, ...}, ...]}`, optionally
    with `"dataset"` and `"split"`.

    Args:
        source: The JSON file, or its already parsed content.

    Returns:
        The content, with `"source"` set to the file name (or `"evaluation results"`).
    """
    where = str(source) if isinstance(source, (str, Path)) else "evaluation results"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"evaluation results {path} do not exist (write them with "
                                    "`hms-segmentation evaluate --output-dir DIR`, which saves DIR/results.json)")
        try:
            content = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: expected the JSON that `hms-segmentation evaluate` writes, found invalid JSON "
                             f"({error})") from None
        where = path.name
    else:
        content = dict(source)
        where = content.get("source", where)
    rows = content.get("results") if isinstance(content, Mapping) else None
    if rows is None and isinstance(content, Mapping) and "results_by_model" in content:
        raise ValueError(f"{where}: holds the results of several models (`evaluate` with more than one --model); a "
                         "card describes one: evaluate that model alone (one --model) and give its results.json")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{where}: expected a JSON object with a non-empty 'results' list, found "
                         f"{type(content).__name__ if not isinstance(content, Mapping) else sorted(content)}")
    for index, row in enumerate(rows):
        _check_result_row(row, f"{where}: results[{index}]")
    return {**content, "source": where}


def _check_result_row(row: Any, where: str) -> None:
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected an object, found {type(row).__name__}")
    missing = [key for key in ("scales", "mean_iou") if key not in row]
    if missing:
        raise ValueError(f"{where}: lacks {missing} (found keys {sorted(row)})")
    scales = row["scales"]
    if not isinstance(scales, list) or not scales or not all(_is_number(s) and s > 0 for s in scales):
        raise ValueError(f"{where}: 'scales' must be a non-empty list of positive numbers, found {scales!r}")
    value = row["mean_iou"]
    if not _is_number(value) or not 0 <= value <= 1:
        raise ValueError(f"{where}: 'mean_iou' must be a fraction in [0, 1], found {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def result_from_trainer_metrics(
    metrics: Mapping[str, float], prefix: str, scales: Sequence[float], images: int, flip: bool = False
) -> dict[str, Any]:
    """
    One row of the evaluation JSON from `Trainer.evaluate(metric_key_prefix=prefix)` metrics, whose keys are
    `<prefix>_mean_iou`, `<prefix>_overall_accuracy`, `<prefix>_iou_<class>`, ... (see `make_compute_metrics`).
    """
    key = f"{prefix}_mean_iou"
    if key not in metrics:
        raise ValueError(f"metrics lack {key!r}; found {sorted(metrics)}")
    row: dict[str, Any] = {"scales": [float(s) for s in scales], "flip": flip, "images": int(images),
                           "mean_iou": float(metrics[key])}
    for name in ("mean_accuracy", "overall_accuracy"):
        if f"{prefix}_{name}" in metrics:
            row[name] = float(metrics[f"{prefix}_{name}"])
    iou_prefix = f"{prefix}_iou_"
    row["per_category_iou"] = {k[len(iou_prefix):]: float(v) for k, v in metrics.items() if k.startswith(iou_prefix)}
    return row


def scale_list_label(scales: Sequence[float], flip: bool = False, precision: str = "fp32") -> str:
    """How an evaluation run is named in tables and the model-index: "0.5,1.0,2.0", with " +flip" and the precision
    of an evaluation under autocast (" fp16", " bf16")."""
    return (",".join(str(float(s)) for s in scales) + (" +flip" if flip else "")
            + (f" {precision}" if precision != "fp32" else ""))


def _percent(value: float | None) -> str:
    """A table cell in %: "n/a" for what was not measured (null in results.json, NaN as computed: an absent class, or
    a split without a labelled pixel)."""
    return "n/a" if value is None or value != value else f"{100 * value:.1f}"


def markdown_table(results: list[dict]) -> str:
    """The per-class table of evaluation rows (`hms-segmentation evaluate` prints it, a card shows it): classes as
    rows, scale lists as columns (IoU in %), then mIoU, accuracy and time per image."""
    headers = [scale_list_label(r["scales"], r["flip"], r.get("precision", "fp32")) for r in results]
    lines = ["| class | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(results)]
    for name in results[0]["per_category_iou"]:
        cells = [r["per_category_iou"][name] for r in results]
        lines.append(f"| {name} | " + " | ".join(_percent(v) for v in cells) + " |")
    lines.append("| **mIoU** | " + " | ".join(f"**{_percent(r['mean_iou'])}**" for r in results) + " |")
    lines.append("| pixel accuracy | " + " | ".join(_percent(r["overall_accuracy"]) for r in results) + " |")
    lines.append("| s / image | " + " | ".join(f"{r['seconds_per_image']:.3f}" for r in results) + " |")
    if any("warm_up_seconds" in r for r in results):  # torch.compile's first call, kept out of the time per image
        lines.append("| first call s (compiles) | "
                     + " | ".join(f"{r['warm_up_seconds']:.1f}" if "warm_up_seconds" in r else "n/a" for r in results)
                     + " |")
    return "\n".join(lines) + "\n"


def _scales_text(row: Mapping[str, Any]) -> str:
    return scale_list_label(row["scales"], bool(row.get("flip")), row.get("precision", "fp32"))


def evaluation_to_eval_results(
    evaluation: Mapping[str, Any], dataset: DatasetDescription, split: str
) -> list[EvalResult]:
    """The model-index entries of an evaluation: per scale list, mIoU (and pixel accuracy when present), in %."""
    eval_results = []
    for row in evaluation["results"]:
        scales = _scales_text(row)
        metrics = [("mean_iou", f"mIoU (scales {scales})", row["mean_iou"])]
        if _is_number(row.get("overall_accuracy")):
            metrics.append(("accuracy", f"pixel accuracy (scales {scales})", row["overall_accuracy"]))
        for metric_type, metric_name, value in metrics:
            eval_results.append(
                EvalResult(
                    task_type="image-segmentation",
                    task_name="Semantic Segmentation",
                    dataset_type=dataset.card_id,
                    dataset_name=dataset.name,
                    dataset_split=split,
                    metric_type=metric_type,
                    metric_name=metric_name,
                    metric_config=f"scales={scales.replace(' +flip', ',flip')}",
                    metric_value=round(100 * float(value), 2),
                )
            )
    return eval_results


# --- model card -------------------------------------------------------------------------------------------------


def describe_trunk(config: HMSConfig) -> str:
    """The architecture in a few words, e.g. `HRNetV2-W48 + OCR`."""
    if config.trunk == "hrnet_ocr":
        if config.hrnet_preset:
            return f"HRNetV2-{config.hrnet_preset.upper()} + OCR"
        return f"HRNetV2 (branch widths {config.hrnet_stages[-1]['num_channels']}) + OCR"
    if config.trunk == "mobilenetv2_deeplabv3plus":
        return (f"MobileNetV2 (width {config.mobilenet_width_multiplier}, output stride "
                f"{config.mobilenet_output_stride}) + DeepLabV3+")
    if config.trunk == "backbone_deeplabv3plus":
        source = config.backbone or type(config.backbone_config).__name__.removesuffix("Config")
        return f"transformers backbone {source} + DeepLabV3+"
    return "dilated ResNet-50 (output stride 8) + DeepLabV3+"


def trunk_tags(config: HMSConfig) -> list[str]:
    """Hub tags of the architecture: trunk and decoder (a transformers backbone is tagged by its model type)."""
    if config.trunk == "hrnet_ocr":
        return ["hrnet", "ocr"]
    trunk = {"resnet50_deeplabv3plus": "resnet", "mobilenetv2_deeplabv3plus": "mobilenet-v2"}.get(config.trunk)
    if trunk is None:
        trunk = config.backbone_config.model_type.replace("_", "-")
    return [trunk, "deeplabv3plus"]


def build_model_card(
    config: HMSConfig,
    *,
    evaluation: str | Path | Mapping[str, Any] | None = None,
    dataset: str | None = None,
    split: str | None = None,
    repo_id: str | None = None,
    license: str = PACKAGE_LICENSE,
    training_details: Mapping[str, Any] | None = None,
    provenance: str | None = None,
    model_name: str | None = None,
    revision: str | None = None,
    onnx_graphs: Sequence[str] = (),
) -> ModelCard:
    """
    The model card of an HMS checkpoint, with `huggingface_hub`'s `ModelCard` / `ModelCardData`.

    Args:
        config: The checkpoint's config (architecture, classes, recipe settings).
        evaluation: Evaluation JSON (path or content, see `load_evaluation_results`); it fills the `model-index` and
            the results table. `None`: the card states that the checkpoint is not evaluated.
        dataset: Key of `KNOWN_DATASETS` (`cityscapes`, `mapillary`, `synthetic`) or a free name; defaults to the
            evaluation JSON's `"dataset"`. Required with `evaluation` when the JSON does not name it.
        split: The evaluated split; defaults to the JSON's `"split"`, else `"val"`.
        repo_id: Where the card will live; the usage code loads from it (a local folder path works as well).
        license: License identifier of the weights.
        training_details: Extra lines for the training recipe (e.g. steps, batch size, learning rate).
        provenance: One paragraph on where the weights come from (e.g. a converted NVIDIA checkpoint).
        model_name: Title and `model-index` name; defaults to the last part of `repo_id`, else ``hms-<trunk>``.
        revision: The branch the card will live on, when not the main one: the usage code loads from it.
        onnx_graphs: Paths in the repository of ONNX graphs from `hms-segmentation export-onnx` (e.g.
            ``onnx/model.onnx``): the card then says how to run them (see `onnx_section`).
    """
    evaluation, described, split = _evaluation_and_dataset(evaluation, dataset, split)
    model_id = repo_id or LOCAL_MODEL_ID
    # without a repository, the trunk names the model (the placeholder's last part would read "folder")
    model_name = model_name or (repo_id.rstrip("/").split("/")[-1] if repo_id else f"hms-{config.trunk.replace('_', '-')}")
    tags = ["hms-segmentation", "semantic-segmentation", "multi-scale-attention", "vision", *trunk_tags(config)]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-segmentation",
        license=license,
        datasets=[described.card_id] if described else None,
        tags=tags,
        model_name=model_name,
        eval_results=evaluation_to_eval_results(evaluation, described, split) if evaluation else None,
    )
    sections = [
        f"# {model_name}",
        _summary(config, described),
        provenance or "",
        "## Results\n\n" + _results_section(evaluation, described, split),
        "## How to use\n\n" + _usage_section(config, model_reference(model_id, revision)),
        onnx_section(onnx_graphs, model_reference(model_id, revision)) if onnx_graphs else "",
        "## Training recipe\n\n" + _recipe_section(config, training_details),
        "## Classes\n\n" + ", ".join(f"{index}: {name}" for index, name in sorted(config.id2label.items())),
        "## Credits\n\n" + _credits_section(),
    ]
    body = "\n\n".join(section.strip() for section in sections if section.strip())
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}\n")


def _evaluation_and_dataset(
    evaluation: str | Path | Mapping[str, Any] | None, dataset: str | None, split: str | None
) -> tuple[dict[str, Any] | None, DatasetDescription | None, str]:
    """The checked evaluation, the dataset (given, else the evaluation's) and the split (given, else the
    evaluation's, else "val"), as `build_model_card` documents them."""
    evaluation = load_evaluation_results(evaluation) if evaluation is not None else None
    dataset = dataset or (evaluation or {}).get("dataset")
    split = split or (evaluation or {}).get("split") or "val"
    if evaluation is not None and dataset is None:
        raise ValueError("dataset must be given (e.g. 'cityscapes'): the evaluation JSON does not name the dataset "
                         "it was measured on")
    return evaluation, describe_dataset(dataset) if dataset else None, split


def card_with_evaluation(
    card: ModelCard,
    evaluation: str | Path | Mapping[str, Any],
    *,
    dataset: str | None = None,
    split: str | None = None,
    model_name: str | None = None,
) -> ModelCard:
    """
    `card` (an existing model card, e.g. a converted checkpoint's with its provenance, or one edited by hand) with
    the results of `evaluation`: its `model-index` and datasets replaced, its "## Results" section replaced (or,
    when it has none, added before "## How to use", else at the end). Everything else is kept as written.

    Args:
        evaluation, dataset, split: As for `build_model_card`; the dataset defaults to the card's only known one.
        model_name: The `model-index` name when the card has none.
    """
    evaluation = load_evaluation_results(evaluation)
    known = {description.card_id: key for key, description in KNOWN_DATASETS.items()}
    card_datasets = card.data.datasets or []
    if not (dataset or evaluation.get("dataset")) and len(card_datasets) == 1 and card_datasets[0] in known:
        dataset = known[card_datasets[0]]
    evaluation, described, split = _evaluation_and_dataset(evaluation, dataset, split)
    section = "## Results\n\n" + _results_section(evaluation, described, split)
    text = card.text
    existing = re.search(r"^## Results[ \t]*\n.*?(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    usage = re.search(r"^## How to use[ \t]*$", text, flags=re.MULTILINE)
    if existing:
        text = f"{text[:existing.start()]}{section}\n\n{text[existing.end():]}"
    elif usage:
        text = f"{text[:usage.start()]}{section}\n\n{text[usage.start():]}"
    else:
        text = f"{text.rstrip()}\n\n{section}\n"
    data = card.data
    data.model_name = data.model_name or model_name or "hms-segmentation"
    data.eval_results = evaluation_to_eval_results(evaluation, described, split)
    data.datasets = [described.card_id]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{text}")


def _summary(config: HMSConfig, dataset: DatasetDescription | None) -> str:
    trained_on = f", trained on {dataset.name}" if dataset else ""
    return (
        f"Semantic segmentation with **Hierarchical Multi-Scale Attention** (HMSA, [Tao, Sapra, Catanzaro 2020]"
        f"({PAPER_URL})), here on {describe_trunk(config)}, predicting {config.num_labels} classes{trained_on}. "
        "At every scale it sees, the network predicts class logits and an attention map; the lower scale's attention "
        "decides per pixel how much of its prediction replaces the higher scales'. It is trained on two scales "
        f"({', '.join(map(str, config.training_scales))}) and chains any list of scales at inference (default "
        f"{', '.join(map(str, config.inference_scales))})."
    )


def _results_section(evaluation: Mapping[str, Any] | None, dataset: DatasetDescription | None, split: str) -> str:
    if evaluation is None:
        return ("Not evaluated yet: no mIoU is claimed. Run `hms-segmentation evaluate --model FOLDER --output-dir "
                "EVAL` and publish with `hms-segmentation push FOLDER REPO_ID --results EVAL/results.json` to fill "
                "this section and the model-index.")
    rows = evaluation["results"]
    images = {row.get("images") for row in rows}
    counted = f"{images.pop()} images of " if len(images) == 1 and None not in images else ""
    resized = evaluation.get("eval_long_side")
    size = f" (images and labels resized to a {resized}-pixel long side, as the reference evaluates)" if resized else ""
    header = (
        f"Measured on {counted}the {dataset.name} `{split}` split{size}; this table and the model-index are generated "
        f"from `{evaluation['source']}`. IoU in %, one column per list of chained scales."
    )
    if all(isinstance(row.get("per_category_iou"), Mapping) and "overall_accuracy" in row
           and "seconds_per_image" in row for row in rows):
        return header + "\n\n" + markdown_table(rows)
    lines = ["| scales | mIoU |", "|---|---:|"]
    lines += [f"| {_scales_text(row)} | {100 * row['mean_iou']:.1f} |" for row in rows]
    return header + "\n\n" + "\n".join(lines)


def model_reference(model_id: str, revision: str | None = None) -> str:
    """How the card's code names the model: `"user/name"`, with `revision="branch"` when it lives on a branch."""
    return f'"{model_id}"' + (f', revision="{revision}"' if revision else "")


def _usage_section(config: HMSConfig, reference: str) -> str:
    scales = ", ".join(map(str, config.inference_scales))
    return f"""The code next to the weights loads with `trust_remote_code=True`, without installing anything beyond
`transformers`, `torch` and `pillow`; with `pip install hms-segmentation` and `import hms_segmentation` the installed
classes are used instead.

```python
from PIL import Image
from transformers import pipeline

segmenter = pipeline("image-segmentation", model={reference}, trust_remote_code=True)
image = Image.new("RGB", (256, 128), (90, 120, 150))  # or Image.open("street.jpg")
for segment in segmenter(image):  # one mask per predicted class
    print(segment["label"], segment["mask"].size)
```

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

processor = AutoImageProcessor.from_pretrained({reference}, trust_remote_code=True)
model = AutoModelForSemanticSegmentation.from_pretrained({reference}, trust_remote_code=True).eval()
image = Image.new("RGB", (256, 128), (90, 120, 150))  # or Image.open("street.jpg")
inputs = processor(images=image, return_tensors="pt")
with torch.no_grad():
    outputs = model(pixel_values=inputs["pixel_values"], scales=[0.5, 1.0, 2.0])  # any list of scales
# original_sizes: (height, width) as shown, after the EXIF orientation the processor applies (image.size is not)
label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=inputs["original_sizes"])[0]
print(label_map.shape, [model.config.id2label[int(i)] for i in label_map.unique()])
```

Scales: `model(..., scales=[...])` per call; in a pipeline, set `segmenter.image_processor.inference_scales = [1.0]`
(the processor then passes `scales` to the model) or `segmenter.model.config.inference_scales` (default: {scales})."""


def onnx_section(graphs: Sequence[str], reference: str) -> str:
    """The card's section on the repository's ONNX graphs (`graphs`: their paths in it), with code that runs the first
    in onnxruntime; `reference` as `model_reference` gives it."""
    listed = ", ".join(f"`{graph}`" for graph in graphs)
    return f"""## ONNX

{listed}: the chained multi-scale inference exported by `hms-segmentation export-onnx`, for onnxruntime and other
runtimes: normalised images of any batch size, height and width in (`pixel_values`), the fused logits at the input's
size out (`logits`). Its scale list, flip and outputs are in the file's metadata (`hms_segmentation.*` keys).

```python
import onnxruntime
import torch
from huggingface_hub import hf_hub_download
from PIL import Image
from transformers import AutoImageProcessor

processor = AutoImageProcessor.from_pretrained({reference}, trust_remote_code=True)
session = onnxruntime.InferenceSession(hf_hub_download({reference}, filename="{graphs[0]}"))
image = Image.new("RGB", (256, 128), (90, 120, 150))  # or Image.open("street.jpg")
inputs = processor(images=image, return_tensors="np")
(logits,) = session.run(["logits"], {{"pixel_values": inputs["pixel_values"]}})
label_map = processor.post_process_semantic_segmentation({{"logits": torch.from_numpy(logits)}},
                                                         target_sizes=inputs["original_sizes"])[0]
```"""


def onnx_files(folder: str | Path) -> list[Path]:
    """The ONNX graphs in a model folder's `onnx/` (and the `.data` file of a graph over 2 GB), which `push_to_hub`
    publishes as they are; hidden entries (an export under way) are not among them."""
    onnx_folder = Path(folder) / ONNX_FOLDER
    if not onnx_folder.is_dir():
        return []
    return sorted(path for path in onnx_folder.iterdir() if path.is_file() and not path.name.startswith(".")
                  and path.name.endswith((".onnx", ".onnx.data")))


def _recipe_section(config: HMSConfig, training_details: Mapping[str, Any] | None) -> str:
    primary = ("RMI (sigmoid binary cross-entropy + region mutual information)" if config.primary_loss == "rmi"
               else "cross-entropy")
    lines = [
        f"- architecture: {describe_trunk(config)}, scale-attention head of {config.attention_bottleneck_channels} "
        "channels",
        f"- training scales: {', '.join(map(str, config.training_scales))} (the lower scale's attention gates the "
        "higher)",
        f"- loss: {primary} on the fused logits"
        + (f" + {config.ocr_aux_weight} x OCR auxiliary loss" if config.trunk == "hrnet_ocr" else "")
        + f" + {config.supervised_scale_weight} x cross-entropy on each scale's own prediction",
        f"- ignore index: {config.ignore_index}",
    ]
    lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in (training_details or {}).items()]
    return "\n".join(lines)


def _credits_section() -> str:
    return (
        f"- Paper: [Hierarchical Multi-Scale Attention for Semantic Segmentation]({PAPER_URL}) by Andrew Tao, "
        "Karan Sapra and Bryan Catanzaro (NVIDIA).\n"
        f"- Original implementation and released checkpoints: [NVIDIA/semantic-segmentation]({ORIGINAL_REPOSITORY_URL})"
        " (BSD 3-Clause).\n"
        "- This implementation: the `hms-segmentation` package, native to Hugging Face transformers.\n\n"
        f"```bibtex\n{CITATION}\n```"
    )


# --- Hub-ready folders ------------------------------------------------------------------------------------------


def write_hub_files(
    folder: str | Path,
    config: HMSConfig,
    *,
    image_processor: HMSImageProcessor | None = None,
    card: ModelCard | None = None,
    **card_kwargs: Any,
) -> None:
    """
    Add to a `save_pretrained` folder what the Hub needs besides the weights: `preprocessor_config.json` (with
    `image_processing_hms.py` and its siblings) and `README.md`, the card (`card`, or `build_model_card(config,
    **card_kwargs)`).
    """
    folder = Path(folder)
    (image_processor or HMSImageProcessor()).save_pretrained(folder)
    (card or build_model_card(config, **card_kwargs)).save(folder / "README.md")


def save_for_hub(
    model: HMSForSemanticSegmentation,
    folder: str | Path,
    *,
    image_processor: HMSImageProcessor | None = None,
    card: ModelCard | None = None,
    **card_kwargs: Any,
) -> Path:
    """Write a complete Hub-ready folder: safetensors weights, config + remote code, image processor, model card."""
    folder = Path(folder)
    model.save_pretrained(folder)
    write_hub_files(folder, model.config, image_processor=image_processor, card=card, **card_kwargs)
    check_hub_folder(folder)
    return folder


def check_model_source(source: str, argument: str = "--model") -> str:
    """`source` as given, once it can be a model: a folder with a ``config.json`` (a `save_pretrained` folder), or a
    name that is a valid Hub model id. Otherwise a `ValueError` naming `argument`, where transformers would answer a
    mistyped local path with "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    path = Path(source).expanduser()
    expected = "expected a save_pretrained folder (config.json, model.safetensors) or a Hub model id (owner/name)"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{argument} {source}: the folder has no config.json; {expected}")
        return source
    if path.exists():
        raise ValueError(f"{argument} {source} is a file; {expected}")
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise ValueError(f"{argument} {source}: no such folder, and not a Hub model id; {expected}") from None
    return source


WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)
"""The weight files `from_pretrained` reads from a folder."""
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def load_hms_model(source: str | Path, argument: str = "--model", **kwargs: Any) -> HMSForSemanticSegmentation:
    """
    `HMSForSemanticSegmentation.from_pretrained(source, **kwargs)` once `source` (see `check_model_source`) holds an
    HMS model whose weights cover it. transformers would load another model type's config with a warning (then stop
    on the first tensor of another shape, after a long report) and initialise missing tensors at random (with a
    warning only): a model that looks trained but is not.

    Raises:
        ValueError: Naming `argument`: no such folder or Hub id, a folder without weights, a config of another model
            type, or weights with missing, unexpected or mis-shaped tensors.
        OSError: The Hub files cannot be fetched (offline, no such repository).
    """
    source = check_model_source(str(source), argument)
    folder = Path(source).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(f"{argument} {source}: the folder has no weights (expected model.safetensors, written by "
                         f"save_pretrained next to config.json); found {sorted(p.name for p in folder.iterdir())}")
    config_dict, _ = HMSConfig.get_config_dict(source)
    model_type = config_dict.get("model_type")
    if model_type != HMSConfig.model_type:
        raise ValueError(f"{argument} {source}: its config.json describes a {model_type!r} model; expected an HMS "
                         f"model (model_type {HMSConfig.model_type!r}, as HMSForSemanticSegmentation.save_pretrained "
                         "writes it)")
    try:
        model, info = HMSForSemanticSegmentation.from_pretrained(source, output_loading_info=True, **kwargs)
    except RuntimeError as error:  # tensors of other shapes: transformers stops after printing its report
        raise ValueError(f"{argument} {source}: its weights do not fit its config.json "
                         f"({str(error).strip().splitlines()[0]})") from None
    problems = [f"{len(info[key])} {what} ({', '.join(sorted(map(str, info[key]))[:3])}"
                f"{', ...' if len(info[key]) > 3 else ''})"
                for key, what in (("missing_keys", "missing tensors"), ("unexpected_keys", "unexpected tensors"),
                                  ("mismatched_keys", "tensors of another shape")) if info.get(key)]
    if problems:
        raise ValueError(f"{argument} {source}: its weights do not fit its config.json: {'; '.join(problems)}; "
                         "transformers would initialise what is missing at random. Save the model again with "
                         "save_pretrained")
    return model


def check_hub_folder(folder: str | Path) -> list[Path]:
    """
    Check that `folder` is complete and safe to publish; return its files.

    Raises:
        HubPublishingError: Listing every problem: pickle files, missing safetensors weights, config, processor
        config, card, or a remote-code module that `auto_map` (or an import of a module) names but the folder lacks.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HubPublishingError(f"{folder} is not a folder")
    files = sorted(path for path in folder.rglob("*") if path.is_file() and ".cache" not in path.parts)
    names = {path.relative_to(folder).as_posix() for path in files}
    problems = []
    pickles = sorted(name for name in names if name.endswith(PICKLE_SUFFIXES))
    if pickles:
        problems.append(f"pickle files, which may run code when loaded (only safetensors are published): {pickles}")
    if not any(name.endswith(".safetensors") for name in names):
        problems.append("no *.safetensors weights")
    for required in ("config.json", "preprocessor_config.json", "README.md"):
        if required not in names:
            problems.append(f"no {required}")
    for json_name in ("config.json", "preprocessor_config.json"):
        if json_name in names:
            auto_map = json.loads((folder / json_name).read_text()).get("auto_map", {})
            if not auto_map:
                problems.append(f"{json_name} has no auto_map (remote code would not load)")
            for reference in auto_map.values():
                module = f"{reference.split('.')[0]}.py"
                if module not in names:
                    problems.append(f"{json_name} auto_map names {reference}, but {module} is missing")
    for module in sorted(name for name in names if name.endswith(".py")):
        for imported in re.findall(r"^\s*from \.(\w+) import", (folder / module).read_text(), flags=re.MULTILINE):
            if f"{imported}.py" not in names:
                problems.append(f"{module} imports .{imported}, but {imported}.py is missing")
    if problems:
        raise HubPublishingError(f"{folder} is not ready for the Hub:\n  " + "\n  ".join(problems))
    return files


# --- publishing -------------------------------------------------------------------------------------------------


def check_can_publish(repo_id: str, token: str | None = None) -> str:
    """The token to publish `repo_id` with, once publishing can work: not offline, a token given or logged in, a valid
    repository id; otherwise a `HubPublishingError` saying which (the training scripts ask before training)."""
    if hub_constants.is_offline_mode():
        raise HubPublishingError("cannot publish: the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE=1); unset "
                                 "it to push. Nothing was written or sent.")
    token = token or get_token()
    if not token:
        raise HubPublishingError("cannot publish: no Hugging Face token; pass --token (token=...) or log in with "
                                 "`hf auth login` (or set HF_TOKEN). Nothing was written or sent.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubPublishingError(f"repo_id {repo_id!r} is not a valid Hub repository id ({error})") from None
    return token


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    evaluation: str | Path | Mapping[str, Any] | None = None,
    dataset: str | None = None,
    split: str | None = None,
    license: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> str:
    """
    Publish a `save_pretrained` folder of an HMS model to `repo_id` in one commit.

    The folder is never modified: the files are staged in a temporary folder (the model re-saved as safetensors with
    its remote code, once `load_hms_model` found it an HMS model whose weights cover it, the image processor from
    `preprocessor_config.json` or the default one, the folder's `README.md` (with `evaluation`, its results section
    and model-index renewed by `card_with_evaluation`, the rest kept) or a card generated here when the folder has
    none, the ONNX graphs of its
    `onnx/` folder as they are (see `onnx_files`; the card then gains a section on them), checked with
    `check_hub_folder`, and sent with one `HfApi.create_commit`. The staging folder is removed whatever happens.

    Args:
        folder: A `save_pretrained` folder, e.g. a training run's output: its safetensors weights are read; pickle
            files and checkpoint folders are neither read nor published (see `left_out_files`).
        repo_id: `"user/name"` or `"org/name"`; created if missing.
        private: Create the repository as private.
        token: A Hugging Face token with write access; defaults to the logged-in one (`hf auth login`, `HF_TOKEN`).
        evaluation, dataset, split, license: For a generated card (see `build_model_card`). When the folder has a
            card, `evaluation` (and `split`) renew its results (see `card_with_evaluation`), and `license` and
            `dataset`, if given, replace those fields of its metadata, in the published copy.
        commit_message: Defaults to "Upload HMS model".
        revision: The branch to commit to (created from the main branch if missing); default: the main branch.

    Returns:
        The URL of the commit.

    Raises:
        HubPublishingError: Offline mode, no token, an invalid `repo_id`, an incomplete/unsafe folder, or one that
            is not an HMS model with all its weights (all before anything is written or sent), or a failed upload.
    """
    token = check_can_publish(repo_id, token)
    folder = Path(folder)
    _check_source_folder(folder)

    with tempfile.TemporaryDirectory(prefix="hms-push-") as staging_dir:
        staging = Path(staging_dir)
        try:
            model = load_hms_model(folder, "folder", use_safetensors=True)
        except ValueError as error:
            raise HubPublishingError(f"{error}. Nothing was written or sent.") from None
        processor = (HMSImageProcessor.from_pretrained(folder) if (folder / "preprocessor_config.json").is_file()
                     else HMSImageProcessor())
        card = None
        if (folder / "README.md").is_file():
            content = (folder / "README.md").read_text(encoding="utf-8")
            card = ModelCard(content.replace(f'"{LOCAL_MODEL_ID}"', model_reference(repo_id, revision)))
        if card is not None:  # the kept card takes what was asked for now (in the published copy only)
            if evaluation is not None:  # new results: its Results section and model-index, the rest as written
                card = card_with_evaluation(card, evaluation, dataset=dataset, split=split,
                                            model_name=repo_id.split("/")[-1])
            if license is not None:
                card.data.license = license
            if dataset is not None:
                card.data.datasets = [describe_dataset(dataset).card_id]
        graphs = onnx_files(folder)
        graph_paths = [f"{ONNX_FOLDER}/{path.name}" for path in graphs if path.name.endswith(".onnx")]
        if card is not None and graph_paths and "\n## ONNX\n" not in card.content:
            section = onnx_section(graph_paths, model_reference(repo_id, revision))
            card = ModelCard(f"{card.content.rstrip()}\n\n{section}\n")
        save_for_hub(
            model, staging, image_processor=processor, card=card, evaluation=evaluation, dataset=dataset,
            split=split, repo_id=repo_id, license=license or PACKAGE_LICENSE, revision=revision,
            onnx_graphs=graph_paths,
        )
        for path in graphs:
            (staging / ONNX_FOLDER).mkdir(exist_ok=True)
            shutil.copyfile(path, staging / ONNX_FOLDER / path.name)
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(staging).as_posix(), path_or_fileobj=str(path))
            for path in check_hub_folder(staging)
        ]
        unpublished = unpublished_files(folder, [operation.path_in_repo for operation in operations])
        if unpublished:  # e.g. a LICENSE or notes the user may expect on the Hub: say so rather than drop them
            logger.warning("not published (push sends the model, its image processor, remote code, card and ONNX "
                           "graphs only; upload others with `hf upload`): %s", ", ".join(unpublished))
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            commit = api.create_commit(
                repo_id, operations, commit_message=commit_message or "Upload HMS model", repo_type="model",
                revision=revision,
            )
        except Exception as error:  # network, permission, quota: one message naming the repository
            raise HubPublishingError(f"publishing to {repo_id} failed: {error}. Nothing was committed; the local "
                                     f"folder {folder} is unchanged.") from error
    return str(getattr(commit, "commit_url", commit))


def _check_source_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise HubPublishingError(f"{folder} has no config.json: expected a folder written by save_pretrained")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(path.name for path in folder.iterdir() if path.name.endswith(PICKLE_SUFFIXES))
        found = f"; its pickle files {pickles} are never loaded (they may run code)" if pickles else ""
        raise HubPublishingError(f"{folder} has no *.safetensors weights (only safetensors are read and published)"
                                 f"{found}: re-save the model with save_pretrained")


def left_out_files(folder: str | Path) -> list[str]:
    """Files of a model folder that `push_to_hub` neither reads nor publishes: pickles (``training_args.bin`` of a
    training run, ``pytorch_model.bin``, ...), which may run code when loaded, and checkpoint sub-folders."""
    folder = Path(folder)
    return sorted(path.name + ("/" if path.is_dir() else "") for path in folder.iterdir()
                  if path.name.endswith(PICKLE_SUFFIXES) or (path.is_dir() and path.name.startswith("checkpoint-")))


def unpublished_files(folder: str | Path, published: Sequence[str]) -> list[str]:
    """The entries of a model folder that a commit of the paths `published` leaves out, besides `left_out_files` (and
    hidden entries): a training run's ``all_results.json`` or ``runs/``, a ``LICENSE``, notes. Folders end in ``/``."""
    folder, published = Path(folder), set(published)
    skipped = set(left_out_files(folder))
    entries = []
    for path in sorted(folder.iterdir()):
        name = path.name + ("/" if path.is_dir() else "")
        if name in skipped or path.name.startswith(".") or path.name.endswith(WEIGHT_SUFFIXES):  # weights: re-saved
            continue
        if path.is_dir():
            inside = [child.relative_to(folder).as_posix() for child in path.rglob("*")
                      if child.is_file() and not child.name.startswith(".")]
            entries += [name] if not set(inside) <= published else []
        elif path.name not in published:
            entries.append(name)
    return entries


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hms-segmentation push",
        description="Publish a save_pretrained folder (weights, config, processor, remote code, card) in one commit.",
    )
    parser.add_argument("folder", type=Path, help="save_pretrained folder with safetensors weights")
    parser.add_argument("repo_id", help="Hub repository, e.g. user/hms-cityscapes")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", default=None, help="Hub token with write access (default: the logged-in one)")
    parser.add_argument("--results", type=Path, default=None,
                        help="results.json of `hms-segmentation evaluate`, for the card's model-index")
    parser.add_argument("--dataset", default=None,
                        help="dataset the model was trained and the results measured on (cityscapes, ...): the card's "
                             "metadata")
    parser.add_argument("--split", default=None, help="evaluated split (default: val)")
    parser.add_argument("--license", default=None,
                        help=f"license of the weights, in the card's metadata (default: the folder card's, else "
                             f"{PACKAGE_LICENSE})")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--revision", default=None, help="branch to commit to, created if missing (default: main)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        url = push_to_hub(
            args.folder, args.repo_id, private=args.private, token=args.token, evaluation=args.results,
            dataset=args.dataset, split=args.split, license=args.license, commit_message=args.commit_message,
            revision=args.revision,
        )
    except (HubPublishingError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    left_out = left_out_files(args.folder)
    if left_out:
        print(f"not published (pickles are never loaded, checkpoints stay local): {', '.join(left_out)}")
    graphs = ", ".join(path.relative_to(args.folder).as_posix() for path in onnx_files(args.folder))
    print(f"published {args.folder}{f' (with {graphs})' if graphs else ''} -> {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
