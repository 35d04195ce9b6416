"""Stand-in identity encoder: a small ArcFace-style network trained on the synthetic identities.

The embedded default has no real ArcFace weights, so identity tokens and identity metrics use this network
instead. It is named :data:`STANDIN_NAME` in every log, config and table so nobody mistakes its numbers for
real ArcFace similarities.

Input: the square face crop :func:`identity_crop` makes (the face box expanded 1.3x, shifted inside the
image, resized to ``image_size``), RGB scaled to [-1, 1]. Output: an L2-normalised embedding.

Training (:func:`train_standin`) loads every crop of the (small) training shards into memory once, trains
with an additive-angular-margin (ArcFace) head over identity labels with light augmentation, and measures
face verification on held-out identities: all same-identity pairs against as many different-identity
pairs, at a cosine threshold chosen on pairs of the TRAINING identities.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from realisid.geometry import expand_square_box
from realisid.io import atomic_write_json
from realisid.images import signed_from_uint8

log = logging.getLogger(__name__)

STANDIN_NAME = "standin-arcface-synthetic"
from realisid.images import ID_CROP_EXPAND as CROP_FACTOR  # noqa: E402  (one crop definition)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MISSING_HINT = "run `make train` once to prepare it or set model.id_encoder.path"


# ---------------------------------------------------------------------------------------------- crops
def identity_crop(image: Image.Image, bbox: Sequence[float], size: int) -> torch.Tensor:
    """The encoder's input for one face, exactly as the training pipeline builds it
    (:func:`realisid.images.identity_crop`: the face box expanded 1.3x, shifted inside the image,
    resized to ``size``), as a ``(3, size, size)`` float tensor in [-1, 1] (RGB)."""
    from realisid.images import identity_crop as pipeline_crop, to_tensor

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if image.mode != "RGB":
        image = image.convert("RGB")
    crop, _mask = pipeline_crop(image, bbox, int(size))
    return to_tensor(crop)


def _to_unit_range(arr: np.ndarray) -> torch.Tensor:
    return signed_from_uint8(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))))


def _context_crop(image: Image.Image, bbox: Sequence[float], size: int) -> torch.Tensor:
    """uint8 ``(3, 2*size, 2*size)`` crop twice as wide as :func:`identity_crop`'s, on the same centre, so
    its central half is the identity crop at the same resolution (augmentation samples from it)."""
    x0, y0, x1, y1 = expand_square_box(bbox, CROP_FACTOR, image.width, image.height)
    side = x1 - x0
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    box = (int(round(cx - side)), int(round(cy - side)), int(round(cx - side)) + 2 * side, int(round(cy - side)) + 2 * side)
    crop = image.crop(box).resize((2 * size, 2 * size), Image.BILINEAR)  # outside the image: black
    return torch.from_numpy(np.ascontiguousarray(np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1)))


# ---------------------------------------------------------------------------------------------- network
class StandInArcFace(nn.Module):
    """Small CNN: strided stem, one stride-2 stage per width (two 3x3 conv + BN + PReLU, residual),
    global average pooling, linear, BN; returns L2-normalised ``(B, embed_dim)``."""

    name = STANDIN_NAME

    def __init__(self, image_size: int = 32, embed_dim: int = 64, widths: Sequence[int] = (32, 64, 128)):
        super().__init__()
        widths = [int(w) for w in widths]
        if image_size < 2 ** (len(widths) + 1):
            raise ValueError(f"image_size {image_size} is too small for {len(widths)} stages; use at least {2 ** (len(widths) + 1)}")
        self.config = {"name": STANDIN_NAME, "image_size": int(image_size), "embed_dim": int(embed_dim),
                       "widths": widths, "crop_factor": CROP_FACTOR, "input": "RGB identity_crop in [-1, 1]"}
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0]))
        stages = []
        c = widths[0]
        for w in widths:
            stages.append(_Stage(c, w))
            c = w
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c, int(embed_dim))
        self.bn = nn.BatchNorm1d(int(embed_dim))

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    @property
    def embed_dim(self) -> int:
        return self.config["embed_dim"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))
        h = self.bn(self.fc(h.mean(dim=(2, 3))))
        return F.normalize(h, dim=1)


class _Stage(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout))
        self.conv = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        return h + self.conv(h)


class ArcMarginHead(nn.Module):
    """Additive angular margin softmax (ArcFace): logits ``s * cos(theta_y + m)`` for the true class."""

    def __init__(self, embed_dim: int, num_classes: int, margin: float = 0.3, scale: float = 16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embed_dim) * 0.01)
        self.margin, self.scale = float(margin), float(scale)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = (emb @ F.normalize(self.weight, dim=1).t()).clamp(-1 + 1e-7, 1 - 1e-7)
        sin = torch.sqrt(1.0 - cos * cos)
        m = self.margin
        phi = cos * math.cos(m) - sin * math.sin(m)
        # keep the target logit monotonic in theta once theta + m passes pi (standard ArcFace fallback)
        phi = torch.where(cos > math.cos(math.pi - m), phi, cos - math.sin(math.pi - m) * m)
        onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        logits = self.scale * (onehot * phi + (1.0 - onehot) * cos)
        return F.cross_entropy(logits, labels)


# ---------------------------------------------------------------------------------------------- data
@dataclass
class FaceSet:
    """Face crops of a set of shards, in memory."""

    identities: list[str] = field(default_factory=list)  # per sample
    crops: torch.Tensor | None = None  # (N, 3, S, S) float in [-1, 1], exactly identity_crop
    context: torch.Tensor | None = None  # (N, 3, 2S, 2S) uint8, for augmentation
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.identities)

    def labels(self) -> tuple[np.ndarray, list[str]]:
        names = sorted(set(self.identities))
        index = {n: i for i, n in enumerate(names)}
        return np.array([index[n] for n in self.identities], dtype=np.int64), names


def load_face_set(urls: Sequence[str], image_size: int, *, with_context: bool = False) -> FaceSet:
    """Read shards (raw bytes through :func:`realisid.data.shards.decode_sample`; nothing is unpickled)."""
    import webdataset as wds

    from realisid.data.shards import SampleError, check_shards_exist, decode_sample

    urls = check_shards_exist(urls, "stand-in encoder shards")
    out = FaceSet()
    crops, context = [], []
    # every sample, in this process: no node/worker splitting even when called under DDP
    dataset = wds.WebDataset(list(urls), shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)
    for raw in dataset:
        try:
            sample = decode_sample(raw)
        except SampleError as exc:
            out.skipped[exc.reason] = out.skipped.get(exc.reason, 0) + 1
            continue
        identity = sample["meta"].get("identity")
        if identity is None:
            out.skipped["no_identity"] = out.skipped.get("no_identity", 0) + 1
            continue
        image, bbox = sample["image"], sample["meta"]["bbox"]
        out.identities.append(str(identity))
        crops.append(identity_crop(image, bbox, image_size))
        if with_context:
            context.append(_context_crop(image, bbox, image_size))
    if out.skipped:
        log.warning("stand-in encoder: skipped samples %s", out.skipped)
    if crops:
        out.crops = torch.stack(crops)
        out.context = torch.stack(context) if with_context else None
    return out


def _augment(context: torch.Tensor, size: int, gen: torch.Generator, flip: bool) -> torch.Tensor:
    """Random shift / scale / small rotation / optional flip of the crop window plus small colour jitter."""
    b = context.shape[0]
    x = signed_from_uint8(context)

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand(*(shape or (b,)), generator=gen) * (hi - lo) + lo

    scale = 0.5 * torch.exp(uniform(-0.12, 0.12))  # 0.5 = the identity crop inside the 2x context
    angle = uniform(-8.0, 8.0) * (math.pi / 180.0)
    tx, ty = uniform(-0.06, 0.06), uniform(-0.06, 0.06)
    sign = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0) if flip else torch.ones(b)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * sign, -sin, tx], 1), torch.stack([sin * sign, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    contrast = uniform(0.85, 1.15).view(b, 1, 1, 1)
    gain = uniform(0.95, 1.05, b, 3).view(b, 3, 1, 1)
    shift = uniform(-0.08, 0.08).view(b, 1, 1, 1)
    return (((out - mean) * contrast + mean) * gain + shift).clamp_(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def embed_crops(model: StandInArcFace, crops: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Embeddings ``(N, D)`` of ``(N, 3, S, S)`` crops in eval mode."""
    was_training = model.training
    model.eval()
    try:
        outs = [model(crops[i:i + batch_size]) for i in range(0, crops.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0, model.embed_dim)


def embed_faces(model: StandInArcFace, images: Sequence[Image.Image], bboxes: Sequence[Sequence[float]],
                batch_size: int = 512) -> np.ndarray:
    """Stand-in embeddings ``(N, D)`` float32 of the faces at ``bboxes`` in ``images`` (one box per image)."""
    if len(images) != len(bboxes):
        raise ValueError(f"got {len(images)} images but {len(bboxes)} boxes; give one box per image")
    if not len(images):
        return np.zeros((0, model.embed_dim), np.float32)
    crops = torch.stack([identity_crop(im, bb, model.image_size) for im, bb in zip(images, bboxes)])
    return embed_crops(model, crops, batch_size).numpy().astype(np.float32)


def verification_pairs(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """All same-label pairs ``(i < j)`` and an equal number of distinct different-label pairs drawn uniformly
    (all of them if there are fewer). Returns ``(pairs (P, 2) int64, same (P,) bool)``. Memory grows with
    the number of pairs returned, not with ``len(labels) ** 2``."""
    labels = np.asarray(labels)
    n = int(labels.shape[0])
    groups = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    same_parts = []
    for g in groups:
        if len(g) > 1:
            a, b = np.triu_indices(len(g), k=1)
            same_parts.append(np.stack([g[a], g[b]], 1))
    same = np.concatenate(same_parts).astype(np.int64) if same_parts else np.zeros((0, 2), np.int64)
    n_same = len(same)
    n_diff_total = n * (n - 1) // 2 - n_same
    if n_diff_total <= n_same:
        diff_parts = []
        for x in range(len(groups)):
            for y in range(x + 1, len(groups)):
                ga, gb = np.meshgrid(groups[x], groups[y], indexing="ij")
                diff_parts.append(np.sort(np.stack([ga.ravel(), gb.ravel()], 1), axis=1))
        diff = np.concatenate(diff_parts).astype(np.int64) if diff_parts else np.zeros((0, 2), np.int64)
    else:
        chosen: dict[int, None] = {}  # insertion-ordered set of pair codes lo * n + hi
        while len(chosen) < n_same:
            i = rng.integers(0, n, size=2 * n_same + 16)
            j = rng.integers(0, n, size=2 * n_same + 16)
            keep = labels[i] != labels[j]
            lo, hi = np.minimum(i, j)[keep], np.maximum(i, j)[keep]
            for code in (lo * n + hi).tolist():
                if len(chosen) >= n_same:
                    break
                chosen.setdefault(code, None)
        codes = np.fromiter(chosen, dtype=np.int64, count=len(chosen))
        diff = np.stack([codes // n, codes % n], 1)
    pairs = np.concatenate([same, diff]).astype(np.int64)
    flags = np.concatenate([np.ones(n_same, bool), np.zeros(len(diff), bool)])
    return pairs, flags


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """Cosine threshold maximising pair accuracy (``same`` iff ``score >= threshold``) and that accuracy."""
    order = np.argsort(scores, kind="stable")
    s, y = scores[order].astype(np.float64), same[order].astype(np.int64)
    n = len(s)
    diff_below = np.concatenate([[0], np.cumsum(1 - y)])  # threshold between s[k-1] and s[k]
    same_below = np.concatenate([[0], np.cumsum(y)])
    correct = diff_below + (y.sum() - same_below)
    # only cut between distinct scores
    valid = np.ones(n + 1, bool)
    valid[1:n] = s[1:] > s[:-1]
    correct = np.where(valid, correct, -1)
    k = int(np.argmax(correct))
    if k == 0:
        th = s[0] - 1e-6
    elif k == n:
        th = s[-1] + 1e-6
    else:
        th = (s[k - 1] + s[k]) / 2.0
    return float(th), float(correct[k]) / n


def _auc(scores: np.ndarray, same: np.ndarray) -> float:
    n_s, n_d = int(same.sum()), int((~same).sum())
    if n_s == 0 or n_d == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores), np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    return float((ranks[same].sum() - n_s * (n_s + 1) / 2.0) / (n_s * n_d))


def _pair_scores(emb: torch.Tensor, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    pairs, same = verification_pairs(labels, np.random.default_rng(seed))
    e = emb.numpy().astype(np.float64)
    scores = np.einsum("pd,pd->p", e[pairs[:, 0]], e[pairs[:, 1]])
    return scores, same


def verification_stats(model: StandInArcFace, train: FaceSet, val: FaceSet, seed: int = 0) -> dict[str, Any]:
    """Held-out verification: threshold from TRAIN-identity pairs, accuracy on VAL-identity pairs."""
    stats: dict[str, Any] = {"n_train_images": len(train), "n_train_identities": len(set(train.identities)),
                             "n_val_images": len(val), "n_val_identities": len(set(val.identities))}
    tr_labels, _ = train.labels()
    tr_scores, tr_same = _pair_scores(embed_crops(model, train.crops), tr_labels, seed)
    if tr_same.sum() == 0 or (~tr_same).sum() == 0:
        raise ValueError("the training shards need at least two identities with two images each to choose a verification threshold")
    threshold, tr_acc = best_threshold(tr_scores, tr_same)
    stats.update(threshold=threshold, train_pair_accuracy=tr_acc, train_mean_same_cos=float(tr_scores[tr_same].mean()),
                 train_mean_diff_cos=float(tr_scores[~tr_same].mean()))
    if len(val) == 0 or val.crops is None:
        log.warning("stand-in encoder: no validation samples, held-out verification not measured")
        stats.update(verification_accuracy=None, mean_same_cos=None, mean_diff_cos=None, auc=None,
                     n_same_pairs=0, n_diff_pairs=0)
        return stats
    va_labels, _ = val.labels()
    va_scores, va_same = _pair_scores(embed_crops(model, val.crops), va_labels, seed)
    if va_same.sum() == 0:
        log.warning("stand-in encoder: no validation identity has two images, held-out verification not measured")
        stats.update(verification_accuracy=None, mean_same_cos=None, mean_diff_cos=None, auc=None,
                     n_same_pairs=0, n_diff_pairs=int((~va_same).sum()))
        return stats
    pred = va_scores >= threshold
    _, val_best = best_threshold(va_scores, va_same)
    stats.update(
        verification_accuracy=float((pred == va_same).mean()),
        verification_accuracy_oracle=val_best,  # with the threshold tuned on val itself (optimistic; for reference)
        mean_same_cos=float(va_scores[va_same].mean()),
        mean_diff_cos=float(va_scores[~va_same].mean()) if (~va_same).any() else None,
        auc=_auc(va_scores, va_same),
        n_same_pairs=int(va_same.sum()),
        n_diff_pairs=int((~va_same).sum()),
    )
    return stats


def evaluate_standin(model: StandInArcFace, train_urls: Sequence[str], val_urls: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """:func:`verification_stats` of ``model`` on these shards (the protocol :func:`train_standin` reports)."""
    size = model.image_size
    train = load_face_set(train_urls, size)
    val = load_face_set(val_urls, size) if val_urls else FaceSet()
    return verification_stats(model, train, val, seed)


# ---------------------------------------------------------------------------------------------- training
def _train_loop(model: StandInArcFace, head: ArcMarginHead, opt: torch.optim.Optimizer, sched: Any, train: FaceSet,
                labels: torch.Tensor, rng: np.random.Generator, gen: torch.Generator, steps: int, bs: int,
                image_size: int, flip: bool) -> list[float]:
    perm, pos = rng.permutation(len(train)), 0
    losses: list[float] = []
    for step in range(steps):
        if pos + bs > len(perm):
            perm, pos = rng.permutation(len(train)), 0
        idx = torch.from_numpy(perm[pos:pos + bs])
        pos += bs
        x = _augment(train.context[idx], image_size, gen, flip)
        loss = head(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, steps // 5) == 0:
            log.info("stand-in encoder: step %d/%d loss %.3f", step + 1, steps, float(np.mean(losses[-20:])))
    return losses


def train_standin(train_urls: list[str], val_urls: list[str], out_dir: str, *, steps: int = 600, batch_size: int = 128,
                  image_size: int = 32, embed_dim: int = 64, lr: float = 3e-3, seed: int = 0, margin: float = 0.3,
                  scale: float = 16.0, widths: Sequence[int] = (32, 64, 128), weight_decay: float = 5e-4,
                  flip: bool = True, num_threads: int | None = 1) -> dict[str, Any]:
    """Train the stand-in encoder on identity-labelled shards, measure held-out verification, save
    ``out_dir/model.safetensors`` + ``out_dir/config.json`` and return the stats.

    ``num_threads`` (torch intra-op threads while training, restored afterwards) defaults to 1: this network's
    convolutions are so small that on a 2-core machine two threads gain < 2x when the machine is quiet
    (~0.036 vs ~0.066 s/step) but become 2-20x SLOWER whenever another process competes for a core (threads
    wait for each other at every op), while one thread keeps its pace; ``None`` keeps torch's setting.
    """
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)

    train = load_face_set(train_urls, image_size, with_context=True)
    val = load_face_set(val_urls, image_size) if val_urls else FaceSet()
    labels_np, names = train.labels()
    if len(names) < 2:
        raise ValueError(f"the training shards hold {len(names)} identities; the stand-in encoder needs at least 2 "
                         "(shards with a non-null 'identity' per sample, e.g. from generate_synthetic_shards)")
    counts = np.bincount(labels_np)
    if (counts >= 2).sum() < 1 or len(train) < 3:
        raise ValueError("the training shards need identities with at least two images each (the verification "
                         f"threshold is chosen on same-identity pairs); got {len(train)} faces of {len(names)} identities")
    overlap = set(names) & set(val.identities)
    if overlap:
        log.warning("stand-in encoder: %d identities appear in both train and val; held-out accuracy is optimistic", len(overlap))
    t_load = time.perf_counter() - t0
    log.info("stand-in encoder %s: %d train faces of %d identities, %d val faces of %d identities (loaded in %.1f s)",
             STANDIN_NAME, len(train), len(names), len(val), len(set(val.identities)), t_load)

    model = StandInArcFace(image_size, embed_dim, widths)
    head = ArcMarginHead(embed_dim, len(names), margin, scale)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(int(steps), 1), pct_start=0.15)
    labels = torch.from_numpy(labels_np)
    bs = max(2, min(int(batch_size), len(train)))
    model.train()
    # Late in training tiny gradients/moments become denormal floats, which make CPU kernels ~10x slower;
    # flush them to zero while training (restored to PyTorch's default afterwards).
    flushed = torch.set_flush_denormal(True)
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(max(1, int(num_threads)))
    try:
        losses = _train_loop(model, head, opt, sched, train, labels, rng, gen, int(steps), bs, image_size, flip)
    finally:
        torch.set_num_threads(threads)
        if flushed:
            torch.set_flush_denormal(False)
    t_train = time.perf_counter() - t0 - t_load
    model.eval()
    model.requires_grad_(False)

    stats = verification_stats(model, train, val, seed)
    stats.update(name=STANDIN_NAME, steps=int(steps), batch_size=bs, final_loss=float(np.mean(losses[-20:])) if losses else None,
                 load_seconds=round(t_load, 2), train_seconds=round(t_train, 2),
                 total_seconds=round(time.perf_counter() - t0, 2), skipped_samples={**train.skipped, **val.skipped})
    if stats.get("verification_accuracy") is not None:
        log.info("stand-in identity encoder %s: held-out verification accuracy %.3f at cosine threshold %.3f "
                 "(threshold from train identities; %d same / %d different pairs; mean cos same %.3f, different %.3f; "
                 "AUC %.3f); %d steps in %.1f s", STANDIN_NAME, stats["verification_accuracy"], stats["threshold"],
                 stats["n_same_pairs"], stats["n_diff_pairs"], stats["mean_same_cos"],
                 float("nan") if stats["mean_diff_cos"] is None else stats["mean_diff_cos"],
                 stats["auc"], steps, t_train)

    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, WEIGHTS_FILE)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, weights + ".tmp",
              metadata={"name": STANDIN_NAME})
    os.replace(weights + ".tmp", weights)
    config = {
        "name": STANDIN_NAME,
        "format_version": 1,
        "architecture": model.config,
        "identities": len(names),
        "training": {"train_urls": [str(u) for u in train_urls], "val_urls": [str(u) for u in val_urls], "steps": int(steps),
                     "batch_size": bs, "lr": lr, "seed": seed, "margin": margin, "scale": scale,
                     "weight_decay": weight_decay, "flip": flip, "num_threads": num_threads},
        "stats": stats,
    }
    cfg_path = os.path.join(out_dir, CONFIG_FILE)
    atomic_write_json(cfg_path, config)
    log.info("stand-in encoder %s saved to %s", STANDIN_NAME, out_dir)
    return stats


def load_standin(path: str) -> StandInArcFace:
    """The trained stand-in from a folder holding ``model.safetensors`` + ``config.json`` (or the path of the
    ``.safetensors`` file itself), in eval mode with gradients off. ``model.stats`` holds its training stats."""
    from safetensors.torch import load_file

    raw = str(path)
    folder = os.path.expanduser(raw)
    if folder.endswith(".safetensors"):
        folder = os.path.dirname(folder) or "."
    weights, cfg_path = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, CONFIG_FILE)
    missing = [p for p in (weights, cfg_path) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"stand-in identity encoder not found at '{raw}' (missing {', '.join(missing)}); {MISSING_HINT}")
    with open(cfg_path) as f:
        config = json.load(f)
    if config.get("name") != STANDIN_NAME:
        raise ValueError(f"'{cfg_path}' describes {config.get('name')!r}, not the stand-in encoder {STANDIN_NAME!r}; "
                         "point model.id_encoder.path at a folder written by train_standin")
    arch = config["architecture"]
    model = StandInArcFace(arch["image_size"], arch["embed_dim"], arch["widths"])
    model.load_state_dict(load_file(weights), strict=True)
    model.eval()
    model.requires_grad_(False)
    model.stats = config.get("stats", {})
    return model
