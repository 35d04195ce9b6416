"""Crop the noisy latent at a face box, and paste local-branch residuals back at that box.

Boxes here are integer ``(x0, y0, x1, y1)`` in latent pixels, given as a host list (see :func:`host_boxes`,
called once per forward so that no function here reads a device tensor back). The local branch sees every face
at the same ``size`` however small it is in the image; relocation undoes that: each residual is laid over the
box at the residual's own resolution, where the box is fractional (a UNet level at scale s = 2^-k sees the box
as ``(x0 s, y0 s, x1 s, y1 s)``), and integrated over the cells of a zero map of the full feature size.

The paste is separable. Along one axis, residual cell k covers the interval ``[a_k, b_k]`` of the level's
coordinates (cell j of the output covers ``[j, j + 1]``), and

    W[j, k] = max(0, min(j + 1, b_k) - max(j, a_k))          (the length of their overlap)
    out     = Wy @ r @ Wx^T                                   (per sample and channel)

so each output cell holds the integral of the piecewise-constant residual over that cell: the area average of
the residual cells it contains when the box is smaller than the residual, the residual's value (piecewise
constant, "area" up-sampling) when it is larger, and that value times the covered fraction at a box edge that
cuts a cell. Nothing lands outside the cells the box touches, nothing is stretched, and a box whose corners are
integers at that level with as many cells as the residual is pasted unchanged (W is a shifted identity).
"""
from __future__ import annotations

from numbers import Integral
from typing import Sequence

import torch
import torch.nn.functional as F

Box = tuple[int, int, int, int]


def host_boxes(boxes: torch.Tensor | Sequence[Sequence[int]]) -> list[Box]:
    """Boxes as a host list of integer ``(x0, y0, x1, y1)``: convert once per forward, then pass the list on.

    A ``(B, 4)`` tensor costs one device->host transfer (float boxes are rounded); a host list of integer
    sequences is checked and costs none (a tensor inside the list is refused: reading it would be a transfer).
    """
    if isinstance(boxes, torch.Tensor):
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes tensor has shape {tuple(boxes.shape)}; expected (B, 4) latent-pixel (x0, y0, x1, y1)")
        boxes = (boxes.detach().round() if boxes.is_floating_point() else boxes.detach()).tolist()
    return [_check_box(b) for b in boxes]


def _check_box(box: Sequence) -> Box:
    vals = tuple(box)
    if len(vals) != 4 or not all(_is_host_int(v) for v in vals):
        raise TypeError(f"box {box!r} is not 4 host integers (x0, y0, x1, y1); pass a (B, 4) integer tensor or a list of "
                        "4-int sequences (realisid.models.relocate.host_boxes converts a tensor once)")
    x0, y0, x1, y1 = (int(v) for v in vals)
    if x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {vals} is empty or starts below 0; latent boxes need 0 <= x0 < x1 and 0 <= y0 < y1")
    return x0, y0, x1, y1


def _is_host_int(v) -> bool:
    """A Python/NumPy integer, or a whole float such as a collated ``12.0`` (never a tensor)."""
    if isinstance(v, bool) or isinstance(v, torch.Tensor):
        return False
    return isinstance(v, Integral) or (isinstance(v, float) and v.is_integer())


def _resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    shrink = hw[0] < x.shape[-2] or hw[1] < x.shape[-1]
    if shrink and x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":  # no half anti-aliased kernel on CPU
        return F.interpolate(x.float(), size=hw, mode="bilinear", align_corners=False, antialias=True).to(x.dtype)
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=shrink)


def crop_resize(latents: torch.Tensor, boxes: Sequence[Sequence[int]], size: int | None) -> list[torch.Tensor] | torch.Tensor:
    """Crop each latent at its (host-list) box and resize bilinearly to ``size`` x ``size``: (B, C, size, size).

    With ``size=None`` the crops keep their native sizes and a list is returned (the no-up-sampling ablation).
    """
    crops = []
    for i, (x0, y0, x1, y1) in enumerate(_host_only(boxes)):
        crop = latents[i : i + 1, :, y0:y1, x0:x1]
        crops.append(crop if size is None else _resize(crop, (size, size)))
    return crops if size is None else torch.cat(crops, 0)


def relocate(residual: torch.Tensor, boxes: Sequence[Sequence[int]], latent_hw: tuple[int, int], local_size: int) -> torch.Tensor:
    """Paste a residual computed on ``local_size`` crops back into a zero map at the (host-list) boxes.

    ``residual`` is (B, C, h, w) at scale s = ``h / local_size`` of the crop; the output is (B, C, H', W'), the
    full latent ``latent_hw`` at the same level (halved with ceil, as strided convs do). Sample i's residual is
    spread evenly over its box at that level, ``[x0 s, x1 s] x [y0 s, y1 s]`` (residual cell k spans
    ``[x0 s + k d, x0 s + (k + 1) d]`` with d = (x1 - x0) s / w), and integrated over the output cells (module
    docstring): exact, fractional corners included.
    """
    b, c, h, w = residual.shape
    scale = h / float(local_size)
    out_h, out_w = _level_size(latent_hw[0], scale), _level_size(latent_hw[1], scale)
    boxes = _host_only(boxes)
    if len(boxes) != b:
        raise ValueError(f"{len(boxes)} boxes for a residual batch of {b}")
    spans_x = [(x0 * scale, x1 * scale, (x1 - x0) * scale / w) for x0, _, x1, _ in boxes]
    spans_y = [(y0 * scale, y1 * scale, (y1 - y0) * scale / h) for _, y0, _, y1 in boxes]
    return _paste(residual, coverage_weights(out_h, h, spans_y), coverage_weights(out_w, w, spans_x))


def relocate_native(residual: torch.Tensor, box: Sequence[int], latent_hw: tuple[int, int], scale: float) -> torch.Tensor:
    """As :func:`relocate` for one crop processed at its native size (no up-sampling).

    ``scale`` is the residual's UNet level (1, 1/2, 1/4, ...) and ``residual`` (N, C, h, w) is already cut to the
    crop's extent (``ceil(side * scale)`` cells). Nothing is resampled: residual cell k sits at its own place,
    ``[x0 s + k, x0 s + k + 1]``, clipped to the box's end ``x1 s`` (a last cell that was partly padding counts
    only for the part inside the crop), and is integrated over the output cells like :func:`relocate`.
    """
    out_h, out_w = _level_size(latent_hw[0], scale), _level_size(latent_hw[1], scale)
    x0, y0, x1, y1 = _host_only([box])[0]
    n, _, h, w = residual.shape
    wy = coverage_weights(out_h, h, [(y0 * scale, y1 * scale, 1.0)] * n)
    wx = coverage_weights(out_w, w, [(x0 * scale, x1 * scale, 1.0)] * n)
    return _paste(residual, wy, wx)


def coverage_weights(n_out: int, n_in: int, spans: Sequence[tuple[float, float, float]]) -> torch.Tensor:
    """Per-sample overlap lengths (B, n_out, n_in), float64 on the host.

    Sample i's span ``(lo, hi, step)`` lays input cell k over ``[lo + k step, min(lo + (k + 1) step, hi)]`` and
    ``W[i, j, k] = max(0, min(j + 1, that end) - max(j, that start))`` for output cell ``[j, j + 1]``. Row sums are
    the fraction of each output cell covered (1 inside the span, less at a cut edge, 0 outside).
    """
    lo, hi, step = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in zip(*spans))
    j = torch.arange(n_out, dtype=torch.float64)[None, :, None]
    k = torch.arange(n_in, dtype=torch.float64)[None, None, :]
    start = lo + k * step
    end = torch.minimum(lo + (k + 1) * step, hi)
    return (torch.minimum(j + 1, end) - torch.maximum(j, start)).clamp_(min=0)


def _paste(residual: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """``Wy @ r @ Wx^T`` per sample, broadcast over channels; differentiable in ``residual``.

    The weights (built on the host) go to the device without a host sync; half precision on the CPU is computed in
    float32 and cast back.
    """
    compute = torch.float32 if residual.device.type == "cpu" and residual.dtype in (torch.float16, torch.bfloat16) else residual.dtype
    wy = wy.to(torch.float32).to(residual.device, compute, non_blocking=True)
    wx = wx.to(torch.float32).to(residual.device, compute, non_blocking=True)
    out = torch.matmul(torch.matmul(wy[:, None], residual.to(compute)), wx[:, None].transpose(-1, -2))
    return out.to(residual.dtype)


def _level_size(full: int, scale: float) -> int:
    """Feature size of a UNet level: the latent halved per level with ceil, as strided convs do."""
    size = full
    s = 1.0
    while s > scale + 1e-9:
        size = (size + 1) // 2
        s /= 2
    return size


def _host_only(boxes) -> list[Box]:
    if isinstance(boxes, torch.Tensor):
        raise TypeError("boxes here must be a host list of 4-int sequences, not a tensor (reading one back every level "
                        "is a host-device sync); convert once per forward with realisid.models.relocate.host_boxes")
    return [_check_box(b) for b in boxes]
