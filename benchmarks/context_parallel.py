"""Context-parallel benchmark (2 GPUs, NCCL): Wan2.1-1.3B under diffusers' Ulysses and Ring, per attention mode.

    torchrun --nproc-per-node 2 benchmarks/context_parallel.py --out results.json
    torchrun --nproc-per-node 2 benchmarks/context_parallel.py --layers 10 --repeats 3 --modes dense int8-fp8
    python benchmarks/context_parallel.py --smoke --out smoke.json      # CPU: 2 gloo processes, tiny model

Without torchrun the script spawns ``--nproc`` processes itself. NVLink multicast stays off
(``NCCL_NVLS_ENABLE=0`` is set before the process group exists).

Model and inputs: ``WanTransformer3DModel`` with the published Wan2.1-T2V-1.3B config (the one
``benchmarks/pipeline.py`` uses: 30 layers, 12 heads × 128, hidden 1536, FFN 8960, text dim 4096, patch
(1, 2, 2)), random weights built on every rank from the same seed and then broadcast from rank 0 (so every
rank holds the same bits), in bf16. Inputs: the latent of 81 frames at 480×832 — (1, 16, 21, 60, 104), 32,760
video tokens — and 512 random text embeddings of width 4096, a timestep of 500. ``--smoke`` keeps the code
path and shrinks everything: a 2-layer Wan of 2 heads × 32 in float32 on CPU, 72 video tokens, gloo.

Modes (``--modes``): any ``sagevideo.methods`` name (``dense``, ``int8-fp16``, ``int8-fp8``, and the sparse
methods once registered), patched for every DiT self-attention call with ``AttentionConfig.uniform``; and
``sdpa``, the unpatched model whose self-attention runs diffusers' own backend ``--sdpa-backend``
(``_native_cudnn`` on CUDA: it returns the LSE Ring needs; ``native`` on CPU, which cannot run Ring). Under
Ring, sagevideo's ``dense`` gets its LSE from an extra exact float32 pass (``reference.attention_exact``), so its
Ring time is not SDPA's: ``sdpa`` is the dense baseline to read there.

Phases, in one process group:

1. one device: every rank runs the model alone (no communication) for each mode;
2. for each of ``--cp`` (``ulysses``, ``ring``): a fresh model, ``enable_parallelism`` with
   ``ContextParallelConfig(<cp>_degree=world)``, then each mode (patched / unpatched in turn).

Timing: CUDA events around one transformer forward under ``torch.inference_mode`` (``time.perf_counter`` on
CPU), ``--warmup`` forwards first (Triton autotuning, cuDNN plans), then the median of ``--repeats``; a
parallel forward's time is the slower rank's. Accuracy (float64 on the host): max |Δ|, relative L1 and cosine
of each parallel output against the one-device output of the same mode and against the one-device reference
mode (``dense``, else ``sdpa``); every rank's gathered output is checked to be the same.

Targets (issue 9), each reported with its value, limit and pass/fail:

* match — a parallel output matches the one-device output of the same mode within the quantization tolerance
  ``tol`` = relative L1 of the one-device quantized output against the one-device reference (``int8-fp8`` if
  measured, else the largest approximate mode's). Ulysses (all modes) and Ring with exact modes: rel L1 against
  the same mode ≤ ``tol`` (of that mode, or the global one for exact modes). Ring with an approximate mode
  quantizes each KV chunk with its own statistics, so it is a different rounding of the same size: rel L1
  against the one-device *reference* ≤ 2 × that mode's one-device error (the criterion of
  ``tests/test_context_parallel.py``).
* speed — Ulysses: ``t(baseline) / t(mode)`` on ``world`` devices ≥ 0.9 × the same ratio on one device, for
  each approximate mode and each exact baseline measured (``dense``, ``sdpa``). Ring ratios are reported too.

Results go to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import MODELS  # noqa: E402  (the published Wan2.1-1.3B config, shared with pipeline.py)

os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off, before any NCCL communicator exists

FULL = MODELS["wan2.1-1.3b"]
FULL_TEXT = (512, 4096)
# --smoke: the tiny Wan of tests/tiny_pipelines.py (2 heads × 32) with 2 layers, 9 frames at 64×96 → 72 tokens
TINY_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16,
                   out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
TINY_VIDEO = (9, 64, 96)
TINY_TEXT = (16, 32)
EXACT_MODES = ("dense", "sdpa")  # modes without approximation: the references
CP_MODES = ("ulysses", "ring")
SPEED_MARGIN = 0.9  # "at least the one-GPU ratio minus 10 %"
RING_FACTOR = 2.0  # Ring with per-chunk quantization: error against the reference ≤ 2 × the one-device error
#: diffusers backends whose context-parallel op returns no LSE (diffusers 0.42: "native"), which Ring needs to merge
#: its KV chunks. The sdpa mode is not run under Ring with them: the call fails inside Ring's exchange, and the
#: exchange left in flight could abort a gloo process at exit (seen once in a CI run, 2026-11-24).
NO_LSE_BACKENDS = ("native",)


# ----------------------------------------------------------------------------------------------------------
# Model, inputs, modes
# ----------------------------------------------------------------------------------------------------------


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """Wan's latent for a video: the VAE compresses 4× in time (first frame kept), 8× in space."""
    return (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)


def build_model(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The Wan transformer with seeded random weights, created directly on ``device`` in ``dtype``; when a
    process group exists, rank 0's weights are broadcast so that every rank holds the same bits."""
    import torch.distributed as dist
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(dtype).eval()
    if dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            for p in model.parameters():
                dist.broadcast(p.data, src=0)
    return model


def make_inputs(latent: tuple, text: tuple[int, int], device: torch.device, dtype: torch.dtype) -> dict:
    """Seeded random inputs, drawn on the host (the same on every rank and every device type)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*latent, generator=g)
    enc = torch.randn(1, *text, generator=g)
    return dict(hidden_states=x.to(device, dtype), timestep=torch.tensor([500.0], device=device),
                encoder_hidden_states=enc.to(device, dtype), return_dict=False)


class AttentionMode:
    """``with AttentionMode(model, mode, sdpa_backend):`` — the model runs ``mode`` inside the block.

    A sagevideo method name patches the transformer with ``AttentionConfig.uniform(mode)`` (unpatched on exit);
    ``sdpa`` leaves the model unpatched and points its self-attention processors (``blocks[i].attn1``, the calls
    the patch would take over) at diffusers' backend ``sdpa_backend``, restoring them on exit.
    """

    def __init__(self, model, mode: str, sdpa_backend: str):
        self.model, self.mode, self.sdpa_backend = model, mode, sdpa_backend
        self.handle = None
        self.saved = []

    def __enter__(self):
        if self.mode == "sdpa":
            from diffusers.models.attention_dispatch import AttentionBackendName

            backend = AttentionBackendName(self.sdpa_backend)
            for block in self.model.blocks:
                proc = block.attn1.processor
                self.saved.append((proc, proc._attention_backend))
                proc._attention_backend = backend
        else:
            from sagevideo.config import AttentionConfig
            from sagevideo.patching import patch_transformer

            self.handle = patch_transformer(self.model, AttentionConfig.uniform(self.mode))
        return self

    @property
    def guard_events(self) -> int | None:
        return None if self.handle is None else len(self.handle.guard_events)

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.unpatch()
        for proc, backend in self.saved:
            proc._attention_backend = backend


def check_modes(modes) -> None:
    """Refuse unknown modes early (on every rank alike), after giving the sparse methods a chance to register."""
    from sagevideo import methods

    wanted = [m for m in modes if m != "sdpa"]
    if any(m not in methods.names() for m in wanted):
        try:  # the sparse methods register themselves when their package is imported
            import sagevideo.sparse  # noqa: F401
        except ImportError:
            pass
    unknown = [m for m in wanted if m not in methods.names()]
    if unknown:
        raise SystemExit(f"error: unknown mode(s) {unknown}; choose from sdpa, {', '.join(methods.names())}")


# ----------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------


def time_forward(model, inputs: dict, warmup: int, repeats: int):
    """``(times_ms, output)``: ``warmup`` untimed forwards, then ``repeats`` timed ones (CUDA events on a GPU,
    the host clock on CPU); the output of the last forward."""
    cuda = inputs["hidden_states"].device.type == "cuda"
    times, out = [], None
    with torch.inference_mode():
        for i in range(warmup + repeats):
            out = None
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = model(**inputs)[0]
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                out = model(**inputs)[0]
                ms = (time.perf_counter() - t0) * 1000
            if i >= warmup:
                times.append(ms)
    return times, out


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """max |Δ|, relative L1 and cosine of ``out`` against ``ref`` (float64)."""
    o, r = out.double().flatten(), ref.double().flatten()
    if not torch.isfinite(o).all():
        return {"max_abs": math.inf, "rel_l1": math.inf, "cos": math.nan}
    return {
        "max_abs": float((o - r).abs().max()),
        "rel_l1": float((o - r).abs().sum() / r.abs().sum()),
        "cos": float(torch.nn.functional.cosine_similarity(o, r, dim=0)),
    }


def cross_rank_spread(out: torch.Tensor) -> float:
    """max over elements of (max over ranks − min over ranks): 0 when every rank holds the same output."""
    import torch.distributed as dist

    hi, lo = out.float().clone(), out.float().clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).max())


def gather(obj) -> list:
    import torch.distributed as dist

    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def measure(model, inputs, mode, args, log, parallel: bool) -> tuple[dict, torch.Tensor | None]:
    """One mode on the current model: the entry for the JSON (timings of every rank) and this rank's output."""
    try:
        with AttentionMode(model, mode, args.sdpa_backend) as am:
            times, out = time_forward(model, inputs, args.warmup, args.repeats)
            guard = am.guard_events
        error = None
    except Exception as exc:  # recorded on every rank; a failure on one rank alone would hang the others
        times, out, guard, error = [], None, None, f"{type(exc).__name__}: {exc}"
    per_rank = gather({"times": times, "error": error, "guard": guard})
    errors = [r["error"] for r in per_rank if r["error"]]
    if errors:
        log(f"  {mode}: failed: {errors[0]}")
        return {"error": errors[0]}, None
    entry = {}
    if parallel:  # one forward takes as long as its slowest rank
        all_ms = [max(ts) for ts in zip(*(r["times"] for r in per_rank))]
        entry["cross_rank_max_abs"] = cross_rank_spread(out)
    else:  # each rank ran alone: rank 0's times, the others for reference
        all_ms = per_rank[0]["times"]
        entry["other_ranks_ms"] = [round(statistics.median(r["times"]), 3) for r in per_rank[1:]]
    entry.update(ms=round(statistics.median(all_ms), 3), all_ms=[round(t, 3) for t in all_ms])
    if guard is not None:
        entry["guard_events"] = max(r["guard"] for r in per_rank)
    return entry, out.float().cpu()


# ----------------------------------------------------------------------------------------------------------
# Ratios and targets
# ----------------------------------------------------------------------------------------------------------


def reference_mode(modes) -> str | None:
    return next((m for m in EXACT_MODES if m in modes), None)


def analyse(single: dict, parallel: dict, outputs: dict, modes, world: int) -> tuple[dict, list]:
    """Fill the accuracy and speed fields; return ``(tolerances, targets)``."""
    ref = reference_mode(modes)
    ok = {m for m in modes if "ms" in single.get(m, {})}
    # one-device error of each approximate mode against the reference: the quantization tolerance
    tol = {}
    for m in modes:
        if m not in EXACT_MODES and ref in ok and m in ok:
            single[m]["vs_reference"] = compare(outputs[("single", m)], outputs[("single", ref)])
            tol[m] = single[m]["vs_reference"]["rel_l1"]
    global_tol = tol.get("int8-fp8", max(tol.values(), default=None))
    targets = []
    for cp, entries in parallel.items():
        for m, e in entries.items():
            if "ms" not in e or m not in ok:
                continue
            e["speedup_vs_1"] = round(single[m]["ms"] / e["ms"], 3)
            e["vs_same_mode_1"] = compare(outputs[(cp, m)], outputs[("single", m)])
            if ref in ok and m != ref:
                e["vs_reference_1"] = compare(outputs[(cp, m)], outputs[("single", ref)])
            exact = m in EXACT_MODES
            limit_tol = global_tol if exact else tol.get(m)
            if limit_tol is None:
                continue
            if cp == "ring" and not exact:
                value, limit = e["vs_reference_1"]["rel_l1"], RING_FACTOR * limit_tol
                rule = f"rel L1 vs 1-device {ref} ≤ {RING_FACTOR:g} × 1-device {m} error"
            else:
                value, limit = e["vs_same_mode_1"]["rel_l1"], limit_tol
                what = m if not exact else ("int8-fp8" if "int8-fp8" in tol else max(tol, key=tol.get))
                rule = f"rel L1 vs 1-device {m} ≤ 1-device {what} error"
            targets.append({"target": "match", "cp": cp, "mode": m, "value": value, "limit": limit, "rule": rule,
                            "pass": bool(value <= limit)})
    # speed: t(baseline)/t(mode), on world devices against one device
    for cp, entries in parallel.items():
        for base in EXACT_MODES:
            for m in modes:
                if m in EXACT_MODES or not all("ms" in d.get(x, {}) for d in (single, entries) for x in (base, m)):
                    continue
                r1 = single[base]["ms"] / single[m]["ms"]
                rn = entries[base]["ms"] / entries[m]["ms"]
                entries[m].setdefault("speedup_vs", {})[base] = {"1": round(r1, 3), str(world): round(rn, 3)}
                if cp == "ulysses":
                    targets.append({"target": "speed", "cp": cp, "mode": m, "baseline": base, "value": round(rn, 4),
                                    "limit": round(SPEED_MARGIN * r1, 4),
                                    "rule": f"t({base})/t({m}) on {world} devices ≥ {SPEED_MARGIN:g} × the same on 1 ({r1:.3f})",
                                    "pass": bool(rn >= SPEED_MARGIN * r1)})
    return {"reference": ref, "rel_l1": tol, "global": global_tol}, targets


def format_table(result: dict) -> str:
    world = result["config"]["world"]
    lines = [f"{'phase':<8} {'mode':<10} {'ms':>10} {'×1 dev':>7} {'max|Δ| same':>12} {'relL1 same':>11} "
             f"{'relL1 ref':>10} {'ranks Δ':>8}"]

    def num(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) else "—"

    phases = [("1 dev", result["single"])] + [(cp, e) for cp, e in result["parallel"].items()]
    for phase, entries in phases:
        for m, e in entries.items():
            if "error" in e:
                said = e["error"] if e["error"].startswith("not run") else f"failed: {e['error']}"
                lines.append(f"{phase:<8} {m:<10} {said[:98]}")
                continue
            same = e.get("vs_same_mode_1", {})
            ref = e.get("vs_reference_1", e.get("vs_reference", {}))
            lines.append(f"{phase:<8} {m:<10} {e['ms']:>10.2f} {num(e.get('speedup_vs_1'), '.2f'):>7} "
                         f"{num(same.get('max_abs'), '.3g'):>12} {num(same.get('rel_l1'), '.3g'):>11} "
                         f"{num(ref.get('rel_l1'), '.3g'):>10} {num(e.get('cross_rank_max_abs'), '.2g'):>8}")
    lines.append(f"targets ({world} devices):" + ("  [--smoke: CPU timings of a tiny model; the speed targets mean "
                                                  "nothing here]" if result["config"]["smoke"] else ""))
    for t in result["targets"]:
        what = f"{t['cp']} {t['mode']}" + (f" vs {t['baseline']}" if "baseline" in t else "")
        lines.append(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['target']:<5} {what:<24} {t['value']:.4g} "
                     f"(limit {t['limit']:.4g}; {t['rule']})")
    return "\n".join(lines)


def environment(device: torch.device, world: int) -> dict:
    import diffusers

    import sagevideo

    if device.type == "cuda":
        from pipeline import environment as gpu_environment

        env = gpu_environment()
        try:
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # a build without NCCL fails at init_process_group anyway
            env["nccl"] = None
        env["NCCL_NVLS_ENABLE"] = os.environ.get("NCCL_NVLS_ENABLE")
    else:
        env = {"device": "cpu", "torch": torch.__version__, "diffusers": diffusers.__version__,
               "sagevideo": sagevideo.__version__, "date": time.strftime("%Y-%m-%d")}
    env["world"] = world
    return env


# ----------------------------------------------------------------------------------------------------------
# The run (every rank)
# ----------------------------------------------------------------------------------------------------------


def run(args) -> dict | None:
    """Runs on every rank of an initialised process group; returns the result on rank 0 (None elsewhere)."""
    import warnings

    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    from diffusers.utils import logging as diffusers_logging

    # diffusers' per-forward notices ("experimental", "split will not be applied" for Wan's 1-D timestep, the
    # float32-modules cast note) and torch's deprecation of the collective diffusers calls: noise in a timing log
    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*all_gather_tensor.*", category=FutureWarning)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    def log(msg):
        if rank == 0:
            print(msg, flush=True)

    config = dict(TINY_CONFIG if args.smoke else FULL["config"])
    if args.layers:
        config["num_layers"] = args.layers
    latent = latent_shape(args.frames, args.height, args.width)
    p_t, p_h, p_w = config["patch_size"]
    grid = (latent[2] // p_t, latent[3] // p_h, latent[4] // p_w)
    tokens = grid[0] * grid[1] * grid[2]
    if tokens % world or config["num_attention_heads"] % world:
        raise SystemExit(f"error: {tokens} tokens and {config['num_attention_heads']} heads must both divide by {world}")
    inputs = make_inputs(latent, TINY_TEXT if args.smoke else FULL_TEXT, device, dtype)
    result = {
        "environment": environment(device, world),
        "config": {"model": "wan (tiny, --smoke)" if args.smoke else FULL["what"].split(",")[0], "transformer": config,
                   "video": [args.frames, args.height, args.width], "latent": list(latent), "grid": list(grid),
                   "tokens": tokens, "text": list(TINY_TEXT if args.smoke else FULL_TEXT), "dtype": args.dtype,
                   "device": device.type, "world": world, "modes": args.modes, "cp": args.cp,
                   "warmup": args.warmup, "repeats": args.repeats, "sdpa_backend": args.sdpa_backend,
                   "smoke": args.smoke},
        "single": {}, "parallel": {},
    }
    log(f"{result['config']['model']}: {config['num_layers']} layers, latent {latent}, {tokens} tokens, "
        f"{args.dtype} on {world} × {device.type}")
    outputs = {}
    t0 = time.perf_counter()

    model = build_model(config, device, dtype)
    log("one device per rank (no communication):")
    for m in args.modes:
        entry, out = measure(model, inputs, m, args, log, parallel=False)
        result["single"][m] = entry
        if out is not None:
            outputs[("single", m)] = out
            log(f"  {m}: {entry['ms']:.2f} ms")
    del model

    for cp in args.cp:
        model = build_model(config, device, dtype)
        if device.type == "cpu":
            # diffusers 0.42.1 computes the device as rank % torch.accelerator.device_count(), a division by zero
            # without accelerators; the mesh itself is a CPU/gloo one
            torch.accelerator.device_count = lambda: 1
        model.enable_parallelism(config=ContextParallelConfig(**{f"{cp}_degree": world}))
        log(f"{cp} over {world} devices:")
        result["parallel"][cp] = {}
        for m in args.modes:
            if cp == "ring" and m == "sdpa" and args.sdpa_backend in NO_LSE_BACKENDS:
                entry = {"error": f"not run: diffusers' {args.sdpa_backend} backend returns no LSE, which Ring needs"}
                result["parallel"][cp][m] = entry
                log(f"  {m}: {entry['error']}")
                continue
            entry, out = measure(model, inputs, m, args, log, parallel=True)
            result["parallel"][cp][m] = entry
            if out is not None:
                outputs[(cp, m)] = out
                log(f"  {m}: {entry['ms']:.2f} ms")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result["tolerance"], result["targets"] = analyse(result["single"], result["parallel"], outputs, args.modes, world)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result if rank == 0 else None


def _main_in_group(args) -> int:
    """Set up the process group from the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*), run,
    write the JSON and print the table on rank 0."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        torch.set_num_threads(args.threads)
        dist.init_process_group("gloo")
    try:
        result = run(args)
        if result is not None:
            print(format_table(result))
            print(f"total {result['wall_s']} s")
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def _spawned(index: int, world: int, port: int, args) -> None:
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    _main_in_group(args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args) -> int:
    """Run ``args`` in ``args.nproc`` freshly spawned processes (what torchrun would do, on one host)."""
    import torch.multiprocessing as mp

    mp.spawn(_spawned, args=(args.nproc, _free_port(), args), nprocs=args.nproc, join=True)
    return 0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, gloo, the tiny 2-layer Wan (9 frames at 64×96): the same code path, for CI")
    ap.add_argument("--modes", nargs="+", help="attention modes: sdpa and sagevideo method names "
                    "(default: sdpa dense int8-fp8 on GPU; dense int8-fp8 with --smoke)")
    ap.add_argument("--cp", nargs="+", choices=CP_MODES, default=list(CP_MODES), help="context-parallel modes")
    ap.add_argument("--layers", type=int, help="transformer depth (default: 30, or 2 with --smoke)")
    ap.add_argument("--frames", type=int, help="video frames (default 81; 9 with --smoke)")
    ap.add_argument("--height", type=int, help="video height in pixels (default 480; 64 with --smoke)")
    ap.add_argument("--width", type=int, help="video width in pixels (default 832; 96 with --smoke)")
    ap.add_argument("--repeats", type=int, help="timed forwards per mode and phase, median reported (default 5; 2 with --smoke)")
    ap.add_argument("--warmup", type=int, help="untimed forwards first (default 2; 1 with --smoke)")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default bf16 on GPU, fp32 with --smoke")
    ap.add_argument("--sdpa-backend", help="diffusers backend of the sdpa mode (default _native_cudnn on GPU, native on CPU)")
    ap.add_argument("--device", choices=("cuda", "cpu"),
                    help="cuda (NCCL; the default) or cpu (gloo; implied by --smoke, slow with the full model)")
    ap.add_argument("--nproc", type=int, default=2, help="processes to spawn when not started by torchrun")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process (CPU runs only)")
    ap.add_argument("--out", help="write configuration, environment, results and targets as JSON here")
    args = ap.parse_args(argv)
    if args.smoke and args.device == "cuda":
        ap.error("--smoke runs on CPU")
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    cpu = args.device == "cpu"
    frames, height, width = TINY_VIDEO if args.smoke else FULL["video"]
    defaults = dict(frames=frames, height=height, width=width, repeats=2 if args.smoke else 5,
                    warmup=1 if args.smoke else 2, dtype="fp32" if args.smoke else "bf16",
                    sdpa_backend="native" if cpu else "_native_cudnn",
                    modes=["dense", "int8-fp8"] if args.smoke else ["sdpa", "dense", "int8-fp8"])
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be ≥ 1 and --warmup ≥ 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    check_modes(args.modes)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU; this benchmark needs 2 GPUs (use --smoke for the CPU/gloo check)", file=sys.stderr)
        return 2
    if "RANK" in os.environ:  # started by torchrun
        return _main_in_group(args)
    return spawn(args)


if __name__ == "__main__":
    sys.exit(main())
