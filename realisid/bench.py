"""The scale benchmark: identity fidelity and image quality against face size and number of people.

A grid of prompts x references x face sizes x people count, sampled with each inference setting of a
trained run (joint, local only, global only), scored by :mod:`realisid.evaluation`. Writes under
``OUT_DIR``: ``results.csv`` (one row per generated face), ``summary.csv`` (per setting, people count and
size), ``bins.csv`` (per setting and bin, with FID), ``table.md`` and one PNG plot per metric.
"""
from __future__ import annotations

import csv
import datetime as _dt
import glob
import json
import logging
import os
import platform
from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from realisid.evaluation import Case, build_evaluator, compute_all

log = logging.getLogger(__name__)
PLOT_METRICS = ("similarity", "found", "loc_iou", "pose_err")


def newest_run(runs_dir: str, exp: str) -> str | None:
    runs = sorted(d for d in glob.glob(os.path.join(runs_dir, exp, "*")) if os.path.isdir(os.path.join(d, "export")))
    return runs[-1] if runs else None


def row_boxes(n: int, side: float, R: int) -> list[list[float]] | None:
    """``n`` square boxes of ``side`` px side by side, centred in an R x R image; None if they do not fit."""
    gap = max(2.0, side * 0.25)
    width = n * side + (n - 1) * gap
    if width > R - 2 or side > R - 2:
        return None
    x = (R - width) / 2
    y = (R - side) / 2
    return [[round(x + i * (side + gap), 2), round(y, 2), round(x + i * (side + gap) + side, 2), round(y + side, 2)] for i in range(n)]


def reference_faces(examples: Sequence[dict], count: int) -> list[dict]:
    """One reference per identity (its largest face), for ``count`` identities of the held-out set."""
    best: dict[str, dict] = {}
    for ex in examples:
        ident = ex["key"].rsplit("-", 1)[0]
        if ident not in best or ex["face_size"] > best[ident]["face_size"]:
            best[ident] = ex
    refs = [best[k] for k in sorted(best)][:count]
    if len(refs) < count:
        log.warning("only %d reference identities available (asked for %d)", len(refs), count)
    return refs


def build_cases(bench: Mapping[str, Any], refs: Sequence[dict], resolution: int) -> tuple[list[Case], list[dict]]:
    """The grid; combinations whose boxes do not fit in the image are listed as skipped."""
    cases, skipped = [], []
    for size_px in bench["sizes_px"]:
        side = float(size_px) / float(bench["reference_px"]) * resolution
        for n in bench["people"]:
            boxes = row_boxes(int(n), side, resolution)
            if boxes is None:
                skipped.append({"size_px": size_px, "people": n, "reason": f"{n} faces of {side:.1f} px do not fit in {resolution} px"})
                continue
            for pi, prompt in enumerate(bench["prompts"]):
                for ri in range(len(refs)):
                    people = [refs[(ri + j) % len(refs)] for j in range(int(n))]
                    cases.append(Case(prompt=prompt, boxes=boxes, id_images=[p["id_image"] for p in people],
                                      id_masks=[p["id_mask"] for p in people], identities=[p["key"].rsplit("-", 1)[0] for p in people],
                                      seed=int(bench["seed"]) + 1000 * pi + ri,
                                      tags={"size_px": size_px, "people": int(n), "prompt": pi, "ref": ri}))
    return cases, skipped


def summarize(rows: Sequence[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["setting"], r["people"], r["size_px"])].append(r)
    out = []
    for (setting, people, size_px), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        def mean(k):
            vals = [float(r[k]) for r in rs if r[k] == r[k]]
            return round(float(np.mean(vals)), 4) if vals else float("nan")

        out.append({"setting": setting, "people": people, "size_px": size_px, "face_size": rs[0]["face_size"], "bin": rs[0]["bin"],
                    "n": len(rs), "similarity": mean("similarity"), "found": mean("found"), "loc_iou": mean("loc_iou"),
                    "pose_err": mean("pose_err")})
    return out


def write_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    if not rows:
        return
    keys = list(rows[0].keys())
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot(summary: Sequence[dict], out_dir: str, label_key: str = "setting", title: str = "", measured: Sequence[str] = PLOT_METRICS) -> list[str]:
    """One PNG per measured metric: metric against face size (px at 512), one line per setting, one panel per people count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    peoples = sorted({r["people"] for r in summary})
    labels = sorted({r[label_key] for r in summary})
    for metric in measured:
        if all(r[metric] != r[metric] for r in summary):  # all NaN: not measured
            continue
        fig, axes = plt.subplots(1, len(peoples), figsize=(4.2 * len(peoples), 3.4), squeeze=False, sharey=True)
        for ax, n in zip(axes[0], peoples):
            for lab in labels:
                pts = sorted((r["size_px"], r[metric]) for r in summary if r["people"] == n and r[label_key] == lab)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(lab))
            ax.set_xscale("log", base=2)
            ax.set_xlabel("face size (px at 512)")
            ax.set_title(f"{n} {'person' if n == 1 else 'people'}")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(metric)
        axes[0][-1].legend(fontsize=8)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{metric}_vs_size.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def machine() -> str:
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}" + (
        f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU")


def markdown(summary: Sequence[dict], bins_rows: Sequence[dict], header: Mapping[str, str], skipped: Sequence[dict], found_measured: bool = True) -> str:
    def found(v: float) -> str:
        return f"{v:.2f}" if found_measured else "n/a"

    lines = [f"# Scale benchmark: {header.get('run', '')}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "## Identity similarity by face size (misses score 0)", "",
              "| setting | people | face px @512 | face size | bin | n | similarity | found-rate |", "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['setting']} | {r['people']} | {r['size_px']} | {r['face_size']:.3f} | {r['bin']} | {r['n']} | "
                     f"{r['similarity']:.3f} | {found(r['found'])} |")
    lines += ["", "## Per bin (all people counts)", "", "| setting | bin | id_sim | found_rate | face FID | image FID |", "|---|---|---|---|---|---|"]
    for r in bins_rows:
        lines.append(f"| {r['setting']} | {r['bin']} | {r['id_sim']:.3f} | {found(r['found_rate'])} | {r['face_fid']:.1f} | {r['image_fid']:.1f} |")
    if skipped:
        lines += ["", "Skipped combinations: " + "; ".join(s["reason"] for s in skipped)]
    return "\n".join(lines) + "\n"


def run_bench(cfg, run_dir: str, out_dir: str, *, settings: Mapping[str, Mapping[str, Any]] | None = None,
              progress: bool = True) -> dict:
    """Benchmark ``run_dir``'s export with ``cfg.bench``; returns the paths written and the summary."""
    from omegaconf import OmegaConf
    from tqdm.auto import tqdm

    from realisid.data.pipeline import ExampleMaker, load_examples, resolve_shards
    from realisid.pipeline import RealisIDPipeline

    os.makedirs(out_dir, exist_ok=True)
    pipe = RealisIDPipeline.from_export(os.path.join(run_dir, "export"))
    b = cfg.bench
    maker = ExampleMaker(embed_dim=cfg.data.embed_dim, resolution=int(cfg.data.resolution), vae_scale_factor=pipe.backbone.vae_scale_factor,
                         local_latent_size=int(cfg.model.local.latent_size), crop_expand=float(cfg.model.local.crop_expand),
                         id_image_size=int(cfg.model.id_encoder.image_size))
    examples = load_examples(resolve_shards(cfg.data.val_shards, "data.val_shards"), maker, int(cfg.data.val_samples))
    refs = reference_faces(examples, int(b.references))
    cases, skipped = build_cases(b, refs, int(cfg.data.resolution))
    settings = settings or {k: dict(v) for k, v in OmegaConf.to_container(b.settings).items() if not k.startswith("_")}
    # a setting runs only if the run has every branch it explicitly switches on (a local-only run has no "joint");
    # a setting that names no branch uses whatever the run trained
    settings = {k: v for k, v in settings.items()
                if not (v.get("use_local") and pipe.local_branch is None) and not (v.get("use_global") and pipe.global_branch is None)}
    if not settings:
        raise ValueError(f"none of the bench settings fits the branches of {run_dir}; add one to bench.settings")
    ev = build_evaluator(cfg, pipe.id_encoder.name)
    rows, bins_rows = [], []
    bar = tqdm(total=len(cases) * len(settings), desc="scale bench", disable=not progress)
    sample_kwargs = {"num_inference_steps": int(b.steps), "guidance_text": float(cfg.sampling.guidance_text),
                     "guidance_id": float(cfg.sampling.guidance_id), "id_delay": float(cfg.sampling.id_delay)}
    for name, flags in settings.items():
        metrics = ev.new_metrics()
        ev.add_real(metrics, [e["image"] for e in examples], [e["face_box"].tolist() for e in examples])
        r, _ = ev.evaluate(pipe, cases, metrics, sample_kwargs={**sample_kwargs, **flags}, setting=name, progress=bar.update)
        rows += r
        vals = compute_all(metrics)
        for bin_name in list(ev.bins) + ["all"]:
            bins_rows.append({"setting": name, "bin": bin_name, "id_sim": vals.get(f"id_sim/{bin_name}", float("nan")),
                              "found_rate": vals.get(f"found_rate/{bin_name}", float("nan")),
                              "face_fid": vals.get(f"face_fid/{bin_name}", float("nan")), "image_fid": vals.get(f"image_fid/{bin_name}", float("nan")),
                              "loc_iou": vals.get(f"loc_iou/{bin_name}", float("nan")), "pose_err": vals.get(f"pose_err/{bin_name}", float("nan"))})
    bar.close()
    summary = summarize(rows)
    header = {"run": run_dir, "date": _dt.date.today().isoformat(), "machine": machine(), "cases": str(len(cases)),
              "sampling": json.dumps(sample_kwargs), **ev.describe()}
    write_csv(os.path.join(out_dir, "results.csv"), rows)
    write_csv(os.path.join(out_dir, "summary.csv"), summary)
    write_csv(os.path.join(out_dir, "bins.csv"), bins_rows)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(markdown(summary, bins_rows, header, skipped, found_measured=not ev.standin_faces))
    measured = ("similarity",) if ev.standin_faces else PLOT_METRICS
    plots = plot(summary, out_dir, title=f"{os.path.basename(run_dir)} | eval: {ev.analyzer.name[:60]}", measured=measured)
    with open(os.path.join(out_dir, "header.json"), "w") as f:
        json.dump(header, f, indent=2)
    log.info("scale benchmark of %s: %d cases x %d settings written to %s", run_dir, len(cases), len(settings), out_dir)
    return {"out_dir": out_dir, "summary": summary, "bins": bins_rows, "plots": plots, "header": header}
