"""The embedded default's evaluation "analyzer" on the target box (``evaluation.encoder: standin``).

:class:`StandInFaceAnalyzer`: there is no detector in this analyzer, so it does not detect anything - it takes the
target box as the face and embeds it with the stand-in identity network. Its found-rate is 1 by construction and
it measures no location; :func:`~realisid.metrics.score_faces` gives it the target box (``detect_in_box``).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from realisid.embedded.analyzer.analyzer import box_from_kps, embed_box
from realisid.embedded.standin import load_standin
from realisid.faces.analysis import Face, as_rgb_uint8
from realisid.geometry import FRONTAL_KPS
from realisid.metrics.identity import _check_box


class StandInFaceAnalyzer:
    """The embedded default's evaluation analyzer: the stand-in identity network on the TARGET box.

    This analyzer has no detector, so it does not detect: ``detect_in_box(image,
    box)`` returns one :class:`~realisid.faces.Face` at exactly ``box`` (keypoints from a frontal template,
    ``det_score`` NaN because nothing was detected) with the stand-in network's embedding of
    :func:`realisid.embedded.standin.identity_crop`. Scored through :func:`~realisid.metrics.score_faces` every face is "found"
    and sits exactly in its box, so found-rate and location IoU measure nothing with it; only identity
    similarity is measured (by the stand-in, whose numbers are not ArcFace similarities). Its ``name``
    says so.

    Args:
        standin_model: a :class:`~realisid.embedded.standin.StandInArcFace` (e.g. from ``load_standin(path)``)
            or the path of a trained one.
        name: overrides the default name (keep "stand-in" and "location not measured" in it).
    """

    def __init__(self, standin_model: Any, name: str | None = None):
        if isinstance(standin_model, (str, bytes)) or hasattr(standin_model, "__fspath__"):
            standin_model = load_standin(str(standin_model))
        if not isinstance(standin_model, torch.nn.Module) or not hasattr(standin_model, "image_size"):
            raise TypeError(f"standin_model must be a StandInArcFace (realisid.embedded.standin.load_standin(path)) or its "
                            f"path, got {type(standin_model).__name__}")
        self.model = standin_model
        model_name = getattr(standin_model, "name", type(standin_model).__name__)
        self.name = name or (f"{model_name} on the target box (stand-in analyzer: no face detector, faces are taken "
                             "at their target boxes, so location and found-rate are not measured by it)")
        self.embedding_dim = int(getattr(standin_model, "embed_dim"))

    def detect_in_box(self, image: np.ndarray, box: Sequence[float]) -> Face:
        """One face at ``box`` (not detected: taken as given) with template keypoints and its embedding."""
        image = as_rgb_uint8(image)
        b = _check_box(box, 0)
        kps = FRONTAL_KPS * np.array([b[2] - b[0], b[3] - b[1]], np.float32) + np.array([b[0], b[1]], np.float32)
        return Face(bbox=np.array(b, np.float32), kps=kps, det_score=float("nan"), embedding=embed_box(self.model, image, b))

    def detect(self, image: np.ndarray) -> list[Face]:
        raise NotImplementedError(f"{self.name} cannot detect faces; call detect_in_box(image, target_box) "
                                  "(score_faces does) or configure a real face detector (faces.model_dir)")

    def embed(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """Embedding of the face whose box is fitted to ``kps`` through the frontal template."""
        return embed_box(self.model, as_rgb_uint8(image), box_from_kps(kps))
