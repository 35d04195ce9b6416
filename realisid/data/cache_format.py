"""The precompute cache's format: what ``realisid precompute`` writes beside each training sample and how a
training run reads and checks it (the writer is :mod:`realisid.data.precompute`; the shard format it extends
is :mod:`realisid.data.shards`; both are described in docs/data.md).

Each cached sample carries every member of the original sample plus ``precomputed.npy``, one structured NumPy
record (never pickled) whose fields are listed in :data:`FIELDS` with the batch key each becomes. The folder's
``precomputed.json`` records what the arrays depend on (:func:`cache_info`); :func:`check_cache` refuses a
cache made for another setup, naming the difference.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Mapping

import numpy as np

from realisid.data.shards import SampleError, check_shards_exist
from realisid.models.id_encoder import encoder_fingerprint

INFO_FILE = "precomputed.json"
MEMBER = "precomputed.npy"
CACHE_FORMAT = 5  # 5: id_features and id_kps in every record, the identity encoder in the fingerprint
FIELDS = {"latent": ("latent_moments", (3,)), "text": ("text_embeds", (2,)), "text_pooled": ("text_pooled", (1,)),  # field: (batch key, ranks)
          "text_no_identity": ("text_embeds_no_identity", (2,)), "text_pooled_no_identity": ("text_pooled_no_identity", (1,)),
          "pe_map": ("pe_map", (3,)), "id_image": ("id_image", (3,)), "id_mask": ("id_mask", (2,)), "id_kps": ("id_kps", (2,)),
          "id_features": ("id_features", (1, 2))}




def stored_arrays(raw: Mapping[str, Any], key: str) -> dict[str, np.ndarray]:
    """A raw sample's precomputed arrays under the batch keys the training step reads (empty without a cache).

    The record is never unpickled; a wrong layout or non-finite values make the sample a ``bad_precomputed``.
    """
    if MEMBER not in raw:
        return {}
    try:
        rec = np.load(io.BytesIO(raw[MEMBER]), allow_pickle=False)
        names = rec.dtype.names or ()
    except Exception as exc:
        raise SampleError("bad_precomputed", key, f"unreadable {MEMBER} ({type(exc).__name__}: {exc})") from None
    if "latent" not in names or "text" not in names:
        raise SampleError("bad_precomputed", key, f"{MEMBER} has fields {names}, expected latent and text")
    out = {}
    for name in names:
        batch_key, ranks = FIELDS.get(name, (None, ()))
        arr = np.asarray(rec[name])
        if batch_key is None or arr.ndim not in ranks:
            raise SampleError("bad_precomputed", key, f"{MEMBER} field {name!r} has shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise SampleError("bad_precomputed", key, f"{MEMBER} field {name!r} contains NaN or Inf")
        out[batch_key] = arr
    return out


def cache_info(backbone, cfg) -> dict:
    """What a cache must match: the backbone's and the identity encoder's fingerprints and the settings that shape
    an example."""

    return {"format": CACHE_FORMAT, "resolution": int(cfg.data.resolution), "local_latent_size": int(cfg.model.local.latent_size),
            "crop_expand": float(cfg.model.local.crop_expand), "id_image_size": int(cfg.model.id_encoder.image_size),
            "id_encoder": encoder_fingerprint(cfg.model.id_encoder), **backbone.fingerprint()}


def cache_diff(info: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The keys of a cache's record that differ from ``expected``, each as (in the cache, now)."""
    return {k: (info.get(k), v) for k, v in expected.items() if info.get(k) != v}


def check_cache(path: str, expected: Mapping[str, Any]) -> list[str]:
    """The precomputed folder's shards, after checking it was made for this backbone and resolution."""
    info_path = os.path.join(path, INFO_FILE)
    if not os.path.exists(info_path):
        raise FileNotFoundError(f"data.precomputed='{path}' has no {INFO_FILE}: not a finished `realisid precompute` output; "
                                "run `make precompute EXP=<experiment>` (or unset data.precomputed)")
    with open(info_path) as f:
        info = json.load(f)
    if not info.get("complete"):
        raise ValueError(f"data.precomputed='{path}': its `realisid precompute` run did not finish; run it again (finished shards "
                         "are kept) or unset data.precomputed")
    diff = cache_diff(info, expected)
    if diff:
        what = "; ".join(f"{k}: cache {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"data.precomputed='{path}' was made for another setup ({what}){_encoder_note(info, diff)}; re-run "
                         "`make precompute` for this experiment, or unset data.precomputed")
    return check_shards_exist([os.path.join(path, s) for s in info["shards"]], "data.precomputed")


def _encoder_note(info: Mapping[str, Any], diff: Mapping[str, Any]) -> str:
    if "id_encoder" not in diff:
        return ""
    if not info.get("id_encoder"):
        return ": it holds no identity features (made before precompute cached them)"
    return ": its identity features come from another model.id_encoder"
