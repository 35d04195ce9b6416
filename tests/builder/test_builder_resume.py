"""realisid.data.build: an interrupted build resumes to the same shards, refuses other settings and foreign
shards; worker processes give the same shards; the command line."""
from __future__ import annotations

import argparse
import functools
import os

import pytest

from realisid import cli  # noqa: E402
from realisid.data.build import build_shards, driver  # noqa: E402
from realisid.data.shard_writer import FaceShardWriter  # noqa: E402
from realisid.faces import load_face_analyzer  # noqa: E402
from builder.builder_support import comparable, load_json, read_shards, save, scene, shard_bytes  # noqa: E402


# ------------------------------------------------------------------------------------------- resumability

@pytest.fixture(scope="module")
def people_folder(tmp_path_factory):
    src = tmp_path_factory.mktemp("people")
    for i in range(8):
        x, y = 32 * (i % 7), 32 * (i % 5)
        save(src / f"p{i % 3}/img{i}.jpg", scene(squares=((x, y, 32, 255),), bg=(20 * i, 10, 0)), quality=95)
        (src / f"p{i % 3}/img{i}.txt").write_text(f"photo {i}")
    save(src / "p0/none.png", scene(squares=()))
    return src


@pytest.fixture(scope="module")
def clean_build(people_folder, analyzer, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    m = build_shards(str(people_folder), str(out), "ppl", analyzer, workers=0, shard_size=3, progress=False)
    return out, m


class Forward:
    """Wraps the real analyzer (same name and settings), counting calls and optionally interrupting."""

    def __init__(self, inner, interrupt_at=None):
        self._inner, self.interrupt_at, self.calls = inner, interrupt_at, 0

    def __getattr__(self, k):
        return getattr(self._inner, k)

    def detect(self, image):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return self._inner.detect(image)

    def embed(self, image, kps):
        return self._inner.embed(image, kps)


def test_resume_after_interrupt_while_writing(people_folder, clean_build, analyzer, tmp_path, monkeypatch):
    clean_out, clean = clean_build
    assert clean["kept"] == 8 and clean["rejected"] == {"no_face": 1} and len(clean["shards"]) == 3
    out = tmp_path / "out"

    class Interrupting(FaceShardWriter):
        writes = 0

        def write(self, *a, **kw):
            Interrupting.writes += 1
            if Interrupting.writes == 5:  # shard 0 (3 samples) finished, shard 1 half-written
                raise KeyboardInterrupt
            return super().write(*a, **kw)

    monkeypatch.setattr(driver, "FaceShardWriter", Interrupting)
    with pytest.raises(KeyboardInterrupt):
        build_shards(str(people_folder), str(out), "ppl", analyzer, workers=0, shard_size=3, progress=False)
    monkeypatch.undo()
    # the half-written shard's .tar.tmp is deleted on the way out; one left by a hard kill is deleted by the rerun
    assert sorted(f for f in os.listdir(out) if f.startswith("ppl-")) == ["ppl-000000.tar"]
    (out / "ppl-000001.tar.tmp").write_bytes(b"left by a kill -9")
    journal = load_json((out / "ppl.progress.json"))
    assert [s["file"] for s in journal["shards"]] == ["ppl-000000.tar"] and len(journal["shards"][0]["sources"]) == 3
    assert journal["counts"]["kept"] == 3 and not journal["complete"]
    first = (out / "ppl-000000.tar").read_bytes()
    (out / "ppl-000001.tar").write_bytes(b"renamed, then killed before the journal was written")

    again = Forward(analyzer)
    m = build_shards(str(people_folder), str(out), "ppl", again, workers=0, shard_size=3, progress=False)
    assert again.calls == 0  # the analysis was cached; only writing resumed
    assert (out / "ppl-000000.tar").read_bytes() == first
    assert comparable(m) == comparable(clean)
    assert shard_bytes(out, "ppl") == shard_bytes(clean_out, "ppl")  # byte-identical to an uninterrupted build
    assert not list(out.glob("ppl-*.tar.tmp"))
    assert len(read_shards(out, "ppl")) == 8  # and no duplicate keys
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert load_json((out / "ppl.progress.json"))["complete"]
    # a finished build rerun is a no-op that rewrites the same manifest
    m2 = build_shards(str(people_folder), str(out), "ppl", again, workers=0, shard_size=3, progress=False)
    assert again.calls == 0 and comparable(m2) == comparable(clean)


def test_resume_after_interrupt_while_analysing(people_folder, clean_build, analyzer, tmp_path):
    clean_out, clean = clean_build
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        build_shards(str(people_folder), str(out), "ppl", Forward(analyzer, interrupt_at=4), workers=0, shard_size=3, progress=False)
    assert not [f for f in os.listdir(out) if f.startswith("ppl-")]
    with pytest.raises(KeyboardInterrupt):  # other settings before any shard was written: accepted, analysis redone
        build_shards(str(people_folder), str(out), "ppl", Forward(analyzer, interrupt_at=4), workers=0, shard_size=3,
                     min_face=20, progress=False)
    with pytest.raises(KeyboardInterrupt):
        build_shards(str(people_folder), str(out), "ppl", Forward(analyzer, interrupt_at=4), workers=0, shard_size=3, progress=False)
    again = Forward(analyzer)
    m = build_shards(str(people_folder), str(out), "ppl", again, workers=0, shard_size=3, progress=False)
    assert again.calls == 9 - 3  # the three images analysed before the interruption are not analysed again
    assert comparable(m) == comparable(clean) and shard_bytes(out, "ppl") == shard_bytes(clean_out, "ppl")


def test_resume_refuses_other_settings_and_foreign_shards(people_folder, clean_build, analyzer, tmp_path):
    clean_out, _ = clean_build
    with pytest.raises(ValueError, match=r"different settings \(min_face: 32.0 -> 40.0\); rerun with the same settings"):
        build_shards(str(people_folder), str(clean_out), "ppl", analyzer, workers=0, shard_size=3, min_face=40, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "ppl-000000.tar").write_bytes(b"")
    with pytest.raises(FileExistsError, match="already holds shards ppl-000000.tar"):
        build_shards(str(people_folder), str(foreign), "ppl", analyzer, workers=0, progress=False)
    with pytest.raises(ValueError, match="min_score 1.5 must be in"):
        build_shards(str(people_folder), str(foreign), "x", analyzer, min_score=1.5, progress=False)


# ------------------------------------------------------------------------------------------- parallel, CLI

def test_worker_processes_give_the_same_shards(people_folder, clean_build, analyzer, face_cfg, tmp_path):
    clean_out, clean = clean_build
    out = tmp_path / "out"
    m = build_shards(str(people_folder), str(out), "ppl", analyzer, workers=2, shard_size=3, progress=False,
                     analyzer_factory=functools.partial(load_face_analyzer, face_cfg))
    assert comparable(m) == comparable(clean)
    assert shard_bytes(out, "ppl") == shard_bytes(clean_out, "ppl")


def test_cli_build_shards(model_dir, tmp_path, capsys):
    # the CLI's default det_size is 640: 320-px photos are fed at scale 2, so 16-px squares on the 16-px grid are faces
    src = tmp_path / "src"
    for i, (x, y) in enumerate([(64, 48), (160, 96), (32, 32)]):
        save(src / f"id{i % 2}/p{i}.png", scene(320, 320, ((x, y, 16, 255),)))
    save(src / "id0/two.png", scene(320, 320, ((64, 48, 16, 255), (160, 160, 16, 255))))
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.add_build_parser(sub)
    out = tmp_path / "faces"
    args = parser.parse_args(["build-shards", "--src", str(src), "--out", str(out), "--model-dir", model_dir,
                              "--workers", "0", "--shard-size", "2", "--min-face", "16", "--no-progress"])
    assert args.name is None and args.max_side == 2048 and args.min_score is None and args.analyzer is None
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "kept          : 3 of 4 images (75.0%) in 2 shards" in text
    assert "rejected      : several_faces 1" in text
    assert "face sizes    : tiny 3, small 0, medium 0, large 0" in text
    assert "identities    : 2; 2 samples carry a reference face from another photo" in text
    assert f"shards        : {out}/faces-{{000000..000001}}.tar" in text
    assert f"manifest      : {out / 'faces.manifest.json'}" in text
    m = load_json((out / "faces.manifest.json"))
    assert m["name"] == "faces" and m["kept"] == 3 and m["selection"]["min_face"] == 16
    # nothing given, or an experiment whose analyzer lacks its folder: the real analyzer that ships in packages
    assert cli.faces_config(None, None)["kind"] == "yunet-sface"
    no_faces = tmp_path / "no_faces.yaml"
    no_faces.write_text("defaults: [base]\nfaces:\n  model_dir: null\n")
    assert cli.faces_config(None, str(no_faces))["kind"] == "yunet-sface"
    assert cli.faces_config(None, None, "dlib")["kind"] == "dlib"
    with pytest.raises(ValueError, match="--analyzer insightface needs its model folder: add --model-dir"):
        cli.faces_config(None, None, "insightface")
    # the embedded default's experiments name its synthetic face analyzer
    from realisid.embedded.assets import asset_path

    synthetic = cli.faces_config(None, "local_branch")
    assert synthetic["kind"] == "synthetic" and synthetic["model_dir"] == asset_path("synthetic-face-analyzer")
    cfg = cli.faces_config(model_dir, "local_branch")
    assert cfg["det_size"] == [640, 640] and cfg["model_dir"] == model_dir and cfg["kind"] == "insightface"
