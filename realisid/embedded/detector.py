"""A synthetic face analyzer: a small CenterNet-style detector with 5 key points, trained on the synthetic
shards' exact boxes and key points, and the evaluation stand-in encoder for embeddings.

It is a STAND-IN (named so in every table): it only knows the procedural faces of the embedded default. It
exists so that found-rate, location IoU and landmark error are measured on the embedded default instead of
being "n/a", behind the same :class:`~realisid.faces.FaceAnalyzer` interface as insightface.

Network: a strided conv backbone (stride 2 to 16) with a top-down path back to stride 4, and four heads
at stride 4: a face-centre heat-map, the box size (log width and height in cells), the sub-cell centre
offset and the 5 key points relative to the centre (in units of the box's long side). Decoding takes local
maxima of the heat-map above ``threshold``. Images are resized so their long side is ``input_size``
(up or down) and padded to a square; coordinates are mapped back.

Training (:func:`train_detector`) uses the shards' images plus, for robustness on generated images, copies
passed through the base model's VAE, with 2x2 mosaics (several faces per image, half size), zoom-in crops
(faces up to 0.85 of the image, as in reference crops), flips, blur, noise and colour jitter.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from realisid.faces.analysis import Face, as_rgb_uint8, l2_normalize
from realisid.faces.registry import register_face_analyzer
from realisid.geometry import box_iou
from realisid.images import signed_from_uint8

log = logging.getLogger(__name__)

DETECTOR_NAME = "synthetic-face-detector (stand-in trained on synthetic faces)"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STRIDE = 4
FLIP_KPS = [1, 0, 2, 4, 3]  # insightface order under a horizontal flip
MAX_FACES = 4


# --------------------------------------------------------------------------------------------- network
def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FaceCenterNet(nn.Module):
    """``forward(x)`` with x (B, 3, S, S) in [-1, 1], S a multiple of 16, returns the stride-4 maps
    ``heat`` (B, 1, S/4, S/4) logits, ``size`` (B, 2, ...), ``offset`` (B, 2, ...), ``kps`` (B, 10, ...)."""

    OUTPUTS = (("heat", 1), ("size", 2), ("offset", 2), ("kps", 10))

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 96), head: int = 48):
        super().__init__()
        w = [int(v) for v in widths]
        self.config = {"widths": w, "head": int(head)}
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 3, 2, 1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True))  # stride 2
        self.s4 = _block(w[0], w[1], 2)
        self.s8 = _block(w[1], w[2], 2)
        self.s16 = _block(w[2], w[3], 2)
        self.lat16 = nn.Conv2d(w[3], head, 1)
        self.lat8 = nn.Conv2d(w[2], head, 1)
        self.lat4 = nn.Conv2d(w[1], head, 1)
        self.fuse = nn.Sequential(nn.Conv2d(head, head, 3, 1, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU(inplace=True),
                                  nn.Conv2d(head, head, 3, 1, 1), nn.ReLU(inplace=True))
        self.out = nn.Conv2d(head, sum(n for _, n in self.OUTPUTS), 1)
        with torch.no_grad():
            self.out.bias.zero_()
            self.out.bias[0] = -4.0  # start with few detections (focal-loss practice)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c4 = self.s4(self.stem(x))
        c8 = self.s8(c4)
        c16 = self.s16(c8)
        p = self.lat16(c16)
        p = F.interpolate(p, scale_factor=2, mode="nearest") + self.lat8(c8)
        p = F.interpolate(p, scale_factor=2, mode="nearest") + self.lat4(c4)
        maps = self.out(self.fuse(p)).split([n for _, n in self.OUTPUTS], dim=1)
        return dict(zip((k for k, _ in self.OUTPUTS), maps))


# --------------------------------------------------------------------------------------------- targets and loss
def gaussian_targets(boxes: torch.Tensor, valid: torch.Tensor, cells: int) -> torch.Tensor:
    """(B, 1, cells, cells) heat-map targets: a Gaussian per face centre (sigma from its size), 1 at its cell."""
    B = boxes.shape[0]
    ys = torch.arange(cells, dtype=torch.float32) + 0.5
    heat = torch.zeros(B, 1, cells, cells)
    for b in range(B):
        for k in range(boxes.shape[1]):
            if not bool(valid[b, k]):
                continue
            x0, y0, x1, y1 = (boxes[b, k] / STRIDE).tolist()
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            sigma = max(0.5, 0.15 * max(x1 - x0, y1 - y0))
            g = torch.exp(-((ys[:, None] - cy) ** 2 + (ys[None, :] - cx) ** 2) / (2 * sigma * sigma))
            heat[b, 0] = torch.maximum(heat[b, 0], g)
            i, j = min(int(cy), cells - 1), min(int(cx), cells - 1)
            heat[b, 0, i, j] = 1.0
    return heat


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of face centres."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    neg = 1 - pos
    pos_loss = torch.log(p) * (1 - p) ** alpha * pos
    neg_loss = torch.log(1 - p) * p ** alpha * (1 - target) ** beta * neg
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


def regression_targets(boxes: torch.Tensor, kps: torch.Tensor, valid: torch.Tensor, cells: int):
    """Per face: its centre cell index and the size / offset / key-point targets there."""
    x0, y0, x1, y1 = (boxes / STRIDE).unbind(-1)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    ci = cy.floor().clamp(0, cells - 1)
    cj = cx.floor().clamp(0, cells - 1)
    index = (ci * cells + cj).long()
    size = torch.stack([torch.log((x1 - x0).clamp(min=0.25)), torch.log((y1 - y0).clamp(min=0.25))], -1)
    offset = torch.stack([cx - cj, cy - ci], -1)
    long_side = torch.maximum(x1 - x0, y1 - y0).clamp(min=0.25)[..., None, None]
    rel = (kps / STRIDE - torch.stack([cx, cy], -1)[..., None, :]) / long_side
    return index, size, offset, rel.flatten(-2), valid.float()


def detector_loss(out: Mapping[str, torch.Tensor], boxes: torch.Tensor, kps: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    cells = out["heat"].shape[-1]
    heat_t = gaussian_targets(boxes, valid, cells)
    index, size_t, off_t, kps_t, w = regression_targets(boxes, kps, valid, cells)

    def gather(m: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) at (B, K) indices -> (B, K, C)
        flat = m.flatten(2)
        return flat.gather(2, index[:, None, :].expand(-1, flat.shape[1], -1)).transpose(1, 2)

    n = w.sum().clamp(min=1)
    l_size = (F.l1_loss(gather(out["size"]), size_t, reduction="none").sum(-1) * w).sum() / n
    l_off = (F.l1_loss(gather(out["offset"]), off_t, reduction="none").sum(-1) * w).sum() / n
    l_kps = (F.l1_loss(gather(out["kps"]), kps_t, reduction="none").sum(-1) * w).sum() / n
    l_heat = focal_loss(out["heat"], heat_t)
    total = l_heat + 0.5 * l_size + l_off + 2.0 * l_kps
    return {"loss": total, "heat": l_heat, "size": l_size, "offset": l_off, "kps": l_kps}


@torch.no_grad()
def decode(out: Mapping[str, torch.Tensor], threshold: float, max_faces: int = 20, nms_iou: float = 0.4) -> list[list[dict]]:
    """Per image: faces as dicts (bbox, kps, score) in network-input pixels, highest score first."""
    heat = torch.sigmoid(out["heat"])
    peaks = heat * (heat == F.max_pool2d(heat, 3, 1, 1))
    B, _, H, W = heat.shape
    results = []
    for b in range(B):
        scores, idx = peaks[b, 0].flatten().topk(min(max_faces, H * W))
        faces = []
        for s, k in zip(scores.tolist(), idx.tolist()):
            if s < threshold:
                break
            i, j = divmod(k, W)
            ox, oy = out["offset"][b, :, i, j].tolist()
            lw, lh = out["size"][b, :, i, j].exp().tolist()
            cx, cy = j + ox, i + oy
            box = np.array([cx - lw / 2, cy - lh / 2, cx + lw / 2, cy + lh / 2], np.float32) * STRIDE
            rel = out["kps"][b, :, i, j].view(5, 2).cpu().numpy()
            kp = (rel * max(lw, lh) + [cx, cy]) * STRIDE
            if all(box_iou(box, f["bbox"]) < nms_iou for f in faces):
                faces.append({"bbox": box, "kps": kp.astype(np.float32), "score": float(s)})
        results.append(faces)
    return results


# --------------------------------------------------------------------------------------------- analyzer
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
            emb = self._embed_box(image, bbox) if self.encoder is not None else None
            faces.append(Face(bbox=bbox, kps=kps, det_score=f["score"], embedding=emb))
        return faces

    def _embed_box(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        from realisid.faces.standin import identity_crop

        crop = identity_crop(image, [float(v) for v in box], int(self.encoder.image_size))
        with torch.no_grad():
            return l2_normalize(self.encoder(crop[None])[0].numpy())

    def embed(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """Embedding of the face whose box the 5 points imply (frontal template fit)."""
        from realisid.metrics.identity import _box_from_kps

        if self.encoder is None:
            raise ValueError(f"{self.name} has no identity encoder; set faces.recognizer to a stand-in encoder folder")
        return self._embed_box(as_rgb_uint8(image), _box_from_kps(kps))


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
        from realisid.faces.standin import load_standin

        encoder = load_standin(str(recognizer))
    analyzer = SyntheticFaceAnalyzer(model, cfg["input_size"], cfg["threshold"] if threshold is None else threshold, encoder)
    analyzer.stats = cfg.get("stats", {})
    return analyzer


def make_synthetic_analyzer(cfg: Mapping) -> SyntheticFaceAnalyzer:
    """``faces.kind=synthetic``: ``model_dir`` (the detector), ``recognizer`` (a stand-in encoder), ``det_thresh``."""
    if not cfg.get("model_dir"):
        raise ValueError("faces.kind=synthetic needs faces.model_dir (the synthetic face detector folder)")
    return load_synthetic_analyzer(str(cfg["model_dir"]), cfg.get("recognizer"), cfg.get("det_thresh"))


# --------------------------------------------------------------------------------------------- training data
def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=x.shape[-1] > size, align_corners=False)


def faceless(image: torch.Tensor, box: torch.Tensor, cells: int = 2, expand: float = 1.3) -> torch.Tensor:
    """``image`` (3, S, S) with the face box (expanded) replaced by a ``cells`` x ``cells`` blur of itself: the
    person's colours and head shape stay, the eyes, nose and mouth are gone. A negative: not a face."""
    S = image.shape[-1]
    cx, cy = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
    half = max(float(box[2] - box[0]), float(box[3] - box[1])) * expand / 2
    x0, y0, x1, y1 = (max(0, int(cx - half)), max(0, int(cy - half)), min(S, int(cx + half) + 1), min(S, int(cy + half) + 1))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return image
    out = image.clone()
    patch = image[None, :, y0:y1, x0:x1]
    out[:, y0:y1, x0:x1] = F.interpolate(F.adaptive_avg_pool2d(patch, cells), size=(y1 - y0, x1 - x0), mode="bilinear",
                                         align_corners=False)[0]
    return out


def noise_image(S: int, g: torch.Generator) -> torch.Tensor:
    """A negative without any person: smooth noise at a random scale (blobs and colour fields) or pixel noise, 0..255."""
    cells = int(torch.randint(2, S + 1, (1,), generator=g))
    low = torch.rand(1, 3, cells, cells, generator=g)
    img = F.interpolate(low, size=(S, S), mode="bilinear", align_corners=False)[0] if cells < S else low[0]
    return img * 255.0


def make_batch(images: torch.Tensor, boxes: torch.Tensor, kps: torch.Tensor, batch_size: int, g: torch.Generator, *,
               mosaic_p: float = 0.3, zoom_p: float = 0.35, max_face: float = 0.85, negative_p: float = 0.0):
    """A training batch in [-1, 1] with up to :data:`MAX_FACES` faces per image: (x, boxes, kps, valid).

    ``negative_p``: the share of images with no face to find: a photo whose face is blurred away (:func:`faceless`;
    faces of at least 12 px) or noise (:func:`noise_image`). Without them the detector fires on any blob, which
    makes a found-rate on generated images meaningless."""
    n, _, S, _ = images.shape
    xs, out_b, out_k, out_v = [], torch.zeros(batch_size, MAX_FACES, 4), torch.zeros(batch_size, MAX_FACES, 5, 2), torch.zeros(batch_size, MAX_FACES, dtype=torch.bool)
    for b in range(batch_size):
        if negative_p and float(torch.rand((), generator=g)) < negative_p:
            i = int(torch.randint(0, n, (1,), generator=g))
            side = float(max(boxes[i, 2] - boxes[i, 0], boxes[i, 3] - boxes[i, 1]))
            if float(torch.rand((), generator=g)) < 0.6 and side >= 12:
                xs.append(faceless(images[i].float(), boxes[i], cells=int(torch.randint(1, 4, (1,), generator=g))))
            else:
                xs.append(noise_image(S, g))
            continue
        u = float(torch.rand((), generator=g))
        if u < mosaic_p:
            idx = torch.randint(0, n, (4,), generator=g)
            canvas = torch.zeros(3, S, S)
            h = S // 2
            for q, i in enumerate(idx.tolist()):
                oy, ox = (q // 2) * h, (q % 2) * h
                canvas[:, oy:oy + h, ox:ox + h] = _resize(images[i:i + 1].float(), h)[0]
                out_b[b, q] = boxes[i] * 0.5 + torch.tensor([ox, oy, ox, oy])
                out_k[b, q] = kps[i] * 0.5 + torch.tensor([ox, oy])
                out_v[b, q] = True
            xs.append(canvas)
            continue
        i = int(torch.randint(0, n, (1,), generator=g))
        img, bx, kp = images[i].float(), boxes[i].clone(), kps[i].clone()
        if u < mosaic_p + zoom_p:  # a square window that holds the face, face up to max_face of it
            side_face = float(max(bx[2] - bx[0], bx[3] - bx[1]))
            lo = max(side_face / max_face, 16.0)
            if lo < S:
                side = lo + float(torch.rand((), generator=g)) * (S - lo)
                x_lo, x_hi = max(0.0, float(bx[2]) - side), min(float(bx[0]), S - side)
                y_lo, y_hi = max(0.0, float(bx[3]) - side), min(float(bx[1]), S - side)
                if x_hi >= x_lo and y_hi >= y_lo:
                    x0 = x_lo + float(torch.rand((), generator=g)) * (x_hi - x_lo)
                    y0 = y_lo + float(torch.rand((), generator=g)) * (y_hi - y_lo)
                    theta = torch.tensor([[side / S, 0, (2 * x0 + side) / S - 1], [0, side / S, (2 * y0 + side) / S - 1]])[None]
                    grid = F.affine_grid(theta, [1, 3, S, S], align_corners=False)
                    img = F.grid_sample(img[None], grid, mode="bilinear", align_corners=False)[0]
                    k = S / side
                    bx = (bx - torch.tensor([x0, y0, x0, y0])) * k
                    kp = (kp - torch.tensor([x0, y0])) * k
        xs.append(img)
        out_b[b, 0], out_k[b, 0], out_v[b, 0] = bx, kp, True
    x = signed_from_uint8(torch.stack(xs))
    # flips
    flip = torch.rand(batch_size, generator=g) < 0.5
    if bool(flip.any()):
        x[flip] = x[flip].flip(-1)
        fb = out_b[flip]
        out_b[flip] = torch.stack([S - fb[..., 2], fb[..., 1], S - fb[..., 0], fb[..., 3]], -1)
        fk = out_k[flip][:, :, FLIP_KPS]
        fk[..., 0] = S - fk[..., 0]
        out_k[flip] = fk
    # photometric: contrast / brightness, blur, noise
    B = batch_size
    c = 1 + (torch.rand(B, 1, 1, 1, generator=g) - 0.5) * 0.4
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - m) * c + m + (torch.rand(B, 1, 1, 1, generator=g) - 0.5) * 0.2
    blur = torch.rand(B, generator=g) < 0.25
    if bool(blur.any()):
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k, groups=3)
    noisy = torch.rand(B, generator=g) < 0.25
    if bool(noisy.any()):
        x[noisy] = x[noisy] + torch.randn(x[noisy].shape, generator=g) * 0.05
    return x.clamp_(-1, 1), out_b, out_k, out_v


# --------------------------------------------------------------------------------------------- accuracy
@torch.no_grad()
def detector_accuracy(analyzer: SyntheticFaceAnalyzer, images: torch.Tensor, boxes: torch.Tensor, kps: torch.Tensor,
                      bins: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """Per face-size bin and overall: recall (a detection with IoU >= 0.5), mean box IoU of the best detection
    (0 when none), landmark error (mean point distance / inter-ocular distance) of found faces, false
    detections per image."""
    from realisid.geometry import face_size, scale_bin

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


def train_detector(images: torch.Tensor, boxes: torch.Tensor, kps: torch.Tensor, *, steps: int, batch_size: int, lr: float,
                   seed: int, extra_images: torch.Tensor | None = None, extra_index: torch.Tensor | None = None,
                   input_size: int = 128, negative_p: float = 0.0) -> tuple[FaceCenterNet, dict]:
    """Train :class:`FaceCenterNet` on uint8 (N, 3, S, S) images with their boxes (N, 4) and key points (N, 5, 2).

    ``extra_images``: VAE-reconstructed copies of the images at ``extra_index``, mixed in with equal weight.
    """
    from realisid.embedded.base import Progress, _warmup_cosine

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if images.shape[-1] != input_size:
        raise ValueError(f"detector training images are {images.shape[-1]} px; resize them to input_size={input_size}")
    pool_img, pool_box, pool_kps = images, boxes, kps
    if extra_images is not None:
        pool_img = torch.cat([images, extra_images])
        pool_box = torch.cat([boxes, boxes[extra_index]])
        pool_kps = torch.cat([kps, kps[extra_index]])
    model = FaceCenterNet()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps, floor=0.02))
    prog = Progress("synthetic face detector", steps)
    model.train()
    t0 = time.perf_counter()
    for i in range(int(steps)):
        x, bx, kp, valid = make_batch(pool_img, pool_box, pool_kps, batch_size, g, negative_p=negative_p)
        losses = detector_loss(model(x), bx, kp, valid)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        prog.step(i, losses["loss"].item())
    model.eval()
    first, last = prog.fifths()
    return model, {"steps": int(steps), "batch_size": int(batch_size), "negative_p": float(negative_p), "loss_first_fifth": round(first, 4),
                   "loss_last_fifth": round(last, 4), "train_seconds": round(time.perf_counter() - t0, 1)}


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


register_face_analyzer("synthetic", make_synthetic_analyzer)
