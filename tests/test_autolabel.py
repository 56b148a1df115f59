"""Auto-labelling: a teacher trained in-test labels held-out synthetic frames; thresholds, merging, layout, resuming,
odd inputs, the report, several processes, and mixing the labels into training."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from data_fixtures import synthetic_cityscapes  # noqa: F401 - fixture used by name
from PIL import Image

from hms_segmentation import HMSConfig, HMSForSemanticSegmentation
from hms_segmentation import autolabel as autolabel_module
from hms_segmentation.autolabel import (
    LABEL_SUFFIX,
    PNG_TEXT_KEY,
    PREVIEW_SUFFIX,
    REPORT_FILE,
    TEMPORARY_SUFFIX,
    build_parser,
    find_auto_labelled_folder,
    label_marker,
    main,
    merge_with_coarse,
    parse_label_region,
)
from hms_segmentation.data import CityscapesOptions, load_cityscapes, load_image, load_label
from hms_segmentation.data.cityscapes import cityscapes_label_mapping
from hms_segmentation.data.transforms import SegmentationEvalTransform
from hms_segmentation.label_tables import CITYSCAPES_ID2LABEL, IGNORE_INDEX
from hms_segmentation.training.evaluate import precision_autocast, predict
from tiny_configs import TINY_HRNET

FAST = ["--scales", "0.5,1.0", "--num-workers", "0", "--no-progress"]


def _fine_train_ids(image_path: Path) -> np.ndarray:
    label = str(image_path).replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")
    return load_label(label)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny images: one thread is fastest, and on a busy machine several threads mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher_dir(synthetic_cityscapes, tmp_path_factory) -> Path:  # noqa: F811
    """A tiny 19-class model trained for a few seconds on the synthetic train frames (never on val)."""
    transform = SegmentationEvalTransform()
    samples = [transform(load_image(path), _fine_train_ids(path))
               for path in sorted((synthetic_cityscapes / "leftImg8bit" / "train").glob("*/*.png"))]
    pixel_values = torch.stack([s["pixel_values"] for s in samples])
    labels = torch.stack([s["labels"] for s in samples])
    torch.manual_seed(0)
    config = HMSConfig(**{**TINY_HRNET, "num_labels": 19}, id2label=dict(CITYSCAPES_ID2LABEL), ocr_dropout=0.0,
                       primary_loss="cross_entropy")
    model = HMSForSemanticSegmentation(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        batch = torch.randperm(len(samples))[:4]
        loss = model(pixel_values[batch], labels=labels[batch], scales=[1.0]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("teacher")
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def extra_root(synthetic_cityscapes, tmp_path_factory) -> Path:  # noqa: F811
    """The synthetic set with a ``train_extra`` split: the held-out val frames, with "coarse" labels (labelIds, the
    right half left unlabelled, as a coarse annotator leaves regions out)."""
    root = tmp_path_factory.mktemp("extra") / "cityscapes"
    shutil.copytree(synthetic_cityscapes, root)
    for image_path in sorted((root / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png")):
        city, stem = image_path.parent.name, image_path.name[: -len("_leftImg8bit.png")]
        (root / "leftImg8bit" / "train_extra" / city).mkdir(parents=True, exist_ok=True)
        shutil.copy(image_path, root / "leftImg8bit" / "train_extra" / city / image_path.name)
        label_ids = np.array(Image.open(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png"))
        label_ids[:, label_ids.shape[1] // 2:] = 0  # "unlabeled"
        (root / "gtCoarse" / "train_extra" / city).mkdir(parents=True, exist_ok=True)
        Image.fromarray(label_ids).save(root / "gtCoarse" / "train_extra" / city / f"{stem}_gtCoarse_labelIds.png")
    return root


def _fresh_copy(root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "cityscapes"
    shutil.copytree(root, copy)
    return copy


def _digests(folder: Path, pattern: str = f"*{LABEL_SUFFIX}") -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob(pattern))}


def _report(folder: Path) -> dict:
    return json.loads((folder / REPORT_FILE).read_text())


def test_cli_lists_the_autolabel_subcommand(capsys):
    from hms_segmentation.cli import main as cli_main

    assert cli_main(["--help"]) == 0
    assert "autolabel" in capsys.readouterr().out


def test_teacher_labels_held_out_frames_that_reload_through_the_cityscapes_loader(teacher_dir, extra_root, tmp_path):
    root = _fresh_copy(extra_root, tmp_path)
    assert main(["--model", str(teacher_dir), "--input", str(root / "leftImg8bit" / "train_extra"),
                 "--merge-coarse", "replace", "--preview", *FAST]) == 0
    images = sorted((root / "leftImg8bit" / "train_extra").glob("*/*_leftImg8bit.png"))
    model = HMSForSemanticSegmentation.from_pretrained(teacher_dir).eval()
    correct_kept = kept = correct_all = valid_all = 0
    for image_path in images:
        city, stem = image_path.parent.name, image_path.name[: -len("_leftImg8bit.png")]
        label_path = root / "gtCoarse" / "train_extra" / city / f"{stem}{LABEL_SUFFIX}"
        assert (root / "gtCoarse" / "train_extra" / city / f"{stem}{PREVIEW_SUFFIX}").is_file()
        with Image.open(label_path) as written:
            assert written.mode == "L" and written.size == Image.open(image_path).size
        label, truth = load_label(label_path), _fine_train_ids(str(image_path).replace("train_extra", "val"))
        assert set(np.unique(label)) <= set(range(19)) | {IGNORE_INDEX}
        valid = truth != IGNORE_INDEX
        # the held-out frames were never trained on; confident pixels must be the more accurate ones
        correct_kept += int(((label == truth) & valid).sum())
        kept += int(((label != IGNORE_INDEX) & valid).sum())
        prediction = _argmax_label(model, image_path)
        correct_all += int(((prediction == truth) & valid).sum())
        valid_all += int(valid.sum())
    assert kept > 0.2 * valid_all
    assert correct_kept / kept > correct_all / valid_all > 0.3

    rows = load_cityscapes(root, "train", options=CityscapesOptions(include_auto_labels=True))
    auto_rows = [row for row in rows if row["id"].startswith("validham")]
    assert len(rows) == 12 + len(images) and len(auto_rows) == len(images)
    for row in auto_rows:
        city = row["id"].split("_")[0]
        np.testing.assert_array_equal(
            np.asarray(row["label"]),
            load_label(root / "gtCoarse" / "train_extra" / city / f"{row['id']}{LABEL_SUFFIX}"))
    report = _report(root)
    assert report["images"] == {"labelled": len(images), "finished_before": 0, "kept_existing": 0, "failed": 0}


def _argmax_label(model: HMSForSemanticSegmentation, image_path: Path, scales=(0.5, 1.0)) -> np.ndarray:
    pixel_values = SegmentationEvalTransform()(load_image(image_path))["pixel_values"][None]
    with torch.inference_mode():
        return predict(model, pixel_values, list(scales), flip=False)[0].argmax(0).numpy()


@pytest.mark.parametrize("threshold", [0.4, 0.7])
def test_pixels_whose_top_probability_is_under_the_threshold_are_ignored(teacher_dir, extra_root, tmp_path, threshold):
    images = extra_root / "leftImg8bit" / "val"
    output = tmp_path / "labels"
    assert main(["--model", str(teacher_dir), "--input", str(images), "--layout", "folder", "--output-dir",
                 str(output), "--threshold", str(threshold), "--flip", *FAST]) == 0
    model = HMSForSemanticSegmentation.from_pretrained(teacher_dir).eval()
    ignored = 0
    for image_path in sorted(images.glob("*/*.png")):
        pixel_values = SegmentationEvalTransform()(load_image(image_path))["pixel_values"][None]
        with torch.inference_mode():
            # the softmax of the flip-averaged logits, as the reference thresholds
            confidence, predicted = predict(model, pixel_values, [0.5, 1.0], flip=True)[0].softmax(0).max(0)
        label = load_label(output / image_path.parent.name / f"{image_path.name[:-4]}{LABEL_SUFFIX}")
        clearly_under, clearly_over = (confidence < threshold - 1e-4).numpy(), (confidence > threshold + 1e-4).numpy()
        assert (label[clearly_under] == IGNORE_INDEX).all()
        np.testing.assert_array_equal(label[clearly_over], predicted.numpy()[clearly_over])
        ignored += int(clearly_under.sum())
    assert ignored > 0
    report = _report(output)
    assert report["threshold"] == threshold and 0 < report["ignored_fraction_below_threshold"] < 1


def test_fill_keeps_the_human_coarse_labels_and_fills_their_gaps(teacher_dir, extra_root, tmp_path):
    root = _fresh_copy(extra_root, tmp_path)
    replaced_dir = tmp_path / "replaced"
    split = root / "leftImg8bit" / "train_extra"
    assert main(["--model", str(teacher_dir), "--input", str(split), "--merge-coarse", "replace", "--output-dir",
                 str(replaced_dir), *FAST]) == 0
    assert main(["--model", str(teacher_dir), "--input", str(split), *FAST]) == 0  # fill is the default
    mapping = cityscapes_label_mapping()
    for coarse_path in sorted((root / "gtCoarse" / "train_extra").glob("*/*_gtCoarse_labelIds.png")):
        name = coarse_path.name.replace("_gtCoarse_labelIds.png", LABEL_SUFFIX)
        coarse = load_label(coarse_path, mapping)
        auto = load_label(replaced_dir / "gtCoarse" / "train_extra" / coarse_path.parent.name / name)
        filled = load_label(coarse_path.parent / name)
        labelled = coarse != IGNORE_INDEX
        assert labelled.any() and (~labelled).any()
        np.testing.assert_array_equal(filled[labelled], coarse[labelled])
        np.testing.assert_array_equal(filled[~labelled], auto[~labelled])
    assert _report(root)["coarse_pixels_kept"] > 0
    np.testing.assert_array_equal(merge_with_coarse(np.array([[1, 2]], np.uint8), np.array([[255, 7]], np.uint8),
                                                    "fill"), [[1, 7]])
    with pytest.raises(ValueError, match="merge mode"):
        merge_with_coarse(np.zeros((1, 1), np.uint8), None, "average")


def test_label_region_ignores_the_teachers_labels_outside_it_before_the_merge(teacher_dir, extra_root, tmp_path):
    """The reference's ``mask_out_cityscapes``: outside the box the auto-label is 255; the human coarse label (fill)
    still fills it there; inside, the labels are those of a run without a region."""
    root = _fresh_copy(extra_root, tmp_path)
    split = root / "leftImg8bit" / "train_extra"
    whole, boxed, filled = tmp_path / "whole", tmp_path / "boxed", tmp_path / "filled"
    assert main(["--model", str(teacher_dir), "--input", str(split), "--merge-coarse", "replace", "--output-dir",
                 str(whole), *FAST]) == 0
    assert main(["--model", str(teacher_dir), "--input", str(split), "--merge-coarse", "replace", "--output-dir",
                 str(boxed), "--label-region", "4,8,40,100", *FAST]) == 0
    assert main(["--model", str(teacher_dir), "--input", str(split), "--output-dir", str(filled), "--label-region",
                 "4,8,40,100", *FAST]) == 0
    mapping = cityscapes_label_mapping()
    names = sorted(_digests(whole))
    assert names and sorted(_digests(boxed)) == names
    inside = np.zeros_like(load_label(whole / names[0]), dtype=bool)
    inside[4:40, 8:100] = True
    for name in names:
        full, cut, merged = load_label(whole / name), load_label(boxed / name), load_label(filled / name)
        np.testing.assert_array_equal(cut[inside], full[inside])
        assert (cut[~inside] == IGNORE_INDEX).all()
        coarse_path = root / name.replace(LABEL_SUFFIX, "_gtCoarse_labelIds.png")
        coarse = load_label(coarse_path, mapping)
        np.testing.assert_array_equal(merged, np.where(coarse != IGNORE_INDEX, coarse, cut))
    report = _report(boxed)
    assert report["label_region"] == [4, 8, 40, 100] and report["confident_fraction_outside_region"] > 0
    assert "label_region" not in _report(whole)  # labels written without a region keep their fingerprint
    assert report["fingerprint"] != _report(whole)["fingerprint"]


@pytest.mark.parametrize("value", ["1,2,3", "5,0,4,10", "0,-1,4,10", "top"])
def test_a_bad_label_region_is_named(teacher_dir, extra_root, tmp_path, capsys, value):
    split = extra_root / "leftImg8bit" / "train_extra"
    assert main(["--model", str(teacher_dir), "--input", str(split), "--output-dir", str(tmp_path / "out"),
                 "--label-region", value, *FAST]) == 2
    assert "--label-region must be TOP,LEFT,BOTTOM,RIGHT pixels" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert parse_label_region("cityscapes") == (15, 14, 840, 2030) and parse_label_region(None) is None


def test_boost_merges_as_the_reference_record_recipe():
    # truck (14) is predicted somewhere, bus (15) nowhere: only truck's coarse pixels are added, never over pixels the
    # auto-label left below the threshold (255), which the reference ignores after merging
    auto = np.array([[14, 0, 0, 255], [0, 0, 13, 13]], np.uint8)
    coarse = np.array([[255, 14, 15, 14], [14, 255, 15, 2]], np.uint8)
    np.testing.assert_array_equal(merge_with_coarse(auto, coarse, "boost"), [[14, 14, 0, 255], [14, 0, 13, 13]])
    np.testing.assert_array_equal(merge_with_coarse(auto, coarse, "fill"), [[14, 14, 15, 14], [14, 0, 15, 2]])
    np.testing.assert_array_equal(merge_with_coarse(auto, coarse, "replace"), auto)
    assert build_parser().parse_args(["--model", "m", "--input", "i", "--merge-coarse", "boost"]).merge_coarse == "boost"


class _Killed(BaseException):
    """Stands for the process being killed in the middle of writing a file."""


def test_a_resumed_run_skips_finished_files_and_gives_byte_identical_labels(teacher_dir, extra_root, tmp_path,
                                                                             monkeypatch):
    images = extra_root / "leftImg8bit" / "val"
    argv = ["--model", str(teacher_dir), "--input", str(images), "--layout", "folder", "--batch-size", "2",
            "--preview", *FAST]
    assert main([*argv, "--output-dir", str(tmp_path / "uninterrupted")]) == 0
    expected = _digests(tmp_path / "uninterrupted")
    assert len(expected) == 4

    interrupted = tmp_path / "interrupted"
    real_replace, renames = os.replace, []

    def replace_then_die(source, destination):
        renames.append(destination)
        if len(renames) == 6:  # label of the 3rd image: its preview went through, the label was half written
            Path(source).write_bytes(Path(source).read_bytes()[:20])
            raise _Killed
        real_replace(source, destination)

    monkeypatch.setattr(autolabel_module.os, "replace", replace_then_die)
    with pytest.raises(_Killed):
        main([*argv, "--output-dir", str(interrupted)])
    monkeypatch.setattr(autolabel_module.os, "replace", real_replace)
    assert len(_digests(interrupted)) == 2
    # a kill -9 would leave the temporary file behind; it must never be taken for a finished label
    half = next(interrupted.rglob(f"*{PREVIEW_SUFFIX}")).parent / f".stale{LABEL_SUFFIX}{TEMPORARY_SUFFIX}"
    half.write_bytes(b"\x89PNG half")
    leftover = interrupted / "validham" / f".{sorted(expected)[2].split('/')[-1]}{TEMPORARY_SUFFIX}"
    leftover.write_bytes(b"\x89PNG half")

    assert main([*argv, "--output-dir", str(interrupted)]) == 0
    assert _digests(interrupted) == expected
    assert _digests(interrupted, f"*{PREVIEW_SUFFIX}") == _digests(tmp_path / "uninterrupted", f"*{PREVIEW_SUFFIX}")
    assert not leftover.exists()
    report = _report(interrupted)
    assert report["images"]["finished_before"] == 2 and report["images"]["labelled"] == 2
    assert find_auto_labelled_folder(images, interrupted)  # the stale temporary file is no sample either
    assert all(".partial" not in sample.label_path for sample in find_auto_labelled_folder(images, interrupted))


def _users_file_where_it_would_write(extra_root: Path, tmp_path: Path, suffix: str, pixels: np.ndarray):
    """The val folder of `extra_root`, an output folder, its first image, and a file of the user's saved (from
    `pixels`) at that image's `suffix` name in the output folder."""
    images = extra_root / "leftImg8bit" / "val"
    output = tmp_path / "labels"
    first = sorted(images.glob("*/*.png"))[0]
    users_file = output / first.parent.name / f"{first.stem}{suffix}"
    users_file.parent.mkdir(parents=True)
    Image.fromarray(pixels).save(users_file)
    return images, output, first, users_file


def test_a_preview_file_of_the_user_is_left_alone_unless_overwrite(teacher_dir, extra_root, tmp_path):
    images, output, first, users_preview = _users_file_where_it_would_write(
        extra_root, tmp_path, PREVIEW_SUFFIX, np.full((64, 128, 3), 7, np.uint8))
    users_bytes = users_preview.read_bytes()
    argv = ["--model", str(teacher_dir), "--input", str(images), "--layout", "folder", "--output-dir", str(output),
            "--preview", *FAST]
    assert main(argv) == 0
    assert users_preview.read_bytes() == users_bytes
    assert not (output / first.parent.name / f"{first.stem}{LABEL_SUFFIX}").exists()
    assert _report(output)["images"]["kept_existing"] == 1 and _report(output)["images"]["labelled"] == 3
    # its own previews are marked as its own: a re-run finds them finished, --overwrite replaces the user's
    assert main(argv) == 0 and _report(output)["images"]["finished_before"] == 3
    assert main([*argv, "--overwrite"]) == 0
    assert users_preview.read_bytes() != users_bytes and label_marker(users_preview)["source"].endswith(first.name)


def test_existing_label_files_it_did_not_write_are_left_alone_unless_overwrite(teacher_dir, extra_root, tmp_path):
    images, output, first, users_label = _users_file_where_it_would_write(
        extra_root, tmp_path, LABEL_SUFFIX, np.full((64, 128), 3, np.uint8))
    users_bytes = users_label.read_bytes()
    argv = ["--model", str(teacher_dir), "--input", str(images), "--layout", "folder", "--output-dir", str(output), *FAST]
    assert main(argv) == 0
    assert users_label.read_bytes() == users_bytes
    assert _report(output)["images"]["kept_existing"] == 1 and _report(output)["images"]["labelled"] == 3
    # labels of other settings are not silently mixed with the new ones either
    assert main([*argv, "--threshold", "0.9"]) == 0
    assert _report(output)["images"]["kept_existing"] == 4
    assert main([*argv, "--threshold", "0.9", "--overwrite"]) == 0
    assert _report(output)["images"]["labelled"] == 4
    assert label_marker(users_label)["source"] == f"{first.parent.name}/{first.name}"
    with Image.open(users_label) as label:
        assert PNG_TEXT_KEY in label.text


def test_odd_inputs_are_converted_or_named_skipped_and_counted(teacher_dir, shared_data_dir, tmp_path, capsys):
    odd = shared_data_dir / "odd_inputs"
    images = tmp_path / "photos"
    (images / "nested").mkdir(parents=True)
    readable = ["rgb_ok.png", "grayscale.png", "rgba.png", "palette.png", "cmyk.jpg", "gray16.png",
                "exif_orientation6.jpg", "tiny_3x5.png", "one_row_1x4000.png"]
    broken = ["truncated.png", "truncated.jpg", "not_an_image.png", "empty.png", "bomb_40000x40000.png"]
    for name in readable + broken:
        shutil.copy(odd / name, images / ("nested" if name.startswith("t") else "") / name)
    output = tmp_path / "labels"
    assert main(["--model", str(teacher_dir), "--input", str(images), "--output-dir", str(output), *FAST]) == 0
    report = _report(output)
    assert report["images"]["labelled"] == len(readable) and report["images"]["failed"] == len(broken)
    for name in broken:
        assert any(name in message for message in report["failed_files"]), name
    assert "bomb_40000x40000.png: refused" in capsys.readouterr().out
    with Image.open(next(output.rglob(f"exif_orientation6{LABEL_SUFFIX}"))) as label:
        assert label.size == (96, 160)  # the shown size, after the EXIF rotation
    with Image.open(next(output.rglob(f"tiny_3x5{LABEL_SUFFIX}"))) as label, Image.open(odd / "tiny_3x5.png") as image:
        assert label.size == image.size
    with Image.open(output / f"gray16{LABEL_SUFFIX}") as label:
        assert label.size == (160, 96) and label.mode == "L"


def test_report_measures_storage_against_float16_soft_labels(teacher_dir, extra_root, tmp_path, capsys):
    images = extra_root / "leftImg8bit" / "val"
    output = tmp_path / "labels"
    assert main(["--model", str(teacher_dir), "--input", str(images), "--layout", "folder", "--output-dir", str(output),
                 *FAST]) == 0
    report = _report(output)
    written = sum(path.stat().st_size for path in output.rglob(f"*{LABEL_SUFFIX}"))
    assert report["bytes_written"]["labels"] == written
    assert report["float16_soft_label_bytes"] == 4 * 19 * 64 * 128 * 2
    assert report["pixels"] == 4 * 64 * 128
    predicted = sum(row["predicted_pixels"] for row in report["per_class"].values())
    assert predicted == report["pixels"] and "road" in report["per_class"]
    assert all(row["ignored_fraction"] is None or 0 <= row["ignored_fraction"] <= 1
               for row in report["per_class"].values())
    out = capsys.readouterr().out
    assert "float16 soft labels would take" in out and "| road |" in out


def test_bad_arguments_are_named(teacher_dir, extra_root, tmp_path, capsys):
    images = str(extra_root / "leftImg8bit" / "val")
    assert main(["--model", str(teacher_dir), "--input", images, "--layout", "folder"]) == 2
    assert "--output-dir is required" in capsys.readouterr().err
    assert main(["--model", str(teacher_dir), "--input", images, "--threshold", "1.5"]) == 2
    assert "--threshold must be in [0, 1]" in capsys.readouterr().err
    assert main(["--model", str(teacher_dir), "--input", str(tmp_path / "missing"), "--output-dir", "x"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["--model", str(teacher_dir), "--input", images, "--tile-pixel-budget", "100", "--tile-size", "64",
                 "--tile-overlap", "16"]) == 2
    assert "tile_pixel_budget" in capsys.readouterr().err


def test_tiled_labelling_runs_the_tiles_and_stays_close_to_untiled(teacher_dir, extra_root, tmp_path, monkeypatch):
    import hms_segmentation.modeling_hms as modeling

    calls = []

    def counting_segment_in_tiles(*args, **kwargs):
        calls.append(tuple(args[1].shape))
        return segment_in_tiles(*args, **kwargs)

    segment_in_tiles = modeling.segment_in_tiles
    monkeypatch.setattr(modeling, "segment_in_tiles", counting_segment_in_tiles)
    untiled, tiled = _fresh_copy(extra_root, tmp_path / "untiled"), _fresh_copy(extra_root, tmp_path / "tiled")
    assert main(["--model", str(teacher_dir), "--input", str(untiled / "leftImg8bit" / "train_extra"), *FAST]) == 0
    assert not calls
    # scale 1.0 of these frames exceeds a 64x64 tile's budget: it runs as overlapping tiles
    assert main(["--model", str(teacher_dir), "--input", str(tiled / "leftImg8bit" / "train_extra"), *FAST,
                 "--tile-pixel-budget", "4096", "--tile-size", "64", "--tile-overlap", "32"]) == 0
    assert calls and all(shape[-2] * shape[-1] > 4096 for shape in calls)
    assert _digests(tiled).keys() == _digests(untiled).keys() and len(_digests(tiled)) > 0
    agreement = [np.mean(np.asarray(Image.open(tiled / name)) == np.asarray(Image.open(untiled / name)))
                 for name in _digests(tiled)]
    assert min(agreement) > 0.5  # OCR pools its context per tile, so tiles may differ a little (see BENCHMARKS.md)
    assert "4096" in json.dumps(_report(tiled))  # the settings in the report name the tiling

def test_precision_runs_the_teacher_under_autocast_and_joins_the_fingerprint(teacher_dir, extra_root, tmp_path,
                                                                             monkeypatch):
    seen = []

    def spying_predict(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return predict(*args, **kwargs)

    monkeypatch.setattr(autolabel_module, "predict", spying_predict)
    images = str(extra_root / "leftImg8bit" / "val")
    full, half = tmp_path / "fp32", tmp_path / "bf16"
    assert main(["--model", str(teacher_dir), "--input", images, "--layout", "folder", "--output-dir", str(full),
                 *FAST]) == 0
    assert seen == [None] * 4
    seen.clear()
    assert main(["--model", str(teacher_dir), "--input", images, "--layout", "folder", "--output-dir", str(half),
                 "--precision", "bf16", *FAST]) == 0
    assert seen == [torch.bfloat16] * 4
    full_report, half_report = _report(full), _report(half)
    assert (full_report["precision"], half_report["precision"]) == ("fp32", "bf16")
    assert full_report["fingerprint"] != half_report["fingerprint"]
    # float32 labels keep the fingerprint of the settings before --precision existed: earlier runs stay finished
    model = HMSForSemanticSegmentation.from_pretrained(teacher_dir)
    earlier = {name: full_report[name] for name in ("scales", "flip", "threshold", "merge_coarse", "size_divisor",
                                                    "layout", "max_long_side", "tile_pixel_budget", "tile_size",
                                                    "tile_overlap")}
    assert autolabel_module.model_fingerprint(model, earlier) == full_report["fingerprint"]
    assert _digests(full).keys() == _digests(half).keys() and len(_digests(full)) == 4
    agreement = [np.mean(np.asarray(Image.open(full / name)) == np.asarray(Image.open(half / name)))
                 for name in _digests(full)]
    assert min(agreement) > 0.98  # bf16 rounding moves only pixels near the threshold or a tie
    # labels of the other precision are the user's to replace: left alone and named
    before = _digests(full)
    assert main(["--model", str(teacher_dir), "--input", images, "--layout", "folder", "--output-dir", str(full),
                 "--precision", "bf16", *FAST]) == 0
    assert _digests(full) == before
    assert _report(full)["images"] == {"labelled": 0, "finished_before": 0, "kept_existing": 4, "failed": 0}
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16, got 'fp8'"):
        precision_autocast("cpu", "fp8")


def test_torch_compile_labels_as_eager_and_a_run_resumes_across_it(teacher_dir, extra_root, tmp_path, capsys):
    from torch._dynamo.utils import counters

    images = str(extra_root / "leftImg8bit" / "val")
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    common = ["--model", str(teacher_dir), "--input", images, "--layout", "folder", "--flip", *FAST]
    assert main([*common, "--output-dir", str(plain)]) == 0
    torch._dynamo.reset()
    counters.clear()
    assert main([*common, "--output-dir", str(compiled), "--torch-compile-backend", "eager"]) == 0
    # the four frames share a size: one graph, the mirrored call's included
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert _digests(compiled) == _digests(plain) and len(_digests(plain)) == 4  # Dynamo's eager backend: same kernels
    report = _report(compiled)
    assert report["torch_compile"] == {"backend": "eager", "mode": None} and _report(plain)["torch_compile"] is None
    assert report["fingerprint"] == _report(plain)["fingerprint"]
    # compilation is how the labels are computed, not which settings made them: a run resumes with or without it
    assert main([*common, "--output-dir", str(plain), "--torch-compile-backend", "eager"]) == 0
    assert _report(plain)["images"] == {"labelled": 0, "finished_before": 4, "kept_existing": 0, "failed": 0}
    assert main([*common, "--output-dir", str(tmp_path / "bad"), "--torch-compile-mode", "fastest"]) == 2
    assert "--torch-compile-mode: Unrecognized mode=fastest" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_preview_asked_for_on_a_rerun_is_drawn_from_the_finished_labels(teacher_dir, extra_root, tmp_path,
                                                                         monkeypatch):
    from hms_segmentation.demo import colorize, palette_for

    images = str(extra_root / "leftImg8bit" / "val")
    output = tmp_path / "labels"
    common = ["--model", str(teacher_dir), "--input", images, "--layout", "folder", "--output-dir", str(output), *FAST]
    assert main(common) == 0
    labels = _digests(output)
    assert len(labels) == 4 and not list(output.rglob(f"*{PREVIEW_SUFFIX}"))
    forwards = []
    monkeypatch.setattr(autolabel_module, "predict", lambda *args, **kwargs: forwards.append(1))
    assert main([*common, "--preview"]) == 0
    assert not forwards and _digests(output) == labels  # nothing relabelled
    report = _report(output)
    assert report["images"]["finished_before"] == 4
    previews = sorted(output.rglob(f"*{PREVIEW_SUFFIX}"))
    assert len(previews) == 4 and report["bytes_written"]["previews"] == sum(p.stat().st_size for p in previews)
    for preview in previews:
        label = load_label(str(preview).replace(PREVIEW_SUFFIX, LABEL_SUFFIX))
        np.testing.assert_array_equal(np.asarray(Image.open(preview).convert("RGB")),
                                      np.asarray(colorize(label, palette_for(19))))
        source = preview.relative_to(output).as_posix()[: -len(PREVIEW_SUFFIX)] + ".png"  # marked as ours
        assert json.loads(Image.open(preview).text[PNG_TEXT_KEY]) == json.loads(
            Image.open(str(preview).replace(PREVIEW_SUFFIX, LABEL_SUFFIX)).text[PNG_TEXT_KEY]) and source in str(
            json.loads(Image.open(preview).text[PNG_TEXT_KEY]))


def test_an_output_dir_that_is_a_file_is_refused_before_the_model_runs(teacher_dir, extra_root, tmp_path, capsys):
    target = tmp_path / "labels"
    target.write_text("mine")
    assert main(["--model", str(teacher_dir), "--input", str(extra_root / "leftImg8bit" / "val"), "--layout",
                 "folder", "--output-dir", str(target), *FAST]) == 2
    assert f"--output-dir {target} is a file; expected a folder" in capsys.readouterr().err
    assert target.read_text() == "mine"


def test_auto_label_ratio_mixes_fine_and_auto_labelled_frames(teacher_dir, extra_root, tmp_path):
    from hms_segmentation.training.arguments import DataArguments
    from hms_segmentation.training.datasets import build_datasets

    root = _fresh_copy(extra_root, tmp_path)
    assert main(["--model", str(teacher_dir), "--input", str(root / "leftImg8bit" / "train_extra"), *FAST]) == 0
    args = DataArguments(dataset="cityscapes", data_dir=str(root), auto_label_ratio=0.75, crop_size=64)
    rows = build_datasets(args, seed=0, do_eval=False).train.rows
    ids = [row["id"] for row in rows]
    auto = [sample_id for sample_id in ids if sample_id.startswith("validham")]
    assert set(auto) == {path.name[: -len("_leftImg8bit.png")]
                         for path in (root / "leftImg8bit" / "train_extra").glob("*/*.png")}
    assert len(set(ids) - set(auto)) <= 12 and len(auto) / len(ids) > 0.4
    only_auto = build_datasets(DataArguments(dataset="cityscapes", data_dir=str(root), auto_label_ratio=1.0,
                                             crop_size=64), seed=0, do_eval=False).train.rows
    assert {row["id"] for row in only_auto} == set(auto)
    with pytest.raises(ValueError, match="--auto_label_ratio must be in"):
        DataArguments(dataset="cityscapes", data_dir=str(root), auto_label_ratio=1.5)


def test_auto_label_classes_use_auto_labelled_frames_only_as_class_uniform_crops(teacher_dir, extra_root, tmp_path):
    """The reference's record recipe: fine frames make each epoch (its length and plain crops); auto-labelled frames
    add centroids of the boost classes only, for the first `--auto_label_epochs` epochs."""
    from hms_segmentation.training.arguments import DataArguments
    from hms_segmentation.training.datasets import build_datasets

    root = _fresh_copy(extra_root, tmp_path)
    assert main(["--model", str(teacher_dir), "--input", str(root / "leftImg8bit" / "train_extra"), *FAST]) == 0
    classes = {0, 2, 8}  # road, building, vegetation: in every synthetic frame
    # the few fine frames share each epoch's class-uniform crops among more classes: enough epochs to draw the boost
    # classes' auto-labelled centroids
    epochs = 12
    args = DataArguments(dataset="cityscapes", data_dir=str(root), auto_label_classes="8,2,0",
                         auto_label_epochs=epochs, class_uniform_fraction=1.0, crop_size=64)
    assert args.auto_label_classes == "0,2,8"
    train = build_datasets(args, seed=0, do_eval=False).train
    fine = len(list((root / "leftImg8bit" / "train").glob("*/*.png")))
    ids = train.rows["id"]
    assert len(train) == fine and len(ids) > fine  # the epoch: one sample per fine frame
    assert set(ids[fine:]) == {path.name[: -len("_leftImg8bit.png")]
                               for path in (root / "leftImg8bit" / "train_extra").glob("*/*.png")}
    auto_picks = []
    for epoch in range(epochs):
        train.set_epoch(epoch)
        assert len(train.plan) == fine
        auto_picks += [(row, centroid) for row, centroid in train.plan if row >= fine]
    assert auto_picks and all(centroid is not None for _, centroid in auto_picks)  # never a plain crop
    for row, (x, y) in auto_picks:  # and always centred on a boost class of its auto-label
        assert load_label(train.rows[row]["label"])[y, x] in classes
    train.set_epoch(epochs)  # past --auto_label_epochs: fine frames only
    assert len(train.plan) == fine and all(row < fine for row, _ in train.plan)
    sample = train[0]
    assert sample["pixel_values"].shape[-2:] == (64, 64)


def test_the_trainer_runs_the_record_recipes_auto_label_epochs(teacher_dir, extra_root, tmp_path):
    from hms_segmentation.training.arguments import parse_arguments
    from hms_segmentation.training.train import run_training

    root = _fresh_copy(extra_root, tmp_path)
    assert main(["--model", str(teacher_dir), "--input", str(root / "leftImg8bit" / "train_extra"), *FAST]) == 0
    epochs = []

    class RecordingDataset:  # the plan each epoch trained on, as the Trainer's epoch callback set it
        def __init__(self, wrapped):
            self.wrapped = wrapped

        def __len__(self):
            return len(self.wrapped)

        def __getitem__(self, index):
            return self.wrapped[index]

        def set_epoch(self, epoch):
            self.wrapped.set_epoch(epoch)
            epochs.append((epoch, list(self.wrapped.plan)))

    from hms_segmentation.training import train as train_module

    build = train_module.build_datasets

    def recording_build(*args, **kwargs):
        data = build(*args, **kwargs)
        data.train = RecordingDataset(data.train)
        return data

    fine = len(list((root / "leftImg8bit" / "train").glob("*/*.png")))
    argv = ["--model_name_or_path", str(teacher_dir), "--dataset", "cityscapes", "--data_dir", str(root),
            "--auto_label_classes", "0,2,8", "--auto_label_epochs", "1", "--class_uniform_fraction", "1.0",
            "--crop_size", "64", "--output_dir", str(tmp_path / "run"), "--per_device_train_batch_size", "2",
            "--num_train_epochs", "2", "--report_to", "none", "--use_cpu", "true", "--do_train",
            "--save_strategy", "no", "--eval_scales", "1.0"]
    with mock.patch.object(train_module, "build_datasets", recording_build):
        run_training(*parse_arguments(argv))
    planned = dict(epochs)
    assert sorted(planned) == [0, 1] and all(len(plan) == fine for plan in planned.values())
    assert all(row < fine for row, _ in planned[1])  # past --auto_label_epochs
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.parametrize("settings, message", [
    ({"auto_label_classes": "13", "auto_label_ratio": 0.5}, "cannot be combined with --auto_label_ratio 0.5"),
    ({"auto_label_classes": "13", "streaming": True}, "cannot be combined with --streaming"),
    ({"auto_label_classes": "13", "class_uniform_fraction": 0.0}, "cannot be combined with --class_uniform_fraction 0"),
    ({"auto_label_classes": "13,19"}, r"trainIds in 0..18, got '13,19'"),
    ({"auto_label_classes": "car"}, "comma-separated trainIds, got 'car'"),
    ({"auto_label_epochs": 3}, "--auto_label_epochs needs --auto_label_classes"),
    ({"auto_label_classes": "13", "auto_label_epochs": 0}, "--auto_label_epochs must be at least 1"),
])
def test_auto_label_classes_arguments_are_checked(settings, message, tmp_path):
    from hms_segmentation.training.arguments import DataArguments

    with pytest.raises(ValueError, match=message):
        DataArguments(dataset="cityscapes", data_dir=str(tmp_path), **settings)
    with pytest.raises(ValueError, match="cannot be combined with --dataset mapillary"):
        DataArguments(dataset="mapillary", data_dir=str(tmp_path), auto_label_classes="13")


def test_two_processes_label_disjoint_halves_like_one(teacher_dir, extra_root, tmp_path):
    root = _fresh_copy(extra_root, tmp_path)
    single = tmp_path / "single"
    split = root / "leftImg8bit" / "train_extra"
    assert main(["--model", str(teacher_dir), "--input", str(split), "--output-dir", str(single), *FAST]) == 0
    # on a machine without GPUs, accelerate's multi-process launch runs MULTI_CPU (gloo)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", "29541", "-m", "hms_segmentation.autolabel", "--model", str(teacher_dir),
               "--input", str(split), "--output-dir", str(tmp_path / "double"), *FAST]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert _digests(tmp_path / "double") == _digests(single) and len(_digests(single)) == 4
    report = _report(tmp_path / "double")
    assert report["processes"] == 2 and report["images"]["labelled"] == 4


def test_an_output_folder_report_file_of_the_user_is_never_replaced(teacher_dir, shared_data_dir, tmp_path, capsys):
    images = tmp_path / "photos"
    images.mkdir()
    shutil.copy(shared_data_dir / "odd_inputs" / "rgb_ok.png", images / "street.png")
    output = tmp_path / "labels"
    output.mkdir()
    (output / REPORT_FILE).write_text("my own notes")
    argv = ["--model", str(teacher_dir), "--input", str(images), "--output-dir", str(output), *FAST]
    assert main(argv) == 2
    assert f"{output / REPORT_FILE} exists and is not an auto-labelling report" in capsys.readouterr().err
    assert (output / REPORT_FILE).read_text() == "my own notes" and not list(output.rglob(f"*{LABEL_SUFFIX}"))
    assert main([*argv, "--overwrite"]) == 0
    assert main(argv) == 0 and _report(output)["images"]["finished_before"] == 1  # its own report: replaced


def test_an_input_folder_without_images_is_an_error(teacher_dir, tmp_path, capsys):
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    output = tmp_path / "labels"
    assert main(["--model", str(teacher_dir), "--input", str(tmp_path / "photos"), "--output-dir", str(output),
                 *FAST]) == 2
    assert "holds no images to label: expected images (.png, .jpg" in capsys.readouterr().err
    assert not output.exists()


def test_two_images_that_would_share_a_label_name_are_named_not_overwritten(teacher_dir, shared_data_dir, tmp_path):
    odd = shared_data_dir / "odd_inputs"
    images = tmp_path / "photos"
    (images / "sub").mkdir(parents=True)
    shutil.copy(odd / "cmyk.jpg", images / "street.jpg")
    shutil.copy(odd / "rgb_ok.png", images / "street.png")
    shutil.copy(odd / "grayscale.png", images / "sub" / "street.png")  # another folder: another label
    output = tmp_path / "labels"
    argv = ["--model", str(teacher_dir), "--input", str(images), "--output-dir", str(output), *FAST]
    for overwrite in ([], ["--overwrite"]):
        assert main(argv + overwrite) == 0
        report = _report(output)
        assert report["images"]["failed"] == 1 and report["images"]["kept_existing"] == 0
        assert "street.png: not labelled, its label street_gtAuto_labelTrainIds.png is that of street.jpg" in \
            report["failed_files"][0]
        assert label_marker(output / f"street{LABEL_SUFFIX}")["source"] == "street.jpg"
    assert sorted(sample.image_path for sample in find_auto_labelled_folder(images, output)) == [
        str((images / "street.jpg").resolve()), str((images / "sub" / "street.png").resolve())]
