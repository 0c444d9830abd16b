"""Resolve a config to the method of one call: (step, layer, heads) → choices.

:class:`Schedule` binds an :class:`~sagevideo.config.AttentionConfig` to a transformer's number of
self-attention layers and answers, for a call at ``step`` of ``num_steps`` in ``layer`` over ``heads``, which
method runs on which heads. Results are cached per key, so the per-call cost is a dict lookup.

:class:`StepTracker` finds the denoising step of a transformer call, in this order:

1. an explicit ``set_step(step, num_steps)``;
2. the pipeline scheduler's ``step_index`` (diffusers' flow-matching and UniPC schedulers keep it; it is
   the index of the step being computed, because the pipeline calls the transformer before
   ``scheduler.step``), with ``num_steps = len(scheduler.timesteps)``;
3. the timestep value, looked up in ``scheduler.timesteps`` (schedulers without ``step_index``, such as
   CogVideoX's DDIM/DPM, whose timesteps are distinct). A cursor that only moves forward within a run maps
   classifier-free guidance's second call at the same timestep to the same step; a timestep larger than the
   previous one starts a new run. (Consecutive *equal* timesteps cannot be told apart by value: they map to
   one step. Schedulers that repeat timesteps, such as Heun's, keep ``step_index``, so path 2 applies.)

The fraction of the trajectory a rule's ``steps`` refers to is ``step / num_steps``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from sagevideo.config import AttentionConfig, StepUnknownError

__all__ = ["Choice", "Schedule", "StepTracker", "StepUnknownError"]


@dataclasses.dataclass(frozen=True)
class Choice:
    """Run ``method`` with ``params`` on ``heads`` (global head indices; None = every head of the call)."""

    method: str
    params: Mapping[str, Any]
    heads: tuple[int, ...] | None = None

    @property
    def label(self) -> str:
        """Short description used in observations: ``int8-fp8`` or ``int8-fp16[h0,1]``."""
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()) if v)
        name = self.method + (f"({extra})" if extra else "")
        return name if self.heads is None else f"{name}[h{','.join(map(str, self.heads))}]"


class Schedule:
    """A config bound to a transformer with ``num_layers`` patched self-attention layers."""

    def __init__(self, config: AttentionConfig, num_layers: int):
        if not isinstance(config, AttentionConfig):
            raise TypeError(f"expected an AttentionConfig, got {type(config).__name__}")
        self.config = config
        self.num_layers = int(num_layers)
        for rule in config.rules:
            for layer in rule.layers or ():
                if not -self.num_layers <= layer < self.num_layers:
                    raise ValueError(
                        f"rule {rule.to_dict()} names layer {layer}, but the model has {self.num_layers} "
                        "self-attention layers"
                    )
        self._per_head = any(r.heads is not None for r in config.rules)
        self._default = Choice(config.default, config.default_params)
        self._cache: dict[tuple, tuple[Choice, ...]] = {}

    @property
    def depends_on_step(self) -> bool:
        return self.config.depends_on_step

    def resolve(self, step: int | None, num_steps: int | None, layer: int, heads: tuple[int, ...]) -> tuple[Choice, ...]:
        """The choices for one call; their ``heads`` partition ``heads`` (one choice with None = all)."""
        key = (step, num_steps, layer, heads)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        fraction = None if step is None or not num_steps else step / num_steps
        if not self._per_head:
            out = (self._first_match(fraction, layer, None),)
        else:
            groups: dict[tuple, list[int]] = {}
            picks: dict[tuple, Choice] = {}
            for h in heads:
                c = self._first_match(fraction, layer, h)
                k = (c.method, tuple(sorted(c.params.items())))
                groups.setdefault(k, []).append(h)
                picks[k] = c
            if len(groups) == 1:
                (c,) = picks.values()
                out = (Choice(c.method, c.params),)
            else:
                out = tuple(Choice(picks[k].method, picks[k].params, tuple(hs)) for k, hs in groups.items())
        self._cache[key] = out
        return out

    def _first_match(self, fraction: float | None, layer: int, head: int | None) -> Choice:
        for rule in self.config.rules:
            if rule.heads is not None and head not in rule.heads:
                continue
            if rule.matches_layer(layer, self.num_layers) and rule.matches_step(fraction):
                return Choice(rule.method, rule.params)
        return self._default


class StepTracker:
    """Finds the denoising step of a transformer call (see the module docstring)."""

    def __init__(self, scheduler_fn: Callable[[], Any] | None = None):
        # a callable returning the scheduler, so that a pipeline whose scheduler is replaced after patching
        # is followed
        self.scheduler_fn = scheduler_fn
        self._explicit: tuple[int, int] | None = None
        self._cursor = -1
        self._last_value: float | None = None

    def set_step(self, step: int, num_steps: int) -> None:
        if not (isinstance(step, int) and isinstance(num_steps, int) and 0 <= step < num_steps):
            raise ValueError(f"set_step needs 0 <= step < num_steps (ints), got step={step!r}, num_steps={num_steps!r}")
        self._explicit = (step, num_steps)

    def clear_step(self) -> None:
        self._explicit = None

    def position(self, timestep_value: Callable[[], float]) -> tuple[int, int] | None:
        """``(step, num_steps)`` of the current call, or None when it cannot be known.

        ``timestep_value`` is called only when the value is needed (it reads a device tensor).
        """
        if self._explicit is not None:
            return self._explicit
        sched = None if self.scheduler_fn is None else self.scheduler_fn()
        if sched is None:
            return None
        timesteps = getattr(sched, "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            return None
        n = len(timesteps)
        index = getattr(sched, "step_index", None) if hasattr(type(sched), "step_index") else None
        if index is not None:
            index = int(index)
            if 0 <= index < n:
                return index, n
        return self._lookup(timesteps.detach().float().cpu().tolist(), timestep_value())

    def _lookup(self, ts: list[float], t: float) -> tuple[int, int] | None:
        # nearest timestep; ties (equal values, or a value rounded to bf16 by the pipeline) go to the first
        # index not before the cursor, so the cursor only moves forward within a run
        best = min(abs(x - t) for x in ts)
        tol = max(1e-6, 1e-2 * max(1.0, abs(t)))
        if best > tol:
            return None
        candidates = [i for i, x in enumerate(ts) if abs(x - t) <= best + 1e-9]
        if self._last_value is not None and t > self._last_value + tol:
            self._cursor = -1  # timesteps fall within a run: a larger one starts a new run
        if self._last_value is not None and t == self._last_value and self._cursor in candidates:
            index = self._cursor  # second call at the same timestep (classifier-free guidance)
        else:
            later = [i for i in candidates if i > self._cursor]
            index = later[0] if later else candidates[0]
        self._cursor, self._last_value = index, t
        return index, len(ts)
