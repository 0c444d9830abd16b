"""Attention benchmark (GPU): sagevideo's quantized modes vs SDPA cuDNN/flash, sageattention, FlashAttention-4.

    python benchmarks/attention.py                       # all shapes, table to stdout
    python benchmarks/attention.py --shapes wan2.1-1.3b-480p --json out.json

The measuring code lives in sagevideo/bench.py (shared with `sagevideo bench`). Results go to RESULTS.md.
"""

import argparse
import sys

from sagevideo import bench


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", choices=list(bench.SHAPES), help="shapes to run (default: all)")
    ap.add_argument("--modes", nargs="*", default=["int8-fp8", "int8-fp16"], help="sagevideo precisions")
    ap.add_argument("--rep-ms", type=int, default=2000, help="milliseconds of timed repetitions per provider")
    ap.add_argument("--json", help="write the rows and the environment to this JSON file")
    args = ap.parse_args(argv)
    try:
        rows = bench.run(args.shapes, modes=args.modes, rep_ms=args.rep_ms, out_json=args.json)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(bench.format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
