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
300 query / 1000 key clusters are its Wan 2.1 T2V 720p setting (clamped to the number of video tokens).
"""

from __future__ import annotations

import math

import torch

from sagevideo.context import TokenLayout
from sagevideo.reference import default_scale
from sagevideo.sparse.kmeans import batched_kmeans
from sagevideo.sparse.patterns import SparsePlan, block_density, sequence_blocks

__all__ = [
    "DEFAULT_Q_CLUSTERS",
    "DEFAULT_K_CLUSTERS",
    "DEFAULT_TOP_P",
    "DEFAULT_MIN_KC_RATIO",
    "cluster_weights",
    "top_p_keep",
    "labels_to_perm",
    "invert_perm",
    "plan_semantic",
]

DEFAULT_Q_CLUSTERS = 300
DEFAULT_K_CLUSTERS = 1000
DEFAULT_TOP_P = 0.9
DEFAULT_MIN_KC_RATIO = 0.1


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
    inv.scatter_(-1, perm, torch.arange(perm.shape[-1], device=perm.device).expand_as(perm))
    return inv


def _bhsd(t, tensor_layout):
    if tensor_layout == "BSHD":
        return t.transpose(1, 2)
    if tensor_layout != "BHSD":
        raise ValueError(f"tensor_layout must be 'BHSD' or 'BSHD', got {tensor_layout!r}")
    return t


def _blocks_with_text(sizes, block, layout: TokenLayout, device, align: int = 1):
    """Cluster blocks of the video segment (absolute starts, cut at multiples of ``align``: 16 on the KV side,
    so the kernel reads every block with aligned loads) plus uniform text blocks, in sequence order.
    Returns ``(start, len, cluster)`` int ``(B, H, N)``; text blocks have cluster -2, padding slots -1."""
    from sagevideo.sparse.blocks import cluster_blocks

    start, length, cluster = cluster_blocks(sizes, block, align=align, offset=layout.video_start)
    start = start.to(device=device, dtype=torch.int64)
    length = length.to(device=device, dtype=torch.int64)
    cluster = cluster.to(device=device, dtype=torch.int64)
    if not layout.text_len:
        return start, length, cluster
    ts, tl, is_text = sequence_blocks(TokenLayout(text_start=layout.text_start, text_len=layout.text_len), block,
                                      align=align if block % align == 0 else 1)
    ts, tl = ts[is_text].to(device), tl[is_text].to(device)
    b, h, _ = start.shape
    t_start = ts.expand(b, h, -1)
    t_len = tl.expand(b, h, -1)
    t_cluster = torch.full_like(t_start, -2)
    parts = [(start, length, cluster), (t_start, t_len, t_cluster)]
    if layout.text_start < layout.video_start:
        parts.reverse()
    return tuple(torch.cat([p[i] for p in parts], dim=-1).contiguous() for i in range(3))


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

    Returns:
        :class:`SparsePlan` with ``q_perm``/``kv_perm`` ``(B, Hq, S)``; ``info`` holds ``q_centroids``,
        ``k_centroids``, ``q_sizes``, ``k_sizes``, ``cluster_keep`` (``(B, Hq, Cq, Ck)``), ``iters``.
    """
    from sagevideo.sparse.blocks import block_mask_to_layout

    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"semantic sparse attention: top_p must be in (0, 1], got {top_p}")
    if not 0.0 <= min_kc_ratio <= 1.0:
        raise ValueError(f"semantic sparse attention: min_kc_ratio must be in [0, 1], got {min_kc_ratio}")
    if q_clusters < 1 or k_clusters < 1:
        raise ValueError(f"semantic sparse attention: cluster counts must be ≥ 1, got {q_clusters}/{k_clusters}")
    qb, kb = _bhsd(q, tensor_layout), _bhsd(k, tensor_layout)
    b, hq, s, d = qb.shape
    hk = kb.shape[1]
    g = hq // hk
    scale = default_scale(d) if scale is None else scale
    device = q.device
    vs = layout.video_slice
    nv = layout.video_len
    cq, ck = min(int(q_clusters), nv), min(int(k_clusters), nv)
    if q_init is not None and q_init.shape[1] != cq or k_init is not None and k_init.shape[1] != ck:
        raise ValueError("semantic sparse attention: warm-start centroids have another cluster count")

    qk = batched_kmeans(qb[:, :, vs].reshape(b * hq, nv, d), cq, iters=iters, init=q_init, generator=generator)
    kk = batched_kmeans(kb[:, :, vs].reshape(b * hk, nv, d), ck, iters=iters, init=k_init, generator=generator)

    # permutations of the whole sequence: video rows sorted by label, text rows in place
    ident = torch.arange(s, device=device, dtype=torch.int64)
    q_perm = ident.repeat(b, hq, 1)
    q_perm[:, :, vs] = qk.order.reshape(b, hq, nv) + layout.video_start  # = labels_to_perm(qk.labels)
    kv_perm_k = ident.repeat(b, hk, 1)
    kv_perm_k[:, :, vs] = kk.order.reshape(b, hk, nv) + layout.video_start
    kv_perm = kv_perm_k.repeat_interleave(g, dim=1) if g > 1 else kv_perm_k

    q_sizes = qk.sizes.reshape(b, hq, cq)
    k_sizes = kk.sizes.reshape(b, hk, ck)
    q_start, q_len, q_cl = _blocks_with_text(q_sizes, block_m, layout, device)
    k_start, k_len, k_cl = _blocks_with_text(k_sizes, block_n, layout, device, align=16)
    if g > 1:
        k_start, k_len, k_cl = (x.repeat_interleave(g, dim=1) for x in (k_start, k_len, k_cl))
        k_sizes_q = k_sizes.repeat_interleave(g, dim=1)
        k_cent_q = kk.centroids.reshape(b, hk, ck, d).repeat_interleave(g, dim=1)
    else:
        k_sizes_q = k_sizes
        k_cent_q = kk.centroids.reshape(b, hk, ck, d)

    weights = cluster_weights(qk.centroids.reshape(b, hq, cq, d), k_cent_q, k_sizes_q, scale)
    min_count = max(1, math.ceil(min_kc_ratio * ck - 1e-9))
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
    )
    density_bh = block_density(row_keep, q_len, k_len, rows=rows)
    info = {
        "q_centroids": qk.centroids,
        "k_centroids": kk.centroids,
        "q_sizes": q_sizes,
        "k_sizes": k_sizes,
        "cluster_keep": cluster_keep,
        "iters": qk.iters,
        "density_per_head": density_bh,
    }
    per_head = density_bh.flatten().tolist()
    dense_heads = tuple(i for i, x in enumerate(per_head) if x >= 1.0)
    return SparsePlan(block_layout, q_perm, kv_perm, sum(per_head) / max(1, len(per_head)), info, dense_heads)
