"""How much of the identity metric is the reference's background: the benchmark scored again against references
whose background was swapped.

    python benchmarks/background_leak.py RUN [RUN ...] [--swaps 4] [--set key=value ...] [--out DIR]

The benchmark's reference crop (the face box expanded 1.3x) is about half background, and samples of the embedded
default often copy the reference's background colour. The held-out photos the ceiling scores carry backgrounds of
their own, so a generated face that copies its reference's background could score a ``sim_ref`` that no real photo
of that person reaches, and the margin would count it as identity. This check draws each reference photo of the
synthetic set again with the same person, pose, expression, box and clothing and another background
(:func:`realisid.embedded.synthetic.writer.rerender_with_background`, ``--swaps`` backgrounds per reference), and
scores the same generated images (the run's benchmark cases and seeds, regenerated, setting ``trained`` as the
sweeps benchmark) and the same real photos against every swapped bank of references. Reported per face-size bin,
with 95% intervals that resample identities:

- ``leak``: sim_ref against the reference minus sim_ref against the same reference with its background swapped
  (found faces only); for generated faces and for the real held-out photos (whose backgrounds are unrelated to
  the reference's, so their leak should be ~0);
- the calibrated table (margin, ceiling, retention) with the original references and with the swapped ones;
- ``self``: 1 - cos between a held-out photo and the same photo with its background swapped: how far the
  evaluation encoder moves when only the background changes.

Only the synthetic set can be drawn again, so this check runs on the embedded default's runs. Writes table.md,
results.json and rows.csv under ``--out`` (default benchmarks/results/<date>-background-leak/).
"""
from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import sys
import time
from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from realisid.bench import bench_sampling, build_cases, held_out_references, write_csv  # noqa: E402
from realisid.data.shards import read_manifest  # noqa: E402
from realisid.data.stream import resolve_shards  # noqa: E402
from realisid.embedded.synthetic.writer import rerender_with_background  # noqa: E402
from realisid.evaluation import build_evaluator, to_uint8  # noqa: E402
from realisid.geometry import face_size, scale_bin  # noqa: E402
from realisid.images import identity_crop, to_tensor  # noqa: E402
from realisid.machine import describe_machine  # noqa: E402
from realisid.metrics.calibrated import calibrated_identity, fmt, other_similarity, scored  # noqa: E402
from realisid.pipeline import Person, RealisIDPipeline  # noqa: E402


def synthetic_manifest(urls: Sequence[str]) -> dict:
    """The manifest of the synthetic set that wrote ``urls`` (``seed``, ``image_size``, ``backgrounds``)."""
    folder = os.path.dirname(urls[0])
    names = {os.path.basename(u) for u in urls}
    for path in sorted(glob.glob(os.path.join(folder, "*.manifest.json"))):
        m = read_manifest(path)
        if names & set(m.get("shards", [])) and m.get("generator") == "realisid.embedded.synthetic":
            return m
    raise ValueError(f"no synthetic-set manifest beside {urls[0]} lists its shards: the background can only be swapped on the "
                     "embedded default's synthetic set (data.val_shards=data/synthetic/val-*.tar)")


def swapped_crop(key: str, swap: int | None, manifest: Mapping[str, Any], id_image_size: int) -> torch.Tensor:
    """The reference crop of photo ``key`` drawn again with background ``swap`` (None: its own), cut as references are cut."""
    face = rerender_with_background(key, swap, seed=int(manifest["seed"]), image_size=int(manifest["image_size"]),
                                    backgrounds=tuple(manifest["backgrounds"]))
    crop, _mask = identity_crop(face.image, list(face.bbox), id_image_size)
    return to_tensor(crop)


def score(embeddings: Sequence[np.ndarray | None], identities: Sequence[str], bank: Mapping[str, np.ndarray]) -> list[dict]:
    """sim_ref / sim_other / margin of each face (None: missed, scores 0) against ``bank``."""
    out = []
    for emb, ident in zip(embeddings, identities):
        if emb is None:
            out.append(scored(0.0, 0.0, False))
        else:
            out.append(scored(float(emb @ bank[ident]), other_similarity(emb, bank, ident), True))
    return out


def mean_over_banks(per_bank: Sequence[Sequence[dict]]) -> list[dict]:
    """Face by face, the mean of each quantity over the swapped banks."""
    return [{k: float(np.mean([rows[i][k] for rows in per_bank])) for k in per_bank[0][i]} for i in range(len(per_bank[0]))]


def clustered_mean(values: Sequence[float], identities: Sequence[str], *, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` with a 95% interval that resamples identities (faces of one person are correlated)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for v, i in zip(values, identities):
        groups[str(i)].append(float(v))
    if not groups:
        return (float("nan"),) * 3
    names = sorted(groups)
    sums = np.array([sum(groups[n]) for n in names])
    counts = np.array([len(groups[n]) for n in names], np.float64)
    pick = np.random.default_rng(seed).integers(0, len(names), size=(n_boot, len(names)))
    boot = sums[pick].sum(1) / counts[pick].sum(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return float(sums.sum() / counts.sum()), float(lo), float(hi)


def per_bin(rows: Sequence[dict], key: str, bins: Sequence[str], *, found_only: bool = True, seed: int = 0) -> dict[str, tuple]:
    out = {}
    for b in list(bins) + ["all"]:
        sel = [r for r in rows if (b == "all" or r["bin"] == b) and (r["found"] or not found_only)]
        out[b] = clustered_mean([r[key] for r in sel], [r["identity"] for r in sel], seed=seed) + (len(sel),)
    return out


def measure(run_dir: str, overrides: Sequence[str], swaps: int, log) -> dict:
    from omegaconf import OmegaConf

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir}: no config.yaml; give a finished run directory such as runs/sweeps/branches/joint")
    cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    if not os.path.isdir(os.path.join(run_dir, "export")):
        raise FileNotFoundError(f"{run_dir}: no export/ yet; the run has not finished (rerun its sweep or `make train` to finish it)")
    pipe = RealisIDPipeline.from_export(os.path.join(run_dir, "export"))
    b = cfg.bench
    manifest = synthetic_manifest(resolve_shards(cfg.data.val_shards, "data.val_shards"))
    size = int(cfg.model.id_encoder.image_size)
    examples, refs = held_out_references(cfg, pipe.backbone.vae_scale_factor)
    if examples and tuple(examples[0]["image"].shape[-2:]) != (int(manifest["image_size"]),) * 2:
        raise ValueError(f"data.resolution={cfg.data.resolution} but the synthetic set was drawn at {manifest['image_size']} px: "
                         "the swapped photos would not match the boxes; benchmark at the set's resolution")
    cases, _ = build_cases(b, refs, int(cfg.data.resolution))
    ev = build_evaluator(cfg, pipe.id_encoder.name)
    bins = list(ev.bins)
    bank = ev.reference_bank({r["identity"]: r["id_image"] for r in refs})
    banks = [ev.reference_bank({r["identity"]: swapped_crop(r["key"], k, manifest, size) for r in refs}) for k in range(swaps)]
    ref_self = [float(bank[r["identity"]] @ bk[r["identity"]]) for r in refs for bk in banks]

    # the real held-out photos of the reference identities (the ceiling's), each also drawn with a swapped background
    ref_keys = {r["key"] for r in refs}
    real_rows = []
    for ex in examples:
        if ex["identity"] not in bank or ex["key"] in ref_keys:
            continue
        box = [float(v) for v in ex["face_box"]]
        (_, emb), = ev.find_faces(to_uint8(ex["image"]), [box])
        # self: the photo drawn again with its own background and with another (no JPEG on either side)
        same, other = (np.array(rerender_with_background(ex["key"], k, seed=int(manifest["seed"]), image_size=int(manifest["image_size"]),
                                                           backgrounds=tuple(manifest["backgrounds"])).image) for k in (None, swaps))
        (_, emb_a), (_, emb_b) = ev.find_faces(same, [box])[0], ev.find_faces(other, [box])[0]
        s = face_size(box, ex["image"].shape[-1], ex["image"].shape[-2])
        real_rows.append({"identity": ex["identity"], "key": ex["key"], "face_size": s, "bin": scale_bin(s, ev.bins),
                          "emb": emb, "self": 1.0 - float(emb_a @ emb_b) if emb_a is not None and emb_b is not None else float("nan")})

    # the benchmark's cases, generated as the sweeps benchmark them (setting "trained"), each face found once
    t0 = time.perf_counter()
    sample_kwargs = bench_sampling(cfg)
    gen_faces = []
    for case in cases:
        people = [Person(box=bx, id_image=i, id_mask=m) for bx, i, m in zip(case.boxes, case.id_images, case.id_masks)]
        img = pipe(case.prompt, people, seed=case.seed, output_type="pt", **sample_kwargs).images[0].cpu()
        for (_, emb), box, ident in zip(ev.find_faces(to_uint8(img), case.boxes), case.boxes, case.identities):
            s = face_size(box, img.shape[-1], img.shape[-2])
            gen_faces.append({"identity": ident, "face_size": s, "bin": scale_bin(s, ev.bins), "emb": emb})
    log(f"  {len(cases)} cases generated in {time.perf_counter() - t0:.0f} s")

    out: dict[str, Any] = {"run": run_dir, "cases": len(cases), "swaps": swaps, "real_photos": len(real_rows),
                           "reference_self_cos": [float(np.mean(ref_self)), float(np.min(ref_self))]}
    tables = {}
    for name, faces in (("generated", gen_faces), ("real", real_rows)):
        embs, idents = [f["emb"] for f in faces], [f["identity"] for f in faces]
        orig = score(embs, idents, bank)
        swap = mean_over_banks([score(embs, idents, bk) for bk in banks])
        rows = [{"set": name, "identity": f["identity"], "bin": f["bin"], "face_size": round(f["face_size"], 4),
                 "found": bool(o["found"]), "sim_ref": o["sim_ref"], "sim_ref_swapped": s["sim_ref"], "leak": o["sim_ref"] - s["sim_ref"],
                 "margin": o["margin"], "margin_swapped": s["margin"], "self": f.get("self", float("nan"))}
                for f, o, s in zip(faces, orig, swap)]
        tables[name] = {"rows": rows, "orig": [{**o, "identity": f["identity"], "bin": f["bin"]} for f, o in zip(faces, orig)],
                        "swap": [{**w, "identity": f["identity"], "bin": f["bin"]} for f, w in zip(faces, swap)]}
    for which in ("orig", "swap"):
        cal = calibrated_identity(tables["generated"][which], tables["real"][which], bins, n_boot=int(b.bootstrap), seed=int(b.seed))
        out[f"calibrated_{which}"] = cal
    out["leak_generated"] = per_bin(tables["generated"]["rows"], "leak", bins)
    out["leak_real"] = per_bin(tables["real"]["rows"], "leak", bins)
    out["self_real"] = per_bin([r for r in tables["real"]["rows"] if r["self"] == r["self"]], "self", bins)
    out["bins"] = bins
    out["rows"] = tables["generated"]["rows"] + tables["real"]["rows"]
    return out


def markdown(results: Sequence[dict], header: Mapping[str, str]) -> str:
    lines = ["# Background leak: the identity metric with every reference's background swapped", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()] + [""]
    lines += ["leak = sim_ref against the reference - sim_ref against the same reference photo drawn again with another background "
              "(same person, pose, box; mean over the swaps), found faces only, 95% intervals resampling identities. Real photos "
              "have backgrounds of their own, so their leak measures nothing but chance; a generated face that copies its "
              "reference's background shows it as a positive leak. self = 1 - cos(photo, same photo with another background).", ""]
    for res in results:
        bins = res["bins"]
        lines += [f"## {res['run']}", "",
                  f"{res['cases']} cases, {res['real_photos']} real photos, {res['swaps']} swapped backgrounds per reference; "
                  f"cos(reference, reference with another background): mean {res['reference_self_cos'][0]:.3f}, lowest "
                  f"{res['reference_self_cos'][1]:.3f}", "",
                  "| bin | leak, generated (faces) | leak, real photos (faces) | self, real photos | margin | margin, swapped | "
                  "ceiling | ceiling, swapped | retention | retention, swapped |", "|---|---|---|---|---|---|---|---|---|---|"]
        co, cs = res["calibrated_orig"], res["calibrated_swap"]
        for bn in list(bins) + ["all"]:
            if bn not in co:
                continue
            lg, lr, sr = res["leak_generated"][bn], res["leak_real"][bn], res["self_real"][bn]
            lines.append(f"| {bn} | {fmt(lg[:3])} ({lg[3]}) | {fmt(lr[:3])} ({lr[3]}) | {fmt(sr[:3])} | {fmt(co[bn]['margin'])} | "
                         f"{fmt(cs[bn]['margin'])} | {fmt(co[bn]['ceiling'])} | {fmt(cs[bn]['ceiling'])} | "
                         f"{fmt(co[bn]['retention'], 2)} | {fmt(cs[bn]['retention'], 2)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="finished run directories of the embedded default (with config.yaml and export/)")
    ap.add_argument("--swaps", type=int, default=4, help="backgrounds drawn per reference (default 4)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the run's config (e.g. faces.det_thresh=0.5)")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", f"{dt.date.today().isoformat()}-background-leak"))
    args = ap.parse_args(argv)
    if args.swaps < 1:
        ap.error(f"--swaps {args.swaps}: give 1 or more")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    results = []
    for run in args.runs:
        print(f"{run}: measuring", flush=True)
        results.append(measure(run, args.set, args.swaps, lambda m: print(m, flush=True)))
    os.makedirs(args.out, exist_ok=True)
    header = {"date": dt.date.today().isoformat(), "machine": describe_machine(host=False),
              "command": "python benchmarks/background_leak.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "evaluation": "the runs' own (config.yaml), overrides: " + (", ".join(args.set) or "none"),
              "wall time": f"{time.perf_counter() - t0:.0f} s"}
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(markdown(results, header))
    write_csv(os.path.join(args.out, "rows.csv"), [{"run": r["run"], **row} for r in results for row in r["rows"]])
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"header": header, "results": [{k: v for k, v in r.items() if k != "rows"} for r in results]}, f, indent=1)
    print(open(os.path.join(args.out, "table.md")).read())
    return 0


if __name__ == "__main__":
    from realisid.cli import quiet_progress_bars

    quiet_progress_bars()  # no bar lines when piped to a log
    sys.exit(main())
