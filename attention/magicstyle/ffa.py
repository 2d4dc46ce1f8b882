"""Feature Fusion Attention (MagicStyle, Algorithm 1 and Eq. 5).

    Q = α·Q_c + β·Q_cur,   K = [K_c; K_s],   V = [AdaIN(V_c, V_s); V_s]

Q_c, K_c, V_c, K_s, V_s are the layer's own projections of the hidden
states cached during inversion. Because to_q/to_k/to_v are linear and
bias-free, the patch hands the layer mixed *hidden states* instead:

    input   α·h_c + β·h_cur        → to_q gives α·Q_c + β·Q_cur
    context [h_c; h_s]             → to_k, to_v give [K_c; K_s], [V_c; V_s]

so ComfyUI projects with the weights it would use anyway (LoRA patches,
low-VRAM casting included), and the dispatcher processor only applies AdaIN
to the content half of V and attends through ComfyUI's fused attention:
no N×2N logits tensor is ever built.

With a mask (where to stylise), a query outside it attends as without FFA:
where the region covers part of a layer's grid (mask > 0.5 there), the layer
projects α·h_c + β·h_cur only at the queries inside and h_cur elsewhere, and
the context [h_c; h_s; h_cur]; the processor attends FFA's keys for the
queries inside and the current image's own keys for those outside.
"""

from __future__ import annotations

import torch

from ..shared.adain import adain_tokens
from ..shared.dispatch import Pass, acts_in
from ..shared.layer_table import BlockKey, layer_key
from ..shared.rows import sample_index
from ..shared.sigmas import SigmaRange, current_sigma
from ..shared.token_masks import region_on_grid
from .feature_bank import FeatureBank, StoredStates, TimestepOf, timestep_key

# extra_options key through which the input patch tells the processor how
# many of the context tokens are the content's.
CONTENT_TOKENS = "likeness_ffa_content_tokens"
# extra_options key: (queries,) booleans, the queries FFA acts on where the mask covers part of the grid.
FFA_REGION = "likeness_ffa_region"
ORDER = 50  # runs outside (before) identity patches that add keys
# Infinite-ID's identity stream predicts the same picture as its text stream: stylised in both, the
# blend of the two keeps the style. A face reference pass is read as the plain model reads it.
PASSES = frozenset({Pass.IMAGE, Pass.IDENTITY_STREAM})
PLACEMENTS = ("auto", "device", "cpu")
# "auto" moves the cache to the GPU for a run only when it takes at most this share of the memory
# left free once ComfyUI has loaded the model (the rest is the sampling's own working memory).
AUTO_SHARE_OF_FREE = 0.5


def fuse_values(v: torch.Tensor, content_tokens: int) -> torch.Tensor:
    """[AdaIN(V_c, V_s); V_s] from [V_c; V_s], AdaIN over tokens per channel."""
    content, style = v[:, :content_tokens], v[:, content_tokens:]
    return torch.cat([adain_tokens(content, style), style], dim=1)


def free_for_run(device) -> float:
    """Bytes free on ``device`` for a run's cache, as ComfyUI counts them once the model is loaded:
    its free memory less its own inference reserve."""
    import comfy.model_management

    return comfy.model_management.get_free_memory(device) - comfy.model_management.minimum_inference_memory()


def keep_on_device(placement: str, cache_bytes: int, free_bytes: float) -> bool:
    """Whether a run keeps the whole cache on the GPU (else it streams it layer by layer):
    "device" always, "cpu" never, "auto" when it takes at most AUTO_SHARE_OF_FREE of the memory
    free once the model is loaded (less ComfyUI's own inference reserve)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"cache_on={placement!r}: expected one of {', '.join(PLACEMENTS)}")
    return placement == "device" or (placement == "auto" and cache_bytes <= AUTO_SHARE_OF_FREE * max(free_bytes, 0))


class FeatureFusion:
    """The run-independent settings of one FFA patch and the feature lookup."""

    def __init__(self, content: FeatureBank, style: FeatureBank, *, style_index: int, alpha: float, beta: float,
                 temperature: float, layers: list[BlockKey], sigma_range: SigmaRange, model_sampling,
                 placement: str = "auto", mask: torch.Tensor | None = None) -> None:
        if style_index >= style.images:
            raise ValueError(f"style_index={style_index}: the style features hold {style.images} image(s)")
        if placement not in PLACEMENTS:
            raise ValueError(f"cache_on={placement!r}: expected one of {', '.join(PLACEMENTS)}")
        self.placement = placement
        self.mask = mask  # (H, W) where to stylise, any size; None = everywhere
        self._run: dict = {}  # this run's copies on the sampling device, if any (released by cleanup)
        self.content = content
        self.style = style
        self.style_index = style_index
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.layers = {tuple(k) for k in layers}
        self.sigma_range = sigma_range
        self.timestep_of = TimestepOf(model_sampling)

    def __deepcopy__(self, memo):
        # Held by patches inside model_options, which clone() deep-copies:
        # the banks are shared, never duplicated.
        return self

    def bytes_per_run(self) -> int:
        return self.content.nbytes() + self.style.nbytes()

    def _resident(self, device) -> tuple[dict, dict] | None:
        """Both banks' entries on ``device`` for this run, moved at the first call that needs them,
        when the placement says so (or, for "auto", when they fit); None: stream them per layer."""
        if device.type == "cpu":
            return None
        if "banks" not in self._run:
            free = 0.0 if self.placement != "auto" else free_for_run(device)
            wanted = keep_on_device(self.placement, self.bytes_per_run(), free)
            self._run["banks"] = None if not wanted else tuple(
                {key: stored.to(device, non_blocking=True) for key, stored in bank.features.items()}
                for bank in (self.content, self.style))
        return self._run["banks"]

    def release(self) -> None:
        self._run.clear()

    def region(self, extra_options: dict, queries: int, device) -> torch.Tensor | None:
        """(queries,) booleans: where FFA acts on this layer's grid; None: everywhere."""
        return region_on_grid(self.mask, extra_options, queries, device)

    def features_for(self, extra_options: dict, rows: int, device=None) -> tuple[StoredStates, StoredStates] | None:
        """(h_c, h_s) as stored, for the rows of this call (one image, or one per row), or None
        where FFA is off."""
        key = layer_key(extra_options)
        if key is None:
            return None
        sigma = current_sigma(extra_options)
        if key not in self.layers or sigma is None or not self.sigma_range.contains(sigma):
            return None
        timestep = self.timestep_of(sigma)
        h_c, h_s = self.content.get(timestep, key), self.style.get(timestep, key)
        resident = None if device is None else self._resident(device)
        if resident is not None and h_c is not None and h_s is not None:
            entry = (timestep_key(timestep), key)
            h_c, h_s = resident[0][entry], resident[1][entry]
        if h_c is None or h_s is None:
            which = "content" if h_c is None else "style"
            raise KeyError(f"no {which} features for timestep {timestep} at layer {key}: sample with the "
                           f"{self.content.steps} ddim_uniform steps the features were inverted with")
        images = sample_index(extra_options["cond_or_uncond"], rows)
        if h_c.images == 1:
            content_rows = h_c  # one content image for every row: expanded once converted
        elif max(images) < h_c.images:
            content_rows = h_c[images]
        else:
            raise ValueError(f"the content features hold {h_c.images} images, the latent batch "
                             f"{max(images) + 1}: invert every content image that is sampled")
        return content_rows, h_s[self.style_index:self.style_index + 1]


class FFAInputs:
    """attn1_patch: mixes the cached hidden states into what the layer projects."""

    def __init__(self, fusion: FeatureFusion) -> None:
        self.fusion = fusion

    passes = PASSES

    def __call__(self, n, context, value, extra_options):
        if not acts_in(self, extra_options):
            return n, context, value
        found = self.fusion.features_for(extra_options, n.shape[0], n.device)
        if found is None:
            return n, context, value
        h_c, h_s = (stored.states(n.device, n.dtype).expand(n.shape[0], -1, -1) for stored in found)
        if h_c.shape[1] != n.shape[1]:
            raise ValueError(f"the cached features have {h_c.shape[1]} tokens at this layer, the image "
                             f"{n.shape[1]}: sample at the size the features were inverted at")
        mixed = self.fusion.alpha * h_c + self.fusion.beta * n
        region = self.fusion.region(extra_options, n.shape[1], n.device)
        if region is None:
            kv = torch.cat([h_c, h_s], dim=1)
        elif not bool(region.any()):
            return n, context, value  # no query to stylise here: the layer as it is
        else:
            mixed = torch.where(region.view(1, -1, 1), mixed, n)
            kv = torch.cat([h_c, h_s, n], dim=1)
            extra_options[FFA_REGION] = region
        extra_options[CONTENT_TOKENS] = h_c.shape[1]
        return mixed, kv, kv


class FFAProcessor:
    """Dispatcher processor: AdaIN on the content values, temperature, fused attention."""

    order = ORDER
    passes = PASSES

    def __init__(self, fusion: FeatureFusion) -> None:
        self.fusion = fusion

    def cleanup(self) -> None:
        self.fusion.release()

    def __call__(self, q, k, v, extra_options, attend):
        content_tokens = extra_options.get(CONTENT_TOKENS)
        if content_tokens is None:
            return attend(q, k, v, extra_options)
        region = extra_options.get(FFA_REGION)
        plain = None
        if region is not None:
            # The last len(queries) keys are the current image's own: the layer without FFA.
            current = q.shape[1]
            plain = attend(q, k[:, -current:], v[:, -current:], extra_options)
            k, v = k[:, :-current], v[:, :-current]
        if self.fusion.temperature != 1.0:
            # StyleID's attention temperature: sharper (>1) or softer (<1) logits.
            q = q * self.fusion.temperature
        fused = attend(q, k, fuse_values(v, content_tokens), extra_options)
        return fused if plain is None else torch.where(region.view(1, -1, 1), fused, plain)

    def __deepcopy__(self, memo):
        return self


def _check_schedule(fusion: FeatureFusion):
    def outer_sample(executor, *args, **kwargs):
        latent_image = kwargs.get("latent_image", args[1] if len(args) > 1 else None)
        sigmas = kwargs.get("sigmas", args[3] if len(args) > 3 else None)
        if sigmas is not None:
            used = [float(s) for s in sigmas[:-1] if fusion.sigma_range.contains(float(s))]
            fusion.content.check_compatible(sigmas=used, what="content features")
            fusion.style.check_compatible(sigmas=used, what="style features")
        if latent_image is not None and latent_image.dim() == 4:
            fusion.content.check_compatible(latent_hw=tuple(latent_image.shape[-2:]), what="content features")
        return executor(*args, **kwargs)
    return outer_sample


def apply_ffa(model, fusion: FeatureFusion):
    """A clone of ``model`` with Feature Fusion Attention on ``fusion.layers``."""
    import comfy.patcher_extension

    from ..shared.dispatch import add_input_patch, patched_clone

    processor = FFAProcessor(fusion)
    patched = patched_clone(model, [("attn1", key, processor) for key in sorted(fusion.layers)])
    add_input_patch(patched, "attn1_patch", FFAInputs(fusion))
    # Fail before the first step, naming what differs, rather than mid-run.
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "likeness_ffa_schedule",
                                 _check_schedule(fusion))
    return patched
