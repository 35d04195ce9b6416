"""Two-process CPU DDP (gloo) training through the CLI, as users launch it, with uneven shards."""
import json
import os
import subprocess
import sys

import pytest

from conftest import RANDOM_TINY, write_face_shards


@pytest.mark.slow
@pytest.mark.parametrize("resampled", [True, False])
def test_two_rank_ddp_equal_batches(tmp_path, resampled):
    from realisid.config import load_config, save_config

    write_face_shards(tmp_path, "train", n=13, maxcount=5)   # shards of 5, 5 and 3 samples
    write_face_shards(tmp_path, "val", n=3)                  # fewer validation samples than 2 ranks x batch
    cfg = load_config("local_branch", RANDOM_TINY + [
        f"data.train_shards={tmp_path}/train-*.tar", f"data.val_shards={tmp_path}/val-*.tar", "data.batch_size=2",
        "data.num_workers=0", "data.shuffle_buffer=4", "data.val_samples=3", f"data.resampled={str(resampled).lower()}",
        "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.checkpoint_every_n_steps=3", "trainer.enable_progress_bar=false",
        "validation.num_images=1", "validation.steps=2", f"experiment.runs_dir={tmp_path}/runs",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"])
    path = tmp_path / "ddp.yaml"
    save_config(cfg, str(path))
    proc = subprocess.run([sys.executable, "-m", "realisid", "train", str(path)], cwd=os.getcwd(), capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run = next((tmp_path / "runs" / "local_branch").iterdir())
    counts = [json.load(open(run / f"batches-rank{r}.json")) for r in (0, 1)]
    assert [c["world_size"] for c in counts] == [2, 2]
    assert counts[0]["batches"] == counts[1]["batches"] == 6 and counts[0]["global_step"] == counts[1]["global_step"] == 6
    assert (run / "export" / "local" / "config.json").exists()


def test_too_few_shards_for_ranks_fails_clearly(tmp_path):
    from realisid.data.example import ExampleMaker
    from realisid.data.stream import TrainStream

    write_face_shards(tmp_path, "train", n=4, maxcount=5)
    maker = ExampleMaker(resolution=64, vae_scale_factor=2, local_latent_size=16, crop_expand=1.6, id_image_size=32)
    with pytest.raises(ValueError, match=r"1 train shards for 2 ranks x 2 workers = 4 readers.*data.resampled=true"):
        TrainStream([str(tmp_path / "train-000000.tar")], maker, batch_size=2, shuffle_buffer=2, seed=0, rank=0, world_size=2,
                    num_workers=2, resampled=False)


POISON_ONE_RANK = """
import sys
import torch
from realisid.modules.branch_module import RealisIDModule

real = RealisIDModule.shared_step

def poisoned(self, batch, generator=None, dropout=True, **kwargs):
    out = real(self, batch, generator, dropout, **kwargs)
    if self.training and self.global_rank == 1 and self.global_step == 2:  # one rank only
        out["loss"] = out["loss"] * float("nan")
    return out

RealisIDModule.shared_step = poisoned
from realisid.cli import main
sys.exit(main(["train", sys.argv[1]]))
"""


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_is_skipped_by_every_rank(tmp_path):
    """Issue 11, defect 4: trainer.nonfinite_loss=skip under DDP with a NaN on rank 1 only: both ranks skip the
    same step together (returning None on one rank desynchronised the gradient all-reduce), finish every step,
    and hold the same finite weights."""
    import torch

    from realisid.config import load_config, save_config

    write_face_shards(tmp_path, "train", n=12, maxcount=4)
    write_face_shards(tmp_path, "val", n=2)
    cfg = load_config("local_branch", RANDOM_TINY + [
        f"data.train_shards={tmp_path}/train-*.tar", f"data.val_shards={tmp_path}/val-*.tar", "data.batch_size=2",
        "data.num_workers=0", "data.shuffle_buffer=4", "data.val_samples=2", "trainer.max_steps=5", "trainer.val_check_interval=1000",
        "trainer.checkpoint_every_n_steps=5", "trainer.enable_progress_bar=false", "validation.num_images=0",
        f"experiment.runs_dir={tmp_path}/runs", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
        "trainer.nonfinite_loss=skip"])
    path = tmp_path / "ddp.yaml"
    save_config(cfg, str(path))
    script = tmp_path / "poison.py"
    script.write_text(POISON_ONE_RANK)
    proc = subprocess.run([sys.executable, str(script), str(path)], cwd=os.getcwd(), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "skipped batch: non-finite training loss nan at step 2" in log  # rank 1's own message
    assert "skipped batch: non-finite training loss on another rank than 0 at step 2" in log  # rank 0 skipped with it
    run = next((tmp_path / "runs" / "local_branch").iterdir())
    counts = [json.load(open(run / f"batches-rank{r}.json")) for r in (0, 1)]
    assert counts[0]["global_step"] == counts[1]["global_step"] == 5
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state and all(torch.isfinite(v).all() for v in state.values())
