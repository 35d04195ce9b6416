"""How often a base model draws a face the synthetic face analyzer finds, over many held-out captions.

    python benchmarks/base_found_rate.py [BASE ...] [--captions 60] [--seeds 1,2] [--thresholds 0.3,0.5] [--samplers ddim,ddpm]
        [--steps 30] [--guidance 5] [--grid 10] [--analyzer DIR] [--out DIR]

BASE: diffusers folders of embedded-default bases (default: the shipped ``realisid/assets/tiny-sd``; ``make pretrain``
caches each UNet phase under ``data/cache/pretrain/``: ``tiny-sd``, ``tiny-sd-refined``, ``tiny-sd-heads``). Every
base samples the same prompts (``--captions`` distinct held-out captions, people no model saw) with the same seeds:
30 DDIM steps, guidance 5, as the base check of ``make pretrain``, whose 10 samples are too few to tell bases apart
(one sample is 10 points). The analyzer is the shipped stand-in detector (it finds a face in 0 of 200 noise images
and 3% of photos whose face is blurred away, see ``make check-embedded``); ``--analyzer`` names another (a
``synthetic-face-analyzer/`` folder of a ``pretrain.out_dir``), though the shipped one keeps every base under the
same judge. Reports the found-rate with a 95% Wilson interval per base, and a grid of the first 10 samples of each
(green frame: a face was found; ``--grid N`` shows the first N of the first seed instead, for judging faces by eye on
more than ten).

``--samplers``: each base is sampled with each of these (``sampling.scheduler`` names; default ``ddim``, the base
check's): ``ddpm``, ``euler_a`` and ``dpm_sde`` add fresh noise at every step instead of following the deterministic
path from the first noise. ``--steps`` sets the sampling steps (default 30, the base check's). ``--guidance``: the
classifier-free guidance scales, comma-separated, each a row per base and sampler (default 5, the base check's; 1 is
the conditional model alone), so that whether a base's smudged faces come from strong guidance can be measured.

``--thresholds``: the found-rate at each detection threshold (default: the analyzer's own, 0.3), and the analyzer's
recall on real held-out photos at each (per face-size bin), so that a threshold can be judged on both sides: how
often it fires on samples known to hold no face (e.g. a base trained 1500 steps, whose samples are colour fields,
``benchmarks/unet_probe.py scratch --save DIR``) and how many real faces it still finds. The grids frame at the first
threshold.

Writes table.md, results.json, <base>.png (the base's folder name, with parent folders in front when two bases share it)
and real.png (the held-out photos the grid's captions were written for, in the grid's order: what the base should
draw for them) under benchmarks/results/<date>-base-found-rate/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from realisid.config import load_config  # noqa: E402
from realisid.embedded.analyzer import load_synthetic_analyzer  # noqa: E402
from realisid.embedded.assets import asset_path  # noqa: E402
from realisid.embedded.base import load_image_set, sample_base  # noqa: E402
from realisid.embedded.check import held_out_indices, save_framed_grid  # noqa: E402
from realisid.embedded.stages import shard_urls, synthetic_shards  # noqa: E402
from realisid.evaluation import to_uint8  # noqa: E402
from realisid.geometry import bins_from_config, box_iou, face_size, scale_bin  # noqa: E402
from realisid.machine import describe_machine  # noqa: E402
from realisid.models.backbone import load_pretrained_backbone  # noqa: E402
from realisid.models.samplers import SAMPLERS  # noqa: E402


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def shown_path(path: str) -> str:
    """``path`` as results.json records it: relative to the repository when inside it (the shipped base's default is
    resolved to an absolute path, which would name this machine's checkout), otherwise as given."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full = os.path.abspath(path)
    return os.path.relpath(full, root) if os.path.commonpath([full, root]) == root else path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bases", nargs="*", help="diffusers folders (default: the shipped base)")
    ap.add_argument("--captions", type=int, default=60, help="distinct held-out captions")
    ap.add_argument("--seeds", default="1,2", help="sampling seeds, comma-separated (each seed samples every caption)")
    ap.add_argument("--thresholds", default=None, help="detection thresholds, comma-separated (default: the analyzer's own)")
    ap.add_argument("--real", type=int, default=960, help="held-out real photos for the recall at each threshold (0: none)")
    ap.add_argument("--samplers", default="ddim", help=f"samplers, comma-separated, each a row per base ({', '.join(SAMPLERS)})")
    ap.add_argument("--steps", type=int, default=30, help="sampling steps")
    ap.add_argument("--guidance", default="5", help="classifier-free guidance scales, comma-separated, each a row per base and "
                                                     "sampler (default 5, the base check's; 1: no guidance)")
    ap.add_argument("--grid", type=int, default=10, help="samples in each grid: the first N of the first seed (default 10)")
    ap.add_argument("--analyzer", default=None, metavar="DIR",
                    help="a synthetic face analyzer folder (default: the shipped one; `make pretrain` writes one per out_dir)")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", f"{dt.date.today().isoformat()}-base-found-rate"))
    args = ap.parse_args(argv)
    bases = args.bases or [asset_path("tiny-sd")]
    for b in bases:
        if not os.path.isdir(os.path.join(b, "unet")):
            raise SystemExit(f"base '{b}' is not a diffusers folder with a unet/; give realisid/assets/tiny-sd or a "
                             "data/cache/pretrain/<phase> folder that `make pretrain` wrote")
    analyzer_dir = args.analyzer or asset_path("synthetic-face-analyzer")
    if not os.path.isfile(os.path.join(analyzer_dir, "config.json")):
        raise SystemExit(f"--analyzer {analyzer_dir}: not a synthetic face analyzer folder (no config.json); give the "
                         "synthetic-face-analyzer/ folder that `make pretrain` wrote into its pretrain.out_dir")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown or not samplers:
        raise SystemExit(f"--samplers {args.samplers!r}: unknown {unknown}; give some of {', '.join(SAMPLERS)}, comma-separated")
    if args.steps < 1:
        raise SystemExit(f"--steps {args.steps}: give at least 1 sampling step")
    guidances = parse_guidances(args.guidance)
    if not 1 <= args.grid <= args.captions:
        raise SystemExit(f"--grid {args.grid}: give 1 to --captions ({args.captions}) samples; the grid shows the first seed's")
    cfg = load_config("base", [])
    synthetic_shards(cfg)  # the held-out shards (drawn on the first run, as `make train` does)
    val = load_image_set(shard_urls(cfg, "val"), int(cfg.data.resolution))
    picked = held_out_indices(len(val.captions), args.captions, seed=5)
    prompts = [val.captions[i] for i in picked]
    analyzer = load_synthetic_analyzer(analyzer_dir)
    own = analyzer.threshold
    thresholds = parse_thresholds(args.thresholds, own)
    analyzer.threshold = 0.0  # every peak: found at t means best score >= t
    os.makedirs(args.out, exist_ok=True)
    real_grid = save_real_grid(val, picked[: args.grid], os.path.join(args.out, REAL_GRID), bins_from_config(cfg.bins))
    rows = []
    for b, name in zip(bases, grid_stems(bases)):
        bb = load_pretrained_backbone(b)  # once per base: every sampler draws from the same weights
        for sampler in samplers:
            for guidance in guidances:
                rows.append(sample_row(bb, shown_path(b), name, sampler, guidance, prompts, seeds, args.steps, analyzer, thresholds, args.out,
                                       grid=args.grid))
    real = real_recall(analyzer, val, bins_from_config(cfg.bins), thresholds, args.real) if len(thresholds) > 1 and args.real > 0 else None
    record = {"what": "found-rate of samples from held-out captions, synthetic face analyzer (stand-in)",
              "command": "python benchmarks/base_found_rate.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "captions": args.captions, "seeds": seeds, "steps": args.steps, "samplers": samplers, "guidance": guidances, "thresholds": thresholds, "analyzer_threshold": own, "grid": args.grid,
              "analyzer": shown_path(analyzer_dir),
              "date": dt.date.today().isoformat(), "machine": describe_machine(host=False),
              "bases": rows, "real_recall": real, "real_grid": real_grid}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table_md(record))
    print(f"written: {args.out}")
    return 0


def sample_row(bb, base: str, name: str, sampler: str, guidance: float, prompts, seeds, steps: int, analyzer, thresholds,
               out_dir: str, grid: int = 10) -> dict:
    """One row of the table: ``base`` sampled with ``sampler`` at ``guidance`` for every prompt and seed, the best
    detection score of each sample, the found-rate at each threshold and a framed grid of the first ``grid`` samples."""
    t0 = time.perf_counter()
    scores, first = [], None
    for seed in seeds:
        images = sample_base(bb, prompts, steps=steps, guidance=guidance, seed=seed, scheduler=sampler)
        s = [best_score(analyzer, to_uint8(im)) for im in images]
        scores += s
        if first is None:
            first = (images[:grid], [x >= thresholds[0] for x in s[:grid]])
    grid_file = grid_name(name, sampler, guidance)
    save_framed_grid(first[0], first[1], os.path.join(out_dir, grid_file))
    row = {"base": base, "grid": grid_file, "sampler": sampler, "guidance": guidance, "samples": len(scores), "scores": [round(x, 4) for x in scores],
           "seconds": round(time.perf_counter() - t0, 1), "by_threshold": {}}
    for t in thresholds:
        k, n = sum(x >= t for x in scores), len(scores)
        row["by_threshold"][str(t)] = {"found": k, "found_rate": k / n, "ci95": list(wilson(k, n))}
    first_t = row["by_threshold"][str(thresholds[0])]
    row.update(found=first_t["found"], found_rate=first_t["found_rate"], ci95=first_t["ci95"])  # the first threshold's, as before
    print(f"{base} ({sampler}, {steps} steps, guidance {guidance:g}): " + "; ".join(
        f"threshold {t}: a face in {v['found']} of {len(scores)} samples ({v['found_rate']:.2f}, 95% [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}])"
        for t, v in row["by_threshold"].items()), flush=True)
    return row


REAL_GRID = "real.png"


def save_real_grid(val, indices, path: str, bins) -> dict:
    """The held-out photos the first grid captions were written for, in the grids' order: what the synthetic world
    draws for those captions, so that a base's grid is judged by eye against it. Returns the file name and each photo's
    face-size bin, since faces too small to show eyes and a mouth are as common in the photos as in any faithful
    sample of them."""
    indices = list(indices)
    images = val.images[indices].float() / 127.5 - 1.0
    save_framed_grid(images, [True] * len(indices), path)
    side = int(val.images.shape[-1])
    per_photo = [scale_bin(face_size(b.tolist(), side, side), bins) for b in val.boxes[indices]]
    return {"file": os.path.basename(path), "bins": per_photo, "bin_counts": {b: per_photo.count(b) for b in bins}}


def grid_stems(bases: list[str]) -> list[str]:
    """Each base's grid file stem: its folder's name, with as many parent folders in front (joined by ``-``) as it takes
    to tell the bases apart, so that ``realisid/assets/tiny-sd`` and ``data/cache/assets-x/tiny-sd`` do not overwrite
    one grid (``assets-tiny-sd``, ``assets-x-tiny-sd``); the same folder twice gets ``-2``, ``-3``."""
    parts = [os.path.normpath(os.path.abspath(b)).strip(os.sep).split(os.sep) for b in bases]
    distinct, depth = len({tuple(p) for p in parts}), 1
    while depth < max((len(p) for p in parts), default=1) and len({"-".join(p[-depth:]) for p in parts}) < distinct:
        depth += 1
    stems = ["-".join(p[-depth:]) for p in parts]
    return [stem if stem not in stems[:i] else f"{stem}-{stems[:i].count(stem) + 1}" for i, stem in enumerate(stems)]


def grid_name(name: str, sampler: str, guidance: float) -> str:
    """``<base>.png`` for the base check's settings (DDIM, guidance 5), else ``<base>-<sampler>-g<guidance>.png``."""
    parts = [name] + ([sampler] if sampler != "ddim" else []) + ([f"g{guidance:g}"] if guidance != 5.0 else [])
    return "-".join(parts) + ".png"


def parse_guidances(text: str) -> list[float]:
    """``--guidance 1,3,5`` -> [1.0, 3.0, 5.0]; every scale must be a number >= 1 (1: no guidance)."""
    try:
        out = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        out = []
    if not out or any(not (g >= 1.0) for g in out):  # also refuses nan
        raise SystemExit(f"--guidance {text!r}: give classifier-free guidance scales >= 1, comma-separated, e.g. 1,3,5 "
                         "(1 = the conditional model alone, 5 = the base check's)")
    return out


def parse_thresholds(text: str | None, own: float) -> list[float]:
    if text is None:
        return [own]
    try:
        out = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"--thresholds {text!r}: give detection scores between 0 and 1, comma-separated, e.g. 0.3,0.5") from None
    if not out or any(not 0 < t < 1 for t in out):
        raise SystemExit(f"--thresholds {text!r}: give detection scores between 0 and 1, comma-separated, e.g. 0.3,0.5")
    return out


def best_score(analyzer, image) -> float:
    """The highest detection score in the image (0 when the analyzer has no peak at all)."""
    return max((float(f.det_score) for f in analyzer.detect(image)), default=0.0)


@torch.no_grad()
def real_recall(analyzer, val, bins, thresholds, count: int) -> dict:
    """Recall on real held-out photos per bin at each threshold: a detection overlapping the true face box by IoU
    >= 0.5 with a score at or above the threshold (the analyzer's recall, as ``make check-embedded`` measures it)."""
    per_bin: dict[str, list[float]] = {}
    for img, box in list(zip(val.images, val.boxes))[:count]:
        arr = img.permute(1, 2, 0).numpy()
        hits = [float(f.det_score) for f in analyzer.detect(arr) if box_iou(f.bbox.tolist(), box.tolist()) >= 0.5]
        b = scale_bin(face_size(box.tolist(), arr.shape[1], arr.shape[0]), bins)
        per_bin.setdefault(b, []).append(max(hits, default=0.0))
    out = {}
    for name in [b for b in bins if b in per_bin] + ["all"]:
        s = [x for v in per_bin.values() for x in v] if name == "all" else per_bin[name]
        out[name] = {"n": len(s), **{str(t): sum(x >= t for x in s) / len(s) for t in thresholds}}
    return out


def _analyzer_note(record: dict) -> str:
    where = record.get("analyzer")
    return "" if where is None or os.path.normpath(where) == os.path.normpath(asset_path("synthetic-face-analyzer")) else f" from `{where}`"


def table_md(record: dict) -> str:
    ts = record["thresholds"]
    lines = [f"# Base found-rate ({record['date']}, {record['machine']})", "",
             f"{record['captions']} held-out captions x seeds {record['seeds']}, {record.get('steps', 30)} sampling steps; synthetic face analyzer "
             f"(stand-in detector{_analyzer_note(record)}; its own threshold {record['analyzer_threshold']}). Command: `{record['command']}`", "",
             "| base | sampler | guidance | " + " | ".join(f"found at threshold {t} [95%]" for t in ts) + " | seconds |",
             "|---|---|---|" + "---|" * len(ts) + "---|"]
    for r in record["bases"]:
        cells = []
        for t in ts:
            v = r["by_threshold"][str(t)]
            cells.append(f"{v['found']} / {r['samples']} = {v['found_rate']:.2f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]")
        lines.append(f"| `{r['base']}` | {r.get('sampler', 'ddim')} | {r.get('guidance', 5.0):g} | " + " | ".join(cells) + f" | {r['seconds']} |")
    rg = record.get("real_grid")
    if rg:
        counts = ", ".join(f"{b} {n}" for b, n in rg["bin_counts"].items())
        lines += ["", f"`{rg['file']}`: the held-out photos the grids' captions were written for, in the same order (what a sample of "
                  f"them should look like); their faces by size bin: {counts}."]
    if record.get("real_recall"):
        lines += ["", "The analyzer's recall on real held-out photos (a detection with IoU >= 0.5 at the face, score at or above the threshold):",
                  "", "| bin | photos | " + " | ".join(f"recall at {t}" for t in ts) + " |", "|---|---|" + "---|" * len(ts)]
        for b, v in record["real_recall"].items():
            lines.append(f"| {b} | {v['n']} | " + " | ".join(f"{v[str(t)]:.3f}" for t in ts) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from realisid.cli import quiet_progress_bars

    quiet_progress_bars()  # no bar lines when piped to a log
    sys.exit(main())
