"""Patching HunyuanVideo: joint video+text attention with a key-padding mask (batches mix prompt lengths)."""

import pytest
import torch

from sagevideo.config import AttentionConfig
from sagevideo.patching import patch_pipeline
from tests import tiny_pipelines as tp

HV = "dispatch:diffusers.models.transformers.transformer_hunyuan_video"
PROMPTS = ["a cat", "a red car drives along a mountain road at sunset"]  # 4 and 16 of 16 text tokens
SCHEDULE = tp.example_schedule()
schedule_mode = tp.example_mode


def dit_attention(pipe):
    tr = pipe.transformer
    return [b.attn for b in tr.transformer_blocks] + [b.attn for b in tr.single_transformer_blocks]


@pytest.fixture(scope="module")
def hv():
    return tp.hunyuan_video_pipeline()


def reference_run(pipe, mode, **kwargs):
    return tp.reference_run(pipe, HV, dit_attention(pipe), mode, **kwargs)


def test_mixed_prompt_lengths_match_reference(hv):
    expected, ref = reference_run(hv, schedule_mode, prompt=PROMPTS)
    with patch_pipeline(hv, SCHEDULE) as handle:
        out = tp.run(hv, prompt=PROMPTS)
        observed = handle.observed["transformer"]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert observed == {(s, l): schedule_mode(s, l) for s in range(tp.NUM_STEPS) for l in range(tp.LAYERS)}


def test_mixed_prompt_lengths_dense_matches_unpatched(hv):
    dense = tp.run(hv, prompt=PROMPTS, output_type="pt")
    with patch_pipeline(hv, AttentionConfig.uniform("dense")):
        assert torch.equal(tp.run(hv, prompt=PROMPTS, output_type="pt"), dense)
    assert torch.equal(tp.run(hv, prompt=PROMPTS, output_type="pt"), dense)  # unpatched again


@pytest.mark.parametrize("mode", ["int8-fp8", "int8-fp16"])
def test_padding_is_honoured_exactly_in_quantized_modes(hv, mode):
    """More padding slots (max_sequence_length 16 → 40) must not change the short prompt's video at all: padded
    keys are masked out of the scores and out of the quantization statistics (K mean, V scale)."""
    with patch_pipeline(hv, AttentionConfig.uniform(mode)):
        short_pad = tp.run(hv, prompt=PROMPTS)
        long_pad = tp.run(hv, prompt=PROMPTS, max_sequence_length=40)
    assert torch.equal(short_pad[0], long_pad[0])


def test_true_cfg_two_calls_per_step(hv):
    expected, ref = reference_run(hv, schedule_mode, true_cfg_scale=4.0, negative_prompt="blurry")
    assert len(ref.calls) == 2 * tp.NUM_STEPS * tp.LAYERS
    with patch_pipeline(hv, SCHEDULE) as handle:
        out = tp.run(hv, true_cfg_scale=4.0, negative_prompt="blurry")
        assert set(handle.observed["transformer"]) == {(s, l) for s in range(tp.NUM_STEPS) for l in range(tp.LAYERS)}
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_token_layout_and_mask_reach_the_method(hv):
    with tp.RecordContexts() as recorder, patch_pipeline(hv, AttentionConfig.uniform(tp.RecordContexts.NAME)):
        tp.run(hv, prompt=PROMPTS, num_inference_steps=1)
    assert len(recorder) == tp.LAYERS
    ctx = recorder[0]
    video = 3 * 4 * 6  # latent frames × (64/8/2) × (96/8/2)
    assert ctx.layout.grid == (3, 4, 6) and ctx.layout.video_slice == slice(0, video)
    assert ctx.layout.text_slice == slice(video, video + tp.TEXT_LEN)
    assert ctx.tensor_layout == "BSHD" and ctx.heads == (0, 1) and ctx.num_layers == tp.LAYERS
    assert [c.layer for c in recorder] == list(range(tp.LAYERS))
    mask = ctx.key_padding_mask
    assert mask.shape == (2, video + tp.TEXT_LEN) and mask[:, :video].all()
    assert mask[0, video:].sum() == 4 and mask[1, video:].all()  # "a cat" + </s> = 4 tokens, the rest padding


def test_token_refiner_is_untouched(hv):
    refiner = [m for n, m in hv.transformer.named_modules() if n.startswith("context_embedder") and hasattr(m, "processor")]
    assert refiner
    before = [(type(m.processor), getattr(m.processor, "_attention_backend", None)) for m in refiner]
    with patch_pipeline(hv, SCHEDULE):
        during = [(type(m.processor), getattr(m.processor, "_attention_backend", None)) for m in refiner]
        assert all(m.processor._attention_backend.value == "sagevideo" for m in dit_attention(hv))
    assert before == during
