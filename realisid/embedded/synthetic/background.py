"""Image backgrounds (plain, gradient, striped, checkered, spotted) and the caption words naming them."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .identity import _COLOURS, BACKGROUNDS, _jitter, _scaled
from .painter import _pixel_grid


def _background(rng: np.random.Generator, size: int, kinds: Sequence[str] = BACKGROUNDS) -> tuple[np.ndarray, str]:
    """An (H, W, 3) uint8 background of one of ``kinds`` and its caption words."""
    kind = kinds[int(rng.integers(len(kinds)))]
    (n1, c1), (n2, c2) = (_COLOURS[i] for i in rng.choice(len(_COLOURS), size=2, replace=False))
    c1 = np.asarray(_jitter(rng, c1, 20), np.float32)
    c2 = np.asarray(_jitter(rng, c2, 20), np.float32)
    yy, xx = _pixel_grid(size)
    theta = rng.uniform(0, math.pi)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    if kind == "plain":
        t = (v - v.min()) / max(float(np.ptp(v)), 1.0) * 0.25     # barely shaded
        img = c1 * (1 - t[..., None]) + _scaled(c1, 0.8) * t[..., None]
        words = f"{n1} background"
    elif kind == "gradient":
        t = (u - u.min()) / max(float(np.ptp(u)), 1.0)
        img = c1 * (1 - t[..., None]) + c2 * t[..., None]
        words = f"{n1} and {n2} gradient background"
    elif kind == "striped":
        period = rng.uniform(0.06, 0.22) * size
        m = np.clip(0.5 + np.sin(2 * math.pi * u / period) * period / (2 * math.pi), 0, 1)
        img = c1 * (1 - m[..., None]) + c2 * m[..., None]
        words = f"{n1} and {n2} striped background"
    elif kind == "checkered":
        cell = rng.uniform(0.06, 0.18) * size
        du = np.clip(0.5 + np.sin(math.pi * u / cell) * cell / math.pi, 0, 1)
        dv = np.clip(0.5 + np.sin(math.pi * v / cell) * cell / math.pi, 0, 1)
        m = du * (1 - dv) + dv * (1 - du)
        img = c1 * (1 - m[..., None]) + c2 * m[..., None]
        words = f"{n1} and {n2} checkered background"
    else:  # spotted: soft-edged blobs in random colours on a base colour
        img = np.broadcast_to(c1, (size, size, 3)).copy()
        for _ in range(int(rng.integers(4, 10))):
            bx, by = rng.uniform(0, size, size=2)
            r = rng.uniform(0.04, 0.16) * size
            col = np.asarray(_jitter(rng, _COLOURS[int(rng.integers(len(_COLOURS)))][1], 25), np.float32)
            win = (slice(max(int(by - r) - 1, 0), int(by + r) + 2), slice(max(int(bx - r) - 1, 0), int(bx + r) + 2))
            alpha = np.clip(r - np.sqrt((xx[win] - bx) ** 2 + (yy[win] - by) ** 2) + 0.5, 0, 1)[..., None]
            img[win] = img[win] * (1 - alpha) + col * alpha
        words = f"{n1} spotted background"
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), words
