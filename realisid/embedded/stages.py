"""The embedded default's cached stages: a stage's folder holds ``DONE.json`` once it is finished (so an interrupted
``make pretrain`` resumes where it stopped), and the synthetic face shards every stage trains on."""
from __future__ import annotations

import glob
import json
import logging
import os
import time

from omegaconf import DictConfig, OmegaConf

from realisid.embedded.synthetic import generate_synthetic_shards
from realisid.io import atomic_write_json

log = logging.getLogger(__name__)


def stage_done(path: str) -> dict | None:
    marker = os.path.join(path, "DONE.json")
    if os.path.exists(marker):
        with open(marker) as f:
            return json.load(f)
    return None


def mark_done(path: str, stats: dict) -> dict:
    os.makedirs(path, exist_ok=True)
    atomic_write_json(os.path.join(path, "DONE.json"), stats)
    return stats


def synthetic_shards(cfg: DictConfig) -> dict:
    """The embedded default's synthetic shards (written once; the marker holds the manifests' summary)."""
    syn = cfg.prepare.synthetic
    done = stage_done(syn.out_dir)
    settings = OmegaConf.to_container(syn, resolve=True)
    if done is not None and done.get("settings") == settings:
        return done
    if done is not None:
        raise ValueError(f"{syn.out_dir} holds synthetic shards made with other settings ({done.get('settings')}); "
                         f"delete the folder (make clean-cache) to draw them again with {settings}")
    log.info("drawing the synthetic face shards in %s (first run only)", syn.out_dir)
    t0 = time.perf_counter()
    manifests = generate_synthetic_shards(syn.out_dir, num_identities=syn.num_identities, images_per_identity=syn.images_per_identity,
                                          val_identities=syn.val_identities, image_size=syn.image_size, shard_size=syn.shard_size,
                                          seed=syn.seed, ref_choices=syn.ref_choices, backgrounds=list(syn.backgrounds))
    return mark_done(syn.out_dir, {"settings": settings, "seconds": round(time.perf_counter() - t0, 1),
                               **{k: {"kept": v["kept"], "face_size_bins": v["face_size_bins"]} for k, v in manifests.items()}})


def shard_urls(cfg: DictConfig, split: str) -> list[str]:
    return sorted(glob.glob(os.path.join(cfg.prepare.synthetic.out_dir, f"{split}-*.tar")))
