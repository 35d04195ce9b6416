"""How well the synthetic face analyzer finds faces (per face-size bin), and how rarely it finds one where there
is none."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from realisid.geometry import box_iou, face_size, scale_bin

from .analyzer import SyntheticFaceAnalyzer
from .training import faceless, noise_image


@torch.no_grad()
def detector_accuracy(analyzer: SyntheticFaceAnalyzer, images: torch.Tensor, boxes: torch.Tensor, kps: torch.Tensor,
                      bins: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """Per face-size bin and overall: recall (a detection with IoU >= 0.5), mean box IoU of the best detection
    (0 when none), landmark error (mean point distance / inter-ocular distance) of found faces, false
    detections per image."""
    rows = []
    for img, bx, kp in zip(images, boxes, kps):
        arr = img.permute(1, 2, 0).numpy().astype(np.uint8)
        faces = analyzer.detect(arr)
        ious = [float(box_iou(f.bbox.tolist(), bx.tolist())) for f in faces]
        best = int(np.argmax(ious)) if ious else -1
        iou = ious[best] if ious else 0.0
        iod = float(np.linalg.norm(kp[1] - kp[0])) or 1.0
        err = float(np.linalg.norm(faces[best].kps - kp.numpy(), axis=1).mean() / iod) if iou >= 0.5 else float("nan")
        size = face_size(bx.tolist(), arr.shape[1], arr.shape[0])
        rows.append({"bin": scale_bin(size, bins), "found": iou >= 0.5, "iou": iou, "nme": err,
                     "false": sum(1 for i, v in enumerate(ious) if i != best or v < 0.5)})
    out = {}
    for name in list(bins) + ["all"]:
        rs = [r for r in rows if name == "all" or r["bin"] == name]
        if not rs:
            continue
        nmes = [r["nme"] for r in rs if r["nme"] == r["nme"]]
        out[name] = {"n": len(rs), "recall": float(np.mean([r["found"] for r in rs])), "box_iou": float(np.mean([r["iou"] for r in rs])),
                     "landmark_nme": float(np.mean(nmes)) if nmes else float("nan"),
                     "false_per_image": float(np.mean([r["false"] for r in rs]))}
    return out


@torch.no_grad()
def negative_accuracy(analyzer: SyntheticFaceAnalyzer, images: torch.Tensor, boxes: torch.Tensor, *, noise_images: int = 200,
                      seed: int = 0) -> dict[str, float]:
    """How often the analyzer finds a face where there is none: on held-out photos whose face (at least 12 px) is
    blurred away (:func:`faceless`, a detection overlapping the face box counts) and on noise images (any detection
    counts). A found-rate on generated images means something only when both are low."""
    g = torch.Generator().manual_seed(seed)
    hits, n = 0, 0
    for img, bx in zip(images, boxes):
        if float(max(bx[2] - bx[0], bx[3] - bx[1])) < 12:
            continue
        arr = faceless(img.float(), bx).round().clamp(0, 255).permute(1, 2, 0).numpy().astype(np.uint8)
        hits += any(float(box_iou(f.bbox.tolist(), bx.tolist())) > 0.1 for f in analyzer.detect(arr))
        n += 1
    noise_hits = 0
    S = images.shape[-1]
    for _ in range(int(noise_images)):
        arr = noise_image(S, g).round().clamp(0, 255).permute(1, 2, 0).numpy().astype(np.uint8)
        noise_hits += bool(analyzer.detect(arr))
    return {"faceless_photos": n, "found_on_faceless": hits / max(1, n), "noise_images": int(noise_images),
            "found_on_noise": noise_hits / max(1, int(noise_images))}
