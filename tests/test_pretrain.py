"""The embedded default's own path on shrunk settings: `make pretrain` writes the stand-ins, preparation draws the
shards and checks them, training loads them by path (stand-in conditioning, synthetic analyzer metrics), the
export reloads and generates."""
import json
import os

import pytest
import torch


def _shrunk(tmp_path):
    syn = tmp_path / "synthetic"
    assets = tmp_path / "assets"
    return [f"prepare.synthetic.out_dir={syn}", "prepare.synthetic.num_identities=6", "prepare.synthetic.images_per_identity=6",
            "prepare.synthetic.val_identities=2", "prepare.synthetic.shard_size=16", "prepare.synthetic.ref_choices=2",
            "prepare.standin.steps=3", f"pretrain.out_dir={assets}", f"pretrain.work_dir={tmp_path / 'work'}", "pretrain.vae.steps=3",
            "pretrain.vae.batch_size=4", "pretrain.unet.steps=3", "pretrain.unet.batch_size=4", "pretrain.unet.checkpoint_every=2",
            "pretrain.unet_refine.steps=2", "pretrain.unet_refine.batch_size=4", "pretrain.unet_heads.steps=2", "pretrain.unet_heads.batch_size=4",
            "pretrain.unet_more.steps=2", "pretrain.unet_more.batch_size=4",
            "pretrain.detector.steps=3", "pretrain.detector.batch_size=4", "pretrain.detector.vae_copies=4", "pretrain.check.samples=2",
            "pretrain.check.steps=2", "pretrain.max_megabytes=40"], assets


@pytest.mark.slow
def test_pretrain_then_train_on_the_prepared_default(tmp_path):
    from realisid.config import load_config
    from realisid.embedded.assets import pretrained_record
    from realisid.embedded.pretrain import pretrain

    overrides, assets = _shrunk(tmp_path)
    rec = pretrain(load_config("base", overrides + ["pretrain.unet_more.steps=0"]))  # phase 4 below, from what shipped
    for name in ("tiny-sd/unet", "tiny-sd/vae", "tiny-sd/text_encoder", "tiny-sd/tokenizer", "standin-arcface", "standin-arcface-eval",
                 "synthetic-face-analyzer"):
        assert (assets / name).is_dir(), name
    assert (assets / "base_samples.png").exists()
    assert pretrained_record(str(assets)) == json.loads(json.dumps(rec))
    stages = {"vae", "unet", "unet_refine", "unet_heads", "standin-arcface", "standin-arcface-eval", "synthetic-face-analyzer"}
    assert set(rec["stages"]) == stages
    assert rec["stages"]["unet_refine"]["timestep_shift"] == 3.0 and rec["stages"]["unet_refine"]["unet_steps"] == 2
    assert rec["stages"]["unet_heads"]["face_weight"] == 4.0 and "face_weight" not in rec["stages"]["unet_refine"]
    want = "cuda" if torch.cuda.is_available() else "cpu"  # pretrain.device: auto
    assert rec["device"] == want and rec["stages"]["vae"]["device"] == want and rec["stages"]["unet_heads"]["device"] == want
    # what ships is the last phase's UNet; each phase started from the previous one's weights and moved away from them
    from safetensors.torch import load_file

    def weights(folder, part="unet"):
        name = "diffusion_pytorch_model.safetensors"
        return load_file(str(folder / part / name))

    shipped, phase1, refined, heads = (weights(d) for d in (assets / "tiny-sd", *(tmp_path / "work" / n for n in
                                                                                  ("tiny-sd", "tiny-sd-refined", "tiny-sd-heads"))))
    assert all(torch.equal(shipped[k], heads[k]) for k in heads)
    assert any(not torch.equal(phase1[k], refined[k]) for k in refined)
    assert any(not torch.equal(refined[k], heads[k]) for k in heads)

    # phase 4 from the shipped models in a fresh work folder: every shipped stage is taken over, only unet_more trains
    more_out, work2 = tmp_path / "assets-more", tmp_path / "work-more"
    cont_overrides = overrides + [f"pretrain.from_shipped={assets}", f"pretrain.work_dir={work2}", f"pretrain.out_dir={more_out}"]
    cont = pretrain(load_config("base", cont_overrides))
    assert set(cont["stages"]) == stages | {"unet_more"}
    assert all(cont["stages"][k].get("seeded_from") == str(assets) for k in stages)
    assert "seeded_from" not in cont["stages"]["unet_more"] and cont["stages"]["unet_more"]["unet_steps"] == 2
    assert not (work2 / "tiny-sd" / "unet").exists() and not (work2 / "tiny-sd-refined" / "unet").exists()  # records only
    assert (work2 / "vae" / "moments.pt").exists()
    more = weights(more_out / "tiny-sd")
    assert all(torch.equal(more[k], weights(work2 / "tiny-sd-more")[k]) for k in more)
    assert any(not torch.equal(heads[k], more[k]) for k in more)  # it trained on from the shipped heads phase
    vae_a, vae_b = weights(assets / "tiny-sd", "vae"), weights(more_out / "tiny-sd", "vae")
    assert all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a)
    # a further round of unet_more on that continued base (pretrain.extend): it starts from the continued weights
    again_out, work_again = tmp_path / "assets-again", tmp_path / "work-again"
    again_overrides = overrides + [f"pretrain.from_shipped={more_out}", f"pretrain.work_dir={work_again}", f"pretrain.out_dir={again_out}"]
    with pytest.raises(ValueError, match=r"pretrain.unet_more differs from the recipe the shipped stage 'unet_more'"):
        pretrain(load_config("base", again_overrides + ["pretrain.unet_more.steps=3"]))  # without extend: not a continuation
    ext = pretrain(load_config("base", again_overrides + ["pretrain.unet_more.steps=3", "pretrain.extend=true"]))
    assert ext["stages"]["unet_more"]["unet_steps"] == 3 and "seeded_from" not in ext["stages"]["unet_more"]
    assert ext["stages"]["unet_more"]["extends"] == {"base": str(more_out), "unet_more": json.loads(json.dumps(cont["stages"]["unet_more"]))}
    assert ext["stages"]["unet_heads"]["seeded_from"] == str(more_out) and "pretrain.extend" in ext["stages"]["unet_heads"]["weights"]
    start = weights(work_again / "tiny-sd-heads")
    assert all(torch.equal(start[k], more[k]) for k in more)  # the round started from the continued base, not its heads phase
    assert any(not torch.equal(more[k], weights(again_out / "tiny-sd")[k]) for k in more)
    with pytest.raises(ValueError, match=r"extend=true: the base in pretrain.from_shipped=.*assets ends with unet_heads, not a unet_more"):
        pretrain(load_config("base", cont_overrides + ["pretrain.extend=true", f"pretrain.work_dir={tmp_path / 'w8'}"]))
    with pytest.raises(ValueError, match=r"extend=true trains pretrain.unet_more once more .*unet_more.steps is 0"):
        pretrain(load_config("base", again_overrides + ["pretrain.extend=true", "pretrain.unet_more.steps=0", f"pretrain.work_dir={tmp_path / 'w9'}"]))
    with pytest.raises(ValueError, match=r"extend=true runs unet_more again .* give that base's folder as pretrain.from_shipped"):
        pretrain(load_config("base", overrides + ["pretrain.extend=true"]))
    # a recipe that differs from the shipped one, or a folder without a record, is refused before anything trains
    with pytest.raises(ValueError, match=r"pretrain.unet_heads differs .*lr: shipped 0.0003, here 0.5"):
        pretrain(load_config("base", cont_overrides + ["pretrain.unet_heads.lr=0.5", f"pretrain.work_dir={tmp_path / 'w3'}"]))
    with pytest.raises(FileNotFoundError, match=r"from_shipped=.*nowhere: no PRETRAINED.json"):
        pretrain(load_config("base", cont_overrides + [f"pretrain.from_shipped={tmp_path / 'nowhere'}"]))
    # more UNet layers per level: the shipped UNet is grown into them (same output until it trains), then phase 4 trains it
    grown_out, work5 = tmp_path / "assets-grown", tmp_path / "work-grown"
    grow_overrides = overrides + [f"pretrain.from_shipped={assets}", f"pretrain.work_dir={work5}", f"pretrain.out_dir={grown_out}",
                                  "model.tiny.unet.layers_per_block=[2,1,2]"]
    grown = pretrain(load_config("base", grow_overrides + ["pretrain.unet_more.steps=0"]))
    assert grown["stages"]["unet_heads"]["grown"] == {"layers_per_block": {"from": 1, "to": [2, 1, 2]}}
    from diffusers import UNet2DConditionModel

    small = UNet2DConditionModel.from_pretrained(str(assets / "tiny-sd"), subfolder="unet", torch_dtype=torch.float32)
    big = UNet2DConditionModel.from_pretrained(str(grown_out / "tiny-sd"), subfolder="unet", torch_dtype=torch.float32)
    assert list(big.config.layers_per_block) == [2, 1, 2] and sum(p.numel() for p in big.parameters()) > sum(p.numel() for p in small.parameters())
    x, t, e = torch.randn(2, 16, 16, 16), torch.tensor([5, 900]), torch.randn(2, 8, small.config.cross_attention_dim)
    with torch.no_grad():
        torch.testing.assert_close(big(x, t, encoder_hidden_states=e).sample, small(x, t, encoder_hidden_states=e).sample)
    # another UNet shape: the VAE, encoders and analyzer are taken, the UNet phases train from scratch on the shipped latents
    wide = pretrain(load_config("base", overrides + [f"pretrain.from_shipped={assets}", f"pretrain.work_dir={tmp_path / 'w6'}",
                                                      f"pretrain.out_dir={tmp_path / 'assets-wide'}", "pretrain.unet_more.steps=0",
                                                      "model.tiny.unet.block_out_channels=[64,64,96]"]))
    assert all(wide["stages"][k].get("seeded_from") == str(assets) for k in ("vae", "standin-arcface", "synthetic-face-analyzer"))
    assert all("seeded_from" not in wide["stages"][k] for k in ("unet", "unet_refine", "unet_heads"))
    assert list(UNet2DConditionModel.load_config(str(tmp_path / "assets-wide" / "tiny-sd"), subfolder="unet")["block_out_channels"]) == [64, 64, 96]
    with pytest.raises(ValueError, match=r"its VAE was built with other settings \(latent_channels: shipped 16, here 8\)"):
        pretrain(load_config("base", grow_overrides + ["model.tiny.vae.latent_channels=8", "model.tiny.unet.in_channels=8",
                                                       "model.tiny.unet.out_channels=8", f"pretrain.work_dir={tmp_path / 'w7'}"]))
    no_unet = tmp_path / "no-unet"
    no_unet.mkdir()
    record = json.loads((assets / "PRETRAINED.json").read_text())
    record["stages"] = {k: v for k, v in record["stages"].items() if not k.startswith("unet")}
    (no_unet / "PRETRAINED.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="records no UNet stage"):
        pretrain(load_config("base", cont_overrides + [f"pretrain.from_shipped={no_unet}", f"pretrain.work_dir={tmp_path / 'w4'}"]))
    assert rec["base_check"]["samples"] == 2 and 0 <= rec["base_check"]["found"] <= 2
    acc = rec["stages"]["synthetic-face-analyzer"]["accuracy_held_out"]
    assert acc["all"]["n"] == 2 * 6 and 0.0 <= acc["all"]["recall"] <= 1.0
    assert rec["megabytes"] < 40
    # a second run finds every stage done and only rewrites the assets
    again = pretrain(load_config("base", overrides + ["pretrain.unet_more.steps=0"]))
    assert json.dumps(again["stages"], sort_keys=True) == json.dumps(rec["stages"], sort_keys=True)  # NaN-safe
    # that work folder's stages were trained for this model.tiny: another shape is refused there before anything trains
    assert json.loads((tmp_path / "work" / "ARCHITECTURE.json").read_text()) == rec["architecture"]
    with pytest.raises(ValueError, match=r"work_dir=.*work holds stages trained for another model.tiny "
                                         r"\(unet.block_out_channels: there \[64, 128, 160\], here \[64, 64, 96\]\); give"):
        pretrain(load_config("base", overrides + ["model.tiny.unet.block_out_channels=[64,64,96]"]))

    # and its stages were trained with this recipe: a finished stage is not reused for another one (a VAE change
    # reaches every stage trained from that VAE)
    with pytest.raises(ValueError, match=r"work holds stages trained with another recipe: 'unet_heads' \(unet_heads.lr: there 0.0003, "
                                         r"here 0.5; delete .*tiny-sd-heads and .*unet-heads-stage.pt to train it again\)"):
        pretrain(load_config("base", overrides + ["pretrain.unet_more.steps=0", "pretrain.unet_heads.lr=0.5"]))
    with pytest.raises(ValueError, match=r"'vae' \(vae.lr: there 0.001, here 0.5; .*'unet' .*'unet_heads' .*'synthetic-face-analyzer' "
                                         r"\(vae.lr: there 0.001, here 0.5; delete .*synthetic-face-analyzer to train it again\)"):
        pretrain(load_config("base", overrides + ["pretrain.unet_more.steps=0", "pretrain.vae.lr=0.5"]))

    from realisid.pipeline import Person, RealisIDPipeline
    from realisid.train import train

    asset = lambda n: str(assets / n)  # noqa: E731
    cfg = load_config("joint", overrides + [
        "prepare.enabled=true", f"model.pretrained={asset('tiny-sd')}", f"model.id_encoder.path={asset('standin-arcface')}",
        f"evaluation.standin_path={asset('standin-arcface-eval')}", f"faces.model_dir={asset('synthetic-face-analyzer')}",
        f"faces.recognizer={asset('standin-arcface-eval')}", f"data.train_shards={tmp_path}/synthetic/train-*.tar",
        f"data.val_shards={tmp_path}/synthetic/val-*.tar", "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=4",
        "data.val_samples=4", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
        "validation.num_images=1", "validation.steps=2", "evaluation.every_n_validations=1", "evaluation.per_bin=1", "evaluation.steps=2",
        f"experiment.runs_dir={tmp_path}/runs"])
    res = train(cfg)
    assert res["prepared"]["stand_ins"]["base model (model.pretrained)"] == asset("tiny-sd")
    assert res["global_step"] == 2 and os.path.isdir(res["export"])
    pipe = RealisIDPipeline.from_export(res["export"])
    assert pipe.id_encoder.name == "standin-arcface-synthetic"

    ref = torch.zeros(3, 32, 32)
    out = pipe("a photo of a person", [Person(box=[40, 40, 72, 72], id_image=ref)], num_inference_steps=2, seed=0)
    assert out.images[0].size == (128, 128)


def test_missing_stand_ins_name_the_fix(tmp_path):
    from realisid.config import load_config
    from realisid.prepare import check_stand_ins

    cfg = load_config("local_branch", [f"model.pretrained={tmp_path}/nowhere"])
    with pytest.raises(FileNotFoundError, match=r"base model \(model.pretrained\): .*nowhere.*make pretrain"):
        check_stand_ins(cfg)


def test_pretrain_device_setting_names_the_key_and_the_fix():
    from realisid.embedded.pretrain import training_device

    assert training_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert training_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"pretrain.device='gpu0' is not a device; use auto, cpu, cuda or cuda:N"):
        training_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"pretrain.device=cuda but this machine has no CUDA device; use pretrain.device=cpu"):
            training_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_base_training_and_sampling_on_the_gpu_match_the_cpu():
    """The same seed gives the same run on either device (noise and batches are drawn on the host); results come back
    to host memory."""
    import copy

    from realisid.config import load_config
    from realisid.embedded import base as B
    from realisid.models.backbone import build_tiny_backbone

    cfg = load_config("base", [])
    bb = build_tiny_backbone(cfg.model.tiny, 0)
    n = 8
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 128, 128), generator=g, dtype=torch.uint8)
    boxes = torch.tensor([[40.0, 40.0, 72.0, 72.0]] * n)
    data = B.ImageSet(images, ["a photo of a person"] * n, ["a photo of a person"] * n, [str(i) for i in range(n)], boxes,
                      torch.zeros(n, 5, 2), ["a"] * n)
    moments = B.encode_moments(bb.vae, images)
    runs = {}
    for dev in ("cpu", "cuda"):
        b = copy.deepcopy(bb).to(dev)
        assert B.encode_moments(b.vae, images).device.type == "cpu"
        stats = B.train_unet(b, moments, data, steps=2, batch_size=4, lr=1e-4, weight_decay=0.0, ema_decay=0.9, min_snr_gamma=5.0,
                             caption_probs={"full": 1.0, "no_identity": 0.0, "generic": 0.0, "empty": 0.0},
                             generator=torch.Generator().manual_seed(1), face_weight=4.0)
        runs[dev] = (stats, B.sample_base(b, ["a photo of a person"], steps=2, seed=0))
    assert runs["cuda"][1].device.type == "cpu"
    assert runs["cuda"][0]["unet_loss_first_fifth"] == pytest.approx(runs["cpu"][0]["unet_loss_first_fifth"], rel=2e-2)
    torch.testing.assert_close(runs["cuda"][1], runs["cpu"][1], atol=5e-2, rtol=0)


def test_a_grown_unet_computes_what_the_old_one_did():
    from diffusers import UNet2DConditionModel

    from realisid.config import load_config
    from realisid.models.backbone import _plain
    from realisid.models.grow import grow_unet

    torch.manual_seed(0)
    old = UNet2DConditionModel(**_plain(load_config("base", []).model.tiny.unet)).eval()
    with torch.no_grad():  # no layer of the old UNet left at a zero init, so a misplaced weight shows
        for q in old.parameters():
            q.add_(torch.randn_like(q) * 0.02)
    x, t, e = torch.randn(2, 16, 16, 16), torch.tensor([10, 700]), torch.randn(2, 12, old.config.cross_attention_dim)
    with torch.no_grad():
        want = old(x, t, encoder_hidden_states=e).sample
        for layers in ([2, 1, 1], [1, 3, 2]):  # the 16x16 level has no attention, the others do
            new = grow_unet(old, layers).eval()
            assert list(new.config.layers_per_block) == layers
            assert sum(q.numel() for q in new.parameters()) > sum(q.numel() for q in old.parameters())
            torch.testing.assert_close(new(x, t, encoder_hidden_states=e).sample, want, atol=1e-5, rtol=0)
    # and it trains from there: the new layers get gradients
    new.train()
    new(x, t, encoder_hidden_states=e).sample.pow(2).mean().backward()
    assert new.up_blocks[1].resnets[1].conv2.weight.grad.abs().sum() > 0  # a new (identity) layer of the 8x8 level
    with pytest.raises(ValueError, match=r"from layers_per_block \[1, 1, 1\] to \[1, 0, 1\] would remove layers"):
        grow_unet(old, [1, 0, 1])
    with pytest.raises(ValueError, match="names 2 levels; the UNet has 3"):
        grow_unet(old, [2, 2])


def test_timestep_shift_moves_training_toward_high_noise():
    from realisid.embedded.base import sample_timesteps

    g = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(20000, 1000, 1.0, g)
    shifted = sample_timesteps(20000, 1000, 3.0, g)
    assert uniform.min() >= 0 and uniform.max() <= 999 and shifted.min() >= 0 and shifted.max() <= 999
    assert abs(float((uniform >= 500).float().mean()) - 0.5) < 0.02
    assert abs(float((shifted >= 500).float().mean()) - 0.75) < 0.02  # s / (s + 1)
    with pytest.raises(ValueError, match="shift"):
        sample_timesteps(4, 1000, 0.0, g)


def test_head_weights_cover_the_expanded_face_box_in_proportion():
    from realisid.embedded.base import head_weights

    # a 20 px face at 128 px, 16 latent pixels: box x 1.6 = 32 px = latent pixels 3..7 exactly (centre 50 px -> 4.25 .. 8.25)
    boxes = torch.tensor([[40.0, 40.0, 60.0, 60.0], [0.0, 0.0, 4.0, 4.0]])
    w = head_weights(boxes, 128, 16, 4.0)
    assert w.shape == (2, 1, 16, 16)
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.ones(2))  # the loss keeps its scale
    raw = w[0, 0] / w[0, 0].min()  # 1 outside the head, 1 + 4 x coverage inside
    assert raw[5, 5] == pytest.approx(5.0) and raw[0, 0] == pytest.approx(1.0)
    assert raw[4, 4] == pytest.approx(1 + 4 * 0.75 * 0.75)  # the head's edge covers 3/4 of that pixel each way
    # a face smaller than a latent pixel weighs in proportion: head 6.4 px at the corner, 5.2 px inside = 0.65 of latent pixel (0, 0) each way
    raw1 = w[1, 0] / w[1, 0].min()
    assert raw1[0, 0] > 1.5 and raw1[0, 0] == pytest.approx(1 + 4 * (5.2 / 8) ** 2, rel=1e-5)
    assert torch.equal(head_weights(boxes, 128, 16, 0.0), torch.ones(2, 1, 16, 16))


def test_progress_lines_count_seconds_per_step_from_the_resumed_step(caplog):
    import logging
    import time

    from realisid.embedded.base import Progress

    prog = Progress("stage", 20, every=10, start=5)  # resumed at step 5: the first line covers steps 6-10, not 1-10
    prog.t_last = time.perf_counter() - 5.0
    with caplog.at_level(logging.INFO, logger="realisid.embedded.base"):
        prog.step(9, 0.5)
    line = caplog.records[-1].getMessage()
    assert line.startswith("stage: 10/20 loss 0.5000")
    seconds = float(line.split("(")[1].split(" s each")[0])
    assert 0.9 < seconds < 1.2, line  # 5 s over 5 steps; counting from 0 would report 0.5


def test_work_folder_stages_keep_the_recipe_they_started_with(tmp_path):
    from realisid.embedded.pretrain import WORK_RECIPES, claim_stages
    from realisid.embedded.stages import mark_done

    first = {"vae": {"lr": 1}, "unet": {"vae": {"lr": 1}, "steps": 5}}
    claim_stages(str(tmp_path), first)
    claim_stages(str(tmp_path), {"vae": {"lr": 2}, "unet": {"vae": {"lr": 2}, "steps": 5}})  # nothing started: the new recipe holds
    mark_done(str(tmp_path / "vae"), {})
    (tmp_path / "unet-stage.pt").write_bytes(b"")  # a UNet phase stopped half-way
    with pytest.raises(ValueError, match=r"'vae' \(lr: there 2, here 3; delete .*vae to train it again\); 'unet' \(steps: there 5, "
                                         r"here 6; vae.lr: there 2, here 3; delete .*tiny-sd and .*unet-stage.pt to train it again\)"):
        claim_stages(str(tmp_path), {"vae": {"lr": 3}, "unet": {"vae": {"lr": 3}, "steps": 6}})
    recorded = json.loads((tmp_path / WORK_RECIPES).read_text())
    assert recorded["vae"] == {"lr": 2}  # a refused run changes nothing
    (tmp_path / "unet-stage.pt").unlink()
    import shutil

    shutil.rmtree(tmp_path / "vae")  # deleted stages train again, with the new recipe
    claim_stages(str(tmp_path), {"vae": {"lr": 3}, "unet": {"vae": {"lr": 3}, "steps": 6}})
    assert json.loads((tmp_path / WORK_RECIPES).read_text())["unet"]["steps"] == 6
    legacy = tmp_path / "legacy"
    mark_done(str(legacy / "vae"), {})  # a stage from before the record existed is claimed as it stands
    claim_stages(str(legacy), {"vae": {"lr": 9}})
    assert json.loads((legacy / WORK_RECIPES).read_text()) == {"vae": {"lr": 9}}
