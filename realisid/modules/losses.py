"""The RealisID training loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def face_weighted_mse(pred: torch.Tensor, target: torch.Tensor, face_mask: torch.Tensor, face_lambda: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``||eps_hat - eps||^2 + lambda * ||(eps_hat - eps) * c_loc||^2``, both as means over all elements.

    ``face_mask`` is (B, 1, h, w) at latent resolution (fractional coverage at the box border).
    Returns (total, full-image term, face term).
    """
    err = (pred.float() - target.float()) ** 2
    full = err.mean()
    face = (err * face_mask.float() ** 2).mean()
    return full + face_lambda * face, full, face


def latent_mask(loc_map: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Location map (B,1,R,R) to latent resolution by area averaging (coverage fraction per latent pixel)."""
    return F.interpolate(loc_map.float(), size=latent_hw, mode="area")


def diffusion_inputs(alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisy latent ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` and the training target, both in fp32.

    Computed in fp32 whatever the backbone's dtype (as diffusers' training scripts do): in bf16, 1 - a_t rounds
    to 0 at t = 0 and dozens of small timesteps get a noise scale off by more than 1%. The caller casts ``x_t``
    to the UNet's dtype. ``prediction_type``: ``epsilon`` (target eps) or ``v_prediction``
    (target ``sqrt(a_t) eps - sqrt(1 - a_t) x_0``).
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"scheduler prediction_type={prediction_type!r}; RealisID trains epsilon or v_prediction backbones")
    a = alphas_cumprod.to(latents.device, torch.float32)[timesteps].view(-1, *([1] * (latents.ndim - 1)))
    x0, eps = latents.float(), noise.float()
    signal, sigma = a.sqrt(), (1.0 - a).sqrt()
    noisy = signal * x0 + sigma * eps
    target = eps if prediction_type == "epsilon" else signal * eps - sigma * x0
    return noisy, target
