"""Batched k-means (Sparse VideoGen2's clustering step) against a plain loop implementation."""

import pytest
import torch

from sagevideo.sparse.kmeans import batched_kmeans, init_centroids


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
