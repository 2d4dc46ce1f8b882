"""The paper-scale arithmetic of the README's "At scale": the cost of one generated pair and of one
MCDM training step on a full-size (random) SD1.5 UNet, measured in one run on whatever device
ComfyUI picks, and their ratio — which, with the paper's own A100 figure for training, gives the
GPU-hours of 69,900 pairs and 200,000 steps (tests/tools/benchmark.py --scale)."""

from __future__ import annotations

import time

import torch

PAPER_PAIRS, PAPER_STEPS = 69_900, 200_000
PAPER_A100_SECONDS_PER_STEP = 3 * 24 * 3600 / PAPER_STEPS  # "200,000 steps ... approximately 3 days on a single A100"
PAIR_STEPS = 20  # the supplement: T = 20, 512x512 per side
PAIR_ROWS = 4  # Eq. 2 with CFG: shared, negative, source, target prompts, one batch per step
TRAIN_BATCH = 4  # the supplement's batch size


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(call) -> float:
    _sync()
    start = time.perf_counter()
    call()
    _sync()
    return time.perf_counter() - start


def pair_step_seconds(model_patcher) -> float:
    """One sampling step of a pair: the UNet on the 1024x512 canvas for the four prompts at once
    (ComfyUI's calc_cond_batch batches them when memory allows)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model_patcher])
    unet = model_patcher.model.diffusion_model
    device, dtype = model_patcher.load_device, model_patcher.model.get_dtype()
    x = torch.randn(PAIR_ROWS, 4, 64, 128, device=device, dtype=dtype)
    context = torch.randn(PAIR_ROWS, 77, 768, device=device, dtype=dtype)
    timesteps = torch.full((PAIR_ROWS,), 500.0, device=device)
    with torch.inference_mode():
        unet(x[:1, :, :16, :16], timesteps=timesteps[:1], context=context[:1])  # first-call setup, not timed
        return _timed(lambda: unet(x, timesteps=timesteps, context=context))


def train_step_seconds(model_patcher) -> float:
    """One optimiser step's forward and backward of the 8-channel UNet in float32 (as the trainer
    holds it) at 512x512, for one example; the supplement's batch of 4 costs four of these."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model_patcher])
    unet = model_patcher.model.diffusion_model
    device = model_patcher.load_device
    original = next(unet.parameters()).dtype
    unet.float().requires_grad_(True)
    try:
        x = torch.randn(1, 8, 64, 64, device=device)
        context = torch.randn(1, 77, 768, device=device)
        timesteps = torch.full((1,), 500.0, device=device)

        def step() -> None:
            loss = unet(x, timesteps=timesteps, context=context).float().square().mean()
            loss.backward()
            unet.zero_grad(set_to_none=True)

        return _timed(step)
    finally:
        unet.requires_grad_(False).to(original)


def paper_scale(pair_model, train_model) -> dict:
    step = pair_step_seconds(pair_model)
    example = train_step_seconds(train_model)
    pair, train = PAIR_STEPS * step, TRAIN_BATCH * example
    ratio = pair / train
    a100_pair = ratio * PAPER_A100_SECONDS_PER_STEP
    return {
        "device": str(pair_model.load_device),
        "pair_seconds": round(pair, 2), "train_step_seconds_batch4": round(train, 2),
        "pair_over_train_step": round(ratio, 3),
        "a100_seconds_per_train_step_paper": round(PAPER_A100_SECONDS_PER_STEP, 3),
        "a100_seconds_per_pair_estimate": round(a100_pair, 2),
        "a100_hours_69900_pairs_estimate": round(PAPER_PAIRS * a100_pair / 3600, 1),
        "a100_hours_200k_steps_paper": round(PAPER_STEPS * PAPER_A100_SECONDS_PER_STEP / 3600, 1),
    }
