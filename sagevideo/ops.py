"""The public attention op: ``sagevideo.attention``.

One entry point that every integration (diffusers patcher, ComfyUI node, CLI, sparse engine) calls. It is a
``torch.library.custom_op`` (``sagevideo::attention``) with a fake implementation, so ``torch.compile``
traces through a model that calls it with no graph break; validation runs in the Python wrapper, so errors
surface at trace time too.

Dispatch (inside the op):

* ``dense`` → ``torch.nn.functional.scaled_dot_product_attention``.
* ``int8-fp8`` / ``int8-fp16`` on a CUDA GPU → the Triton quantization pass and attention kernel
  (``kernels/quantize.py``, ``kernels/quant_attn.py``). ``int8-fp8`` needs FP8 tensor cores (sm89+); on
  sm80/86 it runs ``int8-fp16`` and says so once. Below sm80 → dense, with a warning.
* on CPU the quantized modes run their torch reference (``sagevideo/reference.py``), which computes the same
  quantized arithmetic, and say so once.
* head_dim above 128 (VAEs use 384/512) → SDPA with one warning: never a crash.
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import torch
import torch.nn.functional as F

from sagevideo import reference

logger = logging.getLogger("sagevideo")

PRECISIONS = ("auto", "dense", "int8-fp8", "int8-fp16")
LAYOUTS = ("BHSD", "BSHD")
MAX_KERNEL_HEAD_DIM = 128
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_said: set[str] = set()


def _once(key: str, message: str, *, warn: bool = False) -> None:
    """Log (or warn) a message the first time ``key`` is seen in this process."""
    if key in _said:
        return
    _said.add(key)
    if warn:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    else:
        logger.warning(message)


# ----------------------------------------------------------------------------------------------------------
# Validation (runs on fake tensors too, so torch.compile reports the same errors)
# ----------------------------------------------------------------------------------------------------------


def _validate(q, k, v, layout, precision, scale, key_padding_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sagevideo.attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"sagevideo.attention: layout must be one of {LAYOUTS}, got {layout!r}")
    if precision not in PRECISIONS:
        raise ValueError(
            f"sagevideo.attention: unknown precision {precision!r}; choose one of {PRECISIONS}"
        )
    dims = "(batch, heads, seq, head_dim)" if layout == "BHSD" else "(batch, seq, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"sagevideo.attention: {name} must be 4-D {dims} for layout={layout!r}, got shape "
                f"{tuple(t.shape)}; reshape it, or pass layout='BSHD'/'BHSD' to match your tensors"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"sagevideo.attention: {name} has dtype {t.dtype}; expected float16, bfloat16 or float32 "
                f"(cast with .to(torch.bfloat16))"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"sagevideo.attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
            "cast them to the same dtype"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"sagevideo.attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    s = 2 if layout == "BHSD" else 1
    h = 1 if layout == "BHSD" else 2
    bq, hq, sq, dq = q.shape[0], q.shape[h], q.shape[s], q.shape[3]
    if k.shape != v.shape or k.shape[3] != dq:
        raise ValueError(
            f"sagevideo.attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape, with "
            f"q's head_dim ({dq}) (layout={layout!r})"
        )
    if k.shape[0] != bq:
        raise ValueError(f"sagevideo.attention: batch of q ({bq}) and k/v ({k.shape[0]}) differ")
    hk, skv = k.shape[h], k.shape[s]
    if hk == 0 or hq % hk != 0:
        raise ValueError(
            f"sagevideo.attention: q has {hq} heads and k/v {hk}; grouped-query attention needs q heads to be "
            "a multiple of k/v heads"
        )
    if skv == 0 and sq > 0:
        raise ValueError("sagevideo.attention: k/v have an empty sequence; there is nothing to attend to")
    if scale is not None and not (scale > 0 and scale < float("inf")):
        raise ValueError(f"sagevideo.attention: scale must be a positive finite number, got {scale}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError(
                "sagevideo.attention: key_padding_mask must be a bool tensor (True = attend to this key); "
                "convert an additive float mask with `mask == 0`"
            )
        if tuple(key_padding_mask.shape) != (bq, skv):
            raise ValueError(
                f"sagevideo.attention: key_padding_mask must have shape (batch, kv_seq) = {(bq, skv)}, got "
                f"{tuple(key_padding_mask.shape)}; a diffusers (B, 1, 1, S) mask can be passed as "
                "mask.view(B, S)"
            )
        if key_padding_mask.device != q.device:
            raise ValueError("sagevideo.attention: key_padding_mask is on another device than q")


# ----------------------------------------------------------------------------------------------------------
# Mode resolution
# ----------------------------------------------------------------------------------------------------------


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        _once("no-triton", f"sagevideo: Triton is not importable ({exc}); quantized attention runs dense SDPA")
        return False
    return True


def resolve_precision(precision: str, device: torch.device, head_dim: int) -> str:
    """The mode that actually runs for ``precision`` on ``device`` (with the one-time notices it implies).

    Returns one of ``dense``, ``int8-fp8``, ``int8-fp16`` (kernel on CUDA, torch reference on CPU).
    """
    if precision == "dense":
        return "dense"
    if head_dim > MAX_KERNEL_HEAD_DIM:
        _once(
            f"hd-{head_dim}",
            f"sagevideo: head_dim {head_dim} is above the quantized kernel's limit of {MAX_KERNEL_HEAD_DIM}; "
            "these calls run dense SDPA",
            warn=True,
        )
        return "dense"
    if device.type == "cpu":
        if precision == "auto":
            return "dense"
        _once(
            f"cpu-{precision}",
            f"sagevideo: {precision} attention on CPU tensors runs the torch reference of the quantized "
            "arithmetic (same numbers as the GPU kernel, no speed-up)",
        )
        return precision
    if device.type != "cuda":
        _once(f"dev-{device.type}", f"sagevideo: no quantized kernel for {device.type} tensors; running dense SDPA", warn=True)
        return "dense"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        _once(
            "old-gpu",
            f"sagevideo: GPU sm{major}{minor} is below sm80 (the quantized kernel needs INT8 tensor cores of "
            "Ampere or newer); running dense SDPA",
            warn=True,
        )
        return "dense"
    if not _triton_ok():
        return "dense"
    fp8_ok = (major, minor) >= (8, 9)
    if precision == "auto":
        return "int8-fp8" if fp8_ok else "int8-fp16"
    if precision == "int8-fp8" and not fp8_ok:
        _once(
            "no-fp8",
            f"sagevideo: int8-fp8 needs FP8 tensor cores (sm89+); this GPU is sm{major}{minor}, running int8-fp16",
        )
        return "int8-fp16"
    return precision


# ----------------------------------------------------------------------------------------------------------
# Implementations (BHSD views in, results written in the caller's layout)
# ----------------------------------------------------------------------------------------------------------


def _to_bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "BHSD" else t.transpose(1, 2)


def _flash_with_lse(q, k, v, scale):
    """SDPA's flash kernel, which returns the natural-log LSE it computes anyway ((B, H, S) fp32); None when it
    does not apply (not CUDA, fp32, a mask, GQA, head_dim > 256 or not a multiple of 8) or fails."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[1] == k.shape[1]
            and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0):
        return None
    try:
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    except (RuntimeError, NotImplementedError):
        return None
    out, lse = res[0], res[1]
    if out.shape != q.shape or lse.shape != q.shape[:3] or lse.dtype != torch.float32:
        return None
    return out, lse


def _dense(q, k, v, scale, mask, return_lse):
    """SDPA in BHSD. With ``return_lse``: the flash kernel's own LSE where it applies, otherwise an exact fp32
    pass chunked over query rows (a second attention: CPU, fp32, masks, GQA)."""
    if return_lse and mask is None:
        res = _flash_with_lse(q, k, v, scale)
        if res is not None:
            return res
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    if mask is not None:  # SDPA gives NaN where every key is masked; sagevideo defines those rows as 0
        out = torch.where(mask.any(dim=1)[:, None, None, None], out, 0)
    lse = None
    if return_lse:
        _, lse = reference.attention_exact(q, k, v, scale=scale, key_padding_mask=mask, dtype=torch.float32, chunk=256)
    return out, lse


def _quantized(q, k, v, mode, scale, mask, smooth_v, return_lse, out_bhsd, lse_bhs):
    """Quantized attention: Triton on CUDA, the torch reference elsewhere. Writes ``out_bhsd``/``lse_bhs``."""
    if q.device.type == "cuda":
        from sagevideo.kernels import quant_attn, quantize

        qkv = quantize.quantize_qkv(
            q, k, v, scale=scale, precision=mode, key_padding_mask=mask, smooth_v=smooth_v, need_lse=return_lse
        )
        quant_attn.attention_fwd(qkv, out_bhsd, key_padding_mask=mask, lse_bhs=lse_bhs)
        return
    out, lse = reference.quant_attention_ref(
        q, k, v, scale=scale, precision=mode, key_padding_mask=mask, smooth_v=smooth_v
    )
    out_bhsd.copy_(out)
    if lse_bhs is not None:
        lse_bhs.copy_(lse)


def _empty_results(q: torch.Tensor, layout: str, return_lse: bool):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if not return_lse:
        return out, q.new_empty((0,), dtype=torch.float32)
    b = q.shape[0]
    h, s = (q.shape[1], q.shape[2]) if layout == "BHSD" else (q.shape[2], q.shape[1])
    lse_shape = (b, h, s) if layout == "BHSD" else (b, s, h)
    return out, q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("sagevideo::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: str,
    precision: str,
    scale: float | None,
    return_lse: bool,
    key_padding_mask: torch.Tensor | None,
    smooth_v: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _empty_results(q, layout, return_lse)
    if q.numel() == 0:
        return out, lse
    qb, kb, vb = _to_bhsd(q, layout), _to_bhsd(k, layout), _to_bhsd(v, layout)
    scale = reference.default_scale(q.shape[-1]) if scale is None else scale
    out_bhsd = _to_bhsd(out, layout)
    lse_bhs = (lse if layout == "BHSD" else lse.transpose(1, 2)) if return_lse else None
    mode = resolve_precision(precision, q.device, q.shape[-1])
    if mode == "dense":
        o, l = _dense(qb, kb, vb, scale, key_padding_mask, return_lse)
        out_bhsd.copy_(o)
        if l is not None:
            lse_bhs.copy_(l)
    else:
        _quantized(qb, kb, vb, mode, scale, key_padding_mask, smooth_v, return_lse, out_bhsd, lse_bhs)
    return out, lse


@_attention_op.register_fake
def _attention_fake(q, k, v, layout, precision, scale, return_lse, key_padding_mask, smooth_v):
    return _empty_results(q, layout, return_lse)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: Literal["BHSD", "BSHD"] = "BHSD",
    precision: str = "auto",
    scale: float | None = None,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    smooth_v: bool = False,
):
    """Scaled-dot-product attention with INT8 QKᵀ and FP8 or 16-bit PV (SageAttention2-style).

    Args:
        q: ``(B, Hq, Sq, D)`` for ``layout="BHSD"`` or ``(B, Sq, Hq, D)`` for ``"BSHD"``; float16, bfloat16 or
            float32. Any strides (views with storage offsets are fine); never modified.
        k, v: ``(B, Hk, Skv, D)`` / ``(B, Skv, Hk, D)``, same dtype and device; ``Hq`` must be a multiple of
            ``Hk`` (grouped-query / multi-query attention). ``Sq`` and ``Skv`` may differ and be any length.
        layout: ``"BHSD"`` or ``"BSHD"``; the output has the same layout.
        precision: ``"auto"`` (``int8-fp8`` on sm89+, ``int8-fp16`` on sm80/86, ``dense`` on CPU or older
            GPUs), ``"int8-fp8"``, ``"int8-fp16"`` or ``"dense"`` (torch SDPA). On CPU tensors the quantized
            modes run their torch reference (same arithmetic as the kernel) and say so once.
        scale: softmax scale; ``1/sqrt(D)`` when None.
        return_lse: also return the natural-log log-sum-exp of each query row, fp32, shaped ``(B, Hq, Sq)``
            for BHSD and ``(B, Sq, Hq)`` for BSHD (what ring attention merges with).
        key_padding_mask: optional bool ``(B, Skv)``; True = the key takes part. Honoured exactly in every
            mode; a row whose keys are all masked returns 0 (LSE −inf).
        smooth_v: subtract V's per-channel mean before quantizing and add it back (for models with biased V).

    Returns:
        The output (input dtype and layout), or ``(output, lse)`` when ``return_lse``.

    head_dim up to 128 runs the quantized kernel (non-power-of-two sizes are padded inside it); larger
    head_dim falls back to SDPA with one warning.
    """
    _validate(q, k, v, layout, precision, scale, key_padding_mask)
    out, lse = _attention_op(q, k, v, layout, precision, scale, return_lse, key_padding_mask, smooth_v)
    return (out, lse) if return_lse else out
