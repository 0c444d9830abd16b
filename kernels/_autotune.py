"""First-use launch tuning shared by sagevideo's Triton kernels.

Each kernel module keeps its own candidate list and its own cache of choices; :func:`pick_fastest` times the
candidates once per key on the call's own operands and keeps the fastest.

Choices are also kept on disk, so a new process does not time the candidates again (about 50 launches; at
Wan2.1-1.3B on an H100 that saved 150-250 ms on a later process's first sparse calls): one JSON file,
``autotune.json`` in ``$SAGEVIDEO_CACHE_DIR`` (default ``$XDG_CACHE_HOME/sagevideo``, else
``~/.cache/sagevideo``). An entry holds for one kernel, key, GPU model, capability, torch and Triton version
and candidate list; anything else is timed afresh. Setting ``SAGEVIDEO_AUTOTUNE_CACHE=0`` turns the file off
(reads and writes). A file that cannot be read or written is ignored: the choice is then timed, as without it.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

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


def cache_path() -> Path | None:
    """The file that keeps the choices across processes, or None when ``SAGEVIDEO_AUTOTUNE_CACHE=0``."""
    if os.environ.get("SAGEVIDEO_AUTOTUNE_CACHE", "1") == "0":
        return None
    root = os.environ.get("SAGEVIDEO_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "sagevideo")
    return Path(root) / "autotune.json"


def _disk_key(kernel: str, full_key: tuple, device: torch.device, candidates) -> str:
    import triton

    return json.dumps([kernel, repr(full_key), torch.cuda.get_device_name(device), torch.__version__,
                       triton.__version__, repr(list(candidates))])


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: Path, entry: str, value: dict) -> None:
    """Add one entry (read, update, atomic replace: concurrent writers may drop each other's new entries, which
    are then timed again, but never leave a torn file)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        data[entry] = value
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=0)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def pick_fastest(chosen: dict, key: tuple, device: torch.device, candidates, fallback: dict, launch,
                 kernel: str) -> dict:
    """The launch configuration for ``key`` on ``device``: ``fallback`` off CUDA; on CUDA the fastest of
    ``candidates`` (each passed to ``launch``), timed on first use and cached in ``chosen`` under
    ``(device capability, *key)`` and in :func:`cache_path` under ``kernel`` (the calling kernel's name) and
    the rest of the entry's identity: one untimed run each (compilation), then :data:`ROUNDS` interleaved timed
    rounds, median per candidate. A candidate the GPU cannot run (e.g. too much shared memory) is skipped; if
    none runs, ``fallback`` is kept."""
    if device.type != "cuda":
        return fallback
    full_key = (torch.cuda.get_device_capability(device), *key)
    if full_key in chosen:
        return chosen[full_key]
    path = cache_path()
    entry = _disk_key(kernel, full_key, device, candidates) if path is not None else None
    if entry is not None:
        stored = _read(path).get(entry)
        if isinstance(stored, dict) and stored in list(candidates):  # JSON round trip kept it one of them
            chosen[full_key] = dict(stored)
            return chosen[full_key]
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
    if entry is not None and best is not None:  # a fallback (nothing ran) is not remembered across processes
        _write(path, entry, chosen[full_key])
    return chosen[full_key]
