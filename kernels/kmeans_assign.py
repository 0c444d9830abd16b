"""k-means assignment kernel of sagevideo: fused distance + argmin, never materialising the distance matrix.

The assignment step of Lloyd's k-means (``sagevideo.sparse.kmeans``) needs, for every point ``x`` of every
set, ``argmin_c ‖x − c‖² = argmax_c (x·c − ½‖c‖²)``. Computed naively this is a ``(S, k)`` distance matrix
per set, written to memory and reduced afterwards. Here the reduction is fused into the matrix product, in
the spirit of FlashAttention's tiling (Dao et al. 2022; Dao 2023): a program keeps ``BLOCK_S`` points of one
set on chip, streams the set's centroids in tiles of ``BLOCK_K``, forms each tile's products ``x·cᵀ`` on the
tensor cores and folds them into a running (best score, argbest) per point, so only the label and one
distance per point ever reach memory (the idea of the fused "flash" k-means assignment kernels described for
GPU clustering; this is our own implementation).

Arithmetic:

* the products use the points' own dtype: 16-bit points (bf16/fp16) against the centroids cast once to
  that dtype before the launch (``ĉ``), fp32 accumulation; fp32 points against fp32 centroids with IEEE
  fp32 dot products (no TF32);
* ``−½‖ĉ‖²`` is precomputed in fp32 from the centroids *as cast* and seeds the accumulator of each tile's
  product, so the MMA itself returns the score ``x·ĉ − ½‖ĉ‖² = ½(‖x‖² − ‖x − ĉ‖²)``. The score is thus
  consistent with one point, ``ĉ``: it differs from the one of the fp32 centroid by ``(c − x)·δ − ½‖δ‖²``
  (``δ = ĉ − c``), which shrinks with ``‖x − c‖`` — small for the near centroids that matter — instead of
  growing with ``‖x‖`` (keys carry a large common offset) as with ``‖c‖²`` taken from ``c``;
* ties go to the lowest centroid index (within a tile by a lowest-index reduction, across tiles because
  tiles are visited in increasing order and a later tile only wins when strictly better);
* the returned distance is ``max(‖x‖² − 2·best, 0)`` in fp32 (``‖x − ĉ‖²``), ``‖x‖²`` summed in fp32.

Shapes: any head dimension ``D`` (the tile is padded to a power of two ≥ 16 and masked), any ``k`` (the
centroid tail tile is masked, its score −inf), any strides of the points. The inputs are only read. The torch
reference computing the same assignment (in fp32 with the fp32 centroids) is
``sagevideo.sparse.kmeans._assign``.

The Triton interpreter (CPU tests) computes bf16 ``tl.dot`` wrongly (Triton 3.x), so there bf16 operands are
upcast to fp32 first — exact, and bf16 products are exact in fp32 anyway.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sagevideo.kernels._autotune import pick_fastest

# a label larger than any centroid index, for the lowest-index reduction
_NO_INDEX: tl.constexpr = tl.constexpr(2**30)


@triton.jit
def _assign_tile(
    best, best_idx, x, c_ptrs, h_ptr, k0, K, offs_k, d_ok, stride_ck,
    TAIL: tl.constexpr, EVEN_D: tl.constexpr, DOT_IEEE: tl.constexpr,
):
    """Fold the centroids ``k0 .. k0 + BLOCK_K`` into the running (best score, its index). ``TAIL`` masks
    centroids past ``K`` (only the last tile needs it); ``EVEN_D`` (D a power of two ≥ 16) drops the head-dim
    mask."""
    cols = k0 + offs_k
    if TAIL:
        k_ok = cols < K
        c = tl.load(c_ptrs + k0 * stride_ck, mask=d_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_K)
        h = tl.load(h_ptr + cols, mask=k_ok, other=float("-inf"))
    elif EVEN_D:
        c = tl.load(c_ptrs + k0 * stride_ck)
        h = tl.load(h_ptr + cols)
    else:
        c = tl.load(c_ptrs + k0 * stride_ck, mask=d_ok[:, None], other=0.0)
        h = tl.load(h_ptr + cols)
    # score = x·ĉ − ½‖ĉ‖² = ½(‖x‖² − ‖x − ĉ‖²), maximised: −½‖ĉ‖² seeds the accumulator, so the MMA adds it
    # for free; masked centroids carry −inf
    acc = tl.broadcast_to(h[None, :], (x.shape[0], c.shape[1]))
    if DOT_IEEE:  # fp32 points; also bf16 under the interpreter, whose bf16 dot is wrong (exact upcast)
        score = tl.dot(x.to(tl.float32), c.to(tl.float32), acc, input_precision="ieee")
    else:
        score = tl.dot(x, c, acc)  # 16-bit operands, fp32 accumulation
    t_max = tl.max(score, axis=1)
    t_idx = tl.min(tl.where(score == t_max[:, None], cols[None, :], _NO_INDEX), axis=1)
    better = t_max > best  # strict: an equal score in a later tile keeps the lower index
    best = tl.where(better, t_max, best)
    best_idx = tl.where(better, t_idx, best_idx)
    return best, best_idx


@triton.jit
def _kmeans_assign_kernel(
    X, C, H, LABELS, DIST,
    S, K,
    stride_xn, stride_xs, stride_xd,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_IEEE: tl.constexpr,
):
    pid_s = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < S
    d_ok = offs_d < D

    x_ptrs = X + n * stride_xn + offs_s[:, None].to(tl.int64) * stride_xs + offs_d[None, :] * stride_xd
    if EVEN_D:
        x = tl.load(x_ptrs, mask=s_ok[:, None], other=0.0)  # (BLOCK_S, BLOCK_D) in the points' dtype
    else:
        x = tl.load(x_ptrs, mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    xf = x.to(tl.float32)
    x_sq = tl.sum(xf * xf, axis=1)

    # centroids are contiguous (N, K, D); the tile is read transposed, (BLOCK_D, BLOCK_K)
    c_ptrs = C + n * K * D + offs_k[None, :] * D + offs_d[:, None]
    h_ptr = H + n * K

    best = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_S], dtype=tl.int32)
    k_full = (K // BLOCK_K) * BLOCK_K
    for k0 in range(0, k_full, BLOCK_K):
        best, best_idx = _assign_tile(
            best, best_idx, x, c_ptrs, h_ptr, k0, K, offs_k, d_ok, D, False, EVEN_D, DOT_IEEE,
        )
    if k_full < K:
        best, best_idx = _assign_tile(
            best, best_idx, x, c_ptrs, h_ptr, k_full, K, offs_k, d_ok, D, True, EVEN_D, DOT_IEEE,
        )

    dist = tl.maximum(x_sq - 2.0 * best, 0.0)
    tl.store(LABELS + n * S + offs_s, best_idx.to(tl.int64), mask=s_ok)
    tl.store(DIST + n * S + offs_s, dist, mask=s_ok)


# ----------------------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------------------

# Launch candidates timed on first use on a GPU, per (device capability, D, dtype, k).
CANDIDATES = [
    dict(BLOCK_S=128, BLOCK_K=128, num_warps=8, num_stages=3),
    dict(BLOCK_S=128, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_S=128, BLOCK_K=64, num_warps=8, num_stages=4),
    dict(BLOCK_S=64, BLOCK_K=128, num_warps=4, num_stages=3),
    dict(BLOCK_S=256, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_S=64, BLOCK_K=64, num_warps=4, num_stages=2),
]
_chosen: dict[tuple, dict] = {}

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_config(k: int) -> dict:
    """The untimed fallback (and the interpreter's) launch configuration."""
    return dict(BLOCK_S=64, BLOCK_K=max(16, min(64, triton.next_power_of_2(k))), num_warps=4, num_stages=2)


def chosen_configs() -> dict:
    """Configurations picked so far, keyed by (device capability, D, dtype, k)."""
    return dict(_chosen)


def _pick_config(key, device, fallback: dict, launch) -> dict:
    return pick_fastest(_chosen, key, device, CANDIDATES, fallback, launch, kernel="kmeans_assign")


def kmeans_assign(
    x: torch.Tensor,
    centroids: torch.Tensor,
    *,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every point: labels int64 ``(N, S)`` and the squared distance to it, fp32 ``(N, S)``.

    ``x`` ``(N, S, D)`` fp16/bf16/fp32 with any strides (read in place); ``centroids`` ``(N, k, D)`` of any
    float dtype, cast to ``x``'s dtype (one contiguous copy of ``N·k·D`` elements unless it already is). Ties
    go to the lowest index. ``config`` (``BLOCK_S``, ``BLOCK_K`` powers of two ≥ 16, ``num_warps``,
    ``num_stages``) overrides the launch configuration, otherwise timed on first use on a GPU.
    """
    if x.dim() != 3 or centroids.dim() != 3:
        raise ValueError("kmeans_assign: x must be (N, S, D) and centroids (N, k, D)")
    n, s, d = x.shape
    k = centroids.shape[1]
    if centroids.shape[0] != n or centroids.shape[2] != d:
        raise ValueError(f"kmeans_assign: centroids {tuple(centroids.shape)} do not match points {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"kmeans_assign: points must be fp16, bf16 or fp32, got {x.dtype}")
    if k < 1:
        raise ValueError("kmeans_assign: need at least one centroid")
    c = centroids.to(device=x.device, dtype=x.dtype).contiguous()
    cf = c.float()
    neg_half_sq = (-0.5 * (cf * cf).sum(-1)).contiguous()  # −½‖ĉ‖², fp32 (N, k)
    labels = torch.empty(n, s, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, s, dtype=torch.float32, device=x.device)
    if s == 0 or n == 0:
        return labels, dist
    block_d = max(16, triton.next_power_of_2(d))
    sxn, sxs, sxd = x.stride()

    def launch(cfg):
        cfg = dict(cfg)
        block_s, block_k = cfg.pop("BLOCK_S"), cfg.pop("BLOCK_K")
        return _kmeans_assign_kernel[(triton.cdiv(s, block_s), n)](
            x, c, neg_half_sq, labels, dist,
            s, k,
            sxn, sxs, sxd,
            D=d, BLOCK_S=block_s, BLOCK_K=block_k, BLOCK_D=block_d, EVEN_D=d == block_d,
            # the Triton interpreter (CPU tests) computes bf16 dot products wrongly: there the operands are
            # upcast to fp32 (exact; the bf16 products are exact in fp32 anyway)
            DOT_IEEE=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _interpreted()),
            **cfg,
        )

    if config is None:
        config = _pick_config((d, str(x.dtype), k), x.device, default_config(k), launch)
    launch(config)
    return labels, dist
