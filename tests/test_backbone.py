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
