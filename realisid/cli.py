"""``python -m realisid COMMAND`` (also the ``realisid`` console script)."""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time

log = logging.getLogger("realisid")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("PIL", "matplotlib", "urllib3", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(args) -> int:
    from realisid.config import load_config
    from realisid.train import train

    if args.resume:
        from realisid.train import resume_config

        cfg = resume_config(args.resume, args.overrides)
        res = train(cfg, resume=args.resume)
    else:
        res = train(load_config(args.exp, args.overrides))
    if res.get("interrupted"):
        from realisid.interrupts import INTERRUPTED_EXIT

        sys.stdout.write(f"{res['interrupted']}\ncheckpoint    : {res['checkpoint']}\n")
        return INTERRUPTED_EXIT
    lines = [
        f"run directory : {res['run_dir']}",
        f"config        : {os.path.join(res['run_dir'], 'config.yaml')}",
        f"tensorboard   : tensorboard --logdir {res['tensorboard']}",
        f"checkpoint    : {res['checkpoint']}",
        f"exported      : {res.get('export')}  (ControlNetModel.from_pretrained(<export>/local) loads a branch)",
        f"val samples   : {res['samples']}",
    ]
    if "loss_first_fifth" in res:
        lines.append(f"train loss    : first fifth of steps {res['loss_first_fifth']:.4f} -> last fifth {res['loss_last_fifth']:.4f} "
                     f"({res['steps']} steps)")
    lines.append(f"wall time     : {res['seconds']:.0f} s")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


SAMPLE_PHOTOS = {"astronaut.png": ("skimage", None), "t1.jpg": ("insightface", "data/images/t1.jpg"),
                 "tom_hanks.png": ("insightface", "data/images/Tom_Hanks_54745.png")}


def export_sample_photos(out_dir: str) -> list[str]:
    """Real photos that ship inside installed packages (scikit-image's astronaut, insightface's six-person t1.jpg and
    Tom Hanks) copied to ``out_dir``, for trying the face analyzers offline."""
    import importlib.util

    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, (package, rel) in SAMPLE_PHOTOS.items():
        dest = os.path.join(out_dir, name)
        if package == "skimage":
            import skimage.data

            Image.fromarray(skimage.data.astronaut()).save(dest)
        else:
            spec = importlib.util.find_spec(package)
            src = os.path.join(list(spec.submodule_search_locations)[0], rel) if spec and spec.submodule_search_locations else ""
            if not os.path.exists(src):
                raise FileNotFoundError(f"{name}: {package} is not installed with its data files ({src or package}); run `make setup`")
            Image.open(src).convert("RGB").save(dest)
        paths.append(dest)
    return paths


def cmd_faces(args) -> int:
    """Detect the faces of each photo and, for two or more, compare the largest face of each with the first's."""
    import numpy as np

    from realisid.data.shards import decode_image
    from realisid.faces import analyzer_config, load_face_analyzer

    if args.sample_photos:
        for path in export_sample_photos(args.sample_photos):
            sys.stdout.write(f"{path}\n")
        if not args.photos:
            return 0
    if not args.photos:
        raise ValueError("give one or more photos (or --sample-photos DIR to get real ones from installed packages)")
    cfg = analyzer_config(None, args.analyzer, args.model_dir)
    if cfg is None:
        raise ValueError("no face analyzer is installed; run `make setup` (it installs yunet-sface and dlib)")
    analyzer = load_face_analyzer(cfg)
    sys.stdout.write(f"analyzer: {analyzer.name} (embedding {analyzer.embedding_dim}-D"
                     + (f", same person above cosine {analyzer.match_threshold:g})\n" if hasattr(analyzer, "match_threshold") else ")\n"))
    main_faces = []
    for path in args.photos:
        with open(path, "rb") as f:
            img = np.asarray(decode_image(f.read(), path))
        faces = analyzer.detect(img)
        sys.stdout.write(f"{path}: {img.shape[1]}x{img.shape[0]}, {len(faces)} face(s)\n")
        for i, face in enumerate(faces):
            box = ",".join(f"{v:.0f}" for v in face.bbox)
            kps = " ".join(f"({x:.0f},{y:.0f})" for x, y in face.kps)
            extra = f", {len(face.landmarks)} dense contours" if face.landmarks else ""
            sys.stdout.write(f"  face {i + 1}: box {box}, score {face.det_score:.2f}, key points {kps}{extra}\n")
        largest = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])) if faces else None
        main_faces.append(None if largest is None else analyzer.embed(img, largest.kps))
    if len(args.photos) > 1 and main_faces[0] is not None:
        thr = getattr(analyzer, "match_threshold", None)
        for path, emb in zip(args.photos[1:], main_faces[1:]):
            if emb is None:
                continue
            cos = float(np.dot(main_faces[0], emb))
            verdict = "" if thr is None else (" -> same person" if cos > thr else " -> different people")
            sys.stdout.write(f"cosine({args.photos[0]}, {path}) = {cos:.3f}{verdict}\n")
    return 0


def cmd_prepare(args) -> int:
    from realisid.config import load_config
    from realisid.prepare import prepare_embedded_default

    cfg = load_config(args.exp, args.overrides)
    out = prepare_embedded_default(cfg)
    for k, v in out.items():
        sys.stdout.write(f"{k}: {v}\n")
    return 0


def cmd_pretrain(args) -> int:
    from realisid.config import load_config
    from realisid.embedded.pretrain import pretrain

    cfg = load_config("base", args.overrides)
    rec = pretrain(cfg)
    check = rec["base_check"]
    det = rec["stages"]["synthetic-face-analyzer"]["accuracy_held_out"]["all"]
    sys.stdout.write(f"stand-in models written to {cfg.pretrain.out_dir} ({rec['megabytes']} MB) in {rec['seconds_total_this_run']:.0f} s\n"
                     f"base check    : the analyzer found a face in {check['found']} of {check['samples']} samples from held-out captions\n"
                     f"face analyzer : held-out recall {det['recall']:.3f}, box IoU {det['box_iou']:.3f}, landmark error {det['landmark_nme']:.3f}\n")
    return 0


def cmd_check_embedded(args) -> int:
    from realisid.config import load_config
    from realisid.embedded.check import check_embedded

    cfg = load_config("base", args.overrides)
    res = check_embedded(cfg, args.out)
    sys.stdout.write(open(res["table"]).read() + f"\nwritten: {args.out}\n")
    return 0


def cmd_generate(args) -> int:
    import json

    import torch
    from omegaconf import OmegaConf

    from realisid.geometry import parse_box
    from realisid.models.backbone import vae_scale_factor_of
    from realisid.pipeline import RealisIDPipeline, check_boxes, reference_person

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
                "id_delay": float(s.id_delay if args.id_delay is None else args.id_delay)}
    with torch.no_grad():
        out = pipe(args.prompt, people, negative_prompt=args.negative_prompt, num_inference_steps=settings["steps"],
                   scheduler=settings["scheduler"], guidance_text=settings["guidance_text"], guidance_id=settings["guidance_id"],
                   id_delay=settings["id_delay"], seed=args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    out.images[0].save(args.out)
    record = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": args.seed, "run": args.run, **settings,
              "resolution": R, "device": str(pipe.device), "frozen_dtype": str(pipe.backbone.unet.dtype).removeprefix("torch."),
              "identity_encoder": pipe.id_encoder.name, "backbone": pipe.backbone.name,
              "branches": [k for k, b in (("local", pipe.local_branch), ("global", pipe.global_branch)) if b is not None],
              "people": [{**r, **m} for r, m in zip(refs, out.people)]}
    if args.panel:
        record["panel"] = write_panel([r["reference"] for r in refs], out.images[0], os.path.splitext(args.out)[0] + "_panel.png")
    meta_path = os.path.splitext(args.out)[0] + ".json"
    with open(meta_path, "w") as f:
        json.dump(record, f, indent=2)
    sys.stdout.write(f"wrote {args.out} and {meta_path} ({len(people)} people, identity encoder {pipe.id_encoder.name})\n")
    return 0


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

    from realisid.bench import newest_run, run_bench
    from realisid.config import load_config

    cfg = load_config(args.exp, args.overrides)
    run = args.run or newest_run(cfg.experiment.runs_dir, cfg.experiment.name)
    if run is None:
        if not cfg.prepare.enabled:
            raise FileNotFoundError(f"no finished run of '{args.exp}' under {cfg.experiment.runs_dir}/; give --run RUN_DIR")
        from realisid.train import train

        log.info("no finished %s run yet: training one on the embedded default first", args.exp)
        run = train(cfg)["run_dir"]
    out = args.out or os.path.join("benchmarks", "results", f"{_dt.date.today().isoformat()}-{cfg.experiment.name}")
    res = run_bench(cfg, run, out, device=args.device, dtype=args.dtype)
    sys.stdout.write(open(os.path.join(out, "table.md")).read())
    sys.stdout.write(f"\nwritten: {out}/ (results.csv, summary.csv, bins.csv, table.md, {', '.join(os.path.basename(p) for p in res['plots'])})\n")
    return 0


def cmd_sweep(args) -> int:
    from realisid.sweep import run_sweep

    from realisid.interrupts import INTERRUPTED_EXIT

    try:
        res = run_sweep(args.sweep, args.overrides)
    except KeyboardInterrupt as stop:  # a run saved its last.ckpt; finished runs keep their DONE marker
        sys.stderr.write(f"realisid sweep: interrupted: {stop or 'Ctrl-C'}\n")
        return INTERRUPTED_EXIT
    sys.stdout.write(open(res["table"]).read() + f"\nwritten: {res['out_dir']}\n")
    return 0


def cmd_precompute(args) -> int:
    from realisid.config import load_config
    from realisid.data.precompute import precompute
    from realisid.prepare import prepare_embedded_default

    cfg = load_config(args.exp, args.overrides)
    prepare_embedded_default(cfg)  # the embedded default's shards and tiny base must exist first
    from realisid.interrupts import INTERRUPTED_EXIT, terminate_as_interrupt

    out = args.out or os.path.join("data", "cache", "precomputed", str(cfg.experiment.name))
    try:
        with terminate_as_interrupt():
            res = precompute(cfg, out, batch_size=args.batch_size, dtype=args.dtype)
    except KeyboardInterrupt:
        sys.stderr.write(f"realisid precompute: interrupted; finished shards in {out} are kept, run the same command again to continue\n")
        return INTERRUPTED_EXIT
    sys.stdout.write(f"precomputed {res['written']} samples in {res['shards']} shards ({res['skipped_shards']} already done, "
                     f"{res['rejected']} unusable) in {res['seconds']:.0f} s\n"
                     f"train from it: make train EXP={args.exp} ARGS=\"data.precomputed={out}\"\n")
    return 0


def faces_config(model_dir: str | None, exp: str | None, analyzer: str | None = None) -> dict:
    """The face-analyzer config: ``--exp``'s ``faces`` section, with ``--analyzer`` / ``--model-dir`` on top; with
    none of them, the real analyzer that ships in packages (yunet-sface, else dlib)."""
    from realisid.faces import analyzer_config

    faces = None
    if exp:
        from omegaconf import OmegaConf

        from realisid.config import load_config

        faces = OmegaConf.to_container(load_config(exp).faces, resolve=True)
    cfg = analyzer_config(faces, analyzer, model_dir)
    if cfg is None:
        raise ValueError("build-shards needs a face analyzer and none is installed: run `make setup` (it installs yunet-sface and "
                         "dlib), or pass --model-dir with an insightface model folder such as ~/.insightface/models/buffalo_l")
    if cfg.get("kind") != "synthetic":
        cfg.pop("recognizer", None)  # the synthetic analyzer's identity encoder; the others embed faces themselves
    return cfg


def cmd_build_shards(args) -> int:
    from realisid.data.build import build_shards, format_summary
    from realisid.faces import default_min_score, load_face_analyzer
    from realisid.interrupts import INTERRUPTED_EXIT, terminate_as_interrupt

    cfg = faces_config(args.model_dir, args.exp, args.analyzer)
    name = args.name or os.path.basename(os.path.normpath(args.out))
    analyzer = load_face_analyzer(cfg)
    min_score = default_min_score(cfg["kind"]) if args.min_score is None else args.min_score
    sys.stderr.write(f"realisid build-shards: face analyzer {analyzer.name}, min score {min_score:g}\n")
    t0 = time.time()
    try:
        with terminate_as_interrupt():  # SIGTERM (also to the whole group) stops as Ctrl-C does: finished shards are kept
            manifest = build_shards(args.src, args.out, name, analyzer, workers=args.workers, shard_size=args.shard_size,
                                    min_face=args.min_face, min_score=min_score, max_side=args.max_side,
                                    analyzer_factory=functools.partial(load_face_analyzer, cfg),
                                    progress=not args.no_progress and sys.stderr.isatty())
    except KeyboardInterrupt:
        sys.stderr.write(f"realisid build-shards: interrupted; finished shards in {args.out} are kept, run the same command "
                         "again to resume\n")
        # every shard and the journal are closed by now. The killed pool's manager thread can block the interpreter's
        # exit (concurrent.futures joins it at exit, and it may wait on a pipe to a dead worker): leave at once
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED_EXIT)
    sys.stdout.write(format_summary(manifest, args.out, name, time.time() - t0))
    return 0


def add_build_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``build-shards`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "build-shards", help="turn a folder of photos or webdataset/img2dataset tars into RealisID face shards",
        description="Keeps single-person photos, writes NAME-000000.tar... with face box, keypoints, identity embedding and a "
                    "reference face from another photo of the same person (with its embedding and keypoints), plus "
                    "NAME.manifest.json. Rerun the same command to resume an interrupted build.")
    p.add_argument("--src", required=True, help="folder of photos (one sub-folder per identity) or tars: a .tar, a glob, "
                                                "a brace pattern or a folder of .tar")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", default=None, help="shard name prefix (default: the --out folder's name)")
    p.add_argument("--analyzer", default=None, help="face analyzer: yunet-sface (default: ships in packages), dlib, insightface "
                                                    "(with --model-dir), or an experiment's (--exp)")
    p.add_argument("--model-dir", default=None, help="insightface model folder (e.g. ~/.insightface/models/buffalo_l): selects "
                                                     "insightface unless --analyzer says otherwise")
    p.add_argument("--exp", default=None, help="experiment whose faces section gives model_dir, det_size, det_thresh")
    p.add_argument("--workers", type=int, default=2, help="analysis processes (0: in this process)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--min-face", type=float, default=32.0, help="smallest face box long side kept, in pixels")
    p.add_argument("--min-score", type=float, default=None, help="lowest detection score kept (default: 0.5; 0 for dlib, "
                                                                  "whose score is not a probability)")
    p.add_argument("--max-side", type=int, default=2048, help="larger photos are downscaled to this long side")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_build_shards)
    return p


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="where sampling runs: cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="the frozen parts' precision (default: fp16 on a GPU, fp32 on a CPU; the trained branches stay fp32 under autocast)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="realisid", description="RealisID: identity customization with local and global ControlNet branches.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train an experiment (experiments/<EXP>.yaml) with key=value overrides")
    t.add_argument("exp", nargs="?", default="local_branch", help="experiment name under experiments/ or a YAML path")
    t.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. trainer.max_steps=50 data.batch_size=2")
    t.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue RUN_DIR from checkpoints/last.ckpt (same step, optimizer, scheduler and data position)")
    t.set_defaults(func=cmd_train)

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
    g.add_argument("--scheduler", choices=["ddim", "dpm", "euler"], default=None)
    g.add_argument("--guidance-text", type=float, default=None)
    g.add_argument("--guidance-id", type=float, default=None)
    g.add_argument("--id-delay", type=float, default=None, help="fraction of steps before identity conditioning starts")
    g.add_argument("--analyzer", default=None, help="face analyzer for the references: yunet-sface, dlib, insightface (with "
                                                    "--model-dir), synthetic, or none (each photo is the face crop); "
                                                    "default: the run's faces.*, else yunet-sface")
    g.add_argument("--model-dir", default=None, help="the analyzer's model folder (insightface)")
    g.add_argument("--largest-face", action="store_true", help="take the largest face of a reference with several people")
    _device_args(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="scale benchmark: identity fidelity against face size and people count (benchmarks/results/)")
    b.add_argument("exp", nargs="?", default="joint", help="experiment whose bench/evaluation settings to use (default: joint)")
    b.add_argument("overrides", nargs="*")
    b.add_argument("--run", default=None, help="run directory to benchmark (default: the newest finished run of EXP; trains one if none)")
    b.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<date>-<exp>)")
    _device_args(b)
    b.set_defaults(func=cmd_bench)

    sw = sub.add_parser("sweep", help="ablation sweep from experiments/sweeps/<SWEEP>.yaml: train + bench each run, one combined table")
    sw.add_argument("sweep", help="sweep name under experiments/sweeps/ or a YAML path")
    sw.add_argument("overrides", nargs="*", help="overrides applied to every run")
    sw.set_defaults(func=cmd_sweep)

    add_build_parser(sub)

    pc = sub.add_parser("precompute", help="store VAE latents, text embeddings and identity features beside the train shards (train with data.precomputed=OUT)")
    pc.add_argument("exp", nargs="?", default="local_branch")
    pc.add_argument("overrides", nargs="*")
    pc.add_argument("--out", default=None, help="output folder (default: data/cache/precomputed/<exp>)")
    pc.add_argument("--batch-size", type=int, default=32, help="samples per VAE / text-encoder batch")
    pc.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="stored precision (fp32 reproduces on-the-fly encoding exactly)")
    pc.set_defaults(func=cmd_precompute)

    pt = sub.add_parser("pretrain", help="train the embedded default's stand-in models (base, encoders, face analyzer) into the package")
    pt.add_argument("overrides", nargs="*", help="e.g. pretrain.unet.steps=2000 pretrain.out_dir=/tmp/assets")
    pt.set_defaults(func=cmd_pretrain)

    ce = sub.add_parser("check-embedded", help="how well the shipped stand-ins work: base samples, analyzer accuracy, encoder verification")
    ce.add_argument("overrides", nargs="*")
    ce.add_argument("--out", default=os.path.join("benchmarks", "results", "embedded"), help="output folder")
    ce.set_defaults(func=cmd_check_embedded)

    fa = sub.add_parser("faces", help="detect faces in photos and compare identities with a real analyzer (offline)")
    fa.add_argument("photos", nargs="*", help="photos; with two or more, the largest face of each is compared with the first's")
    fa.add_argument("--analyzer", default=None, help="yunet-sface (default), dlib, insightface (with --model-dir)")
    fa.add_argument("--model-dir", default=None, help="an insightface model folder")
    fa.add_argument("--sample-photos", metavar="DIR", default=None,
                    help="first write real photos that ship in installed packages to DIR (astronaut, t1 group photo, Tom Hanks)")
    fa.set_defaults(func=cmd_faces)

    pr = sub.add_parser("prepare", help="draw the embedded default's synthetic shards and check its stand-in models")
    pr.add_argument("exp", nargs="?", default="local_branch")
    pr.add_argument("overrides", nargs="*")
    pr.set_defaults(func=cmd_prepare)
    return p


def box_values_as_options(argv: list[str]) -> list[str]:
    """``--box -5,-5,20,20`` as ``--box=-5,-5,20,20``: argparse would take a value with a leading minus for an
    option and fail with "expected one argument" instead of letting the box check say what is wrong."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--box" and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1][1:2].isdigit():
            out.append(f"--box={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    from realisid.config import ConfigError

    args = build_parser().parse_args(box_values_as_options(list(sys.argv[1:] if argv is None else argv)))
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, FloatingPointError, RuntimeError) as err:
        if args.verbose:
            raise
        sys.stderr.write(f"realisid {args.command}: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"realisid {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
