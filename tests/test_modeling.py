"""HMSConfig and HMSForSemanticSegmentation on tiny configs: the chain, the outputs, training features."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from hms_segmentation import (
    HMSConfig,
    HMSForSemanticSegmentation,
    hierarchical_scale_fusion,
    hierarchical_scale_weights,
)
from hms_segmentation.configuration_hms import MODEL_PRESETS
from tiny_configs import TINY_HRNET, TINY_RESNET

@pytest.fixture(scope="module", params=["hrnet_ocr", "resnet50_deeplabv3plus"])
def tiny_model(request) -> HMSForSemanticSegmentation:
    torch.manual_seed(0)
    config = HMSConfig(**(TINY_HRNET if request.param == "hrnet_ocr" else TINY_RESNET))
    return HMSForSemanticSegmentation(config).eval()


@pytest.fixture(scope="module")
def tiny_hrnet() -> HMSForSemanticSegmentation:
    torch.manual_seed(0)
    return HMSForSemanticSegmentation(HMSConfig(**TINY_HRNET)).eval()


def images(batch: int = 2, height: int = 48, width: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


# --- configuration -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("trunk", "vit"),
        ("hrnet_preset", "w64"),
        ("training_scales", [0.5, -1.0]),
        ("inference_scales", []),
        ("inference_scales", [1.0, 1.0]),
        ("primary_loss", "dice"),
        ("ocr_aux_weight", -0.1),
        ("ocr_aux_weight", float("inf")),
        ("supervised_scale_weight", float("nan")),
        ("rmi_loss_weight_lambda", float("inf")),
        ("ocr_mid_channels", 0),
        ("rmi_radius", 11),
        ("rmi_pool_size", 3),
        ("attention_dropout", 1.5),
        ("resnet_layers", [3, 4, 6]),
    ],
)
def test_bad_config_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        HMSConfig(**{field: value})


def test_bad_hrnet_stage_spec_names_the_stage():
    stages = [dict(stage) for stage in TINY_HRNET["hrnet_stages"]]
    stages[2] = {**stages[2], "num_channels": [4, 8]}
    with pytest.raises(ValueError, match="stage 3"):
        HMSConfig(hrnet_stages=stages)


def test_defaults_are_the_reference_recipe():
    config = HMSConfig()
    assert config.trunk == "hrnet_ocr" and config.hrnet_output_channels == 720
    assert (config.ocr_mid_channels, config.ocr_key_channels) == (512, 256)
    assert config.training_scales == [0.5, 1.0] and config.inference_scales == [0.5, 1.0, 2.0]
    assert config.num_labels == 19 and config.id2label[0] == "road" and config.ignore_index == 255
    assert (config.ocr_aux_weight, config.supervised_scale_weight, config.primary_loss) == (0.4, 0.05, "rmi")
    assert config.align_corners is False


def test_every_preset_builds_a_config():
    for name in MODEL_PRESETS:
        assert HMSConfig.from_preset(name).model_type == "hms"
    with pytest.raises(ValueError, match="preset"):
        HMSConfig.from_preset("nope")


def test_hrnet_w48_preset_has_the_released_size():
    with torch.device("meta"):
        model = HMSForSemanticSegmentation(HMSConfig.from_preset("hrnet_w48_ocr"))
    assert sum(p.numel() for p in model.parameters()) == 72_143_430


# --- the attention chain -------------------------------------------------------------------------------------------


def test_two_scale_fusion_is_the_paper_formula():
    low, attention = torch.randn(1, 3, 4, 6), torch.rand(1, 1, 4, 6)
    high = torch.randn(1, 3, 8, 12)
    (fused,) = hierarchical_scale_fusion([(1.0, (high,), torch.rand(1, 1, 8, 12)), (0.5, (low,), attention)])
    up = lambda t: F.interpolate(t, size=(8, 12), mode="bilinear", align_corners=False)  # noqa: E731
    torch.testing.assert_close(fused, up(attention * low) + (1 - up(attention)) * high)


def test_fusion_above_one_brings_running_prediction_down():
    high, mid = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4)
    attention = torch.rand(1, 1, 4, 4)
    (fused,) = hierarchical_scale_fusion([(2.0, (high,), torch.rand(1, 1, 8, 8)), (1.0, (mid,), attention)])
    down = F.interpolate(high, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(fused, attention * mid + (1 - attention) * down)


def test_scale_weights_read_off_the_share_of_each_scale_in_the_chain():
    """With maps of one size the chain is a weighted sum of the scales' predictions, with these weights."""
    torch.manual_seed(0)
    scales = (0.5, 1.0, 2.0)
    predictions = {scale: torch.randn(1, 3, 6, 8) for scale in scales}
    attentions = {scale: torch.rand(1, 1, 6, 8) for scale in scales}
    (fused,) = hierarchical_scale_fusion([(scale, (predictions[scale],), attentions[scale]) for scale in scales[::-1]])
    weights = hierarchical_scale_weights([attentions[scale] for scale in scales])
    torch.testing.assert_close(fused, sum(weight * predictions[scale] for weight, scale in zip(weights, scales)))
    torch.testing.assert_close(sum(weights), torch.ones(1, 1, 6, 8))
    assert torch.equal(hierarchical_scale_weights([attentions[1.0]])[0], torch.ones(1, 1, 6, 8))  # one scale: all
    with pytest.raises(ValueError, match="at least one scale"):
        hierarchical_scale_weights([])


def test_fusion_rejects_ascending_order():
    one = (torch.zeros(1, 1, 2, 2),)
    with pytest.raises(ValueError, match="descending"):
        hierarchical_scale_fusion([(0.5, one, torch.zeros(1, 1, 2, 2)), (1.0, one, torch.zeros(1, 1, 2, 2))])


def test_scale_order_of_the_call_does_not_matter(tiny_model):
    with torch.no_grad():
        a = tiny_model(images(), scales=[0.5, 1.0, 2.0]).logits
        b = tiny_model(images(), scales=[2.0, 0.5, 1.0]).logits
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("scales", [[1.0], [0.5], [0.5, 2.0], [0.25, 0.5, 1.0, 1.5, 2.0], [0.75, 1.25]])
def test_any_scale_list_answers_at_input_resolution(tiny_model, scales):
    with torch.no_grad():
        outputs = tiny_model(images(), scales=scales, output_attentions=True, output_hidden_states=True,
                             output_auxiliary_logits=True)
    assert outputs.logits.shape == (2, 5, 48, 64)
    assert outputs.scales == tuple(sorted(scales))
    assert len(outputs.attentions) == len(outputs.scale_logits) == len(outputs.hidden_states) == len(scales)
    for scale, attention, logits in zip(outputs.scales, outputs.attentions, outputs.scale_logits):
        size = (int(48 * scale), int(64 * scale))
        assert attention.shape == (2, 1, *size) and logits.shape == (2, 5, *size)
        assert attention.min() >= 0 and attention.max() <= 1
    has_aux = tiny_model.config.trunk == "hrnet_ocr"
    assert (outputs.auxiliary_logits is not None) == has_aux


def test_auxiliary_logits_are_fused_only_when_labels_or_the_option_ask_for_them():
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_HRNET)).eval()
    labels = torch.randint(0, 5, (2, 48, 64))
    with torch.no_grad():
        plain = model(images(), scales=[0.5, 1.0])
        requested = model(images(), scales=[0.5, 1.0], output_auxiliary_logits=True)
        with_labels = model(images(), labels=labels, scales=[0.5, 1.0])
    assert plain.auxiliary_logits is None  # inference skips what only the auxiliary loss uses
    assert requested.auxiliary_logits.shape == with_labels.auxiliary_logits.shape == (2, 5, 48, 64)
    torch.testing.assert_close(requested.auxiliary_logits, with_labels.auxiliary_logits, rtol=0, atol=0)
    torch.testing.assert_close(plain.logits, requested.logits, rtol=0, atol=0)
    assert "auxiliary" in with_labels.loss_terms

    config = HMSConfig(**TINY_HRNET, output_auxiliary_logits=True)
    assert HMSConfig.from_dict(config.to_dict()).output_auxiliary_logits
    model = HMSForSemanticSegmentation(config).eval()
    with torch.no_grad():
        assert model(images(), scales=[1.0]).auxiliary_logits is not None
        assert model(images(), scales=[1.0], output_auxiliary_logits=False).auxiliary_logits is None


def test_inference_that_fuses_in_place_equals_the_autograd_path_and_keeps_per_scale_outputs_intact(tiny_model):
    pixel_values = images()
    with torch.no_grad():
        in_place = tiny_model(pixel_values, scales=[0.5, 1.0, 2.0])
        kept = tiny_model(pixel_values, scales=[0.5, 1.0, 2.0], output_attentions=True)
        alone = {s: tiny_model(pixel_values, scales=[s], output_attentions=True).scale_logits[0] for s in kept.scales}
    graph = tiny_model(pixel_values, scales=[0.5, 1.0, 2.0])  # grad enabled: torch.lerp, nothing overwritten
    torch.testing.assert_close(in_place.logits, graph.logits.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(kept.logits, in_place.logits, rtol=0, atol=1e-6)
    for scale, logits in zip(kept.scales, kept.scale_logits):
        torch.testing.assert_close(logits, alone[scale], rtol=0, atol=0)  # not overwritten by the fusion


def test_single_scale_equals_one_plain_forward(tiny_model):
    with torch.no_grad():
        fused = tiny_model(images(), scales=[1.0]).logits
        logits, _, _, _ = tiny_model.segment_single_scale(images())
    torch.testing.assert_close(fused, logits)


def test_per_scale_outputs_are_not_returned_unless_asked(tiny_hrnet):
    with torch.no_grad():
        outputs = tiny_hrnet(images())
    assert outputs.attentions is None and outputs.scale_logits is None and outputs.hidden_states is None


@pytest.mark.parametrize("bad_scales", [[0.0], [-1.0], ["big"], []])
def test_bad_scales_raise_clear_error(tiny_hrnet, bad_scales):
    with pytest.raises(ValueError, match="scales"):
        tiny_hrnet(images(), scales=bad_scales)


def test_scale_too_small_for_the_input_says_so(tiny_hrnet):
    with pytest.raises(ValueError, match="scale 0.01"):
        tiny_hrnet(images(height=16, width=16), scales=[0.01, 1.0])


def test_wrong_pixel_values_shape_is_reported(tiny_hrnet):
    with pytest.raises(ValueError, match="pixel_values"):
        tiny_hrnet(torch.randn(3, 32, 32))


def test_bad_labels_are_reported(tiny_hrnet):
    with pytest.raises(ValueError, match="labels"):
        tiny_hrnet(images(), labels=torch.zeros(2, 1, 48, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        tiny_hrnet(images(), labels=torch.zeros(2, 48, 64))


@pytest.mark.parametrize("primary_loss", ["rmi", "cross_entropy"])
@pytest.mark.parametrize("bad_value", [5, 33, -1])
def test_labels_outside_the_classes_are_refused_naming_them(primary_loss, bad_value):
    # the tiny model has 5 classes: 5 and 33 are raw ids (RMI ignored them silently), -1 is no ignore index
    torch.manual_seed(0)
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_HRNET, primary_loss=primary_loss))
    labels = torch.randint(0, 5, (2, 48, 64))
    labels[:, :4] = 255
    labels[1, 10, 10] = bad_value
    with pytest.raises(ValueError, match=rf"class ids in \[0, 5\) .* ignore_index 255, found \[{bad_value}\]"):
        model(images(), labels=labels)
    labels[1, 10, 10] = 4
    assert torch.isfinite(model(images(), labels=labels).loss)


# --- training ------------------------------------------------------------------------------------------------------


def labels_for(batch: int = 2, height: int = 48, width: int = 64, num_labels: int = 5) -> torch.Tensor:
    labels = torch.randint(0, num_labels, (batch, height, width), generator=torch.Generator().manual_seed(2))
    labels[:, :4] = 255
    return labels


@pytest.mark.parametrize("primary_loss", ["rmi", "cross_entropy"])
def test_training_mode_runs_training_scales_and_backpropagates(primary_loss):
    torch.manual_seed(0)
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_HRNET, primary_loss=primary_loss)).train()
    outputs = model(images(), labels=labels_for(), output_attentions=True)
    assert outputs.scales == (0.5, 1.0)
    assert set(outputs.loss_terms) == {"main", "auxiliary", "scale_0.5", "scale_1.0"}
    expected = (
        outputs.loss_terms["main"]
        + 0.4 * outputs.loss_terms["auxiliary"]
        + 0.05 * (outputs.loss_terms["scale_0.5"] + outputs.loss_terms["scale_1.0"])
    )
    torch.testing.assert_close(outputs.loss, expected)
    outputs.loss.backward()
    gradients = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in gradients)
    assert model.scale_attention_head.projection.weight.grad.abs().sum() > 0


def test_loss_weights_come_from_the_config():
    torch.manual_seed(0)
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_HRNET, ocr_aux_weight=0.0, supervised_scale_weight=0.0)).eval()
    with torch.no_grad():
        outputs = model(images(), labels=labels_for(), scales=[0.5, 1.0])
    assert set(outputs.loss_terms) == {"main"}
    torch.testing.assert_close(outputs.loss, outputs.loss_terms["main"])


def test_labels_of_another_size_get_resized_logits(tiny_hrnet):
    with torch.no_grad():
        outputs = tiny_hrnet(images(), labels=labels_for(height=24, width=32), scales=[1.0])
    assert torch.isfinite(outputs.loss)


@pytest.mark.parametrize("primary_loss", ["rmi", "cross_entropy"])
def test_labels_all_ignored_give_a_finite_loss_and_gradients(primary_loss):
    torch.manual_seed(0)
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_HRNET, primary_loss=primary_loss)).train()
    outputs = model(images(), labels=torch.full((2, 48, 64), 255))
    assert torch.isfinite(outputs.loss) and all(torch.isfinite(t) for t in outputs.loss_terms.values())
    outputs.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_cross_entropy_is_the_mean_over_labelled_pixels(tiny_hrnet):
    config = HMSConfig(**TINY_HRNET, primary_loss="cross_entropy", ocr_aux_weight=0.0, supervised_scale_weight=0.0)
    model = HMSForSemanticSegmentation(config).eval()
    model.load_state_dict(tiny_hrnet.state_dict())
    labels = labels_for()
    with torch.no_grad():
        outputs = model(images(), labels=labels, scales=[1.0])
    assert torch.equal(outputs.loss, F.cross_entropy(outputs.logits, labels, ignore_index=255))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    config = HMSConfig(**TINY_HRNET, primary_loss="cross_entropy", ocr_dropout=0.0)
    model = HMSForSemanticSegmentation(config).train()
    for module in model.modules():  # keep BatchNorm statistics fixed so both runs see the same model
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    reference = model(images(), labels=labels_for()).loss
    reference.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with pytest.warns(FutureWarning):  # transformers 5 renames it activation_checkpointing_enable
        model.gradient_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    loss = model(images(), labels=labels_for()).loss
    loss.backward()
    torch.testing.assert_close(loss, reference)
    for got, want in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item() + 1e-12)


def checkpointed_training_step(config: HMSConfig, checkpointing: bool) -> tuple[dict, dict, int]:
    """One training step (BatchNorm in training mode); returns the state dict, the gradients and how often the
    first residual block's first convolution ran."""
    torch.manual_seed(0)
    model = HMSForSemanticSegmentation(config).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    block = next(m for m in model.modules() if type(m).__name__ in ("HMSBottleneck", "HMSBasicBlock"))
    calls = []
    block.conv1.register_forward_hook(lambda *_: calls.append(1))
    model(images(), labels=labels_for()).loss.backward()
    return model.state_dict(), {n: p.grad for n, p in model.named_parameters()}, len(calls)


@pytest.mark.parametrize("tiny_config", [TINY_HRNET, TINY_RESNET], ids=["hrnet_ocr", "resnet50_deeplabv3plus"])
def test_gradient_checkpointing_recomputes_blocks_but_updates_batch_norm_statistics_once(tiny_config):
    config = HMSConfig(**tiny_config, primary_loss="cross_entropy", ocr_dropout=0.0)
    plain_state, plain_gradients, plain_calls = checkpointed_training_step(config, checkpointing=False)
    state, gradients, calls = checkpointed_training_step(config, checkpointing=True)
    assert calls == 2 * plain_calls  # each block runs again in the backward pass: it really checkpoints
    for key, value in plain_state.items():  # running_mean / running_var / num_batches_tracked as without it
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    for name, want in plain_gradients.items():
        torch.testing.assert_close(gradients[name], want, rtol=1e-3, atol=1e-3 * want.abs().max().item() + 1e-12)


def test_bf16_autocast_on_cpu_gives_finite_close_outputs(tiny_hrnet):
    with torch.no_grad():
        reference = tiny_hrnet(images(), scales=[0.5, 1.0]).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = tiny_hrnet(images(), labels=labels_for(), scales=[0.5, 1.0])
    assert torch.isfinite(outputs.logits).all() and torch.isfinite(outputs.loss)
    assert (outputs.logits.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_a_model_cast_to_bf16_takes_float32_pixels(tiny_hrnet):
    """As transformers' vision models, the input follows the weights' dtype: the Trainer's --bf16_full_eval casts the
    model, and the image processor gives float32."""
    import copy

    half = copy.deepcopy(tiny_hrnet).to(torch.bfloat16)
    with torch.no_grad():
        reference = tiny_hrnet(images(), scales=[0.5, 1.0]).logits
        outputs = half(images(), labels=labels_for(), scales=[0.5, 1.0])
    assert outputs.logits.dtype == torch.bfloat16 and torch.isfinite(outputs.loss)
    assert (outputs.logits.float() - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_pixel_values_are_refused_naming_the_dtype(tiny_hrnet, dtype):
    # raw 0..255 image bytes were cast to float and segmented as if they were normalised
    raw = torch.randint(0, 256, (2, 3, 48, 64)).to(dtype)
    with pytest.raises(ValueError, match=rf"pixel_values must be a floating-point tensor .* got dtype {dtype}"):
        tiny_hrnet(raw, scales=[1.0])


def _assert_same_outputs(got, want) -> None:
    assert type(got) is type(want)
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    elif isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            _assert_same_outputs(got[key], want[key])
    elif isinstance(want, tuple):
        assert len(got) == len(want)
        for got_item, want_item in zip(got, want):
            _assert_same_outputs(got_item, want_item)
    else:
        assert got == want


@pytest.mark.parametrize("options", [
    {},
    {"output_attentions": True, "output_hidden_states": True},
    {"output_auxiliary_logits": True},
    {"labels": True, "output_attentions": True},
], ids=["plain", "attentions_and_hidden_states", "auxiliary_logits", "labels"])
def test_return_dict_false_gives_the_outputs_to_tuple(tiny_hrnet, options):
    # transformers' rule: the tuple holds every field of the output object, in order (auxiliary logits, per-scale
    # logits and loss terms were dropped from it)
    options = {**options, "labels": labels_for()} if options.get("labels") else options
    with torch.no_grad():
        as_object = tiny_hrnet(images(), scales=[0.5, 1.0], **options)
        as_tuple = tiny_hrnet(images(), scales=[0.5, 1.0], return_dict=False, **options)
    assert isinstance(as_tuple, tuple)
    _assert_same_outputs(as_tuple, as_object.to_tuple())
    assert as_tuple[0] is not None and (as_tuple[0].dim() == 0) == ("labels" in options)  # the loss comes first


def test_a_misspelt_keyword_is_refused_and_processor_outputs_are_accepted(tiny_hrnet):
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['output_attention', 'scale'\]"):
        tiny_hrnet(images(), scale=[2.0], output_attention=True)
    mask, sizes = torch.ones(2, 48, 64, dtype=torch.long), torch.tensor([[48, 64], [40, 60]])
    with torch.no_grad():
        assert tiny_hrnet(images(), scales=[1.0], pixel_mask=mask, original_sizes=sizes).logits.shape == (2, 5, 48, 64)


@pytest.mark.parametrize("output_flag", ["output_attentions", "output_hidden_states"])
def test_trainer_evaluation_keeps_only_the_logits_whatever_the_output_flags(tmp_path, output_flag):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_RESNET, **{output_flag: True})).eval()
    trainer = Trainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True))
    batch = {"pixel_values": images(), "labels": labels_for()}
    _, logits, _ = trainer.prediction_step(model, batch, prediction_loss_only=False)
    # `scales` (a tuple of floats) once reached the gathered predictions beside the logits
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 5, 48, 64)


def test_channels_last_gives_the_same_logits(tiny_model):
    with torch.no_grad():
        reference = tiny_model(images(), scales=[0.5, 1.0]).logits
        tiny_model.to(memory_format=torch.channels_last)
        try:
            outputs = tiny_model(images().contiguous(memory_format=torch.channels_last), scales=[0.5, 1.0]).logits
        finally:
            tiny_model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(outputs, reference, rtol=1e-4, atol=1e-5)


def test_trunk_and_heads_compile_without_graph_breaks(tiny_model):
    import torch._dynamo

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(tiny_model.segment_single_scale)(images())
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("settings, autocast", [
    ({"trunk": "hrnet_ocr"}, False),
    ({"trunk": "hrnet_ocr"}, True),
    ({"trunk": "hrnet_ocr", "ocr_aux_rmi": True, "scale_fusion": "explicit"}, False),
    ({"trunk": "resnet50_deeplabv3plus"}, False),
    ({"trunk": "resnet50_deeplabv3plus", "primary_loss": "cross_entropy"}, False),
], ids=["hrnet_ocr", "hrnet_ocr_bf16_autocast", "hrnet_ocr_aux_rmi_explicit", "deeplab", "deeplab_cross_entropy"])
def test_the_training_forward_and_its_losses_compile_into_one_graph(settings, autocast):
    """`--torch_compile` trains the whole two-scale forward with every loss term (RMI included) as one graph
    (`fullgraph`: a graph break fails), with the loss and gradients of the uncompiled model. Dynamo's `eager` backend:
    its tracing, without code generation (seconds on a CPU); the same random numbers, so dropout draws alike."""
    import torch._dynamo

    base = TINY_HRNET if settings["trunk"] == "hrnet_ocr" else TINY_RESNET
    torch.manual_seed(0)
    model = HMSForSemanticSegmentation(HMSConfig(**{**base, **settings})).train()
    pixel_values = images(height=64, width=96)
    labels = torch.randint(0, 5, (2, 64, 96), generator=torch.Generator().manual_seed(2))
    labels[:, :8] = 255

    def loss_and_gradients(forward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # the losses leave it for float32
            loss = forward(pixel_values, labels=labels).loss
        assert loss.dtype == torch.float32
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    expected_loss, expected_grads = loss_and_gradients(model)
    torch._dynamo.reset()
    loss, grads = loss_and_gradients(torch.compile(model, backend="eager", fullgraph=True))
    torch._dynamo.reset()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    if autocast:  # bfloat16 keeps 8 bits and the traced casts round a little differently: all gradients as one
        compiled_all, expected_all = (torch.cat([grad.flatten() for grad in gradients.values()])
                                      for gradients in (grads, expected_grads))
        assert (compiled_all - expected_all).norm() <= 2e-2 * expected_all.norm()
        return
    for name, grad in grads.items():
        # relative to the whole tensor (single entries may cancel to nearly nothing), absolute for the biases before
        # a BatchNorm, whose gradient is zero up to rounding
        difference, norm = (grad - expected_grads[name]).norm().item(), expected_grads[name].norm().item()
        assert difference <= 1e-4 * norm + 1e-6, f"{name}: gradients differ by {difference:.2e} (norm {norm:.2e})"


def test_labels_out_of_range_still_fail_under_torch_compile(tiny_hrnet):
    # the eager check's `if outside.any()` would split the graph: compiled, an assertion inside it fails instead
    import torch._dynamo

    labels = torch.zeros(2, 48, 64, dtype=torch.long)
    labels[0, 0, 0] = 7  # num_labels is 5
    torch._dynamo.reset()
    compiled = torch.compile(tiny_hrnet, backend="eager", fullgraph=True)
    try:
        with pytest.raises(RuntimeError, match=r"labels must be class ids in \[0, 5\) \(num_labels\) or ignore_index"):
            compiled(images(), labels=labels)
    finally:
        torch._dynamo.reset()


def test_the_chain_exports_with_torch_export_for_any_image_size(tiny_model):
    """Deployment: `torch.export` traces the whole chained forward once, with symbolic height and width. The example
    must be large enough that no feature map has a side of 1 (PyTorch specialises sizes 0 and 1)."""

    class ChainedLogits(torch.nn.Module):
        def __init__(self, model: HMSForSemanticSegmentation):
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values, scales=[0.5, 1.0, 2.0]).logits

    torch.manual_seed(0)
    program = torch.export.export(ChainedLogits(tiny_model), (torch.randn(1, 3, 128, 256),),
                                  dynamic_shapes={"pixel_values": {2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}})
    for size in ((96, 160), (192, 320)):
        pixel_values = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = tiny_model(pixel_values, scales=[0.5, 1.0, 2.0]).logits
        torch.testing.assert_close(program.module()(pixel_values), expected)


def test_save_and_reload_round_trip(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = HMSForSemanticSegmentation.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images()).logits, tiny_model(images()).logits)


def test_auto_classes_resolve_after_import(tiny_hrnet, tmp_path):
    from transformers import AutoConfig, AutoModelForSemanticSegmentation

    tiny_hrnet.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), HMSConfig)
    assert isinstance(AutoModelForSemanticSegmentation.from_pretrained(tmp_path), HMSForSemanticSegmentation)


def test_initialisation_does_not_touch_loaded_weights(tiny_hrnet, tmp_path):
    tiny_hrnet.save_pretrained(tmp_path)
    reloaded = HMSForSemanticSegmentation.from_pretrained(tmp_path)
    for (name, expected), got in zip(tiny_hrnet.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(expected, got), name


def test_initialisation_follows_the_reference():
    torch.manual_seed(0)
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_HRNET))
    trunk_std = torch.cat([m.weight.flatten() for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]).std()
    assert 0.0005 < trunk_std < 0.002  # HRNet convs ~ N(0, 0.001)
    bn = model.decode_head.pixel_projection.norm
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    head_std = model.decode_head.classifier.weight.std()
    assert head_std > 0.01  # PyTorch's default init, as the reference leaves the decoder


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
@pytest.mark.parametrize("primary_loss", ["rmi", "cross_entropy"])
def test_labels_of_any_integer_dtype_give_the_same_loss(dtype, primary_loss):
    torch.manual_seed(0)
    model = HMSForSemanticSegmentation(HMSConfig(**TINY_HRNET, primary_loss=primary_loss)).eval()
    labels = labels_for()
    with torch.no_grad():
        expected = model(images(), labels=labels, scales=[0.5, 1.0]).loss
        got = model(images(), labels=labels.to(dtype), scales=[0.5, 1.0]).loss
    torch.testing.assert_close(got, expected)


# --- hrnet_preset follows explicit stages --------------------------------------------------------------------------


def test_custom_hrnet_stages_drop_the_default_preset_name_and_round_trip(tmp_path):
    from hms_segmentation.hub import describe_trunk

    stages = TINY_HRNET["hrnet_stages"]
    config = HMSConfig(hrnet_stages=stages)  # hrnet_preset left at its default, "w48"
    assert config.hrnet_preset is None
    assert describe_trunk(config) == "HRNetV2 (branch widths [4, 8, 16, 32]) + OCR"
    assert HMSConfig(hrnet_preset="w48", hrnet_stages=stages).hrnet_preset is None  # the stages are what is built
    config.save_pretrained(tmp_path)
    reloaded = HMSConfig.from_pretrained(tmp_path)
    assert reloaded.hrnet_preset is None and reloaded.hrnet_stages == stages
    assert reloaded.to_dict() == config.to_dict()


def test_hrnet_stages_of_a_preset_take_its_name_and_the_preset_alone_fills_them(tmp_path):
    import copy

    from hms_segmentation.configuration_hms import HRNET_PRESETS
    from hms_segmentation.hub import describe_trunk

    config = HMSConfig(hrnet_preset="w48", hrnet_stages=copy.deepcopy(HRNET_PRESETS["w32"]))
    assert config.hrnet_preset == "w32" and describe_trunk(config) == "HRNetV2-W32 + OCR"
    config.save_pretrained(tmp_path)
    assert HMSConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    assert HMSConfig(hrnet_preset="w18").hrnet_stages == HRNET_PRESETS["w18"]
    assert HMSConfig().hrnet_preset == "w48" and describe_trunk(HMSConfig()) == "HRNetV2-W48 + OCR"
    with pytest.raises(ValueError, match=r"hrnet_preset=None needs hrnet_stages"):
        HMSConfig(hrnet_preset=None)
    with pytest.raises(ValueError, match=r"hrnet_preset must be one of \['w18', 'w32', 'w48'\] or None, got 'w64'"):
        HMSConfig(hrnet_preset="w64", hrnet_stages=TINY_HRNET["hrnet_stages"])
