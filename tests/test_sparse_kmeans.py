"""Batched k-means (Sparse VideoGen2's clustering step) against a plain loop implementation; its fused Triton
assignment kernel against float64 (the Triton interpreter on tiny shapes, the GPU at Wan2.1 size, marked gpu);
the sync-free update against the guarded one it replaced; the update's summing kernel against its reference."""

import pytest
import torch

from sagevideo.sparse.kmeans import _assign, _update, batched_kmeans, init_centroids


def _kmeans_loop(x, init, iters):
    """Lloyd's algorithm, one set and one point at a time, with the documented empty-cluster rule."""
    n, s, d = x.shape
    k = init.shape[1]
    all_labels, all_cent = [], []
    for b in range(n):
        cent = [init[b, c].clone() for c in range(k)]
        for _ in range(iters):
            labels, dist = [], []
            for i in range(s):
                ds = [float(((x[b, i] - cent[c]) ** 2).sum()) for c in range(k)]
                best = min(range(k), key=lambda c: (ds[c], c))
                labels.append(best)
                dist.append(ds[best])
            new = []
            for c in range(k):
                members = [i for i in range(s) if labels[i] == c]
                new.append(x[b, members].mean(0) if members else None)
            far = sorted(range(s), key=lambda i: (-dist[i], i))  # farthest first, ties by index
            e = 0
            for c in range(k):
                if new[c] is None:
                    new[c] = x[b, far[e]].clone()
                    e += 1
            cent = new
        all_labels.append(labels)
        all_cent.append(torch.stack(cent))
    return torch.tensor(all_labels), torch.stack(all_cent)


def _blobs(n, s, d, k, seed):
    g = torch.Generator().manual_seed(seed)
    centers = 4 * torch.randn(n, k, d, generator=g, dtype=torch.float64)
    which = torch.randint(0, k, (n, s), generator=g)
    noise = torch.randn(n, s, d, generator=g, dtype=torch.float64)
    return centers.gather(1, which[..., None].expand(-1, -1, d)) + noise


@pytest.mark.parametrize("iters", [1, 4])
def test_matches_loop_implementation(iters):
    x = _blobs(3, 40, 4, 5, seed=1)
    init = init_centroids(x, 5, torch.Generator().manual_seed(3))
    res = batched_kmeans(x, 5, iters=iters, init=init)
    labels, cent = _kmeans_loop(x, init, iters)
    assert torch.equal(res.labels, labels)
    torch.testing.assert_close(res.centroids, cent, rtol=1e-10, atol=1e-10)
    sizes = torch.stack([torch.bincount(l, minlength=5) for l in labels])
    assert torch.equal(res.sizes, sizes)
    assert torch.equal(res.order, torch.sort(labels, dim=1, stable=True).indices)


def test_empty_clusters_reseeded_like_loop():
    """Two centroids start far from every point: both are empty after the first assignment and take the two
    points farthest from their centroids, in cluster order."""
    x = _blobs(2, 30, 3, 3, seed=2)
    init = init_centroids(x, 4, torch.Generator().manual_seed(0))
    init[:, 1] = 1e3
    init[0, 3] = -1e3
    res1 = batched_kmeans(x, 4, iters=1, init=init)
    assert res1.sizes[0, 1] == 0 and res1.sizes[0, 3] == 0 and res1.sizes[1, 1] == 0
    # the re-seeded centroids are data points
    for b, c in ((0, 1), (0, 3), (1, 1)):
        assert bool((x[b] == res1.centroids[b, c]).all(-1).any())
    assert not torch.equal(res1.centroids[0, 1], res1.centroids[0, 3])
    for iters in (1, 3):
        res = batched_kmeans(x, 4, iters=iters, init=init)
        labels, cent = _kmeans_loop(x, init, iters)
        assert torch.equal(res.labels, labels)
        torch.testing.assert_close(res.centroids, cent, rtol=1e-10, atol=1e-10)


def test_deterministic_given_generator_and_chunking_invariant():
    x = _blobs(4, 64, 8, 6, seed=4).float()
    a = batched_kmeans(x, 6, iters=5, generator=torch.Generator().manual_seed(7))
    b = batched_kmeans(x, 6, iters=5, generator=torch.Generator().manual_seed(7), budget=64)  # tiny chunks
    assert torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.centroids, b.centroids)
    c = batched_kmeans(x, 6, iters=5, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a.centroids, c.centroids)


def _objective(x, res):
    return float(((x - res.centroids.gather(1, res.labels[..., None].expand(-1, -1, x.shape[-1]))) ** 2).sum())


def test_objective_non_increasing_and_warm_start_is_a_fixed_point():
    """Lloyd's rounds never increase the within-cluster sum of squares; once converged, a warm start from the
    centroids changes nothing."""
    x = _blobs(2, 200, 4, 6, seed=5)
    objs = [
        _objective(x, batched_kmeans(x, 6, iters=i, generator=torch.Generator().manual_seed(0))) for i in range(1, 8)
    ]
    assert all(b <= a + 1e-9 for a, b in zip(objs, objs[1:]))
    cold = batched_kmeans(x, 6, iters=50, generator=torch.Generator().manual_seed(0))
    warm = batched_kmeans(x, 6, iters=2, init=cold.centroids)
    assert torch.equal(warm.labels, cold.labels)
    torch.testing.assert_close(warm.centroids, cold.centroids)
    early = batched_kmeans(x, 6, iters=50, generator=torch.Generator().manual_seed(0), tol=0.0)
    assert early.iters < 50 and torch.equal(early.labels, cold.labels)


def test_bad_arguments():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="k <="):
        batched_kmeans(x, 6)
    with pytest.raises(ValueError, match="init centroids"):
        batched_kmeans(x, 2, init=torch.randn(2, 3, 3))
    with pytest.raises(ValueError, match="iters"):
        batched_kmeans(x, 2, iters=0)


# ----------------------------------------------------------------------------------------------------------
# The fused Triton assignment (kernels/kmeans_assign.py): the interpreter on tiny shapes, the GPU at Wan size
# ----------------------------------------------------------------------------------------------------------

# small tiles so that the tiny CPU shapes still take several point blocks and centroid tiles, with tails
_SMALL_TILES = dict(BLOCK_S=32, BLOCK_K=16, num_warps=4, num_stages=1)


def _kernel_assign(x, cent, config=None):
    from sagevideo.kernels.kmeans_assign import kmeans_assign

    return kmeans_assign(x, cent, config=config)


def _check_assignment(x, cent, labels, dist, *, chunk=None):
    """Check the kernel's ``labels``/``dist`` for points ``x`` and fp32 centroids ``cent`` against float64 and
    against the torch ``_assign``; returns the fraction of points with a clear nearest centroid.

    The kernel multiplies by the centroids rounded to the points' dtype (ĉ) with fp32 accumulation, so its
    score for centroid ``c`` differs from the float64 ``‖x − c‖²`` by at most ``shift + acc``: ``shift`` =
    ``max_c |‖x − ĉ‖² − ‖x − c‖²|`` (computed in float64), ``acc`` a generous bound on the fp32 rounding
    (``4·D·2⁻²⁴·(‖x‖ + max‖c‖)²``). Hence, for every point: the assigned centroid is within ``tol = 2·(shift
    + acc)`` of the best; where the best beats the second best by more than ``tol`` the label is the best
    (and equals torch's, whose own error is below ``acc``); the distance is within ``acc`` of the float64
    ``‖x − ĉ‖²`` of the assigned centroid.
    """
    n, s, d = x.shape
    k = cent.shape[1]
    c64 = cent.double()
    ch64 = cent.to(x.dtype).double()
    c_sq, ch_sq = (c64 * c64).sum(-1), (ch64 * ch64).sum(-1)
    c_max = torch.maximum(c64.norm(dim=-1), ch64.norm(dim=-1)).amax(-1)  # (N,)
    ref_labels, ref_dist = _assign(x, cent.float(), 1 << 26)
    step = chunk or s
    clear_total = 0
    for i in range(0, s, step):
        xb = x[:, i : i + step].double()
        x_sq = (xb * xb).sum(-1)
        dd = x_sq[..., None] + c_sq[:, None] - 2 * xb @ c64.transpose(1, 2)  # (N, chunk, k), float64
        dh = x_sq[..., None] + ch_sq[:, None] - 2 * xb @ ch64.transpose(1, 2)
        shift = (dh - dd).abs().amax(-1)
        acc = 4 * d * 2.0**-24 * (xb.norm(dim=-1) + c_max[:, None]) ** 2
        tol = 2 * (shift + acc)
        top = dd.topk(min(2, k), dim=-1, largest=False)
        best, best_idx = top.values[..., 0], top.indices[..., 0]
        margin = top.values[..., 1] - best if k > 1 else torch.full_like(best, float("inf"))
        lab = labels[:, i : i + step]
        assert lab.dtype == torch.int64 and bool(((lab >= 0) & (lab < k)).all())
        at = dd.gather(-1, lab[..., None]).squeeze(-1)
        assert bool((at - best <= tol).all()), float((at - best - tol).max())
        clear = margin > tol
        assert torch.equal(lab[clear], best_idx[clear])
        assert torch.equal(lab[clear], ref_labels[:, i : i + step][clear])
        got = dist[:, i : i + step].double()
        assert dist.dtype == torch.float32
        hat_at = dh.gather(-1, lab[..., None]).squeeze(-1)  # float64 distance to the rounded centroid
        assert bool(((got - hat_at).abs() <= acc).all()), float(((got - hat_at).abs() - acc).max())
        ref_at = ref_dist[:, i : i + step].double()
        assert bool(((got - ref_at).abs()[clear] <= (2 * (shift + acc))[clear]).all())
        clear_total += int(clear.sum())
    return clear_total / (n * s)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n, s, d, k", [(3, 50, 16, 7), (3, 200, 24, 40), (3, 130, 64, 33)])
def test_assign_kernel_matches_float64(dtype, n, s, d, k):
    """Tails everywhere: S, k not multiples of the tiles, D = 24 padded to 32."""
    g = torch.Generator().manual_seed(s * 100 + k)
    offset = torch.randn(n, 1, d, generator=g)  # a common offset, as keys have
    x = (torch.randn(n, s, d, generator=g) + offset).to(dtype)
    cent = x[:, torch.randperm(s, generator=g)[:k]].float() + 0.3 * torch.randn(n, k, d, generator=g)
    x_before, cent_before = x.clone(), cent.clone()
    labels, dist = _kernel_assign(x, cent, config=_SMALL_TILES)
    assert torch.equal(x, x_before) and torch.equal(cent, cent_before)  # inputs only read
    assert _check_assignment(x, cent, labels, dist) > 0.5
    # the default (interpreter) configuration gives the same result
    labels2, dist2 = _kernel_assign(x, cent)
    assert torch.equal(labels, labels2)
    torch.testing.assert_close(dist, dist2, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_assign_kernel_ties_go_to_lowest_index(dtype):
    """Small integers: every distance is exact in every dtype, so ties are exact; duplicated centroids sit in
    one tile and across tiles (BLOCK_K = 16), and the lowest index must win, as in torch."""
    n, s, d, k = 2, 70, 16, 40
    g = torch.Generator().manual_seed(11)
    cent = torch.randint(-2, 3, (n, k, d), generator=g).float()
    cent[:, 20] = cent[:, 3]
    cent[:, 37] = cent[:, 3]
    cent[:, 9] = cent[:, 5]
    cent[:, 33] = cent[:, 17]
    x = torch.randint(-2, 3, (n, s, d), generator=g).float()
    x[:, :8] = cent[:, 3:4]
    x[:, 8:12] = cent[:, 17:18]
    x[:, 12:14] = 0.5 * (cent[:, 3:4] + cent[:, 17:18])  # halfway: may be exactly equidistant
    x = x.to(dtype)
    labels, dist = _kernel_assign(x, cent, config=_SMALL_TILES)
    x64, c64 = x.double(), cent.double()
    dd = ((x64[:, :, None] - c64[:, None]) ** 2).sum(-1)
    best = dd.min(-1).values
    first = (dd == best[..., None]).to(torch.int64).argmax(-1)  # first index attaining the minimum
    n_ties = int(((dd == best[..., None]).sum(-1) > 1).sum())
    assert n_ties >= 2 * 12
    assert torch.equal(labels, first)
    assert torch.equal(dist.double(), best)
    assert torch.equal(labels[:, :8], torch.full((n, 8), 3))
    assert torch.equal(labels[:, 8:12], torch.full((n, 4), 17))
    ref_labels, ref_dist = _assign(x, cent, 1 << 26)
    assert torch.equal(labels, ref_labels) and torch.equal(dist, ref_dist)


def test_assign_kernel_fp32_strided_points():
    """fp32 points read in place through strides (a non-contiguous view), fp64 centroids cast to fp32."""
    g = torch.Generator().manual_seed(5)
    big = torch.randn(3, 2 * 90, 40, generator=g)
    x = big[:, ::2, 4:24]  # (3, 90, 20), strides (7200, 80, 1)
    assert not x.is_contiguous()
    cent = torch.randn(3, 19, 20, generator=g, dtype=torch.float64)
    big_before = big.clone()
    labels, dist = _kernel_assign(x, cent, config=_SMALL_TILES)
    assert torch.equal(big, big_before)
    assert _check_assignment(x, cent.float(), labels, dist) > 0.5
    ref_labels, _ = _assign(x, cent.float(), 1 << 26)
    assert (labels == ref_labels).float().mean() > 0.99
    # a transposed layout (stride of D ≠ 1) too
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    labels_t, dist_t = _kernel_assign(xt, cent, config=_SMALL_TILES)
    assert torch.equal(labels_t, labels) and torch.equal(dist_t, dist)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_kmeans_triton_backend_matches_torch(dtype):
    """Whole Lloyd rounds through the kernel (interpreter) equal the torch path on separated blobs, empty
    clusters included."""
    x = _blobs(2, 90, 8, 5, seed=6).to(dtype)
    init = init_centroids(x, 6, torch.Generator().manual_seed(1))
    init[:, 4] = 1e3  # empty after the first assignment: re-seeded
    a = batched_kmeans(x, 6, iters=3, init=init, backend="torch")
    b = batched_kmeans(x, 6, iters=3, init=init, backend="triton")
    assert torch.equal(a.labels, b.labels) and torch.equal(a.sizes, b.sizes) and torch.equal(a.order, b.order)
    torch.testing.assert_close(a.centroids, b.centroids)
    assert b.centroids.dtype == torch.float32


def test_backend_argument(monkeypatch):
    x = torch.randn(2, 20, 4)
    with pytest.raises(ValueError, match="backend"):
        batched_kmeans(x, 3, backend="cuda")
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        batched_kmeans(x.double(), 3, backend="triton")
    # auto on the CPU is the torch path (the fp64 test above compares it with the loop implementation)
    g = torch.Generator()
    a = batched_kmeans(x, 3, generator=g.manual_seed(0))
    b = batched_kmeans(x, 3, generator=g.manual_seed(0), backend="torch")
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        batched_kmeans(x, 3, backend="triton")


def _update_before(x, labels, dist, k, budget):
    """``_update`` as it was before it became sync-free (re-seeding behind ``bool(empty.any())``)."""
    n, s, d = x.shape
    dtype = dist.dtype
    sums = torch.zeros(n, k, d, dtype=dtype, device=x.device)
    step = max(1, min(s, budget // max(1, n * d)))
    for i in range(0, s, step):
        lab = labels[:, i : i + step]
        sums.scatter_add_(1, lab[..., None].expand(-1, -1, d), x[:, i : i + step].to(dtype))
    sizes = torch.zeros(n, k, dtype=torch.int64, device=x.device)
    sizes.scatter_add_(1, labels, torch.ones_like(labels))
    centroids = sums / sizes.clamp_min(1)[..., None].to(dtype)
    empty = sizes == 0
    if bool(empty.any()):
        order = torch.sort(dist, dim=1, descending=True, stable=True).indices
        rank = (torch.cumsum(empty.to(torch.int64), dim=1) - 1).clamp_min(0)
        point = torch.gather(order, 1, rank)
        seeds = torch.gather(x, 1, point[..., None].expand(-1, -1, d)).to(dtype)
        centroids = torch.where(empty[..., None], seeds, centroids)
    return centroids, sizes


@pytest.mark.parametrize(
    "x_dtype, dist_dtype",
    [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.float32)],
)
@pytest.mark.parametrize("budget", [1 << 26, 7])
def test_update_unchanged(x_dtype, dist_dtype, budget):
    """The unconditional re-seeding gives bit for bit what the guarded one gave: with empty clusters (several
    per set, different counts per set, tied distances) and without."""
    g = torch.Generator().manual_seed(3)
    n, s, d, k = 3, 60, 5, 9
    x = torch.randn(n, s, d, generator=g).to(x_dtype)
    dist = torch.randint(0, 4, (n, s), generator=g).to(dist_dtype)  # many ties: the stable order matters
    labels = torch.randint(0, 6, (n, s), generator=g)  # clusters 6..8 empty everywhere
    labels[1][labels[1] == 2] = 0  # and cluster 2 of set 1
    labels[2] = torch.arange(s) % k  # set 2 has no empty cluster
    new_c, new_s, order = _update(x, labels, dist, k, budget)
    old_c, old_s = _update_before(x, labels, dist, k, budget)
    assert torch.equal(new_c, old_c) and torch.equal(new_s, old_s)
    assert torch.equal(order, torch.sort(labels, dim=1, stable=True).indices)
    if x_dtype != torch.float64:  # the summing kernel (interpreter): the same sizes and re-seeds, sums to rounding
        ker_c, ker_s, ker_o = _update(x, labels, dist, k, budget, kernel=True)
        assert torch.equal(ker_s, old_s) and torch.equal(ker_o, order)
        torch.testing.assert_close(ker_c, old_c, rtol=1e-6, atol=1e-6)
    full = torch.arange(s).repeat(n, 1) % k  # no empty cluster at all
    new_c, new_s, _ = _update(x, full, dist, k, budget)
    old_c, old_s = _update_before(x, full, dist, k, budget)
    assert torch.equal(new_c, old_c) and torch.equal(new_s, old_s)


# ----------------------------------------------------------------------------------------------------------
# GPU: Wan2.1-1.3B shapes (12 heads, 32760 video tokens, D = 128, 1000 key clusters), bf16
# ----------------------------------------------------------------------------------------------------------


def _wan_like(seed, n=12, s=32760, d=128, k=1000):
    g = torch.Generator(device="cuda").manual_seed(seed)
    offset = 2 * torch.randn(n, 1, d, generator=g, device="cuda")
    x = (torch.randn(n, s, d, generator=g, device="cuda") + offset).to(torch.bfloat16)
    idx = torch.randperm(s, generator=g, device="cuda")[:k]
    cent = x[:, idx].float() + 0.1 * torch.randn(n, k, d, generator=g, device="cuda")  # not bf16 values
    return x, cent


@pytest.mark.gpu
def test_assign_kernel_wan_size_gpu():
    x, cent = _wan_like(0)
    x_before = x.clone()
    labels, dist = _kernel_assign(x, cent)
    torch.cuda.synchronize()
    assert torch.equal(x, x_before)
    assert _check_assignment(x, cent, labels, dist, chunk=2048) > 0.5
    # the 300 query clusters too, on a strided view (BHSD slice merged over heads, as semantic.py passes it)
    xs = torch.cat([x, x[:, :8]], dim=1)[:, :32760]
    assert not xs.is_contiguous()
    labels_q, dist_q = _kernel_assign(xs, cent[:, :300])
    assert _check_assignment(xs, cent[:, :300], labels_q, dist_q, chunk=2048) > 0.5


@pytest.mark.gpu
def test_batched_kmeans_triton_vs_torch_gpu():
    """Two warm-started rounds, as at every sparse step: the kernel path and the torch path reach the same
    objective. Labels differ on near-ties only: the kernel multiplies by bf16-rounded centroids, which on this
    data moves ~1% of the labels of one assignment (every one a near-tie, as the float64 check above shows)
    and ~5% after two rounds (a CPU emulation of both paths gave 99.2% / 95.4% agreement, objectives 4e-5
    apart)."""
    x, cent = _wan_like(1)
    a = batched_kmeans(x, 1000, iters=2, init=cent, backend="torch")
    b = batched_kmeans(x, 1000, iters=2, init=cent, backend="triton")
    assert (a.labels == b.labels).float().mean() > 0.9
    assert torch.equal(b.sizes.sum(-1), torch.full((x.shape[0],), x.shape[1], device="cuda"))

    def objective(res):
        centers = res.centroids.double().gather(1, res.labels[..., None].expand(-1, -1, x.shape[-1]))
        return float(((x.double() - centers) ** 2).sum())

    assert abs(objective(b) - objective(a)) <= 1e-3 * objective(a)
    # auto takes the kernel on CUDA (one round: no scatter-add rounding in between, so bit-identical labels)
    one = batched_kmeans(x, 1000, iters=1, init=cent, backend="triton")
    auto = batched_kmeans(x, 1000, iters=1, init=cent)
    assert torch.equal(one.labels, auto.labels)


@pytest.mark.gpu
def test_warm_kmeans_does_not_sync_gpu():
    """No host synchronisation in a warm-started call (tol=None), empty clusters or not."""
    x, cent = _wan_like(2, s=4096, k=300)
    cent[:, 7] = 1e4  # an empty cluster
    batched_kmeans(x, 300, iters=2, init=cent)  # compiles and picks the launch configuration
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = batched_kmeans(x, 300, iters=2, init=cent)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert res.iters == 2


def _sums_case(n, s, d, k, seed, dtype, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, s, d, generator=g) * 4 + 1).to(dtype)
    labels = torch.randint(0, k, (n, s), generator=g)
    labels[:, : s // 8] = 5  # one crowded cluster (several row blocks of the kernel)
    labels[labels == 3] = 4  # and an empty one
    return x.to(device), labels.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, s, d, k", [(3, 500, 16, 37), (2, 333, 24, 7), (1, 64, 64, 64)])
def test_cluster_sums_kernel_matches_reference(dtype, n, s, d, k):
    """``kernels/kmeans_sums.py`` (interpreter) sums the same points per cluster as the scatter-add reference
    and as float64, for any D (24: masked), empty and crowded clusters; its inputs are only read."""
    from sagevideo.kernels.kmeans_sums import cluster_sums
    from sagevideo.sparse.kmeans import _order_by_label, cluster_sums_reference

    x, labels = _sums_case(n, s, d, k, seed=s + d, dtype=dtype)
    order, offsets = _order_by_label(labels, k)
    before = (x.clone(), order.clone(), offsets.clone())
    got = cluster_sums(x, order, offsets, block_r=16, chunk_rows=32)  # the crowded cluster in several parts
    assert all(torch.equal(a, b) for a, b in zip(before, (x, order, offsets)))
    ref = cluster_sums_reference(x, labels, k, torch.float32)
    exact = cluster_sums_reference(x, labels, k, torch.float64)
    assert got.dtype == torch.float32 and got.shape == (n, k, d)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-4)
    assert torch.equal(got[:, 3], torch.zeros_like(got[:, 3]))  # the empty cluster
    # strided points (a BHSD slice, as semantic.py passes them) and int32 indices give the same sums
    xs = torch.cat([-x, x], dim=2)[..., d:]  # row stride 2·D
    assert not xs.is_contiguous()
    o32, off32 = order.to(torch.int32), offsets.to(torch.int32)
    torch.testing.assert_close(cluster_sums(xs, o32, off32), ref, rtol=1e-5, atol=1e-4)
    for block_r, chunk_rows in ((64, 64), (16, 16), (32, 4096)):
        torch.testing.assert_close(cluster_sums(x, order, offsets, block_r=block_r, chunk_rows=chunk_rows), ref,
                                   rtol=1e-5, atol=1e-4)


def test_cluster_sums_bad_arguments():
    from sagevideo.kernels.kmeans_sums import cluster_sums

    x = torch.randn(2, 10, 16)
    order = torch.arange(10).repeat(2, 1)
    offsets = torch.tensor([[0, 4, 10], [0, 10, 10]])
    with pytest.raises(ValueError, match="do not match"):
        cluster_sums(x, order[:, :9], offsets)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        cluster_sums(x.double(), order, offsets)
    with pytest.raises(ValueError, match="int32 or int64"):
        cluster_sums(x, order.float(), offsets)
    with pytest.raises(ValueError, match="power of two"):
        cluster_sums(x, order, offsets, block_r=24)
    with pytest.raises(ValueError, match="multiple of block_r"):
        cluster_sums(x, order, offsets, block_r=16, chunk_rows=40)


@pytest.mark.gpu
def test_cluster_sums_kernel_wan_size_gpu():
    """Wan2.1-1.3B size (12 heads × 32,760 points, D = 128, 1,000 clusters, bf16) against float64."""
    from sagevideo.kernels.kmeans_sums import cluster_sums
    from sagevideo.sparse.kmeans import _order_by_label, cluster_sums_reference

    x, cent = _wan_like(3)
    labels, _ = _kernel_assign(x, cent)
    labels[:, :20000] = 7  # one cluster of 20,000 points: 20 parts
    got = cluster_sums(x, *_order_by_label(labels, 1000))
    exact = cluster_sums_reference(x, labels, 1000, torch.float64)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-3)
    assert torch.equal(got, cluster_sums(x, *_order_by_label(labels, 1000)))  # the same bits every run


@pytest.mark.parametrize("k", [7, 40_000])
def test_order_by_label_is_the_stable_sort(k):
    """The sort keys are narrowed (int16 up to 32,767 clusters, int32 beyond): the order and the offsets are
    those of a stable sort of the int64 labels."""
    from sagevideo.sparse.kmeans import _order_by_label

    g = torch.Generator().manual_seed(k)
    labels = torch.randint(0, k, (3, 500), generator=g)
    labels[:, :50] = k - 1  # many ties, at the largest label
    order, offsets = _order_by_label(labels, k)
    assert torch.equal(order, torch.sort(labels, dim=1, stable=True).indices)
    counts = torch.stack([torch.bincount(row, minlength=k) for row in labels])
    assert torch.equal(offsets, torch.nn.functional.pad(counts.cumsum(-1), (1, 0)))
