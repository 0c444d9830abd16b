"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): joint video+text attention with a key-padding mask.

* Attention modules: ``transformer_blocks[i].attn`` (dual-stream: the processor concatenates the video
  query/key/value with the text ones) then ``single_transformer_blocks[i].attn`` (single-stream: the sequence
  is already ``[video; text]``); layer indices follow that order (20 + 40 = 60 layers in the 13B model).
  ``HunyuanVideoAttnProcessor2_0`` goes through diffusers' dispatch, so the backend route applies.
* Sequence: video tokens first, frame-major over ``(F/p_t, H/p, W/p)``, then the text tokens (256 slots
  from the Llama encoder after the token refiner, padding at the end). RoPE is on the video part only.
* Mask: the model always passes a bool ``(B, 1, 1, N)`` key mask (True = real token), because batches mix
  prompt lengths; it becomes the op's ``key_padding_mask`` ``(B, N)`` and is honoured exactly by every mode.
* The token refiner's attention (``context_embedder``, plain ``AttnProcessor2_0``) is text-only and left alone.
"""

from __future__ import annotations

import torch

from sagevideo.config import AttentionConfig
from sagevideo.context import TokenLayout
from sagevideo.patching import FamilySpec, arg


def attention_modules(transformer) -> list:
    return [b.attn for b in transformer.transformer_blocks] + [b.attn for b in transformer.single_transformer_blocks]


def token_layout(transformer, args, kwargs) -> TokenLayout:
    hidden_states = arg(args, kwargs, 0, "hidden_states")
    encoder_hidden_states = arg(args, kwargs, 2, "encoder_hidden_states")
    if hidden_states is None or hidden_states.dim() != 5 or encoder_hidden_states is None:
        return TokenLayout("hunyuan_video")
    _, _, frames, height, width = hidden_states.shape
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
    grid = (frames // p_t, height // p, width // p)
    video_len = grid[0] * grid[1] * grid[2]
    text_len = encoder_hidden_states.shape[1]
    return TokenLayout("hunyuan_video", grid=grid, video_start=0, text_start=video_len, text_len=text_len)


def timestep(args, kwargs):
    return arg(args, kwargs, 1, "timestep")


def key_padding_mask(attn_mask, query, key):
    """(B, 1, 1, N) bool → (B, N); queries and keys are BSHD."""
    if attn_mask is None:
        return None
    if attn_mask.dtype != torch.bool or attn_mask.dim() != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1:
        raise NotImplementedError(
            f"sagevideo: expected HunyuanVideo's bool (B, 1, 1, N) key mask, got {attn_mask.dtype} "
            f"{tuple(attn_mask.shape)}; this diffusers version is not supported"
        )
    return attn_mask.reshape(attn_mask.shape[0], attn_mask.shape[-1])


SPEC = FamilySpec(
    name="hunyuan_video",
    pipelines=("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline"),
    transformers=("HunyuanVideoTransformer3DModel",),
    transformer_attrs=("transformer",),
    attention_modules=attention_modules,
    processors=("HunyuanVideoAttnProcessor2_0",),
    route="backend",
    token_layout=token_layout,
    timestep=timestep,
    key_padding_mask=key_padding_mask,
    # sparse methods: HunyuanVideo 720p: 10 % of steps and one layer dense (Sparse VideoGen's scripts)
    sparse_warmup=(0.1, (0,)),
    default_config=AttentionConfig(default="auto"),
)
