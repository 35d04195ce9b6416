"""The synthetic face detector's network, its training targets and loss, and decoding its maps into faces.

Network: a strided conv backbone (stride 2 to 16) with a top-down path back to stride 4, and four heads
at stride 4: a face-centre heat-map, the box size (log width and height in cells), the sub-cell centre
offset and the 5 key points relative to the centre (in units of the box's long side). Decoding takes local
maxima of the heat-map above ``threshold``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from realisid.geometry import box_iou

STRIDE = 4


# --------------------------------------------------------------------------------------------- network
def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FaceCenterNet(nn.Module):
    """``forward(x)`` with x (B, 3, S, S) in [-1, 1], S a multiple of 16, returns the stride-4 maps
    ``heat`` (B, 1, S/4, S/4) logits, ``size`` (B, 2, ...), ``offset`` (B, 2, ...), ``kps`` (B, 10, ...)."""

    OUTPUTS = (("heat", 1), ("size", 2), ("offset", 2), ("kps", 10))

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 96), head: int = 48):
        super().__init__()
        w = [int(v) for v in widths]
        self.config = {"widths": w, "head": int(head)}
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 3, 2, 1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True))  # stride 2
        self.s4 = _block(w[0], w[1], 2)
        self.s8 = _block(w[1], w[2], 2)
        self.s16 = _block(w[2], w[3], 2)
        self.lat16 = nn.Conv2d(w[3], head, 1)
        self.lat8 = nn.Conv2d(w[2], head, 1)
        self.lat4 = nn.Conv2d(w[1], head, 1)
        self.fuse = nn.Sequential(nn.Conv2d(head, head, 3, 1, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU(inplace=True),
                                  nn.Conv2d(head, head, 3, 1, 1), nn.ReLU(inplace=True))
        self.out = nn.Conv2d(head, sum(n for _, n in self.OUTPUTS), 1)
        with torch.no_grad():
            self.out.bias.zero_()
            self.out.bias[0] = -4.0  # start with few detections (focal-loss practice)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c4 = self.s4(self.stem(x))
        c8 = self.s8(c4)
        c16 = self.s16(c8)
        p = self.lat16(c16)
        p = F.interpolate(p, scale_factor=2, mode="nearest") + self.lat8(c8)
        p = F.interpolate(p, scale_factor=2, mode="nearest") + self.lat4(c4)
        maps = self.out(self.fuse(p)).split([n for _, n in self.OUTPUTS], dim=1)
        return dict(zip((k for k, _ in self.OUTPUTS), maps))


# --------------------------------------------------------------------------------------------- targets and loss
def gaussian_targets(boxes: torch.Tensor, valid: torch.Tensor, cells: int) -> torch.Tensor:
    """(B, 1, cells, cells) heat-map targets: a Gaussian per face centre (sigma from its size), 1 at its cell."""
    B = boxes.shape[0]
    ys = torch.arange(cells, dtype=torch.float32) + 0.5
    heat = torch.zeros(B, 1, cells, cells)
    for b in range(B):
        for k in range(boxes.shape[1]):
            if not bool(valid[b, k]):
                continue
            x0, y0, x1, y1 = (boxes[b, k] / STRIDE).tolist()
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            sigma = max(0.5, 0.15 * max(x1 - x0, y1 - y0))
            g = torch.exp(-((ys[:, None] - cy) ** 2 + (ys[None, :] - cx) ** 2) / (2 * sigma * sigma))
            heat[b, 0] = torch.maximum(heat[b, 0], g)
            i, j = min(int(cy), cells - 1), min(int(cx), cells - 1)
            heat[b, 0, i, j] = 1.0
    return heat


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of face centres."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    neg = 1 - pos
    pos_loss = torch.log(p) * (1 - p) ** alpha * pos
    neg_loss = torch.log(1 - p) * p ** alpha * (1 - target) ** beta * neg
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


def regression_targets(boxes: torch.Tensor, kps: torch.Tensor, valid: torch.Tensor, cells: int):
    """Per face: its centre cell index and the size / offset / key-point targets there."""
    x0, y0, x1, y1 = (boxes / STRIDE).unbind(-1)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    ci = cy.floor().clamp(0, cells - 1)
    cj = cx.floor().clamp(0, cells - 1)
    index = (ci * cells + cj).long()
    size = torch.stack([torch.log((x1 - x0).clamp(min=0.25)), torch.log((y1 - y0).clamp(min=0.25))], -1)
    offset = torch.stack([cx - cj, cy - ci], -1)
    long_side = torch.maximum(x1 - x0, y1 - y0).clamp(min=0.25)[..., None, None]
    rel = (kps / STRIDE - torch.stack([cx, cy], -1)[..., None, :]) / long_side
    return index, size, offset, rel.flatten(-2), valid.float()


def detector_loss(out: Mapping[str, torch.Tensor], boxes: torch.Tensor, kps: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    cells = out["heat"].shape[-1]
    heat_t = gaussian_targets(boxes, valid, cells)
    index, size_t, off_t, kps_t, w = regression_targets(boxes, kps, valid, cells)

    def gather(m: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) at (B, K) indices -> (B, K, C)
        flat = m.flatten(2)
        return flat.gather(2, index[:, None, :].expand(-1, flat.shape[1], -1)).transpose(1, 2)

    n = w.sum().clamp(min=1)
    l_size = (F.l1_loss(gather(out["size"]), size_t, reduction="none").sum(-1) * w).sum() / n
    l_off = (F.l1_loss(gather(out["offset"]), off_t, reduction="none").sum(-1) * w).sum() / n
    l_kps = (F.l1_loss(gather(out["kps"]), kps_t, reduction="none").sum(-1) * w).sum() / n
    l_heat = focal_loss(out["heat"], heat_t)
    total = l_heat + 0.5 * l_size + l_off + 2.0 * l_kps
    return {"loss": total, "heat": l_heat, "size": l_size, "offset": l_off, "kps": l_kps}


@torch.no_grad()
def decode(out: Mapping[str, torch.Tensor], threshold: float, max_faces: int = 20, nms_iou: float = 0.4) -> list[list[dict]]:
    """Per image: faces as dicts (bbox, kps, score) in network-input pixels, highest score first."""
    heat = torch.sigmoid(out["heat"])
    peaks = heat * (heat == F.max_pool2d(heat, 3, 1, 1))
    B, _, H, W = heat.shape
    results = []
    for b in range(B):
        scores, idx = peaks[b, 0].flatten().topk(min(max_faces, H * W))
        faces = []
        for s, k in zip(scores.tolist(), idx.tolist()):
            if s < threshold:
                break
            i, j = divmod(k, W)
            ox, oy = out["offset"][b, :, i, j].tolist()
            lw, lh = out["size"][b, :, i, j].exp().tolist()
            cx, cy = j + ox, i + oy
            box = np.array([cx - lw / 2, cy - lh / 2, cx + lw / 2, cy + lh / 2], np.float32) * STRIDE
            rel = out["kps"][b, :, i, j].view(5, 2).cpu().numpy()
            kp = (rel * max(lw, lh) + [cx, cy]) * STRIDE
            if all(box_iou(box, f["bbox"]) < nms_iou for f in faces):
                faces.append({"bbox": box, "kps": kp.astype(np.float32), "score": float(s)})
        results.append(faces)
    return results
