"""The shipped stand-ins, measured on held-out identities rendered afresh: the synthetic face analyzer's
accuracy, the calibrated metric on real photos, and the base drawing people from noise.

These load the models that ship in realisid/assets/ (written by `make pretrain`); they are real checks of
those models, so a broken or untrained model fails them.
"""
import numpy as np
import pytest
import torch

from realisid.embedded.assets import asset_path

HELD_OUT = range(320, 360)  # the embedded default's validation identities: never seen by any shipped model
FACELESS_FLOOR = 0.1  # measured 0.031 on the held-out photos when the analyzer shipped (make check-embedded)


@pytest.fixture(scope="module")
def held_out():
    """Fresh renders (new poses, sizes, backgrounds) of held-out identities at 128 px, with exact boxes and key points,
    drawn as the embedded default draws its shards (its background kinds, JPEG-compressed)."""
    import io

    from PIL import Image

    from realisid.config import load_config
    from realisid.embedded.synthetic import make_identity, render_face

    kinds = tuple(load_config("base").prepare.synthetic.backgrounds)
    rng = np.random.default_rng(12345)
    out = {"images": [], "boxes": [], "kps": [], "identity": []}
    for k in range(160):
        i = HELD_OUT[k % len(HELD_OUT)]
        f = render_face(make_identity(i, 0), rng, 128, backgrounds=kinds)
        buf = io.BytesIO()
        Image.fromarray(np.asarray(f.image)).save(buf, format="JPEG", quality=95)
        f.image = Image.open(buf).convert("RGB")
        out["images"].append(torch.from_numpy(np.asarray(f.image)).permute(2, 0, 1))
        out["boxes"].append(torch.tensor(f.bbox, dtype=torch.float32))
        out["kps"].append(torch.from_numpy(f.kps))
        out["identity"].append(f"synth-{i:04d}")
    return {k: torch.stack(v) if k != "identity" else v for k, v in out.items()}


@pytest.fixture(scope="module")
def analyzer():
    from realisid.embedded.analyzer import load_synthetic_analyzer

    return load_synthetic_analyzer(asset_path("synthetic-face-analyzer"), asset_path("standin-arcface-eval"))


def test_analyzer_finds_held_out_faces(held_out, analyzer):
    from realisid.embedded.analyzer import detector_accuracy
    from realisid.geometry import DEFAULT_BINS

    acc = detector_accuracy(analyzer, held_out["images"], held_out["boxes"], held_out["kps"], DEFAULT_BINS)
    assert acc["all"]["recall"] >= 0.95, acc
    assert acc["all"]["box_iou"] >= 0.75, acc
    assert acc["all"]["landmark_nme"] <= 0.25, acc
    assert acc["all"]["false_per_image"] <= 0.1, acc
    for b in ("small", "medium", "large"):
        assert acc[b]["recall"] >= 0.9, (b, acc[b])
    assert acc["tiny"]["recall"] >= 0.8, acc["tiny"]


def test_analyzer_finds_no_face_where_there_is_none(held_out, analyzer):
    """Blurred-away faces and noise are not faces: otherwise a found-rate on generated images counts blobs."""
    from realisid.embedded.analyzer import negative_accuracy

    neg = negative_accuracy(analyzer, held_out["images"], held_out["boxes"], noise_images=100, seed=3)
    assert neg["faceless_photos"] >= 50, neg
    assert neg["found_on_faceless"] <= FACELESS_FLOOR, neg
    assert neg["found_on_noise"] <= 0.05, neg


def test_analyzer_finds_each_face_of_a_mosaic(held_out, analyzer):
    """Several people in one image (as the multi-person benchmark makes): each face is found near its box."""
    import torch.nn.functional as F

    from realisid.geometry import box_iou

    hits = total = 0
    for start in range(0, 32, 4):
        tiles = F.interpolate(held_out["images"][start:start + 4].float(), size=(64, 64), mode="bilinear", antialias=True)
        canvas = torch.zeros(3, 128, 128)
        boxes = []
        for q in range(4):
            oy, ox = (q // 2) * 64, (q % 2) * 64
            canvas[:, oy:oy + 64, ox:ox + 64] = tiles[q]
            boxes.append((held_out["boxes"][start + q] * 0.5 + torch.tensor([ox, oy, ox, oy])).tolist())
        faces = analyzer.detect(canvas.round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
        for b in boxes:
            total += 1
            hits += any(box_iou(f.bbox.tolist(), b) >= 0.5 for f in faces)
    assert hits / total >= 0.85, (hits, total)


def test_calibrated_margin_equals_the_ceiling_for_real_photos_and_is_zero_for_random_references(held_out, analyzer):
    from realisid.evaluation import Evaluator
    from realisid.metrics.calibrated import calibrated_identity

    ev = Evaluator(analyzer, None, None, "-", "-")
    examples = [{"key": f"{ident}-{k:04d}", "identity": ident, "image": img.float() / 127.5 - 1, "face_box": box}
                for k, (ident, img, box) in enumerate(zip(held_out["identity"], held_out["images"], held_out["boxes"]))]
    # each identity's reference: its largest face among the renders (left out of the scored photos)
    best = {}
    for ex in examples:
        ident = ex["identity"]
        side = float(ex["face_box"][2] - ex["face_box"][0])
        if ident not in best or side > best[ident][0]:
            best[ident] = (side, ex)
    from PIL import Image

    from realisid.images import identity_crop, to_tensor
    from realisid.evaluation import to_uint8

    refs = {k: to_tensor(identity_crop(Image.fromarray(to_uint8(e["image"])), e["face_box"].tolist(), 32)[0]) for k, (_, e) in best.items()}
    bank = ev.reference_bank(refs)
    excluded = {e["key"] for _, e in best.values()}
    real = ev.real_rows(examples, bank, exclude=excluded)
    bins = list(ev.bins)
    as_generated = calibrated_identity(real, real, bins, n_boot=300)
    assert as_generated["all"]["margin"][0] == pytest.approx(as_generated["all"]["ceiling"][0])
    assert as_generated["all"]["retention"][0] == pytest.approx(1.0)
    assert as_generated["all"]["ceiling"][1] > 0.1  # the encoder does tell held-out identities apart
    # the same photos scored against a random other identity's reference: no identity signal left
    rng = np.random.default_rng(0)
    names = sorted(bank)
    shuffled = [{**ex, "identity": names[int(rng.integers(len(names)))]} for ex in examples if ex["key"] not in excluded]
    random_ref = ev.real_rows(shuffled, bank)
    out = calibrated_identity(random_ref, real, bins, n_boot=500)
    m, lo, hi = out["all"]["margin"]
    assert abs(m) < 0.1 and lo < 0.05, out["all"]
    assert out["all"]["retention"][0] < 0.25


@pytest.mark.slow
def test_base_draws_faces_the_analyzer_finds_and_an_untrained_base_does_not(analyzer):
    from realisid.config import load_config
    from realisid.embedded.synthetic import make_identity, render_face
    from realisid.embedded.check import base_check
    from realisid.models.backbone import build_tiny_backbone, load_backbone

    cfg = load_config("local_branch")
    rng = np.random.default_rng(7)
    prompts = [render_face(make_identity(i, 0), rng, 32).caption for i in HELD_OUT[:10]]
    trained = load_backbone(cfg.model)
    _, found = base_check(trained, analyzer, prompts, steps=30, guidance=5.0, seed=0)
    # 7 of 10 when the base shipped (make check-embedded). The floor is what the shipped base does, not the goal
    # (a recognisable person in 9 of 10, not reached yet: see the README's status)
    assert sum(found) >= 5, found
    untrained = build_tiny_backbone(cfg.model.tiny, seed=0)
    _, found_untrained = base_check(untrained, analyzer, prompts, steps=30, guidance=5.0, seed=0)
    assert sum(found_untrained) <= 2, found_untrained


def test_ceiling_through_the_vae_splits_the_autoencoders_share_from_the_generations(held_out, analyzer):
    """check-embedded's second ceiling: the held-out photos scored after the base VAE's round trip, against the same
    real references. Scoring the photos themselves gives the real ceiling exactly; the shipped VAE keeps most of a
    large face's margin; an untrained VAE keeps none; a wrong count of images is refused."""
    from realisid.config import load_config
    from realisid.embedded.base import ImageSet, vae_round_trip
    from realisid.embedded.check import _ceiling
    from realisid.geometry import bins_from_config
    from realisid.models.backbone import build_tiny_backbone, load_backbone

    cfg = load_config("base", ["bench.bootstrap=200"])
    bins = bins_from_config(cfg.bins)
    n = len(held_out["identity"])
    val = ImageSet(held_out["images"], [""] * n, [""] * n, [f"k{i:04d}" for i in range(n)], held_out["boxes"], held_out["kps"],
                   list(held_out["identity"]))
    real = _ceiling(cfg, analyzer, val, bins)
    same = _ceiling(cfg, analyzer, val, bins, images=val.images)
    assert same["all"]["margin"] == real["all"]["margin"]
    shipped = _ceiling(cfg, analyzer, val, bins, images=vae_round_trip(load_backbone(cfg.model).vae, val.images))
    # measured 0.87 of 0.89 on the 960 held-out shard photos for large faces (make check-embedded)
    assert shipped["large"]["margin"][0] > 0.6 * real["large"]["margin"][0], (shipped["large"], real["large"])
    assert shipped["all"]["margin"][0] < real["all"]["margin"][0]
    untrained = _ceiling(cfg, analyzer, val, bins, images=vae_round_trip(build_tiny_backbone(cfg.model.tiny, seed=0).vae, val.images))
    assert untrained["all"]["found_rate"][0] < 0.2 and untrained["all"]["margin"][0] < 0.1, untrained["all"]
    with pytest.raises(ValueError, match="3 images to score for 160 held-out photos"):
        _ceiling(cfg, analyzer, val, bins, images=val.images[:3])


def test_round_trip_picture_shows_photos_per_bin_largest_first(tmp_path):
    """check-embedded's VAE round-trip picture: the first photos of each face-size bin, large to tiny, photos above
    and their round trip below."""
    from PIL import Image

    from realisid.embedded.base import ImageSet
    from realisid.embedded.check import photos_per_bin, save_round_trip
    from realisid.geometry import DEFAULT_BINS

    sides = [10, 40, 10, 18, 70, 25, 10, 45]  # at 128 px: tiny < 16, small < 21.3, medium < 32, large
    boxes = torch.tensor([[0.0, 0.0, float(s), float(s)] for s in sides])
    n = len(sides)
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 128, 128).clone()
    val = ImageSet(images, [""] * n, [""] * n, [str(i) for i in range(n)], boxes, torch.zeros(n, 5, 2), ["a"] * n)
    assert photos_per_bin(val, DEFAULT_BINS, per_bin=2) == [1, 4, 5, 3, 0, 2]
    path = save_round_trip(images[:3], 255 - images[:3], str(tmp_path / "rt.png"))
    im = Image.open(path)
    assert im.size == (3 * 130 + 2, 2 * 130 + 2)
    assert im.getpixel((2 + 130 + 5, 2 + 5))[0] == 1 and im.getpixel((2 + 130 + 5, 2 + 130 + 5))[0] == 254
