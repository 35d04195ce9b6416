"""First-run preparation of the embedded default: the synthetic face shards, and a check that the stand-in
models it loads by path exist.

The stand-in models (tiny base, identity encoders, face analyzer) are trained once by ``make pretrain``
(:mod:`realisid.embedded.pretrain`) and shipped with the package; only the shards are drawn here, once, and
cached. Real experiments set ``prepare.enabled: false`` and skip all of this.
"""
from __future__ import annotations

import logging
import os
import time

from omegaconf import DictConfig
from realisid.embedded.stages import synthetic_shards

log = logging.getLogger(__name__)


def stand_in_paths(cfg: DictConfig) -> dict[str, str]:
    """The stand-in model folders this config loads (only those it actually uses)."""
    out = {}
    if cfg.model.get("pretrained"):
        out["base model (model.pretrained)"] = str(cfg.model.pretrained)
    if cfg.model.id_encoder.kind == "standin":
        out["conditioning encoder (model.id_encoder.path)"] = str(cfg.model.id_encoder.path)
    if cfg.evaluation.encoder == "standin":
        out["evaluation encoder (evaluation.standin_path)"] = str(cfg.evaluation.standin_path)
    if cfg.faces.kind == "synthetic" and cfg.faces.get("model_dir"):
        out["face analyzer (faces.model_dir)"] = str(cfg.faces.model_dir)
        if cfg.faces.get("recognizer"):
            out["face analyzer's encoder (faces.recognizer)"] = str(cfg.faces.recognizer)
    return out


def check_stand_ins(cfg: DictConfig) -> dict[str, str]:
    """Every stand-in folder the config names must exist; the error names each missing one and the fix."""
    paths = stand_in_paths(cfg)
    missing = [f"{what}: {p}" for what, p in paths.items() if not os.path.isdir(p)]
    if missing:
        raise FileNotFoundError("the embedded default's stand-in models are missing (" + "; ".join(missing) + "); they ship with the "
                                "package: reinstall it (make setup) or train them again with `make pretrain`")
    return paths


def prepare_embedded_default(cfg: DictConfig) -> dict:
    """Draw the synthetic shards if missing and check the shipped stand-ins; returns what was found, with stats."""
    if not cfg.prepare.enabled:
        return {}

    t0 = time.time()
    out = {"synthetic": synthetic_shards(cfg), "stand_ins": check_stand_ins(cfg)}
    out["seconds"] = round(time.time() - t0, 1)
    return out


def wait_for_prepared(cfg: DictConfig, timeout_s: float = 3600.0) -> dict:
    """Ranks other than 0 wait for rank 0 to finish drawing the shards (the folder's DONE.json marker)."""
    if not cfg.prepare.enabled:
        return {}
    marker = os.path.join(cfg.prepare.synthetic.out_dir, "DONE.json")
    t0 = time.time()
    while not os.path.exists(marker):
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"rank 0 has not drawn the synthetic shards ({marker}) after {timeout_s:.0f} s; "
                               "run `make prepare` once before launching several ranks")
        time.sleep(2.0)
    return {"waited_s": round(time.time() - t0, 1)}
