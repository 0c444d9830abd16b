"""Patching CogVideoX: its processors call SDPA directly and are replaced, and unpatching puts them back.

Expected outputs come from :class:`tiny_pipelines.ReferenceAttention` (``F.scaled_dot_product_attention`` in
diffusers' ``attention_processor`` swapped, inside the listed DiT modules only, for the torch reference of the
chosen mode; steps counted by wrapping ``scheduler.step``).
"""

import pytest
import torch

from sagevideo.config import AttentionConfig
from sagevideo.patching import patch_pipeline, patch_transformer
from tests import tiny_pipelines as tp

SCHEDULE = tp.example_schedule()
schedule_mode = tp.example_mode


def attn1(pipe):
    return [b.attn1 for b in pipe.transformer.transformer_blocks]


@pytest.fixture(scope="module")
def cog():
    return tp.cogvideox_pipeline()


def reference_run(pipe, mode, *, smooth_v=False, **kwargs):
    return tp.reference_run(pipe, "sdpa", attn1(pipe), mode, smooth_v=smooth_v, **kwargs)


def test_schedule_matches_reference_with_batched_cfg(cog):
    expected, ref = reference_run(cog, schedule_mode)
    # classifier-free guidance is batched: one transformer call per step with batch 2
    assert len(ref.calls) == tp.NUM_STEPS * tp.LAYERS
    originals = [m.processor for m in attn1(cog)]
    with patch_pipeline(cog, SCHEDULE) as handle:
        assert all(type(m.processor).__name__ == "CogVideoXScheduledProcessor" for m in attn1(cog))
        out = tp.run(cog)
        observed = handle.observed["transformer"]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert observed == {(s, l): schedule_mode(s, l) for s in range(tp.NUM_STEPS) for l in range(tp.LAYERS)}
    assert [m.processor for m in attn1(cog)] == originals


def test_unpatch_restores_bit_identical_dense(cog):
    dense = tp.run(cog, output_type="pt")
    handle = patch_pipeline(cog, AttentionConfig.uniform("int8-fp8"))
    assert not torch.equal(tp.run(cog, output_type="pt"), dense)
    handle.unpatch()
    assert torch.equal(tp.run(cog, output_type="pt"), dense)
    assert all(type(m.processor).__name__ == "CogVideoXAttnProcessor2_0" for m in attn1(cog))


def test_smooth_v_parameter_reaches_the_kernel(cog):
    cfg = AttentionConfig(default="int8-fp8", default_params={"smooth_v": True})
    expected, _ = reference_run(cog, lambda s, l: "int8-fp8", smooth_v=True)
    without, _ = reference_run(cog, lambda s, l: "int8-fp8", smooth_v=False)
    assert not torch.equal(expected, without)
    with patch_pipeline(cog, cfg) as handle:
        out = tp.run(cog)
        assert set(handle.observed["transformer"].values()) == {"int8-fp8(smooth_v=True)"}
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_fused_projections():
    pipe = tp.cogvideox_pipeline()
    pipe.transformer.fuse_qkv_projections()
    assert type(attn1(pipe)[0].processor).__name__ == "FusedCogVideoXAttnProcessor2_0"
    expected, _ = reference_run(pipe, schedule_mode)
    with patch_pipeline(pipe, SCHEDULE):
        out = tp.run(pipe)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert type(attn1(pipe)[0].processor).__name__ == "FusedCogVideoXAttnProcessor2_0"


def test_without_rotary_embeddings():
    """CogVideoX-2b uses sin-cos position embeddings instead of RoPE."""
    pipe = tp.cogvideox_pipeline(rope=False)
    expected, _ = reference_run(pipe, schedule_mode)
    with patch_pipeline(pipe, SCHEDULE):
        out = tp.run(pipe)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_default_config_uses_smooth_v(cog):
    with patch_pipeline(cog) as handle:
        assert handle.config.default == "auto" and handle.config.default_params["smooth_v"] is True


def test_torch_compile_fullgraph_processor_route():
    import torch._dynamo

    tr = tp.cogvideox_transformer()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 8, 12, generator=g)
    enc = torch.randn(2, tp.TEXT_LEN, 32, generator=g)
    t = torch.tensor([500, 500])
    handle = patch_transformer(tr, SCHEDULE)
    try:
        with torch.no_grad():
            handle.set_step(3, 4)
            eager = tr(x, enc, t, return_dict=False)[0]
            torch._dynamo.reset()
            out = torch.compile(tr, fullgraph=True, backend="aot_eager")(x, enc, t, return_dict=False)[0]
        assert torch.equal(out, eager)
    finally:
        handle.unpatch()
        torch._dynamo.reset()


def test_token_layout_reaches_the_method(cog):
    with tp.RecordContexts() as seen, patch_pipeline(cog, AttentionConfig.uniform(tp.RecordContexts.NAME)):
        tp.run(cog, num_inference_steps=1)
    ctx = seen[0]
    assert ctx.layout.family == "cogvideox" and ctx.layout.grid == (3, 4, 6)
    assert ctx.layout.text_slice == slice(0, tp.TEXT_LEN)  # text first
    assert ctx.layout.video_slice == slice(tp.TEXT_LEN, tp.TEXT_LEN + 72)
    assert ctx.tensor_layout == "BHSD" and ctx.key_padding_mask is None
