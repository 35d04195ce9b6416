"""Metrics per face-scale bin (torchmetrics ``Metric`` subclasses, exact under DDP).

* :class:`IdentitySimilarity` + :func:`score_faces` (and the embedded default's
  :class:`~realisid.embedded.box_analyzer.StandInFaceAnalyzer`): identity similarity with misses scored 0,
  found-rate, similarity over found faces; :class:`IdentityMargin`: the calibrated margin
  (:mod:`realisid.metrics.calibrated` adds the ceiling, retention and bootstrap intervals).
* :class:`BinnedFID` (with local Inception weights or the embedded default's
  :class:`~realisid.embedded.fid_features.StandInFeatures`): FID per bin, feature net named.
* :class:`LocationIoU`, :class:`PoseError`: where the face landed and how its landmarks match the target.

All ``compute()`` results are flat dicts ``{"<metric>/<bin>": tensor, ..., "<metric>/all": tensor}``; a bin
without faces gives NaN, not 0. See docs/metrics.md.
"""
from realisid.geometry import FRONTAL_KPS
from realisid.metrics.binned import ALL, BinnedMetric, bin_index, normalize_bins, safe_ratio
from realisid.metrics.fid import INCEPTION_NAME, INCEPTION_URL, BinnedFID, load_inception
from realisid.metrics.geometry_metrics import LocationIoU, PoseError, boxes_iou
from realisid.metrics.identity import IdentityMargin, IdentitySimilarity, match_face, score_faces

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
    "bin_index",
    "boxes_iou",
    "load_inception",
    "match_face",
    "normalize_bins",
    "safe_ratio",
    "score_faces",
]
