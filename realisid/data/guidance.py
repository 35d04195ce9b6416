"""Guidance maps computed from face geometry: ``c_pe`` (pose/expression) and ``c_loc`` (location).

Pure functions on NumPy; the pipeline turns their outputs into tensors.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from realisid.geometry import points_to_crop

# One colour per facial part, so the branch can tell brows from eyes from lips.
PART_COLOURS = {
    "left_brow": (255, 200, 0), "right_brow": (255, 120, 0),
    "left_eye": (0, 255, 120), "right_eye": (0, 160, 255),
    "nose": (255, 255, 255),
    "outer_lips": (255, 0, 80), "inner_lips": (200, 0, 255),
}
CLOSED_PARTS = ("left_eye", "right_eye", "outer_lips", "inner_lips")


def coarse_parts_from_kps(kps: np.ndarray) -> dict[str, np.ndarray]:
    """A coarse contour set from the 5 insightface points: eye ellipses, a nose mark, a mouth line.

    Used when a sample has no dense landmarks; it carries position, roll, scale and (through the
    eye/mouth geometry) a little yaw and expression.
    """
    k = np.asarray(kps, dtype=np.float32).reshape(5, 2)
    le, re, nose, ml, mr = k
    eye_vec = re - le
    d = float(np.linalg.norm(eye_vec)) or 1.0
    ux = eye_vec / d
    uy = np.array([-ux[1], ux[0]], dtype=np.float32)
    t = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    cos, sin = np.cos(t)[:, None], np.sin(t)[:, None]

    def ellipse(c, rx, ry):
        return c + ux * (rx * cos) + uy * (ry * sin)

    parts = {
        "left_eye": ellipse(le, 0.18 * d, 0.08 * d),
        "right_eye": ellipse(re, 0.18 * d, 0.08 * d),
        "left_brow": np.stack([le - uy * 0.28 * d - ux * 0.2 * d, le - uy * 0.33 * d, le - uy * 0.28 * d + ux * 0.2 * d]),
        "right_brow": np.stack([re - uy * 0.28 * d - ux * 0.2 * d, re - uy * 0.33 * d, re - uy * 0.28 * d + ux * 0.2 * d]),
        "nose": np.stack([nose - uy * 0.06 * d, nose + uy * 0.06 * d]),
    }
    mid = (ml + mr) / 2
    parts["outer_lips"] = np.stack([ml, mid - uy * 0.07 * d, mr, mid + uy * 0.07 * d])
    return parts


def contour_map(kps: np.ndarray, landmarks: Mapping[str, Sequence] | None, crop_box: Sequence[float], size: int,
                thickness: int | None = None) -> np.ndarray:
    """``c_pe``: coloured contours of brows, eyes, nose and lips in the crop, as (size, size, 3) uint8."""
    parts = {k: np.asarray(v, dtype=np.float32) for k, v in (landmarks or {}).items() if k in PART_COLOURS}
    if not parts:
        parts = coarse_parts_from_kps(kps)
    scale = 4  # draw supersampled, then box-average down: thin lines stay visible at 32 px
    canvas = Image.new("RGB", (size * scale, size * scale))
    draw = ImageDraw.Draw(canvas)
    width = max(1, int(thickness or max(1, size // 48)) * scale)
    every = points_to_crop(np.concatenate([p.reshape(-1, 2) for p in parts.values()]), crop_box, size * scale).ravel().tolist()
    i = 0
    for name, pts in parts.items():  # one conversion of all points to plain floats, then each part's slice
        xy = every[2 * i : 2 * (i + len(pts))]
        i += len(pts)
        if name in CLOSED_PARTS and len(pts) > 2:
            xy = xy + xy[:2]
        if len(pts) >= 2:
            draw.line(xy, fill=PART_COLOURS[name], width=width, joint="curve")
    return np.asarray(canvas.reduce(scale))


def square_face_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    """The face box made square around its centre (side = long side), as the paper's ``c_loc`` uses."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    half = max(box[2] - box[0], box[3] - box[1]) / 2
    return cx - half, cy - half, cx + half, cy + half


def location_map(box: Sequence[float], height: int, width: int, soft: bool = False, square: bool = True) -> np.ndarray:
    """``c_loc``: (height, width) float32. Binary: 1 on pixels whose centre lies in the (square) face box.

    Soft: a Gaussian heat-map centred on the box with sigma = half side / 2, peak 1.
    """
    b = square_face_box(box) if square else tuple(box)
    ys = np.arange(height, dtype=np.float32) + 0.5
    xs = np.arange(width, dtype=np.float32) + 0.5
    if soft:
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        sx, sy = max((b[2] - b[0]) / 4, 0.5), max((b[3] - b[1]) / 4, 0.5)
        return (np.exp(-0.5 * ((ys[:, None] - cy) / sy) ** 2) * np.exp(-0.5 * ((xs[None, :] - cx) / sx) ** 2)).astype(np.float32)
    inside_y = (ys >= b[1]) & (ys < b[3])
    inside_x = (xs >= b[0]) & (xs < b[2])
    return (inside_y[:, None] & inside_x[None, :]).astype(np.float32)
