"""Helpers of the metric tests: the default bins in order and reading metric results as floats."""
from __future__ import annotations

import math

from realisid.geometry import DEFAULT_BINS

BINS = list(DEFAULT_BINS)  # tiny, small, medium, large
NAN = float("nan")


def val(result, key) -> float:
    return float(result[key])


def is_nan(x) -> bool:
    return math.isnan(float(x))
