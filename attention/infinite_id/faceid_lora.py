"""IP-Adapter FaceID's LoRA, on the identity stream's rows only.

FaceID-PlusV2's identity tokens were trained together with a LoRA on q, k, v
and out of every attention layer (the reference ``LoRAAttnProcessor2_0`` for
self-attention, ``LoRAIPAttnProcessor2_0`` for cross-attention):

    q = W_q·x + s·U_q·D_q·x,   k = W_k·c + s·U_k·D_k·c,   v likewise,
    out = W_o·h + b_o + s·U_o·D_o·h

with s the reference's ``lora_scale`` (1). Infinite-ID's identity stream is
that model; its text stream (Eq. 5) is the original one, so the LoRA is
computed here for the identity rows and never merged into the weights.

The LoRA comes from the adapter file itself (``ip_adapter.<n>.to_q_lora.down.weight``,
processor ``n`` = attn1 of layout entry n//2 when n is even, attn2 when odd),
or from the separately released ``*_lora.safetensors`` in any key layout
ComfyUI's own LoRA loader reads (``comfy.lora.model_lora_keys_unet``), with
its ``alpha``/rank scale as ComfyUI applies it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..shared.layer_table import BlockKey, transformer_block

PROJECTIONS = ("q", "k", "v", "out")
REFERENCE_SCALE = 1.0  # LoRAIPAttnProcessor2_0's default lora_scale
_FILE_KEY = re.compile(r"^(\d+)\.to_(q|k|v|out)_lora\.(down|up)\.weight$")
_LDM_KEY = re.compile(r"^diffusion_model\.(input_blocks|middle_block|output_blocks)\.(\d+)\.(?:(\d+)\.)?"
                      r"transformer_blocks\.(\d+)\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)\.weight$")
_STAGES = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}
_PROJECTION_NAMES = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out"}

Layer = tuple[str, BlockKey]  # ("attn1" | "attn2", block key)


@dataclass
class FaceIDLoRA:
    """Per layer and projection: (down, up, scale). ``delta`` computes s·U·D·x."""

    weights: dict[Layer, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]
    source: str = ""
    _on_device: dict = field(default_factory=dict, repr=False)

    def __deepcopy__(self, memo):
        return self

    def __len__(self) -> int:
        return len(self.weights)

    def covers(self, kind: str, key: BlockKey) -> bool:
        return (kind, tuple(key)) in self.weights

    def delta(self, kind: str, key: BlockKey, projection: str, x: torch.Tensor) -> torch.Tensor | None:
        """s·U·D·x for one projection of one layer, or None where the LoRA has none."""
        found = self.weights.get((kind, tuple(key)), {}).get(projection)
        if found is None:
            return None
        place = (x.device, x.dtype)
        moved = self._on_device.setdefault(place, {})
        name = (kind, tuple(key), projection)
        if name not in moved:  # moved once per run, freed by release()
            down, up, scale = found
            moved[name] = (down.to(x), up.to(x), scale)
        down, up, scale = moved[name]
        return F.linear(F.linear(x, down), up) * scale

    def release(self) -> None:
        self._on_device.clear()


def from_adapter_file(ip_adapter: dict[str, torch.Tensor], layout: tuple[BlockKey, ...],
                      scale: float = REFERENCE_SCALE, source: str = "") -> FaceIDLoRA | None:
    """The LoRA an IP-Adapter FaceID file carries in its ``ip_adapter`` section, or None."""
    weights: dict[Layer, dict[str, list]] = {}
    for name, tensor in ip_adapter.items():
        match = _FILE_KEY.match(name)
        if match is None:
            continue
        number, projection, side = int(match.group(1)), match.group(2), match.group(3)
        if number // 2 >= len(layout):
            raise ValueError(f"{source}: LoRA key ip_adapter.{name} is past the {2 * len(layout)} attention "
                             "processors of this layout")
        layer = ("attn1" if number % 2 == 0 else "attn2", layout[number // 2])
        pair = weights.setdefault(layer, {}).setdefault(projection, [None, None])
        pair[0 if side == "down" else 1] = tensor
    if not weights:
        return None
    return FaceIDLoRA({layer: {p: (down, up, scale) for p, (down, up) in parts.items()}
                       for layer, parts in weights.items()}, source)


def block_key_of(ldm_key: str) -> tuple[Layer, str] | None:
    """("attn1"|"attn2", block key), projection of a UNet weight key in ComfyUI's LDM layout."""
    match = _LDM_KEY.match(ldm_key)
    if match is None:
        return None
    stage, number, _, index, kind, projection = match.groups()
    key = (_STAGES[stage], 0 if stage == "middle_block" else int(number), int(index))
    return (kind, key), _PROJECTION_NAMES[projection]


def from_lora_file(state: dict[str, torch.Tensor], model, source: str = "",
                   scale: float = REFERENCE_SCALE) -> FaceIDLoRA:
    """A LoRA file (kohya ``lora_unet_*``, diffusers or LDM names) for ``model``'s attention layers,
    through ComfyUI's own key map. Keys it cannot place on an attention projection are refused."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    weights: dict[Layer, dict[str, tuple]] = {}
    prefixes = {k[: -len(".lora_down.weight")] for k in state if k.endswith(".lora_down.weight")}
    unplaced = []
    for prefix in sorted(prefixes):
        target = key_map.get(prefix)
        placed = None if target is None else block_key_of(target)
        up = state.get(f"{prefix}.lora_up.weight")
        if placed is None or up is None:
            unplaced.append(prefix)
            continue
        down = state[f"{prefix}.lora_down.weight"]
        alpha = state.get(f"{prefix}.alpha")
        rank = down.shape[0]
        lora_scale = scale * (float(alpha) / rank if alpha is not None else 1.0)
        layer, projection = placed
        weights.setdefault(layer, {})[projection] = (down, up, lora_scale)
    if unplaced or not weights:
        raise ValueError(f"{source}: {len(unplaced)} of {len(prefixes)} LoRA entries do not name an attention "
                         f"projection of this model (first: {', '.join(unplaced[:3]) or 'none found'}); expected "
                         "the FaceID LoRA for this model's family (ip-adapter-faceid-plusv2_sd15_lora or _sdxl_lora)")
    return FaceIDLoRA(weights, source)


def adapter_file_entries(lora: FaceIDLoRA, layout: tuple[BlockKey, ...],
                         unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``lora`` in an adapter file's own ``ip_adapter`` keys, each scale folded into its up weight,
    so the file read back at the loader's default scale (1) computes exactly what ``lora`` did.
    A projection ``lora`` leaves out (a separate LoRA file may cover fewer) gets a zero pair: the
    file layout holds FaceID's LoRA on every processor or on none, and zero adds nothing."""
    rank = next(down.shape[0] for parts in lora.weights.values() for down, _, _ in parts.values())
    entries = {}
    for n, key in enumerate(layout):
        block = transformer_block(unet, key)
        for number, kind in ((2 * n, "attn1"), (2 * n + 1, "attn2")):
            attention = getattr(block, kind)
            for projection in PROJECTIONS:
                found = lora.weights.get((kind, tuple(key)), {}).get(projection)
                if found is None:
                    linear = attention.to_out[0] if projection == "out" else getattr(attention, f"to_{projection}")
                    out_width, in_width = linear.weight.shape
                    down, up = torch.zeros(rank, in_width), torch.zeros(out_width, rank)
                else:
                    down, up, scale = found
                    # copies: the loaded tensors may be inference tensors, which autograd cannot save
                    down = down.detach().to("cpu", torch.float32).clone()
                    up = up.detach().to("cpu", torch.float32) * scale
                entries[f"{number}.to_{projection}_lora.down.weight"] = down
                entries[f"{number}.to_{projection}_lora.up.weight"] = up
    return entries
