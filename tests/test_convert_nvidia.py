"""The NVIDIA checkpoint converter: formats it reads, errors it gives, ImageNet trunk loading."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from hms_segmentation import HMSConfig, HMSForSemanticSegmentation
from hms_segmentation.convert_nvidia import (
    CheckpointConversionError,
    convert_nvidia_checkpoint,
    convert_nvidia_state_dict,
    infer_config,
    load_imagenet_trunk,
    main,
    nvidia_key_to_hms,
)
from parity_utils import load_reference_state_dict, write_nvidia_checkpoint


@pytest.fixture(scope="module")
def reference_hrnet_state(parity_dir) -> dict[str, torch.Tensor]:
    return load_reference_state_dict(parity_dir / "hrnet_ocr")


def test_key_table_maps_reference_names():
    assert nvidia_key_to_hms("backbone.stage4.2.fuse_layers.3.0.2.1.running_var") == (
        "backbone.stage4.2.fuse_layers.3.0.2.1.running_var"
    )
    assert nvidia_key_to_hms("ocr.conv3x3_ocr.1.0.weight") == "decode_head.pixel_projection.norm.weight"
    assert nvidia_key_to_hms("backbone.layer0.1.running_mean") == "backbone.bn1.running_mean"
    assert nvidia_key_to_hms("final.6.weight") == "decode_head.classifier.2.weight"
    assert nvidia_key_to_hms("criterion.weight") is None


def test_architecture_is_inferred_from_shapes(reference_hrnet_state):
    config = infer_config(reference_hrnet_state)
    assert config.trunk == "hrnet_ocr"
    assert [stage["num_channels"] for stage in config.hrnet_stages][1:] == [[18, 36], [18, 36, 72], [18, 36, 72, 144]]
    assert [stage["num_modules"] for stage in config.hrnet_stages] == [1, 1, 4, 3]
    assert (config.ocr_mid_channels, config.ocr_key_channels, config.num_labels) == (128, 64, 19)


def test_w48_mapillary_shapes_are_inferred():
    # the released W48 layout with 65 classes: our model's keys mapped back through the reference names
    config = HMSConfig.from_preset("hrnet_w48_ocr", num_labels=65)
    with torch.device("meta"):
        model = HMSForSemanticSegmentation(config)
    ours_to_nvidia = {}
    for key in model.state_dict():
        nvidia = _nvidia_name(key)
        assert nvidia_key_to_hms(nvidia) == key
        ours_to_nvidia[key] = nvidia
    fake = {ours_to_nvidia[k]: torch.empty(v.shape) for k, v in model.state_dict().items()}
    inferred = infer_config(fake)
    assert inferred.hrnet_stages == config.hrnet_stages and inferred.num_labels == 65
    assert (inferred.ocr_mid_channels, inferred.ocr_key_channels) == (512, 256)


def _nvidia_name(key: str) -> str:
    from hms_segmentation.convert_nvidia import NVIDIA_KEY_PREFIXES

    for nvidia_prefix, hms_prefix in NVIDIA_KEY_PREFIXES:
        if nvidia_prefix.startswith("backbone.layer0"):
            continue  # ResNet-only renames
        if key.startswith(hms_prefix):
            return nvidia_prefix + key[len(hms_prefix):]
    raise AssertionError(f"no reference name for {key}")


def test_unmatched_missing_and_misshaped_keys_are_all_listed(reference_hrnet_state):
    broken = dict(reference_hrnet_state)
    broken["criterion.nll_loss.weight"] = torch.zeros(3)
    del broken["scale_attn.bn1.running_var"]
    broken["ocr.cls_head.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointConversionError) as error:
        convert_nvidia_state_dict(broken)
    message = str(error.value)
    assert "criterion.nll_loss.weight" in message
    assert "scale_attention_head.inner.norm.running_var" in message
    assert "ocr.cls_head.bias" in message and "nothing was loaded" in message


def test_unknown_architecture_is_refused():
    with pytest.raises(CheckpointConversionError, match="architecture"):
        convert_nvidia_state_dict({"scale_attn.conv0.weight": torch.zeros(4, 4, 3, 3), "foo": torch.zeros(1)})


@pytest.mark.parametrize("layout", ["pth_with_module_prefix", "bare_state_dict", "safetensors"])
def test_every_checkpoint_layout_converts(reference_hrnet_state, tmp_path, layout):
    if layout == "pth_with_module_prefix":
        path = write_nvidia_checkpoint(reference_hrnet_state, tmp_path / "ckpt.pth")
    elif layout == "bare_state_dict":
        path = tmp_path / "bare.pth"
        torch.save(reference_hrnet_state, path)
    else:
        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in reference_hrnet_state.items()}, str(path))
    model = convert_nvidia_checkpoint(path, tmp_path / "out", dataset="cityscapes")
    assert model.config.id2label[18] == "bicycle"
    reloaded = HMSForSemanticSegmentation.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(
        reloaded.state_dict()["decode_head.classifier.weight"], reference_hrnet_state["ocr.cls_head.weight"]
    )


def test_checkpoint_with_numpy_metrics_is_read_safely(reference_hrnet_state, tmp_path):
    import numpy as np

    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": reference_hrnet_state, "mean_iu": np.float64(0.85), "epoch": 3}, path)
    assert convert_nvidia_checkpoint(path, tmp_path / "out").config.num_labels == 19


def test_existing_output_is_never_overwritten(reference_hrnet_state, tmp_path):
    checkpoint = write_nvidia_checkpoint(reference_hrnet_state, tmp_path / "ckpt.pth")
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    assert main([str(checkpoint), str(output)]) == 1
    assert (output / "notes.txt").read_text() == "mine" and not (output / "config.json").exists()


def test_cli_reports_missing_and_unreadable_files(tmp_path, capsys):
    assert main([str(tmp_path / "absent.pth"), str(tmp_path / "out")]) == 1
    assert "absent.pth" in capsys.readouterr().err
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    assert main([str(junk), str(tmp_path / "out")]) == 1
    assert "junk.pth" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("corrupt.safetensors", b"not safetensors", "not a readable safetensors file"),
        ("empty.pth", b"", "found an empty file"),
        ("empty.safetensors", b"", "found an empty file"),
    ],
)
def test_unreadable_checkpoint_is_named_without_a_traceback(tmp_path, capsys, name, content, message):
    (tmp_path / name).write_bytes(content)
    assert main([str(tmp_path / name), str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert name in error and message in error
    assert not (tmp_path / "out").exists()


def test_output_path_that_is_a_file_is_refused_and_kept(reference_hrnet_state, tmp_path, capsys):
    checkpoint = write_nvidia_checkpoint(reference_hrnet_state, tmp_path / "ckpt.pth")
    output = tmp_path / "out"
    output.write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert main([str(checkpoint), str(output), *extra]) == 1
        assert "is an existing file, not a folder" in capsys.readouterr().err
    assert main([str(checkpoint), str(output / "inside")]) == 1  # a folder below a file: reported, no traceback
    assert "inside" in capsys.readouterr().err
    assert output.read_text() == "mine"


def test_class_count_must_match_the_dataset(reference_hrnet_state):
    with pytest.raises(CheckpointConversionError, match="[Mm]apillary"):
        convert_nvidia_state_dict(reference_hrnet_state, dataset="mapillary")


def test_hrnet_imagenet_file_loads_into_the_trunk(reference_hrnet_state, tmp_path):
    model = convert_nvidia_state_dict(reference_hrnet_state)
    trunk = {"model." + k: torch.randn_like(v.float()) if v.is_floating_point() else v
             for k, v in model.backbone.state_dict().items()}
    trunk["model.last_layer.0.weight"] = torch.zeros(3)  # ImageNet classification head, ignored
    trunk["incre_modules.0.0.conv1.weight"] = torch.zeros(3)
    path = tmp_path / "hrnetv2_imagenet.pth"
    torch.save(trunk, path)
    ignored = load_imagenet_trunk(model, path)
    assert ignored == ["incre_modules.0.0.conv1.weight", "last_layer.0.weight"]
    torch.testing.assert_close(model.backbone.conv1.weight, trunk["model.conv1.weight"])


def test_torchvision_resnet50_state_dict_loads_into_the_trunk(tmp_path):
    config = HMSConfig(trunk="resnet50_deeplabv3plus", num_labels=3, aspp_channels=8, decoder_aspp_channels=8,
                       decoder_fine_channels=4, segmentation_head_channels=8, attention_bottleneck_channels=8)
    model = HMSForSemanticSegmentation(config)
    # torchvision's layout: conv1/bn1/layer1..4 with downsample.0/1, plus the fc classifier
    state = {k: torch.randn_like(v.float()) if v.is_floating_point() else v for k, v in model.backbone.state_dict().items()}
    assert "layer1.0.downsample.0.weight" in state and "layer4.2.bn3.running_var" in state
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    assert load_imagenet_trunk(model, path) == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(model.backbone.layer3[5].conv2.weight,
                               state["layer3.5.conv2.weight"])
    del state["layer2.0.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointConversionError, match="layer2.0.conv1.weight"):
        load_imagenet_trunk(model, path)


def test_a_mapillary_model_is_written_with_the_references_evaluation_settings(reference_hrnet_state, tmp_path):
    """scripts/eval_mapillary.yml: scales 0.25,0.5,1.0,2.0 of the image shrunk to a long side of 2177."""
    import numpy as np

    from hms_segmentation import HMSImageProcessor
    from tiny_configs import TINY_HRNET

    torch.manual_seed(0)
    model = HMSForSemanticSegmentation(HMSConfig(**{**TINY_HRNET, "num_labels": 65}))
    path = tmp_path / "mapillary.pth"
    torch.save({_nvidia_name(key): value for key, value in model.state_dict().items()}, path)
    convert_nvidia_checkpoint(path, tmp_path / "mapillary")  # 65 classes: Mapillary Vistas v1.2
    converted = HMSForSemanticSegmentation.from_pretrained(tmp_path / "mapillary")
    processor = HMSImageProcessor.from_pretrained(tmp_path / "mapillary")
    assert converted.config.id2label[0] == "Bird" and converted.config.inference_scales == [0.25, 0.5, 1.0, 2.0]
    assert processor.max_long_side == 2177
    inputs = processor(images=np.zeros((3000, 4000, 3), np.uint8), return_tensors="pt")  # a 12-megapixel photo
    assert tuple(inputs["pixel_values"].shape[-2:]) == (1664, 2176)  # shrunk, then rounded to the size divisor
    # a Cityscapes model keeps the defaults (the reference evaluates Cityscapes at full size, scales 0.5,1.0,2.0)
    convert_nvidia_checkpoint(write_nvidia_checkpoint(reference_hrnet_state, tmp_path / "c.pth"), tmp_path / "city")
    assert HMSImageProcessor.from_pretrained(tmp_path / "city").max_long_side is None
    assert HMSForSemanticSegmentation.from_pretrained(tmp_path / "city").config.inference_scales == [0.5, 1.0, 2.0]


def _as_numpy1_pickle(path):
    """Rewrite a torch.save zip so that its numpy scalars are named as numpy 1.x wrote them (the released files)."""
    import zipfile

    with zipfile.ZipFile(path) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w") as target:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
                assert b"numpy.core.multiarray\nscalar" in data
            target.writestr(info, data)
    return path


def test_checkpoint_written_with_numpy_1_metrics_is_read(reference_hrnet_state, tmp_path):
    """NVIDIA's released checkpoints (2020, numpy 1.x) store `mean_iu` as numpy.core.multiarray.scalar."""
    import numpy as np

    path = tmp_path / "cityscapes_ocrnet.HRNet_Mscale_outstanding-turtle.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in reference_hrnet_state.items()},
                "mean_iu": np.float64(0.86), "epoch": 175}, path)
    _as_numpy1_pickle(path)
    assert convert_nvidia_checkpoint(path, tmp_path / "out").config.num_labels == 19


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.makedirs, (str(self.marker),)


@pytest.mark.parametrize("kind", ["text", "png", "truncated_legacy", "truncated_zip", "unsafe_pickle"])
def test_a_file_that_is_no_safe_checkpoint_gets_a_clear_error(reference_hrnet_state, tmp_path, capsys, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "text":
        path.write_text("hello")  # a text file torch.load meets with a KeyError
    elif kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))  # an image saved under a checkpoint's name
    elif kind in ("truncated_legacy", "truncated_zip"):
        import numpy as np

        torch.save({"state_dict": reference_hrnet_state, "mean_iu": np.float64(0.8)}, path,  # as NVIDIA saves it
                   _use_new_zipfile_serialization=kind == "truncated_zip")
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        torch.save({"state_dict": reference_hrnet_state, "extra": _RunsCode(tmp_path / "ran")}, path)
    assert main([str(path), str(tmp_path / "out")]) == 1  # no traceback
    error = capsys.readouterr().err
    assert path.name in error and not (tmp_path / "out").exists()
    assert "will likely succeed" not in error  # never advise weights_only=False for a broken or foreign file
    if kind == "unsafe_pickle":
        assert "refused to load the Python object os.makedirs" in error and not (tmp_path / "ran").exists()
    else:
        assert "not a readable PyTorch checkpoint" in error or "expected a PyTorch checkpoint" in error


def test_a_file_of_another_architecture_is_named(reference_hrnet_state, tmp_path):
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}  # torchvision ResNet-50
    with pytest.raises(CheckpointConversionError, match=r"cannot tell the architecture.*found keys like \['conv1"):
        convert_nvidia_state_dict(resnet)
    single_scale = {k: v for k, v in reference_hrnet_state.items() if not k.startswith("scale_attn.")}  # ocrnet.HRNet
    with pytest.raises(CheckpointConversionError, match="scale-attention head.*has none"):
        convert_nvidia_state_dict(single_scale)
    converted = convert_nvidia_state_dict(reference_hrnet_state)  # already our key names
    with pytest.raises(CheckpointConversionError, match="hms-segmentation key names already.*from_pretrained"):
        convert_nvidia_state_dict(converted.state_dict())
    path = tmp_path / "other_trainer.pth"
    torch.save({"model": reference_hrnet_state, "epoch": 3}, path)
    with pytest.raises(CheckpointConversionError,
                       match=r"weights under 'state_dict'.*top-level keys: \['epoch', 'model'\]"):
        convert_nvidia_checkpoint(path, tmp_path / "out")
