"""The optional identity loss (model.loss.id_lambda): its pure parts, and the module's step with it on."""
import pytest
import torch

from conftest import RANDOM_TINY, write_face_shards


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_x0_inverts_the_noising(prediction_type):
    from realisid.modules.losses import diffusion_inputs, predicted_x0

    acp = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 1000), 0)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 300, 900])
    noisy, target = diffusion_inputs(acp, x0, eps, t, prediction_type)
    torch.testing.assert_close(predicted_x0(acp, noisy, target, t, prediction_type), x0, atol=1e-4, rtol=1e-4)
    wrong = predicted_x0(acp, noisy, torch.zeros_like(target), t, prediction_type)
    assert (wrong - x0).abs().amax() > 0.1  # a prediction that is not the target gives another x0
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        predicted_x0(acp, noisy, target, t, "sample")


def test_identity_crop_boxes_cut_what_the_reference_crop_cuts():
    from realisid.geometry import expand_square_box
    from realisid.images import ID_CROP_EXPAND
    from realisid.modules.losses import identity_crop_boxes

    faces = [(40, 40, 60, 64), (0, 2, 30, 20), (100, 90, 127, 126), (60, 10, 66, 16), (0, 0, 128, 128)]
    got = identity_crop_boxes(torch.tensor(faces, dtype=torch.float32), 128, 128, ID_CROP_EXPAND)
    for face, box in zip(faces, got.tolist()):
        want = expand_square_box(face, ID_CROP_EXPAND, 128, 128)    # the same square, rounded to whole pixels
        assert max(abs(a - b) for a, b in zip(box, want)) <= 1.0, (face, box, want)
        assert 0 <= box[0] and 0 <= box[1] and box[2] <= 128 and box[3] <= 128
        assert box[0] <= face[0] and box[1] <= face[1] and box[2] >= face[2] and box[3] >= face[3]


def test_crop_faces_resamples_the_box_with_gradients():
    from realisid.modules.losses import crop_faces

    img = torch.zeros(2, 3, 64, 64)
    img[0, :, 16:32, 16:32] = 1.0                     # a bright square in the first image's box only
    img.requires_grad_(True)
    crops = crop_faces(img, torch.tensor([[16.0, 16.0, 32.0, 32.0], [16.0, 16.0, 32.0, 32.0]]), 8)
    assert crops.shape == (2, 3, 8, 8)
    torch.testing.assert_close(crops[0], torch.ones(3, 8, 8))
    torch.testing.assert_close(crops[1], torch.zeros(3, 8, 8))
    crops.sum().backward()
    assert img.grad[:, :, 16:32, 16:32].sum() > 0 and img.grad[:, :, 40:, 40:].abs().sum() == 0


def test_identity_loss_counts_only_weighted_samples():
    from realisid.modules.losses import identity_cosine, identity_loss

    ref = torch.randn(3, 16)
    same, opposite = identity_cosine(ref, ref), identity_cosine(-ref, ref)
    torch.testing.assert_close(same, torch.ones(3))
    torch.testing.assert_close(opposite, -torch.ones(3))
    cos = torch.tensor([1.0, -1.0, 0.0])
    assert identity_loss(cos, torch.tensor([1.0, 0.0, 0.0])) == 0            # only the matching sample counts
    assert identity_loss(cos, torch.tensor([0.0, 1.0, 1.0])) == pytest.approx(1.5)
    assert identity_loss(cos, torch.zeros(3)) == 0                          # nothing counts: 0, not NaN
    seq = torch.randn(2, 4, 16)                                             # token features: averaged, then compared
    torch.testing.assert_close(identity_cosine(seq, seq.mean(1)), torch.ones(2))


@pytest.fixture(scope="module")
def batch_and_config(tmp_path_factory):
    from realisid.config import load_config

    root = tmp_path_factory.mktemp("idloss")
    write_face_shards(root, "train", n=4)
    return root, load_config


def _module_and_batch(root, *overrides):
    from test_module_parts import _batch
    from realisid.config import load_config
    from realisid.modules import build_module

    torch.manual_seed(0)
    module = build_module(load_config("joint", RANDOM_TINY + list(overrides)))
    return module, _batch(module, root, precomputed=True)


def _off_zero_init(module):
    """Every trainable weight moved a little, off the zero-initialised output convolutions (where nothing reaches the UNet)."""
    with torch.no_grad():
        for part in module.trainable_modules().values():
            for p in part.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


def test_step_with_the_identity_loss_trains_the_branches_through_it(batch_and_config):
    root, _ = batch_and_config
    module, batch = _module_and_batch(root, "model.loss.id_lambda=2.0", "model.loss.id_max_t=1000")
    _off_zero_init(module)  # so the projector is reached too
    plain = module.shared_step(batch, generator=torch.Generator().manual_seed(3), dropout=False)
    out = module.shared_step(batch, generator=torch.Generator().manual_seed(3), dropout=False, id_term=True)
    assert "id_loss" not in plain                                   # held-out losses leave it out
    assert 0 < float(out["id_loss"].detach()) <= 2
    torch.testing.assert_close(out["loss"], plain["loss"] + 2.0 * out["id_loss"])
    out["id_loss"].backward()                                       # the term alone reaches the trainable parts
    for name, part in module.trainable_modules().items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), name
    assert all(p.grad is None for p in module.backbone.parameters())   # the frozen models stay frozen
    assert all(p.grad is None for p in module.id_encoder.parameters())


def test_identity_loss_counts_only_small_timesteps_and_kept_identities(batch_and_config):
    root, _ = batch_and_config
    module, batch = _module_and_batch(root, "model.loss.id_lambda=1.0", "model.loss.id_max_t=1")
    out = module.shared_step(batch, generator=torch.Generator().manual_seed(3), dropout=False, id_term=True)
    assert float(out["id_loss"].detach()) == 0      # no sample drew t = 0 (the seed's timesteps are above it)
    module, batch = _module_and_batch(root, "model.loss.id_lambda=1.0", "model.loss.id_max_t=1000", "model.dropout.image=1.0",
                                      "model.dropout.text=0.0", "model.dropout.both=0.0")
    out = module.shared_step(batch, generator=torch.Generator().manual_seed(3), dropout=True, id_term=True)
    assert float(out["id_loss"].detach()) == 0      # every identity dropped: nothing to pull towards


def test_identity_loss_settings_are_checked(batch_and_config):
    from realisid.models.id_encoder import IdentityEncoder

    root, _ = batch_and_config
    with pytest.raises(ValueError, match="id_max_t=0"):
        _module_and_batch(root, "model.loss.id_lambda=1.0", "model.loss.id_max_t=0")
    with pytest.raises(ValueError, match="id_lambda=-1.0"):
        _module_and_batch(root, "model.loss.id_lambda=-1.0")

    class Onnx(IdentityEncoder):   # an encoder that does not run in torch (as insightface's ArcFace)
        name = "onnx-arcface"

    with pytest.raises(ValueError, match="onnx-arcface does not run in torch.*id_lambda=0"):
        Onnx().embed_with_grad(torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_with_a_perfect_prediction_lands_on_the_same_clean_latent(prediction_type):
    from realisid.modules.losses import ddim_step, diffusion_inputs

    acp = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 1000), 0)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    noisy, target = diffusion_inputs(acp, x0, eps, torch.tensor([700, 700]), prediction_type)
    prev, got_x0 = ddim_step(acp, noisy, target, 700, 300, prediction_type)
    torch.testing.assert_close(got_x0, x0, atol=1e-4, rtol=1e-4)
    want, _ = diffusion_inputs(acp, x0, eps, torch.tensor([300, 300]), prediction_type)   # the same noise, less of it
    torch.testing.assert_close(prev, want, atol=1e-4, rtol=1e-4)
    last, _ = ddim_step(acp, noisy, target, 700, -1, prediction_type)                    # -1: all the way to x0
    torch.testing.assert_close(last, x0, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        ddim_step(acp, noisy, target, 700, 300, "sample")


def test_sampled_identity_loss_draws_from_noise_and_trains_the_branches_through_every_step(batch_and_config):
    root, _ = batch_and_config
    module, batch = _module_and_batch(root, "model.loss.id_lambda=0.5", "model.loss.id_mode=sampled", "model.loss.id_samples=2",
                                      "model.loss.id_sample_steps=3")
    assert module.sample_timesteps() == [999, 666, 332]   # trailing spacing from pure noise
    _off_zero_init(module)  # so the reference reaches the drawing
    plain = module.shared_step(batch, generator=torch.Generator().manual_seed(3), dropout=False)
    out = module.shared_step(batch, generator=torch.Generator().manual_seed(3), dropout=False, id_term=True)
    again = module.shared_step(batch, generator=torch.Generator().manual_seed(3), dropout=False, id_term=True)
    assert 0 < float(out["id_loss"].detach()) <= 2
    torch.testing.assert_close(out["loss"], plain["loss"] + 0.5 * out["id_loss"])   # the diffusion draws are untouched
    torch.testing.assert_close(again["id_loss"], out["id_loss"])                    # the drawing's noise is the step's
    other = module.shared_step(batch, generator=torch.Generator().manual_seed(4), dropout=False, id_term=True)
    assert float(other["id_loss"].detach()) != float(out["id_loss"].detach())
    out["id_loss"].backward()
    for name, part in module.trainable_modules().items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), name
    assert all(p.grad is None for p in module.backbone.parameters()) and all(p.grad is None for p in module.id_encoder.parameters())
    with pytest.raises(ValueError, match=r"id_mode='pulid'; valid: x0 .*, sampled"):
        _module_and_batch(root, "model.loss.id_lambda=1.0", "model.loss.id_mode=pulid")
    with pytest.raises(ValueError, match="id_samples=0"):
        _module_and_batch(root, "model.loss.id_lambda=1.0", "model.loss.id_mode=sampled", "model.loss.id_samples=0")
