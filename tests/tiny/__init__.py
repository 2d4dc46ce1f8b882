"""Tiny files in the real layouts, random weights, for the tests, the benchmark and the device check.

``tiny_models``: SD1.5- and SDXL-shaped checkpoints and a CLIP vision tower (also loaded by the test
server through a stub custom node); ``tiny_faceid``: FaceID-PlusV2 adapters; ``tiny_insightface``:
insightface packs (ONNX); ``tiny_mcdm``: the MCDM's released files and a ViT-B/32-shaped image tower;
``tiny_controlnet``: a ControlNet for the workflows that apply a pose."""
