import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from realisid.data.shards import SampleError, decode_sample, encode_jpeg, face_meta
from realisid.data.shard_writer import FaceShardWriter
from realisid.io import encode_array

from conftest import write_face_shards


def _raw(tmp_path, name="train"):
    return list(wds.WebDataset(sorted(str(p) for p in tmp_path.glob(f"{name}-*.tar")), shardshuffle=False))


def test_round_trip_and_manifest(tmp_path):
    manifest = write_face_shards(tmp_path, "train", n=12, with_embed=True, maxcount=5)
    assert [p.name for p in sorted(tmp_path.glob("train-*.tar"))] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert not list(tmp_path.glob("*.tmp"))
    on_disk = json.loads((tmp_path / "train.manifest.json").read_text())
    assert on_disk["kept"] == manifest["kept"] == 12
    assert on_disk["shard_counts"] == {"train-000000.tar": 5, "train-000001.tar": 5, "train-000002.tar": 2}
    assert sum(on_disk["face_size_bins"].values()) == 12 and on_disk["identities"] == {"id0": 4, "id1": 4, "id2": 4}
    raws = _raw(tmp_path)
    assert len(raws) == 12
    s = decode_sample(raws[0], embed_dim=8)
    assert s["key"] == "s0000" and s["image"].mode == "RGB" and s["image"].size == (96, 96)
    assert s["id_embed"].dtype == np.float32 and s["id_embed"].shape == (8,)
    assert s["ref"].size == (32, 32)
    assert len(s["meta"]["kps"]) == 5 and s["meta"]["face_scale"] == pytest.approx((s["meta"]["bbox"][3] - s["meta"]["bbox"][1]) / 96, abs=1e-4)


def _sample(**kw):
    img = Image.new("RGB", (64, 64), (10, 20, 30))
    meta = face_meta((64, 64), (10, 10, 30, 30), np.full((5, 2), 20.0), det_score=1, identity=None, caption="x", source="t")
    raw = {"__key__": "k", "jpg": encode_jpeg(img), "json": json.dumps(meta).encode()}
    raw.update(kw)
    return raw


@pytest.mark.parametrize("change,reason", [
    ({"jpg": b""}, "corrupt_image"),
    ({"jpg": b"not an image at all"}, "corrupt_image"),
    ({"json": b"{not json"}, "malformed_json"),
    ({"json": json.dumps({"width": 64}).encode()}, "malformed_json"),
    ({"id.npy": encode_array(np.array([1.0, np.nan]), np.float32)}, "nan_embedding"),
    ({"id.npy": b"garbage"}, "bad_embedding"),
])
def test_bad_samples_have_reasons(change, reason):
    with pytest.raises(SampleError) as err:
        decode_sample(_sample(**change))
    assert err.value.reason == reason


def test_missing_members_and_wrong_dim():
    raw = _sample()
    del raw["json"]
    with pytest.raises(SampleError, match="missing_json"):
        decode_sample(raw)
    with pytest.raises(SampleError, match="expected 512"):
        decode_sample(_sample(**{"id.npy": encode_array(np.ones(8), np.float32)}), embed_dim=512)


def test_no_pickle_in_embeddings():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SampleError, match="bad_embedding"):
        decode_sample(_sample(**{"id.npy": buf.getvalue()}))


def test_writer_refuses_inconsistent_sample(tmp_path):
    w = FaceShardWriter(str(tmp_path), "x", face_model="t")
    meta = face_meta((64, 64), (10, 10, 30, 30), np.zeros((5, 2)), det_score=1, identity=None, caption="", source="t")
    with pytest.raises(ValueError, match="image is"):
        w.write("a", Image.new("RGB", (32, 32)), meta)
    w.close()


def test_reference_members_round_trip_and_bad_ones_are_named(tmp_path):
    """Shard format 2: ref_id.npy (the reference's embedding) and meta ref_kps (its key points in ref.jpg pixels)."""
    img = Image.new("RGB", (64, 64), (10, 20, 30))
    meta = face_meta((64, 64), (10, 10, 30, 30), np.full((5, 2), 20.0), det_score=1, identity="a", caption="x", source="t")
    ref_kps = np.array([[10.5, 12], [20, 12], [15, 16], [11, 21], [19, 21]])
    with FaceShardWriter(str(tmp_path), "r", face_model="t") as w:
        w.write("new", img, meta, id_embed=np.zeros(4), ref=Image.new("RGB", (30, 24)), ref_id_embed=np.arange(4), ref_kps=ref_kps)
        w.write("old", img, meta, id_embed=np.zeros(4), ref=Image.new("RGB", (30, 24)))  # as shards were written before
        with pytest.raises(ValueError, match="ref_id_embed / ref_kps describe a reference face but no ref image was given"):
            w.write("orphan", img, meta, ref_kps=ref_kps)
        with pytest.raises(SampleError, match=r"ref_kps must be 5 finite \[x, y\] pairs in ref.jpg pixels, got shape \(2, 2\)"):
            w.write("short", img, meta, ref=Image.new("RGB", (30, 24)), ref_kps=ref_kps[:2])
    new, old = _raw(tmp_path, "r")
    s = decode_sample(new, embed_dim=4)
    assert s["has_ref"] and s["ref_size"] == (30, 24) and s["meta"]["ref_kps"] == ref_kps.tolist()
    np.testing.assert_array_equal(s["ref_id_embed"], np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(s["id_embed"], np.zeros(4, np.float32))
    s = decode_sample(old, embed_dim=4, with_ref=False)  # an old shard: read as it always was
    assert s["has_ref"] and s["ref"] is None and s["ref_id_embed"] is None and "ref_kps" not in s["meta"]
    with pytest.raises(SampleError, match="expected 8"):
        decode_sample(new, embed_dim=8)
    raw = _sample(**{"ref_id.npy": encode_array(np.ones(4), np.float32)})
    with pytest.raises(SampleError, match="ref_id.npy without ref.jpg"):
        decode_sample(raw)
    bad = json.loads(_sample()["json"])
    bad["ref_kps"] = [[1, 2]] * 4
    with pytest.raises(SampleError, match="malformed_json: ref_kps must be 5 finite"):
        decode_sample(_sample(json=json.dumps(bad).encode(), **{"ref.jpg": encode_jpeg(img)}))
    good = json.loads(_sample()["json"])
    good["ref_kps"] = ref_kps.tolist()  # the frame of ref_kps is read from ref.jpg's header, even when it is not decoded
    with pytest.raises(SampleError, match="corrupt_image: unreadable image header"):
        decode_sample(_sample(json=json.dumps(good).encode(), **{"ref.jpg": b"not a jpeg"}), with_ref=False)


def test_abort_removes_the_tmp_shard_even_when_the_interrupt_lands_inside_its_opening(tmp_path):
    """SIGTERM becomes a KeyboardInterrupt anywhere in the main thread, also after TarWriter created the .tar.tmp but
    before the writer was assigned; abort() must still remove it and keep the finished shard."""
    w = FaceShardWriter(str(tmp_path), "x", face_model="t", maxcount=1)
    meta = face_meta((64, 64), (10, 10, 30, 30), np.full((5, 2), 20.0), det_score=1, identity=None, caption="", source="t")
    w.write("a", Image.new("RGB", (64, 64)), meta)  # shard 0 finished
    real = w._wds.TarWriter

    class Interrupted:
        def __init__(self, path, **kw):
            real(path, **kw)  # the file now exists
            raise KeyboardInterrupt

    w._wds = type("wds", (), {"TarWriter": Interrupted})
    with pytest.raises(KeyboardInterrupt):
        w.write("b", Image.new("RGB", (64, 64)), meta)
    assert (tmp_path / "x-000001.tar.tmp").exists()
    w.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-000000.tar"]
