"""Throughput on this machine, side by side in one process: data pipeline, training step, sampling, precomputed inputs.

    python benchmarks/throughput.py [EXP] [key=value ...] [--out DIR] [--steps N] [--rounds R] [--workers 0,2]
    make throughput [ARGS="..."]

1. Data: samples/s of the training stream (decode + examples + batches) against a decode-only baseline reading
   and decoding the same JPEGs through the same stream and DataLoader; and of the stream over the precomputed
   cache (`realisid precompute`, made here if missing).
2. Training step: seconds per optimizer step of our LightningModule under the Trainer `realisid train` builds
   (its logging and callbacks included, no validation) against a bare PyTorch loop doing the same step
   (module.shared_step, backward, clipping, AdamW, schedule) on the same batch and precision; peak memory of each.
3. Precomputed: the same Lightning step on the batch as the cache serves it (VAE posterior + text embeddings).
4. Sampling: the joint pipeline for 1, 2, 3 people against the cost the design predicts from its passes, each
   timed alone (per step: UNet + per person a global and a local pass; once: prompt, references, decode), and
   against diffusers' plain StableDiffusionControlNetPipeline (one ControlNet pass per step) on the same backbone.
5. Faces: per image, detection alone and detect() (detection + landmarks + embeddings), and per face the
   embedding, for each installed real face-analysis backend (yunet-sface, dlib; docs/faces.md) on the photos
   that ship with the installed packages (scikit-image's astronaut, insightface's t1.jpg and Tom_Hanks_54745.png).

Prints a table and writes table.md and results.json under benchmarks/results/<date>-throughput/ with the machine
description. Targets (issue 6): data >= 70% of decode-only; Lightning step <= 1.10x bare loop; sampling within
1.15x of the pass-count prediction; precomputed step >= 1.5x faster than encoding on the fly.
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

from perf import (compare_sampling, compare_training, lightning_step_time, machine_description, mib, precomputed_batch,
                           time_call, write_results)

log = logging.getLogger("throughput")
TARGETS = {"data": 0.70, "train": 1.10, "sampling": 1.15, "precomputed": 1.5}


class DecodeOnly:
    """The baseline per-sample work: decode the photo and the reference JPEG to pixels, nothing else."""

    def __call__(self, raw):
        from PIL import Image

        try:
            out = {"image": torch.from_numpy(np.array(Image.open(io.BytesIO(raw["jpg"])).convert("RGB")))}
            if "ref.jpg" in raw:
                out["ref"] = torch.from_numpy(np.array(Image.open(io.BytesIO(raw["ref.jpg"])).convert("RGB")))
            return out
        except Exception:  # noqa: BLE001 - a baseline skips what it cannot decode, as the real stream does
            return None


def pixel_collate(examples):
    """Decoded pixels into one tensor per field (a list where sizes differ), as cheap to ship between processes as ours."""
    out = {}
    for k in examples[0]:
        vals = [e[k] for e in examples if k in e]
        out[k] = torch.stack(vals) if len({v.shape for v in vals}) == 1 else vals
    return out


def stream_rate(urls, maker, batch_size: int, workers: int, batches: int, collate_fn=None) -> float:
    from realisid.data.stream import TrainStream

    stream = TrainStream(urls, maker, batch_size=batch_size, shuffle_buffer=500, seed=0, rank=0, world_size=1,
                         num_workers=max(1, workers), resampled=True, collate_fn=collate_fn)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    it = iter(loader)
    for _ in range(2 * workers + 2):  # workers started, buffers filled
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch_size / (time.perf_counter() - t)
    del it
    return rate


def bench_data(cfg, maker, pre_urls, workers_list, batches: int, rounds: int) -> list[dict]:
    from realisid.data.stream import resolve_shards

    urls = resolve_shards(cfg.data.train_shards, "data.train_shards")
    bs = int(cfg.data.batch_size)
    rows = []
    for w in workers_list:
        runs = {"decode_only": (urls, DecodeOnly(), pixel_collate), "ours": (urls, maker, None)}
        if pre_urls:
            runs["precomputed"] = (pre_urls, maker, None)
        rates: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(rounds):  # interleaved, order alternating, so a noisy neighbour hits all alike
            for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                u, m, c = runs[k]
                rates[k].append(stream_rate(u, m, bs, w, batches, collate_fn=c))
        row = {"workers": w, **{k: statistics.median(v) for k, v in rates.items()}}
        for k in ("ours", "precomputed"):  # the ratio of each round, then the median: robust to drift between rounds
            if k in rates:
                row[f"{k}_ratio"] = statistics.median(a / b for a, b in zip(rates[k], rates["decode_only"]))
        row["rounds"] = rates
        rows.append(row)
        log.info("data, %d workers: %s", w, {k: v for k, v in row.items() if k != "rounds"})
    return rows


FACE_KINDS = ("yunet-sface", "dlib")


def face_photos() -> dict[str, np.ndarray]:
    """The real photos installed with our dependencies (RGB uint8): no download, the same ones tests use."""
    import importlib.util

    import cv2
    import skimage.data

    photos = {"astronaut": skimage.data.astronaut()}
    spec = importlib.util.find_spec("insightface")
    if spec is not None and spec.submodule_search_locations:
        folder = os.path.join(list(spec.submodule_search_locations)[0], "data", "images")
        for name, file in (("t1", "t1.jpg"), ("tom_hanks", "Tom_Hanks_54745.png")):
            bgr = cv2.imread(os.path.join(folder, file), cv2.IMREAD_COLOR)
            if bgr is not None:
                photos[name] = np.ascontiguousarray(bgr[:, :, ::-1])
    return photos


def bench_faces(runs: int) -> dict:
    """Per-image detection and per-face embedding times (medians over ``runs``) of each installed real backend."""
    from realisid.faces import load_face_analyzer
    from realisid.faces.dlib_impl import INSTALL as DLIB_INSTALL, dlib_available
    from realisid.faces.yunet_sface import INSTALL as YUNET_INSTALL, yunet_sface_available

    available = {"yunet-sface": (yunet_sface_available(), YUNET_INSTALL), "dlib": (dlib_available(), DLIB_INSTALL)}
    photos = face_photos()
    out: dict = {"runs": runs, "photos": {k: list(v.shape[1::-1]) for k, v in photos.items()}, "backends": [], "missing": {}}
    for kind in FACE_KINDS:
        ok, install = available[kind]
        if not ok:
            out["missing"][kind] = f"not installed: {install}"
            continue
        t = time.perf_counter()
        analyzer = load_face_analyzer({"kind": kind})
        backend = {"kind": kind, "name": analyzer.name, "embedding_dim": analyzer.embedding_dim,
                   "threshold": getattr(analyzer, "match_threshold", None), "load_s": time.perf_counter() - t, "rows": []}
        for photo, image in photos.items():
            faces = analyzer.detect(image)  # warm-up, and the key points the embedding is timed on
            detect_t, boxes_t, embed_t = [], [], []
            for _ in range(runs):
                t = time.perf_counter()
                analyzer.detect(image)
                detect_t.append(time.perf_counter() - t)
                if hasattr(analyzer, "detect_boxes"):
                    t = time.perf_counter()
                    analyzer.detect_boxes(image)
                    boxes_t.append(time.perf_counter() - t)
                for f in faces:
                    t = time.perf_counter()
                    analyzer.embed(image, f.kps)
                    embed_t.append(time.perf_counter() - t)
            backend["rows"].append({"photo": photo, "faces": len(faces), "detect_s": statistics.median(detect_t),
                                    "detection_only_s": statistics.median(boxes_t) if boxes_t else None,
                                    "embed_s": statistics.median(embed_t) if embed_t else None})
        out["backends"].append(backend)
        log.info("faces, %s: %s", kind, backend["rows"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("exp", nargs="?", default="joint")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps per training round")
    p.add_argument("--warmup", type=int, default=4, help="untimed batches first (a multiple of accumulate_grad_batches)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data-batches", type=int, default=40)
    p.add_argument("--workers", default="0,2", help="DataLoader worker counts for the data comparison")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--skip", default="", help="comma list of sections to skip: data,train,precomputed,sampling,faces")
    p.add_argument("--precomputed-dir", default=None, help="cache folder for the data comparison (default: data/cache/precomputed/<exp>-r<res>)")
    p.add_argument("--render", metavar="RESULTS_JSON", default=None, help="only rewrite table.md beside RESULTS_JSON from it")
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            table = render(json.load(f))
        with open(os.path.join(os.path.dirname(args.render), "table.md"), "w") as f:
            f.write(table)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    skip = set(filter(None, args.skip.split(",")))

    from realisid.config import load_config
    from realisid.data.batch import ready_batch
    from realisid.data.cache_format import cache_info, check_cache
    from realisid.data.precompute import precompute
    from realisid.modules import build_module
    from realisid.prepare import prepare_embedded_default
    from realisid.train import build_datamodule

    cfg = load_config(args.exp, ["evaluation.every_n_validations=0", *args.overrides])
    prepare_embedded_default(cfg)
    module = build_module(cfg)
    dm = build_datamodule(cfg, module)
    dm.setup("fit")
    res = {"machine": machine_description(), "experiment": args.exp, "overrides": args.overrides, "backbone": module.backbone.name,
           "batch_size": int(cfg.data.batch_size), "resolution": int(cfg.data.resolution), "precision": str(cfg.trainer.precision),
           "efficiency": module.applied}
    pre_dir = args.precomputed_dir or os.path.join("data", "cache", "precomputed", f"{args.exp}-r{int(cfg.data.resolution)}")
    pre_urls = None
    if not {"data", "precomputed"} <= skip:
        t = time.time()
        try:
            info = precompute(cfg, pre_dir)
        except ValueError:
            if args.precomputed_dir:  # the user's folder: never deleted here
                raise
            log.info("the benchmark's own cache %s is stale (another backbone or setup): rebuilding it", pre_dir)
            shutil.rmtree(pre_dir)
            info = precompute(cfg, pre_dir)
        res["precompute"] = {"dir": pre_dir, "written": info["written"], "seconds": round(time.time() - t, 1)}
        pre_urls = check_cache(pre_dir, cache_info(module.backbone, cfg))
    if "data" not in skip:
        res["data"] = bench_data(cfg, dm.maker, pre_urls, [int(w) for w in args.workers.split(",")], args.data_batches, args.rounds)

    batch = ready_batch(next(iter(dm.train_dataloader())))
    with tempfile.TemporaryDirectory() as tmp:
        if "train" not in skip:
            res["train"] = compare_training(module, batch, cfg, args.steps, args.warmup, args.rounds, tmp)
            log.info("train: %s", {k: v for k, v in res["train"].items() if not k.endswith("rounds")})
        if "precomputed" not in skip:
            pre = precomputed_batch(module, batch)
            fly, precomp = [], []
            for r in range(args.rounds):  # order alternating per round, like the other comparisons
                for which in (("fly", "pre") if r % 2 == 0 else ("pre", "fly")):
                    b, out = (batch, fly) if which == "fly" else (pre, precomp)
                    out.append(lightning_step_time(module, b, cfg, args.steps, args.warmup, os.path.join(tmp, f"{which}{r}"))[0])
            vae = time_call(lambda: module.backbone.latent_moments(batch["image"].to(module.device)), 5, rounds=args.rounds)
            text = time_call(lambda: module.backbone.text_embeddings(batch["caption"]), 5, rounds=args.rounds)
            res["precomputed"] = {"on_the_fly_s": statistics.median(fly), "precomputed_s": statistics.median(precomp),
                                  "speedup_rounds": [a / b for a, b in zip(fly, precomp)],
                                  "vae_encode_s": vae, "text_encode_s": text}
            log.info("precomputed: %s", res["precomputed"])
    if "sampling" not in skip:
        res["sampling"] = compare_sampling(module.pipeline(), args.sample_steps, args.rounds,
                                           module.cfg.model["global"].conditioning_embedding_out_channels, int(cfg.model.id_encoder.image_size))
        log.info("sampling: %s", res["sampling"])

    if "faces" not in skip:
        res["faces"] = bench_faces(max(1, args.rounds))

    out = args.out or os.path.join("benchmarks", "results", f"{dt.date.today().isoformat()}-throughput")
    write_results(out, render(res), res)
    return 0


def _mark(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Throughput: {res['experiment']} ({res['backbone']}), batch {res['batch_size']}, {res['resolution']} px, "
             f"precision {res['precision']}", "",
             f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['memory']}, torch threads {m['torch_threads']}), "
             f"GPU: {m['gpu']}; torch {m['torch']}, lightning {m['lightning']}, diffusers {m.get('diffusers', '?')}.",
             f"Efficiency options: {', '.join(res['efficiency'])}. Overrides: {' '.join(res['overrides']) or 'none'}.", ""]
    if "data" in res:
        lines += ["## Data pipeline (samples/s: medians of interleaved rounds; ratios: median of the per-round ratios)", "",
                  "| workers | decode-only baseline | ours | ours / baseline | precomputed cache | target |", "|---|---|---|---|---|---|"]
        for r in res["data"]:
            ratio = r.get("ours_ratio", r["ours"] / r["decode_only"])
            pre = f"{r['precomputed']:.0f} ({r.get('precomputed_ratio', r['precomputed'] / r['decode_only']):.2f}x)" if "precomputed" in r else "-"
            lines.append(f"| {r['workers']} | {r['decode_only']:.0f} | {r['ours']:.0f} | {ratio:.2f} | {pre} | >= {TARGETS['data']:.2f}: "
                         f"{_mark(ratio >= TARGETS['data'])} |")
        lines.append("")
    if "train" in res:
        t = res["train"]
        ratio = t["lightning_s"] / t["bare_s"]
        lines += ["## Training step (seconds per optimizer step; peak memory)", "",
                  "| loop | s/step | rounds | peak memory rise (MiB) | peak (MiB) |", "|---|---|---|---|---|",
                  f"| our LightningModule + Trainer | {t['lightning_s']:.4f} | {', '.join(f'{v:.4f}' for v in t['lightning_rounds'])} | "
                  f"{mib(t['lightning_peak_delta'])} | {mib(t['lightning_peak'])} |",
                  f"| bare PyTorch loop | {t['bare_s']:.4f} | {', '.join(f'{v:.4f}' for v in t['bare_rounds'])} | "
                  f"{mib(t['bare_peak_delta'])} | {mib(t['bare_peak'])} |", "",
                  f"Ours / bare: **{ratio:.3f}x** (target <= {TARGETS['train']:.2f}: {_mark(ratio <= TARGETS['train'])}). "
                  "CPU memory is process RSS sampled every 2 ms (the rise is over the RSS when the loop began); on GPU the "
                  "allocator's peak.", ""]
    if "precomputed" in res:
        p = res["precomputed"]
        f = p["on_the_fly_s"] / p["precomputed_s"]
        lines += ["## Precomputed latents and text embeddings (Lightning step)", "",
                  "| inputs | s/step |", "|---|---|",
                  f"| encoded on the fly (VAE {p['vae_encode_s']:.4f} s + text {p['text_encode_s']:.4f} s per batch alone) | {p['on_the_fly_s']:.4f} |",
                  f"| precomputed | {p['precomputed_s']:.4f} |", "",
                  f"Speed-up **{f:.2f}x** (target >= {TARGETS['precomputed']:.1f}: {_mark(f >= TARGETS['precomputed'])}).", ""]
        share = (p["vae_encode_s"] + p["text_encode_s"]) / p["on_the_fly_s"]
        lines += [f"The frozen encoders are {share:.1%} of the on-the-fly step here, so removing them can make it about "
                  f"{1 / (1 - share):.2f}x faster at most (Amdahl); at SD1.5 size they are a larger share (see gpu_bench.py's results).", ""]
    if "sampling" in res:
        s = res["sampling"]
        ps = s["passes"]
        lines += [f"## Sampling, {s['steps']} steps (seconds per image)", "",
                  "Passes timed alone (batch of 3 guidance conditions): " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in ps.items()) + ".", "",
                  "| people | measured | predicted from passes | measured / predicted (median of per-round ratios) | target |", "|---|---|---|---|---|"]
        for r in s["rows"]:
            lines.append(f"| {r['people']} | {r['measured_s']:.3f} | {r['predicted_s']:.3f} | {r['ratio']:.3f} | <= {TARGETS['sampling']:.2f}: "
                         f"{_mark(r['ratio'] <= TARGETS['sampling'])} |")
        one = s["rows"][0]["measured_s"]
        lines += ["", f"diffusers StableDiffusionControlNetPipeline on the same backbone (one ControlNet pass per step, batch 2): "
                      f"{s['plain_controlnet_s']:.3f} s; the joint pipeline with one person takes {one / s['plain_controlnet_s']:.2f}x that "
                      "(it runs two branches on three guidance conditions).", ""]
    if "faces" in res:
        lines += render_faces(res["faces"])
    return "\n".join(lines)


def render_faces(fa: dict) -> list[str]:
    def ms(v):
        return "-" if v is None else f"{v * 1000:.1f}"

    sizes = ", ".join(f"{k} {w}x{h}" for k, (w, h) in fa["photos"].items())
    lines = [f"## Face analysis (ms; medians of {fa['runs']} runs; photos: {sizes})", "",
             "| backend (models) | photo | faces | detect(): detection + per-face work | detection only | embed, per face |",
             "|---|---|---|---|---|---|"]
    for b in fa["backends"]:
        for r in b["rows"]:
            lines.append(f"| {b['name']} | {r['photo']} | {r['faces']} | {ms(r['detect_s'])} | {ms(r['detection_only_s'])} | "
                         f"{ms(r['embed_s'])} |")
    lines.append("")
    for b in fa["backends"]:
        lines.append(f"- {b['kind']}: {b['name']}, {b['embedding_dim']}-D embeddings, cosine threshold {b['threshold']}, "
                     f"loaded in {b['load_s']:.2f} s.")
    for kind, why in fa["missing"].items():
        lines.append(f"- {kind}: {why}.")
    lines.append("")
    return lines


if __name__ == "__main__":
    from realisid.cli import quiet_progress_bars

    quiet_progress_bars()  # no bar lines when piped to a log
    sys.exit(main())
