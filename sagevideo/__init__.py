"""sagevideo: quantized and sparse attention for video diffusion transformers.

The core op is :func:`sagevideo.attention` (INT8 QKᵀ with FP8 or 16-bit PV, SageAttention2-style, as a
``torch.library`` custom op). Everything that needs diffusers is imported lazily, on first use of the name.
"""

import importlib

from sagevideo.ops import PRECISIONS, attention

__version__ = "0.1.0.dev0"

# name -> (module, attribute); resolved on first access so `import sagevideo` stays light
_LAZY = {
    "patch_pipeline": ("sagevideo.patching", "patch_pipeline"),
    "patch_transformer": ("sagevideo.patching", "patch_transformer"),
    "calibrate": ("sagevideo.calibration", "calibrate"),
    "compare": ("sagevideo.comparison", "compare"),
    "generate": ("sagevideo.generate", "generate"),
    "load_pipeline": ("sagevideo.generate", "load_pipeline"),
    "AttentionConfig": ("sagevideo.config", "AttentionConfig"),
    "Rule": ("sagevideo.config", "Rule"),
    "sparse_attention": ("sagevideo.sparse.api", "sparse_attention"),
    "SparseState": ("sagevideo.sparse.api", "SparseState"),
    "block_sparse_attention": ("sagevideo.sparse.blocks", "block_sparse_attention"),
    "method_config": ("sagevideo.config", "method_config"),
    "profiles": ("sagevideo.profiles", None),
    "metrics": ("sagevideo.metrics", None),
}

__all__ = ["PRECISIONS", "attention", "__version__", *_LAZY]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'sagevideo' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value
