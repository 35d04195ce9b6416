"""Efficiency options (config ``efficiency``, ``model.backbone_dtype``, ``trainer.*``) and precomputed inputs.

Options that must not change the maths (attention kernel, memory layout, checkpointing, compile, precomputed
latents) are checked against the plain step for the same batch and seed; the others are checked for what they
promise (half-precision frozen parts, EMA weights in validation and export, one optimizer step per k batches).
"""
import os

import pytest
import torch

from realisid.data.batch import ready_batch


def _batch(face_shards, module):
    from realisid.train import build_datamodule

    dm = build_datamodule(module.cfg, module)
    dm.setup("fit")
    return ready_batch(next(iter(dm.train_dataloader())))


def _cfg(tiny_cfg, face_shards, exp="joint", *extra):
    return tiny_cfg(exp, f"data.train_shards={face_shards}/train-*.tar", f"data.val_shards={face_shards}/val-*.tar",
                    "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=4", "data.val_samples=2", *extra)


def _loss_and_grads(module, batch, seed=3):
    module.train()
    module.zero_grad(set_to_none=True)
    out = module.shared_step(batch, generator=torch.Generator().manual_seed(seed))
    out["loss"].backward()
    grads = {k: p.grad.detach().clone() for k, p in module.named_parameters() if p.grad is not None}
    return out["loss"].detach(), grads


@pytest.fixture
def reference(tiny_cfg, face_shards):
    """Loss and gradients of the plain joint step (SDPA, NCHW, no checkpointing) for one batch and seed."""
    from realisid.modules import build_module

    module = build_module(_cfg(tiny_cfg, face_shards))
    batch = _batch(face_shards, module)
    loss, grads = _loss_and_grads(module, batch)
    return {"state": {k: v.clone() for k, v in module.state_dict().items()}, "batch": batch, "loss": loss, "grads": grads}


@pytest.mark.parametrize("option", ["efficiency.attention=eager", "efficiency.channels_last=true",
                                    "efficiency.gradient_checkpointing=branches", "efficiency.gradient_checkpointing=all"])
def test_exact_options_give_the_same_loss_and_gradients(tiny_cfg, face_shards, reference, option):
    from realisid.modules import build_module

    module = build_module(_cfg(tiny_cfg, face_shards, "joint", option))
    module.load_state_dict(reference["state"])
    loss, grads = _loss_and_grads(module, reference["batch"])
    torch.testing.assert_close(loss, reference["loss"], rtol=1e-5, atol=1e-6)
    assert grads.keys() == reference["grads"].keys() and any(k.startswith("local_branch.") for k in grads)
    for k, g in grads.items():
        torch.testing.assert_close(g, reference["grads"][k], rtol=1e-3, atol=1e-5, msg=k)
    if "channels_last" in option:
        w = module.local_branch.controlnet.conv_in.weight
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    if "checkpointing" in option:
        assert module.local_branch.controlnet.is_gradient_checkpointing
        assert module.backbone.unet.is_gradient_checkpointing == option.endswith("all")


def test_bf16_mixed_keeps_frozen_parts_in_half_and_branches_in_fp32(tiny_cfg, face_shards, reference):
    from realisid.modules import build_module

    module = build_module(_cfg(tiny_cfg, face_shards, "joint", "model.backbone_dtype=bf16", "trainer.precision=bf16-mixed"))
    module.load_state_dict(reference["state"])
    # the tiny VAE's config has diffusers' default force_upcast=true: it stays in fp32 (tests/test_backbone.py)
    assert module.backbone.unet.dtype == torch.bfloat16 and module.backbone.vae.dtype == torch.float32
    assert "frozen parts in bf16 (VAE in fp32: force_upcast)" in module.applied
    assert module.backbone.text_encoder.dtype == torch.bfloat16 and module.id_encoder.model.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in module.local_branch.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what Lightning's bf16-mixed wraps the step in
        loss, grads = _loss_and_grads(module, reference["batch"])
    assert torch.isfinite(loss) and abs(loss.item() - reference["loss"].item()) < 0.05 * reference["loss"].item()
    g = grads["local_branch.controlnet.controlnet_down_blocks.0.weight"]
    assert g.dtype == torch.float32 and g.abs().sum() > 0
    assert not any(k.startswith("backbone.") for k in grads)
    # sampling with the half backbone and fp32 branches runs under autocast
    from realisid.pipeline import Person

    out = module.pipeline()("a photo", [Person(box=(8, 8, 40, 40), id_image=torch.zeros(3, 32, 32))], num_inference_steps=2, output_type="pt")
    assert torch.isfinite(out.images).all()


def test_half_backbone_needs_matching_precision(tiny_cfg, face_shards):
    from realisid.modules import build_module

    with pytest.raises(ValueError, match="trainer.precision=bf16-mixed"):
        build_module(_cfg(tiny_cfg, face_shards, "local_branch", "model.backbone_dtype=bf16"))
    with pytest.raises(ValueError, match="needs a GPU"):
        build_module(_cfg(tiny_cfg, face_shards, "local_branch", "model.backbone_dtype=fp16", "trainer.precision=16-mixed",
                          "trainer.accelerator=cpu"))
    with pytest.raises(ValueError, match="gradient_checkpointing='some'; valid: none, branches, all"):
        build_module(_cfg(tiny_cfg, face_shards, "local_branch", "efficiency.gradient_checkpointing=some"))


@pytest.mark.parametrize("backbone_dtype,precision,fix", [
    ("fp32", "bf16-true", "trainer.precision=bf16-mixed .*model.backbone_dtype=bf16"),
    ("bf16", "bf16-true", "trainer.precision=bf16-mixed .*model.backbone_dtype=bf16"),
    ("fp32", "16-true", "trainer.precision=16-mixed .*model.backbone_dtype=fp16"),
    ("fp16", "16-true", "trainer.precision=16-mixed .*model.backbone_dtype=fp16"),
    ("fp32", "transformer-engine", "trainer.precision=bf16-mixed"),
])
def test_true_half_precision_is_refused_for_trainable_parts(backbone_dtype, precision, fix):
    """16-true / bf16-true cast the trainable branches and their optimizer state to half: at lr 1e-5 most bf16
    updates round away. Refused whatever the backbone dtype, naming trainer.precision, the value and the fix."""
    from realisid.modules.efficiency import check_precision

    with pytest.raises(ValueError, match=f"trainer.precision={precision} puts the trainable branches and their optimizer state in .*{fix}"):
        check_precision(backbone_dtype, precision, "cpu")
    check_precision("fp32", "32-true")
    check_precision("bf16", "bf16-mixed", "cpu")
    check_precision("bf16", "bf16")  # Lightning's alias of bf16-mixed


def test_true_half_precision_is_refused_before_building(tiny_cfg):
    from realisid.modules import build_module

    with pytest.raises(ValueError, match="trainer.precision=bf16-true .*Use trainer.precision=bf16-mixed"):
        build_module(tiny_cfg("local_branch", "model.backbone_dtype=bf16", "trainer.precision=bf16-true"))


def test_bf16_update_at_paper_lr_rounds_away():
    """Why -true is refused: one Adam step at lr 1e-5 leaves most bf16 weights of ControlNet size unchanged."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4096) * 0.02)
    for dtype, mostly_unchanged in ((torch.bfloat16, True), (torch.float32, False)):
        p = torch.nn.Parameter(w.detach().to(dtype).clone())
        opt = torch.optim.AdamW([p], lr=1e-5, weight_decay=1e-2)
        p.grad = torch.randn_like(p)
        before = p.detach().clone()
        opt.step()
        unchanged = (p.detach() == before).float().mean().item()
        assert (unchanged > 0.5) == mostly_unchanged, (dtype, unchanged)


@pytest.mark.slow
def test_compiled_branches_give_the_same_loss(tiny_cfg, face_shards, reference):
    from realisid.modules import build_module

    module = build_module(_cfg(tiny_cfg, face_shards, "joint", "efficiency.compile=true"))
    module.load_state_dict(reference["state"])  # compiling in place keeps parameter names
    loss, grads = _loss_and_grads(module, reference["batch"])
    torch.testing.assert_close(loss, reference["loss"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads["local_branch.controlnet.conv_in.weight"], reference["grads"]["local_branch.controlnet.conv_in.weight"],
                               rtol=1e-3, atol=1e-4)


def test_ema_update_swap_and_state():
    from torch import nn

    from realisid.modules.ema import WeightEMA

    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema = WeightEMA({"m": lin}, decay=0.5)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update()  # warm-up decay min(0.5, 1/10) = 0.1: shadow = 0.9 * 1
    torch.testing.assert_close(ema.shadow["m.weight"], torch.full((1, 2), 0.9))
    ema.update()  # decay min(0.5, 2/11): 0.9 + (1 - 2/11) * 0.1
    torch.testing.assert_close(ema.shadow["m.weight"], torch.full((1, 2), 0.9 + 9 / 11 * 0.1))
    with ema.averaged():
        assert torch.allclose(lin.weight, ema.shadow["m.weight"])
        assert torch.equal(ema.live_state({"m": "net."})["net.weight"], torch.ones(1, 2))
    assert torch.equal(lin.weight, torch.ones(1, 2))  # live weights back
    other = WeightEMA({"m": lin}, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 2 and torch.equal(other.shadow["m.weight"], ema.shadow["m.weight"])


@pytest.mark.slow
def test_ema_and_accumulation_through_the_trainer(tiny_cfg, face_shards, tmp_path):
    """4 optimizer steps of 2 batches each; the export holds the EMA weights, the checkpoint the live ones."""
    from safetensors.torch import load_file

    from realisid.train import train

    cfg = _cfg(tiny_cfg, face_shards, "local_branch", "efficiency.ema.enabled=true", "efficiency.ema.decay=0.9",
               "trainer.accumulate_grad_batches=2", "trainer.max_steps=4", "trainer.val_check_interval=2",
               "trainer.checkpoint_every_n_steps=2", "trainer.enable_progress_bar=false", "validation.num_images=1",
               "validation.steps=2", f"experiment.runs_dir={tmp_path}/runs")
    res = train(cfg)
    ckpt = torch.load(os.path.join(res["run_dir"], "checkpoints/last.ckpt"), map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4 and ckpt["FaceDataModule"]["batches_used"] == 8  # one optimizer step per 2 batches
    ema = ckpt["realisid_ema"]
    assert ema["updates"] == 4  # the average moves once per optimizer step, not per batch
    exported = load_file(os.path.join(res["run_dir"], "export/id_projector/model.safetensors"))
    for name, value in exported.items():  # the export holds the average; the checkpoint the live weights
        torch.testing.assert_close(value, ema["shadow"][f"projector.{name}"])
    assert any(not torch.equal(ckpt["state_dict"][f"projector.{n}"], ema["shadow"][f"projector.{n}"]) for n in exported)


def test_precomputed_latents_give_the_same_loss_as_on_the_fly(tiny_cfg, face_shards, tmp_path, monkeypatch):
    """Same raw samples, same seed: the stored VAE posterior and text embeddings reproduce the on-the-fly step."""
    from realisid.data.precompute import precompute
    from realisid.modules import build_module
    from realisid.train import build_datamodule

    cfg = _cfg(tiny_cfg, face_shards, "joint", "data.shuffle_buffer=1")
    res = precompute(cfg, str(tmp_path / "pre"), batch_size=5)
    assert res["written"] == 12 and res["shards"] == 3
    module = build_module(cfg)
    batch = _batch(face_shards, module)
    cfg_pre = _cfg(tiny_cfg, face_shards, "joint", "data.shuffle_buffer=1", f"data.precomputed={tmp_path / 'pre'}")
    dm = build_datamodule(cfg_pre, module)
    dm.setup("fit")
    pre = ready_batch(next(iter(dm.train_dataloader())))
    assert "image" not in pre and pre["latent_moments"].shape == (2, 8, 32, 32) and pre["text_embeds"].shape[0] == 2
    assert pre["key"] == batch["key"]
    for k in ("pe_map", "id_image", "id_mask", "loc_map", "crop_box"):  # drawn once when the cache was written
        assert torch.equal(pre[k], batch[k]), k
    for seed in range(6):  # some seeds drop captions: the null text then comes from the encoder once
        a = module.shared_step(batch, generator=torch.Generator().manual_seed(seed))["loss"]
        b = module.shared_step(pre, generator=torch.Generator().manual_seed(seed))["loss"]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # training from the cache decodes no JPEG
    import realisid.data.shards as shards

    def no_decoding(*a, **k):
        raise AssertionError("a JPEG was decoded")

    monkeypatch.setattr(shards, "decode_image", no_decoding)
    assert next(iter(dm.train_dataloader()))["key"] == batch["key"]
    monkeypatch.undo()
    # the same backbone run in bf16 may train from a cache made in fp32
    from realisid.data.cache_format import cache_info

    half = build_module(_cfg(tiny_cfg, face_shards, "joint", "model.backbone_dtype=bf16", "trainer.precision=bf16-mixed"))
    assert cache_info(half.backbone, half.cfg) == cache_info(module.backbone, cfg)
    # a rerun keeps finished shards, and must be the same setup; an unfinished cache is refused for training
    assert precompute(cfg, str(tmp_path / "pre"))["skipped_shards"] == 3
    with pytest.raises(ValueError, match="dtype: 'fp32' vs now 'fp16'"):
        precompute(cfg, str(tmp_path / "pre"), dtype="fp16")
    import json

    info = json.loads((tmp_path / "pre" / "precomputed.json").read_text())
    (tmp_path / "pre" / "precomputed.json").write_text(json.dumps({**info, "complete": False}))
    with pytest.raises(ValueError, match="did not finish; run it again"):
        dm.setup("fit")
    (tmp_path / "pre" / "precomputed.json").write_text(json.dumps(info))
    # a cache made for another resolution is refused by name
    other = build_module(_cfg(tiny_cfg, face_shards, "joint", "data.resolution=32", "model.local.latent_size=8",
                              f"data.precomputed={tmp_path / 'pre'}"))
    dm = build_datamodule(other.cfg, other)
    with pytest.raises(ValueError, match="resolution: cache 64 vs now 32"):
        dm.setup("fit")
