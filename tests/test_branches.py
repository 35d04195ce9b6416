"""Branches of a UNet with a layer count per level (diffusers' ControlNet takes one count for all levels)."""
import torch

from realisid.models.branches import GlobalBranch, LocalBranch, load_controlnet


def _unet(layers):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[16, 16, 16], layers_per_block=layers,
                                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                                cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 3, 8, generator=g)


def _residuals(branch, cond_value=1.0):
    x, t, e = _inputs()
    return branch.controlnet(x, t, encoder_hidden_states=e, controlnet_cond=torch.full((2, 3, 32, 32), cond_value), return_dict=False)


def test_branch_of_a_per_level_unet_matches_its_down_path_and_copies_its_weights():
    unet = _unet([2, 1, 1])
    branch = GlobalBranch.from_unet(unet, 3, [8, 16])
    cn = branch.controlnet
    assert list(cn.config.layers_per_block) == [2, 1, 1]
    assert [len(b.resnets) for b in cn.down_blocks] == [2, 1, 1]
    assert len(cn.controlnet_down_blocks) == 1 + (2 + 1) + (1 + 1) + 1  # conv_in, layers and down-samplers per level
    assert cn.down_blocks.state_dict().keys() == unet.down_blocks.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(cn.down_blocks.state_dict().values(), unet.down_blocks.state_dict().values()))
    down, mid = _residuals(branch)
    x, t, e = _inputs()
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=e).sample
        added = unet(x, t, encoder_hidden_states=e, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert torch.equal(plain, added)  # zero convs: the untrained branch changes nothing
    assert [r.shape[-1] for r in down] == [16, 16, 16, 8, 8, 4, 4]


def test_per_level_branch_saves_and_loads_unchanged(tmp_path):
    branch = LocalBranch.from_unet(_unet([2, 1, 1]), 3, [8, 16], latent_size=16)
    for p in branch.controlnet.controlnet_down_blocks.parameters():
        p.data.normal_(0, 0.5)
    branch.save_pretrained(str(tmp_path))
    loaded = LocalBranch.from_pretrained(str(tmp_path))
    assert list(loaded.controlnet.config.layers_per_block) == [2, 1, 1]
    (d1, m1), (d2, m2) = _residuals(branch), _residuals(loaded)
    assert len(d1) == len(d2) == 7 and any(r.abs().sum() > 0 for r in d1)
    assert all(torch.equal(a, b) for a, b in zip(d1, d2)) and torch.equal(m1, m2)


def test_uniform_unet_branch_stays_a_plain_diffusers_controlnet(tmp_path):
    from diffusers import ControlNetModel

    branch = GlobalBranch.from_unet(_unet(1), 3, [8, 16])
    branch.save_pretrained(str(tmp_path))
    plain = ControlNetModel.from_pretrained(str(tmp_path))
    assert plain.config.layers_per_block == 1 and type(load_controlnet(str(tmp_path))) is ControlNetModel
