"""The training module's parts: Conditioner, DiffusionLoss and WeightEMA (on diffusers' EMAModel).

The references below are verbatim copies of the step and the conditioning methods as they were inline in
RealisIDModule before the split (``self`` -> ``m``, the null-text cache dropped): the step must give
bit-identical results, and the module's state-dict keys must be the parts' own.
"""
import pytest
import torch

from conftest import RANDOM_TINY, write_face_shards

# ---- the old inline code, kept as the reference ------------------------------------------------------------


def _old_identity_features(m, batch):
    feats = batch.get("id_features")
    if feats is not None:
        return feats.to(m.device)
    emb = batch.get("id_embed")
    if (emb is not None and emb.numel() and not m.id_encoder.sequence and bool(batch["has_id_embed"].all())
            and emb.shape[-1] == m.id_encoder.embed_dim):
        return emb.to(m.device)
    if batch.get("id_kps") is not None:
        return m.id_encoder(batch["id_image"], batch["id_mask"], kps=batch["id_kps"])
    return m.id_encoder(batch["id_image"], batch["id_mask"])


def _old_identity_tokens(m, batch, keep=None):
    tokens = m.projector(_old_identity_features(m, batch).to(m.dtype))
    if keep is not None:
        tokens = tokens * keep.to(tokens.dtype)[:, None, None]
    return tokens


def _old_dropout_masks(m, n, generator=None):
    d = m.cfg.model.dropout
    u = torch.rand(n, generator=generator, device="cpu")
    drop_id = u < d.image
    drop_text = (u >= d.image) & (u < d.image + d.text)
    both = (u >= d.image + d.text) & (u < d.image + d.text + d.both)
    return ~(drop_text | both), ~(drop_id | both)


def _old_null_text(m):
    e, p = m.backbone.text_embeddings([""])
    return (e.to(m.device), p.to(m.device) if p is not None else None)


def _old_identity_free_mask(m, n, generator=None):
    p = float(m.cfg.data.identity_free_captions)
    return torch.rand(n, generator=generator, device="cpu") < p if p > 0 else torch.zeros(n, dtype=torch.bool)


def _old_text_conditioning(m, batch, keep_text, image_hw, free=None):
    training_free = free is not None
    free = free if free is not None else torch.zeros(len(keep_text), dtype=torch.bool)
    if "text_embeds" not in batch:
        caps = [(f if use_free else c) if k else "" for c, f, k, use_free in
                zip(batch["caption"], batch.get("caption_no_identity", batch["caption"]), keep_text.tolist(), free.tolist())]
        return m.backbone.encode_text(caps, image_hw, batch.get("original_size"), batch.get("crop_top_left"))
    embeds, pooled = batch["text_embeds"].to(m.device), batch.get("text_pooled")
    pooled = pooled.to(m.device) if pooled is not None else None
    if training_free and float(m.cfg.data.identity_free_captions) > 0 or "text_embeds_no_identity" in batch:
        use = free.to(m.device)
        embeds = torch.where(use[:, None, None], batch["text_embeds_no_identity"].to(m.device, embeds.dtype), embeds)
        if pooled is not None:
            pooled = torch.where(use[:, None], batch["text_pooled_no_identity"].to(m.device, pooled.dtype), pooled)
    null_e, null_p = _old_null_text(m)
    drop = (~keep_text).to(m.device)
    embeds = torch.where(drop[:, None, None], null_e.to(embeds.dtype), embeds)
    if pooled is not None:
        pooled = torch.where(drop[:, None], null_p.to(pooled.dtype), pooled)
    return m.backbone.conditioning(embeds, pooled, image_hw, batch.get("original_size"), batch.get("crop_top_left"))


def _old_shared_step(m, batch, generator=None, dropout=True):
    from realisid.modules.branch_module import _device_gen
    from realisid.modules.losses import diffusion_inputs, face_weighted_mse, latent_mask

    n = len(batch["caption"])
    device_gen = _device_gen(generator, m.device)
    if "latent_moments" in batch:
        latents = m.backbone.latents_from_moments(batch["latent_moments"], device_gen)
    else:
        latents = m.backbone.encode_images(batch["image"], generator=device_gen)
    noise = torch.randn(latents.shape, generator=device_gen, device=m.device, dtype=torch.float32)
    t = torch.randint(0, m.noise_scheduler.config.num_train_timesteps, (n,), generator=device_gen, device=m.device)
    noisy, target = diffusion_inputs(m.alphas_cumprod, latents, noise, t, m.noise_scheduler.config.prediction_type)
    noisy = noisy.to(m.backbone.unet.dtype)
    if m.channels_last:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    keep_text, keep_id = _old_dropout_masks(m, n, generator) if dropout else (torch.ones(n, dtype=torch.bool),) * 2
    free = _old_identity_free_mask(m, n, generator) if dropout else None
    image_hw = tuple(s * m.backbone.vae_scale_factor for s in latents.shape[-2:])
    text = _old_text_conditioning(m, batch, keep_text, image_hw, free)
    tokens = _old_identity_tokens(m, batch, keep_id.to(m.device))
    res = m.branch_residuals(noisy, t, tokens, batch, text.added_cond_kwargs)
    pred = m.backbone.unet(noisy, t, encoder_hidden_states=text.embeds, added_cond_kwargs=text.added_cond_kwargs,
                           down_block_additional_residuals=res[0] if res else None,
                           mid_block_additional_residual=res[1] if res else None, return_dict=False)[0]
    mask = latent_mask(batch["loc_map"], tuple(latents.shape[-2:]))
    loss, full, face = face_weighted_mse(pred, target, mask, float(m.cfg.model.loss.face_lambda), m.cfg.model.loss.face_norm)
    if m.cfg.model.loss.face_norm == "image":
        return {"loss": loss, "mse": full, "face_mse": face}
    return {"loss": loss, "mse": full, "face_mse": face_weighted_mse(pred, target, mask, 0.0, "image")[2], "face_mse_per_face": face}


# ---- fixtures ------------------------------------------------------------------------------------------------

DROPOUTS = ["data.identity_free_captions=0.5", "model.dropout.image=0.2", "model.dropout.text=0.2", "model.dropout.both=0.2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    write_face_shards(root, "train", n=4)
    return root


@pytest.fixture(scope="module")
def joint(shards):
    """A tiny joint module with every dropout on, and a precomputed and a live batch for it."""
    from realisid.config import load_config
    from realisid.modules import build_module

    torch.manual_seed(0)
    module = build_module(load_config("joint", RANDOM_TINY + DROPOUTS))
    return module, _batch(module, shards, precomputed=True), _batch(module, shards, precomputed=False)


def _batch(module, shards, precomputed):
    from realisid.data.batch import collate
    from realisid.data.example import ExampleMaker
    from realisid.data.stream import load_examples
    from realisid.modules.branch_module import HOST_BOXES

    c = module.cfg
    maker = ExampleMaker(resolution=int(c.data.resolution), vae_scale_factor=module.backbone.vae_scale_factor,
                         local_latent_size=int(c.model.local.latent_size), crop_expand=float(c.model.local.crop_expand),
                         id_image_size=int(c.model.id_encoder.image_size))
    batch = collate(load_examples([str(shards / "train-000000.tar")], maker, 2))
    if precomputed:
        with torch.no_grad():
            batch["latent_moments"] = module.backbone.latent_moments(batch.pop("image"))
            for key, caps in (("", batch["caption"]), ("_no_identity", batch["caption_no_identity"])):
                embeds, pooled = module.backbone.text_embeddings(caps)
                batch["text_embeds" + key] = embeds
                if pooled is not None:
                    batch["text_pooled" + key] = pooled
            batch["id_features"] = module.id_encoder(batch["id_image"], batch["id_mask"])
        batch[HOST_BOXES] = batch["crop_box"].tolist()
    return batch


def _equal(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _equal(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _equal(x, y)
    else:
        assert a == b


# ---- the step and its parts ------------------------------------------------------------------------------------


def test_other_identity_order_pairs_each_sample_with_another_identity():
    from realisid.modules.conditioner import other_identity_order

    assert other_identity_order(["a", "b", "c"]) == [1, 2, 0]
    assert other_identity_order(["a", "a", "b"]) == [2, 2, 0]
    assert other_identity_order(["a", "a"]) is None and other_identity_order([]) is None


def test_identity_use_compares_the_own_and_another_identitys_reference(joint):
    from realisid.modules.conditioner import other_identity_order, with_references_of

    module, _, live = joint
    order = other_identity_order(live["identity"])
    assert order is not None and all(live["identity"][i] != live["identity"][j] for i, j in enumerate(order))
    swapped = with_references_of(live, order)
    assert torch.equal(swapped["id_image"], live["id_image"][order]) and swapped["id_kps"].shape == live["id_kps"].shape
    assert swapped["image"] is live["image"] and swapped["caption"] is live["caption"]  # only the references move
    state = {k: v.clone() for k, v in module.state_dict().items()}
    try:
        with torch.no_grad():
            before = module.identity_use(live, 0)
            # the branches' zero convolutions add nothing at the start, so the reference cannot matter yet
            assert before["face_mse_own_ref"] == before["face_mse_other_ref"]
            for name, p in module.named_parameters():
                if "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
                    p.normal_(0.0, 0.05)
            after = module.identity_use(live, 0)
    finally:
        module.load_state_dict(state)
    assert after["face_mse_own_ref"] != after["face_mse_other_ref"]  # now the swapped reference reaches the face loss


@pytest.mark.parametrize("precomputed", [True, False])
def test_shared_step_is_bit_identical_to_the_old_inline_step(joint, precomputed):
    module, pre, live = joint
    batch = pre if precomputed else live
    with torch.no_grad():
        for seed, dropout in ((0, True), (1, True), (2, True), (3, False)):
            new = module.shared_step(batch, generator=torch.Generator().manual_seed(seed), dropout=dropout)
            old = _old_shared_step(module, batch, generator=torch.Generator().manual_seed(seed), dropout=dropout)
            _equal(new, old)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_draws_and_scores_as_the_old_step(prediction_type):
    from realisid.modules.losses import DiffusionLoss, diffusion_inputs, face_weighted_mse, latent_mask

    acp = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 1000), 0)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    loss_fn = DiffusionLoss(1000, prediction_type, 2.5)
    got = loss_fn.inputs(latents, acp, torch.Generator().manual_seed(7), "cpu")
    g = torch.Generator().manual_seed(7)  # the old step: noise first, then timesteps, from the device generator
    noise = torch.randn(latents.shape, generator=g, device="cpu", dtype=torch.float32)
    t = torch.randint(0, 1000, (3,), generator=g, device="cpu")
    noisy, target = diffusion_inputs(acp, latents, noise, t, prediction_type)
    _equal(tuple(got), (noise, t, noisy, target))
    assert got.noisy.dtype == got.target.dtype == torch.float32
    pred, loc = torch.randn(3, 4, 8, 8), (torch.rand(3, 1, 32, 32) > 0.5).float()
    want = face_weighted_mse(pred, target, latent_mask(loc, (8, 8)), 2.5)
    _equal(loss_fn(pred, got.target, loc), dict(zip(("loss", "mse", "face_mse"), want)))
    # face_norm=face trains on each face's own mean; face_mse stays the paper's term (logged, compared across runs)
    by_face = DiffusionLoss(1000, prediction_type, 2.5, "face")(pred, got.target, loc)
    loss, full, per_face = face_weighted_mse(pred, target, latent_mask(loc, (8, 8)), 2.5, "face")
    _equal(by_face, {"loss": loss, "mse": full, "face_mse": want[2], "face_mse_per_face": per_face})
    assert not torch.equal(per_face, want[2])


def test_diffusion_loss_timestep_shift_moves_training_toward_high_noise():
    """model.loss.timestep_shift: 1 draws as before (the test above); 3 puts 3/4 of the timesteps in the noisier half,
    with the same noise; a shift <= 0 is refused naming the key."""
    from realisid.modules.losses import DiffusionLoss

    acp = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 1000), 0)
    latents = torch.zeros(20000, 1, 1, 1)
    uniform = DiffusionLoss(1000, "epsilon", 1.0).inputs(latents, acp, torch.Generator().manual_seed(3), "cpu")
    shifted = DiffusionLoss(1000, "epsilon", 1.0, timestep_shift=3.0).inputs(latents, acp, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(uniform.noise, shifted.noise)
    assert abs(float((uniform.timesteps >= 500).float().mean()) - 0.5) < 0.02
    assert abs(float((shifted.timesteps >= 500).float().mean()) - 0.75) < 0.02
    assert 0 <= int(shifted.timesteps.min()) and int(shifted.timesteps.max()) <= 999
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="model.loss.timestep_shift"):
            DiffusionLoss(1000, "epsilon", 1.0, timestep_shift=bad)


def test_held_out_loss_draws_uniform_timesteps_whatever_the_training_shift(joint):
    """Held-out losses (and the identity use built on them) compare across runs trained with different shifts; the
    training step's draws do move with the shift."""
    module, pre, _ = joint
    assert module.loss_fn.timestep_shift == 1.0
    with torch.no_grad():
        held, train = module.held_out_loss(pre, 0), module.shared_step(pre, torch.Generator().manual_seed(5))
        module.loss_fn.timestep_shift = 3.0
        try:
            held3, train3 = module.held_out_loss(pre, 0), module.shared_step(pre, torch.Generator().manual_seed(5))
        finally:
            module.loss_fn.timestep_shift = 1.0
    _equal(held, held3)
    assert not torch.equal(train["loss"], train3["loss"])


def test_module_trains_with_the_configured_timestep_shift(tiny_cfg):
    from realisid.modules import build_module

    assert build_module(tiny_cfg("joint")).loss_fn.timestep_shift == 1.0
    assert build_module(tiny_cfg("joint", "model.loss.timestep_shift=3")).loss_fn.timestep_shift == 3.0
    with pytest.raises(ValueError, match="timestep shift 0.0"):
        build_module(tiny_cfg("joint", "model.loss.timestep_shift=0"))


def test_conditioner_gives_what_the_old_methods_gave(joint):
    module, pre, live = joint
    cond = module.conditioner
    for name in ("pre", "live"):
        batch = pre if name == "pre" else live
        with torch.no_grad():
            g_new, g_old = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
            masks = cond.dropout_masks(64, g_new)
            _equal(masks, _old_dropout_masks(module, 64, g_old))
            _equal(cond.identity_free_mask(64, g_new), _old_identity_free_mask(module, 64, g_old))
            _equal(cond.dropout_masks(8, g_new), _old_dropout_masks(module, 8, g_old))
            _equal(cond.identity_features(batch), _old_identity_features(module, batch))
            for keep in (None, torch.tensor([True, False]), torch.tensor([False, True])):
                _equal(cond.identity_tokens(batch, keep), _old_identity_tokens(module, batch, keep))
            for keep in (torch.tensor([True, True]), torch.tensor([True, False]), torch.tensor([False, True])):
                for free in (None, torch.tensor([True, False]), torch.tensor([False, True])):
                    new, old = cond.text_conditioning(batch, keep, (64, 64), free), _old_text_conditioning(module, batch, keep, (64, 64), free)
                    _equal((new.embeds, new.added_cond_kwargs), (old.embeds, old.added_cond_kwargs))
            _equal(cond.null_text(), _old_null_text(module))
            assert cond.null_text() is cond.null_text()  # computed once, then cached


def test_sdxl_conditioning_with_pooled_embeddings_matches(tmp_path, shards):
    """The SDXL layout's pooled embeddings and time ids (precomputed and live) through both paths."""
    from test_backbone import _save_sdxl

    from realisid.config import load_config
    from realisid.modules import build_module

    _save_sdxl(str(tmp_path / "sdxl"))
    torch.manual_seed(0)
    module = build_module(load_config("joint", RANDOM_TINY + DROPOUTS + [f"model.pretrained={tmp_path / 'sdxl'}"]))
    for batch in (_batch(module, shards, True), _batch(module, shards, False)):
        assert ("text_pooled" in batch) == ("latent_moments" in batch)
        with torch.no_grad():
            for seed in (0, 1, 2):
                _equal(module.shared_step(batch, torch.Generator().manual_seed(seed)),
                       _old_shared_step(module, batch, torch.Generator().manual_seed(seed)))
            keep, free = torch.tensor([False, True]), torch.tensor([True, False])
            new, old = module.conditioner.text_conditioning(batch, keep, (64, 64), free), _old_text_conditioning(module, batch, keep, (64, 64), free)
            _equal((new.embeds, new.added_cond_kwargs), (old.embeds, old.added_cond_kwargs))


@pytest.mark.parametrize("exp,parts", [("local_branch", {"local_branch"}), ("global_branch", {"global_branch"}),
                                       ("joint", {"local_branch", "global_branch"})])
def test_state_dict_keys_are_the_parts_own(exp, parts):
    """The conditioner and the loss are plain objects: no ``conditioner.`` / ``loss_fn.`` keys, the projector and
    the branches where they were, so checkpoints of before load and write the same keys."""
    from realisid.config import load_config
    from realisid.modules import build_module
    from realisid.modules.conditioner import Conditioner

    module = build_module(load_config(exp, RANDOM_TINY + ["efficiency.ema.enabled=true"]))
    assert not isinstance(module.conditioner, torch.nn.Module) and not isinstance(module.loss_fn, torch.nn.Module)
    assert isinstance(module.conditioner, Conditioner) and module.conditioner.owner is module
    children = dict(module.named_children())
    assert set(children) == {"backbone", "id_encoder", "projector"} | parts
    keys = sorted(module.state_dict())
    assert keys == sorted(f"{name}.{k}" for name, child in children.items() for k in child.state_dict())
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    trainable = {"projector"} | parts
    assert sorted(ckpt["state_dict"]) == [k for k in keys if k.split(".", 1)[0] in trainable]
    prefix = {"projector": "projector.", "local_branch": "local.", "global_branch": "global."}
    assert sorted(ckpt["realisid_ema"]["shadow"]) == sorted(prefix[k.split(".", 1)[0]] + k.split(".", 1)[1]
                                                             for k, p in module.named_parameters() if k.split(".", 1)[0] in trainable)
    # a checkpoint written before the split (the same keys) loads back, weights and average
    fresh = build_module(load_config(exp, RANDOM_TINY + ["efficiency.ema.enabled=true"]))
    result = fresh.load_state_dict(ckpt["state_dict"], strict=False)
    assert not result.unexpected_keys and all(k.startswith(("backbone.", "id_encoder.")) for k in result.missing_keys)
    fresh.on_load_checkpoint(ckpt)
    _equal(fresh.ema.state_dict(), ckpt["realisid_ema"])


# ---- EMA on diffusers' EMAModel --------------------------------------------------------------------------------


def test_ema_decay_schedule_is_exactly_the_old_one():
    from torch import nn

    from realisid.modules.ema import WeightEMA

    ema = WeightEMA({"m": nn.Linear(2, 2)}, decay=0.999)
    for n in [*range(2000), 10**5, 10**6]:
        ema.model.optimization_step = n
        assert ema.current_decay() == min(0.999, (1 + n) / (10 + n)), n
    ema.model.optimization_step = 0
    lin = nn.Linear(3, 2)
    ema, ref = WeightEMA({"m": lin}, decay=0.9), {k: p.detach().double().clone() for k, p in lin.named_parameters()}
    for n in range(30):  # the average against a float64 replay of the old update rule
        with torch.no_grad():
            for p in lin.parameters():
                p.add_(torch.randn_like(p))
        d = min(0.9, (1 + n) / (10 + n))
        assert ema.current_decay() == d
        ema.update()
        for k, p in lin.named_parameters():
            ref[k] = d * ref[k] + (1 - d) * p.detach().double()
    assert ema.updates == 30
    for k in ref:
        torch.testing.assert_close(ema.shadow[f"m.{k}"].double(), ref[k], rtol=1e-6, atol=1e-6)


def test_ema_shadow_stays_fp32_for_half_weights():
    from torch import nn

    from realisid.modules.ema import WeightEMA

    lin = nn.Linear(4, 4).to(torch.bfloat16)
    start = lin.weight.detach().clone()
    ema = WeightEMA({"m": lin}, decay=0.99)
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    _equal(ema.shadow["m.weight"], start.float())
    with torch.no_grad():
        lin.weight.add_(1.0)
    live = lin.weight.detach().clone()
    for _ in range(3):
        ema.update()
    assert ema.shadow["m.weight"].dtype == torch.float32 and not torch.equal(ema.shadow["m.weight"], live.float())
    with ema.averaged():
        assert lin.weight.dtype == torch.bfloat16
        _equal(lin.weight.detach(), ema.shadow["m.weight"].to(torch.bfloat16))
        with ema.averaged():  # nested: still averaged, and the outer exit restores
            pass
        _equal(ema.live_state({"m": "net."})["net.weight"], live)
    _equal(lin.weight.detach(), live)
    ema.swap_in()
    with pytest.raises(RuntimeError, match="swapped in"):
        ema.update()
    ema.swap_out()
    ema.swap_out()  # a second swap-out is a no-op
    _equal(lin.weight.detach(), live)


def test_ema_loads_the_old_format_and_diffusers_format():
    """``realisid_ema`` as written before EMAModel ({"decay", "updates", "shadow": {name: tensor}}), and
    EMAModel.state_dict()'s positional format; the configured decay is kept."""
    from torch import nn

    from realisid.modules.ema import WeightEMA

    mods = {"projector": nn.Linear(3, 2), "local": nn.Linear(2, 2, bias=False)}
    names = ["projector.weight", "projector.bias", "local.weight"]
    old = {"decay": 0.5, "updates": 7, "shadow": {k: torch.full(s, float(i), dtype=torch.float64)
                                                  for i, (k, s) in enumerate(zip(names, [(2, 3), (2,), (2, 2)]))}}
    ema = WeightEMA(mods, decay=0.9)
    ema.load_state_dict(old)
    assert ema.updates == 7 and ema.decay == 0.9 and ema.current_decay() == min(0.9, 8 / 17)
    for i, k in enumerate(names):
        _equal(ema.shadow[k], torch.full_like(old["shadow"][k], float(i), dtype=torch.float32))
    written = ema.state_dict()
    assert written.keys() == {"decay", "updates", "shadow"} and written["updates"] == 7 and list(written["shadow"]) == names
    other = WeightEMA(mods, decay=0.9)
    other.load_state_dict(ema.model.state_dict())  # EMAModel's own format
    _equal(other.state_dict(), written)
    with pytest.raises(KeyError, match="other branches"):
        WeightEMA({**mods, "global": nn.Linear(1, 1)}, decay=0.9).load_state_dict(old)
    with pytest.raises(KeyError, match="other branches"):
        WeightEMA({"projector": nn.Linear(3, 2)}, decay=0.9).load_state_dict(ema.model.state_dict())


def test_unet_train_selects_parameters_and_refuses_bad_values(tiny_cfg):
    from realisid.models.backbone import load_backbone
    from realisid.modules import build_module
    from realisid.modules.branch_module import unfreeze_unet

    frozen = build_module(tiny_cfg("joint"))
    assert "unet" not in frozen.trainable_modules() and not any(p.requires_grad for p in frozen.backbone.parameters())
    module = build_module(tiny_cfg("joint", "model.unet_train=[up_blocks.1, conv_out]", "optim.unet_lr=3e-5"))
    trained = {n for n, p in module.backbone.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("unet.up_blocks.1.", "unet.conv_out.")) for n in trained)
    assert any(n.startswith("unet.conv_out.") for n in trained)
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert [g["initial_lr"] for g in groups] == [module.cfg.optim.lr, 3e-5]  # before the warm-up factor
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in module.backbone.unet.parameters() if p.requires_grad}
    unet = load_backbone(tiny_cfg("joint").model).unet
    with pytest.raises(ValueError, match=r"no UNet parameter is named 'upblocks'.*top level: .*up_blocks"):
        unfreeze_unet(unet, ["upblocks"], "fp32")
    with pytest.raises(ValueError, match="model.backbone_dtype=fp16"):
        unfreeze_unet(unet, ["up_blocks"], "fp16")
    assert not any(p.requires_grad for p in unet.parameters())  # a refused value leaves the UNet frozen


def test_grid_identity_tokens_train_the_resampler_from_live_and_cached_features(shards, eval_standin):
    from realisid.config import load_config
    from realisid.modules import build_module

    torch.manual_seed(0)
    module = build_module(load_config("joint", RANDOM_TINY + ["model.id_encoder.kind=standin", f"model.id_encoder.path={eval_standin}",
                                                             "model.id_encoder.features=grid"]))
    assert module.projector.sequence and module.id_encoder.embed_dim == 64
    pre, live = _batch(module, shards, precomputed=True), _batch(module, shards, precomputed=False)
    assert pre["id_features"].shape == (len(live["caption"]), 17, 64)  # what `realisid precompute` caches for this config
    with torch.no_grad():
        torch.testing.assert_close(module.conditioner.identity_tokens(pre), module.conditioner.identity_tokens(live))
        for name, p in module.named_parameters():  # past the zero convolutions' start, where nothing reaches the UNet
            if "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
                p.normal_(0.0, 0.05)
    module.shared_step(live, generator=torch.Generator().manual_seed(0), dropout=False)["loss"].backward()
    grads = [p.grad for p in (module.projector.queries, module.projector.proj_in.weight)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # the reference's tokens reach the loss
