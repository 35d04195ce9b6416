"""``python -m realisid COMMAND`` (also the ``realisid`` console script).

One module per group of commands, each with its ``cmd_*`` functions and the ``add_*_parser(sub)`` functions that
register them: training.py (train, sweep, precompute), generate.py (generate, bench), build.py (build-shards),
embedded.py (prepare, pretrain, check-embedded), faces.py (faces). Each command imports what it needs when it
runs, so the command line starts fast."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from realisid.cli.build import add_build_parser, cmd_build_shards, faces_config
from realisid.cli.embedded import (add_check_embedded_parser, add_prepare_parser, add_pretrain_parser, cmd_check_embedded, cmd_prepare,
                                   cmd_pretrain)
from realisid.cli.faces import SAMPLE_PHOTOS, add_faces_parser, cmd_faces, export_sample_photos
from realisid.cli.generate import add_bench_parser, add_generate_parser, cmd_bench, cmd_generate, write_panel
from realisid.cli.training import add_precompute_parser, add_sweep_parser, add_train_parser, cmd_precompute, cmd_sweep, cmd_train

__all__ = ["main", "build_parser", "quiet_progress_bars", "box_values_as_options", "add_build_parser", "faces_config", "cmd_build_shards", "cmd_train",
           "cmd_sweep", "cmd_precompute", "cmd_prepare", "cmd_pretrain", "cmd_check_embedded", "cmd_generate", "cmd_bench",
           "write_panel", "cmd_faces", "export_sample_photos", "SAMPLE_PHOTOS"]

# the commands in the order `realisid --help` lists them
ADD_PARSERS = (add_train_parser, add_generate_parser, add_bench_parser, add_sweep_parser, add_build_parser, add_precompute_parser,
               add_pretrain_parser, add_check_embedded_parser, add_faces_parser, add_prepare_parser)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("PIL", "matplotlib", "urllib3", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def quiet_progress_bars(stream=None) -> bool:
    """No tqdm bars when ``stream`` (stderr) is a file or pipe: each update of a bar would add a line to the log
    (transformers' "Loading weights" at every backbone load, diffusers' and the hub's bars). Sets ``TQDM_DISABLE`` and
    ``HF_HUB_DISABLE_PROGRESS_BARS`` unless the user set them; tqdm reads them when first imported, so this runs before
    any command imports it; a library imported before (a benchmark script's imports) is told at run time. Returns whether
    the bars were turned off."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return False
    for key in PROGRESS_BAR_SETTINGS:
        os.environ.setdefault(key, "1")
    _quiet_imported_libraries()
    return True


def _quiet_imported_libraries() -> None:
    """The libraries that read the settings when first imported and are imported already (a benchmark script imports
    them at its top, before it can call this) are told at run time, unless the user turned their bars on."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "1":
        return
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()


PROGRESS_BAR_SETTINGS = ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")


def _restore_environment(saved: dict) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="realisid", description="RealisID: identity customization with local and global ControlNet branches.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in ADD_PARSERS:
        add(sub)
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

    argv = box_values_as_options(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after an option (argparse takes positionals only before them): still overrides
        late = [a for a in extra if "=" in a and not a.startswith("-")]
        if late != extra or not hasattr(args, "overrides"):
            parser.parse_args(argv)  # argparse's own message for what is not an override
        args.overrides = list(args.overrides or []) + late
    _setup_logging(args.verbose)
    bar_settings = {k: os.environ.get(k) for k in PROGRESS_BAR_SETTINGS}
    quiet_progress_bars()
    from realisid.jobs import HEAVY_COMMANDS, announce, withdraw

    # a heavy job says so while it runs and warns when another is running (they would slow each other several-fold)
    rest = argv[argv.index(args.command) + 1:] if args.command in argv else argv
    record, _ = announce(args.command, rest) if args.command in HEAVY_COMMANDS else (None, [])
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
    finally:
        withdraw(record)
        _restore_environment(bar_settings)  # main() called in-process leaves its caller's environment as it found it

