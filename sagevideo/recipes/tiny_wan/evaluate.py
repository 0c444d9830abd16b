"""Measurements for the tiny Wan model: VAE reconstruction PSNR, and whether generated videos follow the
colour and the direction their prompt states.

The video checks assume the held-out prompt template (:func:`data.heldout_prompt`): one coloured object
on a black background. The object is the set of saturated, not-dark pixels; its *dominant hue* is the
saturation-weighted circular mean hue of those pixels, and its *motion* is the displacement of the mask
centroid from the first quarter of the frames to the last quarter, in units of ``min(height, width)``
with ``y`` pointing down (so "up" is negative ``dy``, as in :data:`data.DIRECTIONS`).
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
