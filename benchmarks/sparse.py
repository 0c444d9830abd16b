"""Block-sparse attention benchmark (GPU): sagevideo's block-sparse kernel against dense attention.

    python benchmarks/sparse.py --out sparse.json                          # both shapes, int8-fp8
    python benchmarks/sparse.py --shapes wan2.1-14b-720p --precisions int8-fp8 int8-fp16 dense
    python benchmarks/sparse.py --smoke                                    # CPU, tiny shape, seconds

For each shape, in one process and on the same inputs:

* ``sdpa-cudnn``: torch SDPA with the cuDNN backend (bf16), the reference speed;
* ``sagevideo int8-fp8``: the dense quantized op ``sagevideo.attention`` (quantization included);
* ``plan <method>`` / ``sparse_attention <method>``: the sparse methods' pattern search + permutation alone
  (warm state, as in every step after the first; its share of one SDPA-cuDNN call is the overhead figure), and
  the whole ``sagevideo.sparse_attention`` call in ``int8-fp8`` with the method's default parameters, on
  inputs standing for consecutive denoising steps (:func:`denoising_steps`: the first set plus small noise).
  The plan rows re-plan at every call; the whole-call rows use the default interval (plans rebuilt every 3
  calls, ``sparse.api.DEFAULT_REPLAN_EVERY``) and report the mean over a cycle, i.e. the plan's cost
  amortised over the calls that reuse it (the median over every run of 3 consecutive calls,
  ``sagevideo.testing.cycle_mean``, so a cycle that compiled a new kernel variant does not count);
* ``sparse <precision> d=<density>``: ``sagevideo.sparse.blocks.block_sparse_attention`` at densities 1.0, 0.5,
  0.3, 0.15, 0.10, 0.05, INCLUDING the quantization pass, which reads the tokens through a permutation
  (``--perm tile``, the default: 3-D tiles of the latent grid made contiguous, the kind of order a sparse engine
  attends in; ``--perm tile-packed``: the same order cut into full blocks, as in a block-sparse benchmark with
  random kept blocks) and the output store through its inverse; called as ``sparse_attention`` calls it,
  without the layout check (``check_layout=False``; before 2026-11-24 the rows included the check and its host
  sync).

Shapes: Wan2.1-1.3B 480p (B=1, H=12, S=32760 = 21×30×52, D=128), Wan2.1-14B 720p (B=1, H=40, S=75600 = 21×45×80 latent tokens, D=128) and HunyuanVideo 720p (B=1, H=24,
S=119056 = 33×45×80 latent + 256 text tokens, D=128). Inputs have locality: Q and K are smooth random fields
over the (T, H, W) grid plus noise (with sagevideo.testing's structure: a per-channel K offset, outlier
channels, a V bias), so nearby tokens attend to each other. Block lists follow a local window: tokens are
grouped in (2, 8, 8) tiles (128 tokens; edge tiles are smaller: clusters of unequal size, cut by
``cluster_blocks(..., align=16)``), and each query block keeps the KV blocks whose tile centres are nearest
(time weighted ×2), as many as the density asks; text tokens attend to and are attended by everything.

Timing: CUDA events around each call, after warm-up, median (whole sparse calls: cycle mean) of ``--reps`` calls
cycling through ``--fresh`` input sets (so no call reuses the previous call's operands from L2). Throughput is the dense
work ``4·B·H·S²·D / time`` ("TOPS-equivalent": the rate at which a dense kernel would have to run to match), and
the ratio is SDPA-cuDNN's time over the row's time, measured in the same run. Accuracy: cosine and relative L1 on a
sample of query rows against float32 exact attention under the same mask (``cos``/``rel_l1``: the kernel's error)
and against float32 dense attention (``cos_full``/``rel_l1_full``: what the sparsity pattern costs on these
inputs). ``--smoke`` runs the same code on CPU at a tiny shape (the kernel under the Triton interpreter, wall-clock
timing, SDPA's default backend) to check the script, not to measure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import torch

from sagevideo.testing import cycle_mean, denoising_steps, locality_qkv

# name -> ((B, H, S, D), (T, H, W) latent grid, extra text tokens)
SHAPES = {
    "wan2.1-1.3b-480p": ((1, 12, 32760, 128), (21, 30, 52), 0),
    "wan2.1-14b-720p": ((1, 40, 75600, 128), (21, 45, 80), 0),
    "hunyuan-720p": ((1, 24, 119056, 128), (33, 45, 80), 256),
}
SMOKE_SHAPES = {"smoke": ((1, 2, 2 * 4 * 8 + 4, 32), (2, 4, 8), 4)}
DENSITIES = (1.0, 0.5, 0.3, 0.15, 0.10, 0.05)
TILE = (2, 8, 8)
SMOKE_TILE = (1, 4, 4)
TIME_WEIGHT = 2.0


@dataclasses.dataclass
class Row:
    shape: str
    provider: str
    density: float  # the layout's actual density (kept query-key pairs / all pairs)
    ms: float
    tops: float
    vs_cudnn: float | None = None
    cos: float | None = None
    rel_l1: float | None = None
    cos_full: float | None = None
    rel_l1_full: float | None = None
    target: float | None = None  # the density asked for
    note: str = ""


# ----------------------------------------------------------------------------------------------------------
# inputs and layouts
# ----------------------------------------------------------------------------------------------------------


def tile_order(grid, extra, tile, device):
    """A permutation grouping the latent tokens by 3-D tiles (text tokens last) and the tile sizes.

    Returns ``(perm (S,), sizes (C,), centres (C, 3))``: row s of the permuted sequence is token perm[s]; the
    clusters are the tiles (edge tiles are smaller) and one cluster of text tokens (centre NaN)."""
    t, hh, ww = grid
    ti, hi, wi = torch.meshgrid(torch.arange(t), torch.arange(hh), torch.arange(ww), indexing="ij")
    tid = ((ti // tile[0]) * math.ceil(hh / tile[1]) + hi // tile[1]) * math.ceil(ww / tile[2]) + wi // tile[2]
    tid = tid.flatten()
    order = torch.argsort(tid, stable=True)
    ids, sizes = torch.unique_consecutive(tid[order], return_counts=True)
    coords = torch.stack([ti.flatten(), hi.flatten(), wi.flatten()], 1).double()
    centres = torch.zeros(len(ids), 3, dtype=torch.float64).index_add_(0, tid, coords) / sizes[:, None]
    if extra:
        order = torch.cat([order, torch.arange(t * hh * ww, t * hh * ww + extra)])
        sizes = torch.cat([sizes, torch.tensor([extra])])
        centres = torch.cat([centres, torch.full((1, 3), float("nan"), dtype=torch.float64)])
    return order.to(device), sizes, centres


def packed_order(grid, extra, tile, block, device):
    """The tile order of :func:`tile_order` cut into consecutive blocks of ``block`` tokens, so every block but
    the last of the video (and of the text) is full; a block may span two neighbouring tiles. Its centre is the
    mean position of its tokens. Same return as :func:`tile_order`."""
    order, _, _ = tile_order(grid, extra, tile, device)
    t, hh, ww = grid
    n_video = t * hh * ww
    vid = order[:n_video].cpu()
    coords = torch.stack([vid // (hh * ww), (vid // ww) % hh, vid % ww], 1).double()
    sizes = [min(block, n_video - i) for i in range(0, n_video, block)]
    centres = torch.stack([c.mean(0) for c in coords.split(sizes)])
    if extra:
        text_sizes = [min(block, extra - i) for i in range(0, extra, block)]
        sizes += text_sizes
        centres = torch.cat([centres, torch.full((len(text_sizes), 3), float("nan"), dtype=torch.float64)])
    return order, torch.tensor(sizes), centres


def local_layout(b, h, sizes, centres, block, density, device):
    """A BlockLayout keeping, for every query block, the KV blocks of the nearest tiles (``density`` of them)."""
    from sagevideo.sparse.blocks import block_mask_to_layout, cluster_blocks

    start, length, cluster = cluster_blocks(sizes.view(1, 1, -1), block, align=16)
    cl = cluster[0, 0].long()
    pos = centres[cl.clamp_min(0)] * torch.tensor([TIME_WEIGHT, 1.0, 1.0], dtype=torch.float64)
    text = torch.isnan(pos[:, 0]) | (cl < 0)
    dist = torch.cdist(torch.nan_to_num(pos), torch.nan_to_num(pos))
    n = len(cl)
    keep_n = max(1, min(n, round(density * n)))
    dist = dist.masked_fill(text[None, :], -1.0)  # text keys: always kept
    nearest = dist.topk(keep_n, dim=1, largest=False).indices
    keep = torch.zeros(n, n, dtype=torch.bool).scatter_(1, nearest, True)
    keep[text] = True  # text queries attend to everything
    keep |= torch.eye(n, dtype=torch.bool)
    expand = lambda x: x.expand(b, h, *x.shape[2:]).contiguous().to(device)  # noqa: E731
    return block_mask_to_layout(expand(start), expand(length), expand(start), expand(length),
                                expand(keep[None, None]), block, block)


# ----------------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------------


def measure(fn, inputs, *, warmup, reps, cuda, stat=statistics.median):
    """Median ms (or ``stat``) of ``fn(inputs[i])`` over ``reps`` calls cycling through the input sets, after
    warm-up."""
    from sagevideo.testing import call_times

    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    return stat(call_times(fn, inputs, reps, cuda=cuda))


def sampled_reference(q, k, v, rows, mask_rows=None):
    """float32 exact attention of the query rows ``rows`` (BHSD), one head at a time; ``mask_rows`` (bool
    ``(B, H, R, S)``) restricts the keys. Returns ``(B, H, R, D)``."""
    outs = []
    scale = q.shape[-1] ** -0.5
    for hi in range(q.shape[1]):
        s = torch.matmul(q[:, hi, rows].float(), k[:, hi].float().transpose(-1, -2)) * scale
        if mask_rows is not None:
            s = s.masked_fill(~mask_rows[:, hi], float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        outs.append(torch.matmul(p, v[:, hi].float()))
    return torch.stack(outs, 1)


def bench_shape(name, spec, *, precisions, densities, reps, warmup, fresh, sample_rows, perm_kind, tile, block,
                smoke, profile_plan=False, plan_graphs=("auto",), log=print):
    import sagevideo
    from sagevideo.bench import _flops
    from sagevideo.sparse import blocks
    from sagevideo.testing import error_metrics

    (b, h, s, d), grid, extra = spec
    cuda = torch.cuda.is_available() and not smoke
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float16  # the Triton interpreter's bf16 dot is broken
    sets = [locality_qkv(b, h, grid, extra, d, dtype=dtype, device=device, seed=i) for i in range(fresh)]
    q0, k0, v0 = sets[0]
    g = torch.Generator().manual_seed(0)
    rows = torch.randperm(s, generator=g)[:sample_rows].to(device)
    full_ref = sampled_reference(q0, k0, v0, rows)
    flops = _flops(b, h, s, d)
    if perm_kind in ("tile", "tile-packed"):
        order = tile_order if perm_kind == "tile" else lambda *a: packed_order(*a[:3], block, a[3])
        perm_1d, sizes, centres = order(grid, extra, tile, device)
        perm = perm_1d.view(1, 1, s).expand(b, h, s).contiguous()
    else:  # raster order, no permutation: one "tile" per row of the latent grid (already contiguous)
        _, sizes, centres = tile_order(grid, extra, (1, 1, grid[2]), device)
        perm = None
    results: list[Row] = []

    def add(provider, density, ms, out=None, mask_rows=None, note="", target=None):
        row = Row(name, provider, density, ms, flops / ms / 1e9, target=target, note=note)
        if out is not None:
            got = out[:, :, rows]
            ref = full_ref if mask_rows is None else sampled_reference(q0, k0, v0, rows, mask_rows)
            m = error_metrics(got, ref)
            row.cos, row.rel_l1 = m["cos"], m["rel_l1"]
            m = error_metrics(got, full_ref)
            row.cos_full, row.rel_l1_full = m["cos"], m["rel_l1"]
        results.append(row)
        acc = f" (cos {row.cos:.6f}, rel-L1 {row.rel_l1:.4f})" if out is not None else ""
        log(f"  {name} {provider}: {ms:.3f} ms{acc}")

    # dense peers
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.CUDNN_ATTENTION if cuda else SDPBackend.MATH
    sdpa_name = "sdpa-cudnn" if cuda else "sdpa-math (smoke)"

    def sdpa(x):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(*x)

    try:
        add(sdpa_name, 1.0, measure(sdpa, sets, warmup=warmup, reps=reps, cuda=cuda), sdpa(sets[0]))
    except Exception as exc:  # reported, not fatal
        results.append(Row(name, sdpa_name, 1.0, float("nan"), float("nan"), note=f"failed: {exc}"[:120]))

    def dense_op(x):
        return sagevideo.attention(*x, precision="int8-fp8")

    add("sagevideo int8-fp8 (dense op)", 1.0, measure(dense_op, sets, warmup=warmup, reps=reps, cuda=cuda),
        dense_op(sets[0]), note="incl. quantization")

    for density in densities:
        t0 = time.perf_counter()
        layout = local_layout(b, h, sizes, centres, block, density, device)
        build_ms = (time.perf_counter() - t0) * 1e3
        mask_rows = blocks._token_mask_fn(layout, s, s, perm, perm, None)(rows)
        # aligned KV blocks let the kernel load FP8 V 16 bytes at a time (compare --perm tile with --perm none)
        aligned = f"{layout.kv_aligned} (reach {layout.kv_reach})"
        for precision in precisions:
            def sparse(x, layout=layout, precision=precision):
                # as sparse_attention calls it: the layout trusted (its check costs 1.4-1.9 ms and one host
                # sync at Wan2.1-1.3B, measured 2026-11-24; the tests run it) and its alignment from the layout
                return blocks.block_sparse_attention(*x, layout, precision=precision, q_perm=perm, kv_perm=perm,
                                                     check_layout=False)

            ms = measure(sparse, sets, warmup=warmup, reps=reps, cuda=cuda)
            add(f"sparse {precision}", layout.density, ms, sparse(sets[0]), mask_rows, target=density,
                note=f"perm {perm_kind}; KV blocks 16-aligned: {aligned}; incl. quantization, no layout check; "
                     f"layout built in {build_ms:.0f} ms (not timed)")
        del layout, mask_rows

    # the methods end to end: pattern search + permutation (plan_sparse, warm state as in steps after the first)
    # and the whole sparse_attention call, with each method's default parameters
    from sagevideo.sparse.api import DEFAULT_REPLAN_EVERY, SparseState, plan_sparse, sparse_attention

    text = (s - extra, extra) if extra else None
    steps = denoising_steps(sets[0], fresh, seed=1000)
    semantic_kw = {"q_clusters": 4, "k_clusters": 8} if smoke else {}
    methods = [("spatiotemporal", {}, "")] + [
        ("semantic", dict(semantic_kw, plan_graph=g), " [no graph]" if g is False else "") for g in plan_graphs]
    for method, kw, tag in methods:
        kw = dict(kw, grid=grid, text=text, method=method, block_m=block, **({"block_n": block} if smoke else {}))
        state = SparseState()
        step = iter(range(1, 10**6))
        plan0 = plan_sparse(*steps[0], state=state, step=0, **kw)  # cold: 50 k-means rounds / first profile

        def plan(x, kw=kw):  # the cost of one planning: re-planned at every call here
            return plan_sparse(*x, state=state, step=next(step), kmeans_every=1, profile_every=1, **kw)

        plan_ms = measure(plan, steps, warmup=warmup, reps=reps, cuda=cuda)
        if profile_plan:
            _print_plan_profile(method, plan, steps[0], cuda)
        density = state.plan.density if state.plan is not None else plan0.density

        def full(x, kw=kw):
            return sparse_attention(*x, state=state, step=next(step), precision="int8-fp8", **kw)

        add(f"plan {method}{tag}", density, plan_ms, note="pattern search + permutation only (warm state)")
        # the mean over re-planning cycles (the plan's cost amortised over the calls that reuse it), median over
        # the cycles (a cycle that compiled a new kernel variant, e.g. the first call sending some heads to the
        # dense op, does not count)
        cycle = DEFAULT_REPLAN_EVERY
        add(f"sparse_attention {method}{tag}", density,
            measure(full, steps, warmup=warmup, reps=max(reps, 4 * cycle), cuda=cuda,
                    stat=lambda t: cycle_mean(t, cycle)),
            full(steps[0]), note="int8-fp8, planning included (default re-planning interval, cycle mean)")
    cudnn = next((r.ms for r in results if r.provider == sdpa_name and r.ms == r.ms), None)
    for r in results:
        if cudnn and r.ms == r.ms:
            r.vs_cudnn = cudnn / r.ms
            if r.provider.startswith("plan "):  # the overhead target: ≤ 3 % of one dense cuDNN call
                r.note += f"; {100 * r.ms / cudnn:.1f} % of one SDPA-cuDNN call"
    del sets, steps, q0, k0, v0
    if cuda:
        torch.cuda.empty_cache()
    return results


def _print_plan_profile(method, plan, x, cuda):
    """One warm plan call under torch.profiler: where its time goes (ops by device time, host syncs, copies)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        plan(x)
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    print(f"plan profile ({method}): {sum(e.count for e in events if e.key.startswith('aten::'))} aten calls")
    print(events.table(sort_by=sort, row_limit=25))
    for name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaLaunchKernel"):
        n = sum(e.count for e in events if e.key == name)
        if n:
            print(f"  {name}: {n}")


def format_table(rows: list[Row]) -> str:
    def f(x, fmt):
        return "—" if x is None or x != x else format(x, fmt)

    lines = [
        "| shape | provider | density | ms | TOPS-eq | × SDPA-cuDNN | cos | rel-L1 | cos vs dense | rel-L1 vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.provider} | {f(r.density, '.3f')} | {f(r.ms, '.3f')} | {f(r.tops, '.0f')} | "
            f"{f(r.vs_cudnn, '.2f')} | {f(r.cos, '.6f')} | {f(r.rel_l1, '.4f')} | {f(r.cos_full, '.6f')} | "
            f"{f(r.rel_l1_full, '.4f')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", choices=list(SHAPES), help="shapes to run (default: all)")
    ap.add_argument("--precisions", nargs="*", default=["int8-fp8"], choices=["int8-fp8", "int8-fp16", "dense"],
                    help="block-sparse precisions (default: int8-fp8)")
    ap.add_argument("--densities", nargs="*", type=float, default=list(DENSITIES))
    ap.add_argument("--perm", choices=["tile", "tile-packed", "none"], default="tile",
                    help="token order the blocks are cut in: 3-D tiles through a permutation (one or more blocks "
                         "per tile, edge tiles give short blocks), the same order cut into full blocks "
                         "(tile-packed), or the raster order")
    ap.add_argument("--block", type=int, default=128, help="query/KV block size (default 128)")
    ap.add_argument("--reps", type=int, default=30, help="timed calls per provider (median)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--fresh", type=int, default=2, help="input sets cycled through (default 2)")
    ap.add_argument("--sample-rows", type=int, default=256, help="query rows in the accuracy check")
    ap.add_argument("--out", help="write the rows and the environment to this JSON file")
    ap.add_argument("--profile-plan", action="store_true",
                    help="print a torch.profiler table of one warm plan call per method (where the overhead goes)")
    ap.add_argument("--plan-graph", choices=["auto", "on", "off", "both"], default="auto",
                    help="semantic rows: sparse_attention's plan_graph - auto (its default: a CUDA graph of the "
                         "warm plan at small shapes), on (always), off (rows tagged [no graph]), or both (off, "
                         "then on)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, tiny shape, few calls: checks the script end to end in seconds (not a measurement)")
    args = ap.parse_args(argv)

    if args.smoke:
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
        shapes = SMOKE_SHAPES
        names = list(shapes)
        tile, block = SMOKE_TILE, 16
        reps, warmup, fresh, sample_rows = 1, 0, 2, 16
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA GPU on this machine (use --smoke to check the script on CPU)", file=sys.stderr)
            return 2
        shapes = SHAPES
        names = args.shapes or list(SHAPES)
        tile, block = TILE, args.block
        reps, warmup, fresh, sample_rows = args.reps, args.warmup, args.fresh, args.sample_rows

    if torch.cuda.is_available() and not args.smoke:
        from sagevideo.bench import environment

        env = environment()
    else:
        import triton

        env = {"date": time.strftime("%Y-%m-%d"), "device": "cpu (smoke)", "torch": torch.__version__,
               "triton": triton.__version__, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    env.update(block=block, tile=list(tile), perm=args.perm, reps=reps, warmup=warmup, fresh=fresh,
               sample_rows=sample_rows, precisions=args.precisions)
    print(json.dumps(env))
    rows: list[Row] = []
    for n in names:
        rows += bench_shape(n, shapes[n], precisions=args.precisions, densities=args.densities, reps=reps,
                            warmup=warmup, fresh=fresh, sample_rows=sample_rows, perm_kind=args.perm, tile=tile,
                            block=block, smoke=args.smoke, profile_plan=args.profile_plan,
                            plan_graphs={"auto": ("auto",), "on": (True,), "off": (False,),
                                         "both": (False, True)}[args.plan_graph])
    if torch.cuda.is_available() and not args.smoke:
        from sagevideo.kernels import block_sparse_attn

        env["kernel_configs"] = {str(k): v for k, v in block_sparse_attn.chosen_configs().items()}
    print(format_table(rows))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"environment": env, "rows": [dataclasses.asdict(r) for r in rows]}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
