"""Writing the synthetic set as real webdataset shards: train and held-out val identities, reference crops."""
from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
from PIL import Image

from realisid.data.shards import face_meta
from realisid.data.shard_writer import FaceShardWriter
from realisid.images import identity_crop

from .identity import BACKGROUNDS, make_identity, sample_face_size
from .render import render_face

log = logging.getLogger("realisid.embedded.synthetic")   # the package's logger name

FACE_MODEL = "synthetic-exact-v1"
SOURCE = "synthetic-v1"


def _face_crop(image: Image.Image, bbox: Sequence[float], size: int) -> Image.Image:
    """The reference crop, cut exactly as the pipeline cuts identity crops."""
    return identity_crop(image, bbox, size)[0]


def _image_rngs(seed: int, index: int, j: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent streams for one image's face size and everything else (order-independent)."""
    s = int(seed) & 0xFFFFFFFF
    return np.random.default_rng([s, 0x51, index, j]), np.random.default_rng([s, 0x52, index, j])


def _render_photo(ident, seed: int, i: int, j: int, image_size: int, face_size: float, backgrounds: Sequence[str],
                  background_rng: np.random.Generator | None = None):
    """Photo ``j`` of identity ``i`` (person ``ident``) of the set of ``seed``, at ``face_size``: the one place a
    synthetic photo is drawn, so a photo drawn again (:func:`rerender_with_background`) is the photo written."""
    return render_face(ident, _image_rngs(seed, i, j)[1], image_size, face_size, tuple(backgrounds), background_rng=background_rng)


def parse_key(key: str) -> tuple[int, int]:
    """``synth-IIII-JJJJ`` (a synthetic sample's key) -> (identity index, image index)."""
    parts = str(key).split("-")
    if len(parts) != 3 or parts[0] != "synth" or not (parts[1].isdigit() and parts[2].isdigit()):
        raise ValueError(f"{key!r} is not a synthetic sample key (synth-<identity>-<image>, as generate_synthetic_shards "
                         "names them); only photos of the synthetic set can be drawn again")
    return int(parts[1]), int(parts[2])


def rerender_with_background(key: str, background_seed: int | None, *, seed: int, image_size: int,
                             backgrounds: Sequence[str] = BACKGROUNDS):
    """The synthetic photo ``key`` of the set of ``seed`` (its manifest's ``seed``, ``image_size`` and
    ``backgrounds``) drawn again with another background: the same person, pose, expression, face box, key
    points and clothing, and a background drawn from its own stream ``background_seed`` (None: the photo as
    written, its own background, without the shard's JPEG compression). Returns a
    :class:`.render.RenderedFace`. Used to measure how much of an identity similarity is the background
    (``benchmarks/background_leak.py``)."""
    i, j = parse_key(key)
    s = int(seed) & 0xFFFFFFFF
    bg_rng = None if background_seed is None else np.random.default_rng([s, 0x55, i, j, int(background_seed)])
    return _render_photo(make_identity(i, seed), seed, i, j, image_size, sample_face_size(_image_rngs(seed, i, j)[0]),
                         backgrounds, bg_rng)


def generate_synthetic_shards(out_dir: str, *, num_identities: int = 64, images_per_identity: int = 24,
                              val_identities: int = 8, image_size: int = 128, ref_size: int = 64,
                              shard_size: int = 256, seed: int = 0, ref_choices: int = 1,
                              backgrounds: Sequence[str] = BACKGROUNDS) -> dict:
    """Write the synthetic set as ``train`` and ``val`` shards (held-out identities) into ``out_dir``.

    ``train`` holds identities ``[0, num_identities - val_identities)`` and ``val`` the last
    ``val_identities``. Each sample carries the full image, its metadata and a reference face cropped from
    another image of the same identity: one of that identity's ``ref_choices`` largest faces other than the
    image itself (chosen per image, reproducibly; 1: always the largest other face), named in the sample's
    ``ref_key``. The metadata also holds ``caption_no_identity``, the caption without the person's identity
    attributes. ``backgrounds``: the background kinds drawn (a subset of :data:`BACKGROUNDS`). Identities are
    interleaved in write order so every shard holds many people.
    Returns ``{"train": manifest, "val": manifest}``.
    """
    if num_identities < 1 or not 0 <= val_identities < num_identities:
        raise ValueError(f"need num_identities >= 1 and 0 <= val_identities < num_identities, got "
                         f"num_identities={num_identities}, val_identities={val_identities}")
    if images_per_identity < 2:
        raise ValueError(f"images_per_identity must be >= 2 so every reference comes from another image, got {images_per_identity}")
    backgrounds = tuple(backgrounds)
    unknown = [b for b in backgrounds if b not in BACKGROUNDS]
    if unknown or not backgrounds:
        raise ValueError(f"backgrounds {list(backgrounds)}: give a non-empty subset of {list(BACKGROUNDS)}")
    if not 1 <= ref_choices < images_per_identity:
        raise ValueError(f"ref_choices must be in [1, images_per_identity - 1], got {ref_choices} with {images_per_identity} images")
    t_start = time.perf_counter()
    splits = {"train": range(0, num_identities - val_identities), "val": range(num_identities - val_identities, num_identities)}
    manifests = {}
    for split, indices in splits.items():
        writer = FaceShardWriter(out_dir, split, face_model=FACE_MODEL, maxcount=shard_size)
        idents = {i: make_identity(i, seed) for i in indices}
        # Face sizes come from their own stream, so the reference images are known before rendering.
        sizes = {i: [sample_face_size(_image_rngs(seed, i, j)[0]) for j in range(images_per_identity)] for i in indices}
        largest = {i: [int(j) for j in np.argsort(-np.asarray(sizes[i]), kind="stable")[: ref_choices + 1]] for i in indices}
        crops: dict[tuple[int, int], Image.Image] = {}
        for i in indices:
            for j in largest[i]:
                face = _render_photo(idents[i], seed, i, j, image_size, sizes[i][j], backgrounds)
                crops[(i, j)] = _face_crop(face.image, face.bbox, ref_size)
        order_rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x53, len(indices)])
        for j in range(images_per_identity):
            for i in (indices[k] for k in order_rng.permutation(len(indices))):
                ident = idents[i]
                face = _render_photo(ident, seed, i, j, image_size, sizes[i][j], backgrounds)
                options = [k for k in largest[i] if k != j][:ref_choices]
                src = options[int(np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x54, i, j]).integers(len(options)))]
                meta = face_meta((image_size, image_size), face.bbox, face.kps, det_score=1.0, identity=ident.name,
                                 caption=face.caption, source=SOURCE, landmarks=face.landmarks)
                meta["caption_no_identity"] = face.caption_no_identity
                meta["ref_key"] = f"{ident.name}-{src:04d}"
                meta["pose"] = {k: round(v, 4) for k, v in face.pose.items()}
                writer.write(f"{ident.name}-{j:04d}", face.image, meta, ref=crops[(i, src)])
        writer.manifest.extra.update({
            "generator": "realisid.embedded.synthetic", "seed": int(seed), "image_size": int(image_size),
            "ref_size": int(ref_size), "images_per_identity": int(images_per_identity), "ref_choices": int(ref_choices),
            "backgrounds": list(backgrounds),
            "identity_indices": [indices.start, indices.stop], "pose_units": "degrees",
        })
        manifests[split] = writer.close()
        log.info("synthetic %s: %d identities x %d images = %d samples in %d shards (bins %s)", split, len(indices),
                 images_per_identity, manifests[split]["kept"], len(manifests[split]["shards"]),
                 manifests[split]["face_size_bins"])
    log.info("synthetic set written to %s in %.1f s (seed %d, %d px)", out_dir, time.perf_counter() - t_start, seed, image_size)
    return manifests
