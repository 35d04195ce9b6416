"""The head frame of one image: pose and expression draws, head size and placement, and the feature layout.

Geometry. A face is drawn in a *head frame*: x to the image right, y down, origin at the centre of the
head ellipse with semi-axes ``a`` (half width) and ``b = face_aspect * a`` (half height). Features on the
face are points on an ellipsoid of depth ``0.85 a``; yaw and pitch rotate that ellipsoid (the silhouette
stays the same ellipse, the features shift and the far eye foreshortens), then roll rotates everything in
the image plane about the head centre. The face box is the axis-aligned box of the rolled head ellipse
(brow-top/forehead to chin, side to side), computed analytically, so ``face_size(bbox)`` equals the
requested size exactly. Key points and dense landmarks are the very points the polygons are drawn from.

Pose units: ``yaw``, ``roll``, ``pitch`` in DEGREES. ``yaw > 0``: the face turns toward the image right
(features shift right). ``roll > 0``: the head is rotated clockwise on screen. ``pitch > 0``: chin up
(features shift up). ``smile`` in [-0.3, 1] (negative is a slight frown), ``mouth_open``, ``eye_open``
and ``brow_raise`` in [0, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .identity import Identity


@dataclass(frozen=True)
class _Pose:
    """The pose and expression of one image (units above)."""

    yaw: float
    roll: float
    pitch: float
    smile: float
    mouth_open: float
    eye_open: float
    brow_raise: float
    gaze: np.ndarray      # (2,) iris shift x, y in [-0.3, 0.3] (of the eye half-width / height)

    def as_dict(self) -> dict[str, float]:
        """The pose as :attr:`RenderedFace.pose` reports it (no gaze)."""
        return {"yaw": self.yaw, "roll": self.roll, "pitch": self.pitch, "smile": self.smile,
                "mouth_open": self.mouth_open, "eye_open": self.eye_open, "brow_raise": self.brow_raise}


def _sample_pose(rng: np.random.Generator) -> _Pose:
    """Draw the head pose and expression (the nuisance), in a fixed order."""
    yaw_d = float(rng.uniform(-30, 30))
    roll_d = float(rng.uniform(-20, 20))
    pitch_d = float(rng.uniform(-10, 10))
    smile = float(rng.uniform(0.45, 1.0)) if rng.random() < 0.45 else float(rng.uniform(-0.3, 0.35))
    mouth_open = float(rng.uniform(0.3, 1.0)) if rng.random() < 0.3 else float(rng.uniform(0.0, 0.1))
    eye_open = float(rng.uniform(0.0, 0.25)) if rng.random() < 0.08 else float(rng.uniform(0.55, 1.0))
    brow_raise = float(rng.uniform(0, 1) ** 2)
    gaze = rng.uniform(-0.3, 0.3, size=2)
    return _Pose(yaw_d, roll_d, pitch_d, smile, mouth_open, eye_open, brow_raise, gaze)


def _place_head(rng: np.random.Generator, face_aspect: float, face_size: float, W: int, H: int, roll: float
                ) -> tuple[float, float, tuple[float, float], tuple[float, float, float, float]]:
    """Size and location: the box of the head ellipse rolled by ``roll`` (radians) has long side
    ``face_size * max(W, H)``. Returns ``a``, ``b``, the head centre and the face box (x0, y0, x1, y1)."""
    asp = face_aspect
    cr, sr = abs(math.cos(roll)), abs(math.sin(roll))
    hw1 = math.hypot(cr, asp * sr)   # half extents for a = 1
    hh1 = math.hypot(sr, asp * cr)
    a = face_size * max(W, H) / (2 * max(hw1, hh1))
    b = asp * a
    hw, hh = a * hw1, a * hh1
    cx = float(rng.uniform(hw, W - hw)) if W > 2 * hw else W / 2
    cy = float(rng.uniform(hh, H - hh)) if H > 2 * hh else H / 2
    return a, b, (cx, cy), (cx - hw, cy - hh, cx + hw, cy + hh)


@dataclass(frozen=True)
class _Layout:
    """What the part painters share: the head half axes, the yaw, the expression, and where the features sit
    (head frame, frontal: before yaw and pitch)."""

    a: float
    b: float
    yaw: float          # radians
    pose: _Pose
    eye_y: float        # eye line
    ew: float           # eye half-width
    ex: float           # eye centre x offset from the midline
    nose_y: float       # nose tip
    mouth_y: float      # mouth line
    mw: float           # mouth half-width (wider with a smile)

    @property
    def thin(self) -> float:
        """Line width of small strokes."""
        return 0.035 * self.a


def _layout(ident: Identity, a: float, b: float, pose: _Pose) -> _Layout:
    """The feature layout of ``ident`` with head half axes ``a``, ``b`` and expression ``pose``."""
    eye_y = -0.06 * b
    ew = ident.eye_size * a
    ex = ident.eye_spacing * a
    nose_y = eye_y + ident.nose_length * b
    mouth_y = nose_y + 0.36 * (b - nose_y)
    mw = ident.mouth_width * a * (1 + 0.1 * max(pose.smile, 0))
    return _Layout(a=a, b=b, yaw=math.radians(pose.yaw), pose=pose, eye_y=eye_y, ew=ew, ex=ex, nose_y=nose_y,
                   mouth_y=mouth_y, mw=mw)
