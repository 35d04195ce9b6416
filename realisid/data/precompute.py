"""``realisid precompute``: VAE latents, text embeddings and identity features stored beside each training sample.

The frozen VAE, text encoder(s) and identity encoder give the same output for a sample every time they see it,
so running them every step is wasted work. This writes, for each train shard, a shard of the same name in
``OUT`` holding every member of the original samples plus

``precomputed.npy``, one structured record (one tar member and one header to parse per sample) with fields

- ``latent`` (2C, h, w): the VAE posterior's parameters (mean and log-variance) of the sample's training image at
  ``data.resolution``; training samples from it with the step's generator, exactly as encoding on the fly does,
  so the noise draws and the loss are the same;
- ``text`` (L, D) and, for SDXL, ``text_pooled`` (P,): the caption's text embeddings. Dropped captions use the
  empty prompt's embedding, computed once; ``text_no_identity`` (and ``text_pooled_no_identity``): the same for
  the identity-free caption (``data.identity_free_captions``);
- ``pe_map`` (P, P, 3), ``id_image`` (S, S, 3) and ``id_mask`` (S, S), uint8: the example's drawn guidance and
  reference crop, exactly as the pipeline makes them, so training from the cache decodes no JPEG at all;
  ``id_kps`` (5, 2) float32: the reference face's key points in ``id_image`` pixels;
- ``id_features`` (D,) or (N, D): the configured identity encoder's (``model.id_encoder``) output for that
  ``id_image`` with its mask and key points, so training runs no identity encoder either. Stored in the cache's
  dtype like the latents (``--dtype fp16`` halves a CLIP token sequence, the largest field of a CLIP cache).

``OUT/precomputed.json`` records what the arrays depend on: the backbone's fingerprint, the identity encoder's
(``id_encoder``, see :func:`realisid.models.id_encoder.encoder_fingerprint`) and the example settings
(resolution, local latent size, crop expansion, identity crop size); a training run whose config does not
match is refused with the difference named. Shards are written to
``.tar.tmp`` and renamed when complete, and a rerun skips shards already complete, so an interrupted run
loses nothing. Set ``data.precomputed=OUT`` to train from it.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch

from realisid.data.batch import collate
from realisid.data.cache_format import INFO_FILE, MEMBER, cache_diff, cache_info
from realisid.data.example import ExampleMaker
from realisid.data.shards import check_shards_exist, expand_shards
from realisid.data.stream import skip_bad_tar
from realisid.io import atomic_write_json, encode_array
from realisid.models.backbone import DTYPES, load_backbone
from realisid.models.id_encoder import build_id_encoder

log = logging.getLogger(__name__)

def precompute(cfg, out_dir: str, batch_size: int = 32, dtype: str = "fp32") -> dict:
    """Write the cache for ``cfg.data.train_shards`` into ``out_dir``; returns a summary."""
    import time

    from webdataset import TarWriter
    from webdataset.tariterators import tarfile_samples

    t0 = time.time()
    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"--dtype {dtype!r}; valid: fp32 (exact), fp16 (half the space)")
    np_dtype = np.float32 if dtype == "fp32" else np.float16
    urls = check_shards_exist(expand_shards(cfg.data.train_shards), "data.train_shards")
    names = [os.path.basename(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError("data.train_shards has two shards with the same file name; precompute writes one shard per name")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(cfg.model, seed=int(cfg.experiment.seed)).to(device)
    frozen_dtype = DTYPES[cfg.model.backbone_dtype]
    backbone.to(frozen_dtype)
    info = {**cache_info(backbone, cfg), "dtype": dtype}
    os.makedirs(out_dir, exist_ok=True)
    info_path = os.path.join(out_dir, INFO_FILE)
    if os.path.exists(info_path):  # a rerun continues only the same cache
        with open(info_path) as f:
            old = json.load(f)
        diff = [f"{k}: {a!r} vs now {b!r}" for k, (a, b) in cache_diff(old, info).items()]
        if diff:
            raise ValueError(f"'{out_dir}' holds a cache made for another setup ({'; '.join(diff)}); give another --out or delete it")
    elif any(n.endswith(".tar") for n in os.listdir(out_dir)):
        raise ValueError(f"'{out_dir}' holds shards but no {INFO_FILE}: not a precompute output; give another --out")
    encoder = build_id_encoder(cfg.model.id_encoder).to(device)
    if frozen_dtype != torch.float32:
        encoder.to_frozen_dtype(frozen_dtype)  # as training runs it (realisid.modules.efficiency)
    atomic_write_json(info_path, {**info, "complete": False, "shards": []})  # written first, so a rerun can check what it continues
    maker = ExampleMaker(embed_dim=cfg.data.get("embed_dim"), resolution=int(cfg.data.resolution), vae_scale_factor=backbone.vae_scale_factor,
                         local_latent_size=int(cfg.model.local.latent_size), crop_expand=float(cfg.model.local.crop_expand),
                         id_image_size=int(cfg.model.id_encoder.image_size), soft_location=bool(cfg.model["global"].soft_location))
    counts = {"written": 0, "skipped_shards": 0, "rejected": 0}

    def flush(writer, pending):
        if not pending:
            return
        batch = collate([ex for _, ex in pending])
        moments = backbone.latent_moments(batch["image"].to(device)).float().cpu().numpy()
        embeds, pooled = backbone.text_embeddings(batch["caption"])
        embeds = embeds.float().cpu().numpy()
        pooled = pooled.float().cpu().numpy() if pooled is not None else None
        free, free_pooled = backbone.text_embeddings(batch["caption_no_identity"])
        free = free.float().cpu().numpy()
        free_pooled = free_pooled.float().cpu().numpy() if free_pooled is not None else None
        id_feats = encoder(batch["id_image"].to(device), batch["id_mask"].to(device), kps=batch["id_kps"].to(device)).float().cpu().numpy()
        finite = np.isfinite(id_feats.astype(np_dtype)).reshape(len(pending), -1).all(axis=1)
        if not finite.all():  # the reader would refuse these records one by one: stop here instead
            bad = [pending[i][1]["key"] for i in np.flatnonzero(~finite)]
            raise FloatingPointError(f"the identity encoder {encoder.name} gave features that are NaN/Inf in {dtype} for samples "
                                     f"{bad[:5]}; use --dtype fp32, or check model.id_encoder and model.backbone_dtype="
                                     f"{cfg.model.backbone_dtype}; finished shards are kept")
        ex0 = pending[0][1]
        fields = [("latent", np_dtype, moments.shape[1:]), ("text", np_dtype, embeds.shape[1:]),
                  ("pe_map", np.uint8, tuple(ex0["pe_map"].shape)), ("id_image", np.uint8, tuple(ex0["id_image"].shape)),
                  ("id_mask", np.uint8, tuple(ex0["id_mask"].shape[-2:])), ("id_kps", np.float32, (5, 2)),
                  ("id_features", np_dtype, id_feats.shape[1:])]
        fields.append(("text_no_identity", np_dtype, free.shape[1:]))
        if pooled is not None:
            fields += [("text_pooled", np_dtype, pooled.shape[1:]), ("text_pooled_no_identity", np_dtype, free_pooled.shape[1:])]
        for i, (raw, ex) in enumerate(pending):
            sample = {k: v for k, v in raw.items() if k == "__key__" or not k.startswith("__")}
            record = np.zeros((), dtype=fields)
            record["latent"], record["text"], record["text_no_identity"] = moments[i], embeds[i], free[i]
            record["pe_map"], record["id_image"] = ex["pe_map"].numpy(), ex["id_image"].numpy()
            record["id_mask"] = ex["id_mask"][0].numpy().round()  # a 0/1 mask
            record["id_kps"], record["id_features"] = ex["id_kps"].numpy(), id_feats[i]
            if pooled is not None:
                record["text_pooled"], record["text_pooled_no_identity"] = pooled[i], free_pooled[i]
            sample[MEMBER] = encode_array(record)
            writer.write(sample)
        counts["written"] += len(pending)
        pending.clear()

    done = []
    for url, name in zip(urls, names):
        final = os.path.join(out_dir, name)
        if os.path.exists(final):  # complete shards are renamed into place; a rerun keeps them
            counts["skipped_shards"] += 1
            done.append(name)
            continue
        tmp = final + ".tmp"
        writer = TarWriter(tmp, mtime=0)
        pending: list = []
        try:
            for raw in tarfile_samples([{"url": url}], handler=skip_bad_tar):
                ex = maker(raw)
                if ex is None:
                    counts["rejected"] += 1
                    continue
                pending.append((raw, ex))
                if len(pending) >= batch_size:
                    flush(writer, pending)
            flush(writer, pending)
        except BaseException:
            writer.close()
            raise
        writer.close()
        os.replace(tmp, final)
        done.append(name)
        log.info("precomputed %s", final)
    atomic_write_json(info_path, {**info, "complete": True, "shards": done, "source": [str(u) for u in urls],
                            "backbone_dtype": str(cfg.model.backbone_dtype)})
    counts.update(out=out_dir, shards=len(done), seconds=round(time.time() - t0, 1))
    return counts
