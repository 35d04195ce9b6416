"""``realisid generate`` and ``realisid bench``: sampling from a trained run, one image or a whole benchmark."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from realisid.models.samplers import SAMPLERS

log = logging.getLogger("realisid")


def cmd_generate(args) -> int:
    import json

    import torch
    from omegaconf import OmegaConf

    from realisid.geometry import bins_from_config, parse_box
    from realisid.models.backbone import vae_scale_factor_of
    from realisid.pipeline import (RealisIDPipeline, check_boxes, check_guidance_id_by_bin, check_guidance_rescale,
                                   check_id_guidance_until, guidance_id_by_bin, parse_by_bin, reference_person)

    if len(args.ref) != len(args.box):
        raise ValueError(f"give one --box per --ref: got {len(args.ref)} references and {len(args.box)} boxes")
    export = os.path.join(args.run, "export")
    if not os.path.isdir(export):
        raise FileNotFoundError(f"--run {args.run}: no export/ folder; give a finished run directory such as runs/joint/<timestamp>")
    cfg = OmegaConf.load(os.path.join(export, "config.yaml"))
    s = cfg.sampling
    boxes = [parse_box(b) for b in args.box]
    R = int(cfg.data.resolution)
    check_boxes(boxes, R, min_box=float(s.min_box), max_overlap=float(s.max_overlap), vae_scale_factor=vae_scale_factor_of(cfg.model))
    rescale = check_guidance_rescale(float(s.get("guidance_rescale", 0.0) if args.guidance_rescale is None else args.guidance_rescale))
    until = check_id_guidance_until(float(s.get("id_guidance_until", 1.0) if args.id_guidance_until is None else args.id_guidance_until))
    by_bin = check_guidance_id_by_bin(guidance_id_by_bin(s) if args.guidance_id_by_bin is None
                                      else parse_by_bin(args.guidance_id_by_bin), bins_from_config(cfg.get("bins")))
    init, strength = load_init_image(args.init_image, args.strength, R)
    from realisid.faces import analyzer_config, load_face_analyzer

    # the run's face analyzer (faces.*), or --analyzer; with neither usable, the real one that ships in packages
    # (--analyzer none: no detection, each reference photo is taken as the face crop)
    faces = None if args.analyzer == "none" else analyzer_config(OmegaConf.to_container(cfg.faces, resolve=True), args.analyzer,
                                                                 args.model_dir)
    analyzer = load_face_analyzer(faces) if faces is not None else None
    pipe = RealisIDPipeline.from_export(export, device=args.device, dtype=args.dtype)
    people, refs = [], []
    for ref, box in zip(args.ref, boxes):
        person, info = reference_person(ref, box, int(cfg.model.id_encoder.image_size), analyzer, largest=args.largest_face)
        people.append(person)
        refs.append(info)
    settings = {"steps": args.steps or int(s.steps), "scheduler": args.scheduler or s.scheduler,
                "guidance_text": float(s.guidance_text if args.guidance_text is None else args.guidance_text),
                "guidance_id": float(s.guidance_id if args.guidance_id is None else args.guidance_id),
                "id_delay": float(s.id_delay if args.id_delay is None else args.id_delay),
                "guidance_rescale": rescale, "id_guidance_until": until, "guidance_id_by_bin": by_bin}
    with torch.no_grad():
        out = pipe(args.prompt, people, negative_prompt=args.negative_prompt, num_inference_steps=settings["steps"],
                   scheduler=settings["scheduler"], guidance_text=settings["guidance_text"], guidance_id=settings["guidance_id"],
                   id_delay=settings["id_delay"], guidance_rescale=settings["guidance_rescale"],
                   id_guidance_until=settings["id_guidance_until"], guidance_id_by_bin=by_bin, seed=args.seed,
                   image=init, strength=strength)
    if init is not None:
        settings.update(init_image=args.init_image, strength=strength)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    out.images[0].save(args.out)
    record = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": args.seed, "run": args.run, **settings,
              "resolution": R, "device": str(pipe.device), "frozen_dtype": str(pipe.backbone.unet.dtype).removeprefix("torch."),
              "identity_encoder": pipe.id_encoder.name, "backbone": pipe.backbone.name, "unet_trained_by_run": pipe.backbone.unet_trained_by,
              "branches": [k for k, b in (("local", pipe.local_branch), ("global", pipe.global_branch)) if b is not None],
              "people": [{**r, **m} for r, m in zip(refs, out.people)]}
    if args.panel:
        record["panel"] = write_panel([r["reference"] for r in refs], out.images[0], os.path.splitext(args.out)[0] + "_panel.png")
    meta_path = os.path.splitext(args.out)[0] + ".json"
    with open(meta_path, "w") as f:
        json.dump(record, f, indent=2)
    sys.stdout.write(f"wrote {args.out} and {meta_path} ({len(people)} people, identity encoder {pipe.id_encoder.name})\n")
    return 0


def load_init_image(path: str | None, strength: float | None, resolution: int):
    """``--init-image`` / ``--strength`` as the pipeline's ``image`` ((3, R, R) in [-1, 1]) and ``strength``, checked
    before any model loads: a missing, unreadable or non-square photo and a strength outside [0, 1] or without a
    photo are refused naming the value."""
    from realisid.pipeline import check_init_image

    if path is None:
        if strength is not None:
            raise ValueError(f"--strength {strength} needs --init-image PHOTO (the photo to start from)")
        return None, 1.0
    strength = 0.75 if strength is None else float(strength)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init-image {path}: no such file; give a square photo to start from")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"--init-image {path}: not a readable image ({exc}); give a PNG or JPEG photo") from None
    if im.width != im.height:
        raise ValueError(f"--init-image {path} is {im.width}x{im.height}: give a square photo (the boxes are in the square "
                         f"{resolution} px output); crop it first")
    if im.width != resolution:
        im = im.resize((resolution, resolution), Image.BICUBIC)
    from realisid.images import to_tensor

    image = to_tensor(im)
    check_init_image(image, strength, resolution)
    return image, strength


def write_panel(references: list[str], sample, path: str) -> str:
    """References (each scaled to the sample's height) then the sample, side by side, as one PNG."""
    from PIL import Image

    h = sample.height
    tiles = [Image.open(r).convert("RGB") for r in references]
    tiles = [t.resize((max(1, round(t.width * h / t.height)), h), Image.BICUBIC) for t in tiles] + [sample]
    canvas = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), h), (255, 255, 255))
    x = 0
    for t in tiles:
        canvas.paste(t, (x, 0))
        x += t.width + 4
    canvas.save(path)
    return path


def cmd_bench(args) -> int:
    import datetime as _dt

    from realisid.bench import bench_settings, newest_run, run_bench
    from realisid.config import load_config

    cfg = load_config(args.exp, args.overrides)
    settings = bench_settings(cfg.bench.settings, args.only) if args.only else None  # a bad name fails before any training
    run = args.run or newest_run(cfg.experiment.runs_dir, cfg.experiment.name)
    if run is None:
        if not cfg.prepare.enabled:
            raise FileNotFoundError(f"no finished run of '{args.exp}' under {cfg.experiment.runs_dir}/; give --run RUN_DIR")
        from realisid.train import train

        log.info("no finished %s run yet: training one on the embedded default first", args.exp)
        run = train(cfg)["run_dir"]
    out = args.out or os.path.join("benchmarks", "results", f"{_dt.date.today().isoformat()}-{cfg.experiment.name}")
    res = run_bench(cfg, run, out, settings=settings, device=args.device, dtype=args.dtype)
    sys.stdout.write(open(os.path.join(out, "table.md")).read())
    sys.stdout.write(f"\nwritten: {out}/ (results.csv, summary.csv, bins.csv, table.md, {', '.join(os.path.basename(p) for p in res['plots'])})\n")
    return 0


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="where sampling runs: cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="the frozen parts' precision (default: fp16 on a GPU, fp32 on a CPU; the trained branches stay fp32 under autocast)")


def add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="sample an image of one or several people from a trained run",
                       description="Each --ref (a photo; its face comes from a sidecar .json, else the face analyzer: exactly one "
                                   "person, or the largest with --largest-face; --analyzer none takes the whole photo as the face "
                                   "crop) is placed at the matching --box x0,y0,x1,y1 in output pixels.")
    g.add_argument("--run", required=True, help="run directory with export/ (runs/<exp>/<timestamp>)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--ref", action="append", default=[], required=True, help="reference photo, once per person")
    g.add_argument("--box", action="append", default=[], required=True, help="target face box x0,y0,x1,y1, once per person")
    g.add_argument("--out", default="out.png")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--panel", action="store_true", help="also write OUT_panel.png: the references beside the sample")
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--scheduler", choices=list(SAMPLERS), default=None,
                   help="sampler (default: the config's sampling.scheduler); ddpm, euler_a and dpm_sde add noise per step")
    g.add_argument("--guidance-text", type=float, default=None)
    g.add_argument("--guidance-id", type=float, default=None)
    g.add_argument("--guidance-rescale", type=float, default=None, help="0..1: pull the guided prediction's spread back to the "
                   "conditioned one's (default: sampling.guidance_rescale)")
    g.add_argument("--id-delay", type=float, default=None, help="fraction of steps before identity conditioning starts")
    g.add_argument("--id-guidance-until", type=float, default=None, help="0..1: --guidance-id applies on this first fraction of "
                   "steps, then 1 (default: sampling.id_guidance_until)")
    g.add_argument("--guidance-id-by-bin", default=None, help="BIN=SCALE,...: --guidance-id per face-size bin, e.g. tiny=5,large=3, "
                   "each person's inside its crop box (default: sampling.guidance_id_by_bin; \"\" turns it off)")
    g.add_argument("--analyzer", default=None, help="face analyzer for the references: yunet-sface, dlib, insightface (with "
                                                    "--model-dir), synthetic, or none (each photo is the face crop); "
                                                    "default: the run's faces.*, else yunet-sface")
    g.add_argument("--model-dir", default=None, help="the analyzer's model folder (insightface)")
    g.add_argument("--largest-face", action="store_true", help="take the largest face of a reference with several people")
    g.add_argument("--init-image", default=None, help="img2img: start from this square photo (resized to the run's resolution) "
                                                     "noised by --strength instead of from noise")
    g.add_argument("--strength", type=float, default=None, help="0..1 with --init-image: the fraction of the steps that run "
                                                               "(1 = from noise, 0 = the photo through the VAE; default 0.75)")
    _device_args(g)
    g.set_defaults(func=cmd_generate)


def add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="scale benchmark: identity fidelity against face size and people count (benchmarks/results/)")
    b.add_argument("exp", nargs="?", default="joint", help="experiment whose bench/evaluation settings to use (default: joint)")
    b.add_argument("overrides", nargs="*")
    b.add_argument("--run", default=None, help="run directory to benchmark (default: the newest finished run of EXP; trains one if none)")
    b.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<date>-<exp>)")
    b.add_argument("--only", default=None, metavar="SETTINGS",
                   help="comma-separated names from bench.settings to run (default: all that fit the run), e.g. --only joint")
    _device_args(b)
    b.set_defaults(func=cmd_bench)
