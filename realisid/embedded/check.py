"""``realisid check-embedded``: how good the shipped stand-ins are, measured on held-out identities.

- the base draws people: samples from held-out captions and from the identity-free prompt (30 DDIM steps),
  and how many of them the synthetic face analyzer finds a face in;
- the synthetic face analyzer: recall, box IoU and landmark error per face-size bin, on real held-out images
  and on the same images through the base VAE;
- the stand-in encoders' held-out verification accuracy;
- the identity ceiling: the calibrated margin of real held-out photos per bin (what a perfect generator
  would score), with the evaluation encoder through the analyzer; and the same photos through the base VAE
  (encode, decode), against the same real references: what a perfect UNet could score with this autoencoder,
  which splits a generated face's missing identity into the autoencoder's share and the generation's.

It also writes two held-out references with their face sidecars (``data/examples/ref_a.jpg``, ``ref_b.jpg``)
for the README's two-person example.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from realisid.embedded import analyzer as D
from realisid.embedded import base as B
from realisid.embedded.stages import shard_urls, synthetic_shards
from realisid.embedded.standin import load_standin
from realisid.evaluation import Evaluator, to_uint8
from realisid.faces import load_face_analyzer
from realisid.geometry import bins_from_config, face_size, scale_bin
from realisid.images import identity_crop, signed_from_uint8, to_tensor
from realisid.metrics.calibrated import calibrated_identity, fmt
from realisid.models.backbone import load_backbone

log = logging.getLogger(__name__)


def base_check(bb, analyzer, prompts: Sequence[str], *, steps: int, guidance: float, seed: int) -> tuple[torch.Tensor, list[bool]]:
    """Samples of the base alone for ``prompts`` and, per sample, whether the analyzer finds a face in it."""
    images = B.sample_base(bb, prompts, steps=steps, guidance=guidance, seed=seed)
    return images, [len(analyzer.detect(to_uint8(im))) > 0 for im in images]


def save_framed_grid(images: torch.Tensor, found: Sequence[bool], path: str, nrow: int = 5) -> str:
    """A PNG grid with a green frame where the analyzer found a face and a red one where it did not."""
    from torchvision.utils import make_grid, save_image

    x = (images.clamp(-1, 1) + 1) / 2
    framed = []
    for im, ok in zip(x, found):
        f = torch.tensor([0.1, 0.8, 0.2] if ok else [0.9, 0.1, 0.1])[:, None, None].expand(3, im.shape[1] + 4, im.shape[2] + 4).clone()
        f[:, 2:-2, 2:-2] = im
        framed.append(f)
    save_image(make_grid(torch.stack(framed), nrow=min(nrow, len(framed)), padding=2, pad_value=1.0), path)
    return path


def photos_per_bin(val: B.ImageSet, bins: dict, per_bin: int = 3) -> list[int]:
    """Indices of the first ``per_bin`` photos of ``val`` in each face-size bin, largest bin first."""
    size = val.images.shape[-1]
    names = [scale_bin(face_size(val.boxes[i].tolist(), size, size), bins) for i in range(len(val))]
    return [i for b in reversed(list(bins)) for i in [k for k, n in enumerate(names) if n == b][:per_bin]]


def save_round_trip(photos: torch.Tensor, through: torch.Tensor, path: str) -> str:
    """uint8 ``photos`` on the top row and the same photos after an autoencoder (``through``) below them."""
    from torchvision.utils import save_image

    save_image(torch.cat([photos, through]).float() / 255, path, nrow=len(photos), padding=2, pad_value=1.0)
    return path


def held_out_indices(count: int, n: int, seed: int) -> list[int]:
    """Which ``n`` of ``count`` held-out samples the base is sampled for (distinct, in the order drawn)."""
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.choice(count, size=min(n, count), replace=False)]


def held_out_captions(captions: Sequence[str], n: int, seed: int) -> list[str]:
    return [captions[i] for i in held_out_indices(len(captions), n, seed)]


def check_embedded(cfg: DictConfig, out_dir: str, examples_dir: str | None = os.path.join("data", "examples")) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    synthetic_shards(cfg)
    seed = int(cfg.experiment.seed)
    bins = bins_from_config(cfg.bins)
    val = B.load_image_set(shard_urls(cfg, "val"), int(cfg.data.resolution))
    bb = load_backbone(cfg.model, seed=seed)
    analyzer = load_face_analyzer(cfg.faces)
    c = cfg.pretrain.check
    results: dict = {"base": str(cfg.model.pretrained), "analyzer": analyzer.name}

    # the base draws people
    prompts = held_out_captions(val.captions, int(c.samples), seed) + [B.GENERIC_PROMPT] * int(c.samples)
    images, found = base_check(bb, analyzer, prompts, steps=int(c.steps), guidance=float(c.guidance), seed=seed)
    k = int(c.samples)
    results["base_samples"] = {"held_out_captions": {"found": int(sum(found[:k])), "of": k, "prompts": prompts[:k]},
                               "generic_prompt": {"found": int(sum(found[k:])), "of": len(found) - k, "prompt": B.GENERIC_PROMPT},
                               "steps": int(c.steps), "guidance": float(c.guidance)}
    save_framed_grid(images, found, os.path.join(out_dir, "base_samples.png"))

    # the analyzer on held-out real images, and through the VAE
    results["analyzer_held_out"] = D.detector_accuracy(analyzer, val.images, val.boxes, val.kps, bins)
    val_through_vae = B.vae_round_trip(bb.vae, val.images)  # also scored for the identity ceiling below
    results["analyzer_held_out_through_vae"] = D.detector_accuracy(analyzer, val_through_vae, val.boxes, val.kps, bins)
    results["analyzer_negatives"] = D.negative_accuracy(analyzer, val.images, val.boxes, seed=seed)
    shown = photos_per_bin(val, bins)
    save_round_trip(val.images[shown], val_through_vae[shown], os.path.join(out_dir, "vae_round_trip.png"))

    # the encoders' verification on held-out identities (measured when they were trained)
    results["encoders"] = {}
    for what, path in (("conditioning", cfg.model.id_encoder.path), ("evaluation", cfg.evaluation.standin_path)):
        stats = load_standin(str(path)).stats
        results["encoders"][what] = {k: stats.get(k) for k in ("verification_accuracy", "auc", "mean_same_cos", "mean_diff_cos")}

    # the identity ceiling on real held-out photos (every held-out identity), and on the same photos through the VAE
    ceiling = _ceiling(cfg, analyzer, val, bins)
    through_vae = _ceiling(cfg, analyzer, val, bins, images=val_through_vae)
    keep = ("margin", "sim_ref", "sim_other", "found_rate")
    results["ceiling"] = {b: {q: ceiling[b][q] for q in keep} | {"n": ceiling[b]["n"]} for b in ceiling}
    results["ceiling_through_vae"] = {b: {q: through_vae[b][q] for q in keep} | {"n": through_vae[b]["n"]} for b in through_vae}

    lines = ["# The embedded default's stand-ins, measured on held-out identities", "",
             f"- base: {cfg.model.pretrained} (tiny base trained on synthetic faces, a stand-in for SD1.5)",
             f"- face analyzer: {analyzer.name}", "",
             "## The base draws people (30 DDIM steps from noise; a face found by the analyzer = green frame)", "",
             f"- held-out captions: a face found in {results['base_samples']['held_out_captions']['found']} of {k} samples",
             f"- identity-free prompt \"{B.GENERIC_PROMPT}\": {results['base_samples']['generic_prompt']['found']} of {len(found) - k}", "",
             "![base samples](base_samples.png)", "",
             "## Synthetic face analyzer (stand-in), held-out identities", "",
             "| images | bin | n | recall (IoU >= 0.5) | box IoU | landmark error (/ eye distance) | false detections / image |",
             "|---|---|---|---|---|---|---|"]
    for label, acc in (("real", results["analyzer_held_out"]), ("through the base VAE", results["analyzer_held_out_through_vae"])):
        for b, a in acc.items():
            lines.append(f"| {label} | {b} | {a['n']} | {a['recall']:.3f} | {a['box_iou']:.3f} | {a['landmark_nme']:.3f} | "
                         f"{a['false_per_image']:.3f} |")
    neg = results["analyzer_negatives"]
    lines += ["", f"Where there is no face: a face found on {neg['found_on_faceless']:.3f} of {neg['faceless_photos']} held-out photos whose "
              f"face is blurred away (eyes, nose and mouth gone; colours and head shape kept), and on {neg['found_on_noise']:.3f} of "
              f"{neg['noise_images']} noise images (smooth blobs to pixel noise). A found-rate on generated images counts faces, "
              "not blobs, only when both are low."]
    lines += ["", "## Stand-in identity encoders (verification on held-out identities)", "",
              "| encoder | accuracy | AUC | mean cos same | mean cos different |", "|---|---|---|---|---|"]
    for what, st in results["encoders"].items():
        lines.append(f"| {what} | {_f(st['verification_accuracy'])} | {_f(st['auc'])} | {_f(st['mean_same_cos'])} | {_f(st['mean_diff_cos'])} |")
    lines += ["", "## Identity ceiling: real held-out photos (margin = sim_ref - sim_other, 95% intervals)", "",
              "| bin | photos | found-rate | sim_ref | sim_other | margin |", "|---|---|---|---|---|---|"]
    for b, e in ceiling.items():
        lines.append(f"| {b} | {e['n']} | {fmt(e['found_rate'], 2)} | {e['sim_ref'][0]:.3f} | {e['sim_other'][0]:.3f} | {fmt(e['margin'])} |")
    lines += ["", "Held-out photos (top, three per bin from large to tiny) and the same photos through the base VAE (below): every",
              "face the base draws is decoded by this VAE, so what it blurs here no UNet can draw sharply.", "",
              "![VAE round trip](vae_round_trip.png)"]
    lines += ["", "The same photos through the base VAE (encoded to the posterior mean and decoded; references still the real photos):",
              "the most a perfect UNet could reach with this autoencoder. Share = margin through the VAE / margin of the real photos.", "",
              "| bin | photos | found-rate | sim_ref | sim_other | margin | share of the real ceiling |", "|---|---|---|---|---|---|---|"]
    for b, e in through_vae.items():
        share = e["margin"][0] / ceiling[b]["margin"][0] if ceiling[b]["margin"][0] else float("nan")
        lines.append(f"| {b} | {e['n']} | {fmt(e['found_rate'], 2)} | {e['sim_ref'][0]:.3f} | {e['sim_other'][0]:.3f} | {fmt(e['margin'])} | "
                     f"{share:.2f} |")
    table = os.path.join(out_dir, "table.md")
    with open(table, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    if examples_dir:
        write_example_references(val, examples_dir)
    return {"table": table, "results": results}


def _ceiling(cfg, analyzer, val, bins, images: torch.Tensor | None = None) -> dict:
    """Calibrated margin of every held-out photo against its identity's reference (the largest face, cut from the
    real photo and left out of the rows). ``images``: what is scored in place of the real photos (uint8, one per
    photo of ``val``, e.g. the photos through the VAE); the references stay the real ones."""
    ev = Evaluator(analyzer, cfg.bins, None, "-", "-")
    examples = _examples(val)
    best: dict[str, dict] = {}
    for ex in examples:
        ident = ex["identity"]
        if ident not in best or ex["face_size"] > best[ident]["face_size"]:
            best[ident] = ex
    from PIL import Image

    refs = {k: to_tensor(identity_crop(Image.fromarray(to_uint8(e["image"])), e["face_box"].tolist(), int(cfg.model.id_encoder.image_size))[0])
            for k, e in best.items()}
    bank = ev.reference_bank(refs)
    if images is not None:
        if len(images) != len(examples):
            raise ValueError(f"{len(images)} images to score for {len(examples)} held-out photos: give one per photo")
        examples = [dict(ex, image=signed_from_uint8(im)) for ex, im in zip(examples, images)]
    rows = ev.real_rows(examples, bank, exclude={e["key"] for e in best.values()})
    return calibrated_identity(rows, rows, list(bins), n_boot=int(cfg.bench.bootstrap), seed=int(cfg.bench.seed))


def _examples(val) -> list[dict]:
    R = val.images.shape[-1]
    return [{"key": k, "identity": ident, "image": signed_from_uint8(img), "face_box": box, "face_size": face_size(box.tolist(), R, R)}
            for k, ident, img, box in zip(val.keys, val.identities, val.images, val.boxes)]


def write_example_references(val, out_dir: str, names: Sequence[str] = ("ref_a", "ref_b")) -> list[str]:
    """The largest-face photos of the first held-out identities, with sidecars (bbox, kps) as ``generate --ref`` reads them."""
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    best: dict[str, int] = {}
    for i, ident in enumerate(val.identities):
        area = float((val.boxes[i, 2] - val.boxes[i, 0]) * (val.boxes[i, 3] - val.boxes[i, 1]))
        if ident not in best or area > float((val.boxes[best[ident], 2] - val.boxes[best[ident], 0]) *
                                             (val.boxes[best[ident], 3] - val.boxes[best[ident], 1])):
            best[ident] = i
    paths = []
    for name, ident in zip(names, sorted(best)):
        i = best[ident]
        path = os.path.join(out_dir, f"{name}.jpg")
        Image.fromarray(val.images[i].permute(1, 2, 0).numpy()).save(path, quality=95)
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump({"identity": ident, "source": val.keys[i], "bbox": [round(float(v), 3) for v in val.boxes[i]],
                       "kps": [[round(float(x), 3), round(float(y), 3)] for x, y in val.kps[i].tolist()],
                       "note": "held-out synthetic identity (never seen by any model), face box and key points exact"}, f, indent=2)
        paths.append(path)
    return paths


def _f(v) -> str:
    return "n/a" if v is None else f"{float(v):.3f}"
