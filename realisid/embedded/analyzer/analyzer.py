"""The synthetic face analyzer: :class:`~.model.FaceCenterNet` finds faces and 5 points, the evaluation stand-in
encoder embeds them; saving and loading it, and its ``faces.kind: synthetic`` registration.

Images are resized so their long side is ``input_size`` (up or down) and padded to a square; coordinates are
mapped back.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from realisid.embedded.standin import identity_crop, load_standin
from realisid.faces.analysis import Face, as_rgb_uint8, l2_normalize
from realisid.faces.registry import register_face_analyzer
from realisid.geometry import FRONTAL_KPS
from realisid.images import signed_from_uint8

from .model import FaceCenterNet, decode

DETECTOR_NAME = "synthetic-face-detector (stand-in trained on synthetic faces)"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def box_from_kps(kps: np.ndarray) -> list[float]:
    """The box whose :data:`FRONTAL_KPS` best fit ``kps`` (least squares, per axis: p = x0 + w * t)."""
    k = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    box = []
    for axis in (0, 1):
        t = FRONTAL_KPS[:, axis].astype(np.float64)
        a = np.stack([np.ones_like(t), t], 1)
        (origin, side), *_ = np.linalg.lstsq(a, k[:, axis], rcond=None)
        box.append((origin, side))
    (x0, w), (y0, h) = box
    if not (w > 0 and h > 0):
        raise ValueError(f"kps {k.tolist()} do not look like a face (eyes above mouth, left eye left of right eye)")
    # rounded to 1e-3 px so float noise in the fit cannot tip the crop's integer rounding (ceil of the side)
    return [round(float(v), 3) for v in (x0, y0, x0 + w, y0 + h)]


def embed_box(model: torch.nn.Module, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The unit-length embedding a stand-in identity network gives the :func:`identity_crop` of ``box``, on the
    model's device and in eval mode (its mode is restored afterwards)."""
    crop = identity_crop(image, [float(v) for v in box], int(model.image_size))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            emb = model(crop.unsqueeze(0).to(device))[0]
    finally:
        model.train(was_training)
    return l2_normalize(emb.float().cpu().numpy())


class SyntheticFaceAnalyzer:
    """The embedded default's face analyzer: :class:`FaceCenterNet` finds faces and 5 points; the evaluation
    stand-in identity encoder embeds the face crop. A stand-in for insightface, for synthetic faces only."""

    def __init__(self, detector: FaceCenterNet, input_size: int, threshold: float, encoder=None, name: str | None = None):
        self.detector = detector.eval().requires_grad_(False)
        self.input_size = int(input_size)
        self.threshold = float(threshold)
        self.encoder = encoder
        enc = getattr(encoder, "name", None)
        self.name = name or (DETECTOR_NAME + (f" + {enc} embeddings" if enc else ""))
        self.embedding_dim = int(encoder.embed_dim) if encoder is not None else None

    def _prepare(self, image: np.ndarray) -> tuple[torch.Tensor, float]:
        H, W = image.shape[:2]
        s = self.input_size / float(max(H, W))
        x = signed_from_uint8(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None])
        h, w = max(1, round(H * s)), max(1, round(W * s))
        if (h, w) != (H, W):
            x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=s < 1, align_corners=False)
        x = F.pad(x, (0, self.input_size - w, 0, self.input_size - h), value=-1.0)
        return x, s

    @torch.no_grad()
    def detect(self, image: np.ndarray) -> list[Face]:
        image = as_rgb_uint8(image)
        x, s = self._prepare(image)
        found = decode(self.detector(x), self.threshold)[0]
        faces = []
        for f in found:
            bbox, kps = f["bbox"] / s, f["kps"] / s
            emb = embed_box(self.encoder, image, bbox) if self.encoder is not None else None
            faces.append(Face(bbox=bbox, kps=kps, det_score=f["score"], embedding=emb))
        return faces

    def embed(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """Embedding of the face whose box the 5 points imply (frontal template fit)."""
        if self.encoder is None:
            raise ValueError(f"{self.name} has no identity encoder; set faces.recognizer to a stand-in encoder folder")
        return embed_box(self.encoder, as_rgb_uint8(image), box_from_kps(kps))


def save_detector(model: FaceCenterNet, out_dir: str, *, input_size: int, threshold: float, stats: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, os.path.join(out_dir, WEIGHTS_FILE),
              metadata={"name": DETECTOR_NAME})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump({"name": DETECTOR_NAME, "architecture": model.config, "input_size": int(input_size), "threshold": float(threshold),
                   "stats": dict(stats)}, f, indent=2)


def load_synthetic_analyzer(model_dir: str, recognizer: str | None = None, threshold: float | None = None) -> SyntheticFaceAnalyzer:
    """The analyzer from a folder :func:`save_detector` wrote, with the stand-in encoder at ``recognizer``."""
    from safetensors.torch import load_file

    cfg_path, weights = os.path.join(str(model_dir), CONFIG_FILE), os.path.join(str(model_dir), WEIGHTS_FILE)
    missing = [p for p in (cfg_path, weights) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"synthetic face analyzer not found at '{model_dir}' (missing {', '.join(missing)}); "
                                "run `make pretrain` or set faces.model_dir to its folder")
    with open(cfg_path) as f:
        cfg = json.load(f)
    model = FaceCenterNet(**cfg["architecture"])
    model.load_state_dict(load_file(weights))
    encoder = None
    if recognizer:
        encoder = load_standin(str(recognizer))
    analyzer = SyntheticFaceAnalyzer(model, cfg["input_size"], cfg["threshold"] if threshold is None else threshold, encoder)
    analyzer.stats = cfg.get("stats", {})
    return analyzer


def make_synthetic_analyzer(cfg: Mapping) -> SyntheticFaceAnalyzer:
    """``faces.kind=synthetic``: ``model_dir`` (the detector), ``recognizer`` (a stand-in encoder), ``det_thresh``."""
    if not cfg.get("model_dir"):
        raise ValueError("faces.kind=synthetic needs faces.model_dir (the synthetic face detector folder)")
    return load_synthetic_analyzer(str(cfg["model_dir"]), cfg.get("recognizer"), cfg.get("det_thresh"))


register_face_analyzer("synthetic", make_synthetic_analyzer)
