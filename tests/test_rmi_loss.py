"""RMILoss: parity with the NVIDIA / ZJU references (shared/parity/rmi), errors, mixed precision, degenerate inputs."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hms_segmentation import rmi_loss
from hms_segmentation.rmi_loss import RMILoss, RMILossOutput, _RegionCovariance, _SigmoidTerms

FULLY_IGNORED_CLASS_VALUE = math.log(math.sqrt(5e-4) + 1e-8)
"""Per-class RMI value of an image without valid pixels (README: ≈ −3.8005)."""


def _parity_cases_at_collection() -> dict[str, dict]:
    """cases.json read at import, for parametrisation; {} when the shared folder is absent (see test below)."""
    shared = Path(os.environ.get("HMS_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
    path = shared / "parity" / "rmi" / "cases.json"
    return json.loads(path.read_text())["cases"] if path.is_file() else {}


PARITY_CASES = _parity_cases_at_collection()
NUMERIC_CASES = sorted(name for name, case in PARITY_CASES.items() if "expected_error" not in case)
ERROR_CASES = sorted(name for name, case in PARITY_CASES.items() if "expected_error" in case)


@pytest.fixture(scope="module")
def parity_vectors(parity_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(parity_dir / "rmi" / "cases.safetensors"))


def _loss_from_config(config: dict) -> tuple[RMILoss, bool]:
    config = dict(config)
    do_rmi = config.pop("do_rmi", True)
    return RMILoss(**config), do_rmi


def _blocky_inputs(
    batch_size: int = 2,
    num_classes: int = 19,
    height: int = 48,
    width: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels as in the parity vectors (blocky class map, ~10% ignored) and logits favouring the label."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, num_classes, (batch_size, height // 8 + 1, width // 8 + 1), generator=generator)
    labels = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, :height, :width].contiguous()
    labels[torch.rand(batch_size, height, width, generator=generator) < 0.1] = 255
    logits = 1.5 * torch.randn(batch_size, num_classes, height, width, generator=generator, dtype=torch.float64) - 2
    logits = logits + 4 * F.one_hot(labels.clamp(max=num_classes - 1), num_classes).permute(0, 3, 1, 2)
    return logits.to(dtype), labels


def _loss_and_grad(
    loss_fn: RMILoss, logits: torch.Tensor, labels: torch.Tensor, compiled: bool = False, **kwargs
) -> tuple[RMILossOutput, torch.Tensor]:
    """The loss terms and the logits' gradient; `compiled`: through `torch.compile` in one graph (`fullgraph`), with
    Dynamo's `eager` backend (its tracing, then the captured graph run as it is: no code generation, seconds)."""
    logits = logits.detach().clone().requires_grad_(True)
    forward_components = loss_fn.forward_components
    if compiled:
        torch._dynamo.reset()
        forward_components = torch.compile(forward_components, backend="eager", fullgraph=True)
    output = forward_components(logits, labels, **kwargs)
    output.loss.backward()
    return output, logits.grad


def test_parity_cases_are_available(parity_dir: Path) -> None:
    # Fails under HMS_REQUIRE_SHARED=1 (CI) and skips elsewhere when the shared folder is missing.
    assert NUMERIC_CASES and ERROR_CASES, f"no RMI parity cases found in {parity_dir / 'rmi' / 'cases.json'}"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case_name", NUMERIC_CASES)
def test_matches_reference_case(case_name: str, compiled: bool, parity_vectors: dict[str, torch.Tensor]) -> None:
    # compiled: under torch.compile the loss takes its plain-operation path (the banded one would split the graph),
    # which must match the reference as closely
    case = PARITY_CASES[case_name]
    loss_fn, do_rmi = _loss_from_config(case["config"])
    logits, labels = parity_vectors[f"{case_name}/logits"], parity_vectors[f"{case_name}/labels"]
    output, grad = _loss_and_grad(loss_fn, logits, labels, compiled=compiled, do_rmi=do_rmi)

    reference_loss = parity_vectors[f"{case_name}/loss"]
    assert output.loss.dtype == reference_loss.dtype == torch.float32
    tolerance = case["suggested_tolerance"]
    torch.testing.assert_close(output.loss, reference_loss, **tolerance["loss"])
    torch.testing.assert_close(output.bce_loss.item(), case["components"]["bce_loss"], **tolerance["loss"])
    if do_rmi:
        torch.testing.assert_close(output.rmi_loss.item(), case["components"]["rmi_loss"], **tolerance["loss"])
    reference_grad = parity_vectors[f"{case_name}/grad"]
    assert grad.dtype == reference_grad.dtype
    torch.testing.assert_close(grad, reference_grad, **tolerance["grad"])


@pytest.mark.parametrize("settings, labels_kind", [
    ({}, "blocky"),
    ({"lambda_way": 0, "rmi_radius": 2}, "blocky"),
    ({"rmi_pool_size": 1, "rmi_pool_stride": 1}, "blocky"),
    ({}, "single_class"),
    ({"exclude_ignored_from_rmi": True}, "blocky"),
    ({"exclude_ignored_from_rmi": True, "rmi_pool_way": 0}, "one_image_ignored"),
    ({"exclude_ignored_from_rmi": True}, "all_ignored"),
])
def test_compiled_loss_matches_the_uncompiled_one(settings: dict, labels_kind: str) -> None:
    """What the parity cases do not cover: the opt-in exclusion of ignored pixels, absent and constant label maps
    (which the eager path skips and the compiled one computes), no pooling, the other lambda way."""
    logits, labels = _blocky_inputs(batch_size=2, num_classes=7, height=40, width=56)
    if labels_kind == "single_class":
        labels = torch.full_like(labels, 4)
    elif labels_kind == "one_image_ignored":
        labels[1] = 255
    elif labels_kind == "all_ignored":
        labels = torch.full_like(labels, 255)
    loss_fn = RMILoss(num_classes=7, **settings)
    expected, expected_grad = _loss_and_grad(loss_fn, logits, labels)
    output, grad = _loss_and_grad(loss_fn, logits, labels, compiled=True)
    for name in RMILossOutput._fields:
        torch.testing.assert_close(getattr(output, name), getattr(expected, name), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-8)
    if labels_kind == "one_image_ignored":
        assert torch.count_nonzero(grad[1]) == 0


def test_compiled_loss_under_bfloat16_autocast_is_the_float32_loss() -> None:
    logits, labels = _blocky_inputs()
    expected, expected_grad = _loss_and_grad(RMILoss(), logits.float(), labels, compiled=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, grad = _loss_and_grad(RMILoss(), logits.bfloat16(), labels, compiled=True)
    assert output.loss.dtype == torch.float32
    torch.testing.assert_close(output.loss, expected.loss, rtol=1e-2, atol=1e-2)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("case_name", ERROR_CASES)
def test_reference_error_case_raises_clear_error(case_name: str) -> None:
    # The reference accepts pool way 3 and fails in forward with NotImplementedError; we refuse it when built.
    assert PARITY_CASES[case_name]["config"]["rmi_pool_way"] == 3
    with pytest.raises(ValueError, match=r"`rmi_pool_way` must be one of 0 \(max pooling\).*got 3"):
        _loss_from_config(PARITY_CASES[case_name]["config"])


def test_defaults_are_nvidia_hmsa_settings() -> None:
    loss_fn = RMILoss()
    settings = {name: getattr(loss_fn, name) for name in ("num_classes", "ignore_index", "rmi_radius", "rmi_pool_way")}
    assert settings == {"num_classes": 19, "ignore_index": 255, "rmi_radius": 3, "rmi_pool_way": 1}
    assert (loss_fn.rmi_pool_size, loss_fn.rmi_pool_stride) == (4, 4)
    assert (loss_fn.loss_weight_lambda, loss_fn.lambda_way, loss_fn.exclude_ignored_from_rmi) == (0.5, 1, False)


@pytest.mark.parametrize("radius", [0, 11, 2.5, True])
def test_invalid_radius_names_argument(radius: object) -> None:
    with pytest.raises(ValueError, match=rf"`rmi_radius` must be an integer in 1\.\.10, got {radius!r}"):
        RMILoss(rmi_radius=radius)


INVALID_SETTINGS = {
    "size_ne_stride": ({"rmi_pool_size": 3, "rmi_pool_stride": 4}, r"must equal `rmi_pool_stride`.*3.*4"),
    "pool_way_3": ({"rmi_pool_way": 3}, r"`rmi_pool_way` must be one of .*got 3"),
    "zero_pool_size": (
        {"rmi_pool_size": 0, "rmi_pool_stride": 0},
        r"`rmi_pool_size` must be a positive integer, got 0",
    ),
    "zero_classes": ({"num_classes": 0}, r"`num_classes` must be a positive integer, got 0"),
    "lambda_way_2": ({"lambda_way": 2}, r"`lambda_way` must be 0 or 1, got 2"),
    "lambda_string": ({"loss_weight_lambda": "0.5"}, r"`loss_weight_lambda` must be a finite number, got '0.5'"),
    "lambda_nan": ({"loss_weight_lambda": float("nan")}, r"`loss_weight_lambda` must be a finite number, got nan"),
    "lambda_inf": ({"loss_weight_lambda": float("inf")}, r"`loss_weight_lambda` must be a finite number, got inf"),
    "loss_type_0": ({"loss_type": 0}, r"`loss_type` must be None or 2"),
}


@pytest.mark.parametrize(("settings", "message"), INVALID_SETTINGS.values(), ids=INVALID_SETTINGS.keys())
def test_invalid_settings_raise_value_error(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RMILoss(**settings)


def test_zju_loss_type_2_is_accepted() -> None:
    assert RMILoss(loss_type=2).rmi_radius == 3


def _labels(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


INVALID_INPUTS = {
    "logits_3d": ((19, 32, 40), _labels(1, 32, 40), r"`logits` must be a 4-D floating point tensor.*\(19, 32, 40\)"),
    "class_mismatch": ((1, 21, 32, 40), _labels(1, 32, 40), r"num_classes=19 channels.*\(1, 21, 32, 40\)"),
    "float_labels": ((1, 19, 32, 40), _labels(1, 32, 40, dtype=torch.float32), r"integer tensor, got torch.float32"),
    "bool_labels": ((1, 19, 32, 40), _labels(1, 32, 40, dtype=torch.bool), r"integer tensor, got torch.bool"),
    "labels_4d": ((1, 19, 32, 40), _labels(1, 1, 32, 40), r"`labels` must have shape .*\(1, 32, 40\).*\(1, 1, 32, 40"),
    "batch_mismatch": ((1, 19, 32, 40), _labels(2, 32, 40), r"`labels` must have shape .*\(2, 32, 40\)"),
    "too_small": ((1, 19, 4, 40), _labels(1, 4, 40), r"spatial size \(4, 40\) give \(2, 11\).*rmi_radius=3"),
}


@pytest.mark.parametrize(("logits_shape", "labels", "message"), INVALID_INPUTS.values(), ids=INVALID_INPUTS.keys())
def test_invalid_inputs_raise_value_error(logits_shape: tuple, labels: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RMILoss()(torch.zeros(logits_shape), labels)


@pytest.mark.parametrize("shape", [(0, 19, 32, 40), (1, 19, 0, 40), (1, 19, 32, 0)], ids=["batch", "height", "width"])
@pytest.mark.parametrize("do_rmi", [True, False])
def test_empty_logits_are_refused_with_their_shape(shape: tuple, do_rmi: bool) -> None:
    labels = torch.zeros(shape[0], *shape[2:], dtype=torch.long)
    with pytest.raises(ValueError, match=re.escape(f"at least one image and one pixel, got shape {tuple(shape)}")):
        RMILoss(rmi_radius=1)(torch.zeros(shape), labels, do_rmi=do_rmi)


def test_integer_logits_are_refused() -> None:
    with pytest.raises(ValueError, match=r"`logits` must be a 4-D floating point tensor.*torch.int64"):
        RMILoss()(torch.zeros(1, 19, 32, 40, dtype=torch.long), torch.zeros(1, 32, 40, dtype=torch.long))


def test_small_input_is_fine_without_rmi() -> None:
    loss = RMILoss()(torch.zeros(1, 19, 4, 40), torch.zeros(1, 4, 40, dtype=torch.long), do_rmi=False)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("lambda_way", [0, 1])
def test_components_combine_into_total(lambda_way: int) -> None:
    logits, labels = _blocky_inputs()
    loss_fn = RMILoss(loss_weight_lambda=0.3, lambda_way=lambda_way)
    output = loss_fn.forward_components(logits, labels)
    assert isinstance(output, RMILossOutput)
    expected = 0.3 * output.bce_loss + 0.7 * output.rmi_loss if lambda_way else output.bce_loss + 0.3 * output.rmi_loss
    torch.testing.assert_close(output.loss, expected)
    torch.testing.assert_close(loss_fn(logits, labels), output.loss, rtol=0, atol=0)
    assert all(term.dtype == torch.float32 and term.dim() == 0 for term in output)


def test_bce_only_has_no_rmi_term() -> None:
    logits, labels = _blocky_inputs()
    output = RMILoss().forward_components(logits, labels, do_rmi=False)
    assert output.rmi_loss is None and output.loss is output.bce_loss


def test_labels_of_any_integer_dtype_give_the_same_loss() -> None:
    logits, labels = _blocky_inputs()
    loss_fn = RMILoss()
    torch.testing.assert_close(loss_fn(logits, labels.to(torch.uint8)), loss_fn(logits, labels), rtol=0, atol=0)


@pytest.mark.parametrize("pool_way", [0, 1, 2])
@pytest.mark.parametrize("exclude_ignored", [False, True])
def test_transposed_labels_give_the_same_loss_and_gradient(pool_way: int, exclude_ignored: bool) -> None:
    # Labels that are a permuted view (a transpose or rot90 augmentation of the batch) are not contiguous.
    logits, labels = _blocky_inputs(height=48, width=48)
    transposed = labels.transpose(1, 2).contiguous().transpose(1, 2)
    assert not transposed.is_contiguous()
    loss_fn = RMILoss(rmi_pool_way=pool_way, exclude_ignored_from_rmi=exclude_ignored)
    output, grad = _loss_and_grad(loss_fn, logits, transposed)
    expected, expected_grad = _loss_and_grad(loss_fn, logits, labels)
    torch.testing.assert_close(output.loss, expected.loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)


def test_ignore_index_inside_class_range_is_ignored() -> None:
    logits, labels = _blocky_inputs()
    loss_fn = RMILoss(ignore_index=0)
    remapped = torch.where(labels == 0, torch.full_like(labels, 255), labels)
    torch.testing.assert_close(loss_fn(logits, labels), RMILoss()(logits, remapped), rtol=0, atol=0)


def test_bfloat16_autocast_is_finite_and_close_to_float32() -> None:
    logits, labels = _blocky_inputs()
    loss_fn = RMILoss()
    bf16_logits = logits.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = loss_fn.forward_components(bf16_logits, labels)
    output.loss.backward()
    assert output.loss.dtype == torch.float32 and torch.isfinite(output.loss)
    assert bf16_logits.grad.dtype == torch.bfloat16 and torch.isfinite(bf16_logits.grad).all()
    # The same values in float32 give the same loss: everything after the input runs in float32 / float64.
    float32_loss, float32_grad = _loss_and_grad(loss_fn, bf16_logits.detach().float(), labels)
    torch.testing.assert_close(output.loss, float32_loss.loss, rtol=1e-6, atol=1e-6)
    grad_scale = float32_grad.abs().max().item()
    torch.testing.assert_close(bf16_logits.grad.float(), float32_grad, rtol=1e-2, atol=1e-2 * grad_scale)
    # Against the unrounded float32 logits the difference is bfloat16's input rounding only.
    torch.testing.assert_close(output.loss, loss_fn(logits, labels), rtol=1e-2, atol=1e-2)


def test_autocast_does_not_change_float32_result() -> None:
    logits, labels = _blocky_inputs()
    loss_fn = RMILoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss_fn(logits, labels)
    torch.testing.assert_close(under_autocast, loss_fn(logits, labels), rtol=0, atol=0)


def test_float16_logits_are_upcast() -> None:
    logits, labels = _blocky_inputs()
    half_logits = logits.half()
    output, grad = _loss_and_grad(RMILoss(), half_logits, labels)
    assert grad.dtype == torch.float16 and torch.isfinite(grad).all()
    torch.testing.assert_close(output.loss, RMILoss()(half_logits.float(), labels), rtol=0, atol=0)


@pytest.mark.parametrize("pool_way", [0, 1, 2])
def test_gradient_with_create_graph_is_the_plain_one_and_second_order_is_refused_clearly(pool_way: int) -> None:
    # create_graph=True (as gradient-penalty or higher-order code asks) must not fail inside the hand-written backwards;
    # only differentiating the gradient once more is unsupported, and says so.
    logits, labels = _blocky_inputs(batch_size=1, num_classes=5, height=24, width=32)
    loss_fn = RMILoss(num_classes=5, rmi_pool_way=pool_way)
    _, expected_grad = _loss_and_grad(loss_fn, logits, labels)
    logits = logits.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(logits, labels), logits, create_graph=True)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.square().sum().backward()


def test_all_pixels_ignored_gives_finite_loss_and_zero_gradient() -> None:
    logits, _ = _blocky_inputs(num_classes=19)
    labels = torch.full(logits.shape[:1] + logits.shape[2:], 255)
    output, grad = _loss_and_grad(RMILoss(), logits, labels)
    assert output.bce_loss.item() == 0.0
    torch.testing.assert_close(output.rmi_loss.item(), 19 * FULLY_IGNORED_CLASS_VALUE, rtol=1e-6, atol=1e-5)
    assert torch.count_nonzero(grad) == 0


def test_fully_ignored_image_enters_batch_mean_like_reference() -> None:
    logits, labels = _blocky_inputs(batch_size=2)
    labels[1] = 255
    loss_fn = RMILoss()
    both = loss_fn.forward_components(logits, labels)
    first = loss_fn.forward_components(logits[:1], labels[:1])
    expected_rmi = (first.rmi_loss.double() + 19 * FULLY_IGNORED_CLASS_VALUE) / 2
    torch.testing.assert_close(both.rmi_loss.double(), expected_rmi, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", ["constant", "confident_right", "confident_wrong"])
def test_degenerate_logits_give_finite_loss_and_gradient(kind: str) -> None:
    _, labels = _blocky_inputs()
    on_label = F.one_hot(labels.clamp(max=18), 19).permute(0, 3, 1, 2).bool()
    if kind == "constant":
        logits = torch.zeros(on_label.shape)
    else:
        logits = torch.where(on_label == (kind == "confident_right"), 30.0, -30.0)
    output, grad = _loss_and_grad(RMILoss(), logits, labels)
    assert all(torch.isfinite(term) for term in output)
    assert torch.isfinite(grad).all()


def test_single_class_present_gives_finite_loss_and_gradient() -> None:
    logits, _ = _blocky_inputs()
    labels = torch.full((2, 48, 64), 7)
    output, grad = _loss_and_grad(RMILoss(), logits, labels)
    assert torch.isfinite(output.loss) and torch.isfinite(grad).all()


def test_no_pooling_with_stride_one() -> None:
    logits, labels = _blocky_inputs(height=24, width=32)
    output, grad = _loss_and_grad(RMILoss(rmi_pool_size=1, rmi_pool_stride=1), logits, labels)
    assert torch.isfinite(output.loss) and torch.isfinite(grad).all()


def test_exclude_ignored_equals_reference_behaviour_without_ignored_pixels() -> None:
    logits, labels = _blocky_inputs()
    labels[labels == 255] = 3
    torch.testing.assert_close(
        RMILoss(exclude_ignored_from_rmi=True)(logits, labels), RMILoss()(logits, labels), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("pool_way", [0, 1, 2])
def test_exclude_ignored_drops_fully_ignored_images(pool_way: int) -> None:
    logits, labels = _blocky_inputs(batch_size=2)
    labels[1] = 255
    loss_fn = RMILoss(rmi_pool_way=pool_way, exclude_ignored_from_rmi=True)
    both, grad = _loss_and_grad(loss_fn, logits, labels)
    torch.testing.assert_close(both.rmi_loss, loss_fn.forward_components(logits[:1], labels[:1]).rmi_loss)
    assert torch.isfinite(grad).all() and torch.count_nonzero(grad[1]) == 0
    # Ignored pixels no longer act as (label 0, probability 1e-6) points.
    assert not torch.allclose(both.rmi_loss, RMILoss(rmi_pool_way=pool_way)(logits, labels).float())


def test_exclude_ignored_with_every_pixel_ignored_has_zero_rmi_term() -> None:
    logits, _ = _blocky_inputs()
    labels = torch.full((2, 48, 64), 255)
    output, grad = _loss_and_grad(RMILoss(exclude_ignored_from_rmi=True), logits, labels)
    assert output.rmi_loss.item() == 0.0 and torch.count_nonzero(grad) == 0


def _sigmoid_terms_inputs(
    num_classes: int, height: int, width: int, dtype: torch.dtype = torch.float64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits, labels = _blocky_inputs(1, num_classes, height, width, seed=seed, dtype=dtype)
    valid = labels < num_classes
    return logits, (labels * valid).unsqueeze(1), valid.to(dtype).unsqueeze(1)


# Sizes whose padded height or width is not a multiple of the kernel leave rows / columns that no window reads.
SIGMOID_TERMS_CASES = {
    "bce_only": (None, 5, 6),
    "full_resolution": (1, 5, 6),
    "pool_2": (2, 7, 9),
    "pool_3_uncovered_edges": (3, 9, 12),
    "pool_4": (4, 9, 10),
    "pool_4_uncovered_edges": (4, 7, 11),
}


@pytest.mark.parametrize(("pool_size", "height", "width"), SIGMOID_TERMS_CASES.values(), ids=SIGMOID_TERMS_CASES.keys())
@pytest.mark.parametrize("band_bytes", [1, 2**40], ids=["band_per_cell", "one_band"])
def test_sigmoid_terms_match_direct_computation_and_numerical_gradient(
    monkeypatch: pytest.MonkeyPatch, pool_size: int | None, height: int, width: int, band_bytes: int
) -> None:
    monkeypatch.setitem(rmi_loss.BAND_BYTES, "cpu", band_bytes)
    logits, safe_labels, valid_mask = _sigmoid_terms_inputs(3, height, width)
    bce_sum, probs = _SigmoidTerms.apply(logits, safe_labels, valid_mask, pool_size)

    onehot = F.one_hot(safe_labels[:, 0], 3).permute(0, 3, 1, 2).double()
    expected_bce = F.binary_cross_entropy_with_logits(logits, onehot, weight=valid_mask, reduction="sum")
    torch.testing.assert_close(bce_sum, expected_bce, rtol=1e-12, atol=1e-12)
    if pool_size is None:
        assert probs.numel() == 0
    else:
        expected_probs = torch.sigmoid(logits) * valid_mask + rmi_loss.PROBABILITY_OFFSET
        if pool_size > 1:
            expected_probs = F.avg_pool2d(expected_probs, pool_size, pool_size, pool_size // 2)
        torch.testing.assert_close(probs, expected_probs, rtol=1e-12, atol=1e-15)

    logits.requires_grad_(True)
    if pool_size is None:
        assert torch.autograd.gradcheck(lambda x: _SigmoidTerms.apply(x, safe_labels, valid_mask, None)[0], (logits,))
    else:
        assert torch.autograd.gradcheck(lambda x: _SigmoidTerms.apply(x, safe_labels, valid_mask, pool_size), (logits,))


@pytest.mark.parametrize("num_classes", [19, 150])
def test_bce_per_pixel_is_accurate_in_float32_for_extreme_logits(num_classes: int) -> None:
    # 150 classes: more than one product group (the product of 150 factors ≥ ½ would underflow float32).
    generator = torch.Generator().manual_seed(5)
    logits = 40 * torch.randn(num_classes, 6, 32, generator=generator)
    logits[:, 0, :4] = torch.tensor([0.0, 1e4, -1e4, 88.0])[:, None].T
    labels = torch.randint(0, num_classes, (1, 6, 32), generator=generator)
    per_pixel = rmi_loss._bce_per_pixel(logits, torch.sigmoid(logits), labels)
    exact = logits.double()
    expected = F.softplus(exact).sum(dim=0, keepdim=True) - exact.gather(0, labels)
    assert per_pixel.dtype == torch.float32 and torch.isfinite(per_pixel).all()
    torch.testing.assert_close(per_pixel.double(), expected, rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("pool_way", [0, 1, 2])
def test_banded_sigmoid_terms_give_the_same_loss_and_gradient(monkeypatch: pytest.MonkeyPatch, pool_way: int) -> None:
    logits, labels = _blocky_inputs(batch_size=2, num_classes=5, height=37, width=53, dtype=torch.float64)
    loss_fn = RMILoss(num_classes=5, rmi_pool_way=pool_way)
    whole, whole_grad = _loss_and_grad(loss_fn, logits, labels)
    monkeypatch.setitem(rmi_loss.BAND_BYTES, "cpu", 1)
    banded, banded_grad = _loss_and_grad(loss_fn, logits, labels)
    torch.testing.assert_close(banded.loss, whole.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(banded_grad, whole_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_region_covariance_backward_matches_numerical_gradient(weighted: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    label_maps = (torch.rand(2, 1, 6, 7, generator=generator, dtype=torch.float64) > 0.5).double()
    prob_maps = torch.rand(2, 1, 6, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = (torch.rand(2, 1, 20, generator=generator) > 0.3).double() if weighted else None
    covariance = lambda p: _RegionCovariance.apply(label_maps, p, 3, weights)  # noqa: E731
    assert torch.autograd.gradcheck(covariance, (prob_maps,), fast_mode=True)


def test_region_covariance_matches_direct_computation() -> None:
    generator = torch.Generator().manual_seed(4)
    label_maps = torch.rand(3, 1, 9, 11, generator=generator, dtype=torch.float64)
    prob_maps = torch.rand(3, 1, 9, 11, generator=generator, dtype=torch.float64)
    vectors = F.unfold(torch.cat([label_maps, prob_maps], dim=1), kernel_size=2)
    centred = vectors - vectors.mean(dim=2, keepdim=True)
    expected = centred @ centred.transpose(1, 2)
    torch.testing.assert_close(_RegionCovariance.apply(label_maps, prob_maps, 2, None), expected)


@pytest.mark.parametrize("exclude_ignored", [False, True])
def test_region_statistics_in_chunks_match_one_chunk(monkeypatch: pytest.MonkeyPatch, exclude_ignored: bool) -> None:
    logits, labels = _blocky_inputs(batch_size=2, num_classes=5, dtype=torch.float64)
    loss_fn = RMILoss(num_classes=5, exclude_ignored_from_rmi=exclude_ignored)
    whole, whole_grad = _loss_and_grad(loss_fn, logits, labels)
    # Chunks of 3 (image, class) pairs: 10 pairs give 3 full chunks and a partial one.
    height, width = loss_fn.pooled_size(48, 64)
    pair_bytes = 2 * 9 * (height - 2) * (width - 2) * 8
    monkeypatch.setitem(rmi_loss.REGION_CHUNK_BYTES, "cpu", 3 * pair_bytes)
    chunked, chunked_grad = _loss_and_grad(loss_fn, logits, labels)
    torch.testing.assert_close(chunked.loss, whole.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked_grad, whole_grad, rtol=1e-9, atol=1e-12)
