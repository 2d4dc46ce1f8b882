"""FeatureBank ⇄ safetensors. Loading parses tensors and JSON: no code runs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..shared.atomic_files import atomic_path
from .feature_bank import FORMAT_VERSION, FeatureBank, StoredStates

METADATA_KEY = "likeness_features"
LATENT_TENSOR = "z_T"
SCALE_SUFFIX = "|scale"
READABLE_FORMATS = (1, FORMAT_VERSION)  # 1: fp16 states, no scales


def _tensor_name(timestep: float, layer) -> str:
    return f"{timestep!r}|{layer[0]}|{layer[1]}|{layer[2]}"


def save_bank(bank: FeatureBank, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for (t, layer), stored in bank.features.items():
        tensors[_tensor_name(t, layer)] = stored.values.contiguous().cpu()
        if stored.scale is not None:
            tensors[_tensor_name(t, layer) + SCALE_SUFFIX] = stored.scale.contiguous().cpu()
    if bank.latent is not None:
        tensors[LATENT_TENSOR] = bank.latent.contiguous().cpu()
    with atomic_path(path) as partial:
        save_file(tensors, str(partial), metadata={METADATA_KEY: json.dumps(bank.metadata())})


def load_bank(path: Path, device: torch.device | str = "cpu") -> FeatureBank:
    """The bank in a file, on ``device`` (system memory, normally: sampling moves it)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        raw = (handle.metadata() or {}).get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"{path.name} is not a Likeness features file (no '{METADATA_KEY}' metadata)")
        meta = json.loads(raw)
        if meta.get("format") not in READABLE_FORMATS:
            raise ValueError(f"{path.name} has features format {meta.get('format')}; this Likeness reads "
                             f"formats {', '.join(map(str, READABLE_FORMATS))}: invert the image again")
        bank = FeatureBank(layers=[tuple(k) for k in meta["layers"]], timesteps=meta["timesteps"],
                           sigmas=meta["sigmas"], latent_shape=meta["latent_shape"],
                           model_fingerprint=meta["model_fingerprint"], steps=meta["steps"],
                           capture=meta["capture"], dtype="fp16" if meta["format"] == 1 else meta["dtype"])
        names = set(handle.keys())
        for name in names:
            if name == LATENT_TENSOR:
                bank.latent = handle.get_tensor(name).cpu()
                continue
            if name.endswith(SCALE_SUFFIX):
                continue
            timestep, block, number, index = name.split("|")
            scale = handle.get_tensor(name + SCALE_SUFFIX) if name + SCALE_SUFFIX in names else None
            if (scale is None) != (bank.dtype == "fp16"):
                raise ValueError(f"{path.name}: {name} is stored without the scale its {bank.dtype} format needs; "
                                 "the file was edited or truncated: save the features again")
            bank.features[(float(timestep), (block, int(number), int(index)))] = StoredStates(
                handle.get_tensor(name), scale)
    expected = len(bank.timesteps) * len(bank.layers)
    if len(bank.features) != expected:
        raise ValueError(f"{path.name} holds {len(bank.features)} feature tensors, its metadata promises "
                         f"{expected}: the file is truncated or was edited")
    return bank
