"""The papers' metrics as plain tensor math."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` with every row of ``b``, in float32."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


# How a score is reported: the papers print cosines as they are, ×100, or as a distance 1 − cos.
SCALES = {"cosine": (1.0, 0.0), "100 x cosine": (100.0, 0.0), "1 - cosine": (-1.0, 1.0)}


def scaled(cosines: torch.Tensor, scale: str) -> torch.Tensor:
    """``cosines`` as ``scale`` (a SCALES key) reports them."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} cannot be used: expected one of {', '.join(SCALES)}")
    factor, offset = SCALES[scale]
    return cosines * factor + offset


def per_image(cosines: torch.Tensor, paired: bool) -> torch.Tensor:
    """(N,) from an (N, R) cosine matrix of N images against R references: image i against
    reference i (``paired``: the diagonal, R = N), else the mean over every reference."""
    if paired:
        if cosines.shape[0] != cosines.shape[1]:
            raise ValueError(f"{cosines.shape[0]} image(s) and {cosines.shape[1]} reference(s) cannot be paired: "
                             "one reference per image is needed")
        return cosines.diagonal()
    return cosines.mean(1)
