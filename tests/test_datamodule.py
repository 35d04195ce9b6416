import numpy as np
import pytest
import torch

from realisid.data.datamodule import FaceDataModule
from realisid.data.batch import collate, ready_batch, unpack_batch
from realisid.data.example import ExampleMaker, make_example
from realisid.data.shards import decode_sample


def _dm(cfg, shards, **kw):
    data = cfg.data
    data.train_shards = str(shards / "train-*.tar")
    data.val_shards = str(shards / "val-*.tar")
    data.batch_size = 4
    data.num_workers = kw.get("workers", 0)
    data.shuffle_buffer = 8
    data.val_samples = 4
    return FaceDataModule(data, vae_scale_factor=2, local_latent_size=16, crop_expand=1.6, id_image_size=32)


def test_batch_shapes_and_ranges(tiny_cfg, face_shards):
    dm = _dm(tiny_cfg(), face_shards)
    dm.setup("fit")
    import itertools

    batches = list(itertools.islice(dm.train_dataloader(), 3))  # the stream is infinite
    assert [b["data_consumed"] for b in batches] == [4, 8, 12] and {b["data_stream"] for b in batches} == {0}
    shipped = unpack_batch(batches[0])  # one buffer between processes; uint8 pixels
    assert set(batches[0]) - {"packed", "packed_layout"} == {"key", "identity", "caption", "caption_no_identity", "skipped", "data_stream", "data_consumed"}
    assert shipped["image"].shape == (4, 64, 64, 3) and shipped["image"].dtype == torch.uint8
    b = ready_batch(batches[0])  # what the module does once the batch is on its device
    assert b["image"].shape == (4, 3, 64, 64) and b["image"].dtype == torch.float32
    assert b["image"].min() >= -1 and b["image"].max() <= 1
    assert b["pe_map"].shape == (4, 3, 32, 32)
    assert b["pe_map"].min() >= 0 and b["pe_map"].max() <= 1 and b["pe_map"].sum() > 0
    assert b["loc_map"].shape == (4, 1, 64, 64) and set(b["loc_map"].unique().tolist()) <= {0.0, 1.0}
    assert b["id_image"].shape == (4, 3, 32, 32) and b["id_mask"].shape == (4, 1, 32, 32)
    cb = b["crop_box"]
    assert cb.dtype == torch.long and torch.all(cb % 2 == 0) and torch.all(cb[:, 2] - cb[:, 0] == cb[:, 3] - cb[:, 1])
    assert torch.all(cb >= 0) and torch.all(cb <= 64)
    fb = b["face_box"]
    for c, f in zip(cb.tolist(), fb.tolist()):  # every sample's crop holds its whole face box, all four sides
        assert c[0] <= f[0] and c[1] <= f[1] and c[2] >= f[2] and c[3] >= f[3], (c, f)
    assert len(b["caption"]) == 4 and isinstance(b["caption"][0], str)
    assert len(dm.val_examples) == 4


def test_packed_batches_restore_every_tensor_exactly():
    from realisid.data.batch import pack_batch

    batch = {"a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.tensor([True, False, True]),
             "d": torch.randint(0, 255, (2, 3, 3), dtype=torch.uint8), "e": torch.randn(4, 3).t(), "key": ["x", "y"], "n": 4}
    packed = pack_batch(batch)
    assert [k for k, v in packed.items() if isinstance(v, torch.Tensor)] == ["packed"]
    assert all(offset % 8 == 0 for *_, offset, _ in packed["packed_layout"])
    back = unpack_batch(packed)
    assert back.keys() == batch.keys() and back["key"] == ["x", "y"] and back["n"] == 4
    for k in "abcde":
        assert back[k].dtype == batch[k].dtype and torch.equal(back[k], batch[k]), k


def test_example_geometry_is_consistent(face_shards):
    import webdataset as wds

    raw = next(iter(wds.WebDataset(str(face_shards / "train-000000.tar"), shardshuffle=False)))
    s = decode_sample(raw)
    ex = make_example(s, resolution=48, vae_scale_factor=2, local_latent_size=8, crop_expand=1.6, id_image_size=32)
    scale = 48 / 96
    np.testing.assert_allclose(ex["face_box"].numpy(), np.array(s["meta"]["bbox"]) * scale, atol=1e-4)
    np.testing.assert_allclose(ex["kps"].numpy(), np.array(s["meta"]["kps"]) * scale, atol=1e-4)
    # the location map covers the square face box
    assert ex["loc_map"].sum() == pytest.approx((ex["face_box"][2] - ex["face_box"][0]).item() ** 2, abs=2 * 48)


def test_reduced_scale_decoding_gives_the_same_example(face_shards):
    """The stream decodes JPEGs at the smallest DCT scale it needs; geometry must match a full decode."""
    import webdataset as wds

    raws = list(wds.WebDataset(str(face_shards / "train-000000.tar"), shardshuffle=False))
    kw = dict(resolution=32, vae_scale_factor=2, local_latent_size=8, crop_expand=1.6, id_image_size=16)
    maker = ExampleMaker(**kw)
    for raw in raws:
        full = make_example(decode_sample(raw), **kw)
        small = decode_sample(raw, min_side=lambda meta: maker.image_min_side(meta, True), ref_min_side=16)
        assert small["image"].size == (48, 48) and small["decode_scale"] == 0.5  # 96 px photos, 32 px needed
        assert small["ref"].size == (16, 16)
        fast = maker(raw)
        for k in ("face_box", "kps", "crop_box", "loc_map"):
            torch.testing.assert_close(fast[k], full[k], msg=k)
        assert fast["image"].dtype == torch.uint8 and fast["image"].shape == (32, 32, 3)  # collate converts per batch
        batch = collate([fast])
        assert batch["image"].shape == (1, 3, 32, 32) and batch["image"].dtype == torch.float32
        assert (batch["image"][0] - full["image"]).abs().mean() < 0.03  # DCT-scaled decode vs full decode + resize
        assert (batch["pe_map"][0] == full["pe_map"]).all()
    # a photo whose face is small needs more pixels for the identity crop when there is no reference photo
    meta = {"width": 96, "height": 96, "bbox": [10, 10, 20, 20]}
    assert maker.image_min_side(meta, True) == 32 and maker.image_min_side(meta, False) == 16 * 96 // 13 + 1


def test_corrupt_samples_skipped_and_counted(face_shards):
    import io
    import tarfile

    bad = face_shards / "train-000009.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in (("b1.jpg", b"\xff\xd8 broken jpeg"), ("b1.json", b"{}"), ("b2.json", b"{bad")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    maker = ExampleMaker(resolution=64, vae_scale_factor=2, local_latent_size=16, crop_expand=1.6, id_image_size=32)
    import webdataset as wds

    out = [maker(r) for r in wds.WebDataset(str(bad), shardshuffle=False)]
    assert out == [None, None]
    assert sum(maker.skipped.values()) == 2 and set(maker.skipped) <= {"malformed_json", "missing_image", "corrupt_image"}


def test_a_stream_of_only_unusable_samples_fails_instead_of_hanging(tmp_path, monkeypatch):
    from conftest import write_face_shards

    from realisid.data.stream import TrainStream

    write_face_shards(tmp_path, "train", n=6, with_embed=True)  # 8-value embeddings
    maker = ExampleMaker(embed_dim=16, resolution=64, vae_scale_factor=2, local_latent_size=16, crop_expand=1.6, id_image_size=32)
    monkeypatch.setattr(TrainStream, "MAX_FAILED_IN_A_ROW", 10)
    stream = TrainStream(sorted(str(p) for p in tmp_path.glob("train-*.tar")), maker, batch_size=2, shuffle_buffer=2, seed=0, rank=0,
                         world_size=1, num_workers=0, resampled=True)
    with pytest.raises(RuntimeError, match=r"last 10 samples of stream 0 were all unusable \({'bad_embedding': 10}\)"):
        next(iter(stream))


def test_too_few_shards_for_split_is_a_clear_error(tiny_cfg, face_shards):
    from realisid.data.stream import TrainStream

    maker = ExampleMaker(resolution=64, vae_scale_factor=2, local_latent_size=16, crop_expand=1.6, id_image_size=32)
    urls = sorted(str(p) for p in face_shards.glob("train-*.tar"))
    with pytest.raises(ValueError, match="DDP would hang"):
        TrainStream(urls, maker, batch_size=2, shuffle_buffer=2, seed=0, rank=0, world_size=4, num_workers=2, resampled=False)


def test_stream_is_deterministic_and_resumes_exactly(face_shards):
    import itertools

    from realisid.data.stream import TrainStream

    maker = ExampleMaker(resolution=64, vae_scale_factor=2, local_latent_size=16, crop_expand=1.6, id_image_size=32)
    urls = sorted(str(p) for p in face_shards.glob("train-*.tar"))
    for resampled in (True, False):
        kw = dict(batch_size=2, shuffle_buffer=5, seed=3, rank=0, world_size=1, num_workers=1, resampled=resampled)
        full = list(itertools.islice(iter(TrainStream(urls, maker, **kw)), 6))
        again = list(itertools.islice(iter(TrainStream(urls, maker, **kw)), 6))
        assert [b["key"] for b in full] == [b["key"] for b in again]
        resumed = list(itertools.islice(iter(TrainStream(urls, maker, consumed={0: full[2]["data_consumed"]}, **kw)), 3))
        assert [b["key"] for b in resumed] == [b["key"] for b in full[3:]]
        assert torch.equal(resumed[0]["packed"], full[3]["packed"])  # the same pixels and geometry, byte for byte
        other_rank = list(itertools.islice(iter(TrainStream(urls, maker, **{**kw, "rank": 1, "world_size": 2, "resampled": True})), 3))
        assert [b["key"] for b in other_rank] != [b["key"] for b in full[:3]]


def test_missing_shards_are_one_clear_error(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    cfg.data.train_shards = str(tmp_path / "nothing-*.tar")
    dm = _dm(cfg, tmp_path)
    dm.cfg.train_shards = str(tmp_path / "nothing-*.tar")
    with pytest.raises(FileNotFoundError, match=r"data.train_shards: the shard pattern matched no files"):
        dm.setup("fit")
    dm.cfg.train_shards = str(tmp_path / "gone-{000000..000001}.tar")
    with pytest.raises(FileNotFoundError, match=r"data.train_shards: 2 of 2 shards do not exist, first .*gone-000000.tar.*make shards"):
        dm.setup("fit")


def test_examples_carry_original_size_and_crop():
    """SDXL's time ids per sample: the photo's (height, width) and the training crop's (top, left) in the photo resized
    so its short side is the resolution, as diffusers' train_text_to_image_sdxl.py computes them (resize, then crop)."""
    import json

    from PIL import Image

    from realisid.data.batch import stream_collate
    from realisid.data.shards import encode_jpeg, face_meta

    rng = np.random.default_rng(0)
    W, H, R = 160, 96, 48
    photo = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).resize((W // 4, H // 4)).resize((W, H), Image.BICUBIC)
    raws = []
    for i, x0 in enumerate((100, 4, 50)):  # the face right, left, centre: the square view moves along the long side
        box = (x0, 30, x0 + 40, 70)
        meta = face_meta((W, H), box, np.full((5, 2), 50.0) + [x0, 0], det_score=1, identity=None, caption="x", source="t")
        raws.append({"__key__": f"k{i}", "jpg": encode_jpeg(photo, 98), "json": json.dumps(meta).encode()})
    maker = ExampleMaker(resolution=R, vae_scale_factor=2, local_latent_size=8, crop_expand=1.6, id_image_size=16)
    exs = [maker(r) for r in raws]
    s = R / H
    resized = np.asarray(photo.resize((round(W * s), R), Image.BICUBIC), np.float32)  # short side to the resolution
    want_left = {0: 64 * s, 1: 0.0, 2: 22 * s}  # the view (a 96 px square) starts at x = 64, 0 and 22
    for i, ex in enumerate(exs):
        assert ex["original_size"].dtype == torch.float32 and ex["original_size"].tolist() == [H, W]
        assert ex["crop_top_left"].dtype == torch.float32 and ex["crop_top_left"].tolist() == [0.0, want_left[i]]
        top, left = (int(v) for v in ex["crop_top_left"])
        crop = resized[top:top + R, left:left + R]  # what the example holds is that crop of the resized photo
        assert np.abs(crop - ex["image"].numpy().astype(np.float32)).mean() < 4, i
    batch = ready_batch(stream_collate(exs))  # packed for the transfer, unpacked on the device side
    assert batch["original_size"].shape == (3, 2) and batch["crop_top_left"].shape == (3, 2)
    torch.testing.assert_close(batch["crop_top_left"], torch.stack([e["crop_top_left"] for e in exs]), rtol=0, atol=0)
    assert collate(exs)["original_size"].tolist() == [[H, W]] * 3


def test_example_geometry_is_exact_on_a_non_square_box(tmp_path):
    """A 40 x 10 face box in a 96 px photo at resolution 96: the face box and key points are exactly the photo's (no
    scaling), the location map is exactly the square box of the long side around the box's centre (rows 5-44,
    columns 10-49), and the crop box holds the face on all four sides."""
    import webdataset as wds
    from PIL import Image

    from realisid.data.shards import face_meta
    from realisid.data.shard_writer import FaceShardWriter

    box = (10, 20, 50, 30)
    kps = np.array([[18, 23], [42, 23], [30, 25], [20, 28], [40, 28]], dtype=np.float32)
    with FaceShardWriter(str(tmp_path), "t", face_model="test", maxcount=5) as w:
        w.write("s0000", Image.new("RGB", (96, 96), (90, 120, 150)), face_meta((96, 96), box, kps, det_score=0.9, identity="a",
                                                                                caption="a photo of a person", source="test"))
    raw = next(iter(wds.WebDataset(str(tmp_path / "t-000000.tar"), shardshuffle=False)))
    ex = make_example(decode_sample(raw), resolution=96, vae_scale_factor=2, local_latent_size=8, crop_expand=1.6, id_image_size=32)
    assert ex["face_box"].tolist() == list(box) and ex["kps"].tolist() == kps.tolist()
    want = torch.zeros(1, 96, 96)
    want[:, 5:45, 10:50] = 1.0
    assert torch.equal(ex["loc_map"], want)
    x0, y0, x1, y1 = ex["crop_box"].tolist()
    assert x0 <= 10 and y0 <= 20 and x1 >= 50 and y1 >= 30 and x1 - x0 == y1 - y0 == 64  # square: 40 x 1.6, even
