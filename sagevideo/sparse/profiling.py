"""Online per-head profiling: is each (batch, head) spatial, temporal, or neither?

Sparse VideoGen (Xi et al., arXiv 2502.01776) classifies heads at run time from a handful of query rows:
compute their exact attention output against all keys, and again with the spatial and with the temporal mask;
the pattern whose output is closer to the exact one wins. We follow that, with two changes:

* the error is the relative L2 error ``‖O_mask − O‖ / ‖O‖`` over the sampled rows of a (batch, head), and a
  head whose best error is above ``tolerance`` stays dense (SVG always picks one of the two patterns);
* the rows are drawn (seeded) from all video rows, not the first 10,000.

The masks are the *token* patterns of :mod:`sagevideo.sparse.patterns` with the window sizes the runtime uses
(the runtime keeps whole blocks, a superset, so its error is normally lower than the profiled one). Cost per
(batch, head): ``O(samples · S · D)``, never S×S. On CUDA with 16-bit Q/K/V one fused kernel
(``kernels/head_profile.py``) computes the three outputs in one pass over K and V, the masks built from the
grid coordinates on chip. The torch path, its reference, forms a ``samples × S`` fp32 score block per head
(heads in chunks so it stays under ``budget`` elements) and derives the three outputs from one exponential
(:func:`_masked_outputs`).
"""

from __future__ import annotations

import torch

from sagevideo.context import TokenLayout
from sagevideo.sparse.kmeans import use_triton
from sagevideo.reference import default_scale
from sagevideo.sparse.patterns import (
    HEAD_DENSE,
    HEAD_SPATIAL,
    HEAD_TEMPORAL,
    spatial_token_keep,
    temporal_token_keep,
    video_coords,
)

__all__ = ["DEFAULT_SAMPLES", "DEFAULT_TOLERANCE", "sample_rows", "sampled_masks", "profile_heads"]

DEFAULT_SAMPLES = 64  # SVG1 samples 64 query rows (32 for CogVideoX)
DEFAULT_TOLERANCE = 0.5  # ours: relative output error above which a head stays dense (see profile_heads)


def sample_rows(layout: TokenLayout, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n,)`` int64 sequence indices of ``n = min(num_samples, video tokens)`` distinct video rows, sorted."""
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    n = min(int(num_samples), layout.video_len)
    rows = torch.randperm(layout.video_len, generator=generator)[:n]
    return torch.sort(rows).values + layout.video_start


def sampled_masks(layout: TokenLayout, rows: torch.Tensor, width: int, radius: int, device=None):
    """Spatial and temporal token masks ``(n, S)`` bool of the query ``rows`` (sequence indices of video rows)
    against every key; text keys are always kept (text stays dense)."""
    s = layout.seq_len
    rows = rows.to(device)
    vq = rows - layout.video_start
    tq, hq, wq = (c[:, None] for c in video_coords(layout.grid, vq))
    keys = torch.arange(layout.video_len, device=device)
    tk, hk, wk = (c[None, :] for c in video_coords(layout.grid, keys))
    spatial = torch.ones(rows.shape[0], s, dtype=torch.bool, device=device)
    temporal = torch.ones_like(spatial)
    spatial[:, layout.video_slice] = spatial_token_keep(tq, tk, width)
    temporal[:, layout.video_slice] = temporal_token_keep(hq, wq, hk, wk, radius)
    return spatial, temporal


_BMM_OUT_DTYPE: bool | None = None


def _bmm_out_dtype_works(device: torch.device) -> bool:
    global _BMM_OUT_DTYPE
    if _BMM_OUT_DTYPE is None:
        try:
            a = torch.ones(1, 2, 2, dtype=torch.bfloat16, device=device)
            _BMM_OUT_DTYPE = bool(torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _BMM_OUT_DTYPE = False
    return _BMM_OUT_DTYPE


def bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 3-D ``a``/``b``, in fp32: two 16-bit CUDA operands of one dtype are multiplied as they are
    (exact products, fp32 accumulation: what an fp32 product of the same values gives, up to summation order,
    without fp32 copies and on the tensor cores; ``torch.bmm(..., out_dtype=torch.float32)``); anything else is
    upcast to fp32 first."""
    if (a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)
            and _bmm_out_dtype_works(a.device)):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def _masked_outputs(scores, masks, v):
    """``[softmax(scores masked by m) @ v for m in masks]``, every mask (broadcast against ``scores``) a subset
    of the first; rows with nothing left give 0.

    One exponential serves every mask: the scores shifted by the row max under the first (widest) mask. A
    subset's softmax is the same up to that constant, so each output is its masked weights' weighted mean.
    (Where a subset only keeps keys more than ~87 below that max, its fp32 weights underflow to 0 and its
    output is 0; such a mask keeps a fraction below e⁻⁸⁷ of the attention, and an output of 0 has the same
    relative error, 1, as the exact one.) For 16-bit CUDA ``v`` the weights are rounded to ``v``'s dtype once
    (relative 2⁻⁹ per weight), multiplied with fp32 accumulation, and each output is divided by the sum of its
    rounded weights. Each mask then costs one masked copy of the weights and their product with ``v``, where
    a softmax per mask took about ten passes over the fp32 scores."""
    shifted = scores.masked_fill(~masks[0], float("-inf"))
    top = shifted.amax(dim=-1, keepdim=True)
    p = torch.exp(shifted.sub_(torch.where(torch.isinf(top), 0.0, top)))
    del shifted
    sixteen = _sixteen_bit_cuda(v)
    if sixteen:
        p = p.to(v.dtype)
    outs = []
    for i, mask in enumerate(masks):
        pm = p if i == 0 else p.masked_fill(~mask, 0.0)
        if sixteen:
            num = bmm_f32(pm.flatten(0, 1), v.flatten(0, 1)).unflatten(0, pm.shape[:2])
        else:
            num = torch.matmul(pm, v)
        den = pm.sum(dim=-1, keepdim=True, dtype=torch.float32)
        outs.append(num / den.clamp_min(1e-30))
    return outs


def _sixteen_bit_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)


def profile_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    *,
    width: int,
    radius: int,
    num_samples: int = DEFAULT_SAMPLES,
    tolerance: float = DEFAULT_TOLERANCE,
    generator: torch.Generator | None = None,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    tensor_layout: str = "BHSD",
    budget: int = 1 << 25,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classify every (batch, head) as dense (0), spatial (1) or temporal (2).

    Args:
        q, k, v: in ``tensor_layout`` (``"BHSD"`` or ``"BSHD"``); q heads a multiple of k/v heads (GQA).
        layout: the sequence's :class:`TokenLayout` (grid, text position).
        width, radius: spatial band (± frames) and temporal neighbourhood radius (positions) of the masks.
        num_samples: query rows sampled from the video rows (default 64, as SVG1).
        tolerance: a head whose best relative error exceeds it is dense. The default 0.5 is ours (SVG1 has no
            dense fallback): it only catches heads where both patterns lose half of the output.
        generator: CPU generator for the row sample (a fixed seed 0 when None).
        scale: softmax scale (``1/sqrt(D)`` when None).
        key_padding_mask: optional bool ``(B, S)``, True = key takes part.
        budget: most fp32 score elements held at once by the torch path (heads are chunked to stay under it).
        backend: ``"auto"`` (default) the fused kernel ``kernels/head_profile.py`` (one pass over K and V, the
            three outputs at once) for 16-bit CUDA Q/K/V of one dtype, the torch path otherwise; ``"torch"``
            always torch (:func:`_masked_outputs` on an explicit score block, the kernel's reference);
            ``"triton"`` always the kernel (16-bit inputs on CUDA, or on the CPU under ``TRITON_INTERPRET=1``).

    Returns:
        ``(classes, errors)``: int64 ``(B, H)`` and fp32 ``(B, H, 2)`` (relative L2 error of the spatial and
        the temporal mask on the sampled rows).
    """
    if tensor_layout == "BSHD":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    elif tensor_layout != "BHSD":
        raise ValueError(f"tensor_layout must be 'BHSD' or 'BSHD', got {tensor_layout!r}")
    b, hq, s, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    scale = default_scale(d) if scale is None else scale
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    rows = sample_rows(layout, num_samples, generator).to(q.device)
    n = rows.shape[0]
    errors = torch.empty(b, hq, 2, dtype=torch.float32, device=q.device)
    if use_triton(backend, q, fits=q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype,
                  where="profile_heads", takes="q, k, v of one 16-bit dtype"):
        from sagevideo.kernels.head_profile import pattern_outputs

        coords = torch.stack(video_coords(layout.grid, rows - layout.video_start)).repeat(1, g)  # (3, g·n)
        qs = q[:, :, rows].reshape(b, hk, g * n, d)  # the sampled rows of the g query heads of each K/V head
        ref, *outs = pattern_outputs(qs, k, v, coords, grid=layout.grid, video_start=layout.video_start,
                                     width=width, radius=radius, scale=scale, key_padding_mask=key_padding_mask)
        _relative_errors(ref, outs, errors, 0, hk, g, n, d)
        return _classify(errors, tolerance)
    spatial, temporal = sampled_masks(layout, rows, width, radius, q.device)
    kpm = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    chunk = max(1, budget // max(1, b * g * n * s))
    for h0 in range(0, hk, chunk):
        h1 = min(hk, h0 + chunk)
        if _sixteen_bit_cuda(q) and q.dtype == k.dtype == v.dtype:
            # 16-bit operands as they are, fp32 scores (exact products, fp32 accumulation): what the fp32 path
            # computes, without fp32 copies of K and V and on the tensor cores (4 fp32 matmuls were 3.7 ms at
            # the Wan2.1-1.3B 480p shape on an H100)
            qs = q[:, h0 * g : h1 * g, rows].reshape(b, h1 - h0, g * n, d)
            kc, vc = k[:, h0:h1], v[:, h0:h1]
            scores = bmm_f32(qs.flatten(0, 1), kc.flatten(0, 1).transpose(-1, -2)).unflatten(0, (b, h1 - h0))
            scores = scores * scale  # (b, hc, g·n, s)
        else:
            qs = q[:, h0 * g : h1 * g, rows].float().reshape(b, h1 - h0, g * n, d)
            kc = k[:, h0:h1].float()
            vc = v[:, h0:h1].float()
            scores = torch.matmul(qs, kc.transpose(-1, -2)) * scale  # (b, hc, g·n, s)
        full_mask = torch.ones(1, 1, 1, s, dtype=torch.bool, device=q.device)
        if kpm is not None:
            full_mask = full_mask & kpm
        masks = [full_mask] + [mask.repeat(g, 1)[None, None] & full_mask for mask in (spatial, temporal)]
        ref, *outs = _masked_outputs(scores, masks, vc)
        del scores
        _relative_errors(ref, outs, errors, h0, h1, g, n, d)
    return _classify(errors, tolerance)


def _relative_errors(ref, outs, errors, h0, h1, g, n, d):
    """``errors[:, h0·g : h1·g, i]`` = ``‖outs[i] − ref‖ / ‖ref‖`` over the sampled rows of each query head;
    ``ref``/``outs`` ``(B, h1 − h0, g·n, D)`` (the rows of the ``g`` query heads of each K/V head)."""
    b = ref.shape[0]
    norm = ref.reshape(b, h1 - h0, g, n * d).norm(dim=-1).clamp_min(1e-30)
    for i, out in enumerate(outs):
        err = (out - ref).reshape(b, h1 - h0, g, n * d).norm(dim=-1) / norm
        errors[:, h0 * g : h1 * g, i] = err.reshape(b, (h1 - h0) * g)


def _classify(errors, tolerance):
    errors = torch.nan_to_num(errors, nan=float("inf"))
    best_err, best = errors.min(dim=-1)
    classes = torch.where(best == 0, HEAD_SPATIAL, HEAD_TEMPORAL)
    classes = torch.where(best_err <= tolerance, classes, HEAD_DENSE).to(torch.int64)
    return classes, errors
