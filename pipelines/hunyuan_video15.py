"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``): joint video+text attention with a token mask.

* Attention modules: ``transformer_blocks[i].attn`` (``HunyuanVideo15AttnProcessor2_0``, diffusers' dispatch):
  the processor concatenates the video query/key/value with the text ones.
* Sequence: video tokens first, frame-major over ``(F/p_t, H/p, W/p)``, then the conditioning tokens, which the
  transformer reorders per sample as ``[valid image, valid ByT5, valid MLLM, padding...]``: their count is the
  sum of the MLLM, ByT5 and image-embedding lengths.
* Mask: the processor builds a full bool ``(B, 1, S, S)`` mask that is the outer product ``m_i ∧ m_j`` of a
  token mask ``m``. Keys are masked exactly by ``m``; the rows of padding *queries* (fully masked in the dense
  model) never reach a video token, because padding keys are masked for every query. sagevideo passes ``m`` as
  the key-padding mask: the first row of the full mask, a video token, which is always valid.
"""

from __future__ import annotations

import torch

from sagevideo.config import AttentionConfig
from sagevideo.context import TokenLayout
from sagevideo.patching import FamilySpec, arg


def attention_modules(transformer) -> list:
    return [b.attn for b in transformer.transformer_blocks]


def token_layout(transformer, args, kwargs) -> TokenLayout:
    hidden_states = arg(args, kwargs, 0, "hidden_states")
    if hidden_states is None or hidden_states.dim() != 5:
        return TokenLayout("hunyuan_video15")
    _, _, frames, height, width = hidden_states.shape
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
    grid = (frames // p_t, height // p, width // p)
    video_len = grid[0] * grid[1] * grid[2]
    text_len = 0
    for index, name in ((2, "encoder_hidden_states"), (5, "encoder_hidden_states_2"), (7, "image_embeds")):
        t = arg(args, kwargs, index, name)
        if t is not None:
            text_len += t.shape[1]
    if text_len == 0:
        return TokenLayout("hunyuan_video15", grid=grid)
    return TokenLayout("hunyuan_video15", grid=grid, video_start=0, text_start=video_len, text_len=text_len)


def timestep(args, kwargs):
    return arg(args, kwargs, 1, "timestep")


def key_padding_mask(attn_mask, query, key):
    """Full (B, 1, S, S) outer-product mask → its first row (B, S); a (B, 1, 1, S) mask → (B, S)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype != torch.bool or attn_mask.dim() != 4 or attn_mask.shape[1] != 1:
        raise NotImplementedError(
            f"sagevideo: expected HunyuanVideo 1.5's bool (B, 1, S, S) mask, got {attn_mask.dtype} "
            f"{tuple(attn_mask.shape)}; this diffusers version is not supported"
        )
    return attn_mask[:, 0, 0, :]


SPEC = FamilySpec(
    name="hunyuan_video15",
    pipelines=("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline"),
    transformers=("HunyuanVideo15Transformer3DModel",),
    transformer_attrs=("transformer",),
    attention_modules=attention_modules,
    processors=("HunyuanVideo15AttnProcessor2_0",),
    route="backend",
    token_layout=token_layout,
    timestep=timestep,
    key_padding_mask=key_padding_mask,
    # sparse methods: as HunyuanVideo
    sparse_warmup=(0.1, (0,)),
    default_config=AttentionConfig(default="auto"),
)
