"""What Likeness' trainers share: the diffusion loss through a patched model,
run the way ComfyUI's samplers run it, on weights autograd can use; and the
optimisation loop, which runs in one process (the trainer nodes) or in many
under torchrun (jobs/train.py): DistributedDataParallel, gradient accumulation,
mixed precision where the device has it, checkpoints and resume.

Every random draw of a step (which example, sigma, noise, and what the trainer
draws from the generator it is given) comes from a generator seeded by (seed,
step, position in the step's global batch), so N processes with a local batch
of b compute exactly the examples one process with a batch of N·b computes,
and a resumed run draws what the uninterrupted one would have."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from typing import Callable, Sequence

import torch

from .recipes import Recipe


def normal_copy(value):
    """Copies made outside inference mode: tensors the server made under
    torch.inference_mode() cannot take part in a backward pass."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: normal_copy(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, dict):
        return {k: normal_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(normal_copy(v) for v in value)
    return value


def leave_inference_mode(module: torch.nn.Module) -> None:
    """Weights loaded while the server ran under torch.inference_mode() are
    inference tensors, which autograd refuses to save for a backward pass.
    They are swapped for normal tensors of the same values, as ComfyUI's own
    weight patching swaps parameters; the model computes exactly as before."""
    for layer in module.modules():
        for name, param in list(layer._parameters.items()):
            if param is not None and param.is_inference():
                layer._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
        for name, buffer in list(layer._buffers.items()):
            if buffer is not None and buffer.is_inference():
                layer._buffers[name] = buffer.clone()


def denoised_predictions(base_model, patched, conds: list[list], noisy: torch.Tensor,
                         sigma: torch.Tensor) -> list[torch.Tensor]:
    """x0 predictions of ``patched`` (a clone of ``base_model``, or itself) for each
    CONDITIONING, computed the way ComfyUI's samplers compute them. A row's index in
    ``conds`` is its ``cond_or_uncond``: 1 is the uncond; None entries are skipped."""
    import comfy.patcher_extension
    import comfy.sampler_helpers
    import comfy.samplers

    device = base_model.load_device
    options = comfy.patcher_extension.copy_nested_dicts(patched.model_options)
    options["transformer_options"]["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patched.wrappers)
    noisy = noisy.to(device)
    # Encode each conditioning the way samplers do (cross-attention context, SDXL's pooled/size vector).
    named = {f"c{i}": comfy.sampler_helpers.convert_cond(cond) for i, cond in enumerate(conds) if cond is not None}
    processed = comfy.samplers.process_conds(base_model.model, noisy, named, device, latent_image=noisy)
    patched.pre_run()  # what a sampler does before calling the model: makes it the current patcher
    try:
        return comfy.samplers.calc_cond_batch(base_model.model, [processed.get(f"c{i}") for i in range(len(conds))],
                                              noisy, sigma.to(device), options)
    finally:
        patched.cleanup()


def diffusion_loss(base_model, patched, target: torch.Tensor, cond: list, sigma: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
    """‖ε − ε_θ(x_σ, σ, c)‖² (Face Fusion's objective; Infinite-ID Eq. 3) for one
    model-space latent, through ``patched`` (a clone of ``base_model``)."""
    device = base_model.load_device
    noisy = target.to(device) + noise * sigma.view(-1, 1, 1, 1)
    (denoised,) = denoised_predictions(base_model, patched, [cond], noisy, sigma)
    predicted_noise = (noisy - denoised) / sigma.view(-1, 1, 1, 1)
    return torch.nn.functional.mse_loss(predicted_noise.float(), noise.float())


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among torchrun's: rank 0 of 1 outside torchrun."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_environment(device: torch.device | None = None) -> World:
    """torchrun's RANK, WORLD_SIZE, LOCAL_RANK (multi-node too: torchrun sets them per node),
    with the default process group started on first call: nccl on CUDA, gloo otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    world = World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))
    if world.distributed and not torch.distributed.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend)
    return world


class SharedModule(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel that still answers for the module it wraps: ComfyUI calls
    ``model.diffusion_model(...)`` and also reads attributes such as ``.dtype`` from it."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def shared(module: torch.nn.Module, world: World) -> torch.nn.Module:
    """``module`` itself in one process; under torchrun a DDP wrapper that averages its
    gradients over the processes (its weights start as rank 0's)."""
    if not world.distributed:
        return module
    import warnings

    device = next(module.parameters()).device
    # broadcast_buffers off: buffers never train here, and a validation forward on one rank
    # must not wait for the others (newer torch calls the flag deprecated but keeps its meaning).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return SharedModule(module, device_ids=[device.index] if device.type == "cuda" else None,
                            broadcast_buffers=False)


def unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def mixed_precision(device: torch.device):
    """bfloat16 autocast where the device computes it natively (CUDA with bf16), otherwise
    full float32 (CPU): the weights and the optimiser stay float32 either way."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def draw_generator(seed: int, step: int, position: int) -> torch.Generator:
    """The generator of one (step, position): independent of how positions are spread over
    processes and micro-steps. Step -1 holds the validation draws."""
    digest = hashlib.sha256(f"likeness-train:{seed}:{step}:{position}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclasses.dataclass(frozen=True)
class Batching:
    """``batch`` examples per process per micro-step, ``accumulate`` micro-steps per optimiser
    step: a step sees world size × batch × accumulate examples, and averages their losses."""

    batch: int = 1
    accumulate: int = 1

    def __post_init__(self):
        for name in ("batch", "accumulate"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is not usable; expected 1 or more")


@dataclasses.dataclass
class Resume:
    """Where a checkpoint left off: the next step and the optimiser's state (the trained
    weights are loaded by the caller)."""

    step: int
    optimizer: dict


def positions(step_batching: Batching, world: World) -> list[int]:
    """This process's positions in a step's global batch, micro-step by micro-step:
    micro-step m, process r, local index i is m·(world·batch) + r·batch + i."""
    per_micro = world.size * step_batching.batch
    return [micro * per_micro + world.rank * step_batching.batch + i
            for micro in range(step_batching.accumulate) for i in range(step_batching.batch)]


def optimise(examples: Sequence, loss_of, parameters: list[torch.nn.Parameter], *, model_sampling, steps: int,
             recipe: Recipe, seed: int, on_step: Callable[[int, float], None] | None = None,
             synced: Sequence[torch.nn.Module] = (), batching: Batching = Batching(), world: World = World(),
             device: torch.device | None = None, resume: Resume | None = None,
             on_checkpoint: Callable[[int, torch.optim.Optimizer], None] | None = None,
             validation: int | None = None, clipped: Sequence[torch.nn.Parameter] | None = None
             ) -> tuple[float, float]:
    """AdamW over ``parameters`` with ``recipe``'s learning rate and weight decay, the step's
    gradient (the whole global batch's, after accumulation and averaging over processes) clipped
    to ``recipe.max_grad_norm`` over ``clipped`` (all parameters when None), on
    ``loss_of(example, sigma, noise, generator)``; each example
    of a step is a random example, timestep and noise from ``draw_generator(seed, step,
    position)``, and ``generator`` is that same generator for the trainer's own draws (None
    for the validation set: full conditions). Returns the mean loss of a fixed validation set
    (the first ``validation`` examples, all when None; one sigma and noise each) before and after.

    ``synced``: the DDP-wrapped modules (see ``shared``), kept from averaging gradients on all
    but the last backward of a step. ``on_step(step, loss)`` gets the step's mean loss over
    all processes and may raise to interrupt (ComfyUI's interrupt). ``on_checkpoint(steps_done,
    optimizer)`` runs after every step. ``resume`` starts at its step with its optimiser state.
    Call inside ``torch.inference_mode(False)`` with grad enabled."""
    count = len(examples) if validation is None else min(validation, len(examples))
    validation_set = []
    for index in range(count):
        generator = draw_generator(seed, -1, index)
        example = examples[index]
        sigma = model_sampling.sigma(torch.randint(100, 900, (1,), generator=generator).float())
        validation_set.append((example, sigma, torch.randn(example.target.shape, generator=generator)))
    optimizer = torch.optim.AdamW(parameters, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
    precision = mixed_precision(device) if device is not None else contextlib.nullcontext()

    def validation_loss() -> float:
        with torch.no_grad(), precision:
            return float(torch.stack([loss_of(e, s, n, None).float() for e, s, n in validation_set]).mean())

    before = validation_loss() if validation_set else float("nan")
    mine = positions(batching, world)
    for step in range(0 if resume is None else resume.step, steps):
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for index, position in enumerate(mine):
            generator = draw_generator(seed, step, position)
            example = examples[int(torch.randint(len(examples), (1,), generator=generator))]
            sigma = model_sampling.sigma(torch.randint(0, 1000, (1,), generator=generator).float())
            noise = torch.randn(example.target.shape, generator=generator)
            last = index == len(mine) - 1
            with contextlib.ExitStack() as stack:
                if not last:  # gradients are averaged over processes once per step, on its last backward
                    for module in synced:
                        stack.enter_context(module.no_sync())
                with precision:
                    loss = loss_of(example, sigma, noise, generator).float() / len(mine)
                loss.backward()
            total += loss.detach().cpu()
        if recipe.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters if clipped is None else clipped, recipe.max_grad_norm)
        optimizer.step()
        if world.distributed:  # the step's loss over the whole global batch, for progress
            reduced = total.to(device if device is not None and device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(reduced)
            total = reduced.cpu() / world.size
        if on_step is not None:
            on_step(step, float(total))
        if on_checkpoint is not None:
            on_checkpoint(step + 1, optimizer)
    return before, validation_loss() if validation_set else float("nan")
