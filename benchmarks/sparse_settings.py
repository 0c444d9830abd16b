"""Semantic sparse attention against its settings (GPU): cluster counts and the re-planning interval.

    python benchmarks/sparse_settings.py --shapes wan2.1-1.3b-480p cogvideox-5b \
        --variants '[{}, {"kmeans_every": 1}, {"q_clusters": 300, "k_clusters": 1000}]' --out settings.json
    python benchmarks/sparse_settings.py --shapes wan2.1-14b-720p --variants '[]' --plan-bytes
    python benchmarks/sparse_settings.py --smoke                      # CPU, tiny shape, checks the script

For each shape of ``sagevideo bench`` (``sagevideo.bench.SHAPES``, latent grids from ``VIDEO_LAYOUT``) and each
variant (a dict of ``sparse_attention`` keyword arguments; ``{}`` is the defaults), the whole
``sagevideo.sparse_attention(method="semantic", precision="int8-fp8")`` call (``--precision``) with one state, on
six inputs standing for consecutive denoising steps (``sagevideo.testing.denoising_steps``), after a cold call and
three warm ones. Reported: the **cycle mean** of 24 calls (the median, over every run of as many consecutive calls
as the re-planning interval, of the run's mean: a plan rebuilt every few calls is amortised over the calls that
reuse it, and a run that compiled a new kernel variant does not count; ``sagevideo.testing.cycle_mean``) and the
median, both against the median SDPA-cuDNN call in the same run; the plan's density and the heads whose tiles
send them to the dense op (``semantic.DENSE_TILE_FRACTION``); the cosine and relative L1 of 512 sampled query
rows against float32 dense attention. ``--plan-bytes`` adds the memory one layer's plan holds between calls (its
tensors), which a state keeps when it re-plans less often than every call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys

import torch
import torch.nn.functional as F


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of the tensor storages reachable from ``obj`` (dataclasses, dicts, lists), each counted once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        ptr = obj.untyped_storage().data_ptr()
        if ptr in seen:
            return 0
        seen.add(ptr)
        return obj.untyped_storage().nbytes()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def bench_shape(name, shape, layout, variants, *, cuda, precision="int8-fp8", plan_bytes=False,
                log=print) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sagevideo.bench import _sample_reference
    from sagevideo.sparse.api import DEFAULT_REPLAN_EVERY, SparseState, sparse_attention
    from sagevideo.testing import call_times, cycle_mean, denoising_steps, error_metrics, locality_qkv

    b, h, s, d = shape
    grid, extra, text_first = layout
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    first = locality_qkv(b, h, grid, extra, d, dtype=dtype, device=device, seed=0, text_first=text_first)
    steps = denoising_steps(first, 6, seed=1000)
    text = ((0, extra) if text_first else (s - extra, extra)) if extra else None
    rows = torch.randperm(s, generator=torch.Generator().manual_seed(0))[:512].to(device)
    ref = _sample_reference(*first, rows)

    def sdpa(x):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION if cuda else SDPBackend.MATH):
            return F.scaled_dot_product_attention(*x)

    for x in steps[:2]:
        sdpa(x)
    cudnn = statistics.median(call_times(sdpa, steps, 20, cuda=cuda))
    log(f"{name}: SDPA-cuDNN {cudnn:.2f} ms")
    out = []
    for kw in variants:
        state = SparseState()
        counter = iter(range(10**6))

        def call(x, kw=kw, state=state, counter=counter):
            return sparse_attention(*x, grid=grid, text=text, method="semantic", precision=precision, state=state,
                                    step=next(counter), **kw)

        for x in steps[:4]:  # one cold call, three warm
            call(x)
        times = call_times(call, steps, 24, cuda=cuda)
        every = kw.get("kmeans_every") or DEFAULT_REPLAN_EVERY
        m = error_metrics(call(steps[0])[:, :, rows], ref)
        plan = state.plan
        tiles = plan.info.get("tile_fraction_per_head")
        row = dict(shape=name, variant=kw, cudnn_ms=cudnn, mean_ms=cycle_mean(times, every),
                   median_ms=statistics.median(times), density=float(plan.density),
                   heads=b * h, dense_by_tiles=None if tiles is None else int((tiles >= 0.8).sum()),
                   tile_fraction_mean=None if tiles is None else float(tiles.float().mean()),
                   clusters=[int(state.q_centroids.shape[1]), int(state.k_centroids.shape[1])],
                   cos=m["cos"], rel_l1=m["rel_l1"])
        row["vs_cudnn_mean"] = cudnn / row["mean_ms"]
        out.append(row)
        log(f"  {json.dumps(kw)}: clusters {row['clusters']}, mean {row['mean_ms']:.2f} ms "
            f"({row['vs_cudnn_mean']:.2f}x), median {row['median_ms']:.2f}, density {row['density']:.3f}, "
            f"dense by tiles {row['dense_by_tiles']}/{b * h}, cos {m['cos']:.5f}, rel-L1 {m['rel_l1']:.4f}")
    if plan_bytes:
        state = SparseState()
        for i in range(3):
            sparse_attention(*first, grid=grid, text=text, method="semantic", precision=precision, state=state,
                             step=i, kmeans_every=1)
        plan = state.plan
        held = tensor_bytes(plan)
        row = dict(shape=name, plan_mib=held / 2**20, layout_mib=tensor_bytes(plan.layout) / 2**20,
                   perms_mib=tensor_bytes([plan.q_perm, plan.kv_perm]) / 2**20,
                   centroids_mib=tensor_bytes([plan.info["q_centroids"], plan.info["k_centroids"]]) / 2**20)
        out.append(row)
        log(f"  one layer's plan holds {held / 2**20:.1f} MiB: block layout {row['layout_mib']:.1f}, permutations "
            f"{row['perms_mib']:.1f}, centroids {row['centroids_mib']:.1f} (kept for the warm start whatever the "
            "interval)")
    return out


def main(argv=None) -> int:
    from sagevideo.bench import SHAPES, VIDEO_LAYOUT, environment

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--shapes", nargs="*", choices=list(SHAPES), default=["wan2.1-1.3b-480p", "cogvideox-5b"])
    ap.add_argument("--variants", default='[{}, {"kmeans_every": 1}]',
                    help="JSON list of sparse_attention keyword dicts ({} = the defaults)")
    ap.add_argument("--precision", choices=["int8-fp8", "int8-fp16", "dense"],
                    help="kernel arithmetic (default int8-fp8; dense with --smoke, where the Triton interpreter would "
                         "take minutes over the default's one-token clusters)")
    ap.add_argument("--plan-bytes", action="store_true", help="also measure the memory one layer's plan holds")
    ap.add_argument("--out", help="write the environment and the rows as JSON here")
    ap.add_argument("--smoke", action="store_true", help="CPU, a tiny shape: checks the script, measures nothing")
    args = ap.parse_args(argv)
    variants = json.loads(args.variants)
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        ap.error("--variants must be a JSON list of objects")
    precision = args.precision or ("dense" if args.smoke else "int8-fp8")
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        ap.error("needs a CUDA GPU (or --smoke)")
    jobs = ([("smoke", (1, 2, 2 * 8 * 8 + 4, 32), ((2, 8, 8), 4, True))] if args.smoke
            else [(n, SHAPES[n], VIDEO_LAYOUT[n]) for n in args.shapes])
    rows = []
    for name, shape, layout in jobs:
        rows += bench_shape(name, shape, layout, variants, cuda=cuda, precision=precision,
                            plan_bytes=args.plan_bytes)
        if cuda:
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": environment() if cuda else {}, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
