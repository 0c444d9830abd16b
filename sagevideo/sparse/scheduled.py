"""The sparse methods as schedule choices: ``ctx`` (step, layer, token layout, store) → :func:`sparse_attention`.

Registered in ``sagevideo.methods`` as ``sparse-spatiotemporal`` (Sparse VideoGen's spatial/temporal heads) and
``sparse-semantic`` (Sparse VideoGen 2's k-means permutation with a top-p budget). Each (layer, heads) keeps its
own :class:`~sagevideo.sparse.api.SparseState` in ``ctx.store`` (owned by the patch or the ComfyUI override), so
head classes and centroids carry over from step to step and are dropped with the patch.

Classifier-free guidance: diffusers' Wan and HunyuanVideo 1.5 call the transformer twice per step (cond, then
uncond) with the same batch size. With ``profile_every``/``kmeans_every`` = 1 every call plans afresh (k-means
warm-started from the previous call's centroids, which Sparse VideoGen 2 also shares between the two on
purpose); with ``N`` > 1 a plan is rebuilt at most every ``N`` steps and both calls of a step reuse it.
Both default to None: 3 (:data:`sagevideo.sparse.api.DEFAULT_REPLAN_EVERY`), and 1 when the step of a call is
unknown (a transformer patched without a scheduler and no ``handle.set_step``): a plan is reused only across
steps known to follow each other, never into the next video. CogVideoX runs both in one batch of 2, and each
batch entry gets its own plan.

When a call cannot be planned, the method runs the dense quantized op with the same ``precision`` instead and
logs that once per reason: ring context parallelism (each call sees one KV chunk; the patterns need the whole
sequence), an unknown video grid (e.g. a ComfyUI model whose grid sagevideo cannot see), or a sequence whose
length does not match the grid.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("sagevideo")
_said: set[str] = set()

METHOD_NAMES = {"sparse-spatiotemporal": "spatiotemporal", "sparse-semantic": "semantic"}

# block_m / block_n: the kernel's query and key block sizes (the granularity of the sparsity pattern; block_n
# None = sagevideo.sparse.api.default_block_n, from the method and the frame size)
COMMON_PARAMS = {"precision": "auto", "smooth_v": False, "seed": 0, "block_m": 128, "block_n": None}
PARAMS = {
    "sparse-spatiotemporal": {**COMMON_PARAMS, "density": 0.25, "tolerance": 0.5, "profile_samples": 64,
                              "profile_every": None},
    "sparse-semantic": {**COMMON_PARAMS, "top_p": 0.9, "min_kc_ratio": 0.1, "q_clusters": None, "k_clusters": None,
                        "kmeans_iters": 2, "kmeans_every": None},
}


def _once(key: str, message: str) -> None:
    if key not in _said:
        _said.add(key)
        logger.warning(message)


def _fallback(name: str, reason: str, q, k, v, ctx):
    from sagevideo.ops import attention

    _once(f"{name}:{reason}", f"sagevideo: {name} runs dense quantized attention here: {reason}")
    res = attention(q, k, v, layout=ctx.tensor_layout, precision=ctx.params["precision"], scale=ctx.scale,
                    return_lse=ctx.return_lse, key_padding_mask=ctx.key_padding_mask,
                    smooth_v=bool(ctx.params["smooth_v"]))
    return res if ctx.return_lse else (res, None)


def run(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx):
    """Body of the registered method ``name`` (``fn(q, k, v, ctx) -> (out, lse | None)``)."""
    from sagevideo.sparse.api import DEFAULT_REPLAN_EVERY, SparseState, sparse_attention

    params = dict(ctx.params)
    layout = ctx.layout
    if ctx.ring is not None:
        return _fallback(name, "ring context parallelism splits the keys into chunks", q, k, v, ctx)
    if layout.grid is None:
        return _fallback(name, "the video grid of this model is unknown", q, k, v, ctx)
    seq = q.shape[1 if ctx.tensor_layout == "BSHD" else 2]
    if layout.seq_len != seq or (layout.text_len == 0 and layout.video_start != 0):
        return _fallback(name, f"the sequence ({seq} tokens) does not match the token layout {layout}", q, k, v, ctx)
    state = None
    if ctx.store is not None:
        state = ctx.store.get((name, ctx.layer, ctx.heads))
        if state is None:
            state = ctx.store[(name, ctx.layer, ctx.heads)] = SparseState()
    text = (layout.text_start, layout.text_len) if layout.text_len else None
    every_key = "profile_every" if name == "sparse-spatiotemporal" else "kmeans_every"
    if params[every_key] is None:
        # the default interval; with no step nothing tells a new video from the next step of this one: every call
        params[every_key] = 1 if ctx.step is None else DEFAULT_REPLAN_EVERY
    res = sparse_attention(
        q, k, v, grid=layout.grid, text=text, method=METHOD_NAMES[name], layout=ctx.tensor_layout, scale=ctx.scale,
        return_lse=ctx.return_lse, key_padding_mask=ctx.key_padding_mask, state=state, step=ctx.step,
        # seed per layer, so layers do not all sample the same profiling rows
        **{**params, "seed": int(params["seed"]) * 1009 + ctx.layer},
    )
    if state is not None and int(params[every_key]) == 1:
        # the next call re-plans anyway: do not hold every layer's block lists between calls (1.1 GiB over
        # Wan2.1-1.3B's 30 layers, 9.7 GiB over Wan2.1-14B's 40 at 720p, measured on an H100)
        state.drop_plans()
    return res if ctx.return_lse else (res, None)
