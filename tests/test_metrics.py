"""realisid.metrics: known answers per face-scale bin, misses that count, FID with the stand-in feature net,
exactness under a 2-process DDP run, and score_faces end to end with the tiny ONNX insightface models."""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import onnx_models  # noqa: E402

from realisid.embedded.box_analyzer import StandInFaceAnalyzer  # noqa: E402
from realisid.faces import Face, load_face_analyzer  # noqa: E402
from realisid.geometry import DEFAULT_BINS, face_size, scale_bin  # noqa: E402
from realisid.metrics import (  # noqa: E402
    IdentitySimilarity,
    LocationIoU,
    PoseError,
    bin_index,
    match_face,
    score_faces,
)
from metric_values import BINS, NAN, is_nan, val  # noqa: E402



# ------------------------------------------------------------------------------------------- bins

def test_bin_index_puts_known_sizes_in_their_bins():
    idx = bin_index(torch.tensor([0.3, 0.2, 0.15, 0.1, 0.25, 1 / 8, 1 / 6, 0.0]), DEFAULT_BINS)
    assert [BINS[i] for i in idx.tolist()] == ["large", "medium", "small", "tiny", "large", "small", "medium", "tiny"]
    sizes = np.random.default_rng(0).uniform(0, 0.6, 200)
    assert [BINS[i] for i in bin_index(torch.from_numpy(sizes), DEFAULT_BINS).tolist()] == [scale_bin(s) for s in sizes]


def test_bin_index_errors_name_the_value():
    with pytest.raises(ValueError, match=r"face size 0.7 .*falls in no bin"):
        bin_index(torch.tensor([0.1, 0.7]), {"a": (0.0, 0.5)})
    with pytest.raises(ValueError, match="falls in no bin"):
        bin_index(torch.tensor([NAN]), DEFAULT_BINS)
    with pytest.raises(ValueError, match="may not be named 'all'"):
        IdentitySimilarity({"all": (0, None)}, "enc")


def test_custom_bins_from_config_spelling():
    m = IdentitySimilarity({"near": [0.2, None], "far": [0, 0.2]}, "enc")
    m.update(torch.tensor([0.5, 0.5]), torch.tensor([True, True]), torch.tensor([0.3, 0.1]))
    out = m.compute()
    assert list(k for k in out if k.startswith("id_sim/")) == ["id_sim/near", "id_sim/far", "id_sim/all"]
    assert val(out, "n/near") == 1 and val(out, "n/far") == 1


# ------------------------------------------------------------------------------------------- identity similarity

class FakeAnalyzer:
    """Returns the given faces for each call of detect(), in order; embed() looks the embedding up by the
    face's first keypoint x (for faces given without an embedding)."""

    name = "fake-encoder"
    embedding_dim = 3

    def __init__(self, faces_per_image, embed_table=None):
        self.faces = list(faces_per_image)
        self.embed_table = embed_table or {}
        self.embed_calls = 0

    def detect(self, image):
        return self.faces.pop(0)

    def embed(self, image, kps):
        self.embed_calls += 1
        return np.asarray(self.embed_table[float(kps[0, 0])], np.float32)


def face_at(box, emb=None, score=0.9):
    x0, y0, x1, y1 = box
    kps = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]]) * [x1 - x0, y1 - y0] + [x0, y0]
    return Face(bbox=box, kps=kps, det_score=score, embedding=emb)


def blank(n=4, size=64):
    return [np.zeros((size, size, 3), np.uint8) for _ in range(n)]


def test_score_faces_identical_is_one_orthogonal_is_zero_and_miss_is_nan():
    e1, e2 = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    box = (10, 10, 30, 30)
    analyzer = FakeAnalyzer([[face_at(box, e1)], [face_at(box, e1)], [], [face_at((40, 40, 60, 60), e1)]])
    sim, found, boxes = score_faces(blank(), [box] * 4, [e1 * 3.0, e2, e1, e1], analyzer)  # refs need not be unit
    assert sim.dtype == torch.float32 and found.dtype == torch.bool and boxes.shape == (4, 4)
    assert float(sim[0]) == pytest.approx(1.0, abs=1e-6) and float(sim[1]) == pytest.approx(0.0, abs=1e-6)
    assert found.tolist() == [True, True, False, False]  # no face / a face elsewhere: misses
    assert is_nan(sim[2]) and is_nan(sim[3]) and torch.isnan(boxes[2:]).all()
    torch.testing.assert_close(boxes[0], torch.tensor(box, dtype=torch.float32))


def test_score_faces_embeds_with_analyzer_when_face_has_no_embedding():
    e = np.array([0.6, 0.8, 0.0])
    box = (10, 10, 30, 30)
    f = face_at(box, None)
    analyzer = FakeAnalyzer([[f]], {float(f.kps[0, 0]): e * 2})
    sim, found, _ = score_faces(blank(1), [box], [e], analyzer)
    assert analyzer.embed_calls == 1 and bool(found[0]) and float(sim[0]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="3-d embeddings but the reference embedding is 2-d"):
        score_faces(blank(1), [box], [np.ones(2)], FakeAnalyzer([[face_at(box, e)]]))
    with pytest.raises(ValueError, match="one target box and one reference embedding per image"):
        score_faces(blank(2), [box], [e, e], FakeAnalyzer([]))


def test_match_face_prefers_iou_then_nearest_centre_inside_box():
    target = (0, 0, 100, 100)
    a, b = face_at((0, 0, 90, 90)), face_at((50, 50, 150, 150))
    assert match_face([b, a], target) is a  # highest IoU
    small_far, small_near = face_at((10, 10, 20, 20)), face_at((45, 45, 55, 55))  # IoU 0.01 < 0.1 each
    assert match_face([small_far, small_near], target) is small_near  # centre inside, nearest the target centre
    assert match_face([face_at((95, 95, 200, 200))], target) is None  # centre outside the box, IoU < 0.1
    assert match_face([], target) is None
    assert match_face([small_near], target, min_iou=0.0) is small_near


def test_identity_similarity_known_answers_and_misses_count():
    m = IdentitySimilarity(DEFAULT_BINS, encoder_name="fake-encoder")
    # large bin: 3 of 4 found with similarities 1, 0, 0.5 -> found_rate 0.75, id_sim 1.5 / 4, id_sim_found 1.5 / 3
    m.update(torch.tensor([1.0, 0.0, NAN, 0.5]), torch.tensor([True, True, False, True]), torch.tensor([0.3, 0.3, 0.3, 0.3]))
    # one face each in medium (0.2), small (0.15), tiny (0.1); the tiny one missed (its similarity is ignored)
    m.update(torch.tensor([0.8, 0.4, 0.9]), torch.tensor([True, True, False]), torch.tensor([0.2, 0.15, 0.1]))
    out = m.compute()
    assert val(out, "found_rate/large") == 0.75
    assert val(out, "id_sim/large") == pytest.approx(1.5 / 4, abs=1e-7)
    assert val(out, "id_sim_found/large") == pytest.approx(0.5, abs=1e-7)
    assert val(out, "id_sim/medium") == pytest.approx(0.8) and val(out, "id_sim/small") == pytest.approx(0.4)
    assert val(out, "id_sim/tiny") == 0.0 and val(out, "found_rate/tiny") == 0.0 and is_nan(out["id_sim_found/tiny"])
    assert val(out, "n/large") == 4 and val(out, "n_found/large") == 3 and val(out, "n/all") == 7
    assert val(out, "found_rate/all") == pytest.approx(5 / 7)
    assert val(out, "id_sim/all") == pytest.approx(2.7 / 7, abs=1e-6)
    assert val(out, "id_sim_found/all") == pytest.approx(2.7 / 5, abs=1e-6)
    # an empty bin is NaN, not 0
    m2 = IdentitySimilarity(None, "enc")
    m2.update(torch.tensor([1.0]), torch.tensor([True]), torch.tensor([0.3]))
    out2 = m2.compute()
    assert is_nan(out2["id_sim/tiny"]) and is_nan(out2["found_rate/tiny"]) and val(out2, "n/tiny") == 0


def test_identity_similarity_through_score_faces_and_describe(caplog):
    e1, e2 = np.array([1.0, 0, 0]), np.array([0, 0, 1.0])
    box = (10, 10, 30, 30)
    analyzer = FakeAnalyzer([[face_at(box, e1)], [face_at(box, e1)], [face_at(box, e1)], []])
    sim, found, _ = score_faces(blank(), [box] * 4, [e1, e1, e2, e1], analyzer)
    m = IdentitySimilarity(DEFAULT_BINS, encoder_name=analyzer.name, conditioning_encoder="arcface-conditioning")
    m.update(sim, found, torch.full((4,), face_size(box, 64, 64)))  # 20/64 = 0.3125 -> large
    out = m.compute()
    assert val(out, "id_sim/large") == pytest.approx(0.5, abs=1e-6)  # (1 + 1 + 0 + miss 0) / 4
    assert val(out, "id_sim_found/large") == pytest.approx(2 / 3, abs=1e-6)
    assert val(out, "found_rate/large") == 0.75
    assert m.encoder_name == "fake-encoder"
    assert "fake-encoder" in m.describe() and "arcface-conditioning" in m.describe()
    with pytest.raises(ValueError, match="encoder_name"):
        IdentitySimilarity(DEFAULT_BINS, encoder_name="")
    with caplog.at_level("WARNING", logger="realisid.metrics.identity"):
        same = IdentitySimilarity(DEFAULT_BINS, encoder_name="enc", conditioning_encoder="enc")
    assert "flatters" in caplog.text and "SAME" in same.describe()


def test_identity_similarity_input_errors():
    m = IdentitySimilarity(None, "enc")
    with pytest.raises(ValueError, match=r"similarity at index 1 is nan although found\[1\] is True"):
        m.update(torch.tensor([0.5, NAN]), torch.tensor([True, True]), torch.tensor([0.3, 0.3]))
    with pytest.raises(ValueError, match="similarity 1.5000 at index 0 is not a cosine"):
        m.update(torch.tensor([1.5]), torch.tensor([True]), torch.tensor([0.3]))
    with pytest.raises(ValueError, match="2 face sizes for 1 faces"):
        m.update(torch.tensor([0.5]), torch.tensor([True]), torch.tensor([0.3, 0.3]))
    m.update(torch.tensor([0.5, NAN]), None, torch.tensor([0.3, 0.3]))  # found inferred from finiteness
    assert val(m.compute(), "found_rate/large") == 0.5


# ------------------------------------------------------------------------------------------- stand-in analyzer

def test_standin_analyzer_takes_the_target_box_and_says_so():
    from realisid.embedded.standin import StandInArcFace

    torch.manual_seed(0)
    model = StandInArcFace(image_size=32, embed_dim=16, widths=(8, 16)).eval()
    analyzer = StandInFaceAnalyzer(model)
    assert "stand-in" in analyzer.name and "location" in analyzer.name and "not measured" in analyzer.name
    assert analyzer.embedding_dim == 16
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    other = np.zeros((96, 96, 3), np.uint8)
    other[:, :40] = (250, 200, 30)  # a different picture in the same box
    box = (20.0, 24.0, 60.0, 64.0)
    face = analyzer.detect_in_box(img, box)
    np.testing.assert_array_equal(face.bbox, np.array(box, np.float32))
    assert math.isnan(face.det_score) and face.embedding.shape == (16,)
    assert abs(np.linalg.norm(face.embedding) - 1) < 1e-5
    np.testing.assert_allclose(analyzer.embed(img, face.kps), face.embedding, atol=1e-5)  # kps -> same box
    with pytest.raises(NotImplementedError, match="detect_in_box"):
        analyzer.detect(img)
    sim, found, boxes = score_faces([img, other], [box, box], [face.embedding, face.embedding], analyzer)
    assert found.tolist() == [True, True]  # found by construction: location is not measured
    assert float(sim[0]) == pytest.approx(1.0, abs=1e-5) and float(sim[1]) < 1 - 1e-3  # (an untrained net: only "different")
    torch.testing.assert_close(boxes, torch.tensor([box, box]))


# ------------------------------------------------------------------------------------------- location / pose

def test_location_iou_exact_values():
    m = LocationIoU(DEFAULT_BINS)
    target = torch.tensor([[0.0, 0, 10, 10]] * 3)
    detected = torch.tensor([[0.0, 0, 10, 10], [5.0, 0, 15, 10], [NAN] * 4])  # identical, half-shifted, miss
    m.update(detected, target, torch.tensor([0.3, 0.3, 0.3]))
    m.update(torch.tensor([[20.0, 20, 30, 30]]), torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0.1]))  # no overlap
    out = m.compute()
    assert val(out, "loc_iou/large") == pytest.approx((1 + 1 / 3 + 0) / 3, abs=1e-7)  # 50 / 150 = 1/3
    assert val(out, "loc_iou_found/large") == pytest.approx((1 + 1 / 3) / 2, abs=1e-7)
    assert val(out, "loc_found_rate/large") == pytest.approx(2 / 3)
    assert val(out, "loc_iou/tiny") == 0.0 and val(out, "loc_found_rate/tiny") == 1.0
    assert is_nan(out["loc_iou/small"]) and val(out, "loc_n/all") == 4
    with pytest.raises(ValueError, match="partly NaN"):
        m.update(torch.tensor([[NAN, 0, 1, 1]]), torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([0.3]))


def test_pose_error_exact_and_misses_excluded():
    m = PoseError(DEFAULT_BINS)
    t = torch.tensor([[30.0, 40], [70, 40], [50, 60], [35, 80], [65, 80]])  # inter-ocular 40
    shift = torch.tensor([0.6, 0.8]) * 0.1 * 40  # length 0.1 * iod for every point
    det = torch.stack([t + shift, t, torch.full((5, 2), NAN)])
    m.update(det, t.expand(3, 5, 2), torch.tensor([0.2, 0.2, 0.2]))
    out = m.compute()
    assert val(out, "pose_err/medium") == pytest.approx(0.05, abs=1e-7)  # (0.1 + 0) / 2 found faces
    assert val(out, "pose_n_found/medium") == 2 and val(out, "pose_n/medium") == 3
    assert is_nan(out["pose_err/large"])
    m2 = PoseError(DEFAULT_BINS)
    m2.update((t + shift)[None], t[None], torch.tensor([0.2]))
    assert val(m2.compute(), "pose_err/medium") == pytest.approx(0.1, abs=1e-7)
    with pytest.raises(ValueError, match="inter-ocular distance"):
        m2.update(t[None], torch.zeros(1, 5, 2), torch.tensor([0.2]))


# ------------------------------------------------------------------------------------------- end to end (ONNX)

@pytest.fixture(scope="module")
def onnx_analyzer(tmp_path_factory):
    d = tmp_path_factory.mktemp("insightface_metrics")
    onnx_models.make_scrfd(str(d / "det_tiny.onnx"))
    onnx_models.make_arcface(str(d / "w_tiny.onnx"), dim=64)
    return load_face_analyzer({"kind": "insightface", "model_dir": str(d), "det_size": [640, 640], "det_thresh": 0.5})


def test_score_faces_end_to_end_with_tiny_onnx_models(onnx_analyzer):
    # 320x240 image, detector input 640x480: a bright 16-px square on the 16-px grid is a face at that square
    box = (96.0, 64.0, 112.0, 80.0)
    face_img = np.zeros((240, 320, 3), np.uint8)
    face_img[64:80, 96:112] = 255
    empty = np.zeros((240, 320, 3), np.uint8)
    ref = onnx_analyzer.detect(face_img)[0].embedding
    sim, found, boxes = score_faces([face_img, empty], [box, box], [ref, ref], onnx_analyzer)
    assert found.tolist() == [True, False]
    assert float(sim[0]) == pytest.approx(1.0, abs=1e-5) and is_nan(sim[1])
    torch.testing.assert_close(boxes[0], torch.tensor(box), atol=1e-3, rtol=0)
    size = face_size(box, 320, 240)  # 16 / 320 = 0.05 -> tiny
    sizes = torch.full((2,), size)
    ids, loc = IdentitySimilarity(DEFAULT_BINS, onnx_analyzer.name), LocationIoU(DEFAULT_BINS)
    ids.update(sim, found, sizes)
    loc.update(boxes, torch.tensor([box, box]), sizes)
    out = {**ids.compute(), **loc.compute()}
    assert val(out, "found_rate/tiny") == 0.5 and val(out, "id_sim/tiny") == pytest.approx(0.5, abs=1e-5)
    assert val(out, "loc_iou/tiny") == pytest.approx(0.5, abs=1e-4)
    assert "insightface:" in ids.describe()
