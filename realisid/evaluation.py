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

from realisid.geometry import bins_from_config, face_size, scale_bin

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
    return ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def face_crop_uint8(img: torch.Tensor, box: Sequence[float], size: int = 64) -> torch.Tensor:
    """The square face crop (box expanded 1.3x, inside the image) as (3, size, size) uint8, for face FID."""
    from realisid.data.pipeline import ID_CROP_EXPAND
    from realisid.geometry import expand_square_box

    x0, y0, x1, y1 = expand_square_box(box, ID_CROP_EXPAND, img.shape[-1], img.shape[-2])
    crop = F.interpolate(img[None, :, y0:y1, x0:x1].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return ((crop.clamp(-1, 1) + 1) * 127.5).round().byte()


class Evaluator:
    def __init__(self, analyzer, bins, fid_feature, fid_name: str, conditioning_name: str):
        self.analyzer, self.bins = analyzer, bins_from_config(bins)
        self.fid_feature, self.fid_name, self.conditioning_name = fid_feature, fid_name, conditioning_name
        self.standin_faces = hasattr(analyzer, "detect_in_box")

    def describe(self) -> dict[str, str]:
        return {"conditioning identity encoder": self.conditioning_name, "evaluation face analyzer": self.analyzer.name,
                "FID features": self.fid_name,
                "location / pose": "not measured (stand-in analyzer takes faces at their target boxes)" if self.standin_faces else "measured"}

    def reference_embedding(self, ref: np.ndarray) -> np.ndarray:
        """Evaluation-encoder embedding of a reference face crop (the crop's central face)."""
        if self.standin_faces:
            from realisid.data.pipeline import id_crop_face_box

            return self.analyzer.detect_in_box(ref, list(id_crop_face_box(ref.shape[0]))).embedding
        faces = self.analyzer.detect(ref)
        if not faces:
            raise ValueError(f"no face found by {self.analyzer.name} in a reference crop; evaluation needs references with faces")
        f = faces[0]
        return f.embedding if f.embedding is not None else self.analyzer.embed(ref, f.kps)

    def new_metrics(self) -> dict[str, Any]:
        from realisid.metrics import BinnedFID, IdentitySimilarity, LocationIoU, PoseError

        m = {"id": IdentitySimilarity(self.bins, encoder_name=self.analyzer.name, conditioning_encoder=self.conditioning_name),
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
            metrics["fid_image"].update(((img.clamp(-1, 1) + 1) * 127.5).round().byte()[None], real=True, face_size=size)

    @torch.no_grad()
    def evaluate(self, pipe, cases: Sequence[Case], metrics: Mapping[str, Any], *, sample_kwargs: Mapping[str, Any],
                 setting: str = "default", progress: Callable | None = None) -> tuple[list[dict], list[torch.Tensor]]:
        """Generate every case, update ``metrics``; returns one row per person and the generated images."""
        from realisid.metrics import match_face, score_faces
        from realisid.pipeline import Person

        rows, images = [], []
        for case in cases:
            people = [Person(box=b, id_image=i, id_mask=m) for b, i, m in zip(case.boxes, case.id_images, case.id_masks)]
            out = pipe(case.prompt, people, seed=case.seed, output_type="pt", **sample_kwargs)
            img = out.images[0].cpu()
            images.append(img)
            arr = to_uint8(img)
            refs = [self.reference_embedding(to_uint8(i)) for i in case.id_images]
            sim, found, matched = score_faces([arr] * len(people), case.boxes, refs, self.analyzer)
            R = img.shape[-1]
            sizes = torch.tensor([face_size(b, R, R) for b in case.boxes])
            metrics["id"].update(torch.as_tensor(sim), torch.as_tensor(found), sizes)
            for b, s in zip(case.boxes, sizes):
                metrics["fid_face"].update(face_crop_uint8(img, b)[None], real=False, face_size=s[None])
            metrics["fid_image"].update(((img.clamp(-1, 1) + 1) * 127.5).round().byte()[None], real=False, face_size=sizes.min()[None])
            pose_err = [float("nan")] * len(people)
            iou = [float("nan")] * len(people)
            if "loc" in metrics:
                metrics["loc"].update(torch.as_tensor(matched, dtype=torch.float32), torch.tensor(case.boxes, dtype=torch.float32), sizes)
                faces = self.analyzer.detect(arr)
                det_kps, tgt_kps = [], []
                for j, (b, meta) in enumerate(zip(case.boxes, out.people)):
                    f = match_face(faces, b)
                    det_kps.append(f.kps if f is not None else np.full((5, 2), np.nan, np.float32))
                    tgt_kps.append(np.asarray(meta["kps"], np.float32))
                    iod = float(np.linalg.norm(tgt_kps[-1][1] - tgt_kps[-1][0])) or 1.0
                    pose_err[j] = float(np.linalg.norm(det_kps[-1] - tgt_kps[-1], axis=1).mean() / iod)
                metrics["pose"].update(torch.tensor(np.stack(det_kps)), torch.tensor(np.stack(tgt_kps)), sizes)
                from realisid.geometry import box_iou

                iou = [box_iou(m, b) if np.all(np.isfinite(m)) else 0.0 for m, b in zip(np.asarray(matched), case.boxes)]
            for j, b in enumerate(case.boxes):
                rows.append({"setting": setting, **case.tags, "person": j, "identity": case.identities[j],
                             "box": ",".join(f"{v:.1f}" for v in b), "face_size": round(float(sizes[j]), 4),
                             "bin": scale_bin(float(sizes[j]), self.bins), "similarity": float(sim[j]) if found[j] else 0.0,
                             "found": bool(found[j]), "loc_iou": iou[j], "pose_err": pose_err[j]})
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
    from realisid.metrics import StandInFaceAnalyzer, StandInFeatures

    e = cfg.evaluation
    if e.encoder == "standin":
        analyzer = StandInFaceAnalyzer(e.standin_path, name=f"standin-arcface-synthetic (evaluation copy: {e.standin_path}) on the "
                                                            "target box; location and found-rate not measured")
    elif e.encoder == "analyzer":
        if not cfg.faces.model_dir:
            raise ValueError("evaluation.encoder=analyzer needs faces.model_dir=/path/to/insightface/models (detector + recognition)")
        from realisid.faces import load_face_analyzer

        analyzer = load_face_analyzer(cfg.faces)
    else:
        raise ValueError(f"evaluation.encoder={e.encoder!r}; valid: standin, analyzer")
    if e.fid_features == "standin":
        feat = StandInFeatures()
        name = getattr(feat, "name", "standin-random-convnet-64")
    elif e.fid_features == "inception":
        from realisid.metrics import INCEPTION_NAME, load_inception

        if not e.inception_weights:
            raise ValueError("evaluation.fid_features=inception needs evaluation.inception_weights=/path/to/weights-inception-2015-12-05.pt")
        feat, name = load_inception(e.inception_weights), INCEPTION_NAME
    else:
        raise ValueError(f"evaluation.fid_features={e.fid_features!r}; valid: standin, inception")
    return Evaluator(analyzer, cfg.bins, feat, name, conditioning_name)
