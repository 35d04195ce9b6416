"""Identity similarity per face-scale bin, and the face matching that produces its inputs.

:func:`score_faces` finds each generated face (the detected face best overlapping its target box, or nearest
to it), embeds it with the *evaluation* encoder and returns its cosine with the reference embedding.
:class:`IdentitySimilarity` accumulates those scores per bin; a face the detector misses counts as similarity
0 in ``id_sim`` (FastComposer's protocol) and is reported in ``found_rate`` - it is never dropped.

The evaluation encoder is configured separately from the conditioning encoder (scoring with the encoder the
model was conditioned on flatters it), and :meth:`IdentitySimilarity.describe` names both for tables.

An analyzer with a ``detect_in_box`` method (the embedded default's
:class:`~realisid.embedded.box_analyzer.StandInFaceAnalyzer`) is given the target box instead of detecting.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from realisid.faces.analysis import Face, as_rgb_uint8, l2_normalize
from realisid.geometry import box_iou
from realisid.metrics.binned import BinnedMetric, as_float_tensor

log = logging.getLogger(__name__)

COSINE_TOLERANCE = 1e-3  # cosines outside [-1 - tol, 1 + tol] are errors (not L2-normalised inputs)


# ------------------------------------------------------------------------------------------- metric
class IdentitySimilarity(BinnedMetric):
    """Cosine identity similarity per face-scale bin, with misses counted.

    ``update(similarity, found, face_size)``:
        * ``similarity``: ``(N,)`` cosine between each generated face's embedding and its reference; ignored
          (may be NaN) where ``found`` is False.
        * ``found``: ``(N,)`` bool, False when no face was found for that target (``None``: found where
          ``similarity`` is finite).
        * ``face_size``: ``(N,)`` target box long side / image long edge (the bin).

    ``compute()`` returns, for every bin and ``all``:
        * ``id_sim/<bin>``: mean similarity with misses scored 0 (FastComposer-style; the headline number),
        * ``id_sim_found/<bin>``: mean similarity over found faces only,
        * ``found_rate/<bin>``: found / all faces,
        * ``n/<bin>``, ``n_found/<bin>``: counts.
        A bin without faces (or, for ``id_sim_found``, without found faces) gives NaN, not 0.

    Args:
        bins: ``{name: (low, high)}`` (default :data:`realisid.geometry.DEFAULT_BINS`).
        encoder_name: the evaluation identity encoder (e.g. ``analyzer.name``); required, kept as
            ``self.encoder_name`` and named by :meth:`describe`.
        conditioning_encoder: optional name of the encoder the model was conditioned on; when it equals
            ``encoder_name`` a warning is logged (self-scoring flatters the model).
        key_prefix: prepended to every result key.
    """

    higher_is_better = True

    def __init__(self, bins: Mapping[str, Sequence[float]] | None = None, encoder_name: str = "", *,
                 conditioning_encoder: str | None = None, key_prefix: str = "", **kwargs):
        super().__init__(bins, key_prefix=key_prefix, **kwargs)
        if not isinstance(encoder_name, str) or not encoder_name.strip():
            raise ValueError(f"encoder_name {encoder_name!r} must name the evaluation identity encoder "
                             "(e.g. the face analyzer's .name), so every table says what scored the faces")
        self.encoder_name = encoder_name
        self.conditioning_encoder = conditioning_encoder
        if conditioning_encoder is not None and conditioning_encoder == encoder_name:
            log.warning("identity similarity is scored with the conditioning encoder itself (%s); this flatters the "
                        "model - configure a different evaluation encoder", encoder_name)
        self.add_scored_states()

    def update(self, similarity: Tensor, found: Tensor | None, face_size: Tensor) -> None:  # type: ignore[override]
        sim = as_float_tensor(similarity, "similarity")
        n = sim.shape[0]
        if found is None:
            found_t = torch.isfinite(sim)
        else:
            found_t = torch.as_tensor(found).detach().reshape(-1)
            if found_t.dtype != torch.bool:
                raise TypeError(f"found must be a bool tensor, got dtype {found_t.dtype}; pass e.g. similarity.isfinite()")
            if found_t.numel() != n:
                raise ValueError(f"got {found_t.numel()} found flags for {n} similarities; give one per face")
        found_t = found_t.to(sim.device)
        bad = found_t & ~torch.isfinite(sim)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"similarity at index {i} is {float(sim[i])} although found[{i}] is True; "
                             "pass found=False for faces that were not found")
        out = found_t & (sim.abs() > 1 + COSINE_TOLERANCE)
        if bool(out.any()):
            i = int(out.nonzero()[0, 0])
            raise ValueError(f"similarity {float(sim[i]):.4f} at index {i} is not a cosine in [-1, 1]; "
                             "L2-normalise both embeddings before taking their dot product")
        self.accumulate_scored(self.bin_of(face_size, n), torch.nan_to_num(sim), found_t)  # misses score 0

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        return self.scored_results("id_sim", "id_sim_found", "found_rate", "n", "n_found")

    def describe(self) -> str:
        """One line for tables: the evaluation encoder (and the conditioning one when given)."""
        text = (f"identity similarity: cosine by evaluation encoder '{self.encoder_name}'; id_sim scores faces the "
                "detector missed as 0, id_sim_found averages found faces only; empty bins are NaN")
        if self.conditioning_encoder is not None:
            text += f"; conditioning encoder '{self.conditioning_encoder}'"
            if self.conditioning_encoder == self.encoder_name:
                text += " (SAME as the evaluation encoder: flattering)"
        return text


class IdentityMargin(BinnedMetric):
    """The calibrated identity margin per face-scale bin (see :mod:`realisid.metrics.calibrated`): each generated
    face's similarity to its own reference minus its mean similarity to the other identities' references, misses
    scored 0. ``update(margin, found, face_size)``; ``compute()`` gives ``id_margin/<bin>`` (misses 0) and
    ``id_margin_found/<bin>``. Exact under DDP like every binned metric; the bootstrap intervals are the
    benchmark's job."""

    higher_is_better = True

    def __init__(self, bins: Mapping[str, Sequence[float]] | None = None, key_prefix: str = "", **kwargs):
        super().__init__(bins, key_prefix=key_prefix, **kwargs)
        self.add_scored_states()

    def update(self, margin: Tensor, found: Tensor, face_size: Tensor) -> None:  # type: ignore[override]
        m = as_float_tensor(margin, "margin")
        found_t = torch.as_tensor(found).detach().reshape(-1).to(torch.bool).to(m.device)
        if bool((found_t & ~torch.isfinite(m)).any()):
            raise ValueError("a found face has a non-finite margin; sim_other needs references of at least two identities")
        self.accumulate_scored(self.bin_of(face_size, m.shape[0]), torch.nan_to_num(m), found_t)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        out = self.scored_results("id_margin", "id_margin_found", "_found_rate", "_n", "_n_found")
        return {k: v for k, v in out.items() if not k.split("/")[0].lstrip(self.key_prefix).startswith("_")}


# ------------------------------------------------------------------------------------------- matching
def _centre(box: Sequence[float]) -> tuple[float, float]:
    return (float(box[0]) + float(box[2])) / 2.0, (float(box[1]) + float(box[3])) / 2.0


def match_face(faces: Sequence[Face], target_box: Sequence[float], min_iou: float = 0.1) -> Face | None:
    """The detected face that belongs to ``target_box``, or ``None``.

    1. the face whose box has the highest IoU with the target box, if that IoU is ``>= min_iou``;
    2. otherwise (no face overlaps enough) the face whose box centre is nearest the target box centre,
       among faces whose centre lies inside the target box (e.g. a much smaller face drawn inside it);
    3. otherwise none: the face was not found.
    Ties keep the earlier face (detectors sort by score).
    """
    if not faces:
        return None
    target = [float(v) for v in target_box]
    ious = [box_iou([float(v) for v in f.bbox], target) for f in faces]
    best = int(np.argmax(ious))
    if ious[best] >= min_iou:
        return faces[best]
    tcx, tcy = _centre(target)
    chosen, chosen_d = None, math.inf
    for f in faces:
        cx, cy = _centre(f.bbox)
        if target[0] <= cx < target[2] and target[1] <= cy < target[3]:
            d = math.hypot(cx - tcx, cy - tcy)
            if d < chosen_d:
                chosen, chosen_d = f, d
    return chosen


def _check_box(box: Any, i: int) -> list[float]:
    try:
        b = [float(v) for v in np.asarray(box, dtype=np.float64).reshape(4)]
    except (TypeError, ValueError):
        raise ValueError(f"target box {i} is {box!r}; give four numbers x0, y0, x1, y1 in pixels") from None
    if not (b[2] > b[0] and b[3] > b[1]) or not all(math.isfinite(v) for v in b):
        raise ValueError(f"target box {i} {b} is empty or not finite; need x1 > x0 and y1 > y0")
    return b


def score_faces(images: Sequence[np.ndarray], target_boxes: Sequence[Sequence[float]], ref_embeddings: Sequence[np.ndarray],
                analyzer: Any, min_iou: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs for :class:`IdentitySimilarity` (and :class:`~realisid.metrics.LocationIoU`) from generated images.

    For image ``i``: detect faces (``analyzer.detect(image)``; an analyzer with a ``detect_in_box`` method,
    such as :class:`~realisid.embedded.box_analyzer.StandInFaceAnalyzer`, is given the target box instead), pick
    the face for ``target_boxes[i]`` with :func:`match_face`, embed it (``face.embedding`` when the analyzer
    filled it, else ``analyzer.embed(image, face.kps)``) and take the cosine with the L2-normalised
    ``ref_embeddings[i]``.

    Returns ``(similarity (N,) float32 with NaN for misses, found (N,) bool, matched_boxes (N, 4) float32
    with NaN rows for misses)``.
    """
    n = len(images)
    if len(target_boxes) != n or len(ref_embeddings) != n:
        raise ValueError(f"got {n} images, {len(target_boxes)} target boxes and {len(ref_embeddings)} reference "
                         "embeddings; give one target box and one reference embedding per image")
    if not (0.0 <= float(min_iou) <= 1.0):
        raise ValueError(f"min_iou {min_iou} must lie in [0, 1]")
    in_box = callable(getattr(analyzer, "detect_in_box", None))
    sims = np.full(n, np.nan, np.float32)
    found = np.zeros(n, bool)
    boxes = np.full((n, 4), np.nan, np.float32)
    for i, (image, box, ref) in enumerate(zip(images, target_boxes, ref_embeddings)):
        image = as_rgb_uint8(image)
        target = _check_box(box, i)
        ref_vec = np.asarray(ref, dtype=np.float32).reshape(-1)
        if ref_vec.size == 0 or not np.all(np.isfinite(ref_vec)) or float(np.linalg.norm(ref_vec)) == 0.0:
            raise ValueError(f"reference embedding {i} is empty, zero or not finite; embed the reference face with "
                             "the evaluation encoder")
        faces = [analyzer.detect_in_box(image, target)] if in_box else analyzer.detect(image)
        face = match_face(faces, target, min_iou)
        if face is None:
            continue
        emb = face.embedding if face.embedding is not None else analyzer.embed(image, face.kps)
        emb = np.asarray(emb, dtype=np.float32).reshape(-1)
        if emb.shape != ref_vec.shape:
            raise ValueError(f"face {i}: the evaluation encoder gives {emb.size}-d embeddings but the reference "
                             f"embedding is {ref_vec.size}-d; embed the references with the same encoder "
                             f"({getattr(analyzer, 'name', type(analyzer).__name__)})")
        sims[i] = float(np.clip(l2_normalize(emb) @ l2_normalize(ref_vec), -1.0, 1.0))
        found[i] = True
        boxes[i] = np.asarray(face.bbox, dtype=np.float32).reshape(4)
    log.debug("score_faces: %d of %d faces found by %s", int(found.sum()), n, getattr(analyzer, "name", analyzer))
    return torch.from_numpy(sims), torch.from_numpy(found), torch.from_numpy(boxes)
