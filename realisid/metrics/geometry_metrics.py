"""Where the generated face landed and how it is posed, per face-scale bin.

* :class:`LocationIoU`: IoU between the detected face box and its target box; a face that was not found
  scores 0 in ``loc_iou`` (never dropped) and is excluded from ``loc_iou_found``.
* :class:`PoseError`: mean distance between detected and target 5-point landmarks, divided by the target's
  inter-ocular distance (distance between the two eye points); only found faces count.

Missing detections are NaN rows (as :func:`realisid.metrics.score_faces` returns them).
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch
from torch import Tensor

from realisid.metrics.binned import BinnedMetric, as_float_tensor

log = logging.getLogger(__name__)


def _found_rows(detected: Tensor, name: str) -> Tensor:
    """Rows that are entirely finite; a row that is partly NaN is an error."""
    flat = detected.reshape(detected.shape[0], -1)
    finite = torch.isfinite(flat)
    found = finite.all(dim=1)
    partial = finite.any(dim=1) & ~found
    if bool(partial.any()):
        i = int(partial.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] = {flat[i].tolist()} is partly NaN; mark a missed face with an all-NaN row")
    return found


def boxes_iou(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise IoU of ``(N, 4)`` boxes ``(x0, y0, x1, y1)``, like :func:`realisid.geometry.box_iou`
    (0 where the union is empty)."""
    ix = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    iy = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = ix * iy
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return torch.where(union > 0, inter / torch.where(union > 0, union, torch.ones_like(union)), torch.zeros_like(inter))


class LocationIoU(BinnedMetric):
    """IoU of detected vs target face boxes per face-scale bin.

    ``update(detected_boxes (N, 4) with NaN rows for misses, target_boxes (N, 4), face_size (N,))``.

    ``compute()``: ``loc_iou/<bin>`` (mean, misses 0), ``loc_iou_found/<bin>`` (mean over found faces),
    ``loc_found_rate/<bin>``, ``loc_n/<bin>``, ``loc_n_found/<bin>``, and the same for ``all``; empty bins NaN.
    """

    higher_is_better = True

    def __init__(self, bins: Mapping[str, Sequence[float]] | None = None, *, key_prefix: str = "", **kwargs):
        super().__init__(bins, key_prefix=key_prefix, **kwargs)
        self.add_scored_states()

    def update(self, detected_boxes: Tensor, target_boxes: Tensor, face_size: Tensor) -> None:  # type: ignore[override]
        det = as_float_tensor(detected_boxes, "detected_boxes", (4,))
        tgt = as_float_tensor(target_boxes, "target_boxes", (4,)).to(det.device)
        if det.shape[0] != tgt.shape[0]:
            raise ValueError(f"got {det.shape[0]} detected boxes for {tgt.shape[0]} target boxes; give one row per face "
                             "(NaN for a missed face)")
        if not bool(torch.isfinite(tgt).all()) or bool(((tgt[:, 2] <= tgt[:, 0]) | (tgt[:, 3] <= tgt[:, 1])).any()):
            raise ValueError(f"target_boxes must be finite, non-empty boxes (x1 > x0, y1 > y0); got {tgt.tolist()}")
        found = _found_rows(det, "detected_boxes")
        self.accumulate_scored(self.bin_of(face_size, det.shape[0]), boxes_iou(torch.nan_to_num(det), tgt), found)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        return self.scored_results("loc_iou", "loc_iou_found", "loc_found_rate", "loc_n", "loc_n_found")


class PoseError(BinnedMetric):
    """Normalised 5-point landmark error per face-scale bin (found faces only).

    ``update(detected_kps (N, 5, 2) with NaN for misses, target_kps (N, 5, 2), face_size (N,))``; the error of a
    face is ``mean_k ||d_k - t_k|| / ||t_1 - t_0||`` (points in insightface order, so ``t_0``/``t_1`` are the
    eyes).

    ``compute()``: ``pose_err/<bin>`` (mean over found faces; NaN without any), ``pose_n_found/<bin>``,
    ``pose_n/<bin>``, and the same for ``all``.
    """

    higher_is_better = False

    def __init__(self, bins: Mapping[str, Sequence[float]] | None = None, *, key_prefix: str = "", **kwargs):
        super().__init__(bins, key_prefix=key_prefix, **kwargs)
        for name in ("err_sum", "n", "n_found"):
            self.add_bin_state(name)

    def update(self, detected_kps: Tensor, target_kps: Tensor, face_size: Tensor) -> None:  # type: ignore[override]
        det = as_float_tensor(detected_kps, "detected_kps", (5, 2))
        tgt = as_float_tensor(target_kps, "target_kps", (5, 2)).to(det.device)
        if det.shape[0] != tgt.shape[0]:
            raise ValueError(f"got {det.shape[0]} detected keypoint sets for {tgt.shape[0]} targets; give one per face "
                             "(NaN for a missed face)")
        if not bool(torch.isfinite(tgt).all()):
            raise ValueError("target_kps must be finite")
        iod = (tgt[:, 1] - tgt[:, 0]).norm(dim=1)
        if bool((iod <= 0).any()):
            i = int((iod <= 0).nonzero()[0, 0])
            raise ValueError(f"target_kps[{i}] has inter-ocular distance {float(iod[i])}; the two eye points must differ")
        found = _found_rows(det, "detected_kps")
        err = (torch.nan_to_num(det) - tgt).norm(dim=2).mean(dim=1) / iod
        err = torch.where(found, err, torch.zeros_like(err))
        idx = self.bin_of(face_size, det.shape[0])
        self.accumulate("err_sum", idx, err)
        self.accumulate("n", idx, 1.0)
        self.accumulate("n_found", idx, found.to(err.dtype))

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        out: dict[str, Tensor] = {}
        out.update(self.binned_ratio("pose_err", self.err_sum, self.n_found))
        out.update(self.binned_total("pose_n_found", self.n_found))
        out.update(self.binned_total("pose_n", self.n))
        return out
