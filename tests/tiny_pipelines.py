"""Tiny random-weight pipelines of every model family sagevideo patches, built offline from configs.

Reusable by the patching tests, the CLI tests and the ComfyUI tests. Everything is deterministic (each
component is built right after ``torch.manual_seed``), runs in float32 on CPU, is put in ``eval()`` mode
(config-built text encoders have dropout on) and is small enough that a whole pipeline call takes well
under a second on two CPU cores.

Tokenizers are trained in-process with ``tokenizers`` (a Unigram model over a tiny corpus) and wrapped in
``transformers.PreTrainedTokenizerFast``: no file is downloaded.

Sizes are chosen so that the video self-attention sequence is longer than one 64-key tile of the quantized
reference (so its tiled online softmax is exercised), head_dim is 32, and the DiT has at least three layers
(so a schedule can treat layers 0–1 differently from the rest).

Builders:

* :func:`wan_pipeline` — ``WanPipeline`` (T2V); ``two_experts=True`` gives a Wan 2.2-style pipeline with
  ``transformer_2`` and ``boundary_ratio``.
* :func:`wan_i2v_pipeline` — ``WanImageToVideoPipeline`` (Wan 2.1 I2V: CLIP image encoder, image keys in
  the cross-attention).
* :func:`hunyuan_video_pipeline` — ``HunyuanVideoPipeline`` (Llama + CLIP text encoders).
* :func:`hunyuan_video15_pipeline` — ``HunyuanVideo15Pipeline`` (Qwen2.5-VL text model + ByT5).
* :func:`cogvideox_pipeline` — ``CogVideoXPipeline`` (T5; RoPE on, so head_dim ≥ 16 matters).
* :func:`call_kwargs` / :func:`run` — the arguments every test passes to a family's pipeline (seeded
  generator, 4 steps, classifier-free guidance) and a ``no_grad`` run returning the frames.

Also here, for the tests' expected results: :class:`ReferenceAttention` (runs a pipeline with an explicit
attention mode per (step, layer, head) computed by the torch reference, without any sagevideo patching code)
and :class:`RecordContexts` (a temporary method that records the context each call receives).
"""

from __future__ import annotations

import functools

import torch

# Video sizes in pixels. Wan/HunyuanVideo VAEs compress 4× in time and 8× in space; the DiT patches 2×2.
# 9 frames → 3 latent frames; 64×96 → 8×12 latent → 4×6 tokens per frame → 72 video tokens.
NUM_FRAMES = 9
HEIGHT = 64
WIDTH = 96
NUM_STEPS = 4
TEXT_LEN = 16  # max_sequence_length for the text encoders
HEAD_DIM = 32
HEADS = 2
LAYERS = 3

_CORPUS = [
    "a cat walks on the grass in the garden",
    "a red car drives along a mountain road at sunset",
    "two dogs play with a ball on the beach",
    "a bird flies over the sea while waves crash on rocks",
    "a person rides a bicycle through a busy city street",
    "snow falls slowly on a quiet village at night",
    "a chef cooks pasta in a small kitchen",
    "a boat sails across a calm lake under a blue sky",
]


@functools.lru_cache(maxsize=None)
def _tokenizer_object(vocab_size: int = 128):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(model_max_length: int = TEXT_LEN, *, bos: bool = False):
    """A trained Unigram tokenizer (vocab 128) as a ``PreTrainedTokenizerFast`` with pad/eos/unk tokens."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_tokenizer_object())
    # append </s> like T5 does, so add_special_tokens=True has an effect
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    kwargs = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=model_max_length)
    if bos:
        kwargs["bos_token"] = "</s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def _eval(pipe):
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _t5_encoder(cls_name: str = "UMT5EncoderModel", d_model: int = 32, vocab_size: int = 128):
    import transformers

    cfg = transformers.T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
    )
    if cls_name == "UMT5EncoderModel":
        cfg = transformers.UMT5Config(**{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")})
    return getattr(transformers, cls_name)(cfg)


# ----------------------------------------------------------------------------------------------------------
# Wan
# ----------------------------------------------------------------------------------------------------------


def wan_transformer(seed: int = 0, *, layers: int = LAYERS, image_dim: int | None = None):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=16 if image_dim is None else 36,
        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim,
        added_kv_proj_dim=None if image_dim is None else HEADS * HEAD_DIM,
    ).eval()


def _wan_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]).eval()


def _flow_scheduler(shift: float = 3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift)


def wan_pipeline(*, two_experts: bool = False, layers: int = LAYERS):
    """``WanPipeline`` T2V; with ``two_experts`` a Wan 2.2-style pair (``transformer_2``, boundary 0.5)."""
    from diffusers import WanPipeline

    torch.manual_seed(0)
    text_encoder = _t5_encoder("UMT5EncoderModel")
    pipe = WanPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=text_encoder,
        vae=_wan_vae(),
        scheduler=_flow_scheduler(),
        transformer=wan_transformer(0, layers=layers),
        transformer_2=wan_transformer(1, layers=layers) if two_experts else None,
        boundary_ratio=0.5 if two_experts else None,
    )
    return _eval(pipe)


def wan_i2v_pipeline(layers: int = LAYERS):
    """``WanImageToVideoPipeline`` (Wan 2.1 I2V): CLIP vision encoder, 36-channel DiT with image keys."""
    import transformers
    from diffusers import WanImageToVideoPipeline

    torch.manual_seed(0)
    vision_cfg = transformers.CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        intermediate_size=32, patch_size=8,
    )
    image_encoder = transformers.CLIPVisionModelWithProjection(vision_cfg)
    image_processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)(
        crop_size=32, size={"shortest_edge": 32}, do_center_crop=True, do_normalize=True, do_resize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    torch.manual_seed(0)
    pipe = WanImageToVideoPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=_t5_encoder("UMT5EncoderModel"),
        vae=_wan_vae(),
        scheduler=_flow_scheduler(),
        transformer=wan_transformer(0, layers=layers, image_dim=32),
        image_encoder=image_encoder,
        image_processor=image_processor,
    )
    return _eval(pipe)


# ----------------------------------------------------------------------------------------------------------
# HunyuanVideo
# ----------------------------------------------------------------------------------------------------------

# no system prompt to crop: the Llama encoder sees the prompt itself
HUNYUAN_PROMPT_TEMPLATE = {"template": "{}", "crop_start": 0}


def hunyuan_video_transformer(seed: int = 0, *, dual_layers: int = 1, single_layers: int = LAYERS - 1):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=dual_layers,
        num_single_layers=single_layers, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(8, 12, 12),
    ).eval()


def hunyuan_video_pipeline():
    """``HunyuanVideoPipeline``: Llama + CLIP text encoders; one dual-stream and two single-stream blocks."""
    import transformers
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoPipeline

    torch.manual_seed(0)
    llama = transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    ))
    torch.manual_seed(0)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=1,
    ))
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4,
    ).eval()
    pipe = HunyuanVideoPipeline(
        text_encoder=llama, tokenizer=tiny_tokenizer(), transformer=hunyuan_video_transformer(), vae=vae,
        scheduler=_flow_scheduler(7.0), text_encoder_2=clip, tokenizer_2=tiny_tokenizer(77),
    )
    return _eval(pipe)


def hunyuan_video15_pipeline():
    """``HunyuanVideo15Pipeline``: Qwen2.5-VL text model (chat template), ByT5 glyph encoder, guider CFG.

    The pipeline's text lengths are instance attributes and are shrunk here: MLLM 16 tokens (no system prompt
    cropped), ByT5 8, image 4 (zeros for T2V, masked out by the transformer).
    """
    import transformers
    from diffusers import (AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, HunyuanVideo15Pipeline,
                           HunyuanVideo15Transformer3DModel)

    torch.manual_seed(0)
    qwen = transformers.Qwen2_5_VLTextModel(transformers.Qwen2_5_VLTextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=None, eos_token_id=1,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    ))
    torch.manual_seed(0)
    byt5 = _t5_encoder("T5EncoderModel", vocab_size=384)  # ByT5: 256 bytes + 3 specials + 125 extra ids
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1, spatial_compression_ratio=16,
        temporal_compression_ratio=4,
    ).eval()
    torch.manual_seed(0)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=LAYERS,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=32, text_embed_2_dim=32,
        image_embed_dim=16, rope_axes_dim=(8, 12, 12), target_size=64, task_type="t2v",
    ).eval()
    tokenizer = tiny_tokenizer(64)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    pipe = HunyuanVideo15Pipeline(
        text_encoder=qwen, tokenizer=tokenizer, transformer=transformer, vae=vae, scheduler=_flow_scheduler(7.0),
        text_encoder_2=byt5, tokenizer_2=transformers.ByT5Tokenizer(), guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    pipe.system_message = "describe"
    pipe.prompt_template_encode_start_idx = 0
    pipe.tokenizer_max_length = TEXT_LEN
    pipe.tokenizer_2_max_length = 8
    pipe.vision_num_semantic_tokens = 4
    return _eval(pipe)


# ----------------------------------------------------------------------------------------------------------
# CogVideoX
# ----------------------------------------------------------------------------------------------------------


def cogvideox_transformer(seed: int = 0, *, layers: int = LAYERS, rope: bool = True):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=32, num_layers=layers, sample_width=WIDTH // 8, sample_height=HEIGHT // 8,
        sample_frames=NUM_FRAMES, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT_LEN,
        use_rotary_positional_embeddings=rope, use_learned_positional_embeddings=False,
    ).eval()


def cogvideox_pipeline(*, layers: int = LAYERS, rope: bool = True):
    """``CogVideoXPipeline`` (T5 text encoder, DDIM scheduler, classifier-free guidance batched)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    ).eval()
    torch.manual_seed(0)
    pipe = CogVideoXPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=_t5_encoder("T5EncoderModel"),
        vae=vae,
        transformer=cogvideox_transformer(layers=layers, rope=rope),
        scheduler=CogVideoXDDIMScheduler(),
    )
    return _eval(pipe)


# ----------------------------------------------------------------------------------------------------------
# Call arguments
# ----------------------------------------------------------------------------------------------------------


def call_kwargs(pipe, *, prompt="a cat walks on the grass", seed=0, steps=NUM_STEPS, output_type="latent",
                **overrides):
    """Arguments for a seeded tiny run of ``pipe`` (any family); ``overrides`` replace or add any of them.

    Wan and CogVideoX run classifier-free guidance with the negative prompt "blurry" (Wan: two transformer
    calls per step; CogVideoX: one call with batch 2); HunyuanVideo runs its distilled guidance (one call per
    step) unless ``true_cfg_scale`` and ``negative_prompt`` are given.
    """
    name = type(pipe).__name__
    kwargs = dict(
        prompt=prompt, num_inference_steps=steps, height=HEIGHT, width=WIDTH, num_frames=NUM_FRAMES,
        generator=torch.Generator().manual_seed(seed), output_type=output_type,
    )
    if name.startswith("Wan"):
        kwargs.update(negative_prompt="blurry", guidance_scale=5.0, max_sequence_length=TEXT_LEN)
        if name == "WanImageToVideoPipeline":
            from PIL import Image

            kwargs["image"] = Image.new("RGB", (WIDTH, HEIGHT), (120, 60, 200))
    elif name.startswith("HunyuanVideoPipeline"):
        kwargs.update(prompt_template=HUNYUAN_PROMPT_TEMPLATE, max_sequence_length=TEXT_LEN, guidance_scale=6.0)
    elif name.startswith("HunyuanVideo15"):
        kwargs.update(negative_prompt="blurry")
    elif name.startswith("CogVideoX"):
        kwargs.update(negative_prompt="blurry", guidance_scale=6.0, max_sequence_length=TEXT_LEN)
    kwargs.update(overrides)
    if isinstance(kwargs["prompt"], list) and isinstance(kwargs.get("negative_prompt"), str):
        kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(kwargs["prompt"])
    return kwargs


def run(pipe, **kwargs):
    """Run ``pipe`` with :func:`call_kwargs` (plus ``kwargs``) under ``torch.no_grad`` and return the frames."""
    with torch.no_grad():
        return pipe(**call_kwargs(pipe, **kwargs)).frames


# ----------------------------------------------------------------------------------------------------------
# An independent reference: run a pipeline with an explicit attention mode per (step, layer, head)
# ----------------------------------------------------------------------------------------------------------


class ReferenceAttention:
    """Run a pipeline with attention chosen by ``mode(step, layer)``, computed directly in plain torch.

    This is how the tests build the *expected* output of a patched pipeline without using any of sagevideo's
    patching, schedule or step-tracking code:

    * the DiT self-attention modules are listed by the test (``modules``: ``{transformer: [module, ...]}``);
      test-side forward pre-hooks remember which one is running;
    * the step is counted by wrapping ``scheduler.step`` of the pipeline (``scheduler=``) for the duration;
    * the attention function the model calls (diffusers' ``dispatch_attention_fn`` in the model's module for
      Wan and HunyuanVideo, ``F.scaled_dot_product_attention`` inside ``attention_processor`` for CogVideoX)
      is swapped, for the duration of the ``with`` block, for one that — inside a listed module only —
      computes ``mode(step, layer)``: ``"dense"`` calls the model's original function unchanged, a quantized
      mode calls ``sagevideo.reference.quant_attention_ref`` (the torch reference of the kernel's
      arithmetic). ``mode`` may return one mode per head.

    The model's mask becomes a key-padding mask the way the model defines it: (B, 1, 1, N) → (B, N); a full
    (B, 1, S, S) mask that is an outer product of a token mask → its first row (a video token, always valid).
    """

    def __init__(self, kind: str, modules: list, mode, *, scheduler, smooth_v: bool = False, capture: bool = False):
        self.kind = kind  # "dispatch:<diffusers module path>" or "sdpa"
        self.modules = list(modules)
        self.mode = mode
        self.scheduler = scheduler
        self.smooth_v = smooth_v
        self.capture = capture
        self.step = 0
        self.layer = None
        self.calls = []  # (step, layer, modes) of every intercepted call
        self.captured = []  # with capture=True: (step, layer, q, k, v, key_padding_mask, out), BHSD

    def _modes(self, heads: int):
        m = self.mode(self.step, self.layer)
        return (m,) * heads if isinstance(m, str) else tuple(m)

    def _reference(self, q, k, v, kpm, modes, dense):
        """q, k, v BHSD; returns BHSD."""
        from sagevideo.reference import quant_attention_ref

        def one(mode, q, k, v):
            if mode == "dense":
                return dense(q, k, v)
            return quant_attention_ref(q, k, v, precision=mode, key_padding_mask=kpm, smooth_v=self.smooth_v)[0]

        if len(set(modes)) == 1:
            out = one(modes[0], q, k, v)
        else:
            out = torch.cat([one(m, q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1]) for h, m in enumerate(modes)], dim=1)
        if self.capture:
            self.captured.append((self.step, self.layer, q, k, v, kpm, out))
        return out

    @staticmethod
    def _key_padding(mask, batch, kv_len):
        if mask is None:
            return None
        if mask.dtype != torch.bool:
            raise AssertionError(f"reference: unexpected non-bool mask {mask.dtype}")
        if mask.shape[-2] == 1:
            return mask.reshape(batch, kv_len)
        return mask[:, 0, 0, :]

    def __enter__(self):
        import importlib

        import pytest

        self._mp = pytest.MonkeyPatch()
        self._hooks = []
        self.step = 0
        scheduler_step = self.scheduler.step

        def counting_step(*args, **kwargs):
            out = scheduler_step(*args, **kwargs)
            self.step += 1
            return out

        self._mp.setattr(self.scheduler, "step", counting_step)
        for i, m in enumerate(self.modules):
            self._hooks.append(m.register_forward_pre_hook(lambda mod, args, i=i: setattr(self, "layer", i)))
            self._hooks.append(m.register_forward_hook(lambda mod, a, o: setattr(self, "layer", None), always_call=True))
        if self.kind.startswith("dispatch:"):
            module = importlib.import_module(self.kind.split(":", 1)[1])
            original = module.dispatch_attention_fn

            def dispatch(query, key, value, attn_mask=None, *args, **kwargs):
                if self.layer is None:
                    return original(query, key, value, attn_mask, *args, **kwargs)
                modes = self._modes(query.shape[2])
                self.calls.append((self.step, self.layer, modes))
                kpm = self._key_padding(attn_mask, query.shape[0], key.shape[1])

                def dense(q, k, v):
                    return original(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask, *args, **kwargs).transpose(1, 2)

                q, k, v = (t.transpose(1, 2) for t in (query, key, value))
                return self._reference(q, k, v, kpm, modes, dense).transpose(1, 2)

            self._mp.setattr(module, "dispatch_attention_fn", dispatch)
        else:
            import types

            import torch.nn.functional as F
            from diffusers.models import attention_processor

            original = F.scaled_dot_product_attention

            def sdpa(query, key, value, attn_mask=None, *args, **kwargs):
                if self.layer is None:
                    return original(query, key, value, attn_mask, *args, **kwargs)
                modes = self._modes(query.shape[1])
                self.calls.append((self.step, self.layer, modes))
                kpm = self._key_padding(attn_mask, query.shape[0], key.shape[2])
                return self._reference(query, key, value, kpm, modes,
                                       lambda q, k, v: original(q, k, v, attn_mask, *args, **kwargs))

            shim = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
            shim.scaled_dot_product_attention = sdpa
            self._mp.setattr(attention_processor, "F", shim)
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._mp.undo()


class RecordContexts:
    """Register a temporary attention method ``"test-record"`` that runs dense and keeps every context it saw.

    ``with RecordContexts() as seen: ...`` then patch with ``AttentionConfig.uniform("test-record")``; ``seen``
    is the list of :class:`sagevideo.context.AttentionContext` in call order.
    """

    NAME = "test-record"

    def __enter__(self):
        from sagevideo import methods

        seen = self.seen = []

        def fn(q, k, v, ctx):
            seen.append(ctx)
            return methods.get("dense").fn(q, k, v, ctx)

        methods.register(methods.Method(self.NAME, fn, cost=1.0, description="dense, recording contexts (test)"))
        return seen

    def __exit__(self, *exc):
        from sagevideo import methods

        methods.unregister(self.NAME)


def reference_run(pipe, kind: str, modules: list, mode, *, smooth_v: bool = False, capture: bool = False, **kwargs):
    """Run ``pipe`` (:func:`run` arguments in ``kwargs``) under :class:`ReferenceAttention`; returns
    ``(frames, reference)`` — the reference holds the intercepted calls and, with ``capture``, the tensors."""
    with ReferenceAttention(kind, modules, mode, scheduler=pipe.scheduler, smooth_v=smooth_v, capture=capture) as ref:
        out = run(pipe, **kwargs)
    return out, ref


# The schedule the patching tests use (the example, with the dense range widened to half of the 4 steps
# so that it covers two of them): steps in [0, 50 %) dense; layers 0–1 int8-fp16; everything else int8-fp8.
def example_schedule():
    from sagevideo.config import AttentionConfig, Rule

    return AttentionConfig(
        default="int8-fp8", rules=(Rule("dense", steps=(0.0, 0.5)), Rule("int8-fp16", layers=(0, 1)))
    )


def example_mode(step: int, layer: int) -> str:
    """:func:`example_schedule` written out by hand, for :class:`ReferenceAttention`."""
    if step < NUM_STEPS // 2:
        return "dense"
    return "int8-fp16" if layer in (0, 1) else "int8-fp8"
