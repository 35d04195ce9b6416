"""``make pretrain``: train the embedded default's stand-in models once and write them into the package.

Stages, each cached in ``pretrain.work_dir`` so an interrupted recipe resumes where it stopped:

1. the synthetic face shards (the same ones ``make train`` draws: same generator, seed and sizes);
2. the base model's VAE, its latent scale, the training latents;
3. the base model's UNet and text encoder (EMA weights; resumable inside the stage), then two continuation
   phases, each from the previous phase's EMA weights with a fresh optimizer and schedule: timesteps shifted
   toward high noise (``pretrain.unet_refine``), then a loss weighted toward the heads (``pretrain.unet_heads``), then
   optionally a longer run of the heads recipe (``pretrain.unet_more``, off by default: hours on a CPU, minutes on a GPU);
   ``steps: 0`` skips a phase, and the last phase that ran is what ships; ``pretrain.from_shipped`` takes the stages
   that the shipped assets already hold (same recipe) as done, so a continuation starts from the shipped base, and
   with ``pretrain.extend`` a base that already ran ``unet_more`` runs it once more (a long run in rounds);
4. the two stand-in identity encoders (conditioning, and evaluation with another seed);
5. the synthetic face analyzer (detector + 5 points), with its accuracy on held-out identities;
6. the base check: samples from held-out captions, 30 DDIM steps, the analyzer counts the faces it finds.

The result goes to ``pretrain.out_dir`` (the package's ``realisid/assets/`` by default): a diffusers folder
``tiny-sd/`` (UNet weights stored in float16 to fit the package budget; loaded as float32), the encoder and
analyzer folders, ``base_samples.png`` and ``PRETRAINED.json`` with every setting, statistic and wall time.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from realisid.embedded import analyzer as D
from realisid.embedded import base as B
from realisid.embedded.assets import RECORD
from realisid.embedded.base import vae_round_trip
from realisid.embedded.check import base_check, held_out_captions, save_framed_grid
from realisid.embedded.stages import mark_done as _mark, shard_urls, stage_done as _stage_done, synthetic_shards
from realisid.embedded.standin import train_standin
from realisid.geometry import bins_from_config
from realisid.io import atomic_write_json
from realisid.machine import describe_machine
from realisid.models.backbone import build_tiny_backbone, load_pretrained_backbone, save_backbone

log = logging.getLogger(__name__)


# the UNet phases after phase 1, in order: config key, cached stage folder, checkpoint file, seed offset, log name
CONTINUATIONS = (("unet_refine", "tiny-sd-refined", "unet-refine-stage.pt", 3, "base UNet refinement"),
                 ("unet_heads", "tiny-sd-heads", "unet-heads-stage.pt", 11, "base UNet heads"),
                 ("unet_more", "tiny-sd-more", "unet-more-stage.pt", 17, "base UNet more heads"))
# every UNet phase, phase 1 included: its cached stage folder and the checkpoint it resumes from, in the work folder
UNET_PHASE_FILES = {"unet": ("tiny-sd", "unet-stage.pt"), **{key: (folder, stage_file) for key, folder, stage_file, *_ in CONTINUATIONS}}


def pretrain(cfg: DictConfig) -> dict:
    """Run every stage that is not done yet; returns the record written to ``out_dir/PRETRAINED.json``."""
    p = cfg.pretrain
    seed = int(cfg.experiment.seed)
    work, out = str(p.work_dir), str(p.out_dir)
    if p.get("extend") and not p.get("from_shipped"):
        raise ValueError("pretrain.extend=true runs unet_more again on a base that already ran it: give that base's folder as "
                         "pretrain.from_shipped (e.g. the pretrain.out_dir of the run before), or drop pretrain.extend")
    os.makedirs(work, exist_ok=True)
    t_all = time.perf_counter()
    architecture = OmegaConf.to_container(cfg.model.tiny, resolve=True)
    claim_work_dir(work, architecture)
    claim_stages(work, stage_recipes(cfg))
    record: dict[str, Any] = {"recipe": OmegaConf.to_container(p, resolve=True), "architecture": architecture,
                              "synthetic": synthetic_shards(cfg), "machine": describe_machine(host=False), "stages": {}}
    threads = int(p.threads) if p.get("threads") else torch.get_num_threads()
    torch.set_num_threads(threads)
    device = training_device(p.get("device", "auto"))
    record["device"] = str(device)
    resolution = int(cfg.data.resolution)
    data = B.load_image_set(shard_urls(cfg, "train"), resolution)
    log.info("pretrain: %d training images at %d px, %d threads; VAE, UNet and samples on %s", len(data), resolution, threads, device)
    extended = None  # with pretrain.extend: the round before, recorded under stages.unet_more.extends
    if p.get("from_shipped"):
        seeded, extended = seed_from_shipped(cfg, str(p.from_shipped), work)
        log.info("pretrain: stages %s taken from %s as they shipped", ", ".join(seeded) or "(none: all were already done)",
                 p.from_shipped)

    # ---- 2. VAE
    bb = build_tiny_backbone(cfg.model.tiny, seed)
    vae_dir = os.path.join(work, "vae")
    stats = _stage_done(vae_dir)
    if stats is None:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(seed)
        bb.vae.to(device)
        stats = B.train_vae(bb.vae, data, steps=int(p.vae.steps), batch_size=int(p.vae.batch_size), lr=float(p.vae.lr),
                            crop=int(p.vae.crop), kl_weight=float(p.vae.kl_weight), generator=g)
        moments = B.encode_moments(bb.vae, data.images)
        stats["latent_scale"] = B.set_latent_scale(bb.vae, moments)
        stats["recon_mse"] = B.reconstruction_mse(bb.vae, data)
        stats["seconds"] = round(time.perf_counter() - t0, 1)
        stats["device"] = str(device)
        bb.vae.to("cpu")
        bb.vae.save_pretrained(vae_dir)
        torch.save(moments, os.path.join(vae_dir, "moments.pt"))
        _mark(vae_dir, stats)
    else:
        from diffusers import AutoencoderKL

        bb.vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
        if not os.path.exists(os.path.join(vae_dir, "moments.pt")):  # a VAE taken as it shipped: encode the latents once
            torch.save(B.encode_moments(bb.vae, data.images), os.path.join(vae_dir, "moments.pt"))
    record["stages"]["vae"] = stats
    moments = torch.load(os.path.join(vae_dir, "moments.pt"))
    log.info("pretrain: VAE reconstruction MSE %.4f (faces %.4f), latent scale %.3f", stats["recon_mse"]["image"],
             stats["recon_mse"]["face"], stats["latent_scale"])

    # ---- 3. UNet + text encoder; then the continuation phases, each from the previous phase's EMA weights
    u = p.unet
    base_dir, stage_file = (os.path.join(work, f) for f in UNET_PHASE_FILES["unet"])
    record["stages"]["unet"] = _unet_stage(bb, moments, data, u, base_dir, seed=seed + 1, steps=int(u.steps), batch_size=int(u.batch_size),
                                           lr=float(u.lr), checkpoint=stage_file, device=device)
    bb = _phase_result(base_dir, bb)  # what users load: the float16-stored UNet, read back as float32
    for key, folder, stage_file, offset, what in CONTINUATIONS:
        r = p.get(key)
        if r is None or int(r.steps) <= 0:
            continue
        base_dir = os.path.join(work, folder)
        record["stages"][key] = _unet_stage(bb, moments, data, u, base_dir, seed=seed + offset, steps=int(r.steps), batch_size=int(r.batch_size),
                                            lr=float(r.lr), checkpoint=os.path.join(work, stage_file), timestep_shift=float(r.timestep_shift),
                                            face_weight=float(r.face_weight), what=what, device=device)
        bb = _phase_result(base_dir, bb)
    if extended is not None and "unet_more" in record["stages"]:
        record["stages"]["unet_more"] = {**record["stages"]["unet_more"], "extends": extended}

    # ---- 4. stand-in identity encoders
    train_urls, val_urls = shard_urls(cfg, "train"), shard_urls(cfg, "val")
    st = cfg.prepare.standin
    for name, s in (("standin-arcface", seed), ("standin-arcface-eval", int(cfg.prepare.eval_standin.seed))):
        d = os.path.join(work, name)
        stats = _stage_done(d)
        if stats is None:
            stats = _mark(d, train_standin(train_urls, val_urls, d, steps=int(st.steps), image_size=int(st.image_size),
                                           embed_dim=int(st.embed_dim), seed=s, num_threads=threads))
        record["stages"][name] = {k: stats[k] for k in ("verification_accuracy", "auc", "mean_same_cos", "mean_diff_cos", "total_seconds",
                                                                    "seeded_from") if k in stats}

    # ---- 5. synthetic face analyzer
    det_dir = os.path.join(work, "synthetic-face-analyzer")
    stats = _stage_done(det_dir)
    val = B.load_image_set(val_urls, resolution)
    if stats is None:
        t0 = time.perf_counter()
        d = p.detector
        gen = torch.Generator().manual_seed(seed + 2)
        extra_index = torch.randperm(len(data), generator=gen)[: int(d.vae_copies)]
        extra = vae_round_trip(bb.vae, data.images[extra_index])
        model, stats = D.train_detector(data.images, data.boxes, data.kps, steps=int(d.steps), batch_size=int(d.batch_size),
                                        lr=float(d.lr), seed=seed, extra_images=extra, extra_index=extra_index, input_size=resolution,
                                        negative_p=float(d.negative_p))
        analyzer = D.SyntheticFaceAnalyzer(model, resolution, float(d.threshold))
        bins = bins_from_config(cfg.bins)
        stats["accuracy_held_out"] = D.detector_accuracy(analyzer, val.images, val.boxes, val.kps, bins)
        stats["accuracy_held_out_through_vae"] = D.detector_accuracy(analyzer, vae_round_trip(bb.vae, val.images), val.boxes, val.kps, bins)
        stats["negatives_held_out"] = D.negative_accuracy(analyzer, val.images, val.boxes, seed=seed)
        stats["seconds"] = round(time.perf_counter() - t0, 1)
        D.save_detector(model, det_dir, input_size=resolution, threshold=float(d.threshold), stats=stats)
        _mark(det_dir, stats)
    record["stages"]["synthetic-face-analyzer"] = stats

    # ---- 6. base check: does the base draw people from noise?
    analyzer = D.load_synthetic_analyzer(det_dir)
    c = p.check
    prompts = held_out_captions(val.captions, int(c.samples), seed)
    t0 = time.perf_counter()
    images, found = base_check(bb.to(device), analyzer, prompts, steps=int(c.steps), guidance=float(c.guidance), seed=seed)
    bb.to("cpu")
    record["base_check"] = {"prompts": prompts, "faces_found": [bool(f) for f in found], "found": int(sum(found)), "samples": len(found),
                            "steps": int(c.steps), "guidance": float(c.guidance), "seconds": round(time.perf_counter() - t0, 1)}
    log.info("pretrain: the base drew a face the analyzer found in %d of %d samples from held-out captions", sum(found), len(found))

    # ---- write the package assets
    os.makedirs(out, exist_ok=True)
    sources = {"tiny-sd": base_dir, **{n: os.path.join(work, n) for n in ("standin-arcface", "standin-arcface-eval", "synthetic-face-analyzer")}}
    for name, src in sources.items():
        dst = os.path.join(out, name)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("DONE.json", "*.tmp"))
    save_framed_grid(images, found, os.path.join(out, "base_samples.png"))
    record["seconds_total_this_run"] = round(time.perf_counter() - t_all, 1)
    record["seconds_by_stage"] = {k: v.get("seconds", v.get("total_seconds")) for k, v in record["stages"].items()}
    record["megabytes"] = round(_folder_bytes(out) / 2**20, 2)
    if record["megabytes"] > float(p.max_megabytes):
        raise ValueError(f"the shipped models take {record['megabytes']} MB, over pretrain.max_megabytes={p.max_megabytes}; "
                         "shrink the UNet (model.tiny.unet.block_out_channels) or raise the budget on purpose")
    with open(os.path.join(out, RECORD), "w") as f:
        json.dump(record, f, indent=2)
    log.info("pretrain: wrote %s (%.1f MB) in %.0f s", out, record["megabytes"], record["seconds_total_this_run"])
    return record


def _unet_stage(bb, moments, data, u: DictConfig, out_dir: str, *, seed: int, steps: int, batch_size: int, lr: float,
                checkpoint: str, timestep_shift: float = 1.0, face_weight: float = 0.0, what: str = "base UNet",
                device: torch.device = torch.device("cpu")) -> dict:
    """One cached UNet stage: train ``bb`` from the weights it holds (shared settings from ``pretrain.unet``) on
    ``device``, save the EMA weights to ``out_dir`` with the UNet in float16; a finished stage is only read back."""
    stats = _stage_done(out_dir)
    if stats is not None:
        return stats
    t0 = time.perf_counter()
    bb.to(device)
    stats = B.train_unet(bb, moments, data, steps=steps, batch_size=batch_size, lr=lr, weight_decay=float(u.weight_decay),
                         ema_decay=float(u.ema_decay), min_snr_gamma=float(u.min_snr_gamma),
                         caption_probs=OmegaConf.to_container(u.captions), generator=torch.Generator().manual_seed(seed),
                         checkpoint=checkpoint, checkpoint_every=int(u.checkpoint_every), timestep_shift=timestep_shift,
                         face_weight=face_weight, what=what)
    stats["seconds"] = round(time.perf_counter() - t0, 1)
    stats["device"] = str(device)
    bb.to("cpu")
    save_backbone(bb, out_dir, half_unet=True)
    _mark(out_dir, stats)
    return stats


def training_device(setting) -> torch.device:
    """``pretrain.device``: ``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``. On a GPU, float32
    matrix products use TF32 (the models stay float32; the weights ship as they always do)."""
    from realisid.pipeline import resolve_device

    device = resolve_device(None if setting is None else str(setting), what="pretrain.device")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


WORK_ARCHITECTURE = "ARCHITECTURE.json"


def claim_work_dir(work: str, architecture: dict) -> None:
    """A work folder's finished stages are reused as they are, so they must have been trained for this config's
    ``model.tiny``: the first run records it in ``work/ARCHITECTURE.json``, a later run with another one is refused
    before anything trains (a folder from before the record existed is claimed as it stands)."""
    path = os.path.join(work, WORK_ARCHITECTURE)
    if os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f)
        if theirs != architecture:
            raise ValueError(f"pretrain.work_dir={work} holds stages trained for another model.tiny "
                             f"({_differences(theirs, architecture, there='there')}); give this architecture its own "
                             "pretrain.work_dir (and pretrain.out_dir), or set model.tiny back")
        return
    atomic_write_json(path, architecture)


WORK_RECIPES = "RECIPES.json"


def stage_recipes(cfg: DictConfig) -> dict[str, dict]:
    """What each stage's result depends on: the seed, the synthetic data, its own ``pretrain.<key>`` section and those
    of the stages it trains from (a UNet phase on the VAE and the phases before it; the analyzer on the VAE, through
    which it sees copies of its training images). Settings that change only speed or bookkeeping are left out."""
    p = cfg.pretrain

    def section(key: str, drop: tuple[str, ...] = ()) -> dict:
        return {k: v for k, v in OmegaConf.to_container(p[key], resolve=True).items() if k not in drop}

    synthetic = {k: v for k, v in OmegaConf.to_container(cfg.prepare.synthetic, resolve=True).items() if k != "out_dir"}
    common = {"seed": int(cfg.experiment.seed), "synthetic": synthetic}
    vae = {**common, "vae": section("vae")}
    chain = {**vae, "unet": section("unet", drop=("checkpoint_every",))}
    out = {"vae": vae, "unet": chain}
    for key, *_ in CONTINUATIONS:
        if key == "unet_more" and p.get("extend") and p.get("from_shipped"):
            # its start is the shipped base, which already ran this phase: not the phases above in this folder
            chain = {**chain, "extends": os.path.abspath(str(p.from_shipped))}
            last = [k for k in out if k.startswith("unet")][-1]
            out[last] = chain
        if p.get(key) is not None and int(p[key].steps) > 0:
            chain = {**chain, key: section(key)}
            out[key] = chain
    standin = OmegaConf.to_container(cfg.prepare.standin, resolve=True)
    out["standin-arcface"] = {**common, "standin": standin}
    out["standin-arcface-eval"] = {**common, "standin": standin, "seed": int(cfg.prepare.eval_standin.seed)}
    out["synthetic-face-analyzer"] = {**vae, "detector": section("detector")}
    return out


def _stage_files(work: str, stage: str) -> list[str]:
    """The stage's folder in ``work``, and for a UNet phase the checkpoint it resumes from."""
    return [os.path.join(work, f) for f in UNET_PHASE_FILES.get(stage, (stage,))]


def claim_stages(work: str, recipes: dict[str, dict]) -> None:
    """A work folder's finished (or half-trained) stages are reused as they are, so they must come from this config's
    recipe: each stage's recipe is recorded in ``work/RECIPES.json`` and a run whose recipe differs for a stage that has
    started there is refused before anything trains, naming the settings and the files to delete. A stage that has
    not started takes this run's recipe; one started before the record existed is claimed as it stands."""
    path = os.path.join(work, WORK_RECIPES)
    recorded: dict = {}
    if os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
    clashes = []
    for stage, recipe in recipes.items():
        files = _stage_files(work, stage)
        started = _stage_done(files[0]) is not None or any(os.path.exists(f) for f in files[1:])
        if started and stage in recorded and recorded[stage] != recipe:
            clashes.append(f"'{stage}' ({_differences(recorded[stage], recipe, there='there')}; delete "
                           f"{' and '.join(files)} to train it again)")
    if clashes:
        raise ValueError(f"pretrain.work_dir={work} holds stages trained with another recipe: {'; '.join(clashes)}. A finished "
                         "stage does not train on with new settings: give this recipe its own pretrain.work_dir (and "
                         "pretrain.out_dir), set the settings back, or delete the stages named")
    merged = {**recorded, **recipes}
    if merged != recorded:
        atomic_write_json(path, merged)


def _phase_result(base_dir: str, bb):
    """The UNet phase's saved weights; a phase taken over from shipped assets that only shipped a later phase has a
    record and no weights, and the later phase's folder holds them."""
    if os.path.isdir(os.path.join(base_dir, "unet")):
        return load_pretrained_backbone(base_dir)
    return bb


# per stage: the pretrain.<key> section that must match the shipped record for the stage to be taken over
_SEEDED_RECIPE = {"vae": "vae", "unet": "unet", **{key: key for key, *_ in CONTINUATIONS}, "synthetic-face-analyzer": "detector"}


def seed_from_shipped(cfg: DictConfig, source: str, work: str) -> tuple[list[str], dict | None]:
    """Mark the stages that the assets in ``source`` (a folder ``make pretrain`` wrote: ``realisid/assets/``) already
    hold as done in ``work``, so that ``make pretrain`` only trains what comes after them, e.g. ``pretrain.unet_more``
    from the shipped base instead of the whole 3.5 h recipe. A stage is taken over only when the shipped record's
    recipe and synthetic data equal this config's, and the architecture it depends on: the VAE, the encoders and the
    analyzer need the same VAE; the UNet phases the same base architecture, or one whose UNet only has more layers per
    level (the shipped UNet is then grown into it, see :mod:`realisid.models.grow`). With any other UNet or text
    encoder the UNet phases train from scratch on the shipped VAE's latents. Stages already done in ``work`` are left
    alone. Returns the stages taken over and, with ``pretrain.extend``, the round it extends (the base's folder and
    its unet_more record; else None)."""
    from realisid.embedded.assets import pretrained_record

    rec = pretrained_record(source)
    if rec is None:
        raise FileNotFoundError(f"pretrain.from_shipped={source}: no {RECORD} there; give the folder `make pretrain` wrote "
                                "(the package's realisid/assets/), or drop pretrain.from_shipped to train every stage")
    p = cfg.pretrain
    mine = {"architecture": OmegaConf.to_container(cfg.model.tiny, resolve=True),
            "synthetic": OmegaConf.to_container(cfg.prepare.synthetic, resolve=True)}
    theirs = {"architecture": rec.get("architecture") or {}, "synthetic": (rec.get("synthetic") or {}).get("settings")}
    if theirs["synthetic"] != mine["synthetic"]:
        raise ValueError(f"pretrain.from_shipped={source}: its models were trained with other synthetic settings "
                         f"({_differences(theirs['synthetic'], mine['synthetic'])}); drop pretrain.from_shipped to train every stage for these settings")
    t_vae, m_vae = theirs["architecture"].get("vae"), mine["architecture"].get("vae")
    if t_vae != m_vae:
        raise ValueError(f"pretrain.from_shipped={source}: its VAE was built with other settings ({_differences(t_vae, m_vae)}); every "
                         "shipped model learned from that VAE's latents or pictures, so none carries over: drop pretrain.from_shipped")
    grow = _growth(theirs["architecture"], mine["architecture"])
    unet_carries = theirs["architecture"] == mine["architecture"] or grow is not None
    shipped = [k for k in ("unet", *(c[0] for c in CONTINUATIONS)) if k in rec.get("stages", {})] if unet_carries else []
    if unet_carries and not shipped:
        raise ValueError(f"pretrain.from_shipped={source}: its {RECORD} records no UNet stage, so there is no base to continue; "
                         "drop pretrain.from_shipped to train every stage")
    if not unet_carries:  # the VAEs are equal (checked above), so what differs is the UNet or the text encoder
        log.info("pretrain.from_shipped: the base's UNet or text encoder differs from the shipped one (%s); its phases train from "
                 "scratch on the shipped VAE's latents", _differences(theirs["architecture"], mine["architecture"]))
    extends = None
    if p.get("extend"):
        if shipped[-1:] != ["unet_more"]:
            raise ValueError(f"pretrain.extend=true: the base in pretrain.from_shipped={source} ends with "
                             f"{shipped[-1] if shipped else 'no UNet phase it can keep'}, not a unet_more phase; without "
                             "pretrain.extend, pretrain.unet_more continues it")
        if p.get("unet_more") is None or int(p.unet_more.steps) <= 0:
            raise ValueError("pretrain.extend=true trains pretrain.unet_more once more on the shipped base, but "
                             "pretrain.unet_more.steps is 0: give it steps (e.g. 8000)")
        extends, shipped = shipped[-1], shipped[:-1]  # its result seeds the phase before it; unet_more trains again
    last = shipped[-1] if shipped else None
    folders = {key: folder for key, (folder, _) in UNET_PHASE_FILES.items()}
    taken: list[str] = []
    stages = ("vae", *shipped, "standin-arcface", "standin-arcface-eval", "synthetic-face-analyzer")
    for stage in stages:  # every recipe is checked before anything is copied, so a refused run leaves the work folder as it was
        key = _SEEDED_RECIPE.get(stage)
        if key is not None:
            want = OmegaConf.to_container(p[key], resolve=True) if p.get(key) is not None else None
            if rec["recipe"].get(key) != want:
                again = ", run it once more with pretrain.extend=true" if stage == "unet_more" else ""
                raise ValueError(f"pretrain.from_shipped={source}: pretrain.{key} differs from the recipe the shipped stage "
                                 f"'{stage}' was trained with ({_differences(rec['recipe'].get(key), want)}); set it back{again}, or "
                                 "drop pretrain.from_shipped to train that stage again")
    for stage in stages:
        dst = os.path.join(work, folders.get(stage, stage))
        if _stage_done(dst) is not None:
            continue
        if stage == "vae":
            src = os.path.join(source, "tiny-sd", "vae")
        elif stage == last:
            src = os.path.join(source, "tiny-sd")
        elif stage in folders:
            src = None  # an earlier UNet phase: only its record shipped
        else:
            src = os.path.join(source, stage)
        if src is not None:
            if os.path.exists(dst):
                shutil.rmtree(dst)  # an unfinished stage: replaced by the finished one
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("DONE.json"))
        note = {"seeded_from": os.path.abspath(source)}
        if grow and stage == last:
            note["grown"] = _grow_saved_unet(dst, grow)
        if src is None:
            note["weights"] = f"not shipped: phase '{extends or last}' continued from them and holds the result"
        elif extends and stage == last:
            note["weights"] = (f"the shipped base after its '{extends}' phase (pretrain.extend): pretrain.{extends} "
                               "trains again from them")
        _mark(dst, {**rec["stages"][stage], **note})
        taken.append(stage)
    extended = {"base": os.path.abspath(source), "unet_more": rec["stages"].get("unet_more")} if extends else None
    return taken, extended


def _growth(theirs, mine):
    """``model.tiny.unet.layers_per_block`` of ``mine`` when that is the one way two architecture records differ and
    it adds layers (so the shipped UNet can be grown into it, see :mod:`realisid.models.grow`); else None."""
    if not (isinstance(theirs, dict) and isinstance(mine, dict)) or theirs == mine:
        return None
    key = "layers_per_block"
    t_unet, m_unet = theirs.get("unet") or {}, mine.get("unet") or {}

    def without_layers(arch: dict, unet: dict) -> dict:
        return {**arch, "unet": {k: v for k, v in unet.items() if k != key}}

    if without_layers(theirs, t_unet) != without_layers(mine, m_unet) or key not in t_unet or key not in m_unet:
        return None
    from realisid.models.grow import per_level

    levels = len(m_unet.get("block_out_channels", []))
    before, after = per_level(t_unet[key], levels), per_level(m_unet[key], levels)
    return after if all(a >= b for a, b in zip(after, before)) and after != before else None


def _grow_saved_unet(folder: str, layers: list[int]) -> dict:
    """Grow the UNet saved in the diffusers ``folder`` to ``layers`` per level in place (float16, as shipped)."""
    from diffusers import UNet2DConditionModel

    from realisid.models.grow import grow_unet, layers_setting

    old = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32)
    before = layers_setting(old.config)
    grown = grow_unet(old, layers)
    shutil.rmtree(os.path.join(folder, "unet"))
    grown.to(torch.float16).save_pretrained(os.path.join(folder, "unet"))
    log.info("pretrain: grew the shipped UNet from layers_per_block %s to %s (%.2f M -> %.2f M parameters; the same output until it trains)",
             before, layers, sum(q.numel() for q in old.parameters()) / 1e6, sum(q.numel() for q in grown.parameters()) / 1e6)
    return {"layers_per_block": {"from": before, "to": list(layers)}}


def _differences(theirs, mine, prefix: str = "", there: str = "shipped") -> str:
    """What differs between two settings records, as ``key.sub: shipped X, here Y`` (nested keys dotted; ``there``
    names where ``theirs`` comes from)."""
    if isinstance(theirs, dict) and isinstance(mine, dict):
        keys = sorted(set(theirs) | set(mine), key=str)
        return "; ".join(_differences(theirs.get(k), mine.get(k), f"{prefix}{k}.", there) for k in keys if theirs.get(k) != mine.get(k))
    return f"{prefix[:-1]}: {there} {theirs!r}, here {mine!r}" if prefix else f"{there} {theirs!r}, here {mine!r}"


@torch.no_grad()
def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


