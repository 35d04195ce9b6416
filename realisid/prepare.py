"""First-run preparation of the embedded default: synthetic shards, stand-in encoder, tiny base model.

Each artifact is written to its cache folder under data/ once and reused on later runs; every log line
names the stand-ins as stand-ins. Real experiments set ``prepare.enabled: false`` and skip all of this.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import time

from omegaconf import DictConfig

log = logging.getLogger(__name__)


def _done(path: str) -> bool:
    return os.path.exists(os.path.join(path, "PREPARED.json"))


def _mark(path: str, stats: dict) -> None:
    with open(os.path.join(path, "PREPARED.json"), "w") as f:
        json.dump(stats, f, indent=2)


def prepare_embedded_default(cfg: DictConfig) -> dict:
    """Build whatever of the embedded default is missing; returns what was built or found, with stats."""
    p = cfg.prepare
    out: dict = {}
    if not p.enabled:
        return out
    t0 = time.time()
    syn = p.synthetic
    if not _done(syn.out_dir):
        from realisid.data.synthetic import generate_synthetic_shards

        log.info("preparing synthetic face shards in %s (first run only)", syn.out_dir)
        manifests = generate_synthetic_shards(syn.out_dir, num_identities=syn.num_identities, images_per_identity=syn.images_per_identity,
                                              val_identities=syn.val_identities, image_size=syn.image_size, shard_size=syn.shard_size,
                                              seed=syn.seed)
        _mark(syn.out_dir, {k: {"kept": v["kept"], "face_size_bins": v["face_size_bins"]} for k, v in manifests.items()})
    out["synthetic"] = json.load(open(os.path.join(syn.out_dir, "PREPARED.json")))
    train_urls = sorted(glob.glob(os.path.join(syn.out_dir, "train-*.tar")))
    val_urls = sorted(glob.glob(os.path.join(syn.out_dir, "val-*.tar")))

    st = p.standin
    if not _done(st.out_dir):
        from realisid.faces.standin import train_standin

        log.info("training the stand-in identity encoder on the synthetic identities (first run only)")
        stats = train_standin(train_urls, val_urls, st.out_dir, steps=st.steps, image_size=st.image_size, embed_dim=st.embed_dim,
                              seed=cfg.experiment.seed)
        _mark(st.out_dir, stats)
    out["standin"] = json.load(open(os.path.join(st.out_dir, "PREPARED.json")))
    ev = p.eval_standin
    if not _done(ev.out_dir):
        from realisid.faces.standin import train_standin

        log.info("training the evaluation stand-in encoder (seed %d, separate from the conditioning one; first run only)", ev.seed)
        _mark(ev.out_dir, train_standin(train_urls, val_urls, ev.out_dir, steps=st.steps, image_size=st.image_size,
                                        embed_dim=st.embed_dim, seed=int(ev.seed)))
    out["eval_standin"] = json.load(open(os.path.join(ev.out_dir, "PREPARED.json")))

    b = p.base
    if not _done(b.out_dir):
        from realisid.models.tiny_base import train_tiny_base

        log.info("training the tiny base text-to-image model on the synthetic faces (first run only)")
        stats = train_tiny_base(cfg.model, b, train_urls, int(cfg.data.resolution), b.out_dir, seed=cfg.experiment.seed)
        _mark(b.out_dir, stats)
    out["base"] = json.load(open(os.path.join(b.out_dir, "PREPARED.json")))
    out["seconds"] = round(time.time() - t0, 1)
    return out


def wait_for_prepared(cfg: DictConfig, timeout_s: float = 3600.0) -> dict:
    """Ranks other than 0 wait for rank 0 to finish preparing (each artifact's PREPARED.json marker)."""
    if not cfg.prepare.enabled:
        return {}
    p = cfg.prepare
    folders = [p.synthetic.out_dir, p.standin.out_dir, p.eval_standin.out_dir, p.base.out_dir]
    t0 = time.time()
    while not all(_done(f) for f in folders):
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"rank 0 has not prepared {', '.join(f for f in folders if not _done(f))} after {timeout_s:.0f} s; "
                               "run `make prepare` once before launching several ranks")
        time.sleep(2.0)
    return {"waited_s": round(time.time() - t0, 1)}
