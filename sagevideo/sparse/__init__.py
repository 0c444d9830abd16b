"""Sparse video attention: block-sparse kernels driven by per-(batch, head) block lists
(:func:`~sagevideo.sparse.blocks.block_sparse_attention`), and the methods that choose the blocks — spatial /
temporal heads profiled online in the style of Sparse VideoGen (Xi et al. 2025), and k-means semantic
permutation with a top-p budget in the style of Sparse VideoGen 2 (Yang et al. 2025) — behind one entry point,
:func:`~sagevideo.sparse.api.sparse_attention` (``sagevideo.sparse_attention``). In a schedule they are the
methods ``sparse-spatiotemporal`` and ``sparse-semantic`` (``sagevideo/sparse/scheduled.py``)."""
