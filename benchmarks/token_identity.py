"""How much of each identity feature is the person: the stand-in encoder's embedding against its grid tokens.

    python benchmarks/token_identity.py [--encoder DIR] [--shards "data/synthetic/val-*.tar"] [--refs 4] [--out DIR]

``model.id_encoder.features`` chooses what the branches are told about the reference: ``embedding`` (the stand-in's
64-d identity vector) or ``grid`` (its 4x4 feature map before the last stage, 16 tokens, plus that vector). This
measures, on the held-out identities' reference pool (each identity's ``--refs`` largest faces, as references are
chosen, cut as references are cut), for the embedding, the 16 grid cells (flattened) and all 17 tokens:

- ``same`` / ``other``: mean cosine between two photos of the same person / of two different people;
- ``auc``: how well that cosine tells same from different (1: always, 0.5: chance);
- ``background``: mean 1 - cos between a reference and the same photo drawn again with another background
  (:func:`realisid.embedded.synthetic.writer.rerender_with_background`: the same person, pose, expression and box);
- ``pose``: 1 - ``same``: how far the feature moves between two photos of the same person (another pose,
  expression, size, background): read it beside ``background``.

A feature the branches can turn into a person should move with the person and not with the photo. Writes table.md
and results.json under ``--out`` (default benchmarks/results/<date>-token-identity/).
"""
from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import sys
import tarfile
import time
from collections import defaultdict

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from realisid.embedded.assets import asset_path  # noqa: E402
from realisid.embedded.synthetic.writer import rerender_with_background  # noqa: E402
from realisid.embedded.standin.model import identity_crop, load_standin  # noqa: E402
from realisid.embedded.standin.verification import _auc  # noqa: E402


def reference_pool(urls: list[str], refs: int) -> dict[str, list[tuple[str, list[float]]]]:
    """identity -> its ``refs`` largest faces (key, box), as the synthetic set chooses references."""
    faces = defaultdict(list)
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    faces[str(meta["identity"])].append((member.name[: -len(".json")], [float(v) for v in meta["bbox"]]))
    return {i: sorted(f, key=lambda kb: -(kb[1][2] - kb[1][0]))[:refs] for i, f in sorted(faces.items())}


def representations(net, crops: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        tokens = net.tokens(crops)
        return {"embedding": net(crops).numpy(), "grid cells (16 x 64)": tokens[:, :-1].flatten(1).numpy(),
                "grid + embedding (17 x 64)": tokens.flatten(1).numpy()}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default=None, help="stand-in encoder folder (default: the shipped conditioning encoder)")
    ap.add_argument("--shards", default="data/synthetic/val-*.tar", help="held-out shards (`make train` draws them)")
    ap.add_argument("--refs", type=int, default=4, help="reference pool per identity (the synthetic set's ref_choices)")
    ap.add_argument("--out", default=f"benchmarks/results/{dt.date.today().isoformat()}-token-identity")
    a = ap.parse_args(argv)
    t0 = time.time()
    urls = sorted(glob.glob(a.shards))
    if not urls:
        raise SystemExit(f"--shards {a.shards!r} matches no file; run `make train` (or `make check-embedded`) once to draw them")
    manifest_path = os.path.join(os.path.dirname(urls[0]), "val.manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    encoder = a.encoder or asset_path("standin-arcface")
    net = load_standin(encoder)
    size = int(net.config["image_size"])
    pool = reference_pool(urls, a.refs)

    def crop(key, bbox, background):
        face = rerender_with_background(key, background, seed=int(manifest["seed"]), image_size=int(manifest["image_size"]),
                                        backgrounds=tuple(manifest["backgrounds"]))
        return identity_crop(face.image, bbox, size)

    ids, own, swapped = [], [], []
    for identity, faces in pool.items():
        for key, bbox in faces:
            ids.append(identity)
            own.append(crop(key, bbox, None))
            swapped.append(crop(key, bbox, 0))
    ids = np.array(ids)
    reps_own, reps_swap = representations(net, torch.stack(own)), representations(net, torch.stack(swapped))
    same = ids[:, None] == ids[None, :]
    upper = np.triu(np.ones_like(same), 1).astype(bool)
    rows = {}
    for name, feats in reps_own.items():
        c = cosines(feats, feats)
        s, d = c[upper & same], c[upper & ~same]
        bg = 1.0 - np.sum(feats / np.linalg.norm(feats, axis=1, keepdims=True)
                          * reps_swap[name] / np.linalg.norm(reps_swap[name], axis=1, keepdims=True), axis=1)
        rows[name] = {"same": float(s.mean()), "other": float(d.mean()), "auc": float(_auc(np.concatenate([s, d]),
                      np.concatenate([np.ones(len(s), bool), np.zeros(len(d), bool)]))),
                      "background": float(bg.mean()), "pose": float(1.0 - s.mean())}
    os.makedirs(a.out, exist_ok=True)
    wall = time.time() - t0
    result = {"encoder": os.path.abspath(encoder), "encoder_name": f"{net.name} (stand-in)", "shards": urls,
              "identities": len(pool), "crops": len(ids), "refs_per_identity": a.refs, "rows": rows, "wall_s": round(wall, 1),
              "date": dt.date.today().isoformat()}
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    table = (f"# What the identity features carry ({result['date']})\n\n`python benchmarks/token_identity.py`, {wall:.0f} s. "
             f"Encoder: {result['encoder_name']}; {len(pool)} held-out identities x {a.refs} reference crops ({size} px).\n\n"
             "| features | same person cos | different people cos | AUC same vs different | 1 - cos, same photo, other background | "
             "1 - cos, same person, other photo |\n|---|---|---|---|---|---|\n")
    for name, r in rows.items():
        table += (f"| {name} | {r['same']:.3f} | {r['other']:.3f} | {r['auc']:.3f} | {r['background']:.3f} | {r['pose']:.3f} |\n")
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    from realisid.cli import quiet_progress_bars

    quiet_progress_bars()  # no bar lines when piped to a log
    sys.exit(main())
