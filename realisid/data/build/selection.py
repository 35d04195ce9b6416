"""Which face of a photo is kept (pure functions: no files, no analyzer), and the photo's size and shard key.

:func:`select_face` keeps single-person photos: one face that is large, confident and not cut by the border;
other faces much smaller. :func:`downscale` bounds the analysed and written image; :func:`sample_key` names a
source's sample in the shards.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Sequence

from PIL import Image

from realisid.faces.analysis import Face
from realisid.geometry import box_size

BORDER_TOLERANCE = 0.1  # a face box may stick out of the image by this fraction of its size


def face_long_side(bbox: Sequence[float]) -> float:
    w, h = box_size(bbox)
    return max(w, h)


def border_overflow(bbox: Sequence[float], width: int, height: int) -> float:
    """How far the box sticks out of the image, as a fraction of its own width (x) or height (y)."""
    w, h = box_size(bbox)
    out_x = max(0.0, -float(bbox[0])) + max(0.0, float(bbox[2]) - width)
    out_y = max(0.0, -float(bbox[1])) + max(0.0, float(bbox[3]) - height)
    return max(out_x / max(w, 1e-6), out_y / max(h, 1e-6))


def select_face(faces: Sequence[Face], width: int, height: int, *, min_face: float = 32, min_score: float = 0.5,
                other_face_ratio: float = 0.3) -> tuple[str | None, Face | None]:
    """``(None, main_face)`` for a single-person photo, else ``(reason, None)``.

    The main face is the largest face with ``det_score >= min_score`` and box long side ``>= min_face``;
    every other detected face (whatever its score) must have a long side below ``other_face_ratio`` times
    the main face's, so a small bystander is allowed but a second person of similar size is not. The main
    face may stick out of the image by at most 10% of its size. Without a qualifying face the reason is
    ``face_too_small`` when some face had the score but not the size, else ``low_score``.
    """
    if not faces:
        return "no_face", None
    qualified = [f for f in faces if f.det_score >= min_score and face_long_side(f.bbox) >= min_face]
    if not qualified:
        return ("face_too_small" if any(f.det_score >= min_score for f in faces) else "low_score"), None
    main = max(qualified, key=lambda f: (face_long_side(f.bbox), f.det_score))
    limit = other_face_ratio * face_long_side(main.bbox)
    if any(face_long_side(f.bbox) >= limit for f in faces if f is not main):
        return "several_faces", None
    if border_overflow(main.bbox, width, height) > BORDER_TOLERANCE:
        return "face_cut_by_border", None
    return None, main


def downscale(img: Image.Image, max_side: int) -> Image.Image:
    """``img`` resized so that its long side is at most ``max_side`` (aspect kept); unchanged if smaller."""
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    s = max_side / float(max(w, h))
    size = (max(1, int(round(w * s))), max(1, int(round(h * s))))
    return img.resize(size, Image.BICUBIC, reducing_gap=3.0)


def sample_key(source_key: str) -> str:
    """A stable shard key for a source: readable stem plus a hash of the whole source key (no dots)."""
    tail = source_key.rsplit("#", 1)[-1].rsplit("/", 1)[-1]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.splitext(tail)[0])[:32].strip("_") or "img"
    return f"{stem}-{hashlib.sha1(source_key.encode('utf-8')).hexdigest()[:12]}"

