"""The metric callback, the scale benchmark and the sweep, end to end on tiny random models."""
import csv
import os

import pytest

from conftest import RANDOM_TINY


def _common(face_shards, eval_standin, tmp_path):
    return RANDOM_TINY + [f"data.train_shards={face_shards}/train-*.tar", f"data.val_shards={face_shards}/val-*.tar", "data.batch_size=2",
                          "data.num_workers=0", "data.shuffle_buffer=4", "data.val_samples=4", "trainer.enable_progress_bar=false",
                          "validation.num_images=0", f"evaluation.standin_path={eval_standin}", f"experiment.runs_dir={tmp_path}/runs"]


@pytest.mark.slow
def test_metric_callback_logs_per_bin(face_shards, eval_standin, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from realisid.config import load_config
    from realisid.train import train

    cfg = load_config("joint", _common(face_shards, eval_standin, tmp_path) + [
        "trainer.max_steps=2", "trainer.val_check_interval=2", "evaluation.every_n_validations=1", "evaluation.per_bin=1", "evaluation.steps=2"])
    res = train(cfg)
    acc = EventAccumulator(res["tensorboard"])
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    bins = [b for b in cfg.bins if not b.startswith("_")]

    def value(tag):
        values = [e.value for e in acc.Scalars(tag)]
        assert len(values) == 1, (tag, values)  # one validation
        return values[0]

    n = {b: value(f"val_metrics/n/{b}") for b in bins + ["all"]}  # every bin reports its count, empty or not
    assert sum(n[b] for b in bins) == n["all"] > 0 and sum(n[b] > 0 for b in bins) >= 2, n
    for b in bins + ["all"]:  # a cosine similarity exactly for the bins that had cases
        tag = f"val_metrics/id_sim/{b}"
        assert (tag in tags) == (n[b] > 0), (tag, n)
        if n[b] > 0:
            assert -1.0 <= value(tag) <= 1.0
    fid = [t for t in tags if t.startswith("val_metrics/face_fid/") or t.startswith("val_metrics/image_fid/")]
    assert fid and all(e.value >= 0 for t in fid for e in acc.Scalars(t)), fid
    assert {t.split("/")[0] for t in acc.Tags()["images"]} >= {"val_bins"}


@pytest.mark.slow
def test_scale_bench_writes_tables_and_plots(face_shards, eval_standin, tmp_path):
    from realisid.bench import run_bench
    from realisid.config import load_config
    from realisid.modules import build_module

    cfg = load_config("joint", _common(face_shards, eval_standin, tmp_path) + [
        "bench.sizes_px=[64,192]", "bench.people=[1,3]", "bench.references=2", "bench.steps=2", "bench.prompts=[a photo]"])
    module = build_module(cfg)
    run = tmp_path / "run"
    module.export(str(run / "export"))
    res = run_bench(cfg, str(run), str(tmp_path / "bench"), progress=False)
    out = tmp_path / "bench"
    for f in ("results.csv", "real.csv", "summary.csv", "bins.csv", "calibrated.csv", "table.md", "header.json", "similarity_vs_size.png",
              "margin_by_bin.png", "retention_by_bin.png", "grid.png", "grid/reference.png", "grid/joint-64.png"):
        assert (out / f).exists(), f
    cal = list(csv.DictReader(open(out / "calibrated.csv")))
    assert {(r["setting"], r["bin"]) for r in cal} >= {("joint", "all"), ("local_only", "all"), ("global_only", "all")}
    for r in cal:
        assert float(r["margin_lo"]) <= float(r["margin"]) <= float(r["margin_hi"])
        assert abs(float(r["margin"]) - (float(r["sim_ref"]) - float(r["sim_other"]))) < 2e-4
    real = list(csv.DictReader(open(out / "real.csv")))
    refs = {r["identity"] for r in csv.DictReader(open(out / "results.csv"))}
    assert real and {r["identity"] for r in real} <= refs  # the ceiling uses photos of the reference identities only
    rows = list(csv.DictReader(open(out / "results.csv")))
    # 3 settings x (size 64: 1 and 3 people; size 192 at 64 px: 1 person, 3 do not fit) x 2 references
    assert len(rows) == 3 * 2 * (1 + 3 + 1)
    assert {r["setting"] for r in rows} == {"joint", "local_only", "global_only"}
    table = (out / "table.md").read_text()
    assert "evaluation face analyzer" in table and "standin" in table and "do not fit" in table
    assert "n/a" in table  # found-rate is not measured by the stand-in analyzer, and the table says so
    assert res["header"]["conditioning identity encoder"] != res["header"]["evaluation face analyzer"]
    assert "face detection threshold" not in res["header"]  # the stand-in takes faces at their boxes: nothing is detected
    assert res["header"]["data.val_shards"].startswith(f"{face_shards}/val-*.tar")  # where references and ceiling came from


def test_the_bench_header_names_the_detection_threshold_that_decides_found():
    from types import SimpleNamespace

    from realisid.evaluation import Evaluator

    def header(**analyzer):
        return Evaluator(SimpleNamespace(name="a", **analyzer), None, None, "f", "c").describe()

    assert header(threshold=0.5)["face detection threshold"] == "0.5"  # the synthetic analyzer (faces.det_thresh=0.5)
    assert header(det_thresh=0.6, threshold=None)["face detection threshold"] == "0.6"  # insightface, dlib, yunet
    assert "face detection threshold" not in header()


def test_the_bench_samples_with_the_runs_sampler():
    from realisid.bench import bench_sampling
    from realisid.config import load_config

    assert bench_sampling(load_config("joint", []))["scheduler"] == "ddim"
    kw = bench_sampling(load_config("joint", ["sampling.scheduler=ddpm", "bench.steps=7"]))
    assert kw["scheduler"] == "ddpm" and kw["num_inference_steps"] == 7


@pytest.mark.slow
def test_sweep_skips_finished_runs(face_shards, eval_standin, tmp_path, monkeypatch):
    import realisid.sweep
    from realisid.sweep import run_sweep

    sweep = tmp_path / "mini.yaml"
    common = " ".join(f'"{o}"' for o in _common(face_shards, eval_standin, tmp_path))
    sweep.write_text(f"""name: mini
out_dir: {tmp_path}/sweep
train: [{common.replace('" "', '", "')}, trainer.max_steps=2, trainer.val_check_interval=2, trainer.checkpoint_every_n_steps=2]
bench: ["bench.sizes_px=[64]", "bench.people=[1]", bench.references=2, bench.steps=2, "bench.prompts=[a photo]", bench.bootstrap=50]
runs:
  local_only: {{exp: local_branch}}
  no_upsample: {{exp: local_branch, overrides: [model.local.upsample=false]}}
""")
    res = run_sweep(str(sweep))
    assert os.path.exists(res["table"]) and res["plots"]
    table = open(res["table"]).read()  # each run's training: steps, held-out loss, identity use
    assert "| local_only | 2 | " in table and "| no_upsample | 2 | " in table
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "summary.csv")))
    assert {r["run"] for r in rows} == {"local_only", "no_upsample"}
    # another sweep trains mini's finished local_only run on from its step 2 to step 4
    from realisid.config import ConfigError
    from realisid.train import run_result

    def more(name, runs, steps=4):
        path = tmp_path / f"{name}.yaml"
        path.write_text(sweep.read_text().replace("name: mini", f"name: {name}").replace("/sweep\n", f"/{name}\n")
                        .replace("trainer.max_steps=2,", f"trainer.max_steps={steps},").split("runs:")[0] + "runs:\n" + runs)
        return str(path)

    res = run_sweep(more("more", "  local_only: {exp: local_branch, continue: mini/local_only}\n"))
    continued = tmp_path / "runs" / "sweeps" / "more" / "local_only"
    assert run_result(str(continued))["global_step"] == 4 and (continued / "DONE").exists()
    assert "| local_only | 4 | " in open(res["table"]).read()
    # the same continuation with an EMA switched on: allowed, the live weights take the same steps (the average is a
    # shadow that never feeds back), and the checkpoint carries an average that started at the continued step
    import torch

    run_sweep(more("ema", "  local_only: {exp: local_branch, continue: mini/local_only, overrides: [efficiency.ema.enabled=true]}\n"))
    plain, ema = (torch.load(tmp_path / "runs" / "sweeps" / s / "local_only" / "checkpoints" / "last.ckpt", map_location="cpu",
                             weights_only=False) for s in ("more", "ema"))
    assert "realisid_ema" not in plain and ema["realisid_ema"]["updates"] == 2
    assert plain["state_dict"].keys() == ema["state_dict"].keys()
    for k, v in plain["state_dict"].items():
        torch.testing.assert_close(ema["state_dict"][k], v, rtol=0, atol=0, msg=k)
    assert any(not torch.equal(ema["realisid_ema"]["shadow"][k], v) for k, v in ema["state_dict"].items()
               if k in ema["realisid_ema"]["shadow"])
    with pytest.raises(ConfigError, match=r"model\.local\.upsample: True -> False"):  # not the same model: refused, nothing written
        run_sweep(more("changed", "  x: {exp: local_branch, overrides: [model.local.upsample=false], continue: mini/local_only}\n"))
    assert not (tmp_path / "runs" / "sweeps" / "changed" / "x" / "checkpoints").exists()
    # a key added after the source was trained is no difference at its default, and is one at another value
    from realisid.sweep import continuation_differences

    defaults = {"pretrain.extend": False, "model.lr": 1.0}
    old = {"model.lr": 1.0}
    assert continuation_differences(old, {"model.lr": 1.0, "pretrain.extend": False}, defaults) == []
    assert continuation_differences(old, {"model.lr": 1.0, "pretrain.extend": True}, defaults) == ["pretrain.extend"]
    assert continuation_differences(old, {"model.lr": 2.0, "pretrain.extend": False}, defaults) == ["model.lr"]
    assert continuation_differences({**old, "x.gone": 1}, old, defaults) == ["x.gone"]  # a key removed since: a difference
    assert continuation_differences(old, {"model.lr": 1.0, "bench.steps": 3}, defaults) == []  # may differ anyway
    with pytest.raises(ConfigError, match="make sweep SWEEP=mini"):  # the source never finished
        run_sweep(more("early", "  x: {exp: local_branch, continue: mini/joint}\n"))
    with pytest.raises(ConfigError, match="raise the sweep's trainer.max_steps"):
        run_sweep(more("short", "  x: {exp: local_branch, continue: mini/local_only}\n", steps=2))
    with pytest.raises(ConfigError, match="<sweep>/<run>"):
        run_sweep(more("bad", "  x: {exp: local_branch, continue: local_only}\n"))

    calls = []
    monkeypatch.setattr(realisid.sweep, "train", lambda *a, **k: calls.append(a))
    run_sweep(str(sweep))
    assert calls == []  # both runs were DONE
    # the sweep file edited after its runs finished: a finished run trained with other settings is not reused silently
    sweep.write_text(sweep.read_text().replace("trainer.max_steps=2,", "trainer.max_steps=3,"))
    with pytest.raises(ConfigError, match=r"local_only is finished, but .*\(trainer.max_steps: 2 -> 3\); delete .*local_only"):
        run_sweep(str(sweep))
    assert calls == []


def test_an_interrupted_sweep_run_is_neither_benchmarked_nor_marked_done(tmp_path, monkeypatch):
    """SIGTERM during a sweep's training: the run saved last.ckpt and must resume on the next sweep, not be
    benchmarked half-trained and skipped forever."""
    import realisid.sweep
    from realisid.cli import main
    from realisid.interrupts import INTERRUPTED_EXIT

    sweep = tmp_path / "mini.yaml"
    sweep.write_text(f"""name: mini
out_dir: {tmp_path}/sweep
train: [experiment.runs_dir={tmp_path}/runs]
runs:
  local_only: {{exp: local_branch}}
""")
    monkeypatch.setattr(realisid.sweep, "train", lambda cfg, **k: {"interrupted": "SIGTERM at step 3"})
    benched = []
    monkeypatch.setattr(realisid.sweep, "run_bench", lambda *a, **k: benched.append(a))
    assert main(["sweep", str(sweep)]) == INTERRUPTED_EXIT
    assert benched == []
    assert not (tmp_path / "runs" / "sweeps" / "mini" / "local_only" / "DONE").exists()


def test_a_sweep_replicate_trains_with_its_seed_into_its_own_folders(tmp_path, monkeypatch):
    """make sweep SWEEP=mini SEED=3: every run trains with experiment.seed=3 under runs/sweeps/mini-seed3, a
    continued run continues the source sweep's seed-3 replicate, the benchmark cases are the sweep's own."""
    import realisid.sweep
    from realisid.cli import main
    from realisid.config import ConfigError
    from realisid.interrupts import INTERRUPTED_EXIT
    from realisid.sweep import load_sweep, replicate

    sweep = tmp_path / "mini.yaml"
    sweep.write_text(f"""name: mini
out_dir: {tmp_path}/sweep
train: [experiment.runs_dir={tmp_path}/runs]
bench: [bench.seed=0]
runs:
  local_only: {{exp: local_branch}}
  more: {{exp: local_branch, continue: other/local_only}}
""")
    rep = replicate(load_sweep(str(sweep)), 3)
    assert (rep.name, rep.out_dir) == ("mini-seed3", f"{tmp_path}/sweep-seed3")
    assert list(rep.train)[-1] == "experiment.seed=3" and list(rep.bench) == ["bench.seed=0"]
    assert rep.runs.more["continue"] == "other-seed3/local_only" and "continue" not in rep.runs.local_only
    trained = []
    monkeypatch.setattr(realisid.sweep, "train", lambda cfg, **k: trained.append((cfg, k)) or {"interrupted": "stop"})
    assert main(["sweep", str(sweep), "--seed", "3"]) == INTERRUPTED_EXIT
    cfg, where = trained[0]
    assert cfg.experiment.seed == 3 and where["run_dir"] == os.path.join(str(tmp_path), "runs", "sweeps", "mini-seed3", "local_only")
    with pytest.raises(ConfigError, match="SEED=N"):  # a seed override would share the seed-0 folders
        realisid.sweep.run_sweep(str(sweep), ["experiment.seed=3"])
    seeded = tmp_path / "seeded.yaml"
    seeded.write_text(sweep.read_text().replace("name: mini", "name: seeded").replace("train: [", "train: [experiment.seed=1, "))
    with pytest.raises(ConfigError, match="sets experiment.seed in its train overrides already"):
        replicate(load_sweep(str(seeded)), 2)
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "mini-seed3.yaml").write_text("name: mini-seed3\n")
    monkeypatch.setattr(realisid.sweep, "EXPERIMENTS_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="make sweep SWEEP=mini-seed3"):  # a sweep file of that name: never mixed
        replicate(load_sweep(str(sweep)), 3)


def test_a_sweep_baseline_must_be_one_of_its_runs(tmp_path):
    from realisid.config import ConfigError
    from realisid.sweep import load_sweep

    sweep = tmp_path / "abl.yaml"
    sweep.write_text("name: abl\nout_dir: x\nbaseline: jiont\nruns:\n  joint: {exp: joint}\n  no_up: {exp: joint}\n")
    with pytest.raises(ConfigError, match="baseline: 'jiont' .* is not one of its runs \\(joint, no_up\\)"):
        load_sweep(str(sweep))
    assert load_sweep("ablations").baseline == "joint"


def test_a_sweep_precomputes_again_when_its_cache_was_made_for_other_models(face_shards, eval_standin, tmp_path, monkeypatch):
    """A new `make pretrain` (or a checkout that rewrote the models) leaves the sweep's cache stale: the sweep must
    rebuild it instead of training every run into a "made for another setup" error; a current cache is reused."""
    import json

    from omegaconf import OmegaConf

    import realisid.sweep
    from realisid.config import load_config
    from realisid.data.cache_format import INFO_FILE, cache_info
    from realisid.models.backbone import load_backbone

    folder = tmp_path / "cache"
    sw = OmegaConf.create({"name": "mini", "precompute": str(folder), "train": _common(face_shards, eval_standin, tmp_path),
                           "runs": {"local_only": {"exp": "local_branch"}}})
    cfg = load_config("local_branch", list(sw.train))
    current = {**cache_info(load_backbone(cfg.model, int(cfg.experiment.seed)), cfg), "complete": True, "shards": []}
    made = []

    def fake_precompute(cfg, out_dir):
        made.append(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        (folder / INFO_FILE).write_text(json.dumps(current))

    monkeypatch.setattr(realisid.sweep, "precompute", fake_precompute)
    monkeypatch.setattr(realisid.sweep, "prepare_embedded_default", lambda cfg: None)
    folder.mkdir()
    (folder / INFO_FILE).write_text(json.dumps({**current, "id_encoder": "standin:/elsewhere@0123"}))
    (folder / "train-000000.tar").write_bytes(b"old")
    assert realisid.sweep.precomputed(sw) == str(folder)
    assert made == [str(folder)] and not (folder / "train-000000.tar").exists()  # the stale shards are gone
    assert realisid.sweep.precomputed(sw) == str(folder) and len(made) == 1     # the current cache is reused


def test_reference_offset_chooses_other_identities_and_the_largest_face_of_each():
    import numpy as np
    import torch

    from realisid.bench import reference_faces

    g = torch.Generator().manual_seed(0)
    examples = [{"identity": f"id{i}", "key": f"id{i}-{j}", "face_size": size, "image": torch.rand(3, 64, 64, generator=g) * 2 - 1,
                 "face_box": np.array([16.0, 16.0, 16.0 + 64 * size, 16.0 + 64 * size])}
                for i in (3, 0, 2, 1) for j, size in enumerate((0.2, 0.5, 0.3))]
    first = reference_faces(examples, 2, 32)
    rest = reference_faces(examples, 2, 32, offset=2)
    assert [r["identity"] for r in first] == ["id0", "id1"] and [r["identity"] for r in rest] == ["id2", "id3"]
    assert {r["key"] for r in first + rest} == {"id0-1", "id1-1", "id2-1", "id3-1"}  # each identity's largest face
    assert rest[0]["id_image"].shape == (3, 32, 32)
    assert [r["identity"] for r in reference_faces(examples, 2, 32, offset=3)] == ["id3"]  # fewer left: a warning, not a crash
    with pytest.raises(ValueError, match="reference_offset=-1"):
        reference_faces(examples, 2, 32, offset=-1)


def test_bench_only_runs_the_named_settings_and_names_the_choices(monkeypatch, capsys, tmp_path):
    """`realisid bench --only` picks settings of bench.settings (one added by an override included); an unknown name
    fails before anything trains or samples, listing the settings there are."""
    import realisid.bench
    from realisid.bench import bench_settings
    from realisid.cli import main
    from realisid.config import load_config

    cfg = load_config("joint", ["bench.settings.id3={guidance_id: 3.0}"])
    assert set(bench_settings(cfg.bench.settings)) == {"joint", "local_only", "global_only", "id3"}
    assert list(bench_settings(cfg.bench.settings, "id3, joint")) == ["id3", "joint"]
    assert bench_settings(cfg.bench.settings, ["id3"]) == {"id3": {"guidance_id": 3.0}}
    with pytest.raises(ValueError, match="nope.*joint, local_only, global_only"):
        bench_settings(cfg.bench.settings, "joint,nope")
    called = []
    monkeypatch.setattr(realisid.bench, "run_bench", lambda *a, **k: called.append(k) or {"plots": []})
    assert main(["bench", "joint", "--only", "nope", "--run", "runs/none"]) == 2
    assert "local_only" in capsys.readouterr().err and called == []
    # key=value overrides after the options are overrides still (argparse alone would refuse them)
    def fake_bench(cfg, run, out, **k):
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, "table.md"), "w").write("| fake |\n")
        called.append(k)
        return {"plots": []}

    monkeypatch.setattr(realisid.bench, "run_bench", fake_bench)
    assert main(["bench", "joint", "--only", "id9", "--run", "runs/none", "--out", str(tmp_path / "b"),
                 "bench.settings.id9={guidance_id: 9.0}"]) == 0
    assert called and called[-1]["settings"] == {"id9": {"guidance_id": 9.0}}
    assert main(["bench", "joint", "--run", "runs/none", "bench.stepz=2"]) == 2
    assert "unknown key 'bench.stepz'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # not an override: argparse's own refusal
        main(["bench", "joint", "--run", "runs/none", "stray"])
