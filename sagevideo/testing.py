"""Inputs with the structure real video DiTs feed attention, and the error metrics the project reports.

Used by the tests and by ``benchmarks/`` (with their timer, :func:`call_times`): plain Gaussians hide exactly the
failure modes quantized attention has (K with large per-channel offsets, a few outlier channels in Q and K, V with
a bias), so every accuracy check draws from :func:`structured_qkv`.
"""

from __future__ import annotations

import statistics
import time

import torch


def structured_qkv(
    batch: int,
    q_heads: int,
    kv_heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    layout: str = "BHSD",
    k_offset_std: float = 4.0,
    outlier_channels: int = 2,
    outlier_gain: float = 8.0,
    v_bias_std: float = 1.0,
):
    """Q, K, V with realistic structure, returned in ``layout`` (contiguous).

    * K = Gaussian + a per-(head, channel) offset of std ``k_offset_std`` shared by all tokens (what K
      smoothing removes);
    * a few channels of Q and K scaled by ``outlier_gain`` (outliers that per-tensor scales fail on);
    * V = Gaussian + a per-(head, channel) bias of std ``v_bias_std``;
    * Q is correlated with K (Q = 0.5·K-direction + noise) so attention is peaked, not uniform.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    k = randn(batch, kv_heads, kv_len, head_dim) + k_offset_std * randn(1, kv_heads, 1, head_dim)
    q = randn(batch, q_heads, q_len, head_dim)
    # correlate queries with keys of the same head so some scores stand out
    group = q_heads // kv_heads
    src = k.repeat_interleave(group, dim=1)
    idx = torch.randint(0, kv_len, (q_len,), generator=g)
    q = q + 0.5 * (src[:, :, idx] - src.mean(dim=2, keepdim=True))
    ch = torch.randperm(head_dim, generator=g)[:outlier_channels]
    q[..., ch] *= outlier_gain
    k[..., ch] *= outlier_gain
    v = randn(batch, kv_heads, kv_len, head_dim) + v_bias_std * randn(1, kv_heads, 1, head_dim)
    out = []
    for t in (q, k, v):
        t = t.to(dtype)
        if layout == "BSHD":
            t = t.transpose(1, 2)
        out.append(t.contiguous().to(device))
    return tuple(out)


def locality_qkv(b, h, grid, extra, d, *, dtype=torch.bfloat16, device="cpu", seed=0, text_first=False):
    """Q, K, V ``(B, H, S, D)`` with spatial-temporal locality, ``S = T·H·W + extra``: a smooth random field
    over the (T, H, W) grid (frame-major) shared by Q and K (so nearby tokens score high) with two outlier
    channels (×8), plus noise; K gets a per-channel offset and V a per-channel bias (the structure of
    :func:`structured_qkv`). ``extra`` text tokens of plain noise follow the video, or precede it with
    ``text_first`` (CogVideoX's order). The inputs of the sparse benchmarks: sparse patterns need locality,
    which Gaussian noise lacks."""
    g = torch.Generator(device=device).manual_seed(seed)
    t, hh, ww = grid
    s = t * hh * ww + extra
    low = (max(2, t // 3), max(2, hh // 5), max(2, ww // 5))
    out = [torch.empty((b, h, s, d), dtype=dtype, device=device) for _ in range(3)]
    ch = torch.randperm(d, generator=g, device=device)[:2]
    for hi in range(h):
        field = torch.randn(b, d, *low, generator=g, device=device)
        field = torch.nn.functional.interpolate(field, size=grid, mode="trilinear", align_corners=False)
        field = field.flatten(2).transpose(1, 2)  # (B, T*H*W, D)
        field = field / field.std().clamp_min(1e-6)
        text = torch.randn(b, extra, d, generator=g, device=device)
        base = torch.cat([field, text], dim=1) * 1.5
        base[..., ch] *= 8.0  # outlier channels: large, but smooth over the grid like the rest of the field

        def noise():
            return torch.randn(b, s, d, generator=g, device=device)

        q = base + noise()
        k = base + noise() + 4.0 * torch.randn(1, 1, d, generator=g, device=device)
        v = noise() + torch.randn(1, 1, d, generator=g, device=device)
        for dst, src in zip(out, (q, k, v)):
            if text_first:
                src = torch.cat([src[:, s - extra:], src[:, : s - extra]], dim=1)
            dst[:, hi] = src.to(dtype)
    return tuple(out)


STEP_NOISE = 0.1


def denoising_steps(qkv, n, *, seed):
    """``n`` input sets standing for consecutive denoising steps of one video: ``qkv`` itself, then copies
    with ``STEP_NOISE`` (relative to each tensor's std) of fresh Gaussian noise added, cosine ≈ 0.995 to it.
    The sparse methods' benchmark rows cycle through these: their state (centroids, head classes) is then
    warm-started from the previous call, which in a sampler is the previous step of the same video. Cycling
    through unrelated inputs instead (``benchmarks/sparse.py`` before 2026-11-24) warm-started k-means from
    another video's centroids: coarser, unbalanced clusters and a denser, slower plan than a sampler sees."""
    g = torch.Generator(device=qkv[0].device).manual_seed(seed)

    def step(t):
        noise = torch.randn(t.shape, generator=g, device=t.device, dtype=torch.float32)
        return (t.float() + STEP_NOISE * t.float().std() * noise).to(t.dtype)

    return [tuple(qkv)] + [tuple(step(t) for t in qkv) for _ in range(1, n)]


def call_times(fn, inputs, reps: int, *, cuda: bool) -> list[float]:
    """Milliseconds of each of ``reps`` calls ``fn(inputs[i % len(inputs)])``: CUDA events around each call
    (read after one final sync) when ``cuda``, wall-clock otherwise. The benchmark scripts' timer."""
    if not cuda:
        times = []
        for r in range(reps):
            t0 = time.perf_counter()
            fn(inputs[r % len(inputs)])
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    torch.cuda.synchronize()
    events = []
    for r in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(inputs[r % len(inputs)])
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def cycle_mean(times: list[float], cycle: int) -> float:
    """The median, over every run of ``cycle`` consecutive calls, of the run's mean time.

    For calls that rebuild a plan every ``cycle`` calls and reuse it in between: every such run holds one
    planning call, so a run's mean is the plan's cost amortised over the calls that reuse it, and the median over the
    runs ignores the few runs that met a one-time cost (a Triton kernel variant compiled, and its launch
    configuration timed, the first time a call takes a new path: several seconds at the 720p shapes). Needs at
    least ``cycle`` times."""
    if cycle < 1 or len(times) < cycle:
        raise ValueError(f"cycle_mean: need cycle >= 1 and at least {cycle} times, got {len(times)}")
    return statistics.median(statistics.fmean(times[i:i + cycle]) for i in range(len(times) - cycle + 1))


def error_metrics(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Cosine similarity, relative L1 (Σ|o−r| / Σ|r|) and relative L2 of ``out`` against ``ref`` (float64)."""
    if out.shape != ref.shape:  # flattening would compare unrelated elements (e.g. BSHD against BHSD)
        raise ValueError(f"error_metrics: shapes differ: {tuple(out.shape)} vs {tuple(ref.shape)}")
    o = out.detach().to(torch.float64).flatten()
    r = ref.detach().to(torch.float64).flatten()
    if not torch.isfinite(o).all():
        return {"cos": float("nan"), "rel_l1": float("inf"), "rel_l2": float("inf")}
    cos = torch.nn.functional.cosine_similarity(o, r, dim=0).item()
    rel_l1 = ((o - r).abs().sum() / r.abs().sum().clamp_min(1e-300)).item()
    rel_l2 = ((o - r).norm() / r.norm().clamp_min(1e-300)).item()
    return {"cos": cos, "rel_l1": rel_l1, "rel_l2": rel_l2}
