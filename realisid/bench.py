"""The scale benchmark: identity fidelity and image quality against face size and number of people.

A grid of prompts x references x face sizes x people count, sampled with each inference setting of a
trained run (joint, local only, global only), scored by :mod:`realisid.evaluation` and calibrated against real
held-out photos of the same identities (:mod:`realisid.metrics.calibrated`, docs/metrics.md). Writes under
``OUT_DIR``: ``results.csv`` (one row per generated face), ``real.csv`` (the ceiling's photos), ``summary.csv``
(per setting, people count and size), ``bins.csv`` (per setting and bin: location, landmarks, FID),
``calibrated.csv`` (margin, ceiling, retention with 95% intervals per setting and bin), ``table.md``, plots
(``margin_by_bin.png``, ``retention_by_bin.png``, ``*_vs_size.png``) and ``grid.png`` (rows: face sizes;
columns: the reference, then each setting's sample).
"""
from __future__ import annotations

import csv
import datetime as _dt
import glob
import json
import logging
import os
from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from realisid.data.example import ExampleMaker
from realisid.data.stream import load_examples, resolve_shards
from realisid.embedded.base import Progress
from realisid.evaluation import Case, build_evaluator, compute_all, to_uint8
from realisid.images import identity_crop, to_tensor
from realisid.machine import describe_machine
from realisid.metrics.calibrated import calibrated_identity, fmt
from realisid.pipeline import RealisIDPipeline, guidance_id_by_bin, tensor_to_pil
from realisid.train import run_result

log = logging.getLogger(__name__)
PLOT_METRICS = ("similarity", "found", "loc_iou", "pose_err")  # per face size; the calibrated metrics are plotted per bin


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


def reference_faces(examples: Sequence[dict], count: int, id_image_size: int, offset: int = 0) -> list[dict]:
    """One reference per identity of the held-out set, for ``count`` identities: the face crop of that identity's
    photo with the largest face (cut as training cuts references). ``key`` names the photo it was cut from, which
    the ceiling then leaves out. ``offset`` skips the first identities (sorted by name): choosing sampling
    settings on ``offset=count`` leaves the benchmark's own identities (offset 0) untouched."""
    from PIL import Image

    best: dict[str, dict] = {}
    for ex in examples:
        ident = ex["identity"]
        if ident not in best or ex["face_size"] > best[ident]["face_size"]:
            best[ident] = ex
    if offset < 0:
        raise ValueError(f"bench.reference_offset={offset}: give 0 or more (identities to skip before choosing references)")
    chosen = [best[k] for k in sorted(best)][offset:offset + count]
    if len(chosen) < count:
        log.warning("only %d reference identities available after skipping %d (asked for %d)", len(chosen), offset, count)
    refs = []
    for ex in chosen:
        crop, mask = identity_crop(Image.fromarray(to_uint8(ex["image"])), [float(v) for v in ex["face_box"]], id_image_size)
        refs.append({"identity": ex["identity"], "key": ex["key"], "id_image": to_tensor(crop),
                     "id_mask": torch.from_numpy(mask)[None]})
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
                                      id_masks=[p["id_mask"] for p in people], identities=[p["identity"] for p in people],
                                      seed=int(bench["seed"]) + 1000 * pi + ri,
                                      tags={"size_px": size_px, "people": int(n), "prompt": pi, "ref": ri}))
    return cases, skipped


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Means per (setting, people count, face size)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["setting"], r["people"], r["size_px"])].append(r)
    out = []
    for (setting, people, size_px), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        def mean(k):
            vals = [float(r[k]) for r in rs if r[k] == r[k]]
            return round(float(np.mean(vals)), 4) if vals else float("nan")

        out.append({"setting": setting, "people": people, "size_px": size_px, "face_size": rs[0]["face_size"], "bin": rs[0]["bin"],
                    "n": len(rs), "similarity": mean("similarity"), "sim_other": mean("sim_other"), "margin": mean("margin"),
                    "found": mean("found"), "loc_iou": mean("loc_iou"), "pose_err": mean("pose_err")})
    return out


def calibrated_rows(calibrated: Mapping[str, Mapping[str, dict]]) -> list[dict]:
    """``{setting: calibrated_identity(...)}`` flattened to CSV rows (value, lo, hi per quantity)."""
    out = []
    for setting, per_bin in calibrated.items():
        for b, e in per_bin.items():
            row = {"setting": setting, "bin": b, "n": e["n"], "identities": e["identities"], "real_n": e["real_n"]}
            for q in ("found_rate", "sim_ref", "sim_other", "margin", "ceiling", "retention"):
                row[q], row[q + "_lo"], row[q + "_hi"] = (round(v, 4) for v in e[q])
            out.append(row)
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
        paths.append(_save(fig, os.path.join(out_dir, f"{metric}_vs_size.png")))
    return paths


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def machine() -> str:
    return describe_machine()


def trained_on(run_dir: str) -> str:
    """The machine a run was trained on, from its result.yaml (runs trained before 2026-12-07 did not record it)."""
    return str(run_result(run_dir).get("machine") or "not recorded")


def calibrated_plot(calibrated: Mapping[str, Mapping[str, dict]], bins: Sequence[str], out_dir: str, title: str = "") -> list[str]:
    """margin_by_bin.png (margin per bin with 95% intervals, one line per setting or run, the real-photo ceiling
    dashed) and retention_by_bin.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    xs = np.arange(len(bins))
    for q in ("margin", "retention"):
        fig, ax = plt.subplots(figsize=(5.6, 3.8))
        k = len(calibrated)
        for i, (label, per_bin) in enumerate(calibrated.items()):
            vals = np.array([per_bin[b][q] if b in per_bin else (np.nan,) * 3 for b in bins], dtype=float)
            dx = (i - (k - 1) / 2) * 0.06
            ax.errorbar(xs + dx, vals[:, 0], yerr=[vals[:, 0] - vals[:, 1], vals[:, 2] - vals[:, 0]], marker="o", capsize=3, label=str(label))
        if q == "margin":
            first = next(iter(calibrated.values()))
            ceil = np.array([first[b]["ceiling"] if b in first else (np.nan,) * 3 for b in bins], dtype=float)
            ax.errorbar(xs, ceil[:, 0], yerr=[ceil[:, 0] - ceil[:, 1], ceil[:, 2] - ceil[:, 0]], color="black", linestyle="--",
                        capsize=3, label="ceiling (real photos)")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xticks(xs, list(bins))
        ax.set_xlabel("face-size bin (box long side / image edge)")
        ax.set_ylabel(q + (" (sim_ref - sim_other)" if q == "margin" else " (margin / ceiling)"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(title, fontsize=8)
        paths.append(_save(fig, os.path.join(out_dir, f"{q}_by_bin.png")))
    return paths


def size_grid(images: Mapping[str, Sequence[torch.Tensor]], references: Sequence[torch.Tensor], sizes_px: Sequence[int],
              path: str) -> str:
    """A PNG: one row per face size, columns reference | each setting's sample (same reference, seed and box)."""
    import torch.nn.functional as F
    from torchvision.utils import make_grid, save_image

    tiles = []
    R = next(iter(images.values()))[0].shape[-1]
    for i, _ in enumerate(sizes_px):
        ref = F.interpolate(references[i][None].float(), size=(R, R), mode="bilinear", align_corners=False)[0]
        tiles += [ref] + [imgs[i] for imgs in images.values()]
    save_image((make_grid(torch.stack(tiles), nrow=1 + len(images), padding=2, pad_value=1.0) + 1) / 2, path)
    return path


def save_grid_tiles(images: Mapping[str, Sequence[torch.Tensor]], reference: torch.Tensor, sizes_px: Sequence[int], folder: str) -> None:
    """The grid's pieces as PNGs (``reference.png``, ``<setting>-<size>.png``), so a sweep can put runs side by side."""

    os.makedirs(folder, exist_ok=True)
    tensor_to_pil(reference[None])[0].save(os.path.join(folder, "reference.png"))
    for name, imgs in images.items():
        for size, img in zip(sizes_px, imgs):
            tensor_to_pil(img[None])[0].save(os.path.join(folder, f"{name}-{size}.png"))


def markdown(summary: Sequence[dict], bins_rows: Sequence[dict], calibrated: Mapping[str, Mapping[str, dict]],
             header: Mapping[str, str], skipped: Sequence[dict], found_measured: bool = True) -> str:
    def f2(v: float, measured: bool = True) -> str:
        return f"{v:.2f}" if measured and v == v else "n/a"

    lines = [f"# Scale benchmark: {header.get('run', '')}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "## Identity by face-size bin, calibrated (95% intervals, identities resampled)", "",
              "sim_ref: generated face vs its reference; sim_other: vs the other identities' references; margin = sim_ref - sim_other "
              "(misses score 0); ceiling: the same margin on real held-out photos of the same identities in that bin; "
              "retention = margin / ceiling.", "",
              "| setting | bin | faces | found-rate | sim_ref | sim_other | margin | ceiling (real) | retention |",
              "|---|---|---|---|---|---|---|---|---|"]
    for setting, per_bin in calibrated.items():
        for b, e in per_bin.items():
            lines.append(f"| {setting} | {b} | {e['n']} ({e['identities']} ids) | {fmt(e['found_rate'], 2) if found_measured else 'n/a'} | "
                         f"{e['sim_ref'][0]:.3f} | {e['sim_other'][0]:.3f} | {fmt(e['margin'])} | {fmt(e['ceiling'])} | {fmt(e['retention'], 2)} |")
    lines += ["", "## Location, landmarks and FID by bin (all people counts)", "",
              "| setting | bin | location IoU | landmark error | face FID | image FID |", "|---|---|---|---|---|---|"]
    for r in bins_rows:
        lines.append(f"| {r['setting']} | {r['bin']} | {f2(r['loc_iou'], found_measured)} | {f2(r['pose_err'], found_measured)} | "
                     f"{r['face_fid']:.1f} | {r['image_fid']:.1f} |")
    lines += ["", "## By face size and people count", "",
              "| setting | people | face px @512 | face size | bin | n | sim_ref | margin | found-rate | location IoU |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['setting']} | {r['people']} | {r['size_px']} | {r['face_size']:.3f} | {r['bin']} | {r['n']} | "
                     f"{r['similarity']:.3f} | {r['margin']:.3f} | {f2(r['found'], found_measured)} | {f2(r['loc_iou'], found_measured)} |")
    if skipped:
        lines += ["", "Skipped combinations: " + "; ".join(s["reason"] for s in skipped)]
    return "\n".join(lines) + "\n"


def bench_settings(settings_cfg, only: str | Sequence[str] | None = None) -> dict[str, dict]:
    """``bench.settings`` as {name: sampling flags} (keys starting with ``_`` are schema marks), or only the names in
    ``only`` (a list, or one comma-separated string such as ``"joint,global_only"``), in the order given."""
    from omegaconf import OmegaConf

    have = {k: dict(v) for k, v in OmegaConf.to_container(settings_cfg).items() if not k.startswith("_")}
    if only is None:
        return have
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only) if n.strip()]
    unknown = [n for n in names if n not in have]
    if unknown or not names:
        raise ValueError(f"bench setting(s) {unknown or only!r} not in bench.settings ({', '.join(have)}); pick from those, "
                         "or add one with an override such as 'bench.settings.id3={guidance_id: 3.0}'")
    return {n: have[n] for n in names}


def held_out_references(cfg, vae_scale_factor: int) -> tuple[list[dict], list[dict]]:
    """The benchmark's held-out photos (``data.val_shards``, at most ``bench.real_images``) and its references
    (:func:`reference_faces` with ``bench.references`` and ``bench.reference_offset``)."""
    b = cfg.bench
    size = int(cfg.model.id_encoder.image_size)
    maker = ExampleMaker(embed_dim=cfg.data.embed_dim, resolution=int(cfg.data.resolution), vae_scale_factor=int(vae_scale_factor),
                         local_latent_size=int(cfg.model.local.latent_size), crop_expand=float(cfg.model.local.crop_expand),
                         id_image_size=size)
    examples = load_examples(resolve_shards(cfg.data.val_shards, "data.val_shards"), maker, int(b.real_images))
    return examples, reference_faces(examples, int(b.references), size, int(b.get("reference_offset", 0)))


def bench_sampling(cfg) -> dict[str, Any]:
    """The pipeline keywords the benchmark samples with: ``bench.steps`` and the run's ``sampling.*`` sampler and guidance."""
    s = cfg.sampling
    return {"num_inference_steps": int(cfg.bench.steps), "scheduler": str(s.get("scheduler", "ddim")), "guidance_text": float(s.guidance_text),
            "guidance_id": float(s.guidance_id), "id_delay": float(s.id_delay),
            "guidance_rescale": float(s.get("guidance_rescale", 0.0)), "id_guidance_until": float(s.get("id_guidance_until", 1.0)),
            "guidance_id_by_bin": guidance_id_by_bin(s)}


def run_bench(cfg, run_dir: str, out_dir: str, *, settings: Mapping[str, Mapping[str, Any]] | None = None,
              progress: bool = True, device: str | None = None, dtype: str | None = None) -> dict:
    """Benchmark ``run_dir``'s export with ``cfg.bench``; returns the paths written, the summary and the calibrated table.

    ``device`` / ``dtype``: where sampling runs (default: cuda when available, fp16 frozen parts there); the
    face analyzer and the evaluation encoder run where they run (CPU for ONNX models)."""
    os.makedirs(out_dir, exist_ok=True)
    pipe = RealisIDPipeline.from_export(os.path.join(run_dir, "export"), device=device, dtype=dtype)
    b = cfg.bench
    examples, refs = held_out_references(cfg, pipe.backbone.vae_scale_factor)
    offset = int(b.get("reference_offset", 0))
    if len(refs) < 2:
        raise ValueError(f"the benchmark needs references of at least 2 held-out identities (sim_other); data.val_shards has {len(refs)}")
    cases, skipped = build_cases(b, refs, int(cfg.data.resolution))
    settings = settings or bench_settings(b.settings)
    # a setting runs only if the run has every branch it explicitly switches on (a local-only run has no "joint");
    # a setting that names no branch uses whatever the run trained
    settings = {k: v for k, v in settings.items()
                if not (v.get("use_local") and pipe.local_branch is None) and not (v.get("use_global") and pipe.global_branch is None)}
    if not settings:
        raise ValueError(f"none of the bench settings fits the branches of {run_dir}; add one to bench.settings")
    ev = build_evaluator(cfg, pipe.id_encoder.name)
    bank = ev.reference_bank({r["identity"]: r["id_image"] for r in refs})
    real = ev.real_rows(examples, bank, exclude={r["key"] for r in refs})
    rows, bins_rows, calibrated, grid_images = [], [], {}, {}
    bar = Progress("scale bench: images", len(cases) * len(settings)) if progress else None
    done = [0]

    def tick():
        if bar is not None:
            bar.step(done[0])
            done[0] += 1

    sample_kwargs = bench_sampling(cfg)
    for name, flags in settings.items():
        metrics = ev.new_metrics()
        ev.add_real(metrics, [e["image"] for e in examples], [e["face_box"].tolist() for e in examples])
        r, images = ev.evaluate(pipe, cases, metrics, sample_kwargs={**sample_kwargs, **flags}, setting=name, progress=tick, bank=bank)
        rows += r
        calibrated[name] = calibrated_identity(r, real, list(ev.bins), n_boot=int(b.bootstrap), seed=int(b.seed))
        grid_images[name] = [img for c, img in zip(cases, images) if c.tags["people"] == 1 and c.tags["ref"] == 0 and c.tags["prompt"] == 0]
        vals = compute_all(metrics)
        for bin_name in list(ev.bins) + ["all"]:
            bins_rows.append({"setting": name, "bin": bin_name, "id_sim": vals.get(f"id_sim/{bin_name}", float("nan")),
                              "found_rate": vals.get(f"found_rate/{bin_name}", float("nan")),
                              "face_fid": vals.get(f"face_fid/{bin_name}", float("nan")), "image_fid": vals.get(f"image_fid/{bin_name}", float("nan")),
                              "loc_iou": vals.get(f"loc_iou/{bin_name}", float("nan")), "pose_err": vals.get(f"pose_err/{bin_name}", float("nan"))})
    summary = summarize(rows)
    header = {"run": run_dir, "date": _dt.date.today().isoformat(), "machine": machine(), "trained on": trained_on(run_dir),
              "device": f"{pipe.device}, frozen parts {str(pipe.backbone.unet.dtype).removeprefix('torch.')}", "cases": str(len(cases)),
              "base UNet": (f"trained with the branches by this run ({pipe.backbone.unet_trained_by}; model.unet_train, not the paper's frozen base)"
                            if pipe.backbone.unet_trained_by else f"frozen ({pipe.backbone.name})"),
              "prompts": json.dumps(list(b.prompts)), "sampling": json.dumps(sample_kwargs),
              "settings (override sampling)": json.dumps(settings), **ev.describe(),
              "real photos (ceiling)": f"{len(real)} photos of the {len(refs)} reference identities in data.val_shards",
              "reference identities": f"{', '.join(r['identity'] for r in refs)} (sorted, offset {offset})",
              "data.val_shards": f"{cfg.data.val_shards} (held-out identities unless overridden)"}
    write_csv(os.path.join(out_dir, "results.csv"), rows)
    write_csv(os.path.join(out_dir, "real.csv"), real)
    write_csv(os.path.join(out_dir, "summary.csv"), summary)
    write_csv(os.path.join(out_dir, "bins.csv"), bins_rows)
    write_csv(os.path.join(out_dir, "calibrated.csv"), calibrated_rows(calibrated))
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(markdown(summary, bins_rows, calibrated, header, skipped, found_measured=not ev.standin_faces))
    measured = ("similarity", "margin") if ev.standin_faces else ("similarity", "margin") + PLOT_METRICS[1:]
    title = f"{os.path.basename(os.path.normpath(run_dir))} | eval: {ev.analyzer.name[:60]}"
    plots = plot(summary, out_dir, title=title, measured=measured) + calibrated_plot(calibrated, list(ev.bins), out_dir, title)
    one_person = [s for s in b.sizes_px if any(c.tags["size_px"] == s and c.tags["people"] == 1 for c in cases)]
    if refs and one_person and all(len(v) == len(one_person) for v in grid_images.values()):
        plots.append(size_grid(grid_images, [refs[0]["id_image"]] * len(one_person), one_person, os.path.join(out_dir, "grid.png")))
        save_grid_tiles(grid_images, refs[0]["id_image"], one_person, os.path.join(out_dir, "grid"))
    with open(os.path.join(out_dir, "header.json"), "w") as f:
        json.dump(header, f, indent=2)
    log.info("scale benchmark of %s: %d cases x %d settings written to %s", run_dir, len(cases), len(settings), out_dir)
    return {"out_dir": out_dir, "summary": summary, "bins": bins_rows, "calibrated": calibrated, "plots": plots, "header": header}
