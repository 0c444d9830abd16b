"""Semantic-aware permutation (Sparse VideoGen2): top-p selection, permutations, cluster → block expansion."""

import math

import pytest
import torch

from sagevideo.sparse import patterns as P
from sagevideo.sparse.blocks import layout_token_mask
from sagevideo.sparse.semantic import cluster_weights, invert_perm, labels_to_perm, plan_semantic, top_p_keep


def _top_p_brute(w, top_p, min_count):
    """One row: indices by decreasing weight (ties: lower index), kept while the mass before is < top_p."""
    order = sorted(range(len(w)), key=lambda j: (-w[j], j))
    keep = [False] * len(w)
    mass = 0.0
    for rank, j in enumerate(order):
        if rank < min_count or (mass < top_p if top_p < 1 else w[j] > 0):
            keep[j] = True
        mass += w[j]
    return keep


@pytest.mark.parametrize("top_p,min_count", [(0.5, 1), (0.9, 3), (0.99, 1), (1.0, 2), (0.3, 6)])
def test_top_p_matches_brute_force(top_p, min_count):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 5, 9, generator=g, dtype=torch.float64)
    logits[0, 0, 3] = -math.inf  # an empty cluster: weight 0
    logits[1, 1, :4] = 0.7  # ties
    w = torch.softmax(logits, -1)
    got = top_p_keep(w, top_p, min_count)
    for i in range(4):
        for j in range(5):
            assert got[i, j].tolist() == _top_p_brute(w[i, j].tolist(), top_p, min_count), (i, j)
    if top_p < 1:  # the kept mass reaches top_p
        kept = (w * got).sum(-1)
        assert bool((kept >= top_p - 1e-12).all())


def test_cluster_weights_are_size_weighted_softmax():
    g = torch.Generator().manual_seed(1)
    qc, kc = torch.randn(2, 3, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    sizes = torch.tensor([[1, 4, 0, 2, 9], [3, 3, 3, 3, 3]])
    w = cluster_weights(qc, kc, sizes, 0.5)
    for b in range(2):
        for i in range(3):
            e = [sizes[b, j].item() * math.exp(0.5 * float(qc[b, i] @ kc[b, j])) for j in range(5)]
            want = torch.tensor([x / sum(e) for x in e])
            torch.testing.assert_close(w[b, i], want, rtol=1e-5, atol=1e-7)
    assert bool((w[0, :, 2] == 0).all())


def test_perm_round_trip_and_contiguous_clusters():
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 5, (3, 40), generator=g)
    perm = labels_to_perm(labels)
    inv = invert_perm(perm)
    x = torch.randn(3, 40, generator=g)
    assert torch.equal(x.gather(1, perm).gather(1, inv), x)
    assert torch.equal(perm.gather(1, inv), torch.arange(40).expand(3, 40))
    sorted_labels = labels.gather(1, perm)
    assert bool((sorted_labels[:, 1:] >= sorted_labels[:, :-1]).all())
    # stable: within a cluster, original order is kept
    for b in range(3):
        for c in range(5):
            idx = perm[b][sorted_labels[b] == c]
            assert bool((idx[1:] > idx[:-1]).all())


def _qk(b, hq, hk, s, d, seed):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(6, d, generator=g)
    q = centers[torch.randint(0, 6, (b, hq, s), generator=g)] + 0.5 * torch.randn(b, hq, s, d, generator=g)
    k = centers[torch.randint(0, 6, (b, hk, s), generator=g)] + 0.5 * torch.randn(b, hk, s, d, generator=g)
    return q, k


@pytest.mark.parametrize("text_first", [None, True, False])
def test_plan_token_mask_is_cluster_pair_map_with_dense_text(text_first):
    """Expand the plan to tokens (original order) and compare with the mask implied by the labels: video query
    i attends video key j iff (cluster(i), cluster(j)) is kept; text rows and columns all True."""
    grid, n_text = (3, 4, 5), 6
    n_video = 60
    text = None if text_first is None else ((0, n_text) if text_first else (n_video, n_text))
    s = n_video + (0 if text is None else n_text)
    layout = P.token_layout(grid, s, text)
    b, hq, hk, d = 2, 4, 2, 8
    q, k = _qk(b, hq, hk, s, d, seed=3)
    plan = plan_semantic(
        q, k, layout, q_clusters=7, k_clusters=9, iters=3, top_p=0.6, min_kc_ratio=0.2,
        generator=torch.Generator().manual_seed(0), block_m=4, block_n=3,
    )
    mask_perm = layout_token_mask(plan.layout, s, s)  # (B, H, S, S) in permuted order
    inv_q, inv_k = invert_perm(plan.q_perm), invert_perm(plan.kv_perm)
    mask = mask_perm.gather(2, inv_q[..., None].expand(-1, -1, -1, s))
    mask = mask.gather(3, inv_k[:, :, None, :].expand(-1, -1, s, -1))
    keep = plan.info["cluster_keep"]
    vs = layout.video_slice
    # labels from the permutation + sizes: position r of the sorted video holds cluster searchsorted(cumsizes)
    for bi in range(b):
        for h in range(hq):
            qsz = plan.info["q_sizes"][bi, h]
            ksz = plan.info["k_sizes"][bi, h // 2]
            q_lab = torch.empty(n_video, dtype=torch.long)
            q_lab[plan.q_perm[bi, h, vs] - layout.video_start] = torch.repeat_interleave(torch.arange(7), qsz)
            k_lab = torch.empty(n_video, dtype=torch.long)
            k_lab[plan.kv_perm[bi, h, vs] - layout.video_start] = torch.repeat_interleave(torch.arange(9), ksz)
            want = keep[bi, h][q_lab[:, None], k_lab[None, :]]
            assert torch.equal(mask[bi, h, vs, vs], want)
            if text is not None:
                ts = layout.text_slice
                assert bool(mask[bi, h, ts].all()) and bool(mask[bi, h, :, ts].all())
    # the density is the kept fraction of token pairs, per head
    torch.testing.assert_close(plan.info["density_per_head"], mask.double().mean((-1, -2)), rtol=1e-12, atol=0)
    # the query heads sharing a key head share its permutation
    assert torch.equal(plan.kv_perm[:, 0], plan.kv_perm[:, 1])
    assert 0 < plan.density < 1
    # text is never permuted
    if text is not None:
        assert torch.equal(plan.q_perm[..., layout.text_slice], torch.arange(s)[layout.text_slice].expand(b, hq, -1))


def test_batch_entries_get_their_own_clustering():
    grid = (2, 3, 4)
    q1, k1 = _qk(1, 2, 2, 24, 8, seed=4)
    q2, k2 = _qk(1, 2, 2, 24, 8, seed=5)
    layout = P.token_layout(grid, 24)
    kw = dict(q_clusters=4, k_clusters=5, iters=5, block_m=4, block_n=4)
    gen = torch.Generator().manual_seed(0)
    both = plan_semantic(torch.cat([q1, q2]), torch.cat([k1, k2]), layout, generator=gen, **kw)
    one = plan_semantic(q2, k2, layout, generator=torch.Generator().manual_seed(0), **kw)
    assert not torch.equal(both.q_perm[0], both.q_perm[1])
    # entry 1 of the batch is clustered exactly as it would be alone
    assert torch.equal(both.q_perm[1], one.q_perm[0]) and torch.equal(both.kv_perm[1], one.kv_perm[0])
    torch.testing.assert_close(both.info["q_centroids"][2:], one.info["q_centroids"])


def test_top_p_one_keeps_everything_and_warm_start_shapes():
    layout = P.token_layout((2, 3, 4), 24)
    q, k = _qk(1, 2, 2, 24, 8, seed=6)
    plan = plan_semantic(q, k, layout, q_clusters=30, k_clusters=30, top_p=1.0, block_m=8, block_n=8)
    assert plan.density == pytest.approx(1.0)  # clusters clamped to 24 tokens; every pair kept
    assert plan.info["q_centroids"].shape == (2, 24, 8)
    with pytest.raises(ValueError, match="cluster count"):
        plan_semantic(q, k, layout, q_clusters=5, k_clusters=5, q_init=torch.zeros(2, 4, 8))
