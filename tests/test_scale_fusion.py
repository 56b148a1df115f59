"""The fusion baselines HMSA is compared against (explicit attention over scales, average, max), config-driven."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn import functional as F

from hms_segmentation import HMSConfig, HMSForSemanticSegmentation
from hms_segmentation.scale_fusion_baselines import explicit_scale_attention_fusion, pooled_scale_fusion
from tiny_configs import TINY_HRNET

SIZE = (16, 24)


def _scale_outputs(seed: int = 0) -> list[tuple[float, tuple[torch.Tensor, ...], torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    for scale in (2.0, 1.0, 0.5):
        h, w = int(SIZE[0] * scale), int(SIZE[1] * scale)
        predictions = (torch.randn(2, 5, h, w, generator=generator), torch.randn(2, 5, h, w, generator=generator))
        outputs.append((scale, predictions, torch.sigmoid(3 * torch.randn(2, 1, h, w, generator=generator))))
    return outputs


def _up(tensor: torch.Tensor) -> torch.Tensor:
    return F.interpolate(tensor, size=SIZE, mode="bilinear", align_corners=False)


def test_explicit_attention_is_a_softmax_over_scale_scores():
    outputs = _scale_outputs()
    scores = torch.stack([torch.logit(_up(a), eps=1e-6) for _, _, a in outputs])  # (scales, batch, 1, h, w)
    weights = torch.softmax(scores, dim=0)
    for index, fused in enumerate(explicit_scale_attention_fusion(outputs, SIZE)):
        expected = sum(w * _up(p[index]) for w, (_, p, _) in zip(weights, outputs))
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def test_explicit_attention_keeps_float64_precision_and_passes_gradcheck():
    outputs = [(s, tuple(p.double() for p in ps), a.double()) for s, ps, a in _scale_outputs(4)]
    scores = torch.stack([torch.logit(_up(a), eps=1e-6) for _, _, a in outputs])
    expected = sum(w * _up(p[0]) for w, (_, p, _) in zip(torch.softmax(scores, dim=0), outputs))
    fused = explicit_scale_attention_fusion(outputs, SIZE)[0]
    assert fused.dtype == torch.float64
    torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)
    inputs = [t[:1, :1].clone().requires_grad_(True) for _, p, a in outputs for t in (p[0], a)]

    def fuse(*tensors):
        scale_outputs = [(s, (tensors[2 * i],), tensors[2 * i + 1]) for i, (s, _, _) in enumerate(outputs)]
        return explicit_scale_attention_fusion(scale_outputs, SIZE)[0]

    assert torch.autograd.gradcheck(fuse, inputs)


def test_explicit_attention_does_not_depend_on_the_order_of_scales():
    outputs = _scale_outputs(1)
    reference = explicit_scale_attention_fusion(outputs, SIZE)[0]
    for order in itertools.permutations(outputs):
        torch.testing.assert_close(explicit_scale_attention_fusion(order, SIZE)[0], reference, rtol=1e-5, atol=1e-5)


def test_explicit_attention_with_equal_scores_is_the_average():
    outputs = [(s, p, torch.full_like(a, 0.3)) for s, p, a in _scale_outputs(2)]
    torch.testing.assert_close(explicit_scale_attention_fusion(outputs, SIZE)[0],
                               pooled_scale_fusion(outputs, SIZE, "average")[0], rtol=1e-5, atol=1e-6)


def test_average_and_max_fusion():
    outputs = _scale_outputs(3)
    stacked = torch.stack([_up(p[0]) for _, p, _ in outputs])
    torch.testing.assert_close(pooled_scale_fusion(outputs, SIZE, "average")[0], stacked.mean(0))
    torch.testing.assert_close(pooled_scale_fusion(outputs, SIZE, "max")[0], stacked.amax(0))
    with pytest.raises(ValueError, match="mode"):
        pooled_scale_fusion(outputs, SIZE, "median")
    with pytest.raises(ValueError, match="empty"):
        explicit_scale_attention_fusion([], SIZE)


@pytest.mark.parametrize("fusion", ["explicit", "average", "max"])
def test_models_with_each_fusion_train_and_infer(fusion, tmp_path):
    torch.manual_seed(0)
    config = HMSConfig(**TINY_HRNET, scale_fusion=fusion, training_scales=[0.5, 1.0, 2.0])
    model = HMSForSemanticSegmentation(config).train()
    outputs = model(torch.randn(2, 3, 32, 32), labels=torch.randint(0, 5, (2, 32, 32)))
    outputs.loss.backward()
    assert torch.isfinite(outputs.loss) and set(outputs.loss_terms) >= {"scale_0.5", "scale_1.0", "scale_2.0"}
    attention_grad = model.scale_attention_head.projection.weight.grad
    assert (attention_grad is not None and attention_grad.abs().sum() > 0) == (fusion == "explicit")
    model.eval().save_pretrained(tmp_path)
    reloaded = HMSForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert reloaded.config.scale_fusion == fusion
    pixel_values = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        fused = reloaded(pixel_values, scales=[0.25, 0.5, 1.0, 2.0]).logits
    assert fused.shape == (1, 5, 32, 48)


def test_an_unknown_fusion_is_named():
    with pytest.raises(ValueError, match="scale_fusion"):
        HMSConfig(scale_fusion="pyramid")
