"""Named attention schedules shipped with sagevideo (``assets/profiles/<name>.json``).

``sagevideo.profiles.load("warmup")`` returns an :class:`~sagevideo.config.AttentionConfig`;
``sagevideo.profiles.names()`` lists what is available. Each file is an ordinary config JSON (the format
``AttentionConfig.to_json`` writes) whose ``meta`` has a ``description`` and, where it comes from a paper, a
``source``. The shipped profiles are starting points built from published findings, not measurements on your
model; ``sagevideo.calibrate`` writes one for your model.

* ``sage-fp8`` — INT8 QK / FP8 PV everywhere (SageAttention2-style);
* ``sage-fp16`` — INT8 QK / 16-bit PV everywhere;
* ``warmup`` — dense for the first 20 % of steps (Sparse VideoGen's dense warm-up), int8-fp16 in layers 0–1,
  int8-fp8 elsewhere;
* ``edges-fp16`` — int8-fp16 for the first and last 10 % of steps (SageAttention3), int8-fp8 in between;
* ``dense`` — dense SDPA through the same op, for A/B runs;
* ``sparse-spatiotemporal`` / ``sparse-semantic`` — the sparse methods (Sparse VideoGen 1 / 2) after a quantized
  warm-up of 20 % of the steps and layer 0 (``sagevideo.config.method_config(None, name)``).

Profiles are looked up in ``sagevideo/assets/profiles`` (an installed wheel) and in ``assets/profiles`` at the
repository root (a source checkout). Per-model *defaults* (``sagevideo.default_config(family)``) live in the
family files under ``pipelines/``.
"""

from __future__ import annotations

import re
from pathlib import Path

from sagevideo.config import AttentionConfig

__all__ = ["load", "names", "path", "search_dirs"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def search_dirs() -> list[Path]:
    from sagevideo._assets import asset_dirs

    return [d / "profiles" for d in asset_dirs() if (d / "profiles").is_dir()]


def names() -> list[str]:
    """Names of the available profiles, sorted."""
    return sorted({p.stem for d in search_dirs() for p in d.glob("*.json")})


def path(name: str) -> Path:
    """The JSON file of profile ``name``."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"profile names are lowercase letters, digits, '-', '_' and '.'; got {name!r}")
    for d in search_dirs():
        p = d / f"{name}.json"
        if p.is_file():
            return p
    available = ", ".join(names()) or "none found"
    raise ValueError(f"no attention profile named {name!r}; available: {available}")


def load(name: str) -> AttentionConfig:
    """Load the profile ``name`` (validated like any config)."""
    return AttentionConfig.load(path(name))
