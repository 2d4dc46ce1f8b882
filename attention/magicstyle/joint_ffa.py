"""MagicStyle on a DiT: features captured in joint attention, Feature Fusion Attention there.

A Flux / SD3.5 block attends over [text; image] tokens jointly. Its image tokens' Q/K/V are what
the cache keeps here, as the block's attention receives them (after modulation, QK-norm and
RoPE, so content and style tokens keep the positions their own inversion gave them). FFA in a
joint block, for the image queries:

    Q = α·Q_c + β·Q_cur,   K = [K_txt; K_c; K_s],   V = [V_txt; AdaIN(V_c, V_s); V_s]

(K_txt, V_txt: this call's own text tokens; AdaIN per channel over the image tokens). Text
queries, and any tokens after the image (Flux Kontext's references), attend as without FFA.
On the UNet, FFA doubles every key of a self-attention, which leaves each key's share as it was
when style = content; in a joint block it doubles the image keys only, which would halve the
text's share of attention. ``keep_text_share`` (the default) counts the text keys twice as well
([K_txt; K_txt; K_c; K_s], the same as adding ln 2 to their logits), so that α = 1, β = 0,
style = content is the plain attention exactly; off, the keys are the formula above as written.
The keys are not projections of mixed hidden states as on the UNet (a DiT's Q/K pass through
QK-norm and RoPE, which are not linear), so Q, K, V are stored, not the block's input.
"""

from __future__ import annotations

import torch

from ..shared.adain import adain_tokens
from ..shared.rows import COND, rows_of
from ..shared.sigmas import current_sigma
from .feature_bank import PRECISIONS, FeatureCapture, StoredStates
from .ffa import ORDER, PASSES, FeatureFusion

QKV = 3  # Q, K and V of every image token are stored (the memory formula counts them)


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) ×3 → (B, N, 3·H·D): one stored tensor per image, block and step."""
    return torch.stack([q, k, v], dim=2).permute(0, 3, 2, 1, 4).flatten(2)


def unpack_qkv(states: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 3·H·D) → q, k, v, each (B, H, N, D)."""
    batch, tokens, width = states.shape
    split = states.view(batch, tokens, QKV, heads, width // (QKV * heads)).permute(2, 0, 3, 1, 4)
    return split[0], split[1], split[2]


def joint_ffa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: int, content: tuple, style: tuple, *,
              alpha: float, beta: float, temperature: float, attend, keep_text_share: bool = True) -> torch.Tensor:
    """FFA for the image queries q[:, :, text:text+N] of one joint call; ``content`` = (Q_c, K_c, V_c),
    ``style`` = (K_s, V_s), each (B or 1, H, N, D). Returns what ``attend`` returns for the whole
    sequence: text and trailing queries attend as without FFA."""
    q_c, k_c, v_c = content
    k_s, v_s = style
    tokens = q_c.shape[2]
    image = slice(text, text + tokens)
    batch = q.shape[0]
    grow = lambda t: t.expand(batch, *t.shape[1:])  # noqa: E731  (one content/style for every row)
    q_img = alpha * grow(q_c) + beta * q[:, :, image]
    copies = 2 if keep_text_share else 1
    keys = torch.cat([k[:, :, :text]] * copies + [grow(k_c), grow(k_s)], dim=2)
    values = torch.cat([v[:, :, :text]] * copies + [adain_tokens(grow(v_c), grow(v_s)), grow(v_s)], dim=2)
    if temperature != 1.0:
        q_img = q_img * temperature  # StyleID's attention temperature, as on the UNet
    fused = attend(q_img, keys, values)
    others = torch.cat([q[:, :, :text], q[:, :, text + tokens:]], dim=2)
    plain = attend(others, k, v)
    return torch.cat([plain[:, :text], fused, plain[:, text:]], dim=1)


class JointCapture(FeatureCapture):
    """A joint-attention processor that records the image tokens' Q/K/V of chosen blocks during an
    inversion (cond rows only: inversion runs at cfg 1); FeatureCapture's store, a DiT's capture."""

    order = 0
    passes = PASSES

    def __call__(self, q, k, v, call, attend):
        sigma = current_sigma(call.options)
        if call.key in self.layers and sigma is not None and self.timestep_of(sigma) in self.wanted:
            cond = rows_of(COND, call.options["cond_or_uncond"], q.shape[0])
            image = call.tokens.image_slice()
            if self.precision is None:
                self.precision = self._choose()
            states = pack_qkv(q[cond][:, :, image], k[cond][:, :, image], v[cond][:, :, image])
            self._entries[(self.timestep_of(sigma), call.key)] = StoredStates.store(
                states, self.precision, self.storage_device)
        return attend(q, k, v)


class JointFFAProcessor:
    """FFA in the chosen joint blocks, features looked up by the sampler's current timestep."""

    order = ORDER
    passes = PASSES

    def __init__(self, fusion: FeatureFusion, keep_text_share: bool = True) -> None:
        self.fusion = fusion
        self.keep_text_share = keep_text_share

    def cleanup(self) -> None:
        self.fusion.release()

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, call, attend):
        found = self.fusion.features_for(call.options, q.shape[0], q.device)
        if found is None:
            return attend(q, k, v)
        content, style = (unpack_qkv(stored.states(q.device, q.dtype), call.heads) for stored in found)
        if content[0].shape[2] != call.tokens.image:
            raise ValueError(f"the cached features have {content[0].shape[2]} image tokens at block "
                             f"{call.key}, the image {call.tokens.image}: sample at the size the features "
                             "were inverted at")
        f = self.fusion
        return joint_ffa(q, k, v, call.tokens.text, content, style[1:], alpha=f.alpha, beta=f.beta,
                         temperature=f.temperature, attend=attend, keep_text_share=self.keep_text_share)


def joint_cache_bytes(hidden: int, blocks: int, image_tokens: int, timesteps: int, images: int,
                      precision: str) -> int:
    """Exactly what a DiT bank of ``images`` images holds: Q, K, V of every image token (hidden
    wide each) per block and timestep (+ its fp32 scale at fp8)."""
    per_image_step = blocks * (image_tokens * QKV * hidden * PRECISIONS[precision].itemsize
                               + (4 if precision == "fp8" else 0))
    return timesteps * images * per_image_step


def dit_hidden(model) -> int:
    """The width of a DiT's tokens (Flux: hidden_size; MMDiT: its joint blocks' width)."""
    diffusion_model = model.get_model_object("diffusion_model")
    return int(getattr(diffusion_model, "hidden_size", 0) or diffusion_model.x_embedder.proj.out_channels)


def image_tokens(model, latent_hw: tuple[int, int]) -> int:
    patch = int(getattr(model.get_model_object("diffusion_model"), "patch_size", 2))
    return (-(-latent_hw[0] // patch)) * (-(-latent_hw[1] // patch))


def capture_clone(model, recorder: JointCapture):
    from ..shared.joint_attention import patched_joint_clone

    return patched_joint_clone(model, [recorder])


def apply_joint_ffa(model, fusion: FeatureFusion, keep_text_share: bool = True):
    """A clone of a DiT ``model`` with FFA in ``fusion.layers``' joint attention."""
    import comfy.patcher_extension

    from ..shared.joint_attention import patched_joint_clone
    from .ffa import _check_schedule

    patched = patched_joint_clone(model, [JointFFAProcessor(fusion, keep_text_share)])
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "likeness_ffa_schedule",
                                 _check_schedule(fusion))
    return patched

