"""A tiny SD1.5 ControlNet in the original ``control_model.*`` layout (test-only),
for the workflows that apply a pose through ComfyUI's own ControlNet nodes."""

from __future__ import annotations

import inspect
from pathlib import Path

from . import tiny_models

FILE = "tiny_controlnet_sd15.safetensors"
SEED = 20261127


def write(folder: Path) -> Path:
    """models/controlnet/tiny_controlnet_sd15.safetensors (random weights, zero convs included,
    so the control image visibly changes the result)."""
    import comfy.cldm.cldm
    from safetensors.torch import save_file

    path = folder / FILE
    if path.exists():
        return path
    accepted = inspect.signature(comfy.cldm.cldm.ControlNet.__init__).parameters
    config = {k: v for k, v in tiny_models.SD15_UNET.items() if k in accepted and k != "out_channels"}
    control = comfy.cldm.cldm.ControlNet(hint_channels=3, **config)
    tiny_models.initialise(control, SEED)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"control_model.{k}": v.contiguous() for k, v in control.state_dict().items()}, str(path))
    return path
