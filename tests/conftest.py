"""Test configuration shared by the whole suite.

* On a machine without CUDA, Triton kernels run under the Triton interpreter (``TRITON_INTERPRET=1``), set
  here before any kernel module is imported, so CI covers them on tiny shapes.
* Tests marked ``gpu`` are skipped without CUDA; run them on a GPU machine (``pytest -m gpu``).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
