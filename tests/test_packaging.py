"""The installed package (a wheel, not the editable checkout) carries its kernels, family files and assets."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        capture_output=True, text=True,
    )
    if res.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{res.stdout}\n{res.stderr}")
    (path,) = out.glob("sagevideo-*.whl")
    return path


def test_wheel_contains_subpackages_and_assets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "sagevideo/ops.py", "sagevideo/kernels/quant_attn.py", "sagevideo/kernels/quantize.py",
        "sagevideo/pipelines/wan.py", "sagevideo/sparse/__init__.py", "sagevideo/recipes/tiny_wan/train.py",
        "sagevideo/assets/lpips/alex_lpips_v0.1.safetensors", "sagevideo/assets/profiles/sage-fp8.json",
    ):
        assert required in names, f"{required} missing from the wheel"
    shipped = {n.split("/")[-1][:-5] for n in names if n.startswith("sagevideo/assets/profiles/") and n.endswith(".json")}
    in_repo = {p.stem for p in (ROOT / "assets" / "profiles").glob("*.json")}
    assert shipped == in_repo


def test_unpacked_wheel_finds_its_own_assets(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = (
        "import sagevideo, sagevideo.profiles as p, sagevideo._lpips as l;"
        "print(sagevideo.__file__); print(p.path('sage-fp8')); print(l.find_weights())"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split()
    assert all(line.startswith(str(tmp_path)) for line in lines), lines
