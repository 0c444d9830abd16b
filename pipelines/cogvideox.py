"""CogVideoX (``CogVideoXTransformer3DModel``): how the DiT lays out its joint text+video attention.

* Attention is ``transformer_blocks[i].attn1``: one joint self-attention over ``[text; video]``, text first
  (``max_text_seq_length`` = 226 tokens by default, padding included, no mask), then the video tokens,
  frame-major over ``(F/p_t, H/p, W/p)`` (``patch_size_t`` is None for CogVideoX 1.0: every latent frame).
* diffusers' ``CogVideoXAttnProcessor2_0`` (and the fused variant) call ``F.scaled_dot_product_attention``
  directly and have no dispatch backend, so ``set_attention_backend`` cannot reach them: sagevideo replaces
  them with :class:`CogVideoXScheduledProcessor`, which performs the same projections, QK norms and RoPE
  (applied to the video part only, when the model uses rotary embeddings) and runs the scheduled op in BHSD.
* The transformer input is ``hidden_states`` ``(B, F, C, H, W)``; the pipeline batches classifier-free
  guidance (B = 2 per prompt).
"""

from __future__ import annotations

import torch

from sagevideo.config import AttentionConfig
from sagevideo.context import TokenLayout
from sagevideo.patching import FamilySpec, arg


def attention_modules(transformer) -> list:
    return [block.attn1 for block in transformer.transformer_blocks]


def token_layout(transformer, args, kwargs) -> TokenLayout:
    hidden_states = arg(args, kwargs, 0, "hidden_states")
    encoder_hidden_states = arg(args, kwargs, 1, "encoder_hidden_states")
    if hidden_states is None or hidden_states.dim() != 5 or encoder_hidden_states is None:
        return TokenLayout("cogvideox")
    _, frames, _, height, width = hidden_states.shape
    p = transformer.config.patch_size
    p_t = transformer.config.patch_size_t or 1
    text_len = encoder_hidden_states.shape[1]
    return TokenLayout(
        "cogvideox", grid=(frames // p_t, height // p, width // p), video_start=text_len, text_start=0,
        text_len=text_len,
    )


def timestep(args, kwargs):
    return arg(args, kwargs, 2, "timestep")


def key_padding_mask(attn_mask, query, key):
    return None  # CogVideoX attends to its padded text tokens; the processor refuses a mask


class CogVideoXScheduledProcessor:
    """Drop-in for ``CogVideoXAttnProcessor2_0`` / ``FusedCogVideoXAttnProcessor2_0`` on a DiT block's ``attn1``.

    Same computation as diffusers' processor up to the attention call, which goes to sagevideo's scheduled op;
    returns ``(video_states, text_states)`` like the original.
    """

    def __init__(self, site, original):
        self._site = site
        self.original = original

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise NotImplementedError("sagevideo: CogVideoX self-attention with an attention mask is not supported")
        text_len = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, seq, _ = x.shape

        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(x).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, seq, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            # rotary embeddings on the video tokens only, written in place (query and key are fresh tensors
            # here: outputs of the projections or of the QK norms), so no extra copy of the whole sequence
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)

        out, _ = self._site.attend(query, key, value, None, None, False, "BHSD")
        out = out.transpose(1, 2).reshape(batch, seq, attn.heads * head_dim)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        text_out, video_out = out.split([text_len, seq - text_len], dim=1)
        return video_out, text_out


def make_processor(site, original):
    return CogVideoXScheduledProcessor(site, original)


SPEC = FamilySpec(
    name="cogvideox",
    pipelines=("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline"),
    transformers=("CogVideoXTransformer3DModel",),
    transformer_attrs=("transformer",),
    attention_modules=attention_modules,
    processors=("CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0"),
    route="processor",
    token_layout=token_layout,
    timestep=timestep,
    key_padding_mask=key_padding_mask,
    make_processor=make_processor,
    # sparse methods: CogVideoX: timesteps above 800 (about 20 %) and layer 0 dense (Sparse VideoGen)
    sparse_warmup=(0.2, (0,)),
    # SageAttention2 reports V smoothing lifting CogVideoX's attention cosine similarity from 98.25 % to 99.75 %
    default_config=AttentionConfig(default="auto", default_params={"smooth_v": True}),
)
