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

Two implementations of the same pass, selected by ``quantize_qkv(..., fused=...)``:

* ``fused=True`` (the default): the statistics over tokens (K's mean, V's mean
  and amax, what ``reference.kv_stats`` computes) come from :func:`_kv_stats_partial` — one read of K and V, tokens split
  over programs, per-program partial sums / minima / maxima — and :func:`_kv_stats_final`, a tiny launch
  that combines the partials per (batch, kv-head) and also derives V's FP8 scale and its inverse. Then one
  launch, :func:`_quant_qkv_fused`, quantizes Q, K and (FP8) V together: its 1-D grid is the Q row blocks,
  then the K row blocks, then the V row blocks (V stored transposed, one byte per element, by
  :func:`_fp8_t_tile`). Three launches in all, no torch ops in between. An earlier version packed four
  tokens of V into each 32-bit word of the transposing store; on an H100 (Triton 3.6) that store left
  words unwritten when V was an unaligned strided view, so it was removed (``benchmarks/RESULTS.md``).
* ``fused=False``: ``reference.kv_stats`` (torch reductions), then one launch for Q, one for K and one for V,
  with small torch ops in between (the pass as it was before the fused one; kept as the reference the fused
  launch is tested against bit for bit, given the same statistics).

Both run the same per-tile code (:func:`_int8_tile` for Q and K, :func:`_fp8_t_tile` for V, in both), so
with equal statistics their outputs are bit for bit equal; the statistics themselves differ only in the
order of fp32 sums (and the last rounding of a mean: torch on CUDA multiplies by 1/n, the kernel divides).
"""

from __future__ import annotations

import functools

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

# Rows of the statistics buffer (``(_N_STATS, B, Hk, Dp)`` fp32, channels past D zero) the fused pass uses.
_K_MEAN, _V_MEAN, _V_AMAX, _V_SCALE, _V_INV = range(5)
_N_STATS = 5
# Per-program partials of the statistics kernel: sum K, sum V, min V, max V (each Dp wide).
_N_PARTS = 4


# ----------------------------------------------------------------------------------------------------------
# Per-tile quantization (shared by the three-launch and the fused pass)
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _int8_tile(
    X, MEAN, KM, OUT, SCALE, LSE_OFF, IDX,
    stride_xb, stride_xh, stride_xs, stride_xd,
    b, h, bh, stat_off, blk, S, D, mult, lse_mult, S_ALLOC,
    HAS_MEAN: tl.constexpr, HAS_KM: tl.constexpr, HAS_IDX: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows ``blk·BLOCK_S …`` of head ``(b, h)`` (flat index ``bh``) to INT8 with a scale per token.

    ``OUT`` is a contiguous ``(B, H, S_ALLOC, BLOCK_D)`` buffer and ``SCALE`` ``(B, H, S_ALLOC)``, of which
    the first ``S`` rows per (batch, head) are written (channels past D as zeros). ``MEAN`` (with
    ``HAS_MEAN``, subtracted first) and ``KM`` (with ``HAS_KM``: ``lse_mult · x·km`` per token, the LSE
    correction of K smoothing, from the fp32 row, into ``LSE_OFF`` ``(B, H, S)``) are read at
    ``stat_off + d``. With ``HAS_IDX`` output row ``s`` is input row ``IDX[b, h, s]`` (IDX contiguous int32
    ``(B, H, S)``).
    """
    offs_s = blk * BLOCK_S + tl.arange(0, BLOCK_S)
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
        km = tl.load(KM + stat_off + offs_d, mask=col_ok, other=0.0)
        tl.store(LSE_OFF + bh * S + offs_s, tl.sum(x * km[None, :], axis=1) * lse_mult, mask=row_ok)
    if HAS_MEAN:
        mean = tl.load(MEAN + stat_off + offs_d, mask=col_ok, other=0.0)
        x = tl.where(col_ok[None, :], x - mean[None, :], 0.0)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), _EPS)
    xs = x * tl.math.div_rn(tl.full([BLOCK_S], 127.0, tl.float32), amax)[:, None]
    xq = tl.where(xs >= 0, xs + 0.5, xs - 0.5)  # the cast truncates: round half away from zero
    xq = tl.minimum(tl.maximum(xq, -127.0), 127.0).to(tl.int8)
    out_ptrs = OUT + (bh * S_ALLOC + offs_s[:, None]) * BLOCK_D + offs_d[None, :]
    tl.store(out_ptrs, xq, mask=row_ok[:, None])
    tl.store(SCALE + bh * S_ALLOC + offs_s, amax * (mult / 127.0), mask=row_ok)


@triton.jit
def _fp8_t_tile(
    X, MEAN, INV, OUT, IDX,
    stride_xb, stride_xh, stride_xs, stride_xd,
    b, h, bh, stat_off, blk, S, S_PAD, D,
    HAS_MEAN: tl.constexpr, HAS_IDX: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows ``blk·BLOCK_S …`` of V head ``(b, h)`` → FP8 e4m3 with per-channel scales (``INV`` = 448 / amax
    and, with ``HAS_MEAN``, ``MEAN``, both read at ``stat_off + d``), written transposed into
    ``(B, H, BLOCK_D, S_PAD)``. With ``HAS_IDX`` output column ``s`` is input row ``IDX[b, h, s]``. Columns
    from ``S`` up to ``S_PAD`` that the tile covers are written as zeros, so no uninitialised byte (an FP8 NaN
    is possible) is left in the padding of a buffer made with ``torch.empty``."""
    offs_s = blk * BLOCK_S + tl.arange(0, BLOCK_S)
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
        x = x - tl.load(MEAN + stat_off + offs_d, mask=col_ok, other=0.0)[None, :]
    inv = tl.load(INV + stat_off + offs_d, mask=col_ok, other=0.0)
    x = tl.minimum(tl.maximum(x * inv[None, :], -448.0), 448.0)
    x = tl.where(row_ok[:, None], x, 0.0)
    out_ptrs = OUT + (bh * BLOCK_D + offs_d[None, :]) * S_PAD + offs_s[:, None]
    tl.store(out_ptrs, x.to(tl.float8e4nv), mask=(offs_s < S_PAD)[:, None])


# ----------------------------------------------------------------------------------------------------------
# Three-launch pass (fused=False)
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _quant_int8_rows(
    X, MEAN, OUT, SCALE, KM, LSE_OFF, IDX,
    stride_xb, stride_xh, stride_xs, stride_xd,
    H, S, D, group, mult, lse_mult, S_ALLOC,
    HAS_MEAN: tl.constexpr, HAS_KM: tl.constexpr, HAS_IDX: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program quantizes BLOCK_S tokens of one (batch, head) to INT8 (see :func:`_int8_tile`).

    ``MEAN`` is ``(B, H, D)`` and ``KM`` ``(B, H // group, D)``, both contiguous."""
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    if HAS_KM:
        stat_off = (b * (H // group) + h // group) * D
    else:
        stat_off = bh * D
    _int8_tile(
        X, MEAN, KM, OUT, SCALE, LSE_OFF, IDX, stride_xb, stride_xh, stride_xs, stride_xd,
        b, h, bh, stat_off, pid_s, S, D, mult, lse_mult, S_ALLOC,
        HAS_MEAN, HAS_KM, HAS_IDX, BLOCK_S, BLOCK_D,
    )


@triton.jit
def _quant_v_fp8_t(
    X, MEAN, INV, OUT, IDX,
    stride_xb, stride_xh, stride_xs, stride_xd,
    H, S, S_PAD, D,
    HAS_MEAN: tl.constexpr, HAS_IDX: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """V → FP8 e4m3, transposed (see :func:`_fp8_t_tile`); ``MEAN`` and ``INV`` contiguous ``(B, H, D)``."""
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    _fp8_t_tile(
        X, MEAN, INV, OUT, IDX, stride_xb, stride_xh, stride_xs, stride_xd,
        bh // H, bh % H, bh, bh * D, pid_s, S, S_PAD, D,
        HAS_MEAN, HAS_IDX, BLOCK_S, BLOCK_D,
    )


# ----------------------------------------------------------------------------------------------------------
# Fused pass (fused=True): statistics kernel, its combine step, one quantization launch for Q, K and V
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _kv_stats_partial(
    K, V, MASK, PART, CNT,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_ms,
    H, S, D, TILES, N_SPLIT,
    HAS_MASK: tl.constexpr, V_SUM: tl.constexpr, V_MINMAX: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial statistics of tokens ``[split·TILES·BLOCK_S, (split+1)·TILES·BLOCK_S)`` of one (batch, kv-head).

    Grid ``(N_SPLIT, B·H)``. Reads each K (and, when needed, V) element of its tokens once, accumulating in
    ``BLOCK_S × BLOCK_D`` fp32 registers (no cross-thread work in the loop; the next tile's loads are issued
    before the current tile is accumulated); reduces over the rows once at the end and writes
    ``PART[bh, split] = (Σk, Σv, min v, max v)`` (``(B·H, N_SPLIT, 4, BLOCK_D)`` fp32).
    Tokens with ``MASK[b, s] == 0`` (uint8 view of the bool key-padding mask) are left out; with
    ``HAS_MASK`` the number of kept tokens goes to ``CNT[bh, split]`` (int32). Unused partials (V's when
    not ``V_SUM`` / ``V_MINMAX``) are not written.
    """
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_d < D
    k_row = K + b * stride_kb + h * stride_kh + offs_d[None, :] * stride_kd
    v_row = V + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd
    k_acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    v_acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    v_lo = tl.full([BLOCK_S, BLOCK_D], float("inf"), tl.float32)
    v_hi = tl.full([BLOCK_S, BLOCK_D], float("-inf"), tl.float32)
    kept = tl.zeros([BLOCK_S], dtype=tl.int32)
    offs_t = split * TILES * BLOCK_S + tl.arange(0, BLOCK_S)
    s_end = tl.minimum((split + 1) * TILES * BLOCK_S, S)  # end of this program's tokens
    # Tile t+1 is loaded (into registers) before tile t is accumulated, so each program keeps two tiles
    # of loads in flight; the load past the program's last tile is fully masked (no memory traffic).
    ok_nx = offs_t < s_end
    if HAS_MASK:
        ok_nx = ok_nx & (tl.load(MASK + b * stride_mb + offs_t * stride_ms, mask=ok_nx, other=0) != 0)
    k_nx = tl.load(k_row + offs_t[:, None] * stride_ks, mask=ok_nx[:, None] & col_ok[None, :], other=0.0)
    v_nx = k_nx
    if V_SUM or V_MINMAX:
        v_nx = tl.load(v_row + offs_t[:, None] * stride_vs, mask=ok_nx[:, None] & col_ok[None, :], other=0.0)
    for t in range(0, TILES):
        ok, k, v = ok_nx, k_nx, v_nx
        offs_t += BLOCK_S
        ok_nx = offs_t < s_end
        if HAS_MASK:
            ok_nx = ok_nx & (tl.load(MASK + b * stride_mb + offs_t * stride_ms, mask=ok_nx, other=0) != 0)
        k_nx = tl.load(k_row + offs_t[:, None] * stride_ks, mask=ok_nx[:, None] & col_ok[None, :], other=0.0)
        if V_SUM or V_MINMAX:
            v_nx = tl.load(v_row + offs_t[:, None] * stride_vs, mask=ok_nx[:, None] & col_ok[None, :], other=0.0)
        if HAS_MASK:
            kept += ok.to(tl.int32)
        k_acc += k.to(tl.float32)
        if V_SUM or V_MINMAX:
            vf = v.to(tl.float32)
            if V_SUM:
                v_acc += vf
            if V_MINMAX:
                v_lo = tl.minimum(v_lo, tl.where(ok[:, None], vf, float("inf")))
                v_hi = tl.maximum(v_hi, tl.where(ok[:, None], vf, float("-inf")))
    out = PART + (bh * N_SPLIT + split) * (4 * BLOCK_D) + offs_d
    tl.store(out, tl.sum(k_acc, axis=0))
    if V_SUM:
        tl.store(out + BLOCK_D, tl.sum(v_acc, axis=0))
    if V_MINMAX:
        tl.store(out + 2 * BLOCK_D, tl.min(v_lo, axis=0))
        tl.store(out + 3 * BLOCK_D, tl.max(v_hi, axis=0))
    if HAS_MASK:
        tl.store(CNT + bh * N_SPLIT + split, tl.sum(kept, axis=0))


@triton.jit
def _kv_stats_final(
    PART, CNT, STATS, n_all, D, N_SPLIT, STAT_ROW,
    HAS_MASK: tl.constexpr, V_SUM: tl.constexpr, V_MINMAX: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Combine the partials of one (batch, kv-head) (grid ``(B·H,)``) into ``STATS`` ``(5, B, H, BLOCK_D)``:

    * row 0: K's mean over kept tokens, ``Σk / count`` (``count`` = kept tokens, at least 1; ``n_all``,
      the token count as a float, without a mask), as ``reference.kv_stats``;
    * row 1 (``V_SUM``): V's mean likewise;
    * row 2 (``V_MINMAX``): ``amax |v − v_mean|`` (``|v|`` without ``V_SUM``) over kept tokens, as
      ``max(max v − mean, mean − min v, 0)`` — equal to the elementwise amax because fp32 subtraction is
      monotonic (0 for a head with no kept token);
    * rows 3, 4 (``V_MINMAX``): V's FP8 scale ``max(amax, eps) / 448`` and the factor the quantization uses,
      ``(1 / max(amax, eps)) · 448`` (how torch evaluates ``448 / amax``).

    Channels past D are written as zeros; rows that are not computed are not written.
    """
    bh = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_d < D
    k_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    v_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    v_lo = tl.full([BLOCK_D], float("inf"), tl.float32)
    v_hi = tl.full([BLOCK_D], float("-inf"), tl.float32)
    kept = tl.full([], 0, tl.int32)
    for sp in range(0, N_SPLIT):
        part = PART + (bh * N_SPLIT + sp) * (4 * BLOCK_D) + offs_d
        k_sum += tl.load(part)
        if V_SUM:
            v_sum += tl.load(part + BLOCK_D)
        if V_MINMAX:
            v_lo = tl.minimum(v_lo, tl.load(part + 2 * BLOCK_D))
            v_hi = tl.maximum(v_hi, tl.load(part + 3 * BLOCK_D))
        if HAS_MASK:
            kept += tl.load(CNT + bh * N_SPLIT + sp)
    if HAS_MASK:
        counts = tl.full([BLOCK_D], 1.0, tl.float32) * tl.maximum(kept, 1).to(tl.float32)
    else:
        counts = tl.full([BLOCK_D], n_all, tl.float32)
    out = STATS + bh * BLOCK_D + offs_d
    tl.store(out, tl.where(col_ok, tl.math.div_rn(k_sum, counts), 0.0))
    v_mean = tl.zeros([BLOCK_D], dtype=tl.float32)
    if V_SUM:
        v_mean = tl.where(col_ok, tl.math.div_rn(v_sum, counts), 0.0)
        tl.store(out + STAT_ROW, v_mean)
    if V_MINMAX:
        amax = tl.maximum(tl.maximum(v_hi - v_mean, v_mean - v_lo), 0.0)
        amax = tl.where(col_ok, amax, 0.0)
        tl.store(out + 2 * STAT_ROW, amax)
        amax = tl.maximum(amax, _EPS)
        tl.store(out + 3 * STAT_ROW,
                 tl.where(col_ok, tl.math.div_rn(amax, tl.full([BLOCK_D], 448.0, tl.float32)), 0.0))
        inv = tl.math.div_rn(tl.full([BLOCK_D], 1.0, tl.float32), amax) * 448.0
        tl.store(out + 4 * STAT_ROW, tl.where(col_ok, inv, 0.0))


@triton.jit
def _quant_qkv_fused(
    Q, K, V, STATS, Q8, QS, LSE_OFF, K8, KS, V8, QIDX, KVIDX,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    HQ, HK, SQ, SKV, D, STAT_ROW, q_mult, lse_mult, K_ALLOC, V_PAD,
    Q_BLOCKS, KV_BLOCKS, V_BLOCKS, Q_PROGS, K_PROGS,
    HAS_LSE: tl.constexpr, HAS_QIDX: tl.constexpr, HAS_KVIDX: tl.constexpr, V_FP8: tl.constexpr,
    SMOOTH_V: tl.constexpr, BLOCK_S: tl.constexpr, V_BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Q, K and (FP8) V in one launch: program ``pid`` of the 1-D grid quantizes one ``BLOCK_S × BLOCK_D`` tile.

    ``[0, Q_PROGS)``: Q row block ``pid % Q_BLOCKS`` of head ``pid // Q_BLOCKS`` (INT8, scales, LSE term);
    ``[Q_PROGS, Q_PROGS + K_PROGS)``: K likewise (smoothed by ``STATS[0]``); the rest (launched only for
    FP8 V, ``V_FP8``): V row blocks of ``V_BLOCK_S`` rows (``V_BLOCKS`` per head), transposed FP8 written
    byte by byte into ``V8`` (:func:`_fp8_t_tile`).
    ``STATS`` is the ``(5, B, HK, BLOCK_D)`` buffer of :func:`_kv_stats_final` (``STAT_ROW`` =
    ``B·HK·BLOCK_D`` elements a row). Q, K and V tiles are computed by the same code as the three-launch
    pass.
    """
    pid = tl.program_id(0)
    if pid < Q_PROGS:
        bh = pid // Q_BLOCKS
        b = bh // HQ
        h = bh % HQ
        kv_bh = b * HK + h // (HQ // HK)
        _int8_tile(
            Q, STATS, STATS, Q8, QS, LSE_OFF, QIDX, stride_qb, stride_qh, stride_qs, stride_qd,
            b, h, bh, kv_bh * BLOCK_D, pid - bh * Q_BLOCKS, SQ, D, q_mult, lse_mult, SQ,
            False, HAS_LSE, HAS_QIDX, BLOCK_S, BLOCK_D,
        )
    elif pid < Q_PROGS + K_PROGS:
        p = pid - Q_PROGS
        bh = p // KV_BLOCKS
        _int8_tile(
            K, STATS, STATS, K8, KS, KS, KVIDX, stride_kb, stride_kh, stride_ks, stride_kd,
            bh // HK, bh % HK, bh, bh * BLOCK_D, p - bh * KV_BLOCKS, SKV, D, 1.0, 1.0, K_ALLOC,
            True, False, HAS_KVIDX, BLOCK_S, BLOCK_D,
        )
    elif V_FP8:
        p = pid - Q_PROGS - K_PROGS
        bh = p // V_BLOCKS
        _fp8_t_tile(
            V, STATS + STAT_ROW, STATS + 4 * STAT_ROW, V8, KVIDX, stride_vb, stride_vh, stride_vs, stride_vd,
            bh // HK, bh % HK, bh, bh * BLOCK_D, p - bh * V_BLOCKS, SKV, V_PAD, D,
            SMOOTH_V, HAS_KVIDX, V_BLOCK_S, BLOCK_D,
        )


def padded_head_dim(d: int) -> int:
    """Head dim the kernels work at: the next power of two, at least 32 (the least K of an 8-bit tensor-core
    product, INT8 QKᵀ, on sm80-sm90; head_dim 16 failed to compile on an H100, 2026-11-24)."""
    return max(32, triton.next_power_of_2(d))


def _rows_block(dp: int) -> int:
    return max(16, 8192 // dp)


_FUSED_KEYS = ("BLOCK_S", "V_BLOCK_S", "num_warps", "stats")


def _fused_config(dp: int, config: dict | None = None) -> dict:
    """Launch parameters of the fused launch (see :func:`quantize_qkv_fused`); ``config`` overrides.

    V gets taller tiles than Q and K (128 rows at head dims 64 and 128): its transposing store writes
    single bytes, and on an H100 at Wan2.1-1.3B's shape (d = 128) 128 rows took 0.42 ms, 64 rows 0.48 ms.
    Unknown keys raise ValueError."""
    cfg = dict(BLOCK_S=_rows_block(dp), V_BLOCK_S=min(128, max(16, 16384 // dp)), num_warps=4)
    unknown = sorted(set(config or {}) - set(_FUSED_KEYS))
    if unknown:
        raise ValueError(f"quantize_qkv_fused: unknown config key(s) {unknown}; known: {list(_FUSED_KEYS)}")
    cfg.update(config or {})
    return cfg


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _stats_config(dp: int, device: torch.device, config: dict | None = None) -> dict:
    """Launch parameters of the statistics kernel: ``BLOCK_S`` (rows a tile), ``num_warps``, and on the GPU
    ``PER_SM`` (programs to aim for per SM), elsewhere ``TILES`` (tiles a program); ``config`` overrides."""
    if device.type == "cuda":
        cfg = dict(BLOCK_S=max(16, 4096 // dp), num_warps=4, PER_SM=2)
    else:  # the interpreter: small tiles, two a program, so that tiny test shapes use the combine step
        cfg = dict(BLOCK_S=16, num_warps=4, TILES=2)
    cfg.update(config or {})
    return cfg


def _stats_split(skv: int, dp: int, bhk: int, device: torch.device, config: dict | None = None):
    """``(BLOCK_S, tiles per program, programs per (batch, kv-head))`` of the statistics kernel: on the GPU
    the tokens of each head are split so that there are about ``PER_SM`` programs per SM in all."""
    cfg = _stats_config(dp, device, config)
    bs = cfg["BLOCK_S"]
    n_tiles = triton.cdiv(skv, bs)
    if "TILES" in cfg:
        tiles = cfg["TILES"]
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        tiles = max(1, triton.cdiv(n_tiles * bhk, cfg["PER_SM"] * _sm_count(index)))
    return bs, tiles, max(1, triton.cdiv(n_tiles, tiles))


def kv_stats_buffer(
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    *,
    smooth_v: bool,
    need_v_amax: bool,
    dp: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """The statistics of ``reference.kv_stats`` on the GPU: ``(5, B, Hk, Dp)`` fp32 (see :func:`_kv_stats_final`).

    Rows: K mean, V mean (``smooth_v``), amax of ``|V − v_mean|`` (``need_v_amax``), V's FP8 scale and its
    inverse factor (``need_v_amax``); rows not asked for are left unwritten. Two launches: one read of K
    and (when needed) V, split over several programs per SM, then the per-head combine. ``config``
    overrides launch parameters (see :func:`_stats_config`; for benchmarks).
    """
    b, hk, skv, d = k.shape
    dp = padded_head_dim(d) if dp is None else dp
    dev = k.device
    stats = torch.empty((_N_STATS, b, hk, dp), dtype=torch.float32, device=dev)
    bs, tiles, n_split = _stats_split(skv, dp, b * hk, dev, config)
    num_warps = _stats_config(dp, dev, config)["num_warps"]
    part = torch.empty((b * hk, n_split, _N_PARTS, dp), dtype=torch.float32, device=dev)
    mask = key_padding_mask
    if mask is not None:
        if mask.dtype != torch.bool:
            mask = mask != 0
        cnt = torch.empty((b * hk, n_split), dtype=torch.int32, device=dev)
        mask_arg, smb, sms = mask.view(torch.uint8), mask.stride(0), mask.stride(1)
    else:
        cnt, mask_arg, smb, sms = part, part, 0, 0
    v_sum, v_minmax = bool(smooth_v), bool(need_v_amax)
    _kv_stats_partial[(n_split, b * hk)](
        k, v, mask_arg, part, cnt, *k.stride(), *v.stride(), smb, sms,
        hk, skv, d, tiles, n_split,
        HAS_MASK=mask is not None, V_SUM=v_sum, V_MINMAX=v_minmax, BLOCK_S=bs, BLOCK_D=dp, num_warps=num_warps,
    )
    _kv_stats_final[(b * hk,)](
        part, cnt, stats, float(max(skv, 1)), d, n_split, b * hk * dp,
        HAS_MASK=mask is not None, V_SUM=v_sum, V_MINMAX=v_minmax, BLOCK_D=dp,
    )
    return stats


def kv_stats_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    *,
    smooth_v: bool,
    need_v_amax: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``reference.kv_stats`` computed by the statistics kernels: ``(k_mean, v_mean, v_amax)``, each fp32
    ``(B, Hk, D)`` (views of the padded buffer) or None where the reference gives None."""
    d = k.shape[-1]
    st = kv_stats_buffer(k, v, key_padding_mask, smooth_v=smooth_v, need_v_amax=need_v_amax)
    return (st[_K_MEAN, ..., :d], st[_V_MEAN, ..., :d] if smooth_v else None,
            st[_V_AMAX, ..., :d] if need_v_amax else None)


def stats_buffer_from_torch(k_mean, v_mean, v_amax, dp: int) -> torch.Tensor:
    """The ``(5, B, Hk, Dp)`` statistics buffer built from ``reference.kv_stats``'s outputs with the torch
    arithmetic of the three-launch pass (for tests and benchmarks: the fused launch on exactly the
    statistics of ``fused=False``)."""
    b, hk, d = k_mean.shape
    st = torch.zeros((_N_STATS, b, hk, dp), dtype=torch.float32, device=k_mean.device)
    st[_K_MEAN, ..., :d] = k_mean
    if v_mean is not None:
        st[_V_MEAN, ..., :d] = v_mean
    if v_amax is not None:
        amax = v_amax.clamp_min(AMAX_EPS)
        st[_V_AMAX, ..., :d] = v_amax
        st[_V_SCALE, ..., :d] = amax / FP8_MAX
        st[_V_INV, ..., :d] = FP8_MAX / amax
    return st


def _check_gathers(q_gather, kv_gather, b, hq, hk, sq, skv, dev):
    q_idx = None if q_gather is None else q_gather.to(device=dev, dtype=torch.int32).contiguous()
    kv_idx = None if kv_gather is None else kv_gather.to(device=dev, dtype=torch.int32).contiguous()
    if q_idx is not None and tuple(q_idx.shape) != (b, hq, sq):
        raise ValueError(f"quantize_qkv: q_gather must have shape {(b, hq, sq)}, got {tuple(q_idx.shape)}")
    if kv_idx is not None and tuple(kv_idx.shape) != (b, hk, skv):
        raise ValueError(f"quantize_qkv: kv_gather must have shape {(b, hk, skv)}, got {tuple(kv_idx.shape)}")
    return q_idx, kv_idx


def _kv_buffers(b, hk, skv, dp, tail, dev):
    if tail < 0:
        raise ValueError(f"quantize_qkv: kv_tail must be >= 0, got {tail}")
    if tail:
        k8 = torch.zeros((b, hk, skv + tail, dp), dtype=torch.int8, device=dev)[:, :, :skv]
        ks = torch.zeros((b, hk, skv + tail), dtype=torch.float32, device=dev)[:, :, :skv]
    else:
        k8 = torch.empty((b, hk, skv, dp), dtype=torch.int8, device=dev)
        ks = torch.empty((b, hk, skv), dtype=torch.float32, device=dev)
    return k8, ks


def _v_fp8_buffer(b, hk, skv, dp, tail, dev):
    s_pad = triton.cdiv(skv + tail, 16) * 16  # 16-byte aligned rows of Vᵀ
    if tail:  # finite zeros past S_kv: the unmasked tiles multiply them by P = 0
        return torch.zeros((b, hk, dp, s_pad), dtype=torch.float8_e4m3fn, device=dev)
    return torch.empty((b, hk, dp, s_pad), dtype=torch.float8_e4m3fn, device=dev)


def _v_16bit(v, v_mean, kv_idx):
    """``int8-fp16`` V: 16 bits, gathered (one copy) and smoothed with torch; no copy when neither applies."""
    b, hk, skv, d = v.shape
    pv_dtype = pv_dtype_for(v.dtype)
    if kv_idx is not None:  # one gathered copy (the permuted V the attention kernel reads)
        v = v.gather(2, kv_idx.long()[..., None].expand(b, hk, skv, d))
    if v_mean is not None:
        return (v.float() - v_mean[:, :, None, :]).to(pv_dtype)
    return v if v.dtype == pv_dtype else v.to(pv_dtype)  # no copy for FP16/BF16 inputs


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
    fused: bool = True,
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

    ``fused=True`` (default): statistics by the Triton statistics kernel and one launch for Q, K and FP8 V
    (see the module docstring); ``fused=False``: ``reference.kv_stats`` and three launches. Same layout; the
    statistics may differ in the last bits (order of fp32 sums), so an INT8 code can differ by one at a
    rounding tie. Both pass every GPU test of ``tests/test_quantize_fused.py`` (H100, 2026-11-24).
    """
    if fused:
        return quantize_qkv_fused(
            q, k, v, scale=scale, precision=precision, key_padding_mask=key_padding_mask, smooth_v=smooth_v,
            need_lse=need_lse, q_gather=q_gather, kv_gather=kv_gather, kv_tail=kv_tail,
        )
    b, hq, sq, d = q.shape
    hk, skv = k.shape[1], k.shape[2]
    dp = padded_head_dim(d)
    scale = default_scale(d) if scale is None else scale
    fp8 = precision == "int8-fp8"
    k_mean, v_mean, v_amax = kv_stats(k, v, key_padding_mask, smooth_v=smooth_v, need_v_amax=fp8)
    k_mean = k_mean.contiguous()
    dev = q.device
    bs = _rows_block(dp)
    q_idx, kv_idx = _check_gathers(q_gather, kv_gather, b, hq, hk, sq, skv, dev)

    q8 = torch.empty((b, hq, sq, dp), dtype=torch.int8, device=dev)
    qs = torch.empty((b, hq, sq), dtype=torch.float32, device=dev)
    lse_off = torch.empty((b, hq, sq), dtype=torch.float32, device=dev) if need_lse else qs
    _quant_int8_rows[(triton.cdiv(sq, bs), b * hq)](
        q, k_mean, q8, qs, k_mean, lse_off, q_idx if q_idx is not None else qs,
        *q.stride(), hq, sq, d, hq // hk, scale * LOG2E, scale, sq,
        HAS_MEAN=False, HAS_KM=need_lse, HAS_IDX=q_idx is not None, BLOCK_S=bs, BLOCK_D=dp,
    )
    tail = int(kv_tail) if fp8 else 0
    k8, ks = _kv_buffers(b, hk, skv, dp, tail, dev)
    _quant_int8_rows[(triton.cdiv(skv, bs), b * hk)](
        k, k_mean, k8, ks, k_mean, ks, kv_idx if kv_idx is not None else ks,
        *k.stride(), hk, skv, d, 1, 1.0, 1.0, skv + tail,
        HAS_MEAN=True, HAS_KM=False, HAS_IDX=kv_idx is not None, BLOCK_S=bs, BLOCK_D=dp,
    )
    vm = None if v_mean is None else torch.nn.functional.pad(v_mean, (0, dp - d)).contiguous()
    if fp8:
        amax = v_amax.clamp_min(AMAX_EPS)
        inv = (FP8_MAX / amax).contiguous()
        v8 = _v_fp8_buffer(b, hk, skv, dp, tail, dev)
        # Channels past D are written as zeros; columns past S_kv are never read (the kernel masks them).
        _quant_v_fp8_t[(triton.cdiv(skv, bs), b * hk)](
            v, v_mean if v_mean is not None else inv, inv, v8, kv_idx if kv_idx is not None else inv,
            *v.stride(), hk, skv, v8.shape[3], d,
            HAS_MEAN=v_mean is not None, HAS_IDX=kv_idx is not None, BLOCK_S=bs, BLOCK_D=dp,
        )
        v_scale = torch.nn.functional.pad(amax / FP8_MAX, (0, dp - d)).contiguous()
    else:
        v8, v_scale = _v_16bit(v, v_mean, kv_idx), None
    return QuantizedQKV(q8, qs, k8, ks, v8, v_scale, vm, lse_off if need_lse else None, precision, d, tail)


def quantize_qkv_fused(
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
    stats: torch.Tensor | None = None,
    config: dict | None = None,
) -> QuantizedQKV:
    """``quantize_qkv(..., fused=True)``. ``stats``: a precomputed ``(5, B, Hk, Dp)`` statistics buffer
    (:func:`kv_stats_buffer` or :func:`stats_buffer_from_torch`) instead of running the statistics kernels.

    ``v_mean`` and ``v_scale`` of the result are views of the statistics buffer (contiguous ``(B, Hk, Dp)``,
    zeros past D). ``config`` overrides the launch parameters of the fused launch (``BLOCK_S``: Q/K rows a
    program, ``V_BLOCK_S``: V rows a program (a power of two, at least 16), ``num_warps``) and, under the
    key ``"stats"``, of the statistics kernel (for benchmarks; the results do not depend on them, except
    the statistics' last bits). Any other key raises ValueError."""
    b, hq, sq, d = q.shape
    hk, skv = k.shape[1], k.shape[2]
    dp = padded_head_dim(d)
    scale = default_scale(d) if scale is None else scale
    fp8 = precision == "int8-fp8"
    dev = q.device
    q_idx, kv_idx = _check_gathers(q_gather, kv_gather, b, hq, hk, sq, skv, dev)
    cfg = _fused_config(dp, config)
    if stats is None:
        stats = kv_stats_buffer(k, v, key_padding_mask, smooth_v=smooth_v, need_v_amax=fp8, dp=dp,
                                config=cfg.get("stats"))
    elif tuple(stats.shape) != (_N_STATS, b, hk, dp) or not stats.is_contiguous():
        raise ValueError(f"quantize_qkv: stats must be a contiguous {(_N_STATS, b, hk, dp)} buffer")
    bs, vbs = cfg["BLOCK_S"], cfg["V_BLOCK_S"]

    q8 = torch.empty((b, hq, sq, dp), dtype=torch.int8, device=dev)
    qs = torch.empty((b, hq, sq), dtype=torch.float32, device=dev)
    lse_off = torch.empty((b, hq, sq), dtype=torch.float32, device=dev) if need_lse else qs
    tail = int(kv_tail) if fp8 else 0
    k8, ks = _kv_buffers(b, hk, skv, dp, tail, dev)
    v8 = _v_fp8_buffer(b, hk, skv, dp, tail, dev) if fp8 else None
    q_blocks, kv_blocks, v_blocks = triton.cdiv(sq, bs), triton.cdiv(skv, bs), triton.cdiv(skv, vbs)
    q_progs, k_progs = q_blocks * b * hq, kv_blocks * b * hk
    n_progs = q_progs + k_progs + (v_blocks * b * hk if fp8 else 0)
    if n_progs:
        _quant_qkv_fused[(n_progs,)](
            q, k, v, stats, q8, qs, lse_off, k8, ks,
            v8 if fp8 else qs,
            q_idx if q_idx is not None else qs, kv_idx if kv_idx is not None else qs,
            *q.stride(), *k.stride(), *v.stride(),
            hq, hk, sq, skv, d, b * hk * dp, scale * LOG2E, scale, skv + tail, v8.shape[3] if fp8 else 16,
            q_blocks, kv_blocks, v_blocks, q_progs, k_progs,
            HAS_LSE=need_lse, HAS_QIDX=q_idx is not None, HAS_KVIDX=kv_idx is not None, V_FP8=fp8,
            SMOOTH_V=bool(smooth_v), BLOCK_S=bs, V_BLOCK_S=vbs, BLOCK_D=dp,
            num_warps=cfg["num_warps"],
        )
    vm = stats[_V_MEAN] if smooth_v else None
    if fp8:
        v_out, v_scale = v8, stats[_V_SCALE]
    else:
        v_out, v_scale = _v_16bit(v, None if vm is None else vm[..., :d], kv_idx), None
    return QuantizedQKV(q8, qs, k8, ks, v_out, v_scale, vm, lse_off if need_lse else None, precision, d, tail)
