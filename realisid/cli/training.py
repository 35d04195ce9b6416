"""``realisid train``, ``realisid sweep`` and ``realisid precompute``: training runs and what they read."""
from __future__ import annotations

import os
import sys


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
        f"exported      : {res.get('export')}  (LocalBranch.from_pretrained(<export>/local) loads a branch; ControlNetModel.from_pretrained too when the UNet has one layer count)",
        f"val samples   : {res['samples']}",
    ]
    if "loss_first_fifth" in res:
        lines.append(f"train loss    : first fifth of steps {res['loss_first_fifth']:.4f} -> last fifth {res['loss_last_fifth']:.4f} "
                     f"({res['steps']} steps; different data and noise each step)")
    if "val_loss_first" in res:
        lines.append(f"held-out loss : step {res['val_loss_first_step']} {res['val_loss_first']:.4f} -> step {res['val_loss_last_step']} "
                     f"{res['val_loss_last']:.4f} (validation samples, the same noise each time)")
    if "id_use" in res:
        lines.append(f"identity use  : face loss {res['id_use']:+.1%} with another identity's reference at step {res['id_use_step']} "
                     f"({res['id_use_face_mse_own']:.5f} -> {res['id_use_face_mse_other']:.5f}; 0 = the reference is ignored)")
    lines.append(f"wall time     : {res['seconds']:.0f} s")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_sweep(args) -> int:
    from realisid.sweep import run_sweep

    from realisid.interrupts import INTERRUPTED_EXIT

    try:
        res = run_sweep(args.sweep, args.overrides, seed=args.seed)
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


def add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="train an experiment (experiments/<EXP>.yaml) with key=value overrides")
    t.add_argument("exp", nargs="?", default="local_branch", help="experiment name under experiments/ or a YAML path")
    t.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. trainer.max_steps=50 data.batch_size=2")
    t.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue RUN_DIR from checkpoints/last.ckpt (same step, optimizer, scheduler and data position)")
    t.set_defaults(func=cmd_train)


def add_sweep_parser(sub) -> None:
    sw = sub.add_parser("sweep", help="ablation sweep from experiments/sweeps/<SWEEP>.yaml: train + bench each run, one combined table")
    sw.add_argument("sweep", help="sweep name under experiments/sweeps/ or a YAML path")
    sw.add_argument("overrides", nargs="*", help="overrides applied to every run")
    sw.add_argument("--seed", type=int, default=None, help="replicate the sweep with experiment.seed=N: runs in "
                    "runs/sweeps/<sweep>-seed<N>, results in <out_dir>-seed<N>, the same benchmark cases")
    sw.set_defaults(func=cmd_sweep)


def add_precompute_parser(sub) -> None:
    pc = sub.add_parser("precompute", help="store VAE latents, text embeddings and identity features beside the train shards (train with data.precomputed=OUT)")
    pc.add_argument("exp", nargs="?", default="local_branch")
    pc.add_argument("overrides", nargs="*")
    pc.add_argument("--out", default=None, help="output folder (default: data/cache/precomputed/<exp>)")
    pc.add_argument("--batch-size", type=int, default=32, help="samples per VAE / text-encoder batch")
    pc.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="stored precision (fp32 reproduces on-the-fly encoding exactly)")
    pc.set_defaults(func=cmd_precompute)

