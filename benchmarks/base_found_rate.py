"""How often a base model draws a face the synthetic face analyzer finds, over many held-out captions.

    python benchmarks/base_found_rate.py [BASE ...] [--captions 60] [--seeds 1,2] [--out DIR]

BASE: diffusers folders of embedded-default bases (default: the shipped ``realisid/assets/tiny-sd``; ``make pretrain``
caches each UNet phase under ``data/cache/pretrain/``: ``tiny-sd``, ``tiny-sd-refined``, ``tiny-sd-heads``). Every
base samples the same prompts (``--captions`` distinct held-out captions, people no model saw) with the same seeds:
30 DDIM steps, guidance 5, as the base check of ``make pretrain``, whose 10 samples are too few to tell bases apart
(one sample is 10 points). The analyzer is the shipped stand-in detector (it finds a face in 0 of 200 noise images
and 3% of photos whose face is blurred away, see ``make check-embedded``). Reports the found-rate with a 95% Wilson
interval per base, and a grid of the first 10 samples of each (green frame: a face was found).

Writes table.md, results.json and <base>.png under benchmarks/results/<date>-base-found-rate/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from realisid.config import load_config  # noqa: E402
from realisid.embedded.analyzer import load_synthetic_analyzer  # noqa: E402
from realisid.embedded.assets import asset_path  # noqa: E402
from realisid.embedded.base import load_image_set  # noqa: E402
from realisid.embedded.check import base_check, held_out_captions, save_framed_grid  # noqa: E402
from realisid.embedded.stages import shard_urls, synthetic_shards  # noqa: E402
from realisid.models.backbone import load_pretrained_backbone  # noqa: E402


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bases", nargs="*", help="diffusers folders (default: the shipped base)")
    ap.add_argument("--captions", type=int, default=60, help="distinct held-out captions")
    ap.add_argument("--seeds", default="1,2", help="sampling seeds, comma-separated (each seed samples every caption)")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", f"{dt.date.today().isoformat()}-base-found-rate"))
    args = ap.parse_args(argv)
    bases = args.bases or [asset_path("tiny-sd")]
    for b in bases:
        if not os.path.isdir(os.path.join(b, "unet")):
            raise SystemExit(f"base '{b}' is not a diffusers folder with a unet/; give realisid/assets/tiny-sd or a "
                             "data/cache/pretrain/<phase> folder that `make pretrain` wrote")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    cfg = load_config("base", [])
    synthetic_shards(cfg)  # the held-out shards (drawn on the first run, as `make train` does)
    val = load_image_set(shard_urls(cfg, "val"), int(cfg.data.resolution))
    prompts = held_out_captions(val.captions, args.captions, seed=5)
    analyzer = load_synthetic_analyzer(asset_path("synthetic-face-analyzer"))
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for b in bases:
        t0 = time.perf_counter()
        bb = load_pretrained_backbone(b)
        found, first = [], None
        for seed in seeds:
            images, f = base_check(bb, analyzer, prompts, steps=30, guidance=5.0, seed=seed)
            found += [bool(x) for x in f]
            if first is None:
                first = (images[:10], f[:10])
        name = os.path.basename(os.path.normpath(b))
        save_framed_grid(first[0], first[1], os.path.join(args.out, f"{name}.png"))
        k, n = sum(found), len(found)
        lo, hi = wilson(k, n)
        rows.append({"base": b, "found": k, "samples": n, "found_rate": k / n, "ci95": [lo, hi],
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{b}: a face in {k} of {n} samples ({k / n:.2f}, 95% [{lo:.2f}, {hi:.2f}])", flush=True)
    record = {"what": "found-rate of samples from held-out captions, synthetic face analyzer (stand-in)",
              "command": "python benchmarks/base_found_rate.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "captions": args.captions, "seeds": seeds, "steps": 30, "guidance": 5.0, "date": dt.date.today().isoformat(),
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}", "bases": rows}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(f"# Base found-rate ({record['date']}, {record['machine']})\n\n{args.captions} held-out captions x seeds {seeds}, "
                "30 DDIM steps, guidance 5; synthetic face analyzer (stand-in detector).\n\n| base | faces found | found-rate [95%] | seconds |\n|---|---|---|---|\n")
        for r in rows:
            f.write(f"| `{r['base']}` | {r['found']} / {r['samples']} | {r['found_rate']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | {r['seconds']} |\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
