"""Robust training: SIGTERM + resume gives the same weights as an uninterrupted run; non-finite losses."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_run_config


def _cfg(tmp_path, face_shards, name, *extra):
    return tiny_run_config(tmp_path, name, face_shards, *extra)


def _trainable(ckpt):
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in sd.items() if k.startswith(("local_branch.", "projector."))}


@pytest.mark.slow
def test_sigterm_then_resume_matches_uninterrupted(tmp_path, face_shards):
    from realisid.train import resume_config, train

    cfg, _ = _cfg(tmp_path, face_shards, "straight")
    straight = train(cfg)
    assert straight["global_step"] == 16

    _, path = _cfg(tmp_path, face_shards, "killed")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "realisid", "train", str(path)], cwd=os.getcwd(), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    run_root = tmp_path / "killed" / "local_branch"
    while time.time() < deadline:
        ckpts = list(run_root.glob("*/checkpoints/step-000002.ckpt")) if run_root.exists() else []
        if ckpts or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, out[-3000:]  # 3 = interrupted with a checkpoint written
    run_dir = next(run_root.iterdir())
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert 2 <= stopped_at < 16
    assert not (run_dir / "export").exists()

    resumed = train(resume_config(str(run_dir)), resume=str(run_dir))
    assert resumed["global_step"] == 16 and resumed["run_dir"] == str(run_dir)
    a, b = _trainable(straight["checkpoint"]), _trainable(resumed["checkpoint"])
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_nonfinite_loss_stops_or_skips(tmp_path, face_shards, monkeypatch, caplog):
    from realisid.modules.branch_module import RealisIDModule
    from realisid.train import train

    real = RealisIDModule.shared_step

    def poisoned(self, batch, generator=None, dropout=True, **kwargs):
        out = real(self, batch, generator, dropout, **kwargs)
        if self.training and self.global_step == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(RealisIDModule, "shared_step", poisoned)
    cfg, _ = _cfg(tmp_path, face_shards, "nan", "trainer.max_steps=6")
    with pytest.raises(FloatingPointError, match="non-finite training loss nan at step 3"):
        train(cfg)
    ckpts = sorted((tmp_path / "nan").glob("*/*/checkpoints/*.ckpt"))
    assert [c.name for c in ckpts if c.name.startswith("step")] == ["step-000002.ckpt"]  # the good one, nothing after
    cfg, _ = _cfg(tmp_path, face_shards, "skip", "trainer.max_steps=6", "trainer.nonfinite_loss=skip", "trainer.checkpoint_every_n_steps=1")
    res = train(cfg)
    # the poisoned batch is skipped (no gradients, so no weight update) and training goes on to the end
    assert res["global_step"] == 6 and "skipped batch: non-finite training loss nan at step 3" in caplog.text
    assert all(torch.isfinite(v).all() for v in _trainable(res["checkpoint"]).values())
    ckpt = {int(c.stem.split("-")[1]): _trainable(c) for c in (tmp_path / "skip").glob("*/*/checkpoints/step-*.ckpt")}
    assert ckpt.keys() >= {2, 3, 4, 5}
    for k in ckpt[3]:  # the skipped step changed no weight; the steps around it did
        torch.testing.assert_close(ckpt[3][k], ckpt[4][k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(ckpt[2][k], ckpt[3][k]) for k in ckpt[2]) and any(not torch.equal(ckpt[4][k], ckpt[5][k]) for k in ckpt[4])


def test_resume_errors(tmp_path):
    from realisid.train import resume_config

    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        resume_config(str(tmp_path))
    (tmp_path / "config.yaml").write_text("a: 1\n")
    with pytest.raises(FileNotFoundError, match="no checkpoints/last.ckpt"):
        resume_config(str(tmp_path))
