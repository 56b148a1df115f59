"""Pluggable trunks: transformers backbones (ResNet, ConvNeXt) and MobileNetV2 under DeepLabV3+, and the staged recipe."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoBackbone, BertConfig, ConvNextConfig, ResNetConfig

from hms_segmentation import HMSConfig, HMSForSemanticSegmentation
from hms_segmentation.backbone_mobilenet import make_divisible
from hms_segmentation.convert_nvidia import CheckpointConversionError, load_imagenet_trunk
from test_training import ensure_tiny_synthetic, synthetic_dir, tiny_run_arguments  # noqa: F401 (fixture)
from tiny_configs import TINY_HRNET

SLIM_DECODER = {
    "aspp_channels": 8,
    "aspp_dilations": [1, 2, 3],
    "decoder_aspp_channels": 8,
    "decoder_fine_channels": 4,
    "segmentation_head_channels": 8,
    "attention_bottleneck_channels": 8,
    "num_labels": 5,
}
TINY_BACKBONES = {
    "resnet": ResNetConfig(embedding_size=8, hidden_sizes=[8, 12, 16, 24], depths=[1, 1, 1, 1]),
    "convnext": ConvNextConfig(hidden_sizes=[8, 12, 16, 24], depths=[1, 1, 1, 1]),
}
TINY_MOBILENET = {"trunk": "mobilenetv2_deeplabv3plus", "mobilenet_width_multiplier": 0.35, **SLIM_DECODER}


def _train_steps(model: HMSForSemanticSegmentation, steps: int = 2) -> dict[str, torch.Tensor]:
    """A few SGD steps on random data; returns the parameters before them."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        pixel_values = torch.randn(2, 3, 64, 64, generator=generator)
        labels = torch.randint(0, model.config.num_labels, (2, 64, 64), generator=generator)
        loss = model(pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    return before


@pytest.mark.parametrize("name", sorted(TINY_BACKBONES))
def test_transformers_backbone_trains_and_chains_scales(name, tmp_path):
    torch.manual_seed(0)
    config = HMSConfig(backbone_config=TINY_BACKBONES[name].to_dict(), **SLIM_DECODER)
    assert config.trunk == "backbone_deeplabv3plus"
    assert config.backbone_config.out_features == ["stage1", "stage4"]  # stride 4 and the deepest stage
    model = HMSForSemanticSegmentation(config)
    before = _train_steps(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert any(n.startswith("backbone.encoder.") for n in changed) and "decode_head.classifier.2.weight" in changed
    assert any(n.startswith("scale_attention_head.") for n in changed)

    model.eval()
    pixel_values = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        outputs = model(pixel_values, scales=[0.5, 1.0, 2.0], output_attentions=True)
    assert outputs.logits.shape == (1, 5, 64, 96)
    assert [a.shape[-2:] for a in outputs.attentions] == [(32, 48), (64, 96), (128, 192)]

    model.save_pretrained(tmp_path)
    reloaded = HMSForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert type(reloaded.backbone.encoder) is type(model.backbone.encoder)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values, scales=[0.5, 1.0, 2.0]).logits, outputs.logits)


def test_pretrained_backbone_from_a_local_folder_keeps_its_weights(tmp_path):
    torch.manual_seed(0)
    pretrained = AutoBackbone.from_config(TINY_BACKBONES["resnet"])
    pretrained.save_pretrained(tmp_path / "resnet")
    config = HMSConfig(backbone=str(tmp_path / "resnet"), use_pretrained_backbone=True, **SLIM_DECODER)
    model = HMSForSemanticSegmentation(config)
    loaded = model.backbone.encoder.state_dict()
    for key, value in pretrained.state_dict().items():
        assert torch.equal(loaded[key], value), key
    # the checkpoint holds those weights now: reloading must not look for the backbone folder again
    assert model.config.use_pretrained_backbone is False
    model.save_pretrained(tmp_path / "hms")
    (tmp_path / "resnet" / "model.safetensors").unlink()
    reloaded = HMSForSemanticSegmentation.from_pretrained(tmp_path / "hms")
    assert torch.equal(reloaded.backbone.encoder.state_dict()["embedder.embedder.convolution.weight"],
                       pretrained.state_dict()["embedder.embedder.convolution.weight"])


def test_the_readme_convnext_example_builds_with_the_config_defaults():
    # ConvNextConfig's default hidden_sizes is a tuple, which ConvNextBackbone concatenates to a list
    backbone_config = ConvNextConfig(depths=[1, 1, 1, 1], out_features=["stage1", "stage4"])
    assert isinstance(backbone_config.hidden_sizes, tuple)
    model = HMSForSemanticSegmentation(HMSConfig(backbone_config=backbone_config, **SLIM_DECODER)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64), scales=[1.0]).logits.shape[-2:] == (64, 64)
    assert backbone_config.out_features == ["stage1", "stage4"]
    untouched = ConvNextConfig(depths=[1, 1, 1, 1])
    HMSConfig(backbone_config=untouched)  # asks for two stages in its own copy, not in the caller's config
    assert untouched.out_features == ["stage4"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backbone_config": BertConfig()}, "backbone config"),
        ({"backbone_config": {"hidden_sizes": [8]}}, "model_type"),
        ({"trunk": "hrnet_ocr", "backbone_config": TINY_BACKBONES["resnet"]}, "backbone_deeplabv3plus"),
        ({"trunk": "backbone_deeplabv3plus"}, "needs backbone_config or backbone"),
        ({"backbone_config": TINY_BACKBONES["resnet"], "use_pretrained_backbone": True}, "needs `backbone`"),
        ({"trunk": "mobilenetv2_deeplabv3plus", "mobilenet_output_stride": 4}, "mobilenet_output_stride"),
        ({"trunk": "mobilenetv2_deeplabv3plus", "mobilenet_width_multiplier": 0}, "mobilenet_width_multiplier"),
    ],
)
def test_bad_trunk_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HMSConfig(**kwargs)


def test_a_transformers_backbone_refuses_a_state_dict_file(tmp_path):
    model = HMSForSemanticSegmentation(HMSConfig(backbone_config=TINY_BACKBONES["resnet"], **SLIM_DECODER))
    with pytest.raises(ValueError, match="use_pretrained_backbone"):
        load_imagenet_trunk(model, tmp_path / "weights.pth")


# --- MobileNetV2 ---------------------------------------------------------------------------------------------------

# torchvision's mobilenet_v2 layout, written out from the architecture (t, c, n, s), independently of our module
TORCHVISION_STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def torchvision_mobilenet_v2_state_dict(width: float, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    def divisible(value: float) -> int:
        rounded = max(8, int(value + 4) // 8 * 8)
        return rounded + 8 if rounded < 0.9 * value else rounded

    state: dict[str, torch.Tensor] = {}

    def conv_bn(prefix: str, conv_shape: tuple[int, ...], bn_index: int | None) -> None:
        state[f"{prefix}.weight" if bn_index is None else f"{prefix}.0.weight"] = torch.randn(conv_shape)
        if bn_index is not None:
            bn = f"{prefix}.{bn_index}"
            channels = conv_shape[0]
            state.update({f"{bn}.weight": torch.rand(channels) + 0.5, f"{bn}.bias": torch.randn(channels),
                          f"{bn}.running_mean": torch.randn(channels), f"{bn}.running_var": torch.rand(channels) + 0.5,
                          f"{bn}.num_batches_tracked": torch.tensor(100)})

    channels = divisible(32 * width)
    conv_bn("features.0", (channels, 3, 3, 3), 1)
    index = 1
    for t, c, n, _ in TORCHVISION_STAGES:
        out = divisible(c * width)
        for _ in range(n):
            hidden, prefix, j = channels * t, f"features.{index}.conv", 0
            if t != 1:
                conv_bn(f"{prefix}.0", (hidden, channels, 1, 1), 1)
                j = 1
            conv_bn(f"{prefix}.{j}", (hidden, 1, 3, 3), 1)
            conv_bn(f"{prefix}.{j + 1}", (out, hidden, 1, 1), None)
            bn = f"{prefix}.{j + 2}"
            state.update({f"{bn}.weight": torch.rand(out) + 0.5, f"{bn}.bias": torch.randn(out),
                          f"{bn}.running_mean": torch.randn(out), f"{bn}.running_var": torch.rand(out) + 0.5,
                          f"{bn}.num_batches_tracked": torch.tensor(100)})
            channels, index = out, index + 1
    last = divisible(1280 * max(1.0, width))
    conv_bn(f"features.{index}", (last, channels, 1, 1), 1)
    state["classifier.1.weight"], state["classifier.1.bias"] = torch.randn(num_classes, last), torch.randn(num_classes)
    return state


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_mobilenet_v2_strides_and_widths(output_stride):
    config = HMSConfig(**{**TINY_MOBILENET, "mobilenet_output_stride": output_stride})
    backbone = HMSForSemanticSegmentation(config).backbone.eval()
    with torch.no_grad():
        low, high = backbone(torch.randn(1, 3, 128, 192))
    assert low.shape == (1, make_divisible(24 * 0.35), 32, 48)
    assert high.shape == (1, make_divisible(320 * 0.35), 128 // output_stride, 192 // output_stride)
    assert [make_divisible(c * 0.35) for c in (32, 16, 24, 64, 320)] == [16, 8, 8, 24, 112]


@pytest.mark.parametrize("width", [0.35, 1.0])
def test_mobilenet_v2_loads_a_torchvision_imagenet_state_dict(width, tmp_path):
    state = torchvision_mobilenet_v2_state_dict(width)
    torch.save(state, tmp_path / "mobilenet_v2.pth")
    model = HMSForSemanticSegmentation(HMSConfig(**{**TINY_MOBILENET, "mobilenet_width_multiplier": width}))
    ignored = load_imagenet_trunk(model, tmp_path / "mobilenet_v2.pth")
    assert ignored and all(key.startswith(("features.18.", "classifier.")) for key in ignored)
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[key], state[key]) for key in loaded)
    assert sum(p.numel() for p in model.backbone.parameters()) + sum(
        state[k].numel() for k in ignored if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    ) == sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


def test_mobilenet_v2_refuses_a_state_dict_of_another_width(tmp_path):
    torch.save(torchvision_mobilenet_v2_state_dict(1.0), tmp_path / "mobilenet_v2.pth")
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_MOBILENET))
    with pytest.raises(CheckpointConversionError, match="shapes differ"):
        load_imagenet_trunk(model, tmp_path / "mobilenet_v2.pth")


def test_mobilenet_v2_trains_and_chains_scales():
    torch.manual_seed(0)
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_MOBILENET))
    before = _train_steps(model)
    assert not torch.equal(before["backbone.features.0.0.weight"], model.backbone.features[0][0].weight)
    with torch.no_grad():
        outputs = model.eval()(torch.randn(1, 3, 96, 128), scales=[0.25, 0.5, 1.0, 2.0], output_attentions=True)
    assert outputs.logits.shape == (1, 5, 96, 128) and len(outputs.attentions) == 4


def test_mobilenet_v2_supports_gradient_checkpointing():
    torch.manual_seed(0)
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_MOBILENET)).train()
    reference = HMSForSemanticSegmentation(HMSConfig(**TINY_MOBILENET)).train()
    reference.load_state_dict(model.state_dict())
    model.activation_checkpointing_enable()
    assert model.backbone.features[1].gradient_checkpointing
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 5, (2, 64, 64), generator=torch.Generator().manual_seed(1))
    for network in (model, reference):
        network(pixel_values, labels=labels).loss.backward()
    for (name, parameter), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(parameter.grad, expected.grad, rtol=1e-3, atol=1e-6, msg=name)
    torch.testing.assert_close(model.state_dict(), reference.state_dict(), rtol=0, atol=0)  # statistics updated once


def test_deeplab_training_with_batch_size_one_says_what_is_needed():
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_MOBILENET)).train()
    pixel_values, labels = torch.randn(1, 3, 64, 64), torch.randint(0, 5, (1, 64, 64))
    with pytest.raises(ValueError, match=r"batch_size >= 2 in training mode.*got batch_size 1"):
        model(pixel_values, labels=labels)
    for module in model.modules():  # frozen BatchNorm statistics (the staged recipe's stage 2) need no batch
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    assert torch.isfinite(model(pixel_values, labels=labels).loss)


def test_hrnet_training_with_one_tiny_image_says_what_is_needed():
    # one 32x32 image is 1x1 at the stride-32 branch: PyTorch's BatchNorm failed deep inside the trunk
    torch.manual_seed(0)
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_HRNET)).train()
    with pytest.raises(ValueError, match=r"HRNet trunk .* one image of 32x32 pixels \(batch_size 1\) is 1x1 at its "
                                         r"stride-32 branch; train with a batch of at least 2"):
        model(torch.randn(1, 3, 32, 32), scales=[1.0])
    with pytest.raises(ValueError, match=r"one image of 20x20 pixels"):  # 40x40 is enough; its 0.5 scale is not
        model(torch.randn(1, 3, 40, 40), scales=[0.5, 1.0])
    assert torch.isfinite(model(torch.randn(1, 3, 33, 16), scales=[1.0], labels=torch.zeros(1, 33, 16).long()).loss)
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32), labels=torch.zeros(2, 32, 32).long()).loss)
    for module in model.modules():  # frozen BatchNorm statistics need no batch
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32), labels=torch.zeros(1, 32, 32).long()).loss)


def test_deeplab_training_with_one_image_per_process_under_sync_batch_norm_is_left_to_it(monkeypatch):
    # the reference's 1 image per GPU: SyncBatchNorm over several processes has the statistics a single one lacks
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_MOBILENET)).train()
    model.decode_head.aspp.image_pooling.norm = torch.nn.SyncBatchNorm.convert_sync_batchnorm(
        model.decode_head.aspp.image_pooling.norm)
    pixel_values = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"batch_size >= 2 in training mode.*--sync_bn"):  # not distributed
        model(pixel_values)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 1)
    with pytest.raises(ValueError, match=r"batch_size >= 2 in training mode"):  # one process: nothing to sync with
        model(pixel_values)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    # our check lets it through; PyTorch's SyncBatchNorm then wants the GPU it runs on (CUDA-only)
    with pytest.raises(ValueError, match=r"SyncBatchNorm expected input tensor to be on GPU"):
        model(pixel_values)


def test_mobilenet_preset_is_small():
    model = HMSForSemanticSegmentation(HMSConfig.from_preset("mobilenetv2_deeplabv3plus"))
    assert math.isclose(sum(p.numel() for p in model.backbone.parameters()) / 1e6, 1.81, abs_tol=0.01)


# --- the staged recipe ---------------------------------------------------------------------------------------------


def test_each_training_stage_trains_only_its_parameters(synthetic_dir, tmp_path):  # noqa: F811
    from hms_segmentation.training.arguments import parse_arguments
    from hms_segmentation.training.train import run_training

    ensure_tiny_synthetic(synthetic_dir)
    start = tmp_path / "start"
    torch.manual_seed(0)
    HMSForSemanticSegmentation(HMSConfig(**{**TINY_MOBILENET, "num_labels": 19})).save_pretrained(start)
    expected_trained = {1: {"backbone", "decode_head"}, 2: {"scale_attention_head"}, 3: {"backbone", "decode_head"}}
    previous = start
    for stage in (1, 2, 3):
        output = tmp_path / f"stage{stage}"
        run_training(*parse_arguments(tiny_run_arguments(previous, synthetic_dir, output, "--do_train",
                                                         "--training_stage", str(stage), "--learning_rate", "0.05")))
        before = HMSForSemanticSegmentation.from_pretrained(previous).state_dict()
        after = HMSForSemanticSegmentation.from_pretrained(output).state_dict()
        changed = {key.split(".")[0] for key, value in after.items() if not torch.equal(value, before[key])}
        # frozen parts keep their BatchNorm statistics too, so nothing of them changes
        assert changed == expected_trained[stage], stage
        trained = HMSForSemanticSegmentation.from_pretrained(output)
        assert trained.config.training_scales == ([1.0] if stage == 1 else [0.5, 1.0])
        previous = output


def test_a_bad_training_stage_is_named(tmp_path):
    from hms_segmentation.training.arguments import parse_arguments

    with pytest.raises(ValueError, match="--training_stage"):
        parse_arguments(["--output_dir", str(tmp_path), "--training_stage", "4"])
