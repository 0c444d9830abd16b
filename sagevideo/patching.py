"""Patch a diffusers video pipeline's DiT self-attention with scheduled quantized (later sparse) attention.

Public API::

    handle = sagevideo.patch_pipeline(pipe, config=None)      # Wan 2.1/2.2, HunyuanVideo (1.5), CogVideoX
    handle = sagevideo.patch_transformer(transformer, config, scheduler=None)
    ...
    handle.unpatch()                                         # or: with sagevideo.patch_pipeline(pipe): ...

What changes, and nothing else:

* Wan, HunyuanVideo, HunyuanVideo 1.5 — their processors call diffusers' attention dispatch; sagevideo
  registers one backend (``"sagevideo"``) in diffusers' registry and sets it on the DiT's *self-attention*
  processors only (``processor._attention_backend``). Cross-attention, the token refiner, the VAE and the text
  encoders keep their backends. ``F.scaled_dot_product_attention`` is never replaced.
* CogVideoX — its processors call SDPA directly, so the DiT's processors are replaced by
  :class:`sagevideo.pipelines.cogvideox.CogVideoXScheduledProcessor`.

How a call knows its step and layer:

* a diffusers ``ModelHook`` on the transformer reads the forward's inputs: the family's file turns the latent
  shape and patch size into the video grid and finds where the text sits (:class:`~sagevideo.context.TokenLayout`),
  and the timestep goes to the ``sagevideo::step_position`` op, which asks the :class:`~sagevideo.schedule.StepTracker`
  (the pipeline scheduler's step index) at run time;
* each patched attention module knows its layer index (a forward pre-hook names the current *site* for the
  dispatch backend; the CogVideoX processor holds it).

The attention itself runs in the ``sagevideo::scheduled_attention`` custom op. Resolving the schedule happens
inside the op at run time, so under ``torch.compile`` (``fullgraph=True`` works) one graph serves every step: the
compiled graph does not specialise on the step, and a method switch at 20 % of the trajectory causes no
recompilation. The op's arguments are the tensors, the position tensor and integers naming the patch state,
layer and token layout.

Context parallelism (diffusers ``ContextParallelConfig``, Wan): the backend is registered as CP-capable and hands
diffusers' templated Ulysses/Ring attention a forward op that calls the scheduled op; under Ring it returns the
LSE the merge needs. Under Ulysses each rank sees a contiguous block of heads (``ctx.heads`` are global indices).

diffusers' attention registry is private API: :func:`check_diffusers_internals` verifies everything this module
relies on and fails loudly; the tested range is ``TESTED_DIFFUSERS``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools
import logging
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from sagevideo import methods
from sagevideo.config import AttentionConfig, StepUnknownError
from sagevideo.context import UNKNOWN_LAYOUT, AttentionContext, RingChunk, TokenLayout
from sagevideo.guard import Guard, GuardEvent, all_finite
from sagevideo.schedule import Choice, Schedule, StepTracker

__all__ = [
    "FamilySpec",
    "PatchHandle",
    "patch_pipeline",
    "patch_transformer",
    "family_spec",
    "FAMILIES",
    "BACKEND_NAME",
    "TESTED_DIFFUSERS",
    "check_diffusers_internals",
    "AlreadyPatchedError",
]

logger = logging.getLogger("sagevideo")

FAMILIES = ("wan", "hunyuan_video", "hunyuan_video15", "cogvideox")
BACKEND_NAME = "sagevideo"
HOOK_NAME = "sagevideo"
# diffusers versions whose private attention registry this module was tested against (pyproject pins the same)
TESTED_DIFFUSERS = (">=0.41", "<0.43")


class AlreadyPatchedError(RuntimeError):
    """The model is already patched by sagevideo."""


# ----------------------------------------------------------------------------------------------------------
# Family description (one instance per file under pipelines/)
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """How one model family is patched. Each ``pipelines/<family>.py`` defines ``SPEC``.

    Attributes:
        name: family name used in configs (``"wan"``).
        pipelines: diffusers pipeline class names :func:`patch_pipeline` accepts (subclasses too).
        transformers: diffusers transformer class names :func:`patch_transformer` accepts.
        transformer_attrs: pipeline attributes that may hold a transformer to patch (Wan 2.2: two experts).
        attention_modules: ``fn(transformer) -> list[module]``, the DiT self-attention modules in layer order.
        processors: processor class names expected on those modules (anything else is refused: a user or
            another library has replaced them, and silently dropping that would be wrong).
        route: ``"backend"`` (set diffusers' dispatch backend on the processors) or ``"processor"`` (replace
            the processors with ``make_processor(site)``).
        token_layout: ``fn(transformer, args, kwargs) -> TokenLayout`` from the transformer's forward inputs.
        timestep: ``fn(args, kwargs) -> Tensor | float | None``, the forward's timestep argument.
        key_padding_mask: ``fn(attn_mask, query, key) -> (B, S_kv) bool | None``: the processor's mask as a key
            padding mask (BSHD tensors).
        default_config: the family's default :class:`AttentionConfig`.
        make_processor: for ``route="processor"``: ``fn(site, original_processor) -> processor``.
        sparse_warmup: ``(fraction of steps, layers)`` that run quantized dense attention before a sparse method
            takes over (``sagevideo.config.method_config``); the values of Sparse VideoGen's scripts.
    """

    name: str
    pipelines: tuple[str, ...]
    transformers: tuple[str, ...]
    transformer_attrs: tuple[str, ...]
    attention_modules: Callable[[torch.nn.Module], list]
    processors: tuple[str, ...]
    route: str
    token_layout: Callable[..., TokenLayout]
    timestep: Callable[..., Any]
    key_padding_mask: Callable[..., torch.Tensor | None]
    default_config: AttentionConfig
    make_processor: Callable[..., Any] | None = None
    sparse_warmup: tuple[float, tuple[int, ...]] = (0.2, (0,))

    def __post_init__(self):
        fraction, layers = self.sparse_warmup
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"FamilySpec.sparse_warmup fraction must be in [0, 1), got {fraction}")
        if self.route not in ("backend", "processor"):
            raise ValueError(f"FamilySpec.route must be 'backend' or 'processor', got {self.route!r}")
        if self.route == "processor" and self.make_processor is None:
            raise ValueError("FamilySpec with route='processor' needs make_processor")


@functools.cache
def family_spec(name: str) -> FamilySpec:
    """The :class:`FamilySpec` of ``name`` (imports ``sagevideo.pipelines.<name>``)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; sagevideo supports {', '.join(FAMILIES)}")
    return importlib.import_module(f"sagevideo.pipelines.{name}").SPEC


def _class_names(obj) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def _supported_pipelines() -> str:
    return ", ".join(p for f in FAMILIES for p in family_spec(f).pipelines)


def arg(args: tuple, kwargs: dict, index: int, name: str, default=None):
    """A forward argument given by position ``index`` or by keyword ``name`` (helper for family files)."""
    if name in kwargs:
        return kwargs[name]
    if len(args) > index:
        return args[index]
    return default


# ----------------------------------------------------------------------------------------------------------
# Run-time registries (the custom ops receive ints that name these)
# ----------------------------------------------------------------------------------------------------------

_STATE_IDS = itertools.count(1)
_STATES: dict[int, _PatchState] = {}
_LAYOUT_IDS: dict[TokenLayout, int] = {UNKNOWN_LAYOUT: 0}
_LAYOUTS: list[TokenLayout] = [UNKNOWN_LAYOUT]


def _layout_id(layout: TokenLayout) -> int:
    i = _LAYOUT_IDS.get(layout)
    if i is None:
        i = _LAYOUT_IDS[layout] = len(_LAYOUTS)
        _LAYOUTS.append(layout)
    return i


class _Current:
    """The self-attention site whose processor is running (set by the module pre-hook, read by the backend)."""

    site: _Site | None = None


_CURRENT = _Current()


@dataclasses.dataclass(eq=False)
class _Site:
    state: _PatchState
    layer: int

    def attend(self, q, k, v, key_padding_mask, scale, return_lse, tensor_layout, cp=(0, 0, 0, 0)):
        """Call the scheduled op for this site; returns ``(out, lse)`` (lse empty unless ``return_lse``)."""
        st = self.state
        return torch.ops.sagevideo.scheduled_attention(
            q, k, v, key_padding_mask, st.position, tensor_layout, scale, return_lse, st.id, self.layer,
            st.layout_id, list(cp),
        )


class _PatchState:
    """Everything one patched transformer needs at run time."""

    def __init__(self, model, name: str, spec: FamilySpec, config: AttentionConfig, num_layers: int,
                 tracker: StepTracker, guard: Guard):
        self.id = next(_STATE_IDS)
        self.model_ref = weakref.ref(model)
        self.name = name
        self.spec = spec
        self.schedule = Schedule(config, num_layers)
        self.num_layers = num_layers
        self.tracker = tracker
        self.guard = guard
        self.position: torch.Tensor | None = None  # set by the transformer hook for the current forward
        self.layout_id = 0
        self.observed: dict[tuple[int | None, int], str] = {}
        self.calibrator = None  # set by sagevideo.calibrate while it records
        self.store: dict = {}  # state of stateful methods (sparse centroids, head classes), see AttentionContext
        # (module, processor or backend installed by the patch), checked before every forward
        self.installed: list[tuple[torch.nn.Module, Any]] = []

    def check_still_patched(self) -> None:
        """Refuse to run when something replaced what the patch installed (``set_attention_backend``,
        ``set_attn_processor``): the schedule would silently stop applying to those layers."""
        backend = self.spec.route == "backend"
        for layer, (module, installed) in enumerate(self.installed):
            current = module.processor._attention_backend if backend else module.processor
            if current is not installed:
                what = "attention backend" if backend else "attention processor"
                raise RuntimeError(
                    f"sagevideo: the {what} of {self.name} layer {layer} was replaced after patching (by "
                    "set_attention_backend/set_attn_processor?), so the schedule no longer applies there; call "
                    "handle.unpatch() before changing attention, then patch again"
                )

    # -- the body of sagevideo::scheduled_attention ----------------------------------------------------

    def run(self, q, k, v, kpm, step, num_steps, tensor_layout, scale, return_lse, layer, layout, cp):
        hdim = 2 if tensor_layout == "BSHD" else 1
        head_offset, ring_rank, ring_world, kv_rank = cp
        heads = tuple(range(head_offset, head_offset + q.shape[hdim]))
        ring = RingChunk(ring_rank, ring_world, kv_rank) if ring_world > 1 else None
        base = AttentionContext(
            step=step, num_steps=num_steps, layer=layer, num_layers=self.num_layers, layout=layout,
            tensor_layout=tensor_layout, heads=heads, scale=scale, key_padding_mask=kpm, return_lse=return_lse,
            ring=ring, store=self.store,
        )
        if self.calibrator is not None:
            return self.calibrator.observe(self, q, k, v, base)
        try:
            choices = self.schedule.resolve(step, num_steps, layer, heads)
        except StepUnknownError as exc:
            raise StepUnknownError(f"{self.name} layer {layer}: {exc}") from None
        out, lse = run_choices(choices, q, k, v, base)
        label = "/".join(c.label for c in choices)
        if self.guard.enabled and any(c.method != "dense" for c in choices) and not all_finite(out):
            self.guard.tripped(GuardEvent(self.name, step, layer, label))
            out, lse = run_choices((Choice("dense", {}),), q, k, v, base)
            label += "→dense(guard)"
        self.observed[(step, layer)] = label
        return out, lse


def run_choices(choices: Sequence[Choice], q, k, v, base: AttentionContext):
    """Run each choice on its heads and assemble ``(out, lse)``; lse is an empty tensor unless requested."""
    hdim = 2 if base.tensor_layout == "BSHD" else 1
    if len(choices) == 1 and choices[0].heads is None:
        c = choices[0]
        out, lse = _call_method(c, q, k, v, dataclasses.replace(base, params=c.params))
    else:
        if k.shape[hdim] != q.shape[hdim]:
            raise NotImplementedError("per-head rules with grouped-query attention (fewer K/V heads) are not supported")
        out = torch.empty_like(q)
        lse = _new_lse(q) if base.return_lse else None
        offset = base.heads[0]
        for c in choices:
            idx = torch.tensor([h - offset for h in c.heads], device=q.device)
            sub = [t.index_select(hdim, idx) for t in (q, k, v)]
            o, l = _call_method(c, *sub, dataclasses.replace(base, params=c.params, heads=c.heads))
            out.index_copy_(hdim, idx, o)
            if lse is not None:
                lse.index_copy_(hdim, idx, l)
    if lse is None:
        lse = q.new_empty((0,), dtype=torch.float32)
    return out, lse


def _new_lse(q: torch.Tensor) -> torch.Tensor:
    """An fp32 LSE buffer for ``q``: ``q.shape[:3]``, i.e. ``(B, S, H)`` for BSHD and ``(B, H, S)`` for BHSD."""
    return q.new_empty(q.shape[:3], dtype=torch.float32)


def _call_method(choice: Choice, q, k, v, ctx: AttentionContext):
    method = methods.get(choice.method)
    res = method.fn(q, k, v, ctx)
    if not (isinstance(res, tuple) and len(res) == 2):
        raise TypeError(f"attention method {choice.method!r} must return (out, lse or None), got {type(res).__name__}")
    out, lse = res
    if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(
            f"attention method {choice.method!r} returned {getattr(out, 'shape', out)} "
            f"{getattr(out, 'dtype', '')}; expected {tuple(q.shape)} {q.dtype} (the layout and dtype of q)"
        )
    if ctx.return_lse and lse is None:
        raise ValueError(f"attention method {choice.method!r} did not return the LSE that ring attention needs")
    return out, lse


# ----------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, resolved at run time
# ----------------------------------------------------------------------------------------------------------


def _state(state_id: int) -> _PatchState:
    st = _STATES.get(state_id)
    if st is None:
        raise RuntimeError(
            "sagevideo: this attention call belongs to a patch that was removed (handle.unpatch()); a compiled "
            "graph traced while the model was patched is still in use — recompile the model (torch._dynamo.reset())"
        )
    return st


@torch.library.custom_op("sagevideo::step_position", mutates_args=())
def _step_position(timestep: torch.Tensor, state_id: int) -> torch.Tensor:
    """``[step, num_steps]`` (int64, CPU) of the current transformer call, ``[-1, -1]`` when unknown."""
    st = _state(state_id)
    pos = st.tracker.position(lambda: float(timestep.detach().float().max()))
    return torch.tensor(pos if pos is not None else (-1, -1), dtype=torch.int64)


@_step_position.register_fake
def _(timestep, state_id):
    return torch.empty(2, dtype=torch.int64, device="cpu")


@torch.library.custom_op("sagevideo::scheduled_attention", mutates_args=())
def _scheduled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    position: torch.Tensor | None,
    tensor_layout: str,
    scale: float | None,
    return_lse: bool,
    state_id: int,
    layer: int,
    layout_id: int,
    cp: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    st = _state(state_id)
    step = num_steps = None
    if position is not None:
        s, n = position.tolist()
        if n > 0:
            step, num_steps = s, n
    return st.run(q, k, v, key_padding_mask, step, num_steps, tensor_layout, scale, return_lse, layer,
                  _LAYOUTS[layout_id], cp)


@_scheduled_attention.register_fake
def _(q, k, v, key_padding_mask, position, tensor_layout, scale, return_lse, state_id, layer, layout_id, cp):
    lse = _new_lse(q) if return_lse else q.new_empty((0,), dtype=torch.float32)
    return torch.empty_like(q), lse


# ----------------------------------------------------------------------------------------------------------
# diffusers integration: the dispatch backend (private API, checked) and the transformer hook
# ----------------------------------------------------------------------------------------------------------


def check_diffusers_internals() -> None:
    """Fail loudly if diffusers' private attention-dispatch internals this module uses have changed.

    Checks ``AttentionBackendName`` (a str Enum whose member maps can take one more member),
    ``_AttentionBackendRegistry`` (``_backends``, ``_constraints``, ``_supported_arg_names``,
    ``_supports_context_parallel``), ``dispatch_attention_fn`` passing ``attn_mask``/``scale``/
    ``_parallel_config`` through, ``_templated_context_parallel_attention`` taking ``forward_op``/``backward_op``,
    and ``diffusers.hooks.HookRegistry``/``ModelHook``.
    """
    import inspect

    import diffusers
    from diffusers.models import attention_dispatch as ad

    problems = []
    for name in ("AttentionBackendName", "_AttentionBackendRegistry", "dispatch_attention_fn",
                 "_templated_context_parallel_attention"):
        if not hasattr(ad, name):
            problems.append(f"diffusers.models.attention_dispatch.{name} is missing")
    if not problems:
        enum = ad.AttentionBackendName
        for attr in ("_member_map_", "_value2member_map_", "_member_names_"):
            if attr not in vars(enum):  # not inherited from Enum: the class's own member tables
                problems.append(f"AttentionBackendName.{attr} is missing")
        reg = ad._AttentionBackendRegistry
        for attr, kind in (("_backends", dict), ("_constraints", dict), ("_supported_arg_names", dict),
                           ("_supports_context_parallel", set)):
            if not isinstance(getattr(reg, attr, None), kind):
                problems.append(f"_AttentionBackendRegistry.{attr} is not a {kind.__name__}")
        if not callable(getattr(reg, "register", None)):
            problems.append("_AttentionBackendRegistry.register is missing")
        params = inspect.signature(ad.dispatch_attention_fn).parameters
        for p in ("attn_mask", "scale", "backend", "parallel_config"):
            if p not in params:
                problems.append(f"dispatch_attention_fn has no parameter {p!r}")
        params = inspect.signature(ad._templated_context_parallel_attention).parameters
        for p in ("forward_op", "backward_op", "_parallel_config"):
            if p not in params:
                problems.append(f"_templated_context_parallel_attention has no parameter {p!r}")
    try:
        from diffusers.hooks import HookRegistry, ModelHook

        for attr in ("check_if_exists_or_initialize", "register_hook", "remove_hook"):
            if not hasattr(HookRegistry, attr):
                problems.append(f"diffusers.hooks.HookRegistry.{attr} is missing")
        if not hasattr(ModelHook, "pre_forward"):
            problems.append("diffusers.hooks.ModelHook.pre_forward is missing")
    except ImportError as exc:
        problems.append(f"diffusers.hooks cannot be imported ({exc})")
    if problems:
        raise RuntimeError(
            f"sagevideo: diffusers {diffusers.__version__} changed private internals sagevideo relies on "
            f"(tested with diffusers{','.join(TESTED_DIFFUSERS)}):\n  - " + "\n  - ".join(problems)
        )


@functools.cache
def _backend_member():
    """Register the ``sagevideo`` backend in diffusers' registry (once) and return its enum member."""
    check_diffusers_internals()
    from diffusers.models import attention_dispatch as ad

    enum = ad.AttentionBackendName
    member = enum._value2member_map_.get(BACKEND_NAME)
    if member is None:
        # AttentionBackendName is a closed Enum; add one pseudo-member the way Enum itself stores members
        member = str.__new__(enum, BACKEND_NAME)
        member._name_ = "SAGEVIDEO"
        member._value_ = BACKEND_NAME
        member.__objclass__ = enum
        enum._member_map_["SAGEVIDEO"] = member
        enum._value2member_map_[BACKEND_NAME] = member
        enum._member_names_.append("SAGEVIDEO")
    ad._AttentionBackendRegistry.register(member, constraints=[], supports_context_parallel=True)(_dispatch_backend)
    if ad.AttentionBackendName(BACKEND_NAME) is not member or member not in ad._AttentionBackendRegistry._backends:
        raise RuntimeError("sagevideo: registering the attention backend in diffusers failed")
    return member


def _dispatch_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _parallel_config=None,
):
    """diffusers backend ``"sagevideo"``: BSHD in and out, scheduled per (step, layer, head)."""
    site = _CURRENT.site
    if site is None:
        raise RuntimeError(
            "sagevideo's diffusers attention backend was called outside a self-attention module patched by "
            "sagevideo; it cannot be used with set_attention_backend() — use sagevideo.patch_pipeline()"
        )
    if dropout_p != 0.0 or is_causal:
        raise ValueError("sagevideo attention supports neither dropout nor causal masking (inference only)")
    spec = site.state.spec
    if _parallel_config is None:
        kpm = spec.key_padding_mask(attn_mask, query, key)
        out, lse = site.attend(query, key, value, kpm, scale, return_lse, "BSHD")
        return (out, lse) if return_lse else out

    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    cp_config = _parallel_config.context_parallel_config
    ring_world = cp_config.ring_degree
    ring_rank = cp_config._ring_local_rank if ring_world > 1 else 0
    ulysses_rank = cp_config._ulysses_local_rank if cp_config.ulysses_degree > 1 else 0
    # Ulysses gives rank r the heads [r·⌈H/n⌉, ...): with ulysses_anything and H not divisible by n, diffusers
    # pads the heads to a multiple of n and the last rank holds fewer, so the offset comes from the global count
    # (query here is still (B, S_local, H_global, D)), not from the local one.
    heads_per_rank = -(-query.shape[2] // max(cp_config.ulysses_degree, 1))
    calls = itertools.count()

    def forward_op(ctx, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                   _save_ctx=True, _parallel_config=None):
        # Ulysses: q holds heads from rank·⌈H/n⌉ on, of the full sequence. Ring: the i-th call of this attention
        # sees the keys of ring rank (rank + i) mod world.
        kv_rank = (ring_rank + next(calls)) % ring_world if ring_world > 1 else 0
        cp = (ulysses_rank * heads_per_rank, ring_rank, ring_world, kv_rank)
        out, lse = site.attend(q, k, v, spec.key_padding_mask(mask, q, k), scale, return_lse, "BSHD", cp)
        return (out, lse) if return_lse else out

    def backward_op(*args, **kwargs):
        raise NotImplementedError("sagevideo attention is inference-only (no backward under context parallelism)")

    return _templated_context_parallel_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
        forward_op=forward_op, backward_op=backward_op, _parallel_config=_parallel_config,
    )


def _enter_site(site: _Site, module, args):
    _CURRENT.site = site


def _leave_site(module, args, output):
    _CURRENT.site = None


def _make_transformer_hook(state: _PatchState):
    from diffusers.hooks import ModelHook

    class _SageVideoHook(ModelHook):
        """Records the token layout and the step position of each transformer forward."""

        def pre_forward(self, module, *args, **kwargs):
            st = state
            st.check_still_patched()
            layout = st.spec.token_layout(module, args, kwargs)
            st.layout_id = _layout_id(layout)
            t = st.spec.timestep(args, kwargs)
            if t is None:
                st.position = None
            else:
                if not isinstance(t, torch.Tensor):
                    t = torch.tensor(float(t))
                st.position = torch.ops.sagevideo.step_position(t, st.id)
            return args, kwargs

        def post_forward(self, module, output):
            state.position = None
            return output

    return _SageVideoHook()


# ----------------------------------------------------------------------------------------------------------
# The handle
# ----------------------------------------------------------------------------------------------------------


class PatchHandle:
    """What :func:`patch_pipeline` / :func:`patch_transformer` return.

    ``unpatch()`` (or leaving a ``with`` block) restores every processor, backend and hook, after which the
    model's outputs are bit-identical to an unpatched run. ``observed`` shows which method each (step, layer)
    actually ran; ``guard_events`` lists calls the guard recomputed dense.
    """

    def __init__(self, family: str, config: AttentionConfig):
        self.family = family
        self.config = config
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._states: list[_PatchState] = []
        self.guard = Guard(enabled=config.guard)
        self._active = True

    # -- inspection -------------------------------------------------------------------------------------

    @property
    def is_patched(self) -> bool:
        return self._active

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        return {st.name: st.model_ref() for st in self._states}

    @property
    def observed(self) -> dict[str, dict[tuple[int | None, int], str]]:
        """``{model name: {(step, layer): method label}}`` of the calls that ran since the last reset."""
        return {st.name: dict(st.observed) for st in self._states}

    def reset_observed(self) -> None:
        for st in self._states:
            st.observed.clear()

    @property
    def guard_events(self) -> list[GuardEvent]:
        return list(self.guard.events)

    def sparse_report(self) -> dict[str, Any]:
        """What the sparse methods did, per patched model: ``{"calls", "mean_density", "heads", "layers"}`` with
        the call-weighted mean density over every (layer, heads) state, the head-class histogram of the last
        spatial/temporal profiles, and each state's own :meth:`~sagevideo.sparse.api.SparseState.report`
        (keyed ``"method/layer/heads"``). Empty when no sparse method ran."""
        out: dict[str, Any] = {}
        for st in self._states:
            layers = {f"{key[0]}/{key[1]}/{key[2]}": state.report() for key, state in st.store.items()
                      if isinstance(key, tuple) and hasattr(state, "report")}
            if not layers:
                continue
            calls = sum(r["calls"] for r in layers.values())
            dens = sum(r["mean_density"] * r["calls"] for r in layers.values() if r["mean_density"] is not None)
            heads: dict[str, int] = {}
            for r in layers.values():
                for name, n in r.get("heads", {}).items():
                    heads[name] = heads.get(name, 0) + n
            out[st.name] = {"calls": calls, "mean_density": dens / calls if calls else None, "heads": heads,
                            "layers": layers}
        return out

    # -- step control (bare transformers) -----------------------------------------------------------------

    def set_step(self, step: int, num_steps: int) -> None:
        """Fix the denoising step of following calls (for transformers patched without a scheduler)."""
        for st in self._states:
            st.tracker.set_step(step, num_steps)

    def clear_step(self) -> None:
        for st in self._states:
            st.tracker.clear_step()

    # -- undo ---------------------------------------------------------------------------------------------

    def unpatch(self) -> None:
        """Restore everything patching changed (a second call does nothing)."""
        if not self._active:
            return
        errors = []
        for what, fn in reversed(self._undo):
            try:
                fn()
            except Exception as exc:  # keep restoring the rest, then report
                errors.append(f"{what}: {exc!r}")
        self._undo.clear()
        for st in self._states:
            _STATES.pop(st.id, None)
        self._active = False
        if not _STATES:  # no patch left: free the semantic plan graphs (input copies and memory pools)
            semantic = sys.modules.get("sagevideo.sparse.semantic")
            if semantic is not None:
                semantic.PLAN_GRAPHS.clear()
        if errors:
            raise RuntimeError("sagevideo: unpatch could not restore everything:\n  " + "\n  ".join(errors))

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = "patched" if self._active else "unpatched"
        return f"PatchHandle(family={self.family!r}, models={[st.name for st in self._states]}, {state})"


# ----------------------------------------------------------------------------------------------------------
# Patching
# ----------------------------------------------------------------------------------------------------------


def _detect_family(obj, attr: str) -> FamilySpec | None:
    names = _class_names(obj)
    for f in FAMILIES:
        spec = family_spec(f)
        if names & set(getattr(spec, attr)):
            return spec
    return None


def _check_config(config: AttentionConfig | None, spec: FamilySpec) -> AttentionConfig:
    if config is None:
        return spec.default_config
    if not isinstance(config, AttentionConfig):
        raise TypeError(
            f"config must be a sagevideo.AttentionConfig (or None for the {spec.name} default), got "
            f"{type(config).__name__}; load JSON with AttentionConfig.load(path) or sagevideo.profiles.load(name)"
        )
    if config.family is not None and config.family != spec.name:
        raise ValueError(
            f"this attention config was made for the {config.family!r} family, but the model is {spec.name!r}"
        )
    return config


def _patch_one(handle: PatchHandle, model, spec: FamilySpec, config: AttentionConfig, name: str,
               scheduler_fn: Callable[[], Any] | None) -> None:
    _refuse_compiled(model, name)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{name} is not a torch.nn.Module ({type(model).__name__})")
    if getattr(model, "_sagevideo_state", None) is not None:
        raise AlreadyPatchedError(
            f"{name} ({type(model).__name__}) is already patched by sagevideo; call handle.unpatch() before "
            "patching it again"
        )
    modules = spec.attention_modules(model)
    if not modules:
        raise ValueError(f"{name}: found no self-attention modules to patch in {type(model).__name__}")
    for i, m in enumerate(modules):
        proc = getattr(m, "processor", None)
        if type(proc).__name__ not in spec.processors:
            raise TypeError(
                f"{name} layer {i}: attention processor is {type(proc).__name__}, expected one of "
                f"{list(spec.processors)} (diffusers' own). Another library or set_attn_processor() replaced it; "
                "sagevideo will not silently drop that — restore the default processors first"
            )

    tracker = StepTracker(scheduler_fn)
    state = _PatchState(model, name, spec, config, len(modules), tracker, handle.guard)
    _STATES[state.id] = state
    handle._states.append(state)
    handle._undo.append((f"{name} registry", lambda: _STATES.pop(state.id, None)))

    # marker against double patching
    model._sagevideo_state = state
    handle._undo.append((f"{name} marker", lambda: delattr(model, "_sagevideo_state")))

    if spec.route == "backend":
        member = _backend_member()
        for i, m in enumerate(modules):
            proc = m.processor
            old = proc.__dict__.get("_attention_backend", _MISSING)
            proc._attention_backend = member
            state.installed.append((m, member))
            handle._undo.append((f"{name} layer {i} backend", functools.partial(_restore_attr, proc, "_attention_backend", old)))
            site = _Site(state, i)
            h1 = m.register_forward_pre_hook(functools.partial(_enter_site, site))
            h2 = m.register_forward_hook(_leave_site, always_call=True)
            handle._undo.append((f"{name} layer {i} hooks", functools.partial(_remove_hooks, h1, h2)))
    else:
        for i, m in enumerate(modules):
            old = m.processor
            m.processor = spec.make_processor(_Site(state, i), old)
            state.installed.append((m, m.processor))
            handle._undo.append((f"{name} layer {i} processor", functools.partial(setattr, m, "processor", old)))

    from diffusers.hooks import HookRegistry

    had_registry = "_diffusers_hook" in model.__dict__
    had_forward = "forward" in model.__dict__
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(_make_transformer_hook(state), HOOK_NAME)

    def remove_hook():
        registry.remove_hook(HOOK_NAME, recurse=False)
        # leave the module as we found it when nobody else uses the registry we created
        if not registry.hooks:
            if not had_forward:
                model.__dict__.pop("forward", None)
            if not had_registry:
                model.__dict__.pop("_diffusers_hook", None)

    handle._undo.append((f"{name} transformer hook", remove_hook))


_MISSING = object()


def _refuse_compiled(model, name: str) -> None:
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) or getattr(model, "_compiled_call_impl", None):
        raise TypeError(f"{name} is already compiled by torch.compile; patch the model first, then compile it")


def _restore_attr(obj, attr, old):
    if old is _MISSING:
        obj.__dict__.pop(attr, None)
    else:
        setattr(obj, attr, old)


def _remove_hooks(*hooks):
    for h in hooks:
        h.remove()


def patch_transformer(
    model: torch.nn.Module,
    config: AttentionConfig | None = None,
    *,
    scheduler: Any = None,
    name: str = "transformer",
) -> PatchHandle:
    """Patch a bare DiT (``WanTransformer3DModel``, ``HunyuanVideoTransformer3DModel``,
    ``HunyuanVideo15Transformer3DModel``, ``CogVideoXTransformer3DModel``).

    Args:
        model: the transformer (not yet ``torch.compile``-d; compile after patching).
        config: the schedule; None = the family's default (``sagevideo.default_config(family)``).
        scheduler: the diffusers scheduler driving the denoising loop, so that rules with ``steps`` know the
            step. Without it, call ``handle.set_step(step, num_steps)``; a step-dependent rule with an unknown
            step raises.
        name: label used in observations and messages.
    """
    _refuse_compiled(model, name)
    spec = _detect_family(model, "transformers")
    if spec is None:
        supported = ", ".join(t for f in FAMILIES for t in family_spec(f).transformers)
        raise ValueError(f"sagevideo.patch_transformer supports {supported}; got {type(model).__name__}")
    config = _check_config(config, spec)
    handle = PatchHandle(spec.name, config)
    scheduler_fn = None if scheduler is None else (lambda: scheduler)
    try:
        _patch_one(handle, model, spec, config, name, scheduler_fn)
    except BaseException:
        handle.unpatch()
        raise
    return handle


def patch_pipeline(pipe, config: AttentionConfig | None = None) -> PatchHandle:
    """Patch the DiT self-attention of a diffusers video pipeline; returns a :class:`PatchHandle`.

    Supported: ``WanPipeline``, ``WanImageToVideoPipeline``, ``WanVideoToVideoPipeline`` (Wan 2.1 and Wan 2.2:
    ``transformer`` and ``transformer_2`` both patched), ``HunyuanVideoPipeline``,
    ``HunyuanVideoImageToVideoPipeline``, ``HunyuanVideo15Pipeline``, ``HunyuanVideo15ImageToVideoPipeline``,
    ``CogVideoXPipeline``, ``CogVideoXImageToVideoPipeline``, ``CogVideoXVideoToVideoPipeline``. Anything else
    is refused with an error listing these.

    The step of each call comes from ``pipe.scheduler`` (looked up at call time, so replacing the scheduler
    after patching is fine). Patch before ``torch.compile``; a second patch of the same pipeline raises.
    """
    spec = _detect_family(pipe, "pipelines")
    if spec is None:
        raise ValueError(
            f"sagevideo.patch_pipeline does not support {type(pipe).__name__}; supported pipelines: "
            f"{_supported_pipelines()} (for another DiT use patch_transformer on a supported transformer class)"
        )
    config = _check_config(config, spec)
    handle = PatchHandle(spec.name, config)
    pipe_ref = weakref.ref(pipe)

    def scheduler_fn():
        p = pipe_ref()
        return None if p is None else getattr(p, "scheduler", None)

    found = [(attr, getattr(pipe, attr, None)) for attr in spec.transformer_attrs]
    found = [(attr, m) for attr, m in found if m is not None]
    if not found:
        raise ValueError(f"{type(pipe).__name__} has no transformer to patch (looked at {list(spec.transformer_attrs)})")
    try:
        for attr, model in found:
            _patch_one(handle, model, spec, config, attr, scheduler_fn)
    except BaseException:
        handle.unpatch()
        raise
    return handle
