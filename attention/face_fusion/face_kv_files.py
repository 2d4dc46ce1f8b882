"""Trained Face Fusion projections (Linear_kf, Linear_vf per cross-attention
layer) as safetensors. Loading parses tensors and JSON: no code runs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..shared.layer_table import BlockKey

METADATA_KEY = "likeness_face_kv"
FORMAT_VERSION = 1


def _name(key: BlockKey, which: str) -> str:
    return f"{key[0]}|{key[1]}|{key[2]}|{which}"


def save_face_kv(weights: dict[BlockKey, tuple[torch.Tensor, torch.Tensor]], path: Path, info: dict) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for key, (w_k, w_v) in weights.items():
        tensors[_name(key, "k")] = w_k.detach().contiguous().cpu()
        tensors[_name(key, "v")] = w_v.detach().contiguous().cpu()
    meta = {"format": FORMAT_VERSION, "layers": [list(k) for k in weights], **info}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata={METADATA_KEY: json.dumps(meta)})
    partial.replace(path)


def load_face_kv_file(path: str | Path) -> dict[BlockKey, tuple[torch.Tensor, torch.Tensor]]:
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        raw = (handle.metadata() or {}).get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"kv={path.name!r} is not a Likeness face K/V file (no '{METADATA_KEY}' metadata); "
                             "expected a file written by Likeness Train Face KV")
        meta = json.loads(raw)
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"kv={path.name!r} has format {meta.get('format')}, expected {FORMAT_VERSION}")
        weights = {}
        for layer in meta["layers"]:
            key = (layer[0], int(layer[1]), int(layer[2]))
            weights[key] = (handle.get_tensor(_name(key, "k")), handle.get_tensor(_name(key, "v")))
    return weights
