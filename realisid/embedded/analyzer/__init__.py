"""A synthetic face analyzer: a small CenterNet-style detector with 5 key points, trained on the synthetic
shards' exact boxes and key points, and the evaluation stand-in encoder for embeddings.

It is a STAND-IN (named so in every table): it only knows the procedural faces of the embedded default. It
exists so that found-rate, location IoU and landmark error are measured on the embedded default instead of
being "n/a", behind the same :class:`~realisid.faces.FaceAnalyzer` interface as insightface. Importing this
package registers it as ``faces.kind: synthetic`` (:mod:`realisid.faces.registry` imports it on first use).

- ``model``: :class:`FaceCenterNet`, the heat-map and regression targets, the focal and detector losses,
  :func:`decode`;
- ``analyzer``: :class:`SyntheticFaceAnalyzer`, :func:`save_detector`, :func:`load_synthetic_analyzer`,
  :func:`make_synthetic_analyzer` (the registered factory);
- ``training``: negatives (:func:`faceless`, :func:`noise_image`), :func:`make_batch`, :func:`train_detector`;
- ``accuracy``: :func:`detector_accuracy` (per face-size bin), :func:`negative_accuracy`.
"""
from .accuracy import detector_accuracy, negative_accuracy
from .analyzer import (
    CONFIG_FILE, DETECTOR_NAME, WEIGHTS_FILE, SyntheticFaceAnalyzer, box_from_kps, load_synthetic_analyzer,
    make_synthetic_analyzer, save_detector,
)
from .model import STRIDE, FaceCenterNet, decode, detector_loss, focal_loss, gaussian_targets, regression_targets
from .training import FLIP_KPS, MAX_FACES, faceless, make_batch, noise_image, train_detector

__all__ = [
    "CONFIG_FILE", "DETECTOR_NAME", "FLIP_KPS", "MAX_FACES", "STRIDE", "WEIGHTS_FILE", "FaceCenterNet",
    "SyntheticFaceAnalyzer", "box_from_kps", "decode", "detector_accuracy", "detector_loss", "faceless", "focal_loss",
    "gaussian_targets", "load_synthetic_analyzer", "make_batch", "make_synthetic_analyzer", "negative_accuracy",
    "noise_image", "regression_targets", "save_detector", "train_detector",
]
