"""Pure geometry on face boxes, landmarks and face-scale bins.

Boxes are ``(x0, y0, x1, y1)`` in pixels with exclusive upper corners, so a box's width is ``x1 - x0``.
Everything here works on plain Python numbers or NumPy arrays and is unit-tested on exact values.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np


# A frontal face's 5 points (insightface order) relative to its box, x and y in [0, 1]: used wherever a face
# has a box but no landmarks (default pose guidance, stand-in analyzer, un-detected reference crops).
FRONTAL_KPS = np.array([[0.33, 0.42], [0.67, 0.42], [0.5, 0.6], [0.37, 0.78], [0.63, 0.78]], dtype=np.float32)

# The paper's measure: face box long side over image edge. Bins are [low, high) on that measure.
DEFAULT_BINS: dict[str, tuple[float, float]] = {
    "tiny": (0.0, 1 / 8),
    "small": (1 / 8, 1 / 6),
    "medium": (1 / 6, 1 / 4),
    "large": (1 / 4, math.inf),
}


def box_size(box: Sequence[float]) -> tuple[float, float]:
    return float(box[2] - box[0]), float(box[3] - box[1])


def face_size(box: Sequence[float], width: int, height: int) -> float:
    """Face size as the paper measures it: the box's long side over the image's long edge."""
    w, h = box_size(box)
    return max(w, h) / float(max(width, height))


def face_scale(box: Sequence[float], height: int) -> float:
    """The shard format's ``face_scale``: box height over image height."""
    return float(box[3] - box[1]) / float(height)


def scale_bin(size: float, bins: Mapping[str, Sequence[float]] = DEFAULT_BINS) -> str:
    """Name of the bin ``[low, high)`` that holds ``size``; raises if no bin does."""
    for name, (low, high) in bins.items():
        if low <= size < high:
            return name
    raise ValueError(f"face size {size:.6g} falls in no bin of {dict(bins)}; make the bins cover [0, inf)")


def bins_from_config(bins: Mapping[str, Sequence[float]] | None) -> dict[str, tuple[float, float]]:
    """Bins from config: ``{name: [low, high]}`` with ``high`` possibly ``inf``/``null``."""
    if not bins:
        return dict(DEFAULT_BINS)
    out = {}
    for name, pair in bins.items():
        if str(name).startswith("_"):
            continue
        low, high = pair
        out[str(name)] = (float(low), math.inf if high is None else float(high))
    return out


def expand_square_box(box: Sequence[float], factor: float, width: int, height: int, multiple: int = 1) -> tuple[int, int, int, int]:
    """Square crop box around a face box, for cropping faces at any position.

    The side is ``factor`` times the face box's long side, rounded up to a multiple of ``multiple`` (so the
    crop maps onto whole latent pixels), at least ``multiple`` and at most the largest multiple that fits
    in the image. The square is centred on the face box and then shifted (never shrunk) to lie inside the
    image, so a face at the border gets a crop that still contains it as far as the image allows. Corners
    are snapped to the ``multiple`` grid.
    """
    if width < multiple or height < multiple:
        raise ValueError(f"image {width}x{height} is smaller than the crop grid {multiple}")
    w, h = box_size(box)
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    limit = (min(width, height) // multiple) * multiple
    side = int(math.ceil(max(w, h) * factor / multiple)) * multiple
    side = int(min(max(side, multiple), limit))
    x0 = int(math.floor((cx - side / 2.0) / multiple + 0.5)) * multiple  # round half up, on the grid
    y0 = int(math.floor((cy - side / 2.0) / multiple + 0.5)) * multiple
    x0 = min(max(x0, 0), (width - side) // multiple * multiple)
    y0 = min(max(y0, 0), (height - side) // multiple * multiple)
    return x0, y0, x0 + side, y0 + side


def box_at_scale(box: Sequence[int], scale: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Integer box covering ``box * scale`` on a ``width x height`` grid, at least one cell each way.

    Used to relocate a residual of the local branch to the feature map of one UNet resolution: the box's
    corners are scaled, the lower ones floored and the upper ones ceiled, then clamped to the grid.
    """
    x0 = min(int(math.floor(box[0] * scale)), width - 1)
    y0 = min(int(math.floor(box[1] * scale)), height - 1)
    x1 = min(max(int(math.ceil(box[2] * scale)), x0 + 1), width)
    y1 = min(max(int(math.ceil(box[3] * scale)), y0 + 1), height)
    return max(x0, 0), max(y0, 0), x1, y1


def points_to_crop(points: np.ndarray, crop_box: Sequence[float], out_size: int) -> np.ndarray:
    """Map image-pixel points ``(N, 2)`` into the coordinates of ``crop_box`` resized to ``out_size``."""
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    side_x = float(crop_box[2] - crop_box[0])
    side_y = float(crop_box[3] - crop_box[1])
    out = np.empty_like(pts)
    out[:, 0] = (pts[:, 0] - crop_box[0]) * (out_size / side_x)
    out[:, 1] = (pts[:, 1] - crop_box[1]) * (out_size / side_y)
    return out


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"x0,y0,x1,y1"`` as given on the command line."""
    parts = text.split(",")
    if len(parts) != 4:
        raise ValueError(f"box {text!r} must be four numbers x0,y0,x1,y1")
    try:
        x0, y0, x1, y1 = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"box {text!r} must be four numbers x0,y0,x1,y1") from None
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {text!r} is empty: need x1 > x0 and y1 > y0")
    return x0, y0, x1, y1


def square_window(width: int, height: int, box: Sequence[float]) -> tuple[int, int, int, int]:
    """The largest square inside the image, placed to centre the face box as far as the image allows.

    Non-square photos become square training images without cutting the face off.
    """
    side = min(width, height)
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    x0 = int(math.floor(min(max(cx - side / 2.0, 0), width - side) + 0.5))
    y0 = int(math.floor(min(max(cy - side / 2.0, 0), height - side) + 0.5))
    return x0, y0, x0 + side, y0 + side
