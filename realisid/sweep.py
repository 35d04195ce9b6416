"""Ablation sweeps: a sweep is a config (experiments/sweeps/*.yaml), not a script.

Each entry of ``runs`` names an experiment and overrides. Runs live in ``runs/sweeps/<sweep>/<run>``, tables
and plots in the sweep's ``out_dir``. ``precompute: FOLDER`` runs ``realisid precompute`` once (VAE latents and
text embeddings of the train shards) and trains every run from it. The runner trains it (with the sweep's ``train``
overrides), benchmarks it with the branches it trained (the sweep's ``bench`` overrides), marks it DONE,
and finally writes one combined table and plot, where every run's margin is compared case by case with the
``baseline`` run's (default ``global_only``: the paper's claim; also in ``claims.json``). Rerunning skips DONE
runs and resumes interrupted ones.

A run may continue another sweep's finished run instead of starting from scratch: ``continue: branches/joint``
copies ``runs/sweeps/branches/joint/checkpoints/last.ckpt`` into the new run and trains on from its step to this
sweep's ``trainer.max_steps``. The two configs must agree on everything but the step count, checkpointing,
sampling, validation, evaluation and benchmark settings and the EMA (:data:`CONTINUE_MAY_DIFFER`; an EMA switched on
for the continuation starts averaging from the continued weights); anything else is refused with the differing keys.

A sweep is replicated with another training seed by ``--seed N`` (``make sweep SWEEP=branches SEED=2``): every run
trains with ``experiment.seed=N`` into ``runs/sweeps/<sweep>-seed<N>/``, results go to ``<out_dir>-seed<N>``,
``continue:`` reads the source sweep's replicate of the same seed, and the benchmark cases stay those of the
sweep (``bench.seed`` is not touched), so replicates compare case by case (``benchmarks/compare_benches.py``
pools them).
"""
from __future__ import annotations

import csv
import logging
import os
import shutil

from omegaconf import OmegaConf

from realisid.bench import calibrated_plot, plot, run_bench, write_csv
from realisid.config import ConfigError, EXPERIMENTS_DIR, load_config, save_config
from realisid.data.cache_format import INFO_FILE, cache_diff, cache_info
from realisid.data.precompute import precompute
from realisid.geometry import bins_from_config
from realisid.metrics.calibrated import fmt, paired_difference
from realisid.models.backbone import load_backbone
from realisid.prepare import prepare_embedded_default
from realisid.train import resume_config, run_result, train

log = logging.getLogger(__name__)
SWEEP_KEYS = {"name", "out_dir", "train", "bench", "runs", "precompute", "baseline"}
RUN_KEYS = {"exp", "overrides", "continue"}
# what a continued run may change from the run it continues (prefixes of dotted config keys). The EMA of the
# branch weights is among them: it is a shadow copy that never feeds back into training (the live weights follow the
# same steps with or without it), and only what is validated, exported and benchmarked changes
CONTINUE_MAY_DIFFER = ("trainer.max_steps", "trainer.val_check_interval", "trainer.checkpoint_every_n_steps", "sampling.",
                       "bench.", "evaluation.", "validation.", "efficiency.ema.")


def load_sweep(name: str):
    path = name if name.endswith((".yaml", ".yml")) else os.path.join(EXPERIMENTS_DIR, "sweeps", name + ".yaml")
    if not os.path.exists(path):
        found = sorted(f[:-5] for f in os.listdir(os.path.join(EXPERIMENTS_DIR, "sweeps")) if f.endswith(".yaml"))
        raise ConfigError(f"sweep '{name}' not found at {path}; sweeps: {', '.join(found)}")
    sw = OmegaConf.load(path)
    unknown = set(sw.keys()) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {path}; valid: {sorted(SWEEP_KEYS)}")
    if "baseline" in sw and sw.baseline not in sw.runs:
        raise ConfigError(f"baseline: {sw.baseline!r} in {path} is not one of its runs ({', '.join(sw.runs)})")
    for run, spec in sw.runs.items():
        if "exp" not in spec:
            raise ConfigError(f"sweep run '{run}' in {path} needs an 'exp' (an experiment name such as joint)")
        unknown = set(spec.keys()) - RUN_KEYS
        if unknown:
            raise ConfigError(f"unknown key(s) {sorted(unknown)} in sweep run '{run}' of {path}; valid: {sorted(RUN_KEYS)}")
        if "continue" in spec and len(continued_run(spec)) != 2:
            raise ConfigError(f"sweep run '{run}' in {path}: continue: {spec['continue']!r} must name <sweep>/<run>, e.g. branches/joint")
    return sw


def replicate(sw, seed: int):
    """The sweep ``sw`` trained with ``experiment.seed=seed``: renamed ``<name>-seed<seed>``, its results in
    ``<out_dir>-seed<seed>``, each ``continue:`` pointing at the source sweep's replicate of the same seed."""
    if any(sets_seed(o) for o in sw.get("train", [])):
        raise ConfigError(f"sweep '{sw.name}' sets experiment.seed in its train overrides already; seed={seed} replicates "
                          "a sweep that does not (e.g. make sweep SWEEP=branches SEED=2)")
    named = os.path.join(EXPERIMENTS_DIR, "sweeps", f"{sw.name}-seed{seed}.yaml")
    if os.path.exists(named):
        raise ConfigError(f"{named} defines a sweep of that name already; its runs would be mixed with this replicate's: "
                          f"run `make sweep SWEEP={sw.name}-seed{seed}` instead, or pick another seed")
    out = OmegaConf.create(OmegaConf.to_container(sw))
    out.name, out.out_dir = f"{sw.name}-seed{seed}", f"{sw.out_dir}-seed{seed}"
    out.train = list(sw.get("train", [])) + [f"experiment.seed={seed}"]
    for spec in out.runs.values():
        parts = continued_run(spec)
        if parts:
            spec["continue"] = f"{parts[0]}-seed{seed}/{parts[1]}"
    return out


def override_key(override) -> str:
    """The key of a ``key=value`` override."""
    return str(override).split("=", 1)[0].strip()


def sets_seed(override) -> bool:
    """Whether a ``key=value`` override sets the training seed."""
    return override_key(override) == "experiment.seed"


def stale_settings(cfg, run_dir: str, overrides) -> str:
    """The settings the sweep gives a run (its ``key=value`` overrides) that a finished run's saved config holds with
    another value, as ``key: saved -> now`` ('' when none): a finished run is reused only for the settings it was
    trained with."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return ""
    saved = OmegaConf.load(path)
    out = []
    for key in dict.fromkeys(override_key(o) for o in overrides):
        was, now = (_plain_value(OmegaConf.select(c, key, default=None)) for c in (saved, cfg))
        if was != now:
            out.append(f"{key}: {was!r} -> {now!r}")
    return ", ".join(out)


def _plain_value(v):
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def continued_run(spec) -> list[str]:
    """A sweep run's ``continue: <sweep>/<run>`` as its parts ([] when the run has no ``continue``; load_sweep
    refuses any other count than two, an empty value included)."""
    return str(spec["continue"]).strip("/").split("/") if "continue" in spec else []


def flat_config(cfg) -> dict:
    """A config as {dotted.key: value} (values resolved)."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def continuation_differences(old: dict, new: dict, defaults: dict) -> list[str]:
    """The dotted keys in which a continued run's config ``new`` differs from its source's ``old`` (both flat), other
    than those a continuation may change. A key the source's config lacks, because the source was trained before the
    key existed, is no difference when ``new`` holds its default (``defaults``, the flat base config): a new key's
    default keeps the behaviour from before it."""
    missing = object()

    def differs(k: str) -> bool:
        if k not in old and k in defaults and new.get(k, missing) == defaults[k]:
            return False
        return old.get(k, "<missing>") != new.get(k, "<missing>")

    return sorted(k for k in set(old) | set(new) if not k.startswith(CONTINUE_MAY_DIFFER) and differs(k))


def start_from(source_dir: str, cfg, run_dir: str) -> int:
    """Set ``run_dir`` up to continue ``source_dir`` (another sweep's finished run) with ``cfg``: its config is
    written first, then the source's last checkpoint is copied in (atomically), so an interruption at any point
    leaves either nothing to resume or a run that resumes. Returns the step the run continues from."""
    import torch

    ckpt = os.path.join(source_dir, "checkpoints", "last.ckpt")
    if not os.path.exists(os.path.join(source_dir, "DONE")) or not os.path.exists(ckpt):
        sweep = os.path.basename(os.path.dirname(os.path.normpath(source_dir)))
        raise ConfigError(f"{run_dir} continues {source_dir}, which is not a finished sweep run (no DONE or no "
                          f"checkpoints/last.ckpt there): run `make sweep SWEEP={sweep}` first")
    source_cfg = OmegaConf.load(os.path.join(source_dir, "config.yaml"))
    old, new = flat_config(source_cfg), flat_config(cfg)
    differ = continuation_differences(old, new, flat_config(load_config("base", [])))
    if differ:
        shown = ", ".join(f"{k}: {old.get(k, '<missing>')!r} -> {new.get(k, '<missing>')!r}" for k in differ[:8])
        raise ConfigError(f"{run_dir} cannot continue {source_dir}: the configs differ in {shown}"
                          f"{' ...' if len(differ) > 8 else ''}; a continued run may change only {', '.join(CONTINUE_MAY_DIFFER)}")
    step = int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])
    if step >= int(cfg.trainer.max_steps):
        raise ConfigError(f"{run_dir} continues {source_dir} at step {step}, but trainer.max_steps={cfg.trainer.max_steps}; "
                          "raise the sweep's trainer.max_steps above it")
    save_config(cfg, os.path.join(run_dir, "config.yaml"))
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    tmp = os.path.join(run_dir, "checkpoints", "last.ckpt.part")
    shutil.copyfile(ckpt, tmp)
    os.replace(tmp, os.path.join(run_dir, "checkpoints", "last.ckpt"))
    return step


def read_csv(path: str) -> list[dict]:
    """A benchmark CSV (summary.csv, results.csv, calibrated.csv, bins.csv) as dicts, numbers and booleans typed."""

    def value(v: str):
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
        return {"True": True, "False": False}.get(v, v)

    with open(path) as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def calibrated_from_csv(rows: list[dict]) -> dict[str, dict]:
    """calibrated.csv rows back into :func:`realisid.metrics.calibrated.calibrated_identity`'s per-bin form
    (each quantity a (value, low, high) triple)."""
    return {r["bin"]: {"n": r["n"], "identities": r["identities"], "real_n": r["real_n"],
                       **{q: (r[q], r[q + "_lo"], r[q + "_hi"]) for q in ("found_rate", "sim_ref", "sim_other", "margin", "ceiling", "retention")}}
            for r in rows}


def run_sweep(name: str, extra_overrides=(), seed: int | None = None) -> dict:
    sw = load_sweep(name)
    if any(sets_seed(o) for o in extra_overrides):
        raise ConfigError(f"experiment.seed given as an override of sweep '{sw.name}': its runs would share the folders "
                          f"of the sweep's own seed (finished runs skipped, the rest mixed); replicate it with "
                          f"`make sweep SWEEP={name} SEED=N` instead")
    if seed is not None:
        sw = replicate(sw, seed)
    out_dir = str(sw.out_dir)
    combined, per_run_rows, calibrated, trained = [], {}, {}, {}
    bins = None
    cache = []
    if sw.get("precompute"):
        cache = [f"data.precomputed={precomputed(sw, extra_overrides)}"]
    for run_name, spec in sw.runs.items():
        bench_dir = os.path.join(out_dir, run_name)
        overrides = list(sw.get("train", [])) + cache + list(spec.get("overrides", [])) + list(extra_overrides)
        cfg = load_config(str(spec.exp), overrides + list(sw.get("bench", [])))
        bins = list(bins_from_config(cfg.bins))
        run_dir = os.path.join(cfg.experiment.runs_dir, "sweeps", str(sw.name), run_name)  # checkpoints stay out of results
        if os.path.exists(os.path.join(run_dir, "DONE")):
            stale = stale_settings(cfg, run_dir, overrides)
            if stale:
                raise ConfigError(f"sweep {sw.name}: {run_dir} is finished, but it was trained with other settings than the sweep "
                                  f"sets now ({stale}); delete {run_dir} to train it again with them, or set them back")
            log.info("sweep %s: %s already done, skipped", sw.name, run_name)
        else:
            res = {}
            if os.path.exists(os.path.join(run_dir, "checkpoints", "last.ckpt")) and not os.path.isdir(os.path.join(run_dir, "export")):
                log.info("sweep %s: resuming %s", sw.name, run_name)
                res = train(resume_config(run_dir), resume=run_dir)
            elif not os.path.isdir(os.path.join(run_dir, "export")):
                parts = continued_run(spec)
                if parts:
                    source = os.path.join(cfg.experiment.runs_dir, "sweeps", *parts)
                    step = start_from(source, cfg, run_dir)
                    log.info("sweep %s: training %s on from %s (step %d) to step %s", sw.name, run_name, source, step, cfg.trainer.max_steps)
                    res = train(cfg, resume=run_dir)
                else:
                    log.info("sweep %s: training %s (%s %s)", sw.name, run_name, spec.exp, " ".join(overrides))
                    res = train(cfg, run_dir=run_dir)
            if res.get("interrupted"):  # SIGTERM / Ctrl-C: the run is saved; benchmarking it half-trained would be wrong
                raise KeyboardInterrupt(f"sweep {sw.name}: {run_name} {res['interrupted']}; rerun the sweep to resume it")
            run_bench(cfg, run_dir, bench_dir, settings={"trained": {}})
            open(os.path.join(run_dir, "DONE"), "w").write("ok\n")
        for row in read_csv(os.path.join(bench_dir, "summary.csv")):
            row["run"] = run_name
            combined.append(row)
        per_run_rows[run_name] = read_csv(os.path.join(bench_dir, "results.csv"))
        trained[run_name] = run_result(run_dir)
        calibrated[run_name] = calibrated_from_csv(read_csv(os.path.join(bench_dir, "calibrated.csv")))
    write_csv(os.path.join(out_dir, "summary.csv"), combined)
    title = f"sweep {sw.name}"
    plots = plot(combined, out_dir, label_key="run", title=title, measured=("similarity", "margin"))
    plots += calibrated_plot(calibrated, bins, out_dir, title)
    grid = sweep_grid(out_dir, list(sw.runs), sorted({r["size_px"] for r in combined if r["people"] == 1}))
    if grid:
        plots.append(grid)
    claims = {}
    baseline = str(sw.get("baseline", "global_only"))
    if baseline in per_run_rows:
        for other in per_run_rows:
            if other != baseline:
                claims[f"{other} - {baseline}"] = paired_difference(per_run_rows[other], per_run_rows[baseline], bins, seed=0)
    table = os.path.join(out_dir, "table.md")
    with open(table, "w") as f:
        f.write(f"# Sweep {sw.name}\n\nIdentity margin (sim_ref - sim_other, misses score 0) and retention (margin / the real-photo "
                "ceiling) per face-size bin, 95% intervals resampling identities. Each run is benchmarked with the branches it trained.\n\n")
        for q, digits in (("margin", 3), ("retention", 2)):
            f.write(f"\n## {q}\n\n| run | " + " | ".join(bins + ["all"]) + " |\n|---|" + "---|" * (len(bins) + 1) + "\n")
            for run_name, per_bin in calibrated.items():
                f.write(f"| {run_name} | " + " | ".join(fmt(per_bin[b][q], digits) if b in per_bin else "-" for b in bins + ["all"]) + " |\n")
        first = next(iter(calibrated.values()))
        f.write("| ceiling (real photos) | " + " | ".join(fmt(first[b]["ceiling"]) if b in first else "-" for b in bins + ["all"]) + " |\n")
        f.write("\n## found-rate\n\n| run | " + " | ".join(bins + ["all"]) + " |\n|---|" + "---|" * (len(bins) + 1) + "\n")
        for run_name, per_bin in calibrated.items():
            f.write(f"| {run_name} | " + " | ".join(f"{per_bin[b]['found_rate'][0]:.2f}" if b in per_bin else "-" for b in bins + ["all"]) + " |\n")
        if claims:
            heading = f"margin difference against {baseline} on the same cases (same reference, box, seed)"
            heading = "The paper's claim: " + heading if baseline == "global_only" else heading.capitalize()
            f.write(f"\n## {heading}\n\n| difference | "
                    + " | ".join(bins + ["all"]) + " |\n|---|" + "---|" * (len(bins) + 1) + "\n")
            for label, per_bin in claims.items():
                f.write(f"| {label} | " + " | ".join(fmt(per_bin[b]) if b in per_bin else "-" for b in bins + ["all"]) + " |\n")
        f.write(training_table(trained))
        sizes = sorted({r["size_px"] for r in combined})
        for n in sorted({r["people"] for r in combined}):
            f.write(f"\n## margin by face size, {n} {'person' if n == 1 else 'people'}\n\n| run | " + " | ".join(f"{s} px" for s in sizes)
                    + " |\n|---|" + "---|" * len(sizes) + "\n")
            for run_name in sw.runs:
                vals = {r["size_px"]: r["margin"] for r in combined if r["run"] == run_name and r["people"] == n}
                f.write(f"| {run_name} | " + " | ".join(f"{vals[s]:.3f}" if s in vals else "-" for s in sizes) + " |\n")
    with open(os.path.join(out_dir, "claims.json"), "w") as f:
        import json

        json.dump(claims, f, indent=2)
    return {"out_dir": out_dir, "table": table, "plots": plots, "claims": claims, "calibrated": calibrated}


def training_table(results: dict[str, dict]) -> str:
    """Markdown: per run, its steps, held-out loss before and after, and the identity use (how much worse the
    held-out face loss gets with another identity's reference; 0 = the reference is ignored)."""
    out = ("\n## training (held-out samples, the same noise each time)\n\n| run | steps | held-out loss | identity use | "
           "face loss own / other reference |\n|---|---|---|---|---|\n")
    for name, r in results.items():
        loss = (f"{r['val_loss_first']:.4f} -> {r['val_loss_last']:.4f}" if "val_loss_first" in r else "-")
        use = (f"{r['id_use']:+.1%}", f"{r['id_use_face_mse_own']:.5f} / {r['id_use_face_mse_other']:.5f}") if "id_use" in r else ("-", "-")
        out += f"| {name} | {r.get('global_step', '-')} | {loss} | {use[0]} | {use[1]} |\n"
    return out


def precomputed(sw, extra_overrides=()) -> str:
    """The sweep's precomputed cache (written on the first run of the sweep, reused after)."""
    import json

    folder = str(sw.precompute)
    info = os.path.join(folder, INFO_FILE)
    first = next(iter(sw.runs.values()))
    cfg = load_config(str(first.exp), list(sw.get("train", [])) + list(extra_overrides))
    if os.path.exists(info):
        with open(info) as f:
            old = json.load(f)
        stale = stale_keys(old, cfg)
        if old.get("complete") and not stale:
            return folder
        if stale:  # the sweep's own cache, made for other models (a new `make pretrain`, a checkout that touched them)
            log.warning("sweep %s: %s was made for another setup (%s); precomputing it again", sw.name, folder, ", ".join(stale))
            shutil.rmtree(folder)
    prepare_embedded_default(cfg)
    log.info("sweep %s: precomputing latents and text embeddings into %s (once for every run)", sw.name, folder)
    precompute(cfg, folder)
    return folder


def stale_keys(info: dict, cfg) -> list[str]:
    """The keys of a precomputed cache's record that differ from what ``cfg`` would write now."""
    return sorted(cache_diff(info, cache_info(load_backbone(cfg.model, int(cfg.experiment.seed)), cfg)))


def sweep_grid(out_dir: str, runs: list[str], sizes_px: list[int]) -> str | None:
    """rows = face sizes, columns = reference | each run's sample (same reference, box and seed), from the runs' grid tiles."""
    from PIL import Image

    folders = [os.path.join(out_dir, r, "grid") for r in runs]
    ref_path = os.path.join(folders[0], "reference.png") if folders else ""
    if not os.path.exists(ref_path):
        return None
    tiles = []
    for size in sizes_px:
        row = [Image.open(ref_path).convert("RGB")]
        for folder in folders:
            path = os.path.join(folder, f"trained-{size}.png")
            if not os.path.exists(path):
                return None
            row.append(Image.open(path).convert("RGB"))
        tiles.append(row)
    side = row[1].width
    pad = 2
    canvas = Image.new("RGB", ((side + pad) * (len(runs) + 1) + pad, (side + pad) * len(sizes_px) + pad), (255, 255, 255))
    for i, row in enumerate(tiles):
        for j, im in enumerate(row):
            canvas.paste(im.resize((side, side), Image.BICUBIC), (pad + j * (side + pad), pad + i * (side + pad)))
    path = os.path.join(out_dir, "grid.png")
    canvas.save(path)
    with open(os.path.join(out_dir, "grid.md"), "w") as f:
        f.write("rows (top to bottom): face sizes " + ", ".join(f"{s} px" for s in sizes_px) + " at 512 scale; columns: reference | "
                + " | ".join(runs) + "\n")
    return path
