"""Scale benchmark: identity similarity, found-rate, location, pose and FID against face size and people count.

    python benchmarks/scale_bench.py [EXP] [key=value ...] [--run RUN_DIR] [--out DIR]

Same as `python -m realisid bench`; `make bench EXP=... RUN=...` calls this. Results go to
benchmarks/results/<date>-<exp>/ (CSV, markdown table, one PNG plot per metric).
"""
import sys

from realisid.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
