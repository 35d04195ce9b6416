"""Where a run loses identity: held-out photos noised part of the way and denoised by the run (img2img), scored as
the benchmark scores generated faces.

    python benchmarks/identity_by_noise.py RUN [--strengths 0,0.25,0.5,0.75,1] [--photos 6] [--set key=value ...] [--out DIR]

Sampling from noise decides the coarse picture (where the head is, its colours, the hair's shape) in the first,
noisiest steps and the details in the last. Starting from a real held-out photo of the reference's identity noised
to ``strength`` of the way (``RealisIDPipeline(..., image=photo, strength=s)``; 0 = the photo through the VAE, 1 = from
noise as the benchmark) keeps what the steps before that would have decided, so the margin as a function of strength
says at which noise levels the identity is lost. Each photo is generated twice: with its identity's reference (the
benchmark's settings, setting ``trained``) and with no identity (``guidance_id=0``: text and location only, the
reference unused), which shows how much identity the noised photo still carries on its own.

The photos: the first ``--photos`` held-out photos (by key) of each of the benchmark's reference identities, other than
the one its reference was cut from, each at its own face box and size; the prompt is the benchmark's identity-free
one. Per strength and mode: found-rate, margin per bin and retention (margin / the real photos' ceiling) with 95%
intervals resampling identities. Writes table.md, results.json and rows.csv under ``--out`` (default
benchmarks/results/<date>-identity-by-noise/).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from realisid.bench import bench_sampling, held_out_references, write_csv  # noqa: E402
from realisid.evaluation import build_evaluator, to_uint8  # noqa: E402
from realisid.geometry import face_size, scale_bin  # noqa: E402
from realisid.machine import describe_machine  # noqa: E402
from realisid.metrics.calibrated import calibrated_identity, fmt  # noqa: E402
from realisid.pipeline import Person, RealisIDPipeline  # noqa: E402


def parse_strengths(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--strengths {text!r}: give comma-separated numbers in [0, 1], e.g. 0,0.5,1") from None
    if not vals or any(not 0.0 <= v <= 1.0 for v in vals):
        raise ValueError(f"--strengths {text!r}: give comma-separated numbers in [0, 1], e.g. 0,0.5,1")
    return vals


def choose_photos(examples, refs, per_identity: int) -> list[dict]:
    """The first ``per_identity`` photos (by key) of each reference identity, the reference's own photo left out."""
    ref_keys = {r["key"] for r in refs}
    out = []
    for r in refs:
        mine = sorted((ex for ex in examples if ex["identity"] == r["identity"] and ex["key"] not in ref_keys), key=lambda ex: ex["key"])
        out += mine[:per_identity]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a finished run directory (config.yaml and export/)")
    ap.add_argument("--strengths", default="0,0.25,0.5,0.75,1", help="img2img strengths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    ap.add_argument("--photos", type=int, default=6, help="held-out photos per reference identity (default 6)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the run's config (e.g. faces.det_thresh=0.5)")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", f"{dt.date.today().isoformat()}-identity-by-noise"))
    args = ap.parse_args(argv)
    try:
        strengths = parse_strengths(args.strengths)
    except ValueError as exc:
        ap.error(str(exc))
    if args.photos < 1:
        ap.error(f"--photos {args.photos}: give 1 or more")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from omegaconf import OmegaConf

    t0 = time.perf_counter()
    if not os.path.isdir(os.path.join(args.run, "export")) or not os.path.exists(os.path.join(args.run, "config.yaml")):
        raise FileNotFoundError(f"{args.run}: needs config.yaml and export/ (a finished run such as runs/sweeps/branches/joint)")
    cfg = OmegaConf.merge(OmegaConf.load(os.path.join(args.run, "config.yaml")), OmegaConf.from_dotlist(args.set))
    pipe = RealisIDPipeline.from_export(os.path.join(args.run, "export"))
    b = cfg.bench
    examples, refs = held_out_references(cfg, pipe.backbone.vae_scale_factor)
    by_id = {r["identity"]: r for r in refs}
    ev = build_evaluator(cfg, pipe.id_encoder.name)
    bins = list(ev.bins)
    bank = ev.reference_bank({r["identity"]: r["id_image"] for r in refs})
    real = ev.real_rows(examples, bank, exclude={r["key"] for r in refs})
    photos = choose_photos(examples, refs, args.photos)
    base_kwargs = bench_sampling(cfg)
    prompt = str(list(b.prompts)[0])
    modes = {"reference": {}, "no identity": {"guidance_id": 0.0, "guidance_id_by_bin": None}}
    rows, table = [], {}
    for s in strengths:
        for mode, extra in modes.items():
            if s == 0.0 and mode != "reference":
                continue  # no step runs: the photo through the VAE, whatever the guidance
            t1 = time.perf_counter()
            got = []
            for k, ex in enumerate(photos):
                ref = by_id[ex["identity"]]
                box = [float(v) for v in ex["face_box"]]
                out = pipe(prompt, [Person(box=box, id_image=ref["id_image"], id_mask=ref["id_mask"])], seed=int(b.seed) + k,
                           output_type="pt", image=ex["image"], strength=s, **{**base_kwargs, **extra})
                r = ev.identity_rows(to_uint8(out.images[0].cpu()), [box], [ex["identity"]], bank)[0]
                fs = face_size(box, ex["image"].shape[-1], ex["image"].shape[-2])
                got.append({"strength": s, "mode": mode, "key": ex["key"], "identity": ex["identity"], "face_size": round(fs, 4),
                            "bin": scale_bin(fs, ev.bins), **{q: r[q] for q in ("found", "sim_ref", "sim_other", "margin")}})
            rows += got
            table[(s, mode)] = calibrated_identity(got, real, bins, n_boot=int(b.bootstrap), seed=int(b.seed))
            print(f"strength {s:g}, {mode}: {len(got)} photos in {time.perf_counter() - t1:.0f} s, margin all "
                  f"{fmt(table[(s, mode)]['all']['margin'])}", flush=True)
    header = {"run": args.run, "date": dt.date.today().isoformat(),
              "machine": describe_machine(host=False),
              "command": "python benchmarks/identity_by_noise.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "photos": f"{len(photos)} held-out photos ({args.photos} per reference identity, {len(refs)} identities)",
              "prompt": prompt, "sampling": json.dumps(base_kwargs), **ev.describe(), "wall time": f"{time.perf_counter() - t0:.0f} s"}
    lines = ["# Where identity is lost: held-out photos noised to a strength and denoised by the run (img2img)", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "strength 0: the photo through the VAE; 1: from noise, as the benchmark. reference: the identity's reference "
              "and the benchmark's guidance; no identity: guidance_id 0 (text and location only). Margin per bin with 95% "
              "intervals (identities resampled); retention = margin / ceiling of the real photos (all bins).", "",
              "| strength | mode | found-rate | " + " | ".join(f"margin {bn}" for bn in bins) + " | margin all | retention all |",
              "|---|---|---|" + "---|" * len(bins) + "---|---|"]
    for (s, mode), cal in table.items():
        cells = [fmt(cal[bn]["margin"]) if bn in cal else "n/a" for bn in bins]
        lines.append(f"| {s:g} | {mode} | {fmt(cal['all']['found_rate'], 2)} | " + " | ".join(cells) +
                     f" | {fmt(cal['all']['margin'])} | {fmt(cal['all']['retention'], 2)} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    write_csv(os.path.join(args.out, "rows.csv"), rows)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"header": header, "results": [{"strength": s, "mode": m, "calibrated": c} for (s, m), c in table.items()]}, f, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    from realisid.cli import quiet_progress_bars

    quiet_progress_bars()  # no bar lines when piped to a log
    sys.exit(main())
