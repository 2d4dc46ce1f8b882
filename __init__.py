"""Likeness: portrait nodes for ComfyUI (MagicStyle, Face Fusion, Infinite-ID,
feature-preserving portrait editing).

ComfyUI imports this at start-up, so nothing heavy is imported here:
insightface, open_clip and onnxruntime load when a node first needs them.
"""

from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
