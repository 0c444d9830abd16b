"""sagevideo's ComfyUI custom nodes.

Install: link or copy this folder to ``ComfyUI/custom_nodes/sagevideo`` and ``pip install`` sagevideo into
ComfyUI's Python (see docs/comfyui.md). The node logic lives in ``override.py`` (no ComfyUI import; testable
alone) and ``nodes.py``.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
