"""``realisid prepare``, ``realisid pretrain`` and ``realisid check-embedded``: the embedded default's shards and
stand-in models."""
from __future__ import annotations

import os
import sys


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


def add_pretrain_parser(sub) -> None:
    pt = sub.add_parser("pretrain", help="train the embedded default's stand-in models (base, encoders, face analyzer) into the package")
    pt.add_argument("overrides", nargs="*", help="e.g. pretrain.unet.steps=2000 pretrain.out_dir=/tmp/assets")
    pt.set_defaults(func=cmd_pretrain)


def add_check_embedded_parser(sub) -> None:
    ce = sub.add_parser("check-embedded", help="how well the shipped stand-ins work: base samples, analyzer accuracy, encoder verification")
    ce.add_argument("overrides", nargs="*")
    ce.add_argument("--out", default=os.path.join("benchmarks", "results", "embedded"), help="output folder")
    ce.set_defaults(func=cmd_check_embedded)


def add_prepare_parser(sub) -> None:
    pr = sub.add_parser("prepare", help="draw the embedded default's synthetic shards and check its stand-in models")
    pr.add_argument("exp", nargs="?", default="local_branch")
    pr.add_argument("overrides", nargs="*")
    pr.set_defaults(func=cmd_prepare)
