"""Procedural synthetic faces with exact boxes and landmarks, written to real webdataset shards.

This is the embedded default data set (docs/embedded.md): no download, a few seconds on
a laptop CPU, and deterministic for a seed. Every synthetic person (:class:`Identity`) has a fixed
appearance: skin, hair colour and style, face shape, feature proportions, glasses and facial hair. Each
image (:func:`render_face`) varies the nuisances: head pose (yaw, roll, pitch), expression (smile, mouth
open, eye openness, brow raise, gaze), face size and location, background, shirt colour and collar.

One concept per module:

- ``identity``: the palettes, :class:`Identity`, :func:`make_identity`, the colour helpers and
  :func:`sample_face_size`;
- ``geometry``: the head frame (face box, key points), pose and expression draws, head placement and the
  feature layout; the pose units;
- ``painter``: the drawing primitives (head-frame painter, arcs, bands, pixel grid, supersampling);
- ``background``: the backgrounds and the words naming them; ``captions``: the expression word and captions;
- ``parts``: one painter per part (body, hair, neck, ears, head, facial hair, nose, mouth, eyes, brows,
  glasses);
- ``render``: :func:`render_face` (the draws, the parts back to front, box, key points, landmarks, caption)
  and :class:`RenderedFace`;
- ``writer``: :func:`generate_synthetic_shards` (train and held-out val shards with reference crops).
"""
from .captions import MAX_CAPTION
from .identity import (
    BACKGROUNDS, COLLARS, FACE_SIZE_RANGE, FACIAL_HAIR, GLASSES, HAIR_STYLES, RGB, Identity, make_identity,
    sample_face_size,
)
from .render import RenderedFace, render_face
from .writer import FACE_MODEL, SOURCE, generate_synthetic_shards

__all__ = [
    "BACKGROUNDS", "COLLARS", "FACE_MODEL", "FACE_SIZE_RANGE", "FACIAL_HAIR", "GLASSES", "HAIR_STYLES", "MAX_CAPTION",
    "RGB", "SOURCE", "Identity", "RenderedFace", "generate_synthetic_shards", "make_identity", "render_face",
    "sample_face_size",
]
