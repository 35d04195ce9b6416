"""Training the synthetic face detector.

:func:`train_detector` uses the shards' images plus, for robustness on generated images, copies passed through
the base model's VAE, with 2x2 mosaics (several faces per image, half size), zoom-in crops (faces up to 0.85 of
the image, as in reference crops), flips, blur, noise and colour jitter, and negatives (:func:`faceless` photos,
:func:`noise_image`).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from realisid.embedded.base import Progress, _warmup_cosine
from realisid.images import signed_from_uint8

from .model import FaceCenterNet, detector_loss

FLIP_KPS = [1, 0, 2, 4, 3]  # insightface order under a horizontal flip
MAX_FACES = 4


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


def train_detector(images: torch.Tensor, boxes: torch.Tensor, kps: torch.Tensor, *, steps: int, batch_size: int, lr: float,
                   seed: int, extra_images: torch.Tensor | None = None, extra_index: torch.Tensor | None = None,
                   input_size: int = 128, negative_p: float = 0.0) -> tuple[FaceCenterNet, dict]:
    """Train :class:`FaceCenterNet` on uint8 (N, 3, S, S) images with their boxes (N, 4) and key points (N, 5, 2).

    ``extra_images``: VAE-reconstructed copies of the images at ``extra_index``, mixed in with equal weight.
    """
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
