"""First-use launch tuning shared by sagevideo's Triton kernels.

Each kernel module keeps its own candidate list and its own cache of choices; :func:`pick_fastest` times the
candidates once per key on the call's own operands and keeps the fastest.
"""

from __future__ import annotations

import statistics

import torch

#: Timed rounds; each round runs every candidate once, in turn, and a candidate's time is its median.
#: Interleaving keeps clock drift from favouring one candidate; the median survives one slow run.
#: (``triton.testing.do_bench(rep=20)``, used before, sizes its repeats from a 20 ms budget: one or two
#: timed runs of a call that takes 10-300 ms, the attention calls at video sizes.)
ROUNDS = 5


def _elapsed_ms(fn, device: torch.device) -> float:
    """GPU time of one call of ``fn`` (CUDA events around it, waited for)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def pick_fastest(chosen: dict, key: tuple, device: torch.device, candidates, fallback: dict, launch) -> dict:
    """The launch configuration for ``key`` on ``device``: ``fallback`` off CUDA; on CUDA the fastest of
    ``candidates`` (each passed to ``launch``), timed on first use and cached in ``chosen`` under
    ``(device capability, *key)``: one untimed run each (compilation), then :data:`ROUNDS` interleaved timed
    rounds, median per candidate. A candidate the GPU cannot run (e.g. too much shared memory) is skipped; if
    none runs, ``fallback`` is kept."""
    if device.type != "cuda":
        return fallback
    full_key = (torch.cuda.get_device_capability(device), *key)
    if full_key not in chosen:
        live = []
        for cand in candidates:
            try:
                launch(cand)
            except Exception:
                continue
            live.append(cand)
        times: list[list[float]] = [[] for _ in live]
        for _ in range(ROUNDS if live else 0):
            for cand, ts in zip(live, times):
                ts.append(_elapsed_ms(lambda cand=cand: launch(cand), device))
        best = min(range(len(live)), key=lambda i: statistics.median(times[i]), default=None)
        chosen[full_key] = dict(fallback if best is None else live[best])
    return chosen[full_key]
