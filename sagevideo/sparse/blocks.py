"""Block-sparse attention: block layouts, the public op and its plain-torch reference.

A :class:`BlockLayout` describes, for every (batch, head), the query blocks and KV blocks of a (possibly
token-permuted) sequence — each block a start row and a length, so clusters of unequal size are cut into
chunks of at most ``block_m``/``block_n`` rows that never straddle two clusters — and, for each query block,
the compact list of KV blocks it attends to (``kv_index``/``kv_count``; never an S×S mask). This is the
layout of Sparse VideoGen2 (Yang et al. 2025, "Sparse VideoGen2: Accelerate Video Generation with Sparse
Attention via Semantic-Aware Permutation"): tokens permuted so that each k-means cluster is contiguous,
then a block list per cluster pair; contiguous equal blocks (:func:`uniform_blocks`) give the spatial /
temporal patterns of Sparse VideoGen (Xi et al. 2025) without a permutation.

:func:`block_sparse_attention` runs the Triton kernel (``kernels/block_sparse_attn.py``) on CUDA: in the
quantized modes the quantization pass (``kernels/quantize.py``, SageAttention2's INT8 Q/K with per-token
scales and smoothed K, FP8 or 16-bit V) reads the inputs through the permutation, so the permuted copy is its
output and nothing else is copied; the kernel stores the output through the same index, in the original
order. Per-token scales and K smoothing stay exact under sparsity: smoothing shifts every score of a row by
the same ``q·mean(K)``, whatever subset of keys the row attends to.

:func:`block_sparse_reference` computes the same thing in plain torch: attention under the equivalent token
mask (:func:`layout_token_mask`, mapped back through the permutations), exact or through the quantized
reference of ``sagevideo.reference``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Literal

import torch

from sagevideo import ops, reference

LAYOUTS = ops.LAYOUTS
PRECISIONS = ops.PRECISIONS
MAX_HEAD_DIM = ops.MAX_KERNEL_HEAD_DIM
#: The largest query block (``block_m``) the kernel takes; kept equal to kernels/block_sparse_attn.MAX_BLOCK_M.
MAX_BLOCK_M = 256
_LAYOUT_FIELDS = ("q_start", "q_len", "k_start", "k_len", "kv_index", "kv_count", "kv_offset")
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
#: int32 offsets address the block lists: at most this many entries in all
MAX_LIST_ENTRIES = (1 << 31) - 1


def _is_int(t: torch.Tensor) -> bool:
    return t.dtype in _INT_DTYPES


# ----------------------------------------------------------------------------------------------------------
# The layout
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockLayout:
    """Query/KV blocks of a (permuted) sequence and the KV blocks each query block attends to.

    Fields (all int32, contiguous, on one device; other integer dtypes are converted on construction):

    * ``q_start``, ``q_len`` ``(B, H, NQ)``: first row and number of rows (``0..block_m``; 0 = an unused
      padding slot) of each query block, in the permuted sequence;
    * ``k_start``, ``k_len`` ``(B, H, NK)``: the same for KV blocks (lengths ``0..block_n``);
    * ``kv_index``, ``kv_offset``, ``kv_count``: the KV blocks each query block attends to, as compressed
      rows: query block ``(b, h, i)`` attends to the ids (``0..NK-1``) ``kv_index[o : o + n]`` with
      ``o = kv_offset[b, h, i]`` and ``n = kv_count[b, h, i]``. ``kv_index`` is 1-D; ``kv_offset`` and
      ``kv_count`` are ``(B, H, NQ)``. Query blocks may share a list (semantic plans: every block of a query
      cluster points at its cluster's list), so the lists take the kept pairs' memory, not ``NQ × max kept``.
      A padded ``kv_index`` ``(B, H, NQ, MAXK)`` (each row's list in its first ``kv_count`` entries) is also
      accepted when ``kv_offset`` is None: it is stored flattened, with ``kv_offset = i · MAXK``;
      :meth:`padded_lists` gives that form back;
    * ``block_m``, ``block_n``: the largest query / KV block;
    * ``kv_aligned``, ``kv_reach``: whether every KV block of nonzero length starts at a multiple of 16 keys,
      and the largest ``k_start % 16 + k_len`` over them (how far each block reaches from the multiple of 16
      at or below its start). The quantized kernel loads FP8 V 16 bytes at a time from aligned starts, or
      through an aligned window when ``kv_reach`` fits its KV tile (:func:`cluster_blocks` with ``align=16``
      cuts clusters so that it does). Leave them None: they are computed from ``k_start``/``k_len`` when first
      needed (one host sync) and kept; the builders of this package pass the values they computed in the host
      sync they make anyway. Wrong values are caught by ``block_sparse_attention(check_layout=True)``.

    Query blocks of one (batch, head) must not overlap, nor KV blocks, and a list must not name a block
    twice; :func:`block_sparse_attention` checks that (and the ranges) against the sequence lengths.
    Rows in no query block get output 0 (LSE −inf), like rows whose keys are all masked.
    """

    q_start: torch.Tensor
    q_len: torch.Tensor
    k_start: torch.Tensor
    k_len: torch.Tensor
    kv_index: torch.Tensor
    kv_count: torch.Tensor
    block_m: int
    block_n: int
    kv_aligned: bool | None = None
    kv_reach: int | None = None
    kv_offset: torch.Tensor | None = None

    def __post_init__(self):
        for name in _LAYOUT_FIELDS:
            t = getattr(self, name)
            if name == "kv_offset" and t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"BlockLayout.{name} must be a torch.Tensor, got {type(t).__name__}")
            if not _is_int(t):
                raise TypeError(f"BlockLayout.{name} must be an integer tensor (int32), got {t.dtype}")
            if name == "kv_index":
                want, dims = (4, "(B, H, NQ, MAXK) when kv_offset is None") if self.kv_offset is None else \
                    (1, "(L,) with kv_offset")
            else:
                want, dims = 3, "(B, H, N)"
            if t.dim() != want:
                raise ValueError(f"BlockLayout.{name} must be {want}-D {dims}, got shape {tuple(t.shape)}")
            if t.dtype != torch.int32 or not t.is_contiguous():
                object.__setattr__(self, name, t.to(torch.int32).contiguous())
        if (self.kv_aligned is None) != (self.kv_reach is None):
            raise ValueError("BlockLayout: give both kv_aligned and kv_reach, or neither (then they are computed)")
        if self.kv_aligned is not None and not isinstance(self.kv_aligned, bool):
            raise TypeError(f"BlockLayout.kv_aligned must be None or a bool, got {self.kv_aligned!r}")
        if self.kv_reach is not None and (isinstance(self.kv_reach, bool) or not isinstance(self.kv_reach, int)):
            raise TypeError(f"BlockLayout.kv_reach must be None or an int, got {self.kv_reach!r}")
        for name in ("block_m", "block_n"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"BlockLayout.{name} must be a positive int, got {val!r}")
        devs = {getattr(self, n).device for n in _LAYOUT_FIELDS if getattr(self, n) is not None}
        if len(devs) > 1:
            raise ValueError(f"BlockLayout tensors are on different devices: {sorted(map(str, devs))}")
        bh = tuple(self.q_start.shape[:2])
        nq, nk = self.q_start.shape[2], self.k_start.shape[2]
        if self.kv_offset is None:  # the padded form: stored flattened, row i's list at i · MAXK
            if tuple(self.kv_index.shape[:3]) != (*bh, nq):
                raise ValueError(
                    f"BlockLayout.kv_index has shape {tuple(self.kv_index.shape)}, expected {(*bh, nq)} + (MAXK,)"
                )
            maxk = self.kv_index.shape[3]
            if self.kv_index.numel() > MAX_LIST_ENTRIES:
                raise ValueError(f"BlockLayout: {self.kv_index.numel()} list entries do not fit int32 offsets")
            offset = (torch.arange(bh[0] * bh[1] * nq, device=self.kv_index.device) * maxk).to(torch.int32)
            offset = offset.view(*bh, nq)
            object.__setattr__(self, "kv_offset", offset)
            object.__setattr__(self, "kv_index", self.kv_index.reshape(-1))
        elif self.kv_index.numel() > MAX_LIST_ENTRIES:
            raise ValueError(f"BlockLayout: {self.kv_index.numel()} list entries do not fit int32 offsets")
        expect = {
            "q_len": (*bh, nq),
            "k_start": (*bh, nk),
            "k_len": (*bh, nk),
            "kv_count": (*bh, nq),
            "kv_offset": (*bh, nq),
        }
        for name, shape in expect.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"BlockLayout.{name} has shape {tuple(getattr(self, name).shape)}, expected {shape} "
                    f"(q_start is {tuple(self.q_start.shape)}, k_start {tuple(self.k_start.shape)})"
                )

    # -- shape ---------------------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.q_start.shape[0]

    @property
    def heads(self) -> int:
        return self.q_start.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.q_start.shape[2]

    @property
    def num_kv_blocks(self) -> int:
        return self.k_start.shape[2]

    @property
    def device(self) -> torch.device:
        return self.q_start.device

    def to(self, device) -> "BlockLayout":
        """The same layout on ``device``."""
        return BlockLayout(**{n: getattr(self, n).to(device) for n in _LAYOUT_FIELDS}, block_m=self.block_m,
                           block_n=self.block_n, kv_aligned=self.kv_aligned, kv_reach=self.kv_reach)

    def kv_geometry(self) -> tuple[bool, int]:
        """``(kv_aligned, kv_reach)``, computed (one host sync) and kept when the layout was built without them."""
        if self.kv_aligned is None:
            aligned, reach = _kv_geometry(self.k_start, self.k_len).tolist()
            object.__setattr__(self, "kv_aligned", bool(aligned))
            object.__setattr__(self, "kv_reach", int(reach))
        return self.kv_aligned, self.kv_reach

    def padded_lists(self, width: int | None = None) -> torch.Tensor:
        """The block lists padded to ``(B, H, NQ, width)`` int32: row ``i`` holds its ``kv_count`` ids first,
        then zeros. ``width`` defaults to the longest list (one host sync); lists longer than ``width`` are cut.
        For references, tests and checks: it takes ``NQ × width`` entries where the layout takes the kept ones."""
        if width is None:
            width = int(self.kv_count.max()) if self.kv_count.numel() else 0
        return _padded_lists(self, max(1, int(width)))

    def packed(self) -> "BlockLayout":
        """The same layout with each query block's list stored once, end to end in block order, and nothing
        else: ``kv_index`` holds ``kv_count.sum()`` entries (one host sync). For layouts whose lists carry
        unused slots, e.g. the static form (``NK`` slots per list) that a CUDA graph builds; a list shared by
        several blocks is copied for each of them, so layouts built with shared lists are smaller as they are."""
        count = self.kv_count.reshape(-1).long()
        ends = count.cumsum(0)
        total = int(ends[-1]) if count.numel() else 0
        if total > MAX_LIST_ENTRIES:
            raise ValueError(f"BlockLayout.packed: {total} list entries do not fit int32 offsets")
        entry = torch.arange(total, device=self.device)
        block = torch.searchsorted(ends, entry, right=True)  # the query block of each entry
        new_start = ends - count
        src = self.kv_offset.reshape(-1).long()[block] + (entry - new_start[block])
        index = self.kv_index[src] if total else self.kv_index.new_zeros(0)
        return dataclasses.replace(self, kv_index=index.to(torch.int32),
                                   kv_offset=new_start.to(torch.int32).view(self.kv_count.shape))

    def keep_matrix(self) -> torch.Tensor:
        """The block-level mask, bool ``(B, H, NQ, NK)`` (small: one entry per block pair)."""
        return _keep_matrix(self)

    @property
    def density(self) -> float:
        """Kept (query row, key) pairs over all pairs.

        That is Σ q_len·(Σ k_len of its kept blocks) / Σ_bh (Σ q_len)·(Σ k_len).

        With blocks covering the sequences that is the fraction of the S_q×S_kv scores computed (key padding
        not counted). 0.0 for an empty layout.
        """
        keep = _keep_matrix(self).to(torch.float64)
        ql = self.q_len.to(torch.float64)
        kl = self.k_len.to(torch.float64)
        kept = (ql[..., :, None] * keep * kl[..., None, :]).sum()
        total = (ql.sum(-1) * kl.sum(-1)).sum()
        return float(kept / total) if total > 0 else 0.0


def _kv_geometry(k_start: torch.Tensor, k_len: torch.Tensor) -> torch.Tensor:
    """int64 ``(2,)`` tensor (no host sync): whether every KV block of nonzero length starts at a multiple of 16
    keys, and the largest ``k_start % 16 + k_len`` over those blocks (0 if none)."""
    live = k_len > 0
    aligned = (~live | (k_start % 16 == 0)).all()
    reach = torch.where(live, k_start.long() % 16 + k_len.long(), 0)
    reach = reach.max() if reach.numel() else reach.new_zeros(())
    return torch.stack([aligned.long(), reach])


def _padded_lists(layout: BlockLayout, width: int) -> torch.Tensor:
    """``(B, H, NQ, width)`` int32: the first ``min(kv_count, width)`` ids of each list, zeros after (entries
    whose address falls outside ``kv_index`` read as −1)."""
    total = layout.kv_index.numel()
    pos = layout.kv_offset.long()[..., None] + torch.arange(width, device=layout.device)
    live = (torch.arange(width, device=layout.device) < layout.kv_count[..., None])
    inside = (pos >= 0) & (pos < total)
    got = layout.kv_index[pos.clamp(0, max(total - 1, 0))] if total else torch.zeros_like(pos, dtype=torch.int32)
    return torch.where(live, torch.where(inside, got, -1), 0).to(torch.int32)


def _keep_matrix(layout: BlockLayout) -> torch.Tensor:
    index = layout.padded_lists()
    b, h, nq, maxk = index.shape
    nk = layout.num_kv_blocks
    live = torch.arange(maxk, device=layout.device) < layout.kv_count[..., None]
    idx = torch.where(live & (index >= 0) & (index < nk), index, nk).long()
    keep = torch.zeros((b, h, nq, nk + 1), dtype=torch.bool, device=layout.device)
    keep.scatter_(3, idx, True)
    return keep[..., :nk]


# ----------------------------------------------------------------------------------------------------------
# Building layouts
# ----------------------------------------------------------------------------------------------------------


def uniform_blocks(batch: int, heads: int, seq_len: int, block: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start, len)``, int32 ``(B, H, ceil(S/block))``: equal contiguous blocks; the last one holds the tail."""
    if block <= 0 or seq_len < 0:
        raise ValueError(f"uniform_blocks: need block > 0 and seq_len >= 0, got block={block}, seq_len={seq_len}")
    n = max(1, math.ceil(seq_len / block))
    start = torch.arange(n, dtype=torch.int32, device=device) * block
    length = (seq_len - start).clamp(0, block)
    start = torch.minimum(start, torch.tensor(seq_len, dtype=torch.int32, device=device))
    expand = lambda t: t.expand(batch, heads, n).contiguous()  # noqa: E731
    return expand(start), expand(length.to(torch.int32))


def max_cluster_blocks(seq_len: int, clusters: int, block: int, align: int = 1) -> int:
    """An upper bound on the blocks :func:`cluster_blocks` cuts from ``clusters`` clusters of ``seq_len`` rows in
    all, whatever their sizes: a nonempty cluster of ``n`` rows starting ``lead < align`` rows past its cut
    origin gives ``ceil((lead + n) / block) ≤ (n + align + block − 2) / block`` blocks, at most
    ``min(clusters, seq_len)`` clusters are nonempty, and no block is empty. (The static block count of a plan
    built without host syncs, e.g. inside a CUDA graph.)"""
    if min(seq_len, clusters) < 0 or block <= 0 or align <= 0:
        raise ValueError(f"max_cluster_blocks: need seq_len, clusters >= 0 and block, align > 0, got "
                         f"{seq_len}, {clusters}, {block}, {align}")
    live = min(clusters, seq_len)
    return max(1, min(seq_len, (seq_len + live * (align + block - 2)) // block))


def cluster_blocks(sizes: torch.Tensor, block: int, align: int = 1,
                   offset: int = 0, num_blocks: int | None = None,
                   seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut clusters (contiguous in the permuted order) into blocks of at most ``block`` rows.

    Args:
        sizes: integer ``(B, H, C)``, the size of each cluster in permuted order; every (batch, head) must sum
            to the same sequence length S. Empty clusters are allowed.
        block: the largest block.
        align: the cuts inside a cluster fall at ``a + k·block``, ``a`` the multiple of ``align`` at or below
            the cluster's start. With 1 (the default) a cluster of size n becomes ``ceil(n/block)`` blocks, full
            ones first, the tail last. With 16 (and ``block`` a multiple of 16) every block but a cluster's
            first starts 16-aligned and every block lies within ``block`` rows of the multiple of 16 at or
            below its start, so the quantized kernel reads them all with aligned loads (``kv_reach`` ≤
            ``block``; ``kernels/block_sparse_attn.py`` ``kv_tile``), at the cost of at most one more block per
            cluster.
        offset: the row of the whole sequence where the clustered segment begins: added to every start, and
            what ``align`` refers to.
        num_blocks, seq_len: give both to cut without a host sync (and with static shapes, e.g. under CUDA
            graph capture): ``N = num_blocks`` (at least :func:`max_cluster_blocks`), ``S = seq_len``, and the
            sizes are trusted (nonnegative, summing to ``seq_len`` in every (batch, head)) instead of checked.

    Returns:
        ``(start, len, cluster)``, each ``(B, H, N)`` (int32); blocks never straddle two clusters. ``N`` is the
        largest block count over (batch, head) (or ``num_blocks``); the other rows are padded with slots of
        length 0 (start ``offset + S``, cluster −1).
    """
    if not isinstance(sizes, torch.Tensor) or not _is_int(sizes) or sizes.dim() != 3:
        raise ValueError("cluster_blocks: sizes must be an integer tensor (B, H, C) of cluster sizes")
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
        raise ValueError(f"cluster_blocks: block must be a positive int, got {block!r}")
    if isinstance(align, bool) or not isinstance(align, int) or align <= 0:
        raise ValueError(f"cluster_blocks: align must be a positive int, got {align!r}")
    sizes = sizes.long()
    b, h, c = sizes.shape
    dev = sizes.device
    if c == 0:
        raise ValueError("cluster_blocks: sizes has no clusters (C = 0)")
    totals = sizes.sum(-1)
    starts = sizes.cumsum(-1) - sizes + int(offset)
    lead = starts % align  # rows between the cut origin (a multiple of align) and the cluster's start
    chunks = torch.where(sizes > 0, (lead + sizes + block - 1) // block, 0)  # (B, H, C)
    cum = chunks.cumsum(-1)
    if (num_blocks is None) != (seq_len is None):
        raise ValueError("cluster_blocks: give num_blocks and seq_len together (the static, unchecked form)")
    if num_blocks is not None:
        if num_blocks < max_cluster_blocks(seq_len, c, block, align):
            raise ValueError(f"cluster_blocks: num_blocks={num_blocks} is below the bound "
                             f"{max_cluster_blocks(seq_len, c, block, align)} for {c} clusters of {seq_len} rows")
        smallest, lo, hi, most = 0, seq_len, seq_len, num_blocks
    elif sizes.numel():
        # the checks and the block count in one host sync (this runs in every semantic plan, on the GPU)
        smallest, lo, hi, most = torch.stack([sizes.min(), totals.min(), totals.max(), cum[..., -1].max()]).tolist()
    else:
        smallest, lo, hi, most = 0, 0, 0, 0
    if smallest < 0:
        raise ValueError("cluster_blocks: cluster sizes must be >= 0")
    if lo != hi:
        raise ValueError(
            f"cluster_blocks: cluster sizes must sum to the same sequence length for every (batch, head), got "
            f"sums from {lo} to {hi}"
        )
    seq = lo
    n = max(1, most)
    j = torch.arange(n, device=dev).expand(b, h, n).contiguous()
    cl = torch.searchsorted(cum.contiguous(), j, right=True)  # cluster of the j-th block
    live = cl < c
    cl_safe = cl.clamp(max=c - 1)
    first_chunk = (cum - chunks).gather(2, cl_safe)
    cluster_start = starts.gather(2, cl_safe)
    cluster_end = cluster_start + sizes.gather(2, cl_safe)
    cut = cluster_start - lead.gather(2, cl_safe) + (j - first_chunk) * block  # this block's cut origin
    start = torch.maximum(cut, cluster_start)
    length = (torch.minimum(cut + block, cluster_end) - start).clamp(0, block)
    start = torch.where(live, start, int(offset) + seq)
    length = torch.where(live, length, 0)
    cluster = torch.where(live, cl, -1)
    return start.to(torch.int32), length.to(torch.int32), cluster.to(torch.int32)


def block_mask_to_layout(
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    k_start: torch.Tensor,
    k_len: torch.Tensor,
    block_keep: torch.Tensor,
    block_m: int,
    block_n: int,
    rows: torch.Tensor | None = None,
    kv_geometry: tuple[bool, int] | None = None,
) -> BlockLayout:
    """A :class:`BlockLayout` from a block-level mask ``block_keep`` (bool ``(B, H, NQ, NK)``).

    Each list holds the kept KV blocks of its row in increasing id order, and the lists are packed one after
    the other (``kv_index``, ``kv_offset``): they take the kept pairs' memory. Pairs involving a padding slot
    (length 0) are dropped, so padding query blocks get ``kv_count`` 0.

    ``rows`` (integer ``(B, H, NQ)``), when given, says that many query blocks share a mask row: ``block_keep``
    is then ``(B, H, R, NK)`` and query block ``i`` keeps ``block_keep[..., rows[..., i], :]`` (semantic plans:
    every query block of one cluster keeps the same KV blocks). One list is built per row and shared by its
    query blocks, so the work and the memory scale with ``R`` instead of ``NQ``; the attention is the one the
    expanded mask would give.

    ``kv_geometry`` (``(kv_aligned, kv_reach)``, known to the caller from how it cut the KV blocks), when given,
    builds the layout without a host sync and with static shapes (e.g. under CUDA graph capture): every row's
    list then gets ``NK`` slots (``kv_index`` is ``B·H·R·NK`` long) and ``rows`` is trusted to index
    ``block_keep``'s rows.
    """
    if not isinstance(block_keep, torch.Tensor) or block_keep.dtype != torch.bool:
        raise TypeError("block_mask_to_layout: block_keep must be a bool tensor (B, H, NQ, NK), True = attend")
    if q_start.dim() != 3 or k_start.dim() != 3:
        raise ValueError("block_mask_to_layout: q_start/q_len and k_start/k_len must be (B, H, NQ) and (B, H, NK)")
    nq, nk = q_start.shape[-1], k_start.shape[-1]
    if rows is not None and (not isinstance(rows, torch.Tensor) or not _is_int(rows)
                             or tuple(rows.shape) != tuple(q_start.shape)):
        raise ValueError(f"block_mask_to_layout: rows must be an integer tensor of shape {tuple(q_start.shape)}")
    nr = block_keep.shape[2] if rows is not None and block_keep.dim() == 4 else nq
    want = (*q_start.shape[:2], nr, nk)
    if tuple(block_keep.shape) != want:
        raise ValueError(
            f"block_mask_to_layout: block_keep must have shape (B, H, {'R' if rows is not None else 'NQ'}, NK) = "
            f"{want}, got {tuple(block_keep.shape)}"
        )
    dev = q_start.device
    b, h = q_start.shape[:2]
    q_live = q_len.to(dev) > 0
    keep = block_keep.to(dev) & (k_len.to(dev) > 0)[..., None, :]
    if rows is None:
        keep = keep & q_live[..., None]  # padding query slots keep nothing (and their lists take no room)
    row_count = keep.sum(-1, dtype=torch.int32)  # (B, H, R)
    if rows is None:
        count = row_count
    else:
        if nr == 0 and nq:
            raise ValueError("block_mask_to_layout: rows given but block_keep has no rows")
        rows = rows.to(device=dev, dtype=torch.int64)
        bad = ((rows < 0) | (rows >= nr)).any().reshape(1).long()
        rows = rows.clamp(0, max(nr - 1, 0))
        count = torch.where(q_live, row_count.gather(2, rows), 0)
    if kv_geometry is not None:
        aligned, reach = kv_geometry
        # every row's list gets NK slots: static shapes, no sync
        row_offset = torch.arange(b * h * nr, device=dev, dtype=torch.int64).view(b, h, nr) * nk
        total = b * h * nr * nk
    else:
        # one host sync: the lists' total length, and the KV blocks' alignment (BlockLayout.kv_aligned / kv_reach)
        row_offset = row_count.reshape(-1).cumsum(0, dtype=torch.int64).view(b, h, nr) - row_count
        total, aligned, reach, *bad = torch.cat([row_count.sum(dtype=torch.int64).reshape(1),
                                                 _kv_geometry(k_start.to(dev), k_len.to(dev)),
                                                 *([bad] if rows is not None else [])]).tolist()
        if bad and bad[0]:
            raise ValueError(f"block_mask_to_layout: rows must index the {nr} rows of block_keep")
    if total > MAX_LIST_ENTRIES:
        raise ValueError(f"block_mask_to_layout: {total} list entries do not fit int32 offsets; use larger blocks")
    if kv_geometry is not None:
        # the j-th kept id of a row is where the row's running count of kept blocks first reaches j + 1
        running = keep.cumsum(-1, dtype=torch.int32)
        wanted = torch.arange(1, nk + 1, device=dev, dtype=torch.int32).expand(keep.shape).contiguous()
        pos = torch.searchsorted(running, wanted, out_int32=True)
        index = torch.where(pos < nk, pos, 0).reshape(-1)
    else:
        # the same over the rows laid end to end: the e-th kept pair is where the running count reaches e + 1
        running = keep.reshape(-1).cumsum(0, dtype=torch.int32)
        wanted = torch.arange(1, total + 1, device=dev, dtype=torch.int32)
        index = (torch.searchsorted(running, wanted) % max(nk, 1)).to(torch.int32)
    offset = row_offset if rows is None else row_offset.gather(2, rows)
    return BlockLayout(q_start, q_len, k_start, k_len, index, count.to(torch.int32), block_m, block_n,
                       kv_aligned=bool(aligned), kv_reach=int(reach), kv_offset=offset.to(torch.int32))


def _row_to_block(start: torch.Tensor, length: torch.Tensor, block: int, seq: int) -> torch.Tensor:
    """``(B, H, seq)`` int64: the block holding each row (−1 for rows in no block). Blocks must not overlap."""
    b, h, n = start.shape
    r = torch.arange(block, device=start.device)
    rows = start.long()[..., None] + r
    ok = (r < length.long()[..., None]) & (rows >= 0) & (rows < seq)
    idx = torch.where(ok, rows, seq).flatten(2)
    ids = torch.arange(n, device=start.device)[:, None].expand(n, block).reshape(-1).expand(b, h, -1)
    out = torch.full((b, h, seq + 1), -1, dtype=torch.long, device=start.device)
    out.scatter_(2, idx, ids.contiguous())
    return out[..., :seq]


def _block_token_mask(keep: torch.Tensor, row_block: torch.Tensor, col_block: torch.Tensor) -> torch.Tensor:
    """``keep[b, h, row_block[r], col_block[c]]`` (False where either is −1): bool ``(B, H, R, C)``."""
    b, h, nq, nk = keep.shape
    pad = torch.zeros((b, h, nq + 1, nk + 1), dtype=torch.bool, device=keep.device)
    pad[:, :, :nq, :nk] = keep
    rb = torch.where(row_block < 0, nq, row_block)
    cb = torch.where(col_block < 0, nk, col_block)
    rows = pad.gather(2, rb[..., None].expand(b, h, rb.shape[2], nk + 1))
    return rows.gather(3, cb[:, :, None, :].expand(b, h, rb.shape[2], cb.shape[2]))


def layout_token_mask(layout: BlockLayout, seq_q: int, seq_kv: int) -> torch.Tensor:
    """The token mask equivalent to ``layout``, bool ``(B, H, seq_q, seq_kv)`` in the layout's (permuted)
    order: row r attends to key c when r's query block lists c's KV block. For references and tests only."""
    rb = _row_to_block(layout.q_start, layout.q_len, layout.block_m, seq_q)
    cb = _row_to_block(layout.k_start, layout.k_len, layout.block_n, seq_kv)
    return _block_token_mask(_keep_matrix(layout), rb, cb)


def _token_mask_fn(layout, seq_q, seq_kv, q_perm, kv_perm, key_padding_mask):
    """A function ``(i0, i1) -> bool (B, H, i1-i0, S_kv)``: the mask of original query rows i0:i1 against the
    original keys (the layout's mask mapped back through the permutations, and the key padding). Called with
    one integer tensor of row ids instead, it returns the mask of those rows."""
    rb = _row_to_block(layout.q_start, layout.q_len, layout.block_m, seq_q)
    cb = _row_to_block(layout.k_start, layout.k_len, layout.block_n, seq_kv)
    if q_perm is not None:  # original row q_perm[s] sits at permuted position s
        rb = torch.full_like(rb, -1).scatter_(2, q_perm.long(), rb)
    if kv_perm is not None:
        cb = torch.full_like(cb, -1).scatter_(2, kv_perm.long(), cb)
    keep = _keep_matrix(layout)

    def fn(i0, i1=None):
        m = _block_token_mask(keep, rb[:, :, i0:i1] if i1 is not None else rb[:, :, i0], cb)
        if key_padding_mask is not None:
            m = m & key_padding_mask[:, None, None, :]
        return m

    return fn


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def _validate(q, k, v, layout, tensor_layout, precision, scale, key_padding_mask, q_perm, kv_perm, where):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(layout, BlockLayout):
        raise TypeError(
            f"{where}: layout must be a BlockLayout (see block_mask_to_layout), got {type(layout).__name__}"
        )
    if tensor_layout not in LAYOUTS:
        raise ValueError(f"{where}: tensor_layout must be one of {LAYOUTS}, got {tensor_layout!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"{where}: unknown precision {precision!r}; choose one of {PRECISIONS}")
    dims = "(batch, heads, seq, head_dim)" if tensor_layout == "BHSD" else "(batch, seq, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{where}: {name} must be 4-D {dims} for tensor_layout={tensor_layout!r}, got shape {tuple(t.shape)}"
            )
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{where}: {name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{where}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{where}: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    s_ax, h_ax = (2, 1) if tensor_layout == "BHSD" else (1, 2)
    b, hq, sq, d = q.shape[0], q.shape[h_ax], q.shape[s_ax], q.shape[3]
    if k.shape != v.shape or k.shape[3] != d or k.shape[0] != b:
        raise ValueError(
            f"{where}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape, with q's batch ({b}) "
            f"and head_dim ({d}) (tensor_layout={tensor_layout!r})"
        )
    hk, skv = k.shape[h_ax], k.shape[s_ax]
    if hk != hq:
        raise ValueError(
            f"{where}: block-sparse attention is multi-head only: q has {hq} heads and k/v {hk}; expand k/v "
            "with repeat_interleave for grouped-query attention"
        )
    if d > MAX_HEAD_DIM:
        raise ValueError(f"{where}: head_dim {d} is above the block-sparse kernel's limit of {MAX_HEAD_DIM}")
    if skv == 0 and sq > 0:
        raise ValueError(f"{where}: k/v have an empty sequence; there is nothing to attend to")
    if scale is not None and not (scale > 0 and scale < float("inf")):
        raise ValueError(f"{where}: scale must be a positive finite number, got {scale}")
    if (layout.batch, layout.heads) != (b, hq):
        raise ValueError(
            f"{where}: the layout is for (batch, heads) = {(layout.batch, layout.heads)}, q has {(b, hq)}"
        )
    if layout.device != q.device:
        raise ValueError(f"{where}: the layout is on {layout.device}, q on {q.device}; use layout.to(q.device)")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError(f"{where}: key_padding_mask must be a bool tensor (True = attend to this key)")
        if tuple(key_padding_mask.shape) != (b, skv):
            raise ValueError(
                f"{where}: key_padding_mask must have shape (batch, kv_seq) = {(b, skv)}, got "
                f"{tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"{where}: key_padding_mask is on another device than q")
    for name, perm, s in (("q_perm", q_perm, sq), ("kv_perm", kv_perm, skv)):
        if perm is None:
            continue
        if not isinstance(perm, torch.Tensor) or not _is_int(perm):
            raise TypeError(f"{where}: {name} must be an integer tensor (B, H, S)")
        if tuple(perm.shape) != (b, hq, s):
            raise ValueError(
                f"{where}: {name} must have shape (batch, heads, seq) = {(b, hq, s)}, got {tuple(perm.shape)}"
            )
        if perm.device != q.device:
            raise ValueError(f"{where}: {name} is on {perm.device}, q on {q.device}")
    return b, hq, sq, skv, d


def _check_data(layout: BlockLayout, sq: int, skv: int, q_perm, kv_perm, where: str) -> tuple[bool, tuple[bool, int]]:
    """Range and consistency checks of the layout's (and permutations') values, with one host sync.

    Returns whether the query blocks cover every query row (if not, uncovered rows must be zero-filled), and
    the KV blocks' ``(kv_aligned, kv_reach)`` from the data (see :class:`BlockLayout`).
    """
    dev = layout.device
    flags, messages = [], []

    def add(ok, msg):
        flags.append(ok.reshape(()))
        messages.append(msg)

    def blocks(start, length, block, seq, name):
        add((length >= 0).all() & (length <= block).all(), f"{name} lengths must be in 0..{block}")
        live = length > 0
        add((~live | ((start >= 0) & (start.long() + length <= seq))).all(),
            f"{name} blocks must lie inside the sequence of length {seq} (start >= 0, start + len <= {seq})")
        # coverage count per row by a difference array; > 1 somewhere = overlapping blocks
        st = torch.where(live, start.long(), seq).clamp(0, seq)
        en = torch.where(live, start.long() + length, seq).clamp(0, seq)
        diff = torch.zeros((*start.shape[:2], seq + 1), dtype=torch.int32, device=dev)
        diff.scatter_add_(2, st, torch.ones_like(st, dtype=torch.int32))
        diff.scatter_add_(2, en, -torch.ones_like(en, dtype=torch.int32))
        cover = diff.cumsum(2)[..., :seq]
        add((cover <= 1).all(), f"{name} blocks of one (batch, head) overlap")
        return cover

    cover_q = blocks(layout.q_start, layout.q_len, layout.block_m, sq, "query")
    blocks(layout.k_start, layout.k_len, layout.block_n, skv, "KV")
    nk, total = layout.num_kv_blocks, layout.kv_index.numel()
    count, offset = layout.kv_count, layout.kv_offset
    add((count >= 0).all() & (count <= nk).all(), f"kv_count must be in 0..NK={nk}")
    live_block = count > 0
    add((~live_block | ((offset >= 0) & (offset.long() + count <= total))).all(),
        f"kv_offset + kv_count must lie inside kv_index ({total} entries)")
    # the lists padded to the longest (at most NK) for the entry checks
    width = max(1, min(nk, int(count.max()) if count.numel() else 0))
    idx = _padded_lists(layout, width)
    live = torch.arange(width, device=dev) < count[..., None]
    add((~live | ((idx >= 0) & (idx < nk))).all(),
        f"kv_index entries (the kv_count of each list) must be in 0..{nk - 1}")
    safe = torch.where(live & (idx >= 0) & (idx < nk), idx, nk).long()
    seen = torch.zeros((*idx.shape[:3], nk + 1), dtype=torch.int32, device=dev)
    seen.scatter_add_(3, safe, torch.ones_like(safe, dtype=torch.int32))
    add((seen[..., :nk] <= 1).all(), "a list of kv_index names the same KV block twice")
    for name, perm, s in (("q_perm", q_perm, sq), ("kv_perm", kv_perm, skv)):
        if perm is None:
            continue
        ok_range = (perm >= 0) & (perm < s)
        add(ok_range.all(), f"{name} values must be in 0..{s - 1}")
        hits = torch.zeros(perm.shape, dtype=torch.int32, device=dev)
        hits.scatter_add_(2, torch.where(ok_range, perm, 0).long(), torch.ones_like(perm, dtype=torch.int32))
        add((hits == 1).all(), f"{name} must be a permutation of 0..{s - 1} for every (batch, head)")
    covered = (cover_q >= 1).all() if sq > 0 else torch.ones((), dtype=torch.bool, device=dev)
    geometry = _kv_geometry(layout.k_start, layout.k_len)
    if layout.kv_aligned is not None:
        add(geometry[0] >= int(layout.kv_aligned), "kv_aligned is True but some KV block does not start at a "
                                                   "multiple of 16 keys")
        add(geometry[1] <= layout.kv_reach, f"kv_reach is {layout.kv_reach} but some KV block reaches further "
                                            "(k_start % 16 + k_len)")
    values = torch.stack([*(f.long() for f in flags), covered.reshape(()).long(), *geometry]).tolist()
    for ok, msg in zip(values[:-3], messages):
        if not ok:
            raise ValueError(f"{where}: invalid layout or permutation: {msg}")
    return bool(values[-3]), (bool(values[-2]), int(values[-1]))


# ----------------------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------------------


def _to_bhsd(t: torch.Tensor, tensor_layout: str) -> torch.Tensor:
    return t if tensor_layout == "BHSD" else t.transpose(1, 2)


def _kernel_ok(device: torch.device, mode: str, dtype: torch.dtype) -> bool:
    """Whether the Triton kernel runs this call: compiled on CUDA sm80+, interpreted on CPU when
    ``TRITON_INTERPRET=1`` (quantized modes only; the interpreter's bf16 dot is broken, so not with BF16 PV)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0) and ops._triton_ok()
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and mode != "dense":
        if mode == "int8-fp16" and reference.pv_dtype_for(dtype) == torch.bfloat16:
            return False
        try:
            import triton  # noqa: F401
        except Exception:
            return False
        return True
    return False


def _run_kernel(qb, kb, vb, layout, mode, scale, mask, q_perm, kv_perm, smooth_v, out_bhsd, lse_bhs, covered,
                kv_geometry=(False, None)):
    """The Triton path (BHSD views in; writes ``out_bhsd``/``lse_bhs`` in the original order)."""
    from sagevideo.kernels import block_sparse_attn, quantize

    qp = None if q_perm is None else q_perm.to(torch.int32).contiguous()
    kp = None if kv_perm is None else kv_perm.to(torch.int32).contiguous()
    if not covered:  # rows in no query block are never visited by the kernel
        out_bhsd.zero_()
        if lse_bhs is not None:
            lse_bhs.fill_(float("-inf"))
    geometry = dict(
        q_start=layout.q_start, q_len=layout.q_len, k_start=layout.k_start, k_len=layout.k_len,
        kv_index=layout.kv_index, kv_offset=layout.kv_offset, kv_count=layout.kv_count, block_m=layout.block_m,
        block_n=layout.block_n,
    )
    if mode == "dense":
        block_sparse_attn.block_sparse_fwd(
            "dense", qb, kb, vb, out_bhsd, **geometry, scale=scale, key_padding_mask=mask,
            q_perm=qp, kv_perm=kp, lse_bhs=lse_bhs,
        )
        return
    qkv = quantize.quantize_qkv(
        qb, kb, vb, scale=scale, precision=mode, key_padding_mask=mask, smooth_v=smooth_v,
        need_lse=lse_bhs is not None, q_gather=qp, kv_gather=kp,
        # zeroed keys past the end: the kernel reads whole KV tiles without masks (FP8 V only)
        kv_tail=block_sparse_attn.kv_tile(layout.block_n, *kv_geometry)[0],
    )
    block_sparse_attn.block_sparse_fwd(
        mode, qkv, None, None, out_bhsd, **geometry, key_padding_mask=mask, q_perm=qp, kv_perm=kp, lse_bhs=lse_bhs,
        kv_aligned=kv_geometry[0], kv_reach=kv_geometry[1],
    )


def _run_reference(qb, kb, vb, layout, mode, scale, mask, q_perm, kv_perm, smooth_v, *, exact_dtype=torch.float32):
    """Plain torch (BHSD, original order): ``(out fp32-or-exact_dtype, lse fp32)``."""
    fn = _token_mask_fn(layout, qb.shape[2], kb.shape[2], q_perm, kv_perm, mask)
    if mode == "dense":
        out, lse = reference.attention_exact_masked(qb, kb, vb, fn, scale=scale, dtype=exact_dtype)
        return out, lse.float()
    qkv = reference.quantize_qkv(qb, kb, vb, scale=scale, precision=mode, key_padding_mask=mask, smooth_v=smooth_v)
    return reference.quant_attention_masked(qkv, fn, out_dtype=torch.float32)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    tensor_layout: Literal["BHSD", "BSHD"] = "BHSD",
    precision: str = "auto",
    scale: float | None = None,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    q_perm: torch.Tensor | None = None,
    kv_perm: torch.Tensor | None = None,
    smooth_v: bool = False,
    check_layout: bool = True,
):
    """Attention restricted to the block pairs of ``layout``, optionally over token-permuted sequences.

    Args:
        q, k, v: ``(B, H, S, D)`` (``tensor_layout="BHSD"``) or ``(B, S, H, D)`` (``"BSHD"``); float16,
            bfloat16 or float32; equal head counts (multi-head only); ``D <= 128``; any strides. Never modified.
        layout: the blocks and block lists, in the permuted order (:func:`block_mask_to_layout`).
        precision: ``"int8-fp8"``, ``"int8-fp16"``, ``"dense"`` or ``"auto"``, resolved as
            :func:`sagevideo.ops.resolve_precision` does (``int8-fp8`` runs ``int8-fp16`` on sm80/86; ``auto``
            is ``dense`` on CPU).
        scale: softmax scale (``1/sqrt(D)`` when None).
        return_lse: also return the natural-log LSE, fp32 ``(B, H, S_q)`` (for both tensor layouts), in the
            original order.
        key_padding_mask: bool ``(B, S_kv)``, True = attend, in the ORIGINAL order.
        q_perm, kv_perm: integer ``(B, H, S_q)`` / ``(B, H, S_kv)``: row s of the permuted sequence is original
            row ``perm[b, h, s]``. The layout's starts refer to the permuted sequences.
        smooth_v: subtract V's per-channel mean before quantizing (quantized modes).
        check_layout: check the layout's and permutations' values against the sequence lengths (one host
            sync; ranges, overlapping blocks, repeated block ids, permutations). With False the layout is
            trusted and the output is zero-filled first, in case some row is in no query block.

    Returns:
        The output (dtype and layout of ``q``, rows in the original order), or ``(out, lse)``. Query rows with
        no attended key (all kept keys padded, no kept block, or in no query block) give 0 and LSE −inf.

    Runs the Triton kernel on CUDA (sm80+), the interpreted kernel on CPU when ``TRITON_INTERPRET=1`` (quantized
    modes), and otherwise :func:`block_sparse_reference`'s arithmetic (quantized modes through the torch
    reference of the quantization; ``dense`` as exact masked attention computed in fp32).
    """
    where = "block_sparse_attention"
    b, h, sq, skv, d = _validate(
        q, k, v, layout, tensor_layout, precision, scale, key_padding_mask, q_perm, kv_perm, where
    )
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device) if return_lse else None
    if q.numel() == 0:
        return (out, lse) if return_lse else out
    if layout.block_m > MAX_BLOCK_M:
        raise ValueError(
            f"{where}: query blocks of at most {MAX_BLOCK_M} rows are supported (one kernel program holds a "
            f"whole query block), the layout has block_m={layout.block_m}"
        )
    # with the check, one host sync: the checks, whether every row is in a query block, and whether every KV
    # block starts at a multiple of 16 keys (wide loads in the kernel); without it, the layout's own kv_aligned
    # (known from its builder, or computed once per layout) and a zero-filled output
    covered, kv_geometry = (_check_data(layout, sq, skv, q_perm, kv_perm, where) if check_layout
                            else (False, layout.kv_geometry()))
    scale = reference.default_scale(d) if scale is None else scale
    qb, kb, vb = (_to_bhsd(t, tensor_layout) for t in (q, k, v))
    out_bhsd = _to_bhsd(out, tensor_layout)
    mode = ops.resolve_precision(precision, q.device, d)
    if _kernel_ok(q.device, mode, q.dtype):
        _run_kernel(
            qb, kb, vb, layout, mode, scale, key_padding_mask, q_perm, kv_perm, smooth_v, out_bhsd, lse, covered,
            kv_geometry,
        )
    else:
        o, l = _run_reference(qb, kb, vb, layout, mode, scale, key_padding_mask, q_perm, kv_perm, smooth_v)
        out_bhsd.copy_(o)
        if lse is not None:
            lse.copy_(l)
    return (out, lse) if return_lse else out


def block_sparse_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    tensor_layout: Literal["BHSD", "BSHD"] = "BHSD",
    precision: str = "auto",
    scale: float | None = None,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    q_perm: torch.Tensor | None = None,
    kv_perm: torch.Tensor | None = None,
    smooth_v: bool = False,
):
    """Plain-torch block-sparse attention: the arguments and results of :func:`block_sparse_attention`.

    Attention under the equivalent token mask (:func:`layout_token_mask` of the permuted sequences, mapped
    back to the original order through the permutations, and the key padding), built one chunk of query rows
    at a time. ``dense``: exact attention computed in fp32. Quantized modes: ``sagevideo.reference.quantize_qkv``
    (the layout of the kernels; its statistics do not depend on the token order) then the masked tiled
    attention ``sagevideo.reference.quant_attention_masked`` — the same arithmetic as the kernel, with KV
    tiles walked in the original order rather than block by block, so P's rounding may differ slightly.
    ``precision="auto"`` resolves as in the op.
    """
    where = "block_sparse_reference"
    b, h, sq, skv, d = _validate(
        q, k, v, layout, tensor_layout, precision, scale, key_padding_mask, q_perm, kv_perm, where
    )
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    if q.numel() > 0:
        _check_data(layout, sq, skv, q_perm, kv_perm, where)
        scale = reference.default_scale(d) if scale is None else scale
        mode = ops.resolve_precision(precision, q.device, d)
        qb, kb, vb = (_to_bhsd(t, tensor_layout) for t in (q, k, v))
        o, l = _run_reference(qb, kb, vb, layout, mode, scale, key_padding_mask, q_perm, kv_perm, smooth_v)
        _to_bhsd(out, tensor_layout).copy_(o)
        lse.copy_(l)
    return (out, lse) if return_lse else out
