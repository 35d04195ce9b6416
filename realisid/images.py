"""Images in one place: pixel conversions between uint8 and the [-1, 1] floats the models take, and the
identity crop (the reference face as the identity encoders see it).

Every part that turns pixels into model inputs or back (the data pipeline, the sampling pipeline, the
evaluation, the identity encoders, the face analyzers' stand-ins, the shard builder) imports these, so a crop
or a conversion is defined once (as diffusers keeps its in ``image_processor.py``).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from realisid.data.guidance import location_map
from realisid.geometry import FRONTAL_KPS, expand_square_box, points_to_crop

# ---------------------------------------------------------------------------------------------- pixels


def signed_from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 (or float 0..255) pixels to float32 in [-1, 1], same layout."""
    return x.to(torch.float32).div(127.5).sub_(1.0)


def uint8_from_signed(x: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] (clamped) to uint8 pixels, same layout and device."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def hwc_uint8(x: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) floats in [-1, 1] to a (..., H, W, 3) uint8 NumPy array on the host (for PIL, ONNX analyzers)."""
    return uint8_from_signed(x).cpu().movedim(-3, -1).numpy()


def pixels_to_float(x: torch.Tensor, kind: str) -> torch.Tensor:
    """uint8 (..., H, W, 3) to float (..., 3, H, W): "signed" in [-1, 1], "unit" in [0, 1]."""
    x = x.movedim(-1, -3).to(torch.float32, memory_format=torch.contiguous_format)
    return x.div_(127.5).sub_(1.0) if kind == "signed" else x.div_(255.0)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB to (3, H, W) float in [-1, 1]."""
    return pixels_to_float(torch.from_numpy(np.array(img, dtype=np.uint8)), "signed")


# ---------------------------------------------------------------------------------------------- identity crop
ID_CROP_EXPAND = 1.3   # the reference face crop: face box expanded 1.3x (also how ref.jpg is cut)


def crop_resized(img: Image.Image, box: Sequence[float], size: int) -> Image.Image:
    """``box`` (floats allowed, inside the image) of ``img`` resized to ``size`` x ``size``."""
    if img.size == (size, size) and tuple(box) == (0, 0, size, size):
        return img
    return img.resize((size, size), Image.BICUBIC, box=tuple(float(v) for v in box), reducing_gap=2.0)


def identity_crop_box(bbox: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """The square box :func:`identity_crop` cuts from a ``width`` x ``height`` photo around the face ``bbox``."""
    return expand_square_box(bbox, ID_CROP_EXPAND, width, height)


def identity_crop_kps(kps: Any, bbox: Sequence[float], width: int, height: int, size: int) -> np.ndarray:
    """A face's 5 key points (photo pixels) in the pixels of its :func:`identity_crop` (``size`` x ``size``).

    ``width``/``height`` are the photo's, ``bbox`` the face box the crop is cut around: the same arguments as
    :func:`identity_crop`. Pure; for the identity encoder's alignment (``IdentityEncoder(images, mask, kps)``).
    """
    pts = np.asarray(kps, dtype=np.float32)
    if pts.shape != (5, 2) or not np.all(np.isfinite(pts)):
        raise ValueError(f"kps must be 5 finite [x, y] points in the photo's pixels (insightface order), got shape {pts.shape}")
    return points_to_crop(pts, identity_crop_box(bbox, width, height), size).astype(np.float32)


def frontal_id_kps(size: int, expand: float = ID_CROP_EXPAND) -> np.ndarray:
    """A frontal face's 5 key points in a ``size`` reference crop cut with ``expand`` (the face in its central
    square): what stands in when a reference's key points are unknown."""
    x0, y0, x1, y1 = id_crop_face_box(size, expand)
    return (FRONTAL_KPS * np.array([x1 - x0, y1 - y0], np.float32) + np.array([x0, y0], np.float32)).astype(np.float32)


def identity_crop(img: Image.Image, bbox: Sequence[float], size: int) -> tuple[Image.Image, np.ndarray]:
    """Square face crop for the identity encoder and the face's mask in it, (size, size) float32."""
    crop_box = identity_crop_box(bbox, img.width, img.height)
    side = crop_box[2] - crop_box[0]
    face = [(bbox[0] - crop_box[0]) * size / side, (bbox[1] - crop_box[1]) * size / side,
            (bbox[2] - crop_box[0]) * size / side, (bbox[3] - crop_box[1]) * size / side]
    return crop_resized(img, crop_box, size), location_map(face, size, size, square=False)


def id_crop_face_box(size: float, expand: float = ID_CROP_EXPAND) -> tuple[float, float, float, float]:
    """Where the face sits in a ``size`` reference crop cut with ``expand``: its central 1/expand square."""
    m = size * (1 - 1 / expand) / 2
    return m, m, size - m, size - m


def centred_mask(size: int, expand: float = ID_CROP_EXPAND) -> np.ndarray:
    """The face mask of a reference crop cut with ``expand``."""
    return location_map(id_crop_face_box(size, expand), size, size, square=False)
