"""Which batch rows are cond and which are uncond.

ComfyUI batches the conditionings of one call in chunks of equal size and
lists, in ``cond_or_uncond``, each chunk's index in the guider's list of
conditionings: 0 the positive, 1 the negative (uncond), and 2, 3, ... the
further prompts of guiders with more terms (pair generation, the MCDM's
rows), which are prompts too. The order is not fixed, cond and uncond may
come in separate calls, and at cfg 1 the uncond pass is skipped, so rows are
never found by halving the batch.
"""

from __future__ import annotations

import torch

COND = 0
UNCOND = 1


def rows_per_chunk(cond_or_uncond: list[int], batch: int) -> int:
    """Rows each entry of ``cond_or_uncond`` stands for in a batch of ``batch``."""
    chunks = len(cond_or_uncond)
    if chunks == 0 or batch % chunks:
        raise ValueError(f"a batch of {batch} rows cannot be split into {chunks} cond/uncond chunks "
                         f"(cond_or_uncond={cond_or_uncond})")
    return batch // chunks


def row_kinds(cond_or_uncond: list[int], batch: int) -> list[int]:
    """The kind (COND or UNCOND) of every row, in batch order."""
    per_chunk = rows_per_chunk(cond_or_uncond, batch)
    return [UNCOND if index == UNCOND else COND for index in cond_or_uncond for _ in range(per_chunk)]


def rows_of(kind: int, cond_or_uncond: list[int], batch: int) -> list[int]:
    """Indices of the rows of one kind."""
    return [row for row, row_kind in enumerate(row_kinds(cond_or_uncond, batch)) if row_kind == kind]


def row_mask(kind: int, cond_or_uncond: list[int], batch: int, device: torch.device | None = None) -> torch.Tensor:
    """A boolean tensor of shape (batch,), True on the rows of ``kind``."""
    kinds = torch.tensor(row_kinds(cond_or_uncond, batch), device=device)
    return kinds == kind


def sample_index(cond_or_uncond: list[int], batch: int) -> list[int]:
    """For each row, which image of the user's batch it belongs to.

    Within a chunk, rows follow the latent batch, so a per-image tensor
    (one reference per image, say) is indexed with this to match the rows.
    """
    per_chunk = rows_per_chunk(cond_or_uncond, batch)
    return [row % per_chunk for row in range(batch)]
