"""benchmarks/throughput.py and benchmarks/gpu_bench.py end to end, shrunk to the random tiny models (no GPU)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import RANDOM_TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _data(face_shards):
    return [f"data.train_shards={face_shards}/train-*.tar", f"data.val_shards={face_shards}/val-*.tar", "data.batch_size=2",
            "data.val_samples=2"]


@pytest.mark.slow
def test_throughput_writes_every_section_with_the_machine(face_shards, tmp_path):
    out = tmp_path / "tp"
    r = _run("throughput.py", "joint", *RANDOM_TINY, *_data(face_shards), "--steps", "2", "--warmup", "2", "--rounds", "1",
             "--data-batches", "2", "--workers", "0", "--sample-steps", "2", "--out", str(out), "--precomputed-dir", str(tmp_path / "pre"))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["machine"]["cores"] >= 1 and res["machine"]["gpu"] == "none"
    d = res["data"][0]
    assert d["decode_only"] > 0 and d["ours"] > 0 and d["precomputed"] > 0
    assert res["train"]["lightning_s"] > 0 and res["train"]["bare_s"] > 0 and res["train"]["lightning_peak"] > 0
    assert res["precomputed"]["precomputed_s"] > 0 and res["precomputed"]["vae_encode_s"] > 0
    rows = res["sampling"]["rows"]
    assert [row["people"] for row in rows] == [1, 2, 3] and all(row["predicted_s"] > 0 for row in rows)
    assert rows[2]["predicted_s"] > rows[0]["predicted_s"]  # more people, more passes
    table = (out / "table.md").read_text()
    for heading in ("Data pipeline", "Training step", "Precomputed", "Sampling", "StableDiffusionControlNetPipeline"):
        assert heading in table


def test_gpu_bench_without_a_gpu_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the benchmark would run for real")
    r = _run("gpu_bench.py", "--out", str(tmp_path / "g"), timeout=120)
    assert r.returncode == 0 and "no GPU on this machine" in r.stdout and not (tmp_path / "g").exists()


@pytest.mark.slow
def test_gpu_bench_matrix_runs_on_cpu_when_allowed(face_shards, tmp_path):
    out = tmp_path / "g"
    r = _run("gpu_bench.py", "--exp", "joint", *RANDOM_TINY, "--allow-cpu", "--batch-sizes", "1,2",
             "--options", "fp32,bf16-mixed,bf16 + checkpointing (all),bf16 + precomputed latents,bf16 + accumulate 2",
             "--steps", "1", "--warmup", "2", "--sample-steps", "2", "--compare-batch", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["matrix"]) == {"fp32", "bf16-mixed", "bf16 + checkpointing (all)", "bf16 + precomputed latents", "bf16 + accumulate 2"}
    for row in res["matrix"].values():
        assert all(row[str(b)]["images_per_s"] > 0 for b in (1, 2))
    assert res["compare"]["lightning_s"] > 0 and res["compare"]["precomputed_s"] > 0
    assert len(res["sampling"]["rows"]) == 3
    assert "| bf16 + accumulate 2 |" in (out / "table.md").read_text()


def _load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_base_found_rate_interval_and_bad_base(tmp_path):
    mod = _load_script("base_found_rate")
    lo, hi = mod.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)  # the textbook Wilson interval
    assert mod.wilson(0, 10)[0] == 0.0 and mod.wilson(10, 10)[1] == 1.0
    lo, hi = mod.wilson(110, 120)
    assert lo < 110 / 120 < hi and hi - lo < 0.11
    with pytest.raises(SystemExit, match="not a diffusers folder"):
        mod.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="--analyzer .*not a synthetic face analyzer folder"):
        mod.main([mod.asset_path("tiny-sd"), "--analyzer", str(tmp_path)])
    with pytest.raises(SystemExit, match="--samplers 'ddpm,heun': unknown \\['heun'\\]"):
        mod.main([mod.asset_path("tiny-sd"), "--samplers", "ddpm,heun"])
    assert mod.parse_thresholds(None, 0.3) == [0.3] and mod.parse_thresholds("0.3,0.5", 0.3) == [0.3, 0.5]
    for bad in ("0,0.5", "half", ""):
        with pytest.raises(SystemExit, match="--thresholds"):
            mod.parse_thresholds(bad, 0.3)
    # results.json names the shipped base by its place in the repository, not this machine's checkout
    assert mod.shown_path(mod.asset_path("tiny-sd")) == os.path.join("realisid", "assets", "tiny-sd")
    assert mod.shown_path(str(tmp_path)) == str(tmp_path)


def test_base_found_rate_guidance_rows(tmp_path, monkeypatch):
    """--guidance: each scale is its own row, sampled at that scale, its grid named after it (the base check's
    DDIM at guidance 5 keeps <base>.png); scales below 1, nan and words are refused before any model loads."""
    import torch

    mod = _load_script("base_found_rate")
    assert mod.parse_guidances("5") == [5.0] and mod.parse_guidances("1, 3,7.5") == [1.0, 3.0, 7.5]
    for bad in ("0.5", "nan", "strong", "", "3,-1"):
        with pytest.raises(SystemExit, match="--guidance"):
            mod.parse_guidances(bad)
    with pytest.raises(SystemExit, match="--guidance '0'"):
        mod.main([mod.asset_path("tiny-sd"), "--guidance", "0"])
    assert mod.grid_name("tiny-sd", "ddim", 5.0) == "tiny-sd.png"
    assert mod.grid_name("tiny-sd", "ddpm", 5.0) == "tiny-sd-ddpm.png"
    assert mod.grid_name("tiny-sd", "ddim", 1.5) == "tiny-sd-g1.5.png"
    # bases that share a folder name each keep their own grid
    assert mod.grid_stems(["realisid/assets/tiny-sd", "w/tiny-sd-heads"]) == ["tiny-sd", "tiny-sd-heads"]
    assert mod.grid_stems(["realisid/assets/tiny-sd", "data/cache/assets-x/tiny-sd", "data/cache/assets-y/tiny-sd"]) == [
        "assets-tiny-sd", "assets-x-tiny-sd", "assets-y-tiny-sd"]
    assert mod.grid_stems(["a/x/tiny-sd", "b/x/tiny-sd"]) == ["a-x-tiny-sd", "b-x-tiny-sd"]
    assert mod.grid_stems(["m/tiny-sd", "m/tiny-sd", "m/tiny-sd"]) == ["tiny-sd", "tiny-sd-2", "tiny-sd-3"]
    seen = []

    def fake_sample(bb, prompts, *, steps, guidance, seed, scheduler):
        seen.append((guidance, seed, scheduler, steps))
        return torch.full((len(prompts), 3, 8, 8), (guidance - 4.0) / 10.0)  # in [-1, 1]: brighter at higher guidance

    monkeypatch.setattr(mod, "sample_base", fake_sample)
    monkeypatch.setattr(mod, "best_score", lambda analyzer, image: float(image.mean()) / 255.0)
    monkeypatch.setattr(mod, "save_framed_grid", lambda images, found, path: open(path, "w").close())
    rows = [mod.sample_row(None, "b", "b", "ddim", g, ["p1", "p2", "p3"], [1, 2], 4, None, [0.4], str(tmp_path)) for g in (1.0, 7.5)]
    assert seen == [(1.0, 1, "ddim", 4), (1.0, 2, "ddim", 4), (7.5, 1, "ddim", 4), (7.5, 2, "ddim", 4)]
    assert [r["guidance"] for r in rows] == [1.0, 7.5] and [r["samples"] for r in rows] == [6, 6]
    assert rows[0]["found"] == 0 and rows[1]["found"] == 6  # scores 0.35 and 0.675 (the pixel mean) against the threshold 0.4
    assert (tmp_path / "b-g1.png").exists() and (tmp_path / "b-g7.5.png").exists()
    table = mod.table_md({"date": "d", "machine": "m", "captions": 3, "seeds": [1, 2], "steps": 4, "analyzer_threshold": 0.3,
                          "analyzer": None, "command": "c", "thresholds": [0.4], "bases": rows, "real_recall": None})
    assert "| `b` | ddim | 1 | 0 / 6 = 0.00" in table and "| `b` | ddim | 7.5 | 6 / 6 = 1.00" in table
    # --grid: the first N samples of the first seed, and a size the samples cannot fill is refused before any model loads
    shown = []
    monkeypatch.setattr(mod, "save_framed_grid", lambda images, found, path: shown.append((len(images), list(found))))
    mod.sample_row(None, "b", "b", "ddim", 7.5, ["p1", "p2", "p3"], [1, 2], 4, None, [0.4], str(tmp_path), grid=2)
    assert shown == [(2, [True, True])]
    for bad in ("0", "61"):
        with pytest.raises(SystemExit, match=f"--grid {bad}: give 1 to --captions \\(60\\)"):
            mod.main([mod.asset_path("tiny-sd"), "--grid", bad])


def test_base_found_rate_recall_at_each_threshold_counts_only_detections_at_the_face():
    """The threshold calibration's real side: a photo counts as found at threshold t when a detection overlapping its
    face box (IoU >= 0.5) scores t or more; a confident detection elsewhere does not count."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    mod = _load_script("base_found_rate")
    boxes = torch.tensor([[10.0, 10.0, 20.0, 20.0], [40.0, 40.0, 100.0, 100.0], [40.0, 40.0, 100.0, 100.0]])
    scores = {0: [(boxes[0], 0.35)], 1: [(boxes[1], 0.8)], 2: [(torch.tensor([0.0, 0.0, 30.0, 30.0]), 0.9), (boxes[2] + 20, 0.7)]}
    calls = iter(range(3))

    class Fake:
        def detect(self, arr):
            return [SimpleNamespace(bbox=np.array(b.tolist()), det_score=s) for b, s in scores[next(calls)]]

    val = SimpleNamespace(images=torch.zeros(3, 3, 128, 128, dtype=torch.uint8), boxes=boxes)
    bins = {"tiny": (0.0, 0.1), "large": (0.1, float("inf"))}
    rec = mod.real_recall(Fake(), val, bins, [0.3, 0.5], count=3)
    assert rec["tiny"] == {"n": 1, "0.3": 1.0, "0.5": 0.0}
    assert rec["large"] == {"n": 2, "0.3": 0.5, "0.5": 0.5}  # the third photo's detections miss its face (IoU < 0.5)
    assert rec["all"]["n"] == 3 and rec["all"]["0.3"] == pytest.approx(2 / 3)
    record = {"thresholds": [0.3, 0.5], "date": "d", "machine": "m", "captions": 2, "seeds": [1], "analyzer_threshold": 0.3, "command": "c",
              "bases": [{"base": "b", "samples": 4, "seconds": 1.0, "by_threshold": {"0.3": {"found": 3, "found_rate": 0.75, "ci95": [0.3, 0.95]},
                                                                                    "0.5": {"found": 1, "found_rate": 0.25, "ci95": [0.05, 0.7]}}}],
              "real_recall": rec}
    table = mod.table_md(record)
    # records written before --samplers and --guidance: DDIM at guidance 5
    assert "| `b` | ddim | 5 | 3 / 4 = 0.75 [0.30, 0.95] | 1 / 4 = 0.25 [0.05, 0.70] | 1.0 |" in table
    record["bases"][0]["sampler"] = "ddpm"
    assert "| `b` | ddpm | 5 | 3 / 4" in mod.table_md(record)
    assert "| large | 2 | 0.500 | 0.500 |" in table


def test_base_found_rate_real_grid_shows_the_photos_of_the_sampled_captions_in_order(tmp_path, monkeypatch):
    """real.png: the held-out photos whose captions the grid samples, in the grid's order, with their face-size bins
    counted in the table (the by-eye judge of a base grid needs to know what the world draws for those captions)."""
    from types import SimpleNamespace

    import torch

    from realisid.embedded.check import held_out_captions, held_out_indices

    mod = _load_script("base_found_rate")
    captions = [f"c{i}" for i in range(20)]
    picked = held_out_indices(len(captions), 6, seed=5)
    assert [captions[i] for i in picked] == held_out_captions(captions, 6, seed=5)  # the prompts the bases sample
    assert len(set(picked)) == 6
    images = torch.stack([torch.full((3, 64, 64), i * 10, dtype=torch.uint8) for i in range(20)])  # photo i is grey level 10 i
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0] if i % 2 else [0.0, 0.0, 40.0, 40.0] for i in range(20)])
    saved = []
    monkeypatch.setattr(mod, "save_framed_grid", lambda ims, found, path: saved.append((ims.clone(), list(found), path)))
    rec = mod.save_real_grid(SimpleNamespace(images=images, boxes=boxes), picked[:3], str(tmp_path / "real.png"),
                             {"tiny": (0.0, 0.125), "large": (0.125, float("inf"))})
    ims, found, path = saved[0]
    assert found == [True] * 3 and path.endswith("real.png")
    assert [round(float((im[0, 0, 0] + 1) * 127.5)) for im in ims] == [10 * i for i in picked[:3]]  # in the grid's order
    assert rec["bins"] == ["tiny" if i % 2 else "large" for i in picked[:3]]
    assert sum(rec["bin_counts"].values()) == 3 and list(rec["bin_counts"]) == ["tiny", "large"]
    record = {"thresholds": [0.3], "date": "d", "machine": "m", "captions": 6, "seeds": [1], "analyzer_threshold": 0.3, "command": "c",
              "bases": [], "real_recall": None, "real_grid": rec}
    counts = f"tiny {rec['bin_counts']['tiny']}, large {rec['bin_counts']['large']}"
    assert "`real.png`: the held-out photos the grids' captions were written for" in mod.table_md(record)
    assert f"their faces by size bin: {counts}." in mod.table_md(record)


def test_base_from_noised_starts_where_the_strength_says_and_scores_only_the_face_box(tiny_cfg):
    """Strength s starts DDIM s of the way back (1: pure noise, as a sample; a small s still runs a step); the face
    error reads only the face box; a tiny random base returns images for every strength, and strength 1 ignores the
    photo (it starts from the noise alone) while a small strength depends on it."""
    import torch
    from omegaconf import OmegaConf

    from realisid.models.backbone import build_tiny_backbone

    mod = _load_script("base_from_noised")
    assert mod.parse_strengths("0.2, 1") == [0.2, 1.0]
    for bad in ("0", "1.5", "x", "", "nan"):
        with pytest.raises(SystemExit, match="--strengths"):
            mod.parse_strengths(bad)
    assert [mod.first_step(s, 30) for s in (1.0, 0.5, 0.2, 0.01)] == [0, 15, 24, 29]
    ref = torch.zeros(2, 3, 16, 16)
    img = ref.clone()
    img[:, :, :8, :8] = 1.0  # differs only outside the box below
    boxes = torch.tensor([[8.0, 8.0, 16.0, 16.0], [8.0, 8.0, 16.0, 16.0]])
    assert mod.face_error(img, ref, boxes) == 0.0
    img[0, :, 8:, 8:] = 1.0  # the whole box of the first image off by 1 (0.5 on the 0..1 scale)
    assert mod.face_error(img, ref, boxes) == pytest.approx(0.25)
    bb = build_tiny_backbone(OmegaConf.create(tiny_cfg("local_branch").model.tiny))
    z_a = torch.randn(2, bb.latent_channels, 32, 32, generator=torch.Generator().manual_seed(0))
    z_b = torch.randn(2, bb.latent_channels, 32, 32, generator=torch.Generator().manual_seed(1)) * 3
    out = {(s, k): mod.denoise_from(bb, z, ["a", "b"], s, steps=4, guidance=2.0, seed=0) for s in (0.25, 1.0) for k, z in (("a", z_a), ("b", z_b))}
    assert out[(1.0, "a")].shape == (2, 3, 64, 64) and torch.isfinite(out[(1.0, "a")]).all()
    assert torch.equal(out[(1.0, "a")], out[(1.0, "b")])  # from pure noise: the photo's latents play no part
    assert not torch.equal(out[(0.25, "a")], out[(0.25, "b")])  # one step from the photo: they do


def test_sampling_settings_parses_sets_and_refuses_the_benchmarks_own_identities(tmp_path):
    mod = _load_script("sampling_settings")
    s = mod.parse_setting("5,3,0.1")
    assert s == {"guidance_text": 5.0, "guidance_id": 3.0, "id_delay": 0.1, "guidance_rescale": 0.0, "id_guidance_until": 1.0}
    assert mod.setting_name(s) == "text5-id3-delay0.1"
    assert mod.setting_name(mod.parse_setting("7.5,5,0.1,0.7")) == "text7.5-id5-delay0.1-rescale0.7"
    until = mod.parse_setting("7.5,5,0.1,0,0.5")
    assert until["id_guidance_until"] == 0.5 and until["guidance_rescale"] == 0.0
    assert mod.setting_name(until) == "text7.5-id5-delay0.1-until0.5"
    by_bin = mod.parse_setting("7.5,5,0.1,tiny=6,large=3")
    assert by_bin["guidance_id_by_bin"] == {"tiny": 6.0, "large": 3.0} and by_bin["guidance_id"] == 5.0
    assert mod.setting_name(by_bin) == "text7.5-id5-delay0.1-tiny6-large3"
    for bad in ("5,3", "5,3,0.1,0.7,1,2", "a,b,c", "5,3,0.1,large=x", "large=3"):
        with pytest.raises(SystemExit, match="guidance_text,guidance_id,id_delay"):
            mod.parse_setting(bad)
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    with pytest.raises(SystemExit, match="overlaps the benchmark's 12 reference identities"):
        mod.main([str(run), "--set", "5,5,0.1", "--offset", "6"])
    with pytest.raises(SystemExit, match="has no export"):
        mod.main([str(tmp_path), "--set", "5,5,0.1"])
    with pytest.raises(SystemExit, match="--samplers 'ddim,heun': give some of ddim, dpm, euler, ddpm, euler_a, dpm_sde"):
        mod.main([str(run), "--set", "5,5,0.1", "--samplers", "ddim,heun"])
    with pytest.raises(SystemExit, match="--steps 0: give at least 1 sampling step"):
        mod.main([str(run), "--set", "5,5,0.1", "--steps", "0"])


def test_compare_benches_gives_the_sweeps_claims_and_needs_a_setting_when_a_folder_has_several(tmp_path):
    import csv
    import json
    import shutil

    mod = _load_script("compare_benches")
    sweep = os.path.join(ROOT, "benchmarks", "results", "sweep-branches")
    runs = {n: (os.path.join(sweep, n), None) for n in ("global_only", "joint", "local_only")}
    table, claims = mod.compare(runs, "global_only")
    want = json.load(open(os.path.join(sweep, "claims.json")))
    for label in ("joint - global_only", "local_only - global_only"):
        for b in ("tiny", "small", "medium", "large", "all"):
            assert claims[label][b] == pytest.approx(want[label][b], abs=1e-9), (label, b)
    from realisid.metrics.calibrated import fmt

    assert f"| joint - global_only | {fmt(tuple(want['joint - global_only']['tiny']))} |" in table  # the table shows claims.json's numbers
    # a folder with two settings: the copy's rows under another name, with the margins shifted
    two = tmp_path / "two"
    shutil.copytree(runs["joint"][0], two)
    for f in ("calibrated.csv", "bins.csv", "results.csv"):
        rows = list(csv.DictReader(open(two / f)))
        extra = [{**r, "setting": "other", **({"margin": str(float(r["margin"]) + 0.5)} if f == "results.csv" and r["margin"] else {})}
                 for r in rows]
        with open(two / f, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows + extra)
    with pytest.raises(SystemExit, match="holds the settings trained, other; pick one"):
        mod.compare({"joint": (str(two), None), "global_only": runs["global_only"]}, "global_only")
    _, same = mod.compare({"joint": (str(two), "trained"), "global_only": runs["global_only"]}, "global_only")
    assert same["joint - global_only"]["tiny"] == pytest.approx(want["joint - global_only"]["tiny"], abs=1e-9)
    with pytest.raises(SystemExit, match="no setting 'nope'"):
        mod.compare({"joint": (str(two), "nope"), "global_only": runs["global_only"]}, "global_only")
    with pytest.raises(SystemExit, match="has no calibrated.csv"):
        mod.parse_run(f"x={tmp_path}")


def test_compare_benches_warns_when_runs_were_trained_on_different_machines(tmp_path):
    import json
    import shutil

    mod = _load_script("compare_benches")
    sweep = os.path.join(ROOT, "benchmarks", "results", "sweep-branches")
    folders = {}
    for name in ("global_only", "joint"):
        folders[name] = tmp_path / name
        shutil.copytree(os.path.join(sweep, name), folders[name])

    def trained(**machines):
        for name, m in machines.items():
            header = json.load(open(folders[name] / "header.json"))
            header.pop("trained on", None)
            if m is not None:
                header["trained on"] = m
            json.dump(header, open(folders[name] / "header.json", "w"))
        return mod.compare({n: (str(f), None) for n, f in folders.items()}, "global_only")[0]

    avx2 = "x86_64 2 CPUs (AMD EPYC, AVX2 kernels), torch 2.14.1"
    assert "different or unrecorded machines" not in trained(global_only=avx2, joint=avx2)
    table = trained(global_only=avx2, joint=avx2.replace("AVX2", "AVX512"))
    assert table.startswith("**Trained on different or unrecorded machines.**")
    assert f"- global_only: {avx2}\n" in table and "- joint: x86_64 2 CPUs (AMD EPYC, AVX512 kernels)" in table
    assert "- joint: not recorded" in trained(global_only=avx2, joint=None)


def test_compare_benches_pools_training_seeds():
    """NAME=DIR+DIR2: two seeds of the long sweep. The pooled difference is the mean of the seeds' own differences
    (their sweeps' claims.json), and each seed's own difference is listed under it."""
    import json

    mod = _load_script("compare_benches")
    folders = [os.path.join(ROOT, "benchmarks", "results", s) for s in ("sweep-long", "sweep-long-seed1")]
    runs = dict(mod.parse_run(f"{n}=" + "+".join(os.path.join(f, n) for f in folders)) for n in ("global_only", "joint"))
    assert runs["joint"] == [(os.path.join(f, "joint"), None) for f in folders]
    table, claims = mod.compare(runs, "global_only")
    own = [json.load(open(os.path.join(f, "claims.json")))["joint - global_only"] for f in folders]
    for b in ("tiny", "small", "medium", "large", "all"):
        value, lo, hi = claims["joint - global_only"][b]
        assert value == pytest.approx((own[0][b][0] + own[1][b][0]) / 2, abs=1e-9), b
        assert lo <= value <= hi, b
    from realisid.metrics.calibrated import fmt

    assert f"| &nbsp; sweep-long-seed1 only | {fmt(tuple(own[1]['tiny']))} |" in table
    assert "| joint (sweep-long) |" in table and "replicates pooled" in table
    with pytest.raises(SystemExit, match="empty folder"):
        mod.parse_run(f"joint={folders[0]}/joint+")


def test_vae_decoder_training_leaves_the_encoder_and_so_every_latent_alone(tmp_path):
    """benchmarks/vae_probe.py's 'decoder' mode: train_vae(parts='decoder') moves the decoder only, so the latents a
    UNet learned from stay exactly as they were; the probe summary lists each probe with its command."""
    import torch

    from realisid.embedded.base import ImageSet, train_vae
    from realisid.models.backbone import build_tiny_backbone
    from realisid.config import load_config

    vae = build_tiny_backbone(load_config("base", RANDOM_TINY).model.tiny, seed=0).vae
    n = 4
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 255, (n, 3, 64, 64), dtype=torch.uint8, generator=g), [""] * n, [""] * n, list("abcd"),
                    torch.tensor([[20.0, 20.0, 40.0, 40.0]] * n), torch.zeros(n, 5, 2), list("abcd"))
    enc = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    dec = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    stats = train_vae(vae, data, steps=2, batch_size=2, lr=1e-2, crop=32, kl_weight=1e-6, generator=g, parts="decoder")
    assert stats["parts"] == "decoder"
    assert all(torch.equal(enc[k], v) for k, v in vae.encoder.state_dict().items())
    assert any(not torch.equal(dec[k], v) for k, v in vae.decoder.state_dict().items())
    train_vae(vae, data, steps=1, batch_size=2, lr=1e-2, crop=32, kl_weight=1e-6, generator=g)
    assert any(not torch.equal(enc[k], v) for k, v in vae.encoder.state_dict().items())
    with pytest.raises(ValueError, match="parts='encoder'"):
        train_vae(vae, data, steps=1, batch_size=2, lr=1e-2, crop=32, kl_weight=1e-6, generator=g, parts="encoder")

    mod = _load_script("vae_probe")
    for name, mode, after in (("shipped", "shipped", None), ("decoder", "decoder", 0.02)):
        (tmp_path / name).mkdir()
        rec = {"mode": mode, "vae_block_out_channels": [16, 32], "latent_channels": 16, "parameters": 970000, "held_out_photos": 256,
               "mse_before": {"image": 0.002, "face": 0.03}, "machine": "m", "date": "d", "command": f"python benchmarks/vae_probe.py {mode}"}
        if after:
            rec.update(vae_steps=10, seconds_per_step=0.2, mse_after={"image": 0.001, "face": after},
                       mse_float16_weights={"image": 0.001, "face": 0.0201})
        (tmp_path / name / "results.json").write_text(json.dumps(rec))
    table = open(mod.write_summary(str(tmp_path))).read()
    # a probe from before the float16 column was measured shows "-" there
    assert "| shipped | [16, 32] x 16 latent | 0.97 M (1.9) | 0 | - | 0.0300 -> 0.0300 | - | 0.00200 -> 0.00200 |" in table
    assert "| decoder | [16, 32] x 16 latent | 0.97 M (1.9) | 10 | 0.2 | 0.0300 -> 0.0200 | 0.0201 | 0.00200 -> 0.00100 |" in table
    with pytest.raises(SystemExit):
        mod.main([])  # neither a mode nor --summary


def test_unet_probe_scores_every_unet_on_the_same_problems_and_the_head_alone(tmp_path):
    """benchmarks/unet_probe.py: the held-out loss gives every UNet the same noisy latents and timesteps, and its head
    column counts the latent pixels the head covers and no others; the summary lists each probe with its command."""
    import torch

    from realisid.config import load_config
    from realisid.embedded.base import ImageSet
    from realisid.models.backbone import build_tiny_backbone

    mod = _load_script("unet_probe")
    bb = build_tiny_backbone(load_config("base", RANDOM_TINY).model.tiny, seed=0)
    n, R = 3, 64
    L = 8  # latents 8x smaller than the images, as the shipped base's (the probe reads both sizes from its inputs)
    # the head is the box scaled 1.6x; at 8 px per latent pixel the first one's corners cover 0.2 x 0.2 of one
    boxes = torch.tensor([[10.0, 10.0, 22.0, 22.0], [30.0, 20.0, 50.0, 44.0], [0.0, 40.0, 12.0, 60.0]])
    val = ImageSet(torch.zeros(n, 3, R, R, dtype=torch.uint8), ["a photo of a person"] * n, [""] * n, list("abc"), boxes,
                   torch.zeros(n, 5, 2), list("abc"))
    C = bb.latent_channels
    moments = torch.cat([torch.zeros(n, C, L, L), torch.randn(n, C, L, L)], dim=1)  # posterior means 0: x_t = sigma * noise
    acp = bb.noise_scheduler().alphas_cumprod
    c, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) * 0.8
    lo, hi = (c - half) / (R / L), (c + half) / (R / L)
    head = torch.zeros(n, 1, L, L)
    for k in range(n):  # every latent pixel the head touches, however little
        for y in range(L):
            for x in range(L):
                if min(hi[k, 0], x + 1) > max(lo[k, 0], x) and min(hi[k, 1], y + 1) > max(lo[k, 1], y):
                    head[k, 0, y, x] = 1.0
    assert head[0, 0, 0, 0] == 1.0 and head[0, 0, 4, 4] == 0.0  # the 0.2 x 0.2 corner counts
    assert torch.equal(mod.head_pixels(boxes, R, L), head)
    seen, at = [], [0]

    def exact(x, t, encoder_hidden_states=None, return_dict=False):  # v exactly outside the head, off by 1 inside
        seen.append((x.clone(), t.clone()))
        a = acp[t].float()[:, None, None, None]
        v = (a.sqrt() / (1 - a).sqrt()) * x  # z = 0: x_t = sqrt(1 - a) * noise, v = sqrt(a) * noise
        rows = head[at[0]: at[0] + len(x)]
        at[0] = (at[0] + len(x)) % n  # the probe walks the held-out latents in order, band after band
        return (v + rows,)

    bb.unet.forward = exact
    first = mod.held_out_loss(bb, moments, val, batch_size=2)
    again = mod.held_out_loss(bb, moments, val, batch_size=2)
    assert first == again and len(seen) == 2 * 2 * len(mod.BANDS)
    for (x1, t1), (x2, t2) in zip(seen[: len(seen) // 2], seen[len(seen) // 2:]):
        assert torch.equal(x1, x2) and torch.equal(t1, t2)  # the same problems for any UNet
    share = float(head.mean(dim=(1, 2, 3)).mean())  # per image: the head's share of the latent pixels
    for band in first.values():
        assert band["head"] == pytest.approx(1.0, abs=1e-4)
        assert band["whole"] == pytest.approx(share, abs=1e-4) and 0 < share < 0.5

    for name, mode in (("shipped", "shipped"), ("scratch-top2", "scratch")):
        (tmp_path / name).mkdir()
        rec = {"mode": mode, "unet_shape": "[64, 128, 160], layers 1", "parameters": 8490000, "megabytes_fp16": 16.2, "held_out_photos": 960,
               "held_out_loss": first, "found": {"found": 9, "samples": 10, "rate": 0.9, "ci95": [0.6, 0.98]}, "machine": "m", "date": "d",
               "command": f"python benchmarks/unet_probe.py {mode}"}
        rec.update({"steps_note": "17000 (shipped)"} if mode == "shipped" else {"unet_steps": 1500, "seconds_per_step": 0.45})
        (tmp_path / name / "results.json").write_text(json.dumps(rec))
    table = open(mod.write_summary(str(tmp_path))).read().splitlines()
    rows = [r for r in table if r.startswith("| shipped") or r.startswith("| scratch")]
    assert rows[0].startswith("| shipped | [64, 128, 160], layers 1 | 8.49 M | 16.2 | 17000 (shipped) | - | 1.0000 (")
    assert rows[1].startswith("| scratch-top2 |") and "| 1500 | 0.45 |" in rows[1] and "9 / 10 (0.90 [0.60, 0.98])" in rows[1]
    with pytest.raises(SystemExit):
        mod.main(["shipped", "--set", "model.tiny.unet.layers_per_block=2"])  # --set and --save are for scratch only


def test_background_leak_sees_a_copied_background_and_not_a_photo_of_its_own(tmp_path):
    """The check behind benchmarks/background_leak.py. With an encoder that sees only the background (the crop's
    corners), a "generated" face that is the reference photo itself (so it carries the reference's background) scores
    far higher against the reference than against the same reference drawn with other backgrounds, and other photos
    of the person (backgrounds of their own) do not: the swap changes the background and the scoring sees it. The
    shipped evaluation encoder barely moves when only the background changes, and shows no leak on real photos."""
    import numpy as np
    from realisid.config import load_config
    from realisid.embedded.synthetic.writer import rerender_with_background
    from realisid.evaluation import build_evaluator, to_uint8
    from realisid.images import identity_crop

    mod = _load_script("background_leak")
    manifest = {"seed": 0, "image_size": 128, "backgrounds": ["plain", "gradient"]}
    idents = [f"synth-{i:04d}" for i in range(320, 328)]
    key = {i: f"{i}-0000" for i in idents}
    copied_keys = [key[i] for i in idents]                                  # the reference photo itself
    own_keys = [f"{i}-{j:04d}" for i in idents for j in range(1, 6)]     # other photos of the person

    def corners(crop):  # a background-only "encoder": the colours of the crop's four corners
        a = np.asarray(crop, np.float64)
        v = np.concatenate([a[:4, :4].mean((0, 1)), a[:4, -4:].mean((0, 1)), a[-4:, :4].mean((0, 1)), a[-4:, -4:].mean((0, 1))]) - 128.0
        return v / (np.linalg.norm(v) + 1e-9)

    def leak(keys, embed, bank, banks):
        embs = [embed(k) for k in keys]
        names = [k.rsplit("-", 1)[0] for k in keys]
        orig = mod.score(embs, names, bank)
        swap = mod.mean_over_banks([mod.score(embs, names, b) for b in banks])
        assert all(o["found"] for o in orig)
        return np.array([o["sim_ref"] - w["sim_ref"] for o, w in zip(orig, swap)])

    def crop_of(k, swap=None):
        face = rerender_with_background(k, swap, **manifest)
        return identity_crop(face.image, list(face.bbox), 32)[0]

    bank = {i: corners(crop_of(key[i])) for i in idents}
    banks = [{i: corners(crop_of(key[i], s)) for i in idents} for s in range(3)]
    copied = leak(copied_keys, lambda k: corners(crop_of(k)), bank, banks)
    own = leak(own_keys, lambda k: corners(crop_of(k)), bank, banks)
    assert copied.mean() > 0.3 and (copied > 0).all(), copied
    assert abs(own.mean()) < copied.mean() / 5, (own.mean(), copied.mean())

    cfg = load_config("local_branch")
    ev = build_evaluator(cfg, "conditioning")
    size = int(cfg.model.id_encoder.image_size)
    bank = ev.reference_bank({i: mod.swapped_crop(key[i], None, manifest, size) for i in idents})
    banks = [ev.reference_bank({i: mod.swapped_crop(key[i], s, manifest, size) for i in idents}) for s in range(3)]
    assert np.mean([bank[i] @ b[i] for i in idents for b in banks]) > 0.8   # measured 0.95 on the benchmark's references

    def embed(k):
        face = rerender_with_background(k, None, **manifest)
        (_, emb), = ev.find_faces(np.array(face.image), [list(face.bbox)])
        return emb if emb is not None else ev.reference_embedding(to_uint8(mod.swapped_crop(k, None, manifest, size)))

    own = leak(own_keys, embed, bank, banks)
    m, lo, hi = mod.clustered_mean(list(own), [k.rsplit("-", 1)[0] for k in own_keys], n_boot=500)
    assert lo <= m <= hi and abs(m) < 0.05, (m, lo, hi)
    with pytest.raises(ValueError, match="synthetic set"):
        mod.synthetic_manifest([str(tmp_path / "val-000000.tar")])



def test_identity_by_noise_strengths_and_photos():
    mod = _load_script("identity_by_noise")
    assert mod.parse_strengths("0, 0.5,1") == [0.0, 0.5, 1.0]
    for bad in ("", "0.5,2", "half"):
        with pytest.raises(ValueError, match="comma-separated numbers in"):
            mod.parse_strengths(bad)
    examples = [{"identity": f"p{i}", "key": f"p{i}-{j:04d}"} for i in range(3) for j in (3, 0, 2, 1)]
    refs = [{"identity": "p0", "key": "p0-0000"}, {"identity": "p2", "key": "p2-0002"}]
    got = [ex["key"] for ex in mod.choose_photos(examples, refs, 2)]
    assert got == ["p0-0001", "p0-0002", "p2-0000", "p2-0001"]   # by key, the reference's own photo left out, only refs' people
