"""What the probe scripts (``vae_probe.py``, ``unet_probe.py``) share: the command line (a MODE, or ``--summary DIR``
to rewrite a table), the output folder per probe, and reading every probe's results.json back for the table."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys


def probe_parser(description: str, modes, what: str) -> argparse.ArgumentParser:
    """MODE, --summary, --steps, --set (``what``: the part that mode 'scratch' builds), --tag, --seed, --out."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("mode", nargs="?", choices=modes)
    ap.add_argument("--summary", metavar="DIR", help="only rewrite DIR/table.md from the probes in DIR")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help=f"config override (scratch: {what})")
    ap.add_argument("--tag", default="", help="suffix of the output folder")
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--out", default=None)
    return ap


def summary_only(ap: argparse.ArgumentParser, args, modes, write_summary) -> bool:
    """Handle ``--summary DIR`` (rewrite its table, True) or refuse a call without a MODE."""
    if args.summary:
        sys.stdout.write(write_summary(args.summary) + "\n")
        return True
    if args.mode is None:
        ap.error(f"give a MODE ({', '.join(modes)}) or --summary DIR")
    return False


def probe_out(args, kind: str) -> tuple[str, str]:
    """The probe's name (MODE[-TAG]) and its folder (``--out``, or benchmarks/results/<date>-<kind>/<name>), created."""
    name = args.mode + (f"-{args.tag}" if args.tag else "")
    out = args.out or os.path.join("benchmarks", "results", f"{dt.date.today().isoformat()}-{kind}", name)
    os.makedirs(out, exist_ok=True)
    return name, out


def save_probe(out: str, record: dict, write_summary) -> None:
    """The probe's results.json in ``out``, then the table of every probe one folder up rewritten."""
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(record, f, indent=2)
    write_summary(os.path.dirname(os.path.abspath(out)))


def read_probes(folder: str, modes) -> list[tuple[str, dict]]:
    """(name, results) of every sub-folder of ``folder`` holding a results.json, in ``modes`` order, then by name."""
    rows = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                rows.append((name, json.load(f)))
    rows.sort(key=lambda r: (list(modes).index(r[1]["mode"]), r[0]))
    return rows
