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
    assert res["val_loss_first_step"] == 0 and res["val_loss_last_step"] == 6  # held-out loss before training and at the end
    assert res["id_use_step"] == 6 and res["id_use_face_mse_own"] > 0  # identity use: 2 validation samples, 2 identities
    from realisid.machine import describe_machine
    from realisid.train import run_result

    assert run_result(run)["machine"] == describe_machine(host=False) and "kernels)" in res["machine"]  # what it was trained on
    ckpt = torch.load(os.path.join(run, "checkpoints/last.ckpt"), map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    assert not any(k.startswith("backbone.") for k in ckpt["state_dict"])  # frozen weights stay out of checkpoints
    # the export is a plain diffusers ControlNet folder
    assert isinstance(ControlNetModel.from_pretrained(os.path.join(run, "export/local")), ControlNetModel)

    # reload the export: same branch outputs and the same sample as the module that trained it
    from realisid.modules import build_module

    module = build_module(cfg)
    state = {k: v for k, v in ckpt["state_dict"].items()}
    result = module.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert result.missing_keys and all(k.startswith(("backbone.", "id_encoder.")) for k in result.missing_keys)  # only frozen parts
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


def test_held_out_loss_before_training_uses_the_validation_noise(tiny_cfg, face_shards, tmp_path):
    """With a learning rate of 0 the weights never move, so the step-0 held-out loss (computed by the callback
    before training) must equal the one Lightning's validation reports at the end: same batches, same noise."""
    from realisid.train import train

    cfg = tiny_cfg("local_branch", f"data.train_shards={face_shards}/train-*.tar", f"data.val_shards={face_shards}/val-*.tar",
                   "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=4", "data.val_samples=3",
                   "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.checkpoint_every_n_steps=2",
                   "trainer.enable_progress_bar=false", "validation.num_images=0", "optim.lr=0", f"experiment.runs_dir={tmp_path}/runs")
    res = train(cfg)
    assert (res["val_loss_first_step"], res["val_loss_last_step"]) == (0, 2)
    assert res["val_loss_first"] == pytest.approx(res["val_loss_last"], rel=1e-5, abs=1e-7)
    assert res["val_loss_first"] > 0


def _step_batch(module, shards, n=2, precomputed=True):
    """A batch as the training step sees it; ``precomputed``: latents, text embeddings and identity features
    from the cache's keys (so the frozen encoders do not run) and the crop boxes as a host list."""
    from realisid.data.batch import collate
    from realisid.data.example import ExampleMaker
    from realisid.data.stream import load_examples
    from realisid.modules.branch_module import HOST_BOXES

    c = module.cfg
    maker = ExampleMaker(resolution=int(c.data.resolution), vae_scale_factor=module.backbone.vae_scale_factor,
                         local_latent_size=int(c.model.local.latent_size), crop_expand=float(c.model.local.crop_expand),
                         id_image_size=int(c.model.id_encoder.image_size))
    batch = collate(load_examples([str(shards / "train-000000.tar")], maker, n))
    if precomputed:
        with torch.no_grad():
            batch["latent_moments"] = module.backbone.latent_moments(batch.pop("image"))
            batch["text_embeds"] = module.backbone.text_embeddings(batch["caption"])[0]
            batch["text_embeds_no_identity"] = module.backbone.text_embeddings(batch["caption_no_identity"])[0]
            batch["id_features"] = module.id_encoder(batch["id_image"], batch["id_mask"])
        batch[HOST_BOXES] = batch["crop_box"].tolist()
    return batch


def test_half_precision_noising_is_computed_in_fp32(tiny_cfg, face_shards, monkeypatch):
    """Issue 11, defect 1: with a bf16 backbone, x_t and the target are computed in fp32 and only then cast.
    At t = 0 bf16 rounds 1 - alpha_bar to 0, so x_t came out as the clean latent (no noise at all)."""
    from realisid.modules import build_module
    from realisid.modules.losses import diffusion_inputs

    module = build_module(tiny_cfg("local_branch", "model.backbone_dtype=bf16", "trainer.precision=bf16-mixed"))
    batch = _step_batch(module, face_shards)
    seen = {}
    unet_forward = module.backbone.unet.forward
    monkeypatch.setattr(module.backbone.unet, "forward", lambda x, t, *a, **k: (seen.update(x=x, t=t), unet_forward(x, t, *a, **k))[1])
    moments = module.backbone.latents_from_moments
    monkeypatch.setattr(module.backbone, "latents_from_moments", lambda *a, **k: seen.setdefault("z", moments(*a, **k)))
    real_randint = torch.randint
    monkeypatch.setattr(torch, "randint", lambda low, high, size, **k: torch.zeros(size, dtype=torch.long, device=k.get("device")))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module.shared_step(batch, generator=torch.Generator().manual_seed(0), dropout=False)
    monkeypatch.setattr(torch, "randint", real_randint)
    assert seen["x"].dtype == torch.bfloat16 and (seen["t"] == 0).all()
    a0 = float(module.alphas_cumprod[0])
    spread = (seen["x"].float() - a0 ** 0.5 * seen["z"].float()).std().item()
    assert 0.6 * (1 - a0) ** 0.5 < spread < 1.6 * (1 - a0) ** 0.5, spread  # noise at scale sqrt(1 - a_0) = 0.029, not 0
    # the pure function: every timestep's noise scale within 0.1% of float64 for bf16 inputs
    z, eps = torch.randn(1000, 4, 2, 2).to(torch.bfloat16), torch.randn(1000, 4, 2, 2)
    t = torch.arange(1000)
    noisy, target = diffusion_inputs(module.alphas_cumprod, z, eps, t, "v_prediction")
    acp = module.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    want = acp.sqrt() * z.double() + (1 - acp).sqrt() * eps.double()
    assert noisy.dtype == target.dtype == torch.float32
    torch.testing.assert_close(noisy.double(), want, rtol=1e-5, atol=1e-5)


def test_step_seeds_are_distinct_over_ranks_steps_and_micro_batches():
    """Issue 11, defect 12: with 8+ ranks and gradient accumulation the per-step RNG keys collided
    ((seed * a + step * 131 + micro) * 7 + rank: rank 7 of micro-batch 0 = rank 0 of micro-batch 1)."""
    from realisid.modules.branch_module import step_seed

    keys = {(s, m, r): step_seed(0, s, m, r) for s in range(40) for m in range(8) for r in range(64)}
    assert len(set(keys.values())) == len(keys)
    assert step_seed(0, 3, 1, 2) == step_seed(0, 3, 1, 2) and step_seed(1, 3, 1, 2) != step_seed(0, 3, 1, 2)
    assert all(0 <= k < 2**63 for k in keys.values())


def test_precomputed_training_step_reads_nothing_back_from_the_device(tiny_cfg, face_shards, monkeypatch):
    """Issue 11, defect 14: a training step on a precomputed batch makes no host-device sync (no .item(),
    .tolist(), .cpu(), bool() of a tensor, ...), so it can be compiled and never stalls a GPU. Counted on CPU
    by patching the Tensor methods that read values back."""
    from realisid.modules import build_module

    from conftest import record_host_reads

    module = build_module(tiny_cfg("joint", "data.identity_free_captions=0.5"))
    batch = _step_batch(module, face_shards)
    calls = record_host_reads(monkeypatch)
    out = module.shared_step(batch, generator=torch.Generator().manual_seed(0))
    monkeypatch.undo()
    assert calls == [], calls
    assert torch.isfinite(out["loss"])


def test_overfitting_one_batch_drives_the_loss_down(tiny_cfg, face_shards):
    """The whole trainable path learns: 60 optimizer steps on one repeated batch (same noise and timesteps each
    step) bring the loss far below where it started."""
    from realisid.modules import build_module

    module = build_module(tiny_cfg("joint", "optim.lr=1e-3", "optim.warmup_steps=1"))
    batch = _step_batch(module, face_shards, n=2, precomputed=False)
    opt = module.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(60):
        loss = module.shared_step(batch, generator=torch.Generator().manual_seed(0), dropout=False)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_face_weighted_loss_exact_numbers():
    """loss = mean(err) + lambda * mean(err * mask^2), with fractional mask coverage at the box border."""
    from realisid.modules.losses import face_weighted_mse, latent_mask

    pred, target = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 2.0], [3.0, 0.0]]]])
    mask = torch.tensor([[[[1.0, 0.5], [0.0, 0.0]]]])
    loss, full, face = face_weighted_mse(pred, target, mask, 2.0)
    assert full.item() == (1 + 4 + 9 + 0) / 4  # 3.5
    assert face.item() == (1 * 1 + 4 * 0.25) / 4  # 0.5
    assert loss.item() == 3.5 + 2.0 * 0.5
    # the location map (1 inside the face box) to latent resolution: area coverage of each latent pixel
    loc = torch.zeros(1, 1, 8, 8)
    loc[..., 0:4, 0:6] = 1.0
    m = latent_mask(loc, (2, 2))
    torch.testing.assert_close(m, torch.tensor([[[[1.0, 0.5], [0.0, 0.0]]]]))


def test_face_norm_face_weighs_every_face_size_the_same():
    """face_norm=face: the face term is each face's own mean error, so a small and a large face with the same error
    weigh the same; face_norm=image (the paper's) weighs them by their area. A bad value names the key."""
    from realisid.modules.losses import DiffusionLoss, face_weighted_mse

    pred = torch.zeros(3, 2, 4, 4)
    target = torch.full((3, 2, 4, 4), 2.0)            # error 4 everywhere
    mask = torch.zeros(3, 1, 4, 4)
    mask[0, 0, 0, 0] = 0.5                            # a face covering a quarter of one latent pixel
    mask[1, 0, :2, :3] = 1.0                          # a 2x3-pixel face; sample 2 has no face and adds 0
    _, _, face = face_weighted_mse(pred[:2], target[:2], mask[:2], 3.0, "face")
    assert face.item() == 4.0                         # both faces: mean error 4
    loss, full, face = face_weighted_mse(pred, target, mask, 3.0, "face")
    assert full.item() == 4.0 and face.item() == pytest.approx(8.0 / 3) and loss.item() == pytest.approx(4.0 + 3.0 * 8.0 / 3)
    _, _, small = face_weighted_mse(pred[:1], target[:1], mask[:1], 3.0, "image")
    _, _, large = face_weighted_mse(pred[1:2], target[1:2], mask[1:2], 3.0, "image")
    assert large.item() / small.item() == 6.0 / 0.25   # by area (mask^2)
    with pytest.raises(ValueError, match="model.loss.face_norm='area'.*image"):
        face_weighted_mse(pred, target, mask, 3.0, "area")
    with pytest.raises(ValueError, match="model.loss.face_norm"):
        DiffusionLoss(1000, "epsilon", 1.0, "area")


def test_dropout_masks_are_disjoint_with_the_configured_rates(tiny_cfg):
    """CFG dropout per sample: identity only, text only, or both, never overlapping, at the configured rates."""
    from realisid.modules import build_module

    module = build_module(tiny_cfg("local_branch", "model.dropout.image=0.1", "model.dropout.text=0.2", "model.dropout.both=0.3"))
    keep_text, keep_id = module.conditioner.dropout_masks(20000, torch.Generator().manual_seed(0))
    only_id, only_text, both = keep_text & ~keep_id, ~keep_text & keep_id, ~keep_text & ~keep_id
    for part, rate in ((only_id, 0.1), (only_text, 0.2), (both, 0.3), (keep_text & keep_id, 0.4)):
        assert abs(part.float().mean().item() - rate) < 0.015, (rate, part.float().mean().item())
    # what a dropped sample receives: null identity tokens (zeros) and the empty prompt's embeddings
    tokens = module.conditioner.identity_tokens({"id_image": torch.zeros(2, 3, 32, 32), "id_mask": torch.ones(2, 1, 32, 32)},
                                    keep=torch.tensor([True, False]))
    assert tokens[1].abs().max() == 0 and tokens[0].abs().max() > 0


def test_a_checkpoint_with_nonfinite_weights_is_refused(tiny_cfg):
    """on_save_checkpoint refuses NaN weights, naming the parameter, so a bad checkpoint never replaces a good one."""
    import pytest

    from realisid.modules import build_module

    module = build_module(tiny_cfg("local_branch"))
    sd = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(sd)  # finite: accepted, frozen weights dropped
    assert sd["state_dict"] and not any(k.startswith(("backbone.", "id_encoder.")) for k in sd["state_dict"])
    name, p = next(iter(module.local_branch.named_parameters()))
    with torch.no_grad():
        p.view(-1)[0] = float("nan")
    with pytest.raises(FloatingPointError, match=f"local.{name} has NaN/Inf weights; the previous checkpoint is kept"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})


def test_face_norm_reaches_the_loss_and_old_runs_keep_the_papers_term(tiny_cfg):
    """The configured face_norm is the one the module trains with; a run's config.yaml saved before the key existed
    (trained with the paper's term) builds with face_norm=image, not with today's default."""
    from omegaconf import OmegaConf

    from realisid.modules import build_module

    cfg = tiny_cfg("local_branch", "model.loss.face_norm=face")
    assert build_module(cfg).loss_fn.face_norm == "face"
    old = OmegaConf.create(OmegaConf.to_container(cfg))
    del old.model.loss["face_norm"]
    assert build_module(old).loss_fn.face_norm == "image"


@pytest.mark.slow
def test_unet_train_trains_checkpoints_exports_and_samples_with_the_trained_unet(tiny_cfg, face_shards, tmp_path):
    """model.unet_train: the named UNet parameters (and only they) move, are kept in the checkpoint, exported as a
    diffusers UNet folder, and the pipeline loaded from the export samples with them (as the module did)."""
    from diffusers import UNet2DConditionModel

    from realisid.models.backbone import load_backbone
    from realisid.modules import build_module
    from realisid.pipeline import Person, RealisIDPipeline
    from realisid.train import train

    cfg = tiny_cfg("joint", f"data.train_shards={face_shards}/train-*.tar", f"data.val_shards={face_shards}/val-*.tar",
                   "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=4", "data.val_samples=2",
                   "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.checkpoint_every_n_steps=3",
                   "trainer.enable_progress_bar=false", "validation.num_images=0", "evaluation.every_n_validations=0",
                   "model.unet_train=[up_blocks.0]", "optim.unet_lr=1e-2", f"experiment.runs_dir={tmp_path}/runs")
    run = train(cfg)["run_dir"]
    ckpt = torch.load(os.path.join(run, "checkpoints/last.ckpt"), map_location="cpu", weights_only=False)
    kept = [k for k in ckpt["state_dict"] if k.startswith("backbone.")]
    assert kept and all(k.startswith("backbone.unet.up_blocks.0.") for k in kept)
    base = load_backbone(cfg.model, seed=cfg.experiment.seed).unet.state_dict()
    moved = {k for k in kept if not torch.equal(ckpt["state_dict"][k], base[k.removeprefix("backbone.unet.")])}
    assert moved, "no trained UNet weight moved"
    unet = UNet2DConditionModel.from_pretrained(os.path.join(run, "export/unet"))  # a plain diffusers UNet
    for k, v in unet.state_dict().items():  # the trained block as checkpointed, everything else the base's
        torch.testing.assert_close(v, ckpt["state_dict"].get("backbone.unet." + k, base[k]), rtol=0, atol=0)

    module = build_module(cfg)
    module.load_state_dict(ckpt["state_dict"], strict=False)
    module.eval()
    pipe_a = RealisIDPipeline.from_module(module)
    pipe_b = RealisIDPipeline.from_export(os.path.join(run, "export"))
    assert pipe_b.backbone.unet_trained_by == os.path.join(run, "export", "unet")
    shared = load_backbone(cfg.model, seed=cfg.experiment.seed)
    with pytest.raises(ValueError, match=r"holds a trained base UNet \(unet/, from model.unet_train=\['up_blocks.0'\]\).*without backbone="):
        RealisIDPipeline.from_export(os.path.join(run, "export"), backbone=shared)
    assert shared.unet_trained_by is None  # the caller's backbone is left as it was
    person = Person(box=(8, 8, 40, 40), id_image=torch.zeros(3, 32, 32))
    ia = pipe_a("a photo", [person], num_inference_steps=3, seed=1, output_type="pt").images
    ib = pipe_b("a photo", [person], num_inference_steps=3, seed=1, output_type="pt").images
    torch.testing.assert_close(ia, ib, rtol=0, atol=1e-5)
    pipe_b.backbone = load_backbone(cfg.model, seed=cfg.experiment.seed)  # the same branches on the frozen base
    ic = pipe_b("a photo", [person], num_inference_steps=3, seed=1, output_type="pt").images
    assert (ia - ic).abs().max() > 1e-4  # the trained UNet draws differently from the frozen base


def test_a_resumed_run_records_each_machine_it_trained_on():
    from realisid.train import machine_history

    a, b = "x86_64 2 CPUs (AMD EPYC, AVX2 kernels), torch 2.14.1", "x86_64 2 CPUs (Xeon, AVX512 kernels), torch 2.14.1"
    assert machine_history(None, a) == a and machine_history(a, a) == a
    assert machine_history(a, b) == f"{a}; then {b}"
    assert machine_history(f"{a}; then {b}", b) == f"{a}; then {b}"  # resumed again on the same machine
    assert machine_history(f"{a}; then {b}", a) == f"{a}; then {b}; then {a}"
