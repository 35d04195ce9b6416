"""Latent crop/up-sample and residual relocation, alone and through a real LocalBranch."""
import pytest
import torch
import torch.nn.functional as F

from realisid.models.relocate import crop_resize, relocate


def test_crop_resize_native_and_upsampled():
    z = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    boxes = [[0, 0, 4, 4], [2, 4, 6, 8]]
    native = crop_resize(z, boxes, None)
    assert torch.equal(native[0], z[0:1, :, 0:4, 0:4]) and torch.equal(native[1], z[1:2, :, 4:8, 2:6])
    same = crop_resize(z, boxes, 4)
    assert torch.equal(same, torch.cat(native))
    up = crop_resize(z, boxes, 8)
    assert up.shape == (2, 1, 8, 8)
    assert torch.allclose(up[1:2], F.interpolate(z[1:2, :, 4:8, 2:6], size=(8, 8), mode="bilinear", align_corners=False))


@pytest.mark.parametrize("res_size,expect_hw,boxes_at_scale", [
    (16, (32, 32), [(0, 0, 8, 8), (24, 20, 32, 32)]),   # scale 1
    (8, (16, 16), [(0, 0, 4, 4), (12, 10, 16, 16)]),    # scale 1/2
    (4, (8, 8), [(0, 0, 2, 2), (6, 5, 8, 8)]),          # scale 1/4
    (2, (4, 4), [(0, 0, 1, 1), (3, 2, 4, 4)]),          # scale 1/8: the corner box still gets a cell
])
def test_relocate_nonzero_exactly_inside_box(res_size, expect_hw, boxes_at_scale):
    boxes = torch.tensor([[0, 0, 8, 8], [24, 20, 32, 32]])  # one at the top-left corner, one at the bottom-right border
    res = torch.rand(2, 3, res_size, res_size) + 0.1
    out = relocate(res, boxes, (32, 32), local_size=16)
    assert out.shape == (2, 3) + expect_hw
    for i, (x0, y0, x1, y1) in enumerate(boxes_at_scale):
        mask = torch.zeros(expect_hw, dtype=torch.bool)
        mask[y0:y1, x0:x1] = True
        assert torch.all(out[i, :, mask] > 0)
        assert torch.all(out[i, :, ~mask] == 0)


def test_relocate_odd_latent_levels():
    # a 30x30 latent halves to 15, 8, 4 (ceil), as strided convs do
    out = relocate(torch.ones(1, 1, 4, 4), [[10, 10, 20, 20]], (30, 30), local_size=16)
    assert out.shape[-2:] == (8, 8)


def test_local_branch_residuals_only_inside_boxes(tiny_cfg):
    from realisid.models.backbone import load_backbone
    from realisid.models.branches import LocalBranch

    cfg = tiny_cfg()
    bb = load_backbone(cfg.model)
    branch = LocalBranch.from_unet(bb.unet, 3, [16, 32], latent_size=16)
    torch.manual_seed(0)
    for p in list(branch.controlnet.controlnet_down_blocks.parameters()) + list(branch.controlnet.controlnet_mid_block.parameters()):
        p.data.normal_(0, 0.5)  # zero convs made non-zero, so residuals are visible
    boxes = torch.tensor([[0, 0, 8, 8], [20, 12, 32, 24]])
    z = torch.randn(2, 4, 32, 32)
    down, mid = branch(z, torch.tensor([10, 500]), torch.randn(2, 4, 32), torch.rand(2, 3, 32, 32), boxes)
    for r in down + [mid]:
        scale = r.shape[-1] / 32
        for i, b in enumerate(boxes.tolist()):
            from realisid.geometry import box_at_scale
            x0, y0, x1, y1 = box_at_scale(b, scale, r.shape[-1], r.shape[-2])
            inside = torch.zeros(r.shape[-2:], dtype=torch.bool)
            inside[y0:y1, x0:x1] = True
            assert r[i][:, ~inside].abs().max() == 0
            assert r[i][:, inside].abs().max() > 0
    # shapes are what the full-size UNet expects: run it with them
    out = bb.unet(z, torch.tensor([10, 500]), torch.randn(2, 77, 32), down_block_additional_residuals=down,
                  mid_block_additional_residual=mid, return_dict=False)[0]
    assert out.shape == z.shape


def test_native_crop_ablation_runs(tiny_cfg):
    from realisid.models.backbone import load_backbone
    from realisid.models.branches import LocalBranch

    bb = load_backbone(tiny_cfg().model)
    branch = LocalBranch.from_unet(bb.unet, 3, [16, 32], latent_size=16, upsample=False)
    for p in branch.controlnet.controlnet_down_blocks.parameters():
        p.data.fill_(0.1)
    boxes = torch.tensor([[0, 0, 6, 6], [10, 12, 25, 27], [3, 3, 8, 8]])  # odd sides: 15 and 5 latent pixels
    down, mid = branch(torch.randn(3, 4, 32, 32), torch.tensor([3, 3, 3]), torch.randn(3, 4, 32), torch.rand(3, 3, 32, 32), boxes)
    assert down[0].shape == (3, 32, 32, 32) and down[-1].shape[-2:] == (16, 16) and mid.shape[-2:] == (16, 16)
    assert down[0][0, :, 6:, :].abs().max() == 0 and down[0][0, :, :6, :6].abs().max() > 0
