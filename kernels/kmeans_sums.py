"""k-means update kernel of sagevideo: per-cluster sums of points already sorted by cluster.

The update step of Lloyd's k-means (``sagevideo.sparse.kmeans``) needs, for every cluster ``c`` of every
set, the sum of the points labelled ``c``. A scatter-add of ~10⁵ rows into ~10³ clusters serialises on
atomics; a one-hot matrix product ``onehot(labels)ᵀ · x`` avoids them but multiplies ``k`` zeros per point
and writes the one-hot matrix (~6 GB per round at the Wan2.1-14B 720p shape). Semantic sparse attention
sorts the labels anyway (Sparse VideoGen2's permutation makes every cluster contiguous), so here the sums are
taken from that sort: ``order`` lists the points of each set cluster by cluster and ``offsets[c]`` is where
cluster ``c`` starts in it. One program per (cluster, set) gathers its rows through ``order``, ``BLOCK_R`` at
a time, and adds them in fp32: every point is read once, nothing is written but the sums, there are no
atomics, and the summation order is fixed by the data alone, so the result is the same on every run.

Cost: one program reads its cluster alone, so a very large cluster is read at the pace of one program (a
loop of dependent index and row loads). Measured on an H100 (2026-11-24; 12-40 sets of 32,760-75,600 bf16
points, D = 128, 300 or 1,000 clusters; ``block_r=64``, 2 warps): 0.07-0.38 ms a call where k-means left
clusters of at most a few thousand points, 0.64-2.4 ms when half of every set is one cluster, against
0.74-12.7 ms for the one-hot product. A variant that cut the sorted sequence into equal chunks (the runs of
equal labels summed by a small one-hot product per chunk, the runs crossing a chunk boundary completed by a
second launch) does not depend on the cluster sizes (0.77 ms with the half-set cluster at Wan2.1-14B) but
took 1.5-1.9× as long on ordinary clusters, and was not kept.

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
def _cluster_sums_kernel(
    X, ORDER, OFFSETS, SUMS,
    S, K,
    stride_xn, stride_xs, stride_xd,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    c = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    start = tl.load(OFFSETS + n * (K + 1) + c)
    end = tl.load(OFFSETS + n * (K + 1) + c + 1)
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
    tl.store(SUMS + (n * K + c) * D + offs_d, tl.sum(acc, axis=0), mask=d_ok)


def cluster_sums(
    x: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    *,
    block_r: int = 64,
    num_warps: int = 2,
) -> torch.Tensor:
    """Per-cluster sums ``(N, k, D)`` fp32 of points sorted by cluster.

    Args:
        x: points ``(N, S, D)``, fp16/bf16/fp32, any strides (read in place).
        order: integer ``(N, S)``: the point indices of each set, cluster by cluster (a sort of the labels).
        offsets: integer ``(N, k + 1)``, non-decreasing: cluster ``c`` is ``order[n, offsets[n, c]:offsets[n, c+1]]``
            (``offsets[n, 0] = 0``, ``offsets[n, k] = S``).
        block_r, num_warps: rows gathered per iteration (a power of two ≥ 16) and warps per program.
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
    k = offsets.shape[1] - 1
    order = order.contiguous()
    offsets = offsets.contiguous()
    sums = torch.empty(n, k, d, dtype=torch.float32, device=x.device)
    if n == 0 or k == 0 or d == 0:
        return sums
    block_d = max(16, triton.next_power_of_2(d))
    sxn, sxs, sxd = x.stride()
    _cluster_sums_kernel[(k, n)](
        x, order, offsets, sums,
        s, k,
        sxn, sxs, sxd,
        D=d, BLOCK_R=block_r, BLOCK_D=block_d, EVEN_D=d == block_d,
        num_warps=num_warps,
    )
    return sums
