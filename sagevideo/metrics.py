"""Frame-by-frame fidelity metrics between two videos: PSNR, SSIM and LPIPS.

Used to measure what an accelerated (quantized / sparse attention) generation costs against the dense one.
Always compare the *raw decoded frames* (what the VAE produced), never frames re-read from an encoded video:
an H.264 round trip alone brings PSNR down to about 38 dB and would hide the effect being measured.

Input convention (all three metrics)
    A video is a ``(T, H, W, 3)`` array — RGB, frames first, channels last — given as a numpy array or a torch
    tensor (any device), either ``uint8`` in ``0..255`` or floating point in ``[0, 1]``. Both videos must have
    the same shape; their dtypes may differ. Float values are mapped to the 0..255 scale by multiplying with 255
    (no rounding), so a float video and its ``uint8`` quantisation differ by at most half a level.
    Anything else raises: :class:`TypeError` for a non-array or an unsupported dtype, :class:`ValueError` for a
    wrong rank, channel count, empty or too small frames, mismatched shapes, NaN/inf or out-of-range floats.

Results
    Each metric returns a :class:`MetricResult` with the per-frame values (``per_frame[t]`` compares frame ``t``
    of both videos) and their mean. Frames are processed ``chunk_size`` at a time, so memory use does not grow
    with the video length.

Definitions
    * **PSNR** (dB) — ``10 log10(255² / MSE)`` per frame, MSE over all pixels and the three RGB channels,
      squared errors accumulated in float64, via ``torchmetrics.functional.image.peak_signal_noise_ratio``
      (``data_range=255``).
      Identical frames give ``inf``. The reported mean is the mean over the *finite* per-frame values (so a few
      bit-exact frames do not turn the whole video into ``inf``; the number of such frames is reported in
      ``infinite_frames``); it is ``inf`` only when every frame is identical.
    * **SSIM** — see :data:`SSIM_VARIANT`: Gaussian window 11×11 with σ = 1.5, K1 = 0.01, K2 = 0.03,
      ``data_range=255``, computed on the R, G and B channels separately and averaged over channels and pixels
      (not on luma), via ``torchmetrics.functional.image.structural_similarity_index_measure``. Frame borders are
      handled by torchmetrics' 5-pixel reflection padding, so the map covers the whole frame.
      1 means identical. The mean is the arithmetic mean over frames.
    * **LPIPS** — Zhang et al., CVPR 2018, AlexNet trunk with the v0.1 linear heads (see
      :mod:`sagevideo._lpips`), on full-resolution frames scaled to ``[-1, 1]``. 0 means identical, larger is
      more different. The mean is the arithmetic mean over frames. If the weights file is missing,
      :func:`video_lpips` raises :class:`LPIPSUnavailableError` — it never returns a made-up number.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from sagevideo._lpips import LPIPSUnavailableError, find_weights, load_lpips_alex, min_lpips_side

__all__ = [
    "LPIPS_VARIANT",
    "LPIPSUnavailableError",
    "MetricResult",
    "PSNR_VARIANT",
    "SSIM_VARIANT",
    "lpips_available",
    "to_uint8_numpy",
    "validate_video",
    "video_lpips",
    "video_psnr",
    "video_ssim",
]

PSNR_VARIANT = ("PSNR in dB, data_range 255, MSE over all pixels and RGB channels of a frame; "
                "identical frames give inf; mean over finite frames")
SSIM_VARIANT = ("SSIM, Gaussian window 11x11 sigma 1.5, K1 0.01, K2 0.03, data_range 255, on RGB channels "
                "(mean over channels and pixels, reflection-padded borders), torchmetrics functional")
LPIPS_VARIANT = "LPIPS (Zhang et al. 2018), AlexNet trunk, v0.1 linear heads, inputs scaled to [-1, 1]"

_SSIM_KERNEL = 11
_SSIM_SIGMA = 1.5


@dataclass(frozen=True)
class MetricResult:
    """Per-frame values of one metric and their mean.

    Attributes:
        name: ``"psnr"``, ``"ssim"`` or ``"lpips"``.
        per_frame: one value per frame (Python floats; PSNR may contain ``inf``).
        mean: summary over frames (for PSNR: mean of the finite values, ``inf`` if all frames are identical).
        infinite_frames: how many per-frame values are ``inf`` (bit-identical frames; only PSNR has these).
        variant: human-readable definition of the metric (window, data range, backbone, ...).
    """

    name: str
    per_frame: list[float]
    mean: float
    infinite_frames: int = 0
    variant: str = ""

    def __len__(self) -> int:
        return len(self.per_frame)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (floats may be ``inf``; JSON writers must handle that, see :mod:`sagevideo.report`)."""
        return asdict(self)


# --------------------------------------------------------------------------------------------- input handling


def _describe(x: Any) -> str:
    return f"{type(x).__module__}.{type(x).__name__}"


def validate_video(video: Any, name: str = "video") -> tuple[int, int, int, int]:
    """Check that ``video`` is a ``(T, H, W, 3)`` uint8 or [0, 1]-float numpy array / torch tensor.

    Returns its shape. Raises :class:`TypeError` or :class:`ValueError` with a message naming ``name``.
    """
    if isinstance(video, torch.Tensor):
        dtype_ok_int = video.dtype == torch.uint8
        dtype_ok_float = video.dtype.is_floating_point
        dtype_name = str(video.dtype)
    elif isinstance(video, np.ndarray):
        dtype_ok_int = video.dtype == np.uint8
        dtype_ok_float = np.issubdtype(video.dtype, np.floating)
        dtype_name = str(video.dtype)
    else:
        raise TypeError(f"{name} must be a numpy array or a torch tensor of shape (T, H, W, 3), got {_describe(video)}")
    if video.ndim != 4:
        raise ValueError(
            f"{name} must have 4 dimensions (T, H, W, C) with frames first and channels last, got shape "
            f"{tuple(video.shape)}" + (" (a single frame? add a leading frame axis)" if video.ndim == 3 else "")
        )
    t, h, w, c = (int(s) for s in video.shape)
    if c != 3:
        hint = " (channels-first input? expected channels last)" if h == 3 else ""
        raise ValueError(f"{name} must have 3 (RGB) channels in the last axis, got shape {tuple(video.shape)}{hint}")
    if t == 0 or h == 0 or w == 0:
        raise ValueError(f"{name} is empty: shape {tuple(video.shape)}")
    if not (dtype_ok_int or dtype_ok_float):
        raise TypeError(f"{name} must be uint8 (0..255) or floating point in [0, 1], got dtype {dtype_name}")
    if dtype_ok_float:
        if isinstance(video, torch.Tensor):
            finite = bool(torch.isfinite(video).all())
            lo, hi = (float(video.min()), float(video.max())) if finite else (math.nan, math.nan)
        else:
            finite = bool(np.isfinite(video).all())
            lo, hi = (float(video.min()), float(video.max())) if finite else (math.nan, math.nan)
        if not finite:
            raise ValueError(f"{name} contains NaN or infinite values")
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"{name} is floating point with values in [{lo:.4g}, {hi:.4g}]; expected [0, 1] "
                "(clamp the decoded frames, or pass uint8 0..255)"
            )
    return t, h, w, c


def _check_pair(a: Any, b: Any, min_side: int = 1, metric: str = "") -> tuple[int, int, int, int]:
    sa = validate_video(a, "a")
    sb = validate_video(b, "b")
    if sa != sb:
        raise ValueError(f"videos must have the same shape (T, H, W, C), got a={sa} and b={sb}")
    if min(sa[1], sa[2]) < min_side:
        raise ValueError(f"{metric} needs frames of at least {min_side}x{min_side} pixels, got {sa[1]}x{sa[2]}")
    return sa


def _chunk_0_255(video: Any, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Frames ``start:stop`` as an ``(n, 3, H, W)`` tensor on the 0..255 scale."""
    part = video[start:stop]
    if isinstance(part, np.ndarray):
        part = torch.from_numpy(np.ascontiguousarray(part))
    is_uint8 = part.dtype == torch.uint8
    part = part.to(device=device).to(dtype)
    if not is_uint8:
        part = part * 255.0
    return part.permute(0, 3, 1, 2)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_chunk(chunk_size: int) -> int:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def to_uint8_numpy(video: Any, name: str = "video") -> np.ndarray:
    """Validate ``video`` and return it as a ``(T, H, W, 3)`` uint8 numpy array (floats are rounded)."""
    validate_video(video, name)
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu()
        if video.dtype == torch.uint8:
            return video.numpy()
        return (video.to(torch.float32) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    if video.dtype == np.uint8:
        return video
    return np.clip(np.rint(video.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------- metrics


def video_psnr(a: Any, b: Any, *, chunk_size: int = 16, device: str | torch.device | None = None) -> MetricResult:
    """Per-frame PSNR (dB, ``data_range=255``) between videos ``a`` and ``b``; see the module docstring.

    Identical frames give ``inf``; ``mean`` averages the finite frames (``inf`` only if all frames are identical).
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    t = _check_pair(a, b)[0]
    dev = _resolve_device(device)
    chunk_size = _check_chunk(chunk_size)
    values: list[float] = []
    with torch.no_grad():
        for s in range(0, t, chunk_size):
            xa = _chunk_0_255(a, s, s + chunk_size, dev, torch.float64)
            xb = _chunk_0_255(b, s, s + chunk_size, dev, torch.float64)
            v = peak_signal_noise_ratio(xb, xa, data_range=255.0, reduction="none", dim=(1, 2, 3))
            values.extend(float(x) for x in v.reshape(-1).cpu())
    finite = [v for v in values if math.isfinite(v)]
    n_inf = len(values) - len(finite)
    mean = float(np.mean(finite)) if finite else math.inf
    return MetricResult("psnr", values, mean, infinite_frames=n_inf, variant=PSNR_VARIANT)


def video_ssim(a: Any, b: Any, *, chunk_size: int = 16, device: str | torch.device | None = None) -> MetricResult:
    """Per-frame SSIM between videos ``a`` and ``b`` (:data:`SSIM_VARIANT`: Gaussian 11×11, σ 1.5, RGB-averaged).

    Frames must be at least 11×11 pixels.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    t = _check_pair(a, b, min_side=_SSIM_KERNEL, metric="SSIM")[0]
    dev = _resolve_device(device)
    chunk_size = _check_chunk(chunk_size)
    values: list[float] = []
    with torch.no_grad():
        for s in range(0, t, chunk_size):
            xa = _chunk_0_255(a, s, s + chunk_size, dev, torch.float32)
            xb = _chunk_0_255(b, s, s + chunk_size, dev, torch.float32)
            v = structural_similarity_index_measure(
                xb, xa, gaussian_kernel=True, sigma=_SSIM_SIGMA, kernel_size=_SSIM_KERNEL,
                data_range=255.0, k1=0.01, k2=0.03, reduction="none",
            )
            values.extend(float(x) for x in v.reshape(-1).cpu())
    return MetricResult("ssim", values, float(np.mean(values)), variant=SSIM_VARIANT)


def lpips_available(weights: str | None = None) -> tuple[bool, str]:
    """``(True, path)`` when the LPIPS weights file can be found, else ``(False, reason)``. Does not load it."""
    try:
        return True, str(find_weights(weights))
    except LPIPSUnavailableError as exc:
        return False, str(exc)


def video_lpips(
    a: Any,
    b: Any,
    *,
    chunk_size: int = 8,
    device: str | torch.device | None = None,
    weights: str | None = None,
) -> MetricResult:
    """Per-frame LPIPS (AlexNet, v0.1 heads; Zhang et al. 2018) between videos ``a`` and ``b``.

    Frames are used at full resolution and must be at least 31×31 pixels (the AlexNet trunk's minimum).

    Raises:
        LPIPSUnavailableError: the weights file (``assets/lpips/alex_lpips_v0.1.safetensors``, or ``weights``,
            or ``$SAGEVIDEO_LPIPS_WEIGHTS``) is missing or unreadable. No value is returned in that case.
    """
    t = _check_pair(a, b, min_side=min_lpips_side(), metric="LPIPS")[0]
    chunk_size = _check_chunk(chunk_size)
    dev = _resolve_device(device)
    model = load_lpips_alex(dev, weights)
    values: list[float] = []
    with torch.no_grad():
        for s in range(0, t, chunk_size):
            xa = _chunk_0_255(a, s, s + chunk_size, dev, torch.float32) / 127.5 - 1.0
            xb = _chunk_0_255(b, s, s + chunk_size, dev, torch.float32) / 127.5 - 1.0
            values.extend(float(x) for x in model(xa, xb).cpu())
    return MetricResult("lpips", values, float(np.mean(values)), variant=LPIPS_VARIANT)
