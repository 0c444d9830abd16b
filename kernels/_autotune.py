"""First-use launch tuning shared by sagevideo's Triton kernels.

Each kernel module keeps its own candidate list and its own cache of choices; :func:`pick_fastest` times the
candidates once per key on the call's own operands (``triton.testing.do_bench``, median) and keeps the fastest.
"""

from __future__ import annotations

import torch


def pick_fastest(chosen: dict, key: tuple, device: torch.device, candidates, fallback: dict, launch) -> dict:
    """The launch configuration for ``key`` on ``device``: ``fallback`` off CUDA; on CUDA the fastest of
    ``candidates`` (each passed to ``launch``), timed on first use and cached in ``chosen`` under
    ``(device capability, *key)``. A candidate the GPU cannot run (e.g. too much shared memory) is skipped;
    if none runs, ``fallback`` is kept."""
    if device.type != "cuda":
        return fallback
    full_key = (torch.cuda.get_device_capability(device), *key)
    if full_key not in chosen:
        from triton.testing import do_bench

        best, best_ms = None, float("inf")
        for cand in candidates:
            try:
                ms = do_bench(lambda: launch(cand), warmup=5, rep=20, return_mode="median")
            except Exception:
                continue
            if ms < best_ms:
                best, best_ms = cand, ms
        chosen[full_key] = dict(best or fallback)
    return chosen[full_key]
