"""FeatureBank ⇄ safetensors. Loading parses tensors and JSON: no code runs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .feature_bank import FORMAT_VERSION, FeatureBank

METADATA_KEY = "likeness_features"
LATENT_TENSOR = "z_T"


def _tensor_name(timestep: float, layer) -> str:
    return f"{timestep!r}|{layer[0]}|{layer[1]}|{layer[2]}"


def save_bank(bank: FeatureBank, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {_tensor_name(t, layer): value.contiguous().cpu() for (t, layer), value in bank.features.items()}
    if bank.latent is not None:
        tensors[LATENT_TENSOR] = bank.latent.contiguous().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata={METADATA_KEY: json.dumps(bank.metadata())})
    partial.replace(path)


def load_bank(path: Path, device: torch.device | str = "cpu") -> FeatureBank:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        raw = (handle.metadata() or {}).get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"{path.name} is not a Likeness features file (no '{METADATA_KEY}' metadata)")
        meta = json.loads(raw)
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path.name} has features format {meta.get('format')}; this Likeness reads "
                             f"format {FORMAT_VERSION}: invert the image again")
        bank = FeatureBank(layers=[tuple(k) for k in meta["layers"]], timesteps=meta["timesteps"],
                           sigmas=meta["sigmas"], latent_shape=meta["latent_shape"],
                           model_fingerprint=meta["model_fingerprint"], steps=meta["steps"],
                           capture=meta["capture"], dtype=meta["dtype"])
        for name in handle.keys():
            if name == LATENT_TENSOR:
                bank.latent = handle.get_tensor(name).cpu()
                continue
            timestep, block, number, index = name.split("|")
            bank.features[(float(timestep), (block, int(number), int(index)))] = handle.get_tensor(name)
    expected = len(bank.timesteps) * len(bank.layers)
    if len(bank.features) != expected:
        raise ValueError(f"{path.name} holds {len(bank.features)} feature tensors, its metadata promises "
                         f"{expected}: the file is truncated or was edited")
    return bank
