"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): how the DiT lays out its self-attention tokens.

* Self-attention is ``blocks[i].attn1`` (``WanAttnProcessor``, through diffusers' dispatch): video tokens only,
  frame-major over the post-patch grid ``(F/p_t, H/p_h, W/p_w)``; RoPE is applied inside the processor.
* ``blocks[i].attn2`` is cross-attention to the text (and, for I2V, the CLIP image tokens): left alone.
* The transformer input is ``hidden_states`` ``(B, C, F, H, W)`` and ``config.patch_size`` is ``(1, 2, 2)``.
* The timestep is ``(B,)``, or ``(B, seq_len)`` for Wan 2.2 TI2V (per-token timesteps, first frame at 0): the
  step tracker reads its maximum.
* Wan 2.2 pipelines hold two experts, ``transformer`` (high noise) and ``transformer_2`` (low noise),
  switched at ``boundary_ratio``; both are patched and share the pipeline's step count.
* The self-attention call has no mask.
"""

from __future__ import annotations

from sagevideo.config import AttentionConfig
from sagevideo.context import TokenLayout
from sagevideo.patching import FamilySpec, arg


def attention_modules(transformer) -> list:
    return [block.attn1 for block in transformer.blocks]


def token_layout(transformer, args, kwargs) -> TokenLayout:
    hidden_states = arg(args, kwargs, 0, "hidden_states")
    if hidden_states is None or hidden_states.dim() != 5:
        return TokenLayout("wan")
    _, _, frames, height, width = hidden_states.shape
    p_t, p_h, p_w = transformer.config.patch_size
    return TokenLayout("wan", grid=(frames // p_t, height // p_h, width // p_w))


def timestep(args, kwargs):
    return arg(args, kwargs, 1, "timestep")


def key_padding_mask(attn_mask, query, key):
    if attn_mask is not None:
        raise NotImplementedError(
            "sagevideo: Wan's self-attention was called with an attention mask, which diffusers' Wan does not "
            "pass; this diffusers version is not supported"
        )
    return None


SPEC = FamilySpec(
    name="wan",
    pipelines=("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline"),
    transformers=("WanTransformer3DModel",),
    transformer_attrs=("transformer", "transformer_2"),
    attention_modules=attention_modules,
    processors=("WanAttnProcessor",),
    route="backend",
    token_layout=token_layout,
    timestep=timestep,
    key_padding_mask=key_padding_mask,
    # SageAttention2-style INT8/FP8 everywhere (int8-fp16 on sm80/86, dense on CPU) with the guard on.
    # sparse methods: Wan: 20 % of steps and one layer dense (Sparse VideoGen 1/2 scripts)
    sparse_warmup=(0.2, (0,)),
    default_config=AttentionConfig(default="auto", family=None),
)
