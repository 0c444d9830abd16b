"""Plain-torch references for every attention mode of sagevideo.

Two kinds of reference live here:

* :func:`attention_exact` — exact softmax attention computed in float32 or float64, chunked over query
  rows so that no S×S buffer is ever held. It is the ground truth the quantized modes are measured against.
* :func:`quantize_qkv` + :func:`quant_attention_ref` — the *same quantized arithmetic* the Triton kernels
  perform (SageAttention2-style INT8 QKᵀ with smoothed K and FP8 or FP16 PV), written with torch ops. The
  kernel tests compare the kernels against these tightly; on CPU the public op runs them directly.

The quantization layout (shared by the Triton quantization kernels in ``kernels/quantize.py``):

* Q and K are quantized to INT8 with one scale per token (the amax over the head dimension divided by 127),
  rounding half away from zero. Per-token scales cost nothing in the attention kernel: S is dequantized by
  the outer product of the Q and K scale vectors.
* K is smoothed first: its mean over (valid) tokens is subtracted (SageAttention, Zhang et al. 2024). Softmax
  is invariant to adding ``q·m`` to every score of a row, so the output is unchanged; the log-sum-exp is
  corrected by adding ``scale·q·m`` back.
* ``scale·log2(e)`` is folded into the Q scales so that the kernels work in the log2 domain with ``exp2``.
* ``int8-fp8``: V is quantized to FP8 e4m3 with one scale per channel (amax over tokens / 448) and stored
  transposed, ``(B, H, D, S)``, which is the operand layout the FP8 tensor-core MMA wants. P is computed in
  the e4m3 range (P·448, then rounded to e4m3), and PV is accumulated in two levels: each KV tile's product
  into a fresh FP32 tile that is then added to the running accumulator (SageAttention2: the Hopper FP8 MMA
  truncates its accumulator to ~22 bits).
* ``int8-fp16``: V stays in 16 bits (FP16 inputs keep FP16, BF16 and FP32 inputs use BF16); P is rounded to
  that dtype; PV accumulates in FP32.
* ``smooth_v``: V's per-channel mean over valid tokens is subtracted before quantization and added back to
  the normalised output (rows of softmax sum to one).

Everything here works in the ``BHSD`` layout ``(batch, heads, seq, head_dim)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
INT8_MAX = 127.0
FP8_MAX = 448.0
LOG2_FP8_MAX = 8.807354922057604
# Smallest amax used for a scale, so that an all-zero row or channel quantizes to zeros instead of NaN.
AMAX_EPS = 1e-12
# KV tile width of the kernels; the reference walks KV in the same tiles so the online-softmax rounding of
# P (which depends on the running row maximum) is reproduced exactly.
DEFAULT_BLOCK_N = 64

QUANTIZED_PRECISIONS = ("int8-fp8", "int8-fp16")


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def _expand_kv(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """Repeat KV heads for grouped-query attention (``H_q = group · H_kv``)."""
    group = num_q_heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def attention_exact(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention in ``dtype`` (float32 or float64), BHSD layout.

    Returns ``(out, lse)`` with ``out`` in ``dtype`` and ``lse`` (natural log, ``(B, H, S_q)``). Query rows
    are processed in chunks, so memory is ``chunk × S_kv`` per head, never S×S. Rows whose keys are all
    masked get output 0 and LSE −inf.
    """
    scale = default_scale(q.shape[-1]) if scale is None else scale
    kx = _expand_kv(k, q.shape[1]).to(dtype)
    vx = _expand_kv(v, q.shape[1]).to(dtype)
    outs, lses = [], []
    for i in range(0, q.shape[2], chunk):
        s = torch.matmul(q[:, :, i : i + chunk].to(dtype), kx.transpose(-1, -2)) * scale
        if key_padding_mask is not None:
            s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
        outs.append(torch.matmul(p, vx))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


# ----------------------------------------------------------------------------------------------------------
# Quantization (the layout the kernels consume)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class QuantizedQKV:
    """Quantized Q, K, V and their scales, as the attention kernels read them.

    Shapes (``Dp`` = head_dim rounded up to a power of two ≥ 32 in the Triton path; the torch reference
    keeps ``D``):

    * ``q``: int8 ``(B, Hq, Sq, Dp)``; ``q_scale``: fp32 ``(B, Hq, Sq)`` including ``scale·log2(e)``
    * ``k``: int8 ``(B, Hk, Skv, Dp)``; ``k_scale``: fp32 ``(B, Hk, Skv)``
    * ``v``: ``int8-fp8``: float8_e4m3fn, transposed, ``(B, Hk, Dp, Skv_pad)``; ``int8-fp16``: 16-bit
      ``(B, Hk, Skv, D)`` (possibly a strided view of the caller's V when no smoothing is needed)
    * ``v_scale``: fp32 ``(B, Hk, Dp)`` (FP8 only); ``v_mean``: fp32 ``(B, Hk, Dp)`` when ``smooth_v``
    * ``lse_offset``: fp32 ``(B, Hq, Sq)`` = ``scale·q·mean(K)``, to turn the smoothed LSE into the true one
    * ``kv_tail``: zeroed keys that follow ``Skv`` in the buffers under ``k``, ``k_scale`` and (FP8) ``v``
      (``k``/``k_scale`` are then views of longer buffers), so a kernel may read whole tiles past any block
      without masks; 0 by default
    """

    q: torch.Tensor
    q_scale: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor | None
    v_mean: torch.Tensor | None
    lse_offset: torch.Tensor | None
    precision: str
    head_dim: int
    kv_tail: int = 0


def pv_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """16-bit dtype of V and P in ``int8-fp16`` mode: FP16 stays FP16; BF16 and FP32 use BF16 (range-safe)."""
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


def kv_stats(
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    *,
    smooth_v: bool,
    need_v_amax: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-(batch, kv-head) statistics over tokens that the quantization needs.

    Returns ``(k_mean, v_mean, v_amax)`` in fp32, each ``(B, Hk, D)``: the mean of K over valid tokens (the
    smoothing vector), the mean of V over valid tokens (``smooth_v`` only) and the amax over valid tokens of
    ``|V − v_mean|`` (FP8 V only). Masked-out keys never influence a scale. Used by both the reference and
    the Triton path, so the two quantize with identical statistics.
    """
    if key_padding_mask is None:
        k_mean = k.mean(dim=2, dtype=torch.float32)
        v_mean = v.mean(dim=2, dtype=torch.float32) if smooth_v else None
        v_amax = None
        if need_v_amax:
            vmin, vmax = torch.aminmax(v, dim=2)
            if v_mean is None:
                v_amax = torch.maximum(vmax.float().abs(), vmin.float().abs())
            else:
                v_amax = torch.maximum(vmax.float() - v_mean, v_mean - vmin.float())
        return k_mean, v_mean, v_amax

    m = key_padding_mask[:, None, :, None]  # (B, 1, S, 1)
    count = key_padding_mask.sum(dim=1).clamp_min(1).to(torch.float32)[:, None, None]  # (B, 1, 1)
    k_mean = torch.where(m, k, 0).sum(dim=2, dtype=torch.float32) / count
    v_mean = torch.where(m, v, 0).sum(dim=2, dtype=torch.float32) / count if smooth_v else None
    v_amax = None
    if need_v_amax:
        centred = v.float() if v_mean is None else v.float() - v_mean[:, :, None, :]
        v_amax = torch.where(m, centred.abs(), 0).amax(dim=2)
    return k_mean, v_mean, v_amax


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, as the kernels do (add ±0.5, then truncate)."""
    return torch.trunc(x + torch.where(x >= 0, 0.5, -0.5))


def quantize_int8_per_token(
    x: torch.Tensor, mult: float, mean: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 with one scale per token: ``x ≈ x_q · scale / mult``. ``mean`` (B, H, D) is subtracted first."""
    xf = x.float()
    if mean is not None:
        xf = xf - mean[:, :, None, :]
    amax = xf.abs().amax(dim=-1).clamp_min(AMAX_EPS)
    xq = round_half_away(xf * (INT8_MAX / amax)[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return xq, amax * (mult / INT8_MAX)


def quantize_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    precision: str = "int8-fp8",
    key_padding_mask: torch.Tensor | None = None,
    smooth_v: bool = False,
) -> QuantizedQKV:
    """Torch reference of the quantization pass (BHSD inputs); see the module docstring for the layout."""
    if precision not in QUANTIZED_PRECISIONS:
        raise ValueError(f"quantize_qkv: precision must be one of {QUANTIZED_PRECISIONS}, got {precision!r}")
    d = q.shape[-1]
    scale = default_scale(d) if scale is None else scale
    fp8 = precision == "int8-fp8"
    k_mean, v_mean, v_amax = kv_stats(k, v, key_padding_mask, smooth_v=smooth_v, need_v_amax=fp8)
    qq, qs = quantize_int8_per_token(q, scale * LOG2E)
    kq, ks = quantize_int8_per_token(k, 1.0, k_mean)
    lse_offset = scale * torch.einsum("bhsd,bhd->bhs", q.float(), _expand_kv(k_mean, q.shape[1]))
    vf = v.float() if v_mean is None else v.float() - v_mean[:, :, None, :]
    if fp8:
        amax = v_amax.clamp_min(AMAX_EPS)
        vq = (vf * (FP8_MAX / amax)[:, :, None, :]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        vq = vq.transpose(-1, -2)  # (B, Hk, D, Skv), the layout the kernel stores
        v_scale = amax / FP8_MAX
    else:
        vq = vf.to(pv_dtype_for(v.dtype))
        v_scale = None
    return QuantizedQKV(qq, qs, kq, ks, vq, v_scale, v_mean, lse_offset, precision, d)


# ----------------------------------------------------------------------------------------------------------
# Attention over quantized operands, tile by tile like the kernels
# ----------------------------------------------------------------------------------------------------------


def quant_attention_from_quantized(
    qkv: QuantizedQKV,
    *,
    key_padding_mask: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    block_n: int = DEFAULT_BLOCK_N,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over a :class:`QuantizedQKV`, walking KV in tiles of ``block_n`` with an online softmax.

    Reproduces the kernels' arithmetic: S = (q_int8 · k_int8ᵀ) ⊙ (q_scale ⊗ k_scale) in the log2 domain;
    running max m; P = exp2(S − m), computed as 448·P = exp2(S − m + log2 448) for ``int8-fp8`` so it lands
    in the e4m3 range; l accumulates the unrounded P (with the same factor); the PV operand is P rounded to
    e4m3 (``int8-fp8``) or to 16 bits (``int8-fp16``); each tile's PV product is formed on its own and then
    added to the rescaled accumulator. Returns ``(out, lse)`` with ``out`` (B, Hq, Sq, D)
    in ``out_dtype`` and the natural-log ``lse`` (B, Hq, Sq) in fp32.
    """
    sq = qkv.q.shape[2]
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    # one chunk holding every query row: the same matmuls as the kernel-shaped walk over KV tiles
    return quant_attention_masked(
        qkv, lambda i0, i1: mask, out_dtype=out_dtype, block_n=block_n, chunk=max(sq, 1)
    )


def quant_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    precision: str = "int8-fp8",
    key_padding_mask: torch.Tensor | None = None,
    smooth_v: bool = False,
    block_n: int = DEFAULT_BLOCK_N,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized attention in plain torch (BHSD): :func:`quantize_qkv` then the tiled attention.

    Returns ``(out, lse)``: ``out`` in the input dtype, ``lse`` fp32 natural log ``(B, Hq, Sq)``.
    """
    qkv = quantize_qkv(
        q, k, v, scale=scale, precision=precision, key_padding_mask=key_padding_mask, smooth_v=smooth_v
    )
    return quant_attention_from_quantized(
        qkv, key_padding_mask=key_padding_mask, out_dtype=q.dtype, block_n=block_n
    )


# ----------------------------------------------------------------------------------------------------------
# Attention under a general (per query row) token mask, for the block-sparse path (sagevideo/sparse/blocks.py)
# ----------------------------------------------------------------------------------------------------------
# ``token_mask(i0, i1)`` returns the bool mask of query rows ``i0:i1`` against every key, broadcastable to
# ``(B, H, i1 - i0, S_kv)`` (True = attend), or None for "attend to everything". The mask is built one chunk of
# query rows at a time, so these references never hold an S×S buffer either.


def attention_exact_masked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_mask,
    *,
    scale: float | None = None,
    dtype: torch.dtype = torch.float64,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention in ``dtype`` (BHSD, equal head counts) under a per-row token mask.

    Returns ``(out, lse)`` as :func:`attention_exact`; rows with no attended key get output 0 and LSE −inf.
    """
    scale = default_scale(q.shape[-1]) if scale is None else scale
    kx = _expand_kv(k, q.shape[1]).to(dtype)
    vx = _expand_kv(v, q.shape[1]).to(dtype)
    outs, lses = [], []
    for i in range(0, q.shape[2], chunk):
        i1 = min(i + chunk, q.shape[2])
        s = torch.matmul(q[:, :, i:i1].to(dtype), kx.transpose(-1, -2)) * scale
        m = token_mask(i, i1)
        if m is not None:
            s = s.masked_fill(~m, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
        outs.append(torch.matmul(p, vx))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def quant_attention_masked(
    qkv: QuantizedQKV,
    token_mask,
    *,
    out_dtype: torch.dtype = torch.float32,
    block_n: int = DEFAULT_BLOCK_N,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quant_attention_from_quantized` under a per-row token mask (same arithmetic, same KV tiles).

    Query rows are processed ``chunk`` at a time; within a chunk KV is walked in tiles of ``block_n`` in
    sequence order with the online softmax, P rounded to e4m3 (``int8-fp8``, in the 448-scaled range) or to
    16 bits, and each tile's PV product formed on its own before it is added. Returns ``(out, lse)``.
    """
    d = qkv.head_dim
    hq = qkv.q.shape[1]
    k_all = _expand_kv(qkv.k[..., :d], hq).float()
    ks_all = _expand_kv(qkv.k_scale, hq)
    fp8 = qkv.precision == "int8-fp8"
    skv = k_all.shape[2]
    v_all = _expand_kv(qkv.v[:, :, :d, :skv].transpose(-1, -2) if fp8 else qkv.v[..., :d], hq).float()
    shift = LOG2_FP8_MAX if fp8 else 0.0  # P·448 straight from the exponent for the e4m3 operand
    p_dtype = torch.float8_e4m3fn if fp8 else qkv.v.dtype
    outs, lses = [], []
    sq = qkv.q.shape[2]
    if sq == 0:
        b = qkv.q.shape[0]
        return (torch.zeros((b, hq, 0, d), dtype=out_dtype, device=qkv.q.device),
                torch.zeros((b, hq, 0), dtype=torch.float32, device=qkv.q.device))
    for i in range(0, sq, chunk):
        i1 = min(i + chunk, sq)
        q = qkv.q[:, :, i:i1, :d].float()
        qs = qkv.q_scale[:, :, i:i1]
        mask = token_mask(i, i1)
        if mask is not None:
            mask = mask.expand(q.shape[0], hq, i1 - i, skv)
        shape = q.shape[:-1]
        m = torch.full(shape, float("-inf"), dtype=torch.float32, device=q.device)
        l = torch.zeros(shape, dtype=torch.float32, device=q.device)
        acc = torch.zeros((*shape, d), dtype=torch.float32, device=q.device)
        for j in range(0, skv, block_n):
            s1 = torch.matmul(q, k_all[:, :, j : j + block_n].transpose(-1, -2)) * ks_all[:, :, None, j : j + block_n]
            if mask is not None:
                s1 = s1.masked_fill(~mask[..., j : j + block_n], float("-inf"))
            m_new = torch.maximum(m, s1.amax(dim=-1) * qs)
            m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
            alpha = torch.exp2(m - m_safe)
            p = torch.exp2(s1 * qs[..., None] + (shift - m_safe)[..., None])
            l = l * alpha + p.sum(dim=-1)
            acc = acc * alpha[..., None] + torch.matmul(p.to(p_dtype).float(), v_all[:, :, j : j + block_n])
            m = m_new
        valid = l > 0
        out = acc / torch.where(valid, l, 1.0)[..., None]
        if fp8:  # the 448 of P cancels between acc and l
            out = out * _expand_kv(qkv.v_scale[..., :d], hq)[:, :, None, :]
        if qkv.v_mean is not None:
            out = out + _expand_kv(qkv.v_mean[..., :d], hq)[:, :, None, :]
        out = torch.where(valid[..., None], out, 0.0)
        log2_l = torch.log2(torch.where(valid, l, 1.0)) - shift
        lse = torch.where(valid, (m + log2_l) * LN2, float("-inf"))
        if qkv.lse_offset is not None:
            lse = lse + qkv.lse_offset[:, :, i:i1]
        outs.append(out.to(out_dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
