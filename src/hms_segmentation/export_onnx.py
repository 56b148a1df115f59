"""Export a model's chained multi-scale inference to ONNX, for onnxruntime, TensorRT and other runtimes.

    hms-segmentation export-onnx --model DIR_OR_HUB_ID [--output hms.onnx] [--scales 0.5,1.0,2.0] [--flip] [--labels]

The graph takes normalised images (what `HMSImageProcessor` gives) of any batch size, height and width, runs every
scale of the list and the attention chain, and returns the fused logits at the input's size (averaged with those of
the mirrored image with `--flip`, as `hms-segmentation evaluate --flip` scores them), plus the per-pixel class with
`--labels`. Before the file is written, onnxruntime runs it at two image sizes against the PyTorch model. By default
it goes into the model folder, as `onnx/model.onnx`, where `hms-segmentation push` publishes it with the model.
Needs the `onnx` extra: `pip install "hms-segmentation[onnx]"`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import SemanticSegmenterOutput

from .configuration_hms import validate_scales
from .hub import ONNX_FOLDER, check_model_source, load_hms_model
from .label_tables import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from .modeling_hms import HMSForSemanticSegmentation, average_with_mirrored

ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
MIN_EXAMPLE_SIDES = (128, 256)
"""The smallest example image (height, width): PyTorch specialises a feature map with a side of 1 to that size."""
MIN_OPSET = 18
"""The oldest ONNX opset PyTorch's (dynamo) exporter writes."""
RELATIVE_TOLERANCE = 1e-3
"""Largest allowed difference between onnxruntime's and PyTorch's logits, as a share of the largest logit (or of 1)."""


class HMSChainedInference(nn.Module):
    """
    What the exported graph computes: the chain over `scales` (the model's forward in eval mode, never tiled), averaged
    with the mirrored image's result when `flip`, and the per-pixel argmax when `with_labels`.

    Input: `pixel_values` (batch, 3, height, width), normalised. Output: `logits` (batch, num_labels, height, width),
    and with `with_labels` also `labels` (batch, height, width), int64 class indices.
    """

    def __init__(self, model: HMSForSemanticSegmentation, scales: list[float], flip: bool, with_labels: bool):
        super().__init__()
        self.model = model
        self.scales = list(scales)
        self.flip = flip
        self.with_labels = with_labels

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(pixel_values, scales=self.scales, return_dict=True).logits
        if self.flip:
            logits = average_with_mirrored(self.model, pixel_values, logits, scales=self.scales)
        if self.with_labels:
            return logits, logits.argmax(dim=1)
        return logits


@dataclass
class OnnxCheck:
    """How onnxruntime's result compared with PyTorch's at one input size."""

    size: tuple[int, int]
    max_difference: float
    """Largest absolute difference of the logits."""
    largest_logit: float
    label_agreement: float
    """Share of pixels whose argmax class is the same."""

    @property
    def passed(self) -> bool:
        return self.max_difference <= RELATIVE_TOLERANCE * max(1.0, self.largest_logit)


def _require_onnx_packages(modules: tuple[str, ...] = ONNX_MODULES, purpose: str = "ONNX export") -> None:
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"{purpose} needs {', '.join(missing)}, not installed; pip install \"hms-segmentation[onnx]\""
        )


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse (`ValueError`, `FileExistsError`) an output path that is a folder, or whose files exist and not
    `overwrite`: the graph, and the `.data` file of its weights that a graph over 2 GB needs."""
    if output.is_dir():
        raise ValueError(f"output {output} is a folder; expected the path of the .onnx file to write")
    existing = [str(path) for path in (output, output.with_name(output.name + ".data")) if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exists; pass --overwrite (overwrite=True) to replace it")


@contextlib.contextmanager
def _without_tiling(model: HMSForSemanticSegmentation) -> Iterator[None]:
    # a graph has one code path for every size: tiling, which depends on the size, stays off (config restored after)
    budget = model.config.tile_pixel_budget
    model.config.tile_pixel_budget = None
    try:
        yield
    finally:
        model.config.tile_pixel_budget = budget


def _name_dimensions(graph) -> None:
    """Name the symbolic sizes of the graph's inputs and outputs `batch`, `height` and `width`, as runtimes show them
    (the exporter numbers them)."""
    import onnx_ir

    shape = graph.inputs[0].shape
    names = {str(shape[axis]): name for axis, name in ((0, "batch"), (2, "height"), (3, "width"))}
    for value in [*graph.inputs, *graph.outputs]:
        value.shape = onnx_ir.Shape([
            onnx_ir.SymbolicDim(names.get(str(dim), str(dim))) if isinstance(dim, onnx_ir.SymbolicDim) else dim
            for dim in value.shape
        ])


_SIZE_ARITHMETIC_OPS = frozenset({"Mul", "Div", "Add", "Sub", "Neg", "Floor", "Ceil"})


def _size_arithmetic_in_float64(graph, scales: list[float]) -> bool:
    """
    Compute the graph's image-size arithmetic in float64, as PyTorch does: a scale's input size is
    `floor(height * scale)` in Python floats, which the exporter writes in float32 (`sym_float` casts to FLOAT and
    the scale becomes a FLOAT constant). For scales such as 0.7 or 1.3 that is a pixel off at some sizes (720 * 1.3:
    935 instead of 936), and every later map moves with it. The arithmetic between a size cast to float and its
    cast back to int64 is rewritten in DOUBLE; its constants become the scales they were rounded from (any other
    constant is widened as it is). Returns whether anything was rewritten; arithmetic holding any other operator is
    left as written, with a warning (the sizes may then be a pixel off).
    """
    import numpy as np
    import onnx_ir

    def is_size_to_float(node) -> bool:
        return (
            node.op_type == "Cast" and node.domain == "" and node.attributes["to"].as_int() == onnx_ir.DataType.FLOAT
            and node.inputs[0] is not None
            and node.inputs[0].dtype in (onnx_ir.DataType.INT64, onnx_ir.DataType.INT32)
        )

    def left_in_float32(reason: str) -> bool:
        warnings.warn(f"the exported graph computes image sizes in float32 ({reason}): for some scales and sizes they "
                      "may be a pixel off PyTorch's", stacklevel=3)
        return False

    # the arithmetic: every node downstream of a size cast to float, up to its casts back to int64
    region, pending, seen = [], [node for node in graph.all_nodes() if is_size_to_float(node)], set()
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        region.append(node)
        for output in node.outputs:
            if output.is_graph_output():
                return left_in_float32(f"{output.name} is an output")
            for consumer in output.consumers():
                if consumer.op_type == "Cast" and consumer.attributes["to"].as_int() == onnx_ir.DataType.INT64:
                    continue
                if consumer.op_type not in _SIZE_ARITHMETIC_OPS or consumer.domain != "":
                    return left_in_float32(f"a size goes through {consumer.op_type}")
                pending.append(consumer)
    # its other inputs must be constants
    produced = {id(output) for node in region for output in node.outputs}
    constants = {}
    for node in region:
        for value in node.inputs[1:] if node.op_type == "Cast" else node.inputs:
            if value is None or id(value) in produced or id(value) in constants:
                continue
            tensor = value.const_value
            producer = value.producer()
            if tensor is None and producer is not None and producer.op_type == "Constant":
                tensor = producer.attributes["value"].as_tensor() if "value" in producer.attributes else None
            if tensor is None:
                return left_in_float32(f"{node.op_type} of a size and the computed value {value.name}")
            constants[id(value)] = (value, tensor)
    if not region:
        return False
    exact = {float(np.float32(scale)): float(scale) for scale in scales}
    widened = {}
    for key, (value, tensor) in constants.items():
        array = np.vectorize(lambda x: exact.get(float(x), float(x)), otypes=[np.float64])(tensor.numpy())
        widened[key] = onnx_ir.Value(name=f"{value.name}_float64", shape=onnx_ir.Shape(array.shape),
                                     type=onnx_ir.TensorType(onnx_ir.DataType.DOUBLE),
                                     const_value=onnx_ir.tensor(array))
        graph.register_initializer(widened[key])
    for node in region:
        for index, value in enumerate(node.inputs):
            if value is not None and id(value) in widened:
                node.replace_input_with(index, widened[id(value)])
        if node.op_type == "Cast":
            node.attributes["to"] = onnx_ir.AttrInt64("to", onnx_ir.DataType.DOUBLE)
        for output in node.outputs:
            output.dtype = onnx_ir.DataType.DOUBLE
    for value, _ in constants.values():  # the float32 constants, now unused
        if value.is_initializer() and not value.uses() and not value.is_graph_output():
            del graph.initializers[value.name]
    return True


def onnx_metadata(
    model: HMSForSemanticSegmentation, scales: list[float], flip: bool, with_labels: bool
) -> dict[str, str]:
    """What a runtime needs to feed the graph and read its result, as the ONNX file's metadata (strings)."""
    return {
        "hms_segmentation.scales": ",".join(map(str, scales)),
        "hms_segmentation.flip": json.dumps(flip),
        "hms_segmentation.outputs": "logits,labels" if with_labels else "logits",
        "hms_segmentation.input": "pixel_values: float32 (batch, 3, height, width), RGB scaled to [0, 1], then "
                                  "(x - image_mean) / image_std; any height and width",
        "hms_segmentation.image_mean": json.dumps(list(IMAGENET_MEAN)),
        "hms_segmentation.image_std": json.dumps(list(IMAGENET_STD)),
        "hms_segmentation.id2label": json.dumps({str(k): v for k, v in model.config.id2label.items()}),
        "hms_segmentation.trunk": model.config.trunk,
        "hms_segmentation.align_corners": json.dumps(model.config.align_corners),
    }


@dataclass(frozen=True)
class ExportedGraphConfig:
    """What evaluation reads of a model's config, for a graph: from its metadata (`onnx_metadata`)."""

    id2label: dict[int, str]
    align_corners: bool = False
    ignore_index: int = IGNORE_INDEX

    @property
    def num_labels(self) -> int:
        return len(self.id2label)


class OnnxSegmenter:
    """
    A graph written by `export_onnx`, run by onnxruntime, called as `hms-segmentation evaluate` calls the model:
    `segmenter(pixel_values, scales=...)` gives an output whose `logits` are the graph's (batch, num_labels, height,
    width), on the input's device. The graph holds its scale list and flip (`scales`, `flip`): another scale list, the
    attention maps, tiling or a second (mirrored) pass are refused, as it cannot compute them.

    Args:
        path (`str` or `os.PathLike`): the `.onnx` file.
        providers (`list[str]`, *optional*): onnxruntime execution providers; default the CPU's.
    """

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None):
        _require_onnx_packages(("onnxruntime",), "Running an ONNX graph")
        import onnxruntime

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such ONNX file")
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), providers=providers or ["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for unreadable files
            raise ValueError(f"{self.path}: onnxruntime cannot load it as an ONNX graph ({error})") from error
        metadata = self.session.get_modelmeta().custom_metadata_map
        needed = ("hms_segmentation.scales", "hms_segmentation.flip", "hms_segmentation.id2label")
        missing = [key for key in needed if key not in metadata]
        if missing or "logits" not in [output.name for output in self.session.get_outputs()]:
            raise ValueError(f"{self.path}: not a graph written by hms-segmentation export-onnx (expected a `logits` "
                             f"output and the metadata {', '.join(needed)}; missing {', '.join(missing) or 'logits'})")
        self.scales = [float(scale) for scale in metadata["hms_segmentation.scales"].split(",")]
        self.flip = bool(json.loads(metadata["hms_segmentation.flip"]))
        self.config = ExportedGraphConfig(
            id2label={int(k): v for k, v in json.loads(metadata["hms_segmentation.id2label"]).items()},
            align_corners=bool(json.loads(metadata.get("hms_segmentation.align_corners", "false"))),
        )

    def __call__(self, pixel_values: torch.Tensor, scales: list[float] | None = None,
                 output_attentions: bool = False, **tiling: object) -> SemanticSegmenterOutput:
        if scales is not None and sorted(float(scale) for scale in scales) != sorted(self.scales):
            raise ValueError(f"{self.path} computes the chain over {','.join(map(str, self.scales))}, not over "
                             f"{','.join(map(str, scales))}; export the graph again with --scales for another list")
        if output_attentions:
            raise ValueError(f"{self.path} outputs no attention maps (they stay on PyTorch: evaluate the model folder)")
        if any(value is not None for value in tiling.values()):
            raise ValueError(f"{self.path} is never tiled (one code path for every size): leave the tiling options out")
        logits = self.session.run(["logits"], {"pixel_values": pixel_values.detach().float().cpu().numpy()})[0]
        return SemanticSegmenterOutput(logits=torch.from_numpy(logits).to(pixel_values.device))


def model_device(model: nn.Module) -> torch.device:
    """The device of `model`'s weights (the CPU for a model without parameters): where its inputs must be."""
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def check_against_pytorch(
    path: Path, graph: HMSChainedInference, sizes: list[tuple[int, int]], seed: int = 0
) -> list[OnnxCheck]:
    """Run the ONNX file at `path` in onnxruntime (CPU) and `graph` in PyTorch (on its weights' device) on the same
    random batch of two images `(2, 3, height, width)`, once per size; return how they compare."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    device = model_device(graph)
    checks = []
    for size in sizes:
        # drawn on the CPU, so that the batch is the same whatever the model's device
        pixel_values = torch.randn(2, 3, *size, generator=generator)
        with torch.no_grad():
            expected = graph(pixel_values.to(device))
        expected_logits = (expected[0] if graph.with_labels else expected).float().cpu()
        outputs = session.run(None, {"pixel_values": pixel_values.numpy()})
        logits = torch.from_numpy(outputs[0])
        labels = torch.from_numpy(outputs[1]) if graph.with_labels else logits.argmax(dim=1)
        checks.append(OnnxCheck(
            size=size,
            max_difference=float((logits - expected_logits).abs().max()),
            largest_logit=float(expected_logits.abs().max()),
            label_agreement=float((labels == expected_logits.argmax(dim=1)).float().mean()),
        ))
    return checks


def export_onnx(
    model: HMSForSemanticSegmentation,
    output: str | os.PathLike,
    scales: list[float] | None = None,
    flip: bool = False,
    with_labels: bool = False,
    example_size: tuple[int, int] = (256, 512),
    opset_version: int | None = None,
    check: bool = True,
    overwrite: bool = False,
) -> list[OnnxCheck]:
    """
    Export `model`'s chained inference over `scales` (default: `config.inference_scales`) to the ONNX file `output`,
    with symbolic batch size, height and width (see `HMSChainedInference` for inputs and outputs). The file (and its
    `.data` file, for a graph over 2 GB) appears only once complete and, with `check`, once onnxruntime gave PyTorch's
    result at `example_size` and at a smaller, odd size.

    Returns:
        The checks' results (empty without `check`).

    Raises:
        FileExistsError: `output` exists and not `overwrite`.
        ValueError: A model that is not float32, a bad scale list, example size or opset, or a check that failed (the
            file is then not written).
        ImportError: The ONNX packages are missing.
    """
    output = Path(output)
    if model.dtype != torch.float32:
        raise ValueError(f"export a float32 model (model.float()), got {model.dtype}: runtimes such as TensorRT choose "
                         "their own reduced precision from a float32 graph")
    scales = validate_scales(model.config.inference_scales if scales is None else scales, "scales")
    height, width = example_size
    if height < MIN_EXAMPLE_SIDES[0] or width < MIN_EXAMPLE_SIDES[1]:
        raise ValueError(f"example size {height}x{width} is too small: need at least {MIN_EXAMPLE_SIDES[0]}x"
                         f"{MIN_EXAMPLE_SIDES[1]} (no feature map may have a side of 1, which would fix that size)")
    if opset_version is not None and opset_version < MIN_OPSET:
        raise ValueError(f"opset {opset_version}: PyTorch's ONNX exporter writes opset {MIN_OPSET} or later")
    check_output(output, overwrite)
    _require_onnx_packages()

    was_training = model.training
    graph = HMSChainedInference(model, scales, flip, with_labels).eval()
    # symbolic sizes whose constraints PyTorch infers (named Dims would have to state them), renamed afterwards
    dims = {axis: torch.export.Dim.DYNAMIC for axis in (0, 2, 3)}
    # written beside the output and moved into place once complete (hidden: `push` never publishes it)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        # the exporter warns that torchvision's operators are skipped: this package never uses them
        registration_logger = logging.getLogger("torch.onnx._internal.exporter._registration")
        level = registration_logger.level
        registration_logger.setLevel(logging.ERROR)
        try:
            with _without_tiling(model), torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)  # PyTorch's own
                # the example input on the weights' device: a model on a GPU is traced there (a CPU input would
                # meet CUDA weights in the first convolution)
                example = torch.zeros(1, 3, height, width, device=model_device(model))
                program = torch.onnx.export(
                    graph, (example,), dynamo=True, verbose=False,
                    dynamic_shapes={"pixel_values": dims}, input_names=["pixel_values"],
                    output_names=["logits", "labels"] if with_labels else ["logits"], opset_version=opset_version,
                )
        finally:
            registration_logger.setLevel(level)
        written_opset = program.model.opset_imports.get("")
        if opset_version is not None and written_opset != opset_version:
            raise ValueError(f"opset {opset_version} was asked for, but PyTorch's exporter wrote opset "
                             f"{written_opset}; {output} was not written")
        _name_dimensions(program.model.graph)
        _size_arithmetic_in_float64(program.model.graph, scales)
        program.model.metadata_props.update(onnx_metadata(model, scales, flip, with_labels))
        program.save(str(staging / output.name))
        checks = []
        if check:
            odd_size = (height * 3 // 4 + 1, width * 3 // 4 + 3)
            with _without_tiling(model):
                checks = check_against_pytorch(staging / output.name, graph, [(height, width), odd_size])
            failed = [c for c in checks if not c.passed]
            if failed:
                # GPUs may convolve in TF32 (torch.backends.cudnn.allow_tf32), which differs from onnxruntime's float32
                on_gpu = model_device(model).type != "cpu"
                raise ValueError("the ONNX graph does not give PyTorch's result: " + "; ".join(
                    f"at {c.size[0]}x{c.size[1]} the logits differ by up to {c.max_difference:.3g} (largest logit "
                    f"{c.largest_logit:.3g}, tolerance {RELATIVE_TOLERANCE:g} of it)" for c in failed
                ) + f"; {output} was not written (--no-check writes it anyway"
                  + ("; or export model.cpu(), whose float32 the check compares exactly)" if on_gpu else ")"))
        for produced in sorted(staging.iterdir()):
            os.replace(produced, output.parent / produced.name)
        return checks
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        model.train(was_training)


def _example_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels (e.g. 256x512), got {text!r}") from None
    return height, width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hms-segmentation export-onnx", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="save_pretrained folder or Hub id")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"the .onnx file to write (default for a model folder: <folder>/{ONNX_FOLDER}/model.onnx, "
                             "which `hms-segmentation push` publishes)")
    parser.add_argument("--scales", default=None,
                        help="comma-separated scales of the chain (default: the model config's inference_scales)")
    parser.add_argument("--flip", action="store_true", help="average with the result of the mirrored image")
    parser.add_argument("--labels", action="store_true",
                        help="also output the per-pixel class (int64), the logits' argmax")
    parser.add_argument("--example-size", "--example_size", type=_example_size, default=(256, 512),
                        help="HEIGHTxWIDTH of the image the export traces (the graph takes any size); at least "
                             f"{MIN_EXAMPLE_SIDES[0]}x{MIN_EXAMPLE_SIDES[1]}")
    parser.add_argument("--opset", type=int, default=None,
                        help=f"ONNX opset version, {MIN_OPSET} or later (default: PyTorch's exporter's)")
    parser.add_argument("--no-check", "--no_check", dest="check", action="store_false",
                        help="skip comparing onnxruntime's result with PyTorch's before writing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        scales = None if args.scales is None else validate_scales(
            [s for s in args.scales.split(",") if s.strip()], "--scales")
        source = check_model_source(args.model)
        if args.output is None:
            if not Path(args.model).is_dir():
                raise ValueError(f"--output is needed for the Hub model {args.model} (the default is inside a local "
                                 "model folder)")
            args.output = Path(args.model) / ONNX_FOLDER / "model.onnx"
        check_output(args.output, args.overwrite)
        _require_onnx_packages()
        model = load_hms_model(source, "--model", dtype=torch.float32)  # refuses partial weights, other types
        start = time.perf_counter()
        checks = export_onnx(model, args.output, scales, args.flip, args.labels, args.example_size, args.opset,
                             args.check, args.overwrite)
    except (ValueError, FileExistsError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    scales = scales or model.config.inference_scales
    print(f"exported the chain over {','.join(map(str, scales))}{' + flip' if args.flip else ''} to {args.output} "
          f"({args.output.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.0f} s")
    for c in checks:
        print(f"  onnxruntime vs PyTorch at {c.size[0]}x{c.size[1]}: logits differ by up to {c.max_difference:.2g} "
              f"(largest {c.largest_logit:.3g}); same class at {100 * c.label_agreement:.2f}% of pixels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
