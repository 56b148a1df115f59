"""Region Mutual Information (RMI) loss, NVIDIA's variant, as used to train Hierarchical Multi-Scale Attention.

RMI (Zhao et al., "Region Mutual Information Loss for Semantic Segmentation", NeurIPS 2019) adds to a per-pixel
sigmoid binary cross-entropy a term that rewards structure: every pixel together with its ``r x r`` neighbourhood is a
point in ``r²`` dimensions, one point cloud for the one-hot labels and one for the predicted probabilities, and the
loss is ``½ log det`` of the label covariance given the prediction (a lower bound of the mutual information, up to
constants).

This is a clean re-implementation that reproduces NVIDIA/semantic-segmentation ``loss/rmi.py`` (the ZJULearning/RMI
``loss_type=2`` path computes the same thing), quirks included; see :class:`RMILoss` for the list. The module is flat
(torch and a sibling import only) because it travels to the Hugging Face Hub as remote code.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .label_tables import IGNORE_INDEX

PROBABILITY_OFFSET = 1e-6
"""Added (not clamped) to every probability, so that an ignored pixel becomes exactly this value."""

POSITIVE_DEFINITE_ALPHA = 5e-4
"""Added to the diagonal of both ``r² x r²`` matrices that are inverted or factorised (keeps them positive definite)."""

LOG_EPSILON = 1e-8
"""Added to each Cholesky diagonal entry before the log (reference behaviour)."""

MAX_RMI_RADIUS = 10

POOL_WAYS = {0: "max pooling", 1: "average pooling", 2: "interpolation"}
"""Down-sampling applied to labels and probabilities before the region statistics (``rmi_pool_way``)."""


class RMILossOutput(NamedTuple):
    """The RMI loss and its two terms, all float32 scalars (0-dim tensors).

    ``loss`` combines the terms as ``λ·bce + (1−λ)·rmi`` (``lambda_way=1``) or ``bce + λ·rmi`` (``lambda_way=0``);
    with ``do_rmi=False`` it is ``bce_loss`` alone and ``rmi_loss`` is ``None``.
    """

    loss: torch.Tensor
    bce_loss: torch.Tensor
    rmi_loss: torch.Tensor | None


def _check_int_setting(name: str, value: object, allowed: str, condition: Callable[[int], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not condition(value):
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


BAND_BYTES = {"cpu": 4 * 2**20}
""":class:`_SigmoidTerms` works on bands of rows (all classes of one image) of about this many bytes, in scratch
buffers that every band reuses, so that on CPU a band's intermediate values are still in cache for the next
operation. Other devices use ``DEFAULT_BAND_BYTES``, larger (usually a whole image), to launch fewer kernels."""

DEFAULT_BAND_BYTES = 256 * 2**20


class _BandLayout(NamedTuple):
    """Bands of rows of a `(C, H, W)` image, and where they sit in the `(C, scratch_rows, scratch_width)` scratch.

    For average pooling with kernel = stride = k and padding p = k // 2, a band is a run of whole pooling cells: image
    rows ``[i·k − p, (i+1)·k − p)`` are rows ``[i·k, (i+1)·k)`` of the zero-padded frame that the pooling reads, whose
    columns ``[p, p + W)`` hold the image. Without pooling (k = 1, p = 0) a "cell" is one row. ``bands`` holds
    `(cell_start, cell_stop, row_start, row_stop)`; rows that no window reads (below the last cell, when the padded
    height is not a multiple of k) come last, in a band without cells.
    """

    kernel: int
    padding: int
    out_height: int
    out_width: int
    scratch_rows: int
    scratch_width: int
    bands: list[tuple[int, int, int, int]]

    @classmethod
    def of(cls, logits: torch.Tensor, pool_size: int | None) -> _BandLayout:
        _, num_classes, height, width = logits.shape
        kernel = pool_size or 1
        padding = kernel // 2
        out_height = (height + 2 * padding - kernel) // kernel + 1
        out_width = (width + 2 * padding - kernel) // kernel + 1
        scratch_width = max(out_width * kernel, width + padding)
        band_bytes = BAND_BYTES.get(logits.device.type, DEFAULT_BAND_BYTES)
        cell_bytes = num_classes * kernel * scratch_width * logits.element_size()
        cells_per_band = max(1, min(out_height, band_bytes // cell_bytes))
        bands = []
        for start in range(0, out_height, cells_per_band):
            stop = min(start + cells_per_band, out_height)
            bands.append((start, stop, max(0, start * kernel - padding), min(height, stop * kernel - padding)))
        if bands[-1][3] < height:
            bands.append((out_height, out_height, bands[-1][3], height))
        return cls(kernel, padding, out_height, out_width, cells_per_band * kernel, scratch_width, bands)

    def new_scratch(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.new_zeros(logits.shape[1], self.scratch_rows, self.scratch_width)

    def band_view(
        self, scratch: torch.Tensor, band: tuple[int, int, int, int], width: int, clear_padding: bool = False
    ) -> torch.Tensor:
        """The `(C, rows, W)` part of ``scratch`` that holds the band's image rows; optionally zeroes the frame's
        padding rows (the columns outside the image are never written)."""
        cell_start, cell_stop, row_start, row_stop = band
        top = row_start + self.padding - cell_start * self.kernel if cell_stop > cell_start else 0
        bottom = top + row_stop - row_start
        if clear_padding:
            scratch[:, :top].zero_()
            scratch[:, bottom : (cell_stop - cell_start) * self.kernel].zero_()
        return scratch[:, top:bottom, self.padding : self.padding + width]

    def frame_view(self, scratch: torch.Tensor, cells: int) -> torch.Tensor:
        """The padded frame of ``cells`` cell rows in ``scratch``, `(C, cells, k, W_out·k)`: rows split by window."""
        width = self.out_width * self.kernel
        return scratch[:, : cells * self.kernel, :width].view(-1, cells, self.kernel, width)

    def coverage(self, size: int, count: int) -> torch.Tensor:
        """How many image pixels (not padding) each of ``count`` windows along an axis of length ``size`` reads."""
        starts = torch.arange(count) * self.kernel - self.padding
        return (starts + self.kernel).clamp(max=size) - starts.clamp(min=0)


PRODUCT_GROUP = 64
"""Classes per product in :func:`_bce_per_pixel`: 64 factors of at least ½ stay far from float32 underflow."""


def _bce_per_pixel(logits: torch.Tensor, sigmoid: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ_c BCE(x_c, onehot_c) of each pixel, `(1, rows, W)`, from logits `(C, rows, W)` and their sigmoid (which it
    overwrites; pixels whose sigmoid was zeroed get wrong values, to be masked by the caller).

    Σ_c BCE = Σ_c softplus(x_c) − x_label (no one-hot target is needed), and softplus(x) = max(x, 0) − log σ(|x|)
    with σ(|x|) = max(s, 1 − s) = |s − ½| + ½: one log per pixel, of the product over classes, instead of an exp and
    a log1p per (pixel, class). Rounding: ≤ 1 ulp of 1 per factor, ~1e-7 per pixel in float32.
    """
    factors = sigmoid.sub_(0.5).abs_().add_(0.5)
    log_products = [group.prod(dim=0, keepdim=True).log_() for group in factors.split(PRODUCT_GROUP)]
    per_pixel = torch.clamp(logits, min=0, out=sigmoid).sum(dim=0, keepdim=True)
    for log_product in log_products:
        per_pixel -= log_product
    per_pixel -= logits.gather(0, labels)
    return per_pixel


def _sigmoid_terms_traceable(
    logits: torch.Tensor, safe_labels: torch.Tensor, valid_mask: torch.Tensor, pool_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`_SigmoidTerms` in plain differentiable operations, for `torch.compile`: its loops over bands, writes
    into views and hand-written backward would split the compiled graph, while the compiler fuses these operations
    itself. Same arguments and results (Σ_c BCE = Σ_c softplus(x_c) − x_label, as there)."""
    per_pixel = F.softplus(logits).sum(dim=1, keepdim=True) - logits.gather(1, safe_labels)
    bce_sum = (per_pixel * valid_mask).sum(dtype=torch.float64)
    if pool_size is None:
        return bce_sum, logits.new_empty(0)
    probs = torch.sigmoid(logits) * valid_mask + PROBABILITY_OFFSET
    if pool_size > 1:
        probs = F.avg_pool2d(probs, pool_size, pool_size, pool_size // 2)
    return bce_sum, probs


class _SigmoidTerms(torch.autograd.Function):
    """Sigmoid BCE sum and masked (average-pooled) probabilities, band by band, with a hand-written backward.

    Nothing of full resolution is saved: the backward recomputes the sigmoid. On CPU a fresh `(B, C, H, W)`
    allocation costs several passes over it (page faults), while a band's values are still in cache from one
    operation to the next. So the only full-resolution tensors written are the gradient and, for ``pool_size=1``,
    the probabilities; the average pooling and its backward never build a full-resolution map.
    """

    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, safe_labels: torch.Tensor, valid_mask: torch.Tensor, pool_size: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits `(B, C, H, W)`, safe_labels `(B, 1, H, W)` int64, valid_mask `(B, 1, H, W)` of the logits' dtype.

        Returns the float64 BCE sum over valid (pixel, class) pairs (0-dim) and ``p = sigmoid(logits) · valid + 1e-6``:
        empty for ``pool_size=None``, `(B, C, H, W)` for 1, ``F.avg_pool2d(p, k, k, k // 2)`` for k > 1.
        """
        layout = _BandLayout.of(logits, pool_size)
        batch_size, num_classes, height, width = logits.shape
        scratch = layout.new_scratch(logits)
        if pool_size is None:
            probs = logits.new_empty(0)
            ctx.mark_non_differentiable(probs)
        else:
            probs = logits.new_empty(batch_size, num_classes, layout.out_height, layout.out_width)
        partial_sums = []
        for image in range(batch_size):
            for band in layout.bands:
                cell_start, cell_stop, row_start, row_stop = band
                band_logits = logits[image, :, row_start:row_stop]
                valid = valid_mask[image, :, row_start:row_stop]
                inner = layout.band_view(scratch, band, width, clear_padding=True)
                sigmoid = torch.sigmoid(band_logits, out=inner)
                if pool_size == 1:
                    torch.mul(sigmoid, valid, out=probs[image, :, row_start:row_stop]).add_(PROBABILITY_OFFSET)
                elif pool_size is not None and cell_stop > cell_start:
                    cells = cell_stop - cell_start
                    sigmoid.mul_(valid)
                    # Window sums: a reduction over the k rows, then k − 1 strided adds (faster than a reduction
                    # over an innermost dimension of size k).
                    row_sums = layout.frame_view(scratch, cells).sum(dim=2)
                    out = probs[image, :, cell_start:cell_stop]
                    torch.add(row_sums[..., 0 :: layout.kernel], row_sums[..., 1 :: layout.kernel], out=out)
                    for column in range(2, layout.kernel):
                        out += row_sums[..., column :: layout.kernel]
                per_pixel = _bce_per_pixel(band_logits, sigmoid, safe_labels[image, :, row_start:row_stop])
                partial_sums.append(torch.dot(per_pixel.view(-1), valid.reshape(-1)))
        if pool_size is not None and layout.kernel > 1:
            # Window sums so far; add the 1e-6 of each image pixel (the zero padding has none) and take the mean.
            rows, cols = (layout.coverage(size, count) for size, count in zip((height, width), probs.shape[-2:]))
            offsets = torch.outer(rows, cols).to(device=logits.device, dtype=logits.dtype) * PROBABILITY_OFFSET
            probs.add_(offsets).div_(layout.kernel**2)
        ctx.save_for_backward(logits, safe_labels, valid_mask)
        ctx.pool_size = pool_size
        return torch.stack(partial_sums).sum(dtype=torch.float64), probs

    @staticmethod
    @once_differentiable  # its out= and in-place operations cannot be recorded for a second derivative
    def backward(ctx, grad_bce_sum: torch.Tensor, grad_probs: torch.Tensor):
        logits, safe_labels, valid_mask = ctx.saved_tensors
        layout = _BandLayout.of(logits, ctx.pool_size)
        kernel, width = layout.kernel, logits.shape[-1]
        grad_bce = grad_bce_sum.to(logits.dtype)
        if ctx.pool_size is None or grad_probs is None:
            grad_probs = None
        elif kernel > 1:
            grad_probs = grad_probs / kernel**2  # as avg_pool2d's backward
        scratch = layout.new_scratch(logits)
        grad_terms = None if grad_probs is None else layout.new_scratch(logits)
        grad = torch.empty_like(logits)
        for image in range(logits.shape[0]):
            for band in layout.bands:
                cell_start, cell_stop, row_start, row_stop = band
                valid = valid_mask[image, :, row_start:row_stop]
                out = grad[image, :, row_start:row_stop]
                # s·valid, whose own derivative is s·(1 − s)·valid = (s·valid)·(1 − s·valid).
                inner = layout.band_view(scratch, band, width)
                torch.sigmoid(logits[image, :, row_start:row_stop], out=inner).mul_(valid)
                cells = cell_stop - cell_start
                if grad_probs is None or cells == 0:
                    torch.mul(inner, grad_bce, out=out)
                else:
                    # Each window's gradient spread over its columns (for the inner loop), broadcast over its rows.
                    spread = grad_probs[image, :, cell_start:cell_stop, :, None].expand(-1, -1, -1, kernel)
                    spread = spread.reshape(-1, cells, 1, layout.out_width * kernel)
                    frame, grad_frame = (layout.frame_view(buffer, cells) for buffer in (scratch, grad_terms))
                    torch.ops.aten.sigmoid_backward.grad_input(spread, frame, grad_input=grad_frame)
                    grad_inner = layout.band_view(grad_terms, band, width)
                    torch.addcmul(grad_inner, inner, grad_bce, out=out)
                # d BCE / dx = valid · (s − onehot): the onehot part.
                out.scatter_add_(0, safe_labels[image, :, row_start:row_stop], valid * -grad_bce)
        return grad, None, None, None


REGION_CHUNK_BYTES = {"cpu": 8 * 2**20}
"""Region vectors are built about this many bytes at a time (whole (image, class) pairs, at least one), into one
reused buffer, and rebuilt for the backward: the `(B·C, 2r², N)` float64 tensor (300 MiB for 65 classes at
512 x 1024) is never held whole. On CPU small chunks are faster too: each is still in cache when its matmul reads it,
and the buffer is not allocated (and page-faulted) again for every chunk. Other devices use
``DEFAULT_REGION_CHUNK_BYTES``, larger, to launch fewer kernels."""

DEFAULT_REGION_CHUNK_BYTES = 256 * 2**20


class _RegionCovariance(torch.autograd.Function):
    """Centred, un-normalised (co)variance of the region vectors of label and probability maps, batched.

    Each chunk of `(image, class)` pairs materialises its region vectors ``V`` once, with the point weights ``w`` (or
    ones) as an extra row, so that one matmul gives ``V Vᵀ``, the sums ``V wᵀ`` and the count ``w wᵀ``; then
    ``S = V Vᵀ − n μ μᵀ``, after shifting each map by its mean (the covariance does not depend on the shift, which
    keeps the subtraction well conditioned). The backward rebuilds the chunk and needs one more matmul and a fold,
    instead of autograd's matmul per operand, centring passes and gradient of the label half.
    """

    @staticmethod
    def forward(
        ctx, label_maps: torch.Tensor, prob_maps: torch.Tensor, radius: int, point_weights: torch.Tensor | None
    ) -> torch.Tensor:
        """label_maps, prob_maps `(P, 1, H', W')`, any floating dtype; point_weights `(P, 1, N)` 0/1 or None.

        Returns `(P, 2r², 2r²)` float64: rows/columns ``[0, r²)`` are the label components, ``[r², 2r²)`` the
        probability components.
        """
        maps = (label_maps, prob_maps)
        # Any shift gives the same covariance; the maps' means keep the subtraction below well conditioned.
        shifts = torch.stack([part.mean(dim=(1, 2, 3)).double() for part in maps], dim=1)
        dim = 2 * radius**2
        gram = shifts.new_empty(shifts.shape[0], dim + 1, dim + 1)
        for start, stop, augmented in _region_chunks(maps, shifts, radius, point_weights):
            torch.matmul(augmented, augmented.transpose(1, 2), out=gram[start:stop])
        covariance, means = _covariance_from_gram(gram)
        ctx.save_for_backward(label_maps, prob_maps, shifts, means, point_weights)
        ctx.radius = radius
        return covariance

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_covariance: torch.Tensor):
        if not ctx.needs_input_grad[1]:
            return None, None, None, None
        label_maps, prob_maps, shifts, means, point_weights = ctx.saved_tensors
        radius = ctx.radius
        dim = radius * radius
        # dV = Ḡ (V − μ wᵀ) = [Ḡ, −Ḡμ] [V; w], Ḡ = G + Gᵀ (V is already zero where w = 0). Only the probability
        # rows of V need it.
        symmetric = (grad_covariance + grad_covariance.transpose(1, 2))[:, dim:, :]
        augmented_grad = torch.cat([symmetric, -torch.matmul(symmetric, means)], dim=2)
        grad_maps = torch.empty_like(prob_maps)
        grad_vectors = grad_chunk = None  # float64 buffers, reused by every chunk
        for start, stop, augmented in _region_chunks((label_maps, prob_maps), shifts, radius, point_weights):
            if grad_vectors is None:
                grad_vectors = augmented.new_empty(augmented.shape[0], dim, augmented.shape[-1])
                grad_chunk = augmented.new_empty(augmented.shape[0], *prob_maps.shape[1:])
            size = stop - start
            torch.matmul(augmented_grad[start:stop], augmented, out=grad_vectors[:size])
            grad_maps[start:stop] = _fold_region_vectors(grad_vectors[:size], radius, out=grad_chunk[:size].zero_())
        return None, grad_maps, None, None


def _covariance_from_gram(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrices `(P, d + 1, d + 1)` of ``[V; w]`` (region vectors, weight row) -> the centred, un-normalised
    covariances ``S = V Vᵀ − n μ μᵀ`` `(P, d, d)` and the means ``μ`` `(P, d, 1)`."""
    dim = gram.shape[-1] - 1
    sums, counts = gram[:, :dim, dim:], gram[:, dim:, dim:].clamp(min=1.0)
    means = sums / counts
    return gram[:, :dim, :dim] - means * sums.transpose(1, 2), means


def _region_covariance_traceable(
    label_maps: torch.Tensor, prob_maps: torch.Tensor, radius: int, point_weights: torch.Tensor | None
) -> torch.Tensor:
    """:class:`_RegionCovariance` in plain differentiable operations, for `torch.compile` (see
    :func:`_sigmoid_terms_traceable`): ``F.unfold`` builds the region vectors of every pair at once, in the same row
    order, and autograd differentiates them. Same arguments and result."""
    maps = torch.cat([label_maps, prob_maps], dim=1).double()
    maps = maps - maps.mean(dim=(2, 3), keepdim=True)  # the shift of _RegionCovariance, for the same conditioning
    vectors = F.unfold(maps, radius)
    if point_weights is None:
        point_weights = vectors.new_ones(vectors.shape[0], 1, vectors.shape[-1])
    augmented = torch.cat([vectors * point_weights, point_weights], dim=1)
    return _covariance_from_gram(torch.matmul(augmented, augmented.transpose(1, 2)))[0]


def _region_chunks(
    maps: tuple[torch.Tensor, ...], shifts: torch.Tensor, radius: int, point_weights: torch.Tensor | None
):
    """Yield `(start, stop, augmented)`: the region vectors of the maps of pairs ``[start, stop)`` and a weight row.

    ``maps``: K tensors `(P, 1, H', W')`, any floating dtype; ``shifts`` `(P, K)` float64, subtracted from each map.
    ``augmented`` `(stop − start, K·r² + 1, N)` float64, N = (H'−r+1)(W'−r+1): row ``k·r² + dy·r + dx`` holds
    ``maps[k][:, 0, dy + i, dx + j] − shifts[:, k]`` for every valid position ``(i, j)`` (the layout of ``F.unfold``,
    which is several times slower on CPU than this strided copy), times the point weights if given; the last row
    holds the weights (or ones). It lives in a buffer that the next chunk overwrites.
    """
    pairs, _, height, width = maps[0].shape
    out_height, out_width = height - radius + 1, width - radius + 1
    per_map = radius**2
    rows = len(maps) * per_map
    bytes_per_pair = (rows + 1) * out_height * out_width * shifts.element_size()
    chunk_bytes = REGION_CHUNK_BYTES.get(shifts.device.type, DEFAULT_REGION_CHUNK_BYTES)
    size = max(1, min(pairs, chunk_bytes // bytes_per_pair))
    buffer = shifts.new_empty(size, rows + 1, out_height * out_width)
    shifted = shifts.new_empty(size, len(maps), height, width)
    if point_weights is None:
        buffer[:, rows] = 1.0
    for start in range(0, pairs, size):
        stop = min(start + size, pairs)
        augmented = buffer[: stop - start]
        for index, part in enumerate(maps):  # float64 from here on, as in the reference
            torch.sub(part[start:stop, 0], shifts[start:stop, index, None, None], out=shifted[: stop - start, index])
        windows = shifted[: stop - start].unfold(2, radius, 1).unfold(3, radius, 1).permute(0, 1, 4, 5, 2, 3)
        augmented[:, :rows].view(windows.shape).copy_(windows)
        if point_weights is not None:
            augmented[:, :rows] *= point_weights[start:stop]
            augmented[:, rows:] = point_weights[start:stop]
        yield start, stop, augmented


def _fold_region_vectors(vectors: torch.Tensor, radius: int, out: torch.Tensor) -> torch.Tensor:
    """Adjoint of the region vectors of one channel: adds `(P, r², N)` into the maps ``out`` `(P, 1, H', W')`."""
    height, width = out.shape[-2:]
    out_height, out_width = height - radius + 1, width - radius + 1
    components = vectors.view(vectors.shape[0], radius, radius, out_height, out_width)
    for dy in range(radius):
        for dx in range(radius):
            out[:, 0, dy : dy + out_height, dx : dx + out_width] += components[:, dy, dx]
    return out


def _conditional_half_log_det(covariance: torch.Tensor) -> torch.Tensor:
    """`(P, 2r², 2r²)` joint (co)variances from :class:`_RegionCovariance` -> `(P,)` ½ log det of the conditional one.

    ``V = S_LL − S_LP (S_PP + αI)⁻¹ S_PL`` and ``½ log det(V + αI) = Σ log(diag(cholesky(V + αI)) + 1e-8)``.
    """
    dim = covariance.shape[-1] // 2
    label_cov, label_prob_cov = covariance[:, :dim, :dim], covariance[:, :dim, dim:]
    prob_cov = covariance[:, dim:, dim:]
    eye = torch.eye(dim, dtype=covariance.dtype, device=covariance.device)
    # S_LP (S_PP + αI)⁻¹ S_PL = WᵀW with W = K⁻¹ S_PL, K the Cholesky factor: symmetric by construction.
    # cholesky_ex skips the error check (a device sync on GPU); S_PP + αI is positive definite.
    prob_chol = torch.linalg.cholesky_ex(prob_cov + POSITIVE_DEFINITE_ALPHA * eye).L
    whitened = torch.linalg.solve_triangular(prob_chol, label_prob_cov.transpose(1, 2), upper=False)
    conditional_cov = label_cov - torch.matmul(whitened.transpose(1, 2), whitened)
    chol = torch.linalg.cholesky_ex(conditional_cov + POSITIVE_DEFINITE_ALPHA * eye).L
    return torch.log(torch.diagonal(chol, dim1=-2, dim2=-1) + LOG_EPSILON).sum(dim=-1)


class RMILoss(nn.Module):
    """Sigmoid binary cross-entropy plus Region Mutual Information, NVIDIA's ``RMILoss`` (HMSA's training loss).

    Steps (``C`` classes, radius ``r``, ``λ = loss_weight_lambda``):

    1. A pixel is valid iff ``0 <= label < num_classes`` and ``label != ignore_index``.
    2. BCE term: sigmoid binary cross-entropy of every (valid pixel, class) against the one-hot label, summed and
       divided by ``(number of valid pixels + 1)``.
    3. Probabilities ``p = sigmoid(logits) * valid + 1e-6``; the one-hot labels (zero rows for ignored pixels) and
       ``p`` are down-sampled the same way (``rmi_pool_way`` 0: max pool, 1: average pool counting the zero padding,
       2: nearest (labels) / bilinear ``align_corners=True`` (probabilities) resize to ``(H // s, W // s)``; no
       down-sampling when ``rmi_pool_stride == 1``).
    4. Each (image, class) yields ``N`` points of dimension ``r²`` (every valid ``r x r`` window of the pooled map)
       for the labels ``L`` and the probabilities ``P``. In float64, with ``S`` the centred, un-normalised
       (co)variances: ``V = S_LL − S_LP (S_PP + αI)⁻¹ S_LPᵀ`` and the value is
       ``Σ log(diag(cholesky(V + αI)) + 1e-8)`` = ``½ log det``, with ``α = 5e-4``.
    5. RMI term: the mean over images, cast to float32, divided by ``r²``, summed over classes. It is often negative.
    6. ``loss = λ·bce + (1−λ)·rmi`` (``lambda_way=1``) or ``bce + λ·rmi`` (``lambda_way=0``), float32.

    Reference quirks kept by default: ignored pixels stay in the region statistics (as label 0, probability 1e-6), so
    a fully ignored image still adds ``C·log(√α + 1e-8) ≈ −3.80·C`` to the batch mean of the RMI term; the BCE
    normaliser has ``+1``; both terms and the loss are float32 whatever the logits' dtype. The BCE term and the
    probabilities are computed in the logits' dtype, but in float32 at least (half and bfloat16 logits are upcast,
    also inside ``torch.autocast``); the region statistics are float64.

    Differences from the reference, none of which changes a result the reference produces: ``ignore_index`` is
    honoured even when it lies in ``[0, num_classes)`` (the reference stores it but only tests ``label <
    num_classes``); negative labels count as ignored (the reference fails on them); ``rmi_pool_way=3`` is refused at
    construction (the reference raises ``NotImplementedError`` in forward); invalid settings and inputs raise
    ``ValueError`` naming the argument.

    Implementation: no full-resolution one-hot map is built (the BCE uses ``Σ_c softplus(x_c) − x_label``, the pooled
    one-hot labels are pixel counts); the sigmoid, the BCE and the average pooling of the probabilities run in bands
    of rows that stay in cache, and only the gradient is written at full resolution (the backward recomputes the
    sigmoid); the statistics run batched over (image, class) pairs: one matmul per chunk of pairs for all covariance
    blocks, one batched Cholesky, triangular solve and Cholesky for all pairs. Pairs whose pooled label map is
    constant (mostly absent classes) are skipped: their value is the constant ``r²·log(√α + 1e-8)`` and their
    gradient is zero, exactly as computed by the reference. Under ``torch.compile`` (``--torch_compile``) the same
    values come from plain tensor operations that the compiler fuses and differentiates, since the bands, the
    hand-written backwards and the skipping (a data-dependent size) would split its graph: every pair's region vectors
    are built at once, ``B·C·(2r² + 1)·N`` float64 values (about 1.3 GB for 65 classes and two 1024x1024 crops).
    Eager gradients are first order only (``create_graph=True`` works; differentiating the gradient again raises).

    Args:
        num_classes (`int`, *optional*, defaults to 19):
            Number of classes ``C``; ``logits.shape[1]`` must equal it. 19 for Cityscapes, 65 for Mapillary.
        ignore_index (`int`, *optional*, defaults to 255):
            Label value that is ignored. Labels outside ``[0, num_classes)`` are ignored too.
        rmi_radius (`int`, *optional*, defaults to 3):
            Side ``r`` of the square regions, 1 to 10.
        rmi_pool_way (`int`, *optional*, defaults to 1):
            Down-sampling before the region statistics: 0 max pooling, 1 average pooling, 2 interpolation.
        rmi_pool_size (`int`, *optional*, defaults to 4):
            Pooling kernel size; must equal ``rmi_pool_stride`` (padding is ``rmi_pool_size // 2``).
        rmi_pool_stride (`int`, *optional*, defaults to 4):
            Down-sampling factor; 1 disables down-sampling (memory grows with ``H·W``).
        loss_weight_lambda (`float`, *optional*, defaults to 0.5):
            Weight ``λ`` of the terms, see ``lambda_way``.
        lambda_way (`int`, *optional*, defaults to 1):
            1: ``λ·bce + (1−λ)·rmi``; 0: ``bce + λ·rmi``.
        loss_type (`int`, *optional*):
            Accepted for ZJULearning/RMI configs; only its sigmoid path (``loss_type=2``, NVIDIA's only path) exists,
            so ``None`` and 2 are accepted and any other value is refused.
        exclude_ignored_from_rmi (`bool`, *optional*, defaults to `False`):
            Opt-in, not in the reference: a region point enters the RMI statistics only if none of the pixels that
            its pooled cells read is ignored (points are weighted 0/1 in the means and covariances), and images
            without any such point are left out of the batch mean (the RMI term is 0 when no image has one).

    Example:

    ```python
    >>> loss_fn = RMILoss(num_classes=19)
    >>> logits = torch.randn(2, 19, 64, 96, requires_grad=True)
    >>> labels = torch.randint(0, 19, (2, 64, 96))
    >>> terms = loss_fn.forward_components(logits, labels)
    >>> terms.loss.backward()
    ```
    """

    def __init__(
        self,
        num_classes: int = 19,
        ignore_index: int = IGNORE_INDEX,
        rmi_radius: int = 3,
        rmi_pool_way: int = 1,
        rmi_pool_size: int = 4,
        rmi_pool_stride: int = 4,
        loss_weight_lambda: float = 0.5,
        lambda_way: int = 1,
        loss_type: int | None = None,
        exclude_ignored_from_rmi: bool = False,
    ) -> None:
        super().__init__()
        _check_int_setting("num_classes", num_classes, "a positive integer", lambda v: v >= 1)
        _check_int_setting("ignore_index", ignore_index, "an integer", lambda v: True)
        _check_int_setting(
            "rmi_radius", rmi_radius, f"an integer in 1..{MAX_RMI_RADIUS}", lambda v: 1 <= v <= MAX_RMI_RADIUS
        )
        _check_int_setting(
            "rmi_pool_way",
            rmi_pool_way,
            "one of " + ", ".join(f"{way} ({name})" for way, name in POOL_WAYS.items()),
            lambda v: v in POOL_WAYS,
        )
        _check_int_setting("rmi_pool_size", rmi_pool_size, "a positive integer", lambda v: v >= 1)
        _check_int_setting("rmi_pool_stride", rmi_pool_stride, "a positive integer", lambda v: v >= 1)
        if rmi_pool_size != rmi_pool_stride:
            raise ValueError(
                f"`rmi_pool_size` must equal `rmi_pool_stride`, got rmi_pool_size={rmi_pool_size} and "
                f"rmi_pool_stride={rmi_pool_stride}."
            )
        if (
            isinstance(loss_weight_lambda, bool)
            or not isinstance(loss_weight_lambda, numbers.Real)
            or not math.isfinite(loss_weight_lambda)
        ):
            raise ValueError(f"`loss_weight_lambda` must be a finite number, got {loss_weight_lambda!r}.")
        _check_int_setting("lambda_way", lambda_way, "0 or 1", lambda v: v in (0, 1))
        if loss_type is not None:
            _check_int_setting("loss_type", loss_type, "None or 2 (only the sigmoid path exists)", lambda v: v == 2)
        if not isinstance(exclude_ignored_from_rmi, bool):
            raise ValueError(f"`exclude_ignored_from_rmi` must be a bool, got {exclude_ignored_from_rmi!r}.")

        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.rmi_radius = int(rmi_radius)
        self.rmi_pool_way = int(rmi_pool_way)
        self.rmi_pool_size = int(rmi_pool_size)
        self.rmi_pool_stride = int(rmi_pool_stride)
        self.loss_weight_lambda = float(loss_weight_lambda)
        self.lambda_way = int(lambda_way)
        self.exclude_ignored_from_rmi = exclude_ignored_from_rmi

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, ignore_index={self.ignore_index}, rmi_radius={self.rmi_radius}, "
            f"rmi_pool_way={self.rmi_pool_way}, rmi_pool_size={self.rmi_pool_size}, "
            f"loss_weight_lambda={self.loss_weight_lambda}, lambda_way={self.lambda_way}, "
            f"exclude_ignored_from_rmi={self.exclude_ignored_from_rmi}"
        )

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, do_rmi: bool = True) -> torch.Tensor:
        """Compute the loss.

        Args:
            logits (`torch.FloatTensor` of shape `(batch_size, num_classes, height, width)`):
                Raw class scores (before the sigmoid), any floating dtype.
            labels (`torch.LongTensor` of shape `(batch_size, height, width)`):
                Class indices, any integer dtype; ``ignore_index`` and values outside ``[0, num_classes)`` are ignored.
            do_rmi (`bool`, *optional*, defaults to `True`):
                `False` returns the BCE term alone (HMSA's per-scale auxiliary losses).

        Returns:
            `torch.FloatTensor` of shape `()`: the float32 loss.
        """
        return self.forward_components(logits, labels, do_rmi=do_rmi).loss

    def forward_components(self, logits: torch.Tensor, labels: torch.Tensor, do_rmi: bool = True) -> RMILossOutput:
        """Compute the loss and its BCE and RMI terms (for logging); arguments as in :meth:`forward`.

        Returns:
            [`RMILossOutput`]: `loss`, `bce_loss` and `rmi_loss`, float32 tensors of shape `()`; `rmi_loss` is `None`
            and `loss` is `bce_loss` when ``do_rmi=False``.
        """
        self._check_inputs(logits, labels, do_rmi)
        # Autocast would run the matmuls below in half precision; the reference disables it for the same reason.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self._compute(logits, labels, do_rmi)

    def pooled_size(self, height: int, width: int) -> tuple[int, int]:
        """Size `(height', width')` of the maps that the region statistics are taken on."""
        stride = self.rmi_pool_stride
        if stride == 1:
            return height, width
        if self.rmi_pool_way == 2:
            return height // stride, width // stride
        padding = self.rmi_pool_size // 2
        return (
            (height + 2 * padding - self.rmi_pool_size) // stride + 1,
            (width + 2 * padding - self.rmi_pool_size) // stride + 1,
        )

    def _check_inputs(self, logits: torch.Tensor, labels: torch.Tensor, do_rmi: bool) -> None:
        if not isinstance(logits, torch.Tensor) or logits.dim() != 4 or not logits.is_floating_point():
            found = type(logits).__name__
            if isinstance(logits, torch.Tensor):
                found = f"a {logits.dtype} tensor of shape {tuple(logits.shape)}"
            raise ValueError(
                f"`logits` must be a 4-D floating point tensor (batch, classes, height, width), got {found}."
            )
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"`logits` must have num_classes={self.num_classes} channels (dim 1), got shape {tuple(logits.shape)}."
            )
        batch_size, _, height, width = logits.shape
        if min(batch_size, height, width) == 0:
            raise ValueError(f"`logits` must have at least one image and one pixel, got shape {tuple(logits.shape)}.")
        is_integer_tensor = isinstance(labels, torch.Tensor) and not (
            labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool
        )
        if not is_integer_tensor:
            found = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"`labels` must be an integer tensor, got {found}.")
        if tuple(labels.shape) != (batch_size, height, width):
            raise ValueError(
                f"`labels` must have shape (batch, height, width) = {(batch_size, height, width)} to match `logits` "
                f"{tuple(logits.shape)}, got {tuple(labels.shape)}."
            )
        if labels.device != logits.device:
            raise ValueError(f"`labels` must be on the device of `logits` ({logits.device}), got {labels.device}.")
        if do_rmi:
            pooled = self.pooled_size(height, width)
            if min(pooled) < self.rmi_radius:
                raise ValueError(
                    f"`logits` of spatial size {(height, width)} give {pooled} after down-sampling by "
                    f"rmi_pool_stride={self.rmi_pool_stride}, smaller than rmi_radius={self.rmi_radius}; use larger "
                    "inputs, a smaller stride or radius, or do_rmi=False."
                )

    def _compute(self, logits: torch.Tensor, labels: torch.Tensor, do_rmi: bool) -> RMILossOutput:
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        # Contiguous: a permuted view (a transposed batch) keeps its layout through the element-wise ops below, and
        # the pixel counts of the pooled one-hot flatten their indices with view().
        labels = labels.long().contiguous()
        valid = (labels >= 0) & (labels < self.num_classes) & (labels != self.ignore_index)
        safe_labels = torch.where(valid, labels, 0)
        valid_mask = valid.to(logits.dtype)

        pool_size = self._fused_pool_size() if do_rmi else None
        sigmoid_terms = _sigmoid_terms_traceable if torch.compiler.is_compiling() else _SigmoidTerms.apply
        bce_sum, probs = sigmoid_terms(logits, safe_labels.unsqueeze(1), valid_mask.unsqueeze(1), pool_size)
        bce_loss = (bce_sum / (torch.count_nonzero(valid) + 1)).float()
        if not do_rmi:
            return RMILossOutput(loss=bce_loss, bce_loss=bce_loss, rmi_loss=None)

        pooled_probs = probs if pool_size > 1 else self._downsample_probabilities(probs)
        pooled_onehot = self._pooled_onehot(safe_labels, valid)
        point_weights = self._point_weights(valid) if self.exclude_ignored_from_rmi else None
        half_log_det = self._half_log_det_per_image_class(pooled_onehot, pooled_probs, point_weights)

        if point_weights is None:
            per_class = half_log_det.mean(dim=0)
        else:
            # Images without a single usable point carry no information: leave them out of the mean.
            has_points = (point_weights.sum(dim=(1, 2)) > 0).double()
            per_class = (half_log_det * has_points.unsqueeze(1)).sum(dim=0) / has_points.sum().clamp(min=1.0)
        # float32 before the division and the class sum, as the reference does.
        rmi_loss = (per_class.float() / float(self.rmi_radius**2)).sum()

        weight = self.loss_weight_lambda
        if self.lambda_way == 1:
            loss = weight * bce_loss + (1.0 - weight) * rmi_loss
        else:
            loss = bce_loss + weight * rmi_loss
        return RMILossOutput(loss=loss, bce_loss=bce_loss, rmi_loss=rmi_loss)

    def _fused_pool_size(self) -> int:
        """``pool_size`` for :class:`_SigmoidTerms`: the average pooling is done there; other ways get the
        full-resolution probabilities (1)."""
        return self.rmi_pool_size if self.rmi_pool_way == 1 and self.rmi_pool_stride > 1 else 1

    def _downsample_probabilities(self, maps: torch.Tensor) -> torch.Tensor:
        """Down-sample `(B, K, H, W)` maps the way probabilities are; `(B, K, H', W')`."""
        size, stride = self.rmi_pool_size, self.rmi_pool_stride
        if stride == 1:
            return maps
        if self.rmi_pool_way == 0:
            return F.max_pool2d(maps, kernel_size=size, stride=stride, padding=size // 2)
        if self.rmi_pool_way == 1:
            return F.avg_pool2d(maps, kernel_size=size, stride=stride, padding=size // 2)
        return F.interpolate(maps, size=self.pooled_size(*maps.shape[-2:]), mode="bilinear", align_corners=True)

    def _nearest_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels `(B, H, W)` resized with PyTorch's legacy `nearest`, as the one-hot map is for pool way 2."""
        if self.rmi_pool_stride == 1:
            return labels
        # The same op as the reference (not our own index arithmetic) keeps its float rounding of the source index.
        size = self.pooled_size(*labels.shape[-2:])
        resized = F.interpolate(labels.unsqueeze(1).double(), size=size, mode="nearest")
        return resized.squeeze(1).long()

    def _pooled_onehot(self, safe_labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Down-sampled one-hot labels (zero rows for ignored pixels), `(B, C, H', W')` float64, without a gradient."""
        batch_size, height, width = safe_labels.shape
        num_classes = self.num_classes
        if self.rmi_pool_stride == 1 or self.rmi_pool_way == 2:
            # Sample first, then one-hot: the full-resolution (B, C, H, W) one-hot is never built.
            labels = torch.where(valid, safe_labels, torch.full_like(safe_labels, num_classes))
            labels = self._nearest_labels(labels).unsqueeze(1)
            onehot = labels.new_zeros(batch_size, num_classes + 1, *labels.shape[-2:], dtype=torch.float64)
            return onehot.scatter_(1, labels, 1.0)[:, :num_classes]

        # Max / average pooling with kernel == stride: every pixel falls in at most one window, so the pooled one-hot
        # is a per-(image, class, cell) pixel count, gathered with one index_add_ instead of pooling B·C·H·W values.
        size = self.rmi_pool_size
        out_height, out_width = self.pooled_size(height, width)
        rows = (torch.arange(height, device=valid.device) + size // 2) // size
        cols = (torch.arange(width, device=valid.device) + size // 2) // size
        in_window = valid & (rows < out_height).view(1, -1, 1) & (cols < out_width).view(1, 1, -1)
        cells_per_map = out_height * out_width
        cells = safe_labels * cells_per_map
        cells += (rows * out_width).view(1, -1, 1)
        cells += cols.view(1, 1, -1)
        if batch_size > 1:
            cells += (torch.arange(batch_size, device=valid.device) * (num_classes * cells_per_map)).view(-1, 1, 1)
        num_cells = batch_size * num_classes * cells_per_map
        # Pixels outside every window (or ignored) go to one extra bin, dropped after counting.
        cells.masked_fill_(~in_window, num_cells)
        # Counted straight into float64 (exact integers); unlike bincount with weights, index_add_ is deterministic
        # on CUDA too.
        ones = torch.ones((), dtype=torch.float64, device=cells.device).expand(cells.numel())
        counts = torch.zeros(num_cells + 1, dtype=torch.float64, device=cells.device).index_add_(0, cells.view(-1), ones)
        counts = counts[:num_cells].view(batch_size, num_classes, out_height, out_width)
        return counts.div_(size * size) if self.rmi_pool_way == 1 else counts.clamp_(max=1.0)

    def _point_weights(self, valid: torch.Tensor) -> torch.Tensor:
        """0/1 weight of each region point, `(B, 1, N)` float64: 1 iff no pixel its pooled cells read is ignored."""
        ignored = (~valid).unsqueeze(1).double()
        cell_reads_ignored = self._downsample_probabilities(ignored) > 0
        if self.rmi_pool_way == 2 and self.rmi_pool_stride > 1:
            cell_reads_ignored |= self._nearest_labels((~valid).long()).unsqueeze(1).bool()
        point_reads_ignored = F.max_pool2d(cell_reads_ignored.double(), kernel_size=self.rmi_radius, stride=1)
        return (point_reads_ignored == 0).double().flatten(2)

    def _half_log_det_per_image_class(
        self, pooled_onehot: torch.Tensor, pooled_probs: torch.Tensor, point_weights: torch.Tensor | None
    ) -> torch.Tensor:
        """½ log det of the label covariance given the prediction, per (image, class).

        Args:
            pooled_onehot (`torch.DoubleTensor` of shape `(B, C, H', W')`): down-sampled one-hot labels.
            pooled_probs (`torch.FloatTensor` of shape `(B, C, H', W')`): down-sampled probabilities (float32 or
                float64; the statistics are float64 either way).
            point_weights (`torch.DoubleTensor` of shape `(B, 1, N)`, *optional*): 0/1 weight of each region point.

        Returns:
            `torch.DoubleTensor` of shape `(B, C)`.
        """
        batch_size, num_classes, height, width = pooled_probs.shape
        onehot = pooled_onehot.reshape(batch_size * num_classes, 1, height, width)
        probs = pooled_probs.reshape(batch_size * num_classes, 1, height, width)
        if point_weights is not None:
            point_weights = point_weights.repeat_interleave(num_classes, dim=0)
        if torch.compiler.is_compiling():
            # Every pair: choosing the informative ones (below) has a data-dependent size, which splits the graph.
            covariance = _region_covariance_traceable(onehot, probs, self.rmi_radius, point_weights)
            return _conditional_half_log_det(covariance).view(batch_size, num_classes)
        # A class whose label map is constant in an image (absent, mostly) has zero label covariance, so its value is
        # the constant r²·log(√α + 1e-8) and its gradient exactly zero: only the other pairs are computed.
        dim = self.rmi_radius**2
        constant = dim * math.log(math.sqrt(POSITIVE_DEFINITE_ALPHA) + LOG_EPSILON)
        result = torch.full((batch_size * num_classes,), constant, dtype=torch.float64, device=probs.device)
        informative = (onehot.amax(dim=(1, 2, 3)) > onehot.amin(dim=(1, 2, 3))).nonzero().squeeze(1)
        if 0 < informative.numel() < result.numel():
            onehot, probs = onehot[informative], probs[informative]
            point_weights = None if point_weights is None else point_weights[informative]
        if informative.numel() > 0:
            covariance = _RegionCovariance.apply(onehot, probs, self.rmi_radius, point_weights)
            result = result.index_copy(0, informative, _conditional_half_log_det(covariance))
        return result.view(batch_size, num_classes)
