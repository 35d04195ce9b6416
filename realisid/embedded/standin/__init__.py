"""Stand-in identity encoder: a small ArcFace-style network trained on the synthetic identities.

The embedded default has no real ArcFace weights, so identity tokens and identity metrics use this network
instead. It is named :data:`STANDIN_NAME` in every log, config and table so nobody mistakes its numbers for
real ArcFace similarities.

- ``model``: :class:`StandInArcFace`, :class:`ArcMarginHead`, the crops (:func:`identity_crop`,
  :func:`context_crop`), :func:`embed_crops` / :func:`embed_faces`, :func:`load_standin`, the file names;
- ``data``: :class:`FaceSet`, :func:`load_face_set` (every crop of a set of shards, in memory);
- ``training``: augmentation, the training loop, :func:`train_standin`;
- ``verification``: pairs, threshold, AUC, :func:`verification_stats`, :func:`evaluate_standin`.
"""
from .data import FaceSet, load_face_set
from .model import (
    CONFIG_FILE, CROP_FACTOR, MISSING_HINT, STANDIN_NAME, WEIGHTS_FILE, ArcMarginHead, StandInArcFace, context_crop,
    embed_crops, embed_faces, identity_crop, load_standin,
)
from .training import train_standin
from .verification import best_threshold, evaluate_standin, verification_pairs, verification_stats

__all__ = [
    "CONFIG_FILE", "CROP_FACTOR", "MISSING_HINT", "STANDIN_NAME", "WEIGHTS_FILE", "ArcMarginHead", "FaceSet",
    "StandInArcFace", "best_threshold", "context_crop", "embed_crops", "embed_faces", "evaluate_standin",
    "identity_crop", "load_face_set", "load_standin", "train_standin", "verification_pairs", "verification_stats",
]
