"""`hms-segmentation export-onnx`: the chained inference as an ONNX graph that onnxruntime runs at any size, giving
what `hms-segmentation evaluate` scores."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import require_shared
from PIL import Image
from tiny_configs import TINY_HRNET, TINY_RESNET, save_tiny_model

from hms_segmentation import HMSConfig, HMSForSemanticSegmentation, HMSImageProcessor
from hms_segmentation import export_onnx as export_module
from hms_segmentation.cli import main as cli_main
from hms_segmentation.data.transforms import SegmentationEvalTransform
from hms_segmentation.export_onnx import export_onnx
from hms_segmentation.training.evaluate import predict


@pytest.fixture(scope="module")
def tiny_deeplab_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_deeplab"), TINY_RESNET, num_labels=19)


@pytest.fixture(scope="module")
def exported(tiny_deeplab_dir, tmp_path_factory) -> tuple[Path, str]:
    """The tiny DeepLabV3+ model's chain over 0.5, 1.0, 2.0 with flip and labels, exported by the command into (a copy
    of) its folder, the default place; returns the file and what the command printed."""
    folder = tmp_path_factory.mktemp("export") / "model"
    shutil.copytree(tiny_deeplab_dir, folder)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli_main(["export-onnx", "--model", str(folder), "--scales", "0.5,1.0,2.0", "--flip", "--labels"]) == 0
    return folder / "onnx" / "model.onnx", printed.getvalue()


def test_the_exported_chain_with_flip_gives_what_evaluate_scores(tiny_deeplab_dir, exported):
    output, printed = exported
    assert re.search(r"exported the chain over 0\.5,1\.0,2\.0 \+ flip to .*model/onnx/model\.onnx", printed)
    checks = r"onnxruntime vs PyTorch at (256x512|193x387): .* same class at (99\.9\d|100\.00)% of pixels"
    assert len(re.findall(checks, printed)) == 2
    assert sorted(p.name for p in output.parent.iterdir()) == ["model.onnx"]  # no staging folder left

    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("pixel_values", ["batch", 3, "height", "width"])]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("logits", ["batch", 19, "height", "width"]),
                                                                  ("labels", ["batch", "height", "width"])]
    metadata = session.get_modelmeta().custom_metadata_map
    assert metadata["hms_segmentation.scales"] == "0.5,1.0,2.0" and json.loads(metadata["hms_segmentation.flip"])
    assert json.loads(metadata["hms_segmentation.image_mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert len(json.loads(metadata["hms_segmentation.id2label"])) == 19
    assert json.loads(metadata["hms_segmentation.align_corners"]) is False  # how evaluate resizes the logits

    model = HMSForSemanticSegmentation.from_pretrained(tiny_deeplab_dir).eval()
    frame = require_shared("data", "cityscapes_sample", "leftImg8bit", "val", "frankfurt",
                           "frankfurt_000000_000294_leftImg8bit.png")
    real = SegmentationEvalTransform()(Image.open(frame).convert("RGB"))["pixel_values"][None]  # 128x256
    odd = torch.randn(2, 3, 97, 161, generator=torch.Generator().manual_seed(0))  # another batch size, odd sides
    for pixel_values in (real, odd):
        with torch.no_grad():
            expected = predict(model, pixel_values, [0.5, 1.0, 2.0], flip=True)
        logits, labels = session.run(None, {"pixel_values": pixel_values.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)
        assert np.array_equal(labels, logits.argmax(axis=1))
        # the same classes but where another processor's float rounding may tip a near-tie of the random model
        assert (labels == expected.argmax(dim=1).numpy()).mean() > 0.999


def test_the_readme_runs_the_exported_graph_on_a_photo(tiny_deeplab_dir, exported, tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Deployment: ONNX", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    shutil.copytree(exported[0].parent.parent, tmp_path / "hms_quickstart" / "model")  # with onnx/model.onnx
    HMSImageProcessor().save_pretrained(tmp_path / "hms_quickstart" / "model")  # as the quickstart's folder has it
    photo = Image.open(require_shared("data", "street_photos", "sf.jpg"))  # 1920x1080: a quarter of it is enough
    photo.resize((480, 270)).save(tmp_path / "street.jpg")
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(compile(snippet, "README.md", "exec"), names)
    assert names["labels"].shape == (270, 480) and names["labels"].dtype == torch.int64
    model = HMSForSemanticSegmentation.from_pretrained(tiny_deeplab_dir).eval()
    with torch.no_grad():
        logits = predict(model, torch.from_numpy(names["inputs"]["pixel_values"]), [0.5, 1.0, 2.0], flip=True)
    expected = names["processor"].post_process_semantic_segmentation({"logits": logits}, target_sizes=[(270, 480)])[0]
    assert (names["labels"] == expected).float().mean() > 0.999  # the same but for near-ties of the random model


def test_hrnet_ocr_exports_its_config_scales_untiled_and_leaves_the_model_as_it_was(tmp_path):
    torch.manual_seed(0)
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_HRNET, inference_scales=[0.5, 1.0], tile_pixel_budget=4096,
                                                 tile_size=64, tile_overlap=16)).train()
    checks = export_onnx(model, tmp_path / "hrnet.onnx")
    assert [c.size for c in checks] == [(256, 512), (193, 387)] and all(c.passed for c in checks)
    assert model.training and model.config.tile_pixel_budget == 4096  # the user's model and config as they were
    session = onnxruntime.InferenceSession(str(tmp_path / "hrnet.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["hms_segmentation.scales"] == "0.5,1.0"
    pixel_values = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))  # smaller than the example
    with torch.no_grad():
        expected = model.eval()(pixel_values, scales=[0.5, 1.0], tile_pixel_budget=None).logits
    (logits,) = session.run(None, {"pixel_values": pixel_values.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)


def test_a_graph_that_fails_its_check_is_not_written(tiny_deeplab_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "RELATIVE_TOLERANCE", -1.0)  # no difference passes
    model = HMSForSemanticSegmentation.from_pretrained(tiny_deeplab_dir)
    with pytest.raises(ValueError, match=r"does not give PyTorch's result: at 256x512 the logits differ by up to .*"
                                         r"hms\.onnx was not written \(--no-check writes it anyway\)"):
        export_onnx(model, tmp_path / "hms.onnx", scales=[1.0])
    assert list(tmp_path.iterdir()) == []
    assert export_onnx(model, tmp_path / "hms.onnx", scales=[1.0], check=False) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hms.onnx"]


@pytest.mark.parametrize("argv, message", [
    (["--scales", "0.5,-1"], r"--scales must be a non-empty list of positive"),
    (["--example-size", "64x128"], r"example size 64x128 is too small: need at least 128x256"),
    (["--model", "no/such/folder"], r"--model no/such/folder: no such folder"),
    (["--opset", "17"], r"opset 17: PyTorch's ONNX exporter writes opset 18 or later"),
])
def test_bad_arguments_are_named_before_anything_is_written(tiny_deeplab_dir, tmp_path, capsys, argv, message):
    base = {"--model": str(tiny_deeplab_dir), "--output": str(tmp_path / "hms.onnx")}
    base.update(dict(zip(argv[::2], argv[1::2])))
    assert cli_main(["export-onnx", *[item for pair in base.items() for item in pair]]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_never_replaced_without_overwrite(tiny_deeplab_dir, tmp_path, capsys):
    output = tmp_path / "hms.onnx"
    output.write_bytes(b"the user's earlier export")
    (tmp_path / "folder.onnx").mkdir()
    assert cli_main(["export-onnx", "--model", str(tiny_deeplab_dir), "--output", str(output)]) == 2
    assert "hms.onnx already exists; pass --overwrite" in capsys.readouterr().err
    assert output.read_bytes() == b"the user's earlier export"
    assert cli_main(["export-onnx", "--model", str(tiny_deeplab_dir), "--output", str(tmp_path / "folder.onnx")]) == 2
    assert "is a folder; expected the path of the .onnx file" in capsys.readouterr().err
    model = HMSForSemanticSegmentation.from_pretrained(tiny_deeplab_dir)
    with pytest.raises(ValueError, match=r"export a float32 model \(model.float\(\)\), got torch.bfloat16"):
        export_onnx(model.to(torch.bfloat16), tmp_path / "bf16.onnx")


def test_missing_onnx_packages_are_named_with_the_extra_to_install(tiny_deeplab_dir, tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "onnxscript" else find_spec(name, *args))
    assert cli_main(["export-onnx", "--model", str(tiny_deeplab_dir), "--output", str(tmp_path / "hms.onnx")]) == 2
    assert 'ONNX export needs onnxscript, not installed; pip install "hms-segmentation[onnx]"' in \
        capsys.readouterr().err
    # evaluating a graph needs onnxruntime only
    assert cli_main(["evaluate", "--model", str(tmp_path / "hms.onnx"), "--data-dir", str(tmp_path / "data")]) == 2
    assert "no such ONNX file" in capsys.readouterr().err
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "onnxruntime" else find_spec(name, *args))
    assert cli_main(["evaluate", "--model", str(tmp_path / "hms.onnx"), "--data-dir", str(tmp_path / "data")]) == 2
    assert 'Running an ONNX graph needs onnxruntime, not installed; pip install "hms-segmentation[onnx]"' in \
        capsys.readouterr().err


@pytest.mark.parametrize("card", ["generated", "the folder's"])
def test_a_graph_exported_into_the_model_folder_is_published_with_it(exported, tmp_path, monkeypatch, card):
    import huggingface_hub
    from fake_hub import install_fake_hub

    from hms_segmentation.hub import push_to_hub, save_for_hub

    fake_hub = install_fake_hub(monkeypatch)
    folder = tmp_path / "model"
    model = HMSForSemanticSegmentation.from_pretrained(exported[0].parent.parent)
    if card == "generated":
        model.save_pretrained(folder)
    else:  # a card without the ONNX section, as a training run writes it
        save_for_hub(model, folder)
    (folder / "onnx").mkdir()
    shutil.copy(exported[0], folder / "onnx" / "model.onnx")
    (folder / "onnx" / ".model.onnx.partial").mkdir()  # an export under way is not published
    if card == "generated":
        push_to_hub(folder, "someone/hms-tiny", token="hf_test")
    else:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert cli_main(["push", str(folder), "someone/hms-tiny", "--token", "hf_test"]) == 0
        assert f"published {folder} (with onnx/model.onnx) -> https://huggingface.co/" in printed.getvalue()
    (commit,) = fake_hub.instances[0].commits
    assert commit["files"]["onnx/model.onnx"] == exported[0].read_bytes()
    assert not [name for name in commit["files"] if "partial" in name]
    readme = commit["files"]["README.md"].decode()
    assert readme.count("## ONNX") == 1 and "`onnx/model.onnx`: the chained multi-scale inference" in readme

    # the card's code, run against the local folder instead of the Hub
    (snippet,) = re.findall(r"```python\n(.*?)```", readme.split("## ONNX", 1)[1], flags=re.DOTALL)[:1]
    HMSImageProcessor().save_pretrained(folder)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename, **_: str(Path(repo) / filename))
    names: dict = {}
    exec(compile(snippet.replace('"someone/hms-tiny"', repr(str(folder))), "README.md", "exec"), names)
    assert names["label_map"].shape == (128, 256)


@pytest.mark.parametrize("trunk", ["mobilenetv2", "transformers_convnext"])
def test_the_small_budget_trunks_export_too(trunk, tmp_path):
    from test_trunks import SLIM_DECODER, TINY_BACKBONES, TINY_MOBILENET

    torch.manual_seed(0)
    config = TINY_MOBILENET if trunk == "mobilenetv2" else {
        "backbone_config": TINY_BACKBONES["convnext"].to_dict(), **SLIM_DECODER}
    checks = export_onnx(HMSForSemanticSegmentation(HMSConfig(**config)), tmp_path / "hms.onnx", scales=[0.5, 1.0])
    assert len(checks) == 2 and all(check.passed and check.label_agreement > 0.999 for check in checks)


def test_evaluate_scores_the_exported_graph_as_the_model_in_one_table(tiny_deeplab_dir, exported, tmp_path):
    """`evaluate --model torch=DIR --model ort=GRAPH`: the deployed graph's figures beside the model's; the graph's own
    scale list and flip are the defaults."""
    from test_training import ensure_tiny_synthetic

    from hms_segmentation.training.evaluate import main as evaluate_main

    data_dir = ensure_tiny_synthetic(tmp_path / "data")
    graph = exported[0]
    common = ["--data-dir", str(data_dir), "--flip", "--no-progress"]
    assert evaluate_main(["--model", f"torch={tiny_deeplab_dir}", "--model", f"ort={graph}", *common,
                          "--output-dir", str(tmp_path / "both")]) == 0
    results = json.loads((tmp_path / "both" / "results.json").read_text())["results_by_model"]
    (by_torch,), (by_graph,) = results["torch"], results["ort"]
    assert by_torch["scales"] == by_graph["scales"] == [0.5, 1.0, 2.0] and by_torch["flip"] and by_graph["flip"]
    assert by_graph["runtime"] == "onnxruntime" and by_graph["images"] == 2
    assert by_graph["mean_iou"] == pytest.approx(by_torch["mean_iou"], abs=1e-3)
    for name, iou in by_torch["per_category_iou"].items():
        assert (iou is None and by_graph["per_category_iou"][name] is None) or \
            by_graph["per_category_iou"][name] == pytest.approx(iou, abs=1e-3), name
    assert "| 0.5,1.0,2.0 +flip |" in (tmp_path / "both" / "results.md").read_text()
    # the graph alone, its predictions saved: those of the model's evaluation
    assert evaluate_main(["--model", str(graph), *common, "--save-predictions", str(tmp_path / "by_graph"),
                          "--prediction-format", "train_ids"]) == 0
    assert evaluate_main(["--model", str(tiny_deeplab_dir), *common, "--scales", "0.5,1.0,2.0", "--save-predictions",
                          str(tmp_path / "by_torch"), "--prediction-format", "train_ids"]) == 0
    saved = sorted(path.name for path in (tmp_path / "by_torch").iterdir())
    assert saved == sorted(path.name for path in (tmp_path / "by_graph").iterdir()) and len(saved) == 2
    for name in saved:
        agreement = (np.asarray(Image.open(tmp_path / "by_graph" / name)) ==
                     np.asarray(Image.open(tmp_path / "by_torch" / name))).mean()
        assert agreement > 0.999, name  # the same but for near-ties of the random model
    # a graph that another tool changed and kept the metadata of: onnxruntime's int8 quantisation
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(graph, tmp_path / "int8.onnx", weight_type=QuantType.QInt8)
    assert evaluate_main(["--model", f"int8={tmp_path / 'int8.onnx'}", *common, "--output-dir", str(tmp_path / "q"),
                          "--scales", "2.0,0.5,1.0"]) == 0  # the same chain, written in another order
    (quantized,) = json.loads((tmp_path / "q" / "results.json").read_text())["results"]
    assert quantized["runtime"] == "onnxruntime" and 0 <= quantized["mean_iou"] <= 1


@pytest.mark.parametrize("flags, message", [
    (["--scales", "1.0"], r"computes the chain over 0\.5,1\.0,2\.0 only: pass --scales 0\.5,1\.0,2\.0"),
    ([], r"was exported with --flip: evaluate it with --flip"),
    (["--flip", "--precision", "bf16"], r"--precision bf16: --model .*model\.onnx runs in the precision it holds"),
    (["--flip", "--scale-shares"], r"--scale-shares needs the attention maps, which --model .* does not output"),
    (["--flip", "--save-visuals", "VISUALS"], r"--save-visuals needs the attention maps"),
    (["--flip", "--tile_pixel_budget", "4096"], r"--tile_pixel_budget: --model .* is never tiled"),
    (["--flip", "--torch-compile"], r"--torch-compile: --model .*model\.onnx runs in onnxruntime"),
], ids=["scales", "flip", "precision", "scale_shares", "visuals", "tiling", "torch_compile"])
def test_evaluate_refuses_what_a_graph_cannot_give(exported, tmp_path, capsys, flags, message):
    from hms_segmentation.training.evaluate import main as evaluate_main

    flags = [str(tmp_path / "visuals") if flag == "VISUALS" else flag for flag in flags]
    assert evaluate_main(["--model", str(exported[0]), "--data-dir", str(tmp_path / "data"), *flags]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "data").exists()  # refused before the dataset is made


def test_evaluate_names_an_onnx_file_it_cannot_use(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    from hms_segmentation.training.evaluate import main as evaluate_main

    def refused(path: Path) -> str:
        assert evaluate_main(["--model", str(path), "--data-dir", str(tmp_path / "data")]) == 2
        return capsys.readouterr().err

    assert re.search(r"missing\.onnx: no such ONNX file", refused(tmp_path / "missing.onnx"))
    (tmp_path / "broken.onnx").write_bytes(b"not a protobuf")
    assert re.search(r"broken\.onnx: onnxruntime cannot load it as an ONNX graph", refused(tmp_path / "broken.onnx"))
    # a valid graph, but not one of export-onnx: no metadata, no `logits`
    identity = helper.make_graph([helper.make_node("Identity", ["pixel_values"], ["out"])], "other",
                                 [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, 4, 4])],
                                 [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 4, 4])])
    onnx.save(helper.make_model(identity, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "other.onnx")
    assert re.search(r"other\.onnx: not a graph written by hms-segmentation export-onnx \(expected a `logits` output "
                     r"and the metadata hms_segmentation\.scales", refused(tmp_path / "other.onnx"))


# --- inputs on the model's device (no GPU here: "meta" stands for a device other than the CPU) --------------------


def test_the_traced_example_follows_the_weights_device(tmp_path, monkeypatch):
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_HRNET)).to("meta")
    assert export_module.model_device(model) == torch.device("meta")
    traced = []

    def fake_export(graph, args, **kwargs):
        traced.append(args[0].device)
        raise RuntimeError("traced")  # nothing further can run on "meta"

    monkeypatch.setattr(torch.onnx, "export", fake_export)
    with pytest.raises(RuntimeError, match="traced"):
        export_onnx(model, tmp_path / "hms.onnx", check=False)
    assert traced == [torch.device("meta")]
    assert list(tmp_path.iterdir()) == []  # the staging folder is removed


def test_the_check_runs_pytorch_on_the_weights_device_with_the_cpu_batch(tmp_path, monkeypatch):
    seen = []

    class DeviceRecorder(torch.nn.Module):
        """A graph whose weights are on "meta": records where its input is, answers zeros on the CPU."""

        with_labels = False

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1, device="meta"))

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            seen.append((pixel_values.device, tuple(pixel_values.shape)))
            return torch.zeros(pixel_values.shape[0], 5, *pixel_values.shape[-2:])

    class ZeroSession:
        def __init__(self, path, providers):
            pass

        def run(self, names, feeds):
            batch, _, height, width = feeds["pixel_values"].shape
            return [np.zeros((batch, 5, height, width), np.float32)]

    monkeypatch.setattr(onnxruntime, "InferenceSession", ZeroSession)
    checks = export_module.check_against_pytorch(tmp_path / "hms.onnx", DeviceRecorder(), [(8, 16), (9, 17)])
    assert seen == [(torch.device("meta"), (2, 3, 8, 16)), (torch.device("meta"), (2, 3, 9, 17))]
    assert [check.size for check in checks] == [(8, 16), (9, 17)] and all(check.passed for check in checks)


# --- sizes computed as PyTorch computes them ---------------------------------------------------------------------


def test_scaled_sizes_are_computed_in_float64_as_pytorch_does(tiny_deeplab_dir, tmp_path):
    """floor(height * scale) in float32, as the exporter writes it, is a pixel off PyTorch's float64 for scales such
    as 0.7 and 1.3 at sizes such as 180 and 720 (720 * 1.3: 935 against 936); the whole chain then moves."""
    import math

    import onnx

    model = HMSForSemanticSegmentation.from_pretrained(tiny_deeplab_dir).eval()
    scales = [0.7, 1.0, 1.3]
    assert math.floor(720 * 1.3) != math.floor(float(np.float32(720) * np.float32(1.3)))
    export_onnx(model, tmp_path / "hms.onnx", scales=scales, check=False)
    session = onnxruntime.InferenceSession(str(tmp_path / "hms.onnx"), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    for size in [(180, 340), (720, 64), (129, 259)]:  # 180 * 0.7, 340 * 1.3, 720 * 1.3 differ in float32
        pixel_values = torch.randn(1, 3, *size, generator=generator)
        with torch.no_grad():
            expected = model(pixel_values, scales=scales).logits
        (logits,) = session.run(["logits"], {"pixel_values": pixel_values.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)
    graph = onnx.load(str(tmp_path / "hms.onnx"), load_external_data=False).graph
    casts = [node for node in graph.node if node.op_type == "Cast"]
    assert casts and not [n for n in casts if n.attribute[0].i == onnx.TensorProto.FLOAT]  # no size cast to float32


def _size_graph(operator: str):
    """A graph `floor(x.shape * 1.3)` or `floor(sqrt(x.shape))`, its float arithmetic in float32 as the exporter
    writes it."""
    import onnx_ir
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Shape", ["x"], ["size"]),
             helper.make_node("Cast", ["size"], ["size_float"], to=TensorProto.FLOAT),
             helper.make_node(operator, ["size_float", "scale"] if operator == "Mul" else ["size_float"], ["product"]),
             helper.make_node("Floor", ["product"], ["floor"]),
             helper.make_node("Cast", ["floor"], ["scaled"], to=TensorProto.INT64)]
    graph = helper.make_graph(
        nodes, "sizes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("scaled", TensorProto.INT64, [4])],
        initializer=[numpy_helper.from_array(np.array(1.3, np.float32), "scale")],
        value_info=[helper.make_tensor_value_info("size", TensorProto.INT64, [4])])
    return onnx_ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_size_arithmetic_is_rewritten_with_the_exact_scale_or_left_with_a_warning(tmp_path):
    import onnx_ir

    model = _size_graph("Mul")
    assert export_module._size_arithmetic_in_float64(model.graph, [0.5, 1.3])
    assert [node.op_type for node in model.graph] == ["Shape", "Cast", "Mul", "Floor", "Cast"]
    assert model.graph.node(1).attributes["to"].as_int() == onnx_ir.DataType.DOUBLE
    assert model.graph.node(2).inputs[1].const_value.numpy().item() == 1.3  # the scale, not its float32 rounding
    assert list(model.graph.initializers) == ["scale_float64"]
    onnx_ir.save(model, tmp_path / "sizes.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "sizes.onnx"), providers=["CPUExecutionProvider"])
    (scaled,) = session.run(None, {"x": np.zeros((1, 3, 720, 340), np.float32)})
    assert scaled.tolist() == [1, 3, 936, 442]  # floor(720 * 1.3), floor(340 * 1.3) in Python: float32 gives 935, 441

    model = _size_graph("Sqrt")
    with pytest.warns(UserWarning, match=r"computes image sizes in float32 \(a size goes through Sqrt\)"):
        assert not export_module._size_arithmetic_in_float64(model.graph, [1.3])
    assert model.graph.node(1).attributes["to"].as_int() == onnx_ir.DataType.FLOAT  # left as written
