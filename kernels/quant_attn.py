"""Portable Triton kernel (sm80+) of sagevideo's quantized attention.

INT8 QKᵀ with per-token scales and FP8 e4m3 (sm89+) or 16-bit PV, online softmax in the log2 domain, in the
style of SageAttention2 (Zhang et al. 2024) on the FlashAttention-2 tiling (Dao 2023). The torch reference
computing the same arithmetic is ``sagevideo.reference.quant_attention_from_quantized``; the quantization
layout is produced by ``kernels/quantize.py``.

Features handled in the kernel rather than by copies: tails of Q and KV (masked), head_dim below the padded
width (masked on store), GQA/MQA (KV head = query head // group), a boolean key-padding mask per batch, the
output written straight into the caller's layout (BHSD or BSHD) through strides, and the LSE.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sagevideo.kernels._autotune import pick_fastest
from sagevideo.reference import DEFAULT_BLOCK_N, QuantizedQKV


@triton.jit
def _attn_tile(
    acc, l_i, m_i, q, qs,
    k_ptrs, ks_ptrs, v_ptrs, mask_ptrs,
    start_n, Skv, stride_kn, stride_vn, stride_mn, d_ok,
    BLOCK_N: tl.constexpr, PV_FP8: tl.constexpr, HAS_MASK: tl.constexpr, TAIL: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """One KV tile of the online softmax. ``TAIL`` masks columns past S_kv (only the last tile needs it)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if TAIL:
        n_ok = offs_n < Skv
        k = tl.load(k_ptrs + start_n * stride_kn, mask=n_ok[None, :], other=0)
        ks = tl.load(ks_ptrs + start_n, mask=n_ok, other=0.0)
    else:
        k = tl.load(k_ptrs + start_n * stride_kn)
        ks = tl.load(ks_ptrs + start_n)
    # int32 → fp32 without I2F (a quarter-rate instruction, as slow as exp2): for |x| < 2^22 the bits of
    # x + 0x4B400000 read as a float equal 12582912 + x exactly, and subtracting 12582912 is exact too
    # (Sterbenz). |QKᵀ| ≤ 127²·128 < 2^22 for D ≤ 128. (Folding the constant into the K-scale product would
    # cancel catastrophically, so it is subtracted first.)
    qk = tl.dot(q, k, out_dtype=tl.int32)
    s1 = ((qk + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0) * ks[None, :]
    if HAS_MASK:
        if TAIL:
            keep = tl.load(mask_ptrs + start_n * stride_mn, mask=n_ok, other=0) != 0
        else:
            keep = tl.load(mask_ptrs + start_n * stride_mn) != 0
        s1 = tl.where(keep[None, :], s1, float("-inf"))
    elif TAIL:
        s1 = tl.where(n_ok[None, :], s1, float("-inf"))
    # The row scale qs (> 0, includes scale·log2 e) commutes with the row max, so S = qs ⊙ s1 is never
    # formed: the max is taken on s1 and the exponent argument is one FMA per element.
    m_new = tl.maximum(m_i, tl.max(s1, axis=1) * qs)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    if PV_FP8:
        # P directly in the e4m3 range: exp2(s − m + log2 448) = 448·exp2(s − m); l carries the same factor.
        p = tl.math.exp2(s1 * qs[:, None] + (8.807354922057604 - m_safe)[:, None])
    else:
        p = tl.math.exp2(s1 * qs[:, None] - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if TAIL:
        v = tl.load(v_ptrs + start_n * stride_vn, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        v = tl.load(v_ptrs + start_n * stride_vn)
    else:  # 16-bit V read in place from the caller's tensor, whose head_dim is below BLOCK_D
        v = tl.load(v_ptrs + start_n * stride_vn, mask=d_ok[None, :], other=0.0)
    if PV_FP8:
        # The tile's product goes to a fresh FP32 tile before it is added (two-level accumulation), and
        # max_num_imprecise_acc bounds the MMA's truncated accumulation to this tile.
        pv = tl.dot(p.to(tl.float8e4nv), v, max_num_imprecise_acc=BLOCK_N)
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


@triton.jit
def _natural_lse(m_i, l_i, valid, PV_FP8: tl.constexpr, HAS_LSE_OFF: tl.constexpr, off_ptrs, row_ok):
    """Natural-log LSE of the rows from the log2-domain running max and sum (``l`` carries P's factor 448 in
    FP8 mode), plus the K-smoothing offset when given; −inf for rows that attended to nothing. Shared by the
    dense and the block-sparse kernel."""
    lse = m_i + tl.math.log2(tl.where(valid, l_i, 1.0))
    if PV_FP8:
        lse = lse - 8.807354922057604  # log2(448)
    lse = lse * 0.6931471805599453
    if HAS_LSE_OFF:
        lse = lse + tl.load(off_ptrs, mask=row_ok, other=0.0)
    return tl.where(valid, lse, float("-inf"))


@triton.jit
def _quant_attn_fwd(
    Q, QS, K, KS, V, VS, VM, LSE_OFF, MASK, O, LSE,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    stride_mb, stride_mn,
    H, Sq, Skv, n_full, group,
    D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PV_FP8: tl.constexpr, HAS_MASK: tl.constexpr, SMOOTH_V: tl.constexpr,
    RETURN_LSE: tl.constexpr, HAS_LSE_OFF: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // group
    bhk = b * (H // group) + hk

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Sq
    d_ok = offs_d < D

    q = tl.load(Q + (bh * Sq + offs_m[:, None]) * BLOCK_D + offs_d[None, :], mask=m_ok[:, None], other=0)
    qs = tl.load(QS + bh * Sq + offs_m, mask=m_ok, other=1.0)
    # K is read as a (BLOCK_D, BLOCK_N) tile, i.e. already transposed for QKᵀ.
    k_ptrs = K + (bhk * Skv + offs_n[None, :]) * BLOCK_D + offs_d[:, None]
    ks_ptrs = KS + bhk * Skv + offs_n
    v_ptrs = V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    mask_ptrs = MASK + b * stride_mb + offs_n * stride_mn

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # n_full = the KV length rounded down to whole tiles (computed on the host); the rest is the masked tail.
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attn_tile(
            acc, l_i, m_i, q, qs, k_ptrs, ks_ptrs, v_ptrs, mask_ptrs,
            start_n, Skv, BLOCK_D, stride_vn, stride_mn, d_ok,
            BLOCK_N, PV_FP8, HAS_MASK, False, EVEN_D,
        )
    if n_full < Skv:
        acc, l_i, m_i = _attn_tile(
            acc, l_i, m_i, q, qs, k_ptrs, ks_ptrs, v_ptrs, mask_ptrs,
            n_full, Skv, BLOCK_D, stride_vn, stride_mn, d_ok,
            BLOCK_N, PV_FP8, HAS_MASK, True, EVEN_D,
        )

    valid = l_i > 0.0
    out = acc / tl.where(valid, l_i, 1.0)[:, None]  # for FP8 the 448 of P cancels between acc and l
    if PV_FP8:
        out = out * tl.load(VS + bhk * BLOCK_D + offs_d)[None, :]
    if SMOOTH_V:
        out = out + tl.load(VM + bhk * BLOCK_D + offs_d)[None, :]
    out = tl.where(valid[:, None], out, 0.0)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if RETURN_LSE:
        lse = _natural_lse(m_i, l_i, valid, PV_FP8, HAS_LSE_OFF, LSE_OFF + bh * Sq + offs_m, m_ok)
        tl.store(LSE + b * stride_lb + h * stride_lh + offs_m * stride_ls, lse, mask=m_ok)


# Launch candidates timed on first use. BLOCK_N is also the KV tile the torch reference must walk to reproduce
# the kernel's rounding exactly (``last_config()`` says which one ran). Measured on an H100
# (benchmarks/RESULTS.md): 4 warps with 128-row tiles beat 8 warps by ~45% for int8-fp16 at head_dim 128, and
# int8-fp8 ran at 685 TOPS with 64-row tiles over 128-key tiles against 457 over 64-key tiles.
CANDIDATES = [
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
]
_chosen: dict[tuple, dict] = {}
_last: dict = {}


def default_config(dp: int, pv_fp8: bool, device=None) -> dict:
    """The untimed fallback (and the interpreter's) launch configuration."""
    return dict(BLOCK_M=128 if dp <= 64 else 64, BLOCK_N=DEFAULT_BLOCK_N, num_warps=4, num_stages=2)


def chosen_configs() -> dict:
    """Configurations picked so far, keyed by (device capability, head_dim, mode, masked)."""
    return dict(_chosen)


def last_config() -> dict:
    """The launch configuration of the most recent kernel launch (``BLOCK_N`` is the KV tile to give the torch
    reference, ``reference.quant_attention_ref(..., block_n=...)``, to reproduce its rounding)."""
    return dict(_last)


def _pick_config(qkv: QuantizedQKV, masked: bool, launch) -> dict:
    """Time the candidates once per (GPU, head_dim, mode, masked) on the call's own operands; keep the best."""
    fallback = default_config(qkv.q.shape[-1], qkv.precision == "int8-fp8")
    return pick_fastest(_chosen, (qkv.q.shape[-1], qkv.precision, masked), qkv.q.device, CANDIDATES, fallback,
                        launch, kernel="quant_attn")


def attention_fwd(
    qkv: QuantizedQKV,
    out_bhsd: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    lse_bhs: torch.Tensor | None = None,
    config: dict | None = None,
):
    """Launch the attention kernel over quantized operands; returns Triton's launch handle.

    ``out_bhsd`` is the output to fill, viewed as BHSD with any strides (a transposed view of a BSHD tensor
    makes the kernel write the caller's layout directly); ``lse_bhs`` is an optional fp32 ``(B, H, Sq)`` view.
    """
    b, hq, sq, dp = qkv.q.shape
    hk, skv = qkv.k.shape[1], qkv.k.shape[2]
    pv_fp8 = qkv.precision == "int8-fp8"
    if config is None:
        def launch(cfg):
            return attention_fwd(qkv, out_bhsd, key_padding_mask=key_padding_mask, lse_bhs=lse_bhs, config=cfg)

        config = _pick_config(qkv, key_padding_mask is not None, launch)
    cfg = dict(config)
    _last.clear()
    _last.update(config)
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    v = qkv.v
    if pv_fp8:  # (B, Hk, Dp, S_pad): element (n, d) lives at d * S_pad + n
        svb, svh, svn, svd = v.stride(0), v.stride(1), v.stride(3), v.stride(2)
    else:
        svb, svh, svn, svd = v.stride()
    mask = key_padding_mask
    smb, smn = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)
    lse = lse_bhs
    slb, slh, sls = lse.stride() if lse is not None else (0, 0, 0)
    dummy = qkv.q_scale
    return _quant_attn_fwd[(triton.cdiv(sq, block_m), b * hq)](
        qkv.q, qkv.q_scale, qkv.k, qkv.k_scale, v,
        qkv.v_scale if qkv.v_scale is not None else dummy,
        qkv.v_mean if qkv.v_mean is not None else dummy,
        qkv.lse_offset if qkv.lse_offset is not None else dummy,
        mask.view(torch.uint8) if mask is not None else dummy,
        out_bhsd, lse if lse is not None else dummy,
        svb, svh, svn, svd,
        *out_bhsd.stride(),
        slb, slh, sls,
        smb, smn,
        hq, sq, skv, (skv // block_n) * block_n, hq // hk,
        D=qkv.head_dim, EVEN_D=pv_fp8 or qkv.head_dim == dp, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=dp,
        PV_FP8=pv_fp8, HAS_MASK=mask is not None, SMOOTH_V=qkv.v_mean is not None,
        RETURN_LSE=lse is not None, HAS_LSE_OFF=qkv.lse_offset is not None,
        **cfg,
    )
