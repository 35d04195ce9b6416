"""GPU benchmark: the throughput comparisons on a full-size SD1.5-architecture backbone (random weights) at 512 px.

    python benchmarks/gpu_bench.py [--exp sd15/architecture] [--batch-sizes 1,2,4,8] [--options all] [--out DIR]
    make gpu-bench [ARGS="..."]

For each efficiency option (rows) and batch size (columns): images/s of a training step of the joint module under
the Trainer `realisid train` builds, and peak GPU memory (allocator peak); a step that runs out of memory is
recorded as OOM. Then, at bf16: our Lightning step against the bare PyTorch loop, the precomputed-latent speed-up,
and the joint pipeline's sampling time for 1, 2, 3 people against its pass-count prediction and against diffusers'
plain ControlNet pipeline. The backbone is built at random from SD1.5's published configs (UNet 860M, VAE 84M,
CLIP text encoder; a random CLIP ViT-L/14 identity encoder), so nothing is downloaded and nothing is meaningful
except speed and memory.

Without a GPU it says so and exits (status 0) unless --allow-cpu is given; `--allow-cpu` with a smaller --exp and
batch sizes is how the tests check this script end to end. Results: benchmarks/results/<date>-gpu-<device>/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import warnings

import torch

from perf import (compare_sampling, compare_training, lightning_step_time, machine_description, mib, precomputed_batch,
                           write_results)

log = logging.getLogger("gpu_bench")

# option name -> config overrides on top of the experiment (applied to one built module, see apply_efficiency)
FP32 = ["model.backbone_dtype=fp32", "trainer.precision=32-true"]
BF16 = ["model.backbone_dtype=bf16", "trainer.precision=bf16-mixed"]
OPTIONS = {
    "fp32": FP32,
    "fp16-mixed": ["model.backbone_dtype=fp16", "trainer.precision=16-mixed"],
    "bf16-mixed": BF16,
    "bf16 + eager attention": BF16 + ["efficiency.attention=eager"],
    "bf16 + channels_last": BF16 + ["efficiency.channels_last=true"],
    "bf16 + checkpointing (branches)": BF16 + ["efficiency.gradient_checkpointing=branches"],
    "bf16 + checkpointing (all)": BF16 + ["efficiency.gradient_checkpointing=all"],
    "bf16 + EMA": BF16 + ["efficiency.ema.enabled=true"],
    "bf16 + accumulate 2": BF16 + ["trainer.accumulate_grad_batches=2"],
    "bf16 + precomputed latents": BF16,
    "bf16 + torch.compile": BF16 + ["efficiency.compile=true"],   # last: compiling is not undone
}


def example_pool(cfg, module, n: int = 8) -> list[dict]:
    """A few synthetic faces rendered at the experiment's resolution, made into examples by the real pipeline."""
    from webdataset.tariterators import tarfile_samples

    from realisid.embedded.synthetic import generate_synthetic_shards
    from realisid.train import build_datamodule

    maker = build_datamodule(cfg, module).maker
    with tempfile.TemporaryDirectory() as tmp:
        generate_synthetic_shards(tmp, num_identities=2, images_per_identity=n, val_identities=1, image_size=max(128, int(cfg.data.resolution)),
                                  ref_size=int(cfg.model.id_encoder.image_size), shard_size=64)
        raws = list(tarfile_samples([{"url": os.path.join(tmp, "train-000000.tar")}]))
    return [ex for ex in (maker(r) for r in raws) if ex is not None]


def make_batch(pool: list[dict], size: int) -> dict:
    from realisid.data.batch import collate

    out = collate([pool[i % len(pool)] for i in range(size)])
    out["data_stream"], out["data_consumed"] = 0, size
    return out


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def set_options(module, base_cfg, overrides: list[str]):
    from realisid.config import apply_overrides
    from realisid.modules.efficiency import apply_efficiency, check_precision

    cfg = apply_overrides(base_cfg.copy(), overrides)
    check_precision(cfg.model.backbone_dtype, cfg.trainer.precision, cfg.trainer.accelerator)
    module.cfg = cfg
    module.applied = apply_efficiency(module, cfg.efficiency, cfg.model.backbone_dtype)
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--exp", default="sd15/architecture")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--batch-sizes", default="1,2,4,8")
    p.add_argument("--options", default="all", help=f"comma list of: {', '.join(OPTIONS)} (or all)")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (a multiple of 2 covers accumulation)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--compare-batch", type=int, default=4, help="batch size of the Lightning-vs-bare and precomputed comparisons")
    p.add_argument("--skip", default="", help="comma list of: matrix, compare (Lightning vs bare and precomputed), bare (only the "
                                               "Lightning-vs-bare part of compare), sampling")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (slow; for smoke tests with a small --exp)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.stdout.write("gpu_bench: no GPU on this machine (torch.cuda.is_available() is False); nothing measured. "
                         "Run it where a GPU is present, or pass --allow-cpu for a (slow) CPU run.\n")
        return 0
    names = list(OPTIONS) if args.options == "all" else [n.strip() for n in args.options.split(",")]
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise SystemExit(f"--options: unknown {unknown}; valid: {', '.join(OPTIONS)}")
    names.sort(key=lambda n: n.endswith("torch.compile"))  # compile stays last: it cannot be undone
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        names = [n for n in names if not n.startswith("fp16")]  # fp16 autocast training is a GPU feature
    skip = set(filter(None, args.skip.split(",")))

    from realisid.config import load_config
    from realisid.modules import build_module

    base = load_config(args.exp, ["evaluation.every_n_validations=0", "trainer.enable_progress_bar=false", *args.overrides])
    t0 = time.time()
    module = build_module(base).to(device)
    built_s = time.time() - t0
    n_params = {name: sum(p.numel() for p in m.parameters()) for name, m in
                (("unet", module.backbone.unet), ("vae", module.backbone.vae), ("text_encoder", module.backbone.text_encoder),
                 ("local_branch", module.local_branch), ("global_branch", module.global_branch), ("id_encoder", module.id_encoder))
                if m is not None}
    pool = example_pool(base, module)
    res = {"machine": machine_description(), "experiment": args.exp, "overrides": args.overrides, "resolution": int(base.data.resolution),
           "params_millions": {k: round(v / 1e6, 1) for k, v in n_params.items()}, "build_seconds": round(built_s, 1), "matrix": {}}
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if "matrix" not in skip:
            for name in names:
                cfg = set_options(module, base, OPTIONS[name])
                row = {}
                for bs in sizes:
                    batch = to_device(make_batch(pool, bs), device)
                    if name.endswith("precomputed latents"):
                        batch = precomputed_batch(module, batch)
                    try:
                        t, mem = lightning_step_time(module, batch, cfg, args.steps, args.warmup, os.path.join(tmp, re.sub(r"\W+", "_", name)))
                        images = bs * int(cfg.trainer.accumulate_grad_batches)
                        row[bs] = {"step_s": t, "images_per_s": images / t, "peak_bytes": mem.peak}
                    except torch.cuda.OutOfMemoryError:
                        row[bs] = {"oom": True}
                        module.zero_grad(set_to_none=True)
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    log.info("%s, batch %d: %s", name, bs, row[bs])
                res["matrix"][name] = row
        if "compare" not in skip:
            cfg = set_options(module, base, BF16 if device == "cuda" or "bf16-mixed" in names else FP32)
            batch = to_device(make_batch(pool, args.compare_batch), device)
            res["compare"] = {"batch": args.compare_batch, "options": module.applied}
            if "bare" not in skip:
                res["compare"].update(compare_training(module, batch, cfg, args.steps, args.warmup, args.rounds, tmp))
            pre = precomputed_batch(module, batch)
            fly = [lightning_step_time(module, batch, cfg, args.steps, args.warmup, os.path.join(tmp, f"fly{r}"))[0] for r in range(args.rounds)]
            prec = [lightning_step_time(module, pre, cfg, args.steps, args.warmup, os.path.join(tmp, f"pre{r}"))[0] for r in range(args.rounds)]
            res["compare"].update(on_the_fly_s=statistics.median(fly), precomputed_s=statistics.median(prec))
            log.info("compare: %s", res["compare"])
        if "sampling" not in skip:
            set_options(module, base, BF16 if device == "cuda" else FP32)
            # generation as `realisid generate --device cuda` runs it: fp16 frozen parts on a GPU, fp32 branches
            pipe = module.pipeline().to(device, "fp16" if device == "cuda" else "fp32")
            res["sampling"] = compare_sampling(pipe, args.sample_steps, args.rounds,
                                               base.model["global"].conditioning_embedding_out_channels, int(base.model.id_encoder.image_size))
            res["sampling"]["dtype"] = str(pipe.backbone.unet.dtype).removeprefix("torch.")
            log.info("sampling: %s", res["sampling"])

    gpu = res["machine"].get("gpu", "none")
    tag = re.sub(r"[^a-z0-9]+", "-", (gpu if gpu != "none" else "cpu").lower()).strip("-")
    out = args.out or os.path.join("benchmarks", "results", f"{dt.date.today().isoformat()}-gpu-{tag}")
    write_results(out, render(res, sizes), res)
    return 0


def render(res: dict, sizes: list[int]) -> str:
    m = res["machine"]
    lines = [f"# GPU benchmark: {res['experiment']} at {res['resolution']} px (random weights)", "",
             (f"Measured {m['date']} on {m['gpu']} ({m.get('gpu_memory', '-')}), " if m.get("gpu", "none") != "none" else
              f"Measured {m['date']} WITHOUT a GPU (--allow-cpu), ") + f"CPU {m['cpu']} x{m['cores']}; torch {m['torch']}, "
             f"CUDA {m.get('cuda', '-')}, lightning {m['lightning']}, diffusers {m.get('diffusers', '?')}.",
             "Parameters (millions): " + ", ".join(f"{k} {v}" for k, v in res["params_millions"].items()) + ".", ""]
    if res["matrix"]:
        lines += ["## Training step of the joint module: images/s (peak memory MiB)", "",
                  "| option | " + " | ".join(f"batch {b}" for b in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for name, row in res["matrix"].items():
            cells = []
            for b in sizes:
                r = row.get(b, {})
                cells.append("OOM" if r.get("oom") else f"{r['images_per_s']:.2f} ({mib(r['peak_bytes'])})" if r else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if "compare" in res:
        c = res["compare"]
        lines += [f"## Our step against a bare loop, and precomputed inputs (batch {c['batch']}; {', '.join(c['options'])})", ""]
        if "bare_s" in c:
            lines.append(f"- Lightning {c['lightning_s']:.4f} s/step, bare loop {c['bare_s']:.4f} s/step: **{c['lightning_s'] / c['bare_s']:.3f}x**; "
                         f"peak memory {mib(c['lightning_peak'])} / {mib(c['bare_peak'])} MiB.")
        lines += [f"- Encoding on the fly {c['on_the_fly_s']:.4f} s/step, precomputed {c['precomputed_s']:.4f} s/step: "
                  f"**{c['on_the_fly_s'] / c['precomputed_s']:.2f}x** faster.", ""]
    if "sampling" in res:
        s = res["sampling"]
        lines += [f"## Sampling, {s['steps']} steps", "",
                  "Passes alone: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in s["passes"].items()) + ".", "",
                  f"Generation at {res['resolution']} px, frozen parts {s.get('dtype', '?')}, branches fp32 under autocast.", "",
                  "| people | measured s | images/s | peak memory MiB | predicted s | ratio |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['people']} | {r['measured_s']:.3f} | {r.get('images_per_s', 1 / r['measured_s']):.3f} | "
                  f"{mib(r['peak_bytes']) if r.get('peak_bytes') else '-'} | {r['predicted_s']:.3f} | {r['ratio']:.3f} |" for r in s["rows"]]
        lines += ["", f"Plain diffusers ControlNet pipeline: {s['plain_controlnet_s']:.3f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    from realisid.cli import quiet_progress_bars

    quiet_progress_bars()  # no bar lines when piped to a log
    sys.exit(main())
