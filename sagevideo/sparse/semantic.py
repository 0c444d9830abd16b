"""Semantic-aware permutation: k-means clusters of Q and K, a top-p budget over cluster pairs.

Sparse VideoGen2 (Yang et al., arXiv 2505.18875): tokens that attend alike are scattered over the video, so
position-based blocks mix critical and negligible keys. Clustering the queries and the keys of each head with
k-means and reordering the tokens so that every cluster is contiguous turns the critical part of the attention
map into a few dense cluster-pair tiles:

1. k-means on Q and on K of every (batch, head) (:func:`sagevideo.sparse.kmeans.batched_kmeans`);
2. stable sort of the video tokens by label → ``q_perm`` (Q) and ``kv_perm`` (K and V); each cluster is cut
   into blocks of at most ``block_m`` / ``block_n`` tokens (``cluster_blocks``);
3. cluster-pair weights ``softmax_j(q_c_i · k_c_j · scale + log |K_j|)`` — the attention of a query centroid
   to the key centroids, each key cluster counted with its size;
4. per query cluster, the key clusters in decreasing weight until their cumulative weight reaches ``top_p``
   (the one crossing it included), and never fewer than ``ceil(min_kc_ratio · k_clusters)``
   (:func:`top_p_keep`);
5. the cluster-pair map expanded to blocks; text query blocks attend every block and every query block
   attends the text blocks (text is neither clustered nor permuted).

Unlike SVG2 (batch 1, one centroid cache shared by the CFG passes) every (batch, head) here has its own
clustering, so batch > 1 and batched CFG work. Defaults: ``top_p`` 0.9 and ``min_kc_ratio`` 0.1 are SVG2's;
300 query / 1000 key clusters are its Wan 2.1 T2V 720p setting, and :func:`default_clusters` keeps them where
the video is long enough and uses fewer, larger clusters on shorter videos.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch

from sagevideo.context import TokenLayout
from sagevideo.reference import default_scale
from sagevideo.sparse.kmeans import batched_kmeans
from sagevideo.sparse.patterns import SparsePlan, block_density, sequence_blocks

__all__ = [
    "DEFAULT_Q_CLUSTERS",
    "DEFAULT_K_CLUSTERS",
    "default_clusters",
    "DEFAULT_TOP_P",
    "DEFAULT_MIN_KC_RATIO",
    "cluster_weights",
    "top_p_keep",
    "labels_to_perm",
    "invert_perm",
    "plan_semantic",
    "PlanGraphs",
    "PLAN_GRAPHS",
]

DEFAULT_Q_CLUSTERS = 300
DEFAULT_K_CLUSTERS = 1000
DEFAULT_TOP_P = 0.9
DEFAULT_MIN_KC_RATIO = 0.1


#: the fewest clusters :func:`default_clusters` picks (where the video has that many tokens)
MIN_Q_CLUSTERS = 128
MIN_K_CLUSTERS = 256


def default_clusters(video_tokens: int, block_m: int, block_n: int) -> tuple[int, int]:
    """The (query, key) cluster counts used when none are given: one per ``block_m`` query rows / ``block_n``
    keys of video, so that a cluster fills the kernel's tiles on average, between SVG2's 300 / 1000 (its Wan
    720p setting) above and :data:`MIN_Q_CLUSTERS` / :data:`MIN_K_CLUSTERS` below.

    Why fewer clusters on shorter videos: the kernel walks one tile per (query block, kept KV block) however
    few rows either holds, and its time follows the tiles it walks. SVG2's counts give clusters of ~250
    queries and ~75 keys at 720p, but smaller than a tile at 480p. Measured on an H100 (2026-11-24,
    ``int8-fp8``, top-p 0.9, inputs with locality over the grid, the whole call with its plan, × SDPA-cuDNN;
    cosine of sampled rows against fp32 dense attention):

    - Wan2.1-1.3B 480p (32,760 tokens): 300 / 1000 → 1.07×, cos 0.9867; 256 / 512 (this rule) → 1.53×, 0.9834
      (re-planned at every call; these host-bound calls vary by 10-15 % between runs).
    - CogVideoX-5B (17,550 video tokens): 300 / 1000 → 0.55×: key clusters of 17.5 tokens make every head walk
      ~0.89 of the dense tiles, so every head goes to the dense op (:data:`DENSE_TILE_FRACTION`) after the plan.
      138 / 275 (this rule) → 1.30×, cos 0.9883, density 0.11.
    - Wan2.1-14B and HunyuanVideo 720p: 300 / 1000 either way.

    Why the floor: with very few clusters the top-p budget is coarse. On the bundled model (its 2026-11-23 weights,
    2,304 tokens, CPU ``sagevideo compare``, the shipped semantic schedule): 300 / 1000 → 39.28 dB PSNR against dense,
    128 / 256 → 39.16, 64 / 128 → 37.33, 18 / 36 (one cluster per tile, no floor) → 34.36. On a GPU the floor leaves
    such short videos to the tile rule, which sends their heads to the dense op.
    """
    nv = max(1, int(video_tokens))
    q = min(DEFAULT_Q_CLUSTERS, max(MIN_Q_CLUSTERS, -(-nv // int(block_m))))
    k = min(DEFAULT_K_CLUSTERS, max(MIN_K_CLUSTERS, -(-nv // int(block_n))))
    return q, k


def cluster_weights(q_centroids, k_centroids, k_sizes, scale: float) -> torch.Tensor:
    """``(..., Cq, Ck)`` fp32: ``softmax_j(q_c_i · k_c_j · scale + log |K_j|)``; empty key clusters get 0."""
    logits = torch.matmul(q_centroids.float(), k_centroids.float().transpose(-1, -2)) * scale
    log_size = torch.log(k_sizes.to(torch.float32))  # -inf for empty clusters
    return torch.softmax(logits + log_size[..., None, :], dim=-1)


def top_p_keep(weights: torch.Tensor, top_p: float, min_count: int) -> torch.Tensor:
    """Bool mask of the same shape as ``weights`` ``(..., C)``: per row, the entries in decreasing weight
    (ties: lower index first) while the weight kept *before* each is below ``top_p``, plus at least the first
    ``min_count`` of them. ``top_p ≥ 1`` keeps every entry with positive weight (and the ``min_count`` first)."""
    order = torch.sort(weights, dim=-1, descending=True, stable=True)
    sorted_w = order.values
    rank = torch.arange(weights.shape[-1], device=weights.device)
    if top_p >= 1.0:
        keep_sorted = sorted_w > 0
    else:
        before = torch.cumsum(sorted_w, dim=-1) - sorted_w
        keep_sorted = before < top_p
    keep_sorted = keep_sorted | (rank < min_count)
    return torch.zeros_like(keep_sorted).scatter(-1, order.indices, keep_sorted)


def labels_to_perm(labels: torch.Tensor) -> torch.Tensor:
    """Stable sort by label: ``perm[..., j]`` is the index of the ``j``-th token once clusters are contiguous."""
    return torch.sort(labels, dim=-1, stable=True).indices


def invert_perm(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation along the last dim: ``x[perm][inv] == x``."""
    inv = torch.empty_like(perm)
    ids = torch.arange(perm.shape[-1], device=perm.device, dtype=perm.dtype).expand_as(perm)
    inv.scatter_(-1, perm.long(), ids)
    return inv


def _bhsd(t, tensor_layout):
    if tensor_layout == "BSHD":
        return t.transpose(1, 2)
    if tensor_layout != "BHSD":
        raise ValueError(f"tensor_layout must be 'BHSD' or 'BSHD', got {tensor_layout!r}")
    return t


_TEXT_BLOCKS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _text_blocks(layout: TokenLayout, block: int, align: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start, len)`` int64 ``(N,)`` on ``device``: the text segment cut as :func:`sequence_blocks` cuts it.
    Cached per device, so a plan under CUDA graph capture copies nothing from the host."""
    key = (layout.text_start, layout.text_len, block, align, str(device))
    if key not in _TEXT_BLOCKS:
        if len(_TEXT_BLOCKS) > 64:
            _TEXT_BLOCKS.clear()
        ts, tl, is_text = sequence_blocks(TokenLayout(text_start=layout.text_start, text_len=layout.text_len), block,
                                          align=align if block % align == 0 else 1)
        _TEXT_BLOCKS[key] = (ts[is_text].to(device), tl[is_text].to(device))
    return _TEXT_BLOCKS[key]


def _blocks_with_text(sizes, block, layout: TokenLayout, device, align: int = 1, static: bool = False):
    """Cluster blocks of the video segment (absolute starts, cut at multiples of ``align``: 16 on the KV side,
    so the kernel reads every block with aligned loads) plus uniform text blocks, in sequence order.
    Returns ``(start, len, cluster)`` int ``(B, H, N)``; text blocks have cluster -2, padding slots -1.
    ``static``: the block count is :func:`max_cluster_blocks`' bound, with no host sync."""
    from sagevideo.sparse.blocks import cluster_blocks, max_cluster_blocks

    nv, c = layout.video_len, sizes.shape[-1]
    fixed = dict(num_blocks=max_cluster_blocks(nv, c, block, align), seq_len=nv) if static else {}
    start, length, cluster = cluster_blocks(sizes, block, align=align, offset=layout.video_start, **fixed)
    start = start.to(device=device, dtype=torch.int64)
    length = length.to(device=device, dtype=torch.int64)
    cluster = cluster.to(device=device, dtype=torch.int64)
    if not layout.text_len:
        return start, length, cluster
    ts, tl = _text_blocks(layout, block, align, device)
    b, h, _ = start.shape
    t_start = ts.expand(b, h, -1)
    t_len = tl.expand(b, h, -1)
    t_cluster = torch.full_like(t_start, -2)
    parts = [(start, length, cluster), (t_start, t_len, t_cluster)]
    if layout.text_start < layout.video_start:
        parts.reverse()
    return tuple(torch.cat([p[i] for p in parts], dim=-1).contiguous() for i in range(3))


def _check_settings(top_p, min_kc_ratio, q_clusters, k_clusters) -> None:
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"semantic sparse attention: top_p must be in (0, 1], got {top_p}")
    if not 0.0 <= min_kc_ratio <= 1.0:
        raise ValueError(f"semantic sparse attention: min_kc_ratio must be in [0, 1], got {min_kc_ratio}")
    if q_clusters < 1 or k_clusters < 1:
        raise ValueError(f"semantic sparse attention: cluster counts must be ≥ 1, got {q_clusters}/{k_clusters}")


def _plan_tensors(qv, kv, layout: TokenLayout, b: int, hq: int, hk: int, cq: int, ck: int, *, iters, top_p,
                  min_count, q_init, k_init, generator, scale, block_m, block_n, static: bool) -> dict:
    """The plan's tensors from the video rows ``qv`` ``(B·Hq, Nv, D)`` and ``kv`` ``(B·Hk, Nv, D)``: steps 1-5
    of the module docstring. ``static``: no host sync and shapes that depend only on the arguments (block
    counts from :func:`max_cluster_blocks`, ``NK`` slots per block list), so the whole function can be captured
    in a CUDA graph; otherwise the block counts are the data's (one sync in :func:`cluster_blocks` per side, one in
    :func:`block_mask_to_layout`)."""
    from sagevideo.sparse.blocks import block_mask_to_layout

    s, d = layout.seq_len, qv.shape[-1]
    device = qv.device
    g = hq // hk
    vs, nv = layout.video_slice, layout.video_len
    qk = batched_kmeans(qv, cq, iters=iters, init=q_init, generator=generator)
    kk = batched_kmeans(kv, ck, iters=iters, init=k_init, generator=generator)

    # permutations of the whole sequence: video rows sorted by label, text rows in place
    ident = torch.arange(s, device=device, dtype=torch.int32)  # int32: what the kernels read
    q_perm = ident.repeat(b, hq, 1)
    q_perm[:, :, vs] = qk.order.reshape(b, hq, nv) + layout.video_start  # = labels_to_perm(qk.labels)
    kv_perm_k = ident.repeat(b, hk, 1)
    kv_perm_k[:, :, vs] = kk.order.reshape(b, hk, nv) + layout.video_start
    kv_perm = kv_perm_k.repeat_interleave(g, dim=1) if g > 1 else kv_perm_k

    q_sizes = qk.sizes.reshape(b, hq, cq)
    k_sizes = kk.sizes.reshape(b, hk, ck)
    q_start, q_len, q_cl = _blocks_with_text(q_sizes, block_m, layout, device, static=static)
    k_start, k_len, k_cl = _blocks_with_text(k_sizes, block_n, layout, device, align=16, static=static)
    if g > 1:
        k_start, k_len, k_cl = (x.repeat_interleave(g, dim=1) for x in (k_start, k_len, k_cl))
        k_sizes_q = k_sizes.repeat_interleave(g, dim=1)
        k_cent_q = kk.centroids.reshape(b, hk, ck, d).repeat_interleave(g, dim=1)
    else:
        k_sizes_q = k_sizes
        k_cent_q = kk.centroids.reshape(b, hk, ck, d)

    weights = cluster_weights(qk.centroids.reshape(b, hq, cq, d), k_cent_q, k_sizes_q, scale)
    cluster_keep = top_p_keep(weights, top_p, min_count)  # (B, Hq, Cq, Ck)

    # Every query block of a cluster keeps the same KV blocks: one mask row per query cluster, plus one
    # (row cq) for the text query blocks, which keep every block. Video key blocks follow the cluster pairs,
    # text key blocks are kept by every row; padding slots (cluster -1, length 0) are dropped by the layout.
    nk = k_start.shape[-1]
    k_cl_video = k_cl.clamp_min(0)[:, :, None, :].expand(b, hq, cq, nk)
    video_rows = cluster_keep.gather(3, k_cl_video) & (k_cl >= 0)[..., None, :] | (k_cl == -2)[..., None, :]
    row_keep = torch.cat([video_rows, torch.ones_like(video_rows[:, :, :1])], dim=2)  # (B, Hq, Cq + 1, NK)
    rows = torch.where(q_cl == -2, cq, q_cl.clamp_min(0))  # (B, Hq, NQ)

    block_layout = block_mask_to_layout(
        q_start.to(torch.int32), q_len.to(torch.int32), k_start.to(torch.int32), k_len.to(torch.int32),
        row_keep, block_m, block_n, rows=rows,
        # cluster_blocks(align=16) and the text cut keep every KV block within block_n keys of the multiple of
        # 16 at or below its start; whether all happen to start aligned is left unknown (False)
        kv_geometry=(False, block_n) if static else None,
    )
    # the kernel's work per head: one tile per (query block, kept KV block) pair, however few rows they hold
    tiles = block_layout.kv_count.sum(-1, dtype=torch.int64).to(torch.float64)
    return {
        "tile_fraction_per_head": tiles / (math.ceil(s / block_m) * math.ceil(s / block_n)),
        "layout": block_layout,
        "q_perm": q_perm,
        "kv_perm": kv_perm,
        "q_centroids": qk.centroids,
        "k_centroids": kk.centroids,
        "q_sizes": q_sizes,
        "k_sizes": k_sizes,
        "cluster_keep": cluster_keep,
        "density_per_head": block_density(row_keep, q_len, k_len, rows=rows),
        "iters": qk.iters,
    }


#: On CUDA, a head whose plan makes the block-sparse kernel walk at least this fraction of the tiles of dense
#: attention (same tile shape) runs through the dense op instead. Cluster blocks are ragged (Wan2.1-1.3B 480p:
#: ~33 keys per key cluster in 64-key tiles), so a plan keeping most pairs costs the kernel more tiles than dense
#: attention, and the dense op runs a tile ~1.2x faster than the block-sparse kernel (H100, benchmarks/RESULTS.md).
#: With random weights (density 0.88) a Wan2.1-1.3B layer-call took ~37 ms sparse against ~11 ms dense. The rule
#: is about the kernel's cost, so it applies where the kernel runs; elsewhere (CPU) such heads stay sparse, and
#: a CPU fidelity check of a semantic schedule is a lower bound for the GPU's. None disables it.
DENSE_TILE_FRACTION: float | None = 0.8


def _plan_from_tensors(t: dict, pack: bool = False) -> SparsePlan:
    """The :class:`SparsePlan` of :func:`_plan_tensors`' result (one host sync: the per-head densities and tile
    fractions; ``pack``: one more, to store the static form's lists, ``NK`` slots each, packed:
    :meth:`BlockLayout.packed`, so that a held plan takes the kept pairs' memory). Heads with every pair kept,
    or (on CUDA) with :data:`DENSE_TILE_FRACTION` of the dense tiles or more, are the plan's ``dense_heads``;
    the plan's ``density`` counts the latter as 1 (all their pairs are computed), while
    ``info["density_per_head"]`` keeps the selection's."""
    info = {name: t[name] for name in ("q_centroids", "k_centroids", "q_sizes", "k_sizes", "cluster_keep", "iters",
                                       "density_per_head", "tile_fraction_per_head")}
    per_head, tiles = torch.stack([t["density_per_head"].flatten(), t["tile_fraction_per_head"].flatten()]).tolist()
    limit = DENSE_TILE_FRACTION if t["layout"].device.type == "cuda" and DENSE_TILE_FRACTION is not None else math.inf
    dense_heads = tuple(i for i, (x, f) in enumerate(zip(per_head, tiles)) if x >= 1.0 or f >= limit)
    # the plan's density is the share of pairs computed: a head sent to the dense op computes all of its pairs
    computed = [1.0 if f >= limit else x for x, f in zip(per_head, tiles)]
    layout = t["layout"].packed() if pack else t["layout"]
    return SparsePlan(layout, t["q_perm"], t["kv_perm"], sum(computed) / max(1, len(computed)), info, dense_heads)


def plan_semantic(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TokenLayout,
    *,
    q_clusters: int = DEFAULT_Q_CLUSTERS,
    k_clusters: int = DEFAULT_K_CLUSTERS,
    iters: int = 2,
    top_p: float = DEFAULT_TOP_P,
    min_kc_ratio: float = DEFAULT_MIN_KC_RATIO,
    q_init: torch.Tensor | None = None,
    k_init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    scale: float | None = None,
    block_m: int = 128,
    block_n: int = 64,
    tensor_layout: str = "BHSD",
    static: bool = False,
    graph: bool = False,
) -> SparsePlan:
    """Block layout and permutations from k-means on Q and K (Sparse VideoGen2, arXiv 2505.18875).

    Args:
        q, k: ``tensor_layout`` tensors ``(B, Hq, S, D)`` / ``(B, Hk, S, D)`` (or BSHD); ``Hq`` a multiple of
            ``Hk`` (K is clustered per k/v head; its clusters serve every query head of the group).
        layout: the sequence's :class:`TokenLayout` (video grid, text position); only video tokens are
            clustered.
        q_clusters, k_clusters: clusters per (batch, head), clamped to the number of video tokens.
        iters: k-means rounds (SVG2: 50 for a fresh start, 2 warm-started).
        top_p, min_kc_ratio: see :func:`top_p_keep` (the minimum is ``ceil(min_kc_ratio · k_clusters)``).
        q_init, k_init: warm-start centroids ``(B·Hq, Cq, D)`` / ``(B·Hk, Ck, D)`` (e.g. the previous step's,
            ``plan.info["q_centroids"]``); drawn from ``generator`` when None.
        scale: softmax scale of the cluster scores (``1/sqrt(D)`` when None).
        block_m, block_n: query / key block sizes (clusters are cut into chunks of at most these).
        static: build the layout with shapes fixed by the arguments and no host sync until the end: block counts
            from :func:`sagevideo.sparse.blocks.max_cluster_blocks` (padding slots of length 0 for the rest) and
            ``NK`` slots for every block list (packed at the end, one more host sync). The same blocks,
            permutations and attention as the default form (tested). Needs ``block_n`` a multiple of 16.
        graph: on CUDA, with warm-start centroids, replay a CUDA graph of the static plan (captured on the first
            call of each signature, :class:`PlanGraphs`): one launch instead of several hundred small ones, for
            shapes where launching dominates (Wan2.1-1.3B 480p: ~10 ms of host time against a few ms of GPU
            work). Where a graph cannot be used (CPU, cold start, under another capture) the plan is built
            eagerly, in the form ``static`` says.

    Returns:
        :class:`SparsePlan` with ``q_perm``/``kv_perm`` ``(B, Hq, S)``; ``info`` holds ``q_centroids``,
        ``k_centroids``, ``q_sizes``, ``k_sizes``, ``cluster_keep`` (``(B, Hq, Cq, Ck)``), ``iters``,
        ``density_per_head``, ``tile_fraction_per_head`` (the kernel's tiles over dense attention's, which
        decides ``dense_heads`` with the density: :data:`DENSE_TILE_FRACTION`) and ``graph`` (whether a CUDA
        graph was replayed).
    """
    _check_settings(top_p, min_kc_ratio, q_clusters, k_clusters)
    qb, kb = _bhsd(q, tensor_layout), _bhsd(k, tensor_layout)
    b, hq, s, d = qb.shape
    hk = kb.shape[1]
    scale = default_scale(d) if scale is None else scale
    vs = layout.video_slice
    nv = layout.video_len
    cq, ck = min(int(q_clusters), nv), min(int(k_clusters), nv)
    if q_init is not None and q_init.shape[1] != cq or k_init is not None and k_init.shape[1] != ck:
        raise ValueError("semantic sparse attention: warm-start centroids have another cluster count")
    # a static plan states the KV blocks' reach instead of measuring it: true for cluster_blocks(align=16) cuts,
    # which need block_n a multiple of 16
    if (static or graph) and block_n % 16:
        raise ValueError(f"semantic sparse attention: static/graphed plans need block_n a multiple of 16, got {block_n}")
    settings = dict(iters=int(iters), top_p=float(top_p), min_count=max(1, math.ceil(min_kc_ratio * ck - 1e-9)),
                    scale=float(scale), block_m=int(block_m), block_n=int(block_n))
    if graph and q.is_cuda and q_init is not None and k_init is not None \
            and not torch.cuda.is_current_stream_capturing():
        plan = PLAN_GRAPHS.run(qb[:, :, vs], kb[:, :, vs], q_init, k_init, layout, cq, ck, settings)
        if plan is not None:
            return plan
    t = _plan_tensors(
        qb[:, :, vs].reshape(b * hq, nv, d), kb[:, :, vs].reshape(b * hk, nv, d), layout, b, hq, hk, cq, ck,
        q_init=q_init, k_init=k_init, generator=generator, static=static, **settings,
    )
    plan = _plan_from_tensors(t, pack=static)
    plan.info["graph"] = False
    return plan


class PlanGraphs:
    """CUDA graphs of the warm-started static semantic plan, one per signature (shapes, dtype, device, token
    layout, settings), shared by every layer that has that signature; the ``max_graphs`` most recently used are
    kept.

    A call copies the video rows of Q and K and the warm-start centroids into the graph's input buffers,
    replays it, and clones the outputs (the next layer's replay overwrites them; a plan may be reused for
    several steps). The first call of a signature runs the static plan eagerly (which also makes the Triton
    kernels choose their launch settings, and fills the device caches, outside the capture), then captures it;
    its result is the eager one. Graph and eager plans are the same computation on the same buffers (tested on CUDA).
    """

    def __init__(self, max_graphs: int = 4):
        self.max_graphs = int(max_graphs)
        self._graphs: dict[tuple, dict] = {}
        self.captures = 0
        self.replays = 0

    def clear(self) -> None:
        """Free every graph (and its memory pool)."""
        self._graphs.clear()

    def run(self, q_video, k_video, q_init, k_init, layout: TokenLayout, cq: int, ck: int, settings: dict):
        """The plan of ``q_video`` ``(B, Hq, Nv, D)`` / ``k_video`` (views into Q and K) with the warm start
        ``q_init``/``k_init``; None when no graph can be used (then the caller plans eagerly)."""
        b, hq, nv, d = q_video.shape
        hk = k_video.shape[1]
        key = (tuple(q_video.shape), hk, q_video.dtype, str(q_video.device), layout, cq, ck,
               tuple(sorted(settings.items())))
        entry = self._graphs.pop(key, None)
        if entry is None:
            entry = self._capture(q_video, k_video, q_init, k_init, layout, cq, ck, settings)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
            return entry.pop("first")
        self._graphs[key] = entry
        if entry["graph"] is None:  # the capture failed for this signature: plan eagerly
            return None
        ins = entry["inputs"]
        ins["q"].view(b, hq, nv, d).copy_(q_video)
        ins["k"].view(b, hk, nv, d).copy_(k_video)
        ins["q_init"].copy_(q_init)
        ins["k_init"].copy_(k_init)
        entry["graph"].replay()
        self.replays += 1
        return self._plan(entry["outputs"])

    @staticmethod
    def _plan(out: dict) -> SparsePlan:
        t = {name: (val.clone() if isinstance(val, torch.Tensor) else val) for name, val in out.items()
             if name != "layout"}
        lay = out["layout"]
        # the block geometry copied out of the graph's buffers; the lists are copied by packing them
        t["layout"] = dataclasses.replace(lay, **{f: getattr(lay, f).clone() for f in ("q_start", "q_len", "k_start",
                                                                                       "k_len", "kv_count")})
        plan = _plan_from_tensors(t, pack=True)
        plan.info["graph"] = True
        return plan

    def _capture(self, q_video, k_video, q_init, k_init, layout, cq, ck, settings):
        b, hq, nv, d = q_video.shape
        hk = k_video.shape[1]
        ins = {
            "q": q_video.reshape(b * hq, nv, d).clone(memory_format=torch.contiguous_format),
            "k": k_video.reshape(b * hk, nv, d).clone(memory_format=torch.contiguous_format),
            "q_init": q_init.to(torch.float32).clone(),
            "k_init": k_init.to(torch.float32).clone(),
        }

        def body():
            return _plan_tensors(ins["q"], ins["k"], layout, b, hq, hk, cq, ck, q_init=ins["q_init"],
                                 k_init=ins["k_init"], generator=None, static=True, **settings)

        # the eager run: this call's result, and the warm-up (Triton launch choices, cuBLAS and sort workspaces,
        # the text blocks' device copies) that must not happen during the capture
        first_plan = _plan_from_tensors(body(), pack=True)
        first_plan.info["graph"] = False
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                outputs = body()
        except Exception as exc:  # something in the plan cannot be captured here: plan eagerly from now on
            warnings.warn(f"semantic sparse attention: the plan could not be captured in a CUDA graph ({exc}); "
                          "planning eagerly for this shape", RuntimeWarning, stacklevel=4)
            return {"graph": None, "first": first_plan}
        self.captures += 1
        return {"graph": graph, "inputs": ins, "outputs": outputs, "first": first_plan}


#: The process's plan graphs (:class:`PlanGraphs`); ``PLAN_GRAPHS.clear()`` frees them.
PLAN_GRAPHS = PlanGraphs()
