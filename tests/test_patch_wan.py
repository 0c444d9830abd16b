"""Patching Wan pipelines (2.1 T2V, I2V, 2.2 with two experts) and bare Wan transformers.

Expected outputs come from :class:`tiny_pipelines.ReferenceAttention`, which runs the same pipeline with the
attention mode of each (step, layer) computed directly by ``sagevideo.reference.quant_attention_ref`` (or the
model's own dense attention) and counts steps by wrapping ``scheduler.step`` — no sagevideo patching code.
"""

import warnings

import pytest
import torch

from tests import tiny_pipelines as tp
from sagevideo import methods
from sagevideo.config import AttentionConfig, Rule, StepUnknownError
from sagevideo.guard import NonFiniteAttentionWarning
from sagevideo.patching import AlreadyPatchedError, patch_pipeline, patch_transformer

WAN = "dispatch:diffusers.models.transformers.transformer_wan"

SCHEDULE = tp.example_schedule()
schedule_mode = tp.example_mode


def attn1(*transformers):
    return [b.attn1 for tr in transformers for b in tr.blocks]


@pytest.fixture(scope="module")
def wan():
    return tp.wan_pipeline()


@pytest.fixture(scope="module")
def dense_out(wan):
    return tp.run(wan)


def reference_run(pipe, mode, modules, **kwargs):
    return tp.reference_run(pipe, WAN, modules, mode, **kwargs)


def test_schedule_matches_reference_and_is_observed(wan):
    expected, ref = reference_run(wan, schedule_mode, attn1(wan.transformer))
    with patch_pipeline(wan, SCHEDULE) as handle:
        out = tp.run(wan)
        observed = handle.observed["transformer"]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # the choice per step and layer as the op ran it, against the schedule written out by hand
    want = {(s, l): schedule_mode(s, l) for s in range(tp.NUM_STEPS) for l in range(tp.LAYERS)}
    assert observed == want
    # every self-attention call was intercepted by the reference (2 per step: classifier-free guidance)
    assert len(ref.calls) == 2 * tp.NUM_STEPS * tp.LAYERS
    # the comparison is sensitive: another schedule gives another output
    other, _ = reference_run(wan, lambda s, l: "int8-fp8", attn1(wan.transformer))
    assert not torch.equal(other, expected)


def test_unpatch_restores_bit_identical_dense(wan, dense_out):
    procs = [m.processor for m in attn1(wan.transformer)]
    handle = patch_pipeline(wan, AttentionConfig.uniform("int8-fp8"))
    patched = tp.run(wan)
    assert not torch.equal(patched, dense_out)
    handle.unpatch()
    assert torch.equal(tp.run(wan), dense_out)
    tr = wan.transformer
    assert [m.processor for m in attn1(tr)] == procs
    assert all("_attention_backend" not in p.__dict__ for p in procs)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in attn1(tr))
    assert "forward" not in tr.__dict__ and not hasattr(tr, "_sagevideo_state")
    handle.unpatch()  # a second unpatch does nothing


def test_last_unpatch_frees_the_semantic_plan_graphs(wan):
    """The process's CUDA graphs of semantic plans (buffers and memory pools) go with the last active patch,
    not with an earlier one."""
    from sagevideo.sparse.semantic import PLAN_GRAPHS

    other = tp.wan_pipeline()
    first = patch_pipeline(wan, AttentionConfig.uniform("int8-fp8"))
    second = patch_pipeline(other, AttentionConfig.uniform("int8-fp8"))
    PLAN_GRAPHS._graphs["a signature"] = {"graph": None}  # stands for a captured graph (CUDA only)
    first.unpatch()
    assert "a signature" in PLAN_GRAPHS._graphs  # the other patch may still replay it
    second.unpatch()
    assert PLAN_GRAPHS._graphs == {}


def test_dense_schedule_equals_unpatched(wan, dense_out):
    with patch_pipeline(wan, AttentionConfig.uniform("dense")):
        assert torch.equal(tp.run(wan), dense_out)


def test_patch_twice_is_an_error_and_repatch_after_unpatch_works(wan):
    handle = patch_pipeline(wan, SCHEDULE)
    try:
        with pytest.raises(AlreadyPatchedError, match="already patched"):
            patch_pipeline(wan, SCHEDULE)
        with pytest.raises(AlreadyPatchedError):
            patch_transformer(wan.transformer, SCHEDULE)
        # the failed attempt left the first patch intact
        assert len(handle.observed) == 1 and handle.is_patched
    finally:
        handle.unpatch()
    with patch_pipeline(wan, AttentionConfig.uniform("int8-fp16")) as handle2:
        tp.run(wan)
        assert set(handle2.observed["transformer"].values()) == {"int8-fp16"}


def test_only_self_attention_is_patched(wan):
    """Cross-attention keeps diffusers' backend; the transformer forward count matches the call count."""
    with patch_pipeline(wan, AttentionConfig.uniform("int8-fp8")) as handle:
        tr = wan.transformer
        assert all(b.attn2.processor._attention_backend is None for b in tr.blocks)
        assert all(b.attn1.processor._attention_backend.value == "sagevideo" for b in tr.blocks)
        tp.run(wan)
        assert len(handle.observed["transformer"]) == tp.NUM_STEPS * tp.LAYERS


def test_batch_of_two_prompts_with_cfg(wan):
    """Two prompts in one batch (B = 2 per transformer call) with classifier-free guidance."""
    prompts = ["a cat walks on the grass", "a red car drives along a mountain road at sunset"]
    expected, _ = reference_run(wan, schedule_mode, attn1(wan.transformer), prompt=prompts, negative_prompt=["", "x"])
    with patch_pipeline(wan, SCHEDULE):
        out = tp.run(wan, prompt=prompts, negative_prompt=["", "x"])
    assert out.shape[0] == 2
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_per_head_rule(wan):
    cfg = AttentionConfig(default="int8-fp8", rules=(Rule("int8-fp16", heads=(1,), layers=(-1,)),))

    def mode(step, layer):
        return ("int8-fp8", "int8-fp16") if layer == tp.LAYERS - 1 else "int8-fp8"

    expected, _ = reference_run(wan, mode, attn1(wan.transformer))
    with patch_pipeline(wan, cfg) as handle:
        out = tp.run(wan)
        labels = set(handle.observed["transformer"].values())
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert labels == {"int8-fp8", "int8-fp8[h0]/int8-fp16[h1]"}


def test_wan22_patches_both_experts():
    pipe = tp.wan_pipeline(two_experts=True)
    modules = attn1(pipe.transformer, pipe.transformer_2)

    def mode(step, layer):  # layer counts over both experts here; fold it back to a per-expert index
        return schedule_mode(step, layer % tp.LAYERS)

    expected, ref = reference_run(pipe, mode, modules)
    with patch_pipeline(pipe, SCHEDULE) as handle:
        out = tp.run(pipe)
        observed = handle.observed
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert set(observed) == {"transformer", "transformer_2"}
    # boundary_ratio 0.5: the high-noise expert runs the first steps, the low-noise one the rest
    steps_1 = {s for s, _ in observed["transformer"]}
    steps_2 = {s for s, _ in observed["transformer_2"]}
    assert steps_1 and steps_2 and max(steps_1) < min(steps_2)
    assert steps_1 | steps_2 == set(range(tp.NUM_STEPS))
    for name in observed:
        assert all(label == schedule_mode(s, l) for (s, l), label in observed[name].items())


def test_wan_i2v():
    pipe = tp.wan_i2v_pipeline()
    expected, _ = reference_run(pipe, schedule_mode, attn1(pipe.transformer))
    with patch_pipeline(pipe, SCHEDULE) as handle:
        assert all(b.attn2.processor._attention_backend is None for b in pipe.transformer.blocks)
        out = tp.run(pipe)
        assert len(handle.observed["transformer"]) == tp.NUM_STEPS * tp.LAYERS
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_vae_and_text_encoder_untouched(wan):
    """Decoded frames (VAE + text encoder) of a dense-scheduled patched pipeline equal the unpatched ones."""
    ref = tp.run(wan, output_type="pt")
    with patch_pipeline(wan, AttentionConfig.uniform("dense")):
        out = tp.run(wan, output_type="pt")
    assert torch.equal(out, ref)


# ----------------------------------------------------------------------------------------------------------
# Guard
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def nan_method():
    def fn(q, k, v, ctx):
        return torch.full_like(q, float("nan")), None

    methods.register(methods.Method("test-nan", fn, cost=0.1, description="always NaN (test)"))
    yield "test-nan"
    methods.unregister("test-nan")


def test_guard_recomputes_non_finite_output_dense(wan, dense_out, nan_method):
    cfg = AttentionConfig(default="dense", rules=(Rule(nan_method, layers=(1,)),))
    with patch_pipeline(wan, cfg) as handle:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = tp.run(wan)
        events = handle.guard_events
        observed = handle.observed["transformer"]
    assert torch.equal(out, dense_out)  # every broken call was recomputed dense
    assert len(events) == 2 * tp.NUM_STEPS  # layer 1, every step, cond and uncond
    assert {(e.layer, e.method) for e in events} == {(1, "test-nan")}
    assert sorted({e.step for e in events}) == list(range(tp.NUM_STEPS))
    assert len([w for w in caught if issubclass(w.category, NonFiniteAttentionWarning)]) == 1  # reported once
    assert observed[(0, 1)] == "test-nan→dense(guard)" and observed[(0, 0)] == "dense"


def test_guard_off_lets_nan_through(wan, nan_method):
    cfg = AttentionConfig(default="dense", rules=(Rule(nan_method, layers=(1,)),), guard=False)
    with patch_pipeline(wan, cfg) as handle:
        out = tp.run(wan)
        assert handle.guard_events == []
    assert torch.isnan(out).all()


# ----------------------------------------------------------------------------------------------------------
# Bare transformer, torch.compile
# ----------------------------------------------------------------------------------------------------------


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 8, 12, generator=g)
    enc = torch.randn(1, tp.TEXT_LEN, 32, generator=g)
    return x, torch.tensor([900.0]), enc


def test_bare_transformer_needs_a_step_for_step_rules():
    tr = tp.wan_transformer()
    x, t, enc = _inputs()
    with patch_transformer(tr, SCHEDULE) as handle, torch.no_grad():
        with pytest.raises(StepUnknownError, match="set_step"):
            tr(x, t, enc)
        handle.set_step(3, 4)
        tr(x, t, enc)
        assert handle.observed["transformer"] == {(3, 0): "int8-fp16", (3, 1): "int8-fp16", (3, 2): "int8-fp8"}
    with patch_transformer(tr, AttentionConfig.uniform("int8-fp16")) as handle, torch.no_grad():
        tr(x, t, enc)  # no step rule: no step needed
        assert set(handle.observed["transformer"]) == {(None, 0), (None, 1), (None, 2)}


def test_torch_compile_fullgraph_follows_the_schedule_without_recompiling():
    import torch._dynamo

    tr = tp.wan_transformer()
    x, t, enc = _inputs()
    handle = patch_transformer(tr, SCHEDULE)
    try:
        with torch.no_grad():
            eager = {}
            for step in (0, 3):
                handle.set_step(step, 4)
                eager[step] = tr(x, t, enc, return_dict=False)[0]
            assert not torch.equal(eager[0], eager[3])
            torch._dynamo.reset()
            compiled = torch.compile(tr, fullgraph=True, backend="aot_eager")
            handle.set_step(0, 4)
            out0 = compiled(x, t, enc, return_dict=False)[0]
            handle.reset_observed()
            with torch._dynamo.config.patch(error_on_recompile=True):
                handle.set_step(3, 4)
                out3 = compiled(x, t, enc, return_dict=False)[0]
        assert torch.equal(out0, eager[0]) and torch.equal(out3, eager[3])
        assert handle.observed["transformer"] == {(3, 0): "int8-fp16", (3, 1): "int8-fp16", (3, 2): "int8-fp8"}
    finally:
        handle.unpatch()
        torch._dynamo.reset()


def test_compiled_model_is_refused():
    tr = tp.wan_transformer()
    with pytest.raises(TypeError, match="already compiled.*patch the model first"):
        patch_transformer(torch.compile(tr), SCHEDULE)


# ----------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------


def test_unsupported_pipeline_is_refused():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match=r"does not support DDPMPipeline.*WanPipeline.*HunyuanVideoPipeline.*CogVideoXPipeline"):
        patch_pipeline(pipe)
    with pytest.raises(ValueError, match="patch_transformer supports WanTransformer3DModel"):
        patch_transformer(unet)


def test_foreign_processor_is_refused(wan):
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class Custom(WanAttnProcessor):
        pass

    block = wan.transformer.blocks[1]
    original = block.attn1.processor
    block.attn1.processor = Custom()
    try:
        with pytest.raises(TypeError, match="layer 1: attention processor is Custom"):
            patch_pipeline(wan)
        # nothing was left half-patched
        assert not hasattr(wan.transformer, "_sagevideo_state")
        assert wan.transformer.blocks[0].attn1.processor._attention_backend is None
    finally:
        block.attn1.processor = original


def test_attention_changed_after_patching_is_refused():
    pipe = tp.wan_pipeline()  # set_attention_backend touches every processor: keep the shared one clean
    dense = tp.run(pipe)
    with patch_pipeline(pipe, AttentionConfig.uniform("int8-fp8")):
        pipe.transformer.set_attention_backend("native")
        with pytest.raises(RuntimeError, match="attention backend of transformer layer 0 was replaced"):
            tp.run(pipe)
    # unpatch restored the backends the patch had found
    assert all(b.attn1.processor._attention_backend is None for b in pipe.transformer.blocks)
    assert torch.equal(tp.run(pipe), dense)


def test_config_family_mismatch_is_refused(wan):
    with pytest.raises(ValueError, match="made for the 'cogvideox' family"):
        patch_pipeline(wan, AttentionConfig(default="int8-fp8", family="cogvideox"))


def test_default_config_runs_dense_on_cpu(wan, dense_out):
    """The Wan default is 'auto' everywhere: dense on CPU, so the output is the unpatched one."""
    with patch_pipeline(wan) as handle:
        assert handle.config.default == "auto"
        assert torch.equal(tp.run(wan), dense_out)


def test_token_layout_reaches_the_method(wan):
    with tp.RecordContexts() as seen, patch_pipeline(wan, AttentionConfig.uniform(tp.RecordContexts.NAME)):
        tp.run(wan, num_inference_steps=2)
    assert len(seen) == 2 * 2 * tp.LAYERS  # steps × (cond, uncond) × layers
    ctx = seen[0]
    assert ctx.layout.family == "wan" and ctx.layout.grid == (3, 4, 6)  # 9 frames → 3; 64×96 / 8 / 2
    assert ctx.layout.text_slice is None and ctx.key_padding_mask is None
    assert ctx.tensor_layout == "BSHD" and ctx.heads == (0, 1) and ctx.ring is None
    assert [(c.step, c.num_steps, c.layer) for c in seen[: tp.LAYERS]] == [(0, 2, l) for l in range(tp.LAYERS)]
    assert {c.step for c in seen} == {0, 1}


# ----------------------------------------------------------------------------------------------------------
# GPU (skipped on CPU machines): memory and accuracy of the real kernels inside a patched transformer
# ----------------------------------------------------------------------------------------------------------


def _gpu_wan():
    """One Wan2.1-1.3B block at full width (12 heads × 128, FFN 8960), bf16, 7680 video tokens."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=256, freq_dim=256, ffn_dim=8960, num_layers=1,
    ).to("cuda", torch.bfloat16).eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 16, 5, 64, 96, generator=g, device="cuda").bfloat16()  # 5 × 32 × 48 = 7680 tokens
    enc = torch.randn(1, 64, 256, generator=g, device="cuda").bfloat16()
    return model, (x, torch.tensor([500.0], device="cuda"), enc)


def _peak(model, inputs):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        out = model(*inputs, return_dict=False)[0]
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), out


@pytest.mark.gpu
def test_gpu_memory_and_accuracy_of_a_patched_block():
    """Per call, a patched block holds at most one call's quantized operands (INT8 Q/K, FP8 V: one byte per
    element) and one output more than dense; nothing stays allocated after the forward; outputs stay close.

    Whole-model peaks (where the feed-forward layers dominate) are measured by benchmarks/pipeline.py.
    """
    from sagevideo.sparse.semantic import PLAN_GRAPHS

    # plan graphs left by earlier tests would be freed by the first unpatch() below, inside the measurement
    PLAN_GRAPHS.clear()
    model, inputs = _gpu_wan()
    _peak(model, inputs)  # warm-up (SDPA backend selection)
    dense_peak, dense = _peak(model, inputs)
    before = torch.cuda.memory_allocated()
    elements = 7680 * 12 * 128  # one of Q, K, V
    allowance = 3 * elements + 2 * elements  # quantized Q, K, V + one bf16 output
    for method in ("dense", "int8-fp16", "int8-fp8"):
        with patch_transformer(model, AttentionConfig.uniform(method)) as handle:
            _peak(model, inputs)  # Triton autotuning and compilation
            peak, out = _peak(model, inputs)
            assert handle.guard_events == []
        rel_l1 = ((out.double() - dense.double()).abs().sum() / dense.double().abs().sum()).item()
        del out
        assert torch.cuda.memory_allocated() == before, f"{method}: memory left allocated after the forward"
        assert peak <= dense_peak + allowance, (
            f"{method}: peak {peak / 2**20:.1f} MiB, dense {dense_peak / 2**20:.1f} MiB, "
            f"allowance {allowance / 2**20:.1f} MiB"
        )
        assert rel_l1 < (1e-3 if method == "dense" else 0.02), f"{method}: block output rel-L1 {rel_l1:.4f}"


# ----------------------------------------------------------------------------------------------------------
# State of stateful methods (ctx.store)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def counting_method():
    def fn(q, k, v, ctx):
        key = ("test-count", ctx.layer, ctx.heads)
        seen = ctx.store.setdefault(key, [])
        seen.append(ctx.step)
        return methods.get("dense").fn(q, k, v, ctx)

    methods.register(methods.Method("test-count", fn, cost=0.5, description="dense, records calls (test)"))
    yield "test-count"
    methods.unregister("test-count")


def test_store_persists_across_steps_and_belongs_to_one_patch(wan, dense_out, counting_method):
    with patch_pipeline(wan, AttentionConfig.uniform(counting_method)) as handle:
        out = tp.run(wan)
        (state,) = handle._states
        store = state.store
        # one entry per layer, holding every step twice (cond and uncond), in order
        assert sorted(store) == [("test-count", l, tuple(range(wan.transformer.config.num_attention_heads)))
                                 for l in range(tp.LAYERS)]
        for seen in store.values():
            assert seen == [s for s in range(tp.NUM_STEPS) for _ in range(2)]
    torch.testing.assert_close(out, dense_out, rtol=0, atol=0)
    with patch_pipeline(wan, AttentionConfig.uniform(counting_method)) as handle:
        (state,) = handle._states
        assert state.store == {}  # a new patch starts with no state
