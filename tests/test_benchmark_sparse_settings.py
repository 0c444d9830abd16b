"""``benchmarks/sparse_settings.py``: its memory count, and its ``--smoke`` run end to end on CPU with the JSON it
writes (the cluster counts each variant ran with, the accuracy columns)."""

import json

import pytest
import torch

from tests.conftest import benchmark_script


@pytest.fixture(scope="module")
def settings():
    with benchmark_script("sparse_settings.py") as mod:
        yield mod


def test_tensor_bytes_counts_each_storage_once(settings):
    a = torch.zeros(10, 4, dtype=torch.int32)  # 160 bytes
    b = torch.zeros(3, dtype=torch.float64)  # 24 bytes
    obj = {"x": a, "views": [a[2:], a.t()], "nested": ({"b": b},), "n": 3}
    assert settings.tensor_bytes(obj) == 160 + 24


def test_smoke_run_writes_each_variants_clusters_and_accuracy(settings, tmp_path):
    from sagevideo.sparse.semantic import default_clusters

    out = tmp_path / "s.json"
    variants = [{"block_m": 16, "block_n": 16}, {"block_m": 16, "block_n": 16, "q_clusters": 4, "k_clusters": 8,
                                                 "kmeans_every": 1}]
    # dense arithmetic: the default variant's one-token clusters would take minutes under the Triton interpreter
    assert settings.main(["--smoke", "--precision", "dense", "--variants", json.dumps(variants), "--plan-bytes",
                          "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    default, fixed, held = rows
    video = 2 * 8 * 8
    assert default["clusters"] == [min(c, video) for c in default_clusters(video, 16, 16)]
    assert fixed["clusters"] == [4, 8]
    for r in (default, fixed):
        assert 0.0 < r["density"] <= 1.0 and 0.5 < r["cos"] <= 1.0 + 1e-9 and r["mean_ms"] > 0
    assert held["plan_mib"] >= held["layout_mib"] + held["perms_mib"] + held["centroids_mib"]
    assert min(held["layout_mib"], held["perms_mib"], held["centroids_mib"]) > 0


def test_bad_variants_are_refused(settings):
    with pytest.raises(SystemExit):
        settings.main(["--smoke", "--variants", '{"kmeans_every": 1}'])
