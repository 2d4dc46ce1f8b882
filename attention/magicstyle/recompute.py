"""MagicStyle's ``recompute`` mode: keep the inverted latents, not the features.

A Flux image at 1024² has 4,096 image tokens of width 3,072 in 57 blocks: its Q/K/V for every
block and step are hundreds of GB. What the inversion fed the model at each step (the latent at
that sigma, a few MB) is enough: run it again beside the image, in the same batch, and the content
and style rows' Q/K/V in each block are the features the cache would have held (the same model on
the same input, conditioning and sigma), used as they are computed and dropped with the block.

    inversion:  TrajectoryRecorder (APPLY_MODEL wrapper) keeps x at every sigma the forward visits
    sampling:   rows_wrapper (APPLY_MODEL) appends [content rows; style row] at the step's sigma
                with the inversion's conditioning; the FFA processor fuses the image rows from the
                extra rows' Q/K/V in the same attention call; the extra rows attend as the plain
                model (they are the inversion's own forward), and are cut off the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..shared.rows import COND
from .feature_bank import TimestepOf, timestep_key
from .ffa import ORDER, PASSES

RECOMPUTE_ROWS = "likeness_ffa_recompute_rows"  # transformer_options key: RecomputeRows of this call


@dataclass
class Trajectory:
    """What recompute keeps: the latent the inversion fed the model at each timestep (model space),
    and the conditioning it fed with (one row)."""

    latents: dict[float, torch.Tensor] = field(default_factory=dict)  # timestep key → (images, C, H, W)
    context: torch.Tensor | None = None  # (1, tokens, width)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-row model inputs (pooled y, guidance)

    def nbytes(self) -> int:
        tensors = [*self.latents.values(), *self.extras.values()] + ([] if self.context is None else [self.context])
        return sum(t.numel() * t.element_size() for t in tensors)

    def select(self, start: int, length: int) -> "Trajectory":
        return Trajectory({k: v[start:start + length] for k, v in self.latents.items()}, self.context, self.extras)

    @property
    def images(self) -> int:
        return next(iter(self.latents.values())).shape[0]


class TrajectoryRecorder:
    """APPLY_MODEL wrapper for an inversion: keeps x (and the conditioning) at the wanted timesteps."""

    def __init__(self, model_sampling, wanted: list) -> None:
        self.timestep_of = TimestepOf(model_sampling)
        self.wanted = {timestep_key(t) for t in wanted}
        self.trajectory = Trajectory()

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                 **kwargs):
        timestep = self.timestep_of(float(t.flatten()[0]))
        if timestep in self.wanted:
            self.trajectory.latents[timestep] = x.detach().cpu().clone()
            if self.trajectory.context is None and c_crossattn is not None:
                self.trajectory.context = c_crossattn[:1].detach().cpu().clone()
                self.trajectory.extras = {name: value[:1].detach().cpu().clone() for name, value in kwargs.items()
                                          if torch.is_tensor(value) and value.shape[:1] == x.shape[:1]}
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def __deepcopy__(self, memo):
        return self


@dataclass(frozen=True)
class RecomputeRows:
    """The rows of a recompute call: the sampler's ``image`` rows first, then ``content`` rows, then
    the style row (repeated where whole cond/uncond chunks need more rows). ``chunks`` is the image
    rows' own cond_or_uncond (the call's lists the extra rows too)."""

    image: int
    content: int
    chunks: tuple[int, ...]

    @property
    def style(self) -> int:
        """The style row's index."""
        return self.image + self.content


def rows_wrapper(content: Trajectory, style: Trajectory, style_index: int, sigma_range, model_sampling):
    """APPLY_MODEL wrapper: the content and style latents at this step's sigma in the same batch."""
    timestep_of = TimestepOf(model_sampling)

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = float(t.flatten()[0])
        timestep = timestep_of(sigma)
        if not sigma_range.contains(sigma) or timestep not in content.latents or c_crossattn is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if control is not None:
            raise ValueError("FFA in recompute mode runs the content and style beside the image, where a ControlNet's "
                             "residuals (made for the image rows) do not fit: use the cache mode with a ControlNet")
        if timestep not in style.latents:
            raise KeyError(f"the style was inverted without the timestep {timestep}: invert both with the same steps")
        style_row = style.latents[timestep][style_index:style_index + 1]
        rows = torch.cat([content.latents[timestep], style_row])
        content_rows = rows.shape[0] - 1
        chunks = list(transformer_options.get("cond_or_uncond") or [COND])
        options = dict(transformer_options)
        if x.shape[0] % len(chunks) == 0:
            # The extra rows as whole chunks of positive rows (the inversion ran them as prompts), so
            # that other packs that split the batch by chunk (IPAdapter's cond and uncond image
            # embeds) still find the image's rows where they are.
            per_chunk = x.shape[0] // len(chunks)
            rows = torch.cat([rows, style_row.expand((-rows.shape[0]) % per_chunk, *style_row.shape[1:])])
            options["cond_or_uncond"] = chunks + [COND] * (rows.shape[0] // per_chunk)
        extra = rows.shape[0]
        if content.context.shape[1:] != c_crossattn.shape[1:]:
            raise ValueError(f"recompute runs the content and style with their inversion's prompt beside the image: "
                             f"it has {content.context.shape[1]} text tokens, this sampler's {c_crossattn.shape[1]} "
                             "(use prompts of the same token count, or the cache mode)")
        grow = lambda stored, like: stored.to(like.device, like.dtype).expand(extra, *stored.shape[1:])  # noqa: E731
        batched = {}
        for name, value in kwargs.items():
            if torch.is_tensor(value) and value.shape[:1] == x.shape[:1]:
                if name not in content.extras:
                    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
                value = torch.cat([value, grow(content.extras[name], value)])
            batched[name] = value
        options[RECOMPUTE_ROWS] = RecomputeRows(x.shape[0], content_rows, tuple(chunks))
        out = executor(torch.cat([x, rows.to(x.device, x.dtype)]), torch.cat([t, t[:1].expand(extra)]),
                       None if c_concat is None else torch.cat([c_concat, c_concat[:1].expand(extra, -1, -1, -1)]),
                       torch.cat([c_crossattn, grow(content.context, c_crossattn)]), control, options, **batched)
        return out[:x.shape[0]]

    return wrapper


class JointRecomputeFFA:
    """FFA in the chosen joint blocks from the extra rows' own Q/K/V (same call, same block)."""

    order = ORDER
    passes = PASSES

    def __init__(self, layers, *, alpha: float, beta: float, temperature: float, keep_text_share: bool = True) -> None:
        self.layers = {tuple(k) for k in layers}
        self.alpha, self.beta, self.temperature, self.keep_text_share = alpha, beta, temperature, keep_text_share

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, call, attend):
        rows = call.options.get(RECOMPUTE_ROWS)
        if rows is None or call.key not in self.layers:
            return attend(q, k, v)
        from ..shared.rows import sample_index
        from .joint_ffa import joint_ffa

        image, n = call.tokens.image_slice(), rows.image
        content = [t[n:n + rows.content, :, image] for t in (q, k, v)]
        style = [t[rows.style:rows.style + 1, :, image] for t in (k, v)]
        if rows.content > 1:
            index = sample_index(list(rows.chunks), n)
            content = [t[index] for t in content]
        fused = joint_ffa(q[:n], k[:n], v[:n], call.tokens.text, tuple(content), tuple(style), alpha=self.alpha,
                          beta=self.beta, temperature=self.temperature, attend=attend,
                          keep_text_share=self.keep_text_share)
        return torch.cat([fused, attend(q[n:], k[n:], v[n:])])


def apply_recompute(model, content_bank, style_bank, *, style_index: int, layers, alpha: float,
                    beta: float, temperature: float, sigma_range, keep_text_share: bool = True, dit: bool = True):
    """A clone of ``model`` with FFA whose features are recomputed beside the image, from two
    FeatureBanks inverted with mode recompute (their ``trajectory``): in joint attention on a DiT,
    in the UNet's self-attention (unet_recompute.py) on SD1.5/SDXL."""
    from types import SimpleNamespace

    import comfy.patcher_extension

    from ..shared.sigmas import model_sampling_of
    from .ffa import _check_schedule

    content, style = content_bank.trajectory, style_bank.trajectory
    if dit:
        from ..shared.joint_attention import patched_joint_clone

        patched = patched_joint_clone(model, [JointRecomputeFFA(layers, alpha=alpha, beta=beta,
                                                                temperature=temperature,
                                                                keep_text_share=keep_text_share)])
    else:
        from .unet_recompute import patched_unet_clone

        patched = patched_unet_clone(model, layers, alpha=alpha, beta=beta, temperature=temperature)
    # Outermost APPLY_MODEL wrapper (added after the router's token count, which then sees the whole batch).
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "likeness_ffa_recompute",
                                 rows_wrapper(content, style, style_index, sigma_range, model_sampling_of(model)))
    # As the cache: a sampler visiting other sigmas fails before its first step, naming the difference.
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "likeness_ffa_schedule",
                                 _check_schedule(SimpleNamespace(sigma_range=sigma_range, content=content_bank,
                                                                 style=style_bank)))
    return patched
