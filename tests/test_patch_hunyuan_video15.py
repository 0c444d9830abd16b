"""Patching HunyuanVideo 1.5: video first, then reordered text (MLLM, ByT5, image); a full outer-product mask."""

import pytest
import torch

from sagevideo.config import AttentionConfig
from sagevideo.patching import patch_pipeline
from tests import tiny_pipelines as tp

HV15 = "dispatch:diffusers.models.transformers.transformer_hunyuan_video15"
PROMPTS = ["a cat", 'a red car drives along a mountain road with a sign "stop"']  # no glyph text / glyph text
SCHEDULE = tp.example_schedule()
schedule_mode = tp.example_mode


@pytest.fixture(scope="module")
def hv15():
    return tp.hunyuan_video15_pipeline()


def test_mixed_prompts_match_reference(hv15):
    modules = [b.attn for b in hv15.transformer.transformer_blocks]
    expected, ref = tp.reference_run(hv15, HV15, modules, schedule_mode, prompt=PROMPTS)
    assert len(ref.calls) == 2 * tp.NUM_STEPS * tp.LAYERS  # the guider runs cond and uncond
    with patch_pipeline(hv15, SCHEDULE) as handle:
        out = tp.run(hv15, prompt=PROMPTS)
        observed = handle.observed["transformer"]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert observed == {(s, l): schedule_mode(s, l) for s in range(tp.NUM_STEPS) for l in range(tp.LAYERS)}


def test_dense_schedule_and_unpatch_are_bit_identical(hv15):
    dense = tp.run(hv15, prompt=PROMPTS)
    with patch_pipeline(hv15, AttentionConfig.uniform("dense")):
        assert torch.equal(tp.run(hv15, prompt=PROMPTS), dense)
    handle = patch_pipeline(hv15, AttentionConfig.uniform("int8-fp8"))
    assert not torch.equal(tp.run(hv15, prompt=PROMPTS), dense)
    handle.unpatch()
    assert torch.equal(tp.run(hv15, prompt=PROMPTS), dense)


def test_decoded_frames_unchanged_by_a_dense_patch(hv15):
    """VAE and text encoders untouched (single prompt: diffusers' HunyuanVideo 1.5 VAE fails to decode batch 2
    on CPU in 0.42.1, patched or not)."""
    dense = tp.run(hv15, output_type="pt")
    with patch_pipeline(hv15, AttentionConfig.uniform("dense")):
        assert torch.equal(tp.run(hv15, output_type="pt"), dense)


def test_padding_is_honoured_exactly(hv15):
    """Sixteen more MLLM padding slots do not change a short prompt's video in a quantized mode."""
    with patch_pipeline(hv15, AttentionConfig.uniform("int8-fp8")):
        short_pad = tp.run(hv15, prompt=PROMPTS)
        hv15.tokenizer_max_length = 2 * tp.TEXT_LEN
        try:
            long_pad = tp.run(hv15, prompt=PROMPTS)
        finally:
            hv15.tokenizer_max_length = tp.TEXT_LEN
    assert torch.equal(short_pad[0], long_pad[0])


def test_token_layout_and_mask(hv15):
    with tp.RecordContexts() as seen, patch_pipeline(hv15, AttentionConfig.uniform(tp.RecordContexts.NAME)):
        tp.run(hv15, prompt=PROMPTS, num_inference_steps=1)
    ctx = seen[0]
    video = 3 * 4 * 6  # latent frames × (64/16) × (96/16), patch 1
    text = tp.TEXT_LEN + 8 + 4  # MLLM + ByT5 + image slots
    assert ctx.layout.grid == (3, 4, 6) and ctx.layout.text_slice == slice(video, video + text)
    mask = ctx.key_padding_mask
    assert mask.shape == (2, video + text) and mask[:, :video].all()
    # the transformer puts valid conditioning tokens first: sample 0 has no glyph text, sample 1 has some
    valid = mask[:, video:].sum(dim=1)
    assert valid[0] < valid[1]
    assert all(mask[b, video : video + int(valid[b])].all() for b in range(2))
