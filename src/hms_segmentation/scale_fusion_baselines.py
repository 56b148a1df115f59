"""The multi-scale fusion schemes HMSA is compared against, for ablations and the training-cost benchmark.

HMSA's own rule, `hierarchical_scale_fusion`, lives in `modeling_hms.py`. The baselines here fuse every scale at once at
the input's resolution, so they are trained on all the scales they infer on:

- `"explicit"`: explicit multi-scale attention (Chen et al. 2016, "Attention to Scale"): each scale scores every pixel,
  a softmax over the scales turns the scores into weights, and the fused prediction is the weighted sum.
- `"average"` / `"max"`: plain average or element-wise maximum of the per-scale predictions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.nn import functional as F

# torch.logit clamps to [eps, 1 - eps]: scores within about +-13.8, far beyond where a softmax weight is ~0 or ~1
_SCORE_EPS = 1e-6


def _resize(tensor: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    if tensor.shape[-2:] == size:
        return tensor
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=align_corners)


def explicit_scale_attention_fusion(
    scale_outputs: Iterable[tuple[float, tuple[torch.Tensor, ...], torch.Tensor]],
    size: tuple[int, int],
    align_corners: bool = False,
) -> tuple[torch.Tensor, ...]:
    """
    Explicit attention over all scales: `fused = sum_s softmax_s(score_s) * up(p_s)`, at resolution `size`.

    The score of a scale is the logit of its attention map (`attention = sigmoid(score)`, as the scale-attention head
    produces it), so the same head serves both schemes. The softmax is computed online (running maximum and
    normaliser), so only the running sums and the current scale are held in memory, whatever the number of scales.

    Args:
        scale_outputs: `(scale, predictions, attention)` in any order; `predictions` a tuple of (batch, channels,
            h_s, w_s) tensors fused alike, `attention` (batch, 1, h_s, w_s) in (0, 1).
        size: `(height, width)` of the fused predictions.
        align_corners: `align_corners` of the bilinear resizes.

    Returns:
        The fused predictions, one (batch, channels, height, width) tensor per entry of `predictions`.
    """
    running_max = normaliser = None
    weighted: list[torch.Tensor] = []
    for _, predictions, attention in scale_outputs:
        # float32 at least: half-precision scores would round the softmax weights; float64 stays float64.
        attention = _resize(attention, size, align_corners)
        score = torch.logit(attention.to(torch.promote_types(attention.dtype, torch.float32)), eps=_SCORE_EPS)
        resized = [_resize(p, size, align_corners) for p in predictions]
        if running_max is None:
            running_max, normaliser = score, torch.ones_like(score)
            weighted = resized
            continue
        new_max = torch.maximum(running_max, score)
        keep, take = torch.exp(running_max - new_max), torch.exp(score - new_max)
        normaliser = normaliser * keep + take
        weighted = [w * keep.to(w.dtype) + take.to(p.dtype) * p for w, p in zip(weighted, resized)]
        running_max = new_max
    if running_max is None:
        raise ValueError("scale_outputs is empty: at least one scale is needed")
    return tuple(w / normaliser.to(w.dtype) for w in weighted)


def pooled_scale_fusion(
    scale_outputs: Iterable[tuple[float, tuple[torch.Tensor, ...], torch.Tensor]],
    size: tuple[int, int],
    mode: str,
    align_corners: bool = False,
) -> tuple[torch.Tensor, ...]:
    """
    Average (`mode="average"`) or element-wise maximum (`mode="max"`) of the per-scale predictions, each resized to
    `size`; attention maps are not used. Arguments and result as in `explicit_scale_attention_fusion`.
    """
    if mode not in ("average", "max"):
        raise ValueError(f"mode must be 'average' or 'max', got {mode!r}")
    fused: list[torch.Tensor] | None = None
    count = 0
    for _, predictions, _ in scale_outputs:
        resized = [_resize(p, size, align_corners) for p in predictions]
        count += 1
        if fused is None:
            fused = resized
        elif mode == "average":
            fused = [f + p for f, p in zip(fused, resized)]
        else:
            fused = [torch.maximum(f, p) for f, p in zip(fused, resized)]
    if fused is None:
        raise ValueError("scale_outputs is empty: at least one scale is needed")
    return tuple(f / count for f in fused) if mode == "average" else tuple(fused)
