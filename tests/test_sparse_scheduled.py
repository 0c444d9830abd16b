"""The sparse methods as schedule choices: registry, patcher (Wan, HunyuanVideo, CogVideoX), CLI and node."""

import dataclasses

import pytest
import torch

from tests import tiny_pipelines as tp
from sagevideo import methods
from sagevideo.config import AttentionConfig, Rule, method_config
from sagevideo.patching import patch_pipeline
from sagevideo.sparse.api import SparseState

SPARSE = ("sparse-spatiotemporal", "sparse-semantic")


def test_registered_with_parameters_and_warmup():
    for name in SPARSE:
        m = methods.get(name)
        assert m.needs_warmup and not m.row_local and m.per_head
        assert m.params["precision"] == "auto"
    Rule("sparse-semantic", params={"top_p": 0.5, "q_clusters": 8})
    with pytest.raises(ValueError, match="no parameter"):
        Rule("sparse-semantic", params={"density": 0.5})  # that one belongs to the spatiotemporal method
    with pytest.raises(TypeError):
        Rule("sparse-spatiotemporal", params={"density": "low"})
    cfg = method_config("hunyuan_video", "sparse-semantic")
    assert [r.method for r in cfg.rules] == ["auto", "auto"] and cfg.rules[0].steps == (0.0, 0.1)


class Capture:
    """A temporary method that runs dense and keeps the tensors and context of the calls of one layer."""

    NAME = "test-capture"

    def __init__(self, layer=1):
        self.layer, self.calls = layer, []

    def __enter__(self):
        def fn(q, k, v, ctx):
            if ctx.layer == self.layer:
                self.calls.append((q.clone(), k.clone(), v.clone(), ctx))
            return methods.get("dense").fn(q, k, v, ctx)

        methods.register(methods.Method(self.NAME, fn, cost=1.0))
        return self

    def __exit__(self, *exc):
        methods.unregister(self.NAME)


def _captured(pipe, **kwargs):
    with Capture() as cap, patch_pipeline(pipe, AttentionConfig.uniform(Capture.NAME)):
        tp.run(pipe, **kwargs)
    return cap.calls


def _split(t, ctx, sl):
    return t[:, sl] if ctx.tensor_layout == "BSHD" else t[:, :, sl]


@pytest.fixture(scope="module")
def hunyuan_calls():
    return _captured(tp.hunyuan_video_pipeline(), prompt=["a cat", "a dog walks on the grass"])


@pytest.fixture(scope="module")
def cogvideox_calls():
    return _captured(tp.cogvideox_pipeline())


@pytest.mark.parametrize("name", SPARSE)
@pytest.mark.parametrize("family", ["hunyuan_video", "cogvideox"])
def test_text_rows_stay_exact_and_video_rows_are_sparse(name, family, hunyuan_calls, cogvideox_calls):
    # text sits after the video (HunyuanVideo, with padding) or before it (CogVideoX); its query rows attend to
    # every key, so they equal dense attention exactly, while video rows attend to a subset
    calls = hunyuan_calls if family == "hunyuan_video" else cogvideox_calls
    q, k, v, ctx = calls[0]
    assert ctx.layout.text_len > 0 and ctx.layout.grid is not None
    params = methods.validate_params(name, {"precision": "dense", "block_m": 16, "block_n": 16, **(
        {"density": 0.3, "tolerance": 10.0} if name == "sparse-spatiotemporal"
        else {"top_p": 0.3, "q_clusters": 4, "k_clusters": 6})})
    store = {}
    sctx = dataclasses.replace(ctx, params=params, store=store)
    out, _ = methods.get(name).fn(q, k, v, sctx)
    dense, _ = methods.get("dense").fn(q, k, v, dataclasses.replace(ctx, params={}))
    text, video = ctx.layout.text_slice, ctx.layout.video_slice
    if ctx.key_padding_mask is not None:
        assert not ctx.key_padding_mask.all()  # the batch mixes prompt lengths: padding is really exercised
    torch.testing.assert_close(_split(out, ctx, text), _split(dense, ctx, text), rtol=1e-4, atol=1e-5)
    diff = (_split(out, ctx, video) - _split(dense, ctx, video)).abs().max()
    assert diff > 1e-4  # the video rows really ran sparse
    (state,) = store.values()
    assert isinstance(state, SparseState) and state.calls == 1 and state.last_density < 1.0


def test_wan_pipeline_full_density_equals_dense_and_keeps_state_per_layer():
    pipe = tp.wan_pipeline()
    dense = tp.run(pipe)
    cfg = AttentionConfig(default="sparse-spatiotemporal",
                          default_params={"density": 1.0, "precision": "dense", "profile_every": 2})
    with patch_pipeline(pipe, cfg) as handle:
        out = tp.run(pipe)
        (st,) = handle._states
        store = dict(st.store)
        observed = handle.observed["transformer"]
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)
    assert len(set(observed.values())) == 1
    assert next(iter(observed.values())).startswith("sparse-spatiotemporal(")
    heads = tuple(range(pipe.transformer.config.num_attention_heads))
    assert sorted(store) == [("sparse-spatiotemporal", layer, heads) for layer in range(tp.LAYERS)]
    for state in store.values():
        # 2 calls per step (cond, uncond); profiled at steps 0 and 2 only (profile_every=2), the rest reuse it
        assert state.calls == 2 * tp.NUM_STEPS and state.profiles == tp.NUM_STEPS // 2
        assert state.last_density == 1.0
        assert state.plan is not None  # kept: the next step reuses it


def test_wan_sparse_schedule_with_warmup_changes_only_later_steps():
    pipe = tp.wan_pipeline()
    params = {"precision": "dense", "top_p": 0.5, "q_clusters": 4, "k_clusters": 6, "block_m": 16, "block_n": 16,
              "kmeans_every": 1}
    cfg = AttentionConfig(default="sparse-semantic", default_params=params,
                          rules=(Rule("dense", steps=(0.0, 0.5)), Rule("dense", layers=(0,))))
    with patch_pipeline(pipe, cfg) as handle:
        tp.run(pipe)
        observed = handle.observed["transformer"]
        (st,) = handle._states
        states = dict(st.store)
    for (step, layer), label in observed.items():
        sparse = step >= tp.NUM_STEPS // 2 and layer != 0
        assert label.startswith("sparse-semantic") == sparse, (step, layer, label)
    assert sorted(k[1] for k in states) == list(range(1, tp.LAYERS))
    for state in states.values():  # k-means at every call (cond and uncond) of the sparse steps
        assert state.clusterings == state.calls == 2 * (tp.NUM_STEPS // 2) and state.last_density < 1.0
        # kmeans_every=1 re-plans at every call: the block lists are not held between calls, the centroids are
        assert state.plan is None and state.k_centroids is not None
    # the handle's summary: every sparse call counted, density the call-weighted mean of the layers'
    rep = handle.sparse_report()["transformer"]
    assert rep["calls"] == sum(s.calls for s in states.values())
    want = sum(s.report()["mean_density"] * s.calls for s in states.values()) / rep["calls"]
    assert abs(rep["mean_density"] - want) < 1e-12 and 0.0 < rep["mean_density"] < 1.0
    assert sorted(rep["layers"]) == sorted(f"sparse-semantic/{k[1]}/{k[2]}" for k in states)


def test_default_semantic_schedule_replans_every_third_step():
    """``kmeans_every`` None: the schedule re-clusters every 3 steps (cond and uncond of a step share the
    plan), and the plans stay in the states between calls, since the next calls reuse them."""
    from sagevideo.sparse.api import DEFAULT_REPLAN_EVERY

    assert methods.get("sparse-semantic").params["kmeans_every"] is None
    pipe = tp.wan_pipeline()
    params = {"precision": "dense", "top_p": 0.5, "q_clusters": 4, "k_clusters": 6, "block_m": 16, "block_n": 16}
    cfg = AttentionConfig(default="sparse-semantic", default_params=params, rules=(Rule("dense", steps=(0.0, 0.5)),))
    with patch_pipeline(pipe, cfg) as handle:
        tp.run(pipe)
        states = dict(handle._states[0].store)
    sparse_steps = tp.NUM_STEPS - tp.NUM_STEPS // 2
    assert sparse_steps > 1 and len(states) == tp.LAYERS
    for state in states.values():
        assert state.calls == 2 * sparse_steps
        assert state.clusterings == -(-sparse_steps // DEFAULT_REPLAN_EVERY)
        assert state.plan is not None  # held for the calls that reuse it


@pytest.mark.parametrize("name,counter", [("sparse-semantic", "clusterings"), ("sparse-spatiotemporal", "profiles")])
def test_unknown_step_replans_every_call_by_default(name, counter):
    """Without a step (no scheduler, no ``set_step``) a call cannot tell the next step of a video from the first
    step of the next video, so the default interval re-plans every call; with known steps it reuses plans."""
    from sagevideo.context import AttentionContext, TokenLayout
    from sagevideo.sparse.api import DEFAULT_REPLAN_EVERY

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 48, 16, generator=g) for _ in range(3))
    small = {"q_clusters": 3, "k_clusters": 5} if name == "sparse-semantic" else {}
    params = methods.validate_params(name, {"precision": "dense", "block_m": 16, "block_n": 16, **small})
    for steps, want in (([None] * 6, 6), (list(range(6)), -(-6 // DEFAULT_REPLAN_EVERY))):
        store = {}
        for step in steps:
            ctx = AttentionContext(step=step, num_steps=None if step is None else 6, layer=0, num_layers=1,
                                   layout=TokenLayout("wan", grid=(2, 4, 6)), tensor_layout="BHSD", heads=(0, 1),
                                   params=params, store=store, return_lse=False)
            methods.get(name).fn(q, k, v, ctx)
        (state,) = store.values()
        assert state.calls == 6 and getattr(state, counter) == want, (steps, getattr(state, counter))


def test_ring_and_unknown_grid_fall_back_to_the_dense_op(caplog):
    from sagevideo.context import AttentionContext, RingChunk, TokenLayout

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g) for _ in range(3))
    params = methods.validate_params("sparse-semantic", {"precision": "dense"})
    base = AttentionContext(step=3, num_steps=4, layer=0, num_layers=1, layout=TokenLayout("wan", grid=(2, 3, 4)),
                            tensor_layout="BHSD", heads=(0, 1), params=params, store={}, return_lse=True)
    dense = methods.get("dense").fn(q, k, v, dataclasses.replace(base, params={}))
    for ctx in (dataclasses.replace(base, ring=RingChunk(0, 2, 1)), dataclasses.replace(base, layout=TokenLayout())):
        out, lse = methods.get("sparse-semantic").fn(q, k, v, ctx)
        torch.testing.assert_close(out, dense[0]) and torch.testing.assert_close(lse, dense[1])
        assert ctx.store == {}  # nothing was planned
    assert "runs dense quantized attention here" in caplog.text


def test_cli_and_node_offer_the_sparse_methods():
    from sagevideo import cli
    from sagevideo.generate import build_config

    parser = cli.build_parser()
    args = parser.parse_args(["generate", "--prompt", "x", "--attention", "sparse-semantic"])
    assert args.attention == "sparse-semantic"
    cfg = build_config("wan", attention="sparse-spatiotemporal")
    assert cfg.default == "sparse-spatiotemporal" and [r.method for r in cfg.rules] == ["auto", "auto"]
    comfy_nodes = pytest.importorskip("comfy_nodes.nodes")
    assert set(SPARSE) <= set(comfy_nodes._modes())


def test_node_sparse_mode_gets_the_family_warmup_unless_the_user_sets_one():
    nodes = pytest.importorskip("comfy_nodes.nodes")
    cfg = nodes.build_config("sparse-semantic", family="wan")
    assert cfg.default == "sparse-semantic"
    assert [(r.method, r.steps, r.layers) for r in cfg.rules] == [("auto", (0.0, 0.2), None), ("auto", None, (0,))]
    own = nodes.build_config("sparse-semantic", dense_warmup=0.3, family="wan")
    assert [(r.method, r.steps) for r in own.rules] == [("dense", (0.0, 0.3))]
    plain = nodes.build_config("int8-fp8", family="wan")
    assert plain.rules == ()


def test_calibration_measures_sparse_candidates():
    from tests.test_calibrate import calib

    pipe = tp.wan_pipeline()
    sparse = ("sparse-semantic", {"precision": "dense", "block_m": 16, "block_n": 16, "q_clusters": 4,
                                  "k_clusters": 6, "top_p": 0.8})
    loose = calib(pipe, target=1.0, candidates=("int8-fp8", sparse))
    assert loose.config.default == "sparse-semantic" and not loose.config.rules  # cheapest method fits everywhere
    errors = list(loose.errors.values())
    label = next(k for k in errors[0] if k.startswith("sparse-semantic"))
    # dropping blocks costs far more accuracy than quantizing on this model
    assert all(e[label] > 3 * e["int8-fp8"] for e in errors)
    tight = calib(pipe, target=max(e["int8-fp8"] for e in errors) * 1.01, candidates=("int8-fp8", sparse))
    used = {tight.config.default} | {r.method for r in tight.config.rules}
    assert "sparse-semantic" not in used and "int8-fp8" in used
