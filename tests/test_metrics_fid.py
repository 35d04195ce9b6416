"""realisid.metrics FID: the stand-in feature net, BinnedFID per bin (equal to torchmetrics' FID on each bin's
subset), local Inception weights that never download, and exactness under a 2-process DDP run."""
from __future__ import annotations

import time
from unittest import mock

import pytest
import torch

from realisid.embedded.fid_features import StandInFeatures
from realisid.geometry import DEFAULT_BINS
from realisid.metrics import (
    BinnedFID,
    IdentitySimilarity,
    LocationIoU,
)
from metric_values import NAN, is_nan, val



# ------------------------------------------------------------------------------------------- FID

def image_set(n, seed, size=32):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 120 + 40
    noise = torch.rand(n, 3, size, size, generator=g) * 60
    return (base + noise).clamp(0, 255).to(torch.uint8)


def shifted(images, offset):
    return (images.int() + offset).clamp(0, 255).to(torch.uint8)


def test_standin_features_fixed_and_named():
    a, b = StandInFeatures(), StandInFeatures()
    x = image_set(4, 0)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)  # seeded: identical everywhere
    assert a(x).shape == (4, 64) and a.num_features == 64
    assert a.name.startswith("standin-random-convnet-64") and "not Inception" in a.name
    assert not list(a.parameters()) and not a.state_dict()  # nothing trainable, nothing in checkpoints
    a.train()
    assert not a.training


def test_binned_fid_self_is_zero_and_shift_grows():
    real = image_set(48, 1)
    sizes = torch.tensor([0.3] * 24 + [0.1] * 23 + [0.2])  # medium has a single image: NaN
    m = BinnedFID(DEFAULT_BINS, feature=StandInFeatures())
    assert m.feature_name.startswith("standin-random-convnet-64") and m.feature_name in m.describe()
    m.update(real, True, sizes)
    m.update(real, False, sizes)
    same = m.compute()
    m.reset()
    m.update(real, True, sizes)
    m.update(shifted(real, 40), False, sizes)
    moved = m.compute()
    m.reset()
    m.update(real, True, sizes)
    m.update(shifted(real, 80), False, sizes)
    further = m.compute()
    for b in ("large", "tiny", "all"):
        assert val(moved, f"fid/{b}") > 0
        assert abs(val(same, f"fid/{b}")) < 1e-3 * val(moved, f"fid/{b}"), (b, same, moved)
        assert val(further, f"fid/{b}") > val(moved, f"fid/{b}")
    for out in (same, moved):
        assert is_nan(out["fid/medium"]) and is_nan(out["fid/small"])
    assert val(moved, "fid_n_real/large") == 24 and val(moved, "fid_n_fake/all") == 48 and val(moved, "fid_n_real/medium") == 1


def test_binned_fid_float_input_and_errors(tmp_path):
    real = image_set(6, 2)
    sizes = torch.full((6,), 0.3)
    a, b = BinnedFID(None, feature=StandInFeatures()), BinnedFID(None, feature=StandInFeatures())
    a.update(real, True, sizes)
    a.update(shifted(real, 30), False, sizes)
    b.update(real.float() / 255, True, sizes)
    b.update(shifted(real, 30).float() / 255, False, sizes)
    assert val(a.compute(), "fid/large") == pytest.approx(val(b.compute(), "fid/large"), rel=1e-3)
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\]"):
        a.update(real.float(), True, sizes)
    with pytest.raises(ValueError, match="exactly one of feature"):
        BinnedFID(None)
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError) as err:
        BinnedFID(None, feature_extractor_weights_path=missing)
    assert missing in str(err.value) and "feature_extractor_weights_path" in str(err.value)
    assert "StandInFeatures" in str(err.value)


def test_binned_fid_local_inception_weights_never_download(tmp_path):
    """The real Inception path: a local weights file (random weights here), antialias off, no download."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    from torchmetrics.image.fid import NoTrainInceptionV3

    def no_download(*args, **kwargs):
        raise AssertionError("download attempted")

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = str(tmp_path / "weights-inception-random.pth")
    torch.save(net.state_dict(), path)
    del net
    with mock.patch.object(fe, "load_state_dict_from_url", no_download), \
            mock.patch("torch.hub.load_state_dict_from_url", no_download):
        m = BinnedFID(DEFAULT_BINS, feature_extractor_weights_path=path)
    assert isinstance(m.feature_net, NoTrainInceptionV3) and m.feature_net.use_antialias is False
    assert m.num_features == 2048 and "inception-v3" in m.feature_name
    # a pickle that is not a plain state dict is refused before torch-fidelity unpickles it
    bad = str(tmp_path / "bad.pth")
    torch.save({"obj": mock.sentinel.__class__}, bad)
    with pytest.raises(ValueError, match="not a plain tensor state dict"):
        BinnedFID(DEFAULT_BINS, feature_extractor_weights_path=bad)


# ------------------------------------------------------------------------------------------- DDP

def _ddp_data():
    """Per-rank batches: rank 0 gets the first half, rank 1 the second. 'small' faces exist only on rank 0;
    'medium' has one real and one generated image per rank (FID defined only after syncing)."""
    g = torch.Generator().manual_seed(7)
    n = 16
    sim = torch.rand(n, generator=g) * 2 - 1
    found = torch.rand(n, generator=g) > 0.3
    sim[~found] = NAN
    sizes = torch.tensor([0.3, 0.1, 0.15, 0.2, 0.3, 0.1, 0.15, 0.3, 0.3, 0.1, 0.2, 0.3, 0.1, 0.3, 0.1, 0.3])
    tgt = torch.rand(n, 2, generator=g) * 50
    tgt = torch.cat([tgt, tgt + 20], 1)
    det = tgt + torch.rand(n, 4, generator=g) * 8
    det[~found] = NAN
    real, fake = image_set(n, 11), shifted(image_set(n, 12), 25)
    return {"sim": sim, "found": found, "sizes": sizes, "tgt": tgt, "det": det, "real": real, "fake": fake}


def _ddp_feed(metrics, data, lo, hi):
    for a, b in ((lo, (lo + hi) // 2), ((lo + hi) // 2, hi)):  # two updates per process
        s = data["sizes"][a:b]
        metrics["id"].update(data["sim"][a:b], data["found"][a:b], s)
        metrics["loc"].update(data["det"][a:b], data["tgt"][a:b], s)
        metrics["fid"].update(data["real"][a:b], True, s)
        metrics["fid"].update(data["fake"][a:b], False, s)


def _ddp_metrics():
    return {"id": IdentitySimilarity(DEFAULT_BINS, "enc"), "loc": LocationIoU(DEFAULT_BINS),
            "fid": BinnedFID(DEFAULT_BINS, feature=StandInFeatures())}


def _ddp_worker(rank, world, init_file, out_path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = _ddp_data()
        metrics = _ddp_metrics()
        n = data["sizes"].shape[0]
        _ddp_feed(metrics, data, rank * n // world, (rank + 1) * n // world)
        results = {name: m.compute() for name, m in metrics.items()}
        # local states are restored after compute (accumulation continues per rank)
        results["local_n"] = metrics["id"].n.clone()
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    out_path = str(tmp_path / "ddp.pt")
    ctx = mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), out_path), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 180
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("DDP workers did not finish in 180 s (deadlock in a collective?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    ddp = torch.load(out_path, weights_only=False)

    data = _ddp_data()
    single = _ddp_metrics()
    _ddp_feed(single, data, 0, data["sizes"].shape[0] // 2)
    _ddp_feed(single, data, data["sizes"].shape[0] // 2, data["sizes"].shape[0])
    for name, m in single.items():
        ref = m.compute()
        assert set(ref) == set(ddp[name])
        for key, value in ref.items():
            torch.testing.assert_close(ddp[name][key], value, rtol=1e-5, atol=1e-6, equal_nan=True, msg=key)
    assert not is_nan(ddp["fid"]["fid/medium"])  # 1 + 1 images per rank: defined only after syncing
    assert not is_nan(ddp["fid"]["fid/small"]) and val(ddp["fid"], "fid_n_real/small") == 2  # rank 1 had none
    assert float(ddp["local_n"].sum()) == 8  # rank 0's own state after compute




def test_binned_fid_per_bin_equals_torchmetrics_fid_on_that_subset():
    """Each bin's FID is exactly torchmetrics' FrechetInceptionDistance (same features) on that bin's images only."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = image_set(40, 1), shifted(image_set(40, 2), 30)
    sizes = torch.tensor([0.3, 0.1] * 20)  # large and tiny alternate
    m = BinnedFID(DEFAULT_BINS, feature=StandInFeatures())
    m.update(real, True, sizes)
    m.update(fake, False, sizes)
    out = m.compute()
    for name, keep in (("large", sizes >= 0.25), ("tiny", sizes < 0.125), ("all", torch.ones(40, dtype=torch.bool))):
        ref = FrechetInceptionDistance(feature=StandInFeatures(), normalize=False, antialias=False)
        ref.update(m._as_uint8(real[keep]), real=True)
        ref.update(m._as_uint8(fake[keep]), real=False)
        assert val(out, f"fid/{name}") == pytest.approx(float(ref.compute()), rel=1e-4, abs=1e-4), name
