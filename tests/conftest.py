"""Test configuration shared by the whole suite.

* On a machine without CUDA, Triton kernels run under the Triton interpreter (``TRITON_INTERPRET=1``), set
  here before any kernel module is imported, so CI covers them on tiny shapes.
* Tests marked ``gpu`` are skipped without CUDA; run them on a GPU machine (``pytest -m gpu``).
* ``SAGEVIDEO_CACHE_DIR`` points at a fresh temporary folder, so no test sees or leaves kernel tuning choices.
"""

import contextlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the kernels' tuning choices (kernels/_autotune.py) go to a throwaway folder: the suite neither reads a user's
# cache (every GPU run times its candidates afresh) nor writes one
os.environ["SAGEVIDEO_CACHE_DIR"] = tempfile.mkdtemp(prefix="sagevideo-test-cache-")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run `pytest -m gpu` on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def devices():
    """Devices to run device-generic tests on: CPU always, CUDA when present (marked gpu)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@contextlib.contextmanager
def benchmark_script(filename: str):
    """Import ``benchmarks/<filename>`` as a module (registered in ``sys.modules`` while in use, since dataclasses
    look their module up there) and yield it; for the tests of the benchmark scripts."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / filename
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)
