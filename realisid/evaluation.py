"""Identity fidelity, location, pose and FID per face-size bin: the core of the metric callback and the benchmark.

The evaluation identity encoder is configured apart from the conditioning encoder (``evaluation.encoder``),
and every report names both, the face analyzer and the FID feature network.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from realisid.embedded.box_analyzer import StandInFaceAnalyzer
from realisid.embedded.fid_features import StandInFeatures
from realisid.faces import NEEDS_MODEL_DIR, load_face_analyzer
from realisid.faces.analysis import l2_normalize
from realisid.geometry import FRONTAL_KPS, bins_from_config, box_iou, expand_square_box, face_size, scale_bin
from realisid.images import ID_CROP_EXPAND, hwc_uint8, id_crop_face_box, uint8_from_signed
from realisid.metrics import (BinnedFID, INCEPTION_NAME, IdentityMargin, IdentitySimilarity, LocationIoU, PoseError,
                              load_inception, match_face)
from realisid.metrics.calibrated import other_similarity, scored
from realisid.pipeline import Person

log = logging.getLogger(__name__)


@dataclass
class Case:
    """One image to generate: a prompt and, per person, a reference and a target box."""

    prompt: str
    boxes: list[list[float]]
    id_images: list[torch.Tensor]          # (3, S, S) reference crops in [-1, 1]
    id_masks: list[torch.Tensor]
    identities: list[str]
    seed: int = 0
    tags: dict = field(default_factory=dict)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] to HxWx3 uint8."""
    return hwc_uint8(img)


def face_crop_uint8(img: torch.Tensor, box: Sequence[float], size: int = 64) -> torch.Tensor:
    """The square face crop (box expanded 1.3x, inside the image) as (3, size, size) uint8, for face FID."""

    x0, y0, x1, y1 = expand_square_box(box, ID_CROP_EXPAND, img.shape[-1], img.shape[-2])
    crop = F.interpolate(img[None, :, y0:y1, x0:x1].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return uint8_from_signed(crop)


class Evaluator:
    def __init__(self, analyzer, bins, fid_feature, fid_name: str, conditioning_name: str):
        self.analyzer, self.bins = analyzer, bins_from_config(bins)
        self.fid_feature, self.fid_name, self.conditioning_name = fid_feature, fid_name, conditioning_name
        self.standin_faces = hasattr(analyzer, "detect_in_box")

    def describe(self) -> dict[str, str]:
        out = {"conditioning identity encoder": self.conditioning_name, "evaluation face analyzer": self.analyzer.name,
               "FID features": self.fid_name,
               "location / pose": "not measured (stand-in analyzer takes faces at their target boxes)" if self.standin_faces
               else f"measured by {self.analyzer.name}"}
        thresh = getattr(self.analyzer, "det_thresh", None)  # insightface, yunet-sface, dlib
        if thresh is None:
            thresh = getattr(self.analyzer, "threshold", None)  # the synthetic analyzer
        if thresh is not None:  # what counts as found (faces.det_thresh)
            out["face detection threshold"] = f"{float(thresh):g}"
        return out

    def reference_embedding(self, ref: np.ndarray) -> np.ndarray:
        """Evaluation-encoder embedding of a reference face crop (cut by ``identity_crop``, so the face is its
        central square): the face the analyzer finds there, or, if it finds none, the known central box."""

        box = list(id_crop_face_box(ref.shape[0]))
        if self.standin_faces:
            return self.analyzer.detect_in_box(ref, box).embedding

        f = match_face(self.analyzer.detect(ref), box)
        if f is None:
            log.debug("no face found by %s in a reference crop; embedding its central face box", self.analyzer.name)
            kps = FRONTAL_KPS * np.array([box[2] - box[0], box[3] - box[1]], np.float32) + np.array(box[:2], np.float32)
            return l2_normalize(self.analyzer.embed(ref, kps))
        return l2_normalize(f.embedding if f.embedding is not None else self.analyzer.embed(ref, f.kps))

    def reference_bank(self, references: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """``{identity: embedding}`` of reference crops ((3, S, S) in [-1, 1]), for sim_ref and sim_other."""
        return {k: self.reference_embedding(to_uint8(v)) for k, v in references.items()}

    def find_faces(self, image: np.ndarray, boxes: Sequence[Sequence[float]]) -> list[tuple[Any, np.ndarray | None]]:
        """For each target box: the analyzer's face for it (or None) and that face's embedding. The image is
        analysed once, whatever the number of boxes."""

        if self.standin_faces:
            faces = [self.analyzer.detect_in_box(image, list(b)) for b in boxes]
        else:
            detected = self.analyzer.detect(image)
            faces = [match_face(detected, list(b)) for b in boxes]
        out = []
        for f in faces:
            emb = None
            if f is not None:
                emb = l2_normalize(f.embedding if f.embedding is not None else self.analyzer.embed(image, f.kps))
            out.append((f, emb))
        return out

    def identity_rows(self, image: np.ndarray, boxes: Sequence[Sequence[float]], identities: Sequence[str],
                      bank: Mapping[str, np.ndarray]) -> list[dict]:
        """Per box: found, the matched face, sim_ref / sim_other / margin (misses score 0, see
        :mod:`realisid.metrics.calibrated`), location IoU and landmark error against ``kps`` when known."""

        rows = []
        for (face, emb), box, ident in zip(self.find_faces(image, boxes), boxes, identities):
            if face is None:
                row = scored(0.0, 0.0, False)
            else:  # with a single identity in play there is no stranger to compare with: sim_other is NaN
                row = scored(float(emb @ bank[ident]), other_similarity(emb, bank, ident) if len(bank) > 1 else float("nan"), True)
            row["face"] = face
            rows.append(row)
        return rows

    def new_metrics(self) -> dict[str, Any]:
        m = {"id": IdentitySimilarity(self.bins, encoder_name=self.analyzer.name, conditioning_encoder=self.conditioning_name),
             "margin": IdentityMargin(self.bins),
             "fid_face": BinnedFID(self.bins, feature=self.fid_feature, feature_name=self.fid_name, key_prefix="face_"),
             "fid_image": BinnedFID(self.bins, feature=self.fid_feature, feature_name=self.fid_name, key_prefix="image_")}
        if not self.standin_faces:
            m["loc"] = LocationIoU(self.bins)
            m["pose"] = PoseError(self.bins)
        return m

    def add_real(self, metrics: Mapping[str, Any], images: Sequence[torch.Tensor], boxes: Sequence[Sequence[float]]) -> None:
        """Real images (and their face crops) for the FID reference side."""
        for img, box in zip(images, boxes):
            size = torch.tensor([face_size(box, img.shape[-1], img.shape[-2])])
            metrics["fid_face"].update(face_crop_uint8(img, box)[None], real=True, face_size=size)
            metrics["fid_image"].update(uint8_from_signed(img)[None], real=True, face_size=size)

    def real_rows(self, examples: Sequence[Mapping[str, Any]], bank: Mapping[str, np.ndarray], exclude: set[str] = frozenset(),
                  setting: str = "real") -> list[dict]:
        """The ceiling's rows: real photos of the bank's identities (except the keys in ``exclude``, the photos the
        references were cut from), scored exactly as generated faces are."""
        rows = []
        for ex in examples:
            ident = ex["identity"]
            if ident not in bank or ex["key"] in exclude:
                continue
            img = ex["image"]
            box = [float(v) for v in ex["face_box"]]
            r = self.identity_rows(to_uint8(img), [box], [ident], bank)[0]
            size = face_size(box, img.shape[-1], img.shape[-2])
            rows.append({"setting": setting, "key": ex["key"], "identity": ident, "face_size": round(size, 4),
                         "bin": scale_bin(size, self.bins), **{k: r[k] for k in ("found", "sim_ref", "sim_other", "margin")}})
        return rows

    @torch.no_grad()
    def evaluate(self, pipe, cases: Sequence[Case], metrics: Mapping[str, Any], *, sample_kwargs: Mapping[str, Any],
                 setting: str = "default", progress: Callable | None = None,
                 bank: Mapping[str, np.ndarray] | None = None) -> tuple[list[dict], list[torch.Tensor]]:
        """Generate every case, update ``metrics``; returns one row per person and the generated images.

        ``bank``: reference embeddings of every identity in play (:meth:`reference_bank`); default: the cases' own."""

        if bank is None:
            refs: dict[str, torch.Tensor] = {}
            for case in cases:
                refs.update({i: img for i, img in zip(case.identities, case.id_images) if i not in refs})
            bank = self.reference_bank(refs)
        rows, images = [], []
        for case in cases:
            people = [Person(box=b, id_image=i, id_mask=m) for b, i, m in zip(case.boxes, case.id_images, case.id_masks)]
            out = pipe(case.prompt, people, seed=case.seed, output_type="pt", **sample_kwargs)
            img = out.images[0].cpu()
            images.append(img)
            arr = to_uint8(img)
            scored_rows = self.identity_rows(arr, case.boxes, case.identities, bank)
            R = img.shape[-1]
            sizes = torch.tensor([face_size(b, R, R) for b in case.boxes])
            found = torch.tensor([bool(r["found"]) for r in scored_rows])
            metrics["id"].update(torch.tensor([r["sim_ref"] for r in scored_rows]), found, sizes)
            if len(bank) > 1:
                metrics["margin"].update(torch.tensor([r["margin"] for r in scored_rows]), found, sizes)
            for b, s in zip(case.boxes, sizes):
                metrics["fid_face"].update(face_crop_uint8(img, b)[None], real=False, face_size=s[None])
            metrics["fid_image"].update(uint8_from_signed(img)[None], real=False, face_size=sizes.min()[None])
            pose_err = [float("nan")] * len(people)
            iou = [float("nan")] * len(people)
            if "loc" in metrics:
                matched = np.array([r["face"].bbox if r["face"] is not None else np.full(4, np.nan) for r in scored_rows], np.float32)
                metrics["loc"].update(torch.from_numpy(matched), torch.tensor(case.boxes, dtype=torch.float32), sizes)
                det_kps = np.stack([r["face"].kps if r["face"] is not None else np.full((5, 2), np.nan, np.float32) for r in scored_rows])
                tgt_kps = np.stack([np.asarray(meta["kps"], np.float32) for meta in out.people])
                metrics["pose"].update(torch.from_numpy(det_kps), torch.from_numpy(tgt_kps), sizes)
                for j in range(len(people)):
                    iod = float(np.linalg.norm(tgt_kps[j][1] - tgt_kps[j][0])) or 1.0
                    pose_err[j] = float(np.linalg.norm(det_kps[j] - tgt_kps[j], axis=1).mean() / iod)
                    iou[j] = box_iou(matched[j], case.boxes[j]) if np.all(np.isfinite(matched[j])) else 0.0
            for j, b in enumerate(case.boxes):
                r = scored_rows[j]
                rows.append({"setting": setting, **case.tags, "person": j, "identity": case.identities[j],
                             "box": ",".join(f"{v:.1f}" for v in b), "face_size": round(float(sizes[j]), 4),
                             "bin": scale_bin(float(sizes[j]), self.bins), "similarity": r["sim_ref"], "sim_ref": r["sim_ref"],
                             "sim_other": r["sim_other"], "margin": r["margin"], "found": bool(r["found"]), "loc_iou": iou[j],
                             "pose_err": pose_err[j]})
            if progress is not None:
                progress()
        return rows, images


def compute_all(metrics: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in metrics.values():
        out.update({k: float(v) for k, v in m.compute().items()})
    return out


def build_evaluator(cfg, conditioning_name: str) -> Evaluator:
    """The analyzer and FID features that ``evaluation.*`` asks for."""

    e = cfg.evaluation
    if e.encoder == "standin":
        analyzer = StandInFaceAnalyzer(e.standin_path, name=f"standin-arcface-synthetic (evaluation copy: {e.standin_path}) on the "
                                                            "target box; location and found-rate not measured")
    elif e.encoder == "analyzer":
        from omegaconf import OmegaConf

        if cfg.faces.kind in NEEDS_MODEL_DIR and not cfg.faces.model_dir:
            raise ValueError(f"evaluation.encoder=analyzer with faces.kind={cfg.faces.kind} needs faces.model_dir (its detector and "
                             "recognition models); or faces.kind=yunet-sface / dlib, which ship in packages")
        analyzer = load_face_analyzer(OmegaConf.to_container(cfg.faces, resolve=True))
    else:
        raise ValueError(f"evaluation.encoder={e.encoder!r}; valid: standin, analyzer")
    if e.fid_features == "standin":
        feat = StandInFeatures()
        name = getattr(feat, "name", "standin-random-convnet-64")
    elif e.fid_features == "inception":
        if not e.inception_weights:
            raise ValueError("evaluation.fid_features=inception needs evaluation.inception_weights=/path/to/weights-inception-2015-12-05.pt")
        feat, name = load_inception(e.inception_weights), INCEPTION_NAME
    else:
        raise ValueError(f"evaluation.fid_features={e.fid_features!r}; valid: standin, inception")
    return Evaluator(analyzer, cfg.bins, feat, name, conditioning_name)
