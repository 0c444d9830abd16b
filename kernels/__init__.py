"""Triton kernels of sagevideo (installed as sagevideo.kernels)."""
