"""Metrics per face-scale bin (torchmetrics ``Metric`` subclasses, exact under DDP).

* :class:`IdentitySimilarity` + :func:`score_faces` (and :class:`StandInFaceAnalyzer` for the embedded default):
  identity similarity with misses scored 0, found-rate, similarity over found faces; :class:`IdentityMargin`: the
  calibrated margin (:mod:`realisid.metrics.calibrated` adds the ceiling, retention and bootstrap intervals).
* :class:`BinnedFID` (with :class:`StandInFeatures` or local Inception weights): FID per bin, feature net named.
* :class:`LocationIoU`, :class:`PoseError`: where the face landed and how its landmarks match the target.

All ``compute()`` results are flat dicts ``{"<metric>/<bin>": tensor, ..., "<metric>/all": tensor}``; a bin
without faces gives NaN, not 0. See docs/metrics.md.
"""
from realisid.metrics.binned import ALL, BinnedMetric, bin_index, normalize_bins, safe_ratio
from realisid.metrics.fid import INCEPTION_NAME, INCEPTION_URL, BinnedFID, StandInFeatures, load_inception
from realisid.metrics.geometry_metrics import LocationIoU, PoseError, boxes_iou
from realisid.metrics.identity import FRONTAL_KPS, IdentityMargin, IdentitySimilarity, StandInFaceAnalyzer, match_face, score_faces

__all__ = [
    "ALL",
    "BinnedFID",
    "BinnedMetric",
    "FRONTAL_KPS",
    "INCEPTION_NAME",
    "INCEPTION_URL",
    "IdentityMargin",
    "IdentitySimilarity",
    "LocationIoU",
    "PoseError",
    "StandInFaceAnalyzer",
    "StandInFeatures",
    "bin_index",
    "boxes_iou",
    "load_inception",
    "match_face",
    "normalize_bins",
    "safe_ratio",
    "score_faces",
]
