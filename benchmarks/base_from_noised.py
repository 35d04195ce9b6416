"""Where a base loses the faces: held-out photos noised part of the way and denoised by the base (SDEdit-style).

    python benchmarks/base_from_noised.py [BASE] [--photos 10] [--strengths 0.2,0.4,0.6,0.8,1.0] [--steps 30]
        [--guidance 5] [--seed 0] [--threshold 0.5] [--out DIR]

BASE: a diffusers folder of an embedded-default base (default: the shipped ``realisid/assets/tiny-sd``). Each of the
first ``--photos`` held-out photos of the base check's caption draw (the same photos, in the same order, as
``real.png`` of ``base_found_rate.py`` at its default ``--captions 60``) is encoded by the base's VAE (posterior mean), noised to the DDIM timestep a
fraction ``s`` of the way back along the 30-step trajectory (``s = 1``: pure noise, the photo's layout is gone), and
denoised by the base over the remaining steps with the photo's own caption and classifier-free guidance 5. A base that
keeps eyes and a mouth from ``s = 0.4`` but not from ``s = 1`` can finish faces it cannot decide; one that blurs them
already at ``s = 0.2`` cannot draw small detail at all, and no sampler or guidance will give it crisp faces.

Per strength: the mean absolute error inside the true face box against the VAE round trip of the photo (0..1 per
channel; the round trip is what a perfect UNet could give back) and against the photo, and the share of faces the
synthetic face analyzer (stand-in) finds at the true box (IoU >= 0.5) at ``--threshold``. Writes grid.png (a row per
photo: photo | VAE round trip | each strength), table.md and results.json under benchmarks/results/<date>-base-from-noised/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from realisid.config import load_config  # noqa: E402
from realisid.embedded.analyzer import load_synthetic_analyzer  # noqa: E402
from realisid.embedded.assets import asset_path  # noqa: E402
from realisid.embedded.base import denoise_latents, load_image_set  # noqa: E402
from realisid.embedded.check import held_out_indices  # noqa: E402
from realisid.embedded.stages import shard_urls, synthetic_shards  # noqa: E402
from realisid.evaluation import to_uint8  # noqa: E402
from realisid.geometry import box_iou  # noqa: E402
from realisid.images import signed_from_uint8  # noqa: E402
from realisid.machine import describe_machine  # noqa: E402
from realisid.models.backbone import load_pretrained_backbone  # noqa: E402


def parse_strengths(text: str) -> list[float]:
    """``0.2,0.6,1`` -> [0.2, 0.6, 1.0]: fractions of the sampling trajectory, each in (0, 1]."""
    try:
        out = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        out = []
    if not out or any(not 0.0 < s <= 1.0 for s in out):
        raise SystemExit(f"--strengths {text!r}: give fractions of the sampling trajectory in (0, 1], comma-separated, "
                         "e.g. 0.2,0.4,0.6,0.8,1 (1 = from pure noise)")
    return out


def first_step(strength: float, steps: int) -> int:
    """Index into the scheduler's ``steps`` timesteps where denoising starts for ``strength``: ``steps - round(strength
    * steps)``, so strength 1 starts at the first (noisiest) timestep and a small strength runs at least one step."""
    return steps - max(1, min(steps, round(strength * steps)))


@torch.no_grad()
def denoise_from(bb, z0: torch.Tensor, prompts, strength: float, *, steps: int, guidance: float, seed: int) -> torch.Tensor:
    """Scaled latents ``z0`` noised to the timestep ``strength`` of the way back and denoised by the base (DDIM, the
    photos' captions, classifier-free guidance): images in [-1, 1]. Strength 1 starts from pure noise, as a sample."""
    sched = bb.sampling_scheduler("ddim")
    sched.set_timesteps(steps)
    k = first_step(strength, steps)
    ts = sched.timesteps[k:]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(z0.shape, generator=g)
    lat = noise * sched.init_noise_sigma if k == 0 else sched.add_noise(z0, noise, ts[:1].repeat(len(z0)))
    text = bb.encode_text([""] * len(prompts) + list(prompts))
    lat = denoise_latents(bb, sched, lat, ts, text.embeds, guidance, torch.Generator().manual_seed(seed + 1))
    return bb.decode_latents(lat).float().cpu()


def face_error(images: torch.Tensor, reference: torch.Tensor, boxes: torch.Tensor) -> float:
    """Mean absolute difference inside each true face box (pixels, clamped to the image), images in [-1, 1], reported
    on a 0..1 scale per channel; averaged over the photos."""
    errs = []
    side = images.shape[-1]
    for im, ref, b in zip(images, reference, boxes):
        x0, y0 = max(0, int(b[0].floor())), max(0, int(b[1].floor()))
        x1, y1 = min(side, max(x0 + 1, int(b[2].ceil()))), min(side, max(y0 + 1, int(b[3].ceil())))
        errs.append(float((im[:, y0:y1, x0:x1] - ref[:, y0:y1, x0:x1]).abs().mean()) / 2)
    return sum(errs) / len(errs)


def found_at_box(analyzer, images: torch.Tensor, boxes: torch.Tensor, threshold: float) -> float:
    """Share of images with a detection at or above ``threshold`` overlapping the true face box by IoU >= 0.5."""
    hits = 0
    for im, b in zip(images, boxes):
        faces = analyzer.detect(to_uint8(im))
        hits += any(float(f.det_score) >= threshold and box_iou(f.bbox.tolist(), b.tolist()) >= 0.5 for f in faces)
    return hits / len(images)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", nargs="?", default=None, help="diffusers folder (default: the shipped base)")
    ap.add_argument("--photos", type=int, default=10, help="held-out photos (the first of the base check's caption draw)")
    ap.add_argument("--strengths", default="0.2,0.4,0.6,0.8,1.0", help="fractions of the trajectory, comma-separated")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=0.5, help="detection threshold for the found share")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", f"{dt.date.today().isoformat()}-base-from-noised"))
    args = ap.parse_args(argv)
    strengths = parse_strengths(args.strengths)
    if args.steps < 1 or args.photos < 1:
        raise SystemExit(f"--steps {args.steps} --photos {args.photos}: give at least 1 of each")
    base = args.base or asset_path("tiny-sd")
    if not os.path.isdir(os.path.join(base, "unet")):
        raise SystemExit(f"base '{base}' is not a diffusers folder with a unet/; give realisid/assets/tiny-sd or a "
                         "pretrain.out_dir's tiny-sd/ folder")
    t0 = time.perf_counter()
    cfg = load_config("base", [])
    synthetic_shards(cfg)
    val = load_image_set(shard_urls(cfg, "val"), int(cfg.data.resolution))
    idx = held_out_indices(len(val.captions), 60, seed=5)[: args.photos]  # base_found_rate.py's captions, in its order
    photos = signed_from_uint8(val.images[idx])
    boxes = val.boxes[idx]
    prompts = [val.captions[i] for i in idx]
    bb = load_pretrained_backbone(base)
    analyzer = load_synthetic_analyzer(asset_path("synthetic-face-analyzer"))
    with torch.no_grad():
        z0 = bb.vae.encode(photos.to(bb.vae.device, bb.vae.dtype)).latent_dist.mean * bb.vae.config.scaling_factor
        round_trip = bb.decode_latents(z0).float().cpu()
    columns = {"photo": photos, "VAE round trip": round_trip}
    for s in strengths:
        columns[f"s={s:g}"] = denoise_from(bb, z0, prompts, s, steps=args.steps, guidance=args.guidance, seed=args.seed)
    rows = [{"column": name, "face_error_vs_round_trip": round(face_error(x, round_trip, boxes), 4),
             "face_error_vs_photo": round(face_error(x, photos, boxes), 4),
             "found_at_box": found_at_box(analyzer, x, boxes, args.threshold)} for name, x in columns.items()]
    os.makedirs(args.out, exist_ok=True)
    from torchvision.utils import make_grid, save_image

    tiles = torch.stack([columns[name][i] for i in range(len(idx)) for name in columns])
    save_image(make_grid((tiles.clamp(-1, 1) + 1) / 2, nrow=len(columns), padding=2, pad_value=1.0), os.path.join(args.out, "grid.png"))
    record = {"what": "held-out photos noised part of the way and denoised by the base (SDEdit-style)",
              "command": "python benchmarks/base_from_noised.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "base": base if not os.path.isabs(base) else os.path.relpath(base), "photos": len(idx), "steps": args.steps,
              "guidance": args.guidance, "seed": args.seed, "threshold": args.threshold, "columns": rows,
              "date": dt.date.today().isoformat(), "machine": describe_machine(host=False),
              "seconds": round(time.perf_counter() - t0, 1)}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table_md(record))
    print(table_md(record))
    print(f"written: {args.out}")
    return 0


def table_md(record: dict) -> str:
    lines = [f"# Where the base loses the faces ({record['date']}, {record['machine']})", "",
             f"`{record['base']}`: {record['photos']} held-out photos (the order of `real.png` in `base_found_rate.py`), encoded, "
             f"noised a fraction s of the way back along {record['steps']} DDIM steps and denoised with their own captions "
             f"(guidance {record['guidance']:g}, seed {record['seed']}); s=1 is a sample from noise. Command: `{record['command']}` "
             f"({record['seconds']} s). grid.png: a row per photo, the columns below left to right.", "",
             f"| column | face-box error vs round trip | vs photo | faces found at the true box (threshold {record['threshold']}) |",
             "|---|---|---|---|"]
    for r in record["columns"]:
        lines.append(f"| {r['column']} | {r['face_error_vs_round_trip']:.4f} | {r['face_error_vs_photo']:.4f} | {r['found_at_box']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from realisid.cli import quiet_progress_bars

    quiet_progress_bars()
    sys.exit(main())
