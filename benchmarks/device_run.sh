#!/usr/bin/env bash
# One call on the GPU machine: install, run the GPU tests, print what the compiler emitted, benchmark.
# Usage (from the repository root, on the device): bash benchmarks/device_run.sh [bench shapes...]
# Needs the wheels of packages the device lacks in .whl/ (sageattention, diffusers), carried with the call.
# Environment switches: SKIP_TESTS=1 (no GPU tests), TESTS="tests/..." (default: every test marked gpu),
# SWEEP=1 (launch-config sweep), SKIP_ATTENTION=1, SPARSE=1 (benchmarks/sparse.py, with SPARSE_ARGS),
# T_TESTS/T_ATTENTION/T_SPARSE/T_PIPELINE: per-step time limits in seconds (defaults 240/180/150/200).
# PIPELINE="--models wan2.1-1.3b --modes sdpa int8-fp8 sparse-semantic" (benchmarks/pipeline.py with these args).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout ${T_TESTS:-240} python3 -m pytest -q -m gpu ${TESTS:-tests/} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
python3 -c "import json, sagevideo.bench as b; print(json.dumps(b.kernel_report(), indent=1))" 2>&1 | tee "$OUT/kernel_report.json"
if [ -n "${SWEEP:-}" ]; then
  python3 -c "import json, sagevideo.bench as b; json.dump(b.sweep(), open('$OUT/sweep.json', 'w'), indent=1)" 2>&1 | tee "$OUT/sweep.log"
fi
if [ -z "${SKIP_ATTENTION:-}" ]; then
  timeout ${T_ATTENTION:-180} python3 benchmarks/attention.py --json "$OUT/attention.json" ${BENCH_ARGS:-} "$@" 2>&1 | tee "$OUT/attention.log" | grep -v "^  "
fi
if [ -n "${SPARSE:-}" ]; then
  timeout ${T_SPARSE:-150} python3 benchmarks/sparse.py --out "$OUT/sparse.json" ${SPARSE_ARGS:-} 2>&1 | tee "$OUT/sparse.log" | grep -v "^  "
fi
if [ -n "${PIPELINE:-}" ]; then
  timeout ${T_PIPELINE:-200} python3 benchmarks/pipeline.py --out "$OUT/pipeline.json" $PIPELINE 2>&1 | tee "$OUT/pipeline.log"
fi
