"""Guidance maps computed from face geometry: ``c_pe`` (pose/expression) and ``c_loc`` (location).

Pure functions on NumPy; the pipeline turns their outputs into tensors.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from realisid.geometry import points_to_crop

# One colour per facial part, so the branch can tell brows from eyes from lips.
PART_COLOURS = {
    "left_brow": (255, 200, 0), "right_brow": (255, 120, 0),
    "left_eye": (0, 255, 120), "right_eye": (0, 160, 255),
    "nose": (255, 255, 255),
    "outer_lips": (255, 0, 80), "inner_lips": (200, 0, 255),
}
CLOSED_PARTS = ("left_eye", "right_eye", "outer_lips", "inner_lips")


def _coarse_template() -> tuple[list[tuple[str, int]], np.ndarray, np.ndarray, np.ndarray]:
    """Each coarse part as offsets (along the eye line, across it) in inter-ocular units from a keypoint."""
    t = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    pieces = [  # (part, anchor keypoint: 0 left eye, 1 right eye, 2 nose, 5 mouth centre, along, across)
        ("left_eye", 0, 0.18 * np.cos(t), 0.08 * np.sin(t)),
        ("right_eye", 1, 0.18 * np.cos(t), 0.08 * np.sin(t)),
        ("left_brow", 0, np.array([-0.2, 0.0, 0.2]), np.array([-0.28, -0.33, -0.28])),
        ("right_brow", 1, np.array([-0.2, 0.0, 0.2]), np.array([-0.28, -0.33, -0.28])),
        ("nose", 2, np.array([0.0, 0.0]), np.array([-0.06, 0.06])),
    ]
    names = [(n, len(a)) for n, _, a, _ in pieces]
    anchors = np.concatenate([np.full(len(a), k) for _, k, a, _ in pieces])
    along = np.concatenate([a for *_, a, _ in pieces]).astype(np.float32)
    across = np.concatenate([b for *_, b in pieces]).astype(np.float32)
    return names, anchors, along, across


_COARSE = _coarse_template()


def coarse_parts_from_kps(kps: np.ndarray) -> dict[str, np.ndarray]:
    """A coarse contour set from the 5 insightface points: eye ellipses, brows, a nose mark, a mouth.

    Used when a sample has no dense landmarks; it carries position, roll, scale and (through the
    eye/mouth geometry) a little yaw and expression. Every point is one offset from a keypoint in the
    frame of the eye line, computed in one vectorised step.
    """
    k = np.asarray(kps, dtype=np.float32).reshape(5, 2)
    eye_vec = k[1] - k[0]
    d = float(np.hypot(eye_vec[0], eye_vec[1])) or 1.0
    ux = eye_vec / d
    uy = np.array([-ux[1], ux[0]], dtype=np.float32)
    names, anchors, along, across = _COARSE
    pts = k[anchors] + d * (along[:, None] * ux + across[:, None] * uy)
    parts, i = {}, 0
    for name, n in names:
        parts[name] = pts[i : i + n]
        i += n
    ml, mr = k[3], k[4]
    mid = (ml + mr) / 2
    parts["outer_lips"] = np.stack([ml, mid - uy * 0.07 * d, mr, mid + uy * 0.07 * d])
    return parts


def contour_map(kps: np.ndarray, landmarks: Mapping[str, Sequence] | None, crop_box: Sequence[float], size: int,
                thickness: int | None = None) -> np.ndarray:
    """``c_pe``: coloured contours of brows, eyes, nose and lips in the crop, as (size, size, 3) uint8.

    Dense ``landmarks`` (``{part: [[x, y], ...]}``) where given, else the coarse parts from the 5 ``kps``.
    """
    parts = {k: np.asarray(v, dtype=np.float32).reshape(-1, 2) for k, v in (landmarks or {}).items() if k in PART_COLOURS}
    if not parts:
        parts = coarse_parts_from_kps(kps)
    return draw_contours([(k, len(v)) for k, v in parts.items()], np.concatenate(list(parts.values())), crop_box, size, thickness)


def draw_contours(parts: Sequence[tuple[str, int]], points: np.ndarray, crop_box: Sequence[float], size: int,
                  thickness: int | None = None) -> np.ndarray:
    """The drawing behind :func:`contour_map`: ``points`` (N, 2) in image pixels hold the parts' points in the
    order and counts of ``parts``; parts without a colour are skipped.

    Drawn with OpenCV's anti-aliased polylines at sub-pixel precision (4 fractional bits) straight at the output
    size, so thin lines stay visible at 32 px and the cost does not grow with the map (a 512 px map costs about
    what a 32 px one does).
    """
    import cv2

    canvas = np.zeros((size, size, 3), np.uint8)
    width = max(1, int(thickness or max(1, size // 48)))
    shift = 4
    # pixel centres sit at +0.5 in crop coordinates and at integers in OpenCV's
    every = np.round((points_to_crop(points, crop_box, size) - 0.5) * (1 << shift)).astype(np.int32)
    i = 0
    for name, n in parts:
        line = every[i : i + n]
        i += n
        if n >= 2 and name in PART_COLOURS:
            cv2.polylines(canvas, [line], name in CLOSED_PARTS and n > 2, PART_COLOURS[name], thickness=width,
                          lineType=cv2.LINE_AA, shift=shift)
    return canvas


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
    if not soft:  # pixel centre i + 0.5 lies in [lo, hi)  <=>  ceil(lo - 0.5) <= i < ceil(hi - 0.5)
        out = np.zeros((height, width), dtype=np.float32)
        y0, y1 = max(0, math.ceil(b[1] - 0.5)), min(height, math.ceil(b[3] - 0.5))
        x0, x1 = max(0, math.ceil(b[0] - 0.5)), min(width, math.ceil(b[2] - 0.5))
        if y1 > y0 and x1 > x0:
            out[y0:y1, x0:x1] = 1.0
        return out
    ys = np.arange(height, dtype=np.float32) + 0.5
    xs = np.arange(width, dtype=np.float32) + 0.5
    cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    sx, sy = max((b[2] - b[0]) / 4, 0.5), max((b[3] - b[1]) / 4, 0.5)
    return (np.exp(-0.5 * ((ys[:, None] - cy) / sy) ** 2) * np.exp(-0.5 * ((xs[None, :] - cx) / sx) ** 2)).astype(np.float32)

