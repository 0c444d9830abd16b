"""The "Sage Attention" ComfyUI node (V1 node API): MODEL in, patched clone out.

The node only builds an :class:`~sagevideo.config.AttentionConfig` from its widgets and installs
:class:`comfy_nodes.override.SageOverride` in the clone's ``model_options["transformer_options"]``; ComfyUI's
global attention function is never replaced. Nothing here imports ComfyUI, so the node runs against the
stand-in ModelPatcher of ``tests/test_comfy_node.py`` as well.
"""

from __future__ import annotations

import logging
import os

from sagevideo import methods, profiles
from sagevideo.config import AttentionConfig, Rule, method_config

from .override import SageOverride

__all__ = ["SageVideoAttention", "build_config", "detect_family", "count_blocks", "TEST_ALLOW_CPU_ENV"]

logger = logging.getLogger("sagevideo.comfy")

NODE_ID = "SageVideoAttention"
PROFILE_NONE = "(widgets)"
# For tests only: run the torch reference of the quantized arithmetic on CPU instead of falling back to
# ComfyUI's attention (slow; it exists so a CPU-only CI can check the override's numbers).
TEST_ALLOW_CPU_ENV = "SAGEVIDEO_COMFY_ALLOW_CPU"

# ComfyUI diffusion-model class name → sagevideo family
_FAMILIES = {"WanModel": "wan", "VaceWanModel": "wan", "WanModel_S2V": "wan", "HunyuanVideo": "hunyuan_video"}


def _modes() -> list[str]:
    names = list(methods.names())
    first = [m for m in ("auto", "int8-fp8", "int8-fp16", "dense") if m in names]
    return first + [m for m in names if m not in first]


def parse_blocks(text: str) -> tuple[int, ...] | None:
    """``"0, 1, -1"`` → ``(0, 1, -1)``; empty → None."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        out = tuple(int(x) for x in text.replace(";", ",").split(",") if x.strip())
    except ValueError:
        raise ValueError(
            f"high_precision_blocks must be comma-separated block indices like '0,1,-1', got {text!r}"
        ) from None
    return out or None


def build_config(mode: str = "auto", dense_warmup: float = 0.0, high_precision_blocks: str = "",
                 profile: str = PROFILE_NONE, config_json: str = "", family: str | None = None) -> AttentionConfig:
    """The schedule the node's widgets describe. ``config_json`` wins over ``profile``, which wins over the rest.

    Widgets: ``mode`` everywhere, except the first ``dense_warmup`` fraction of the steps (dense) and the blocks in
    ``high_precision_blocks`` (int8-fp16, or dense when ``mode`` is already int8-fp16). A sparse ``mode`` with
    both left empty gets the family's warm-up (``sagevideo.config.method_config``: quantized dense attention for
    the first 10-20 % of steps and block 0), because sparse attention from the first step spoils the layout.
    """
    if (config_json or "").strip():
        return AttentionConfig.from_json(config_json)
    if profile and profile != PROFILE_NONE:
        return profiles.load(profile)
    if not 0.0 <= float(dense_warmup) <= 1.0:
        raise ValueError(f"dense_warmup is a fraction of the steps in [0, 1], got {dense_warmup}")
    blocks = parse_blocks(high_precision_blocks)
    if methods.get(mode).needs_warmup and dense_warmup == 0 and blocks is None:
        return method_config(family, mode)
    rules = []
    if dense_warmup > 0:
        rules.append(Rule("dense", steps=(0.0, float(dense_warmup))))
    if blocks is not None and mode != "dense":
        rules.append(Rule("dense" if mode == "int8-fp16" else "int8-fp16", layers=blocks))
    return AttentionConfig(default=mode, rules=tuple(rules))


def wan_grid_wrapper(patch_size, previous=None):
    """A ComfyUI ``model_function_wrapper`` that puts Wan's post-patch latent grid into ``transformer_options``
    (``grid_sizes``) when the model does not (ComfyUI before late 2025 does not), so the grid-based (sparse)
    methods see it. The grid is the latent ``(T, H, W)`` divided by the patch size, rounded up (ComfyUI pads the
    latent to a multiple of the patch). A wrapper already on the model (``previous``) is called with the same
    arguments; an existing ``grid_sizes`` is left as it is."""
    pt, ph, pw = (int(x) for x in patch_size)

    def wrapper(apply_model, args):
        x, c = args["input"], args.get("c", {})
        options = c.get("transformer_options", {})
        if x.dim() == 5 and "grid_sizes" not in options:
            t, h, w = x.shape[-3:]
            grid = (-(-t // pt), -(-h // ph), -(-w // pw))
            c = dict(c, transformer_options=dict(options, grid_sizes=grid))
            args = dict(args, c=c)
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    wrapper.sagevideo_grid = True
    return wrapper


def _diffusion_model(model):
    getter = getattr(model, "get_model_object", None)
    if getter is not None:
        try:
            return getter("diffusion_model")
        except Exception:  # a stand-in or an unusual model: detection is best effort
            pass
    return getattr(getattr(model, "model", None), "diffusion_model", None)


def detect_family(model) -> str | None:
    dm = _diffusion_model(model)
    return None if dm is None else _FAMILIES.get(type(dm).__name__)


def count_blocks(model) -> int | None:
    """Number of transformer blocks (the layers a schedule names), when the model shows them."""
    dm = _diffusion_model(model)
    if dm is None:
        return None
    if hasattr(dm, "double_blocks") and hasattr(dm, "single_blocks"):
        return len(dm.double_blocks) + len(dm.single_blocks)
    blocks = getattr(dm, "blocks", None)
    return None if blocks is None else len(blocks)


class SageVideoAttention:
    """Scheduled quantized attention for video DiTs (Wan, HunyuanVideo) through ComfyUI's attention override."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The video diffusion model to patch. The output is a patched clone; "
                                               "this input is not modified."}),
                "mode": (_modes(), {"default": "auto", "tooltip":
                    "Attention method for self-attention. auto: INT8 QK + FP8 PV on Ada/Hopper (sm89+), "
                    "INT8 + FP16 PV on Ampere, ComfyUI's attention elsewhere. int8-fp8 / int8-fp16: force one. "
                    "dense: ComfyUI's own attention (for A/B runs). sparse-spatiotemporal / sparse-semantic: "
                    "block-sparse quantized attention (Sparse VideoGen 1 / 2; Wan only - models whose latent grid "
                    "is unknown here, such as HunyuanVideo, run them as auto). Without a supported NVIDIA GPU every "
                    "mode uses ComfyUI's attention."}),
                "dense_warmup": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                    "Fraction of the sampling steps, from the start, that use ComfyUI's full-precision attention "
                    "(e.g. 0.2 = first 20% of steps). 0 = quantized from the first step; for the sparse modes, 0 "
                    "with no high_precision_blocks = the model family's warm-up (first 10-20% of steps and block 0 "
                    "quantized dense)."}),
                "high_precision_blocks": ("STRING", {"default": "", "tooltip":
                    "Comma-separated transformer block indices kept at higher precision (int8-fp16; dense when "
                    "mode is int8-fp16). Negative indices count from the end, e.g. '0,1,-1'. Empty = none."}),
            },
            "optional": {
                "profile": ([PROFILE_NONE] + profiles.names(), {"default": PROFILE_NONE, "tooltip":
                    "A named sagevideo schedule (assets/profiles). When set, it replaces mode, dense_warmup and "
                    "high_precision_blocks."}),
                "config_json": ("STRING", {"default": "", "multiline": True, "tooltip":
                    "A full sagevideo AttentionConfig as JSON (what sagevideo.calibrate writes). When not empty it "
                    "replaces every other option."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The input model with sagevideo attention installed as its attention override.",)
    FUNCTION = "patch"
    CATEGORY = "advanced/model_patches"
    DESCRIPTION = (
        "Runs the model's self-attention with sagevideo's quantized attention (INT8 QK, FP8/FP16 PV), chosen per "
        "step and block by a schedule. Uses ComfyUI's attention override; cross-attention, masks it cannot "
        "express, calls marked low-precision-unsafe and machines without a supported GPU use ComfyUI's attention "
        "(or the override already on the model)."
    )

    def patch(self, model, mode="auto", dense_warmup=0.0, high_precision_blocks="", profile=PROFILE_NONE,
              config_json=""):
        family = detect_family(model)
        config = build_config(mode, dense_warmup, high_precision_blocks, profile, config_json, family)
        if config.family is not None and family is not None and config.family != family:
            raise ValueError(f"this attention config was written for {config.family!r} but the model is {family!r}")
        if family is None:
            logger.warning("sagevideo: model family not recognised; the schedule still applies to self-attention")
        elif family == "hunyuan_video":
            logger.info("sagevideo: HunyuanVideo shows no latent grid to the attention here; the sparse modes run "
                        "dense quantized attention on it (say so once), the other modes need no grid")
        patched = model.clone()
        options = patched.model_options.setdefault("transformer_options", {})
        previous = options.get("optimized_attention_override")
        override = SageOverride(
            config, previous, num_layers=count_blocks(model), family=family,
            allow_cpu=os.environ.get(TEST_ALLOW_CPU_ENV, "") == "1",
        )
        options["optimized_attention_override"] = override
        dm = _diffusion_model(model)
        if family == "wan" and getattr(dm, "patch_size", None) is not None:
            previous_wrapper = patched.model_options.get("model_function_wrapper")
            if not getattr(previous_wrapper, "sagevideo_grid", False):
                patched.model_options["model_function_wrapper"] = wan_grid_wrapper(dm.patch_size, previous_wrapper)
        logger.info("sagevideo: attention schedule %s", config.to_json(indent=None))
        return (patched,)


NODE_CLASS_MAPPINGS = {NODE_ID: SageVideoAttention}
NODE_DISPLAY_NAME_MAPPINGS = {NODE_ID: "Sage Attention"}
