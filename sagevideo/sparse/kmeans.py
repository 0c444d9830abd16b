"""Batched Euclidean k-means over many independent point sets at once (one per batch·head).

Sparse VideoGen2 (Yang et al., "Sparse VideoGen2: Accelerate Video Generation with Sparse Attention via
Semantic-Aware Permutation", arXiv 2505.18875) clusters the queries and the keys of every head with k-means
at every sparse step, warm-starting from the previous step's centroids so that a couple of iterations suffice.
This is Lloyd's algorithm, batched over the leading dimension:

* init: ``k`` distinct points drawn with ``generator`` (or the given centroids: warm start);
* assign: ``argmin_c ‖x − c‖² = argmin_c (‖c‖² − 2 x·c)`` (ties to the lowest index). On CUDA, for 16-bit
  and fp32 points, a fused Triton kernel (``kernels/kmeans_assign.py``) tiles the points and the centroids
  and keeps a running argmin, so no distance matrix is ever stored: the products are taken in the points'
  dtype (16-bit points on the tensor cores against the centroids cast to 16 bits, fp32 accumulation; fp32
  points in IEEE fp32). Elsewhere (CPU, fp64, other dtypes) the torch path computes it in fp32 (fp64 for
  fp64 input), in chunks of points so the ``N × chunk × k`` distance block stays under ``budget`` elements —
  never ``N × S × k`` at once;
* update: per-cluster mean. The labels are sorted stably (``order``: the points cluster by cluster, the
  permutation semantic attention needs anyway) and each cluster's rows summed in fp32. On CUDA (the Triton
  backend) a kernel gathers each cluster's rows through ``order``, in parts of at most 1,024 rows
  (``kernels/kmeans_sums.py``: every point read once, no atomics, no one-hot matrix); elsewhere a scatter-add (:func:`cluster_sums_reference`). Both
  earlier GPU forms cost more: a scatter-add of ~10⁵ rows into ~10³ clusters serialises on atomics (1.3 ms
  per set of 12 heads × 32,760 tokens, H100, 2026-11-23), and a one-hot product ``onehot(labels)ᵀ · x``
  multiplies ``k`` zeros per point and writes the one-hot matrix (~6 GB per round at Wan2.1-14B 720p);
* empty clusters are re-seeded deterministically: the ``e`` empty clusters of a set take, in cluster order,
  the ``e`` points farthest from their assigned centroid (largest first, ties by lower index). This is
  computed unconditionally with tensor ops (it is a no-op without empty clusters), so a round never waits
  for the GPU.

The returned labels are those of the last assignment, the centroids those of the last update, and
``sizes`` counts the labels (a re-seeded cluster can therefore have size 0 in the returned labels).
"""

from __future__ import annotations

import dataclasses
import os

import torch

__all__ = ["KMeansResult", "init_centroids", "batched_kmeans"]


@dataclasses.dataclass
class KMeansResult:
    """``labels`` int64 ``(N, S)``, ``centroids`` ``(N, k, D)`` (fp32, or fp64 for fp64 input), ``sizes``
    int64 ``(N, k)``, ``iters`` (iterations run), ``order`` int64 ``(N, S)``: the stable sort of ``labels``
    (the points cluster by cluster, in index order within a cluster; the update step computes it anyway)."""

    labels: torch.Tensor
    centroids: torch.Tensor
    sizes: torch.Tensor
    iters: int
    order: torch.Tensor


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def init_centroids(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(N, k, D)``: ``k`` distinct points of each set, chosen by a random permutation from ``generator`` (the
    same index choice for every set; ``generator`` lives on the CPU)."""
    n, s, _ = x.shape
    if not 0 < k <= s:
        raise ValueError(f"k-means: need 0 < k <= number of points ({s}), got k={k}")
    idx = torch.randperm(s, generator=generator)[:k].to(x.device)
    return x[:, idx].to(_work_dtype(x))


def _chunk_rows(n: int, k: int, s: int, budget: int) -> int:
    return max(1, min(s, budget // max(1, n * k)))


def _assign(x, centroids, budget):
    """Labels ``(N, S)`` and squared distance to the assigned centroid ``(N, S)`` — the torch path, also the
    reference of the Triton kernel: ``x`` upcast to the centroids' dtype (fp32, or fp64), the distance block
    ``‖c‖² − 2 x·c`` formed ``chunk`` points at a time and reduced (ties to the lowest index)."""
    n, s, _ = x.shape
    k = centroids.shape[1]
    c_sq = (centroids * centroids).sum(-1)  # (N, k)
    labels = torch.empty(n, s, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, s, dtype=centroids.dtype, device=x.device)
    step = _chunk_rows(n, k, s, budget)
    for i in range(0, s, step):
        xc = x[:, i : i + step].to(centroids.dtype)
        d = c_sq[:, None, :] - 2.0 * torch.matmul(xc, centroids.transpose(1, 2))  # (N, chunk, k)
        best, lab = d.min(dim=-1)
        labels[:, i : i + step] = lab
        dist[:, i : i + step] = (best + (xc * xc).sum(-1)).clamp_min(0)
    return labels, dist


_BACKENDS = ("auto", "torch", "triton")


def use_triton(backend: str, x: torch.Tensor, *, fits: bool, where: str, takes: str) -> bool:
    """Whether a ``backend`` argument (``"auto"``, ``"torch"`` or ``"triton"``) selects a Triton kernel for
    tensors like ``x``: ``"auto"`` when ``x`` is on CUDA and ``fits`` (the kernel takes these dtypes);
    ``"triton"`` always, after checking ``fits`` and that ``x`` is on CUDA or the Triton interpreter is on
    (``TRITON_INTERPRET=1``); errors name ``where`` and what the kernel ``takes``."""
    if backend not in _BACKENDS:
        raise ValueError(f"{where}: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return x.is_cuda and fits
    if backend == "torch":
        return False
    if not fits:
        raise ValueError(f"{where}: the Triton backend takes {takes}")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ValueError(f"{where}: the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1)")
    return True


def _assign_triton(x, centroids):
    """The fused Triton assignment (``kernels/kmeans_assign.py``); distances in the centroids' dtype (fp32)."""
    from sagevideo.kernels.kmeans_assign import kmeans_assign

    labels, dist = kmeans_assign(x, centroids)
    return labels, dist.to(centroids.dtype)


def _order_by_label(labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, offsets)``: the stable sort of each set's labels — ``order`` ``(N, S)`` lists the points
    cluster by cluster, in index order within a cluster — and ``offsets`` ``(N, k + 1)``, where cluster ``c``
    starts in it (``offsets[:, k] = S``)."""
    n = labels.shape[0]
    # the narrowest integer keys that hold every label: a radix sort makes a pass per key byte
    keys = labels.to(torch.int16 if k <= torch.iinfo(torch.int16).max else torch.int32)
    sorted_labels, order = torch.sort(keys, dim=1, stable=True)
    bounds = torch.arange(k + 1, device=labels.device, dtype=sorted_labels.dtype).expand(n, k + 1).contiguous()
    return order, torch.searchsorted(sorted_labels, bounds)


def cluster_sums_reference(x: torch.Tensor, labels: torch.Tensor, k: int, dtype: torch.dtype,
                           budget: int = 1 << 26) -> torch.Tensor:
    """Per-cluster sums ``(N, k, D)`` in ``dtype`` by a scatter-add of the points (upcast to ``dtype``),
    ``chunk`` points at a time so a ``N × chunk × D`` block stays under ``budget`` elements: the torch
    reference of ``kernels/kmeans_sums.py``."""
    n, s, d = x.shape
    sums = torch.zeros(n, k, d, dtype=dtype, device=x.device)
    step = _chunk_rows(n, d, s, budget)
    for i in range(0, s, step):
        lab = labels[:, i : i + step]
        sums.scatter_add_(1, lab[..., None].expand(-1, -1, d), x[:, i : i + step].to(dtype))
    return sums


def _update(x, labels, dist, k, budget, kernel: bool = False):
    """New centroids (means; empty clusters re-seeded), cluster sizes of ``labels`` and the points ordered by
    cluster (:func:`_order_by_label`). ``kernel``: the sums by ``kernels/kmeans_sums.py`` from that order
    (fp32, one read of the points, no atomics), else by :func:`cluster_sums_reference`."""
    n, s, d = x.shape
    dtype = dist.dtype
    order, offsets = _order_by_label(labels, k)
    sizes = offsets[:, 1:] - offsets[:, :-1]
    if kernel:
        from sagevideo.kernels.kmeans_sums import cluster_sums

        sums = cluster_sums(x, order, offsets).to(dtype)
    else:
        sums = cluster_sums_reference(x, labels, k, dtype, budget)
    centroids = sums / sizes.clamp_min(1)[..., None].to(dtype)
    # The e empty clusters of a set take the e points farthest from their centroid, in cluster order. Done
    # whether or not a cluster is empty (no host sync on `empty.any()`); without one it selects nothing.
    empty = sizes == 0
    far = torch.sort(dist, dim=1, descending=True, stable=True).indices  # (N, S)
    rank = (torch.cumsum(empty.to(torch.int64), dim=1) - 1).clamp_min(0)  # (N, k)
    point = torch.gather(far, 1, rank)  # (N, k)
    seeds = torch.gather(x, 1, point[..., None].expand(-1, -1, d)).to(dtype)
    centroids = torch.where(empty[..., None], seeds, centroids)
    return centroids, sizes, order


def batched_kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 2,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    tol: float | None = None,
    budget: int = 1 << 26,
    backend: str = "auto",
) -> KMeansResult:
    """Lloyd's k-means on each of ``N`` point sets ``x`` ``(N, S, D)``, all sets at once.

    Args:
        x: points, any float dtype (distances are computed in fp32, fp64 for fp64 input).
        k: clusters per set, ``1 ≤ k ≤ S``.
        iters: assign/update rounds (≥ 1). SVG2 runs 50 on the first call and 2 when warm-started.
        init: ``(N, k, D)`` starting centroids (warm start); drawn with ``generator`` when None.
        generator: CPU generator for the initial choice (deterministic given its seed).
        tol: stop early once no centroid moved more than ``tol`` (L2) — costs one host sync per round; None
            (default) runs all ``iters`` rounds without syncing.
        budget: most elements of one distance block (``N × chunk × k``) of the torch assignment, and of one
            ``N × chunk × D`` block of the update.
        backend: the assignment: ``"auto"`` (default) the fused Triton kernel for CUDA fp16/bf16/fp32 points,
            torch otherwise; ``"torch"`` always torch; ``"triton"`` always the kernel (fp16/bf16/fp32 points on
            CUDA, or on the CPU under ``TRITON_INTERPRET=1``). The two agree up to rounding: the kernel takes
            the products in the points' dtype (the centroids rounded to it) where torch upcasts the points to
            fp32, so a point almost equidistant from two centroids may get either.

    Returns:
        :class:`KMeansResult` — labels from the last assignment, centroids from the last update.
    """
    if x.dim() != 3:
        raise ValueError(f"k-means: x must be (N, S, D), got shape {tuple(x.shape)}")
    if iters < 1:
        raise ValueError(f"k-means: iters must be ≥ 1, got {iters}")
    if init is None:
        centroids = init_centroids(x, k, generator)
    else:
        if tuple(init.shape) != (x.shape[0], k, x.shape[2]):
            raise ValueError(
                f"k-means: init centroids must be (N, k, D) = {(x.shape[0], k, x.shape[2])}, got {tuple(init.shape)}"
            )
        centroids = init.to(device=x.device, dtype=_work_dtype(x))
    triton_assign = use_triton(backend, x, fits=x.dtype in (torch.float16, torch.bfloat16, torch.float32),
                               where="k-means", takes=f"fp16, bf16 or fp32 points, got {x.dtype}")
    done = 0
    for _ in range(iters):
        if triton_assign:
            labels, dist = _assign_triton(x, centroids)
        else:
            labels, dist = _assign(x, centroids, budget)
        new, sizes, order = _update(x, labels, dist, k, budget, kernel=triton_assign)
        done += 1
        moved = None if tol is None else float((new - centroids).norm(dim=-1).max())
        centroids = new
        if moved is not None and moved <= tol:
            break
    return KMeansResult(labels, centroids, sizes, done, order)
