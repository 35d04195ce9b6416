"""SIGTERM to a whole process group (GNU timeout, Slurm, container runtimes), workers included: training saves one
last.ckpt at a step boundary, exits 3 and resumes exactly; DDP ranks stop at the same step; the shard builder keeps
its finished shards. Also the small things met on the way: negative box values, progress lines without a terminal."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_run_config, write_face_shards


def _config(tmp_path, name, shards, *extra):
    """A 12-step run with one data worker (the process a group signal also reaches)."""
    return tiny_run_config(tmp_path, name, shards, "data.num_workers=1", "trainer.max_steps=12", *extra)


def _start_group(args, cwd=None):
    """A command in its own session (process group), as a scheduler starts a job."""
    return subprocess.Popen([sys.executable, "-m", "realisid", *args], cwd=cwd or os.getcwd(), start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _signal_group_when(proc, ready, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    assert proc.poll() is None, "the command ended before it could be signalled"
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    return out


def _trainable(ckpt):
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in sd.items() if k.startswith(("local_branch.", "projector."))}


def _same_weights(a, b):
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_group_sigterm_with_a_data_worker_saves_one_last_checkpoint_and_resumes_exactly(tmp_path, face_shards):
    from realisid.train import resume_config, train

    cfg, _ = _config(tmp_path, "straight", face_shards)
    straight = train(cfg)
    assert straight["global_step"] == 12

    _, path = _config(tmp_path, "killed", face_shards)
    root = tmp_path / "killed" / "local_branch"
    proc = _start_group(["train", str(path)])
    out = _signal_group_when(proc, lambda: root.exists() and any(root.glob("*/checkpoints/step-000002.ckpt")))
    assert proc.returncode == 3, out[-3000:]
    assert "DataLoader worker" not in out and "stopped by SIGTERM" in out
    run_dir = next(root.iterdir())
    lasts = sorted(p.name for p in (run_dir / "checkpoints").glob("last*.ckpt"))
    assert lasts == ["last.ckpt"]  # one "last", not last.ckpt and last-v1.ckpt
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert 2 <= stopped_at < 12
    resumed = train(resume_config(str(run_dir)), resume=str(run_dir))
    assert resumed["global_step"] == 12
    _same_weights(_trainable(straight["checkpoint"]), _trainable(resumed["checkpoint"]))


@pytest.mark.slow
def test_group_sigterm_stops_every_ddp_rank_at_the_same_step(tmp_path):
    write_face_shards(tmp_path, "train", n=13, maxcount=5)
    write_face_shards(tmp_path, "val", n=3)
    ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "data.num_workers=1"]
    _, straight_path = _config(tmp_path, "straight", tmp_path, *ddp)
    done = subprocess.run([sys.executable, "-m", "realisid", "train", str(straight_path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    straight_run = next((tmp_path / "straight" / "local_branch").iterdir())

    _, path = _config(tmp_path, "killed", tmp_path, *ddp)
    root = tmp_path / "killed" / "local_branch"
    proc = _start_group(["train", str(path)])
    out = _signal_group_when(proc, lambda: root.exists() and any(root.glob("*/checkpoints/step-000002.ckpt")))
    assert proc.returncode == 3, out[-4000:]
    run_dir = next(root.iterdir())
    counts = [json.load(open(run_dir / f"batches-rank{r}.json")) for r in (0, 1)]
    assert counts[0]["global_step"] == counts[1]["global_step"] and counts[0]["batches"] == counts[1]["batches"]
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert stopped_at == counts[0]["global_step"] and 2 <= stopped_at < 12
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("last*.ckpt")) == ["last.ckpt"]
    resumed = subprocess.run([sys.executable, "-m", "realisid", "train", "--resume", str(run_dir)], capture_output=True, text=True,
                             timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    _same_weights(_trainable(straight_run / "checkpoints" / "last.ckpt"), _trainable(run_dir / "checkpoints" / "last.ckpt"))


@pytest.mark.slow
def test_group_sigterm_to_the_shard_builder_keeps_finished_shards(tmp_path):
    import numpy as np
    from PIL import Image

    import onnx_models

    models = tmp_path / "models"
    models.mkdir()
    onnx_models.make_scrfd(str(models / "det_tiny.onnx"))
    onnx_models.make_arcface(str(models / "w_tiny.onnx"), dim=64)
    src = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for i in range(60):  # the CLI's detector input is 640 px: a 320 px photo at scale 2, a 16 px square on the 16 px grid is a face
        img = np.zeros((320, 320, 3), np.uint8)
        x, y = (int(v) * 16 for v in rng.integers(0, 19, 2))
        img[y:y + 16, x:x + 16] = 255
        (src / f"id{i % 6}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(src / f"id{i % 6}" / f"p{i}.png")
    out = tmp_path / "shards"
    args = ["build-shards", "--src", str(src), "--out", str(out), "--model-dir", str(models), "--workers", "2", "--shard-size", "4",
            "--min-face", "16", "--no-progress"]
    proc = _start_group(args)
    text = _signal_group_when(proc, lambda: out.exists() and len(list(out.glob("shards-*.tar"))) >= 2)
    assert proc.returncode == 3, text[-3000:]
    assert "finished shards" in text and "run the same command again" in text
    kept = sorted(p.name for p in out.glob("shards-*.tar"))
    assert kept and not list(out.glob("*.tar.tmp"))
    again = subprocess.run([sys.executable, "-m", "realisid", *args], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    import webdataset as wds

    keys = [s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in out.glob("shards-*.tar")), shardshuffle=False)]
    assert len(keys) == len(set(keys)) == 60
    assert set(kept) <= {p.name for p in out.glob("shards-*.tar")}


def test_box_values_with_a_leading_minus_reach_the_box_check():
    from realisid.cli import box_values_as_options

    argv = ["generate", "--run", "r", "--box", "-5,-5,20,20", "--box", "4,4,8,8", "--seed", "-1"]
    assert box_values_as_options(argv) == ["generate", "--run", "r", "--box=-5,-5,20,20", "--box", "4,4,8,8", "--seed", "-1"]


@pytest.mark.slow
def test_progress_is_sparse_lines_without_a_terminal(tmp_path, face_shards, caplog):
    import logging

    from realisid.train import train

    cfg, _ = _config(tmp_path, "progress", face_shards, "trainer.enable_progress_bar=true", "trainer.max_steps=20", "data.num_workers=0")
    with caplog.at_level(logging.INFO, logger="realisid"):
        train(cfg)  # pytest's stderr is not a terminal
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert lines[0].startswith("step 1/20") and lines[-1].startswith("step 20/20") and len(lines) == 20
    assert all("s/step" in line and "left" in line for line in lines)


def _tqdm_bar_in_a_pipe(quiet: bool, env_extra: dict | None = None, imported_first: bool = False) -> str:
    """What a library's tqdm bar writes to stderr when stderr is a pipe, with or without the CLI's quieting first;
    ``imported_first``: transformers (and with it tqdm) is imported before the quieting, as a benchmark script does."""
    bar = ("from transformers.utils.logging import tqdm\n" if imported_first else "from tqdm import tqdm\n") \
        + "for _ in tqdm(range(50), desc='Loading weights'): pass\n"
    code = ("import sys\n" + ("import transformers.utils.logging\n" if imported_first else "")
            + "from realisid.cli import quiet_progress_bars\n" + ("quiet_progress_bars()\n" if quiet else "") + bar)
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    proc = subprocess.run([sys.executable, "-c", code], env={**env, **(env_extra or {})}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_library_progress_bars_stay_out_of_a_log_file(monkeypatch):
    assert "Loading weights" in _tqdm_bar_in_a_pipe(quiet=False)  # what transformers' loader writes at every backbone load
    assert _tqdm_bar_in_a_pipe(quiet=True) == ""
    # a benchmark script imports the libraries before it can quiet them: they are told at run time
    assert "Loading weights" in _tqdm_bar_in_a_pipe(quiet=False, imported_first=True)
    assert _tqdm_bar_in_a_pipe(quiet=True, imported_first=True) == ""
    assert "Loading weights" in _tqdm_bar_in_a_pipe(quiet=True, imported_first=True, env_extra={"HF_HUB_DISABLE_PROGRESS_BARS": "0"})
    # a user's own setting wins (an empty TQDM_DISABLE is tqdm's "bars on")
    assert "Loading weights" in _tqdm_bar_in_a_pipe(quiet=True, env_extra={"TQDM_DISABLE": ""})
    import io

    from realisid.cli import quiet_progress_bars

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    # main() called in-process (a test, a user's script) turns the bars off while its command runs, and leaves the
    # caller's environment as it found it: a key it set is removed again, a user's own value stays
    import realisid.cli as cli

    seen = {}

    def add_probe(sub):
        sub.add_parser("probe").set_defaults(func=lambda args: seen.update({k: os.environ.get(k) for k in cli.PROGRESS_BAR_SETTINGS}))

    monkeypatch.setattr(cli, "ADD_PARSERS", [add_probe])
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a log file, not a terminal
    assert cli.main(["probe"]) == 0
    assert seen == {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "0"}
    assert "TQDM_DISABLE" not in os.environ and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"
    assert quiet_progress_bars(Terminal()) is False and "TQDM_DISABLE" not in os.environ  # a terminal keeps its bars
