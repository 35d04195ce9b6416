"""Whether trained branches use the reference face: the identity use of runs, on many held-out samples.

    python benchmarks/identity_use.py RUN_DIR [RUN_DIR ...] [--samples 96] [--out DIR]

RUN_DIR: a training run (its ``config.yaml`` and ``checkpoints/last.ckpt``), e.g. ``runs/sweeps/branches/joint``.
For each held-out sample (identities no model saw, the identity-free caption "a photo of a person, ..."), the face
loss under fixed noise and timestep is computed twice: with the sample's own reference and with another held-out
identity's reference (``RealisIDModule.identity_use``, as ``make train`` prints it for its 32 validation samples).
Identity use = (other - own) / own: 0 when the branches ignore the identity tokens, above 0 when they carry the
identity. Reports it with a 95% bootstrap interval over samples, and each run's training settings.

Writes table.md and results.json under benchmarks/results/<date>-identity-use/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from realisid.callbacks import identity_use  # noqa: E402
from realisid.modules import build_module  # noqa: E402
from realisid.modules.conditioner import REFERENCE_KEYS, other_identity_order, with_identity_free_captions  # noqa: E402
from realisid.train import build_datamodule, run_result  # noqa: E402


def measure(run_dir: str, samples: int) -> dict:
    """Per-sample face loss with the own and another identity's reference for one run."""
    from omegaconf import OmegaConf

    cfg_path, ckpt = os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, "checkpoints", "last.ckpt")
    for p in (cfg_path, ckpt):
        if not os.path.exists(p):
            raise SystemExit(f"'{p}' does not exist; give a training run directory (with config.yaml and checkpoints/last.ckpt)")
    cfg = OmegaConf.load(cfg_path)
    cfg.data.precomputed = None           # the validation samples come from the shards either way
    cfg.data.val_samples = int(samples)
    cfg.data.batch_size = 1               # one noise draw per sample: per-sample values for the interval
    module = build_module(cfg)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"], strict=False)  # checkpoints hold the trained parts only
    module.eval()
    dm = build_datamodule(cfg, module)
    dm.setup("validate")
    batches = [module.on_after_batch_transfer(module.on_before_batch_transfer(b)) for b in dm.val_dataloader()]
    # pair each sample with the next one of another identity, as a validation batch does
    order = other_identity_order([b["identity"][0] for b in batches])
    if order is None:
        raise SystemExit(f"the validation samples of {run_dir} hold one identity; identity use needs at least two")
    own, other = [], []
    with torch.no_grad():
        for i, b in enumerate(batches):
            b = with_identity_free_captions(b)
            swap = batches[order[i]]
            mixed = {**b, **{k: swap[k] for k in REFERENCE_KEYS if k in swap}}  # another identity's reference
            own.append(float(module.held_out_loss(b, i)["face_mse"]))
            other.append(float(module.held_out_loss(mixed, i)["face_mse"]))
    own_a, other_a = np.asarray(own), np.asarray(other)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(own_a), size=(2000, len(own_a)))
    boot = (other_a[idx].mean(1) - own_a[idx].mean(1)) / own_a[idx].mean(1)
    use = identity_use(float(own_a.mean()), float(other_a.mean()))
    r = run_result(run_dir)
    return {"run": run_dir, "module": str(cfg.experiment.module), "steps": int(r.get("global_step", state.get("global_step", -1))),
            "lr": float(cfg.optim.lr), "face_lambda": float(cfg.model.loss.face_lambda),
            "face_norm": module.loss_fn.face_norm,
            "identity_free_captions": float(cfg.data.identity_free_captions), "samples": len(own),
            "face_mse_own": float(own_a.mean()), "face_mse_other": float(other_a.mean()), "identity_use": float(use),
            "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
            "samples_lower_with_own": float(np.mean(own_a < other_a))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="training run directories")
    ap.add_argument("--samples", type=int, default=96, help="held-out samples (the first N of data.val_shards)")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", f"{dt.date.today().isoformat()}-identity-use"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    results = [measure(r, args.samples) for r in args.runs]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = [f"# Identity use ({dt.date.today().isoformat()}, {platform.node() or 'this machine'}, "
             f"{time.perf_counter() - t0:.0f} s)\n",
             "Held-out face loss (fixed noise and timestep per sample, identity-free caption) with the sample's own reference "
             "and with another held-out identity's; identity use = (other - own) / own, 95% bootstrap interval over samples. "
             "0 = the branches ignore the reference. Stand-ins throughout (tiny base trained on synthetic faces, "
             "standin-arcface-synthetic conditioning encoder).\n",
             "| run | module | steps | lr | face_lambda | face_norm | identity-free captions | samples | face loss own / other | identity use [95%] | samples lower with own |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['run']} | {r['module']} | {r['steps']} | {r['lr']:g} | {r['face_lambda']:g} | {r['face_norm']} | {r['identity_free_captions']:g} | "
                     f"{r['samples']} | {r['face_mse_own']:.5f} / {r['face_mse_other']:.5f} | {r['identity_use']:+.1%} "
                     f"[{r['ci95'][0]:+.1%}, {r['ci95'][1]:+.1%}] | {r['samples_lower_with_own']:.2f} |")
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    from realisid.cli import quiet_progress_bars

    quiet_progress_bars()  # no bar lines when piped to a log
    raise SystemExit(main())
