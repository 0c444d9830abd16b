"""Head-profiling kernel of sagevideo: sampled query rows against all keys, under three masks at once.

Online head profiling (Sparse VideoGen, Xi et al., arXiv 2502.01776; ``sagevideo.sparse.profiling``) needs,
for a few sampled query rows of every head, the attention output against all keys three times: unmasked, under
the spatial mask and under the temporal mask. Done with torch ops this is a ``rows × S`` fp32 score block per
head, written once and then read and written again by elementwise passes (by a count of its ops, about 16
passes of the block, ~13 GB of memory traffic per plan at Wan2.1-14B 720p; 11.6 ms on an H100 against 3.1 ms
for this kernel, 2026-11-24). Here one pass over K and V does it, FlashAttention-style (Dao et al.
2022): a program keeps a block of sampled rows on chip, streams a range of keys in tiles, computes the scores
on the tensor cores, builds both masks from the latent-grid coordinates of the rows and the keys, and keeps
three running sums of weights and of weighted values. The three share one running maximum, the unmasked one:
a masked softmax equals the unmasked weights restricted to the mask and renormalised, so one exponential
serves all three (this is what the torch reference does too).

Arithmetic (the same as ``sagevideo.sparse.profiling._masked_outputs``, the torch reference, on 16-bit CUDA
inputs): scores in fp32 from 16-bit operands; weights ``exp(scale·(s − m))`` in fp32, rounded to the values'
dtype for the products with V (fp32 accumulation), and each output divided by the sum of its own rounded
weights. Where a mask keeps only keys more than ~87/scale below the unmasked maximum its weights underflow to
0 and its output is 0 (the reference does the same). Keys outside the video segment (text) are kept by every
mask; keys where ``key_padding_mask`` is False by none.

The key range of a head is split over several programs (flash-decoding's split-K) so that a few heads still
fill the GPU; each writes its running maximum, sums and weighted values, merged in torch afterwards.

The Triton interpreter (CPU tests) computes bf16 ``tl.dot`` wrongly (Triton 3.x), so there 16-bit operands
are upcast to fp32 first (exact).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["pattern_outputs"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _pattern_kernel(
    Q, K, V, TQ, HQ, WQ, KPM, M_OUT, L_OUT, A_OUT,
    R, S, KEYS_PER_SPLIT, VIDEO_START, VIDEO_LEN, GRID_H, GRID_W, WIDTH, RADIUS, QK_SCALE,
    stride_qb, stride_qh, stride_qr, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pb,
    HEADS, SPLITS,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_KPM: tl.constexpr, DOT_IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (bh // HEADS).to(tl.int64)
    h = (bh % HEADS).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < R
    d_ok = offs_d < D

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qr + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    tq = tl.load(TQ + offs_m, mask=m_ok, other=0)
    hq = tl.load(HQ + offs_m, mask=m_ok, other=0)
    wq = tl.load(WQ + offs_m, mask=m_ok, other=0)
    if DOT_IEEE:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_full = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_spat = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_temp = tl.zeros([BLOCK_M], dtype=tl.float32)
    a_full = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    a_spat = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    a_temp = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_lo = split * KEYS_PER_SPLIT
    k_hi = tl.minimum(k_lo + KEYS_PER_SPLIT, S)
    hw = GRID_H * GRID_W
    for j0 in range(k_lo, k_hi, BLOCK_N):
        cols = j0 + offs_n
        c_ok = cols < k_hi
        # the tile's first row in 64 bits (S × the row stride may pass 2^31: BSHD, long videos), the rest in 32
        k_tile = K + b * stride_kb + h * stride_kh + tl.cast(j0, tl.int64) * stride_ks
        v_tile = V + b * stride_vb + h * stride_vh + tl.cast(j0, tl.int64) * stride_vs
        kt = tl.load(k_tile + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                     mask=c_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        vt = tl.load(v_tile + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                     mask=c_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        if DOT_IEEE:
            s = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        keep = c_ok
        if HAS_KPM:
            keep = keep & (tl.load(KPM + b * S + cols, mask=c_ok, other=0) != 0)
        s = tl.where(keep[None, :], s, float("-inf"))
        # the masks on the latent grid (frame-major video tokens); keys outside the video are kept by both
        vi = cols - VIDEO_START
        video = (vi >= 0) & (vi < VIDEO_LEN)
        tk = vi // hw
        hk = (vi // GRID_W) % GRID_H
        wk = vi % GRID_W
        spatial = (tl.abs(tq[:, None] - tk[None, :]) <= WIDTH) | (tk == 0)[None, :] | (~video)[None, :]
        temporal = ((tl.abs(hq[:, None] - hk[None, :]) <= RADIUS) & (tl.abs(wq[:, None] - wk[None, :]) <= RADIUS)) \
            | (~video)[None, :]

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_i - m_safe) * QK_SCALE)  # 0 while nothing was kept before
        p = tl.exp2((s - m_safe[:, None]) * QK_SCALE).to(vt.dtype)  # weights rounded to V's dtype
        p_spat = tl.where(spatial, p, 0.0).to(vt.dtype)
        p_temp = tl.where(temporal, p, 0.0).to(vt.dtype)
        l_full = l_full * alpha + tl.sum(p.to(tl.float32), axis=1)
        l_spat = l_spat * alpha + tl.sum(p_spat.to(tl.float32), axis=1)
        l_temp = l_temp * alpha + tl.sum(p_temp.to(tl.float32), axis=1)
        if DOT_IEEE:
            vf = vt.to(tl.float32)
            a_full = a_full * alpha[:, None] + tl.dot(p.to(tl.float32), vf, input_precision="ieee")
            a_spat = a_spat * alpha[:, None] + tl.dot(p_spat.to(tl.float32), vf, input_precision="ieee")
            a_temp = a_temp * alpha[:, None] + tl.dot(p_temp.to(tl.float32), vf, input_precision="ieee")
        else:
            a_full = a_full * alpha[:, None] + tl.dot(p, vt)
            a_spat = a_spat * alpha[:, None] + tl.dot(p_spat, vt)
            a_temp = a_temp * alpha[:, None] + tl.dot(p_temp, vt)
        m_i = m_new

    row = (bh * SPLITS + split).to(tl.int64) * R + offs_m  # (B·H, SPLITS, R) flattened
    tl.store(M_OUT + row, m_i, mask=m_ok)
    tl.store(L_OUT + row, l_full, mask=m_ok)
    tl.store(L_OUT + stride_pb + row, l_spat, mask=m_ok)
    tl.store(L_OUT + 2 * stride_pb + row, l_temp, mask=m_ok)
    a_ptr = A_OUT + row[:, None] * D + offs_d[None, :]
    a_mask = m_ok[:, None] & d_ok[None, :]
    tl.store(a_ptr, a_full, mask=a_mask)
    tl.store(a_ptr + stride_pb * D, a_spat, mask=a_mask)
    tl.store(a_ptr + 2 * stride_pb * D, a_temp, mask=a_mask)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pattern_outputs(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    row_coords: torch.Tensor,
    *,
    grid: tuple[int, int, int],
    video_start: int,
    width: int,
    radius: int,
    scale: float,
    key_padding_mask: torch.Tensor | None = None,
    block_m: int = 32,
    block_n: int = 64,
    num_warps: int = 4,
    splits: int | None = None,
) -> torch.Tensor:
    """Attention outputs of sampled query rows, unmasked and under the spatial and temporal masks.

    Args:
        q_rows: ``(B, H, R, D)`` fp16/bf16, the sampled rows of the query heads sharing each K/V head (any
            strides).
        k, v: ``(B, H, S, D)`` of the same dtype (any strides; e.g. a BSHD tensor transposed).
        row_coords: integer ``(3, R)``: frame, row and column on the latent grid of each sampled row.
        grid: the post-patch video grid ``(T, H, W)``; the video is ``S`` tokens from ``video_start`` on,
            frame-major, ``T·H·W`` long; other keys (text) are kept by every mask.
        video_start: index of the first video key.
        width, radius: spatial mask ``|t_q − t_k| ≤ width`` or ``t_k = 0``; temporal mask
            ``max(|h_q − h_k|, |w_q − w_k|) ≤ radius`` (``sagevideo.sparse.patterns``).
        scale: softmax scale.
        key_padding_mask: optional bool ``(B, S)``, True = the key takes part (in every output).
        block_m, block_n, num_warps: tile sizes (powers of two ≥ 16) and warps; ``splits``: programs per
            (row block, head) along the keys (by default enough to give the GPU about two programs per SM).

    Returns:
        fp32 ``(3, B, H, R, D)``: the unmasked, spatial and temporal outputs (a row that keeps no key gives 0).
    """
    if q_rows.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("pattern_outputs: q_rows must be (B, H, R, D) and k, v (B, H, S, D)")
    b, h, r, d = q_rows.shape
    s = k.shape[2]
    if k.shape[:2] != (b, h) or k.shape[-1] != d or v.shape != k.shape:
        raise ValueError(f"pattern_outputs: shapes do not match: q_rows {tuple(q_rows.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q_rows.dtype not in SUPPORTED_DTYPES or k.dtype != q_rows.dtype or v.dtype != q_rows.dtype:
        raise ValueError(f"pattern_outputs: q, k, v must share one 16-bit dtype, got {q_rows.dtype}, {k.dtype}, {v.dtype}")
    if tuple(row_coords.shape) != (3, r):
        raise ValueError(f"pattern_outputs: row_coords must be (3, {r}), got {tuple(row_coords.shape)}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (b, s):
        raise ValueError(f"pattern_outputs: key_padding_mask must be (B, S) = {(b, s)}")
    for blk in (block_m, block_n):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"pattern_outputs: block sizes must be powers of two >= 16, got {blk}")
    t_, gh, gw = (int(x) for x in grid)
    dev = q_rows.device
    out = torch.zeros(3, b, h, r, d, dtype=torch.float32, device=dev)
    if min(b, h, r, d, s) == 0:
        return out
    row_blocks = triton.cdiv(r, block_m)
    if splits is None:
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
        splits = max(1, min(triton.cdiv(2 * sms, b * h * row_blocks), triton.cdiv(s, 4 * block_n)))
    per_split = triton.cdiv(triton.cdiv(s, splits), block_n) * block_n
    splits = triton.cdiv(s, per_split)
    m_out = torch.empty(b * h, splits, r, dtype=torch.float32, device=dev)
    l_out = torch.empty(3, b * h, splits, r, dtype=torch.float32, device=dev)
    a_out = torch.empty(3, b * h, splits, r, d, dtype=torch.float32, device=dev)
    coords = row_coords.to(device=dev, dtype=torch.int32).contiguous()
    kpm = key_padding_mask.to(device=dev, dtype=torch.int8).contiguous() if key_padding_mask is not None else coords
    block_d = max(16, triton.next_power_of_2(d))
    _pattern_kernel[(row_blocks, b * h, splits)](
        q_rows, k, v, coords[0], coords[1], coords[2], kpm, m_out, l_out, a_out,
        r, s, per_split, int(video_start), t_ * gh * gw, gh, gw, int(width), int(radius),
        float(scale) * math.log2(math.e),
        *q_rows.stride(), *k.stride(), *v.stride(),
        b * h * splits * r,
        h, splits,
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_KPM=key_padding_mask is not None, DOT_IEEE=_interpreted(),
        num_warps=num_warps,
    )
    # merge the splits: rescale each to the largest maximum of its row, then divide by the weight sums
    top = m_out.amax(dim=1, keepdim=True)
    top = torch.where(torch.isinf(top), 0.0, top)
    w = torch.exp2((m_out - top) * (float(scale) * math.log2(math.e)))  # 0 for splits that kept nothing
    den = (l_out * w).sum(dim=2)  # (3, B·H, R)
    num = (a_out * w[..., None]).sum(dim=2)  # (3, B·H, R, D)
    res = num / den.clamp_min(1e-30)[..., None]
    return res.reshape(3, b, h, r, d)
