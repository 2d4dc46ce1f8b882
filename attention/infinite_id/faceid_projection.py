"""FaceID-PlusV2's image projection (IP-Adapter's ProjModelFaceIdPlus): an ArcFace embedding and
CLIP ViT-H's penultimate hidden states → identity tokens, with V2's shortcut:

    x   = LayerNorm(MLP(id)).reshape(B, num_tokens, C)
    out = x + s_scale · Resampler(x, clip_hidden)

Module names follow the file's ``image_proj.`` keys (id_adapter.py reads and writes them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

HEAD_WIDTH = 64  # FaceID-PlusV2's perceiver heads are 64 wide (heads = C // 64)


@dataclass(frozen=True)
class ProjectionShape:
    """Every width of the projection, read off a file's tensors."""

    id_dim: int  # ArcFace embedding (512)
    hidden: int  # MLP hidden width (2 × id_dim)
    num_tokens: int
    width: int  # cross-attention dim: 768 SD1.5, 2048 SDXL
    clip_dim: int  # CLIP ViT-H hidden width (1280)
    depth: int  # resampler layers (4)
    inner: int  # attention width inside the resampler
    ff_inner: int  # feed-forward width inside the resampler


class PerceiverAttention(torch.nn.Module):
    """Latents attend over [image features; latents] (the Flamingo resampler's attention)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.heads = inner // HEAD_WIDTH if inner % HEAD_WIDTH == 0 else 1
        self.norm1 = torch.nn.LayerNorm(dim)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.to_q = torch.nn.Linear(dim, inner, bias=False)
        self.to_kv = torch.nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = torch.nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm1(features), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


def _feed_forward(dim: int, inner: int) -> torch.nn.Sequential:
    # Indices matter: the file names these layers .0, .1 and .3.
    return torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, inner, bias=False),
                               torch.nn.GELU(), torch.nn.Linear(inner, dim, bias=False))


class FacePerceiverResampler(torch.nn.Module):
    def __init__(self, shape: ProjectionShape) -> None:
        super().__init__()
        dim = shape.width
        self.proj_in = torch.nn.Linear(shape.clip_dim, dim)
        self.proj_out = torch.nn.Linear(dim, dim)
        self.norm_out = torch.nn.LayerNorm(dim)
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleList([PerceiverAttention(dim, shape.inner), _feed_forward(dim, shape.ff_inner)])
            for _ in range(shape.depth))

    def forward(self, latents: torch.Tensor, clip_hidden: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(clip_hidden)
        for attention, feed_forward in self.layers:
            latents = latents + attention(features, latents)
            latents = latents + feed_forward(latents)
        return self.norm_out(self.proj_out(latents))


class FaceIDPlusProjection(torch.nn.Module):
    """ArcFace + CLIP hidden states → identity tokens (FaceID-PlusV2, with its shortcut)."""

    def __init__(self, shape: ProjectionShape) -> None:
        super().__init__()
        self.shape = shape
        self.proj = torch.nn.Sequential(torch.nn.Linear(shape.id_dim, shape.hidden), torch.nn.GELU(),
                                        torch.nn.Linear(shape.hidden, shape.width * shape.num_tokens))
        self.norm = torch.nn.LayerNorm(shape.width)
        self.perceiver_resampler = FacePerceiverResampler(shape)

    def forward(self, face_embeds: torch.Tensor, clip_hidden: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        tokens = self.norm(self.proj(face_embeds).unflatten(-1, (self.shape.num_tokens, self.shape.width)))
        if scale == 0:  # the shortcut alone; skips a resampler whose output would be multiplied away
            return tokens
        return tokens + scale * self.perceiver_resampler(tokens, clip_hidden)
