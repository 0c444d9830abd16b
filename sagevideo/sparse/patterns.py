"""Spatial and temporal head patterns on the video latent grid, as block-level keep maps.

Sparse VideoGen (Xi et al., "Sparse VideoGen: Accelerating Video Diffusion Transformers with
Spatial-Temporal Sparsity", arXiv 2502.01776) observes that most attention heads of a video DiT are either

* **spatial**: a query attends the tokens of its own frame and of a few neighbouring frames — a band of
  ``±width`` frames around the query's frame — plus the first frame, which acts as an attention sink;
* **temporal**: a query attends the tokens at (about) its own spatial position in every frame — here the
  ``(2·radius+1)²`` positions within Chebyshev distance ``radius`` of the query's ``(h, w)``, in all frames.

Video tokens are frame-major, ``index = t·H·W + h·W + w`` on the post-patch grid ``(T, H, W)``. The spatial
pattern is a block band in that order. The temporal pattern is a set of strided slashes in frame-major order;
reordering the video tokens position-major (sorted by ``(h, w, t)``, :func:`position_major_perm`) makes it
block-dense, so both head types run through one block-sparse kernel.

Everything here works on *blocks* of the (permuted) sequence and never builds an S×S mask: a block covers a
contiguous range of the permuted sequence, which is a contiguous range of frames (spatial order) or of raster
positions (position-major order); whether any (query, key) token pair of two blocks lies in the pattern is
decided from those ranges in O(1), so a keep map costs O(NQ·NK). Blocks need not align with frames or rows
(T, H, W are arbitrary): a block straddling a frame boundary is kept as soon as one of its token pairs is in
the pattern, so **the block map is a superset of the token pattern** (never drops a pattern pair).

Text tokens (HunyuanVideo: after the video; CogVideoX: before it) are never permuted, get their own blocks,
and stay dense: text query blocks attend every key block and every query block attends every text key block.

The ``density`` knob (SVG's ``--sparsity``, which is really the kept fraction) picks the smallest band width /
radius whose video×video block density reaches it (SVG rounds its band up to whole blocks the same way).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from sagevideo.context import TokenLayout

__all__ = [
    "HEAD_DENSE",
    "HEAD_SPATIAL",
    "HEAD_TEMPORAL",
    "SparsePlan",
    "token_layout",
    "position_major_perm",
    "sequence_perm",
    "sequence_blocks",
    "spatial_block_gap",
    "spatial_block_keep",
    "temporal_block_gap",
    "temporal_block_keep",
    "text_block_keep",
    "spatial_token_keep",
    "temporal_token_keep",
    "video_coords",
    "SpatioTemporalMaps",
    "spatiotemporal_maps",
    "block_density",
    "plan_spatiotemporal",
]

HEAD_DENSE, HEAD_SPATIAL, HEAD_TEMPORAL = 0, 1, 2


@dataclasses.dataclass
class SparsePlan:
    """What a sparse method decided for one attention call, ready for ``block_sparse_attention``.

    Attributes:
        layout: the :class:`sagevideo.sparse.blocks.BlockLayout` (block lists of the permuted sequence).
        q_perm, kv_perm: ``(B, H, S)`` int32 (what the kernels read; half the memory of int64 in a held
            plan); row ``s`` of the permuted sequence is original row ``perm[b, h, s]``; None when the
            permutation is the identity for every head.
        density: fraction of the QKᵀ token pairs computed, averaged over (batch, head).
        info: method-specific details (head classes, window widths, centroids, ...).
        dense_heads: flat indices ``b·H + h`` of the heads whose every block is kept (e.g. heads profiled
            dense): :func:`sagevideo.sparse_attention` runs them through the dense op, which is faster than the
            block-sparse kernel walking every block.
    """

    layout: Any
    q_perm: torch.Tensor | None
    kv_perm: torch.Tensor | None
    density: float
    info: dict = dataclasses.field(default_factory=dict)
    dense_heads: tuple[int, ...] = ()


# ----------------------------------------------------------------------------------------------------------
# Sequence description and permutations
# ----------------------------------------------------------------------------------------------------------


def token_layout(grid, seq_len: int, text: tuple[int, int] | None = None) -> TokenLayout:
    """The :class:`TokenLayout` of a sequence of ``seq_len`` tokens: the video grid plus optional text.

    ``text = (text_start, text_len)`` must sit either before the video (``text_start = 0``, CogVideoX) or
    right after it (``text_start = T·H·W``, HunyuanVideo); without text the sequence is the video alone.
    Raises ``ValueError`` with the numbers when they do not add up.
    """
    if grid is None or len(grid) != 3:
        raise ValueError(f"sparse attention: grid must be (frames, height, width), got {grid!r}")
    try:
        grid = tuple(int(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"sparse attention: grid must be three ints (frames, height, width), got {grid!r}") from None
    if any(g <= 0 for g in grid):
        raise ValueError(f"sparse attention: grid entries must be positive, got {grid}")
    video = grid[0] * grid[1] * grid[2]
    if text is None or (len(text) == 2 and int(text[1]) == 0):
        if video != seq_len:
            raise ValueError(
                f"sparse attention: grid {grid} has {video} video tokens but the sequence has {seq_len}; pass "
                "text=(text_start, text_len) when text tokens are concatenated with the video"
            )
        return TokenLayout(grid=grid, video_start=0)
    if len(text) != 2:
        raise ValueError(f"sparse attention: text must be (text_start, text_len), got {text!r}")
    start, length = int(text[0]), int(text[1])
    if length < 0 or start < 0 or start + length > seq_len:
        raise ValueError(
            f"sparse attention: text range [{start}, {start + length}) is outside the sequence of {seq_len} tokens"
        )
    if video + length != seq_len:
        raise ValueError(
            f"sparse attention: grid {grid} ({video} video tokens) plus {length} text tokens is "
            f"{video + length}, but the sequence has {seq_len} tokens"
        )
    if start == 0:
        return TokenLayout(grid=grid, video_start=length, text_start=0, text_len=length)
    if start == video:
        return TokenLayout(grid=grid, video_start=0, text_start=video, text_len=length)
    raise ValueError(
        f"sparse attention: text must come before the video (text_start=0) or right after it "
        f"(text_start={video}), got text_start={start}"
    )


def position_major_perm(grid, device=None) -> torch.Tensor:
    """``(T·H·W,)`` int64: entry ``j`` is the frame-major index of the ``j``-th token in ``(h, w, t)`` order."""
    t, h, w = grid
    frames = torch.arange(t, device=device, dtype=torch.int64)
    positions = torch.arange(h * w, device=device, dtype=torch.int64)
    return (positions[:, None] + frames[None, :] * (h * w)).reshape(-1)


def sequence_perm(layout: TokenLayout, temporal: bool, device=None) -> torch.Tensor:
    """``(S,)`` int64 permutation of the whole sequence: video rows position-major when ``temporal``, text and
    (otherwise) video rows unchanged."""
    perm = torch.arange(layout.seq_len, device=device, dtype=torch.int64)
    if temporal:
        perm[layout.video_slice] = position_major_perm(layout.grid, device) + layout.video_start
    return perm


def _segment_blocks(start: int, length: int, block: int, align: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    origin = start - start % align  # cuts at origin + k·block (align=1: at the segment start)
    cuts = torch.arange(origin, start + length, block, dtype=torch.int64)
    starts = cuts.clamp(min=start)
    lens = torch.clamp(cuts + block, max=start + length) - starts
    return starts, lens


def sequence_blocks(layout: TokenLayout, block: int, align: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks of the (permuted) sequence: the video and the text segments are cut separately into blocks of at
    most ``block`` tokens (the last one of each may be short). With ``align`` > 1 (a divisor of ``block``) the
    cuts fall at multiples of ``block`` from the multiple of ``align`` at or below each segment's start, so a
    segment starting off a multiple of 16 (CogVideoX's video after 226 text tokens) still gives KV blocks the
    quantized kernel reads with aligned loads (its first block is shorter). Returns CPU int64
    ``(start, len, is_text)``, ``(N,)`` each, in sequence order."""
    if block <= 0:
        raise ValueError(f"block size must be positive, got {block}")
    if align <= 0 or block % align:
        raise ValueError(f"align must be a positive divisor of the block size {block}, got {align}")
    segments = [(layout.video_start, layout.video_len, False)]
    if layout.text_len:
        segments.append((layout.text_start, layout.text_len, True))
    segments.sort(key=lambda s: s[0])
    starts, lens, text = [], [], []
    for s, n, is_text in segments:
        st, ln = _segment_blocks(s, n, block, align)
        starts.append(st)
        lens.append(ln)
        text.append(torch.full_like(st, int(is_text), dtype=torch.bool))
    return torch.cat(starts), torch.cat(lens), torch.cat(text)


# ----------------------------------------------------------------------------------------------------------
# Block keep maps (O(NQ·NK), exact "any pair in the pattern" for any grid and block size)
# ----------------------------------------------------------------------------------------------------------


def _interval_gap(a0, a1, b0, b1):
    """Distance between integer intervals [a0, a1] and [b0, b1] (0 when they overlap), broadcast."""
    return torch.clamp(torch.maximum(b0 - a1, a0 - b1), min=0)


def spatial_block_gap(grid, q_start, q_len, k_start, k_len) -> torch.Tensor:
    """``(NQ, NK)`` int64: the least ``|t_q − t_k|`` over the token pairs of two blocks of the frame-major video
    (offsets relative to the first video token); a pair of blocks is in the band of half-width ``w`` iff
    ``gap ≤ w``."""
    hw = grid[1] * grid[2]
    tq0, tq1 = q_start // hw, (q_start + q_len - 1) // hw
    tk0, tk1 = k_start // hw, (k_start + k_len - 1) // hw
    return _interval_gap(tq0[:, None], tq1[:, None], tk0[None, :], tk1[None, :])


def spatial_block_keep(grid, q_start, q_len, k_start, k_len, width: int) -> torch.Tensor:
    """``(NQ, NK)`` bool: blocks of the frame-major video (offsets relative to the first video token) holding a
    (query, key) pair with ``|t_q − t_k| ≤ width`` or ``t_k = 0`` (first-frame sink)."""
    sink = (k_start < grid[1] * grid[2])[None, :]
    return (spatial_block_gap(grid, q_start, q_len, k_start, k_len) <= width) | sink


def _raster_rects(p0, p1, width):
    """A contiguous raster range of positions [p0, p1] on a grid ``width`` wide, as at most three rectangles
    (row0, row1, col0, col1, valid): the partial first row, the full rows between, the partial last row."""
    r0, r1 = p0 // width, p1 // width
    c0, c1 = p0 % width, p1 % width
    same = r0 == r1
    last_col = torch.full_like(c0, width - 1)
    zero = torch.zeros_like(c0)
    first = (r0, r0, c0, torch.where(same, c1, last_col), torch.ones_like(same))
    middle = (r0 + 1, r1 - 1, zero, last_col, r1 >= r0 + 2)
    last = (r1, r1, zero, c1, ~same)
    return first, middle, last


def temporal_block_gap(grid, q_start, q_len, k_start, k_len) -> torch.Tensor:
    """``(NQ, NK)`` int64: the least Chebyshev distance ``max(|h_q − h_k|, |w_q − w_k|)`` over the token pairs
    of two blocks of the position-major video (offsets relative to the first video token)."""
    t, _, w = grid
    far = 1 << 29  # unused rectangles are moved this far away (int32 arithmetic stays in range)

    def rects(p0, p1, side):
        r = _raster_rects(p0, p1, w)
        r0, r1, c0, c1, ok = (torch.stack([x[i] for x in r], dim=1) for i in range(5))  # (N, 3) each
        r0 = torch.where(ok, r0, side * far)
        r1 = torch.where(ok, r1, side * far)
        return r0.to(torch.int32), r1.to(torch.int32), c0.to(torch.int32), c1.to(torch.int32)

    a = [x[:, :, None, None] for x in rects(q_start // t, (q_start + q_len - 1) // t, -1)]
    b = [x[None, None] for x in rects(k_start // t, (k_start + k_len - 1) // t, 1)]
    dr = _interval_gap(a[0], a[1], b[0], b[1])
    dc = _interval_gap(a[2], a[3], b[2], b[3])
    return torch.maximum(dr, dc).amin(dim=(1, 3)).to(torch.int64)


def temporal_block_keep(grid, q_start, q_len, k_start, k_len, radius: int) -> torch.Tensor:
    """``(NQ, NK)`` bool: blocks of the position-major video (offsets relative to the first video token)
    holding a (query, key) pair whose positions are within Chebyshev distance ``radius`` (any frames)."""
    return temporal_block_gap(grid, q_start, q_len, k_start, k_len) <= radius


def text_block_keep(keep: torch.Tensor, q_text: torch.Tensor, k_text: torch.Tensor) -> torch.Tensor:
    """``keep`` with text query rows and text key columns set (text stays dense); broadcasts over leading dims."""
    return keep | q_text[:, None] | k_text[None, :]


def block_density(keep: torch.Tensor, q_len: torch.Tensor, k_len: torch.Tensor,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of token pairs inside kept blocks: ``Σ keep·q_len·k_len / (Σq_len·Σk_len)`` over the last two
    dims (float64; leading dims kept). The sums are taken in integers (exact), one ``keep``-sized int32 pass:
    the kept keys of each query block, then their pairs. ``rows``: query block ``i`` keeps mask row
    ``rows[..., i]`` (as in :func:`sagevideo.sparse.blocks.block_mask_to_layout`)."""
    kept_keys = torch.where(keep, k_len.to(torch.int32)[..., None, :], 0).sum(-1, dtype=torch.int64)
    if rows is not None:
        kept_keys = kept_keys.gather(-1, rows.to(device=kept_keys.device, dtype=torch.int64))
    pairs = (kept_keys * q_len.to(torch.int64)).sum(-1)
    total = q_len.to(torch.int64).sum(-1) * k_len.to(torch.int64).sum(-1)
    return pairs.to(torch.float64) / total.clamp_min(1).to(torch.float64)


def _smallest_width(gap: torch.Tensor, forced: torch.Tensor, area: torch.Tensor, hi: int, density: float) -> int:
    """Smallest width ``w`` in ``[0, hi]`` with ``density(gap ≤ w or forced) ≥ density`` (``hi`` if none):
    one pass over the blocks (a histogram of the area per gap), not one map per candidate width."""
    total = float(area.sum())
    base = float(area[forced].sum())
    g = gap[~forced].clamp(max=hi + 1)
    hist = torch.zeros(hi + 2, dtype=torch.float64).index_add_(0, g.reshape(-1), area[~forced].reshape(-1))
    reached = (base + torch.cumsum(hist, 0)[: hi + 1]) / max(total, 1.0) >= density - 1e-12
    idx = reached.nonzero()
    return int(idx[0]) if idx.numel() else hi


# ----------------------------------------------------------------------------------------------------------
# Token-level patterns (profiling rows and tests; never S×S in the runtime path)
# ----------------------------------------------------------------------------------------------------------


def video_coords(grid, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t, h, w)`` of frame-major video token indices."""
    _, h, w = grid
    return index // (h * w), (index // w) % h, index % w


def spatial_token_keep(tq, tk, width: int) -> torch.Tensor:
    """Spatial pattern on frame indices (broadcast): ``|t_q − t_k| ≤ width`` or ``t_k = 0``."""
    return ((tq - tk).abs() <= width) | (tk == 0)


def temporal_token_keep(hq, wq, hk, wk, radius: int) -> torch.Tensor:
    """Temporal pattern on positions (broadcast): ``max(|h_q − h_k|, |w_q − w_k|) ≤ radius`` in any frame."""
    return ((hq - hk).abs() <= radius) & ((wq - wk).abs() <= radius)


# ----------------------------------------------------------------------------------------------------------
# The two maps of one sequence shape (cached: they depend on the shape only)
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpatioTemporalMaps:
    """Block partition and the spatial / temporal keep maps (text rows/columns included) of one shape.

    ``q_*`` / ``k_*`` are CPU int64 ``(NQ,)`` / ``(NK,)`` absolute block starts and lengths of the permuted
    sequence (the same partition for both head types); ``spatial`` / ``temporal`` are ``(NQ, NK)`` bool;
    ``width`` (frames) and ``radius`` (positions) are the chosen window sizes; ``*_density`` their video×video
    block densities.
    """

    q_start: torch.Tensor
    q_len: torch.Tensor
    q_text: torch.Tensor
    k_start: torch.Tensor
    k_len: torch.Tensor
    k_text: torch.Tensor
    spatial: torch.Tensor
    temporal: torch.Tensor
    width: int
    radius: int
    spatial_density: float
    temporal_density: float


@functools.lru_cache(maxsize=64)
def _maps_cached(grid, video_start, text_start, text_len, block_m, block_n, density, width, radius):
    layout = TokenLayout(grid=grid, video_start=video_start, text_start=text_start, text_len=text_len)
    qs, ql, qt = sequence_blocks(layout, block_m)
    # KV blocks cut at multiples of 16 rows (aligned loads in the quantized kernel, BlockLayout.kv_reach)
    ks, kl, kt = sequence_blocks(layout, block_n, align=16 if block_n % 16 == 0 else 1)
    qv, kv = ~qt, ~kt
    # offsets relative to the first video token, video blocks only
    qvs, qvl = qs[qv] - video_start, ql[qv]
    kvs, kvl = ks[kv] - video_start, kl[kv]

    t, h, w = grid
    area = qvl.to(torch.float64)[:, None] * kvl.to(torch.float64)[None, :]
    s_gap = spatial_block_gap(grid, qvs, qvl, kvs, kvl)
    sink = (kvs < h * w)[None, :].expand_as(s_gap)
    t_gap = temporal_block_gap(grid, qvs, qvl, kvs, kvl)
    if width is None:
        width = _smallest_width(s_gap, sink, area, t - 1, density)
    if radius is None:
        radius = _smallest_width(t_gap, torch.zeros_like(sink), area, max(h, w) - 1, density)
    s_keep = (s_gap <= width) | sink
    t_keep = t_gap <= radius
    s_d = float(block_density(s_keep, qvl, kvl))
    t_d = float(block_density(t_keep, qvl, kvl))

    def full(video_keep):
        keep = torch.zeros(qs.shape[0], ks.shape[0], dtype=torch.bool)
        keep[qv.nonzero()[:, 0][:, None], kv.nonzero()[:, 0][None, :]] = video_keep
        return text_block_keep(keep, qt, kt)

    return SpatioTemporalMaps(
        qs, ql, qt, ks, kl, kt, full(s_keep), full(t_keep), int(width), int(radius), s_d, t_d
    )


def spatiotemporal_maps(
    layout: TokenLayout,
    *,
    block_m: int,
    block_n: int,
    density: float | None = None,
    width: int | None = None,
    radius: int | None = None,
) -> SpatioTemporalMaps:
    """The spatial and temporal block keep maps of ``layout`` (cached per shape and settings).

    ``width`` (frames of the spatial band) and ``radius`` (positions of the temporal neighbourhood) are chosen
    from ``density`` when not given: the smallest whose video×video block density is ≥ ``density``.
    """
    if width is None or radius is None:
        if density is None or not (0.0 < float(density) <= 1.0):
            raise ValueError(f"sparse attention: density must be in (0, 1], got {density!r}")
    if width is not None and width < 0 or radius is not None and radius < 0:
        raise ValueError("sparse attention: width and radius must be ≥ 0")
    return _maps_cached(
        layout.grid, layout.video_start, layout.text_start, layout.text_len, int(block_m), int(block_n),
        None if density is None else float(density), width, radius,
    )


def _class_lists(maps: SpatioTemporalMaps, block_m: int, block_n: int, device: torch.device) -> dict:
    """Per head class (dense, spatial, temporal) the block lists of one shape, on ``device``, built once and
    kept on the (cached) maps: a plan then only gathers rows by class (no keep map, no sort per call)."""
    from sagevideo.sparse.blocks import block_mask_to_layout

    cache = maps.__dict__.setdefault("_device_lists", {})
    key = (str(device), int(block_m), int(block_n))
    if key not in cache:
        nq, nk = maps.spatial.shape
        keeps = [torch.ones(nq, nk, dtype=torch.bool), maps.spatial, maps.temporal]  # by HEAD_* value
        q_start, q_len = maps.q_start.to(torch.int32)[None, None], maps.q_len.to(torch.int32)[None, None]
        k_start, k_len = maps.k_start.to(torch.int32)[None, None], maps.k_len.to(torch.int32)[None, None]
        lists = [block_mask_to_layout(q_start, q_len, k_start, k_len, keep[None, None], block_m, block_n)
                 for keep in keeps]
        # the three classes' lists end to end, each class's offsets shifted to its part
        base = [0]
        for lay in lists[:-1]:
            base.append(base[-1] + lay.kv_index.numel())
        offset = torch.stack([lay.kv_offset[0, 0] + base[c] for c, lay in enumerate(lists)])
        cache[key] = {
            "q_start": q_start[0, 0].to(device), "q_len": q_len[0, 0].to(device),
            "k_start": k_start[0, 0].to(device), "k_len": k_len[0, 0].to(device),
            "index": torch.cat([lay.kv_index for lay in lists]).to(device), "offset": offset.to(device),
            "count": torch.stack([lay.kv_count[0, 0] for lay in lists]).to(device),
            # the KV blocks' alignment (BlockLayout.kv_aligned / kv_reach), the same for every class
            "kv_geometry": (lists[0].kv_aligned, lists[0].kv_reach),
            "density": [float(block_density(keep, maps.q_len, maps.k_len)) for keep in keeps],
        }
        cache[key]["density_t"] = torch.tensor(cache[key]["density"], dtype=torch.float64).to(device)
    return cache[key]


def plan_spatiotemporal(
    head_classes: torch.Tensor,
    layout: TokenLayout,
    *,
    density: float = 0.25,
    block_m: int = 128,
    block_n: int = 64,
    width: int | None = None,
    radius: int | None = None,
    device=None,
) -> SparsePlan:
    """Block layout and permutations for per-(batch, head) classes (Sparse VideoGen, arXiv 2502.01776).

    Args:
        head_classes: ``(B, H)`` int, ``HEAD_DENSE`` (0), ``HEAD_SPATIAL`` (1) or ``HEAD_TEMPORAL`` (2).
        layout: the sequence (see :func:`token_layout`).
        density, width, radius: see :func:`spatiotemporal_maps`.
        block_m, block_n: query / key block sizes of the kernel.
        device: where the layout and perms go (``head_classes.device`` by default).

    Temporal heads get the position-major permutation for Q and K/V; dense heads keep every block. The block
    lists of each class are built once per shape and device and shared by every plan of that shape: a plan
    holds, per (batch, head, query block), where its list starts and how long it is, chosen by the head's
    class, with one host sync (the class histogram: range check, whether any head is temporal and the mean
    density).
    """
    from sagevideo.sparse.blocks import BlockLayout

    device = head_classes.device if device is None else torch.device(device)
    maps = spatiotemporal_maps(layout, block_m=block_m, block_n=block_n, density=density, width=width, radius=radius)
    lists = _class_lists(maps, block_m, block_n, device)
    cls = head_classes.to(device=device, dtype=torch.int64)
    b, h = cls.shape
    bad = ((cls < 0) | (cls > 2)).any().reshape(1)
    is_dense = (cls == HEAD_DENSE).flatten().to(torch.int64)
    stats = torch.cat([torch.bincount(cls.clamp(0, 2).flatten(), minlength=3), bad.to(torch.int64), is_dense])
    stats = stats.tolist()  # the plan's one host sync
    if stats[3]:
        raise ValueError("head_classes must hold 0 (dense), 1 (spatial) or 2 (temporal)")
    nq, nk = lists["q_start"].shape[0], lists["k_start"].shape[0]

    def expand(x, n):
        return x[None, None, :].expand(b, h, n).contiguous()

    block_layout = BlockLayout(
        expand(lists["q_start"], nq), expand(lists["q_len"], nq), expand(lists["k_start"], nk),
        expand(lists["k_len"], nk), lists["index"], lists["count"][cls].contiguous(), block_m, block_n,
        kv_aligned=lists["kv_geometry"][0], kv_reach=lists["kv_geometry"][1],
        kv_offset=lists["offset"][cls].contiguous(),
    )
    q_perm = kv_perm = None
    if stats[HEAD_TEMPORAL]:
        ident = sequence_perm(layout, False, device)
        pm = sequence_perm(layout, True, device)
        q_perm = torch.where((cls == HEAD_TEMPORAL)[:, :, None], pm, ident).to(torch.int32)
        kv_perm = q_perm
    per_class = lists["density"]
    density_bh = lists["density_t"][cls]
    info = {
        "head_classes": cls,
        "width": maps.width,
        "radius": maps.radius,
        "spatial_density": maps.spatial_density,
        "temporal_density": maps.temporal_density,
        "density_per_head": density_bh,
    }
    mean_density = sum(stats[c] * per_class[c] for c in range(3)) / max(1, b * h)
    dense_heads = tuple(i for i, f in enumerate(stats[4:]) if f)
    return SparsePlan(block_layout, q_perm, kv_perm, float(mean_density), info, dense_heads)
