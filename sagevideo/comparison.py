"""Dense against accelerated, same seed, one fidelity report: ``sagevideo compare`` as a Python API.

::

    import sagevideo

    result = sagevideo.compare(pipe, "a cat walks on the grass", config=sagevideo.profiles.load("warmup"),
                     out_dir="report", steps=30, seed=0)
    result["metrics"]["psnr"]["mean"], result["info"]["speedup"]

The dense run is the *unpatched* pipeline (diffusers' own attention), the accelerated run the same pipeline
under :func:`sagevideo.patch_pipeline` with ``config``; the pipeline is unpatched again afterwards. Both use
the same seed (a CPU generator, so the initial noise is identical). Metrics are computed on the decoded frames
before any video encoding. With ``out_dir`` the folder gets what :func:`sagevideo.report.write_report`
writes (``metrics.json``, ``side_by_side.mp4``, ``report.html``), with ``info`` holding the wall time of each
run, the speed-up, the schedule JSON, what ran where, versions and the GPU.

Timing: on CUDA each configuration first runs ``warmup_steps`` denoising steps untimed (CUDA context, cuDNN
and Triton compilation and autotuning would otherwise be charged to whichever run comes first): dense, and
every method the schedule uses, each applied to every call (so methods a schedule only reaches in later steps
are compiled too). On CPU the
quantized methods run a torch reference; the speed-up is then recorded but flagged as not meaningful.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from sagevideo.generate import (
    GenerationResult,
    InputError,
    _pipe_device,
    build_config,
    environment,
    generate,
    gpu_only_methods,
    is_dense,
    pipeline_family,
)

__all__ = ["compare"]


def _metrics_without_files(dense: np.ndarray, accel: np.ndarray) -> dict:
    from sagevideo import metrics as m
    from sagevideo._lpips import LPIPSUnavailableError

    out: dict[str, Any] = {
        "psnr": {"available": True, "unit": "dB", **m.video_psnr(dense, accel).to_dict()},
        "ssim": {"available": True, **m.video_ssim(dense, accel).to_dict()},
    }
    try:
        out["lpips"] = {"available": True, **m.video_lpips(dense, accel).to_dict()}
    except (LPIPSUnavailableError, ValueError) as exc:
        out["lpips"] = {"available": False, "name": "lpips", "reason": str(exc)}
    return out


def _warmup_configs(config) -> list:
    """One warm-up configuration per distinct (method, parameters) of ``config``, each applied everywhere: the
    schedule itself may not reach a method in a short warm-up (the sparse methods' default schedules keep the
    first 20 % of steps dense, so a 1-step warm-up of the schedule compiled nothing of them and the timed run
    paid Triton's compilation and autotuning: 0.05-0.09x "speed-ups" on an H100, 2026-11-23)."""
    choices = [(config.default, dict(config.default_params))] + [(r.method, dict(r.params)) for r in config.rules]
    out, seen = [], set()
    for method, params in choices:
        key = (method, repr(sorted(params.items())))
        if method == "dense" or key in seen:
            continue
        seen.add(key)
        out.append((config.replace(default=method, default_params=params, rules=()), f"warm-up {method}"))
    return out


def compare(
    pipe,
    prompt: str,
    *,
    config=None,
    attention: str | None = None,
    out_dir: str | os.PathLike | None = None,
    warmup_steps: int | None = None,
    fps: float = 16.0,
    model_name: str | None = None,
    extra_info: dict | None = None,
    progress: bool = True,
    **gen_kwargs,
) -> dict:
    """Run ``pipe`` dense (unpatched) and accelerated (patched with ``config``) with the same seed; compare.

    Args:
        pipe: a supported diffusers video pipeline.
        prompt: the text prompt.
        config: the accelerated run's :class:`~sagevideo.config.AttentionConfig` (None = the family default;
            ``attention="int8-fp8"`` is a shorthand for one method everywhere).
        out_dir: write the report folder here (None = compute the metrics only, write nothing).
        warmup_steps: untimed warm-up steps per configuration before the timed runs (None = 1 on CUDA, 0 on CPU).
        fps: frame rate of the side-by-side video.
        model_name: how the model is named in the report (default: the pipeline class).
        extra_info: merged into ``info`` (the CLI adds its notices).
        progress: per-step progress bars.
        **gen_kwargs: :func:`sagevideo.generate.generate` arguments (``steps``, ``frames``, ``height``,
            ``width``, ``seed``, ``guidance``, ``negative_prompt``, ``extra_kwargs``).

    Returns:
        ``{"metrics": {psnr, ssim, lpips}, "info": {...}, "report": metrics.json document or None,
        "out_dir": str or None, "dense": GenerationResult, "accelerated": GenerationResult}``.
    """
    family = pipeline_family(pipe)
    if config is None:
        config = build_config(family, attention)
    elif attention is not None:
        raise InputError("give config or attention, not both")
    device = _pipe_device(pipe)
    if warmup_steps is None:
        warmup_steps = 1 if device.type == "cuda" else 0
    if out_dir is not None:
        from sagevideo.video_io import _ensure_writable_dir
        from pathlib import Path

        _ensure_writable_dir(Path(out_dir))  # fail before the (long) runs, not after

    dense_config = config.replace(default="dense", default_params={}, rules=())
    if warmup_steps > 0:
        warm = {k: v for k, v in gen_kwargs.items() if k != "steps"}
        for cfg, label in [(dense_config, "warm-up dense")] + _warmup_configs(config):
            generate(pipe, prompt, config=cfg, steps=warmup_steps, progress=progress, progress_desc=label, **warm)

    dense: GenerationResult = generate(pipe, prompt, config=dense_config, progress=progress,
                                       progress_desc="dense", **gen_kwargs)
    accel: GenerationResult = generate(pipe, prompt, config=config, progress=progress,
                                       progress_desc="accelerated", **gen_kwargs)

    env = environment(device)
    on_reference = device.type != "cuda" and bool(gpu_only_methods(config))
    speedup = dense.seconds / accel.seconds if accel.seconds > 0 else float("nan")
    if device.type == "cuda":
        backend = "CUDA kernels (Triton) where the GPU supports them"
    elif on_reference:
        backend = f"torch reference of the quantized arithmetic on {device.type} (no speed-up)"
    else:
        backend = f"dense SDPA on {device.type} ('auto' runs dense without a CUDA GPU)"
    info: dict[str, Any] = {
        "title": f"sagevideo compare: {model_name or type(pipe).__name__}",
        "prompt": prompt,
        "model": model_name or type(pipe).__name__,
        "pipeline": type(pipe).__name__,
        "family": family,
        "settings": dense.settings,
        "device": str(device),
        "dtype": str(getattr(pipe, "dtype", "")).replace("torch.", ""),
        "gpu": env["gpu"]["name"] if env["gpu"] else None,
        "gpu_detail": env["gpu"],
        "wall_seconds": {"dense": dense.seconds, "accelerated": accel.seconds},
        "wall_time_includes": "text encoding + denoising + VAE decode (whole pipeline call)",
        "speedup": speedup,
        "speedup_meaningful": not on_reference and device.type == "cuda",
        "warmup_steps": warmup_steps,
        "attention_backend": backend,
        "schedule": config.to_dict(),
        "schedule_runs_dense_only": is_dense(config) or (device.type != "cuda" and not on_reference),
        "methods_run": accel.observed,
        "guard_events": accel.guard_events,
        "sparse": accel.sparse,
        "dense_run": "unpatched pipeline (diffusers' own attention)",
        "versions": env["versions"],
    }
    if not info["speedup_meaningful"]:
        info["speedup_note"] = (
            "not a speed-up measurement: " + ("the quantized methods ran as a torch reference on CPU"
                                              if on_reference else "no CUDA GPU, both runs used dense attention")
        )
    info.update(extra_info or {})

    report = None
    if out_dir is not None:
        from sagevideo.report import write_report

        report = write_report(out_dir, dense.frames, accel.frames, info, fps=fps)
        metrics = report["metrics"]
    else:
        metrics = _metrics_without_files(dense.frames, accel.frames)
    return {
        "metrics": metrics,
        "info": info,
        "report": report,
        "out_dir": None if out_dir is None else os.fspath(out_dir),
        "dense": dense,
        "accelerated": accel,
    }
