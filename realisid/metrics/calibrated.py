"""A calibrated identity metric: how much of the identity that real photos carry at a face size survives
generation.

A raw cosine says little: two different people may score 0.4 with one encoder and -0.1 with another, and
small faces score low whatever the model does. So, per face-size bin:

- ``sim_ref``: generated face vs its own reference (the evaluation encoder, never the conditioning one);
- ``sim_other``: the same generated face vs the references of the OTHER identities in the benchmark
  (their mean): what any face scores against a stranger at this size;
- ``margin = sim_ref - sim_other``: identity-specific similarity; ~0 when the reference had no effect;
- ``ceiling``: the same margin for REAL held-out photos of the same identities whose faces fall in that
  bin: what a perfect generator would score at that size with this encoder and analyzer;
- ``retention = margin / ceiling``: the fraction of the attainable identity signal the model keeps.

A face the analyzer misses scores 0 for both similarities (margin 0): misses count, and the found-rate is
reported beside. Every value comes with a 95% percentile bootstrap interval that resamples IDENTITIES
(clusters), not faces: faces of one identity are correlated, so resampling faces would overstate certainty.
For the retention, generated and real samples are resampled independently in each replicate.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np

QUANTITIES = ("sim_ref", "sim_other", "margin")


def scored(sim_ref: float, sim_other: float, found: bool) -> dict[str, float]:
    """One face's row: misses score 0 for both similarities."""
    if not found:
        return {"sim_ref": 0.0, "sim_other": 0.0, "margin": 0.0, "found": 0.0}
    return {"sim_ref": float(sim_ref), "sim_other": float(sim_other), "margin": float(sim_ref) - float(sim_other), "found": 1.0}


def other_similarity(embedding: np.ndarray, refs: Mapping[str, np.ndarray], identity: str) -> float:
    """Mean cosine of ``embedding`` with the references of every identity but ``identity``."""
    others = [v for k, v in refs.items() if k != identity]
    if not others:
        raise ValueError("sim_other needs references of at least two identities; give the benchmark more references")
    e = np.asarray(embedding, np.float64)
    return float(np.mean([float(e @ np.asarray(o, np.float64)) for o in others]))


def _clusters(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """Per identity, the (n, 4) array of (sim_ref, sim_other, margin, found)."""
    groups: dict[str, list] = defaultdict(list)
    for r in rows:
        groups[str(r["identity"])].append([r[key_] for key_ in (*QUANTITIES, "found")])
    names = sorted(groups)
    return names, {n: np.asarray(groups[n], np.float64) for n in names}


def _resampled_means(names: list[str], groups: Mapping[str, np.ndarray], rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """(n_boot, 4) means over faces of identity-resampled sets (the first row is the plain mean)."""
    sums = np.stack([groups[n].sum(0) for n in names])          # (I, 4)
    counts = np.array([len(groups[n]) for n in names], np.float64)
    out = np.empty((n_boot + 1, sums.shape[1]))
    out[0] = sums.sum(0) / counts.sum()
    if n_boot:
        pick = rng.integers(0, len(names), size=(n_boot, len(names)))
        out[1:] = sums[pick].sum(1) / counts[pick].sum(1)[:, None]
    return out


def _interval(samples: np.ndarray, alpha: float) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def calibrated_identity(generated: Sequence[Mapping[str, Any]], real: Sequence[Mapping[str, Any]], bins: Sequence[str], *,
                        n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict[str, dict[str, Any]]:
    """Per bin (and ``all``): n, identities, found-rate and every quantity with its interval.

    ``generated`` / ``real``: rows with ``bin``, ``identity``, ``sim_ref``, ``sim_other``, ``margin``, ``found``
    (see :func:`scored`). Returns ``{bin: {"n": .., "identities": .., "found_rate": (v, lo, hi),
    "sim_ref": (v, lo, hi), "sim_other": .., "margin": .., "ceiling": .., "retention": ..}}``; a bin with no
    generated faces is left out, a bin with no real faces has NaN ceiling and retention.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, Any]] = {}
    for b in list(bins) + ["all"]:
        gen = [r for r in generated if b == "all" or r["bin"] == b]
        if not gen:
            continue
        ceil_rows = [r for r in real if b == "all" or r["bin"] == b]
        names, groups = _clusters(gen, "identity")
        g = _resampled_means(names, groups, rng, n_boot)
        entry: dict[str, Any] = {"n": len(gen), "identities": len(names)}
        for j, q in enumerate((*QUANTITIES, "found_rate")):
            entry[q] = (float(g[0, j]), *_interval(g[1:, j], alpha))
        if ceil_rows:
            cnames, cgroups = _clusters(ceil_rows, "identity")
            c = _resampled_means(cnames, cgroups, rng, n_boot)[:, 2]
            entry["ceiling"] = (float(c[0]), *_interval(c[1:], alpha))
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(c > 0, g[:, 2] / c, np.nan)
            entry["retention"] = (float(ratio[0]), *_interval(ratio[1:], alpha))
            entry["real_n"] = len(ceil_rows)
        else:
            entry["ceiling"] = entry["retention"] = (float("nan"),) * 3
            entry["real_n"] = 0
        out[b] = entry
    return out


def fmt(v: Sequence[float], digits: int = 3) -> str:
    """``value [lo, hi]`` for tables."""
    x, lo, hi = v
    if x != x:
        return "n/a"
    return f"{x:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def paired_difference(a: Sequence[Any], b: Sequence[Any], bins: Sequence[str], *,
                      key: Sequence[str] = ("size_px", "people", "ref", "person", "prompt"), quantity: str = "margin",
                      n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict[str, tuple[float, float, float]]:
    """``quantity`` of run ``a`` minus run ``b`` per bin, on the cases both generated (same reference, box and seed),
    with a 95% interval that resamples identities. Returns ``{bin: (difference, lo, hi)}``.

    ``a`` and ``b`` are each one run's benchmark rows, or a list of such row lists: replicates of the run (trained
    with other seeds, benchmarked on the same cases). Then the difference is that of the replicate means on the
    cases every replicate generated, and each bootstrap draw resamples each run's replicates (with replacement) as
    well as the identities, so the interval carries training noise too. With two or three replicates it still
    understates that noise (a bootstrap over k values sees only k of them): read it beside each replicate's own
    difference."""
    reps_a, reps_b = _replicates(a), _replicates(b)
    indexed = [{tuple(r[k] for k in key): r for r in rows} for rows in reps_a + reps_b]
    common = sorted(set.intersection(*(set(ix) for ix in indexed)), key=str)
    if not common:
        raise ValueError("the runs share no benchmark case; benchmark them with the same bench settings")
    rng = np.random.default_rng(seed)
    out = {}
    for bn in list(bins) + ["all"]:
        cases = [c for c in common if bn == "all" or indexed[0][c]["bin"] == bn]
        if not cases:
            continue
        names = sorted({str(indexed[0][c]["identity"]) for c in cases})
        slot = {n: i for i, n in enumerate(names)}
        sums = np.zeros((len(indexed), len(names)))       # per replicate and identity, the summed quantity
        counts = np.zeros(len(names))
        for c in cases:
            j = slot[str(indexed[0][c]["identity"])]
            counts[j] += 1
            for r, ix in enumerate(indexed):
                sums[r, j] += float(ix[c][quantity])
        sa, sb = sums[:len(reps_a)], sums[len(reps_a):]
        diff = sa.mean(0) - sb.mean(0)
        pick = rng.integers(0, len(names), size=(n_boot, len(names)))
        if len(reps_a) == len(reps_b) == 1:
            boot = diff[pick].sum(1) / counts[pick].sum(1)
        else:
            ra = rng.integers(0, len(reps_a), size=(n_boot, len(reps_a)))
            rb = rng.integers(0, len(reps_b), size=(n_boot, len(reps_b)))
            per_identity = sa[ra].mean(1) - sb[rb].mean(1)   # (n_boot, identities)
            boot = np.take_along_axis(per_identity, pick, 1).sum(1) / counts[pick].sum(1)
        out[bn] = (float(diff.sum() / counts.sum()), *_interval(boot, alpha))
    return out


def _replicates(run: Sequence[Any]) -> list[Sequence[Mapping[str, Any]]]:
    """One run's rows as a one-replicate list; a list of row lists as it is."""
    if not run:
        raise ValueError("a run with no benchmark rows; give a finished benchmark")
    return [run] if isinstance(run[0], Mapping) else list(run)
