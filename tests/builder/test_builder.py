"""realisid.data.build: folder and tar sources -> face shards, through the real insightface code on tiny
ONNX models (a bright square on the detector's stride-32 grid is a "face" with an exact box)."""
from __future__ import annotations

import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import onnx_models  # noqa: E402  (tests/)
from realisid.data import build  # noqa: E402
from realisid.data.build import build_shards, resolve_source, select_face  # noqa: E402
from realisid.faces import Face  # noqa: E402
from builder.builder_support import by_source, comparable, decoded, jpeg_bytes, load_json, read_shards, save, scene  # noqa: E402


def _face(x0, y0, side, score=0.9):
    return Face(bbox=[x0, y0, x0 + side, y0 + side], kps=np.zeros((5, 2)), det_score=score)


def test_select_face_rules():
    kw = dict(min_face=32, min_score=0.5, other_face_ratio=0.3)
    assert select_face([], 200, 200, **kw) == ("no_face", None)
    main = _face(50, 50, 100)
    assert select_face([main, _face(0, 0, 29)], 200, 200, **kw) == (None, main)  # bystander below 0.3x: kept
    assert select_face([main, _face(0, 0, 30)], 200, 200, **kw)[0] == "several_faces"  # at 0.3x: not
    assert select_face([main, _face(0, 0, 90, score=0.1)], 200, 200, **kw)[0] == "several_faces"  # any detected face counts
    assert select_face([_face(0, 0, 20)], 200, 200, **kw)[0] == "face_too_small"
    assert select_face([_face(0, 0, 100, score=0.4)], 200, 200, **kw)[0] == "low_score"
    assert select_face([_face(0, 0, 100, score=0.4), _face(150, 150, 20)], 200, 200, **kw)[0] == "face_too_small"
    # the border: up to 10% of the box outside the image is tolerated
    assert select_face([_face(111, 50, 100)], 200, 200, **kw)[0] == "face_cut_by_border"
    assert select_face([_face(110, 50, 100)], 200, 200, **kw)[0] is None  # exactly 10%
    assert select_face([_face(-11, 50, 100)], 200, 200, **kw)[0] == "face_cut_by_border"


def test_resolve_source_forms(tmp_path):
    tars = tmp_path / "tars"
    tars.mkdir()
    for i in range(3):
        (tars / f"part-{i:03d}.tar").write_bytes(b"")
    urls = [str(tars / f"part-{i:03d}.tar") for i in range(3)]
    assert resolve_source(str(tars)) == ("tar", urls)
    assert resolve_source(str(tars / "part-*.tar")) == ("tar", urls)
    assert resolve_source(str(tars / "part-{000..001}.tar")) == ("tar", urls[:2])
    assert resolve_source(urls[0]) == ("tar", urls[:1])
    assert resolve_source(str(tmp_path)) == ("folder", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"part-\{000..005\}.tar.*3 of 6 tar files do not exist"):
        resolve_source(str(tars / "part-{000..005}.tar"))
    with pytest.raises(FileNotFoundError, match="does not exist; give a folder of photos"):
        resolve_source(str(tmp_path / "nope"))


# ------------------------------------------------------------------------------------------- folder source

@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    """Every kind of input a real photo folder has, with the outcome each must get."""
    src = tmp_path_factory.mktemp("messy")
    face = scene()
    save(src / "alice/a1.jpg", face, quality=95)
    (src / "alice/a1.txt").write_text("alice smiling\n")
    save(src / "alice/a2.png", Image.fromarray(scene(squares=((32, 128, 32, 255),))).convert("L"))  # greyscale
    save(src / "alice/a3.jpg", Image.fromarray(face).convert("CMYK"), quality=95)  # CMYK JPEG
    save(src / "bob/b1.png", Image.fromarray((scene()[:, :, 0].astype(np.uint16) * 257)))  # 16-bit grey PNG
    rgba = np.dstack([face, np.full((256, 256), 255, np.uint8)])
    rgba[200:, :, 3] = 128  # half-transparent band: composited on white, stays dark enough
    save(src / "bob/b2.png", Image.fromarray(rgba, "RGBA"))
    # EXIF orientation 6 (stored image must be turned 90 deg clockwise): the face lands at (64, 160) after rotation
    shown = Image.fromarray(scene(w=128, h=256, squares=((64, 160, 32, 255),)))
    exif = Image.Exif()
    exif[0x0112] = 6
    save(src / "bob/b3.jpg", shown.transpose(Image.Transpose.ROTATE_90), quality=95, exif=exif)
    save(src / "bob/b4.jpg", scene(w=1024, h=1024, squares=((256, 128, 128, 255),)), quality=90)  # downscaled to 256
    (src / "bob/b4.json").write_text(json.dumps({"caption": "bob, big photo"}))
    save(src / "carol/c1.jpg", face, quality=95)
    (src / "carol/c1.json").write_text("{not json")  # unreadable sidecar: kept, counted as a warning
    save(src / "UPPER.JPG", face, quality=95)
    (src / "notes.md").write_text("not an image, ignored")
    (src / ".hidden.jpg").write_bytes(b"macOS resource fork")
    good = jpeg_bytes(face)
    (src / "truncated.jpg").write_bytes(good[: len(good) // 2])
    png = io.BytesIO()
    Image.fromarray(face).save(png, format="PNG")
    bad_png = bytearray(png.getvalue())
    bad_png[60:90] = b"\x00" * 30
    (src / "corrupt.png").write_bytes(bytes(bad_png))
    (src / "zero.jpg").write_bytes(b"")
    (src / "text.jpg").write_text("this is not a jpeg")
    save(src / "too_many_pixels.png", np.zeros((1500, 1500, 3), np.uint8))  # > max_pixels: never decoded
    save(src / "no_face.png", scene(squares=()))
    save(src / "two_faces.png", scene(squares=((32, 32, 32, 255), (160, 160, 32, 255))))
    save(src / "border.png", scene(w=252, squares=((224, 64, 28, 255),)))  # box 224..256 sticks 4/32 out
    save(src / "border_ok.png", scene(w=254, squares=((224, 64, 30, 255),)))  # 2/32 out: tolerated, box clipped
    save(src / "low_score.png", scene(squares=((96, 64, 32, 189),)))  # score ~0.4: above det_thresh, below min_score
    save(src / "small.png", scene(w=128, h=128, squares=((48, 48, 16, 255),)))  # 16-px face < min_face
    return src


@pytest.fixture(scope="module")
def messy_build(messy_folder, analyzer, tmp_path_factory):
    out = tmp_path_factory.mktemp("messy_out")
    manifest = build_shards(str(messy_folder), str(out), "messy", analyzer, workers=0, shard_size=4, max_side=256,
                            max_pixels=2_000_000, progress=False)
    return out, manifest


def test_folder_counts_every_input(messy_build, analyzer):
    out, m = messy_build
    assert m["rejected"] == {"corrupt_image": 4, "huge_image": 1, "no_face": 1, "several_faces": 1,
                             "face_cut_by_border": 1, "low_score": 1, "face_too_small": 1}
    assert m["kept"] == 10 and m["warnings"] == {"bad_sidecar": 1}
    assert m["shards"] == ["messy-000000.tar", "messy-000001.tar", "messy-000002.tar"]
    assert m["shard_counts"] == {"messy-000000.tar": 4, "messy-000001.tar": 4, "messy-000002.tar": 2}
    assert m["identities"] == {"alice": 3, "bob": 4, "carol": 1}
    assert m["face_model"] == analyzer.name and m["analyzer"] == analyzer.name and m["embedding_dim"] == 64
    assert m["source"] == os.path.abspath(m["source"])
    assert m["selection"]["min_face"] == 32 and m["selection"]["max_side"] == 256 and m["selection"]["det_size"] == [256, 256]
    assert m["face_size_bins"] == {"tiny": 0, "small": 10, "medium": 0, "large": 0}  # every face is 32 px of a 256-px edge
    on_disk = load_json((out / "messy.manifest.json"))
    assert comparable(on_disk) == comparable(m)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_folder_samples_are_exact(messy_build):
    out, _ = messy_build
    samples = by_source(read_shards(out, "messy"))
    assert set(samples) == {"alice/a1.jpg", "alice/a2.png", "alice/a3.jpg", "bob/b1.png", "bob/b2.png", "bob/b3.jpg",
                            "bob/b4.jpg", "carol/c1.jpg", "UPPER.JPG", "border_ok.png"}
    meta = {k: json.loads(s["json"]) for k, s in samples.items()}
    a1 = meta["alice/a1.jpg"]
    assert a1["bbox"] == [96, 64, 128, 96] and (a1["width"], a1["height"]) == (256, 256)
    np.testing.assert_allclose(a1["kps"], np.array([96, 64]) + onnx_models.SCRFD_KPS * 32, atol=1e-3)
    assert a1["caption"] == "alice smiling" and a1["identity"] == "alice" and a1["face_scale"] == 0.125
    assert set(a1["landmarks"]) == {"left_brow", "right_brow", "left_eye", "right_eye", "outer_lips", "inner_lips"}
    emb = np.load(io.BytesIO(samples["alice/a1.jpg"]["id.npy"]), allow_pickle=False)
    assert emb.shape == (64,) and emb.dtype == np.float32 and abs(np.linalg.norm(emb) - 1) < 1e-5
    assert meta["alice/a2.png"]["bbox"] == [32, 128, 64, 160]  # greyscale
    for k in ("alice/a3.jpg", "bob/b1.png", "bob/b2.png", "carol/c1.jpg", "UPPER.JPG"):  # CMYK, 16-bit, RGBA, ...
        assert meta[k]["bbox"] == [96, 64, 128, 96], k
    assert decoded(samples["bob/b1.png"]).mode == "RGB"
    # EXIF: the written image is the rotated one and the box is where the face is after rotation
    b3 = meta["bob/b3.jpg"]
    assert (b3["width"], b3["height"]) == (128, 256) and b3["bbox"] == [64, 160, 96, 192]
    img = np.asarray(decoded(samples["bob/b3.jpg"]))
    assert img[170:185, 70:90].mean() > 240 and img[:150].mean() < 10
    # huge photo: written downscaled to max_side, box in the downscaled image
    b4 = meta["bob/b4.jpg"]
    assert (b4["width"], b4["height"]) == (256, 256) and decoded(samples["bob/b4.jpg"]).size == (256, 256)
    assert b4["bbox"] == [64, 32, 96, 64] and b4["caption"] == "bob, big photo"
    assert meta["carol/c1.jpg"]["caption"] == "" and meta["UPPER.JPG"]["identity"] is None
    assert meta["border_ok.png"]["bbox"] == [224, 64, 254, 96]  # detector box 224..256 clipped to the image
    # references: carol has one photo (none), alice's and bob's come from another photo of the same person
    assert "ref.jpg" not in samples["carol/c1.jpg"] and "ref.jpg" not in samples["UPPER.JPG"]
    for k in ("alice/a1.jpg", "alice/a2.png", "bob/b1.png", "bob/b4.jpg"):
        assert decoded(samples[k], "ref.jpg").size == (224, 224)


# ------------------------------------------------------------------------------------------- references

def test_reference_comes_from_the_largest_other_face(tmp_path, analyzer):
    from realisid.images import identity_crop

    src, out = tmp_path / "src", tmp_path / "out"
    photos = {  # face sizes 32, 64 (largest) and 16 px; backgrounds tell the photos apart
        "dave/d1.png": scene(256, 256, ((96, 64, 32, 255),), bg=(110, 0, 0)),
        "dave/d2.png": scene(512, 512, ((192, 128, 64, 255),), bg=(0, 110, 0)),
        "dave/d3.png": scene(128, 128, ((48, 32, 16, 255),), bg=(0, 0, 110)),
        "eve/e1.png": scene(),
    }
    for k, arr in photos.items():
        save(src / k, arr)
    build_shards(str(src), str(out), "refs", analyzer, workers=0, min_face=16, ref_size=64, progress=False)
    samples = by_source(read_shards(out, "refs"))
    assert set(samples) == set(photos)
    boxes = {k: json.loads(s["json"])["bbox"] for k, s in samples.items()}
    assert boxes["dave/d2.png"] == [192, 128, 256, 192] and boxes["dave/d3.png"] == [48, 32, 64, 48]
    expected_donor = {"dave/d1.png": "dave/d2.png", "dave/d2.png": "dave/d1.png", "dave/d3.png": "dave/d2.png"}
    for k, donor in expected_donor.items():
        ref = np.asarray(decoded(samples[k], "ref.jpg"), np.float32)
        diffs = {d: np.abs(ref - np.asarray(identity_crop(Image.fromarray(photos[d]), boxes[d], 64)[0], np.float32)).mean()
                 for d in ("dave/d1.png", "dave/d2.png", "dave/d3.png")}
        assert min(diffs, key=diffs.get) == donor and diffs[donor] < 3, (k, diffs)
    assert "ref.jpg" not in samples["eve/e1.png"]
    assert load_json((out / "refs.manifest.json"))["references"] == 3


def test_reference_embedding_is_stored_and_used_for_conditioning(tmp_path, analyzer):
    """Every sample with a ref.jpg carries the donor face's embedding (ref_id.npy: the analyzer's, on the donor photo,
    aligned with the donor's detected key points) and those key points in ref.jpg pixels (meta ref_kps); training
    examples condition on them, never on the target's own id.npy."""
    from realisid.data.example import ExampleMaker
    from realisid.images import identity_crop
    from realisid.geometry import expand_square_box

    src, out = tmp_path / "src", tmp_path / "out"
    photos = {  # bob's photo 2 has the larger face: the donor of bob/1; bob/1 is the donor of bob/2
        "bob/1.png": scene(256, 256, ((96, 64, 32, 255),), bg=(90, 0, 0)),
        "bob/2.png": scene(512, 512, ((192, 256, 64, 255),), bg=(0, 90, 0)),
        "solo/1.png": scene(256, 256, ((32, 160, 32, 255),)),
    }
    for k, arr in photos.items():
        save(src / k, arr)
    build_shards(str(src), str(out), "refemb", analyzer, workers=0, ref_size=96, progress=False)
    samples = by_source(read_shards(out, "refemb"))
    meta = {k: json.loads(s["json"]) for k, s in samples.items()}
    emb = {k: np.load(io.BytesIO(s["id.npy"]), allow_pickle=False) for k, s in samples.items()}
    for k, donor in (("bob/1.png", "bob/2.png"), ("bob/2.png", "bob/1.png")):
        ref_emb = np.load(io.BytesIO(samples[k]["ref_id.npy"]), allow_pickle=False)
        assert ref_emb.shape == (64,) and ref_emb.dtype == np.float32
        d = meta[donor]  # the donor photo, its detected face and key points
        np.testing.assert_allclose(ref_emb, analyzer.embed(photos[donor], np.asarray(d["kps"], np.float32)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ref_emb, emb[donor], atol=1e-6)
        assert np.abs(ref_emb - emb[k]).max() > 1e-3  # not the target's own embedding
        x0, y0, x1, y1 = expand_square_box(d["bbox"], 1.3, d["width"], d["height"])  # how ref.jpg was cut
        want = (np.asarray(d["kps"]) - [x0, y0]) * 96 / (x1 - x0)
        np.testing.assert_allclose(meta[k]["ref_kps"], want, atol=2e-3)
        ref = np.asarray(decoded(samples[k], "ref.jpg"), np.float32)
        cut = np.asarray(identity_crop(Image.fromarray(photos[donor]), d["bbox"], 96)[0], np.float32)
        assert ref.shape == (96, 96, 3) and np.abs(ref - cut).mean() < 3
    assert "ref.jpg" not in samples["solo/1.png"] and "ref_id.npy" not in samples["solo/1.png"]
    assert "ref_kps" not in meta["solo/1.png"]
    # training conditions on the reference's embedding and key points; without a reference, on the target's
    maker = ExampleMaker(embed_dim=64, resolution=64, vae_scale_factor=2, local_latent_size=16, crop_expand=1.6, id_image_size=48)
    raws = {json.loads(s["json"])["source"]: {"__key__": key, **{e: b for e, b in s.items() if not e.startswith("_")}}
            for key, s in read_shards(out, "refemb").items()}
    for k, donor in (("bob/1.png", "bob/2.png"), ("bob/2.png", "bob/1.png")):
        ex = maker(raws[k])
        assert ex["has_id_embed"] and np.allclose(ex["id_embed"].numpy(), emb[donor], atol=1e-6)
        np.testing.assert_allclose(ex["id_kps"].numpy(), np.asarray(meta[k]["ref_kps"]) * 48 / 96, rtol=1e-6)
    solo = maker(raws["solo/1.png"])
    assert solo["has_id_embed"] and np.allclose(solo["id_embed"].numpy(), emb["solo/1.png"], atol=1e-6)


# ------------------------------------------------------------------------------------------- test double

class ScriptedAnalyzer:
    """Faces chosen by the image's top-left pixel value; no embedding, so no id.npy is written."""
    name = "scripted-double"
    embedding_dim = None

    def __init__(self, script):
        self.script = script
        self.calls = 0

    def detect(self, image):
        self.calls += 1
        return [Face(bbox=b, kps=np.full((5, 2), 30.0), det_score=s) for b, s in self.script[int(image[0, 0, 0])]]

    def embed(self, image, kps):
        raise NotImplementedError


def test_double_second_small_face_border_and_score(tmp_path):
    script = {
        10: [([10, 10, 50, 50], 0.9), ([60, 60, 70, 70], 0.8)],  # small bystander: kept
        20: [([10, 10, 50, 50], 0.9), ([60, 60, 95, 95], 0.8)],  # second person: several_faces
        30: [([40, 10, 102, 72], 0.9)],  # 6 px of 62 outside a 96-px image (9.7%): tolerated
        40: [([40, 10, 90, 60], 0.9)],  # 26 px of 50 outside a 64-px image: cut
        50: [([10, 10, 50, 50], 0.45)],
    }
    for v, size in ((10, 96), (20, 96), (30, 96), (40, 64), (50, 96)):
        arr = np.full((size, size, 3), v, np.uint8)
        save(tmp_path / "src" / f"case{v}.png", arr)
    a = ScriptedAnalyzer(script)
    m = build_shards(str(tmp_path / "src"), str(tmp_path / "out"), "dbl", a, workers=0, progress=False)
    assert m["kept"] == 2 and m["rejected"] == {"several_faces": 1, "face_cut_by_border": 1, "low_score": 1}
    samples = by_source(read_shards(tmp_path / "out", "dbl"))
    assert set(samples) == {"case10.png", "case30.png"}
    assert json.loads(samples["case30.png"]["json"])["bbox"] == [40, 10, 96, 72]  # clipped to the image
    assert all("id.npy" not in s for s in samples.values()) and m["face_model"] == "scripted-double"


class Failing(ScriptedAnalyzer):
    def detect(self, image):
        raise RuntimeError("onnxruntime exploded")


def test_analyzer_errors_are_counted_and_a_broken_analyzer_stops_the_build(tmp_path):
    for i in range(10):
        save(tmp_path / "src" / f"{i}.png", np.full((40, 40, 3), i, np.uint8))
    with pytest.raises(RuntimeError, match=r"face analysis failed on the first 10 images \(first: 0.png: RuntimeError: onnxruntime exploded\)"):
        build_shards(str(tmp_path / "src"), str(tmp_path / "out"), "x", Failing({}), workers=0, progress=False)
    save(tmp_path / "src2" / "ok.png", np.full((40, 40, 3), 1, np.uint8))
    save(tmp_path / "src2" / "bad.png", np.full((40, 40, 3), 2, np.uint8))

    class FailsOnTwo(ScriptedAnalyzer):
        def detect(self, image):
            if image[0, 0, 0] == 2:
                raise RuntimeError("bad input")
            return super().detect(image)

    m = build_shards(str(tmp_path / "src2"), str(tmp_path / "out2"), "x", FailsOnTwo({1: [([5, 5, 37, 37], 0.9)]}), workers=0,
                     progress=False)
    assert m["kept"] == 1 and m["rejected"] == {"analysis_error": 1}


def test_sample_keys_are_stable_and_dot_free():
    k = build.sample_key("alice/IMG 0001.final.JPG")
    assert k == build.sample_key("alice/IMG 0001.final.JPG") and "." not in k and k.startswith("IMG_0001_final-")
    assert build.sample_key("/data/a.tar#x/000001") != build.sample_key("/data/b.tar#x/000001")


# ------------------------------------------------------------------------------------------- tar source

def _add(tf, name, data):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def test_tar_source_corrupt_member_missing_image_and_truncation(tmp_path, analyzer):
    face = jpeg_bytes(scene())
    png = io.BytesIO()
    Image.fromarray(scene(squares=((160, 32, 32, 255),))).save(png, format="PNG")
    d = tmp_path / "tars"
    d.mkdir()
    with tarfile.open(d / "part-000.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        _add(tf, "s0.jpg", face)
        _add(tf, "s0.txt", b"caption zero")
        _add(tf, "s1.jpg", face)  # header damaged below
        _add(tf, "s1.txt", b"caption one")
        _add(tf, "s2.json", json.dumps({"caption": "no image here"}).encode())
        _add(tf, "s3.png", png.getvalue())
        _add(tf, "s3.json", json.dumps({"caption": "three", "identity": "zoe"}).encode())
        _add(tf, "s4.jpg", face)
        _add(tf, "s4.json", b"{broken")
        _add(tf, "s5.jpg", jpeg_bytes(scene(squares=())))
    raw = bytearray((d / "part-000.tar").read_bytes())
    with tarfile.open(d / "part-000.tar") as tf:
        s1 = next(ti for ti in tf.getmembers() if ti.name == "s1.jpg")
    raw[s1.offset + 148:s1.offset + 156] = b"garbage!"  # checksum field: the member is unreadable
    (d / "part-000.tar").write_bytes(bytes(raw))
    with tarfile.open(d / "part-001.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        _add(tf, "dir/s6.jpg", face)
        _add(tf, "dir/s6.json", json.dumps({"identity": "zoe"}).encode())
        _add(tf, "dir/s7.jpg", face)
    raw = (d / "part-001.tar").read_bytes()
    with tarfile.open(d / "part-001.tar") as tf:
        s7 = tf.getmember("dir/s7.jpg")
    (d / "part-001.tar").write_bytes(raw[: s7.offset_data + 300])  # truncated inside s7's data

    import webdataset as wds

    with wds.TarWriter(str(d / "part-002.tar")) as w:  # as img2dataset writes them: key.jpg, key.txt, key.json
        w.write({"__key__": "000000007", "jpg": face, "txt": "from img2dataset",
                 "json": json.dumps({"url": "http://x", "caption": "ignored, txt wins"})})
        w.write({"__key__": "000000008", "jpg": face})
        w.write({"__key__": "000000007", "jpg": face})  # the key again: rejected, the first one is kept

    out = tmp_path / "out"
    m = build_shards(str(d), str(out), "tars", analyzer, workers=0, progress=False)
    assert m["kept"] == 6
    assert m["rejected"] == {"corrupt_tar_member": 2, "missing_image": 1, "no_face": 1, "duplicate_key": 1}
    assert m["warnings"] == {"bad_sidecar": 1} and m["identities"] == {"zoe": 2}
    samples = by_source(read_shards(out, "tars"))
    t0, t1, t2 = (str(d / f"part-00{i}.tar") for i in range(3))
    assert set(samples) == {f"{t0}#s0", f"{t0}#s3", f"{t0}#s4", f"{t1}#dir/s6", f"{t2}#000000007", f"{t2}#000000008"}
    assert json.loads(samples[f"{t2}#000000007"]["json"])["caption"] == "from img2dataset"
    meta = {k: json.loads(s["json"]) for k, s in samples.items()}
    assert meta[f"{t0}#s0"]["caption"] == "caption zero" and meta[f"{t0}#s0"]["identity"] is None
    assert meta[f"{t0}#s3"]["caption"] == "three" and meta[f"{t0}#s3"]["bbox"] == [160, 32, 192, 64]
    assert meta[f"{t0}#s4"]["caption"] == ""
    assert "ref.jpg" in samples[f"{t0}#s3"] and "ref.jpg" in samples[f"{t1}#dir/s6"]
