"""The console script and the demo (the README's main job until the quickstart lands)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hms_segmentation.cli import main
from hms_segmentation.data.io import load_image as read_rgb_image


def test_help_lists_the_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "convert-nvidia" in out


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
    assert "random weights" in capsys.readouterr().out
    labels = np.asarray(Image.open(output / "labels.png"))
    assert labels.shape == (64, 96) and labels.max() < 19
    assert Image.open(output / "attention_0.5x.png").size == (48, 32)
    assert Image.open(output / "attention_1.0x.png").size == (96, 64)
    assert json.loads((output / "summary.json").read_text())["scales"] == [0.5, 1.0]
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
