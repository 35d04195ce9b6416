"""Shared face-scale bin bookkeeping for the binned metrics.

Every binned metric keeps fixed-size, sum-reduced states of shape ``(n_bins,)`` (float64, so counts are exact
up to 2**53 and sums lose nothing when ranks are added), so ``compute()`` under DDP gives the same values as
one process over all the data. A face goes to the bin ``[low, high)`` of :func:`realisid.geometry.scale_bin`
that holds its size (target box long side / image long edge); the first matching bin in the mapping's order
wins, exactly as ``scale_bin`` decides. ``"all"`` is the sum over bins (each face lies in exactly one bin).

``compute()`` of each metric returns a flat dict ``{"<key_prefix><name>/<bin>": tensor, ...,
"<key_prefix><name>/all": tensor}``. A mean over an empty bin is NaN, never 0: "no faces of this size" is
not "similarity 0".
"""
from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from realisid.geometry import DEFAULT_BINS, bins_from_config, scale_bin

log = logging.getLogger(__name__)

ALL = "all"
STATE_DTYPE = torch.float64
OUT_DTYPE = torch.float32


def normalize_bins(bins: Mapping[str, Sequence[float]] | None) -> dict[str, tuple[float, float]]:
    """Bins as ``{name: (low, high)}`` floats (``None`` -> :data:`~realisid.geometry.DEFAULT_BINS`; a ``None``
    high means ``inf``, as in config files). Raises on a bin named ``"all"`` or an empty/inverted bin."""
    out = bins_from_config(bins if bins is not None else DEFAULT_BINS)
    if not out:
        raise ValueError(f"bins {bins!r} define no bin; give a mapping like {{'tiny': [0, 0.125], 'large': [0.125, null]}}")
    for name, (low, high) in out.items():
        if name == ALL:
            raise ValueError(f"a bin may not be named {ALL!r} (that key holds the total over bins); rename it")
        if "/" in name:
            raise ValueError(f"bin name {name!r} contains '/', which separates metric and bin in result keys; rename it")
        if not (low < high) or math.isnan(low) or math.isnan(high):
            raise ValueError(f"bin {name!r} = [{low}, {high}) is empty; give low < high")
    return out


def bin_index(face_size: Tensor | Sequence[float], bins: Mapping[str, tuple[float, float]]) -> Tensor:
    """``(N,)`` long tensor: for each face size, the index (in the mapping's order) of its bin, decided by
    :func:`realisid.geometry.scale_bin` (the one binning rule). A size in no bin (or NaN) is an error naming the
    value and its index."""
    sizes = torch.as_tensor(face_size).detach().reshape(-1).to(device="cpu", dtype=torch.float64).tolist()
    names = list(bins)
    out = []
    for i, size in enumerate(sizes):
        try:
            out.append(names.index(scale_bin(size, bins)))
        except ValueError as err:
            raise ValueError(f"{err} (face size at index {i}); face sizes are target box long side / image long edge") from None
    return torch.tensor(out, dtype=torch.long)


def safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` elementwise, NaN where ``den == 0``."""
    num, den = num.to(STATE_DTYPE), den.to(STATE_DTYPE)
    nan = torch.full_like(num, float("nan"))
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), nan)


class BinnedMetric(Metric):
    """Base class: bins, per-bin sum states and the result-dict builder.

    Subclasses call :meth:`add_bin_state` in ``__init__``, :meth:`bin_of` + :meth:`accumulate` in ``update``
    and build ``compute()``'s dict with :meth:`binned_ratio` / :meth:`binned_total`.

    Args:
        bins: ``{name: (low, high)}`` like :data:`realisid.geometry.DEFAULT_BINS` (``None``: those).
        key_prefix: prepended to every result key (e.g. ``"crop_"`` to tell two instances apart in one log).
        kwargs: torchmetrics ``Metric`` keyword arguments (``sync_on_compute``, ``process_group``, ...).
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, bins: Mapping[str, Sequence[float]] | None = None, key_prefix: str = "", **kwargs):
        super().__init__(**kwargs)
        self.bins = normalize_bins(bins)
        self.bin_names = list(self.bins)
        self.key_prefix = str(key_prefix)
        self._bin_states: list[str] = []

    @property
    def n_bins(self) -> int:
        return len(self.bin_names)

    def add_bin_state(self, name: str) -> None:
        """A ``(n_bins,)`` float64 zero state, summed over processes."""
        self.add_state(name, default=torch.zeros(self.n_bins, dtype=STATE_DTYPE), dist_reduce_fx="sum")
        self._bin_states.append(name)

    def bin_of(self, face_size: Tensor | Sequence[float], n: int | None = None) -> Tensor:
        """Bin indices of these face sizes on the metric's device; checks there are ``n`` of them."""
        idx = bin_index(face_size, self.bins)
        if n is not None and idx.numel() != n:
            raise ValueError(f"got {idx.numel()} face sizes for {n} faces; give one face_size per face")
        return idx.to(self.device)

    def accumulate(self, name: str, idx: Tensor, values: Tensor | float) -> None:
        """Add ``values`` (one per face, or a scalar for each face) into state ``name`` at bins ``idx``."""
        state = getattr(self, name)
        vals = torch.as_tensor(values, dtype=STATE_DTYPE, device=state.device)
        if vals.dim() == 0:
            vals = vals.expand(idx.numel())
        setattr(self, name, state.index_add(0, idx.to(state.device), vals.reshape(-1)))

    # A score where a face the detector missed counts 0 (identity similarity, location IoU): one sum serves
    # both means, since the sum with misses scored 0 is the sum over found faces.
    def add_scored_states(self) -> None:
        for name in ("score_sum", "n", "n_found"):
            self.add_bin_state(name)

    def accumulate_scored(self, idx: Tensor, scores: Tensor, found: Tensor) -> None:
        self.accumulate("score_sum", idx, torch.where(found, scores, torch.zeros_like(scores)))
        self.accumulate("n", idx, 1.0)
        self.accumulate("n_found", idx, found.to(scores.dtype))

    def scored_results(self, mean: str, found_mean: str, found_rate: str, n: str, n_found: str) -> dict[str, Tensor]:
        """Mean with misses scored 0, mean over found faces, found-rate and both counts, per bin and all."""
        out: dict[str, Tensor] = {}
        out.update(self.binned_ratio(mean, self.score_sum, self.n))
        out.update(self.binned_ratio(found_mean, self.score_sum, self.n_found))
        out.update(self.binned_ratio(found_rate, self.n_found, self.n))
        out.update(self.binned_total(n, self.n))
        out.update(self.binned_total(n_found, self.n_found))
        return out

    # ----------------------------------------------------------------------------------------- results
    def key(self, metric: str, bin_name: str) -> str:
        return f"{self.key_prefix}{metric}/{bin_name}"

    def binned_ratio(self, metric: str, num: Tensor, den: Tensor) -> dict[str, Tensor]:
        """``{metric/<bin>: num/den, metric/all: sum(num)/sum(den)}`` with NaN for zero denominators."""
        per_bin = safe_ratio(num, den)
        total = safe_ratio(num.sum(), den.sum())
        return self._pack(metric, per_bin, total)

    def binned_total(self, metric: str, values: Tensor) -> dict[str, Tensor]:
        """``{metric/<bin>: value, metric/all: sum}`` (counts)."""
        return self._pack(metric, values.to(STATE_DTYPE), values.to(STATE_DTYPE).sum())

    def _pack(self, metric: str, per_bin: Tensor, total: Tensor) -> dict[str, Tensor]:
        out = {self.key(metric, b): per_bin[i].to(OUT_DTYPE) for i, b in enumerate(self.bin_names)}
        out[self.key(metric, ALL)] = total.to(OUT_DTYPE)
        return out


def as_float_tensor(value, name: str, shape_tail: tuple[int, ...] = ()) -> Tensor:
    """``value`` as a float64 CPU-or-device tensor of shape ``(N, *shape_tail)``; errors name ``name``."""
    t = torch.as_tensor(value).detach()
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8)):
        raise TypeError(f"{name} must be a float tensor, got dtype {t.dtype}")
    t = t.to(STATE_DTYPE)
    if t.dim() == len(shape_tail):  # a single face
        t = t.unsqueeze(0)
    if tuple(t.shape[1:]) != tuple(shape_tail):
        want = "(N" + "".join(f", {s}" for s in shape_tail) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    return t
