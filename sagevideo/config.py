"""The attention schedule as a small, versioned, JSON-serialisable config.

An :class:`AttentionConfig` is an ordered list of :class:`Rule` s plus a default. For each self-attention call
the first rule whose ``steps``, ``layers`` and ``heads`` all match decides the method (a name from
``sagevideo.methods``) and its parameters; calls no rule matches use ``default``. For example, the schedule
"steps in [0, 20%) dense; layers 0–1 int8-fp16; everything else int8-fp8" is::

    AttentionConfig(
        default="int8-fp8",
        rules=(Rule("dense", steps=(0.0, 0.2)), Rule("int8-fp16", layers=(0, 1))),
    )

and its JSON form (``config.to_json()``)::

    {"version": 1, "default": "int8-fp8", "default_params": {}, "guard": true, "family": null, "meta": {},
     "rules": [{"method": "dense", "steps": [0.0, 0.2]}, {"method": "int8-fp16", "layers": [0, 1]}]}

``steps`` is a half-open range of the *fraction of the denoising trajectory*, ``step_index / num_steps``, so a
schedule written for 50 steps means the same for 30. ``layers`` lists self-attention layer indices (negative
ones count from the end, ``-1`` = last). ``heads`` lists head indices; a rule with heads applies to those heads
only (others fall through to later rules).

Running the first part of the trajectory at higher precision is the "dense warm-up" of Sparse VideoGen
(Xi et al. 2025) and the per-timestep precision choice of SageAttention3; choosing a precision per layer from
its measured error follows SageAttention (Zhang et al. 2024), which picks INT8-PV only where it is accurate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from sagevideo import methods

__all__ = ["CONFIG_VERSION", "Rule", "AttentionConfig", "default_config", "method_config"]

CONFIG_VERSION = 1

_RULE_KEYS = ("method", "params", "steps", "layers", "heads")
_CONFIG_KEYS = ("version", "default", "default_params", "rules", "guard", "family", "meta")


def _int_tuple(name: str, value, *, allow_negative: bool) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"Rule.{name} must be a list of ints or None, got {value!r}")
    if len(value) == 0:
        raise ValueError(f"Rule.{name} is empty; use None to mean 'all {name}'")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"Rule.{name} must contain ints, got {v!r}")
        if v < 0 and not allow_negative:
            raise ValueError(f"Rule.{name} must be non-negative, got {v}")
        out.append(int(v))
    if len(set(out)) != len(out):
        raise ValueError(f"Rule.{name} has duplicates: {out}")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Calls in ``steps`` × ``layers`` × ``heads`` use ``method`` with ``params`` (None = any).

    Attributes:
        method: a name registered in ``sagevideo.methods`` (``"dense"``, ``"int8-fp16"``, ``"int8-fp8"``,
            ``"auto"``, and later the sparse methods).
        params: the method's parameters (checked against the method's declared parameters).
        steps: ``(start, end)`` half-open range of ``step / num_steps``, ``0 <= start < end <= 1``.
        layers: self-attention layer indices; negative ones count from the end.
        heads: head indices (only for methods that allow a per-head choice).
    """

    method: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    steps: tuple[float, float] | None = None
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.method, str):
            raise TypeError(f"Rule.method must be a method name (str), got {self.method!r}")
        method = methods.get(self.method)
        object.__setattr__(self, "params", MappingProxyType(methods.validate_params(self.method, self.params)))
        if self.steps is not None:
            s = self.steps
            if isinstance(s, (str, bytes)) or not isinstance(s, Sequence) or len(s) != 2:
                raise TypeError(f"Rule.steps must be (start, end) fractions of the trajectory, got {s!r}")
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in s):
                raise TypeError(f"Rule.steps must hold numbers, got {s!r}")
            start, end = float(s[0]), float(s[1])
            if not (0.0 <= start < end <= 1.0) or not (math.isfinite(start) and math.isfinite(end)):
                raise ValueError(
                    f"Rule.steps must satisfy 0 <= start < end <= 1 (fractions of the denoising trajectory), got {s!r}"
                )
            object.__setattr__(self, "steps", (start, end))
        object.__setattr__(self, "layers", _int_tuple("layers", self.layers, allow_negative=True))
        object.__setattr__(self, "heads", _int_tuple("heads", self.heads, allow_negative=False))
        if self.heads is not None and not method.per_head:
            raise ValueError(f"method {self.method!r} cannot be chosen per head; drop Rule.heads")

    # -- matching -------------------------------------------------------------------------------------------

    def matches_step(self, fraction: float | None) -> bool:
        if self.steps is None:
            return True
        if fraction is None:
            raise StepUnknownError(
                f"the schedule has a rule for steps {list(self.steps)} but this call's denoising step is unknown. "
                "patch_pipeline() knows it from the pipeline's scheduler; for a bare transformer pass "
                "scheduler= to patch_transformer() or call handle.set_step(step, num_steps)"
            )
        return self.steps[0] <= fraction < self.steps[1]

    def matches_layer(self, layer: int, num_layers: int) -> bool:
        if self.layers is None:
            return True
        return any(layer == (l if l >= 0 else num_layers + l) for l in self.layers)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        # store only the parameters that differ from the method's defaults, so the JSON stays readable
        defaults = methods.get(self.method).params
        params = {k: v for k, v in self.params.items() if defaults.get(k) != v}
        if params:
            out["params"] = params
        if self.steps is not None:
            out["steps"] = list(self.steps)
        if self.layers is not None:
            out["layers"] = list(self.layers)
        if self.heads is not None:
            out["heads"] = list(self.heads)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        if not isinstance(data, Mapping):
            raise TypeError(f"a rule must be a JSON object, got {data!r}")
        unknown = sorted(set(data) - set(_RULE_KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in rule {dict(data)}; allowed: {list(_RULE_KEYS)}")
        if "method" not in data:
            raise ValueError(f"rule {dict(data)} has no 'method'")
        return cls(
            method=data["method"], params=data.get("params") or {}, steps=data.get("steps"),
            layers=data.get("layers"), heads=data.get("heads"),
        )


class StepUnknownError(RuntimeError):
    """A rule depends on the denoising step, but the step of this call is not known."""


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """A schedule: ordered ``rules`` (first match wins) and a ``default`` method.

    Attributes:
        default: method for calls no rule matches.
        default_params: parameters of ``default``.
        rules: ordered :class:`Rule` s.
        guard: recompute a call dense when its output is not finite (see ``sagevideo.guard``).
        family: model family this schedule was written or calibrated for (``"wan"``, ...); patching a model
            of another family with it is an error. None = any family.
        meta: free-form JSON-serialisable provenance (calibration target, errors, time, model).
        version: config format version (``CONFIG_VERSION``).
    """

    default: str = "auto"
    default_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    guard: bool = True
    family: str | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    version: int = CONFIG_VERSION

    def __post_init__(self):
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise TypeError(f"AttentionConfig.version must be an int, got {self.version!r}")
        if self.version > CONFIG_VERSION:
            raise ValueError(
                f"this attention config has version {self.version}, newer than this sagevideo understands "
                f"({CONFIG_VERSION}); upgrade sagevideo"
            )
        if self.version < 1:
            raise ValueError(f"AttentionConfig.version must be >= 1, got {self.version}")
        if not isinstance(self.default, str):
            raise TypeError(f"AttentionConfig.default must be a method name (str), got {self.default!r}")
        object.__setattr__(
            self, "default_params", MappingProxyType(methods.validate_params(self.default, self.default_params))
        )
        rules = self.rules
        if isinstance(rules, (Rule, Mapping)) or not isinstance(rules, Sequence):
            raise TypeError("AttentionConfig.rules must be a list of Rule")
        rules = tuple(r if isinstance(r, Rule) else Rule.from_dict(r) for r in rules)
        object.__setattr__(self, "rules", rules)
        if not isinstance(self.guard, bool):
            raise TypeError(f"AttentionConfig.guard must be a bool, got {self.guard!r}")
        if self.family is not None and not isinstance(self.family, str):
            raise TypeError(f"AttentionConfig.family must be a family name or None, got {self.family!r}")
        if not isinstance(self.meta, Mapping):
            raise TypeError("AttentionConfig.meta must be a mapping")
        try:
            meta = json.loads(json.dumps(dict(self.meta)))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"AttentionConfig.meta must be JSON-serialisable: {exc}") from None
        object.__setattr__(self, "meta", MappingProxyType(meta))

    # -- convenience --------------------------------------------------------------------------------------

    @classmethod
    def uniform(cls, method: str, **params) -> AttentionConfig:
        """One method for every call (``AttentionConfig.uniform("int8-fp16")``)."""
        return cls(default=method, default_params=params)

    def replace(self, **changes) -> AttentionConfig:
        return dataclasses.replace(self, **changes)

    @property
    def depends_on_step(self) -> bool:
        return any(r.steps is not None for r in self.rules)

    # -- serialisation ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        defaults = methods.get(self.default).params
        return {
            "version": self.version,
            "default": self.default,
            "default_params": {k: v for k, v in self.default_params.items() if defaults.get(k) != v},
            "rules": [r.to_dict() for r in self.rules],
            "guard": self.guard,
            "family": self.family,
            "meta": json.loads(json.dumps(dict(self.meta))),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttentionConfig:
        if not isinstance(data, Mapping):
            raise TypeError(f"an attention config must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in attention config; allowed: {list(_CONFIG_KEYS)}")
        if "version" not in data:
            raise ValueError(f"attention config has no 'version' (this sagevideo writes version {CONFIG_VERSION})")
        rules = data.get("rules", [])
        if not isinstance(rules, list):
            raise TypeError("attention config 'rules' must be a list")
        return cls(
            version=data["version"],
            default=data.get("default", "auto"),
            default_params=data.get("default_params") or {},
            rules=tuple(Rule.from_dict(r) for r in rules),
            guard=data.get("guard", True),
            family=data.get("family"),
            meta=data.get("meta") or {},
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> AttentionConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"attention config is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> AttentionConfig:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            return cls.from_json(text)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{path}: {exc}") from None


def default_config(family: str) -> AttentionConfig:
    """The default schedule of a model family (``"wan"``, ``"hunyuan_video"``, ``"hunyuan_video15"``,
    ``"cogvideox"``), defined in that family's file under ``pipelines/``."""
    from sagevideo.patching import family_spec

    return family_spec(family).default_config


def method_config(family: str | None, method: str, **params) -> AttentionConfig:
    """A schedule that runs ``method`` (with ``params``) on every DiT self-attention call, except where the
    method asks for a warm-up (``Method.needs_warmup``, the sparse methods): then the first part of the
    trajectory and some layers run ``"auto"`` (quantized dense attention) first, with the family's amounts
    (``FamilySpec.sparse_warmup``: Sparse VideoGen keeps the first 10-20 % of steps and one layer dense, because
    early denoising steps and the first layer carry the layout of the whole video). ``family=None`` uses
    20 % of steps and layer 0.
    """
    m = methods.get(method)
    rules: tuple[Rule, ...] = ()
    if m.needs_warmup:
        if family is None:
            fraction, layers = 0.2, (0,)
        else:
            from sagevideo.patching import family_spec

            fraction, layers = family_spec(family).sparse_warmup
        warm = []
        if fraction > 0:
            warm.append(Rule("auto", steps=(0.0, float(fraction))))
        if layers:
            warm.append(Rule("auto", layers=tuple(layers)))
        rules = tuple(warm)
    return AttentionConfig(default=method, default_params=dict(params), rules=rules)
