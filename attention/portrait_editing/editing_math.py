"""Feature-preserving portrait editing (Chen et al.): the math of pair
generation (Eq. 2), mask-guided noise blending (Eq. 3) and editing masks.

The papers combine noise (ε) predictions; ComfyUI's guiders return denoised
(x0) ones, x0ᵢ = x − σ·εᵢ. The ε combination Σ wᵢ·εᵢ is therefore the x0
prediction x − σ·Σ wᵢ·εᵢ = Σ wᵢ·x0ᵢ + (1 − Σ wᵢ)·x (``eps_combination``). Where
the weights sum to 1 at every pixel the last term vanishes and combining x0
predictions with the same weights is exact: Eq. 3 (M + (1 − M), soft masks
too) and Eq. 1 (1 − s1 + (s1 − s2) + (s2 − s3) + s3 = 1 for any scales). Eq. 2's
weights (s'_d + s'_a on the left half, s'_d + s'_b on the right) sum to 1 only
for some settings, so it goes through ``eps_combination``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORMALISATIONS = ("min-max", "clamp-3x-mean")


def mask_to_latent(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A MASK ((H, W) or (B, H, W), any size) as (B or 1, 1, h, w) on the latent's grid."""
    mask = mask.reshape(-1, *mask.shape[-2:]).unsqueeze(1).to(like)
    return F.interpolate(mask, size=like.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)


def blend(target: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 3: target·M + source·(1 − M); the weights sum to 1, so on x0 predictions it is the
    ε blend exactly, soft masks included."""
    return target * mask + source * (1 - mask)


def half_masks(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M'_a (left half) and M'_b (right half) of a double-width canvas, (1, 1, h, w)."""
    width = like.shape[-1]
    if width % 2:
        raise ValueError(f"a pair canvas must have an even latent width, got {width} (image width {width * 8})")
    left = torch.zeros(1, 1, *like.shape[-2:], device=like.device, dtype=like.dtype)
    left[..., : width // 2] = 1
    return left, 1 - left


def eps_combination(x: torch.Tensor, weighted: list[tuple[torch.Tensor | float, torch.Tensor]]) -> torch.Tensor:
    """The x0 prediction of Σ wᵢ·εᵢ, given (wᵢ, x0ᵢ) pairs and the noisy input x:
    x − σ·Σ wᵢ·(x − x0ᵢ)/σ = Σ wᵢ·x0ᵢ + (1 − Σ wᵢ)·x (no division by σ)."""
    total = sum(weight for weight, _ in weighted)
    return sum(weight * denoised for weight, denoised in weighted) + (1 - total) * x


def pair_combination(x: torch.Tensor, shared: torch.Tensor, source: torch.Tensor, target: torch.Tensor,
                     s_d: float, s_a: float, s_b: float) -> torch.Tensor:
    """Eq. 2, ε̃ = s'_d·ε̃(p) + s'_a·M'_a⊙ε̃(p_a) + s'_b·M'_b⊙ε̃(p_b), as an x0 prediction from
    the three guided x0 predictions (any weights: they need not sum to 1)."""
    left, right = half_masks(shared)
    return eps_combination(x, [(s_d, shared), (s_a * left, source), (s_b * right, target)])


def gaussian_blur(image: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) maps (σ as OpenCV derives it from the size)."""
    if kernel_size <= 1:
        return image
    if kernel_size % 2 == 0:
        raise ValueError(f"blur={kernel_size}: expected an odd kernel size (1 = no blur)")
    sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8
    offsets = torch.arange(kernel_size, dtype=torch.float32, device=image.device) - kernel_size // 2
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(image.dtype)
    pad = kernel_size // 2
    out = F.conv2d(F.pad(image, (pad, pad, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, pad, pad), mode="replicate"), kernel.view(1, 1, -1, 1))


def normalise(difference: torch.Tensor, how: str) -> torch.Tensor:
    """(B, 1, H, W) difference map to 0..1, per image: min-max (the paper) or
    clamped at 3× its mean then divided by that (the released code)."""
    flat = difference.flatten(1)
    if how == "min-max":
        low, high = flat.min(1).values, flat.max(1).values
        return (difference - low.view(-1, 1, 1, 1)) / (high - low).clamp_min(1e-12).view(-1, 1, 1, 1)
    if how == "clamp-3x-mean":
        ceiling = (3 * flat.mean(1)).clamp_min(1e-12).view(-1, 1, 1, 1)
        return difference.clamp(max=ceiling) / ceiling
    raise ValueError(f"normalisation={how!r}: expected one of {', '.join(NORMALISATIONS)}")


def edit_mask(differences: torch.Tensor, *, normalisation: str, blur: int, threshold: float) -> torch.Tensor:
    """The editing mask from |ε(p_b) − ε(p_a)| per seed, (seeds, B, C, h, w):
    mean over seeds and channels, normalise, blur, threshold → (B, 1, h, w) of 0/1."""
    difference = differences.float().mean(dim=(0, 2)).unsqueeze(1)
    return (gaussian_blur(normalise(difference, normalisation), blur) > threshold).float()


def to_image_mask(mask: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) on the latent grid → a ComfyUI MASK (B, 8h, 8w)."""
    return F.interpolate(mask, size=(latent.shape[-2] * 8, latent.shape[-1] * 8), mode="nearest")[:, 0]


def noise_differences(model, latent: torch.Tensor, source: list, target: list, *, seeds: int, strength: float,
                      seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """|ε(p_b) − ε(p_a)| after one denoising step from the input noised to ``strength``,
    once per seed: (seeds, B, C, h, w), and the noises used (DiffEdit / the paper's Sec. 3.4)."""
    from ..shared.sigmas import model_sampling_of
    from ..shared.training_loop import denoised_predictions

    sampling = model_sampling_of(model)
    timestep = torch.tensor([strength * 999.0])
    sigma = sampling.sigma(timestep).float()
    clean = model.model.process_latent_in(latent.float())
    differences, noises = [], []
    for index in range(seeds):
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed + index))
        noisy = clean + noise * sigma.view(-1, 1, 1, 1)
        with torch.no_grad():
            # Both are prompts: index 1 (uncond in cond_or_uncond) stays empty.
            denoised_a, _, denoised_b = denoised_predictions(model, model, [source, None, target], noisy, sigma)
        # ε = (x − x0)/σ, so the ε difference is the x0 difference over σ.
        differences.append(((denoised_a - denoised_b) / sigma.to(denoised_a)).abs().cpu())
        noises.append(noise)
    return torch.stack(differences), noises
