"""Compare finished scale benchmarks: margin per bin and the paired difference against a baseline on the same cases.

    python benchmarks/compare_benches.py global_only=DIR joint=DIR[@SETTING] local_only=DIR [--baseline global_only] [--out FILE]
    python benchmarks/compare_benches.py global_only=DIR+DIR2+DIR3 joint=DIR+DIR2+DIR3    # replicates (training seeds)

Each DIR is a benchmark output folder (``calibrated.csv``, ``bins.csv``, ``results.csv``), e.g. one run's folder of
``make sweep`` or of ``make bench``; ``@SETTING`` picks one inference setting of a folder that holds several (``make
bench`` on a joint run writes joint, local_only and global_only). The benchmarks must share their cases (references, sizes, seeds, prompts): the
paired difference ``name - baseline`` compares the same reference, box and seed, with a 95% interval resampling
identities, as the sweep's claims.json does. The runs should also have been trained on one kind of machine: the table
opens with a warning when their benchmark headers record different training machines, or none. Writes a markdown table (stdout, and ``--out`` with a claims.json beside it).

``NAME=DIR+DIR2`` pools replicates of one run: the same sweep trained with other seeds (``make sweep SWEEP=branches
SEED=2`` writes ``sweep-branches-seed2/<run>``). The pooled difference is that of the replicate means, its interval
resamples each run's replicates as well as the identities (training noise included), and each replicate pair's own
difference is listed below it (when both give as many replicates; pairs in the order given) so the spread
between seeds is in sight. A folder name may not contain "+".
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from realisid.metrics.calibrated import fmt, paired_difference  # noqa: E402
from realisid.sweep import calibrated_from_csv, read_csv  # noqa: E402

BINS = ["tiny", "small", "medium", "large"]


def parse_run(text: str) -> tuple[str, list[tuple[str, str | None]]]:
    """``NAME=DIR[@SETTING][+DIR2[@SETTING]...]`` -> (NAME, [(DIR, SETTING or None), ...])."""
    name, sep, folders = text.partition("=")
    if not sep or not name or not folders:
        raise SystemExit(f"{text!r}: give NAME=BENCH_DIR[@SETTING][+BENCH_DIR2...], e.g. joint=benchmarks/results/sweep-branches/joint")
    out = []
    for part in folders.split("+"):
        folder, _, setting = part.partition("@")
        if not folder:
            raise SystemExit(f"{text!r}: an empty folder between '+'; give NAME=BENCH_DIR+BENCH_DIR2")
        for f in ("calibrated.csv", "bins.csv", "results.csv"):
            if not os.path.exists(os.path.join(folder, f)):
                raise SystemExit(f"{name}: '{folder}' has no {f}; give a finished benchmark's output folder")
        out.append((folder, setting or None))
    return name, out


def one_setting(rows: list[dict], setting: str | None, where: str) -> list[dict]:
    """The rows of one inference setting; a folder with several needs ``@SETTING``."""
    have = list(dict.fromkeys(r["setting"] for r in rows))
    if setting is None and len(have) > 1:
        raise SystemExit(f"'{where}' holds the settings {', '.join(have)}; pick one with {where}@SETTING")
    if setting is not None and setting not in have:
        raise SystemExit(f"'{where}' has no setting {setting!r}; it has {', '.join(have)}")
    return [r for r in rows if r["setting"] == (setting or have[0])]


def compare(runs: dict[str, list[tuple[str, str | None]] | tuple[str, str | None]], baseline: str) -> tuple[str, dict]:
    """Markdown tables and claims ({"NAME - BASELINE": {bin: (difference, lo, hi)}}); a run is one (folder, setting)
    or a list of them (replicates)."""
    runs = {name: spec if isinstance(spec, list) else [spec] for name, spec in runs.items()}
    if baseline not in runs:
        raise SystemExit(f"--baseline {baseline!r} is not one of the runs given ({', '.join(runs)})")
    lines = ["| run | margin tiny | small | medium | large | all | found-rate tiny / all | retention medium / large | location IoU medium / large |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = {}
    for name, folders in runs.items():
        rows[name] = []
        for folder, setting in folders:
            cal = calibrated_from_csv(one_setting(read_csv(os.path.join(folder, "calibrated.csv")), setting, folder))
            iou = {r["bin"]: float(r["loc_iou"]) for r in one_setting(read_csv(os.path.join(folder, "bins.csv")), setting, folder)}
            rows[name].append(one_setting(read_csv(os.path.join(folder, "results.csv")), setting, folder))
            label = name if len(folders) == 1 else f"{name} ({replicate_label(folder)})"
            lines.append(f"| {label} | " + " | ".join(fmt(cal[b]["margin"]) for b in BINS + ["all"])
                         + f" | {cal['tiny']['found_rate'][0]:.2f} / {cal['all']['found_rate'][0]:.2f}"
                         + f" | {cal['medium']['retention'][0]:.2f} / {cal['large']['retention'][0]:.2f}"
                         + f" | {iou['medium']:.2f} / {iou['large']:.2f} |")
    pooled = any(len(f) > 1 for f in runs.values())
    lines = machine_warning({name: [trained_on(folder) for folder, _ in folders] for name, folders in runs.items()}) + lines
    lines += ["", "| paired difference (same cases)" + (", replicates pooled" if pooled else "") + " | " + " | ".join(BINS + ["all"]) + " |",
              "|---|" + "---|" * (len(BINS) + 1)]
    claims = {}
    for name in runs:
        if name == baseline:
            continue
        d = paired_difference(rows[name], rows[baseline], BINS, seed=0)
        claims[f"{name} - {baseline}"] = d
        lines.append(f"| {name} - {baseline} | " + " | ".join(fmt(d[b]) for b in BINS + ["all"]) + " |")
        if pooled and len(runs[name]) == len(runs[baseline]):
            for (folder, _), mine, theirs in zip(runs[name], rows[name], rows[baseline]):
                d = paired_difference(mine, theirs, BINS, seed=0)
                lines.append(f"| &nbsp; {replicate_label(folder)} only | " + " | ".join(fmt(d[b]) for b in BINS + ["all"]) + " |")
    return "\n".join(lines) + "\n", claims


def trained_on(folder: str) -> str:
    """The training machine a benchmark folder's header records (benchmarks of runs trained before 2026-12-07 have
    none)."""
    path = os.path.join(folder, "header.json")
    header = json.load(open(path)) if os.path.exists(path) else {}
    return str(header.get("trained on") or "not recorded")


def machine_warning(machines: dict[str, list[str]]) -> list[str]:
    """Lines that head the table when the runs were not all trained on one kind of machine (or some did not record
    it): CPU kernels round differently, and a run trained on another CPU differs as much as one with another seed."""
    seen = {m for ms in machines.values() for m in ms}
    if len(seen) <= 1 and "not recorded" not in seen:
        return []
    lines = ["**Trained on different or unrecorded machines.** The same code, seed and data train a different run on a CPU",
             "whose kernels round differently (docs/embedded.md, \"Runs differ between machines\"): read a paired difference",
             "as an effect only for runs trained on one machine, and train the baseline again there otherwise.", ""]
    lines += [f"- {name}: " + "; ".join(dict.fromkeys(ms)) for name, ms in machines.items()]
    return lines + [""]


def replicate_label(folder: str) -> str:
    """A replicate's name in tables: its sweep folder (sweep-branches-seed2/joint -> sweep-branches-seed2)."""
    return os.path.basename(os.path.dirname(os.path.normpath(folder))) or folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="NAME=BENCH_DIR[@SETTING], or NAME=DIR+DIR2 to pool replicates")
    ap.add_argument("--baseline", default="global_only")
    ap.add_argument("--out", default=None, help="markdown file to write (claims.json goes beside it)")
    args = ap.parse_args(argv)
    table, claims = compare(dict(map(parse_run, args.runs)), args.baseline)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table)
        with open(os.path.join(os.path.dirname(os.path.abspath(args.out)), "claims.json"), "w") as f:
            json.dump(claims, f, indent=2)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
