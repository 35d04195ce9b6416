"""What bounds the faces the embedded default's base can draw: its autoencoder, probed.

    python benchmarks/vae_probe.py MODE [--steps 1500] [--lr 3e-4] [--set KEY=VALUE ...] [--tag TAG] [--out DIR]
    python benchmarks/vae_probe.py --summary DIR

Every face the base draws goes through its VAE decoder, so a face the VAE cannot reconstruct from a held-out photo
is a face no UNet can draw. MODE:

- ``shipped``: the shipped VAE as it is (no training);
- ``decoder``: the shipped VAE's decoder trained on (``--steps``), encoder frozen: the latents every shipped UNet and
  branch learned from stay the same, so a sharper decoder alone would improve every picture without retraining;
- ``continue``: the whole shipped VAE trained on (a new latent space: the UNet would have to be trained again);
- ``scratch``: a VAE built from the config (``model.tiny.vae``; change it with ``--set``, e.g.
  ``--set "model.tiny.vae.block_out_channels=[32,64,128,128]"``) trained from scratch with the recipe's loss.

Training uses ``make pretrain``'s VAE recipe (``pretrain.vae``: 64 px crops around the faces, face-weighted MSE +
L1, tiny KL) with ``--steps`` and ``--lr`` in place of its own. Measured on the first ``--count`` held-out photos
(identities no model saw): mean squared error of the round trip (posterior mean, [-1, 1] pixels) over whole images
and over the face boxes, before and after, seconds per step, and a picture: held-out photos on the top row, the same
photos through the VAE below. Writes results.json and round_trip.png under ``--out``
(default benchmarks/results/<date>-vae-probe/<MODE>[-<tag>]/) and rewrites table.md one folder up from every
probe there (``--summary DIR`` rewrites it alone).
"""
from __future__ import annotations

import copy
import datetime as dt
import logging
import os
import shlex
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from probes import probe_out, probe_parser, read_probes, save_probe, summary_only  # noqa: E402
from realisid.config import load_config  # noqa: E402
from realisid.embedded import base as B  # noqa: E402
from realisid.embedded.assets import asset_path  # noqa: E402
from realisid.embedded.stages import shard_urls, synthetic_shards  # noqa: E402
from realisid.embedded.check import photos_per_bin, save_round_trip  # noqa: E402
from realisid.geometry import bins_from_config  # noqa: E402
from realisid.machine import describe_machine  # noqa: E402
from realisid.models.backbone import build_tiny_backbone, load_pretrained_backbone  # noqa: E402

MODES = ("shipped", "decoder", "continue", "scratch")


def write_summary(folder: str) -> str:
    """table.md in ``folder``: one row per probe (sub-folder with a results.json), shipped first."""
    rows = read_probes(folder, MODES)
    lines = ["# What bounds the base's faces: its VAE, probed (`benchmarks/vae_probe.py`)", "",
             "Round-trip error of held-out photos (posterior mean, [-1, 1] pixels; face = inside the face boxes). Shipped VAE: "
             "6000 steps of `make pretrain`'s recipe. Each probe trains with that recipe's loss for the steps given.", "",
             "| probe | VAE channels | parameters (MB in float16) | steps | s / step | face MSE before -> after | face MSE, weights in float16 | "
             "image MSE before -> after | picture | command |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        after = r.get("mse_after", r["mse_before"])
        half = f"{r['mse_float16_weights']['face']:.4f}" if "mse_float16_weights" in r else "-"
        lines.append(f"| {name} | {r['vae_block_out_channels']} x {r['latent_channels']} latent | {r['parameters'] / 1e6:.2f} M "
                     f"({r['parameters'] * 2 / 2**20:.1f}) | {r.get('vae_steps', 0)} | {r.get('seconds_per_step', '-')} | "
                     f"{r['mse_before']['face']:.4f} -> {after['face']:.4f} | {half} | "
                     f"{r['mse_before']['image']:.5f} -> {after['image']:.5f} | [png]({name}/round_trip.png) | `{r['command']}` |")
    if rows:
        first = rows[0][1]
        lines += ["", f"Measured on {first['machine']} ({first['date']}), {first['held_out_photos']} held-out photos "
                  "(identities no model saw)."]
    out = os.path.join(folder, "table.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    return out


def main(argv=None) -> int:
    ap = probe_parser(__doc__.split("\n\n")[0], MODES, "the VAE's shape")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--count", type=int, default=256, help="held-out photos the error is measured on")
    args = ap.parse_args(argv)
    if summary_only(ap, args, MODES, write_summary):
        return 0
    if args.mode != "scratch" and args.overrides:
        raise SystemExit(f"--set changes the VAE built from the config, which only mode 'scratch' uses (mode is '{args.mode}')")
    name, out = probe_out(args, "vae-probe")
    torch.manual_seed(args.seed)

    cfg = load_config("base", args.overrides)
    synthetic_shards(cfg)
    resolution = int(cfg.data.resolution)
    data = B.load_image_set(shard_urls(cfg, "train"), resolution)
    val = B.load_image_set(shard_urls(cfg, "val"), resolution)
    examples = val.images[photos_per_bin(val, bins_from_config(cfg.bins))]
    if args.mode == "scratch":
        vae = build_tiny_backbone(cfg.model.tiny, args.seed).vae
    else:
        vae = load_pretrained_backbone(asset_path("tiny-sd")).vae
    vae.eval().requires_grad_(False)
    before = B.reconstruction_mse(vae, val, count=args.count)
    record = {"mode": args.mode, "vae_block_out_channels": list(vae.config.block_out_channels),
              "latent_channels": int(vae.config.latent_channels), "parameters": sum(p.numel() for p in vae.parameters()),
              "held_out_photos": min(args.count, len(val)), "mse_before": before,
              "machine": describe_machine(host=False), "date": dt.date.today().isoformat(),
              "command": "python benchmarks/vae_probe.py " + shlex.join(sys.argv[1:] if argv is None else argv)}
    if args.mode != "shipped":
        p = cfg.pretrain.vae
        t0 = time.perf_counter()
        stats = B.train_vae(vae, data, steps=args.steps, batch_size=int(p.batch_size), lr=args.lr, crop=int(p.crop),
                            kl_weight=float(p.kl_weight), generator=torch.Generator().manual_seed(args.seed),
                            parts="decoder" if args.mode == "decoder" else "all")
        seconds = time.perf_counter() - t0
        record.update(stats, lr=args.lr, seconds=round(seconds, 1), seconds_per_step=round(seconds / max(1, args.steps), 3))
        record["mse_after"] = B.reconstruction_mse(vae, val, count=args.count)
    # the package stores weights to fit its budget: the same VAE with its weights rounded to float16 (run in float32)
    rounded = copy.deepcopy(vae).to(torch.float16).to(torch.float32)
    record["float16_megabytes"] = round(record["parameters"] * 2 / 2**20, 2)
    record["mse_float16_weights"] = B.reconstruction_mse(rounded, val, count=args.count)
    with torch.no_grad():
        save_round_trip(examples, B.vae_round_trip(vae, examples), os.path.join(out, "round_trip.png"))
    save_probe(out, record, write_summary)
    after = record.get("mse_after", before)
    print(f"{name}: held-out face MSE {before['face']:.4f} -> {after['face']:.4f}, image {before['image']:.5f} -> "
          f"{after['image']:.5f}; {out}")
    return 0


if __name__ == "__main__":
    from realisid.cli import quiet_progress_bars

    quiet_progress_bars()  # no bar lines when piped to a log
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise SystemExit(main())
