"""Attention benchmark: sagevideo's modes against the peers, measured in one run on this GPU.

Used by ``benchmarks/attention.py`` and ``sagevideo bench``. For every shape it times (median of many runs,
CUDA events through ``triton.testing.do_bench``, after warm-up):

* sagevideo ``int8-fp8`` / ``int8-fp16`` through the public op (quantization pass included), the attention
  kernel alone on pre-quantized operands, and the quantization pass alone;
* torch SDPA with the cuDNN and the flash backends (bf16);
* PyPI ``sageattention`` (its Triton kernel, INT8 QK + FP16 PV) when importable;
* FlashAttention-4 (``flash_attn.cute``) when importable;
* on request (``sparse-spatiotemporal``, ``sparse-semantic``), the whole ``sagevideo.sparse_attention`` call in
  ``int8-fp8``, pattern search included, with each method's defaults, on inputs with locality over the shape's
  latent grid (``sagevideo.testing.locality_qkv``) that stand for consecutive denoising steps of one video
  (``denoising_steps``), so the method's state is warm-started as in a sampler; the cycle mean of the calls
  (``sagevideo.testing.cycle_mean``), not the median, since a plan is rebuilt every few calls by default
  (``sparse.api.DEFAULT_REPLAN_EVERY``).
  Its accuracy is against float32 *dense* attention on those inputs: what the pattern and the quantization
  cost together.

Throughput is reported as 4·B·H·S²·D / time (TFLOPS for dense peers, TOPS for quantized ones) and as the
ratio to SDPA-cuDNN measured in the same run — absolute times drift between runs, ratios are the figure.
Accuracy columns (cosine, relative L1) compare a sample of query rows with a float32 reference.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from typing import Callable

import torch

SHAPES = {
    "wan2.1-1.3b-480p": (1, 12, 32760, 128),
    "wan2.1-14b-720p": (1, 40, 75600, 128),
    "hunyuan-720p": (1, 24, 119056, 128),
    "cogvideox-5b": (1, 48, 17776, 64),
}


# the post-patch latent grid (T, H, W) of each shape and its text tokens in the joint sequence, for the sparse
# methods: (grid, text tokens, text before the video)
VIDEO_LAYOUT = {
    "wan2.1-1.3b-480p": ((21, 30, 52), 0, False),
    "wan2.1-14b-720p": ((21, 45, 80), 0, False),
    "hunyuan-720p": ((33, 45, 80), 256, False),
    "cogvideox-5b": ((13, 30, 45), 226, True),
}
DENSE_MODES = ("int8-fp8", "int8-fp16")
SPARSE_MODES = {"sparse-spatiotemporal": "spatiotemporal", "sparse-semantic": "semantic"}
MODES = DENSE_MODES + tuple(SPARSE_MODES)


@dataclasses.dataclass
class Row:
    shape: str
    provider: str
    ms: float
    tops: float
    vs_cudnn: float | None = None
    cos: float | None = None
    rel_l1: float | None = None
    note: str = ""


def _flops(b, h, s, d):
    return 4.0 * b * h * s * s * d


def _sample_reference(q, k, v, rows: torch.Tensor):
    """fp32 exact attention for a subset of query rows (BHSD)."""
    qs = q[:, :, rows].float()
    s = torch.matmul(qs, k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.matmul(torch.softmax(s, dim=-1), v.float())


def _peers(q, k, v) -> dict[str, Callable[[], torch.Tensor]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    out: dict[str, Callable] = {}

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        return run

    out["sdpa-cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
    out["sdpa-flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
    try:
        from sageattention import sageattn

        k_own = k.clone()  # sageattention 1.x subtracts K's mean in place: give it its own copy
        out[f"sageattention-{_version('sageattention')}"] = (
            lambda: sageattn(q, k_own, v, tensor_layout="HND", is_causal=False)
        )
    except Exception:
        pass
    try:
        from flash_attn.cute import flash_attn_func

        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        out["flash-attn-4"] = lambda: flash_attn_func(qt, kt, vt)[0].transpose(1, 2)
    except Exception:
        pass
    return out


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "?"


def bench_shape(name: str, shape, *, modes=("int8-fp8", "int8-fp16"), rep_ms: int = 2000, sample_rows: int = 256,
                seed: int = 0, log=print) -> list[Row]:
    import triton.testing

    import sagevideo
    from sagevideo.kernels import quant_attn, quantize
    from sagevideo.testing import error_metrics, structured_qkv

    b, h, s, d = shape
    q, k, v = structured_qkv(b, h, h, s, s, d, dtype=torch.bfloat16, device="cuda", seed=seed)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(s, generator=g)[:sample_rows].to("cuda")
    ref = _sample_reference(q, k, v, rows)
    flops = _flops(b, h, s, d)

    def time_it(fn):
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=200, rep=rep_ms, return_mode="median")

    def time_cycle(fn):  # sparse calls: a plan built every few calls, its cost amortised over the others
        from sagevideo.sparse.api import DEFAULT_REPLAN_EVERY
        from sagevideo.testing import cycle_mean

        # whole cycles first: a call that takes a new path (e.g. the first split of heads between the dense op
        # and the block-sparse kernel) compiles kernel variants for seconds, and do_bench sizes its runs from
        # its first few calls
        for _ in range(4 * DEFAULT_REPLAN_EVERY):
            fn()
        torch.cuda.synchronize()
        times = triton.testing.do_bench(fn, warmup=200, rep=rep_ms, return_mode="all")
        # a short --rep-ms on a slow call may time fewer calls than a cycle: then their mean
        return cycle_mean(times, min(DEFAULT_REPLAN_EVERY, len(times)))

    def acc(out):
        m = error_metrics(out[:, :, rows], ref)
        return m["cos"], m["rel_l1"]

    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    results: list[Row] = []
    for pname, fn in _peers(q, k, v).items():
        try:
            ms = time_it(fn)
            c, l1 = acc(fn())
            results.append(Row(name, pname, ms, flops / ms / 1e9, cos=c, rel_l1=l1))
        except Exception as exc:  # a peer that cannot run this shape is reported, not fatal
            results.append(Row(name, pname, float("nan"), float("nan"), note=f"failed: {type(exc).__name__}: {exc}"[:120]))
        log(f"  {name} {pname}: {results[-1].ms:.3f} ms")

    for mode in (m for m in modes if m in DENSE_MODES):
        full = lambda: sagevideo.attention(q, k, v, precision=mode)  # noqa: E731
        ms = time_it(full)
        c, l1 = acc(full())
        results.append(Row(name, f"sagevideo {mode}", ms, flops / ms / 1e9, cos=c, rel_l1=l1, note="incl. quantization"))
        qkv = quantize.quantize_qkv(q, k, v, precision=mode)
        out = torch.empty_like(q)
        kern_ms = time_it(lambda: quant_attn.attention_fwd(qkv, out))
        results.append(Row(name, f"sagevideo {mode} kernel", kern_ms, flops / kern_ms / 1e9, note="kernel only"))
        # the quantization pass the op runs (fused), and the three-launch pass beside it in the same run
        fused_ms = time_it(lambda: quantize.quantize_qkv(q, k, v, precision=mode, fused=True))
        results.append(Row(name, f"sagevideo {mode} quant (fused)", fused_ms, float("nan"),
                           note=f"{100 * fused_ms / kern_ms:.1f}% of kernel"))
        quant_ms = time_it(lambda: quantize.quantize_qkv(q, k, v, precision=mode, fused=False))
        results.append(Row(name, f"sagevideo {mode} quant (three launches)", quant_ms, float("nan"),
                           note=f"{100 * quant_ms / kern_ms:.1f}% of kernel"))
        log(f"  {name} {mode}: {ms:.3f} ms (kernel {kern_ms:.3f}, fused quant {fused_ms:.3f}, "
            f"three-launch quant {quant_ms:.3f})")
        del qkv, out
    sparse = [m for m in modes if m in SPARSE_MODES]
    if sparse:
        results += sparse_rows(name, shape, sparse, time_cycle, sample_rows=sample_rows, seed=seed, device="cuda",
                               log=log)
    cudnn = next((r.ms for r in results if r.provider == "sdpa-cudnn" and r.ms == r.ms), None)
    for r in results:
        if cudnn and r.ms == r.ms and not r.provider.endswith(("quant (fused)", "quant (three launches)")):
            r.vs_cudnn = cudnn / r.ms
    torch.cuda.empty_cache()
    return results


def sparse_rows(name: str, shape, modes, time_it, *, layout=None, sample_rows: int = 256, seed: int = 0,
                steps: int = 4, device="cuda", precision: str = "int8-fp8", log=print) -> list[Row]:
    """One row per sparse mode: ``time_it(fn)`` (milliseconds) of the whole ``sparse_attention`` call, cycling
    through ``steps`` consecutive-step inputs with one state (warm after a first, cold call), and the error of
    its output on the first input against float32 dense attention on a sample of query rows. ``layout`` is
    ``(grid, text tokens, text first)``, ``VIDEO_LAYOUT[name]`` by default."""
    import sagevideo
    from sagevideo.sparse.api import SparseState
    from sagevideo.testing import denoising_steps, error_metrics, locality_qkv

    b, h, s, d = shape
    grid, text_len, text_first = layout or VIDEO_LAYOUT[name]
    if grid[0] * grid[1] * grid[2] + text_len != s:
        raise ValueError(f"{name}: grid {grid} + {text_len} text tokens != sequence length {s}")
    text = None if not text_len else ((0, text_len) if text_first else (s - text_len, text_len))
    first = locality_qkv(b, h, grid, text_len, d, dtype=torch.bfloat16, device=device, seed=seed,
                         text_first=text_first)
    inputs = denoising_steps(first, steps, seed=seed + 1)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(s, generator=g)[: min(sample_rows, s)].to(device)
    ref = _sample_reference(*first, rows)
    out: list[Row] = []
    for mode in modes:
        method = SPARSE_MODES[mode]
        state = SparseState()
        calls = itertools.count()

        def call(x, i):
            return sagevideo.sparse_attention(*x, grid=grid, text=text, method=method, precision=precision,
                                              state=state, step=i)

        call(inputs[0], next(calls))  # cold: the first profile / 50 k-means rounds, as on a sampler's first step
        ms = time_it(lambda: call(inputs[(i := next(calls)) % steps], i))
        got = call(inputs[0], next(calls))
        m = error_metrics(got[:, :, rows], ref)
        plan = state.plan
        density = float(plan.density) if plan is not None else float("nan")
        note = f"density {density:.3f}, {precision}, default re-planning interval (warm state), locality inputs"
        out.append(Row(name, f"sagevideo {mode}", ms, _flops(b, h, s, d) / ms / 1e9, cos=m["cos"],
                       rel_l1=m["rel_l1"], note=note))
        log(f"  {name} {mode}: {ms:.3f} ms, density {density:.3f}, cos {m['cos']:.4f} against dense fp32")
    return out


def format_table(rows: list[Row]) -> str:
    head = f"| shape | provider | ms | TFLOPS/TOPS | × SDPA-cuDNN | cos | rel-L1 | note |\n|---|---|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        def f(x, fmt):
            return "—" if x is None or x != x else format(x, fmt)

        lines.append(
            f"| {r.shape} | {r.provider} | {f(r.ms, '.3f')} | {f(r.tops, '.0f')} | {f(r.vs_cudnn, '.2f')} | "
            f"{f(r.cos, '.6f')} | {f(r.rel_l1, '.4f')} | {r.note} |"
        )
    return "\n".join(lines)


def environment() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": props.name,
        "sm": f"{props.major}{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "sageattention": _version("sageattention"),
    }


def run(shapes=None, *, modes=("int8-fp8", "int8-fp16"), rep_ms=2000, out_json=None, log=print) -> list[Row]:
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU on this machine: the attention benchmark measures GPU kernels")
    names = shapes or list(SHAPES)
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    env = environment()
    log(json.dumps(env))
    rows: list[Row] = []
    for n in names:
        rows += bench_shape(n, SHAPES[n], modes=modes, rep_ms=rep_ms, log=log)
    from sagevideo.kernels import quant_attn

    env["kernel_configs"] = {str(k): v for k, v in quant_attn.chosen_configs().items()}
    log("kernel configs chosen: " + json.dumps(env["kernel_configs"]))
    if out_json:
        with open(out_json, "w") as fh:
            json.dump({"environment": env, "rows": [dataclasses.asdict(r) for r in rows]}, fh, indent=1)
    return rows


def kernel_report(shape=(1, 12, 4096, 128)) -> dict:
    """What the compiler emitted for the attention kernel: registers, spills, shared memory, MMA kinds."""
    from sagevideo.kernels import quant_attn, quantize
    from sagevideo.testing import structured_qkv

    b, h, s, d = shape
    q, k, v = structured_qkv(b, h, h, s, s, d, dtype=torch.bfloat16, device="cuda")
    report = {}
    for mode in ("int8-fp8", "int8-fp16"):
        qkv = quantize.quantize_qkv(q, k, v, precision=mode)
        handle = quant_attn.attention_fwd(qkv, torch.empty_like(q))
        asm = getattr(handle, "asm", {}) or {}
        ptx = asm.get("ptx", "")
        sass = asm.get("sass", "") if isinstance(asm.get("sass", ""), str) else ""
        report[mode] = {
            "n_regs": getattr(handle, "n_regs", None),
            "n_spills": getattr(handle, "n_spills", None),
            "shared_bytes": getattr(getattr(handle, "metadata", None), "shared", None),
            "ptx_wgmma": ptx.count("wgmma.mma_async"),
            "ptx_mma_sync": ptx.count("mma.sync"),
            "sass_gmma": {op: sass.count(op) for op in ("HGMMA", "QGMMA", "IGMMA", "HMMA", "IMMA")} if sass else None,
        }
    return report


SWEEP_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=256, BLOCK_N=64, num_warps=8, num_stages=2),
]


def sweep(shape_names=("wan2.1-1.3b-480p", "cogvideox-5b"), modes=("int8-fp8", "int8-fp16"), rep_ms=600,
          log=print) -> list[dict]:
    """Kernel-only time of each launch configuration (correctness of each against the reference first)."""
    import triton.testing

    from sagevideo import reference
    from sagevideo.kernels import quant_attn, quantize
    from sagevideo.testing import error_metrics, structured_qkv

    rows = []
    for name in shape_names:
        b, h, s, d = SHAPES[name]
        q, k, v = structured_qkv(b, h, h, s, s, d, dtype=torch.bfloat16, device="cuda")
        small = structured_qkv(1, 2, 2, 300, 333, d, dtype=torch.float32, device="cuda", seed=1)
        for mode in modes:
            qkv = quantize.quantize_qkv(q, k, v, precision=mode)
            sq = quantize.quantize_qkv(*small, precision=mode)
            out = torch.empty_like(q)
            for cfg in SWEEP_CONFIGS:
                try:
                    o_small = torch.empty_like(small[0])
                    quant_attn.attention_fwd(sq, o_small, config=cfg)
                    r, _ = reference.quant_attention_from_quantized(sq, block_n=cfg["BLOCK_N"])
                    err = error_metrics(o_small, r)["rel_l1"]
                    ms = triton.testing.do_bench(lambda: quant_attn.attention_fwd(qkv, out, config=cfg),
                                                 warmup=100, rep=rep_ms, return_mode="median")
                    tops = _flops(b, h, s, d) / ms / 1e9
                except Exception as exc:
                    ms, tops, err = float("nan"), float("nan"), f"{type(exc).__name__}: {str(exc)[:80]}"
                rows.append(dict(shape=name, mode=mode, **cfg, ms=ms, tops=tops, err_vs_ref=err))
                log(f"sweep {name} {mode} {cfg}: {tops:.0f} TOPS, err {err}")
            del qkv, out
        del q, k, v
        torch.cuda.empty_cache()
    return rows
