"""One photo of a synthetic person: :func:`render_face` and what it returns, :class:`RenderedFace`.

Each image varies the nuisances: head pose (yaw, roll, pitch), expression (smile, mouth open, eye openness,
brow raise, gaze), face size and location, background, shirt colour and collar. The face box, the 5 key
points and the dense landmarks are exact (see :mod:`.geometry`); the parts are drawn by :mod:`.parts`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from . import parts
from .background import _background
from .captions import _caption, _expression
from .geometry import _layout, _place_head, _sample_pose
from .identity import _COLOURS, BACKGROUNDS, COLLARS, Identity, _jitter, sample_face_size
from .painter import _Painter, _supersample


@dataclass
class RenderedFace:
    image: Image.Image                          # RGB, image_size x image_size
    bbox: tuple[float, float, float, float]     # head ellipse box x0, y0, x1, y1 (pixels, exclusive upper corner)
    kps: np.ndarray                             # (5, 2) float32: eye left, eye right, nose tip, mouth left, mouth right
    landmarks: dict[str, list[list[float]]]     # left/right_brow, left/right_eye, outer/inner_lips polylines
    pose: dict[str, float]                      # yaw/roll/pitch in degrees, smile, mouth_open, eye_open, brow_raise
    caption: str                                # lower case, at most MAX_CAPTION characters
    caption_no_identity: str = ""               # the same scene without the person's identity (hair, glasses, facial hair)


def render_face(identity: Identity, rng: np.random.Generator, image_size: int = 128,
                face_size: float | None = None, backgrounds: Sequence[str] = BACKGROUNDS,
                background_rng: np.random.Generator | None = None) -> RenderedFace:
    """Draw one photo of ``identity`` with random pose, expression, location, background and clothing.

    ``face_size`` is the face box long side over the image edge (the bins' measure); ``None`` draws it
    with :func:`sample_face_size`. ``backgrounds``: the kinds to choose from (see :data:`BACKGROUNDS`). All
    randomness comes from ``rng``, in a fixed order; the background is its last draw, so ``background_rng``
    (default: ``rng``) redraws only the background and caption words of the same photo (the person, pose,
    expression, placement and clothing stay), which is how :func:`.writer.rerender_with_background` swaps it.
    """
    if face_size is None:
        face_size = sample_face_size(rng)
    if not 0.0 < face_size <= 1.0:
        raise ValueError(f"face_size must be in (0, 1] (box long side / image edge), got {face_size}")
    ident = identity
    W = H = int(image_size)
    ss = _supersample(W)

    # the draws, in this order: pose and expression, head size and location, shirt, collar, background
    pose = _sample_pose(rng)
    yaw, roll, pitch = math.radians(pose.yaw), math.radians(pose.roll), math.radians(pose.pitch)
    a, b, centre, bbox = _place_head(rng, ident.face_aspect, face_size, W, H, roll)
    shirt_name, shirt = _COLOURS[int(rng.integers(len(_COLOURS)))]
    shirt = _jitter(rng, shirt, 18)
    collar = COLLARS[int(rng.integers(len(COLLARS)))]
    bg, bg_words = _background(rng if background_rng is None else background_rng, W, backgrounds)

    canvas = Image.fromarray(bg, "RGB")
    if ss > 1:
        canvas = canvas.resize((W * ss, H * ss), Image.NEAREST)
    P = _Painter(ImageDraw.Draw(canvas), ss, centre, a, b, yaw, pitch, roll, body_roll=roll * 0.3)
    g = _layout(ident, a, b, pose)

    # back to front
    parts.paint_body(P, ident, g, shirt, collar)
    parts.paint_back_hair(P, ident, g)
    parts.paint_neck(P, ident, g)
    parts.paint_ears(P, ident, g)
    parts.paint_head(P, ident, g)
    parts.paint_beard(P, ident, g)
    tip = parts.paint_nose(P, ident, g)
    mouth = parts.paint_mouth(P, ident, g)
    parts.paint_moustache(P, ident, g)
    eyes, eye_centres, brows = {}, {}, {}
    for s, name in ((-1.0, "left"), (1.0, "right")):
        eyes[name], eye_centres[name] = parts.paint_eye(P, ident, g, s)
        brows[name] = parts.paint_brow(P, ident, g, s)
    parts.paint_front_hair(P, ident, g)
    parts.paint_glasses(P, ident, g)
    image = canvas.reduce(ss) if ss > 1 else canvas

    kps = np.array([eye_centres["left"], eye_centres["right"], P.to_image(tip[None])[0],
                    P.to_image(P.project(np.array([[mouth.xs[0], mouth.mid[0]]])))[0],
                    P.to_image(P.project(np.array([[mouth.xs[-1], mouth.mid[-1]]])))[0]], dtype=np.float32)
    expression = _expression(pose.smile, pose.mouth_open, pose.eye_open, pose.brow_raise)
    caption, caption_no_identity = _caption(expression, ident, shirt_name, bg_words)
    return RenderedFace(image=image, bbox=tuple(float(v) for v in bbox), kps=kps,
                        landmarks=_landmarks(P, eyes, brows, mouth), pose=pose.as_dict(), caption=caption,
                        caption_no_identity=caption_no_identity)


def _landmarks(P: _Painter, eyes: dict[str, np.ndarray], brows: dict[str, np.ndarray],
               mouth: parts._Mouth) -> dict[str, list[list[float]]]:
    """The dense landmark polylines in image pixels (brows, eyes, outer and inner lips)."""
    n = len(mouth.xs)
    lips_outer, lips_inner = mouth.outer, mouth.inner
    outer_pts = P.to_image(P.project(lips_outer[::2] if len(lips_outer) > 12 else lips_outer))
    inner_idx = np.r_[0:n:2, n:len(lips_inner):3]
    return {
        "left_brow": brows["left"].tolist(), "right_brow": brows["right"].tolist(),
        "left_eye": eyes["left"].tolist(), "right_eye": eyes["right"].tolist(),
        "outer_lips": outer_pts.tolist(),
        "inner_lips": P.to_image(P.project(lips_inner[inner_idx])).tolist(),
    }
