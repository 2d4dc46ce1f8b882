"""What Likeness' trainers share: the diffusion loss through a patched model,
run the way ComfyUI's samplers run it, on weights autograd can use."""

from __future__ import annotations

import dataclasses

import torch


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


def optimise(examples: list, loss_of, parameters: list[torch.nn.Parameter], *, model_sampling, steps: int,
             learning_rate: float, seed: int, on_step=None) -> tuple[float, float]:
    """AdamW over ``parameters`` on ``loss_of(example, sigma, noise)``; each step takes
    a random example, timestep and noise. Returns the loss of a fixed validation
    set (one sigma and noise per example, drawn first) before and after.

    Call inside ``torch.inference_mode(False)`` with grad enabled. ``on_step(step,
    loss)`` may raise to interrupt (ComfyUI's interrupt)."""
    generator = torch.Generator().manual_seed(seed)
    validation = [(example, model_sampling.sigma(torch.randint(100, 900, (1,), generator=generator).float()),
                   torch.randn(example.target.shape, generator=generator)) for example in examples]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)

    def validation_loss() -> float:
        with torch.no_grad():
            return float(torch.stack([loss_of(e, s, n) for e, s, n in validation]).mean())

    before = validation_loss()
    for step in range(steps):
        example = examples[int(torch.randint(len(examples), (1,), generator=generator))]
        sigma = model_sampling.sigma(torch.randint(0, 1000, (1,), generator=generator).float())
        loss = loss_of(example, sigma, torch.randn(example.target.shape, generator=generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step, loss.item())
    return before, validation_loss()
