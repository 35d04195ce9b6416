"""What bounds the faces the embedded default's base draws: its UNet's shape, probed within the package budget.

    python benchmarks/unet_probe.py MODE [--steps 1500] [--set KEY=VALUE ...] [--tag TAG] [--captions 40] [--save DIR] [--out DIR]
    python benchmarks/unet_probe.py --summary DIR

The shipped base ships inside the package, and everything shipped must stay under ``pretrain.max_megabytes`` (25 MB;
the shipped models take 24.2 MB, 16.2 MB of it the float16 UNet). So a bigger UNet is not free: parameters cost
bytes, and the budget leaves about 0.8 MB. Width at the 16x16 level (where a face's features are) costs compute
but few parameters; width at 4x4 costs parameters. This probe trains UNet shapes side by side on the shipped VAE's
latents, so that the next base spends its bytes where they buy faces. MODE:

- ``shipped``: the shipped UNet as it is (17,000 steps of ``make pretrain``'s three phases; no training);
- ``scratch``: a UNet and text encoder built from the config (``model.tiny.unet``; change it with ``--set``, e.g.
  ``--set "model.tiny.unet.layers_per_block=[2,1,1]"``) trained from scratch with phase 1 of the recipe
  (``pretrain.unet``: v prediction, min-SNR, EMA, caption drop-out) for ``--steps`` steps on the latents of the
  shipped VAE, which stays as it is.

Measured on held-out photos (identities no model saw), with the same noise and timesteps for every probe: the
v-prediction loss per noise band, over the whole latent and over the latent pixels of the head (face box scaled
1.6x), posterior means, full captions; then ``--captions`` held-out captions sampled from noise (30 DDIM steps,
guidance 5) and the share in which the synthetic face analyzer (a stand-in) finds a face, with a picture of the first
10. Also parameters, float16 megabytes, seconds per training step. Writes results.json and samples.png under
``--out`` (default benchmarks/results/<date>-unet-probe/<MODE>[-<tag>]/) and rewrites table.md one folder up from
every probe there (``--summary DIR`` rewrites it alone). ``--save DIR`` (scratch) writes the trained base as a
diffusers folder (the shipped VAE, the probe's UNet and text encoder), which ``benchmarks/base_found_rate.py`` samples.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import shlex
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from base_found_rate import wilson  # noqa: E402
from probes import probe_out, probe_parser, read_probes, save_probe, summary_only  # noqa: E402
from realisid.config import load_config  # noqa: E402
from realisid.embedded import base as B  # noqa: E402
from realisid.embedded.analyzer import load_synthetic_analyzer  # noqa: E402
from realisid.embedded.assets import asset_path  # noqa: E402
from realisid.embedded.check import base_check, held_out_captions, save_framed_grid  # noqa: E402
from realisid.embedded.stages import shard_urls, synthetic_shards  # noqa: E402
from realisid.machine import describe_machine  # noqa: E402
from realisid.models.backbone import build_tiny_backbone, load_pretrained_backbone, save_backbone  # noqa: E402
from realisid.models.grow import layers_setting  # noqa: E402

MODES = ("shipped", "scratch")
BANDS = ((0, 200), (200, 400), (400, 600), (600, 800), (800, 1000))  # training timesteps: low noise (detail) .. pure noise (layout)


def head_pixels(boxes: torch.Tensor, image_size: int, latent_size: int) -> torch.Tensor:
    """(N, 1, L, L) 1 on every latent pixel the head (face box scaled 1.6x, as the recipe's head weights) touches."""
    w = B.head_weights(boxes, image_size, latent_size, face_weight=1.0)
    return (w > w.amin(dim=(2, 3), keepdim=True) * (1 + 1e-6)).float()


@torch.no_grad()
def held_out_loss(bb, moments: torch.Tensor, val: B.ImageSet, *, seed: int = 0, batch_size: int = 64) -> dict:
    """v-prediction MSE per noise band on the held-out latents (posterior means, full captions), over the whole latent
    and over the head's latent pixels; the noise and the timesteps depend on ``seed`` alone, so every UNet gets the
    same problems."""
    sched = bb.noise_scheduler()
    scale = float(bb.vae.config.scaling_factor)
    z_all = moments[:, : moments.shape[1] // 2].float() * scale
    L, R = z_all.shape[-1], val.images.shape[-1]
    out = {}
    for lo, hi in BANDS:
        g = torch.Generator().manual_seed(seed * 1000 + lo)
        whole = head = head_px = 0.0
        for i in range(0, len(z_all), batch_size):
            z = z_all[i:i + batch_size]
            noise = torch.randn(z.shape, generator=g)
            t = torch.randint(lo, hi, (len(z),), generator=g)
            text = bb.encode_text(val.captions[i:i + len(z)]).embeds
            pred = bb.unet(sched.add_noise(z, noise, t), t, encoder_hidden_states=text, return_dict=False)[0]
            err = (pred - sched.get_velocity(z, noise, t)) ** 2
            mask = head_pixels(val.boxes[i:i + len(z)], R, L)
            whole += float(err.mean(dim=(1, 2, 3)).sum())
            head += float((err * mask).sum())
            head_px += float(mask.sum()) * err.shape[1]
        out[f"{lo}-{hi}"] = {"whole": round(whole / len(z_all), 5), "head": round(head / max(head_px, 1.0), 5)}
    return out


def write_summary(folder: str) -> str:
    """table.md in ``folder``: one row per probe (sub-folder with a results.json), shipped first."""
    rows = read_probes(folder, MODES)
    bands = [f"{lo}-{hi}" for lo, hi in BANDS]
    lines = ["# What bounds the base's faces: its UNet's shape, probed (`benchmarks/unet_probe.py`)", "",
             "Held-out v-prediction loss (identities no model saw; same noise and timesteps for every probe) per band of "
             "training timesteps, over the head's latent pixels (face box x1.6) and, in brackets, the whole latent; low "
             "timesteps are fine detail, high ones the layout. Found: the share of samples from held-out captions (30 DDIM "
             "steps, guidance 5) in which the synthetic face analyzer (a stand-in) finds a face. MB: the UNet in float16, "
             "as shipped (the package budget is 25 MB for everything; the shipped models take 24.2 MB).", "",
             "| probe | UNet shape | parameters | MB | steps | s / step | " + " | ".join(f"head loss t {b}" for b in bands)
             + " | found [95%] | picture | command |",
             "|---|---|---|---|---|---|" + "---|" * len(bands) + "---|---|---|"]
    for name, r in rows:
        loss = r["held_out_loss"]
        cells = " | ".join(f"{loss[b]['head']:.4f} ({loss[b]['whole']:.4f})" for b in bands)
        f = r["found"]
        lines.append(f"| {name} | {r['unet_shape']} | {r['parameters'] / 1e6:.2f} M | {r['megabytes_fp16']:.1f} | {r.get('unet_steps', r.get('steps_note', '-'))} | "
                     f"{r.get('seconds_per_step', '-')} | {cells} | {f['found']} / {f['samples']} ({f['rate']:.2f} [{f['ci95'][0]:.2f}, "
                     f"{f['ci95'][1]:.2f}]) | [png]({name}/samples.png) | `{r['command']}` |")
    if rows:
        first = rows[0][1]
        lines += ["", f"Measured on {first['machine']} ({first['date']}), {first['held_out_photos']} held-out photos for the loss."]
    out = os.path.join(folder, "table.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    return out


def _shape(unet) -> str:
    return f"{list(unet.config.block_out_channels)}, layers {layers_setting(unet.config)}"


def main(argv=None) -> int:
    ap = probe_parser(__doc__.split("\n\n")[0], MODES, "the UNet's shape")
    ap.add_argument("--captions", type=int, default=40, help="held-out captions sampled for the found-rate")
    ap.add_argument("--save", default=None, metavar="DIR", help="scratch: write the trained base there (diffusers folder)")
    args = ap.parse_args(argv)
    if summary_only(ap, args, MODES, write_summary):
        return 0
    if args.mode != "scratch" and (args.overrides or args.save):
        raise SystemExit(f"--set and --save are for the UNet that mode 'scratch' trains (mode is '{args.mode}')")
    name, out = probe_out(args, "unet-probe")

    cfg = load_config("base", args.overrides)
    synthetic_shards(cfg)
    resolution = int(cfg.data.resolution)
    data = B.load_image_set(shard_urls(cfg, "train"), resolution)
    val = B.load_image_set(shard_urls(cfg, "val"), resolution)
    shipped = load_pretrained_backbone(asset_path("tiny-sd"))
    if args.mode == "scratch":
        bb = build_tiny_backbone(cfg.model.tiny, args.seed)
        bb.vae = shipped.vae  # the shipped latent space: only the UNet (and its text encoder) differ between probes
    else:
        bb = shipped
    record = {"mode": args.mode, "unet_shape": _shape(bb.unet), "parameters": sum(p.numel() for p in bb.unet.parameters()),
              "megabytes_fp16": round(sum(p.numel() for p in bb.unet.parameters()) * 2 / 2**20, 2),
              "held_out_photos": len(val), "machine": describe_machine(host=False),
              "date": dt.date.today().isoformat(), "command": "python benchmarks/unet_probe.py " + shlex.join(sys.argv[1:] if argv is None else argv)}
    if args.mode == "shipped":
        record["steps_note"] = "17000 (shipped)"
    else:
        cache = os.path.join("data", "cache", "unet-probe-moments.pt")  # the shipped VAE's training latents, encoded once
        if os.path.exists(cache):
            moments = torch.load(cache)
        else:
            moments = B.encode_moments(bb.vae, data.images)
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            torch.save(moments, cache)
        u = cfg.pretrain.unet
        t0 = time.perf_counter()
        stats = B.train_unet(bb, moments, data, steps=args.steps, batch_size=int(u.batch_size), lr=float(u.lr),
                             weight_decay=float(u.weight_decay), ema_decay=float(u.ema_decay), min_snr_gamma=float(u.min_snr_gamma),
                             caption_probs=dict(u.captions), generator=torch.Generator().manual_seed(args.seed),
                             what=f"UNet probe {name}")
        seconds = time.perf_counter() - t0
        record.update(stats, seconds=round(seconds, 1), seconds_per_step=round(seconds / max(1, args.steps), 3))
        if args.save:
            save_backbone(bb, args.save, half_unet=True)
            record["saved"] = args.save
    val_moments = B.encode_moments(bb.vae, val.images)
    record["held_out_loss"] = held_out_loss(bb, val_moments, val)
    analyzer = load_synthetic_analyzer(asset_path("synthetic-face-analyzer"))
    prompts = held_out_captions(val.captions, args.captions, seed=5)
    images, found = base_check(bb, analyzer, prompts, steps=30, guidance=5.0, seed=1)
    k = int(sum(bool(f) for f in found))
    record["found"] = {"found": k, "samples": len(found), "rate": k / len(found), "ci95": list(wilson(k, len(found)))}
    save_framed_grid(images[:10], found[:10], os.path.join(out, "samples.png"), nrow=10)
    save_probe(out, record, write_summary)
    head = " ".join(f"{v['head']:.4f}" for v in record["held_out_loss"].values())
    print(f"{name}: {record['unet_shape']}, {record['parameters'] / 1e6:.2f} M params; held-out head loss by band {head}; "
          f"faces found {k} of {len(found)}; {out}")
    return 0


if __name__ == "__main__":
    from realisid.cli import quiet_progress_bars

    quiet_progress_bars()  # no bar lines when piped to a log
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise SystemExit(main())
