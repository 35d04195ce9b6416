"""Synthetic people: the identity palettes and :class:`Identity`, a fixed appearance per person.

Every synthetic person (:class:`Identity`) has a fixed appearance: skin, hair colour and style, face shape,
feature proportions, glasses and facial hair, a pure function of its index and the set's seed
(:func:`make_identity`). The per-image palettes (shirt and background colours, collars, background kinds)
and the face size distribution (:func:`sample_face_size`) live here too, with the colour helpers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


FACE_SIZE_RANGE = (0.045, 0.45)  # log-uniform; covers every bin of realisid.geometry.DEFAULT_BINS and the benchmark sizes (24..192 px at 512)

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
