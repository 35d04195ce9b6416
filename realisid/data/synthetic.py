"""Procedural synthetic faces with exact boxes and landmarks, written to real webdataset shards.

This is the embedded default data set (docs/embedded.md): no download, a few seconds on
a laptop CPU, and deterministic for a seed. Every synthetic person (:class:`Identity`) has a fixed
appearance: skin, hair colour and style, face shape, feature proportions, glasses and facial hair. Each
image (:func:`render_face`) varies the nuisances: head pose (yaw, roll, pitch), expression (smile, mouth
open, eye openness, brow raise, gaze), face size and location, background, shirt colour and collar.

Geometry. A face is drawn in a *head frame*: x to the image right, y down, origin at the centre of the
head ellipse with semi-axes ``a`` (half width) and ``b = face_aspect * a`` (half height). Features on the
face are points on an ellipsoid of depth ``0.85 a``; yaw and pitch rotate that ellipsoid (the silhouette
stays the same ellipse, the features shift and the far eye foreshortens), then roll rotates everything in
the image plane about the head centre. The face box is the axis-aligned box of the rolled head ellipse
(brow-top/forehead to chin, side to side), computed analytically, so ``face_size(bbox)`` equals the
requested size exactly. Key points and dense landmarks are the very points the polygons are drawn from.

Drawing is done with ``PIL.ImageDraw`` polygons on a supersampled canvas that is box-downscaled at the
end (antialiasing); backgrounds are computed at the final resolution with analytic soft edges.

Pose units: ``yaw``, ``roll``, ``pitch`` in DEGREES. ``yaw > 0``: the face turns toward the image right
(features shift right). ``roll > 0``: the head is rotated clockwise on screen. ``pitch > 0``: chin up
(features shift up). ``smile`` in [-0.3, 1] (negative is a slight frown), ``mouth_open``, ``eye_open``
and ``brow_raise`` in [0, 1].
"""
from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


log = logging.getLogger(__name__)

FACE_MODEL = "synthetic-exact-v1"
SOURCE = "synthetic-v1"
FACE_SIZE_RANGE = (0.045, 0.45)  # log-uniform; covers every bin of realisid.geometry.DEFAULT_BINS and the benchmark sizes (24..192 px at 512)
MAX_CAPTION = 77
_DEPTH = 0.85                    # face ellipsoid depth in units of the head half-width

RGB = tuple[int, int, int]

# Identity palettes. The three main cues use pairwise coprime palette sizes (5, 7, 6), so identities
# with nearby indices differ in all three and the first 210 identities never share all three.
_SKINS: tuple[tuple[str, RGB], ...] = (
    ("pale", (250, 224, 204)), ("light", (234, 188, 150)), ("tan", (200, 142, 96)),
    ("brown", (140, 90, 56)), ("dark", (86, 54, 36)),
)
_HAIRS: tuple[tuple[str, RGB], ...] = (
    ("black", (26, 22, 22)), ("brown", (110, 66, 32)), ("blonde", (236, 200, 108)), ("red", (184, 60, 22)),
    ("white", (232, 232, 228)), ("blue", (36, 88, 210)), ("pink", (238, 104, 172)),
)
HAIR_STYLES: tuple[str, ...] = ("short", "long", "bun", "bald", "spiky", "bob")
_EYES: tuple[RGB, ...] = ((92, 56, 28), (58, 110, 190), (62, 132, 72), (110, 116, 124), (140, 100, 40))
_LIPS: tuple[RGB, ...] = ((196, 84, 92), (178, 92, 84), (150, 70, 70), (210, 110, 120), (120, 52, 56))
_FRAMES: tuple[tuple[str, RGB], ...] = (("black", (20, 20, 24)), ("red", (200, 30, 40)), ("gold", (214, 170, 60)),
                                        ("blue", (30, 70, 190)), ("white", (240, 240, 240)))
GLASSES: tuple[str, ...] = ("none", "round", "square")
FACIAL_HAIR: tuple[str, ...] = ("none", "moustache", "beard", "goatee")

# Per-image colours (shirts, backgrounds), named for captions.
_COLOURS: tuple[tuple[str, RGB], ...] = (
    ("red", (200, 40, 40)), ("orange", (235, 130, 30)), ("yellow", (235, 210, 50)), ("green", (60, 160, 70)),
    ("teal", (30, 150, 150)), ("blue", (40, 90, 200)), ("purple", (130, 60, 170)), ("pink", (235, 130, 180)),
    ("white", (240, 240, 240)), ("grey", (128, 128, 128)), ("black", (30, 30, 30)), ("brown", (120, 80, 45)),
)
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "striped", "checkered", "spotted")
COLLARS: tuple[str, ...] = ("round", "v-neck", "collar")


@dataclass(frozen=True)
class Identity:
    """The fixed appearance of one synthetic person. Lengths are in units of the head half-width ``a``
    (horizontal) or half-height ``b`` (vertical, noted)."""

    name: str
    skin: RGB
    hair: RGB
    eyes: RGB
    lips: RGB
    face_aspect: float      # head ellipse height / width
    eye_spacing: float      # eye centre x offset from the midline, in a
    eye_size: float         # eye half-width, in a
    brow_thickness: float   # in a
    nose_length: float      # eye line to nose tip, in b
    mouth_width: float      # mouth half-width, in a
    hair_style: int         # index into HAIR_STYLES
    skin_name: str = "light"
    hair_name: str = "black"
    brows: RGB = (40, 30, 25)
    hair_volume: float = 1.0
    glasses: int = 0        # index into GLASSES
    frame: RGB = (20, 20, 24)
    frame_name: str = "black"
    facial_hair: int = 0    # index into FACIAL_HAIR
    ear_size: float = 1.0

    @property
    def style_name(self) -> str:
        return HAIR_STYLES[self.hair_style]


@dataclass
class RenderedFace:
    image: Image.Image                          # RGB, image_size x image_size
    bbox: tuple[float, float, float, float]     # head ellipse box x0, y0, x1, y1 (pixels, exclusive upper corner)
    kps: np.ndarray                             # (5, 2) float32: eye left, eye right, nose tip, mouth left, mouth right
    landmarks: dict[str, list[list[float]]]     # left/right_brow, left/right_eye, outer/inner_lips polylines
    pose: dict[str, float]                      # yaw/roll/pitch in degrees, smile, mouth_open, eye_open, brow_raise
    caption: str                                # lower case, at most MAX_CAPTION characters
    caption_no_identity: str = ""               # the same scene without the person's identity (hair, glasses, facial hair)


def _jitter(rng: np.random.Generator, colour: Sequence[int], amount: int) -> RGB:
    c = np.asarray(colour, dtype=np.int64) + rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _scaled(colour: Sequence[int], factor: float) -> RGB:
    return tuple(int(min(max(round(v * factor), 0), 255)) for v in colour)


def _mix(c1: Sequence[int], c2: Sequence[int], t: float) -> RGB:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(c1, c2))


def make_identity(index: int, seed: int) -> Identity:
    """The appearance of synthetic person ``index`` in the set of ``seed``; a pure function of both."""
    if index < 0:
        raise ValueError(f"identity index must be >= 0, got {index}")
    base = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x1D])
    # Seed-specific assignment of the three main cues; the index walks them with coprime periods.
    perms = [base.permutation(len(p)) for p in (_SKINS, _HAIRS, HAIR_STYLES)]
    offsets = base.integers(0, 1000, size=3)
    skin_i = int(perms[0][(index + offsets[0]) % len(_SKINS)])
    hair_i = int(perms[1][(index + offsets[1]) % len(_HAIRS)])
    style_i = int(perms[2][(index + offsets[2]) % len(HAIR_STYLES)])

    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x1D, int(index)])
    skin_name, skin = _SKINS[skin_i]
    hair_name, hair = _HAIRS[hair_i]
    skin = _jitter(rng, skin, 10)
    hair = _jitter(rng, hair, 14)
    lum = 0.299 * hair[0] + 0.587 * hair[1] + 0.114 * hair[2]
    brows = _scaled(hair, 0.55) if lum > 120 else _scaled(hair, 0.9)
    if hair_name == "white":
        brows = (150, 150, 150)
    eyes = _jitter(rng, _EYES[int(rng.integers(len(_EYES)))], 12)
    lips = _mix(_jitter(rng, _LIPS[int(rng.integers(len(_LIPS)))], 10), skin, 0.25)
    glasses = int(rng.choice(3, p=[0.62, 0.19, 0.19]))
    frame_name, frame = _FRAMES[int(rng.integers(len(_FRAMES)))]
    facial_hair = int(rng.choice(4, p=[0.6, 0.13, 0.14, 0.13]))
    return Identity(
        name=f"synth-{index:04d}",
        skin=skin, hair=hair, eyes=eyes, lips=lips,
        face_aspect=float(rng.uniform(1.15, 1.45)),
        eye_spacing=float(rng.uniform(0.36, 0.46)),
        eye_size=float(rng.uniform(0.14, 0.2)),
        brow_thickness=float(rng.uniform(0.05, 0.12)),
        nose_length=float(rng.uniform(0.2, 0.34)),
        mouth_width=float(rng.uniform(0.27, 0.4)),
        hair_style=style_i,
        skin_name=skin_name, hair_name=hair_name, brows=brows,
        hair_volume=float(rng.uniform(0.95, 1.15)),
        glasses=glasses, frame=frame, frame_name=frame_name,
        facial_hair=facial_hair,
        ear_size=float(rng.uniform(0.85, 1.2)),
    )


def sample_face_size(rng: np.random.Generator) -> float:
    """A face size (box long side / image edge), log-uniform over ``FACE_SIZE_RANGE``."""
    lo, hi = FACE_SIZE_RANGE
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


# ----------------------------------------------------------------------------------------------- drawing

def _arc(rx: float, ry: float, t0: float, t1: float, n: int, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = np.linspace(t0, t1, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _band(line: np.ndarray, width: np.ndarray | float) -> np.ndarray:
    """A closed polygon of ``width`` (scalar or per point) around a polyline."""
    d = np.gradient(line, axis=0)
    nrm = np.stack([-d[:, 1], d[:, 0]], axis=1)
    nrm /= np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-9)
    w = np.broadcast_to(np.asarray(width, dtype=np.float64), (len(line),))[:, None] / 2
    return np.concatenate([line + nrm * w, (line - nrm * w)[::-1]])


class _Painter:
    """Maps head-frame points to the supersampled canvas and draws them."""

    def __init__(self, draw: ImageDraw.ImageDraw, ss: int, centre: tuple[float, float], a: float, b: float,
                 yaw: float, pitch: float, roll: float, body_roll: float):
        self.draw, self.ss, self.a, self.b = draw, ss, a, b
        self.c = np.asarray(centre, dtype=np.float64)
        self.cy, self.sy = math.cos(yaw), math.sin(yaw)
        self.cp, self.sp = math.cos(pitch), math.sin(pitch)
        self.rot = self._rot(roll)
        self.body_rot = self._rot(body_roll)

    @staticmethod
    def _rot(angle: float) -> np.ndarray:
        c, s = math.cos(angle), math.sin(angle)
        return np.array([[c, -s], [s, c]])

    def project(self, pts: np.ndarray, extra_depth: np.ndarray | float = 0.0) -> np.ndarray:
        """Points on the face surface (head frame, before yaw/pitch) to the posed head frame."""
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        x, y = pts[:, 0], pts[:, 1]
        z = _DEPTH * self.a * np.sqrt(np.clip(1 - (x / self.a) ** 2 - (y / self.b) ** 2, 0, None)) + extra_depth
        x1 = x * self.cy + z * self.sy
        z1 = -x * self.sy + z * self.cy
        y1 = y * self.cp - z1 * self.sp
        return np.stack([x1, y1], axis=1)

    def to_image(self, pts: np.ndarray, body: bool = False) -> np.ndarray:
        """Posed head-frame points to image pixels (continuous, pixel i covers [i, i + 1))."""
        rot = self.body_rot if body else self.rot
        return np.asarray(pts, dtype=np.float64).reshape(-1, 2) @ rot.T + self.c

    def _canvas(self, pts: np.ndarray, face: bool, body: bool) -> list[float]:
        if face:
            pts = self.project(pts)
        q = self.to_image(pts, body) * self.ss - 0.5   # PIL vertices sit on pixel centres
        return q.ravel().tolist()                      # flat [x0, y0, x1, y1, ...]

    def poly(self, pts: np.ndarray, fill: RGB, face: bool = False, body: bool = False) -> None:
        self.draw.polygon(self._canvas(pts, face, body), fill=fill)

    def line(self, pts: np.ndarray, fill: RGB, width: float, face: bool = False, closed: bool = False) -> None:
        xy = self._canvas(pts, face, False)
        if closed:
            xy = xy + xy[:2]
        w = max(int(round(width * self.ss)), 1)
        self.draw.line(xy, fill=fill, width=w, joint="curve")


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy, xx)`` of a ``size x size`` image (read-only, shared)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


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


def _caption(expression: str, ident: Identity, shirt: str, background: str) -> tuple[str, str]:
    """The caption (identity attributes, clothing, background) and the same without identity attributes.

    The second names only what any person could have (expression, shirt, background), so a model trained on it
    must take hair, glasses and facial hair from somewhere else: the reference face."""
    style = ident.style_name
    expr = f"{expression} " if expression else ""
    subject = "a photo of a " + expr + ("bald " if style == "bald" else "") + "person"
    hair = {"short": f"short {ident.hair_name} hair", "long": f"long {ident.hair_name} hair",
            "bun": f"{ident.hair_name} hair in a bun", "spiky": f"spiky {ident.hair_name} hair",
            "bob": f"a {ident.hair_name} bob"}.get(style)
    extras = []
    if ident.glasses:
        extras.append("glasses")
    fh = FACIAL_HAIR[ident.facial_hair]
    if fh != "none":
        extras.append(f"a {fh}")
    bg_short = background.split(" ", 2)[-1] if " and " in background else background
    scene = [[f"{shirt} shirt", background], [f"{shirt} shirt", bg_short], [f"{shirt} shirt", background.split()[-2] + " background"],
             [f"{shirt} shirt"], []]

    def first_fitting(subject: str, who: list) -> str:
        for parts in [who + sc for sc in scene] + [who[:1]]:
            parts = [p for p in parts if p]
            text = subject + (" with " + ", ".join(parts) if parts else "")
            if len(text) <= MAX_CAPTION:
                return text
        return subject[:MAX_CAPTION]

    return first_fitting(subject, [hair, *extras]), first_fitting("a photo of a " + expr + "person", [])


def _supersample(image_size: int) -> int:
    return 4 if image_size <= 192 else (2 if image_size <= 512 else 1)


def render_face(identity: Identity, rng: np.random.Generator, image_size: int = 128,
                face_size: float | None = None, backgrounds: Sequence[str] = BACKGROUNDS) -> RenderedFace:
    """Draw one photo of ``identity`` with random pose, expression, location, background and clothing.

    ``face_size`` is the face box long side over the image edge (the bins' measure); ``None`` draws it
    with :func:`sample_face_size`. ``backgrounds``: the kinds to choose from (see :data:`BACKGROUNDS`). All
    randomness comes from ``rng``, in a fixed order.
    """
    if face_size is None:
        face_size = sample_face_size(rng)
    if not 0.0 < face_size <= 1.0:
        raise ValueError(f"face_size must be in (0, 1] (box long side / image edge), got {face_size}")
    ident = identity
    W = H = int(image_size)
    ss = _supersample(W)

    # --- pose and expression (nuisance)
    yaw_d = float(rng.uniform(-30, 30))
    roll_d = float(rng.uniform(-20, 20))
    pitch_d = float(rng.uniform(-10, 10))
    smile = float(rng.uniform(0.45, 1.0)) if rng.random() < 0.45 else float(rng.uniform(-0.3, 0.35))
    mouth_open = float(rng.uniform(0.3, 1.0)) if rng.random() < 0.3 else float(rng.uniform(0.0, 0.1))
    eye_open = float(rng.uniform(0.0, 0.25)) if rng.random() < 0.08 else float(rng.uniform(0.55, 1.0))
    brow_raise = float(rng.uniform(0, 1) ** 2)
    gaze = rng.uniform(-0.3, 0.3, size=2)
    yaw, roll, pitch = math.radians(yaw_d), math.radians(roll_d), math.radians(pitch_d)

    # --- size and location: the box of the rolled head ellipse has long side face_size * W
    asp = ident.face_aspect
    cr, sr = abs(math.cos(roll)), abs(math.sin(roll))
    hw1 = math.hypot(cr, asp * sr)   # half extents for a = 1
    hh1 = math.hypot(sr, asp * cr)
    a = face_size * max(W, H) / (2 * max(hw1, hh1))
    b = asp * a
    hw, hh = a * hw1, a * hh1
    cx = float(rng.uniform(hw, W - hw)) if W > 2 * hw else W / 2
    cy = float(rng.uniform(hh, H - hh)) if H > 2 * hh else H / 2
    bbox = (cx - hw, cy - hh, cx + hw, cy + hh)

    # --- clothing and background
    shirt_name, shirt = _COLOURS[int(rng.integers(len(_COLOURS)))]
    shirt = _jitter(rng, shirt, 18)
    collar = COLLARS[int(rng.integers(len(COLLARS)))]
    bg, bg_words = _background(rng, W, backgrounds)
    canvas = Image.fromarray(bg, "RGB")
    if ss > 1:
        canvas = canvas.resize((W * ss, H * ss), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    P = _Painter(draw, ss, (cx, cy), a, b, yaw, pitch, roll, body_roll=roll * 0.3)

    skin = ident.skin
    skin_dark = _scaled(skin, 0.82)
    skin_shadow = _scaled(skin, 0.7)
    hair = ident.hair
    hair_dark = _scaled(hair, 0.75) if sum(hair) > 150 else _mix(hair, (90, 90, 90), 0.25)
    vol = ident.hair_volume
    style = ident.style_name
    thin = 0.035 * a   # line width of small strokes

    # --- body: shoulders and shirt (body frame is less rolled than the head), then the neck
    neck_y0, neck_top = 1.18 * b, 0.55 * b
    sh_y = neck_y0 + 0.05 * a
    side = np.array([[0.55, 0.0], [1.3, 0.18], [1.9, 0.55], [2.25, 1.2], [2.45, 2.2], [2.6, 6.0]])
    right = np.stack([side[:, 0] * a, sh_y + side[:, 1] * a], axis=1)
    left = right[::-1] * np.array([-1, 1])
    P.poly(np.concatenate([left, right]), shirt, body=True)
    if collar == "round":
        P.poly(_arc(0.5 * a, 0.32 * a, 0, math.pi, 12, 0, sh_y - 0.02 * a), skin_dark, body=True)
    elif collar == "v-neck":
        P.poly(np.array([[-0.5 * a, sh_y - 0.02 * a], [0.5 * a, sh_y - 0.02 * a], [0, sh_y + 0.75 * a]]), skin_dark, body=True)
    else:
        P.poly(_arc(0.5 * a, 0.2 * a, 0, math.pi, 12, 0, sh_y - 0.02 * a), skin_dark, body=True)
        wing = np.array([[0.05, 0.02], [0.6, -0.08], [0.72, 0.35], [0.0, 0.55]]) * a + [0, sh_y]
        P.poly(wing, _scaled(shirt, 0.75) if sum(shirt) > 200 else (235, 235, 235), body=True)
        P.poly(wing * [-1, 1], _scaled(shirt, 0.75) if sum(shirt) > 200 else (235, 235, 235), body=True)

    # back hair (behind head and neck, in front of the shirt)
    if style == "long":
        top = _arc(1.12 * a * vol, 1.08 * b * vol, math.pi, 2 * math.pi, 16)
        down = np.array([[1.12 * a * vol, 0.4 * b], [1.22 * a * vol, 1.2 * b], [1.15 * a * vol, 1.75 * b],
                         [0.4 * a, 1.8 * b]])
        P.poly(np.concatenate([top, down, down[::-1] * [-1, 1]]), hair_dark)
    elif style == "bob":
        top = _arc(1.16 * a * vol, 1.1 * b * vol, math.pi, 2 * math.pi, 16)
        down = np.array([[1.16 * a * vol, 0.3 * b], [1.12 * a * vol, 0.8 * b], [0.6 * a, 0.85 * b]])
        P.poly(np.concatenate([top, down, down[::-1] * [-1, 1]]), hair_dark)
    elif style == "bun":
        P.poly(_arc(0.38 * a * vol, 0.36 * a * vol, 0, 2 * math.pi, 20, 0, -1.05 * b - 0.12 * a), hair)
        P.line(_arc(0.38 * a * vol, 0.36 * a * vol, 3.6, 5.4, 6, 0, -1.05 * b - 0.12 * a), hair_dark, thin)

    # neck: top follows the head, bottom follows the body
    nw = 0.42 * a
    neck_top_pts = P.to_image(np.array([[-nw, neck_top], [nw, neck_top]]))
    neck_bot_pts = P.to_image(np.array([[nw * 1.08, neck_y0 + 0.1 * a], [-nw * 1.08, neck_y0 + 0.1 * a]]), body=True)
    draw.polygon((np.concatenate([neck_top_pts, neck_bot_pts]) * ss - 0.5).ravel().tolist(), fill=skin_dark)

    # ears (behind the head; the ear on the side the face turns away from shows more)
    for s in (-1.0, 1.0):
        rx = 0.15 * a * ident.ear_size * float(np.clip(1 - 1.6 * s * math.sin(yaw), 0.15, 1.6))
        ey = 0.03 * b
        P.poly(_arc(rx, 0.2 * b * ident.ear_size, 0, 2 * math.pi, 14, s * 0.97 * a, ey), skin_dark)
        P.poly(_arc(rx * 0.5, 0.11 * b * ident.ear_size, 0, 2 * math.pi, 10, s * a, ey), skin_shadow)

    # head (the face box is this ellipse's box)
    P.poly(_arc(a, b, 0, 2 * math.pi, 48), skin)

    # --- feature layout (head frame, frontal)
    eye_y = -0.06 * b
    ew = ident.eye_size * a
    ex = ident.eye_spacing * a
    nose_y = eye_y + ident.nose_length * b
    mouth_y = nose_y + 0.36 * (b - nose_y)
    mw = ident.mouth_width * a * (1 + 0.1 * max(smile, 0))

    # facial hair (the mouth is drawn on top of it)
    fh = FACIAL_HAIR[ident.facial_hair]
    beard_col = _scaled(ident.brows, 1.05)
    if fh == "beard":
        jaw = _arc(a * 1.005, b * 1.005, math.radians(-14), math.radians(194), 26)
        ny = nose_y / b
        inner = np.array([[0.97, -0.24], [0.8, 0.1], [0.5, ny + 0.1], [0.22, ny + 0.07], [0.0, ny + 0.06]]) * [a, b]
        inner = np.concatenate([inner, (inner * [-1, 1])[-2::-1]])
        inner_p = P.project(inner)
        inner_p[0], inner_p[-1] = jaw[0], jaw[-1]        # meet the silhouette exactly at the sideburns
        P.poly(np.concatenate([jaw, inner_p[::-1]]), beard_col)
    elif fh == "goatee":
        t = np.linspace(math.radians(58), math.radians(122), 9)
        chin = np.stack([a * np.cos(t), b * np.sin(t)], axis=1)
        top_x = np.linspace(0.28, -0.28, 5) * a
        top = P.project(np.stack([top_x, np.full(5, mouth_y + 0.08 * b)], axis=1))
        P.poly(np.concatenate([chin, top]), beard_col)

    # nose: a bridge shadow, a tip and the nostril base; the tip stands out of the face by 0.3 a
    tip = P.project(np.array([[0.0, nose_y]]), 0.3 * a)[0]
    bridge_t = np.linspace(0, 1, 6)
    bridge = np.stack([0.07 * a * np.ones(6) * (1 - 0.4 * bridge_t), eye_y + 0.08 * b + bridge_t * (nose_y - eye_y - 0.12 * b)], axis=1)
    side_sign = 1.0 if yaw <= 0 else -1.0   # shade the side facing away from the viewer
    bridge[:, 0] *= side_sign
    bridge_p = P.project(bridge, bridge_t * 0.22 * a)
    P.line(bridge_p, skin_dark, max(0.045 * a, 0.3))
    nose_w = 0.17 * a
    base_x = np.linspace(-1, 1, 7)
    base = np.stack([base_x * nose_w, nose_y + 0.035 * b * (1 - base_x ** 2) ** 0.5 - 0.01 * b], axis=1)
    base_p = P.project(base, 0.3 * a * (1 - 0.6 * np.abs(base_x)))
    tip_r = 0.09 * a
    P.poly(_arc(tip_r * math.cos(yaw) ** 0.5, tip_r * 0.8, 0, 2 * math.pi, 12, tip[0], tip[1] + 0.01 * b), _mix(skin, (255, 255, 255), 0.08))
    P.line(base_p, skin_shadow, max(0.04 * a, 0.3))
    for s in (-1.0, 1.0):
        nost = P.project(np.array([[s * 0.45 * nose_w, nose_y + 0.02 * b]]), 0.22 * a)[0]
        P.poly(_arc(0.05 * a, 0.028 * b, 0, 2 * math.pi, 8, nost[0], nost[1]), _scaled(skin, 0.45))

    # mouth: t in [-1, 1] across; corners rise with the smile; the gap grows with mouth_open
    n = 13
    t = np.linspace(-1, 1, n)
    mid = mouth_y - smile * 0.09 * b * t ** 2 + smile * 0.02 * b
    gap = mouth_open * 0.16 * b
    env = np.sqrt(1 - t ** 2)
    inner_up = mid - 0.25 * gap * env
    inner_lo = mid + 0.75 * gap * env + 0.01 * b * env * max(smile, 0)
    ut = 0.055 * b
    lt = 0.075 * b
    outer_up = inner_up - ut * env * (1 - 0.35 * np.exp(-(t / 0.18) ** 2)) - 0.01 * b * env
    outer_lo = inner_lo + lt * env ** 0.8
    xs = t * mw
    lips_outer = np.concatenate([np.stack([xs, outer_up], 1), np.stack([xs, outer_lo], 1)[::-1][1:-1]])
    lips_inner = np.concatenate([np.stack([xs, inner_up], 1), np.stack([xs, inner_lo], 1)[::-1][1:-1]])
    P.poly(lips_outer, ident.lips, face=True)
    if mouth_open > 0.12:
        P.poly(lips_inner, (70, 22, 30), face=True)
        teeth_lo = inner_up + np.minimum(0.045 * b, 0.4 * gap) * env
        P.poly(np.concatenate([np.stack([xs * 0.8, inner_up], 1), np.stack([xs * 0.8, teeth_lo], 1)[::-1]]), (242, 240, 232), face=True)
    P.line(np.stack([xs, (inner_up + inner_lo) / 2 if mouth_open <= 0.12 else inner_up], 1), _scaled(ident.lips, 0.6),
           max(0.025 * a, 0.3), face=True)
    if fh == "moustache" or fh == "beard":
        mx = np.linspace(-1.08, 1.08, 9)
        m_lo = mouth_y - 0.065 * b - 0.05 * b * smile * mx ** 2 + 0.04 * b * (mx ** 2)
        m_hi = m_lo - 0.07 * b * (1 - 0.6 * mx ** 2)
        P.poly(np.concatenate([np.stack([mx * mw, m_hi], 1), np.stack([mx * mw, m_lo], 1)[::-1]]), beard_col, face=True)

    # eyes: sclera, iris, pupil, then skin lids cover what lies outside the lids
    eh = ew * 0.6 * eye_open
    ir = ew * 0.52
    eyes_out, eye_centres, brows_out = {}, [], {}
    te = np.linspace(-1, 1, 11)
    for s, name in ((-1.0, "left"), (1.0, "right")):
        ecx = s * ex
        # upper lid peaks a bit toward the nose-far side; lower lid is flatter
        upper = np.stack([ecx + te * ew, eye_y - eh * (1 - te ** 2) ** 0.7 * (1 + 0.12 * s * te)], 1)
        lower = np.stack([ecx + te * ew, eye_y + 0.7 * eh * (1 - te ** 2) ** 0.9], 1)
        contour = np.concatenate([upper, lower[::-1][1:-1]])
        P.poly(contour, (246, 246, 240), face=True)
        icx, icy = ecx + gaze[0] * ew * 0.35, eye_y + gaze[1] * eh * 0.2
        P.poly(_arc(ir, ir, 0, 2 * math.pi, 14, icx, icy), ident.eyes, face=True)
        P.poly(_arc(ir * 0.45, ir * 0.45, 0, 2 * math.pi, 10, icx, icy), (12, 10, 10), face=True)
        cover = 1.15 * ir + 0.03 * a
        P.poly(np.concatenate([upper, (upper - [0, cover])[::-1]]), skin, face=True)
        P.poly(np.concatenate([lower, (lower + [0, cover])[::-1]]), skin, face=True)
        P.line(upper, (30, 22, 22), max(0.05 * a, 0.35), face=True)
        P.line(lower[2:-2], skin_shadow, max(0.02 * a, 0.25), face=True)
        eyes_out[name] = P.to_image(P.project(contour[::2]))
        eye_centres.append(P.to_image(P.project(np.array([[ecx, eye_y]])))[0])

        # brow: an arched band from image-left to image-right, thicker at the inner (nose) end
        bw = ew * 1.35
        tb = np.linspace(-1, 1, 8)
        inner = -s * tb                          # 1 at the inner end, -1 at the outer end
        brow_y = eye_y - ew * 0.75 - 0.05 * b - brow_raise * 0.07 * b
        centre = np.stack([ecx + tb * bw, brow_y - 0.06 * b * (1 - ((inner + 0.2) / 1.2) ** 2) + 0.015 * b * inner], 1)
        thick = ident.brow_thickness * a * (0.78 + 0.22 * inner)
        P.poly(_band(P.project(centre), thick), ident.brows)
        brows_out[name] = P.to_image(P.project(centre))

    # front hair
    hairline_pts = {
        "short": [[0.97, 0.02], [0.94, -0.24], [0.78, -0.44], [0.45, -0.52], [0.0, -0.56]],
        "long": [[0.86, 0.9], [0.84, 0.2], [0.8, -0.4], [0.45, -0.52], [0.0, -0.56]],
        "bun": [[0.97, -0.02], [0.94, -0.26], [0.78, -0.46], [0.4, -0.56], [0.0, -0.6]],
        "spiky": [[0.97, 0.02], [0.94, -0.24], [0.78, -0.44], [0.45, -0.5], [0.0, -0.52]],
        "bob": [[0.88, 0.6], [0.88, -0.1], [0.84, -0.44], [0.4, -0.5], [0.0, -0.5]],
    }.get(style)
    if hairline_pts is not None:
        hl = np.asarray(hairline_pts, dtype=np.float64) * [a, b]
        hl = np.concatenate([hl, (hl * [-1, 1])[-2::-1]])     # right temple -> top -> left temple
        low = 0.1 if style in ("short", "bun", "spiky") else (0.9 if style == "long" else 0.65)
        fv = 1.0 if style == "bun" else vol
        start = math.asin(min(low / 1.08, 1.0))
        outer = _arc(a * 1.06 * fv, b * 1.08 * fv, math.pi - start, 2 * math.pi + start, 24)
        if style in ("long", "bob"):
            outer[0] = [-1.12 * a * fv, low * b]
            outer[-1] = [1.12 * a * fv, low * b]
        front = P.project(hl)
        P.poly(np.concatenate([outer, front]), hair)
        if style == "spiky":
            for k in np.linspace(math.pi + 0.45, 2 * math.pi - 0.45, 7):
                base = np.array([[math.cos(k - 0.2), math.sin(k - 0.2)], [math.cos(k + 0.2), math.sin(k + 0.2)]]) * [a * 1.02, b * 1.02]
                spike = np.array([[math.cos(k), math.sin(k)]]) * [a * 1.35 * vol, b * 1.3 * vol]
                P.poly(np.concatenate([base[:1], spike, base[1:]]), hair)
        # a few strands for texture
        for k in np.linspace(math.pi + 0.5, 2 * math.pi - 0.5, 4):
            P.line(_arc(a * 0.98, b * 0.98, k - 0.25, k + 0.1, 4), hair_dark, thin)
    elif style == "bald":
        for s in (-1.0, 1.0):
            t0, t1 = (math.pi - 0.2, math.pi + 0.5) if s < 0 else (-0.5, 0.2)
            outer = _arc(a * 1.03, b * 1.03, t0, t1, 8)
            inner = _arc(a * 0.93, b * 0.95, t0, t1, 8)[::-1]
            P.poly(np.concatenate([outer, inner]), hair)
        P.poly(_arc(0.22 * a, 0.1 * b, 0, 2 * math.pi, 12, -0.25 * a, -0.8 * b), _mix(skin, (255, 255, 255), 0.25))

    # glasses
    if ident.glasses:
        rx, ry = ew * 1.45, ew * 1.1
        for s in (-1.0, 1.0):
            if GLASSES[ident.glasses] == "round":
                rim = _arc(rx, ry, 0, 2 * math.pi, 20, s * ex, eye_y)
            else:
                tt = np.linspace(0, 2 * math.pi, 24, endpoint=False)
                c, sn = np.cos(tt), np.sin(tt)
                rim = np.stack([s * ex + rx * np.sign(c) * np.abs(c) ** 0.35, eye_y + ry * np.sign(sn) * np.abs(sn) ** 0.35], 1)
            P.line(rim, ident.frame, max(0.055 * a, 0.4), face=True, closed=True)
            arm = np.array([[s * (ex + rx), eye_y], [s * 0.99 * a, eye_y - 0.02 * b]])
            P.line(arm, ident.frame, max(0.05 * a, 0.4), face=True)
        P.line(np.array([[-ex + rx, eye_y - 0.05 * b], [0, eye_y - 0.08 * b], [ex - rx, eye_y - 0.05 * b]]),
               ident.frame, max(0.05 * a, 0.4), face=True)

    image = canvas.reduce(ss) if ss > 1 else canvas

    left_eye, right_eye = eye_centres
    kps = np.array([left_eye, right_eye, P.to_image(tip[None])[0],
                    P.to_image(P.project(np.array([[xs[0], mid[0]]])))[0],
                    P.to_image(P.project(np.array([[xs[-1], mid[-1]]])))[0]], dtype=np.float32)
    outer_pts = P.to_image(P.project(lips_outer[::2] if len(lips_outer) > 12 else lips_outer))
    inner_idx = np.r_[0:n:2, n:len(lips_inner):3]
    landmarks = {
        "left_brow": brows_out["left"].tolist(), "right_brow": brows_out["right"].tolist(),
        "left_eye": eyes_out["left"].tolist(), "right_eye": eyes_out["right"].tolist(),
        "outer_lips": outer_pts.tolist(),
        "inner_lips": P.to_image(P.project(lips_inner[inner_idx])).tolist(),
    }
    if mouth_open > 0.5 and brow_raise > 0.4 and smile < 0.45:
        expression = "surprised"
    elif smile >= 0.45:
        expression = "laughing" if mouth_open > 0.3 else "smiling"
    elif eye_open < 0.25:
        expression = "sleepy"
    else:
        expression = ""
    caption, caption_no_identity = _caption(expression, ident, shirt_name, bg_words)
    pose = {"yaw": yaw_d, "roll": roll_d, "pitch": pitch_d, "smile": smile, "mouth_open": mouth_open,
            "eye_open": eye_open, "brow_raise": brow_raise}
    return RenderedFace(image=image, bbox=tuple(float(v) for v in bbox), kps=kps, landmarks=landmarks,
                        pose=pose, caption=caption, caption_no_identity=caption_no_identity)


# ------------------------------------------------------------------------------------------------ shards

def _face_crop(image: Image.Image, bbox: Sequence[float], size: int) -> Image.Image:
    """The reference crop, cut exactly as the pipeline cuts identity crops."""
    from realisid.images import identity_crop

    return identity_crop(image, bbox, size)[0]


def _image_rngs(seed: int, index: int, j: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent streams for one image's face size and everything else (order-independent)."""
    s = int(seed) & 0xFFFFFFFF
    return np.random.default_rng([s, 0x51, index, j]), np.random.default_rng([s, 0x52, index, j])


def generate_synthetic_shards(out_dir: str, *, num_identities: int = 64, images_per_identity: int = 24,
                              val_identities: int = 8, image_size: int = 128, ref_size: int = 64,
                              shard_size: int = 256, seed: int = 0, ref_choices: int = 1,
                              backgrounds: Sequence[str] = BACKGROUNDS) -> dict:
    """Write the synthetic set as ``train`` and ``val`` shards (held-out identities) into ``out_dir``.

    ``train`` holds identities ``[0, num_identities - val_identities)`` and ``val`` the last
    ``val_identities``. Each sample carries the full image, its metadata and a reference face cropped from
    another image of the same identity: one of that identity's ``ref_choices`` largest faces other than the
    image itself (chosen per image, reproducibly; 1: always the largest other face), named in the sample's
    ``ref_key``. The metadata also holds ``caption_no_identity``, the caption without the person's identity
    attributes. ``backgrounds``: the background kinds drawn (a subset of :data:`BACKGROUNDS`). Identities are
    interleaved in write order so every shard holds many people.
    Returns ``{"train": manifest, "val": manifest}``.
    """
    from realisid.data.shards import FaceShardWriter, face_meta

    if num_identities < 1 or not 0 <= val_identities < num_identities:
        raise ValueError(f"need num_identities >= 1 and 0 <= val_identities < num_identities, got "
                         f"num_identities={num_identities}, val_identities={val_identities}")
    if images_per_identity < 2:
        raise ValueError(f"images_per_identity must be >= 2 so every reference comes from another image, got {images_per_identity}")
    backgrounds = tuple(backgrounds)
    unknown = [b for b in backgrounds if b not in BACKGROUNDS]
    if unknown or not backgrounds:
        raise ValueError(f"backgrounds {list(backgrounds)}: give a non-empty subset of {list(BACKGROUNDS)}")
    if not 1 <= ref_choices < images_per_identity:
        raise ValueError(f"ref_choices must be in [1, images_per_identity - 1], got {ref_choices} with {images_per_identity} images")
    t_start = time.perf_counter()
    splits = {"train": range(0, num_identities - val_identities), "val": range(num_identities - val_identities, num_identities)}
    manifests = {}
    for split, indices in splits.items():
        writer = FaceShardWriter(out_dir, split, face_model=FACE_MODEL, maxcount=shard_size)
        idents = {i: make_identity(i, seed) for i in indices}
        # Face sizes come from their own stream, so the reference images are known before rendering.
        sizes = {i: [sample_face_size(_image_rngs(seed, i, j)[0]) for j in range(images_per_identity)] for i in indices}
        largest = {i: [int(j) for j in np.argsort(-np.asarray(sizes[i]), kind="stable")[: ref_choices + 1]] for i in indices}
        crops: dict[tuple[int, int], Image.Image] = {}
        for i in indices:
            for j in largest[i]:
                face = render_face(idents[i], _image_rngs(seed, i, j)[1], image_size, sizes[i][j], backgrounds)
                crops[(i, j)] = _face_crop(face.image, face.bbox, ref_size)
        order_rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x53, len(indices)])
        for j in range(images_per_identity):
            for i in (indices[k] for k in order_rng.permutation(len(indices))):
                ident = idents[i]
                face = render_face(ident, _image_rngs(seed, i, j)[1], image_size, sizes[i][j], backgrounds)
                options = [k for k in largest[i] if k != j][:ref_choices]
                src = options[int(np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x54, i, j]).integers(len(options)))]
                meta = face_meta((image_size, image_size), face.bbox, face.kps, det_score=1.0, identity=ident.name,
                                 caption=face.caption, source=SOURCE, landmarks=face.landmarks)
                meta["caption_no_identity"] = face.caption_no_identity
                meta["ref_key"] = f"{ident.name}-{src:04d}"
                meta["pose"] = {k: round(v, 4) for k, v in face.pose.items()}
                writer.write(f"{ident.name}-{j:04d}", face.image, meta, ref=crops[(i, src)])
        writer.manifest.extra.update({
            "generator": "realisid.data.synthetic", "seed": int(seed), "image_size": int(image_size),
            "ref_size": int(ref_size), "images_per_identity": int(images_per_identity), "ref_choices": int(ref_choices),
            "backgrounds": list(backgrounds),
            "identity_indices": [indices.start, indices.stop], "pose_units": "degrees",
        })
        manifests[split] = writer.close()
        log.info("synthetic %s: %d identities x %d images = %d samples in %d shards (bins %s)", split, len(indices),
                 images_per_identity, manifests[split]["kept"], len(manifests[split]["shards"]),
                 manifests[split]["face_size_bins"])
    log.info("synthetic set written to %s in %.1f s (seed %d, %d px)", out_dir, time.perf_counter() - t_start, seed, image_size)
    return manifests
