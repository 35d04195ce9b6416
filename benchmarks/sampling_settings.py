"""Choose sampling settings (guidance scales, identity delay) on held-out identities the benchmark does not use.

    python benchmarks/sampling_settings.py RUN_DIR --set 7.5,5,0.1 --set 5,5,0.1,0.7 --set 7.5,5,0.1,0,0.5 [--samplers ddim,ddpm]
        [--steps 20] [--offset 12] [--out DIR]

Each ``--set`` is ``guidance_text,guidance_id,id_delay[,guidance_rescale[,id_guidance_until]]`` (defaults 0 and 1), then
optionally ``BIN=SCALE`` items for an identity guidance per face-size bin (``--set 7.5,5,0.1,large=3``:
``sampling.guidance_id_by_bin``; bins left out take guidance_id). ``--samplers`` runs every setting with each sampler
(``sampling.scheduler`` names; default ``ddim``; another sampler is added to the setting's name). The run is
benchmarked once per setting exactly as the branch sweep benchmarks it (12 references, one person, the sweep's 9 face
sizes, 20 sampling steps unless ``--steps`` says otherwise, the identity-free prompt), except that the references are
the held-out identities after the first ``--offset`` (sorted by name): the benchmark's own identities are the first
12, so settings chosen here are not tuned on the numbers they are then reported with. Writes the benchmark's files
per setting and a table.md of margin, retention, found-rate and location IoU per bin under
benchmarks/results/<date>-sampling-settings/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from realisid.bench import run_bench  # noqa: E402
from realisid.config import load_config  # noqa: E402
from realisid.metrics.calibrated import fmt  # noqa: E402
from realisid.models.samplers import SAMPLERS  # noqa: E402
from realisid.pipeline import parse_by_bin  # noqa: E402

SWEEP_BENCH = ["bench.references=12", "bench.people=[1]"]


KEYS = ("guidance_text", "guidance_id", "id_delay", "guidance_rescale", "id_guidance_until")
DEFAULTS = (0.0, 1.0)  # guidance_rescale, id_guidance_until when a --set leaves them out


def parse_setting(text: str) -> dict:
    items = text.split(",")
    per_bin = [t for t in items if "=" in t]
    try:
        values = [float(v) for v in items if "=" not in v]
        if not 3 <= len(values) <= 5:
            raise ValueError
        by_bin = {k: float(v) for k, v in parse_by_bin(",".join(per_bin)).items()}
    except ValueError:
        raise SystemExit(f"--set {text!r}: give guidance_text,guidance_id,id_delay[,guidance_rescale[,id_guidance_until]] "
                         "and optionally BIN=SCALE items, e.g. --set 7.5,5,0.1 or --set 7.5,5,0.1,large=3") from None
    setting = dict(zip(KEYS, values + list(DEFAULTS[len(values) - 3:])))
    return {**setting, "guidance_id_by_bin": by_bin} if by_bin else setting


def setting_name(s: dict) -> str:
    name = f"text{s['guidance_text']:g}-id{s['guidance_id']:g}-delay{s['id_delay']:g}"
    name += f"-rescale{s['guidance_rescale']:g}" if s["guidance_rescale"] else ""
    name += f"-until{s['id_guidance_until']:g}" if s["id_guidance_until"] != 1.0 else ""
    return name + "".join(f"-{b}{v:g}" for b, v in s.get("guidance_id_by_bin", {}).items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="training run directory with an export/ (e.g. runs/sweeps/branches/joint)")
    ap.add_argument("--set", action="append", required=True,
                    help="guidance_text,guidance_id,id_delay[,guidance_rescale[,id_guidance_until]][,BIN=SCALE...] (repeat)")
    ap.add_argument("--samplers", default="ddim", help=f"samplers, comma-separated ({', '.join(SAMPLERS)}); each setting runs with each")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps (default 20, the sweeps' bench.steps)")
    ap.add_argument("--exp", default="joint", help="experiment whose bench settings to use (default: joint)")
    ap.add_argument("--offset", type=int, default=12, help="held-out identities to skip (the benchmark uses the first 12)")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", f"{dt.date.today().isoformat()}-sampling-settings"))
    args = ap.parse_args(argv)
    if not os.path.isdir(os.path.join(args.run, "export")):
        raise SystemExit(f"'{args.run}' has no export/; give a finished training run directory")
    if args.offset < 12:
        raise SystemExit(f"--offset {args.offset} overlaps the benchmark's 12 reference identities; use 12 or more")
    samplers = [k.strip() for k in args.samplers.split(",") if k.strip()]
    if not samplers or any(k not in SAMPLERS for k in samplers):
        raise SystemExit(f"--samplers {args.samplers!r}: give some of {', '.join(SAMPLERS)}, comma-separated")
    settings = {setting_name(s) + ("" if k == "ddim" else f"-{k}"): {**s, "scheduler": k}
                for s in map(parse_setting, args.set) for k in samplers}
    if args.steps < 1:
        raise SystemExit(f"--steps {args.steps}: give at least 1 sampling step")
    cfg = load_config(args.exp, SWEEP_BENCH + [f"bench.steps={args.steps}", f"bench.reference_offset={args.offset}"])
    t0 = time.perf_counter()
    res = run_bench(cfg, args.run, args.out, settings=settings, progress=False)
    minutes = (time.perf_counter() - t0) / 60
    bins = [b for b in next(iter(res["calibrated"].values()))]
    lines = [f"# Sampling settings on held-out identities {args.offset + 1}-{args.offset + 12} ({dt.date.today().isoformat()}, "
             f"{minutes:.1f} min)\n",
             f"Run: {args.run}. Benchmarked as the branch sweep does (12 references, one person, {args.steps} sampling steps, \"a photo of a "
             "person\"; DDIM unless a setting names another sampler), on the held-out identities after the benchmark's first 12. Margin and retention per bin with 95% "
             "intervals; stand-ins throughout (tiny base, synthetic face analyzer, stand-in encoders).\n"]
    for q, digits in (("margin", 3), ("retention", 2), ("found_rate", 2)):
        lines += [f"\n## {q}\n", "| setting | " + " | ".join(bins) + " |", "|---|" + "---|" * len(bins)]
        for name, per_bin in res["calibrated"].items():
            lines.append(f"| {name} | " + " | ".join(fmt(per_bin[b][q], digits) for b in bins) + " |")
    lines += ["\n## location IoU\n", "| setting | " + " | ".join(bins) + " |", "|---|" + "---|" * len(bins)]
    for name in res["calibrated"]:
        iou = {r["bin"]: r["loc_iou"] for r in res["bins"] if r["setting"] == name}
        lines.append(f"| {name} | " + " | ".join(f"{iou.get(b, float('nan')):.2f}" for b in bins) + " |")
    with open(os.path.join(args.out, "settings.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    from realisid.cli import quiet_progress_bars

    quiet_progress_bars()  # no bar lines when piped to a log
    raise SystemExit(main())
