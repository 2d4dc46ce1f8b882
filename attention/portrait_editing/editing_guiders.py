"""The portrait-editing guiders (Eq. 2, Eq. 3, the MCDM's Eq. 1) as ComfyUI GUIDERs.

Each lists its conditionings as ComfyUI's CFGGuider does, positive first and
the negative second, so ``cond_or_uncond`` (each row's index in that list)
marks the negative's rows 1, as every pack reading it expects; the further
prompts follow.

Each returns a denoised (x0) prediction that is the papers' combination of ε
predictions (see attention.portrait_editing.editing_math): Eq. 3 and Eq. 1 weigh x0 predictions
directly (their weights sum to 1), Eq. 2 adds (1 − Σ wᵢ)·x for its weights.

comfy.samplers is imported at the top because the guiders subclass its
CFGGuider; ComfyUI has loaded it before any pack.
"""

from __future__ import annotations

import comfy.samplers

from . import editing_math


def _cfg(guider, pair, uncond_index, cond_index, x, timestep, model_options, conds):
    return comfy.samplers.cfg_function(guider.inner_model, pair[cond_index], pair[uncond_index], guider.cfg, x,
                                       timestep, model_options=model_options, cond=conds[cond_index],
                                       uncond=conds[uncond_index])


class MaskGuidedCFGGuider(comfy.samplers.CFGGuider):
    """Eq. 3 each step: the target prompt's guided prediction inside the mask,
    the source prompt's outside.

    Latent mode: outside the mask the x0 prediction is the clean source latent s.
    Started from the noised source (img2img), x − s then follows the ODE of a
    constant x0 exactly, so outside a hard mask the latent stays s + σᵢ·n (the
    source noised to each step with the run's noise; ancestral samplers re-draw
    n) and ends at s. The released pipeline instead blends each step's latent with
    a reconstruction run's latent (rec_latents), which the model computes and need
    not end at s."""

    def set_edit(self, mask, mode: str, source_latent=None) -> None:
        self.mask, self.mode, self.source_latent = mask, mode, source_latent

    def set_conds(self, target, source, negative) -> None:
        self.inner_set_conds({"positive": target, "source": source, "negative": negative})

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        conds = [self.conds.get("positive"), self.conds.get("negative"), self.conds.get("source")]
        if self.mode == "latent":
            conds[2] = None  # the source side is the source latent: no prediction needed
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        target = _cfg(self, out, 1, 0, x, timestep, model_options, conds)
        mask = editing_math.mask_to_latent(self.mask, x)
        if self.mode == "latent":
            # Predicting x0 = s outside keeps the latent there on the noised source's trajectory.
            source = self.inner_model.process_latent_in(self.source_latent.to(x))
        else:
            source = _cfg(self, out, 1, 2, x, timestep, model_options, conds)
        return editing_math.blend(target, source, mask)


class PairCFGGuider(comfy.samplers.CFGGuider):
    """Eq. 2 on a double-width latent: a shared prompt everywhere, the source
    prompt on the left half and the target prompt on the right."""

    def set_scales(self, s_d: float, s_a: float, s_b: float) -> None:
        self.s_d, self.s_a, self.s_b = s_d, s_a, s_b

    def set_conds(self, shared, source, target, negative) -> None:
        self.inner_set_conds({"positive": shared, "source": source, "target": target, "negative": negative})

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        conds = [self.conds.get(k) for k in ("positive", "negative", "source", "target")]
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        shared, source, target = (_cfg(self, out, 1, i, x, timestep, model_options, conds) for i in (0, 2, 3))
        return editing_math.pair_combination(x, shared, source, target, self.s_d, self.s_a, self.s_b)


class MCDMCFGGuider(comfy.samplers.CFGGuider):
    """Eq. 1's three scales over the released code's four rows (see attention.portrait_editing.mcdm.GuidanceRows);
    with a source conditioning and a mask, Eq. 3 blends the target and source predictions.
    Eq. 1's row weights 1 − s1, s1 − s2, s2 − s3, s3 sum to 1 for every choice of scales, so
    no setting needs Eq. 2's (1 − Σ wᵢ)·x term."""

    def set_scales(self, s_image: float, s_spatial: float, s_text: float) -> None:
        self.scales = (s_image, s_spatial, s_text)

    def set_conds(self, positive, negative, source=None, mask=None) -> None:
        from . import mcdm

        rows = mcdm.guidance_rows(positive, negative)
        conds = {"positive": rows.full, "negative": rows.null, "image_spatial": rows.image_spatial}
        if rows.image_only is not None:
            conds["image_only"] = rows.image_only
        if source is not None:
            conds["source"] = source
        self.mask = mask
        self.inner_set_conds(conds)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        from . import mcdm

        names = ("positive", "negative", "image_only", "image_spatial", "source")
        conds = [self.conds.get(name) for name in names]
        out = dict(zip(names, comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)))
        image_only = out["image_only"] if conds[2] is not None else None
        target = mcdm.combine(out["negative"], out["positive"], image_only, out["image_spatial"], *self.scales)
        if conds[4] is None:
            return target
        source = mcdm.combine(out["negative"], out["source"], image_only, out["image_spatial"], *self.scales)
        return editing_math.blend(target, source, editing_math.mask_to_latent(self.mask, x))
