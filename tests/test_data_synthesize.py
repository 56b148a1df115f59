"""The synthetic street-scene dataset: official Cityscapes layout, valid labels, determinism, safe output folder,
recovery from an interrupted generation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import (  # noqa: F401 - fixtures are used by name
    SYNTHETIC_HEIGHT,
    SYNTHETIC_TRAIN,
    SYNTHETIC_VAL,
    SYNTHETIC_WIDTH,
    synthetic_cityscapes,
)
from PIL import Image

from hms_segmentation.data import synthesize
from hms_segmentation.data.synthesize import (
    IN_PROGRESS_FILE,
    MARKER_FILE,
    SceneCanvas,
    StreetLayout,
    SyntheticDatasetOptions,
    _draw_vehicle,
    main,
    render_street_scene,
    synthesize_cityscapes,
)
from hms_segmentation.label_tables import CITYSCAPES_ID2LABEL, IGNORE_INDEX, cityscapes_label_id_to_train_id


def _digest(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*.png"))}


def test_files_follow_the_official_cityscapes_layout(synthetic_cityscapes):
    for split, count in (("train", SYNTHETIC_TRAIN), ("val", SYNTHETIC_VAL)):
        images = sorted((synthetic_cityscapes / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        assert len(images) == count
        for image_path in images:
            city, stem = image_path.parent.name, image_path.name[: -len("_leftImg8bit.png")]
            parts = stem.split("_")
            assert parts[0] == city and len(parts) == 3 and all(len(part) == 6 and part.isdigit() for part in parts[1:])
            label_dir = synthetic_cityscapes / "gtFine" / split / city
            assert (label_dir / f"{stem}_gtFine_labelIds.png").is_file()
            assert (label_dir / f"{stem}_gtFine_labelTrainIds.png").is_file()
    assert (synthetic_cityscapes / MARKER_FILE).is_file()


def test_label_ids_map_to_the_train_ids_written_beside_them(synthetic_cityscapes):
    table = np.full(256, -1)
    for label_id, train_id in cityscapes_label_id_to_train_id().items():
        table[label_id] = train_id
    for label_path in sorted(synthetic_cityscapes.glob("gtFine/*/*/*_gtFine_labelIds.png")):
        label_ids = np.array(Image.open(label_path))
        train_ids = np.array(Image.open(str(label_path).replace("_labelIds", "_labelTrainIds")))
        assert Image.open(label_path).mode == "L" and label_ids.shape == (SYNTHETIC_HEIGHT, SYNTHETIC_WIDTH)
        assert (table[label_ids] >= 0).all(), "only official labelIds"
        np.testing.assert_array_equal(table[label_ids], train_ids)


def test_scenes_contain_large_regions_and_thin_structures():
    counts = np.zeros(256, np.int64)
    for index in range(6):
        _, label_ids = render_street_scene(256, 512, np.random.default_rng([0, 0, index]))
        counts += np.bincount(label_ids.ravel(), minlength=256)
    train_ids = {cityscapes_label_id_to_train_id()[label_id] for label_id in np.flatnonzero(counts)}
    names = {CITYSCAPES_ID2LABEL[train_id] for train_id in train_ids if train_id != IGNORE_INDEX}
    assert {"road", "sidewalk", "building", "sky", "vegetation", "car", "person", "pole", "traffic sign",
            "traffic light"} <= names


def test_far_objects_are_smaller_than_near_ones():
    """Perspective: the same car drawn at a quarter of the depth covers about a sixteenth of the pixels."""
    layout = StreetLayout.sample(256, 512, np.random.default_rng(0))
    areas = []
    for depth in (0.2, 0.8):
        canvas = SceneCanvas(np.zeros((256, 512, 3), np.float32), np.zeros((256, 512), np.uint8))
        _draw_vehicle(canvas, layout, depth, layout.road_center, "car", np.random.default_rng(1))
        areas.append(np.count_nonzero(np.asarray(canvas.label_image) == 26))
    assert 8 < areas[1] / areas[0] < 32


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    options = dict(num_train=3, num_val=1, height=48, width=96, num_workers=1)
    first = synthesize_cityscapes(SyntheticDatasetOptions(output_dir=tmp_path / "a", seed=7, **options))
    second = synthesize_cityscapes(SyntheticDatasetOptions(output_dir=tmp_path / "b", seed=7, **options))
    third = synthesize_cityscapes(SyntheticDatasetOptions(output_dir=tmp_path / "c", seed=8, **options))
    assert _digest(first) == _digest(second)
    assert _digest(first) != _digest(third)


def test_worker_count_does_not_change_the_frames(tmp_path):
    options = dict(num_train=4, num_val=0, height=40, width=80, seed=3)
    one = synthesize_cityscapes(SyntheticDatasetOptions(output_dir=tmp_path / "one", num_workers=1, **options))
    two = synthesize_cityscapes(SyntheticDatasetOptions(output_dir=tmp_path / "two", num_workers=2, **options))
    assert _digest(one) == _digest(two)


def test_refuses_to_overwrite_a_folder_that_is_not_a_synthetic_dataset(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("do not delete")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        synthesize_cityscapes(SyntheticDatasetOptions(output_dir=tmp_path, num_train=1, num_val=0, height=32, width=64))
    assert main(["--output-dir", str(tmp_path), "--num-train", "1", "--num-val", "0"]) == 2
    assert str(tmp_path) in capsys.readouterr().out
    assert (tmp_path / "precious.txt").read_text() == "do not delete"


def test_regenerates_over_a_previous_synthetic_dataset(tmp_path):
    options = dict(output_dir=tmp_path, num_val=0, height=32, width=64, num_workers=1)
    synthesize_cityscapes(SyntheticDatasetOptions(num_train=4, **options))
    synthesize_cityscapes(SyntheticDatasetOptions(num_train=2, **options))
    assert len(list(tmp_path.glob("leftImg8bit/train/*/*.png"))) == 2  # no stale frames of the first run


def test_command_line_writes_the_dataset(tmp_path, capsys):
    output = tmp_path / "synthetic"
    assert main(["--output-dir", str(output), "--num-train", "2", "--num-val", "1", "--height", "32", "--width",
                 "64", "--seed", "1", "--num-workers", "1"]) == 0
    assert len(list(output.glob("leftImg8bit/*/*/*_leftImg8bit.png"))) == 3
    assert Image.open(next(output.glob("leftImg8bit/val/*/*.png"))).size == (64, 32)
    assert "Wrote 2 train + 1 val frames" in capsys.readouterr().out


def test_invalid_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="height and width"):
        SyntheticDatasetOptions(output_dir=tmp_path, height=8)
    with pytest.raises(ValueError, match="num_train"):
        SyntheticDatasetOptions(output_dir=tmp_path, num_train=0, num_val=0)


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, frames: int) -> None:
    """Make the frame writer fail once `frames` frames are written, as a crash or Ctrl-C would."""
    written = []
    write_frame = synthesize._write_frame

    def failing(task):
        if len(written) == frames:
            raise KeyboardInterrupt("interrupted")
        write_frame(task)
        written.append(task)

    monkeypatch.setattr(synthesize, "_write_frame", failing)


def test_an_interrupted_generation_is_regenerated_as_if_uninterrupted(tmp_path, monkeypatch):
    options = dict(num_train=4, num_val=2, height=32, width=64, seed=5, num_workers=1)
    reference = synthesize_cityscapes(SyntheticDatasetOptions(output_dir=tmp_path / "reference", **options))
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            synthesize_cityscapes(SyntheticDatasetOptions(output_dir=tmp_path / "resumed", **options))
    resumed = tmp_path / "resumed"
    assert not (resumed / MARKER_FILE).exists() and (resumed / IN_PROGRESS_FILE).is_file()  # never taken as finished
    synthesize_cityscapes(SyntheticDatasetOptions(output_dir=resumed, **options))
    files = sorted(str(path.relative_to(resumed)) for path in resumed.rglob("*") if path.is_file())
    assert files == sorted(str(path.relative_to(reference)) for path in reference.rglob("*") if path.is_file())
    assert _digest(resumed) == _digest(reference)
    assert (resumed / MARKER_FILE).read_text() == (reference / MARKER_FILE).read_text()


def test_an_interrupted_generation_with_other_settings_is_replaced_and_user_files_are_kept(tmp_path, monkeypatch):
    options = dict(output_dir=tmp_path, num_val=0, height=32, width=64, num_workers=1)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            synthesize_cityscapes(SyntheticDatasetOptions(num_train=5, **options))
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "gtFine" / "README").write_text("mine too")
    synthesize_cityscapes(SyntheticDatasetOptions(num_train=2, **options))
    assert len(list(tmp_path.glob("leftImg8bit/train/*/*.png"))) == 2  # no frame of the interrupted run is left
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "gtFine" / "README").read_text() == "mine too"
    assert not (tmp_path / IN_PROGRESS_FILE).exists() and (tmp_path / MARKER_FILE).is_file()


def test_a_folder_with_user_files_or_an_unreadable_marker_is_refused(tmp_path):
    (tmp_path / "user" / "leftImg8bit").mkdir(parents=True)
    (tmp_path / "user" / "leftImg8bit" / "photo.png").write_bytes(b"not ours")
    options = dict(num_train=1, num_val=0, height=32, width=64, num_workers=1)
    with pytest.raises(FileExistsError, match=rf"{tmp_path / 'user'} is not empty and is not a synthetic dataset"):
        synthesize_cityscapes(SyntheticDatasetOptions(output_dir=tmp_path / "user", **options))
    assert (tmp_path / "user" / "leftImg8bit" / "photo.png").read_bytes() == b"not ours"
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / IN_PROGRESS_FILE).write_text("{not json")
    (tmp_path / "odd" / "photo.png").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match=rf"{IN_PROGRESS_FILE}: expected the settings of a synthetic dataset"):
        synthesize_cityscapes(SyntheticDatasetOptions(output_dir=tmp_path / "odd", **options))
    assert sorted(path.name for path in (tmp_path / "odd").iterdir()) == sorted([IN_PROGRESS_FILE, "photo.png"])


def test_a_negative_seed_is_refused_before_anything_is_written(tmp_path, capsys):
    """numpy seeds only with non-negative integers: -1 used to fail in the frame writer, after the folder and its
    in-progress marker were made, with numpy's "expected non-negative integer"."""
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        SyntheticDatasetOptions(output_dir=tmp_path / "out", seed=-1)
    argv = ["--output-dir", str(tmp_path / "out"), "--num-train", "1", "--num-val", "0", "--height", "32", "--width",
            "64", "--num-workers", "1"]
    assert main([*argv, "--seed", "-1"]) == 2
    assert "error: seed must be >= 0, got -1" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--num-train", "-1"], "num_train and num_val must be >= 0"),
    (["--height", "8"], "height and width must be at least 32 pixels, got 8x64"),
    (["--num-workers", "0"], "num_workers must be >= 1, got 0"),
])
def test_command_line_names_a_bad_value_without_a_traceback(tmp_path, capsys, flags, message):
    argv = ["--output-dir", str(tmp_path / "out"), "--num-val", "1", "--height", "32", "--width", "64", *flags]
    assert main(argv) == 2  # used to raise the ValueError (a traceback) out of the console script
    assert f"error: {message}" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
