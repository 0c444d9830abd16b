"""``sparse_attention``: one entry point for the sparse methods, and the state they reuse across steps.

Two methods choose which blocks of QKᵀ to compute, then :func:`sagevideo.sparse.blocks.block_sparse_attention`
runs the (quantized) block-sparse kernel on the permuted sequence and returns rows in the original order:

* ``"spatiotemporal"`` — Sparse VideoGen (arXiv 2502.01776): each (batch, head) is profiled online as spatial,
  temporal or dense (:mod:`sagevideo.sparse.profiling`), then gets a frame band or a position-major
  neighbourhood sized by ``density`` (:mod:`sagevideo.sparse.patterns`);
* ``"semantic"`` — Sparse VideoGen2 (arXiv 2505.18875): k-means on Q and K, tokens sorted by cluster, cluster
  pairs kept up to ``top_p`` of the estimated attention mass (:mod:`sagevideo.sparse.semantic`).

Text tokens concatenated with the video (``text=(text_start, text_len)``, before or after it) stay dense.

:class:`SparseState` (one per attention layer, owned by the caller) carries what is reused from one call to the
next: head classes (re-profiled every ``profile_every`` steps), k-means centroids (warm start; re-clustered
every ``kmeans_every`` steps), the last plan, and counters for reporting. It keeps one slot per input
signature (batch, heads, shapes, grid, settings), so switching CFG batching on and off neither crashes nor
mixes centroids of different batches.

:func:`plan_sparse` only builds the plan (pattern search and permutations), so its cost can be timed apart from the
kernel.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

import torch

from sagevideo.ops import _validate
from sagevideo.sparse.patterns import (
    SparsePlan,
    plan_spatiotemporal,
    spatiotemporal_maps,
    token_layout,
)
from sagevideo.sparse.profiling import DEFAULT_SAMPLES, DEFAULT_TOLERANCE, profile_heads
from sagevideo.sparse.semantic import (
    DEFAULT_MIN_KC_RATIO,
    DEFAULT_TOP_P,
    default_clusters,
    plan_semantic,
)

__all__ = ["METHODS", "SparsePlan", "SparseState", "plan_sparse", "sparse_attention"]

METHODS = ("spatiotemporal", "semantic")
DEFAULT_DENSITY = 0.25  # SVG1's "--sparsity 0.25", which is the kept fraction
DEFAULT_KMEANS_ITERS = 2  # SVG2: warm-started rounds per call
DEFAULT_KMEANS_INIT_ITERS = 50  # SVG2: rounds of the first (cold) call
DEFAULT_BLOCK_M = 128


def default_block_n(method: str, grid) -> int:
    """The KV block size a method uses when none is given: 128 keys for spatiotemporal plans on frames of at
    least 1,024 tokens (8 blocks a frame, Sparse VideoGen's granularity), 64 otherwise (and for semantic plans).

    Spatiotemporal plans cut full blocks, where 128-key tiles run fastest: H100, 2026-11-24, spatial+temporal
    heads at density 0.25, 3.79 / 63.5 ms with 128 against 4.63 / 70.3 with 64 at Wan2.1-1.3B 480p / 14B 720p.
    On small frames 128-key blocks make the pattern coarse: the bundled model (256 tokens a frame) lost 7 dB of
    PSNR against dense with them (32.6 against 39.7 dB, CPU). Semantic key clusters are ragged, and 64-key blocks
    waste less on their short tails: 9.73 / 58.5 ms with 64 against 12.18 / 77.1 with 128 at the same shapes.
    (The H100 figures are from a build of the kernel with a slower key mask, since reverted; they compare block
    sizes.)"""
    if method == "spatiotemporal" and int(grid[1]) * int(grid[2]) >= 8 * 128:
        return 128
    return 64


@dataclasses.dataclass
class _Slot:
    head_classes: torch.Tensor | None = None
    profile_errors: torch.Tensor | None = None
    profiled_at: int | None = None
    q_centroids: torch.Tensor | None = None
    k_centroids: torch.Tensor | None = None
    clustered_at: int | None = None
    plan: SparsePlan | None = None
    calls: int = 0


class SparseState:
    """What one attention layer reuses across denoising steps (create one per layer and pass it every call).

    Reading the attributes gives the values of the most recent call: ``head_classes`` ``(B, H)`` (0 dense,
    1 spatial, 2 temporal) and ``profiled_at`` (the step, or call index, of that profiling); ``q_centroids`` /
    ``k_centroids`` ``(B·H, C, D)``; ``plan`` (the last :class:`SparsePlan`). Counters: ``calls``,
    ``profiles`` (profiling runs), ``clusterings`` (k-means runs), ``dense_calls`` (calls run by the dense op alone:
    every block kept, or too little saved on the sparse heads to pay for a split, :data:`SPLIT_MIN_SAVING`),
    ``split_calls`` (calls whose dense heads went through the dense op and the others through the block-sparse
    kernel), ``last_density`` (the share of pairs the last call computed; :meth:`report` adds the mean over
    calls). ``max_slots`` input signatures are remembered (least recently used dropped).
    """

    def __init__(self, max_slots: int = 4):
        if max_slots < 1:
            raise ValueError("SparseState: max_slots must be ≥ 1")
        self.max_slots = int(max_slots)
        self._slots: collections.OrderedDict[tuple, _Slot] = collections.OrderedDict()
        self._current: _Slot | None = None
        self.calls = 0
        self.profiles = 0
        self.clusterings = 0
        self.dense_calls = 0
        self.split_calls = 0
        self.last_density: float | None = None
        self._density_sum = 0.0

    def reset(self) -> None:
        """Forget every slot and counter."""
        self.__init__(self.max_slots)

    def drop_plans(self) -> None:
        """Free the stored plans (block lists and permutations, tens of MB per layer at video sizes) and keep
        what is reused across steps (head classes, centroids, counters). The next call builds a new plan; a
        caller that re-plans at every call anyway (``profile_every``/``kmeans_every`` = 1) loses nothing."""
        for slot in self._slots.values():
            slot.plan = None

    def _slot(self, key: tuple) -> _Slot:
        slot = self._slots.pop(key, None) or _Slot()
        self._slots[key] = slot
        while len(self._slots) > self.max_slots:
            self._slots.popitem(last=False)
        self._current = slot
        return slot

    def __getattr__(self, name):
        if name in ("head_classes", "profile_errors", "profiled_at", "q_centroids", "k_centroids", "plan"):
            cur = self.__dict__.get("_current")
            return None if cur is None else getattr(cur, name)
        raise AttributeError(name)

    def report(self) -> dict[str, Any]:
        """Counters and, for the last call, the head-class histogram and the density (for logs and benches)."""
        out: dict[str, Any] = {
            "calls": self.calls,
            "profiles": self.profiles,
            "clusterings": self.clusterings,
            "dense_calls": self.dense_calls,
            "split_calls": self.split_calls,
            "last_density": self.last_density,
            "mean_density": self._density_sum / self.calls if self.calls else None,
        }
        cls = self.head_classes
        if cls is not None:
            out["heads"] = {name: int((cls == i).sum()) for i, name in enumerate(("dense", "spatial", "temporal"))}
        return out


#: ``plan_graph="auto"`` graphs semantic plans of at most this many video rows over (batch, head): there the plan
#: is launch-bound (Wan2.1-1.3B 480p, 12 × 32,760 rows: 10.0 ms eager, 3.6 ms replayed), while at the 720p shapes
#: (~3·10⁶ rows) it is bound by the GPU (14.9 against 15.5 ms at Wan2.1-14B) and a graph would only hold its
#: input copies and memory pool (about 2 GB there). H100, 2026-11-24, benchmarks/RESULTS.md.
GRAPH_MAX_ROWS = 1 << 21
#: How often a plan is rebuilt when ``kmeans_every`` (semantic) or ``profile_every`` (spatiotemporal) is None:
#: every 3 steps, the calls in between reusing it.
#:
#: Reusing a plan skips its whole cost; a state then holds every layer's plan between calls (its centroids are
#: held in any case, for the warm start). Measured on an H100 (2026-11-24, ``int8-fp8``, consecutive-step inputs
#: with locality; whole call, mean over the re-planning cycle, × SDPA-cuDNN; ``benchmarks/sparse_settings.py``):
#:
#: - semantic, Wan2.1-1.3B 480p: 1.53× every step, 1.64× every 2, 2.18× every 3. CogVideoX-5B: 1.30×, 1.77×,
#:   1.97×. Wan2.1-14B 720p: 2.95×, 3.41×, 3.56×. HunyuanVideo 720p: 3.45×, 3.79×, 3.91×.
#: - memory one layer's plan holds beyond its centroids (packed block lists, int32 permutations): 6 MiB at
#:   Wan2.1-1.3B (0.2 GiB over 30 layers), 11 MiB at CogVideoX-5B (0.4 GiB over 42), 44 MiB at Wan2.1-14B
#:   (1.7 GiB over 40), 37 MiB at HunyuanVideo (2.2 GiB over 60 blocks). Before the lists were packed, a held
#:   720p plan took 249 / 319 MiB, and reuse was the default only on small videos.
#: - spatiotemporal with every head spatial or temporal (profiling tolerance lifted): Wan2.1-1.3B 1.77× every
#:   step, 2.65× every 3; CogVideoX-5B 1.15×, 1.38×. A whole Wan2.1-1.3B forward (``benchmarks/pipeline.py``,
#:   random weights, every head spatial): 1.28× SDPA, 1.49× every 3.
#:
#: Fidelity: the semantic rows' sampled cosine against dense attention moved by at most 0.0008 with the interval on
#: those inputs. On the bundled model (its 2026-11-23 weights; CPU ``sagevideo compare``) reuse did not lower the PSNR
#: against dense: semantic 39.28 / 39.79 / 39.76 dB every 1 / 2 / 5 steps, spatiotemporal 39.66 / 38.97 / 40.44 /
#: 40.54 dB every 1 / 2 / 3 / 5. Sparse VideoGen and Sparse VideoGen 2 re-plan every step. Where memory is tight, pass
#: an interval of 1 (nothing is held but the centroids) or call :meth:`SparseState.drop_plans` between videos.
DEFAULT_REPLAN_EVERY = 3


#: On CUDA, a plan that sends some heads to the dense op (``dense_heads``) and saves less than this share of the
#: call's work on the others (``1 − plan.density``) runs every head through the dense op instead. A split call
#: gathers the dense heads' Q, K, V for the dense op, scatters their output back and quantizes every head for the
#: block-sparse kernel, which cost more than a few sparse heads save. H100, 2026-11-24, int8-fp8, spatiotemporal
#: heads profiled on inputs with locality: CogVideoX-5B with 1 of 48 heads sparse (saving 0.014) 12.0 ms a call
#: split against 9.2 for the dense op (about 0.2 of a dense call lost); Wan2.1-14B 720p with 1-2 of 40 heads sparse
#: (saving 0.02-0.04) 193-215 ms against 184-192 (about 0.05 lost). Between those two losses, 0.15. None: never.
SPLIT_MIN_SAVING: float | None = 0.15


def _runs_dense(plan: SparsePlan, heads: int, cuda: bool) -> bool:
    """Whether a call with ``plan`` over ``heads`` (batch × head) pairs runs the dense op for every head: when
    the plan keeps every block or sends every head to the dense op, and on CUDA also when it sends some heads
    there and saves less than :data:`SPLIT_MIN_SAVING` of the work on the others (a split would cost more)."""
    if plan.density >= 1.0 or len(plan.dense_heads) >= heads:
        return True
    return (cuda and bool(plan.dense_heads) and SPLIT_MIN_SAVING is not None
            and 1.0 - plan.density < SPLIT_MIN_SAVING)


def _graph_plan(plan_graph, rows: int) -> bool:
    if plan_graph == "auto":
        return rows <= GRAPH_MAX_ROWS
    if isinstance(plan_graph, bool):
        return plan_graph
    raise ValueError(f"sparse_attention: plan_graph must be True, False or 'auto', got {plan_graph!r}")


_logger = logging.getLogger("sagevideo")
_warned: set[tuple] = set()


def _warn_all_dense_by_tiles(p: SparsePlan, q: torch.Tensor, grid, block_n) -> None:
    """Say once per shape that a semantic plan sent every head to the dense op for its tile cost (the call then
    costs the plan on top of dense attention)."""
    sel = p.info.get("density_per_head")
    key = ("tiles", tuple(q.shape), tuple(grid))
    if sel is None or key in _warned or float(sel.max()) >= 1.0:
        return
    _warned.add(key)
    tiles = float(p.info["tile_fraction_per_head"].min())
    _logger.warning(
        "sagevideo: sparse-semantic keeps %.0f%% of the pairs here, but its cluster blocks would make the kernel "
        "walk at least %.0f%% of the dense tiles in every head (key clusters of about %.0f tokens in %d-key "
        "blocks), so it runs dense attention plus the plan, slower than the dense method; fewer k_clusters or "
        "another method suit this shape", 100 * float(sel.mean()), 100 * tiles,
        int(grid[0]) * int(grid[1]) * int(grid[2]) / p.info["k_sizes"].shape[-1], block_n)


def _due(last: int | None, now: int, every: int) -> bool:
    return last is None or every <= 1 or now - last >= every or now < last


def _check_common(method, density, top_p, block_m, block_n, q_clusters=None, k_clusters=None):
    if method not in METHODS:
        raise ValueError(f"sparse_attention: unknown method {method!r}; choose one of {METHODS}")
    if not (0.0 < float(density) <= 1.0):
        raise ValueError(f"sparse_attention: density must be in (0, 1], got {density}")
    if not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"sparse_attention: top_p must be in (0, 1], got {top_p}")
    for name, val in (("block_m", block_m), ("block_n", block_n)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 16):
            raise ValueError(f"sparse_attention: {name} must be an int ≥ 16 (or None for block_n), got {val!r}")
    for name, val in (("q_clusters", q_clusters), ("k_clusters", k_clusters)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
            raise ValueError(f"sparse_attention: {name} must be an int ≥ 1, or None for the default "
                             f"(sagevideo.sparse.semantic.default_clusters), got {val!r}")


def plan_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    grid,
    text: tuple[int, int] | None = None,
    method: str = "spatiotemporal",
    density: float = DEFAULT_DENSITY,
    top_p: float = DEFAULT_TOP_P,
    min_kc_ratio: float = DEFAULT_MIN_KC_RATIO,
    q_clusters: int | None = None,
    k_clusters: int | None = None,
    kmeans_iters: int = DEFAULT_KMEANS_ITERS,
    kmeans_init_iters: int = DEFAULT_KMEANS_INIT_ITERS,
    profile_samples: int = DEFAULT_SAMPLES,
    tolerance: float = DEFAULT_TOLERANCE,
    profile_every: int | None = None,
    kmeans_every: int | None = None,
    layout: str = "BHSD",
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    state: SparseState | None = None,
    step: int | None = None,
    seed: int = 0,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int | None = None,
    plan_graph: bool | str = "auto",
) -> SparsePlan:
    """The :class:`SparsePlan` (block layout and permutations) :func:`sparse_attention` would run, without
    running attention. ``v`` is needed by ``"spatiotemporal"`` when it profiles. Arguments as in
    :func:`sparse_attention`; with a ``state``, its caches are used and updated exactly as there."""
    _check_common(method, density, top_p, block_m, block_n, q_clusters, k_clusters)
    _graph_plan(plan_graph, 0)  # validates the value
    s_axis = 2 if layout == "BHSD" else 1
    tl = token_layout(grid, q.shape[s_axis], text)
    block_n = default_block_n(method, tl.grid) if block_n is None else block_n
    auto_q, auto_k = default_clusters(tl.video_len, block_m, block_n)
    q_clusters = auto_q if q_clusters is None else q_clusters
    k_clusters = auto_k if k_clusters is None else k_clusters
    if k.shape[s_axis] != q.shape[s_axis]:
        raise ValueError("sparse_attention: q and k/v must have the same sequence (joint self-attention)")
    b, hq, hk = q.shape[0], q.shape[3 - s_axis], k.shape[3 - s_axis]
    st = state if state is not None else SparseState()
    for name, val in (("profile_every", profile_every), ("kmeans_every", kmeans_every),
                      ("kmeans_iters", kmeans_iters), ("kmeans_init_iters", kmeans_init_iters)):
        every = name.endswith("_every")
        if not (val is None and every) and (
                isinstance(val, bool) or not isinstance(val, (int, float)) or val != int(val) or val < 1):
            raise ValueError(f"sparse_attention: {name} must be an int ≥ 1"
                             f"{' (or None for the default)' if every else ''}, got {val!r}")
    profile_every = DEFAULT_REPLAN_EVERY if profile_every is None else int(profile_every)
    kmeans_every = DEFAULT_REPLAN_EVERY if kmeans_every is None else int(kmeans_every)
    # one slot per input signature and per setting that changes what is cached (window sizes, centroid shapes)
    key = (method, b, hq, hk, q.shape[-1], tuple(tl.grid), tl.text_start, tl.text_len, str(q.device), block_m, block_n)
    key += (float(density),) if method == "spatiotemporal" else (int(q_clusters), int(k_clusters))
    slot = st._slot(key)
    now = slot.calls if step is None else int(step)
    slot.calls += 1

    if method == "spatiotemporal":
        maps = spatiotemporal_maps(tl, block_m=block_m, block_n=block_n, density=density)
        if slot.head_classes is None or _due(slot.profiled_at, now, profile_every):
            if v is None:
                raise ValueError("sparse_attention: spatiotemporal profiling needs v")
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + now)
            classes, errors = profile_heads(
                q, k, v, tl, width=maps.width, radius=maps.radius, num_samples=profile_samples,
                tolerance=tolerance, generator=gen, scale=scale, key_padding_mask=key_padding_mask,
                tensor_layout=layout,
            )
            slot.head_classes, slot.profile_errors, slot.profiled_at = classes, errors, now
            slot.plan = None
            st.profiles += 1
        if slot.plan is None:
            slot.plan = plan_spatiotemporal(
                slot.head_classes, tl, density=density, block_m=block_m, block_n=block_n, device=q.device
            )
            slot.plan.info["profile_errors"] = slot.profile_errors
        return slot.plan

    # semantic
    selection = (float(top_p), float(min_kc_ratio), scale)
    if slot.plan is not None and slot.plan.info.get("selection") == selection and not _due(
        slot.clustered_at, now, kmeans_every
    ):
        return slot.plan
    warm = slot.q_centroids is not None and slot.k_centroids is not None
    gen = torch.Generator().manual_seed(int(seed))
    p = plan_semantic(
        q, k, tl, q_clusters=q_clusters, k_clusters=k_clusters,
        iters=kmeans_iters if warm else kmeans_init_iters, top_p=top_p, min_kc_ratio=min_kc_ratio,
        q_init=slot.q_centroids if warm else None, k_init=slot.k_centroids if warm else None,
        generator=gen, scale=scale, block_m=block_m, block_n=block_n, tensor_layout=layout,
        graph=_graph_plan(plan_graph, b * hq * tl.video_len) and warm and block_n % 16 == 0,
    )
    p.info["warm_start"] = warm
    p.info["selection"] = selection
    slot.q_centroids, slot.k_centroids = p.info["q_centroids"], p.info["k_centroids"]
    slot.clustered_at = now
    slot.plan = p
    st.clusterings += 1
    return p


def _dense_heads_into(out, lse, q, k, v, idx, layout, dense_kw) -> None:
    """Attention of the (batch, head) pairs ``idx`` (a tensor of flat indices ``b·H + h``) through the dense
    op, written into ``out`` (q's layout) and ``lse`` (``(B, H, S)`` or None). The pairs are gathered as a batch
    of one-head sequences (a copy of their Q, K and V), each with its batch entry's key mask."""
    from sagevideo.ops import attention

    h = q.shape[1] if layout == "BHSD" else q.shape[2]
    bi, hi = idx // h, idx % h

    def pick(t):  # (n, 1, S, D)
        return (t[bi, hi] if layout == "BHSD" else t[bi, :, hi]).unsqueeze(1)

    mask = dense_kw["key_padding_mask"]
    res = attention(pick(q), pick(k), pick(v), layout="BHSD", **{**dense_kw, "key_padding_mask":
                                                                 None if mask is None else mask[bi]})
    o, l = res if dense_kw["return_lse"] else (res, None)
    if layout == "BHSD":
        out[bi, hi] = o[:, 0]
    else:
        out[bi, :, hi] = o[:, 0]
    if lse is not None:
        lse[bi, hi] = l[:, 0]


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid,
    text: tuple[int, int] | None = None,
    method: str = "spatiotemporal",
    density: float = DEFAULT_DENSITY,
    top_p: float = DEFAULT_TOP_P,
    min_kc_ratio: float = DEFAULT_MIN_KC_RATIO,
    q_clusters: int | None = None,
    k_clusters: int | None = None,
    kmeans_iters: int = DEFAULT_KMEANS_ITERS,
    kmeans_init_iters: int = DEFAULT_KMEANS_INIT_ITERS,
    profile_samples: int = DEFAULT_SAMPLES,
    tolerance: float = DEFAULT_TOLERANCE,
    profile_every: int | None = None,
    kmeans_every: int | None = None,
    precision: str = "auto",
    layout: str = "BHSD",
    scale: float | None = None,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    smooth_v: bool = False,
    state: SparseState | None = None,
    step: int | None = None,
    seed: int = 0,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int | None = None,
    check_layout: bool = False,
    plan_graph: bool | str = "auto",
):
    """Sparse (and optionally quantized) joint self-attention over video tokens plus optional text tokens.

    Args:
        q, k, v: ``(B, Hq, S, D)`` / ``(B, Hk, S, D)`` for ``layout="BHSD"``, ``(B, S, H, D)`` for ``"BSHD"``;
            one dtype (fp16, bf16, fp32); ``Hq`` a multiple of ``Hk``; ``S = T·H·W + text_len``.
        grid: post-patch video grid ``(T, H, W)``; video tokens frame-major.
        text: ``(text_start, text_len)`` — before the video (``text_start=0``, CogVideoX) or right after it
            (``text_start=T·H·W``, HunyuanVideo); None when the sequence is the video alone. Text stays dense.
        method: ``"spatiotemporal"`` (SVG1) or ``"semantic"`` (SVG2).
        density: spatiotemporal — fraction of video×video blocks a spatial / temporal head keeps (default 0.25,
            SVG1's setting); 1.0 keeps everything.
        top_p, min_kc_ratio: semantic — attention mass to keep per query cluster (0.9) and the least fraction
            of key clusters kept (0.1), SVG2's defaults; ``top_p=1`` keeps everything.
        q_clusters, k_clusters: semantic — clusters per (batch, head), clamped to the number of video tokens;
            None: one per ``block_m`` query rows / ``block_n`` keys of video, between 128 / 256 and SVG2's
            300 / 1000 (Wan 720p) (:func:`sagevideo.sparse.semantic.default_clusters`).
        kmeans_iters, kmeans_init_iters: k-means rounds when warm-started from ``state`` (2) and cold (50).
        profile_samples, tolerance: spatiotemporal profiling rows (64, SVG1) and the relative-error limit
            above which a head stays dense (0.5, ours).
        profile_every, kmeans_every: with a ``state``, re-profile / re-cluster only every that many steps (1 =
            every call); in between, the previous plan is reused. None (the default): every 3 steps
            (:data:`DEFAULT_REPLAN_EVERY`; a held plan takes 6-44 MiB a layer at the Wan and HunyuanVideo
            shapes beyond its centroids).
        precision: ``"auto"``, ``"int8-fp8"``, ``"int8-fp16"`` or ``"dense"`` (kernel arithmetic).
        layout: ``"BHSD"`` or ``"BSHD"`` (of q, k, v and of the output).
        scale: softmax scale, ``1/sqrt(D)`` when None.
        return_lse: also return the natural-log LSE (fp32, ``(B, H, S)`` / ``(B, S, H)``).
        key_padding_mask: bool ``(B, S)``, True = key takes part (text padding), in the original order.
        smooth_v: passed to the kernel (subtract V's channel mean before quantizing).
        state: a :class:`SparseState` to reuse head classes / centroids across calls; None = fresh each call.
        step: the denoising step (for ``profile_every`` / ``kmeans_every``); the state's call count if None. A
            step lower than the last plan's starts a new plan (a new video); with call counts, a state that
            serves a new video reuses the last plan until the interval runs out, so pass ``step`` (or an
            interval of 1) when one state serves several videos.
        seed: seeds the profiling rows and the cold k-means initialisation (deterministic results).
        block_m, block_n: query / key block sizes of the kernel; ``block_n`` None = :func:`default_block_n`
            (128 for spatiotemporal plans on frames of ≥ 1,024 tokens, else 64). Semantic key clusters are cut
            at multiples of 16 rows, so the kernel reads every KV block with aligned loads.
        check_layout: let ``block_sparse_attention`` validate the plan (one host sync; tests and debugging —
            the plans built here are valid by construction).
        plan_graph: semantic, on CUDA — replay the warm-started plan as a CUDA graph (captured once per input
            signature and shared by the layers that have it; :class:`sagevideo.sparse.semantic.PlanGraphs`)
            instead of launching its few hundred small operations one by one. Same plan. ``"auto"`` (default):
            when the video has at most :data:`GRAPH_MAX_ROWS` rows over (batch, head), where launching is what
            the plan costs; True / False: always / never.

    Returns:
        The output (q's dtype and layout), or ``(out, lse)`` when ``return_lse`` (LSE fp32, ``(B, H, S)`` for
        BHSD and ``(B, S, H)`` for BSHD, as :func:`sagevideo.attention`). Grouped-query k/v are expanded to
        the query heads before the kernel (it is multi-head only).
    """
    from sagevideo.sparse.blocks import block_sparse_attention

    _validate(q, k, v, layout, precision, scale, key_padding_mask)
    s_axis = 2 if layout == "BHSD" else 1
    st = state if state is not None else SparseState()
    p = plan_sparse(
        q, k, v, grid=grid, text=text, method=method, density=density, top_p=top_p, min_kc_ratio=min_kc_ratio,
        q_clusters=q_clusters, k_clusters=k_clusters, kmeans_iters=kmeans_iters,
        kmeans_init_iters=kmeans_init_iters, profile_samples=profile_samples, tolerance=tolerance,
        profile_every=profile_every, kmeans_every=kmeans_every, layout=layout, scale=scale,
        key_padding_mask=key_padding_mask, state=st, step=step, seed=seed, block_m=block_m, block_n=block_n,
        plan_graph=plan_graph,
    )
    b, hq = q.shape[0], q.shape[3 - s_axis]
    run_dense = _runs_dense(p, b * hq, q.is_cuda)
    st.calls += 1
    st.last_density = 1.0 if run_dense else p.density
    st._density_sum += st.last_density
    dense_kw = dict(precision=precision, scale=scale, return_lse=return_lse, key_padding_mask=key_padding_mask,
                    smooth_v=smooth_v)
    if run_dense:
        # every block kept (e.g. every head profiled dense): the same attention, and the dense op is faster
        # than the block-sparse kernel walking every block (1.07x against 0.96x SDPA-cuDNN at Wan2.1-14B 720p
        # with full blocks, 0.73x with the short blocks of 3-D tiles; H100, 2026-11-24); or a small split
        from sagevideo.ops import attention

        st.dense_calls += 1
        if method == "semantic" and "tile_fraction_per_head" in p.info:
            _warn_all_dense_by_tiles(p, q, grid, p.layout.block_n)
        return attention(q, k, v, layout=layout, **dense_kw)
    if k.shape[3 - s_axis] != hq:  # the block-sparse kernel is multi-head only
        group = hq // k.shape[3 - s_axis]
        k = k.repeat_interleave(group, dim=3 - s_axis)
        v = v.repeat_interleave(group, dim=3 - s_axis)
    block_layout = p.layout
    if p.dense_heads:
        # their block lists emptied here, so the kernel does no work for them; they go through the dense op
        # below. (The sparse call's quantization pass still covers them: ~1 % of a call at Wan2.1-14B 720p.)
        dense_idx = torch.tensor(p.dense_heads, device=q.device)
        count = block_layout.kv_count.clone()
        count.view(b * hq, -1)[dense_idx] = 0
        block_layout = dataclasses.replace(block_layout, kv_count=count)
    res = block_sparse_attention(
        q, k, v, block_layout, tensor_layout=layout, q_perm=p.q_perm, kv_perm=p.kv_perm, check_layout=check_layout,
        **dense_kw,
    )
    out, lse = res if return_lse else (res, None)
    if p.dense_heads:
        st.split_calls += 1
        _dense_heads_into(out, lse, q, k, v, dense_idx, layout, dense_kw)
    if not return_lse:
        return out
    # sagevideo.attention's convention: LSE (B, H, S) for BHSD, (B, S, H) for BSHD
    return out, (lse if layout == "BHSD" else lse.transpose(1, 2))
