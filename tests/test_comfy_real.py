"""The node in a real ComfyUI, headless on CPU, driven over its HTTP API. Skipped unless SAGEVIDEO_COMFYUI_DIR is set.

    git clone https://github.com/comfyanonymous/ComfyUI /tmp/ComfyUI        # never inside this repository
    pip install -r /tmp/ComfyUI/requirements.txt                              # in ComfyUI's Python, with sagevideo
    SAGEVIDEO_COMFYUI_DIR=/tmp/ComfyUI pytest tests/test_comfy_real.py -s

``SAGEVIDEO_COMFYUI_PYTHON`` picks the interpreter that runs ComfyUI (default: this one). The test writes, in a
temporary folder only:

* a tiny random Wan 2.1 T2V diffusion model in ComfyUI's single-file format (original Wan key names: dim 128 =
  1 head of 128 — ComfyUI's detection sets ``num_heads = dim // 128`` — 2 blocks, 16 latent channels);
* ``custom_nodes/sagevideo_nodes`` → a link to this repository's ``comfy_nodes``, plus a test-only node that emits an
  all-zero text conditioning (so no 5-billion-parameter UMT5 text encoder is needed);
* an ``extra_model_paths.yaml`` pointing ComfyUI at both.

It starts ``main.py --cpu`` with ``SAGEVIDEO_COMFY_ALLOW_CPU=1`` (the node's test switch: the torch reference of
the quantized arithmetic runs instead of ComfyUI's attention), posts one workflow with two branches — plain model
and model → "Sage Attention" (int8-fp16, dense warm-up 0.34) — sampling 3 Euler steps each from the same
``EmptyHunyuanLatentVideo`` and saving both latents, polls ``/history/<id>``, and checks that the prompt
succeeded, that the server log shows the schedule and its first quantized call, and that the two latents agree.
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

ZERO_COND_NODE = '''
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


NODE_CLASS_MAPPINGS = {"SageVideoTestZeroConditioning": SageVideoTestZeroConditioning}
'''


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


def workflow() -> dict:
    latent = {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 5, "batch_size": 1}}

    def branch(model_ref, prefix):
        return {
            f"{prefix}_sample": {"class_type": "KSampler", "inputs": {
                "model": model_ref, "seed": 1, "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                "positive": ["cond", 0], "negative": ["cond", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
            f"{prefix}_save": {"class_type": "SaveLatent", "inputs": {
                "samples": [f"{prefix}_sample", 0], "filename_prefix": f"sagevideo_test/{prefix}"}},
        }

    graph = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL_NAME, "weight_dtype": "default"}},
        "sage": {"class_type": "SageVideoAttention", "inputs": {
            "model": ["unet", 0], "mode": "int8-fp16", "dense_warmup": 0.34, "high_precision_blocks": ""}},
        "cond": {"class_type": "SageVideoTestZeroConditioning", "inputs": {}},
        "latent": latent,
    }
    graph.update(branch(["unet", 0], "plain"))
    graph.update(branch(["sage", 0], "sage"))
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


@pytest.mark.parametrize("allow_cpu", [True, False], ids=["cpu-reference", "cpu-fallback"])
def test_node_in_real_comfyui(tmp_path, allow_cpu):
    """allow_cpu: the node's test switch runs the quantized reference on CPU; without it (what a user without a
    supported GPU gets) every call goes to ComfyUI's attention with one log line and the result is unchanged."""
    from safetensors.torch import save_file

    comfy = Path(COMFY_DIR).resolve()
    assert (comfy / "main.py").is_file(), f"{comfy} is not a ComfyUI checkout (no main.py)"
    models = tmp_path / "models" / "diffusion_models"
    models.mkdir(parents=True)
    save_file(tiny_wan_state_dict(), str(models / MODEL_NAME))
    nodes = tmp_path / "custom_nodes"
    nodes.mkdir()
    try:
        (nodes / "sagevideo_nodes").symlink_to(REPO / "comfy_nodes", target_is_directory=True)
    except OSError:
        shutil.copytree(REPO / "comfy_nodes", nodes / "sagevideo_nodes")
    (nodes / "sagevideo_test_cond.py").write_text(ZERO_COND_NODE)
    (tmp_path / "extra_model_paths.yaml").write_text(
        f"sagevideo_test:\n  base_path: {tmp_path}\n  diffusion_models: models/diffusion_models/\n"
        f"  custom_nodes: custom_nodes/\n"
    )
    out_dir = tmp_path / "output"
    port = _free_port()
    env = dict(os.environ, SAGEVIDEO_COMFY_ALLOW_CPU="1" if allow_cpu else "0", PYTHONPATH=str(REPO))
    python = os.environ.get("SAGEVIDEO_COMFYUI_PYTHON", sys.executable)
    log = (tmp_path / "comfyui.log").open("w")
    proc = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-api-nodes",
         "--extra-model-paths-config", str(tmp_path / "extra_model_paths.yaml"), "--output-directory", str(out_dir)],
        cwd=comfy, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail("ComfyUI exited at start:\n" + (tmp_path / "comfyui.log").read_text()[-4000:])
            try:
                info = _http(f"{base}/object_info/SageVideoAttention")
                break
            except Exception:
                if time.time() > deadline:
                    pytest.fail("ComfyUI did not answer in 180 s:\n" + (tmp_path / "comfyui.log").read_text()[-4000:])
                time.sleep(1.0)
        assert "SageVideoAttention" in info, "the custom node was not loaded: " + (tmp_path / "comfyui.log").read_text()[-4000:]
        assert info["SageVideoAttention"]["display_name"] == "Sage Attention"

        prompt_id = _http(f"{base}/prompt", {"prompt": workflow(), "client_id": "sagevideo-test"})["prompt_id"]
        deadline = time.time() + 600
        while True:
            hist = _http(f"{base}/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                break
            if time.time() > deadline:
                pytest.fail("the prompt did not finish in 600 s")
            time.sleep(1.0)
        status = hist[prompt_id]["status"]
        assert status.get("status_str") == "success", json.dumps(status, indent=1)[-4000:]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    text = (tmp_path / "comfyui.log").read_text()
    assert "sagevideo: attention schedule" in text
    plain = _load_latent(next((out_dir / "sagevideo_test").glob("plain*.latent")))
    sage = _load_latent(next((out_dir / "sagevideo_test").glob("sage*.latent")))
    assert plain.shape == sage.shape
    assert torch.isfinite(sage).all()
    if not allow_cpu:
        assert text.count("no supported GPU") == 1, text[-4000:]
        assert "scheduled attention active" not in text
        assert torch.equal(plain, sage)
        return
    assert "scheduled attention active" in text, text[-4000:]
    err = (plain - sage).norm() / plain.norm()
    print(f"real ComfyUI: relative L2 difference plain vs Sage Attention node: {err:.3e}")
    assert 0 < err < 0.05
