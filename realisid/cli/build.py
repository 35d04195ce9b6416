"""``realisid build-shards``: turn photos or image tars into face shards (the builder is realisid/data/build/)."""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time


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
