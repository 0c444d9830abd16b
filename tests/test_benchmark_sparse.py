"""``benchmarks/sparse.py``: its token orders (the 3-D tiles, and the same order cut into full blocks) checked
against a direct construction, and its ``--smoke`` run end to end on CPU (the kernel under the interpreter), as a
user would run it; the JSON it writes is checked."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import benchmark_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "sparse.py"


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("sparse.py") as mod:
        yield mod


@pytest.mark.parametrize("grid,extra,tile,block", [((3, 5, 7), 4, (2, 2, 4), 16), ((2, 8, 8), 0, (1, 4, 4), 16)])
def test_token_orders_against_a_direct_construction(bench, grid, extra, tile, block):
    t, hh, ww = grid
    n_video = t * hh * ww
    order, sizes, centres = bench.tile_order(grid, extra, tile, "cpu")
    # tile order: video tokens grouped by tile (tiles in raster order of the tile grid), raster order inside
    tile_id = lambda i: ((i // (hh * ww) // tile[0]) * math.ceil(hh / tile[1]) + (i // ww) % hh // tile[1]) * \
        math.ceil(ww / tile[2]) + (i % ww) // tile[2]  # noqa: E731
    want = sorted(range(n_video), key=lambda i: (tile_id(i), i)) + list(range(n_video, n_video + extra))
    assert order.tolist() == want
    assert sizes.sum() == n_video + extra and (sizes.numel() == math.prod(
        math.ceil(g / c) for g, c in zip(grid, tile)) + (1 if extra else 0))

    p_order, p_sizes, p_centres = bench.packed_order(grid, extra, tile, block, "cpu")
    assert torch.equal(p_order, order)  # the same order, cut differently
    video_sizes = p_sizes[: math.ceil(n_video / block)].tolist()
    assert video_sizes[:-1] == [block] * (len(video_sizes) - 1) and sum(video_sizes) == n_video
    assert p_sizes.sum() == n_video + extra
    pos = 0
    for size, centre in zip(video_sizes, p_centres):
        toks = order[pos:pos + size]
        coords = torch.stack([toks // (hh * ww), (toks // ww) % hh, toks % ww], 1).double()
        assert torch.allclose(centre, coords.mean(0))
        pos += size
    assert torch.isnan(p_centres[len(video_sizes):]).all() and len(p_centres) == len(p_sizes)
    # full blocks start at multiples of 16; so does the text, when the video fills whole multiples of 16
    layout = bench.local_layout(1, 2, p_sizes, p_centres, block, 0.5, "cpu")
    assert layout.kv_geometry()[0] is (extra == 0 or n_video % 16 == 0)


@pytest.mark.parametrize("perm", ["tile-packed"])
def test_smoke_run_writes_accurate_rows(tmp_path, perm):
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--perm", perm, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["environment"]["perm"] == perm
    rows = res["rows"]
    sparse = [r for r in rows if r["provider"] == "sparse int8-fp8"]
    assert len(sparse) == 6 and all(0.0 < r["density"] <= 1.0 for r in sparse)
    dense_op = next(r for r in rows if r["provider"].startswith("sagevideo int8-fp8"))
    for r in sparse:  # against exact attention under the same mask: the quantization error only
        assert r["cos"] > 0.998 and r["rel_l1"] < 0.05, r
    full = next(r for r in sparse if r["density"] == 1.0)
    assert abs(full["rel_l1_full"] - dense_op["rel_l1"]) < 0.01  # every block kept = the dense op's error


def test_denoising_steps_are_close_copies():
    """The methods' rows cycle through one video's consecutive steps: the first set itself, then copies at
    cosine ≈ 0.995 (``STEP_NOISE`` 0.1 of each tensor's std), the same for the same seed, dtype kept."""
    g = torch.Generator().manual_seed(0)
    qkv = tuple((3 * torch.randn(2, 3, 50, 16, generator=g) + 1).to(torch.bfloat16) for _ in range(3))
    from sagevideo.testing import denoising_steps

    steps = denoising_steps(qkv, 3, seed=7)
    assert len(steps) == 3 and all(a is b for a, b in zip(steps[0], qkv))
    for later in steps[1:]:
        for t, u in zip(qkv, later):
            assert u.dtype == t.dtype and u.shape == t.shape and not torch.equal(u, t)
            cos = torch.nn.functional.cosine_similarity(t.float().flatten(), u.float().flatten(), dim=0)
            assert 0.99 < float(cos) < 0.999
    assert not torch.equal(steps[1][0], steps[2][0])
    again = denoising_steps(qkv, 3, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(steps[2], again[2]))


def test_cycle_mean_amortises_the_plan_and_ignores_a_one_time_cost():
    """Calls that plan every 3rd call: the cycle mean is the plan amortised over the cycle, whatever the phase of
    the first call, and one compile spike among the calls moves it not at all (a plain mean would move a lot)."""
    from sagevideo.testing import cycle_mean

    for phase in range(3):
        times = [10.0 if (i + phase) % 3 == 0 else 4.0 for i in range(24)]  # plan calls take 10, reuse calls 4
        assert cycle_mean(times, 3) == pytest.approx(6.0)
        spiked = list(times)
        spiked[7] += 5000.0
        assert cycle_mean(spiked, 3) == pytest.approx(6.0) and sum(spiked) / 24 > 200
    assert cycle_mean([1.0, 3.0], 1) == pytest.approx(2.0)  # interval 1: the median of the calls
    with pytest.raises(ValueError):
        cycle_mean([1.0, 2.0], 3)
