"""Face verification with the stand-in encoder, the protocol :func:`~.training.train_standin` reports: on
held-out identities, all same-identity pairs against as many different-identity pairs, at a cosine threshold
chosen on pairs of the TRAINING identities."""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from .data import FaceSet, load_face_set
from .model import StandInArcFace, embed_crops

log = logging.getLogger(__name__)


def verification_pairs(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """All same-label pairs ``(i < j)`` and an equal number of distinct different-label pairs drawn uniformly
    (all of them if there are fewer). Returns ``(pairs (P, 2) int64, same (P,) bool)``. Memory grows with
    the number of pairs returned, not with ``len(labels) ** 2``."""
    labels = np.asarray(labels)
    n = int(labels.shape[0])
    groups = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    same_parts = []
    for g in groups:
        if len(g) > 1:
            a, b = np.triu_indices(len(g), k=1)
            same_parts.append(np.stack([g[a], g[b]], 1))
    same = np.concatenate(same_parts).astype(np.int64) if same_parts else np.zeros((0, 2), np.int64)
    n_same = len(same)
    n_diff_total = n * (n - 1) // 2 - n_same
    if n_diff_total <= n_same:
        diff_parts = []
        for x in range(len(groups)):
            for y in range(x + 1, len(groups)):
                ga, gb = np.meshgrid(groups[x], groups[y], indexing="ij")
                diff_parts.append(np.sort(np.stack([ga.ravel(), gb.ravel()], 1), axis=1))
        diff = np.concatenate(diff_parts).astype(np.int64) if diff_parts else np.zeros((0, 2), np.int64)
    else:
        chosen: dict[int, None] = {}  # insertion-ordered set of pair codes lo * n + hi
        while len(chosen) < n_same:
            i = rng.integers(0, n, size=2 * n_same + 16)
            j = rng.integers(0, n, size=2 * n_same + 16)
            keep = labels[i] != labels[j]
            lo, hi = np.minimum(i, j)[keep], np.maximum(i, j)[keep]
            for code in (lo * n + hi).tolist():
                if len(chosen) >= n_same:
                    break
                chosen.setdefault(code, None)
        codes = np.fromiter(chosen, dtype=np.int64, count=len(chosen))
        diff = np.stack([codes // n, codes % n], 1)
    pairs = np.concatenate([same, diff]).astype(np.int64)
    flags = np.concatenate([np.ones(n_same, bool), np.zeros(len(diff), bool)])
    return pairs, flags


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """Cosine threshold maximising pair accuracy (``same`` iff ``score >= threshold``) and that accuracy."""
    order = np.argsort(scores, kind="stable")
    s, y = scores[order].astype(np.float64), same[order].astype(np.int64)
    n = len(s)
    diff_below = np.concatenate([[0], np.cumsum(1 - y)])  # threshold between s[k-1] and s[k]
    same_below = np.concatenate([[0], np.cumsum(y)])
    correct = diff_below + (y.sum() - same_below)
    # only cut between distinct scores
    valid = np.ones(n + 1, bool)
    valid[1:n] = s[1:] > s[:-1]
    correct = np.where(valid, correct, -1)
    k = int(np.argmax(correct))
    if k == 0:
        th = s[0] - 1e-6
    elif k == n:
        th = s[-1] + 1e-6
    else:
        th = (s[k - 1] + s[k]) / 2.0
    return float(th), float(correct[k]) / n


def _auc(scores: np.ndarray, same: np.ndarray) -> float:
    n_s, n_d = int(same.sum()), int((~same).sum())
    if n_s == 0 or n_d == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores), np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    return float((ranks[same].sum() - n_s * (n_s + 1) / 2.0) / (n_s * n_d))


def _pair_scores(emb: torch.Tensor, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    pairs, same = verification_pairs(labels, np.random.default_rng(seed))
    e = emb.numpy().astype(np.float64)
    scores = np.einsum("pd,pd->p", e[pairs[:, 0]], e[pairs[:, 1]])
    return scores, same


def verification_stats(model: StandInArcFace, train: FaceSet, val: FaceSet, seed: int = 0) -> dict[str, Any]:
    """Held-out verification: threshold from TRAIN-identity pairs, accuracy on VAL-identity pairs."""
    stats: dict[str, Any] = {"n_train_images": len(train), "n_train_identities": len(set(train.identities)),
                             "n_val_images": len(val), "n_val_identities": len(set(val.identities))}
    tr_labels, _ = train.labels()
    tr_scores, tr_same = _pair_scores(embed_crops(model, train.crops), tr_labels, seed)
    if tr_same.sum() == 0 or (~tr_same).sum() == 0:
        raise ValueError("the training shards need at least two identities with two images each to choose a verification threshold")
    threshold, tr_acc = best_threshold(tr_scores, tr_same)
    stats.update(threshold=threshold, train_pair_accuracy=tr_acc, train_mean_same_cos=float(tr_scores[tr_same].mean()),
                 train_mean_diff_cos=float(tr_scores[~tr_same].mean()))
    if len(val) == 0 or val.crops is None:
        log.warning("stand-in encoder: no validation samples, held-out verification not measured")
        stats.update(verification_accuracy=None, mean_same_cos=None, mean_diff_cos=None, auc=None,
                     n_same_pairs=0, n_diff_pairs=0)
        return stats
    va_labels, _ = val.labels()
    va_scores, va_same = _pair_scores(embed_crops(model, val.crops), va_labels, seed)
    if va_same.sum() == 0:
        log.warning("stand-in encoder: no validation identity has two images, held-out verification not measured")
        stats.update(verification_accuracy=None, mean_same_cos=None, mean_diff_cos=None, auc=None,
                     n_same_pairs=0, n_diff_pairs=int((~va_same).sum()))
        return stats
    pred = va_scores >= threshold
    _, val_best = best_threshold(va_scores, va_same)
    stats.update(
        verification_accuracy=float((pred == va_same).mean()),
        verification_accuracy_oracle=val_best,  # with the threshold tuned on val itself (optimistic; for reference)
        mean_same_cos=float(va_scores[va_same].mean()),
        mean_diff_cos=float(va_scores[~va_same].mean()) if (~va_same).any() else None,
        auc=_auc(va_scores, va_same),
        n_same_pairs=int(va_same.sum()),
        n_diff_pairs=int((~va_same).sum()),
    )
    return stats


def evaluate_standin(model: StandInArcFace, train_urls: Sequence[str], val_urls: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """:func:`verification_stats` of ``model`` on these shards (the protocol :func:`~.training.train_standin` reports)."""
    size = model.image_size
    train = load_face_set(train_urls, size)
    val = load_face_set(val_urls, size) if val_urls else FaceSet()
    return verification_stats(model, train, val, seed)
