"""Measurements for the tiny Wan model: VAE reconstruction PSNR, and whether generated videos follow the
colour and the direction their prompt states.

The video checks assume the held-out prompt template (:func:`data.heldout_prompt`): one coloured object
on a black background. The object is the set of saturated, not-dark pixels; its *dominant hue* is the
saturation-weighted circular mean hue of those pixels, and its *motion* is the displacement of the mask
centroid from the first quarter of the frames to the last quarter, in units of ``min(height, width)``
with ``y`` pointing down (so "up" is negative ``dy``, as in :data:`data.DIRECTIONS`).

Shape is measured on the object's *silhouette* (:func:`silhouette`): per frame, the largest connected part of
the object's bright core (object pixels at least half as bright as its 95th-percentile value), summarised by
its fill ratio (area over bounding-box area), its bottom-heaviness and its hole fraction. The generated
shapes are blurred, so these are compared between videos that differ only in the shape word
(:func:`shape_contrasts`), not against absolute values.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from sagevideo.recipes.tiny_wan.data import COLOURS, DIRECTIONS, colour_hue

MIN_SATURATION = 0.35
MIN_VALUE = 0.2
MIN_DISPLACEMENT = 0.05  # frame units; held-out prompts say "quickly": ~0.014 per frame


def as_video(frames) -> np.ndarray:
    """``[T, H, W, 3]`` float array in [0, 1] from a pipeline output (``np`` batch, list of PIL, tensor)."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu().numpy()
    if isinstance(frames, list):
        frames = np.stack([np.asarray(f, dtype=np.float32) / 255.0 for f in frames])
    arr = np.asarray(frames, dtype=np.float32)
    if arr.ndim == 5:
        if arr.shape[0] != 1:
            raise ValueError(f"expected one video, got a batch of {arr.shape[0]}")
        arr = arr[0]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected [T, H, W, 3], got {arr.shape}")
    return arr


def rgb_to_hsv(video: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised RGB -> (hue degrees, saturation, value) for arrays ``[..., 3]`` in [0, 1]."""
    r, g, b = video[..., 0], video[..., 1], video[..., 2]
    mx = video.max(axis=-1)
    mn = video.min(axis=-1)
    delta = mx - mn
    safe = np.where(delta > 1e-6, delta, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = np.where(delta > 1e-6, h * 60.0, 0.0)
    s = np.where(mx > 1e-6, delta / np.where(mx > 1e-6, mx, 1.0), 0.0)
    return h, s, mx


def object_mask(video: np.ndarray) -> np.ndarray:
    """``[T, H, W]`` mask of saturated, not-dark pixels (the object on a neutral background)."""
    _, s, v = rgb_to_hsv(video)
    return (s > MIN_SATURATION) & (v > MIN_VALUE)


def hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def dominant_hue(video: np.ndarray) -> tuple[float, float]:
    """(hue in degrees, fraction of pixels that are object pixels). Hue is NaN when there are none."""
    h, s, v = rgb_to_hsv(video)
    mask = (s > MIN_SATURATION) & (v > MIN_VALUE)
    frac = float(mask.mean())
    if not mask.any():
        return float("nan"), frac
    w = s[mask] * v[mask]
    ang = np.deg2rad(h[mask])
    hue = math.degrees(math.atan2(float((w * np.sin(ang)).sum()), float((w * np.cos(ang)).sum()))) % 360.0
    return hue, frac


def nearest_colour(hue: float) -> str:
    if math.isnan(hue):
        return ""
    return min(COLOURS, key=lambda c: hue_distance(hue, colour_hue(c)))


def centroids(video: np.ndarray) -> np.ndarray:
    """``[T, 2]`` object-mask centroid (x, y) per frame in frame units from the centre; NaN if empty."""
    mask = object_mask(video)
    T, H, W = mask.shape
    S = float(min(H, W))
    xs = (np.arange(W) + 0.5 - W / 2) / S
    ys = (np.arange(H) + 0.5 - H / 2) / S
    out = np.full((T, 2), np.nan)
    for t in range(T):
        m = mask[t]
        n = m.sum()
        if n >= 4:
            out[t, 0] = (m.sum(axis=0) * xs).sum() / n
            out[t, 1] = (m.sum(axis=1) * ys).sum() / n
    return out


def displacement(video: np.ndarray) -> tuple[float, float]:
    """Centroid of the last quarter of frames minus that of the first quarter, (dx, dy)."""
    c = centroids(video)
    q = max(1, len(c) // 4)
    first, last = c[:q], c[-q:]
    if np.isnan(first).all() or np.isnan(last).all():
        return float("nan"), float("nan")
    d = np.nanmean(last, axis=0) - np.nanmean(first, axis=0)
    return float(d[0]), float(d[1])


def check_video(frames, colour: str | None = None, direction: str | None = None) -> dict:
    """Does the video show ``colour`` (dominant hue nearest to it among the palette colours) moving in
    ``direction`` (displacement along it >= MIN_DISPLACEMENT and larger than across it)?"""
    video = as_video(frames)
    hue, frac = dominant_hue(video)
    dx, dy = displacement(video)
    out = {"hue": hue, "object_fraction": frac, "nearest_colour": nearest_colour(hue), "dx": dx, "dy": dy}
    if colour is not None:
        out["hue_error"] = hue_distance(hue, colour_hue(colour)) if not math.isnan(hue) else float("nan")
        out["colour_ok"] = out["nearest_colour"] == colour
    if direction is not None:
        ux, uy = DIRECTIONS[direction]
        along = dx * ux + dy * uy
        across = abs(-dx * uy + dy * ux)
        out["along"], out["across"] = along, across
        out["direction_ok"] = bool(along >= MIN_DISPLACEMENT and along > across)
    return out


# ----------------------------------------------------------------------------------------------------
# Shape: silhouette statistics
# ----------------------------------------------------------------------------------------------------

CORE_BRIGHTNESS = 0.5  # silhouette = object pixels at least this fraction as bright as the object's 95th percentile
MIN_SILHOUETTE_AREA = 8  # pixels; smaller frames are skipped

#: Orderings of silhouette statistics that the rendered geometry (:func:`data._shape_distance`) predicts with a
#: wide gap, as ``(statistic, larger shape, smaller shape)``. Fill ratio of the rendered shapes: square 1.0,
#: circle 0.78, ring ~0.6, triangle and diamond ~0.52, star ~0.48; bottom-heaviness: the apex-up triangle
#: ~0.16, the others |x| <= 0.05. Used between videos that differ only in the shape word.
SHAPE_ORDERINGS: tuple[tuple[str, str, str], ...] = (
    ("fill", "square", "circle"),
    ("fill", "circle", "triangle"),
    ("fill", "circle", "diamond"),
    ("fill", "circle", "star"),
    ("bottom_heavy", "triangle", "square"),
    ("bottom_heavy", "triangle", "circle"),
)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of each 2-D mask in ``mask`` (``[..., H, W]`` bool); ties go to the
    component that starts first in raster order."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if mask.ndim > 2:
        return np.stack([largest_component(m) for m in mask])
    labels, n = ndimage.label(mask)  # default structure: 4-connected
    if n == 0:
        return mask.copy()
    counts = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(counts))


def fill_ratio(mask: np.ndarray) -> float:
    """Area of a 2-D mask over the area of its bounding box: 1 for an axis-aligned square, pi/4 ~ 0.79 for a
    disc, 0.5 for a triangle or a diamond, lower for a star. NaN for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return float("nan")
    return float(len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))


def bottom_heaviness(mask: np.ndarray) -> float:
    """How far the centroid of a 2-D mask lies below the centre of its bounding box, in bounding-box heights
    (``y`` down): ~ +1/6 for a triangle with its apex up, 0 for shapes symmetric about a horizontal axis."""
    ys, _ = np.nonzero(mask)
    if len(ys) == 0:
        return float("nan")
    top, bottom = ys.min(), ys.max()
    return float((ys.mean() - 0.5 * (top + bottom)) / (bottom - top + 1))


def hole_fraction(mask: np.ndarray) -> float:
    """Share of the filled silhouette that is enclosed background (a ring's hole; 0 for solid shapes)."""
    from scipy import ndimage

    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return float("nan")
    crop = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    filled = ndimage.binary_fill_holes(crop)
    return float(1.0 - crop.sum() / filled.sum())


def silhouette_mask(video: np.ndarray) -> np.ndarray:
    """``[T, H, W]`` silhouette per frame: the object pixels (:func:`object_mask`) whose value is at least
    :data:`CORE_BRIGHTNESS` times the 95th percentile of the frame's object values (this drops the faint
    blur and motion trail around a generated object), then the largest connected part."""
    video = as_video(video)
    _, _, v = rgb_to_hsv(video)
    obj = object_mask(video)
    core = np.zeros_like(obj)
    for t in range(len(obj)):
        if obj[t].any():
            core[t] = obj[t] & (v[t] >= CORE_BRIGHTNESS * np.percentile(v[t][obj[t]], 95))
    return largest_component(core)


def silhouette(frames, skip_first: int = 1) -> dict:
    """Median over frames (after the first ``skip_first``, which the causal VAE decodes from a latent of its
    own and blurs most) of the silhouette's :func:`fill_ratio` (``"fill"``), :func:`bottom_heaviness`
    (``"bottom_heavy"``), :func:`hole_fraction` (``"hole"``) and area in pixels, with the number of frames
    used. Values are NaN when no frame has an object of at least :data:`MIN_SILHOUETTE_AREA` pixels."""
    masks = silhouette_mask(frames)[skip_first:]
    rows = [(fill_ratio(m), bottom_heaviness(m), hole_fraction(m), float(m.sum()))
            for m in masks if m.sum() >= MIN_SILHOUETTE_AREA]
    keys = ("fill", "bottom_heavy", "hole", "area")
    if not rows:
        return {**{k: float("nan") for k in keys}, "frames": 0}
    arr = np.asarray(rows)
    return {**{k: float(np.median(arr[:, i])) for i, k in enumerate(keys)}, "frames": len(rows)}


def shape_contrasts(by_shape: dict[str, dict]) -> list[dict]:
    """The :data:`SHAPE_ORDERINGS` that apply to the shapes in ``by_shape`` (shape word -> :func:`silhouette`
    of a video; the videos should differ only in that word: same seed, colour, direction and background), each
    as ``{"statistic", "larger", "smaller", "margin", "ok"}`` with ``margin`` = statistic of the shape predicted
    larger minus that of the other (``ok``: margin > 0)."""
    out = []
    for stat, hi, lo in SHAPE_ORDERINGS:
        if hi in by_shape and lo in by_shape:
            margin = by_shape[hi][stat] - by_shape[lo][stat]
            out.append({"statistic": stat, "larger": hi, "smaller": lo, "margin": float(margin),
                        "ok": bool(margin > 0)})
    return out


# ----------------------------------------------------------------------------------------------------
# Model-level evaluations
# ----------------------------------------------------------------------------------------------------


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR (dB) of videos in [-1, 1] (computed on the [0, 1] scale)."""
    mse = ((x.float() - y.float()) / 2.0).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10.0 * torch.log10(1.0 / mse)


@torch.no_grad()
def vae_reconstruction(vae, renderer, seed: int, clips: int, frames: int, height: int, width: int,
                       batch: int = 4, autocast: bool = False) -> dict:
    """Reconstruction PSNR on held-out clips (the ``vae-eval`` stream, ``split="eval"``, never used in
    training), overall and per background kind."""
    from sagevideo.recipes.tiny_wan.data import make_clips

    device = renderer.device
    per_kind: dict[str, list[float]] = {}
    values: list[float] = []
    for i in range(0, clips, batch):
        n = min(batch, clips - i)
        video, _, scenes = make_clips(renderer, seed, "vae-eval", i, n, frames, height, width, split="eval")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            z = vae.encode(video).latent_dist.mode()
            rec = vae.decode(z).sample
        p = psnr(video, rec).tolist()
        values.extend(p)
        for s, v in zip(scenes, p):
            kind = "photo" if s.background == "photo" else "shapes"
            per_kind.setdefault(kind, []).append(v)
    return {
        "psnr": float(np.mean(values)),
        "psnr_by_kind": {k: float(np.mean(v)) for k, v in sorted(per_kind.items())},
        "clips": clips,
        "size": [frames, height, width],
    }


def _summary(results: list[dict]) -> dict:
    colour = [r["colour_ok"] for r in results if "colour_ok" in r]
    motion = [r["direction_ok"] for r in results if "direction_ok" in r]
    return {
        "colour_ok": f"{sum(colour)}/{len(colour)}",
        "direction_ok": f"{sum(motion)}/{len(motion)}",
        "mean_hue_error": float(np.nanmean([r.get("hue_error", np.nan) for r in results])) if results else float("nan"),
        "mean_object_fraction": float(np.mean([r["object_fraction"] for r in results])) if results else float("nan"),
    }


def _frames(video: torch.Tensor) -> np.ndarray:
    """``[3, T, H, W]`` in [-1, 1] -> ``[T, H, W, 3]`` in [0, 1]."""
    return ((video.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu().numpy()


@torch.no_grad()
def heldout_reference(vae, renderer, frames: int, height: int, width: int, seed: int = 0,
                      autocast: bool = False) -> dict:
    """The evaluation's checks on what a correct answer to each held-out prompt looks like
    (:func:`data.heldout_scenes`): the rendered clips, and the same clips through the VAE (encode, decode).
    The second is the best a perfect transformer could score with this VAE; a low score there means the VAE,
    not the transformer, loses the objects. Also the reconstruction PSNR of those clips, and for scale the
    PSNR of the same clips with the objects erased (the black background alone): a VAE that does not beat it
    by a wide margin does not reproduce the objects."""
    import dataclasses

    from sagevideo.recipes.tiny_wan.data import heldout_prompts, heldout_scenes

    device = renderer.device
    scenes = heldout_scenes(frames, height, width, seed)
    video = renderer.render(scenes, frames, height, width)
    empty = renderer.render([dataclasses.replace(s, objects=[]) for s in scenes], frames, height, width)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        rec = vae.decode(vae.encode(video).latent_dist.mode()).sample
    out = {"size": [frames, height, width]}
    for name, clips in (("render", video), ("vae", rec)):
        results = [check_video(_frames(v), p["colour"], p["direction"]) for v, p in zip(clips, heldout_prompts())]
        out[name] = _summary(results)
    out["vae"]["psnr"] = float(psnr(video, rec.float()).mean())
    out["objects_erased_psnr"] = float(psnr(video, empty).mean())
    return out


def generate(pipe, prompt: str, frames: int, height: int, width: int, steps: int, guidance: float, seed: int,
             negative_prompt: str | None = None) -> np.ndarray:
    """One video ``[T, H, W, 3]`` in [0, 1] with a CPU generator (so seeds mean the same on any device)."""
    g = torch.Generator("cpu").manual_seed(seed)
    out = pipe(
        prompt=prompt,
        negative_prompt=negative_prompt,
        num_frames=frames,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=g,
        output_type="np",
    )
    return as_video(out.frames)


def evaluate_prompts(pipe, prompts: list[dict], frames: int, height: int, width: int, steps: int,
                     guidance: float, seed: int = 0, deadline: float | None = None) -> dict:
    """Run :func:`check_video` on each ``{"prompt", "colour", "direction"}`` and summarise the pass rates
    (over the prompts done before ``deadline``, a ``time.time()`` value, if given)."""
    results = []
    t0 = time.time()
    for i, p in enumerate(prompts):
        if deadline is not None and time.time() > deadline:
            break
        video = generate(pipe, p["prompt"], frames, height, width, steps, guidance, seed + i)
        r = check_video(video, p.get("colour"), p.get("direction"))
        r["prompt"] = p["prompt"]
        results.append(r)
    return {
        "size": [frames, height, width],
        "steps": steps,
        "guidance": guidance,
        **_summary(results),
        "seconds_per_video": (time.time() - t0) / max(1, len(results)),
        "results": results,
    }
