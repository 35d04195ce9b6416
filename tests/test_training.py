"""A few steps through the real Trainer on the real local_branch config, shrunk; export and reload."""
import os

import pytest
import torch


@pytest.mark.slow
def test_few_step_training_run_and_export(tiny_cfg, face_shards, tmp_path):
    from diffusers import ControlNetModel

    from realisid.models.branches import LocalBranch
    from realisid.pipeline import Person, RealisIDPipeline
    from realisid.train import train

    cfg = tiny_cfg("local_branch", f"data.train_shards={face_shards}/train-*.tar", f"data.val_shards={face_shards}/val-*.tar",
                   "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=4", "data.val_samples=2",
                   "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.checkpoint_every_n_steps=3", "trainer.log_every_n_steps=1",
                   "trainer.enable_progress_bar=false", "validation.num_images=1", "validation.steps=2", f"experiment.runs_dir={tmp_path}/runs")
    res = train(cfg)
    run = res["run_dir"]
    for sub in ("config.yaml", "checkpoints/last.ckpt", "export/local/config.json", "export/local/diffusion_pytorch_model.safetensors",
                "export/id_projector/model.safetensors", "samples/step-000006.png"):
        assert os.path.exists(os.path.join(run, sub)), sub
    assert any(f.startswith("events") for f in os.listdir(os.path.join(run, "tb")))
    assert res["steps"] == 6 and "loss_first_fifth" in res
    ckpt = torch.load(os.path.join(run, "checkpoints/last.ckpt"), map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    assert not any(k.startswith("backbone.") for k in ckpt["state_dict"])  # frozen weights stay out of checkpoints
    # the export is a plain diffusers ControlNet folder
    assert isinstance(ControlNetModel.from_pretrained(os.path.join(run, "export/local")), ControlNetModel)

    # reload the export: same branch outputs and the same sample as the module that trained it
    from realisid.modules import build_module

    module = build_module(cfg)
    state = {k: v for k, v in ckpt["state_dict"].items()}
    module.load_state_dict(state, strict=False)
    module.eval()
    reloaded = LocalBranch.from_pretrained(os.path.join(run, "export/local")).eval()
    z, t = torch.randn(1, 4, 32, 32), torch.tensor([500])
    args = (z, t, torch.randn(1, 4, 32), torch.rand(1, 3, 32, 32), torch.tensor([[4, 4, 20, 20]]))
    with torch.no_grad():
        a, b = module.local_branch(*args), reloaded(*args)
    for x, y in zip(a[0] + [a[1]], b[0] + [b[1]]):  # same weights; CPU kernels may differ in the last bits
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    pipe_a = RealisIDPipeline.from_module(module)
    pipe_b = RealisIDPipeline.from_export(os.path.join(run, "export"), backbone=module.backbone)
    person = Person(box=(8, 8, 40, 40), id_image=torch.zeros(3, 32, 32))
    ia = pipe_a("a photo", [person], num_inference_steps=3, seed=1, output_type="pt").images
    ib = pipe_b("a photo", [person], num_inference_steps=3, seed=1, output_type="pt").images
    torch.testing.assert_close(ia, ib, rtol=0, atol=1e-5)
