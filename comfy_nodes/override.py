"""ComfyUI attention override driven by a sagevideo schedule — importable and testable without ComfyUI.

ComfyUI decorates every attention backend (``comfy/ldm/modules/attention.py``) with ``wrap_attn``: when
``transformer_options["optimized_attention_override"]`` is set, the backend call becomes
``override(func, *args, **kwargs)``, where ``func`` is the backend ComfyUI would have used and ``args``/``kwargs``
are the backend's own arguments::

    func(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs)

* ``skip_reshape=False``: q, k, v are ``(B, S, H·D)`` (Wan); ``True``: ``(B, H, S, D)`` (flux-style models:
  HunyuanVideo).
* ``skip_output_reshape=False``: the result must be ``(B, S, H·D)``; ``True``: ``(B, H, S, D)``.
* ``mask``: None, a bool mask (True = attend) or an additive float mask, 2-D ``(Sq, Sk)``, 3-D ``(B, Sq, Sk)`` or
  4-D ``(B, H, Sq, Sk)``, any of these dimensions possibly 1 (broadcast).
* ``kwargs`` carry ``transformer_options`` (Wan: ``grid_sizes``, ``block_index``, ``total_blocks``; the sampler:
  ``sigmas``, ``sample_sigmas``, ``cond_or_uncond``), ``low_precision_attention`` (newer ComfyUI: False on Wan
  I2V image cross-attention) and ComfyUI's private ``_inside_attn_wrapper``, passed through untouched.

:func:`make_override` returns such an override. A call runs the sagevideo schedule only when all of these hold;
otherwise it goes, unchanged, to the *fallback* — the override that was already on the model (chained) or, when
there was none, ``func``:

1. ``low_precision_attention`` is not False;
2. it is a self-attention call (``Sq == Skv``; for Wan also ``Sq >= prod(grid_sizes)``): cross-attention to
   the text is left to ComfyUI, as in the diffusers patcher;
3. the mask is None or a key-padding mask (its query and head dimensions are 1; bool, or float with only 0 and
   large negative values): HunyuanVideo's text padding mask is of this kind; anything else falls back;
4. the tensors are on a supported GPU (CUDA, sm80+, Triton importable) — on CPU and other devices the first
   call logs one line and every call falls back. ``allow_cpu=True`` (testing only) runs the torch reference of
   the quantized arithmetic on CPU instead;
5. head_dim <= 128 and the dtype is fp16/bf16/fp32;
6. the schedule's choice for this (step, layer) is not ``dense`` — a dense choice is ComfyUI's own attention.

The step comes from ``transformer_options["sigmas"]`` (the current sigma) looked up in ``sample_sigmas`` (the
whole schedule, ``num_steps + 1`` values ending at the final sigma): ``step = index``, ``num_steps =
len(sample_sigmas) - 1``, so a rule's ``steps`` fraction means the same as in ``sagevideo.patch_pipeline``. The
layer is ``block_index`` (HunyuanVideo's single-stream blocks follow its double-stream blocks: ``layer =
n_double + block_index``); ComfyUI versions that do not set ``block_index`` (e.g. Comfy-Org/ComfyUI a125cd8,
Oct 2025) get the layer by counting the self-attention calls of each forward (see
:meth:`SageOverride._counted_layer`). The decision itself is :class:`sagevideo.schedule.Schedule` and
:func:`sagevideo.patching.run_choices` — the same code the diffusers patcher runs — and a non-finite result is
recomputed with the fallback and counted (:class:`sagevideo.guard.Guard`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from sagevideo.config import AttentionConfig, StepUnknownError
from sagevideo.context import AttentionContext, TokenLayout
from sagevideo.guard import Guard, GuardEvent, all_finite
from sagevideo.ops import MAX_KERNEL_HEAD_DIM
from sagevideo.patching import run_choices
from sagevideo.schedule import Schedule

__all__ = ["SageOverride", "make_override", "step_from_sigmas", "key_padding_mask_from_comfy", "gpu_supported"]

logger = logging.getLogger("sagevideo.comfy")

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# an additive mask value at or below this is "masked out" (ComfyUI uses -finfo.max or -inf)
_MASKED_BELOW = -1e4


# ----------------------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------------------


def gpu_supported(device: torch.device) -> tuple[bool, str]:
    """Whether the quantized kernel can run on ``device``, and why not."""
    if device.type != "cuda":
        return False, f"tensors are on {device.type}, not a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"GPU sm{major}{minor} is below sm80 (INT8 tensor cores of Ampere or newer are needed)"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # depends on the install
        return False, f"Triton is not importable ({exc})"
    return True, ""


def step_from_sigmas(options: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(step, num_steps)`` from ComfyUI's ``sigmas`` (current) and ``sample_sigmas`` (schedule), or None.

    ``sample_sigmas`` has ``num_steps + 1`` values (the last is the final sigma, usually 0); the current sigma is
    looked up by nearest value (relative tolerance 1e-3) and the first match wins.
    """
    sigmas = options.get("sigmas")
    sample_sigmas = options.get("sample_sigmas")
    if not isinstance(sigmas, torch.Tensor) or not isinstance(sample_sigmas, torch.Tensor):
        return None
    if sigmas.numel() == 0 or sample_sigmas.dim() != 1 or sample_sigmas.numel() < 2:
        return None
    current = float(sigmas.reshape(-1)[0])
    values = sample_sigmas.detach().float().cpu().tolist()
    dists = [abs(x - current) for x in values]
    best = min(dists)
    if best > 1e-3 * max(1.0, abs(current)):
        return None
    index = dists.index(best)
    num_steps = len(values) - 1
    if index >= num_steps:  # the final sigma is not a model call of the schedule
        return None
    return index, num_steps


def key_padding_mask_from_comfy(mask: torch.Tensor | None, batch: int, sq: int, skv: int):
    """ComfyUI's mask as a bool ``(B, Skv)`` key-padding mask (True = attend).

    Returns ``(ok, kpm)``: ``(True, None)`` for no mask, ``(True, kpm)`` for a key-padding mask and
    ``(False, None)`` for a mask that is not one (it depends on the query or the head, or is a soft bias).
    """
    if mask is None:
        return True, None
    if not isinstance(mask, torch.Tensor) or mask.dim() < 2 or mask.dim() > 4 or mask.shape[-1] != skv:
        return False, None
    # ComfyUI's broadcasting: 2-D (Sq, Sk) → (1, 1, Sq, Sk); 3-D (B, Sq, Sk) → (B, 1, Sq, Sk)
    m = mask
    if m.dim() == 2:
        m = m.unsqueeze(0)
    if m.dim() == 3:
        m = m.unsqueeze(1)
    if m.shape[1] != 1 or m.shape[2] != 1 or m.shape[0] not in (1, batch):
        return False, None
    m = m[:, 0, 0, :]
    if m.dtype == torch.bool:
        kpm = m
    elif m.is_floating_point():
        keep = m == 0
        drop = m <= _MASKED_BELOW
        if not bool((keep | drop).all()):
            return False, None  # a soft additive bias, not a padding mask
        kpm = keep
    else:
        return False, None
    return True, kpm.expand(batch, skv).contiguous()


def _arg(args: tuple, kwargs: dict, index: int, name: str, default=None):
    if name in kwargs:
        return kwargs[name]
    if len(args) > index:
        return args[index]
    return default


# ----------------------------------------------------------------------------------------------------------
# The override
# ----------------------------------------------------------------------------------------------------------


class SageOverride:
    """Callable ``override(func, *args, **kwargs)`` for ``transformer_options["optimized_attention_override"]``.

    Args:
        config: the schedule.
        previous: the override that was on the model before (chained to when this one does not apply), or None.
        num_layers: number of transformer blocks when known at patch time (validates layer rules early);
            otherwise taken from ``total_blocks`` at run time.
        family: ``"wan"``, ``"hunyuan_video"`` or None (only used in messages and the token layout).
        allow_cpu: run the torch reference of the quantized arithmetic on CPU tensors. For tests only: it is
            slower than ComfyUI's attention.
    """

    def __init__(self, config: AttentionConfig, previous: Callable | None = None, *, num_layers: int | None = None,
                 family: str | None = None, allow_cpu: bool = False):
        if not isinstance(config, AttentionConfig):
            raise TypeError(f"expected an AttentionConfig, got {type(config).__name__}")
        if previous is not None and not callable(previous):
            raise TypeError("the model's existing optimized_attention_override is not callable")
        self.config = config
        self.previous = previous
        self.family = family
        self.allow_cpu = allow_cpu
        self.num_layers = num_layers
        self.guard = Guard(config.guard)
        self.observed: dict[tuple[int | None, int], str] = {}
        self.calls = {"sagevideo": 0, "fallback": 0}
        self._schedules: dict[int, Schedule] = {}
        self.store: dict = {}  # state of stateful methods (sparse centroids, head classes) across steps
        self._said: set[str] = set()
        self._double_blocks = 0  # HunyuanVideo: number of double-stream blocks seen (offset of single ones)
        self._step_cache: tuple[Any, Any, tuple[int, int] | None] | None = None
        self._forward: Any = None  # the transformer_options dict of the current forward (layer counting)
        self._forward_len = -1
        self._forward_count = 0
        if num_layers is not None:
            self._schedule(num_layers)  # raises now (at node execution) for a rule naming a missing layer

    def __deepcopy__(self, memo):
        # ComfyUI copies model_options (sometimes deeply) when it clones a model; the override behaves like a
        # function there: the config is immutable and the counters describe the run, so copies share it
        return self

    # -- helpers ----------------------------------------------------------------------------------------

    def _once(self, key: str, message: str, *args) -> None:
        if key in self._said:
            return
        self._said.add(key)
        logger.warning(message, *args)

    def _schedule(self, num_layers: int) -> Schedule:
        s = self._schedules.get(num_layers)
        if s is None:
            s = self._schedules[num_layers] = Schedule(self.config, num_layers)
        return s

    def _fallback(self, func, args, kwargs):
        self.calls["fallback"] += 1
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def _position(self, options) -> tuple[int, int] | None:
        # one lookup (one host sync) per model call: every block of a forward shares the same sigmas tensor
        sig, ss = options.get("sigmas"), options.get("sample_sigmas")
        cache = self._step_cache
        if cache is not None and cache[0] is sig and cache[1] is ss:
            return cache[2]
        pos = step_from_sigmas(options)
        self._step_cache = (sig, ss, pos)
        return pos

    def _layer(self, options, seq_len: int) -> tuple[int, int] | None:
        index = options.get("block_index")
        total = options.get("total_blocks")
        if not isinstance(index, int):
            return self._counted_layer(options, seq_len)
        block_type = options.get("block_type")
        if block_type == "double" and isinstance(total, int):
            self._double_blocks = total
        if block_type == "single":
            single_total = total if isinstance(total, int) else None
            index = self._double_blocks + index
            total = None if single_total is None else self._double_blocks + single_total
        if block_type in ("double", "single") and self.num_layers is not None:
            total = self.num_layers  # double + single blocks, counted by the node from the model
        if not isinstance(total, int) or total <= index:
            total = self.num_layers if self.num_layers is not None and self.num_layers > index else index + 1
        return index, total

    def _counted_layer(self, options, seq_len: int) -> tuple[int, int] | None:
        """Layer = how many self-attention calls this forward has made (ComfyUI before ``block_index``).

        ComfyUI copies ``transformer_options`` for every model call, so the dict's identity marks a forward; a
        change of sequence length restarts the count (HunyuanVideo's token refiner runs before the blocks, on
        the text only). The count wraps at the number of blocks (two forwards sharing one dict).
        """
        if self._forward is not options or self._forward_len != seq_len:
            self._forward, self._forward_len, self._forward_count = options, seq_len, 0
        index = self._forward_count
        self._forward_count += 1
        total = self.num_layers if self.num_layers is not None else options.get("total_blocks")
        if isinstance(total, int) and total > 0:
            return index % total, total
        if any(r.layers is not None for r in self.config.rules):
            return None  # a per-block rule cannot be resolved without the number of blocks
        return index, index + 1

    # -- the call ---------------------------------------------------------------------------------------

    def __call__(self, func, *args, **kwargs):
        q, k, v = _arg(args, kwargs, 0, "q"), _arg(args, kwargs, 1, "k"), _arg(args, kwargs, 2, "v")
        heads = _arg(args, kwargs, 3, "heads")
        mask = _arg(args, kwargs, 4, "mask")
        skip_reshape = bool(_arg(args, kwargs, 6, "skip_reshape", False))
        skip_output_reshape = bool(_arg(args, kwargs, 7, "skip_output_reshape", False))
        options = kwargs.get("transformer_options") or {}

        if kwargs.get("low_precision_attention", True) is False:
            return self._fallback(func, args, kwargs)
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or not isinstance(heads, int):
            return self._fallback(func, args, kwargs)
        if q.dtype not in _FLOAT_DTYPES or not (q.dtype == k.dtype == v.dtype):
            return self._fallback(func, args, kwargs)

        # shapes in sagevideo terms
        if skip_reshape:
            if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
                return self._fallback(func, args, kwargs)
            layout, b, sq, skv, hd = "BHSD", q.shape[0], q.shape[2], k.shape[2], q.shape[3]
            qs, ks, vs = q, k, v
        else:
            if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or q.shape[-1] % heads or k.shape[-1] % heads:
                return self._fallback(func, args, kwargs)
            layout, b, sq, skv, hd = "BSHD", q.shape[0], q.shape[1], k.shape[1], q.shape[-1] // heads
            qs, ks, vs = (t.view(t.shape[0], t.shape[1], heads, t.shape[2] // heads) for t in (q, k, v))
        if ks.shape != vs.shape or ks.shape[-1] != hd:
            return self._fallback(func, args, kwargs)

        # self-attention only (cross-attention to text is left to ComfyUI, as in the diffusers patcher)
        grid = options.get("grid_sizes")
        grid = tuple(int(g) for g in grid) if grid is not None and len(grid) == 3 else None
        if sq != skv or (grid is not None and sq < math.prod(grid)):
            return self._fallback(func, args, kwargs)
        if hd > MAX_KERNEL_HEAD_DIM:
            return self._fallback(func, args, kwargs)

        ok, reason = gpu_supported(q.device)
        if not ok and not (self.allow_cpu and q.device.type == "cpu"):
            self._once(
                "no-gpu",
                "sagevideo: no supported GPU (%s); the Sage Attention node uses ComfyUI's default attention",
                reason,
            )
            return self._fallback(func, args, kwargs)

        ok, kpm = key_padding_mask_from_comfy(mask, b, sq, skv)
        if not ok:
            self._once(
                "mask",
                "sagevideo: attention mask of shape %s is not a key-padding mask; those calls use ComfyUI's "
                "attention",
                tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__,
            )
            return self._fallback(func, args, kwargs)
        if kpm is not None and kpm.device != q.device:
            kpm = kpm.to(q.device)

        layer_info = self._layer(options, sq)
        if layer_info is None:
            self._once(
                "no-layer",
                "sagevideo: this ComfyUI gives no block_index and the model's block count is unknown, so per-block "
                "rules cannot be applied; those calls use ComfyUI's attention",
            )
            return self._fallback(func, args, kwargs)
        layer, num_layers = layer_info
        position = self._position(options)
        step, num_steps = position if position is not None else (None, None)

        try:
            schedule = self._schedule(num_layers)
            choices = schedule.resolve(step, num_steps, layer, tuple(range(heads)))
        except (StepUnknownError, ValueError) as exc:
            self._once(
                "resolve", "sagevideo: cannot resolve the attention schedule (%s); using ComfyUI's attention", exc
            )
            return self._fallback(func, args, kwargs)
        label = "/".join(c.label for c in choices)
        if all(c.method == "dense" for c in choices):
            self.observed[(step, layer)] = "dense(comfy)"
            return self._fallback(func, args, kwargs)

        ctx = AttentionContext(
            step=step, num_steps=num_steps, layer=layer, num_layers=num_layers,
            layout=TokenLayout(self.family or "", grid=grid if grid is not None and math.prod(grid) == sq else None),
            tensor_layout=layout, heads=tuple(range(heads)), key_padding_mask=kpm, store=self.store,
        )
        out, _ = run_choices(choices, qs, ks, vs, ctx)
        if self.guard.enabled and not all_finite(out):
            self.guard.tripped(GuardEvent(self.family or "comfy", step, layer, label))
            self.observed[(step, layer)] = label + "→fallback(guard)"
            return self._fallback(func, args, kwargs)
        self.calls["sagevideo"] += 1
        self.observed[(step, layer)] = label
        if self.calls["sagevideo"] == 1:
            logger.info("sagevideo: scheduled attention active (first call: step %s, block %d, %s, %s %s)",
                        step, layer, label, layout, tuple(qs.shape))

        # back to the layout ComfyUI asked for
        if layout == "BHSD":
            return out if skip_output_reshape else out.transpose(1, 2).reshape(b, sq, heads * hd)
        return out.transpose(1, 2) if skip_output_reshape else out.reshape(b, sq, heads * hd)


def make_override(config: AttentionConfig, previous: Callable | None = None, **kw) -> SageOverride:
    """The override for ``transformer_options["optimized_attention_override"]`` (see :class:`SageOverride`)."""
    return SageOverride(config, previous, **kw)
