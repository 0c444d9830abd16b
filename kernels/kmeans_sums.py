"""k-means update kernel of sagevideo: per-cluster sums of points already sorted by cluster.

The update step of Lloyd's k-means (``sagevideo.sparse.kmeans``) needs, for every cluster ``c`` of every
set, the sum of the points labelled ``c``. A scatter-add of ~10⁵ rows into ~10³ clusters serialises on
atomics; a one-hot matrix product ``onehot(labels)ᵀ · x`` avoids them but multiplies ``k`` zeros per point
and writes the one-hot matrix (~6 GB per round at the Wan2.1-14B 720p shape). Semantic sparse attention
sorts the labels anyway (Sparse VideoGen2's permutation makes every cluster contiguous), so here the sums are
taken from that sort: ``order`` lists the points of each set cluster by cluster and ``offsets[c]`` is where
cluster ``c`` starts in it. Two launches:

1. Each cluster is cut into parts of at most ``chunk_rows`` consecutive rows of the sort (a cluster of
   ``n`` points has ``ceil(n / chunk_rows)`` parts; a set has at most ``k + ceil(S / chunk_rows)`` of them, a
   bound known without reading the sizes back). One program per (part, set) gathers its rows through
   ``order``, ``block_r`` at a time, and adds them in fp32 into the part's partial sum.
2. One program per (cluster, set) adds its parts' partials in order (empty clusters get zeros).

Every point is read once, there are no atomics, and the summation order is fixed by the data alone, so the
result is the same on every run. Cutting clusters into parts keeps the work of one program bounded: with one
program per cluster, a cluster holding half of a set was read by a single program, latency-bound. H100,
2026-11-24, 12-40 sets of 32,760-118,800 bf16 points, D = 128, 300 or 1,000 clusters: 0.19-0.51 ms a call
with parts, whether or not half of every set is one cluster; 0.67-2.45 ms with one program per cluster on
that input (0.07-0.47 ms on the clusters k-means left); 0.74-12.7 ms for the one-hot product.
A variant that cut the sorted sequence into equal chunks regardless of clusters (runs of equal
labels summed by a small one-hot product per chunk, runs crossing a chunk boundary completed by a second
launch) took 1.5-1.9× as long on ordinary clusters and was not kept (``benchmarks/RESULTS.md``, eleventh session).

Shapes: any head dimension ``D`` (padded to a power of two ≥ 16 and masked), any number of clusters (empty
ones get zeros), any strides of the points. The inputs are only read. The torch reference computing the same
sums from the labels is ``sagevideo.sparse.kmeans.cluster_sums_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["cluster_sums"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _part_sums_kernel(
    X, ORDER, OFFSETS, PART_CLUSTER, FIRST_PART, PARTS,
    S, K, P,
    stride_xn, stride_xs, stride_xd,
    D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    c = tl.load(PART_CLUSTER + n * P + p)
    if c < K:  # parts past the set's last one have nothing to do
        j = p - tl.load(FIRST_PART + n * K + c)
        start = tl.load(OFFSETS + n * (K + 1) + c) + j * CHUNK
        end = tl.minimum(tl.load(OFFSETS + n * (K + 1) + c + 1), start + CHUNK)
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)  # BLOCK_R interleaved partial sums
        for r0 in range(start, end, BLOCK_R):
            rows = r0 + offs_r
            r_ok = rows < end
            idx = tl.load(ORDER + n * S + rows, mask=r_ok, other=0).to(tl.int64)
            ptrs = X + n * stride_xn + idx[:, None] * stride_xs + offs_d[None, :] * stride_xd
            if EVEN_D:
                x = tl.load(ptrs, mask=r_ok[:, None], other=0.0)
            else:
                x = tl.load(ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            acc += x.to(tl.float32)
        tl.store(PARTS + (n * P + p) * D + offs_d, tl.sum(acc, axis=0), mask=d_ok)


@triton.jit
def _cluster_sums_kernel(
    FIRST_PART, NUM_PARTS, PARTS, SUMS,
    K, P,
    D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    c = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    first = tl.load(FIRST_PART + n * K + c)
    count = tl.load(NUM_PARTS + n * K + c)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for q0 in range(0, count, BLOCK_P):  # usually one part
        q = q0 + offs_p
        part = tl.load(PARTS + (n * P + first + q[:, None]) * D + offs_d[None, :],
                       mask=(q[:, None] < count) & d_ok[None, :], other=0.0)
        total += tl.sum(part, axis=0)
    tl.store(SUMS + (n * K + c) * D + offs_d, total, mask=d_ok)


def cluster_sums(
    x: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    *,
    block_r: int = 64,
    num_warps: int = 2,
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """Per-cluster sums ``(N, k, D)`` fp32 of points sorted by cluster.

    Args:
        x: points ``(N, S, D)``, fp16/bf16/fp32, any strides (read in place).
        order: integer ``(N, S)``: the point indices of each set, cluster by cluster (a sort of the labels).
        offsets: integer ``(N, k + 1)``, non-decreasing: cluster ``c`` is ``order[n, offsets[n, c]:offsets[n, c+1]]``
            (``offsets[n, 0] = 0``, ``offsets[n, k] = S``).
        block_r, num_warps: rows gathered per iteration (a power of two ≥ 16) and warps per program.
        chunk_rows: the most rows one program reads (a multiple of ``block_r``); larger clusters are cut.
    """
    if x.dim() != 3 or order.dim() != 2 or offsets.dim() != 2:
        raise ValueError("cluster_sums: x must be (N, S, D), order (N, S) and offsets (N, k+1)")
    n, s, d = x.shape
    if tuple(order.shape) != (n, s) or offsets.shape[0] != n or offsets.shape[1] < 2:
        raise ValueError(
            f"cluster_sums: order {tuple(order.shape)} and offsets {tuple(offsets.shape)} do not match points "
            f"{tuple(x.shape)}"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"cluster_sums: points must be fp16, bf16 or fp32, got {x.dtype}")
    if order.dtype not in (torch.int32, torch.int64) or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError("cluster_sums: order and offsets must be int32 or int64")
    if block_r < 16 or block_r & (block_r - 1):
        raise ValueError(f"cluster_sums: block_r must be a power of two >= 16, got {block_r}")
    if chunk_rows < block_r or chunk_rows % block_r:
        raise ValueError(f"cluster_sums: chunk_rows must be a positive multiple of block_r ({block_r}), got {chunk_rows}")
    k = offsets.shape[1] - 1
    order = order.contiguous()
    offsets = offsets.contiguous()
    sums = torch.empty(n, k, d, dtype=torch.float32, device=x.device)
    if n == 0 or k == 0 or d == 0:
        return sums
    # the parts: ceil(size / chunk_rows) per cluster, numbered cluster by cluster; at most k + ceil(S / chunk)
    sizes = offsets[:, 1:] - offsets[:, :-1]
    num_parts = (sizes + (chunk_rows - 1)) // chunk_rows
    cum = num_parts.cumsum(-1)
    first_part = cum - num_parts
    p_max = k + triton.cdiv(s, chunk_rows)
    part_ids = torch.arange(p_max, device=x.device, dtype=cum.dtype).expand(n, p_max).contiguous()
    part_cluster = torch.searchsorted(cum.contiguous(), part_ids, right=True)  # k past the last part
    parts = torch.empty(n, p_max, d, dtype=torch.float32, device=x.device)
    block_d = max(16, triton.next_power_of_2(d))
    sxn, sxs, sxd = x.stride()
    _part_sums_kernel[(p_max, n)](
        x, order, offsets, part_cluster, first_part, parts,
        s, k, p_max,
        sxn, sxs, sxd,
        D=d, CHUNK=chunk_rows, BLOCK_R=block_r, BLOCK_D=block_d, EVEN_D=d == block_d,
        num_warps=num_warps,
    )
    _cluster_sums_kernel[(k, n)](
        first_part, num_parts, parts, sums,
        k, p_max,
        D=d, BLOCK_P=16, BLOCK_D=block_d,
        num_warps=2,
    )
    return sums
