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


def _warm_plans(static, text_first, seed=7, **extra):
    """A cold plan, then a warm-started one from its centroids (what a sampler's second step does)."""
    grid, n_text, n_video = (3, 4, 6), 5, 72
    text = None if text_first is None else ((0, n_text) if text_first else (n_video, n_text))
    s = n_video + (0 if text is None else n_text)
    layout = P.token_layout(grid, s, text)
    q, k = _qk(2, 4, 2, s, 8, seed=seed)
    kw = dict(q_clusters=7, k_clusters=11, top_p=0.7, min_kc_ratio=0.2, block_m=8, block_n=16, **extra)
    cold = plan_semantic(q, k, layout, generator=torch.Generator().manual_seed(0), iters=4, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    q2 = q + 0.2 * torch.randn(q.shape, generator=g)
    k2 = k + 0.2 * torch.randn(k.shape, generator=g)
    warm = plan_semantic(q2, k2, layout, q_init=cold.info["q_centroids"], k_init=cold.info["k_centroids"],
                         static=static, **kw)
    return warm, layout, s, (q2, k2)


@pytest.mark.parametrize("text_first", [None, True, False])
def test_static_plan_is_the_same_plan(text_first):
    """``static=True`` (block counts from the bound, NK slots per list, no host sync until the end) computes the
    plan of the default form: same permutations, centroids, cluster pairs, token mask, per-head density; only
    the padding of its layout differs."""
    dyn, layout, s, _ = _warm_plans(False, text_first)
    sta, _, _, _ = _warm_plans(True, text_first)
    for name in ("q_centroids", "k_centroids", "q_sizes", "k_sizes", "cluster_keep", "density_per_head"):
        assert torch.equal(dyn.info[name], sta.info[name]), name
    assert torch.equal(dyn.q_perm, sta.q_perm) and torch.equal(dyn.kv_perm, sta.kv_perm)
    assert torch.equal(layout_token_mask(dyn.layout, s, s), layout_token_mask(sta.layout, s, s))
    assert dyn.density == sta.density and dyn.dense_heads == sta.dense_heads
    # static: built with NK slots a list, then packed block by block; default: one list per mask row, shared
    lay = sta.layout
    assert lay.num_kv_blocks >= dyn.layout.num_kv_blocks and lay.kv_index.numel() == int(lay.kv_count.sum())
    assert dyn.layout.kv_index.numel() <= lay.kv_index.numel()
    assert sta.layout.kv_geometry() == (False, 16) and dyn.layout.kv_geometry()[1] <= 16


def test_static_plan_needs_no_data_from_the_device():
    """What makes the static form capturable in a CUDA graph: it runs on fake tensors (shapes only, no values),
    so no step reads a value back to the host; the default form cannot (it reads block counts)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sagevideo.sparse import semantic as S

    _, layout, s, (q, k) = _warm_plans(True, True)
    cold, _, _, _ = _warm_plans(True, True)  # centroids of the right shapes
    vs, nv = layout.video_slice, layout.video_len
    settings = dict(iters=2, top_p=0.7, min_count=3, scale=0.35, block_m=8, block_n=16)
    args = (layout, 2, 4, 2, 7, 11)
    for static in (True, False):
        qv, kv = q[:, :, vs].reshape(8, nv, 8), k[:, :, vs].reshape(4, nv, 8)
        qi, ki = cold.info["q_centroids"], cold.info["k_centroids"]
        S._plan_tensors(qv, kv, *args, q_init=qi, k_init=ki, generator=None, static=static, **settings)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = [mode.from_tensor(t) for t in (qv, kv, qi, ki)]
            run = lambda: S._plan_tensors(fake[0], fake[1], *args, q_init=fake[2], k_init=fake[3],  # noqa: E731
                                          generator=None, static=static, **settings)
            if static:
                out = run()
                assert out["layout"].kv_index.numel() == 2 * 4 * (7 + 1) * out["layout"].num_kv_blocks
            else:
                with pytest.raises(Exception, match="DataDependent|data-dependent|_local_scalar_dense"):
                    run()


def test_static_plans_refuse_unaligned_key_blocks():
    layout = P.token_layout((2, 3, 4), 24)
    q, k = _qk(1, 2, 2, 24, 8, seed=6)
    with pytest.raises(ValueError, match="multiple of 16"):
        plan_semantic(q, k, layout, q_clusters=4, k_clusters=4, block_n=24, static=True)


@pytest.mark.gpu
@pytest.mark.parametrize("text_first", [None, False])
def test_graphed_plan_replays_the_eager_plan(text_first, monkeypatch):
    """On CUDA, the warm plan replayed from a CUDA graph equals the static eager plan for each new input (the
    graph reads its input buffers afresh), one capture serves every call of a signature, and the attention run
    with either plan is the same."""
    from sagevideo.sparse.api import SparseState, sparse_attention
    from sagevideo.sparse import semantic
    from sagevideo.sparse.semantic import PLAN_GRAPHS

    monkeypatch.setattr(semantic, "DENSE_TILE_FRACTION", None)  # keep the block-sparse path at this small size
    PLAN_GRAPHS.clear()
    grid, n_text = (4, 16, 16), 40
    n_video = 4 * 16 * 16
    text = None if text_first is None else (n_video, n_text)
    s = n_video + (0 if text is None else n_text)
    layout = P.token_layout(grid, s, text)
    q, k = _qk(2, 4, 2, s, 64, seed=11)
    q, k = q.cuda().half(), k.cuda().half()
    kw = dict(q_clusters=20, k_clusters=50, block_m=64, block_n=32)
    cold = plan_semantic(q, k, layout, generator=torch.Generator().manual_seed(0), iters=5, **kw)
    init = dict(q_init=cold.info["q_centroids"], k_init=cold.info["k_centroids"])
    captures = PLAN_GRAPHS.captures
    for step in range(3):
        qn = q + 0.3 * torch.randn_like(q)
        kn = k + 0.3 * torch.randn_like(k)
        eager = plan_semantic(qn, kn, layout, static=True, **init, **kw)
        graphed = plan_semantic(qn, kn, layout, graph=True, **init, **kw)
        assert graphed.info["graph"] == (step > 0)  # the first call captures and returns its eager run
        for name in ("q_centroids", "k_centroids", "cluster_keep", "density_per_head"):
            assert torch.equal(eager.info[name], graphed.info[name]), (step, name)
        assert torch.equal(eager.q_perm, graphed.q_perm) and torch.equal(eager.kv_perm, graphed.kv_perm)
        for f in ("q_start", "q_len", "k_start", "k_len", "kv_index", "kv_offset", "kv_count"):
            assert torch.equal(getattr(eager.layout, f), getattr(graphed.layout, f)), (step, f)
        init = dict(q_init=graphed.info["q_centroids"], k_init=graphed.info["k_centroids"])
    assert PLAN_GRAPHS.captures == captures + 1
    # through the public op: the same output with the graph and without it
    v = torch.randn_like(k)
    outs = []
    for plan_graph in (False, True):
        st = SparseState()
        for _ in range(2):  # cold, then warm (graphed when allowed)
            out = sparse_attention(q, k, v, grid=grid, text=text, method="semantic", state=st, plan_graph=plan_graph,
                                   precision="int8-fp16", q_clusters=20, k_clusters=50, block_m=64, block_n=32,
                                   kmeans_every=1)
        assert st.plan.info["graph"] == plan_graph
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


def test_tile_fraction_counts_the_kernels_tiles():
    """``tile_fraction_per_head``: the (query block, kept KV block) pairs the kernel walks over the tiles of
    dense attention with the same tile shape. Ragged cluster blocks make it exceed the density."""
    plan, layout, s, _ = _warm_plans(False, False)
    lay = plan.layout
    want = torch.tensor([[int(lay.kv_count[bi, h].sum()) / (math.ceil(s / 8) * math.ceil(s / 16))
                          for h in range(lay.heads)] for bi in range(lay.batch)], dtype=torch.float64)
    torch.testing.assert_close(plan.info["tile_fraction_per_head"], want, rtol=1e-12, atol=0)
    assert bool((plan.info["tile_fraction_per_head"] > plan.info["density_per_head"]).all())
    assert plan.dense_heads == ()  # on the CPU the rule does not apply


@pytest.mark.gpu
def test_heads_costing_more_tiles_than_dense_run_dense_on_cuda(monkeypatch, caplog):
    """On CUDA, heads whose ragged blocks would make the kernel walk ≥ DENSE_TILE_FRACTION of the dense tiles run
    through the dense op (here all of them: tiny clusters), and without the rule the same plan runs sparse."""
    from sagevideo.ops import attention
    from sagevideo.sparse import semantic
    from sagevideo.sparse.api import SparseState, sparse_attention

    q, k = _qk(1, 4, 4, 96, 32, seed=12)
    q, k = q.cuda().half(), k.cuda().half()
    v = torch.randn_like(k)
    kw = dict(grid=(2, 6, 8), method="semantic", q_clusters=12, k_clusters=24, top_p=0.6, block_m=16, block_n=16,
              precision="int8-fp16")
    st = SparseState()
    with caplog.at_level("WARNING", logger="sagevideo"):
        out = sparse_attention(q, k, v, state=st, **kw)
    assert "would make the kernel walk" in caplog.text  # said, not silent
    fractions = st.plan.info["tile_fraction_per_head"]
    assert bool((fractions >= semantic.DENSE_TILE_FRACTION).all())
    assert float(st.plan.info["density_per_head"].mean()) < 0.9  # the selection is sparse ...
    assert st.dense_calls == 1 and st.last_density == 1.0  # ... but every pair is computed, and reported so
    torch.testing.assert_close(out, attention(q, k, v, precision="int8-fp16"), atol=0, rtol=0)
    monkeypatch.setattr(semantic, "DENSE_TILE_FRACTION", None)
    st = SparseState()
    sparse = sparse_attention(q, k, v, state=st, **kw)
    assert st.dense_calls == 0 and (sparse.float() - out.float()).abs().max() > 1e-3
