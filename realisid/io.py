"""Small file helpers every part shares: atomic JSON writes and NumPy arrays as ``.npy`` bytes.

A JSON file that marks progress (a stage's DONE file, a builder journal, a manifest, a cache's record) is
written to ``PATH.tmp`` and renamed over ``PATH``, so an interruption leaves either the old file or the new
one, never half of one. Arrays go into shards and caches as ``.npy`` bytes, never pickled.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np


def atomic_write_json(path: str, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` through ``path.tmp`` and a rename (atomic on POSIX)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)


def encode_array(arr: Any, dtype: Any = None) -> bytes:
    """``arr`` (cast to ``dtype`` when given) as ``.npy`` bytes, without pickle (``np.load(..., allow_pickle=False)``
    reads it back)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr, dtype=dtype), allow_pickle=False)
    return buf.getvalue()
