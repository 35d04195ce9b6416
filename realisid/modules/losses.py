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
