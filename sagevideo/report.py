"""Fidelity report of an accelerated generation against the dense one.

:func:`write_report` takes the two videos as raw decoded frames (``(T, H, W, 3)``, uint8 or float in
``[0, 1]``, see :mod:`sagevideo.metrics`) and writes into ``out_dir``:

``metrics.json``
    Strict JSON (no ``NaN``/``Infinity`` literals): per-frame values and means of PSNR, SSIM and LPIPS, the
    metric definitions, the video geometry, the side-by-side layout and, under ``"info"``, whatever the caller
    passed (wall times, speed-up, schedule, versions, GPU, ...). Non-finite floats are written as the strings
    ``"inf"``, ``"-inf"`` and ``"nan"``; :func:`load_metrics` turns them back into floats. When LPIPS cannot be
    computed (weights missing, frames smaller than 31 px) its entry is ``{"available": false, "reason": ...}``.
``side_by_side.mp4``
    H.264 video with three panels per frame: dense | accelerated | ``|dense − accelerated|`` multiplied by
    ``diff_gain`` (default :data:`DIFF_GAIN` = 8, clipped to 255, per RGB channel), separated by thin white
    bars. For viewing only: the metrics are never computed from this (lossy) file.
``report.html``
    One self-contained page that opens offline: inline CSS, per-frame plots of the three metrics as inline
    SVG, a few frames (dense / accelerated / amplified difference) embedded as base64 PNG, the metric
    definitions and a table of ``info``. It contains no script and no external URL, and its
    Content-Security-Policy forbids every network load (only ``data:`` images and inline styles are allowed).

The returned dict equals ``load_metrics(out_dir / "metrics.json")``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
import warnings
from importlib import metadata as _md
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from sagevideo import metrics as _m
from sagevideo._lpips import LPIPSUnavailableError
from sagevideo.video_io import _ensure_writable_dir, mp4_unavailable_reason, write_video

__all__ = ["DIFF_GAIN", "SCHEMA", "load_metrics", "write_report"]

#: Default amplification of the absolute difference panel (side-by-side video and HTML previews).
DIFF_GAIN = 8.0
#: Identifier of the metrics.json layout.
SCHEMA = "sagevideo.fidelity-report/1"

_SEPARATOR_PX = 4
_METRIC_FILE = "metrics.json"
_VIDEO_FILE = "side_by_side.mp4"
_HTML_FILE = "report.html"


# ------------------------------------------------------------------------------------------------ JSON helpers


def _jsonable(obj: Any) -> Any:
    """Normalise ``obj`` to JSON types (floats may stay non-finite); unknown objects become ``str(obj)``."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray) and obj.size <= 4096:
        return _jsonable(obj.tolist())
    try:  # 0-d torch tensors and similar
        import torch

        if isinstance(obj, torch.Tensor) and obj.numel() == 1:
            return _jsonable(obj.item())
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def _encode_nonfinite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _encode_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_encode_nonfinite(v) for v in obj]
    return obj


def _decode_nonfinite(obj: Any) -> Any:
    if isinstance(obj, str) and obj in ("inf", "-inf", "nan"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _decode_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_nonfinite(v) for v in obj]
    return obj


def load_metrics(path: str | os.PathLike) -> dict:
    """Read a ``metrics.json`` written by :func:`write_report` (or the folder containing it).

    The strings ``"inf"``, ``"-inf"`` and ``"nan"`` are turned back into floats, everywhere in the document.
    """
    path = Path(path)
    if path.is_dir():
        path = path / _METRIC_FILE
    with open(path, encoding="utf-8") as fh:
        return _decode_nonfinite(json.load(fh))


# --------------------------------------------------------------------------------------------------- images


def _abs_diff(dense: np.ndarray, accel: np.ndarray, gain: float) -> np.ndarray:
    d = np.abs(dense.astype(np.int16) - accel.astype(np.int16)).astype(np.float32) * gain
    return np.clip(d, 0, 255).astype(np.uint8)


def _side_by_side(dense: np.ndarray, accel: np.ndarray, gain: float) -> np.ndarray:
    t, h, _, _ = dense.shape
    bar = np.full((t, h, _SEPARATOR_PX, 3), 255, np.uint8)
    return np.concatenate([dense, bar, accel, bar, _abs_diff(dense, accel, gain)], axis=2)


def _png_data_uri(img: np.ndarray, max_width: int) -> str:
    from PIL import Image

    pil = Image.fromarray(img)
    if pil.width > max_width:
        h = max(1, round(pil.height * max_width / pil.width))
        pil = pil.resize((max_width, h), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------------- SVG plot


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    raw = span / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    return ticks


def _fmt(v: float, digits: int = 4) -> str:
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if math.isnan(v):
        return "n/a"
    return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"


def _svg_chart(title: str, values: list[float], *, color: str, unit: str, better: str, mean: float) -> str:
    """Line chart of per-frame values as an inline SVG string; ``inf`` values are marked at the top edge."""
    width, height = 760, 210
    ml, mr, mt, mb = 62, 18, 34, 38
    pw, ph = width - ml - mr, height - mt - mb
    n = len(values)
    finite = [v for v in values if math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        if hi - lo < 1e-12:
            pad = max(abs(hi) * 0.05, 1e-3)
        else:
            pad = (hi - lo) * 0.08
        lo, hi = lo - pad, hi + pad
    else:
        lo, hi = 0.0, 1.0
    ticks = _nice_ticks(lo, hi)
    lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])

    def x_of(i: int) -> float:
        return ml + (pw / 2 if n == 1 else pw * i / (n - 1))

    def y_of(v: float) -> float:
        return mt + ph * (1 - (v - lo) / (hi - lo))

    e = html.escape
    out = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{e(title)} per frame">',
        f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fbfbfd" stroke="#c9ccd6"/>',
        f'<text x="{ml}" y="20" class="ct">{e(title)} per frame '
        f'<tspan class="cs">({e(better)}; dashed: mean {e(_fmt(mean))}{e(unit)})</tspan></text>',
    ]
    for tv in ticks:
        y = y_of(tv)
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e5ec"/>')
        out.append(f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end" class="tk">{e(_fmt(tv))}</text>')
    xt = sorted(set(int(round(v)) for v in np.linspace(0, max(0, n - 1), min(n, 9))))
    for i in xt:
        x = x_of(i)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" stroke="#888"/>')
        out.append(f'<text x="{x:.1f}" y="{mt + ph + 17}" text-anchor="middle" class="tk">{i}</text>')
    out.append(f'<text x="{ml + pw / 2}" y="{height - 4}" text-anchor="middle" class="tk">frame</text>')
    if math.isfinite(mean):
        y = y_of(mean)
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}" '
                   'stroke-dasharray="6 4" stroke-opacity="0.7"/>')
    # Polyline segments over consecutive finite values.
    seg: list[str] = []
    segments = []
    for i, v in enumerate(values):
        if math.isfinite(v):
            seg.append(f"{x_of(i):.1f},{y_of(v):.1f}")
        elif seg:
            segments.append(seg)
            seg = []
    if seg:
        segments.append(seg)
    for s in segments:
        if len(s) > 1:
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(s)}"/>')
    for i, v in enumerate(values):
        label = f"frame {i}: {_fmt(v, 6)}{unit}"
        if math.isfinite(v):
            out.append(f'<circle cx="{x_of(i):.1f}" cy="{y_of(v):.1f}" r="3.2" fill="{color}">'
                       f"<title>{e(label)}</title></circle>")
        else:
            x = x_of(i)
            out.append(f'<path d="M{x - 5:.1f},{mt + 9} L{x + 5:.1f},{mt + 9} L{x:.1f},{mt + 1}Z" fill="{color}">'
                       f"<title>{e(label)} (identical frame)</title></path>")
            out.append(f'<text x="{x:.1f}" y="{mt + 22}" text-anchor="middle" class="tk">∞</text>')
    if not finite:
        out.append(f'<text x="{ml + pw / 2}" y="{mt + ph / 2}" text-anchor="middle" class="tk">'
                   "every frame is identical (∞)</text>")
    out.append("</svg>")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------ HTML

_CSS = """
:root { --fg:#1d2230; --muted:#5b6275; --line:#dfe2ea; --bg:#f4f5f9; --card:#ffffff; --accent:#3a5ccc; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
       color:var(--fg); background:var(--bg); }
header { background:#1f2a4d; color:#fff; padding:18px 28px; }
header h1 { margin:0 0 4px; font-size:22px; }
header p { margin:0; color:#c8d0ee; }
main { max-width:1180px; margin:0 auto; padding:20px 28px 48px; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:16px 20px;
          margin:0 0 18px; }
h2 { font-size:17px; margin:0 0 12px; }
.cards { display:flex; flex-wrap:wrap; gap:12px; }
.card { flex:1 1 200px; border:1px solid var(--line); border-radius:8px; padding:10px 14px; background:#fafbff; }
.card .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.card .v { font-size:26px; font-weight:650; }
.card .d { color:var(--muted); font-size:12px; }
.card.na .v { color:#b0452c; font-size:18px; }
.chart { width:100%; max-width:980px; height:auto; display:block; margin:4px 0 10px; }
.chart .ct { font-size:14px; font-weight:600; fill:#1d2230; }
.chart .cs { font-size:12px; font-weight:400; fill:#5b6275; }
.chart .tk { font-size:11px; fill:#5b6275; }
.frames { display:grid; grid-template-columns:repeat(3, minmax(0, 1fr)); gap:8px 12px; align-items:start; }
.frames figure { margin:0; }
.frames img { width:100%; height:auto; display:block; border:1px solid var(--line); image-rendering:pixelated; }
.frames figcaption { font-size:12px; color:var(--muted); margin-top:3px; }
.frow { grid-column:1 / -1; font-weight:600; margin-top:8px; border-top:1px solid var(--line); padding-top:8px; }
table { border-collapse:collapse; width:100%; font-size:13px; }
th, td { text-align:left; border-bottom:1px solid var(--line); padding:5px 8px; vertical-align:top; }
th { width:34%; color:var(--muted); font-weight:500; }
td { font-family:ui-monospace,"DejaVu Sans Mono",monospace; word-break:break-word; }
.note { color:var(--muted); font-size:12.5px; }
code { font-family:ui-monospace,"DejaVu Sans Mono",monospace; font-size:12.5px; }
"""


def _flatten(obj: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, obj


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return _fmt(v, 6)
    if isinstance(v, (list, dict)):
        s = json.dumps(_encode_nonfinite(v), ensure_ascii=False)
        return s if len(s) <= 600 else s[:600] + " …"
    return str(v)


def _pick_frames(metrics_doc: dict, t: int, k: int) -> list[tuple[int, str]]:
    """Up to ``k`` frames: evenly spaced ones plus the worst one (highest LPIPS, else lowest PSNR)."""
    if k <= 0:
        return []
    worst = None
    lp = metrics_doc["lpips"]
    if lp.get("available"):
        worst = int(np.argmax(lp["per_frame"]))
    else:
        ps = metrics_doc["psnr"]["per_frame"]
        finite = [(v, i) for i, v in enumerate(ps) if math.isfinite(v)]
        if finite:
            worst = min(finite)[1]
    if worst is not None and k == 1:
        chosen = {worst}
    else:
        n_even = k - 1 if worst is not None else k
        chosen = {int(round(x)) for x in np.linspace(0, t - 1, n_even)}
        if worst is not None:
            chosen.add(worst)
    chosen = sorted(chosen)
    return [(i, "worst frame" if i == worst else "") for i in chosen]


def _html(doc: dict, dense: np.ndarray, accel: np.ndarray, gain: float, k_frames: int, max_width: int) -> str:
    e = html.escape
    m = doc["metrics"]
    v = doc["video"]
    if doc["side_by_side"].get("file"):
        video_note = (f'Side-by-side video: <a href="{_VIDEO_FILE}">{_VIDEO_FILE}</a> (dense | accelerated | '
                      f"absolute difference × {gain:g})")
    else:
        video_note = f"No side-by-side video: {e(str(doc['side_by_side'].get('unavailable')))}"
    cards = []
    specs = [
        ("psnr", "PSNR", " dB", "higher is better", "#3a5ccc"),
        ("ssim", "SSIM", "", "higher is better, 1 = identical", "#1d8a5a"),
        ("lpips", "LPIPS (AlexNet)", "", "lower is better, 0 = identical", "#c4572b"),
    ]
    charts = []
    for key, label, unit, better, color in specs:
        r = m[key]
        if r.get("available"):
            extra = ""
            if r.get("infinite_frames"):
                extra = f"; {r['infinite_frames']} identical frame(s) (∞) excluded from the mean"
            cards.append(
                f'<div class="card"><div class="k">{e(label)} mean</div><div class="v">{e(_fmt(r["mean"]))}'
                f'{e(unit)}</div><div class="d">{e(better)}{e(extra)}</div></div>'
            )
            charts.append(_svg_chart(label, r["per_frame"], color=color, unit=unit, better=better, mean=r["mean"]))
        else:
            cards.append(
                f'<div class="card na"><div class="k">{e(label)}</div><div class="v">unavailable</div>'
                f'<div class="d">{e(r.get("reason", ""))}</div></div>'
            )
    speed = doc["info"].get("speedup") if isinstance(doc["info"], dict) else None
    if isinstance(speed, (int, float)) and math.isfinite(speed):
        cards.append(f'<div class="card"><div class="k">speed-up</div><div class="v">{speed:.3g}×</div>'
                     '<div class="d">from info["speedup"]</div></div>')

    frames_html = []
    for idx, tag in _pick_frames(m, v["frames"], k_frames):
        parts = [f"PSNR {_fmt(m['psnr']['per_frame'][idx])} dB", f"SSIM {_fmt(m['ssim']['per_frame'][idx])}"]
        if m["lpips"].get("available"):
            parts.append(f"LPIPS {_fmt(m['lpips']['per_frame'][idx])}")
        title = f"Frame {idx}" + (f" ({tag})" if tag else "") + " — " + ", ".join(parts)
        frames_html.append(f'<div class="frow">{e(title)}</div>')
        diff = _abs_diff(dense[idx : idx + 1], accel[idx : idx + 1], gain)[0]
        for img, cap in ((dense[idx], "dense"), (accel[idx], "accelerated"),
                         (diff, f"|dense − accelerated| × {gain:g}")):
            frames_html.append(
                f'<figure><img src="{_png_data_uri(img, max_width)}" alt="{e(cap)}, frame {idx}">'
                f"<figcaption>{e(cap)}</figcaption></figure>"
            )

    rows = "\n".join(
        f"<tr><th>{e(k)}</th><td>{e(_cell(val))}</td></tr>" for k, val in _flatten(doc["info"]) if k
    ) or '<tr><td colspan="2">(no info passed)</td></tr>'
    defs = "".join(
        f"<li><b>{e(k.upper())}</b>: {e(m[k].get('variant') or m[k].get('reason', ''))}</li>" for k in m
    )
    title = doc["info"].get("title") if isinstance(doc["info"], dict) else None
    subtitle = (f"{v['frames']} frames, {v['width']}×{v['height']} px, {v['fps']:g} fps · generated "
                f"{doc['created_utc']} by sagevideo {doc['generator'].get('sagevideo', '?')}")
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(str(title or "sagevideo fidelity report"))}</title>
<style>{_CSS}</style>
</head>
<body>
<header><h1>{e(str(title or "Fidelity report: accelerated vs dense"))}</h1><p>{e(subtitle)}</p></header>
<main>
<section><h2>Summary</h2><div class="cards">{''.join(cards)}</div>
<p class="note">All metrics compare the raw decoded frames of the two generations (never re-encoded video).
{video_note}; machine-readable values: <a href="{_METRIC_FILE}">{_METRIC_FILE}</a>.</p></section>
<section><h2>Per-frame metrics</h2>
{''.join(charts) or '<p class="note">No per-frame metric available.</p>'}
</section>
<section><h2>Frames</h2>
<p class="note">Left: dense; middle: accelerated; right: absolute difference per RGB channel, amplified
× {gain:g} and clipped (black = identical). Previews are at most {max_width} px wide; metrics use full
resolution.</p>
<div class="frames">{''.join(frames_html)}</div></section>
<section><h2>Run information</h2><table>{rows}</table></section>
<section><h2>Metric definitions</h2><ul class="note">{defs}</ul>
<p class="note">LPIPS: Zhang, Isola, Efros, Shechtman, Wang, “The Unreasonable Effectiveness of Deep Features
as a Perceptual Metric”, CVPR 2018 (AlexNet trunk, v0.1 linear heads).</p></section>
</main>
</body>
</html>
"""


# ------------------------------------------------------------------------------------------------------- API


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("sagevideo", "torch", "torchmetrics", "numpy"):
        try:
            out[pkg] = _md.version(pkg)
        except _md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_report(
    out_dir: str | os.PathLike,
    dense_frames: Any,
    accel_frames: Any,
    info: dict | None = None,
    *,
    fps: float = 16.0,
    diff_gain: float = DIFF_GAIN,
    preview_frames: int = 4,
    preview_max_width: int = 512,
    device: str | None = None,
    lpips_weights: str | None = None,
) -> dict:
    """Compute PSNR/SSIM/LPIPS of ``accel_frames`` against ``dense_frames`` and write the report folder.

    Args:
        out_dir: folder to write ``metrics.json``, ``side_by_side.mp4`` and ``report.html`` into (created).
        dense_frames, accel_frames: ``(T, H, W, 3)`` raw decoded frames, uint8 or float in [0, 1], same shape.
            Frames must be at least 11×11 (SSIM); LPIPS needs 31×31 and is reported unavailable below that.
        info: anything the caller wants recorded (wall times, ``speedup``, schedule, versions, GPU, ...);
            stored under ``"info"`` in metrics.json (non-JSON values are stringified) and shown as a table.
            ``info["title"]`` (optional) titles the HTML page; a numeric ``info["speedup"]`` gets a summary card.
        fps: frame rate of the side-by-side video.
        diff_gain: amplification of the absolute-difference panel (see :data:`DIFF_GAIN`).
        preview_frames: how many frames the HTML shows (evenly spaced, plus the worst one).
        preview_max_width: previews wider than this are downscaled (LANCZOS) in the HTML only.
        device: torch device for the metrics (default: CUDA if available, else CPU).
        lpips_weights: explicit path of the LPIPS weights (default: see :func:`sagevideo._lpips.find_weights`).

    Returns:
        The metrics document (the content of metrics.json, with ``inf`` as float).

    Raises:
        TypeError / ValueError: invalid frames (see :func:`sagevideo.metrics.validate_video`).
        VideoWriteError: ``out_dir`` cannot be created or written.
    """
    if not (isinstance(diff_gain, (int, float)) and diff_gain > 0 and math.isfinite(diff_gain)):
        raise ValueError(f"diff_gain must be a positive number, got {diff_gain!r}")
    if info is not None and not isinstance(info, dict):
        raise TypeError(f"info must be a dict or None, got {type(info).__name__}")
    shape_d = _m.validate_video(dense_frames, "dense_frames")
    shape_a = _m.validate_video(accel_frames, "accel_frames")
    if shape_d != shape_a:
        raise ValueError(f"dense_frames and accel_frames must have the same shape, got {shape_d} and {shape_a}")
    out = Path(out_dir)
    _ensure_writable_dir(out)

    # Metrics on the raw frames, before anything is encoded.
    psnr = _m.video_psnr(dense_frames, accel_frames, device=device)
    ssim = _m.video_ssim(dense_frames, accel_frames, device=device)
    try:
        lp = _m.video_lpips(dense_frames, accel_frames, device=device, weights=lpips_weights)
        lpips_entry = {"available": True, **lp.to_dict()}
    except LPIPSUnavailableError as exc:
        lpips_entry = {"available": False, "name": "lpips", "reason": str(exc)}
    except ValueError as exc:  # frames too small for the AlexNet trunk
        lpips_entry = {"available": False, "name": "lpips", "reason": str(exc)}

    t, h, w, _ = shape_d
    doc = {
        "schema": SCHEMA,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "generator": _versions(),
        "video": {"frames": t, "height": h, "width": w, "fps": float(fps)},
        "metrics": {
            "psnr": {"available": True, "unit": "dB", **psnr.to_dict()},
            "ssim": {"available": True, **ssim.to_dict()},
            "lpips": lpips_entry,
        },
        "side_by_side": {
            "file": _VIDEO_FILE,
            "panels": ["dense", "accelerated", f"abs difference x{diff_gain:g}"],
            "difference_gain": float(diff_gain),
            "separator_px": _SEPARATOR_PX,
            "codec": "H.264 yuv420p crf 18 (lossy; for viewing only)",
        },
        "files": [_METRIC_FILE, _VIDEO_FILE, _HTML_FILE],
        "info": info or {},
    }
    no_video = mp4_unavailable_reason()
    if no_video is not None:  # the metrics are the point: report them, say plainly that the video is missing
        warnings.warn(f"no {_VIDEO_FILE} in the report: {no_video}", RuntimeWarning, stacklevel=2)
        doc["side_by_side"] = {"file": None, "unavailable": no_video}
        doc["files"] = [_METRIC_FILE, _HTML_FILE]
    doc = _jsonable(doc)

    dense_u8 = _m.to_uint8_numpy(dense_frames, "dense_frames")
    accel_u8 = _m.to_uint8_numpy(accel_frames, "accel_frames")

    with open(out / _METRIC_FILE, "w", encoding="utf-8") as fh:
        json.dump(_encode_nonfinite(doc), fh, indent=2, ensure_ascii=False, allow_nan=False)
        fh.write("\n")
    if no_video is None:
        write_video(out / _VIDEO_FILE, _side_by_side(dense_u8, accel_u8, float(diff_gain)), fps=fps)
    page = _html(doc, dense_u8, accel_u8, float(diff_gain), preview_frames, preview_max_width)
    (out / _HTML_FILE).write_text(page, encoding="utf-8")
    return doc

