"""Fine-tuning an MCDM on generated pairs (Chen et al., Sec. 3.3 and the released
training script): the whole 8-channel UNet and the embedding adapter learn to
turn the source image (spatial c_s + image tokens c_im) and the target prompt
into the target image.

As in the paper: a 4-channel SD1.5 UNet gets zero-initialised extra conv_in
channels (so step 0 is the base model); 5% of the steps use identity pairs
(Sec. 3.3 "we replace c_{p_b} with c_{p_a} and x_B with x_A", and the released
dataset.py: the source image is both input and target, under the source prompt
p_a); 20% drop conditions, in four 5% cases: the
spatial latent only, the image tokens only, the text only, or all three. The
nulls are the released training's (mcdm.TRAINED_NULL, which MCDM Conditioning
gives the negative by default): a dropped image is read by CLIP as a black
image and by the adapter's VAE path as a mid-grey one, a dropped c_s is that
grey image's latent, a dropped text the empty prompt. The validation losses
(no gradient) always see the full conditions.

The recipe (recipes.MCDM_TRAINING) is the released train.py's: AdamW with weight decay,
and the UNet's gradient norm clipped (the adapter's is not, as released).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..shared import recipes
from ..shared.atomic_files import atomic_path
from ..shared.recipes import Recipe
from ..shared.sigmas import model_sampling_of
from ..shared.training_loop import (Batching, Resume, World, diffusion_loss, leave_inference_mode, normal_copy,
                                    optimise, shared, unwrapped)
from . import mcdm

IDENTITY_PAIRS = 0.05
DROPOUT_CASES = ("spatial", "image", "text", "all")  # each 5%: 20% in all
DROPOUT_EACH = 0.05


@dataclass
class ImageInputs:
    latent: torch.Tensor  # model-space (×0.18215) VAE latent: c_s and the adapter's input
    clip_tokens: torch.Tensor  # B/32 last hidden state


@dataclass
class EditPair:
    source: ImageInputs  # x_A, the input image
    target_image: ImageInputs  # x_B, the edited image
    text: list  # CONDITIONING of the target prompt p_b
    source_text: list  # CONDITIONING of the source prompt p_a (identity pairs)

    @property
    def target(self) -> torch.Tensor:
        return self.target_image.latent


@dataclass
class Null:
    """What dropout puts in place of the input image: the null image's adapter inputs, and the
    dropped c_s (None: zeros). Built by mcdm.null_inputs, as MCDM Conditioning builds its negative."""

    image: ImageInputs
    spatial: torch.Tensor | None


@dataclass
class Draw:
    """What one training step shows the model: the input image (adapter and c_s), the text,
    and the latent it learns to denoise."""

    image: ImageInputs  # read by the adapter (the null image when the image is dropped)
    spatial: torch.Tensor | None  # c_s (the null's when dropped); None = zeros
    text: list
    target: torch.Tensor


def draw_of(pair: EditPair, identity: bool, dropped: str | None, *, empty_text: list, null: Null) -> Draw:
    """An identity pair is x_A → x_A under p_a; otherwise x_A → x_B under p_b. Dropout then
    replaces the image tokens' input, c_s and/or the text, whichever pair was drawn."""
    target, text = (pair.source.latent, pair.source_text) if identity else (pair.target, pair.text)
    return Draw(image=null.image if dropped in ("image", "all") else pair.source,
                spatial=null.spatial if dropped in ("spatial", "all") else pair.source.latent,
                text=empty_text if dropped in ("text", "all") else text,
                target=target)


def expanded_unet(model) -> mcdm.UNetFile:
    """A float32 copy of the model's UNet with an 8-channel conv_in (extra channels zero)."""
    weights = {k: v.detach().float().cpu().clone() for k, v in model.model.diffusion_model.state_dict().items()}
    conv_in = weights["input_blocks.0.0.weight"]
    if conv_in.shape[1] == 4:
        weights["input_blocks.0.0.weight"] = torch.cat([conv_in, torch.zeros_like(conv_in)], dim=1)
    return mcdm.read_unet(weights)


def draw_case(generator: torch.Generator) -> tuple[bool, str | None]:
    """(identity pair?, dropped condition or None) for one training step."""
    identity = float(torch.rand(1, generator=generator)) < IDENTITY_PAIRS
    draw = float(torch.rand(1, generator=generator))
    index = int(draw // DROPOUT_EACH)
    return identity, DROPOUT_CASES[index] if index < len(DROPOUT_CASES) else None


class NormalCopies(Sequence):
    """``pairs`` (a list, or a sequence that reads and encodes each pair when first asked, as
    jobs/train.py's is) as copies autograd can use, each made once, when first drawn."""

    def __init__(self, pairs: Sequence):
        self.pairs, self.copies = pairs, {}

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        if index not in self.copies:
            self.copies[index] = normal_copy(self.pairs[index])
        return self.copies[index]


def train_mcdm(model, adapter: mcdm.EmbeddingAdapter, pairs: Sequence[EditPair], *, empty_text: list, null: Null,
               steps: int, seed: int, recipe: Recipe = recipes.MCDM_TRAINING,
               on_step: Callable[[int, float], None] | None = None, batching: Batching = Batching(),
               world: World = World(), resume: Resume | None = None, on_checkpoint=None,
               validation: int | None = None):
    """(trained ModelPatcher, trained adapter, validation loss before, after). ``model`` and
    ``adapter`` are copied, never changed. ``on_step`` may raise to interrupt. Under torchrun
    (``world``) the UNet and adapter train as DistributedDataParallel; ``on_checkpoint(steps_done,
    unet, adapter, optimizer)`` sees the plain modules after every step (see training.optimise)."""
    import comfy.model_management

    with torch.inference_mode(False), torch.enable_grad():
        trained = mcdm.build_model(expanded_unet(model), dtype=torch.float32)
        comfy.model_management.load_models_gpu([trained])
        device = trained.load_device
        unet = trained.model.diffusion_model
        leave_inference_mode(unet)
        for parameter in unet.parameters():
            parameter.requires_grad_(True)
        trained_adapter = mcdm.EmbeddingAdapter(adapter.vae2clip.out_features, adapter.vae2clip.in_features,
                                                adapter.image_tokens)
        trained_adapter.load_state_dict({k: v.detach().float().clone() for k, v in adapter.state_dict().items()})
        trained_adapter = trained_adapter.to(device).requires_grad_(True)
        pairs = NormalCopies(pairs)
        empty_text, null = normal_copy(empty_text), normal_copy(null)
        shared_unet, shared_adapter = shared(unet, world), shared(trained_adapter, world)
        trained.model.diffusion_model = shared_unet  # what ComfyUI's apply_model calls

        def loss_of(pair: EditPair, sigma: torch.Tensor, noise: torch.Tensor, generator) -> torch.Tensor:
            identity, dropped = draw_case(generator) if generator is not None else (False, None)
            draw = draw_of(pair, identity, dropped, empty_text=empty_text, null=null)
            tokens = shared_adapter(draw.image.clip_tokens.to(device), draw.image.latent.to(device))
            cond = mcdm.with_image(draw.text, tokens, draw.spatial)
            return diffusion_loss(trained, trained, draw.target, cond, sigma.to(device), noise.to(device))

        checkpoint = None
        if on_checkpoint is not None:
            def checkpoint(done: int, optimizer) -> None:
                on_checkpoint(done, unet, trained_adapter, optimizer)

        parameters = [*unet.parameters(), *trained_adapter.parameters()]
        try:
            before, after = optimise(
                pairs, loss_of, parameters, model_sampling=model_sampling_of(trained), steps=steps,
                recipe=recipe, seed=seed, on_step=on_step,
                synced=[m for m in (shared_unet, shared_adapter) if m is not unet and m is not trained_adapter],
                batching=batching, world=world, device=device, resume=resume, on_checkpoint=checkpoint,
                validation=validation, clipped=list(unet.parameters()))
        finally:
            trained.model.diffusion_model = unwrapped(shared_unet)
        unet.requires_grad_(False)
        trained_adapter.requires_grad_(False)
    return trained, trained_adapter.cpu().eval(), before, after


def save(model, adapter: mcdm.EmbeddingAdapter, unet_path, adapter_path, metadata: dict) -> None:
    """The UNet in ComfyUI's LDM layout and the adapter in the released four-key layout."""
    save_weights(mcdm.model_unet_weights(model), adapter.state_dict(), unet_path, adapter_path, metadata)


def save_weights(unet: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], unet_path, adapter_path,
                 metadata: dict) -> None:
    """``save`` from state dicts (LDM UNet keys; the adapter's four keys): what checkpoints write."""
    from safetensors.torch import save_file

    text = {k: str(v) for k, v in metadata.items()}
    # The adapter first: the loader lists the UNet file, so a pair is only offered once both are whole.
    with atomic_path(adapter_path) as partial:
        save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()}, str(partial),
                  metadata={**text, "likeness": "mcdm_adapter"})
    with atomic_path(unet_path) as partial:
        save_file({k: v.detach().cpu().contiguous() for k, v in unet.items()}, str(partial),
                  metadata={**text, "likeness": "mcdm_unet"})
