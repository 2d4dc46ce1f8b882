"""Extra rows in the image's own model call: Face Fusion's face rows, Infinite-ID's identity-stream
rows. ComfyUI decides how many cond/uncond chunks one call holds from the model's
``memory_required``; a patch that adds rows to every call counts them there (for each step's
sizing and for the estimate made before the model is loaded), so ComfyUI splits cond and uncond
where the larger batch would not fit, and checks, by ComfyUI's own rule, whether a given call
with its rows fits before it adds them."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

ExtraRows = Callable[[int], int]  # rows a call of n image rows gains


class ExtraRowsMemory:
    """The model's ``memory_required`` with a patch's extra rows counted in every model call."""

    def __init__(self, original, extra_rows: ExtraRows, owner: str) -> None:
        self.original, self.extra_rows, self.owner = original, extra_rows, owner

    def __call__(self, input_shape, cond_shapes={}):
        rows = int(input_shape[0])
        return self.original([rows + self.extra_rows(rows), *input_shape[1:]], cond_shapes=cond_shapes)


@contextmanager
def rows_counted(base_model, owner: str, extra_rows: ExtraRows):
    """ComfyUI's model (BaseModel) whose ``memory_required`` counts ``owner``'s extra rows, for as
    long as ComfyUI sizes a call with it; whatever stood there before (another patch's count too,
    which stays counted) is restored."""
    current = base_model.memory_required
    if isinstance(current, ExtraRowsMemory) and current.owner == owner:
        yield current
        return
    had_own = "memory_required" in vars(base_model)
    memory = ExtraRowsMemory(current, extra_rows, owner)
    base_model.memory_required = memory
    try:
        yield memory
    finally:
        if had_own:
            base_model.memory_required = current
        else:
            del base_model.memory_required


def count_rows_in_estimate(owner: str, extra_rows: Callable[[object], ExtraRows]):
    """PREPARE_SAMPLING wrapper: the memory ComfyUI frees before loading the model counts the rows
    too. ``extra_rows(model_patcher)`` gives the count for that run's model."""
    def prepare(executor, model, noise_shape, conds, model_options=None):
        with rows_counted(model.model, owner, extra_rows(model)):
            return executor(model, noise_shape, conds, model_options=model_options)
    return prepare


def fits(memory: ExtraRowsMemory | None, x: torch.Tensor, extra_rows: int) -> bool:
    """ComfyUI's own rule for what one call may hold (samplers._calc_cond_batch), for the rows of
    this call plus the extra rows."""
    if memory is None:
        return True
    import comfy.model_management

    needed = memory.original([x.shape[0] + extra_rows, *x.shape[1:]])
    return needed * 1.5 < comfy.model_management.get_free_memory(x.device)


def per_row_inputs(kwargs: dict, rows: int) -> bool:
    """Whether a model call's extra keyword inputs hold a tensor per row (which extra rows would lack)."""
    return any(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows for v in kwargs.values())


def control_for_rows(control: dict | None, extend: Callable[[torch.Tensor], torch.Tensor]) -> dict | None:
    """ControlNet residuals with ``extend`` giving each the extra rows' part. New lists: the UNet
    pops them as it goes."""
    if control is None:
        return None
    return {name: [None if c is None else extend(c) for c in residuals] for name, residuals in control.items()}
