"""The console script and the demo (the README's main job until the quickstart lands)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from hms_segmentation.cli import SUBCOMMANDS, main
from hms_segmentation.data.io import load_image as read_rgb_image


def test_help_lists_the_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "convert-nvidia" in out


def test_help_separates_every_subcommand_from_its_summary(capsys):
    assert main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, (_, summary) in SUBCOMMANDS.items():
        assert any(re.fullmatch(rf"  {re.escape(name)} {{2,}}{re.escape(summary)}", line) for line in lines), name


@pytest.mark.parametrize("name", ["train", "train-accelerate"])
def test_subcommand_usage_names_the_command_the_user_typed(capsys, name):
    argv = list(sys.argv)
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: hms-segmentation {name} ")
    assert sys.argv == argv


def test_unknown_subcommand_is_an_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "frobnicate" in capsys.readouterr().err


def test_console_script_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "hms_segmentation.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "convert-nvidia" in result.stdout


def test_demo_writes_labels_and_attention_maps(tmp_path, capsys):
    image = tmp_path / "street.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(image)
    output = tmp_path / "out"
    assert main(["demo", "--image", str(image), "--scales", "0.5,1.0", "--output-dir", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "random weights" in printed and "0.5x decided" in printed
    labels = np.asarray(Image.open(output / "labels.png"))
    assert labels.shape == (64, 96) and labels.max() < 19
    assert Image.open(output / "attention_0.5x.png").size == (48, 32)
    assert Image.open(output / "attention_1.0x.png").size == (96, 64)
    summary = json.loads((output / "summary.json").read_text())
    assert summary["scales"] == [0.5, 1.0]
    # each scale's share of the result, at the image's size: 0.5 takes its attention, 1.0 the rest
    weights = [np.asarray(Image.open(output / f"weight_{scale}x.png"), dtype=int) for scale in (0.5, 1.0)]
    assert weights[0].shape == (64, 96) and np.abs(weights[0] + weights[1] - 255).max() <= 1
    assert sum(summary["scale_shares"].values()) == pytest.approx(1, abs=1e-3)
    # a second run must not overwrite what the first wrote
    assert main(["demo", "--image", str(image), "--output-dir", str(output)]) == 2


@pytest.mark.parametrize("name", ["rgb_ok.png", "grayscale.png", "rgba.png", "palette.png", "cmyk.jpg", "gray16.png"])
def test_demo_reads_every_image_mode_as_rgb(shared_data_dir, name):
    image = read_rgb_image(shared_data_dir / "odd_inputs" / name)
    assert image.mode == "RGB" and image.size == (160, 96)


def test_demo_applies_exif_orientation(shared_data_dir):
    assert read_rgb_image(shared_data_dir / "odd_inputs" / "exif_orientation6.jpg").size == (96, 160)


@pytest.mark.parametrize("name", ["truncated.png", "truncated.jpg", "not_an_image.png", "empty.png", "bomb_40000x40000.png"])
def test_demo_names_the_broken_file(shared_data_dir, name, tmp_path, capsys):
    path = shared_data_dir / "odd_inputs" / name
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        read_rgb_image(path)
    assert main(["demo", "--image", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    assert name in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tiny_3x5.png", "one_row_1x4000.png"])
def test_demo_handles_degenerate_sizes_with_a_clear_answer(shared_data_dir, name, tmp_path):
    code = main(["demo", "--image", str(shared_data_dir / "odd_inputs" / name), "--scales", "1.0",
                 "--output-dir", str(tmp_path / "out")])
    assert code == 0


# The smallest run of each benchmark whose --output used to default to a committed file in benchmarks/results/.
BENCHMARK_SMOKE_RUNS = {
    "train_step.py": ["--crop-size", "64", "--batch-size", "2", "--steps", "1", "--losses", "cross_entropy",
                      "--threads", "1"],
    "inference.py": ["--height", "64", "--width", "128", "--repeats", "1", "--scale-sets", "1.0", "--threads", "1",
                     "--variants", "eager", "onnxruntime"],
    "tiled_inference.py": ["--part", "memory", "--height", "64", "--width", "128", "--memory-tiles", "64",
                           "--no-untiled", "--threads", "1"],
}


@pytest.mark.parametrize("script", sorted(BENCHMARK_SMOKE_RUNS))
def test_benchmark_without_output_writes_no_file(tmp_path, script):
    # Run from a folder shaped like the repository, so a default path under benchmarks/results/ would land there.
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / script), *BENCHMARK_SMOKE_RUNS[script]],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pass --output" in result.stdout
    assert not re.search(r"failed|timeout", result.stdout), result.stdout  # a row's error does not end the run
    assert list(tmp_path.rglob("*")) == []


def test_demo_normalises_as_evaluation_and_autolabel_do(shared_data_dir):
    from hms_segmentation.data.transforms import SegmentationEvalTransform
    from hms_segmentation.demo import normalize

    image = read_rgb_image(shared_data_dir / "street_photos" / "sf.jpg")
    # bit for bit: a separate normalisation rounded float32 differently (up to 5e-7)
    assert normalize(image).equal(SegmentationEvalTransform()(image)["pixel_values"])


@pytest.mark.parametrize("command", [
    ["evaluate", "--model", "{model}"],
    ["demo", "--model", "{model}", "--output-dir", "{tmp}/demo"],
    ["autolabel", "--model", "{model}", "--input", "{tmp}", "--output-dir", "{tmp}/labels"],
], ids=["evaluate", "demo", "autolabel"])
@pytest.mark.parametrize("model, reason", [
    ("/no/such/model", "no such folder, and not a Hub model id"),
    ("{tmp}", "the folder has no config.json"),
    ("{tmp}/weights.pth", "is a file"),
], ids=["missing", "not-a-model-folder", "file"])
def test_a_model_that_is_not_there_is_named_without_a_traceback(tmp_path, capsys, command, model, reason):
    # transformers would answer a mistyped path with "Repo id must be in the form 'repo_name' or ..."
    (tmp_path / "weights.pth").write_bytes(b"")
    argv = [part.replace("{model}", model).replace("{tmp}", str(tmp_path)) for part in command]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --model ") and reason in error and "save_pretrained folder" in error


@pytest.mark.parametrize("command", [
    ["evaluate", "--model", "{model}", "--dataset", "cityscapes", "--data-dir", "{cityscapes}", "--output-dir",
     "{tmp}/eval"],
    ["autolabel", "--model", "{model}", "--input", "{tmp}/images", "--output-dir", "{tmp}/labels"],
    ["export-onnx", "--model", "{model}", "--output", "{tmp}/model.onnx"],
], ids=["evaluate", "autolabel", "export-onnx"])
def test_a_model_folder_with_missing_tensors_is_refused_not_run_with_random_weights(tmp_path, capsys, shared_data_dir,
                                                                                     command):
    from safetensors.torch import load_file, save_file

    from tiny_configs import TINY_RESNET, save_tiny_model

    folder = save_tiny_model(tmp_path / "model", TINY_RESNET, num_labels=19)
    weights = load_file(folder / "model.safetensors")
    del weights["scale_attention_head.projection.weight"]  # transformers would initialise it at random, and warn
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(tmp_path / "images" / "frame.png")
    replacements = {"{model}": str(folder), "{tmp}": str(tmp_path),
                    "{cityscapes}": str(shared_data_dir / "cityscapes_sample")}
    argv = list(command)
    for key, value in replacements.items():
        argv = [part.replace(key, value) for part in argv]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert f"error: --model {folder}: its weights do not fit its config.json: 1 missing tensors" in error
    assert not any((tmp_path / name).exists() for name in ("eval", "labels", "model.onnx"))


def test_train_refuses_a_model_that_is_not_there_before_reading_data(tmp_path):
    from hms_segmentation.training.arguments import parse_arguments

    with pytest.raises(ValueError, match=r"--model_name_or_path /no/such/model: no such folder, and not a Hub model id"):
        parse_arguments(["--model_name_or_path", "/no/such/model", "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["demo"], ["evaluate", "--model", "unused/model"]], ids=["demo", "evaluate"])
def test_an_output_dir_that_is_a_file_is_refused_and_kept(tmp_path, capsys, command):
    output = tmp_path / "notes.txt"
    output.write_text("keep me")
    assert main([*command, "--output-dir", str(output)]) == 2
    assert output.read_text() == "keep me" and "is a file; expected a folder" in capsys.readouterr().err
