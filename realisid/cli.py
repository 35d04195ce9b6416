"""``python -m realisid COMMAND`` (also the ``realisid`` console script)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("realisid")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("PIL", "matplotlib", "urllib3", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(args) -> int:
    from realisid.config import load_config
    from realisid.train import train

    cfg = load_config(args.exp, args.overrides)
    res = train(cfg)
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


def cmd_prepare(args) -> int:
    from realisid.config import load_config
    from realisid.prepare import prepare_embedded_default

    cfg = load_config(args.exp, args.overrides)
    out = prepare_embedded_default(cfg)
    for k, v in out.items():
        sys.stdout.write(f"{k}: {v}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="realisid", description="RealisID: identity customization with local and global ControlNet branches.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train an experiment (experiments/<EXP>.yaml) with key=value overrides")
    t.add_argument("exp", nargs="?", default="local_branch", help="experiment name under experiments/ or a YAML path")
    t.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. trainer.max_steps=50 data.batch_size=2")
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("prepare", help="build the embedded default's synthetic shards, stand-in encoder and tiny base model")
    pr.add_argument("exp", nargs="?", default="local_branch")
    pr.add_argument("overrides", nargs="*")
    pr.set_defaults(func=cmd_prepare)
    return p


def main(argv: list[str] | None = None) -> int:
    from realisid.config import ConfigError

    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        if args.verbose:
            raise
        sys.stderr.write(f"realisid {args.command}: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"realisid {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
