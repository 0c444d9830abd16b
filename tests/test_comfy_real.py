"""The node in a real ComfyUI, headless on CPU, driven over its HTTP API. Skipped unless SAGEVIDEO_COMFYUI_DIR is set.

    git clone https://github.com/comfyanonymous/ComfyUI /tmp/ComfyUI        # never inside this repository
    pip install -r /tmp/ComfyUI/requirements.txt                              # in ComfyUI's Python, with sagevideo
    SAGEVIDEO_COMFYUI_DIR=/tmp/ComfyUI pytest tests/test_comfy_real.py -s

``SAGEVIDEO_COMFYUI_PYTHON`` picks the interpreter that runs ComfyUI (default: this one). The test writes, in a
temporary folder only:

* a tiny random Wan 2.1 T2V diffusion model in ComfyUI's single-file format (original Wan key names: dim 128 =
  1 head of 128 — ComfyUI's detection sets ``num_heads = dim // 128`` — 2 blocks, 16 latent channels);
* ``custom_nodes/sagevideo_nodes`` → a link to this repository's ``comfy_nodes``, plus test-only nodes
  (``TEST_NODES``): an all-zero text conditioning (so no 5-billion-parameter UMT5 text encoder is needed), a
  report node that prints the state of a Sage Attention override after sampling (calls per method, per-layer
  sparse densities). ComfyUI versions whose Wan does not put ``grid_sizes`` into ``transformer_options``
  (e.g. Comfy-Org/ComfyUI ``a125cd8``, October 2025) get it from the node's own model wrapper
  (``comfy_nodes.nodes.wan_grid_wrapper``), which the sparse branches therefore exercise there;
* an ``extra_model_paths.yaml`` pointing ComfyUI at both.

It starts ``main.py --cpu`` with ``SAGEVIDEO_COMFY_ALLOW_CPU=1`` (the node's test switch: the torch reference of
the quantized arithmetic — and of the block-sparse kernel — runs instead of ComfyUI's attention) and posts one
workflow with four branches sampling 3 Euler steps each from the same ``EmptyHunyuanLatentVideo`` (128×128, 9
frames: a 3×8×8 grid, 192 tokens) and saving the latents:

* ``plain``: the model as loaded;
* ``sage``: model → "Sage Attention" (int8-fp16, dense warm-up 0.2: step 0 of 3 runs ComfyUI's attention);
* ``semantic`` / ``spatiotemporal``: model → "Sage Attention" with a ``config_json`` running ``sparse-semantic``
  / ``sparse-spatiotemporal`` (int8-fp16 precision) after the same dense warm-up, with 16×16 blocks (the node's
  defaults, 128×64, would put most of 192 tokens in one block) and few k-means clusters.

It polls ``/history/<id>`` and checks that the prompt succeeded, that the server log shows each schedule and its
first call with the method's label, that no sparse call fell back for an unknown grid, that the sparse layers
really dropped blocks (density < 1 in the report), and that every latent is close to the plain one while the
sparse ones differ from the dense quantized one. A second run without the test switch checks the one-line
fallback per node and unchanged results.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

COMFY_DIR = os.environ.get("SAGEVIDEO_COMFYUI_DIR")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not COMFY_DIR, reason="set SAGEVIDEO_COMFYUI_DIR to a ComfyUI checkout to run the real-ComfyUI test"
    ),
]

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "sagevideo_tiny_wan.safetensors"
SPARSE_MODES = ("sparse-semantic", "sparse-spatiotemporal")
BRANCHES = ("plain", "sage", "semantic", "spatiotemporal")
REPORT_TAG = "sagevideo-test report"
DENSE_WARMUP = 0.2  # of 3 steps (fractions 0, 1/3, 2/3): step 0 runs ComfyUI's attention, steps 1 and 2 the node's

TEST_NODES = '''
import json

import torch


class SageVideoTestZeroConditioning:
    """Test helper: an all-zero Wan text conditioning (batch 1, 16 tokens, 4096 channels)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self):
        return ([[torch.zeros(1, 16, 4096), {}]],)


class SageVideoTestReport:
    """Test helper: after sampling (the latent input orders it), print the state of the model's Sage Attention
    override: calls per path, method per (step, block), and each sparse layer's SparseState report."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "samples": ("LATENT",), "label": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, model, samples, label):
        ov = model.model_options.get("transformer_options", {}).get("optimized_attention_override")
        report = {"label": label, "override": type(ov).__name__}
        if ov is not None and hasattr(ov, "calls"):
            report["calls"] = dict(ov.calls)
            report["observed"] = {f"{s},{l}": m for (s, l), m in sorted(ov.observed.items(), key=str)}
            report["sparse"] = {f"{k[0]}:{k[1]}": st.report() for k, st in ov.store.items() if hasattr(st, "report")}
        print("REPORT_TAG " + json.dumps(report, default=str), flush=True)
        return {}


NODE_CLASS_MAPPINGS = {
    "SageVideoTestZeroConditioning": SageVideoTestZeroConditioning,
    "SageVideoTestReport": SageVideoTestReport,
}
'''.replace("REPORT_TAG", REPORT_TAG)


def tiny_wan_state_dict(dim=128, ffn=256, layers=2, in_dim=16, text_dim=4096, freq_dim=256, seed=0):
    """Random weights under the original Wan 2.1 key names that ComfyUI's model detection reads."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std=0.02):
        return (torch.randn(shape, generator=g) * std).to(torch.float16)

    sd = {
        "patch_embedding.weight": w(dim, in_dim, 1, 2, 2), "patch_embedding.bias": w(dim),
        "text_embedding.0.weight": w(dim, text_dim), "text_embedding.0.bias": w(dim),
        "text_embedding.2.weight": w(dim, dim), "text_embedding.2.bias": w(dim),
        "time_embedding.0.weight": w(dim, freq_dim), "time_embedding.0.bias": w(dim),
        "time_embedding.2.weight": w(dim, dim), "time_embedding.2.bias": w(dim),
        "time_projection.1.weight": w(6 * dim, dim), "time_projection.1.bias": w(6 * dim),
        "head.modulation": w(1, 2, dim), "head.head.weight": w(in_dim * 4, dim), "head.head.bias": w(in_dim * 4),
    }
    for i in range(layers):
        p = f"blocks.{i}."
        sd[p + "modulation"] = w(1, 6, dim)
        for attn in ("self_attn", "cross_attn"):
            for name in ("q", "k", "v", "o"):
                sd[f"{p}{attn}.{name}.weight"] = w(dim, dim, std=0.1)
                sd[f"{p}{attn}.{name}.bias"] = w(dim)
            sd[f"{p}{attn}.norm_q.weight"] = torch.ones(dim, dtype=torch.float16)
            sd[f"{p}{attn}.norm_k.weight"] = torch.ones(dim, dtype=torch.float16)
        sd[p + "norm3.weight"] = torch.ones(dim, dtype=torch.float16)
        sd[p + "norm3.bias"] = torch.zeros(dim, dtype=torch.float16)
        sd[p + "ffn.0.weight"], sd[p + "ffn.0.bias"] = w(ffn, dim), w(ffn)
        sd[p + "ffn.2.weight"], sd[p + "ffn.2.bias"] = w(dim, ffn), w(dim)
    return sd


def sparse_config(mode: str) -> str:
    """The sparse branches' schedule: ComfyUI's attention for step 0 of 3 (as the ``sage`` branch), then ``mode``
    at int8-fp16 with 16×16 blocks (few clusters for the 192-token latent)."""
    from sagevideo.config import AttentionConfig, Rule

    params = {"precision": "int8-fp16", "block_m": 16, "block_n": 16}
    if mode == "sparse-semantic":
        params.update(q_clusters=8, k_clusters=16)
    warmup = Rule("dense", steps=(0.0, DENSE_WARMUP))
    return AttentionConfig(default=mode, default_params=params, rules=(warmup,)).to_json()


def comfy_sets_wan_grid(comfy: Path) -> bool:
    """Whether this ComfyUI's Wan forward puts ``grid_sizes`` into ``transformer_options`` itself."""
    src = comfy / "comfy" / "ldm" / "wan" / "model.py"
    return src.is_file() and 'transformer_options["grid_sizes"]' in src.read_text()


def workflow() -> dict:
    latent = {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 128, "height": 128, "length": 9,
                                                                   "batch_size": 1}}

    def branch(model_ref, prefix):
        return {
            f"{prefix}_sample": {"class_type": "KSampler", "inputs": {
                "model": model_ref, "seed": 1, "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                "positive": ["cond", 0], "negative": ["cond", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
            f"{prefix}_save": {"class_type": "SaveLatent", "inputs": {
                "samples": [f"{prefix}_sample", 0], "filename_prefix": f"sagevideo_test/{prefix}"}},
            f"{prefix}_report": {"class_type": "SageVideoTestReport", "inputs": {
                "model": model_ref, "samples": [f"{prefix}_sample", 0], "label": prefix}},
        }

    def sage(model_ref, mode, dense_warmup, config_json=""):
        return {"class_type": "SageVideoAttention", "inputs": {
            "model": model_ref, "mode": mode, "dense_warmup": dense_warmup, "high_precision_blocks": "",
            "config_json": config_json}}

    sparse_base = ["unet", 0]
    graph = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL_NAME, "weight_dtype": "default"}},
        "sage": sage(["unet", 0], "int8-fp16", DENSE_WARMUP),
        "sage_semantic": sage(sparse_base, "sparse-semantic", 0.0, sparse_config("sparse-semantic")),
        "sage_spatiotemporal": sage(sparse_base, "sparse-spatiotemporal", 0.0, sparse_config("sparse-spatiotemporal")),
        "cond": {"class_type": "SageVideoTestZeroConditioning", "inputs": {}},
        "latent": latent,
    }
    graph.update(branch(["unet", 0], "plain"))
    graph.update(branch(["sage", 0], "sage"))
    graph.update(branch(["sage_semantic", 0], "semantic"))
    graph.update(branch(["sage_spatiotemporal", 0], "spatiotemporal"))
    return graph


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, data: dict | None = None, timeout: float = 10.0) -> dict:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def _load_latent(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["latent_tensor"].float()


def _reports(text: str) -> dict[str, dict]:
    out = {}
    for line in text.splitlines():
        at = line.find(REPORT_TAG + " ")
        if at >= 0:
            rep = json.loads(line[at + len(REPORT_TAG) + 1:])
            out[rep["label"]] = rep
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("allow_cpu", [True, False], ids=["cpu-reference", "cpu-fallback"])
def test_node_in_real_comfyui(tmp_path, allow_cpu):
    """allow_cpu: the node's test switch runs the quantized (and block-sparse) reference on CPU; without it (what a
    user without a supported GPU gets) every call goes to ComfyUI's attention with one log line per node and the
    results are unchanged."""
    from safetensors.torch import save_file

    comfy = Path(COMFY_DIR).resolve()
    assert (comfy / "main.py").is_file(), f"{comfy} is not a ComfyUI checkout (no main.py)"
    own_grid = comfy_sets_wan_grid(comfy)
    print(f"\nreal ComfyUI: Wan sets transformer_options['grid_sizes'] itself: {own_grid}"
          + ("" if own_grid else " (no: the node's wan_grid_wrapper provides it)"))
    models = tmp_path / "models" / "diffusion_models"
    models.mkdir(parents=True)
    save_file(tiny_wan_state_dict(), str(models / MODEL_NAME))
    nodes = tmp_path / "custom_nodes"
    nodes.mkdir()
    try:
        (nodes / "sagevideo_nodes").symlink_to(REPO / "comfy_nodes", target_is_directory=True)
    except OSError:
        shutil.copytree(REPO / "comfy_nodes", nodes / "sagevideo_nodes")
    (nodes / "sagevideo_test_nodes.py").write_text(TEST_NODES)
    (tmp_path / "extra_model_paths.yaml").write_text(
        f"sagevideo_test:\n  base_path: {tmp_path}\n  diffusion_models: models/diffusion_models/\n"
        f"  custom_nodes: custom_nodes/\n"
    )
    out_dir = tmp_path / "output"
    port = _free_port()
    env = dict(os.environ, SAGEVIDEO_COMFY_ALLOW_CPU="1" if allow_cpu else "0", PYTHONPATH=str(REPO))
    python = os.environ.get("SAGEVIDEO_COMFYUI_PYTHON", sys.executable)
    log_path = tmp_path / "comfyui.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-api-nodes",
         "--extra-model-paths-config", str(tmp_path / "extra_model_paths.yaml"), "--output-directory", str(out_dir)],
        cwd=comfy, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail("ComfyUI exited at start:\n" + log_path.read_text()[-4000:])
            try:
                info = _http(f"{base}/object_info/SageVideoAttention")
                break
            except Exception:
                if time.time() > deadline:
                    pytest.fail("ComfyUI did not answer in 180 s:\n" + log_path.read_text()[-4000:])
                time.sleep(1.0)
        assert "SageVideoAttention" in info, "the custom node was not loaded: " + log_path.read_text()[-4000:]
        assert info["SageVideoAttention"]["display_name"] == "Sage Attention"
        modes = info["SageVideoAttention"]["input"]["required"]["mode"][0]
        assert set(SPARSE_MODES) <= set(modes), modes
        t_start = time.time() - t0

        prompt_id = _http(f"{base}/prompt", {"prompt": workflow(), "client_id": "sagevideo-test"})["prompt_id"]
        deadline = time.time() + 600
        while True:
            hist = _http(f"{base}/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                break
            if proc.poll() is not None:
                pytest.fail("ComfyUI exited while running the prompt:\n" + log_path.read_text()[-4000:])
            if time.time() > deadline:
                pytest.fail("the prompt did not finish in 600 s")
            time.sleep(1.0)
        status = hist[prompt_id]["status"]
        assert status.get("status_str") == "success", json.dumps(status, indent=1)[-4000:]
        t_prompt = time.time() - t0 - t_start
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    print(f"real ComfyUI: server start {t_start:.1f} s, prompt (4 branches x 3 steps) {t_prompt:.1f} s")

    text = log_path.read_text()
    assert text.count("sagevideo: attention schedule") == 3, text[-4000:]
    for mode in SPARSE_MODES:
        assert f'"default": "{mode}"' in text, f"no schedule line for {mode}: " + text[-4000:]
    latents = {b: _load_latent(next((out_dir / "sagevideo_test").glob(f"{b}_*.latent"))) for b in BRANCHES}
    plain = latents["plain"]
    assert plain.shape == (1, 16, 3, 16, 16)
    for b in BRANCHES:
        assert latents[b].shape == plain.shape and torch.isfinite(latents[b]).all(), b
    reports = _reports(text)
    assert set(reports) == set(BRANCHES), text[-4000:]
    assert reports["plain"]["override"] == "NoneType"

    if not allow_cpu:
        assert text.count("no supported GPU") == 3, text[-4000:]  # once per node (one override each)
        assert "scheduled attention active" not in text
        for b in BRANCHES[1:]:
            assert torch.equal(plain, latents[b]), b
            assert reports[b]["calls"]["sagevideo"] == 0, reports[b]
        return

    # every override ran, and logged its first call with its method
    first_calls = [ln[ln.index("sagevideo:"):] for ln in text.splitlines() if "scheduled attention active" in ln]
    print("real ComfyUI: " + "\nreal ComfyUI: ".join(first_calls))
    assert len(first_calls) == 3, text[-4000:]
    for mode in ("int8-fp16",) + SPARSE_MODES:
        assert any(mode in line for line in first_calls), (mode, first_calls)
    # the sparse path really ran: no dense fallback for an unknown grid or a mismatched sequence
    assert "video grid of this model is unknown" not in text, text[-4000:]
    assert "runs dense quantized attention here" not in text, text[-4000:]
    assert "no supported GPU" not in text

    err = {b: _rel(latents[b], plain) for b in BRANCHES[1:]}
    for b in ("semantic", "spatiotemporal"):
        err[b + " vs sage"] = _rel(latents[b], latents["sage"])
    for b in ("sage", "semantic", "spatiotemporal"):
        rep = reports[b]
        print(f"real ComfyUI: {b}: calls {rep['calls']}, per (step,block) {rep['observed']}")
        for key, st in rep.get("sparse", {}).items():
            print(f"real ComfyUI:   {key}: {st}")
    print("real ComfyUI: relative L2 difference " + ", ".join(f"{k}: {v:.3e}" for k, v in err.items()))

    # sage: step 0 is ComfyUI's attention, steps 1-2 on both blocks quantized
    assert reports["sage"]["calls"]["sagevideo"] == 4, reports["sage"]
    assert 0 < err["sage"] < 0.05
    for b, mode in zip(("semantic", "spatiotemporal"), SPARSE_MODES):
        rep = reports[b]
        assert rep["calls"]["sagevideo"] == 4, rep  # steps 1-2 x 2 blocks
        assert sorted(rep["observed"]) == ["0,0", "0,1", "1,0", "1,1", "2,0", "2,1"], rep
        assert all(rep["observed"][f"0,{layer}"] == "dense(comfy)" for layer in (0, 1)), rep
        assert all(rep["observed"][f"{s},{layer}"].startswith(mode) for s in (1, 2) for layer in (0, 1)), rep
        sparse = rep["sparse"]
        assert sorted(sparse) == [f"{mode}:0", f"{mode}:1"], rep
        for st in sparse.values():
            assert st["calls"] == 2
            assert 0 < st["mean_density"] < 1, st  # blocks were dropped
        # close to the dense result, but not the dense quantized one: the dropped blocks change it far more
        # than the quantization does (measured on a125cd8: sage 6e-5, semantic 2e-3, spatiotemporal 6e-3)
        assert err[b + " vs sage"] > 5 * err["sage"], (b, err)
        assert err[b] < 0.05, (b, err)
