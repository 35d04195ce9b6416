"""Ablation sweeps: a sweep is a config (experiments/sweeps/*.yaml), not a script.

Each entry of ``runs`` names an experiment and overrides. Runs live in ``runs/sweeps/<sweep>/<run>``, tables
and plots in the sweep's ``out_dir``. The runner trains it (with the sweep's ``train``
overrides), benchmarks it with the branches it trained (the sweep's ``bench`` overrides), marks it DONE,
and finally writes one combined table and plot. Rerunning skips DONE runs and resumes interrupted ones.
"""
from __future__ import annotations

import csv
import logging
import os

from omegaconf import OmegaConf

from realisid.config import EXPERIMENTS_DIR, ConfigError, load_config

log = logging.getLogger(__name__)
SWEEP_KEYS = {"name", "out_dir", "train", "bench", "runs"}


def load_sweep(name: str):
    path = name if name.endswith((".yaml", ".yml")) else os.path.join(EXPERIMENTS_DIR, "sweeps", name + ".yaml")
    if not os.path.exists(path):
        found = sorted(f[:-5] for f in os.listdir(os.path.join(EXPERIMENTS_DIR, "sweeps")) if f.endswith(".yaml"))
        raise ConfigError(f"sweep '{name}' not found at {path}; sweeps: {', '.join(found)}")
    sw = OmegaConf.load(path)
    unknown = set(sw.keys()) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {path}; valid: {sorted(SWEEP_KEYS)}")
    for run, spec in sw.runs.items():
        if "exp" not in spec:
            raise ConfigError(f"sweep run '{run}' in {path} needs an 'exp' (an experiment name such as joint)")
    return sw


def run_sweep(name: str, extra_overrides=()) -> dict:
    from realisid.bench import plot, run_bench, write_csv
    from realisid.train import resume_config, train

    sw = load_sweep(name)
    out_dir = str(sw.out_dir)
    combined = []
    for run_name, spec in sw.runs.items():
        bench_dir = os.path.join(out_dir, run_name)
        overrides = list(sw.get("train", [])) + list(spec.get("overrides", [])) + list(extra_overrides)
        cfg = load_config(str(spec.exp), overrides + list(sw.get("bench", [])))
        run_dir = os.path.join(cfg.experiment.runs_dir, "sweeps", str(sw.name), run_name)  # checkpoints stay out of results
        if os.path.exists(os.path.join(run_dir, "DONE")):
            log.info("sweep %s: %s already done, skipped", sw.name, run_name)
        else:
            if os.path.exists(os.path.join(run_dir, "checkpoints", "last.ckpt")) and not os.path.isdir(os.path.join(run_dir, "export")):
                log.info("sweep %s: resuming %s", sw.name, run_name)
                train(resume_config(run_dir), resume=run_dir)
            elif not os.path.isdir(os.path.join(run_dir, "export")):
                log.info("sweep %s: training %s (%s %s)", sw.name, run_name, spec.exp, " ".join(overrides))
                train(cfg, run_dir=run_dir)
            run_bench(cfg, run_dir, bench_dir, settings={"trained": {}})
            open(os.path.join(run_dir, "DONE"), "w").write("ok\n")
        with open(os.path.join(bench_dir, "summary.csv")) as f:
            for row in csv.DictReader(f):
                row["run"] = run_name
                for k in ("people", "size_px"):
                    row[k] = int(row[k])
                for k in ("face_size", "similarity", "found", "loc_iou", "pose_err"):
                    row[k] = float(row[k])
                combined.append(row)
    write_csv(os.path.join(out_dir, "summary.csv"), combined)
    plots = plot(combined, out_dir, label_key="run", title=f"sweep {sw.name}", measured=("similarity",))
    table = os.path.join(out_dir, "table.md")
    with open(table, "w") as f:
        f.write(f"# Sweep {sw.name}\n\nIdentity similarity (evaluation stand-in encoder, misses score 0) by run and face size.\n\n")
        sizes = sorted({r["size_px"] for r in combined})
        for n in sorted({r["people"] for r in combined}):
            f.write(f"\n## {n} {'person' if n == 1 else 'people'}\n\n| run | " + " | ".join(f"{s} px" for s in sizes) + " |\n|---|" + "---|" * len(sizes) + "\n")
            for run_name in sw.runs:
                vals = {r["size_px"]: r["similarity"] for r in combined if r["run"] == run_name and r["people"] == n}
                f.write(f"| {run_name} | " + " | ".join(f"{vals[s]:.3f}" if s in vals else "-" for s in sizes) + " |\n")
    return {"out_dir": out_dir, "table": table, "plots": plots}
