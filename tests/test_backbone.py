"""Backbone loading from local diffusers folders (SD1.5 and SDXL layouts), identity encoders, branch init."""
import os

import numpy as np
import pytest
import torch


def _save_sdxl(path):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from realisid.models.tokenizer import CAPTION_WORDS, build_tiny_tokenizer

    torch.manual_seed(0)
    tok = build_tiny_tokenizer(CAPTION_WORDS)
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=len(tok),
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                         attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                         transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 32,
                         cross_attention_dim=64).save_pretrained(os.path.join(path, "unet"))
    AutoencoderKL(block_out_channels=(16, 32), down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                  latent_channels=4, norm_num_groups=8, mid_block_add_attention=False).save_pretrained(os.path.join(path, "vae"))
    CLIPTextModel(CLIPTextConfig(**text)).save_pretrained(os.path.join(path, "text_encoder"))
    CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=32, **text)).save_pretrained(os.path.join(path, "text_encoder_2"))
    tok.save_pretrained(os.path.join(path, "tokenizer"))
    tok.save_pretrained(os.path.join(path, "tokenizer_2"))
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(os.path.join(path, "scheduler"))


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    """A tiny random SDXL-layout folder (two CLIP text encoders, text_time added embedding), saved once."""
    path = tmp_path_factory.mktemp("sdxl") / "sdxl"
    _save_sdxl(str(path))
    return str(path)


def _tiny_backbone(tiny_cfg, **vae):
    """The shrunk random SD1.5-layout backbone; ``vae``: extra AutoencoderKL arguments."""
    from omegaconf import OmegaConf

    from realisid.models.backbone import build_tiny_backbone

    return build_tiny_backbone(OmegaConf.merge(tiny_cfg("local_branch").model.tiny, {"vae": vae}))


def test_force_upcast_vae_stays_fp32_with_half_backbone(sdxl_dir, tiny_cfg):
    """SDXL's VAE overflows to NaN in fp16; its config's force_upcast keeps it in fp32 beside a half UNet: at
    loading, on every later cast, and under the trainer's autocast; latents come back in the UNet's dtype."""
    from realisid.models.backbone import load_pretrained_backbone

    bb = load_pretrained_backbone(sdxl_dir, dtype=torch.bfloat16)
    assert bb.vae.config.force_upcast and bb.vae.dtype == torch.float32
    assert bb.unet.dtype == torch.bfloat16 and bb.text_encoder_2.dtype == torch.bfloat16
    ref = _tiny_backbone(tiny_cfg)
    before = {k: v.clone() for k, v in ref.vae.state_dict().items()}
    for cast in (lambda m: m.to(torch.float16), lambda m: m.half(), lambda m: m.to("cpu", torch.bfloat16), lambda m: m.bfloat16()):
        cast(ref)
        assert ref.vae.dtype == torch.float32 and ref.unet.dtype in (torch.float16, torch.bfloat16)
        assert all(torch.equal(v, before[k]) for k, v in ref.vae.state_dict().items())  # never rounded through half
    ref.to(torch.float32)
    assert ref.unet.dtype == torch.float32
    # the methods that touch the VAE, with a bf16 UNet, also under the trainer's autocast
    seen = []
    bb.vae.decoder.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    bb.vae.encoder.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    images = torch.rand(2, 3, 32, 32, dtype=torch.bfloat16) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moments = bb.latent_moments(images)
        z = bb.latents_from_moments(moments, torch.Generator().manual_seed(0))
        z2 = bb.encode_images(images, torch.Generator().manual_seed(0))
        out = bb.decode_latents(z)
    assert moments.dtype == torch.float32 and z.dtype == z2.dtype == torch.bfloat16 and torch.equal(z, z2)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert seen and all(d == torch.float32 for d in seen)  # the VAE ran in fp32, not in autocast's bf16
    assert bb.decode_latents(z.half()).dtype == torch.float32 and bb.decode_latents(z.double()).shape == out.shape
    # a VAE that may run in half (force_upcast false, e.g. SDXL's fp16-fix VAE) follows the backbone
    half_ok = _tiny_backbone(tiny_cfg, force_upcast=False).to(torch.bfloat16)
    assert half_ok.vae.dtype == torch.bfloat16


def test_sdxl_empty_prompt_is_zeros(sdxl_dir, tmp_path, tiny_cfg):
    """SDXL's unconditional text is zeros (diffusers' force_zeros_for_empty_prompt): for encode_text and for the
    null text that training with precomputed embeddings takes from text_embeddings([""])."""
    import json
    import shutil

    from realisid.models.backbone import load_pretrained_backbone

    bb = load_pretrained_backbone(sdxl_dir)
    assert bb.force_zeros_for_empty_prompt  # no model_index.json: SDXL's default
    embeds, pooled = bb.text_embeddings(["a photo of a person", "", "  "])
    assert embeds.shape == (3, 77, 64) and pooled.shape == (3, 32)
    assert embeds[0].abs().sum() > 0 and pooled[0].abs().sum() > 0
    assert torch.all(embeds[1:] == 0) and torch.all(pooled[1:] == 0)
    cond = bb.encode_text([""], (64, 64))
    assert torch.all(cond.embeds == 0) and torch.all(cond.added_cond_kwargs["text_embeds"] == 0)
    # the folder's model_index.json decides when it says so
    off = tmp_path / "sdxl-off"
    shutil.copytree(sdxl_dir, off)
    (off / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": False}))
    e_off, p_off = load_pretrained_backbone(str(off)).text_embeddings([""])
    assert e_off.abs().sum() > 0 and p_off.abs().sum() > 0
    # SD1.5 was trained with the encoded empty prompt: unchanged
    e15, _ = _tiny_backbone(tiny_cfg).text_embeddings([""])
    assert e15.abs().sum() > 0


def test_sdxl_time_ids_carry_original_size_and_crop(sdxl_dir):
    """time_ids = original_size + crop_top_left + target_size per sample (diffusers' train_text_to_image_sdxl.py)."""
    from realisid.models.backbone import load_pretrained_backbone

    bb = load_pretrained_backbone(sdxl_dir, dtype=torch.bfloat16)
    embeds, pooled = bb.text_embeddings(["a photo", "a face"])
    cond = bb.conditioning(embeds, pooled, (64, 64), original_size=torch.tensor([[480.0, 640.0], [1000.0, 1337.0]]),
                           crop_top_left=torch.tensor([[0.0, 80.0], [12.0, 3.0]]))
    ids = cond.added_cond_kwargs["time_ids"]
    assert ids.tolist() == [[480, 640, 0, 80, 64, 64], [1000, 1337, 12, 3, 64, 64]]  # 1337 kept exactly (not rounded in bf16)
    default = bb.encode_text(["a photo", "a face"], (64, 48)).added_cond_kwargs["time_ids"]
    assert default.tolist() == [[64, 48, 0, 0, 64, 48]] * 2
    # the half UNet takes them: rows with other sizes give other outputs
    x = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    t = torch.tensor([500, 500])
    twice = torch.cat([x[:1], x[:1]])
    same = bb.conditioning(embeds[:1].repeat(2, 1, 1), pooled[:1].repeat(2, 1), (64, 64),
                           original_size=torch.tensor([[64.0, 64.0], [1000.0, 1337.0]]))
    out = bb.unet(twice, t, same.embeds, added_cond_kwargs=same.added_cond_kwargs).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all() and not torch.equal(out[0], out[1])
    with pytest.raises(ValueError, match=r"original_size has shape \(3, 2\); give one pair per sample: a \(2, 2\) tensor"):
        bb.conditioning(embeds, pooled, (64, 64), original_size=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="crop_top_left has shape"):
        bb.conditioning(embeds, pooled, (64, 64), crop_top_left=torch.zeros(2, 3))


def test_layout_mismatch_is_named_and_sdxl_saves_back(sdxl_dir, tmp_path):
    from realisid.models.backbone import load_pretrained_backbone, save_backbone

    with pytest.raises(ValueError, match="model.layout=sd15 but .* is an SDXL folder.*sdxl/local_branch"):
        load_pretrained_backbone(sdxl_dir, layout="sd15")
    bb = load_pretrained_backbone(sdxl_dir)
    bb.force_zeros_for_empty_prompt = False
    save_backbone(bb, str(tmp_path / "again"))
    again = load_pretrained_backbone(str(tmp_path / "again"))
    assert again.layout == "sdxl" and again.force_zeros_for_empty_prompt is False
    torch.testing.assert_close(again.text_embeddings(["a photo"])[1], bb.text_embeddings(["a photo"])[1])


def test_sdxl_layout_trains_a_local_step(tmp_path, tiny_cfg):
    from realisid.models.backbone import load_pretrained_backbone
    from realisid.modules import build_module

    _save_sdxl(str(tmp_path / "sdxl"))
    bb = load_pretrained_backbone(str(tmp_path / "sdxl"))
    assert bb.layout == "sdxl" and bb.cross_attention_dim == 64
    cond = bb.encode_text(["a photo", ""], (64, 64))
    assert cond.embeds.shape == (2, 77, 64)
    assert cond.added_cond_kwargs["text_embeds"].shape == (2, 32) and cond.added_cond_kwargs["time_ids"].tolist()[0] == [64, 64, 0, 0, 64, 64]
    cfg = tiny_cfg("joint", f"model.pretrained={tmp_path / 'sdxl'}")
    m = build_module(cfg)
    B = 2
    batch = {"image": torch.rand(B, 3, 64, 64) * 2 - 1, "crop_box": torch.tensor([[0, 0, 16, 16], [32, 32, 64, 64]]),
             "pe_map": torch.rand(B, 3, 32, 32), "loc_map": torch.zeros(B, 1, 64, 64), "id_image": torch.rand(B, 3, 32, 32),
             "id_mask": torch.ones(B, 1, 32, 32), "id_embed": torch.zeros(B, 0), "has_id_embed": torch.zeros(B, dtype=torch.bool),
             "caption": ["a photo", "a face"]}
    out = m.shared_step(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and m.local_branch.controlnet.controlnet_down_blocks[0].weight.grad is not None


def test_missing_pretrained_parts_are_named(tmp_path):
    from realisid.models.backbone import load_pretrained_backbone

    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_pretrained_backbone(str(tmp_path / "nope"))
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    (tmp_path / "sd" / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks text_encoder/, tokenizer/, scheduler/"):
        load_pretrained_backbone(str(tmp_path / "sd"))


def test_arcface_identity_encoder_from_onnx(tmp_path):
    import onnx_models

    from realisid.models.id_encoder import build_id_encoder

    onnx_models.make_arcface(str(tmp_path / "rec.onnx"), dim=128)
    enc = build_id_encoder({"kind": "arcface", "path": str(tmp_path)})
    assert enc.embed_dim == 128 and not enc.sequence
    x = torch.rand(2, 3, 48, 48) * 2 - 1
    e = enc(x)
    assert e.shape == (2, 128)
    np.testing.assert_allclose(e.norm(dim=-1).numpy(), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="valid kinds: standin, arcface, clip"):
        build_id_encoder({"kind": "facenet"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_id_encoder({"kind": "arcface", "path": str(tmp_path / "missing")})


def test_clip_encoder_masks_background(tiny_cfg):
    from realisid.models.id_encoder import ClipEncoder, IdProjector

    enc = ClipEncoder(tiny={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8})
    x = torch.rand(1, 3, 32, 32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    noisy_bg = x.clone()
    noisy_bg[..., :4, :] = -x[..., :4, :]
    torch.testing.assert_close(enc(x, mask), enc(noisy_bg, mask))  # background does not reach the tokens
    feats = enc(x, mask)
    assert feats.shape == (1, 17, 32)  # 16 patches + class token, penultimate layer
    tokens = IdProjector(32, 4, 48, sequence=True)(feats)
    assert tokens.shape == (1, 4, 48)


def test_branch_init_from_checkpoint_and_export(tmp_path, tiny_cfg):
    from realisid.modules import build_module

    m = build_module(tiny_cfg("local_branch"))
    with torch.no_grad():
        m.local_branch.controlnet.controlnet_mid_block.weight.fill_(0.25)
    torch.save({"state_dict": {k: v for k, v in m.state_dict().items() if k.startswith("local_branch.")}}, tmp_path / "last.ckpt")
    m.export(str(tmp_path / "export"))
    for src in (str(tmp_path / "last.ckpt"), str(tmp_path / "export" / "local")):
        j = build_module(tiny_cfg("joint", f"model.local.init_from={src}"))
        assert torch.all(j.local_branch.controlnet.controlnet_mid_block.weight == 0.25)
    with pytest.raises(ValueError, match="holds no global branch"):
        build_module(tiny_cfg("joint", f"model.global.init_from={tmp_path / 'last.ckpt'}"))
    with pytest.raises(FileNotFoundError, match="neither an export folder nor a .ckpt"):
        build_module(tiny_cfg("joint", f"model.local.init_from={tmp_path / 'nothing'}"))


def test_fingerprint_changes_when_a_weight_file_changes(tmp_path, tiny_cfg):
    """A precompute cache is refused after its backbone's VAE or text encoder weights change (size or mtime), and
    accepted while only the UNet or nothing changes."""
    from realisid.models.backbone import load_pretrained_backbone, save_backbone

    folder = tmp_path / "sd"
    save_backbone(_tiny_backbone(tiny_cfg), str(folder))
    before = load_pretrained_backbone(str(folder)).fingerprint()
    assert load_pretrained_backbone(str(folder)).fingerprint() == before
    unet_file = next((folder / "unet").glob("*.safetensors"))
    os.utime(unet_file, (1, 1))
    assert load_pretrained_backbone(str(folder)).fingerprint() == before  # the UNet is not in the cache
    vae_file = next((folder / "vae").glob("*.safetensors"))
    st = vae_file.stat()
    os.utime(vae_file, (st.st_atime, st.st_mtime + 10))
    after = load_pretrained_backbone(str(folder)).fingerprint()
    assert after != before and after["weight_files"] != before["weight_files"]
