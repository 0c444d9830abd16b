"""Block-sparse attention kernel (forward) of sagevideo: quantized (INT8 QKᵀ, FP8 or 16-bit PV) or 16-bit.

One program handles one (batch, head, query block). The query block is ``q_len`` rows starting at ``q_start``
of the (permuted) sequence; the program walks the ``kv_count`` KV blocks listed at ``kv_offset`` in
``kv_index`` (compressed rows: the lists end to end, a list possibly shared by several query blocks),
each ``k_len`` keys starting at ``k_start`` (cut into tiles of ``BLOCK_N``; rows and keys past a block's
length are masked), so the work scales with the kept blocks and blocks may have any length up to the tile:
the layout a token permutation into clusters of unequal size produces (each cluster cut into chunks of at
most ``block_m``/``block_n`` tokens). Quantized KV blocks that do not start at multiples of 16 keys are read
through a 16-key-aligned window one tile wide (``KV_WINDOW``, :func:`kv_tile`), which keeps the loads wide.
The block lists follow Sparse VideoGen / Sparse VideoGen2 (Xi et al. 2025; Yang et al. 2025), the quantized
arithmetic SageAttention2 (Zhang et al. 2024) exactly as ``kernels/quant_attn.py`` does it:

* ``int8-fp8`` / ``int8-fp16``: Q and K in INT8 with per-token scales (K smoothed), read from the output of
  ``kernels/quantize.py``, which already holds them in the permuted order (the quantization pass gathers
  through the permutation); int32 → fp32 by the magic-number trick; the Q scale (with ``scale·log2 e``)
  applied inside the exponent after the row max; P·448 rounded to e4m3 against per-channel FP8 V (or P in
  16 bits against 16-bit V); each KV tile's PV product formed in a fresh FP32 tile before it is added.
* ``dense``: Q, K, V read in place in 16 bits (fp32 inputs: IEEE fp32 dot products), gathered through the
  permutation by the kernel itself (no copy at all); exact online softmax in the log2 domain.

The output (and the LSE) is written in the caller's original token order: the store goes through the query
permutation (row ``s`` of the permuted sequence is stored at original row ``q_perm[b, h, s]``). A key-padding
mask in the original order is read through the KV permutation. The torch reference computing the same result
is ``sagevideo.sparse.blocks.block_sparse_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sagevideo.kernels._autotune import pick_fastest
from sagevideo.kernels.quant_attn import _natural_lse
from sagevideo.reference import LOG2E, QuantizedQKV

MODE_DENSE = 0
MODE_INT8_FP16 = 1
MODE_INT8_FP8 = 2
_MODES = {"dense": MODE_DENSE, "int8-fp16": MODE_INT8_FP16, "int8-fp8": MODE_INT8_FP8}

#: The largest query block the kernel takes (one program holds the whole block, or half of it: ``SPLIT_M``).
MAX_BLOCK_M = 256
#: The widest KV tile. KV blocks up to this many keys take one tile (one pipelined loop over the block list);
#: longer blocks are walked in several tiles (a nested loop, which Triton cannot software-pipeline).
MAX_TILE_N = 128


@triton.jit
def _sparse_tile(
    acc, l_i, m_i, q, qs,
    cols, n_ok, b, bh,
    K, KS, V, MASK, KIDX,
    k_base, stride_kn, stride_kd, v_base, stride_vn, stride_vd, stride_mb, stride_mn,
    Skv, ks_stride, offs_d, d_ok,
    MODE: tl.constexpr, HAS_MASK: tl.constexpr, PERM_KV: tl.constexpr, DOT_IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, KV_UNMASKED: tl.constexpr,
):
    """One KV tile (columns ``cols`` of the permuted sequence, ``n_ok`` = inside the block) of the online
    softmax. Scores are kept unscaled per row (``s1``); ``qs`` (> 0, includes scale·log2 e) is applied after
    the row max and inside the exponent, as in ``kernels/quant_attn.py``."""
    # original row of each permuted column (for the key mask, and the dense mode's K/V reads; the quantized
    # modes read K/V in the permuted order and set PERM_KV only when there is a key mask)
    if PERM_KV:
        src = tl.load(KIDX + bh * Skv + cols, mask=n_ok, other=0)
    else:
        src = cols
    if MODE == 0:
        krow = src
    else:
        krow = cols  # the quantized copies are already in the permuted order
    # K as a (BLOCK_D, BLOCK_N) tile, i.e. already transposed for QKᵀ. KV_UNMASKED (quantized copies with
    # BLOCK_N zeroed keys past the end): read whole tiles without a mask, so the loads stay wide; columns past
    # the block are finite and their scores are set to −inf below.
    if KV_UNMASKED:
        k = tl.load(K + k_base + krow[None, :] * stride_kn + offs_d[:, None] * stride_kd)
    else:
        k = tl.load(
            K + k_base + krow[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=n_ok[None, :] & d_ok[:, None], other=0,
        )
    keep = n_ok
    if HAS_MASK:
        keep = keep & (tl.load(MASK + b * stride_mb + src * stride_mn, mask=n_ok, other=0) != 0)
    if MODE == 0:
        if DOT_IEEE:
            s1 = tl.dot(q, k, input_precision="ieee")
        else:
            s1 = tl.dot(q, k)
    else:
        if KV_UNMASKED:
            ks = tl.load(KS + bh * ks_stride + cols)
        else:
            ks = tl.load(KS + bh * ks_stride + cols, mask=n_ok, other=0.0)
        # int32 → fp32 without I2F: for |x| < 2^22 the bits of x + 0x4B400000 read as a float equal
        # 12582912 + x exactly (|QKᵀ| ≤ 127²·128 < 2^22 for D ≤ 128); subtracting 12582912 is exact too.
        qk = tl.dot(q, k, out_dtype=tl.int32)
        s1 = ((qk + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0) * ks[None, :]
    # A select per score. (Folding the mask into the scale product as a −inf addend per column, one FMA, made
    # the kernel 10-20 % slower on an H100 at every launch configuration, 2026-11-24.)
    s1 = tl.where(keep[None, :], s1, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s1, axis=1) * qs)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    if MODE == 2:
        # P directly in the e4m3 range: exp2(s − m + log2 448) = 448·exp2(s − m); l carries the same factor.
        p = tl.math.exp2(s1 * qs[:, None] + (8.807354922057604 - m_safe)[:, None])
    else:
        p = tl.math.exp2(s1 * qs[:, None] - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MODE == 0:
        vrow = src
    else:
        vrow = cols
    if KV_UNMASKED:
        v = tl.load(V + v_base + vrow[:, None] * stride_vn + offs_d[None, :] * stride_vd)
    else:
        v = tl.load(
            V + v_base + vrow[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=n_ok[:, None] & d_ok[None, :], other=0.0,
        )
    if MODE == 2:
        # two-level accumulation: the tile's product in a fresh FP32 tile, then added (SageAttention2)
        pv = tl.dot(p.to(tl.float8e4nv), v, max_num_imprecise_acc=BLOCK_N)
    elif DOT_IEEE:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["H", "Sq", "Skv", "NQ", "NK"])
def _block_sparse_fwd(
    Q, QS, K, KS, V, VS, VM, LSE_OFF, MASK, O, LSE, QIDX, KIDX,
    Q_START, Q_LEN, KV_WORD, KV_INDEX, KV_OFF, KV_COUNT,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    stride_mb, stride_mn,
    H, Sq, Skv, NQ, NK, qk_scale, ks_stride,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_TILE: tl.constexpr, SPLIT_M: tl.constexpr, MODE: tl.constexpr, DOT_IEEE: tl.constexpr,
    HAS_MASK: tl.constexpr, PERM_Q: tl.constexpr, PERM_KV: tl.constexpr,
    SMOOTH_V: tl.constexpr, RETURN_LSE: tl.constexpr, HAS_LSE_OFF: tl.constexpr,
    KV_UNMASKED: tl.constexpr, KV_ALIGN16: tl.constexpr, KV_WINDOW: tl.constexpr, LEN_BITS: tl.constexpr,
):
    pid_q = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    # SPLIT_M programs share one query block, BLOCK_M rows each (smaller tiles keep fewer registers live)
    blk_q = bh * NQ + pid_q // SPLIT_M
    part = pid_q % SPLIT_M

    q0 = tl.load(Q_START + blk_q)
    q_len = tl.load(Q_LEN + blk_q)
    offs_m = part * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    d_ok = offs_d < D
    rows = q0 + offs_m  # rows of the permuted sequence
    if PERM_Q:
        orows = tl.load(QIDX + bh * Sq + rows, mask=m_ok, other=0)  # their original rows
    else:
        orows = rows

    if MODE == 0:
        q = tl.load(
            Q + b * stride_qb + h * stride_qh + orows[:, None] * stride_qs + offs_d[None, :] * stride_qd,
            mask=m_ok[:, None] & d_ok[None, :], other=0.0,
        )
        qs = tl.full([BLOCK_M], qk_scale, tl.float32)
        k_base = b * stride_kb + h * stride_kh
    else:
        q = tl.load(Q + (bh * Sq + rows[:, None]) * BLOCK_D + offs_d[None, :], mask=m_ok[:, None], other=0)
        qs = tl.load(QS + bh * Sq + rows, mask=m_ok, other=1.0)
        k_base = bh * stride_kh
    v_base = b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    count = tl.load(KV_COUNT + blk_q)
    count = tl.where(q_len > part * BLOCK_M, count, 0)  # padding slots (and empty halves) do no work
    lst = KV_INDEX + tl.load(KV_OFF + blk_q)  # this query block's list (possibly shared with other blocks)
    # Each KV block's start and length come packed in one word (start << LEN_BITS | length), read one iteration
    # ahead and carried in the loop: the tile loads then depend on no load of their own iteration, and Triton
    # software-pipelines them over num_stages buffers (read in the same iteration, the two dependent scalar
    # loads left one buffer and a full wait before every tile). H100, 2026-11-24, every 128-key block kept at
    # Wan2.1-14B 720p, INT8/FP8 operands given: 209 ms against the dense kernel's 189 (the loads inside the
    # iteration took 237 ms in a like probe).
    w_next = tl.load(KV_WORD + bh * NK + tl.load(lst, mask=count > 0, other=0), mask=count > 0)
    for j in range(0, count):
        w = w_next
        nxt = tl.load(lst + j + 1, mask=j + 1 < count, other=0)
        w_next = tl.load(KV_WORD + bh * NK + nxt, mask=j + 1 < count, other=0)
        k0 = w >> LEN_BITS
        if KV_ALIGN16:  # every KV block starts at a multiple of 16 keys (checked on the host)
            k0 = tl.multiple_of(k0, 16)
        k_len = w & ((1 << LEN_BITS) - 1)
        if KV_WINDOW:
            # unaligned blocks: read the BLOCK_N keys from the multiple of 16 at or below the block start (a
            # tile the host sized to hold any block from there) and mask the keys outside the block, so the
            # loads stay 16 bytes wide; the keys read before the block get exactly zero weight
            cols = tl.multiple_of((k0 // 16) * 16, 16) + offs_n
            n_ok = (cols >= k0) & (cols < k0 + k_len)
        else:
            cols = k0 + offs_n
            n_ok = offs_n < k_len
        if KV_WINDOW or SINGLE_TILE:
            acc, l_i, m_i = _sparse_tile(
                acc, l_i, m_i, q, qs, cols, n_ok, b, bh,
                K, KS, V, MASK, KIDX,
                k_base, stride_kn, stride_kd, v_base, stride_vn, stride_vd, stride_mb, stride_mn,
                Skv, ks_stride, offs_d, d_ok, MODE, HAS_MASK, PERM_KV, DOT_IEEE, BLOCK_N, KV_UNMASKED,
            )
        else:
            for t in range(0, k_len, BLOCK_N):
                acc, l_i, m_i = _sparse_tile(
                    acc, l_i, m_i, q, qs, k0 + t + offs_n, offs_n < k_len - t, b, bh,
                    K, KS, V, MASK, KIDX,
                    k_base, stride_kn, stride_kd, v_base, stride_vn, stride_vd, stride_mb, stride_mn,
                    Skv, ks_stride, offs_d, d_ok, MODE, HAS_MASK, PERM_KV, DOT_IEEE, BLOCK_N, KV_UNMASKED,
                )

    valid = l_i > 0.0
    out = acc / tl.where(valid, l_i, 1.0)[:, None]  # for FP8 the 448 of P cancels between acc and l
    if MODE == 2:
        out = out * tl.load(VS + bh * BLOCK_D + offs_d)[None, :]
    if SMOOTH_V:
        out = out + tl.load(VM + bh * BLOCK_D + offs_d)[None, :]
    out = tl.where(valid[:, None], out, 0.0)
    o_ptrs = O + b * stride_ob + h * stride_oh + orows[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if RETURN_LSE:
        lse = _natural_lse(m_i, l_i, valid, MODE == 2, HAS_LSE_OFF, LSE_OFF + bh * Sq + rows, m_ok)
        tl.store(LSE + b * stride_lb + h * stride_lh + orows * stride_ls, lse, mask=m_ok)


# ----------------------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------------------

# Launch candidates timed on first use on a GPU (the query block is the layout's; SPLIT_M=2 gives each half
# of a query block of ≥ 128 rows its own program; the KV tile is the layout's KV block, at most MAX_TILE_N).
CANDIDATES = [
    dict(num_warps=4, num_stages=3),
    dict(num_warps=4, num_stages=2),
    dict(num_warps=8, num_stages=3),
    dict(num_warps=8, num_stages=2),
    dict(num_warps=4, num_stages=3, SPLIT_M=2),
    dict(num_warps=4, num_stages=2, SPLIT_M=2),
]
_chosen: dict[tuple, dict] = {}


def tile_sizes(block_m: int, block_n: int) -> tuple[int, int]:
    """The kernel's (BLOCK_M, BLOCK_N) for a layout's (block_m, block_n): one query block per program (the
    next power of two ≥ 16), KV tiles of 32 to ``MAX_TILE_N`` keys (longer KV blocks take several; 32 is the
    least K of an 8-bit tensor-core product, here FP8 P·V, on sm89/sm90: smaller KV blocks get masked keys)."""
    if block_m > MAX_BLOCK_M:
        raise ValueError(f"block-sparse kernel: query blocks of at most {MAX_BLOCK_M} rows, got block_m={block_m}")
    bm = max(16, triton.next_power_of_2(block_m))
    bn = max(32, min(MAX_TILE_N, triton.next_power_of_2(block_n)))
    return bm, bn


def kv_tile(block_n: int, kv_aligned: bool, kv_reach: int | None = None,
            quantized: bool = True) -> tuple[int, bool]:
    """``(BLOCK_N, window)``: the KV tile the kernel walks a layout's KV blocks with, and whether it reads them
    through an aligned window.

    Quantized operands are read 16 bytes at a time only from 16-key-aligned starts (FP8 Vᵀ is contiguous
    along the keys). When the blocks are not aligned but each reaches at most the natural tile
    (:func:`tile_sizes`) from the multiple of 16 at or below its start (``kv_reach``, the layout's largest
    ``k_start % 16 + k_len``; unknown = ``block_n + 15``), each block is read as that tile from there, the
    keys outside the block masked; otherwise with byte-wise loads. Clusters cut by
    ``sagevideo.sparse.blocks.cluster_blocks(..., align=16)`` always fit.
    Measured on an H100 (Wan2.1-1.3B semantic layouts, 2026-11-24): 64-key blocks cut with ``align=16``
    5.09 ms through the window against 7.61 byte-wise; a window wider than the natural tile does not pay
    (plain 64-key blocks through 128 keys 7.28 against 7.47; 32-key blocks through 64 keys 6.94 against
    5.86). The quantization pass must leave at least ``BLOCK_N`` zeroed keys after the sequence
    (``kv_tail``) for the window."""
    bn = tile_sizes(1, block_n)[1]
    if not quantized or kv_aligned:
        return bn, False
    return bn, (block_n + 15 if kv_reach is None else kv_reach) <= bn


def default_config(block_m: int, dp: int) -> dict:
    """The untimed fallback (and the interpreter's) launch configuration."""
    return dict(num_warps=8 if block_m * dp > 128 * 128 else 4, num_stages=2)


def chosen_configs() -> dict:
    """Configurations picked so far, keyed by (device capability, head_dim, mode, BLOCK_M, BLOCK_N, masked)."""
    return dict(_chosen)


def _pick_config(key, device, fallback: dict, launch) -> dict:
    """Time the candidates once per (GPU, *key); the split-query-block ones only for blocks of ≥ 128 rows."""
    cands = [c for c in CANDIDATES if c.get("SPLIT_M", 1) == 1 or key[3] >= 128]
    return pick_fastest(_chosen, key, device, cands, fallback, launch, kernel="block_sparse_attn")


def block_sparse_fwd(
    mode: str,
    q: torch.Tensor | QuantizedQKV,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    out_bhsd: torch.Tensor,
    *,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    k_start: torch.Tensor,
    k_len: torch.Tensor,
    kv_index: torch.Tensor,
    kv_offset: torch.Tensor,
    kv_count: torch.Tensor,
    block_m: int,
    block_n: int,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    q_perm: torch.Tensor | None = None,
    kv_perm: torch.Tensor | None = None,
    lse_bhs: torch.Tensor | None = None,
    kv_aligned: bool = False,
    kv_reach: int | None = None,
    kv_window: bool | None = None,
    config: dict | None = None,
):
    """Launch the block-sparse kernel; returns Triton's launch handle.

    ``mode`` ``"dense"``: ``q``, ``k``, ``v`` are the caller's BHSD views (any strides, original order, equal
    head counts), read in place through ``q_perm``/``kv_perm``; ``scale`` is the softmax scale.
    Quantized modes: ``q`` is a :class:`QuantizedQKV` already in the permuted order (``kernels/quantize.py``
    with ``q_gather=q_perm, kv_gather=kv_perm``); ``k``/``v``/``scale`` are unused.

    The layout tensors are contiguous int32: ``q_start``/``q_len`` ``(B, H, NQ)``, ``k_start``/``k_len``
    ``(B, H, NK)``, ``kv_index`` ``(L,)`` (the block lists end to end), ``kv_offset``/``kv_count``
    ``(B, H, NQ)`` (where each query block's list starts in ``kv_index``, and its length); ``q_perm``/``kv_perm``
    contiguous int32 ``(B, H, S)`` or None; ``key_padding_mask`` bool ``(B, Skv)`` in the original order.
    ``out_bhsd`` (any strides) and ``lse_bhs`` (fp32, any strides) receive the rows covered by query blocks,
    in the original order; rows in no query block are not written.

    Quantized operands made with ``kv_tail`` ≥ the KV tile (``quantize_qkv(..., kv_tail=MAX_TILE_N)``) are
    read in whole unmasked tiles; ``kv_aligned=True`` promises that every KV block starts at a multiple of 16
    keys (the caller checks it), which lets those loads be 16 bytes wide. Unaligned blocks that reach at most
    one tile from the multiple of 16 at or below their start (``kv_reach``, see :func:`kv_tile`) are read
    through an aligned window when the tail allows it (``kv_window=None``, the default); ``kv_window=False``
    forbids that and ``True`` requires it (ValueError when impossible).
    """
    if mode not in _MODES:
        raise ValueError(f"block_sparse_fwd: mode must be one of {tuple(_MODES)}, got {mode!r}")
    code = _MODES[mode]
    if code == MODE_DENSE:
        b, h, sq, d = q.shape
        skv = k.shape[2]
        from sagevideo.kernels.quantize import padded_head_dim

        dp = padded_head_dim(d)
        qq, qs, kk, ks, vv, vs, vm, lse_off = q, None, k, None, v, None, None, None
        sqb, sqh, sqs, sqd = q.stride()
        skb, skh, skn, skd = k.stride()
        svb, svh, svn, svd = v.stride()
        if scale is None:
            scale = q.shape[-1] ** -0.5
        qk_scale = scale * LOG2E
        dot_ieee = q.dtype == torch.float32
        ks_stride, kv_tail = 0, 0
    else:
        qkv = q
        if qkv.precision != mode:
            raise ValueError(f"block_sparse_fwd: operands quantized for {qkv.precision}, launched as {mode}")
        b, h, sq, dp = qkv.q.shape
        skv = qkv.k.shape[2]
        d = qkv.head_dim
        qq, qs, kk, ks, vv, vs, vm, lse_off = (
            qkv.q, qkv.q_scale, qkv.k, qkv.k_scale, qkv.v, qkv.v_scale, qkv.v_mean, qkv.lse_offset
        )
        sqb = sqh = sqs = sqd = 0
        if qkv.k.stride(0) != h * qkv.k.stride(1) or qkv.k_scale.stride(0) != h * qkv.k_scale.stride(1):
            raise ValueError("block_sparse_fwd: quantized K and its scales must be (B, H)-contiguous buffers")
        skb, skh, skn, skd = 0, qkv.k.stride(1), qkv.k.stride(2), 1
        ks_stride = qkv.k_scale.stride(1)
        kv_tail = qkv.kv_tail
        if code == MODE_INT8_FP8:  # (B, H, Dp, S_pad): element (n, d) lives at d * S_pad + n
            svb, svh, svn, svd = vv.stride(0), vv.stride(1), vv.stride(3), vv.stride(2)
        else:
            svb, svh, svn, svd = vv.stride()
        qk_scale = 1.0
        dot_ieee = False
    nq, nk = q_start.shape[2], k_start.shape[2]
    bm, bn = tile_sizes(block_m, block_n)
    len_bits = max(1, int(block_n).bit_length())  # a KV block holds at most block_n keys
    if skv >= 1 << (31 - len_bits):
        raise ValueError(
            f"block_sparse_fwd: {skv} keys do not fit the packed block word next to a length of up to "
            f"block_n={block_n} keys (at most {(1 << (31 - len_bits)) - 1} keys; use smaller KV blocks)"
        )
    if kv_index.numel() == 0:  # no lists at all (every count 0): any valid pointer does, it is never read
        kv_index = kv_count
    kv_word = torch.bitwise_or(torch.bitwise_left_shift(k_start, len_bits), k_len)
    can_window = kv_tile(block_n, kv_aligned, kv_reach, quantized=code != MODE_DENSE)[1] and kv_tail >= bn
    if kv_window and not can_window:
        raise ValueError(
            f"block_sparse_fwd: kv_window=True needs quantized operands, KV blocks not declared aligned, a reach "
            f"(kv_reach, else block_n + 15) <= the KV tile ({bn}) and kv_tail >= {bn}; got mode={mode!r}, "
            f"kv_aligned={kv_aligned}, kv_reach={kv_reach}, block_n={block_n}, kv_tail={kv_tail}"
        )
    window = can_window if kv_window is None else bool(kv_window)
    unmasked = code != MODE_DENSE and kv_tail >= bn
    mask = key_padding_mask
    smb, smn = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)
    lse = lse_bhs
    slb, slh, sls = lse.stride() if lse is not None else (0, 0, 0)
    dummy = q_start

    def launch(cfg):
        cfg = dict(cfg)
        split = cfg.pop("SPLIT_M", 1)
        return _block_sparse_fwd[(nq * split, b * h)](
            qq, qs if qs is not None else dummy, kk, ks if ks is not None else dummy, vv,
            vs if vs is not None else dummy, vm if vm is not None else dummy,
            lse_off if lse_off is not None else dummy,
            mask.view(torch.uint8) if mask is not None else dummy,
            out_bhsd, lse if lse is not None else dummy,
            q_perm if q_perm is not None else dummy, kv_perm if kv_perm is not None else dummy,
            q_start, q_len, kv_word, kv_index, kv_offset, kv_count,
            sqb, sqh, sqs, sqd,
            skb, skh, skn, skd,
            svb, svh, svn, svd,
            *out_bhsd.stride(),
            slb, slh, sls,
            smb, smn,
            h, sq, skv, nq, nk, qk_scale, ks_stride,
            D=d, BLOCK_M=bm // split, BLOCK_N=bn, BLOCK_D=dp, SINGLE_TILE=bn >= block_n, SPLIT_M=split,
            KV_WINDOW=window,
            MODE=code, DOT_IEEE=dot_ieee,
            HAS_MASK=mask is not None, PERM_Q=q_perm is not None,
            # the quantized modes read K/V already permuted: they need the KV index only for the key mask
            PERM_KV=kv_perm is not None and (code == MODE_DENSE or mask is not None),
            SMOOTH_V=vm is not None, RETURN_LSE=lse is not None, HAS_LSE_OFF=lse_off is not None,
            KV_UNMASKED=unmasked, KV_ALIGN16=bool(kv_aligned), LEN_BITS=len_bits,
            **cfg,
        )

    fallback = default_config(bm, dp)
    if config is None:
        key = (dp, mode, str(out_bhsd.dtype), bm, bn, mask is not None, unmasked, bool(kv_aligned), window)
        config = _pick_config(key, out_bhsd.device, fallback, launch)
    return launch(config)
