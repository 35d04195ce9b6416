"""Identity conditioning data: the reference's embedding and key points (shard members ref_id.npy and meta ref_kps),
the examples' id_kps, the identity encoder's key-point alignment, and identity features cached by precompute."""
from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import onnx_models  # noqa: E402

from realisid.data.batch import collate, ready_batch, stream_collate

from realisid.data.example import ExampleMaker, make_example  # noqa: E402

from realisid.images import identity_crop
from realisid.data.shards import decode_sample, encode_jpeg, face_meta  # noqa: E402
from realisid.data.shard_writer import FaceShardWriter  # noqa: E402
from realisid.io import encode_array  # noqa: E402
from realisid.geometry import FRONTAL_KPS, expand_square_box  # noqa: E402

KW = dict(resolution=32, vae_scale_factor=2, local_latent_size=8, crop_expand=1.6, id_image_size=32)


def noise(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def face(box):
    """A face box and the 5 key points of a frontal face in it."""
    box = [float(v) for v in box]
    kps = FRONTAL_KPS * np.array([box[2] - box[0], box[3] - box[1]], np.float32) + np.array(box[:2], np.float32)
    return box, kps.astype(np.float32)


# a reference crop's key points: deliberately not the frontal template, in a 40-px ref.jpg
REF_KPS = np.array([[12.0, 15.0], [27.0, 14.0], [20.0, 22.0], [14.0, 30.0], [26.0, 31.0]], np.float32)


def raw_sample(key="k", *, size=(96, 80), box=(30, 20, 62, 52), target_embed=None, ref=False, ref_embed=None, ref_kps=None, seed=0):
    """A raw webdataset sample (member -> bytes) in the shard format, built in memory."""
    bbox, kps = face(box)
    meta = face_meta(size, bbox, kps, det_score=0.9, identity="p", caption="a photo of a person", source="test")
    if ref_kps is not None:
        meta["ref_kps"] = np.asarray(ref_kps).tolist()
    raw = {"__key__": key, "jpg": encode_jpeg(noise(*size, seed)), "json": json.dumps(meta).encode()}
    if target_embed is not None:
        raw["id.npy"] = encode_array(target_embed, np.float32)
    if ref:
        raw["ref.jpg"] = encode_jpeg(noise(40, 40, seed + 100))
    if ref_embed is not None:
        raw["ref_id.npy"] = encode_array(ref_embed, np.float32)
    return raw


# ------------------------------------------------------------------------------------------- the encoder takes key points

@pytest.fixture(scope="module")
def arcface_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("arcface")
    onnx_models.make_arcface(str(d / "w_tiny.onnx"), dim=64)
    return str(d)


def test_arcface_aligns_with_given_keypoints(arcface_dir):
    from realisid.faces import load_face_analyzer
    from realisid.models.id_encoder import ArcFaceEncoder

    enc = ArcFaceEncoder(arcface_dir)
    analyzer = load_face_analyzer({"kind": "insightface", "model_dir": arcface_dir})
    pixels = [np.array(noise(48, 48, s)) for s in range(3)]
    images = torch.stack([torch.from_numpy(p).permute(2, 0, 1).float() / 127.5 - 1 for p in pixels])
    kps = torch.from_numpy(np.stack([REF_KPS * 1.1, REF_KPS + 4, REF_KPS * 0.9 + 2]).astype(np.float32))
    got = enc(images, torch.ones(3, 1, 48, 48), kps=kps)
    assert got.shape == (3, 64)
    for i, p in enumerate(pixels):  # each crop aligned with ITS key points, as insightface aligns a detected face
        np.testing.assert_allclose(got[i].numpy(), analyzer.embed(p, kps[i].numpy()), rtol=1e-5, atol=1e-6)
    # without key points the frontal template in the crop's face box stands in, and that is another alignment
    from realisid.images import frontal_id_kps

    frontal = enc(images, torch.ones(3, 1, 48, 48))
    np.testing.assert_allclose(frontal[0].numpy(), analyzer.embed(pixels[0], frontal_id_kps(48)), rtol=1e-5, atol=1e-6)
    assert (frontal - got).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"kps has shape \(3, 2, 5\); give \(3, 5, 2\)"):
        enc(images, None, kps=kps.transpose(1, 2))


def test_other_encoders_take_and_ignore_keypoints():
    from realisid.models.id_encoder import ClipEncoder

    enc = ClipEncoder(tiny={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "image_size": 32, "patch_size": 8})
    x, m = torch.rand(2, 3, 32, 32) * 2 - 1, torch.ones(2, 1, 32, 32)
    torch.testing.assert_close(enc(x, m, kps=torch.rand(2, 5, 2) * 32), enc(x, m))


# ------------------------------------------------------------------------------------------- examples

def test_reference_embedding_conditions_and_old_shards_stay_readable():
    from realisid.images import id_crop_face_box

    target, ref = np.full(8, 0.5, np.float32), np.arange(8, dtype=np.float32)
    maker = ExampleMaker(embed_dim=8, **KW)
    # a reference with its embedding: that embedding conditions, never the target's
    ex = maker(raw_sample(target_embed=target, ref=True, ref_embed=ref, ref_kps=REF_KPS))
    assert ex["has_id_embed"] and torch.equal(ex["id_embed"], torch.from_numpy(ref))
    # a shard written before ref_id.npy existed: the reference has no stored embedding, so none is given (the encoder
    # runs on the reference crop); the target's id.npy is not taken for it, and a frontal face stands in for its points
    old = maker(raw_sample(target_embed=target, ref=True))
    assert not old["has_id_embed"] and old["id_embed"].numel() == 0
    x0, y0, x1, y1 = id_crop_face_box(32)  # the face's place in a reference crop
    np.testing.assert_allclose(old["id_kps"].numpy(), FRONTAL_KPS * [x1 - x0, y1 - y0] + [x0, y0], rtol=1e-6)
    # no reference: the target's crop and embedding, as before
    alone = maker(raw_sample(target_embed=target))
    assert alone["has_id_embed"] and torch.equal(alone["id_embed"], torch.from_numpy(target))
    batch = collate([ex, old, alone])
    assert batch["has_id_embed"].tolist() == [True, False, True] and batch["id_embed"].shape == (3, 8)
    # the embedding's length is checked like id.npy's
    bad = maker(raw_sample(ref=True, ref_embed=np.ones(5, np.float32)))
    assert bad is None and maker.skipped["bad_embedding"] == 1


def test_examples_carry_identity_keypoints_through_collate_and_transfer():
    maker = ExampleMaker(**KW)
    with_ref = maker(raw_sample("a", ref=True, ref_kps=REF_KPS))
    np.testing.assert_allclose(with_ref["id_kps"].numpy(), REF_KPS * 32 / 40, rtol=1e-6)  # ref.jpg is 40 px, id_image 32
    no_ref = maker(raw_sample("b", seed=1))
    bbox, kps = face((30, 20, 62, 52))
    x0, y0, x1, y1 = expand_square_box(bbox, 1.3, 96, 80)  # the identity crop: face box expanded 1.3x, kept inside
    np.testing.assert_allclose(no_ref["id_kps"].numpy(), (kps - [x0, y0]) * 32 / (x1 - x0), rtol=1e-5)
    for ex in (with_ref, no_ref):
        assert ex["id_kps"].dtype == torch.float32 and ex["id_kps"].shape == (5, 2)
    # the photo decoded at a reduced scale gives the same points (the meta is in stored pixels)
    full = make_example(decode_sample(raw_sample("b", seed=1)), **KW)
    torch.testing.assert_close(full["id_kps"], no_ref["id_kps"], rtol=0, atol=0.05)
    shipped = ready_batch(stream_collate([with_ref, no_ref]))  # packed into one buffer, unpacked on the device side
    assert shipped["id_kps"].shape == (2, 5, 2) and shipped["id_kps"].dtype == torch.float32
    torch.testing.assert_close(shipped["id_kps"], torch.stack([with_ref["id_kps"], no_ref["id_kps"]]), rtol=0, atol=0)


def test_identity_crop_keypoints_land_on_the_same_pixels_as_the_crop():
    """The pure helper the inference side calls: a point marked in the photo is found where it maps in the crop."""
    from realisid.images import identity_crop_kps

    arr = np.zeros((90, 120, 3), np.uint8)
    bbox = [70.0, 40.0, 110.0, 85.0]  # near the corner: the crop box is shifted to stay inside the photo
    pts = np.array([[80, 52], [100, 52], [90, 64], [83, 76], [97, 76]], np.float32)
    for x, y in pts:
        arr[int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2] = 255
    crop, _ = identity_crop(Image.fromarray(arr), bbox, 104)
    mapped = identity_crop_kps(pts + 0.5, bbox, 120, 90, 104)  # the centre of the marked pixel
    crop = np.asarray(crop)[:, :, 0].astype(np.float32)
    for x, y in mapped:
        win = crop[int(y) - 4:int(y) + 5, int(x) - 4:int(x) + 5]
        yy, xx = np.mgrid[int(y) - 4:int(y) + 5, int(x) - 4:int(x) + 5]
        found = np.array([(xx * win).sum(), (yy * win).sum()]) / win.sum() + 0.5
        assert np.abs(found - [x, y]).max() < 0.6, (found, (x, y))
    with pytest.raises(ValueError, match=r"kps must be 5 finite \[x, y\] points.*got shape \(4, 2\)"):
        identity_crop_kps(pts[:4], bbox, 120, 90, 104)


# ------------------------------------------------------------------------------------------- precomputed identity features

def write_ref_shards(out_dir, n=6, size=96):
    """Shards where even samples have a reference (with its key points) and odd ones none."""
    with FaceShardWriter(str(out_dir), "train", face_model="test", maxcount=3) as w:
        for i in range(n):
            side = 28 + 4 * i
            bbox, kps = face((10 + 3 * i, 50 - 4 * i, 10 + 3 * i + side, 50 - 4 * i + side))
            meta = face_meta((size, size - 16), bbox, kps, det_score=0.9, identity=f"id{i % 2}", caption=f"photo {i}", source="t")
            ref = noise(40, 40, 100 + i) if i % 2 == 0 else None
            if ref is not None:  # (FaceShardWriter.write(ref_kps=...) does the same)
                meta["ref_kps"] = (REF_KPS + i).tolist()
            w.write(f"s{i:03d}", noise(size, size - 16, i), meta, ref=ref)
    return sorted(str(p) for p in out_dir.glob("train-*.tar"))


def _datamodule(cfg, backbone, pre=None):
    from realisid.train import build_datamodule

    if pre is not None:
        cfg.data.precomputed = str(pre)
    dm = build_datamodule(cfg, SimpleNamespace(backbone=backbone))
    dm.setup("fit")
    return dm


def _first_batch(dm):
    return ready_batch(next(iter(dm.train_dataloader())))


def _cfg(tiny_cfg, shards, *extra):
    return tiny_cfg("local_branch", f"data.train_shards={shards}/train-*.tar", "data.val_shards=", "data.batch_size=6",
                    "data.num_workers=0", "data.shuffle_buffer=1", "data.resampled=true", *extra)


def test_precompute_caches_identity_features(tiny_cfg, tmp_path):
    from realisid.data.cache_format import cache_info, check_cache
    from realisid.data.precompute import precompute
    from realisid.models.backbone import load_backbone
    from realisid.models.id_encoder import build_id_encoder

    write_ref_shards(tmp_path)
    cfg = _cfg(tiny_cfg, tmp_path)
    res = precompute(cfg, str(tmp_path / "pre"), batch_size=4)
    assert res["written"] == 6
    info = json.loads((tmp_path / "pre" / "precomputed.json").read_text())
    assert info["id_encoder"].startswith("clip:tiny-random@")  # the encoder the features were made with
    from realisid.models.id_encoder import encoder_fingerprint

    assert info["id_encoder"] == encoder_fingerprint(cfg.model.id_encoder)
    backbone = load_backbone(cfg.model, seed=0)
    fly = _first_batch(_datamodule(_cfg(tiny_cfg, tmp_path), backbone))
    pre = _first_batch(_datamodule(_cfg(tiny_cfg, tmp_path), backbone, tmp_path / "pre"))
    assert pre["key"] == fly["key"] and "id_features" not in fly
    enc = build_id_encoder(cfg.model.id_encoder)
    assert pre["id_features"].shape == (6, 17, 32) and pre["id_features"].dtype == torch.float32  # CLIP: (B, N, D) tokens
    # what the module's encoder gives on the same crops, masks and key points
    torch.testing.assert_close(pre["id_features"], enc(fly["id_image"], fly["id_mask"], fly["id_kps"]), rtol=1e-4, atol=1e-5)
    for k in ("id_image", "id_mask", "id_kps", "original_size", "crop_top_left"):  # made once, when the cache was written
        torch.testing.assert_close(pre[k], fly[k], rtol=0, atol=0, msg=k)
    for i, key in enumerate(pre["key"]):  # even samples have a reference: its key points, from ref.jpg's 40 px to 32
        if int(key[1:]) % 2 == 0:
            np.testing.assert_allclose(pre["id_kps"][i].numpy(), (REF_KPS + int(key[1:])) * 32 / 40, rtol=1e-6)
    # a cache made with another identity encoder is refused by name
    other = _cfg(tiny_cfg, tmp_path, "model.id_encoder.tiny_clip={hidden_size: 16, intermediate_size: 37, num_hidden_layers: 1, "
                 "num_attention_heads: 4, image_size: 32, patch_size: 8}")
    with pytest.raises(ValueError, match=r"id_encoder: cache 'clip:tiny-random@\w+' vs now 'clip:tiny-random@\w+'\): its identity "
                                         r"features come from another model.id_encoder; re-run `make precompute`"):
        check_cache(str(tmp_path / "pre"), cache_info(backbone, other))
    with pytest.raises(ValueError, match=r"holds a cache made for another setup \(id_encoder: "):
        precompute(other, str(tmp_path / "pre"))
    assert len(list((tmp_path / "pre").glob("*.tar"))) == 2  # nothing written is lost
    # a cache made before identity features were cached names that
    (tmp_path / "pre" / "precomputed.json").write_text(json.dumps({**{k: v for k, v in info.items() if k != "id_encoder"}, "format": 4}))
    with pytest.raises(ValueError, match=r"it holds no identity features \(made before precompute cached them\)"):
        check_cache(str(tmp_path / "pre"), cache_info(backbone, cfg))


def test_precompute_caches_arcface_features_aligned_with_the_reference_keypoints(tiny_cfg, tmp_path, arcface_dir):
    from realisid.data.precompute import precompute
    from realisid.faces import load_face_analyzer
    from realisid.models.backbone import load_backbone

    write_ref_shards(tmp_path, n=3)
    extra = ("model.id_encoder.kind=arcface", f"model.id_encoder.path={arcface_dir}", "data.batch_size=3")
    cfg = _cfg(tiny_cfg, tmp_path, *extra)
    precompute(cfg, str(tmp_path / "pre"), batch_size=2, dtype="fp16")
    pre = _first_batch(_datamodule(_cfg(tiny_cfg, tmp_path, *extra), load_backbone(cfg.model, seed=0), tmp_path / "pre"))
    assert pre["id_features"].shape == (3, 64) and pre["id_features"].dtype == torch.float16  # ArcFace: (B, D), --dtype fp16
    analyzer = load_face_analyzer({"kind": "insightface", "model_dir": arcface_dir})
    for i in range(3):
        img = ((pre["id_image"][i].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        want = analyzer.embed(img, pre["id_kps"][i].numpy())  # aligned with the sample's own key points
        np.testing.assert_allclose(pre["id_features"][i].float().numpy(), want, atol=2e-3)


def test_standin_grid_features_are_the_feature_map_and_the_embedding_as_tokens(eval_standin):
    from realisid.models.id_encoder import IdProjector, StandInEncoder, build_id_encoder, encoder_fingerprint

    vec, grid = StandInEncoder(eval_standin), StandInEncoder(eval_standin, "grid")
    torch.manual_seed(0)
    x, m = torch.rand(3, 3, 32, 32) * 2 - 1, torch.ones(3, 1, 32, 32)
    tokens = grid(x, m)
    # 32 px crops, widths (32, 64, 128), a 16-d embedding: the 4x4 map before the last stage (64 channels) + the embedding
    assert grid.sequence and not vec.sequence and grid.embed_dim == 64 and tokens.shape == (3, 17, 64)
    torch.testing.assert_close(tokens[:, -1, :16], vec(x, m) * 4.0)  # the embedding, scaled to unit entries, zero-padded
    assert torch.count_nonzero(tokens[:, -1, 16:]) == 0
    torch.testing.assert_close(tokens[:, :16].std(-1, unbiased=False), torch.ones(3, 16), atol=1e-3, rtol=0)  # layer-normed cells
    assert not torch.allclose(tokens[0, :16], tokens[1, :16])  # the cells follow the face
    assert IdProjector(64, 4, 32, sequence=True)(tokens).shape == (3, 4, 32)
    # from the config: a sequence for the resampler; the embedding's fingerprint is the one caches were made with
    cfg = {"kind": "standin", "path": eval_standin}
    assert build_id_encoder({**cfg, "features": "grid"}).sequence and not build_id_encoder(cfg).sequence
    plain, gridded = encoder_fingerprint({**cfg, "features": "embedding"}), encoder_fingerprint({**cfg, "features": "grid"})
    assert plain == encoder_fingerprint(cfg) and plain.startswith("standin:/") and gridded == plain.replace("standin:", "standin:grid:", 1)
    with pytest.raises(ValueError, match=r"features=grid is for kind=standin .*kind=clip.*set model.id_encoder.features=embedding"):
        build_id_encoder({"kind": "clip", "features": "grid"})
    with pytest.raises(ValueError, match=r"features='grd'; valid: embedding, grid"):
        build_id_encoder({**cfg, "features": "grd"})
