"""Configurations, tokenizer, prompt encoding and pipeline assembly for the tiny Wan model.

Sizes (fp32 parameters):

* ``AutoencoderKLWan`` base_dim 16, one residual block per level, z_dim 16 - 2.6 M. Wan's usual
  compression: 4x in time (``1 + 4k`` frames), 8x in space.
* ``WanTransformer3DModel`` 4 layers, 4 heads x 64 (hidden 256), FFN 1024, patch (1, 2, 2) - 4.9 M.
  At 33x256x256 the latent is 9x32x32, i.e. 9x16x16 = 2,304 video tokens.
* ``UMT5EncoderModel`` 2 layers, d_model 256, 4 heads, gated-GELU FFN 512 - 1.4 M.
* A BPE tokenizer trained with ``tokenizers`` on the caption distribution (every caption word is one
  token; unseen words fall back to letters), wrapped as a ``PreTrainedTokenizerFast``.
* ``UniPCMultistepScheduler`` with flow sigmas, flow prediction, flow_shift 3 - the scheduler the Wan 2.1
  releases use; training uses the matching rectified-flow objective (:func:`flow_targets`).
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch

MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default; the transformer always sees 512 text positions
TEXT_DIM = 256
FLOW_SHIFT = 3.0  # inference (scheduler) shift
TRAIN_SHIFT = 2.0  # shift applied to the training sigma distribution

VAE_CONFIG: dict = dict(
    base_dim=16,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
)

TRANSFORMER_CONFIG: dict = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    text_dim=TEXT_DIM,
    freq_dim=256,
    ffn_dim=1024,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)

TEXT_ENCODER_CONFIG: dict = dict(
    d_model=TEXT_DIM,
    d_kv=64,
    d_ff=512,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=64,
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
    use_cache=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
    tie_word_embeddings=False,
)

SCHEDULER_CONFIG: dict = dict(
    num_train_timesteps=1000,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=FLOW_SHIFT,
    solver_order=2,
)

TOKENIZER_VOCAB = 384
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5


# ----------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------


def train_tokenizer(corpus: list[str] | None = None, vocab_size: int = TOKENIZER_VOCAB):
    """A byte-pair-encoding ``tokenizers.Tokenizer`` trained on the caption distribution.

    Lower-cases, splits on whitespace (metaspace marker) and punctuation, and appends ``</s>`` like T5.
    Every caption word ends up as one token (the merges run out near 310 entries); letters and digits
    stay in the vocabulary so words the model never saw still tokenize (into letters). Training is
    deterministic for a given corpus.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if corpus is None:
        from sagevideo.recipes.tiny_wan.data import caption_corpus

        corpus = caption_corpus()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(string.ascii_lowercase + string.digits + ".,'-!?\u2581"),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def wrap_tokenizer(tok):
    """The ``transformers`` tokenizer WanPipeline calls (``PreTrainedTokenizerFast`` around ``tok``)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=MAX_SEQUENCE_LENGTH,
        padding_side="right",
    )


def tokenizer_from_json(text: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(text)


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


def build_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(**VAE_CONFIG)


def build_transformer():
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**TRANSFORMER_CONFIG)
    # start as an identity-free predictor: zero output projection (standard for DiTs, stabler start)
    torch.nn.init.zeros_(model.proj_out.weight)
    torch.nn.init.zeros_(model.proj_out.bias)
    return model


def build_text_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=vocab_size, **TEXT_ENCODER_CONFIG)
    return UMT5EncoderModel(config)


def build_scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(**SCHEDULER_CONFIG)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------
# Prompt encoding and the training objective (kept identical to what WanPipeline does at inference)
# ----------------------------------------------------------------------------------------------------


def encode_prompts(text_encoder, tokenizer, prompts: list[str], device, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
    """Text embeddings exactly as ``WanPipeline._get_t5_prompt_embeds`` builds them: the encoder's last
    hidden state for the real tokens, zeros for the rest, padded to ``max_sequence_length``.

    The encoder runs on the batch's longest prompt rather than on all 512 positions: with the attention
    mask the real tokens' outputs are the same, and it is much cheaper in training.
    """
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    prompts = [prompt_clean(p) for p in prompts]
    enc = tokenizer(
        prompts,
        padding="longest",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    hidden = text_encoder(ids, mask).last_hidden_state
    hidden = hidden * mask[..., None].to(hidden.dtype)
    pad = max_sequence_length - hidden.shape[1]
    if pad > 0:
        hidden = torch.cat([hidden, hidden.new_zeros(hidden.shape[0], pad, hidden.shape[2])], dim=1)
    return hidden


def encode_prompts_compact(text_encoder, tokenizer, prompts: list[str], device,
                           max_sequence_length: int = MAX_SEQUENCE_LENGTH, min_slots: int = 0):
    """The same conditioning as :func:`encode_prompts`, in a compact form for training.

    WanPipeline pads every prompt with zero vectors to 512 positions. After the transformer's text
    projection all those zero rows are one identical key/value, so attending over ``n`` copies of it equals
    attending over fewer copies with ``log(n / copies)`` added to their logits. This returns the
    embeddings for the batch's longest prompt plus 1-8 zero slots (to a multiple of 8), ``[B, K, D]``,
    and that additive bias ``[B, 1, 1, K]`` (0 on real tokens); ``min_slots`` raises K to at least that
    (more zero slots; a fixed K keeps the shapes of a compiled transformer fixed across batches).
    :class:`training_attention` feeds the bias to the
    transformer's cross-attention. Same result as the 512-position form up to rounding (checked by
    ``tests/test_tiny_wan_recipe.py``), at a fraction of the cost when videos are short.
    """
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    prompts = [prompt_clean(p) for p in prompts]
    enc = tokenizer(prompts, padding="longest", max_length=max_sequence_length, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask
    # K: >= 1 zero slot, a multiple of 8, at least min_slots. The ids are padded to K (masked) before the
    # encoder, so the encoder's shapes are fixed too (training compiles it); masked positions change nothing in
    # the real tokens' states, and their own states are zeroed below, as the zero slots are.
    longest = ids.shape[1]
    k = max(longest + 8 - longest % 8, min_slots)
    ids = torch.nn.functional.pad(ids, (0, k - longest), value=tokenizer.pad_token_id)
    mask = torch.nn.functional.pad(mask, (0, k - longest), value=0)
    ids, mask = ids.to(device), mask.to(device)
    hidden = text_encoder(ids, mask).last_hidden_state
    hidden = hidden * mask[..., None].to(hidden.dtype)
    lengths = mask.sum(dim=1).float()  # real tokens per prompt
    slots = k - lengths  # zero slots in the compact form (>= 1)
    copies = (max_sequence_length - lengths).clamp_min(1.0)  # zero rows in the 512-position form
    pad_bias = torch.log(copies / slots)  # [B]
    bias = torch.where(mask == 0, pad_bias[:, None], torch.zeros_like(pad_bias)[:, None])
    return hidden, bias[:, None, None, :].float()


class _BiasedCrossAttention:
    """The stock ``WanAttnProcessor`` with an additive attention bias for the cross-attention (training only).

    The bias goes to ``scaled_dot_product_attention`` as its float ``attn_mask``. Under autocast the query is
    in the autocast dtype, so the bias is cast to it too (SDPA's CUDA kernels want a mask in the query's
    dtype; autocast would cast it anyway); without autocast it stays in the hidden states' dtype.
    """

    def __init__(self):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.inner = WanAttnProcessor()
        self.bias = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        bias = self.bias if attention_mask is None else attention_mask
        if bias is not None:
            dev = hidden_states.device.type
            if torch.is_autocast_enabled(dev):
                dtype = torch.get_autocast_dtype(dev)
            else:
                dtype = hidden_states.dtype
            bias = bias.to(device=hidden_states.device, dtype=dtype)
        return self.inner(attn, hidden_states, encoder_hidden_states, bias, rotary_emb)


class _SelfAttention:
    """The stock ``WanAttnProcessor``'s self-attention (training only), with the rotary embedding written as
    ``stack`` + ``flatten`` instead of two strided slice writes into an empty tensor. The values are the same
    (the test compares them in float64, gradients included; float32 on a CPU gave the same bits); what
    changes is the kernel ``torch.compile`` makes: with the stock form Inductor fused RMSNorm and RoPE into
    one kernel that took 12 ms of a 64-clip 33x256x256 training step on an H100 (3 ms a block, a fifth of
    the step; the step's eight cuDNN attention forwards took 3.5 ms together), and with this form the whole
    step went from 63.5 to 56.0 ms (``benchmarks/RESULTS.md``, seventeenth session)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attn.add_k_proj is not None or rotary_emb is None:
            raise ValueError("_SelfAttention is the transformer blocks' self-attention (attn1) only")
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        # diffusers' apply_rotary_emb: pairs (x[2i], x[2i+1]) rotated by the angle whose cos/sin sit at the
        # even/odd positions of the (repeat-interleaved) tables
        cos, sin = rotary_emb[0][..., 0::2], rotary_emb[1][..., 1::2]

        def rope(x):
            x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
            return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)

        q, k = rope(q), rope(k)
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                               attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class training_attention:
    """Context manager for training: ``with training_attention(transformer) as set_bias: set_bias(bias); ...``
    routes a bias from :func:`encode_prompts_compact` into every block's cross-attention
    (:class:`_BiasedCrossAttention`) and gives the self-attention the compile-friendly form of
    :class:`_SelfAttention`. The stock processors are restored on exit (so saved / evaluated models are
    untouched)."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.proc = _BiasedCrossAttention()
        self.self_proc = _SelfAttention()

    def __enter__(self):
        self.saved = [(blk.attn1.processor, blk.attn2.processor) for blk in self.transformer.blocks]
        for blk in self.transformer.blocks:
            blk.attn1.set_processor(self.self_proc)
            blk.attn2.set_processor(self.proc)
        return self._set

    def _set(self, bias):
        self.proc.bias = bias

    def __exit__(self, *exc):
        for blk, (p1, p2) in zip(self.transformer.blocks, self.saved):
            blk.attn1.set_processor(p1)
            blk.attn2.set_processor(p2)
        self.proc.bias = None
        return False


def compile_for_training(transformer, text_encoder) -> list:
    """``torch.compile`` in place what the recipe's transformer stage compiles: the transformer blocks and the
    text encoder. Measured on an H100: the blocks, 121 -> 60 ms per 64-clip step at 33x256x256 after ~20 s of
    compilation per bucket (``speed_probe``); the text encoder (its ids padded to a fixed slot count by
    :func:`encode_prompts_compact`, one shape), 73 -> 56 ms per 128-clip step at 17x128x128, whose step was bound
    by kernel launches (17th session). Returns the modules; ``m._compiled_call_impl = None`` undoes it."""
    modules = [*transformer.blocks, text_encoder]
    for m in modules:
        m.compile()
    return modules


def sample_sigmas(batch: int, generator: torch.Generator, device, shift: float = TRAIN_SHIFT) -> torch.Tensor:
    """Training noise levels: logit-normal (80%) / uniform (20%) u, then the flow shift
    ``s*u / (1 + (s-1)*u)`` the scheduler applies to its sigmas."""
    normal = torch.randn(batch, generator=generator, device=device)
    uniform = torch.rand(batch, generator=generator, device=device)
    pick = torch.rand(batch, generator=generator, device=device) < 0.8
    u = torch.where(pick, torch.sigmoid(normal), uniform).clamp(1e-4, 1 - 1e-4)
    return shift * u / (1 + (shift - 1) * u)


def flow_targets(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor):
    """Rectified flow as diffusers' flow schedulers define it: ``x_t = (1-s) x0 + s n``, the model sees
    ``t = 1000 s`` and predicts the velocity ``n - x0``."""
    s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    noisy = (1.0 - s) * latents + s * noise
    return noisy, sigmas * 1000.0, noise - latents


def normalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1, 1)
    return (latents - mean) / std


# ----------------------------------------------------------------------------------------------------
# Pipeline assembly and saving
# ----------------------------------------------------------------------------------------------------


def assemble_pipeline(tokenizer, text_encoder, vae, transformer):
    """A ``WanPipeline`` from in-memory parts (``tokenizer`` is a ``tokenizers.Tokenizer`` or a wrapped one)."""
    from diffusers import WanPipeline

    if not hasattr(tokenizer, "pad_token"):
        tokenizer = wrap_tokenizer(tokenizer)
    for m in (text_encoder, vae, transformer):
        m.eval()
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=build_scheduler(), transformer=transformer
    )


def save_pipeline(pipe, path: str | os.PathLike, max_total_mb: float = 40.0) -> dict:
    """``save_pretrained`` (safetensors only) with the tokenizer recorded as ``PreTrainedTokenizerFast``
    (transformers 4 and 5 both resolve that name). Returns ``{relative path: bytes}``."""
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    tok_cfg_file = path / "tokenizer" / "tokenizer_config.json"
    if tok_cfg_file.exists():
        cfg = json.loads(tok_cfg_file.read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg.pop("backend", None)
        tok_cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    sizes = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
    bad = [p for p in sizes if p.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if bad:
        raise RuntimeError(f"non-safetensors weights written: {bad}")
    total = sum(sizes.values()) / 2**20
    if total > max_total_mb:
        raise RuntimeError(f"pipeline folder is {total:.1f} MiB, over the {max_total_mb} MiB budget")
    return sizes
