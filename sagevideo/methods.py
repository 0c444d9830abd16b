"""The attention methods a schedule can choose from: one registry, name → :class:`Method`.

A method is a callable ``fn(q, k, v, ctx) -> (out, lse)``:

* ``q``, ``k``, ``v`` are in ``ctx.tensor_layout`` (``"BSHD"`` from diffusers' dispatch, ``"BHSD"`` from the
  CogVideoX processor), already restricted to the heads this choice covers (``ctx.heads`` holds their global
  indices, so a per-head method can look its parameters up);
* ``ctx`` is a :class:`sagevideo.context.AttentionContext`: step, layer, the family's token layout (video
  grid, where text sits), the key-padding mask, the softmax scale, ``ctx.params`` (this rule's parameters,
  defaults filled in) and ``ctx.return_lse``;
* it returns the output in the input layout and dtype, and the natural-log LSE (fp32, ``(B, H, S)`` for
  BHSD, ``(B, S, H)`` for BSHD) when ``ctx.return_lse`` (ring attention merges chunks with it), else None.

The built-in methods wrap :func:`sagevideo.attention` (``dense``, ``int8-fp16``, ``int8-fp8``, ``auto``) and
:func:`sagevideo.sparse_attention` (``sparse-spatiotemporal``, ``sparse-semantic``; ``sagevideo/sparse/scheduled.py``).
Other code adds methods with :func:`register` — one more choice per (step, layer, head).

``cost`` is a rough relative cost (dense = 1) used only to rank candidates in calibration; it comes from
published kernel throughputs on Hopper (SageAttention2 INT8/FP8 ≈ 1.8× FlashAttention2 bf16, INT8/FP16 ≈ 1.3×),
not from a measurement of this package. ``benchmarks/pipeline.py`` measures the real numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["Method", "register", "get", "names", "validate_params"]


@dataclasses.dataclass(frozen=True)
class Method:
    """One attention method.

    Attributes:
        name: registry key, used in configs (``"int8-fp8"``).
        fn: ``fn(q, k, v, ctx) -> (out, lse or None)``, see the module docstring.
        cost: relative cost against dense attention (dense = 1.0), to rank calibration candidates.
        params: the parameters a rule may set, with their defaults (types are checked against them).
        description: one line for error messages and ``sagevideo`` listings.
        per_head: whether a rule may choose it for a subset of heads (the dispatcher slices the heads).
        row_local: whether each query row's output depends only on that row of Q (true for the quantized
            methods: per-token Q scales). Calibration then measures errors on a random subset of query rows,
            which is exact for those rows and much cheaper.
        needs_warmup: schedules built from this method's name alone (``sagevideo.config.method_config``, the
            CLI's ``--attention``, the ComfyUI node's mode) run quantized dense attention for the family's
            warm-up steps and layers first (true for the sparse methods).
    """

    name: str
    fn: Callable[..., Any]
    cost: float
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    description: str = ""
    per_head: bool = True
    row_local: bool = True
    needs_warmup: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Method name must be a non-empty string, got {self.name!r}")
        if not callable(self.fn):
            raise TypeError(f"Method {self.name!r}: fn must be callable")
        if not (isinstance(self.cost, (int, float)) and self.cost > 0):
            raise ValueError(f"Method {self.name!r}: cost must be a positive number, got {self.cost!r}")
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))


_REGISTRY: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (``replace=True`` to redefine an existing name). Returns it."""
    if method.name in _REGISTRY and not replace:
        raise ValueError(
            f"an attention method named {method.name!r} is already registered; pass replace=True to redefine it"
        )
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests use this to clean up a temporary method)."""
    _REGISTRY.pop(name, None)


def get(name: str) -> Method:
    """The method registered as ``name``; the error lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown attention method {name!r}; registered methods: {', '.join(names())}") from None


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def validate_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``params`` against method ``name`` and return them with the defaults filled in."""
    method = get(name)
    if not isinstance(params, Mapping):
        raise TypeError(f"params of method {name!r} must be a mapping, got {type(params).__name__}")
    unknown = sorted(set(params) - set(method.params))
    if unknown:
        allowed = ", ".join(method.params) or "none"
        raise ValueError(f"method {name!r} has no parameter(s) {unknown}; its parameters: {allowed}")
    out = dict(method.params)
    for key, value in params.items():
        default = method.params[key]
        if default is not None and not _same_kind(value, default):
            raise TypeError(
                f"parameter {key!r} of method {name!r} must be {type(default).__name__} "
                f"(like its default {default!r}), got {value!r}"
            )
        out[key] = value
    return out


def _same_kind(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


# ----------------------------------------------------------------------------------------------------------
# Built-in methods: the precisions of sagevideo.attention
# ----------------------------------------------------------------------------------------------------------


def _precision_method(precision: str):
    def run(q, k, v, ctx):
        from sagevideo.ops import attention

        res = attention(
            q, k, v, layout=ctx.tensor_layout, precision=precision, scale=ctx.scale, return_lse=ctx.return_lse,
            key_padding_mask=ctx.key_padding_mask, smooth_v=bool(ctx.params.get("smooth_v", False)),
        )
        return res if ctx.return_lse else (res, None)

    run.__name__ = f"attention_{precision.replace('-', '_')}"
    return run


register(Method("dense", _precision_method("dense"), cost=1.0, description="PyTorch SDPA in the input dtype"))
register(Method(
    "int8-fp16", _precision_method("int8-fp16"), cost=0.8, params={"smooth_v": False},
    description="INT8 QKᵀ (per-token scales, smoothed K), 16-bit PV, FP32 accumulation (SageAttention2-style)",
))
register(Method(
    "int8-fp8", _precision_method("int8-fp8"), cost=0.55, params={"smooth_v": False},
    description="INT8 QKᵀ, FP8 e4m3 PV with two-level FP32 accumulation (SageAttention2); needs sm89+",
))
register(Method(
    "auto", _precision_method("auto"), cost=0.55, params={"smooth_v": False},
    description="int8-fp8 on sm89+, int8-fp16 on sm80/86, dense on CPU and older GPUs",
))


# ----------------------------------------------------------------------------------------------------------
# Sparse methods (sagevideo.sparse): block-sparse kernels in the same precisions
# ----------------------------------------------------------------------------------------------------------


def _sparse_method(name: str):
    def run(q, k, v, ctx):
        from sagevideo.sparse import scheduled

        return scheduled.run(name, q, k, v, ctx)

    run.__name__ = name.replace("-", "_")
    return run


def _sparse_params(name: str) -> dict:
    from sagevideo.sparse.scheduled import PARAMS

    return PARAMS[name]


# cost: the kept fraction times the quantized kernel's (density 0.25 / top-p 0.9 keep roughly a quarter)
register(Method(
    "sparse-spatiotemporal", _sparse_method("sparse-spatiotemporal"), cost=0.2,
    params=_sparse_params("sparse-spatiotemporal"), row_local=False, needs_warmup=True,
    description="spatial/temporal heads profiled online, block-sparse quantized kernel (Sparse VideoGen)",
))
register(Method(
    "sparse-semantic", _sparse_method("sparse-semantic"), cost=0.2,
    params=_sparse_params("sparse-semantic"), row_local=False, needs_warmup=True,
    description="k-means token permutation with a top-p block budget, quantized kernel (Sparse VideoGen 2)",
))
