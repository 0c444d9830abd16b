"""Calibration: measure each candidate method against dense attention on a model's real activations, once.

``sagevideo.calibrate(pipe, prompts, target=0.03)`` patches the pipeline with dense attention and runs it once
per prompt. At every self-attention call it also runs each candidate method on the same Q, K, V and records the
error against the dense output, per (step bucket, layer) and per head. The schedule it writes picks, for each
(bucket, layer), the cheapest candidate (``Method.cost``) whose error met ``target`` on *every* observed call,
and dense where none did; it is an :class:`~sagevideo.config.AttentionConfig` (family set, provenance and the
measured errors in ``meta``), saved as JSON when ``out`` is given.

Cost: one dense pipeline run per prompt, plus the candidates on a random subset of ``query_sample`` query rows
per call. The built-in quantized methods are *row-local* (Q has one scale per token; K and V statistics use all
keys), so their error on the sampled rows is exactly what they produce for those rows. This is what makes
calibration take minutes instead of the hours to days of per-head threshold sweeps (SpargeAttn's autotune);
the idea of choosing a precision per layer by measured accuracy is SageAttention's (INT8-PV only where its
cosine similarity stays ≥ 99.8 %), extended here to (timestep, layer) as in SageAttention2's report.

Error metrics (pooled over the sampled rows of one call, per head, then the worst head):

* ``rel_l1`` — Σ|O − O_dense| / Σ|O_dense| (SageAttention, SpargeAttn);
* ``rel_l2`` — ‖O − O_dense‖₂ / ‖O_dense‖₂.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sagevideo import methods
from sagevideo.config import AttentionConfig, Rule
from sagevideo.context import AttentionContext
from sagevideo.schedule import Choice

__all__ = ["calibrate", "CalibrationResult", "METRICS"]

logger = logging.getLogger("sagevideo")

METRICS = ("rel_l1", "rel_l2")


@dataclasses.dataclass
class CalibrationResult:
    """What :func:`calibrate` found.

    Attributes:
        config: the schedule (family set, ``meta["calibration"]`` with the measurements).
        errors: ``{(bucket, layer): {candidate label: worst error over calls and heads}}``.
        head_errors: ``{(bucket, layer): {candidate label: [worst error per head]}}`` (for per-head methods).
        choices: ``{(bucket, layer): candidate label or "dense"}``.
        seconds: wall time of the calibration (dense runs included).
        calls: number of attention calls measured.
        path: where the JSON was written, or None.
    """

    config: AttentionConfig
    errors: dict[tuple[int, int], dict[str, float]]
    head_errors: dict[tuple[int, int], dict[str, list[float]]]
    choices: dict[tuple[int, int], str]
    seconds: float
    calls: int
    path: str | None = None

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for c in self.choices.values():
            counts[c] = counts.get(c, 0) + 1
        share = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        return (
            f"calibrated {len(self.choices)} (step bucket, layer) cells from {self.calls} attention calls in "
            f"{self.seconds:.1f} s — {share}"
        )


def _candidate(c) -> tuple[str, dict[str, Any]]:
    if isinstance(c, str):
        name, params = c, {}
    elif isinstance(c, Sequence) and len(c) == 2 and isinstance(c[0], str) and isinstance(c[1], Mapping):
        name, params = c[0], dict(c[1])
    else:
        raise TypeError(f"a calibration candidate is a method name or (name, params), got {c!r}")
    if name == "dense":
        raise ValueError("'dense' is always the fallback of calibration; leave it out of candidates")
    return name, methods.validate_params(name, params)


def _label(name: str, params: Mapping[str, Any]) -> str:
    return Choice(name, params).label


class _Calibrator:
    """Installed on each patch state while calibrating: runs dense, measures the candidates."""

    def __init__(self, candidates, num_buckets: int, metric: str, query_sample: int, seed: int):
        self.candidates = candidates  # [(label, name, params)]
        self.num_buckets = num_buckets
        self.metric = metric
        self.query_sample = query_sample
        self.seed = seed
        # (bucket, layer) -> label -> per-head worst error (float64 tensor, CPU)
        self.worst: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.calls = 0

    def observe(self, state, q, k, v, base: AttentionContext):
        from sagevideo.patching import run_choices

        dense_out, dense_lse = run_choices((Choice("dense", {}),), q, k, v, base)
        if base.step is None or not base.num_steps:
            raise RuntimeError(
                f"calibration needs the denoising step of every call ({state.name} layer {base.layer} has none); "
                "calibrate a pipeline whose scheduler sagevideo can follow"
            )
        bucket = base.step * self.num_buckets // base.num_steps
        key = (bucket, base.layer)
        sdim = 1 if base.tensor_layout == "BSHD" else 2
        hdim = 3 - sdim
        seq = q.shape[sdim]
        idx = None
        if seq > self.query_sample:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + base.layer * 1009 + base.step)
            idx = torch.randperm(seq, generator=g)[: self.query_sample].sort().values.to(q.device)
        cell = self.worst.setdefault(key, {})
        for label, name, params in self.candidates:
            method = methods.get(name)
            if idx is not None and method.row_local:
                q_eval, ref = q.index_select(sdim, idx), dense_out.index_select(sdim, idx)
            else:
                q_eval, ref = q, dense_out
            ctx = dataclasses.replace(base, params=params, return_lse=False)
            out, _ = method.fn(q_eval, k, v, ctx)
            err = _per_head_error(out, ref, hdim, self.metric).cpu()
            prev = cell.get(label)
            cell[label] = err if prev is None else torch.maximum(prev, err)
        self.calls += 1
        return dense_out, dense_lse


def _per_head_error(out: torch.Tensor, ref: torch.Tensor, hdim: int, metric: str) -> torch.Tensor:
    """Per-head error of ``out`` against ``ref`` (float64, shape (H,)); inf where ``out`` is not finite."""
    dims = [d for d in range(out.dim()) if d != hdim]
    o, r = out.double(), ref.double()
    if metric == "rel_l1":
        num, den = (o - r).abs().sum(dim=dims), r.abs().sum(dim=dims)
    else:
        num, den = (o - r).square().sum(dim=dims).sqrt(), r.square().sum(dim=dims).sqrt()
    err = num / den.clamp_min(1e-300)
    return torch.where(torch.isfinite(err), err, torch.inf)


def calibrate(
    pipe,
    prompts: str | Sequence[str],
    target: float = 0.03,
    *,
    metric: str = "rel_l1",
    candidates: Sequence = ("int8-fp8", "int8-fp16"),
    num_buckets: int = 5,
    query_sample: int = 1024,
    out: str | None = None,
    seed: int = 0,
    guard: bool = True,
    **call_kwargs,
) -> CalibrationResult:
    """Measure candidates against dense attention on ``pipe``'s real activations and write a schedule.

    Args:
        pipe: a pipeline :func:`sagevideo.patch_pipeline` supports (not patched).
        prompts: one prompt or several; the pipeline runs once per prompt.
        target: the largest acceptable error (``metric``) of one attention call against dense, per layer.
        metric: ``"rel_l1"`` or ``"rel_l2"``.
        candidates: method names or ``(name, params)`` pairs, e.g. ``("int8-fp8", {"smooth_v": True})``; dense
            is the fallback.
        num_buckets: the denoising trajectory is split into this many equal step ranges.
        query_sample: query rows measured per call for row-local methods (all rows when the sequence is
            shorter).
        out: write the schedule as JSON there.
        seed: seeds the query sampling.
        guard: the ``guard`` flag of the written schedule.
        **call_kwargs: passed to ``pipe(...)`` (``num_inference_steps``, ``height``, ``generator``, ...).

    Returns:
        A :class:`CalibrationResult`; its ``seconds`` is the wall time, also logged.
    """
    from sagevideo.patching import patch_pipeline

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not (isinstance(target, (int, float)) and target >= 0):
        raise ValueError(f"target must be a non-negative number, got {target!r}")
    if not (isinstance(num_buckets, int) and num_buckets >= 1):
        raise ValueError(f"num_buckets must be a positive int, got {num_buckets!r}")
    if not (isinstance(query_sample, int) and query_sample >= 1):
        raise ValueError(f"query_sample must be a positive int, got {query_sample!r}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    cands = []
    for c in candidates:
        name, params = _candidate(c)
        cands.append((_label(name, params), name, params))
    if not cands:
        raise ValueError("give at least one candidate method")

    start = time.perf_counter()
    calibrator = _Calibrator(cands, num_buckets, metric, query_sample, seed)
    handle = patch_pipeline(pipe, AttentionConfig.uniform("dense"))
    try:
        for st in handle._states:
            st.calibrator = calibrator
        num_layers = handle._states[0].num_layers
        with torch.no_grad():
            for p in prompts:
                pipe(prompt=p, **call_kwargs)
    finally:
        handle.unpatch()
    if calibrator.calls == 0:
        raise RuntimeError("calibration observed no attention call; did the pipeline run its transformer?")

    errors: dict[tuple[int, int], dict[str, float]] = {}
    head_errors: dict[tuple[int, int], dict[str, list[float]]] = {}
    choices: dict[tuple[int, int], str] = {}
    by_label = {label: (name, params) for label, name, params in cands}
    ranked = sorted(cands, key=lambda c: methods.get(c[1]).cost)
    for key in sorted(calibrator.worst):
        cell = calibrator.worst[key]
        errors[key] = {label: float(e.max()) for label, e in cell.items()}
        head_errors[key] = {label: [float(x) for x in e] for label, e in cell.items()}
        choices[key] = next((label for label, _, _ in ranked if errors[key][label] <= target), "dense")
    seconds = time.perf_counter() - start

    spec_name = handle.family
    config = _schedule_from_choices(choices, by_label, num_buckets, num_layers).replace(
        family=spec_name,
        guard=guard,
        meta={
            "calibration": {
                "pipeline": type(pipe).__name__,
                "target": target,
                "metric": metric,
                "candidates": [label for label, _, _ in cands],
                "num_buckets": num_buckets,
                "query_sample": query_sample,
                "prompts": len(prompts),
                "attention_calls": calibrator.calls,
                "seconds": round(seconds, 3),
                # worst error per "bucket/layer" and candidate, for later inspection
                "errors": {f"{b}/{l}": {k: round(v, 6) for k, v in e.items()} for (b, l), e in errors.items()},
            }
        },
    )
    result = CalibrationResult(config, errors, head_errors, choices, seconds, calibrator.calls)
    if out is not None:
        config.save(out)
        result.path = str(out)
    logger.info("sagevideo: %s", result.summary())
    return result


def _schedule_from_choices(choices, by_label, num_buckets: int, num_layers: int) -> AttentionConfig:
    """The most common choice becomes the default; every other (bucket, layer) gets a rule.

    Cells with the same choice are merged: per choice, consecutive buckets with the same set of layers form one
    rule ``Rule(method, steps=(b0/n, b1/n), layers=[...])``.
    """
    counts: dict[str, int] = {}
    for c in choices.values():
        counts[c] = counts.get(c, 0) + 1
    default = max(sorted(counts), key=lambda c: counts[c])
    rules: list[Rule] = []
    for label in sorted(counts):
        if label == default:
            continue
        name, params = ("dense", {}) if label == "dense" else by_label[label]
        per_bucket = [
            tuple(l for l in range(num_layers) if choices.get((b, l)) == label) for b in range(num_buckets)
        ]
        b = 0
        while b < num_buckets:
            layers = per_bucket[b]
            if not layers:
                b += 1
                continue
            end = b + 1
            while end < num_buckets and per_bucket[end] == layers:
                end += 1
            steps = None if (b, end) == (0, num_buckets) else (b / num_buckets, end / num_buckets)
            rules.append(Rule(name, params, steps=steps, layers=None if len(layers) == num_layers else layers))
            b = end
    dname, dparams = ("dense", {}) if default == "dense" else by_label[default]
    return AttentionConfig(default=dname, default_params=dparams, rules=tuple(rules))
