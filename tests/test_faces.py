"""realisid.faces: the insightface implementation through real insightface code on tiny ONNX models, and
the stand-in identity encoder on tiny procedural shards."""
from __future__ import annotations

import colorsys
import json
import logging
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(__file__))
import onnx_models  # noqa: E402

from realisid.data.shards import face_meta  # noqa: E402
from realisid.data.shard_writer import FaceShardWriter  # noqa: E402
from realisid.faces import Face, FaceAnalyzer, load_face_analyzer, register_face_analyzer  # noqa: E402
from realisid.faces.analysis import LANDMARK_NAMES  # noqa: E402

# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface")
    full = root / "full"
    full.mkdir()
    onnx_models.make_scrfd(str(full / "det_tiny.onnx"))
    onnx_models.make_arcface(str(full / "w_tiny.onnx"), dim=128)
    onnx_models.make_landmark_106(str(full / "2d106_tiny.onnx"))
    rec_only = root / "rec_only"
    rec_only.mkdir()
    onnx_models.make_arcface(str(rec_only / "w_tiny.onnx"), dim=96, seed=1)
    det_only = root / "det_only"
    det_only.mkdir()
    onnx_models.make_scrfd(str(det_only / "det_tiny.onnx"))
    empty = root / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("no models here")
    return {"full": str(full), "rec_only": str(rec_only), "det_only": str(det_only), "empty": str(empty),
            "missing": str(root / "nope")}


@pytest.fixture(scope="module")
def analyzer(model_dirs):
    return load_face_analyzer({"kind": "insightface", "model_dir": model_dirs["full"], "det_size": [640, 640], "det_thresh": 0.5})


def scene() -> np.ndarray:
    """320x240 RGB image; detector input is 640x480 (scale 2), so 16-px squares on the 16-px grid fill one
    stride-32 detector cell. Bright square -> high score, grey square -> lower score."""
    img = np.zeros((240, 320, 3), np.uint8)
    img[64:80, 96:112] = 255
    img[160:176, 192:208] = 200
    return img


# ------------------------------------------------------------------------------------------- insightface routing

def test_real_insightface_routes_tiny_models(model_dirs):
    from insightface.model_zoo import get_model
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.landmark import Landmark
    from insightface.model_zoo.scrfd import SCRFD

    d = model_dirs["full"]
    det = get_model(os.path.join(d, "det_tiny.onnx"), providers=["CPUExecutionProvider"])
    rec = get_model(os.path.join(d, "w_tiny.onnx"), providers=["CPUExecutionProvider"])
    lmk = get_model(os.path.join(d, "2d106_tiny.onnx"), providers=["CPUExecutionProvider"])
    assert isinstance(det, SCRFD) and det.taskname == "detection" and det.use_kps and det.fmc == 3
    assert isinstance(rec, ArcFaceONNX) and rec.taskname == "recognition" and rec.input_size == (112, 112)
    assert (rec.input_mean, rec.input_std) == (127.5, 127.5)
    assert isinstance(lmk, Landmark) and lmk.taskname == "landmark_2d_106"


def test_analyzer_loads_all_tasks(analyzer, model_dirs):
    assert isinstance(analyzer, FaceAnalyzer)
    assert analyzer.name == f"insightface:{os.path.abspath(model_dirs['full'])}"
    assert analyzer.embedding_dim == 128
    assert set(analyzer.models) == {"detection", "recognition", "landmark_2d_106"}


# ------------------------------------------------------------------------------------------- detect / embed

def test_detect_finds_the_known_faces(analyzer):
    faces = analyzer.detect(scene())
    assert len(faces) == 2
    assert all(isinstance(f, Face) for f in faces)
    assert faces[0].det_score > 0.99 > faces[1].det_score > 0.5  # sorted by score, descending
    np.testing.assert_allclose(faces[0].bbox, [96, 64, 112, 80], atol=1e-3)
    np.testing.assert_allclose(faces[1].bbox, [192, 160, 208, 176], atol=1e-3)
    expected_kps = np.array([96, 64]) + onnx_models.SCRFD_KPS * 16  # cell of 32 detector px = 16 image px
    np.testing.assert_allclose(faces[0].kps, expected_kps, atol=1e-3)
    for f in faces:
        assert f.bbox.shape == (4,) and f.bbox.dtype == np.float32
        assert f.kps.shape == (5, 2) and f.kps.dtype == np.float32
        assert isinstance(f.det_score, float)
        assert f.embedding.shape == (128,) and f.embedding.dtype == np.float32
        assert abs(np.linalg.norm(f.embedding) - 1) < 1e-5


def test_detect_dense_landmarks_are_named_contours(analyzer):
    face = analyzer.detect(scene())[0]
    assert set(face.landmarks) == set(LANDMARK_NAMES)
    sizes = {k: len(v) for k, v in face.landmarks.items()}
    assert sizes == {"left_brow": 5, "right_brow": 5, "left_eye": 6, "right_eye": 6, "outer_lips": 12, "inner_lips": 8}
    # insightface's Landmark maps a normalised point p to centre + p * 1.5 * box_side / 2 (box side 16 px)
    pts = onnx_models.landmark_106_points()
    centre = np.array([104.0, 72.0])
    expect = centre + pts * 1.5 * 16 / 2
    np.testing.assert_allclose(face.landmarks["left_eye"][0], expect[35], atol=1e-3)
    np.testing.assert_allclose(face.landmarks["inner_lips"][-1], expect[54], atol=1e-3)
    json.dumps(face.to_meta())  # JSON-serialisable in the shard format's spelling


def test_detect_empty_image_returns_nothing(analyzer):
    assert analyzer.detect(np.zeros((100, 120, 3), np.uint8)) == []


def test_embed_unit_norm_deterministic_and_identity_sensitive(analyzer):
    rng = np.random.default_rng(0)
    img_a = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
    img_b = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
    kps = np.array([[70, 80], [130, 80], [100, 110], [75, 140], [125, 140]], np.float32)
    e1, e2, e3 = analyzer.embed(img_a, kps), analyzer.embed(img_a, kps), analyzer.embed(img_b, kps)
    assert e1.shape == (128,) and e1.dtype == np.float32
    assert abs(np.linalg.norm(e1) - 1) < 1e-5
    np.testing.assert_array_equal(e1, e2)
    assert float(e1 @ e3) < 0.99
    # detect() fills the same embedding embed() gives for the detected keypoints
    img = scene()
    face = analyzer.detect(img)[0]
    np.testing.assert_allclose(analyzer.embed(img, face.kps), face.embedding, atol=1e-6)


def test_embed_without_detector(model_dirs):
    a = load_face_analyzer({"kind": "insightface", "model_dir": model_dirs["rec_only"]})
    assert a.embedding_dim == 96
    kps = np.array([[30, 40], [60, 40], [45, 55], [33, 70], [57, 70]], np.float32)
    assert a.embed(np.full((100, 100, 3), 128, np.uint8), kps).shape == (96,)
    with pytest.raises(RuntimeError, match="no face detection model"):
        a.detect(np.zeros((64, 64, 3), np.uint8))


def test_detect_without_recognition_and_embed_error(model_dirs):
    a = load_face_analyzer({"kind": "insightface", "model_dir": model_dirs["det_only"], "det_size": [640, 640]})
    assert a.embedding_dim is None
    faces = a.detect(scene())
    assert len(faces) == 2 and faces[0].embedding is None and faces[0].landmarks is None
    with pytest.raises(RuntimeError, match="no recognition model"):
        a.embed(scene(), faces[0].kps)


def test_input_validation(analyzer):
    with pytest.raises(ValueError, match="RGB"):
        analyzer.detect(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        analyzer.detect(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="kps"):
        analyzer.embed(np.zeros((10, 10, 3), np.uint8), np.zeros((4, 2)))


def test_model_package_manifest_v2_is_loaded_by_task_and_verified(tmp_path):
    import hashlib

    det = onnx_models.make_scrfd(str(tmp_path / "detector.onnx"))
    onnx_models.make_arcface(str(tmp_path / "recognizer.onnx"), dim=64)
    manifest = {"manifest_version": 2, "model_id": "tiny_pack", "license": "MODEL.LICENSE",
                "tasks": {"detection": {"file": "detector.onnx", "sha256": hashlib.sha256(open(det, "rb").read()).hexdigest()},
                          "recognition": {"file": "recognizer.onnx", "embedding_dimension": 64}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    a = load_face_analyzer({"kind": "insightface", "model_dir": str(tmp_path), "det_size": [640, 640]})
    assert a.embedding_dim == 64 and set(a.models) == {"detection", "recognition"}
    faces = a.detect(scene())
    np.testing.assert_allclose(faces[0].bbox, [96, 64, 112, 80], atol=1e-3)
    assert faces[0].embedding.shape == (64,)
    manifest["tasks"]["detection"]["sha256"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError, match="SHA-256 mismatch"):
        load_face_analyzer({"kind": "insightface", "model_dir": str(tmp_path)})


# ------------------------------------------------------------------------------------------- errors

def test_missing_model_dir_message(model_dirs):
    with pytest.raises(FileNotFoundError) as err:
        load_face_analyzer({"kind": "insightface", "model_dir": model_dirs["missing"]})
    msg = str(err.value)
    assert f"model_dir '{model_dirs['missing']}' does not exist" in msg
    assert "set faces.model_dir to an insightface model folder such as ~/.insightface/models/buffalo_l" in msg


def test_model_name_is_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.insightface must stay untouched
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="buffalo_l' does not exist"):
        load_face_analyzer({"kind": "insightface", "model_dir": "buffalo_l"})
    assert not (tmp_path / ".insightface").exists()


def test_download_hooks_are_blocked_while_loading(tmp_path):
    import insightface.model_zoo.model_zoo as mz

    from realisid.faces.insightface_impl import DownloadBlocked, no_downloads

    original = mz.download_onnx
    with no_downloads(str(tmp_path)):
        with pytest.raises(DownloadBlocked, match="never downloads"):
            mz.download_onnx("models", "det_10g.onnx")
    assert mz.download_onnx is original


def test_folder_without_onnx_message(model_dirs):
    with pytest.raises(FileNotFoundError, match=r"contains no \.onnx files"):
        load_face_analyzer({"kind": "insightface", "model_dir": model_dirs["empty"]})


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match=r"unknown face analyzer kind 'mtcnn'.*'dlib'.*'insightface'.*'yunet-sface'"):
        load_face_analyzer({"kind": "mtcnn"})


def test_registered_kind_is_used(monkeypatch):
    from realisid.faces import registry

    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))  # the registry is restored after the test

    class Double:
        name = "double"
        embedding_dim = 2

        def detect(self, image):
            return [Face(bbox=[0, 0, 4, 4], kps=np.zeros((5, 2)), det_score=1.0)]

        def embed(self, image, kps):
            return np.array([1.0, 0.0], np.float32)

    register_face_analyzer("test-double", lambda cfg: Double())
    a = load_face_analyzer({"kind": "test-double"})
    assert isinstance(a, FaceAnalyzer) and a.detect(None)[0].bbox.dtype == np.float32
    monkeypatch.undo()
    with pytest.raises(ValueError, match="unknown face analyzer kind 'test-double'"):
        load_face_analyzer({"kind": "test-double"})


# ------------------------------------------------------------------------------------------- stand-in encoder

def procedural_face(identity: int, n_ids: int, rng: np.random.Generator, size: int = 96):
    """An image with one 'face' whose look is fixed by the identity (hue, shape, eye colour) and whose
    position, size, background and lighting vary per image. Returns (image, bbox, kps)."""
    hue = identity / n_ids
    face_rgb = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.75, 0.9))
    eye_rgb = tuple(int(255 * c) for c in colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.9, 0.35 + 0.5 * (identity % 2)))
    aspect = 0.75 + 0.25 * (identity % 3) / 2
    bg = rng.integers(0, 80, 3)
    arr = np.clip(bg + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    h = rng.uniform(0.35, 0.55) * size
    w = h * aspect
    cx, cy = rng.uniform(w / 2 + 2, size - w / 2 - 2), rng.uniform(h / 2 + 2, size - h / 2 - 2)
    light = rng.uniform(0.85, 1.1)
    fc = tuple(int(min(255, c * light)) for c in face_rgb)
    box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    draw.ellipse(box, fill=fc)
    kps = np.array([[cx - 0.22 * w, cy - 0.1 * h], [cx + 0.22 * w, cy - 0.1 * h], [cx, cy + 0.08 * h],
                    [cx - 0.18 * w, cy + 0.25 * h], [cx + 0.18 * w, cy + 0.25 * h]], np.float32)
    r = 0.07 * w
    for x, y in kps[:2]:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=eye_rgb)
    draw.line([tuple(kps[3]), tuple(kps[4])], fill=(60, 0, 0), width=max(1, int(0.04 * h)))
    return img, box, kps


def write_procedural_shards(out_dir: str, name: str, ids: list[int], n_ids: int, per_id: int, seed: int, size: int = 96) -> list[str]:
    rng = np.random.default_rng(seed)
    with FaceShardWriter(out_dir, name, face_model="procedural-test", maxcount=50) as writer:
        for k in ids:
            for j in range(per_id):
                img, box, kps = procedural_face(k, n_ids, rng, size)
                meta = face_meta(img.size, box, kps, det_score=1.0, identity=f"id{k:03d}", caption="a face", source="test")
                writer.write(f"{name}-{k:03d}-{j:02d}", img, meta)
    return sorted(os.path.join(out_dir, s) for s in writer.manifest.shards)


@pytest.fixture(scope="module")
def procedural_shards(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards"))
    n_ids = 24
    train_ids = [k for k in range(n_ids) if k % 4 != 1]  # 18 train identities
    val_ids = [k for k in range(n_ids) if k % 4 == 1]  # 6 held-out identities, hues between train hues
    train = write_procedural_shards(out, "train", train_ids, n_ids, per_id=8, seed=0)
    val = write_procedural_shards(out, "val", val_ids, n_ids, per_id=6, seed=1)
    return train, val


@pytest.fixture(scope="module")
def trained_standin(procedural_shards, tmp_path_factory):
    from realisid.embedded.standin import train_standin

    train, val = procedural_shards
    out = str(tmp_path_factory.mktemp("standin"))
    stats = train_standin(train, val, out, steps=120, batch_size=64, image_size=32, embed_dim=32, lr=3e-3, seed=0,
                          widths=(16, 32, 64))
    return out, stats


def test_identity_crop_shape_range_and_box():
    from realisid.embedded.standin import identity_crop
    from realisid.geometry import expand_square_box

    arr = np.zeros((100, 120, 3), np.uint8)
    arr[:, :60] = 255  # left half white
    img = Image.fromarray(arr)
    bbox = (40, 30, 80, 70)
    crop = identity_crop(img, bbox, 24)
    assert crop.shape == (3, 24, 24) and crop.dtype == torch.float32
    assert crop.min() >= -1.0 and crop.max() <= 1.0
    assert crop.min() == -1.0 and crop.max() == 1.0  # black and white pixels map to the range's ends
    x0, y0, x1, y1 = expand_square_box(bbox, 1.3, 120, 100)
    assert (x1 - x0) == 52 and x0 == 34  # the crop is the geometry module's square; the white edge falls at x=60
    col = (60 - x0) / (x1 - x0) * 24
    assert crop[:, :, : int(col) - 1].min() == 1.0 and crop[:, :, int(col) + 1:].max() == -1.0


def test_standin_forward_is_unit_norm():
    from realisid.embedded.standin import StandInArcFace

    m = StandInArcFace(image_size=32, embed_dim=16, widths=(8, 16)).eval()
    out = m(torch.rand(3, 3, 32, 32) * 2 - 1)
    assert out.shape == (3, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    assert m.config["image_size"] == 32 and m.config["embed_dim"] == 16 and m.config["name"] == "standin-arcface-synthetic"


def test_train_standin_separates_held_out_identities(trained_standin):
    out, stats = trained_standin
    assert stats["name"] == "standin-arcface-synthetic"
    assert stats["n_train_identities"] == 18 and stats["n_val_identities"] == 6
    assert stats["n_same_pairs"] == 6 * 15 and stats["n_diff_pairs"] == stats["n_same_pairs"]
    assert stats["verification_accuracy"] > 0.9, stats
    assert stats["mean_same_cos"] > stats["mean_diff_cos"]
    assert -1.0 <= stats["threshold"] <= 1.0
    assert stats["train_seconds"] > 0  # timed and recorded (speed is measured in benchmarks/, not asserted here)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["name"] == "standin-arcface-synthetic" and config["architecture"]["widths"] == [16, 32, 64]
    assert config["stats"]["verification_accuracy"] == stats["verification_accuracy"]


def test_load_standin_reproduces_training_outputs(trained_standin, procedural_shards):
    from realisid.embedded.standin import evaluate_standin, load_standin

    out, stats = trained_standin
    a, b = load_standin(out), load_standin(os.path.join(out, "model.safetensors"))
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    torch.testing.assert_close(a(x).norm(dim=1), torch.ones(4))
    again = evaluate_standin(a, *procedural_shards, seed=0)  # same protocol, reloaded weights
    for key in ("verification_accuracy", "threshold", "mean_same_cos", "mean_diff_cos"):
        assert again[key] == pytest.approx(stats[key], abs=1e-5), key


def test_embed_faces_matches_identity_crops(trained_standin):
    from realisid.embedded.standin import embed_faces, load_standin

    model = load_standin(trained_standin[0])
    rng = np.random.default_rng(5)
    faces = [procedural_face(k, 24, rng) for k in (1, 1, 9)]
    emb = embed_faces(model, [f[0] for f in faces], [f[1] for f in faces])
    assert emb.shape == (3, 32) and emb.dtype == np.float32
    assert emb[0] @ emb[1] > emb[0] @ emb[2]


def test_load_standin_missing_files(tmp_path):
    from realisid.embedded.standin import load_standin

    with pytest.raises(FileNotFoundError) as err:
        load_standin(str(tmp_path / "standin"))
    msg = str(err.value)
    assert str(tmp_path / "standin") in msg
    assert "run `make train` once to prepare it or set model.id_encoder.path" in msg


def test_train_standin_logs_accuracy(procedural_shards, tmp_path, caplog):
    from realisid.embedded.standin import train_standin

    train, val = procedural_shards
    with caplog.at_level(logging.INFO, logger="realisid.embedded.standin"):
        stats = train_standin(train, val, str(tmp_path), steps=3, batch_size=16, widths=(8, 16), embed_dim=8)
    assert stats["steps"] == 3
    assert any("standin-arcface-synthetic" in r.getMessage() and "verification accuracy" in r.getMessage()
               for r in caplog.records)
