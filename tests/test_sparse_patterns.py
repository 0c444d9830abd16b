"""Spatial / temporal head patterns (Sparse VideoGen): token patterns, block maps, permutation, text blocks."""

import pytest
import torch

from sagevideo.sparse import patterns as P


def _coords(grid):
    """Frame-major list of (t, h, w), by explicit loops."""
    t, h, w = grid
    return [(a, b, c) for a in range(t) for b in range(h) for c in range(w)]


def _spatial_pair(cq, ck, width):
    return abs(cq[0] - ck[0]) <= width or ck[0] == 0


def _temporal_pair(cq, ck, radius):
    return abs(cq[1] - ck[1]) <= radius and abs(cq[2] - ck[2]) <= radius


def _token_mask_loop(grid, order, rule, arg):
    """S×S token pattern of the video in ``order`` (list of frame-major indices), by a double loop."""
    coords = _coords(grid)
    n = len(order)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            m[i, j] = rule(coords[order[i]], coords[order[j]], arg)
    return m


def _blocks_any(mask, qs, ql, ks, kl):
    """Block map = 'some token pair of the two blocks is in the mask' (brute force)."""
    out = torch.zeros(len(qs), len(ks), dtype=torch.bool)
    for a in range(len(qs)):
        for b in range(len(ks)):
            out[a, b] = mask[qs[a] : qs[a] + ql[a], ks[b] : ks[b] + kl[b]].any()
    return out


def test_position_major_perm_matches_hand_order():
    grid = (3, 2, 3)
    coords = _coords(grid)
    expected = sorted(range(len(coords)), key=lambda i: (coords[i][1], coords[i][2], coords[i][0]))
    assert P.position_major_perm(grid).tolist() == expected


def test_token_patterns_element_by_element():
    grid = (3, 2, 3)
    n = 18
    idx = torch.arange(n)
    t, h, w = P.video_coords(grid, idx)
    coords = _coords(grid)
    assert list(zip(t.tolist(), h.tolist(), w.tolist())) == coords
    for width in (0, 1):
        got = P.spatial_token_keep(t[:, None], t[None, :], width)
        assert torch.equal(got, _token_mask_loop(grid, list(range(n)), _spatial_pair, width))
    for radius in (0, 1):
        got = P.temporal_token_keep(h[:, None], w[:, None], h[None, :], w[None, :], radius)
        assert torch.equal(got, _token_mask_loop(grid, list(range(n)), _temporal_pair, radius))
    # spot checks of the definitions themselves
    assert P.spatial_token_keep(torch.tensor(2), torch.tensor(0), 0)  # first-frame sink
    assert not P.spatial_token_keep(torch.tensor(2), torch.tensor(1), 0)
    assert P.temporal_token_keep(torch.tensor(0), torch.tensor(0), torch.tensor(1), torch.tensor(1), 1)
    assert not P.temporal_token_keep(torch.tensor(0), torch.tensor(0), torch.tensor(0), torch.tensor(2), 1)


@pytest.mark.parametrize("grid,bm,bn", [((3, 2, 3), 4, 5), ((4, 3, 5), 7, 3), ((2, 5, 4), 16, 6), ((5, 1, 3), 2, 4)])
def test_block_maps_equal_any_pair_of_token_pattern(grid, bm, bn):
    """Blocks straddle frame and row boundaries; the maps must be exactly 'any token pair in the pattern'."""
    n = grid[0] * grid[1] * grid[2]
    layout = P.token_layout(grid, n)
    qs, ql, _ = P.sequence_blocks(layout, bm)
    ks, kl, _ = P.sequence_blocks(layout, bn)
    frame_major = list(range(n))
    pos_major = P.position_major_perm(grid).tolist()
    for width in range(grid[0]):
        tok = _token_mask_loop(grid, frame_major, _spatial_pair, width)
        expect = _blocks_any(tok, qs.tolist(), ql.tolist(), ks.tolist(), kl.tolist())
        assert torch.equal(P.spatial_block_keep(grid, qs, ql, ks, kl, width), expect), width
    for radius in range(max(grid[1], grid[2])):
        tok = _token_mask_loop(grid, pos_major, _temporal_pair, radius)
        expect = _blocks_any(tok, qs.tolist(), ql.tolist(), ks.tolist(), kl.tolist())
        assert torch.equal(P.temporal_block_keep(grid, qs, ql, ks, kl, radius), expect), radius


def test_temporal_pattern_is_block_diagonal_after_permutation():
    """Position-major order turns 'same position, every frame' (radius 0) into dense diagonal blocks of T."""
    grid = (4, 3, 2)
    tok = _token_mask_loop(grid, P.position_major_perm(grid).tolist(), _temporal_pair, 0)
    expect = torch.block_diag(*[torch.ones(4, 4, dtype=torch.bool)] * 6)
    assert torch.equal(tok, expect)


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 0.8])
def test_density_picks_smallest_window_reaching_it(density):
    grid = (6, 5, 7)
    layout = P.token_layout(grid, 210)
    maps = P.spatiotemporal_maps(layout, block_m=16, block_n=8, density=density)
    qs, ql, _ = P.sequence_blocks(layout, 16)
    ks, kl, _ = P.sequence_blocks(layout, 8)

    def dens(keep):
        return float(P.block_density(keep, ql, kl))

    s = dens(P.spatial_block_keep(grid, qs, ql, ks, kl, maps.width))
    t = dens(P.temporal_block_keep(grid, qs, ql, ks, kl, maps.radius))
    assert s == pytest.approx(maps.spatial_density) and t == pytest.approx(maps.temporal_density)
    assert s >= density and t >= density
    if maps.width > 0:
        assert dens(P.spatial_block_keep(grid, qs, ql, ks, kl, maps.width - 1)) < density
    if maps.radius > 0:
        assert dens(P.temporal_block_keep(grid, qs, ql, ks, kl, maps.radius - 1)) < density
    full = P.spatiotemporal_maps(layout, block_m=16, block_n=8, density=1.0)
    assert bool(full.spatial.all()) and bool(full.temporal.all())


@pytest.mark.parametrize("text_first", [True, False])
def test_text_blocks_dense_and_separate(text_first):
    grid, n_text = (3, 2, 3), 5
    n_video = 18
    text = (0, n_text) if text_first else (n_video, n_text)
    layout = P.token_layout(grid, n_video + n_text, text)
    assert layout.video_start == (n_text if text_first else 0)
    maps = P.spatiotemporal_maps(layout, block_m=4, block_n=4, density=0.3)
    bare = P.spatiotemporal_maps(P.token_layout(grid, n_video), block_m=4, block_n=4, density=0.3)
    # blocks cover the sequence exactly, never mix text and video
    for start, length, is_text in ((maps.q_start, maps.q_len, maps.q_text), (maps.k_start, maps.k_len, maps.k_text)):
        cover = torch.zeros(n_video + n_text, dtype=torch.int64)
        for s, l, t in zip(start.tolist(), length.tolist(), is_text.tolist()):
            cover[s : s + l] += 1
            in_text = [layout.text_start <= i < layout.text_start + n_text for i in range(s, s + l)]
            assert all(x == t for x in in_text)
        assert bool((cover == 1).all())
    for keep, bare_keep in ((maps.spatial, bare.spatial), (maps.temporal, bare.temporal)):
        assert bool(keep[maps.q_text].all()) and bool(keep[:, maps.k_text].all())
        # the video part is the video-only map (same widths)
        assert torch.equal(keep[~maps.q_text][:, ~maps.k_text], bare_keep)
    assert (maps.width, maps.radius) == (bare.width, bare.radius)


def test_sequence_perm_keeps_text_in_place():
    layout = P.token_layout((2, 2, 2), 11, (0, 3))
    perm = P.sequence_perm(layout, True)
    assert perm[:3].tolist() == [0, 1, 2]
    assert perm[3:].tolist() == [3 + i for i in P.position_major_perm((2, 2, 2)).tolist()]
    assert torch.equal(P.sequence_perm(layout, False), torch.arange(11))


@pytest.mark.parametrize(
    "grid,seq,text,match",
    [
        ((2, 3, 4), 25, None, "24 video tokens but the sequence has 25"),
        ((2, 3, 4), 30, (20, 6), "must come before the video"),
        ((2, 3, 4), 30, (28, 6), "outside the sequence"),
        ((2, 3, 4), 30, (0, 5), "plus 5 text tokens"),
        ((2, 0, 4), 0, None, "positive"),
        ((2, 3), 6, None, "frames, height, width"),
    ],
)
def test_token_layout_errors(grid, seq, text, match):
    with pytest.raises(ValueError, match=match):
        P.token_layout(grid, seq, text)


def test_block_maps_never_need_s_by_s():
    """A real Wan 720p shape: the maps are NQ×NK, built in well under a second per shape (cached)."""
    grid = (21, 45, 80)
    layout = P.token_layout(grid, 21 * 45 * 80)
    maps = P.spatiotemporal_maps(layout, block_m=128, block_n=64, density=0.25)
    assert maps.spatial.shape == (591, 1182)
    # SVG's band for d = 0.25 at this shape is about ±2.8 frames; ours is the block-exact smallest band
    assert maps.width == 2 and 0.25 <= maps.spatial_density < 0.35
    assert 0.25 <= maps.temporal_density < 0.35


@pytest.mark.parametrize("text_first", [True, False])
def test_sequence_blocks_aligned_cuts(text_first):
    """``sequence_blocks(align=16)``: the same rows, in order, each segment cut separately, every block within
    ``block`` rows of the multiple of 16 at or below its start (what the quantized kernel needs for aligned
    loads); ``align=1`` is the plain cut, whose blocks after an unaligned segment start reach further."""
    n_text, video = 226, 3 * 5 * 7
    lay = P.token_layout((3, 5, 7), video + n_text, (0, n_text) if text_first else (video, n_text))
    for align in (1, 16):
        st, ln, tx = P.sequence_blocks(lay, 64, align=align)
        assert st[0] == 0 and torch.equal(st[1:], (st + ln)[:-1]) and int((st + ln)[-1]) == video + n_text
        assert (ln > 0).all() and (ln <= 64).all()
        text_rows = torch.zeros(video + n_text, dtype=torch.bool)
        text_rows[lay.text_start:lay.text_start + n_text] = True
        for a, n, t in zip(st.tolist(), ln.tolist(), tx.tolist()):
            assert bool(text_rows[a:a + n].all()) == t and bool(text_rows[a:a + n].any()) == t
        reach = int((st % 16 + ln).max())
        if align == 16:
            assert reach <= 64
        else:
            assert reach > 64  # the segment after the first starts at 226 or 105: not a multiple of 16
    with pytest.raises(ValueError, match="align"):
        P.sequence_blocks(lay, 64, align=24)


def test_plans_cut_kv_blocks_for_aligned_loads():
    """The spatiotemporal and semantic plans of a CogVideoX-like sequence (226 text tokens first, so the video
    starts off a multiple of 16) give layouts whose KV blocks all fit the kernel's aligned window."""
    from sagevideo.kernels import block_sparse_attn
    from sagevideo.sparse.api import plan_sparse

    grid, n_text = (2, 6, 8), 226
    s = 96 + n_text
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, s, 32, generator=g) for _ in range(3))
    for method in ("spatiotemporal", "semantic"):
        p = plan_sparse(q, k, v, grid=grid, text=(0, n_text), method=method, density=0.5, q_clusters=4,
                        k_clusters=6, block_m=32, block_n=32)
        aligned, reach = p.layout.kv_geometry()
        assert reach <= 32, (method, reach)
        assert aligned or block_sparse_attn.kv_tile(32, aligned, reach)[1]  # aligned loads, or the window


def test_block_density_counts_token_pairs():
    """The integer form equals the token-pair count of the definition, per leading index, zero-length blocks
    (padding slots) and an all-empty row included."""
    g = torch.Generator().manual_seed(5)
    keep = torch.rand(2, 3, 7, 9, generator=g) < 0.4
    q_len = torch.randint(0, 130, (2, 3, 7), generator=g)
    k_len = torch.randint(0, 70, (2, 3, 9), generator=g)
    q_len[0, 1] = 0  # no query tokens at all: density 0, not NaN
    got = P.block_density(keep, q_len, k_len)
    assert got.dtype == torch.float64 and got.shape == (2, 3)
    for b in range(2):
        for h in range(3):
            pairs = sum(int(q_len[b, h, i]) * int(k_len[b, h, j]) for i in range(7) for j in range(9) if keep[b, h, i, j])
            total = int(q_len[b, h].sum()) * int(k_len[b, h].sum())
            assert float(got[b, h]) == (pairs / total if total else 0.0)
    # shared (unbatched) block lengths broadcast against batched keep maps
    flat = P.block_density(keep, q_len[0, 0], k_len[0, 0])
    assert torch.equal(flat[1, 2], P.block_density(keep[1, 2], q_len[0, 0], k_len[0, 0]))
