"""Latent crop/up-sample and residual relocation, alone and through a real LocalBranch."""
import math

import pytest
import torch
import torch.nn.functional as F

from realisid.models.relocate import crop_resize, relocate, relocate_native


def _touched(box, scale, width, height):
    """The cells a box at ``scale`` touches (corners floored / ceiled): where a relocated residual may be non-zero."""
    return (max(0, math.floor(box[0] * scale)), max(0, math.floor(box[1] * scale)),
            min(width, math.ceil(box[2] * scale)), min(height, math.ceil(box[3] * scale)))


def _tiny_branch(tiny_cfg, **settings):
    from realisid.models.backbone import load_backbone
    from realisid.models.branches import LocalBranch

    bb = load_backbone(tiny_cfg().model)
    branch = LocalBranch.from_unet(bb.unet, 3, [16, 32], **settings)
    torch.manual_seed(0)
    for p in list(branch.controlnet.controlnet_down_blocks.parameters()) + list(branch.controlnet.controlnet_mid_block.parameters()):
        p.data.normal_(0, 0.5)  # zero convs made non-zero, so residuals are visible
    return bb, branch


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


@pytest.mark.parametrize("res_size,expect_hw,touched", [
    (16, (32, 32), [(0, 0, 8, 8), (24, 20, 32, 32)]),   # scale 1
    (8, (16, 16), [(0, 0, 4, 4), (12, 10, 16, 16)]),    # scale 1/2
    (4, (8, 8), [(0, 0, 2, 2), (6, 5, 8, 8)]),          # scale 1/4
    (2, (4, 4), [(0, 0, 1, 1), (3, 2, 4, 4)]),          # scale 1/8: (3, 2.5)-(4, 4), row 2 half covered
])
def test_relocate_nonzero_exactly_inside_box(res_size, expect_hw, touched):
    boxes = [[0, 0, 8, 8], [24, 20, 32, 32]]  # one at the top-left corner, one at the bottom-right border
    res = torch.rand(2, 3, res_size, res_size) + 0.1
    out = relocate(res, boxes, (32, 32), local_size=16)
    assert out.shape == (2, 3) + expect_hw
    for i, (x0, y0, x1, y1) in enumerate(touched):
        mask = torch.zeros(expect_hw, dtype=torch.bool)
        mask[y0:y1, x0:x1] = True
        assert torch.all(out[i, :, mask] > 0)
        assert torch.all(out[i, :, ~mask] == 0)


def test_relocate_odd_latent_levels():
    # a 30x30 latent halves to 15, 8, 4 (ceil), as strided convs do
    out = relocate(torch.ones(1, 1, 4, 4), [[10, 10, 20, 20]], (30, 30), local_size=16)
    assert out.shape[-2:] == (8, 8)


def test_relocation_pastes_at_fractional_positions_at_deep_levels():
    # 32x32 latent, 16-pixel crops: the 2x2 residual of the 1/8 level (a 4x4 map) goes to the box (12, 12, 24, 24),
    # i.e. [1.5, 3.0] at that level: residual cells of 0.75 at [1.5, 2.25] and [2.25, 3.0]. Per axis the weights
    # (overlap lengths) are cell 1 <- (0.5, 0), cell 2 <- (0.25, 0.75); cells 0 and 3 get nothing.
    r = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    out = relocate(r, [[12, 12, 24, 24]], (32, 32), local_size=16)
    expected = torch.tensor([[0.0, 0.0, 0.0, 0.0],
                             [0.0, 0.25, 0.875, 0.0],      # 0.5 * (0.5 * (1, 2) @ Wx^T)
                             [0.0, 1.25, 3.25, 0.0],       # (0.25 * (1, 2) + 0.75 * (3, 4)) @ Wx^T
                             [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(out[0, 0], expected)
    # the bottom-right corner box (24, 20, 32, 32) at 1/8 is (3, 2.5)-(4, 4): no longer stretched over rows 2-3
    # (cell widths 0.5 across, 0.75 down: row 2 <- 0.5 of residual row 0, row 3 <- 0.25 of row 0 + 0.75 of row 1)
    out = relocate(r, [[24, 20, 32, 32]], (32, 32), local_size=16)
    expected = torch.zeros(4, 4)
    expected[2, 3] = 0.5 * (0.5 * 1 + 0.5 * 2)
    expected[3, 3] = 0.25 * (0.5 * 1 + 0.5 * 2) + 0.75 * (0.5 * 3 + 0.5 * 4)
    assert torch.equal(out[0, 0], expected)


def test_relocation_is_a_clean_paste_when_aligned_and_area_average_when_shrinking():
    r = torch.randn(2, 3, 4, 4)
    out = relocate(r, [[8, 4, 16, 12], [0, 8, 8, 16]], (16, 16), local_size=8)  # level 1/2: whole cells, 4 each way
    expected = torch.zeros(2, 3, 8, 8)
    expected[0, :, 2:6, 4:8], expected[1, :, 4:8, 0:4] = r[0], r[1]
    assert torch.equal(out, expected)
    # the same 4x4 residual on a 2x2-cell box: each cell is the mean of the 2x2 residual cells it holds
    r = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    out = relocate(r, [[4, 4, 8, 8]], (16, 16), local_size=8)
    expected = torch.zeros(8, 8)
    expected[2:4, 2:4] = F.avg_pool2d(r, 2)[0, 0]  # (2.5, 4.5; 10.5, 12.5), exact
    assert torch.equal(out[0, 0], expected)


def test_relocation_in_half_precision_with_gradients():
    r = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2).repeat(2, 2, 1, 1)
    ref = relocate(r, [[12, 12, 24, 24], [0, 4, 8, 12]], (32, 32), local_size=16)
    for dtype in (torch.float16, torch.bfloat16):
        half = relocate(r.to(dtype), [[12, 12, 24, 24], [0, 4, 8, 12]], (32, 32), local_size=16)
        assert half.dtype == dtype and torch.equal(half.float(), ref)  # all values are exact in 8 bits of mantissa
    leaf = r.clone().requires_grad_(True)
    relocate(leaf, [[12, 12, 24, 24], [0, 4, 8, 12]], (32, 32), local_size=16).sum().backward()
    # a residual cell's gradient is the area it covers at the level: 0.75 x 0.75 in sample 0, 0.5 x 0.5 in sample 1
    assert torch.equal(leaf.grad[0], torch.full((2, 2, 2), 0.5625)) and torch.equal(leaf.grad[1], torch.full((2, 2, 2), 0.25))


def test_relocate_native_keeps_cells_in_place_at_fractional_offsets():
    # a 5-pixel crop at x0 = 3 at level 1/2: [1.5, 4.0], 3 residual cells of width 1, the last half padding
    r = torch.tensor([1.0, 2.0, 4.0]).view(1, 1, 1, 3).repeat(1, 1, 3, 1)
    out = relocate_native(r, (3, 4, 8, 10), (16, 16), 0.5)  # y: [2, 5], 3 whole rows
    assert out.shape == (1, 1, 8, 8)
    row = torch.tensor([0.0, 0.5 * 1, 0.5 * 1 + 0.5 * 2, 0.5 * 2 + 0.5 * 4, 0.0, 0.0, 0.0, 0.0])
    assert torch.equal(out[0, 0, 2:5], row.expand(3, 8))
    assert out[0, 0, :2].abs().max() == 0 and out[0, 0, 5:].abs().max() == 0


def test_local_branch_residuals_only_inside_boxes(tiny_cfg):
    bb, branch = _tiny_branch(tiny_cfg, latent_size=16)
    boxes = torch.tensor([[0, 0, 8, 8], [20, 12, 32, 24]])
    z = torch.randn(2, 4, 32, 32)
    args = (z, torch.tensor([10, 500]), torch.randn(2, 4, 32), torch.rand(2, 3, 32, 32))
    down, mid = branch(*args, boxes)
    for r in down + [mid]:
        scale = r.shape[-1] / 32
        for i, b in enumerate(boxes.tolist()):
            x0, y0, x1, y1 = _touched(b, scale, r.shape[-1], r.shape[-2])
            inside = torch.zeros(r.shape[-2:], dtype=torch.bool)
            inside[y0:y1, x0:x1] = True
            assert r[i][:, ~inside].abs().max() == 0
            assert r[i][:, inside].abs().max() > 0
    # the same boxes as a host list give the same residuals
    down_l, mid_l = branch(*args, boxes.tolist())
    assert all(torch.equal(a, b) for a, b in zip(down + [mid], down_l + [mid_l]))
    # shapes are what the full-size UNet expects: run it with them
    out = bb.unet(z, torch.tensor([10, 500]), torch.randn(2, 77, 32), down_block_additional_residuals=down,
                  mid_block_additional_residual=mid, return_dict=False)[0]
    assert out.shape == z.shape


def test_native_crop_ablation_runs(tiny_cfg):
    _, branch = _tiny_branch(tiny_cfg, latent_size=16, upsample=False)
    for p in branch.controlnet.controlnet_down_blocks.parameters():
        p.data.fill_(0.1)
    boxes = torch.tensor([[0, 0, 6, 6], [10, 12, 25, 27], [3, 3, 8, 8]])  # odd sides: 15 and 5 latent pixels
    down, mid = branch(torch.randn(3, 4, 32, 32), torch.tensor([3, 3, 3]), torch.randn(3, 4, 32), torch.rand(3, 3, 32, 32), boxes)
    assert down[0].shape == (3, 32, 32, 32) and down[-1].shape[-2:] == (16, 16) and mid.shape[-2:] == (16, 16)
    assert down[0][0, :, 6:, :].abs().max() == 0 and down[0][0, :, :6, :6].abs().max() > 0
    # the 5-pixel crop at (3, 3) lands at [1.5, 4.0] on the 1/2 level: cells 1-3 only
    assert down[-1][2, :, :, 4:].abs().max() == 0 and down[-1][2, :, 4:, :].abs().max() == 0
    assert down[-1][2, :, 1:4, 1:4].abs().min() > 0


def _controlnet(levels):
    from diffusers import ControlNetModel

    return ControlNetModel(block_out_channels=(8,) * levels, down_block_types=("DownBlock2D",) * levels, layers_per_block=1,
                           norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2, conditioning_embedding_out_channels=(4, 8))


def test_local_latent_size_not_divisible_by_unet_downsampling_is_refused():
    from realisid.models.branches import LocalBranch

    cn = _controlnet(4)  # down-samples 8x: the crop must halve exactly three times
    with pytest.raises(ValueError, match=r"model\.local\.latent_size=20 .*multiple of 8.*4-level UNet.*use 16 or 24"):
        LocalBranch(cn, latent_size=20)
    with pytest.raises(ValueError, match=r"latent_size=4 .*use 8"):
        LocalBranch(cn, latent_size=4)
    assert LocalBranch(cn, latent_size=24).latent_size == 24
    assert LocalBranch(cn, latent_size=20, upsample=False).latent_size == 20  # native crops are padded instead
    with pytest.raises(ValueError, match=r"model\.local\.latent_size=15 .*2-level UNet.*use 14 or 16"):
        LocalBranch(_controlnet(2), latent_size=15)


def test_local_branch_from_unet_checks_the_latent_size_first(tiny_cfg):
    from realisid.models.backbone import load_backbone
    from realisid.models.branches import LocalBranch

    unet = load_backbone(tiny_cfg().model).unet  # 2 levels: the crop must be even
    with pytest.raises(ValueError, match=r"model\.local\.latent_size=15 .*use 14 or 16"):
        LocalBranch.from_unet(unet, 3, [16, 32], latent_size=15)
    assert LocalBranch.from_unet(unet, 3, [16, 32], latent_size=15, upsample=False).latent_size == 15


def test_boxes_are_converted_to_host_once_per_forward(tiny_cfg, monkeypatch):
    _, branch = _tiny_branch(tiny_cfg, latent_size=16)
    from conftest import record_host_reads

    calls = record_host_reads(monkeypatch)
    args = (torch.randn(2, 4, 32, 32), torch.tensor([10, 500]), torch.randn(2, 4, 32), torch.rand(2, 3, 32, 32))
    branch(*args, [(0, 0, 8, 8), [20, 12, 32, 24]])
    assert calls == []  # host boxes: no device->host transfer at all
    branch(*args, torch.tensor([[0, 0, 8, 8], [20, 12, 32, 24]]))
    assert calls == ["tolist"]  # a tensor is read back once, not once per residual


def test_boxes_must_be_host_integers():
    from realisid.models.relocate import host_boxes

    with pytest.raises(TypeError, match="host_boxes"):
        relocate(torch.ones(1, 1, 2, 2), torch.tensor([[0, 0, 8, 8]]), (16, 16), local_size=8)
    with pytest.raises(TypeError, match="not 4 host integers"):
        host_boxes([torch.tensor([0, 0, 8, 8])])
    with pytest.raises(ValueError, match="empty"):
        host_boxes([(4, 0, 4, 8)])
    assert host_boxes(torch.tensor([[0.4, 1.0, 7.6, 8.0]])) == [(0, 1, 8, 8)]
    assert host_boxes([[0, 1.0, 8, 8]]) == [(0, 1, 8, 8)]
