"""The ``sagevideo`` command line end to end on a tiny Wan pipeline (CPU).

Most tests call ``sagevideo.cli.main([...])`` in-process (importing diffusers once); one subprocess test proves
that ``python -m sagevideo`` works. Runs use 2 steps, 5 frames, 32×32 (LPIPS needs ≥ 31 px).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from sagevideo import cli

SMALL = ["--steps", "2", "--frames", "5", "--height", "32", "--width", "32", "--no-progress"]
PROMPT = "a cat walks on the grass"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.tiny_pipelines import wan_pipeline

    path = tmp_path_factory.mktemp("model") / "tiny-wan-pipeline"
    wan_pipeline().save_pretrained(path)
    return path


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------------------ help / env


@pytest.mark.parametrize("command", ["generate", "compare", "bench", "env"])
def test_help_has_examples(capsys, command):
    rc, out, _ = run_cli(capsys, command, "--help")
    assert rc == 0
    assert "examples:" in out and f"sagevideo {command}" in out


def test_console_script_points_at_main():
    eps = [ep for ep in metadata.entry_points(group="console_scripts") if ep.name == "sagevideo"]
    assert eps and eps[0].value == "sagevideo.cli:main"


def test_env_json(capsys):
    rc, out, _ = run_cli(capsys, "env", "--json")
    assert rc == 0
    env = json.loads(out)
    assert env["versions"]["torch"] == torch.__version__
    assert env["cuda_available"] == torch.cuda.is_available()
    assert "int8-fp8" in env["attention_methods"] and "warmup" in env["profiles"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_bench_without_gpu_fails_clearly(capsys):
    rc, out, err = run_cli(capsys, "bench", "--rep-ms", "10")
    assert rc == cli.EXIT_INPUT
    assert "no CUDA GPU" in err and "NVIDIA GPU" in err
    assert out == ""


# ------------------------------------------------------------------------------------------------ generate


def test_generate_local_model_mp4_and_frames(capsys, tmp_path, model_dir):
    from sagevideo.video_io import read_frames, read_video

    out = tmp_path / "nested" / "out.mp4"
    rc, stdout, err = run_cli(capsys, "generate", "--prompt", PROMPT, "--model", model_dir, *SMALL,
                              "--output", out, "--frames-dir", tmp_path / "frames")
    assert rc == 0, err
    video = read_video(out)
    assert video.shape == (5, 32, 32, 3)
    frames = read_frames(tmp_path / "frames")
    assert frames.shape == (5, 32, 32, 3) and frames.std() > 0
    assert f"wrote {out.resolve()}" in stdout and "5 frames of 32x32 in" in stdout
    assert "attention: auto" in err  # family default on CPU, with the notice that it runs dense there
    assert "runs dense SDPA on cpu" in err


def test_generate_random_fallback_gif(capsys, tmp_path, monkeypatch):
    # an empty bundled-model folder: the CLI builds the tiny-wan architecture with random weights and says so
    monkeypatch.setenv("SAGEVIDEO_TINY_WAN_PATH", str(tmp_path / "no-model-here"))
    out = tmp_path / "noise.gif"
    rc, _, err = run_cli(capsys, "generate", "--prompt", "a red circle moves left.", "--steps", "1", "--frames", "5",
                         "--height", "32", "--width", "32", "--no-progress", "--output", out)
    assert rc == 0, err
    assert "RANDOM weights" in err and "noise" in err
    from sagevideo.video_io import read_video

    assert read_video(out).shape == (5, 32, 32, 3)


# ------------------------------------------------------------------------------------------------ compare


def test_compare_report_folder(capsys, tmp_path, model_dir):
    from sagevideo.comparison import compare
    from sagevideo.generate import load_pipeline
    from sagevideo.metrics import video_psnr, video_ssim
    from sagevideo.report import load_metrics

    report = tmp_path / "report"
    rc, stdout, err = run_cli(capsys, "compare", "--prompt", PROMPT, "--model", model_dir, *SMALL,
                              "--attention", "int8-fp8", "--allow-reference", "--output", report)
    assert rc == 0, err
    assert sorted(p.name for p in report.iterdir()) == ["metrics.json", "report.html", "side_by_side.mp4"]
    doc = load_metrics(report)
    info = doc["info"]
    assert doc["video"] == {"frames": 5, "height": 32, "width": 32, "fps": 16.0}
    for name in ("psnr", "ssim", "lpips"):
        assert doc["metrics"][name]["available"], doc["metrics"][name]
        assert len(doc["metrics"][name]["per_frame"]) == 5
    psnr = doc["metrics"]["psnr"]
    assert psnr["mean"] > 20  # int8-fp8 of a random tiny model: close to dense but measured, not identical
    assert psnr["infinite_frames"] < 5
    # timing fields are internally consistent; CPU reference is flagged as no speed-up measurement
    w = info["wall_seconds"]
    assert w["dense"] > 0 and w["accelerated"] > 0
    assert math.isclose(info["speedup"], w["dense"] / w["accelerated"], rel_tol=1e-9)
    assert info["speedup_meaningful"] is False and "reference" in info["speedup_note"]
    assert info["schedule"]["default"] == "int8-fp8" and info["schedule"]["rules"] == []
    assert info["methods_run"] == {"transformer": {"int8-fp8": 2 * 3}}  # 2 steps × 3 layers
    assert info["settings"]["seed"] == 0 and info["settings"]["steps"] == 2
    assert info["gpu"] is None and info["device"] == "cpu"
    assert info["versions"]["diffusers"]
    assert "speed-up" in stdout and "PSNR" in stdout and "report.html" in stdout
    # the HTML opens offline: no script, no remote resource, plots and frames inline
    page = (report / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower() and "src=\"http" not in page and "href=\"http" not in page
    assert "<svg" in page and "data:image/png;base64," in page
    from sagevideo.video_io import read_video

    sbs = read_video(report / "side_by_side.mp4")
    assert sbs.shape[0] == 5 and sbs.shape[1] == 32 and sbs.shape[2] >= 3 * 32

    # the Python API on the same model, same seed: the same frames, so the same metrics as the CLI's report
    pipe, _ = load_pipeline(model_dir, device="cpu")
    res = compare(pipe, PROMPT, attention="int8-fp8", steps=2, frames=5, height=32, width=32, seed=0,
                  progress=False)
    assert res["report"] is None and res["out_dir"] is None
    assert res["metrics"]["psnr"]["per_frame"] == psnr["per_frame"]
    assert np.allclose(res["metrics"]["ssim"]["per_frame"], doc["metrics"]["ssim"]["per_frame"])
    # and they are what the metrics functions give on the returned frames
    d, a = res["dense"].frames, res["accelerated"].frames
    assert d.shape == a.shape == (5, 32, 32, 3) and d.dtype == np.uint8
    assert video_psnr(d, a).per_frame == psnr["per_frame"]
    assert np.allclose(video_ssim(d, a).per_frame, doc["metrics"]["ssim"]["per_frame"])

    # dense against dense: bit-identical frames, PSNR inf everywhere
    same = compare(pipe, PROMPT, attention="dense", steps=2, frames=5, height=32, width=32, seed=0, progress=False)
    assert same["metrics"]["psnr"]["infinite_frames"] == 5 and same["metrics"]["psnr"]["mean"] == float("inf")
    assert same["accelerated"].attention == "dense (unpatched)"


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--frames", "6"], ["--frames 6", "1 + 4·k", "5 or 9"]),
        (["--height", "40"], ["--height 40", "multiple of 16", "32 or 48"]),
        (["--width", "8"], ["--width 8", "multiple of 16", "16"]),
        (["--attention", "int8-fp8"], ["need a CUDA GPU", "--allow-reference"]),
        (["--profile", "warmup"], ["int8-fp8", "--allow-reference"]),
        (["--profile", "no-such-profile"], ["no attention profile named", "warmup"]),
        (["--attention", "dense", "--profile", "dense"], ["--attention or --profile, not both"]),
    ],
    ids=["frames", "height", "width", "gpu-only-mode", "gpu-only-profile", "unknown-profile", "both"],
)
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only messages")
def test_bad_run_settings(capsys, tmp_path, model_dir, extra, needles):
    args = ["generate", "--prompt", PROMPT, "--model", model_dir, *SMALL, "--output", tmp_path / "o.mp4"]
    # later flags win in argparse, so `extra` overrides SMALL
    rc, out, err = run_cli(capsys, *args, *extra)
    assert rc == cli.EXIT_INPUT
    assert err.count("sagevideo: error:") == 1
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "o.mp4").exists()


def test_bad_model_paths(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "generate", "--prompt", PROMPT, "--model", tmp_path / "missing", "--output",
                         tmp_path / "o.mp4")
    assert rc == cli.EXIT_INPUT and "no such folder" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(capsys, "generate", "--prompt", PROMPT, "--model", tmp_path / "empty", "--output",
                         tmp_path / "o.mp4")
    assert rc == cli.EXIT_INPUT and "model_index.json" in err


def test_output_not_writable_or_wrong_extension(capsys, tmp_path, model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rc, _, err = run_cli(capsys, "generate", "--prompt", PROMPT, "--model", model_dir, *SMALL,
                         "--output", blocker / "out.mp4")
    assert rc == cli.EXIT_INPUT and "writable location" in err and "a-file" in err
    rc, _, err = run_cli(capsys, "compare", "--prompt", PROMPT, "--model", model_dir, *SMALL,
                         "--output", blocker / "report")
    assert rc == cli.EXIT_INPUT and "writable location" in err
    rc, _, err = run_cli(capsys, "generate", "--prompt", PROMPT, "--model", model_dir, *SMALL,
                         "--output", tmp_path / "out.avi")
    assert rc == cli.EXIT_INPUT and ".mp4 or .gif" in err


def test_unsupported_pipeline(capsys, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    from sagevideo import generate as gen

    class ToyPipeline(DiffusionPipeline):
        def __call__(self, **kwargs):  # pragma: no cover - never reached
            raise AssertionError

    monkeypatch.setattr(gen, "load_pipeline", lambda *a, **k: (ToyPipeline(), gen.PipelineSource("local", "toy")))
    rc, _, err = run_cli(capsys, "generate", "--prompt", PROMPT, "--output", tmp_path / "o.mp4")
    assert rc == cli.EXIT_INPUT
    assert "unsupported pipeline ToyPipeline" in err and "WanPipeline" in err and "CogVideoXPipeline" in err


def test_python_m_unknown_hub_id(tmp_path):
    """``python -m sagevideo`` runs the CLI; an unknown Hugging Face id is one clear line and status 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "sagevideo", "generate", "--prompt", PROMPT, "--model", "nobody-xyz/no-such-model",
         "--output", str(tmp_path / "o.mp4")],
        capture_output=True, text=True, env=env, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("sagevideo: error:")]
    assert len(lines) == 1
    assert "nobody-xyz/no-such-model" in lines[0] and "could not load" in lines[0] and "spelling of the id" in lines[0]
    assert "Traceback" not in proc.stderr


def test_random_fallback_model_output_depends_on_attention():
    # the untrained fallback must still let attention matter, or `compare` would always report identical runs
    from sagevideo import methods, patch_pipeline
    from sagevideo.config import AttentionConfig
    from sagevideo.generate import random_tiny_wan

    pipe = random_tiny_wan(0)
    kw = dict(prompt="a red circle", num_frames=5, height=64, width=64, num_inference_steps=2, output_type="latent")
    with torch.no_grad():
        base = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames
    methods.register(methods.Method("test-zero", lambda q, k, v, ctx: (torch.zeros_like(q), None), cost=1.0))
    try:
        with patch_pipeline(pipe, AttentionConfig.uniform("test-zero")), torch.no_grad():
            zeroed = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames
    finally:
        methods.unregister("test-zero")
    assert (base - zeroed).abs().max() > 1e-3


def test_compare_reports_sparse_density(capsys, tmp_path, model_dir):
    """A sparse schedule's report says how sparse it was: calls and call-weighted mean density per model
    (from ``handle.sparse_report()``), in metrics.json and on stdout."""
    from sagevideo.report import load_metrics

    report = tmp_path / "report"
    rc, stdout, err = run_cli(capsys, "compare", "--prompt", PROMPT, "--model", model_dir, "--steps", "2",
                              "--frames", "9", "--height", "128", "--width", "128", "--no-progress",
                              "--attention", "sparse-spatiotemporal", "--allow-reference", "--output", report)
    assert rc == 0, err
    info = load_metrics(report)["info"]
    sparse = info["sparse"]["transformer"]
    ran = sum(n for label, n in info["methods_run"]["transformer"].items() if label.startswith("sparse"))
    # Wan runs classifier-free guidance as two transformer calls per (step, layer) site
    per_site = 2 if (info["settings"].get("guidance") or 0) > 1 else 1
    assert ran > 0 and sparse["calls"] == per_site * ran
    assert 0.0 < sparse["mean_density"] <= 1.0
    assert sum(sparse["heads"].values()) > 0
    assert f"mean density {sparse['mean_density']:.3f}" in stdout


def _no_ffmpeg(monkeypatch):
    """Make imageio-ffmpeg unimportable, as on a machine where it was not installed (the GPU hosts of
    2026-11-23 lacked it: `compare` did all its work and then died writing the side-by-side video)."""
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)


def test_generate_mp4_without_ffmpeg_fails_before_generating(capsys, tmp_path, model_dir, monkeypatch):
    _no_ffmpeg(monkeypatch)
    called = []
    monkeypatch.setattr("sagevideo.generate.generate", lambda *a, **k: called.append(1))
    rc, _, err = run_cli(capsys, "generate", "--prompt", PROMPT, "--model", model_dir, *SMALL,
                         "--output", tmp_path / "out.mp4")
    assert rc == cli.EXIT_INPUT and "imageio-ffmpeg" in err and ".gif" in err
    assert not called and not (tmp_path / "out.mp4").exists()


def test_compare_without_ffmpeg_reports_metrics_and_says_the_video_is_missing(capsys, tmp_path, model_dir,
                                                                              monkeypatch):
    _no_ffmpeg(monkeypatch)
    out = tmp_path / "report"
    with pytest.warns(RuntimeWarning, match="imageio-ffmpeg"):
        rc, stdout, _ = run_cli(capsys, "compare", "--prompt", PROMPT, "--model", model_dir, *SMALL,
                                "--attention", "dense", "--output", out)
    assert rc == cli.EXIT_OK
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html"]
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["side_by_side"]["file"] is None and "imageio-ffmpeg" in doc["side_by_side"]["unavailable"]
    assert doc["files"] == ["metrics.json", "report.html"]
    assert doc["metrics"]["psnr"]["available"]
    page = (out / "report.html").read_text()
    assert "side_by_side.mp4" not in page and "No side-by-side video" in page
    assert "no side-by-side video" in stdout


def test_compare_warms_up_every_method_the_schedule_uses():
    """The sparse methods' default schedules keep early steps dense, so warming up the schedule itself for a
    step compiles none of them: the warm-up must run each method of the schedule on every call."""
    from sagevideo.comparison import _warmup_configs
    from sagevideo.generate import build_config

    for name in ("sparse-semantic", "sparse-spatiotemporal", "int8-fp8"):
        config = build_config("wan", name)
        used = {config.default} | {r.method for r in config.rules}
        warm = _warmup_configs(config)
        assert {c.default for c, _ in warm} == used - {"dense"}
        assert all(not c.rules for c, _ in warm)
        if name.startswith("sparse"):
            assert config.rules  # the schedule itself starts dense: the case this guards
