"""Sigma, timestep and start/end percentages, all through the model's own
model_sampling so that every model family (eps, v, flow) is handled alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def model_sampling_of(model) -> object:
    """The model_sampling object of a ModelPatcher."""
    return model.get_model_object("model_sampling")


def sigma_to_timestep(model_sampling, sigma: torch.Tensor | float) -> torch.Tensor:
    return model_sampling.timestep(torch.as_tensor(sigma, dtype=torch.float32))


def timestep_to_sigma(model_sampling, timestep: torch.Tensor | float) -> torch.Tensor:
    return model_sampling.sigma(torch.as_tensor(timestep, dtype=torch.float32))


def current_sigma(extra_options: dict) -> float | None:
    """The sigma of the step being computed, from a patch's extra_options."""
    sigmas = extra_options.get("sigmas")
    if sigmas is None:
        return None
    return float(sigmas.detach().flatten()[0])


@dataclass(frozen=True)
class SigmaRange:
    """The sigmas over which a patch acts, from start/end percentages.

    Percent 0 is the first (noisiest) step, 100 the last; ``percent_to_sigma``
    maps them onto sigmas, so a range is the same part of any schedule.
    """

    sigma_start: float
    sigma_end: float

    @classmethod
    def from_percent(cls, model_sampling, start_percent: float, end_percent: float) -> "SigmaRange":
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise ValueError(f"start_percent={start_percent} and end_percent={end_percent}: "
                             "need 0 <= start_percent <= end_percent <= 1")
        return cls(float(model_sampling.percent_to_sigma(start_percent)),
                   float(model_sampling.percent_to_sigma(end_percent)))

    @classmethod
    def always(cls) -> "SigmaRange":
        return cls(float("inf"), 0.0)

    def contains(self, sigma: float | None) -> bool:
        # No sigma means a call outside sampling (a probe, a trainer): act.
        if sigma is None:
            return True
        return self.sigma_end <= sigma <= self.sigma_start

    def active(self, extra_options: dict) -> bool:
        return self.contains(current_sigma(extra_options))
