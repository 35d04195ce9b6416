"""Crop the noisy latent at a face box, and paste local-branch residuals back at that box.

Boxes here are integer ``(x0, y0, x1, y1)`` in latent pixels. The local branch sees every face at the same
``size`` however small it is in the image; relocation undoes that: each residual is resized to the box's
size at the residual's own resolution and written into a zero map of the full feature size.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from realisid.geometry import box_at_scale


def _resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    shrink = hw[0] < x.shape[-2] or hw[1] < x.shape[-1]
    if shrink and x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":  # no half anti-aliased kernel on CPU
        return F.interpolate(x.float(), size=hw, mode="bilinear", align_corners=False, antialias=True).to(x.dtype)
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=shrink)


def crop_resize(latents: torch.Tensor, boxes: torch.Tensor | Sequence[Sequence[int]], size: int | None) -> list[torch.Tensor] | torch.Tensor:
    """Crop each latent at its box and resize bilinearly to ``size`` x ``size``: (B, C, size, size).

    With ``size=None`` the crops keep their native sizes and a list is returned (the no-up-sampling ablation).
    """
    crops = []
    for i, (x0, y0, x1, y1) in enumerate(_int_boxes(boxes)):
        crop = latents[i : i + 1, :, y0:y1, x0:x1]
        crops.append(crop if size is None else _resize(crop, (size, size)))
    return crops if size is None else torch.cat(crops, 0)


def relocate(residual: torch.Tensor, boxes: torch.Tensor | Sequence[Sequence[int]], latent_hw: tuple[int, int],
             local_size: int) -> torch.Tensor:
    """Paste a residual computed on ``local_size`` crops back into a zero map at the boxes.

    ``residual`` is (B, C, h, w) at scale ``h / local_size`` of the crop; the output is (B, C, H*s, W*s) for the
    full latent ``latent_hw`` at the same scale s, non-zero only inside each box at that scale.
    """
    b, c, h, w = residual.shape
    scale = h / float(local_size)
    out_h, out_w = _level_size(latent_hw[0], scale), _level_size(latent_hw[1], scale)
    out = residual.new_zeros(b, c, out_h, out_w)
    for i, box in enumerate(_int_boxes(boxes)):
        x0, y0, x1, y1 = box_at_scale(box, scale, out_w, out_h)
        out[i, :, y0:y1, x0:x1] = _resize(residual[i : i + 1], (y1 - y0, x1 - x0))[0]
    return out


def relocate_native(residual: torch.Tensor, box: Sequence[int], latent_hw: tuple[int, int], scale: float) -> torch.Tensor:
    """As :func:`relocate` for one crop processed at its native size (no up-sampling); ``scale`` is the
    residual's UNet level (1, 1/2, 1/4, ...) and ``residual`` is already cut to the crop's extent."""
    out_h, out_w = _level_size(latent_hw[0], scale), _level_size(latent_hw[1], scale)
    out = residual.new_zeros(residual.shape[0], residual.shape[1], out_h, out_w)
    x0, y0, x1, y1 = box_at_scale(tuple(int(v) for v in box), scale, out_w, out_h)
    out[:, :, y0:y1, x0:x1] = _resize(residual, (y1 - y0, x1 - x0))
    return out


def _level_size(full: int, scale: float) -> int:
    """Feature size of a UNet level: the latent halved per level with ceil, as strided convs do."""
    size = full
    s = 1.0
    while s > scale + 1e-9:
        size = (size + 1) // 2
        s /= 2
    return size


def _int_boxes(boxes) -> list[tuple[int, int, int, int]]:
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().round().long().tolist()
    return [tuple(int(v) for v in b) for b in boxes]
