"""Where the bundled assets (profiles, LPIPS weights, the tiny model) are.

In a source checkout they live in ``assets/`` at the top of the repository; an installed wheel carries the same
folder as ``sagevideo/assets`` (``pyproject.toml`` maps it). :func:`asset_dir` returns the first that exists.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def asset_dirs() -> list[Path]:
    """Candidate asset folders, installed copy first; only those that exist."""
    return [d for d in (_HERE / "assets", _HERE.parent / "assets") if d.is_dir()]


def asset_dir() -> Path:
    """The asset folder (``<repo>/assets`` in a checkout, ``<site-packages>/sagevideo/assets`` in a wheel)."""
    dirs = asset_dirs()
    if not dirs:
        raise FileNotFoundError(
            f"sagevideo's assets folder is missing (looked in {_HERE / 'assets'} and {_HERE.parent / 'assets'}); "
            "reinstall sagevideo"
        )
    return dirs[0]


def asset_path(*parts: str) -> Path:
    """``asset_dir() / parts`` (the path may not exist; callers check)."""
    dirs = asset_dirs()
    for d in dirs:
        p = d.joinpath(*parts)
        if p.exists():
            return p
    return (dirs[0] if dirs else _HERE.parent / "assets").joinpath(*parts)
