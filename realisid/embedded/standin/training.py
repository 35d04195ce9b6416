"""Training the stand-in encoder: :func:`train_standin` loads every crop of the (small) training shards into
memory once (:mod:`.data`), trains with an additive-angular-margin (ArcFace) head over identity labels with light
augmentation, and measures face verification on held-out identities (:mod:`.verification`)."""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from realisid.images import signed_from_uint8
from realisid.io import atomic_write_json

from .data import FaceSet, load_face_set
from .model import CONFIG_FILE, STANDIN_NAME, WEIGHTS_FILE, ArcMarginHead, StandInArcFace
from .verification import verification_stats

log = logging.getLogger(__name__)


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
