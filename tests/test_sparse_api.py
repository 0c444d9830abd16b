"""sparse_attention / plan / SparseState: exactness at full density, locality, text, state across calls."""

import math

import pytest
import torch

from sagevideo import attention
from sagevideo.sparse import patterns as P
from sagevideo.sparse.api import SparseState, plan_sparse, sparse_attention
from sagevideo.sparse.blocks import (
    block_mask_to_layout,
    block_sparse_attention,
    block_sparse_reference,
    layout_token_mask,
    uniform_blocks,
)
from sagevideo.sparse.semantic import invert_perm
from sagevideo.testing import error_metrics

SMALL = dict(block_m=16, block_n=16, check_layout=True)


def _rand(b, h, s, d=16, seed=0, hk=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g)
    k = torch.randn(b, hk or h, s, d, generator=g)
    v = torch.randn(b, hk or h, s, d, generator=g)
    return q, k, v


def _field_qkv(grid, lengths, d=32, beta=6.0, noise=0.3, seed=0):
    """Q = K = random Fourier features of the (t, h, w) coordinates with per-head length scales, plus noise:
    q_i·k_j ≈ β·exp(−½‖(x_i − x_j)/ℓ‖²), so each head attends a neighbourhood of the grid (short ℓ_t: within
    frames; short ℓ_h, ℓ_w: same place across frames). V is noise."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    x = torch.stack([t, h, w], -1).reshape(-1, 3).float()
    feats = []
    for ls in lengths:
        omega = torch.randn(d // 2, 3, generator=g) / torch.tensor(ls)
        phase = 2 * math.pi * torch.rand(d // 2, generator=g)
        z = x @ omega.T + phase
        feats.append(torch.cat([z.cos(), z.sin()], -1) * math.sqrt(2.0 / d * beta * math.sqrt(d)))
    base = torch.stack(feats)[None]
    sigma = noise * math.sqrt(beta / d)
    q = base + sigma * torch.randn(base.shape, generator=g)
    k = base + sigma * torch.randn(base.shape, generator=g)
    v = torch.randn(base.shape, generator=g)
    return q, k, v


# ----------------------------------------------------------------------------------------------------------
# Exactness when nothing is dropped
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["spatiotemporal", "semantic"])
@pytest.mark.parametrize("text", [None, "first", "last"])
def test_full_density_equals_dense(method, text):
    grid, n_text = (3, 4, 5), 7
    s = 60 + (n_text if text else 0)
    tx = None if text is None else ((0, n_text) if text == "first" else (60, n_text))
    q, k, v = _rand(2, 3, s, seed=1)
    kpm = None
    if text:
        kpm = torch.ones(2, s, dtype=torch.bool)
        kpm[1, tx[0] + 4 : tx[0] + n_text] = False  # padded text of the second prompt
    state = SparseState()
    out, lse = sparse_attention(
        q, k, v, grid=grid, text=tx, method=method, density=1.0, top_p=1.0, q_clusters=5, k_clusters=8,
        precision="dense", key_padding_mask=kpm, return_lse=True, state=state, **SMALL,
    )
    ref, ref_lse = attention(q, k, v, precision="dense", key_padding_mask=kpm, return_lse=True)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=1e-5)
    # a plan keeping every block runs the dense op (the block-sparse kernel walking every block is checked
    # against it in tests/test_block_sparse.py); a sparser one does not
    assert state.last_density == 1.0 and state.dense_calls == 1
    sparse_attention(q, k, v, grid=grid, text=tx, method=method, density=0.3, top_p=0.5, q_clusters=5,
                     k_clusters=8, precision="dense", key_padding_mask=kpm, state=state, **SMALL)
    # (random inputs: spatiotemporal profiling may keep every head dense; semantic top-p 0.5 keeps fewer blocks)
    assert state.dense_calls == state.report()["dense_calls"] == 1 + (state.last_density >= 1.0)
    assert method == "spatiotemporal" or state.last_density < 1.0


def test_bshd_gqa_and_lse_layout_match_bhsd():
    grid = (2, 3, 4)
    q, k, v = _rand(1, 4, 24, seed=2, hk=2)
    args = dict(
        grid=grid, method="semantic", top_p=1.0, q_clusters=3, k_clusters=4, precision="dense", return_lse=True, **SMALL
    )
    out, lse = sparse_attention(q, k, v, **args)
    out2, lse2 = sparse_attention(*(x.transpose(1, 2) for x in (q, k, v)), layout="BSHD", **args)
    ref, ref_lse = attention(q, k, v, precision="dense", return_lse=True)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out2.transpose(1, 2), out, atol=1e-6, rtol=1e-6)
    assert lse2.shape == (1, 24, 4)  # sagevideo.attention's BSHD convention
    torch.testing.assert_close(lse2.transpose(1, 2), lse)


def test_temporal_heads_permute_and_return_rows_in_original_order():
    """All heads temporal at full density: the sequence really is permuted (position-major), and the output
    still equals dense attention row for row."""
    grid = (3, 2, 3)
    layout = P.token_layout(grid, 18 + 4, (18, 4))
    q, k, v = _rand(1, 2, 22, seed=3)
    p = P.plan_spatiotemporal(torch.full((1, 2), P.HEAD_TEMPORAL), layout, density=1.0, block_m=4, block_n=4)
    assert not torch.equal(p.q_perm[0, 0], torch.arange(22))
    assert torch.equal(p.q_perm[0, 0, :18], P.position_major_perm(grid))
    out = block_sparse_attention(q, k, v, p.layout, precision="dense", q_perm=p.q_perm, kv_perm=p.kv_perm)
    torch.testing.assert_close(out, attention(q, k, v, precision="dense"), atol=2e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# The spatiotemporal plan as a token mask
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [[[1, 2, 0], [2, 1, 1]], [[1, 1, 1], [1, 1, 1]], [[0, 0, 2], [0, 2, 2]]])
def test_spatiotemporal_plan_equals_the_keep_map_construction(classes):
    """The plan points each head at per-class block lists built once; it must be the layout that compacting
    each head's keep map gives (same lists in the same order), the same permutations and densities, and hold
    each class's lists once however many heads use them."""
    from sagevideo.sparse.blocks import block_mask_to_layout

    grid, n_text = (4, 3, 5), 6
    layout = P.token_layout(grid, 60 + n_text, (60, n_text))
    cls = torch.tensor(classes)
    p = P.plan_spatiotemporal(cls, layout, density=0.3, block_m=8, block_n=4)
    maps = P.spatiotemporal_maps(layout, block_m=8, block_n=4, density=0.3)
    c = cls[:, :, None, None]
    keep = torch.where(c == P.HEAD_SPATIAL, maps.spatial, torch.where(c == P.HEAD_TEMPORAL, maps.temporal, True))
    b, h = cls.shape
    exp = lambda x: x.to(torch.int32)[None, None].expand(b, h, -1).contiguous()  # noqa: E731
    want = block_mask_to_layout(exp(maps.q_start), exp(maps.q_len), exp(maps.k_start), exp(maps.k_len), keep, 8, 4)
    for name in ("q_start", "q_len", "k_start", "k_len", "kv_count"):
        assert torch.equal(getattr(p.layout, name), getattr(want, name)), name
    assert torch.equal(p.layout.padded_lists(), want.padded_lists())
    one_each = [P.plan_spatiotemporal(torch.tensor([[c]]), layout, density=0.3, block_m=8, block_n=4).layout
                for c in range(3)]
    assert p.layout.kv_index.numel() == sum(int(lay.kv_count.sum()) for lay in one_each)
    # the plan's own alignment figures, from its host sync, equal the ones computed from the data
    assert p.layout.kv_aligned is want.kv_aligned is False and p.layout.kv_reach == want.kv_reach
    wide = P.plan_spatiotemporal(cls, layout, density=0.3, block_m=16, block_n=16).layout
    assert (wide.kv_aligned, wide.kv_reach) == block_mask_to_layout(
        wide.q_start, wide.q_len, wide.k_start, wide.k_len, wide.keep_matrix(), 16, 16).kv_geometry()
    dens = P.block_density(keep, maps.q_len, maps.k_len)
    torch.testing.assert_close(p.info["density_per_head"], dens)
    assert abs(p.density - float(dens.mean())) < 1e-12
    assert (p.q_perm is None) == (not (cls == P.HEAD_TEMPORAL).any())
    with pytest.raises(ValueError, match="head_classes"):
        P.plan_spatiotemporal(torch.tensor([[3]]), layout, density=0.3, block_m=8, block_n=4)


@pytest.mark.parametrize("text_first", [True, False])
def test_spatiotemporal_plan_covers_patterns_and_text_dense(text_first):
    """Mapped back to the original order, each head's mask contains its token pattern (spatial band + sink,
    or temporal neighbourhood), text rows and columns are all True, and a dense head keeps everything."""
    grid, n_text = (4, 3, 5), 6
    s = 60 + n_text
    layout = P.token_layout(grid, s, (0, n_text) if text_first else (60, n_text))
    classes = torch.tensor([[1, 2, 0], [2, 1, 1]])
    p = P.plan_spatiotemporal(classes, layout, density=0.3, block_m=8, block_n=4)
    w, r = p.info["width"], p.info["radius"]
    mperm = layout_token_mask(p.layout, s, s)
    perm = p.q_perm
    inv = invert_perm(perm)
    mask = mperm.gather(2, inv[..., None].expand(-1, -1, -1, s)).gather(3, inv[:, :, None, :].expand(-1, -1, s, -1))
    t, hh, ww = P.video_coords(grid, torch.arange(60))
    spatial = P.spatial_token_keep(t[:, None], t[None, :], w)
    temporal = P.temporal_token_keep(hh[:, None], ww[:, None], hh[None, :], ww[None, :], r)
    vs, ts = layout.video_slice, layout.text_slice
    for b in range(2):
        for h in range(3):
            m = mask[b, h]
            assert bool(m[ts].all()) and bool(m[:, ts].all())
            c = int(classes[b, h])
            if c == 0:
                assert bool(m.all())
            else:
                pattern = spatial if c == 1 else temporal
                assert bool(m[vs, vs][pattern].all())  # superset of the token pattern
                assert m[vs, vs].float().mean() < 0.8  # and still sparse
    assert 0.3 <= p.info["spatial_density"] and 0.3 <= p.info["temporal_density"]


# ----------------------------------------------------------------------------------------------------------
# The methods work: locality inputs
# ----------------------------------------------------------------------------------------------------------


def _random_blocks_error(q, k, v, ref, density_per_head, seed=1):
    b, h, s, _ = q.shape
    qs, ql = uniform_blocks(b, h, s, 16)
    ks, kl = uniform_blocks(b, h, s, 16)
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, h, qs.shape[2], ks.shape[2], generator=g) < density_per_head.float()[..., None, None]
    out = block_sparse_attention(q, k, v, block_mask_to_layout(qs, ql, ks, kl, keep, 16, 16), precision="dense")
    return [error_metrics(out[:, i], ref[:, i])["rel_l2"] for i in range(h)]


def test_spatiotemporal_error_small_on_local_inputs_and_far_below_random_blocks():
    grid = (6, 8, 8)
    q, k, v = _field_qkv(grid, [(0.3, 100.0, 100.0), (100.0, 0.7, 0.7)])
    ref = attention(q, k, v, precision="dense")
    st = SparseState()
    out = sparse_attention(q, k, v, grid=grid, density=0.25, precision="dense", state=st, **SMALL)
    assert st.head_classes.tolist() == [[P.HEAD_SPATIAL, P.HEAD_TEMPORAL]]
    dens = st.plan.info["density_per_head"][0]
    assert bool((dens < 0.35).all())
    err = [error_metrics(out[:, i], ref[:, i])["rel_l2"] for i in range(2)]
    rnd = _random_blocks_error(q, k, v, ref, st.plan.info["density_per_head"])
    for e, e_rnd in zip(err, rnd):
        assert e < 0.25 and e_rnd > 0.8 and e < e_rnd / 4


def test_semantic_error_small_on_local_inputs_and_far_below_random_blocks():
    grid = (6, 8, 8)
    q, k, v = _field_qkv(grid, [(0.3, 100.0, 100.0), (100.0, 0.7, 0.7), (1.0, 1.5, 1.5)])
    ref = attention(q, k, v, precision="dense")
    st = SparseState()
    out = sparse_attention(
        q, k, v, grid=grid, method="semantic", top_p=0.9, q_clusters=12, k_clusters=24, precision="dense",
        state=st, **SMALL,
    )
    dens = st.plan.info["density_per_head"]
    assert float(dens.mean()) < 0.6
    err = [error_metrics(out[:, i], ref[:, i])["rel_l2"] for i in range(3)]
    rnd = _random_blocks_error(q, k, v, ref, dens)
    for e, e_rnd in zip(err, rnd):
        assert e < 0.2 and e < e_rnd / 3


def test_int8_fp16_sparse_close_to_dense_sparse():
    """The quantized path runs the same plan: its output is close to the dense-arithmetic sparse output and
    equals block_sparse_reference of that plan."""
    grid = (3, 4, 4)
    q, k, v = _field_qkv(grid, [(0.3, 100.0, 100.0), (100.0, 0.7, 0.7)], d=16)
    kw = dict(grid=grid, density=0.3, block_m=16, block_n=16)
    st = SparseState()
    quant = sparse_attention(q, k, v, precision="int8-fp16", state=st, **kw)
    exact = sparse_attention(q, k, v, precision="dense", **kw)
    assert error_metrics(quant, exact)["rel_l2"] < 0.03
    p = st.plan
    ref = block_sparse_reference(q, k, v, p.layout, precision="int8-fp16", q_perm=p.q_perm, kv_perm=p.kv_perm)
    torch.testing.assert_close(quant, ref, atol=1e-3, rtol=1e-3)


def test_int8_fp16_semantic_with_text_through_kernel_path():
    """fp16 inputs: with TRITON_INTERPRET=1 (conftest, no CUDA) this runs the Triton kernel through the
    permutations of a semantic plan with text and padded text keys; it must match the plan's reference."""
    grid, s = (2, 3, 4), 29
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, s, 16, generator=g).half() for _ in range(3))
    kpm = torch.ones(1, s, dtype=torch.bool)
    kpm[0, -2:] = False
    st = SparseState()
    out = sparse_attention(
        q, k, v, grid=grid, text=(24, 5), method="semantic", q_clusters=3, k_clusters=5, top_p=0.7,
        precision="int8-fp16", key_padding_mask=kpm, state=st, **SMALL,
    )
    p = st.plan
    assert p.density < 1
    ref = block_sparse_reference(
        q, k, v, p.layout, precision="int8-fp16", q_perm=p.q_perm, kv_perm=p.kv_perm, key_padding_mask=kpm
    )
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


# ----------------------------------------------------------------------------------------------------------
# State across calls
# ----------------------------------------------------------------------------------------------------------


def test_state_warm_start_and_cfg_batch_switch():
    grid = (2, 3, 4)
    kw = dict(grid=grid, method="semantic", q_clusters=3, k_clusters=5, precision="dense", kmeans_every=1, **SMALL)
    st = SparseState()
    q2, k2, v2 = _rand(2, 2, 24, seed=4)
    sparse_attention(q2, k2, v2, state=st, **kw)
    assert st.plan.info["warm_start"] is False and st.plan.info["iters"] == 50
    c2 = st.q_centroids
    sparse_attention(q2, k2, v2, state=st, **kw)
    assert st.plan.info["warm_start"] is True and st.plan.info["iters"] == 2
    q1, k1, v1 = _rand(1, 2, 24, seed=5)  # CFG off: batch 1
    out1 = sparse_attention(q1, k1, v1, state=st, **kw)
    assert st.plan.info["warm_start"] is False and st.q_centroids.shape[0] == 2  # its own slot, B·H = 2
    # same as a fresh state would give: nothing of the batch-2 slot leaked in
    torch.testing.assert_close(out1, sparse_attention(q1, k1, v1, state=SparseState(), **kw))
    sparse_attention(q2, k2, v2, state=st, **kw)  # back to batch 2: warm again from its own centroids
    assert st.plan.info["warm_start"] is True and st.q_centroids.shape[0] == 4
    assert c2.shape == st.q_centroids.shape
    rep = st.report()
    assert rep["calls"] == 4 and rep["clusterings"] == 4 and 0 < rep["last_density"] <= 1


def test_default_cluster_counts_follow_the_video_length():
    from sagevideo.sparse.semantic import MIN_K_CLUSTERS, MIN_Q_CLUSTERS, default_clusters

    # SVG2's 300 / 1000 where clusters are at least a tile (Wan 720p), one cluster a tile below that, a floor
    assert default_clusters(21 * 45 * 80, 128, 64) == (300, 1000)
    assert default_clusters(21 * 30 * 52, 128, 64) == (256, 512)  # Wan2.1-1.3B 480p
    assert default_clusters(13 * 30 * 45, 128, 64) == (138, 275)  # CogVideoX-5B: ceil(17,550 / 128), / 64
    assert default_clusters(9 * 16 * 16, 128, 64) == (MIN_Q_CLUSTERS, MIN_K_CLUSTERS)  # the bundled model
    for n in (1, 100, 5000, 40000, 10**6):
        q, k = default_clusters(n, 128, 64)
        assert MIN_Q_CLUSTERS <= q <= 300 and MIN_K_CLUSTERS <= k <= 1000
        assert q == 300 or q == MIN_Q_CLUSTERS or n / q <= 128 < n / (q - 1)
    # None in sparse_attention means those counts (clamped to the video tokens: 256 of them here)
    q, k, v = _rand(1, 2, 4 * 8 * 8, seed=3)
    st = SparseState()
    sparse_attention(q, k, v, grid=(4, 8, 8), method="semantic", precision="dense", state=st, block_m=16, block_n=16)
    want_q, want_k = default_clusters(256, 16, 16)
    assert st.q_centroids.shape[1] == want_q and st.k_centroids.shape[1] == min(want_k, 256)


def test_default_replan_interval_reuses_plans():
    from sagevideo.sparse.api import DEFAULT_REPLAN_EVERY

    assert DEFAULT_REPLAN_EVERY > 1
    grid = (2, 3, 4)
    q, k, v = _rand(1, 2, 24, seed=6)
    st = SparseState()
    for step in range(7):
        sparse_attention(q, k, v, grid=grid, method="semantic", q_clusters=3, k_clusters=5, precision="dense",
                         state=st, step=step, **SMALL)
    assert st.calls == 7 and st.clusterings == -(-7 // DEFAULT_REPLAN_EVERY)
    st = SparseState()  # the same for spatiotemporal profiling
    for step in range(7):
        sparse_attention(q, k, v, grid=grid, precision="dense", state=st, step=step, **SMALL)
    assert st.calls == 7 and st.profiles == -(-7 // DEFAULT_REPLAN_EVERY)


def test_profile_every_reuses_head_classes():
    grid = (6, 8, 8)
    q, k, v = _field_qkv(grid, [(0.3, 100.0, 100.0), (100.0, 0.7, 0.7)])
    st = SparseState()
    for step in range(6):
        sparse_attention(q, k, v, grid=grid, precision="dense", state=st, step=step, profile_every=3, **SMALL)
    assert st.profiles == 2 and st.profiled_at == 3 and st.calls == 6
    assert st.report()["heads"] == {"dense": 0, "spatial": 1, "temporal": 1}
    # a new video (step back to 0) re-profiles
    sparse_attention(q, k, v, grid=grid, precision="dense", state=st, step=0, profile_every=3, **SMALL)
    assert st.profiles == 3


def test_kmeans_every_reuses_plan_unless_selection_changes():
    grid = (2, 3, 4)
    q, k, v = _rand(1, 2, 24, seed=6)
    kw = dict(grid=grid, method="semantic", q_clusters=3, k_clusters=6, precision="dense", **SMALL)
    st = SparseState()
    for step in range(4):
        sparse_attention(q, k, v, state=st, step=step, kmeans_every=2, **kw)
    assert st.clusterings == 2 and st.calls == 4
    first = st.plan
    sparse_attention(q, k, v, state=st, step=3, kmeans_every=2, top_p=0.3, **kw)  # another budget: new plan
    assert st.clusterings == 3 and st.plan is not first and st.plan.density < first.density
    assert st.plan.info["warm_start"] is True  # same slot: the centroids carried over


@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_dense_heads_split_from_sparse_heads_give_the_plans_attention(layout, monkeypatch):
    # head 2 attends broadly: profiling keeps it dense, and sparse_attention runs it through the dense op
    # while the spatial and temporal heads go through the block-sparse path; the result must be the plan's
    # attention (every head, both batch entries, the key mask and the LSE) as one block-sparse call gives it
    grid = (6, 8, 8)
    lengths = [(0.3, 100.0, 100.0), (100.0, 0.7, 0.7), (100.0, 100.0, 100.0)]
    a = _field_qkv(grid, lengths, seed=0)
    b = _field_qkv(grid, lengths[::-1], seed=1)
    q, k, v = (torch.cat([x, y]) for x, y in zip(a, b))
    mask = torch.ones(2, q.shape[2], dtype=torch.bool)
    mask[1, -40:] = False
    if layout == "BSHD":
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    st = SparseState()
    kw = dict(grid=grid, density=0.25, precision="dense", layout=layout, key_padding_mask=mask, **SMALL)
    import sagevideo.sparse.blocks as blocks_mod

    seen = []
    real = blocks_mod.block_sparse_attention
    monkeypatch.setattr(blocks_mod, "block_sparse_attention", lambda *a, **kw: seen.append(a[3]) or real(*a, **kw))
    out, lse = sparse_attention(q, k, v, state=st, return_lse=True, **kw)
    plan = st.plan
    # the block-sparse call does no work for the dense heads
    counts = seen[0].kv_count.flatten(0, 1).sum(-1)
    assert counts[2] == counts[3] == 0 and bool((counts[[0, 1, 4, 5]] > 0).all())
    assert plan.info["head_classes"].tolist() == [[1, 2, 0], [0, 2, 1]]
    assert plan.dense_heads == (2, 3) and st.split_calls == 1 and st.dense_calls == 0
    ref, ref_lse = block_sparse_reference(q, k, v, plan.layout, tensor_layout=layout, precision="dense",
                                          return_lse=True, key_padding_mask=mask, q_perm=plan.q_perm,
                                          kv_perm=plan.kv_perm)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    ref_lse = ref_lse if layout == "BHSD" else ref_lse.transpose(1, 2)
    assert torch.allclose(lse, ref_lse, atol=1e-5, rtol=1e-5)
    # the dense heads are dense attention, the sparse ones are not
    full = attention(q, k, v, layout=layout, precision="dense", key_padding_mask=mask)
    pick = (lambda x, i, j: x[i, j]) if layout == "BHSD" else (lambda x, i, j: x[i, :, j])
    for i, j in ((0, 2), (1, 0)):
        assert torch.allclose(pick(out, i, j), pick(full, i, j), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pick(out, 0, 0), pick(full, 0, 0), atol=1e-3)


def test_default_kv_block_follows_method_and_frame_size():
    from sagevideo.sparse.api import default_block_n

    assert default_block_n("spatiotemporal", (21, 30, 52)) == 128  # Wan2.1 480p: 1,560 tokens a frame
    assert default_block_n("spatiotemporal", (9, 16, 16)) == 64  # the bundled model: 256
    assert default_block_n("spatiotemporal", (2, 32, 32)) == 128  # 1,024 tokens: the threshold
    assert default_block_n("spatiotemporal", (2, 31, 33)) == 64  # 1,023
    assert default_block_n("semantic", (21, 30, 52)) == 64
    for grid, want in (((2, 32, 32), 128), ((2, 8, 8), 64)):
        q, k, v = _rand(1, 2, math.prod(grid), seed=3)
        assert plan_sparse(q, k, v, grid=grid, block_m=16).layout.block_n == want
        assert plan_sparse(q, k, v, grid=grid, block_m=16, block_n=32).layout.block_n == 32


def test_batch_entries_get_different_plans():
    grid = (6, 8, 8)
    a = _field_qkv(grid, [(0.3, 100.0, 100.0), (100.0, 0.7, 0.7)], seed=0)
    b = _field_qkv(grid, [(100.0, 0.7, 0.7), (0.3, 100.0, 100.0)], seed=1)
    q, k, v = (torch.cat([x, y]) for x, y in zip(a, b))
    p = plan_sparse(q, k, v, grid=grid, block_m=16, block_n=16)
    assert p.info["head_classes"].tolist() == [[1, 2], [2, 1]]
    assert torch.equal(p.q_perm[0, 1], p.q_perm[1, 0]) and not torch.equal(p.q_perm[0, 1], p.q_perm[0, 0])


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(grid=(2, 3, 5)), "30 video tokens but the sequence has 24"),
        (dict(grid=(2, 3, 4), text=(20, 8)), "outside the sequence"),
        (dict(grid=(2, 3, 3), text=(6, 6)), "must come before the video"),
        (dict(grid=(2, 3, 4), method="radial"), "unknown method"),
        (dict(grid=(2, 3, 4), density=0.0), "density"),
        (dict(grid=(2, 3, 4), method="semantic", top_p=1.5), "top_p"),
        (dict(grid=(2, 3, 4), precision="fp4"), "precision"),
        (dict(grid=(2, 3, 4), block_n="64"), "block_n must be an int"),
        (dict(grid=(2, 3, 4), block_m=8), "block_m must be an int ≥ 16"),
        (dict(grid=(2, 3, 4), plan_graph="yes"), "plan_graph must be True, False or 'auto'"),
        (dict(grid=(2, 3, 4), method="semantic", q_clusters=0), "q_clusters must be an int ≥ 1, or None"),
        (dict(grid=(2, 3, 4), method="semantic", k_clusters="many"), "k_clusters must be an int ≥ 1, or None"),
        (dict(grid=(2, 3, 4), method="semantic", kmeans_every=0), r"kmeans_every must be an int ≥ 1 \(or None"),
        (dict(grid=(2, 3, 4), method="semantic", kmeans_every=1.5), "kmeans_every must be an int ≥ 1"),
        (dict(grid=(2, 3, 4), profile_every="often"), r"profile_every must be an int ≥ 1 \(or None"),
        (dict(grid=(2, 3, 4), kmeans_iters=None), "kmeans_iters must be an int ≥ 1, got None"),
    ],
)
def test_bad_input_errors(kwargs, match):
    q, k, v = _rand(1, 2, 24)
    with pytest.raises(ValueError, match=match):
        sparse_attention(q, k, v, **kwargs)


def test_cross_attention_refused():
    q, _, _ = _rand(1, 2, 24)
    _, k, v = _rand(1, 2, 30)
    with pytest.raises(ValueError, match="same sequence"):
        sparse_attention(q, k, v, grid=(2, 3, 4))


def test_a_small_split_runs_dense_on_cuda_only():
    """The split rule: a plan that sends some heads to the dense op and saves under SPLIT_MIN_SAVING of the work
    on the others runs every head dense on CUDA; a plan with no dense heads, or saving more, is run sparse; on the
    CPU (no split cost measured there) only all-dense plans run dense."""
    from sagevideo.sparse import api

    def plan(density, dense_heads):
        return api.SparsePlan(layout=None, q_perm=None, kv_perm=None, density=density, dense_heads=dense_heads)

    cut = api.SPLIT_MIN_SAVING
    assert 0.0 < cut < 1.0
    assert api._runs_dense(plan(1.0 - cut / 2, (0, 1, 2)), 4, cuda=True)  # one sparse head, little saved
    assert not api._runs_dense(plan(1.0 - cut / 2, (0, 1, 2)), 4, cuda=False)
    assert not api._runs_dense(plan(1.0 - 2 * cut, (0,)), 4, cuda=True)  # enough saved: split
    assert not api._runs_dense(plan(1.0 - cut / 2, ()), 4, cuda=True)  # no dense heads: no split to pay for
    assert api._runs_dense(plan(0.3, (0, 1, 2, 3)), 4, cuda=False)  # every head dense
    assert api._runs_dense(plan(1.0, ()), 4, cuda=False)
