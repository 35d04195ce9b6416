"""The samplers ``sampling.scheduler`` names, and one step of any of them (no torch import: the CLI lists them)."""
from __future__ import annotations

# sampling.scheduler -> (diffusers class, config overrides). The last three are stochastic (fresh noise per step).
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpm": ("DPMSolverMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
}


def sampler_step(sched, model_output: torch.Tensor, t, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One sampler step; a stochastic sampler's fresh noise comes from ``generator`` (a CPU generator: the same
    samples on any device), so a seed fixes the image for every sampler in :data:`SAMPLERS`."""
    return sched.step(model_output, t, latents, generator=generator).prev_sample
