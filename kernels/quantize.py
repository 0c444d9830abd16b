"""Triton quantization pass for sagevideo's quantized attention.

Computes exactly the layout documented in ``sagevideo/reference.py`` (``quantize_qkv`` is its torch
reference): per-token INT8 Q and K (K smoothed by its mean over valid tokens, ``scale·log2(e)`` folded into
the Q scales), and V either in FP8 e4m3 with per-channel scales stored transposed ``(B, H, Dp, S)`` or left in
16 bits. Inputs are read through their strides, so non-contiguous views and storage offsets need no copy;
the inputs are never written.

Optionally the pass reads its rows through a per-(batch, head) gather index (``q_gather`` / ``kv_gather``):
quantized row ``s`` is input row ``index[b, h, s]``. The block-sparse path (``kernels/block_sparse_attn.py``)
uses it to quantize straight into a token permutation's order, so the permuted copy is this pass's output
and costs no extra memory pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sagevideo.reference import (
    AMAX_EPS,
    FP8_MAX,
    LOG2E,
    QuantizedQKV,
    default_scale,
    kv_stats,
    pv_dtype_for,
)


_EPS = tl.constexpr(AMAX_EPS)


@triton.jit
def _quant_int8_rows(
    X, MEAN, OUT, SCALE, KM, LSE_OFF, IDX,
    stride_xb, stride_xh, stride_xs, stride_xd,
    H, S, D, group, mult, lse_mult, S_ALLOC,
    HAS_MEAN: tl.constexpr, HAS_KM: tl.constexpr, HAS_IDX: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program quantizes BLOCK_S tokens of one (batch, head) to INT8 with a scale per token.

    ``OUT`` is a contiguous ``(B, H, S_ALLOC, BLOCK_D)`` buffer and ``SCALE`` ``(B, H, S_ALLOC)``, of which
    the first ``S`` rows per (batch, head) are written (channels past D as zeros). With ``HAS_KM`` the
    program also writes ``lse_mult · x·km`` per token (the LSE correction of K smoothing) from the fp32 row.
    With ``HAS_IDX`` output row ``s`` is input row ``IDX[b, h, s]`` (IDX contiguous int32 ``(B, H, S)``).
    """
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_s < S
    col_ok = offs_d < D
    if HAS_IDX:
        src = tl.load(IDX + bh * S + offs_s, mask=row_ok, other=0)
    else:
        src = offs_s
    ptrs = X + b * stride_xb + h * stride_xh + src[:, None] * stride_xs + offs_d[None, :] * stride_xd
    x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if HAS_KM:
        km = tl.load(KM + (b * (H // group) + h // group) * D + offs_d, mask=col_ok, other=0.0)
        tl.store(LSE_OFF + bh * S + offs_s, tl.sum(x * km[None, :], axis=1) * lse_mult, mask=row_ok)
    if HAS_MEAN:
        mean = tl.load(MEAN + bh * D + offs_d, mask=col_ok, other=0.0)
        x = tl.where(col_ok[None, :], x - mean[None, :], 0.0)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), _EPS)
    xs = x * tl.math.div_rn(tl.full([BLOCK_S], 127.0, tl.float32), amax)[:, None]
    xq = tl.where(xs >= 0, xs + 0.5, xs - 0.5)  # the cast truncates: round half away from zero
    xq = tl.minimum(tl.maximum(xq, -127.0), 127.0).to(tl.int8)
    out_ptrs = OUT + (bh * S_ALLOC + offs_s[:, None]) * BLOCK_D + offs_d[None, :]
    tl.store(out_ptrs, xq, mask=row_ok[:, None])
    tl.store(SCALE + bh * S_ALLOC + offs_s, amax * (mult / 127.0), mask=row_ok)


@triton.jit
def _quant_v_fp8_t(
    X, MEAN, INV, OUT, IDX,
    stride_xb, stride_xh, stride_xs, stride_xd,
    H, S, S_PAD, D,
    HAS_MEAN: tl.constexpr, HAS_IDX: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """V → FP8 e4m3 with per-channel scales, written transposed into ``(B, H, BLOCK_D, S_PAD)``.

    With ``HAS_IDX`` output column ``s`` is input row ``IDX[b, h, s]`` (as in ``_quant_int8_rows``)."""
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_s < S
    col_ok = offs_d < D
    if HAS_IDX:
        src = tl.load(IDX + bh * S + offs_s, mask=row_ok, other=0)
    else:
        src = offs_s
    ptrs = X + b * stride_xb + h * stride_xh + src[:, None] * stride_xs + offs_d[None, :] * stride_xd
    x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if HAS_MEAN:
        x = x - tl.load(MEAN + bh * D + offs_d, mask=col_ok, other=0.0)[None, :]
    inv = tl.load(INV + bh * D + offs_d, mask=col_ok, other=0.0)
    x = tl.minimum(tl.maximum(x * inv[None, :], -448.0), 448.0)
    out_ptrs = OUT + (bh * BLOCK_D + offs_d[None, :]) * S_PAD + offs_s[:, None]
    tl.store(out_ptrs, x.to(tl.float8e4nv), mask=row_ok[:, None])


def padded_head_dim(d: int) -> int:
    """Head dim the kernels work at: the next power of two, at least 16 (tensor-core K granularity)."""
    return max(16, triton.next_power_of_2(d))


def _rows_block(dp: int) -> int:
    return max(16, 8192 // dp)


def quantize_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    precision: str = "int8-fp8",
    key_padding_mask: torch.Tensor | None = None,
    smooth_v: bool = False,
    need_lse: bool = False,
    q_gather: torch.Tensor | None = None,
    kv_gather: torch.Tensor | None = None,
    kv_tail: int = 0,
) -> QuantizedQKV:
    """Quantization pass on the GPU (BHSD views, any strides). Same layout as the torch reference.

    ``need_lse=False`` skips the LSE correction term (it is only needed when the caller asks for LSE).

    ``q_gather`` (``(B, Hq, Sq)``) / ``kv_gather`` (``(B, Hk, Skv)``), integer, optional: row-gather indices.
    Quantized row ``s`` of Q (of K and V) is then input row ``q_gather[b, h, s]`` (``kv_gather[b, h, s]``):
    the result is the quantization of the gathered (e.g. token-permuted) sequence, read in one pass with no
    intermediate copy (16-bit V in ``int8-fp16`` mode is gathered with one torch copy). The statistics (K's
    mean, V's mean and amax) are taken over all valid tokens, which a permutation does not change;
    ``key_padding_mask`` stays in the input (un-gathered) order. An index must hold a permutation of
    ``0..S-1`` per (batch, head) for that to be the permuted sequence; values are not checked here. With
    both None (the default) the pass is exactly the ungathered one.

    ``kv_tail`` (``int8-fp8`` only; ignored otherwise): the K, K-scale and Vᵀ buffers get that many zeroed
    keys after ``Skv`` (``k``/``k_scale`` become views of them, ``QuantizedQKV.kv_tail`` records it), so the
    block-sparse kernel can read whole KV tiles past any block start without masks.
    """
    b, hq, sq, d = q.shape
    hk, skv = k.shape[1], k.shape[2]
    dp = padded_head_dim(d)
    scale = default_scale(d) if scale is None else scale
    fp8 = precision == "int8-fp8"
    k_mean, v_mean, v_amax = kv_stats(k, v, key_padding_mask, smooth_v=smooth_v, need_v_amax=fp8)
    k_mean = k_mean.contiguous()
    dev = q.device
    bs = _rows_block(dp)
    q_idx = None if q_gather is None else q_gather.to(device=dev, dtype=torch.int32).contiguous()
    kv_idx = None if kv_gather is None else kv_gather.to(device=dev, dtype=torch.int32).contiguous()
    if q_idx is not None and tuple(q_idx.shape) != (b, hq, sq):
        raise ValueError(f"quantize_qkv: q_gather must have shape {(b, hq, sq)}, got {tuple(q_idx.shape)}")
    if kv_idx is not None and tuple(kv_idx.shape) != (b, hk, skv):
        raise ValueError(f"quantize_qkv: kv_gather must have shape {(b, hk, skv)}, got {tuple(kv_idx.shape)}")

    q8 = torch.empty((b, hq, sq, dp), dtype=torch.int8, device=dev)
    qs = torch.empty((b, hq, sq), dtype=torch.float32, device=dev)
    lse_off = torch.empty((b, hq, sq), dtype=torch.float32, device=dev) if need_lse else qs
    _quant_int8_rows[(triton.cdiv(sq, bs), b * hq)](
        q, k_mean, q8, qs, k_mean, lse_off, q_idx if q_idx is not None else qs,
        *q.stride(), hq, sq, d, hq // hk, scale * LOG2E, scale, sq,
        HAS_MEAN=False, HAS_KM=need_lse, HAS_IDX=q_idx is not None, BLOCK_S=bs, BLOCK_D=dp,
    )
    tail = int(kv_tail) if fp8 else 0
    if tail < 0:
        raise ValueError(f"quantize_qkv: kv_tail must be >= 0, got {kv_tail}")
    if tail:
        k8 = torch.zeros((b, hk, skv + tail, dp), dtype=torch.int8, device=dev)[:, :, :skv]
        ks = torch.zeros((b, hk, skv + tail), dtype=torch.float32, device=dev)[:, :, :skv]
    else:
        k8 = torch.empty((b, hk, skv, dp), dtype=torch.int8, device=dev)
        ks = torch.empty((b, hk, skv), dtype=torch.float32, device=dev)
    _quant_int8_rows[(triton.cdiv(skv, bs), b * hk)](
        k, k_mean, k8, ks, k_mean, ks, kv_idx if kv_idx is not None else ks,
        *k.stride(), hk, skv, d, 1, 1.0, 1.0, skv + tail,
        HAS_MEAN=True, HAS_KM=False, HAS_IDX=kv_idx is not None, BLOCK_S=bs, BLOCK_D=dp,
    )
    vm = None if v_mean is None else torch.nn.functional.pad(v_mean, (0, dp - d)).contiguous()
    if fp8:
        amax = v_amax.clamp_min(AMAX_EPS)
        inv = (FP8_MAX / amax).contiguous()
        s_pad = triton.cdiv(skv + tail, 16) * 16  # 16-byte aligned rows of Vᵀ
        if tail:  # finite zeros past S_kv: the unmasked tiles multiply them by P = 0
            v8 = torch.zeros((b, hk, dp, s_pad), dtype=torch.float8_e4m3fn, device=dev)
        else:
            v8 = torch.empty((b, hk, dp, s_pad), dtype=torch.float8_e4m3fn, device=dev)
        # Channels past D are written as zeros; columns past S_kv are never read (the kernel masks them).
        _quant_v_fp8_t[(triton.cdiv(skv, bs), b * hk)](
            v, v_mean if v_mean is not None else inv, inv, v8, kv_idx if kv_idx is not None else inv,
            *v.stride(), hk, skv, s_pad, d,
            HAS_MEAN=v_mean is not None, HAS_IDX=kv_idx is not None, BLOCK_S=bs, BLOCK_D=dp,
        )
        v_scale = torch.nn.functional.pad(amax / FP8_MAX, (0, dp - d)).contiguous()
    else:
        pv_dtype = pv_dtype_for(v.dtype)
        if kv_idx is not None:  # one gathered copy (the permuted V the attention kernel reads)
            v = v.gather(2, kv_idx.long()[..., None].expand(b, hk, skv, d))
        if v_mean is not None:
            vq = (v.float() - v_mean[:, :, None, :]).to(pv_dtype)
        else:
            vq = v if v.dtype == pv_dtype else v.to(pv_dtype)  # no copy for FP16/BF16 inputs
        v8, v_scale = vq, None
    return QuantizedQKV(q8, qs, k8, ks, v8, v_scale, vm, lse_off if need_lse else None, precision, d, tail)
