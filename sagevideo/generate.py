"""Loading a video pipeline and running it once: what ``sagevideo generate`` does, as a Python API.

::

    from sagevideo.generate import load_pipeline, generate

    pipe, source = load_pipeline("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")    # or a local folder, or None
    result = generate(pipe, "a cat walks on the grass", attention="int8-fp8", steps=30, seed=0)
    result.frames        # (T, H, W, 3) uint8, decoded frames straight from the VAE (never re-encoded)
    result.seconds       # wall time of the pipeline call (text encoding + denoising + VAE decode)

* :func:`load_pipeline` — ``None`` = the bundled ``assets/tiny-wan`` model; when that folder holds no trained
  model yet, a tiny Wan pipeline with random weights (fixed seed) is built in memory instead and
  :attr:`PipelineSource.notice` says so (its output is noise). Anything else is a local folder or a Hugging Face
  id loaded with diffusers ``DiffusionPipeline.from_pretrained``; failures become :class:`InputError` with one
  line naming what to check.
* :func:`check_request` — the checks the CLI runs *before* spending time on a model: supported pipeline class,
  frame count / height / width the model can take (derived from the pipeline's VAE scale factors and the
  transformer's patch size; the error names the nearest valid values), GPU-only attention methods on CPU.
* :func:`generate` — runs the pipeline (unpatched for ``dense``, else under :func:`sagevideo.patch_pipeline`),
  with the pipeline's own tqdm progress bar (one tick per denoising step).

Every user-facing problem raises :class:`InputError` (a ``ValueError``); the CLI prints its message and exits
with status 2.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "InputError",
    "PipelineSource",
    "GenerationResult",
    "SizeRules",
    "QUANTIZED_ON_CPU_OK",
    "resolve_device",
    "resolve_dtype",
    "load_pipeline",
    "random_tiny_wan",
    "pipeline_family",
    "size_rules",
    "check_size",
    "call_defaults",
    "build_config",
    "gpu_only_methods",
    "check_attention_device",
    "check_request",
    "generate",
    "environment",
]

#: Methods that run on any device at full speed. Every other method (the quantized ones, later the sparse ones)
#: needs a CUDA GPU to be faster than dense: on CPU they run a torch reference of the same arithmetic.
QUANTIZED_ON_CPU_OK = ("dense", "auto")

RANDOM_MODEL_NOTICE = (
    "NOTICE: the bundled tiny-wan model is missing (assets/tiny-wan has no model_index.json), so this "
    "run uses a tiny Wan pipeline with RANDOM weights (seed 0). The output is noise from an untrained model; "
    "it only shows that the pipeline, attention patching and video writing work. Pass --model to use a real "
    "model."
)


class InputError(ValueError):
    """A problem with what the user asked for (model, size, attention, output path); the message says the fix."""


@dataclasses.dataclass
class PipelineSource:
    """Where a pipeline came from: ``kind`` is ``"bundled"``, ``"random"``, ``"local"`` or ``"hub"``."""

    kind: str
    name: str
    notice: str | None = None
    defaults: dict = dataclasses.field(default_factory=dict)  # generation defaults of this model (bundled only)


@dataclasses.dataclass
class GenerationResult:
    """One pipeline run.

    Attributes:
        frames: ``(T, H, W, 3)`` uint8 decoded frames (metrics must be computed on these, not on a video file).
        seconds: wall time of the pipeline call (CUDA-synchronised), text encoding and VAE decode included.
        settings: the call settings actually used (prompt, steps, frames, height, width, seed, guidance, ...).
        attention: ``"dense (unpatched)"`` or the schedule's JSON dict.
        observed: ``{model name: {method label: number of (step, layer) sites}}`` from the patch handle.
        guard_events: how many calls the non-finite guard recomputed dense.
        sparse: ``{model name: {"calls", "mean_density", "heads"}}`` from ``handle.sparse_report()`` (the
            per-layer detail left out); empty when no sparse method ran.
    """

    frames: np.ndarray
    seconds: float
    settings: dict
    attention: Any
    observed: dict = dataclasses.field(default_factory=dict)
    guard_events: int = 0
    sparse: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SizeRules:
    """Sizes a pipeline can take: ``frames = 1 + k * frame_step`` and height/width multiples of ``*_multiple``."""

    frame_step: int
    height_multiple: int
    width_multiple: int


# ------------------------------------------------------------------------------------------------ device


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None → CUDA when available, else CPU. Asking for CUDA without one is an :class:`InputError`."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"invalid device {device!r} ({exc}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device} asked, but this machine has no CUDA GPU; use --device cpu (or auto)")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``"auto"``/None → bfloat16 on CUDA, float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    import diffusers

    major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (0, 42) else {"torch_dtype": dtype}


# ------------------------------------------------------------------------------------------------ loading


def random_tiny_wan(seed: int = 0):
    """The bundled model's architecture with random weights (deterministic for ``seed``), as a ``WanPipeline``.

    The tokenizer is trained on the bundled model's caption distribution (a few seconds). Used only while
    ``assets/tiny-wan`` holds no trained model: its videos are noise.
    """
    from sagevideo.recipes.tiny_wan import model as tw

    tok = tw.train_tokenizer()
    torch.manual_seed(seed)
    vae = tw.build_vae()
    torch.manual_seed(seed + 1)
    transformer = tw.build_transformer()
    # the recipe starts training from a zero output projection (a DiT convention), which makes the untrained
    # transformer's output independent of its input: attention would have no effect at all on the video, and a
    # comparison of attention methods would always find them identical. Random weights there instead.
    torch.nn.init.normal_(transformer.proj_out.weight, std=0.02)
    torch.nn.init.zeros_(transformer.proj_out.bias)
    torch.manual_seed(seed + 2)
    text_encoder = tw.build_text_encoder(tok.get_vocab_size())
    return tw.assemble_pipeline(tok, text_encoder, vae, transformer)


def _bundled_defaults() -> dict:
    from sagevideo.recipes import tiny_wan

    return {
        "steps": tiny_wan.DEFAULT_STEPS, "frames": tiny_wan.DEFAULT_FRAMES, "height": tiny_wan.DEFAULT_HEIGHT,
        "width": tiny_wan.DEFAULT_WIDTH, "guidance": tiny_wan.DEFAULT_GUIDANCE, "fps": tiny_wan.DEFAULT_FPS,
    }


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def _looks_like_path(name: str) -> bool:
    """Not shaped like a Hugging Face id (``name`` or ``owner/name``): treat it as a local path."""
    return not _HUB_ID.match(name)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_pipeline(
    model: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    cpu_offload: bool = False,
    log: Callable[[str], None] | None = None,
):
    """Load a diffusers video pipeline; returns ``(pipe, PipelineSource)``.

    Args:
        model: None = the bundled tiny-wan (random-weight fallback when its folder holds no model); a local pipeline
            folder (with ``model_index.json``); or a Hugging Face id (``"Wan-AI/Wan2.1-T2V-1.3B-Diffusers"``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        dtype: ``"auto"`` (bf16 on CUDA, fp32 on CPU), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        cpu_offload: ``enable_model_cpu_offload()`` instead of moving the whole pipeline to the GPU.
        log: called with progress messages (default: silent).

    Raises:
        InputError: the folder does not exist or is not a diffusers pipeline, the id cannot be resolved
            (unknown, gated, offline), or loading failed; the message is one line plus what to check.
    """
    log = log or (lambda _msg: None)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if model is None:
        from sagevideo.recipes import tiny_wan

        path = Path(tiny_wan.asset_path())
        if (path / "model_index.json").is_file():
            log(f"loading the bundled model from {path}")
            pipe = _from_pretrained(str(path), dt, local_only=True)
            source = PipelineSource("bundled", f"bundled tiny-wan ({path})", defaults=_bundled_defaults())
        else:
            log("building a random-weight tiny Wan pipeline (the bundled model folder holds no model)")
            pipe = random_tiny_wan(0)
            if dt != torch.float32:
                pipe.to(dtype=dt)
            source = PipelineSource("random", "tiny-wan (random weights, untrained)", notice=RANDOM_MODEL_NOTICE,
                                    defaults=_bundled_defaults())
    else:
        name = os.fspath(model)
        expanded = os.path.expanduser(name)
        if os.path.exists(expanded):
            if not os.path.isdir(expanded):
                raise InputError(f"--model {name}: is a file; give a diffusers pipeline folder (with model_index.json) "
                                 "or a Hugging Face id")
            if not os.path.isfile(os.path.join(expanded, "model_index.json")):
                raise InputError(
                    f"--model {name}: folder has no model_index.json, so it is not a diffusers pipeline folder; "
                    "save one with pipe.save_pretrained(folder) or give a Hugging Face id"
                )
            log(f"loading {name}")
            pipe = _from_pretrained(expanded, dt, local_only=True, shown=name)
            source = PipelineSource("local", name)
        elif _looks_like_path(name):
            raise InputError(f"--model {name}: no such folder; check the path (a local diffusers pipeline folder "
                             "with model_index.json) or give a Hugging Face id like owner/name")
        else:
            log(f"loading {name} from the Hugging Face Hub (or its local cache)")
            pipe = _from_pretrained(name, dt, local_only=False, shown=name)
            source = PipelineSource("hub", name)
    if not hasattr(pipe, "set_progress_bar_config") or not callable(pipe):
        raise InputError(f"--model {source.name}: {type(pipe).__name__} is not a diffusers pipeline")
    for component in getattr(pipe, "components", {}).values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    if cpu_offload and dev.type == "cuda":
        pipe.enable_model_cpu_offload(device=dev)
    else:
        pipe.to(dev)
    return pipe, source


def _from_pretrained(name: str, dtype: torch.dtype, *, local_only: bool, shown: str | None = None):
    from diffusers import DiffusionPipeline

    shown = shown or name
    try:
        return DiffusionPipeline.from_pretrained(name, local_files_only=local_only, **_dtype_kwarg(dtype))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # huggingface_hub / diffusers raise many types here; the CLI wants one line
        if local_only:
            hint = ("check that the folder was written by save_pretrained of a diffusers pipeline and that every "
                    "component's files are there")
        else:
            hint = ("check the spelling of the id, your network connection (or HF_HUB_OFFLINE / the local cache), "
                    "and for gated models that you accepted the licence and ran `hf auth login`")
        raise InputError(f"--model {shown}: could not load the pipeline ({_one_line(exc)}); {hint}") from exc


# ------------------------------------------------------------------------------------------------ checks


def pipeline_family(pipe) -> str:
    """The sagevideo model family of ``pipe`` (``"wan"``, ...); :class:`InputError` listing the supported classes."""
    from sagevideo.patching import FAMILIES, family_spec

    names = {c.__name__ for c in type(pipe).__mro__}
    for f in FAMILIES:
        if names & set(family_spec(f).pipelines):
            return f
    supported = ", ".join(p for f in FAMILIES for p in family_spec(f).pipelines)
    raise InputError(f"unsupported pipeline {type(pipe).__name__}: sagevideo supports {supported}")


def _patch_sizes(transformer) -> tuple[int, int, int]:
    """(temporal, height, width) patch sizes from a transformer config (int or 3-tuple ``patch_size``)."""
    cfg = getattr(transformer, "config", None)
    p = getattr(cfg, "patch_size", 1) if cfg is not None else 1
    if isinstance(p, (list, tuple)):
        if len(p) == 3:
            return int(p[0]), int(p[1]), int(p[2])
        if len(p) == 2:
            return 1, int(p[0]), int(p[1])
        p = p[0]
    pt = getattr(cfg, "patch_size_t", None) if cfg is not None else None
    return int(pt or 1), int(p or 1), int(p or 1)


def size_rules(pipe) -> SizeRules:
    """Frame count / height / width rules of ``pipe``, from its VAE scale factors and the DiT patch size.

    Wan, HunyuanVideo, CogVideoX: the VAE compresses time by ``vae_scale_factor_temporal`` keeping the first
    frame, so frames = 1 + k·temporal; height and width must be multiples of ``vae_scale_factor_spatial`` × the
    spatial patch (Wan: 8 × 2 = 16).
    """
    temporal = int(getattr(pipe, "vae_scale_factor_temporal", 1) or 1)
    spatial = int(getattr(pipe, "vae_scale_factor_spatial", 0) or getattr(pipe, "vae_scale_factor", 0) or 8)
    _, ph, pw = _patch_sizes(getattr(pipe, "transformer", None))
    return SizeRules(frame_step=temporal, height_multiple=spatial * ph, width_multiple=spatial * pw)


def _nearest(value: int, step: int, offset: int = 0, minimum: int = 1) -> list[int]:
    below = offset + ((value - offset) // step) * step
    above = below + step
    out = [v for v in (below, above) if v >= minimum]
    return out or [minimum]


def check_size(pipe, frames: int, height: int, width: int) -> None:
    """:class:`InputError` naming the nearest valid values when ``pipe`` cannot take this size."""
    rules = size_rules(pipe)
    problems = []
    if None in (frames, height, width):  # left to the pipeline's own defaults, which it can take
        return
    if frames < 1 or (frames - 1) % rules.frame_step:
        near = _nearest(frames, rules.frame_step, offset=1, minimum=1)
        problems.append(
            f"--frames {frames}: this model takes 1 + {rules.frame_step}·k frames; nearest valid: "
            + " or ".join(map(str, near))
        )
    for flag, value, mult in (("--height", height, rules.height_multiple), ("--width", width, rules.width_multiple)):
        if value < mult or value % mult:
            near = _nearest(value, mult, minimum=mult)
            problems.append(f"{flag} {value}: must be a multiple of {mult}; nearest valid: " + " or ".join(map(str, near)))
    if problems:
        raise InputError(f"{type(pipe).__name__} cannot take this size: " + "; ".join(problems))


def call_defaults(pipe) -> dict:
    """Default ``num_inference_steps``, ``num_frames``, ``height``, ``width``, ``guidance_scale`` of ``pipe.__call__``."""
    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        params = {}
    keys = {"steps": "num_inference_steps", "frames": "num_frames", "height": "height", "width": "width",
            "guidance": "guidance_scale"}
    out = {}
    for ours, theirs in keys.items():
        p = params.get(theirs)
        if p is not None and p.default is not inspect.Parameter.empty and p.default is not None:
            out[ours] = p.default
    # pipelines whose height/width default to None derive them from the transformer's sample size
    cfg = getattr(getattr(pipe, "transformer", None), "config", None)
    spatial = int(getattr(pipe, "vae_scale_factor_spatial", 8) or 8)
    for ours, attr in (("height", "sample_height"), ("width", "sample_width")):
        if ours not in out and cfg is not None and getattr(cfg, attr, None):
            out[ours] = int(getattr(cfg, attr)) * spatial
    if "frames" not in out and cfg is not None and getattr(cfg, "sample_frames", None):
        out["frames"] = int(cfg.sample_frames)  # CogVideoX: num_frames defaults to the transformer's sample_frames
    if "height" not in out and cfg is not None and isinstance(getattr(cfg, "sample_size", None), int):
        out["height"] = out.setdefault("width", cfg.sample_size * spatial)
    return out


def build_config(family: str, attention: str | None = None, profile: str | None = None):
    """The :class:`~sagevideo.config.AttentionConfig` for ``--attention`` / ``--profile`` (not both).

    * neither: the family's default schedule;
    * ``attention``: one method everywhere (``sagevideo.config.method_config``: sparse methods keep the family's
      quantized warm-up steps and layer in front); parameters of the family default that the method accepts
      are kept (CogVideoX keeps ``smooth_v``); ``"dense"`` gives a dense config (the CLI runs dense unpatched);
    * ``profile``: a shipped profile name (``sagevideo.profiles.names()``), a JSON file path, or inline JSON.
    """
    from sagevideo import methods, profiles
    from sagevideo.config import AttentionConfig, default_config, method_config

    if attention is not None and profile is not None:
        raise InputError("give --attention or --profile, not both")
    base = default_config(family)
    if profile is not None:
        text = profile.strip()
        try:
            if text.startswith("{"):
                return AttentionConfig.from_json(text)
            if text.endswith(".json") or os.sep in text or os.path.isfile(text):
                if not os.path.isfile(text):
                    raise InputError(f"--profile {profile}: no such file")
                return AttentionConfig.load(text)
            return profiles.load(text)
        except InputError:
            raise
        except (ValueError, TypeError, OSError) as exc:
            raise InputError(f"--profile {profile}: {_one_line(exc, 500)}") from None
    if attention is None:
        return base
    try:
        method = methods.get(attention)
    except ValueError as exc:
        raise InputError(f"--attention {attention}: {exc}") from None
    kept = {k: v for k, v in base.default_params.items() if k in method.params}
    return method_config(family, attention, **kept).replace(guard=base.guard)


def gpu_only_methods(config) -> list[str]:
    """Methods of ``config`` that need a GPU to be worth running (everything except dense and auto)."""
    used = [config.default] + [r.method for r in config.rules]
    out = []
    for m in used:
        if m not in QUANTIZED_ON_CPU_OK and m not in out:
            out.append(m)
    return out


def is_dense(config) -> bool:
    """True when every call of ``config`` runs dense attention (then the CLI leaves the pipeline unpatched)."""
    return config.default == "dense" and all(r.method == "dense" for r in config.rules)


def check_attention_device(config, device: torch.device, allow_reference: bool) -> str | None:
    """:class:`InputError` for GPU-only methods on a non-CUDA device unless ``allow_reference``.

    Returns a notice to print when the run is allowed but will not be fast (reference on CPU, ``auto`` = dense).
    """
    if device.type == "cuda":
        return None
    gpu_only = gpu_only_methods(config)
    if gpu_only and not allow_reference:
        raise InputError(
            f"attention method(s) {', '.join(gpu_only)} need a CUDA GPU, and this run is on {device.type}: there "
            "they would only run the slow torch reference of the quantized arithmetic. Use --attention dense "
            "(or auto), run on a GPU machine, or pass --allow-reference to run the reference anyway (same numbers "
            "as the GPU kernel, no speed-up)"
        )
    if gpu_only:
        return (f"note: {', '.join(gpu_only)} on {device.type} runs the torch reference of the quantized arithmetic "
                "(same numbers as the GPU kernel, no speed-up: timings here are not a speed-up measurement)")
    if not is_dense(config):
        return f"note: 'auto' attention runs dense SDPA on {device.type} (the quantized kernels need a CUDA GPU)"
    return None


def check_request(pipe, *, frames: int, height: int, width: int, config=None, device=None,
                  allow_reference: bool = False) -> tuple[str, str | None]:
    """All pre-run checks; returns ``(family, notice or None)``."""
    family = pipeline_family(pipe)
    check_size(pipe, frames, height, width)
    notice = None
    if config is not None:
        if config.family is not None and config.family != family:
            raise InputError(f"the attention schedule was made for the {config.family!r} family, but the model is "
                             f"{family!r}; use a schedule for {family!r} (or one with \"family\": null)")
        notice = check_attention_device(config, device or _pipe_device(pipe), allow_reference)
    return family, notice


def _pipe_device(pipe) -> torch.device:
    dev = getattr(pipe, "_execution_device", None) or getattr(pipe, "device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


# ------------------------------------------------------------------------------------------------ running


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _frames_of(output) -> np.ndarray:
    from sagevideo.metrics import to_uint8_numpy

    frames = output.frames if hasattr(output, "frames") else output[0]
    if isinstance(frames, (list, tuple)):
        frames = frames[0]
        if isinstance(frames, (list, tuple)):  # list of PIL images
            frames = np.stack([np.asarray(f) for f in frames])
    elif getattr(frames, "ndim", 0) == 5:
        frames = frames[0]
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu()
        if frames.shape[-1] != 3 and frames.shape[0] == 3:  # (C, T, H, W)
            frames = frames.permute(1, 2, 3, 0)
    return to_uint8_numpy(np.asarray(frames, dtype=np.float32) if not isinstance(frames, np.ndarray) else frames,
                          "generated frames")


def _summarise_observed(handle) -> dict:
    out = {}
    for name, calls in handle.observed.items():
        counts: dict[str, int] = {}
        for label in calls.values():
            counts[label] = counts.get(label, 0) + 1
        out[name] = counts
    return out


def generate(
    pipe,
    prompt: str,
    *,
    config=None,
    attention: str | None = None,
    steps: int | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    guidance: float | None = None,
    negative_prompt: str | None = None,
    progress: bool = True,
    progress_desc: str = "denoising",
    extra_kwargs: dict | None = None,
    check: bool = True,
) -> GenerationResult:
    """Run ``pipe`` once and return the decoded frames and the wall time.

    Args:
        pipe: a supported diffusers video pipeline (see :func:`pipeline_family`).
        prompt: the text prompt.
        config: an :class:`~sagevideo.config.AttentionConfig`; a config that runs dense everywhere (or
            ``attention="dense"``) runs the pipeline unpatched. None (and no ``attention``) = the family default.
        attention: shorthand for ``config=build_config(family, attention)``.
        steps, frames, height, width, guidance: None = the pipeline's own defaults.
        seed: seed of a CPU ``torch.Generator`` (identical initial noise on every device).
        negative_prompt: passed through when given.
        progress: show the pipeline's tqdm bar, one tick per denoising step (on stderr).
        extra_kwargs: more keyword arguments for the pipeline call (``max_sequence_length``, ...).
        check: run :func:`check_request`'s size and family checks first (GPU-only methods on CPU are allowed
            here: the Python API runs the reference; the CLI is stricter).
    """
    from sagevideo.patching import patch_pipeline

    family = pipeline_family(pipe)
    if config is None:
        config = build_config(family, attention)
    elif attention is not None:
        raise InputError("give config or attention, not both")
    defaults = call_defaults(pipe)
    settings = {
        "prompt": prompt,
        "steps": steps if steps is not None else defaults.get("steps"),
        "frames": frames if frames is not None else defaults.get("frames"),
        "height": height if height is not None else defaults.get("height"),
        "width": width if width is not None else defaults.get("width"),
        "guidance": guidance if guidance is not None else defaults.get("guidance"),
        "seed": int(seed),
    }
    if negative_prompt is not None:
        settings["negative_prompt"] = negative_prompt
    if check and None not in (settings["frames"], settings["height"], settings["width"]):
        check_size(pipe, settings["frames"], settings["height"], settings["width"])

    kwargs: dict[str, Any] = {"prompt": prompt, "output_type": "np",
                              "generator": torch.Generator(device="cpu").manual_seed(int(seed))}
    for ours, theirs in (("steps", "num_inference_steps"), ("frames", "num_frames"), ("height", "height"),
                         ("width", "width"), ("guidance", "guidance_scale"), ("negative_prompt", "negative_prompt")):
        if settings.get(ours) is not None:
            kwargs[theirs] = settings[ours]
    kwargs.update(extra_kwargs or {})

    pipe.set_progress_bar_config(disable=not progress, desc=progress_desc, leave=True)
    device = _pipe_device(pipe)
    handle = None if is_dense(config) else patch_pipeline(pipe, config)
    try:
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            output = pipe(**kwargs)
        _sync(device)
        seconds = time.perf_counter() - t0
        observed = _summarise_observed(handle) if handle is not None else {}
        guard_events = len(handle.guard_events) if handle is not None else 0
        sparse = {} if handle is None else {name: {k: v for k, v in r.items() if k != "layers"}
                                            for name, r in handle.sparse_report().items()}
    finally:
        if handle is not None:
            handle.unpatch()
    return GenerationResult(
        frames=_frames_of(output), seconds=seconds, settings=settings,
        attention="dense (unpatched)" if handle is None else config.to_dict(),
        observed=observed, guard_events=guard_events, sparse=sparse,
    )


# ------------------------------------------------------------------------------------------------ environment


def environment(device: torch.device | None = None) -> dict:
    """Versions, CUDA and GPU description for reports and bug reports (``sagevideo env``)."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for pkg in ("sagevideo", "torch", "diffusers", "transformers", "triton", "torchmetrics", "imageio",
                "imageio-ffmpeg", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    env: dict[str, Any] = {"versions": versions, "platform": platform.platform(),
                           "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        idx = device.index if device is not None and device.type == "cuda" and device.index is not None else 0
        props = torch.cuda.get_device_properties(idx)
        env["gpu"] = {"name": props.name, "capability": f"sm{props.major}{props.minor}",
                      "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
    else:
        env["gpu"] = None
    env["cpu_threads"] = torch.get_num_threads()
    return json.loads(json.dumps(env, default=str))
