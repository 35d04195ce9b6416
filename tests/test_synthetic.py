"""The synthetic face set: deterministic identities and renders, exact geometry, real shards that read back."""
from __future__ import annotations

import dataclasses
import glob
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from realisid.data.shards import decode_sample, read_manifest
from realisid.embedded.synthetic import (
    FACE_MODEL, FACE_SIZE_RANGE, HAIR_STYLES, MAX_CAPTION, Identity, RenderedFace, generate_synthetic_shards,
    make_identity, render_face, sample_face_size,
)
from realisid.geometry import DEFAULT_BINS, face_size, scale_bin

LANDMARK_KEYS = {"left_brow", "right_brow", "left_eye", "right_eye", "outer_lips", "inner_lips"}


def _render(index: int, seed: int, size: int = 128, face: float | None = None) -> RenderedFace:
    return render_face(make_identity(index, 0), np.random.default_rng(seed), size, face_size=face)


# ------------------------------------------------------------------------------------------ identities

def test_identity_is_fixed_by_index_and_seed():
    assert make_identity(3, 7) == make_identity(3, 7)
    assert make_identity(3, 7).name == "synth-0003"
    assert make_identity(3, 7) != make_identity(4, 7)
    assert make_identity(3, 7) != make_identity(3, 8)
    ident = make_identity(3, 7)
    assert isinstance(ident, Identity) and 0 <= ident.hair_style < len(HAIR_STYLES)
    assert 1.15 <= ident.face_aspect <= 1.45


def test_identities_differ_in_their_main_cues():
    idents = [make_identity(i, 0) for i in range(64)]
    cues = [(i.skin_name, i.hair_name, i.hair_style) for i in idents]
    assert len(set(cues)) == len(cues), "two of the first 64 identities share skin, hair colour and hair style"
    for a, b in zip(cues, cues[1:]):   # neighbours differ in all three
        assert all(x != y for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------ rendering

def test_render_is_deterministic_for_an_rng_seed():
    a, b, c = _render(5, 11), _render(5, 11), _render(5, 12)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.bbox == b.bbox and np.array_equal(a.kps, b.kps)
    assert a.landmarks == b.landmarks and a.pose == b.pose and a.caption == b.caption
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


@pytest.mark.parametrize("size", [64, 128, 256])
def test_geometry_is_exact_and_inside(size):
    rng = np.random.default_rng(0)
    for k in range(25):
        want = sample_face_size(rng)
        f = _render(k % 16, 100 + k, size, want)
        assert f.image.size == (size, size) and f.image.mode == "RGB"
        x0, y0, x1, y1 = f.bbox
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        assert abs(face_size(f.bbox, size, size) - want) * size < 1.0
        assert f.kps.shape == (5, 2) and f.kps.dtype == np.float32
        assert np.all((f.kps[:, 0] > x0) & (f.kps[:, 0] < x1) & (f.kps[:, 1] > y0) & (f.kps[:, 1] < y1))
        le, re, nose, ml, mr = f.kps
        assert le[0] < re[0] and ml[0] < mr[0]            # insightface order, "left" = image-left
        assert set(f.landmarks) == LANDMARK_KEYS
        for name, pts in f.landmarks.items():
            assert 6 <= len(pts) <= 12, name
            pts = np.asarray(pts)
            assert np.all((pts >= [x0, y0]) & (pts <= [x1, y1])), name
        # eye key points sit at the centre of their contours, mouth corners on the outer lip line
        assert np.allclose(np.asarray(f.landmarks["left_eye"]).mean(0), le, atol=0.35 * (x1 - x0) / 4)
        assert np.min(np.linalg.norm(np.asarray(f.landmarks["outer_lips"]) - ml, axis=1)) < 1e-3
        assert np.min(np.linalg.norm(np.asarray(f.landmarks["outer_lips"]) - mr, axis=1)) < 1e-3
        assert set(f.pose) >= {"yaw", "roll", "pitch", "smile", "mouth_open", "eye_open"}
        assert abs(f.pose["yaw"]) <= 30 and abs(f.pose["roll"]) <= 20
        assert len(f.caption) <= MAX_CAPTION and f.caption == f.caption.lower() and "person" in f.caption


def test_box_is_the_drawn_head():
    """With a skin colour nothing else uses, the drawn head's top and bottom rows match the box."""
    ident = dataclasses.replace(make_identity(0, 0), hair_style=HAIR_STYLES.index("bald"), facial_hair=0,
                                glasses=0, skin=(0, 255, 0))
    for k in range(12):
        f = render_face(ident, np.random.default_rng(k), 128, face_size=0.3)
        img = np.asarray(f.image).astype(int)
        skin = np.abs(img - [0, 255, 0]).max(-1) < 30
        rows = np.nonzero(skin.any(1))[0]
        assert abs(rows.min() - f.bbox[1]) <= 1.0 and abs(rows.max() + 1 - f.bbox[3]) <= 1.0, (k, rows.min(), rows.max(), f.bbox)


def test_face_sizes_cover_every_bin():
    rng = np.random.default_rng(0)
    sizes = [sample_face_size(rng) for _ in range(400)]
    assert FACE_SIZE_RANGE[0] <= min(sizes) and max(sizes) <= FACE_SIZE_RANGE[1]
    assert {scale_bin(s) for s in sizes} == set(DEFAULT_BINS)
    # a render without a requested size draws one from the same distribution
    drawn = {scale_bin(face_size(_render(0, k).bbox, 128, 128)) for k in range(60)}
    assert drawn == set(DEFAULT_BINS)


# ------------------------------------------------------------------------------------------ shards

def _read(url: str) -> list[dict]:
    import webdataset as wds

    return [decode_sample(raw) for raw in wds.WebDataset(url, shardshuffle=False)]


def _members(out_dir: str) -> dict[str, bytes]:
    out = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "*.tar"))):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                out[f"{os.path.basename(path)}/{m.name}"] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    manifests = generate_synthetic_shards(out, num_identities=6, images_per_identity=5, val_identities=2,
                                          image_size=64, ref_size=32, shard_size=8, seed=1)
    return out, manifests


def test_shards_round_trip(tiny_set):
    out, manifests = tiny_set
    assert set(manifests) == {"train", "val"}
    seen = {}
    for split, manifest in manifests.items():
        assert manifest == {**read_manifest(os.path.join(out, f"{split}.manifest.json")), "created": manifest["created"]}
        assert manifest["face_model"] == FACE_MODEL
        samples = []
        for shard in manifest["shards"]:
            got = _read(os.path.join(out, shard))
            assert len(got) == manifest["shard_counts"][shard]
            samples += got
        assert len(samples) == manifest["kept"] == sum(manifest["shard_counts"].values())
        assert manifest["kept"] == sum(manifest["identities"].values()) == sum(manifest["face_size_bins"].values())
        for s in samples:
            meta = s["meta"]
            assert s["key"].startswith(meta["identity"] + "-") and len(s["key"]) == len("synth-0003-0011")
            assert s["image"].size == (64, 64) and (meta["width"], meta["height"]) == (64, 64)
            assert meta["source"] == "synthetic-v1" and meta["det_score"] == 1.0 and meta["caption"]
            assert set(meta["landmarks"]) == LANDMARK_KEYS
            assert s["id_embed"] is None
            assert s["ref"] is not None and s["ref"].size == (32, 32)
        seen[split] = samples
    train_ids = {s["meta"]["identity"] for s in seen["train"]}
    val_ids = {s["meta"]["identity"] for s in seen["val"]}
    assert train_ids == {f"synth-{i:04d}" for i in range(4)} and val_ids == {"synth-0004", "synth-0005"}
    # interleaved: the first shard holds several people
    first = _read(os.path.join(out, manifests["train"]["shards"][0]))
    assert len({s["meta"]["identity"] for s in first}) == 4


def _crop(image: Image.Image, bbox, size: int) -> np.ndarray:
    from realisid.images import identity_crop

    return np.asarray(identity_crop(image, bbox, size)[0]).astype(np.float32)


def test_ref_is_the_largest_face_of_another_image(tiny_set):
    out, manifests = tiny_set
    samples = [s for shard in manifests["train"]["shards"] for s in _read(os.path.join(out, shard))]
    by_id: dict[str, list[dict]] = {}
    for s in samples:
        by_id.setdefault(s["meta"]["identity"], []).append(s)
    for ident, group in by_id.items():
        group.sort(key=lambda s: -face_size(s["meta"]["bbox"], 64, 64))
        crops = {s["key"]: _crop(s["image"], s["meta"]["bbox"], 32) for s in group}
        for s in group:
            ref = np.asarray(s["ref"]).astype(np.float32)
            dist = {key: float(np.abs(ref - crop).mean()) for key, crop in crops.items()}
            source = group[1] if s is group[0] else group[0]
            assert min(dist, key=dist.get) == source["key"], (s["key"], dist)   # the largest other face
            assert dist[s["key"]] > dist[source["key"]] + 5.0, (s["key"], dist)  # clearly not its own crop


def test_rerender_swaps_only_the_background(tiny_set):
    from realisid.embedded.synthetic.writer import parse_key, rerender_with_background

    out, manifests = tiny_set
    extra = {k: manifests["val"][k] for k in ("seed", "image_size", "backgrounds")}
    samples = [s for shard in manifests["val"]["shards"] for s in _read(os.path.join(out, shard))]
    outside, inside = [], []
    for s in samples:
        a = rerender_with_background(s["key"], 0, **extra)
        b = rerender_with_background(s["key"], 1, **extra)
        # the same photo: box and key points as written, and its pixels up to the JPEG
        np.testing.assert_allclose(a.bbox, s["meta"]["bbox"], atol=1e-3)
        np.testing.assert_allclose(a.kps, np.asarray(s["meta"]["kps"]), atol=1e-3)
        np.testing.assert_allclose(b.kps, a.kps)
        assert a.caption != b.caption or a.image != b.image
        x = np.asarray(a.image, np.float32) - np.asarray(b.image, np.float32)
        x0, y0, x1, y1 = (int(round(v)) for v in a.bbox)
        cx, cy, w, h = (x0 + x1) // 2, (y0 + y1) // 2, max((x1 - x0) // 6, 1), max((y1 - y0) // 6, 1)
        inside.append(np.abs(x[cy - h:cy + h, cx - w:cx + w]).max())     # the middle of the face
        outside.append(np.abs(x[:3, :3]).mean())                            # a corner far from it
    assert max(inside) == 0.0
    assert np.mean(outside) > 20.0, outside
    with pytest.raises(ValueError, match="synth-<identity>-<image>"):
        parse_key("photo-12")


def test_generation_is_deterministic(tmp_path):
    kw = dict(num_identities=3, images_per_identity=3, val_identities=1, image_size=48, ref_size=24, shard_size=4)
    generate_synthetic_shards(str(tmp_path / "a"), seed=5, **kw)
    generate_synthetic_shards(str(tmp_path / "b"), seed=5, **kw)
    generate_synthetic_shards(str(tmp_path / "c"), seed=6, **kw)
    a, b, c = (_members(str(tmp_path / d)) for d in "abc")
    assert a == b and len(a) == 3 * 3 * 3   # jpg, json, ref.jpg per sample
    assert set(a) == set(c) and a != c
    assert not any(name.endswith(".id.npy") for name in a)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="images_per_identity"):
        generate_synthetic_shards(str(tmp_path), num_identities=2, images_per_identity=1, val_identities=1)
    with pytest.raises(ValueError, match="val_identities"):
        generate_synthetic_shards(str(tmp_path), num_identities=2, images_per_identity=2, val_identities=2)
    with pytest.raises(ValueError, match="face_size"):
        render_face(make_identity(0, 0), np.random.default_rng(0), 64, face_size=1.5)
