"""Another pack's DIFFUSION_MODEL wrapper, written here for the tests: it hands the model call a
keyword input with a value per row, as video and regional packs do (the UNet ignores a name it
does not know), which extra rows beside the batch would lack."""

from __future__ import annotations

import torch


def with_a_per_row_input(model):
    """A clone of ``model`` whose model calls carry ``another_packs_rows``, one value per row."""
    import comfy.patcher_extension

    def wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        return executor(x, timesteps, context, y, control, transformer_options,
                        another_packs_rows=torch.arange(x.shape[0]), **kwargs)

    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "another_pack", wrapper)
    return patched
