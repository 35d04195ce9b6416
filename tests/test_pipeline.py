"""RealisIDPipeline: the per-step combination rules, determinism, export/reload, and the generate CLI."""
import json

import pytest
import torch
from PIL import Image

from realisid.pipeline import Person, RealisIDPipeline, check_boxes

from conftest import RANDOM_TINY


@pytest.fixture(scope="module")
def joint():
    from realisid.config import load_config
    from realisid.modules import build_module

    cfg = load_config("joint", RANDOM_TINY + ["sampling.steps=3"])
    m = build_module(cfg).eval()
    torch.manual_seed(0)
    for br in (m.local_branch, m.global_branch):  # make the zero convs non-zero so every branch output is visible
        cn = br.controlnet
        for p in list(cn.controlnet_down_blocks.parameters()) + list(cn.controlnet_mid_block.parameters()) + list(cn.controlnet_cond_embedding.conv_out.parameters()):
            p.data.normal_(0, 0.05)
    return m


def person(box, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Person(box=box, id_image=torch.rand(3, 32, 32, generator=g) * 2 - 1)


def sample(pipe, people, **kw):
    kw.setdefault("num_inference_steps", 3)
    return pipe("a photo of a person", people, seed=kw.pop("seed", 0), output_type="pt", **kw).images


def test_branch_switches_equal_single_branch_pipelines(joint):
    full = joint.pipeline()
    b = joint.backbone
    global_only = RealisIDPipeline(b, joint.id_encoder, joint.projector, None, joint.global_branch, resolution=64, crop_expand=1.6, local_latent_size=16)
    local_only = RealisIDPipeline(b, joint.id_encoder, joint.projector, joint.local_branch, None, resolution=64, crop_expand=1.6, local_latent_size=16)
    people = [person((8, 8, 32, 32))]
    torch.testing.assert_close(sample(full, people, use_local=False), sample(global_only, people), rtol=0, atol=1e-6)
    torch.testing.assert_close(sample(full, people, use_global=False), sample(local_only, people), rtol=0, atol=1e-6)
    assert (sample(full, people) - sample(global_only, people)).abs().max() > 1e-4  # the local branch does contribute


@pytest.mark.parametrize("n_people", [1, 2, 3])
def test_each_person_gets_one_local_and_one_global_pass_per_step(joint, n_people, monkeypatch):
    pipe = joint.pipeline()
    calls = {"local": [], "global": []}
    for name, branch in (("local", pipe.local_branch), ("global", pipe.global_branch)):
        original = branch.forward

        def counted(*a, _orig=original, _name=name, **k):
            calls[_name].append(a[0].shape[0])
            return _orig(*a, **k)

        monkeypatch.setattr(branch, "forward", counted)
    boxes = [(2, 2, 20, 20), (24, 24, 42, 42), (44, 2, 62, 20)][:n_people]
    sample(pipe, [person(b, i) for i, b in enumerate(boxes)], num_inference_steps=4)
    assert len(calls["local"]) == 4 * n_people and len(calls["global"]) == 4 * n_people
    # each pass carries the distinct guidance conditions in one batch: on SD1.5 the branches see the same
    # inputs in the "none" and "text" rows, so 2 rows (identity on from the first step at 4 steps x 0.1 delay)
    assert set(calls["local"]) == set(calls["global"]) == {2}


def test_local_residuals_zero_outside_every_box(joint):
    pipe = joint.pipeline()
    boxes = [(0, 0, 16, 16), (40, 36, 64, 60)]
    inputs = [pipe.person_inputs(person(b, i)) for i, b in enumerate(boxes)]
    x = torch.randn(3, 4, 32, 32)
    down, mid = pipe.step_residuals(x, torch.tensor([500] * 3), inputs, True, use_global=False)
    from realisid.geometry import box_at_scale

    for r in down + [mid]:
        inside = torch.zeros(r.shape[-2:], dtype=torch.bool)
        for p in inputs:
            lb = p["latent_box"][0]
            x0, y0, x1, y1 = box_at_scale(lb, r.shape[-1] / 32, r.shape[-1], r.shape[-2])
            inside[y0:y1, x0:x1] = True
        assert r[..., ~inside].abs().max() == 0 and r[..., inside].abs().max() > 0


def test_sum_and_average_rules(joint):
    pipe = joint.pipeline()
    one = [pipe.person_inputs(person((8, 8, 32, 32)))]
    two = one * 2
    x, t = torch.randn(3, 4, 32, 32), torch.tensor([400] * 3)
    g1 = pipe.step_residuals(x, t, one, True, use_local=False)
    g2 = pipe.step_residuals(x, t, two, True, use_local=False)
    for a, b in zip(g1[0] + [g1[1]], g2[0] + [g2[1]]):
        torch.testing.assert_close(a, b)  # averaged: two identical people = one
    l1 = pipe.step_residuals(x, t, one, True, use_global=False)
    l2 = pipe.step_residuals(x, t, two, True, use_global=False)
    for a, b in zip(l1[0] + [l1[1]], l2[0] + [l2[1]]):
        torch.testing.assert_close(2 * a, b)  # summed over people


def test_seed_determinism_and_identity_delay(joint):
    pipe = joint.pipeline()
    people = [person((8, 8, 32, 32))]
    a, b, c = sample(pipe, people, seed=3), sample(pipe, people, seed=3), sample(pipe, people, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # with the identity delayed over all steps the identity guidance term vanishes: g_id has no effect
    d1 = sample(pipe, people, id_delay=1.0, guidance_id=0.0)
    d2 = sample(pipe, people, id_delay=1.0, guidance_id=9.0)
    torch.testing.assert_close(d1, d2, rtol=0, atol=1e-4)  # rows of one batch may differ in the last bits
    e1 = sample(pipe, people, id_delay=0.0, guidance_id=0.0)
    e2 = sample(pipe, people, id_delay=0.0, guidance_id=9.0)
    assert (e1 - e2).abs().max() > 1e-3  # without the delay, identity guidance changes the sample


@pytest.mark.parametrize("kind", ["ddpm", "euler_a", "dpm_sde", "dpm", "euler"])
def test_every_sampler_is_fixed_by_the_seed_alone(joint, kind):
    pipe = joint.pipeline()
    people = [person((8, 8, 32, 32))]
    torch.manual_seed(11)  # the global RNG must not reach the sample: a stochastic sampler's step noise is seeded
    a = sample(pipe, people, seed=3, scheduler=kind)
    torch.manual_seed(12)
    assert torch.equal(a, sample(pipe, people, seed=3, scheduler=kind))
    assert not torch.equal(a, sample(pipe, people, seed=4, scheduler=kind))
    assert not torch.equal(a, sample(pipe, people, seed=3))  # not DDIM's path


def test_stochastic_samplers_draw_fresh_noise_each_step_and_the_others_do_not(joint):
    from realisid.models.samplers import SAMPLERS, sampler_step

    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for kind in SAMPLERS:
        steps = []
        for seed in (1, 2):
            sched = joint.backbone.sampling_scheduler(kind)
            sched.set_timesteps(5)
            t = sched.timesteps[1]
            sched.step(out, sched.timesteps[0], sched.scale_model_input(x, sched.timesteps[0]), generator=torch.Generator().manual_seed(0))
            steps.append(sampler_step(sched, out, t, x, torch.Generator().manual_seed(seed)))
        stochastic = kind in ("ddpm", "euler_a", "dpm_sde")
        assert torch.equal(steps[0], steps[1]) != stochastic, kind
    with pytest.raises(ValueError, match="scheduler 'heun' unknown; valid: ddim, dpm, euler, ddpm, euler_a, dpm_sde"):
        joint.backbone.sampling_scheduler("heun")


def test_identity_guidance_until_stops_the_identity_scale_after_that_fraction_of_steps(joint):
    pipe = joint.pipeline()
    people = [person((8, 8, 32, 32))]
    torch.testing.assert_close(sample(pipe, people, id_guidance_until=1.0), sample(pipe, people))  # 1: the old behaviour
    # until 0: g_id is 1 on every step, so the identity scale has no effect (identity still conditions, unamplified)
    a = sample(pipe, people, id_guidance_until=0.0, guidance_id=0.0)
    b = sample(pipe, people, id_guidance_until=0.0, guidance_id=9.0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    ones = sample(pipe, people, guidance_id=1.0)
    torch.testing.assert_close(a, ones, rtol=0, atol=1e-4)
    # until 0.5 on 4 steps: the scale acts on the first 2 steps only, so the sample differs from both ends
    half = sample(pipe, people, id_guidance_until=0.5, guidance_id=9.0, num_inference_steps=4)
    assert (half - sample(pipe, people, guidance_id=1.0, num_inference_steps=4)).abs().max() > 1e-3
    assert (half - sample(pipe, people, guidance_id=9.0, num_inference_steps=4)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="id_guidance_until=1.5"):
        sample(pipe, people, id_guidance_until=1.5)


def test_identity_guidance_by_bin_gives_each_face_size_its_own_scale(joint):
    from realisid.geometry import bins_from_config
    from realisid.pipeline import identity_guidance_map

    pipe = joint.pipeline()
    assert pipe.bins == bins_from_config(joint.cfg.bins)  # the run's bins, not the defaults
    people = [person((8, 8, 32, 32))]  # 24 px of 64: the large bin
    default = sample(pipe, people)
    torch.testing.assert_close(sample(pipe, people, guidance_id_by_bin={}), default)  # empty: off
    # one person: the whole picture takes its bin's scale, so it equals that scalar guidance_id
    torch.testing.assert_close(sample(pipe, people, guidance_id_by_bin={"large": 9}), sample(pipe, people, guidance_id=9.0),
                               rtol=0, atol=1e-5)
    # a bin the mapping leaves out keeps guidance_id
    torch.testing.assert_close(sample(pipe, people, guidance_id_by_bin={"tiny": 9}), default, rtol=0, atol=1e-5)
    assert (sample(pipe, people, guidance_id_by_bin={"large": 9}) - default).abs().max() > 1e-3
    with pytest.raises(ValueError, match="'huge' is not a face-size bin; use the bins"):
        sample(pipe, people, guidance_id_by_bin={"huge": 3})
    with pytest.raises(ValueError, match="large=-1 is not a guidance scale"):
        sample(pipe, people, guidance_id_by_bin={"large": -1})
    # two people in different bins: each one's scale inside its crop box (latent pixels), their mean elsewhere
    two = [{"bin": "tiny", "crop_box": [0, 0, 16, 16]}, {"bin": "large", "crop_box": [32, 32, 64, 64]}]
    g = identity_guidance_map(two, 5.0, {"tiny": 7, "large": 3}, (8, 8), 8)
    assert g.shape == (1, 1, 8, 8)
    assert torch.all(g[..., 0:2, 0:2] == 7) and torch.all(g[..., 4:8, 4:8] == 3)
    assert g[0, 0, 0, 7] == 5 and g[0, 0, 3, 3] == 5 and (g == 5).sum() == 64 - 4 - 16
    assert identity_guidance_map(two, 5.0, None, (8, 8), 8) == 5.0


def test_img2img_runs_the_last_strength_of_the_steps_from_the_noised_image(joint, monkeypatch):
    pipe = joint.pipeline()
    people = [person((8, 8, 32, 32))]
    g = torch.Generator().manual_seed(7)
    img, other = torch.rand(3, 64, 64, generator=g) * 2 - 1, torch.rand(3, 64, 64, generator=g) * 2 - 1
    # strength 1: from noise, the image ignored
    torch.testing.assert_close(sample(pipe, people, image=img, strength=1.0), sample(pipe, people), rtol=0, atol=0)
    # strength 0: no step runs; the image through the VAE (posterior sampled with the seed's generator after the noise)
    g0 = torch.Generator().manual_seed(0)
    h = pipe.resolution // pipe.backbone.vae_scale_factor
    torch.randn((1, pipe.backbone.latent_channels, h, h), generator=g0)
    through_vae = pipe.backbone.decode_latents(pipe.backbone.encode_images(img[None], generator=g0).float())
    torch.testing.assert_close(sample(pipe, people, image=img, strength=0.0), through_vae, rtol=0, atol=1e-5)
    # strength 0.5 of 4 steps: the last 2 steps run, and the start image shows in the sample
    calls = []
    original = pipe.backbone.unet.forward
    monkeypatch.setattr(pipe.backbone.unet, "forward", lambda *a, **k: calls.append(int(a[1][0])) or original(*a, **k))
    a = sample(pipe, people, image=img, strength=0.5, num_inference_steps=4)
    sched = pipe.backbone.sampling_scheduler("ddim")
    sched.set_timesteps(4)
    assert calls == [int(t) for t in sched.timesteps[2:]]
    monkeypatch.undo()
    assert (a - sample(pipe, people, image=other, strength=0.5, num_inference_steps=4)).abs().max() > 1e-3
    for kw, needle in (({"image": img, "strength": 1.5}, "strength=1.5"), ({"strength": 0.5}, "needs an image"),
                       ({"image": img[:, :32], "strength": 0.5}, "of shape")):
        with pytest.raises(ValueError, match=needle):
            sample(pipe, people, **kw)


def test_guidance_rescale_matches_the_conditioned_spread_and_blends_by_phi():
    from realisid.pipeline import rescale_guidance

    g = torch.Generator().manual_seed(0)
    cond = torch.randn(2, 4, 8, 8, generator=g)
    guided = 3.0 * cond + torch.randn(2, 4, 8, 8, generator=g)  # large guidance inflates the spread
    assert rescale_guidance(guided, cond, 0.0) is guided
    full = rescale_guidance(guided, cond, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))  # each sample's own spread
    torch.testing.assert_close(full / guided, (full / guided)[:, :1, :1, :1].expand_as(full))  # a per-sample scale only
    torch.testing.assert_close(rescale_guidance(guided, cond, 0.7), 0.7 * full + 0.3 * guided)


def test_guidance_rescale_changes_the_sample_and_refuses_values_outside_0_1(joint):
    pipe = joint.pipeline()
    people = [person((8, 8, 32, 32))]
    plain, rescaled = sample(pipe, people, guidance_rescale=0.0), sample(pipe, people, guidance_rescale=0.7)
    torch.testing.assert_close(plain, sample(pipe, people))  # 0 is the old behaviour
    assert (plain - rescaled).abs().max() > 1e-3
    with pytest.raises(ValueError, match="guidance_rescale=1.5"):
        sample(pipe, people, guidance_rescale=1.5)


def test_export_reload_gives_same_sample(joint, tmp_path):
    joint.export(str(tmp_path / "export"))
    reloaded = RealisIDPipeline.from_export(str(tmp_path / "export"), backbone=joint.backbone)
    people = [person((8, 8, 32, 32)), person((36, 30, 60, 54), 1)]
    torch.testing.assert_close(sample(reloaded, people), sample(joint.pipeline(), people), rtol=0, atol=1e-5)


def test_check_boxes_errors():
    ok = dict(min_box=8, max_overlap=0.3, vae_scale_factor=2)
    check_boxes([(0, 0, 20, 20), (30, 30, 60, 60)], 64, **ok)
    with pytest.raises(ValueError, match="outside the 64x64"):
        check_boxes([(50, 50, 70, 70)], 64, **ok)
    with pytest.raises(ValueError, match="too small to crop"):
        check_boxes([(10, 10, 14, 30)], 64, **ok)
    with pytest.raises(ValueError, match="overlap with IoU"):
        check_boxes([(0, 0, 30, 30), (5, 5, 35, 35)], 64, **ok)


@pytest.fixture(scope="module")
def run_dir(joint, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    joint.export(str(run / "export"))
    return run


def _refs(tmp_path):
    paths = []
    for i, colour in enumerate([(200, 150, 120), (120, 90, 60)]):
        p = tmp_path / f"ref{i}.jpg"
        Image.new("RGB", (48, 48), colour).save(p)
        paths.append(str(p))
    return paths


def test_generate_cli_two_people(run_dir, tmp_path, capsys):
    from realisid.cli import main

    a, b = _refs(tmp_path)
    json.dump({"bbox": [8, 8, 40, 40], "kps": [[18, 20], [30, 20], [24, 27], [19, 34], [29, 34]]}, open(tmp_path / "ref0.json", "w"))
    out = tmp_path / "out" / "two.png"
    rc = main(["generate", "--run", str(run_dir), "--prompt", "a photo of two people", "--ref", a, "--box", "2,10,26,34",
               "--ref", b, "--box", "36,10,60,34", "--out", str(out), "--seed", "5", "--steps", "2", "--analyzer", "none",
               "--guidance-id-by-bin", "large=3,tiny=6"])
    assert rc == 0
    assert Image.open(out).size == (64, 64)
    rec = json.load(open(tmp_path / "out" / "two.json"))
    assert rec["seed"] == 5 and rec["steps"] == 2 and len(rec["people"]) == 2 and rec["branches"] == ["local", "global"]
    assert rec["guidance_id_by_bin"] == {"large": 3.0, "tiny": 6.0} and rec["people"][0]["bin"] == "large"
    assert rec["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert rec["people"][0]["box"] == [2, 10, 26, 34] and "ref0.json" in rec["people"][0]["reference_face"]
    assert rec["people"][1]["reference_face"].startswith("whole image")
    # landmarks from the reference face, moved into the target box: left eye at (18-8)/32*24+2 = 9.5
    assert rec["people"][0]["kps"][0] == pytest.approx([9.5, 19.0])


@pytest.mark.parametrize("args,needle", [
    (["--box", "50,50,80,80"], "outside the 64x64"),
    (["--box", "10,10,13,13"], "too small to crop"),
    (["--box", "2,10,26,34", "--ref", "REF", "--box", "4,12,28,36"], "overlap with IoU"),
    (["--box", "2,10,26,34", "--guidance-rescale", "1.5"], "guidance_rescale=1.5: give a value in [0, 1]"),
    (["--box", "2,10,26,34", "--id-guidance-until", "-0.2"], "id_guidance_until=-0.2: give a fraction of the steps in"),
    (["--box", "2,10,26,34", "--guidance-id-by-bin", "huge=3"], "'huge' is not a face-size bin; use the bins"),
    (["--box", "2,10,26,34", "--guidance-id-by-bin", "large"], "give BIN=SCALE pairs separated by commas"),
])
def test_generate_cli_bad_boxes_one_line(run_dir, tmp_path, capsys, args, needle):
    from realisid.cli import main

    a, _ = _refs(tmp_path)
    argv = ["generate", "--run", str(run_dir), "--prompt", "x", "--ref", a] + [a if v == "REF" else v for v in args]
    assert main(argv + ["--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_generate_cli_img2img_and_its_bad_inputs(run_dir, tmp_path, capsys):
    import numpy as np
    from realisid.cli import main

    a, _ = _refs(tmp_path)
    rng = np.random.default_rng(0)
    square, wide = tmp_path / "start.png", tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(square)   # resized to the run's 64 px
    Image.new("RGB", (80, 64), (90, 90, 90)).save(wide)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    base = ["generate", "--run", str(run_dir), "--prompt", "x", "--ref", a, "--box", "2,10,26,34", "--steps", "4", "--analyzer", "none"]
    outs = {}
    for name, extra in (("noise", []), ("half", ["--init-image", str(square), "--strength", "0.5"]),
                        ("default", ["--init-image", str(square)])):
        assert main(base + extra + ["--out", str(tmp_path / f"{name}.png")]) == 0
        outs[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), np.float32)
    rec = json.load(open(tmp_path / "half.json"))
    assert rec["strength"] == 0.5 and rec["init_image"] == str(square)
    assert json.load(open(tmp_path / "default.json"))["strength"] == 0.75 and "strength" not in json.load(open(tmp_path / "noise.json"))
    assert np.abs(outs["half"] - outs["noise"]).max() > 1 and np.abs(outs["half"] - outs["default"]).max() > 1
    for extra, needle in ((["--strength", "0.5"], "--strength 0.5 needs --init-image"),
                          (["--init-image", str(wide)], "is 80x64: give a square photo"),
                          (["--init-image", str(tmp_path / "missing.png")], "no such file"),
                          (["--init-image", str(tmp_path / "broken.png")], "not a readable image"),
                          (["--init-image", str(square), "--strength", "1.5"], "strength=1.5: give a value in [0, 1]")):
        assert main(base + extra + ["--out", str(tmp_path / "bad.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err and "Traceback" not in err
        assert not (tmp_path / "bad.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_generate_cli_cuda_without_a_gpu_is_one_line(run_dir, tmp_path, capsys):
    from realisid.cli import main

    a, _ = _refs(tmp_path)
    rc = main(["generate", "--run", str(run_dir), "--prompt", "x", "--ref", a, "--box", "2,10,26,34", "--out", str(tmp_path / "o.png"),
               "--device", "cuda", "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--device cuda but this machine has no CUDA device; use --device cpu" in err and "\n" not in err


def test_generate_reference_without_face(run_dir, tmp_path, capsys):
    """With a face analyzer configured, a reference in which it finds no face is a one-line error."""
    import onnx_models
    from omegaconf import OmegaConf

    from realisid.cli import main

    models = tmp_path / "models"
    models.mkdir()
    onnx_models.make_scrfd(str(models / "det.onnx"))
    onnx_models.make_arcface(str(models / "rec.onnx"), dim=64)
    cfg = OmegaConf.load(run_dir / "export" / "config.yaml")
    cfg.faces.kind, cfg.faces.model_dir = "insightface", str(models)
    run = tmp_path / "run2"
    import shutil

    shutil.copytree(run_dir / "export", run / "export")
    OmegaConf.save(cfg, run / "export" / "config.yaml")
    blank = tmp_path / "blank.jpg"
    Image.new("RGB", (64, 64), (0, 0, 0)).save(blank)
    assert main(["generate", "--run", str(run), "--prompt", "x", "--ref", str(blank), "--box", "8,8,40,40", "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no face found" in err and str(blank) in err and "\n" not in err


def test_cfg_rows_with_identical_branch_inputs_run_once(joint, monkeypatch):
    """Issue 11, defect 10: the branches run on the distinct guidance rows only (SD1.5: "none" and "text" give
    them the same inputs; during the identity delay all three do) and the residuals equal a 3-row pass."""
    pipe = joint.pipeline()
    rows = {"local": 0, "global": 0}
    for name, branch in (("local", pipe.local_branch), ("global", pipe.global_branch)):
        original = branch.forward

        def counted(*a, _orig=original, _name=name, **k):
            rows[_name] += a[0].shape[0]
            return _orig(*a, **k)

        monkeypatch.setattr(branch, "forward", counted)
    sample(pipe, [person((8, 8, 32, 32))], num_inference_steps=4, id_delay=0.25)  # 1 step without identity, 3 with
    assert rows == {"local": 1 + 3 * 2, "global": 1 + 3 * 2}  # was 4 x 3 rows each
    monkeypatch.undo()
    assert pipe.branch_rows(True) == ([0, 2], [0, 0, 1]) and pipe.branch_rows(False) == ([0], [0, 0, 0])
    sdxl_added = {"text_embeds": torch.zeros(3, 8), "time_ids": torch.zeros(3, 6)}
    assert pipe.branch_rows(True, sdxl_added) == ([0, 1, 2], [0, 1, 2]) and pipe.branch_rows(False, sdxl_added) == ([0, 1], [0, 1, 1])
    # the deduplicated residuals equal the branches run on all three rows
    p = pipe.person_inputs(person((8, 8, 32, 32)))
    x, t = torch.randn(1, 4, 32, 32).expand(3, -1, -1, -1), torch.tensor([500] * 3)
    tokens = torch.cat([torch.zeros_like(p["tokens"])] * 2 + [p["tokens"]])
    with torch.no_grad():
        down, mid = pipe.step_residuals(x, t, [p], True)
        ld, lm = pipe.local_branch(x, t, tokens, p["pe_map"].expand(3, -1, -1, -1), p["latent_box"] * 3)
        gd, gm = pipe.global_branch(x, t, tokens, p["loc_map"].expand(3, -1, -1, -1))
    for a, b in zip(down + [mid], [u + v for u, v in zip(ld, gd)] + [lm + gm]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_half_precision_sampler_keeps_fp32_latents(joint):
    """Issue 11, defect 1 (sampling): with a bf16 backbone the DDIM state stays fp32 across steps; only each
    pass's input is cast. (Stepping in bf16 rounds the latent to 8 bits of mantissa every step.)"""
    import copy

    pipe = joint.pipeline()
    half = RealisIDPipeline(copy.deepcopy(joint.backbone).to(torch.bfloat16), joint.id_encoder, joint.projector, joint.local_branch,
                            joint.global_branch, resolution=64, crop_expand=1.6, local_latent_size=16)
    seen = []
    sched_cls = type(half.backbone.sampling_scheduler("ddim"))
    original = sched_cls.step

    def spy(self, model_output, timestep, sample, *a, **k):
        seen.append((model_output.dtype, sample.dtype))
        return original(self, model_output, timestep, sample, *a, **k)

    sched_cls.step = spy
    try:
        out = half("a photo of a person", [person((8, 8, 32, 32))], num_inference_steps=3, seed=0, output_type="pt")
    finally:
        sched_cls.step = original
    assert seen and all(d == (torch.float32, torch.float32) for d in seen)
    assert out.latents.dtype == torch.float32
    ref = pipe("a photo of a person", [person((8, 8, 32, 32))], num_inference_steps=3, seed=0, output_type="pt")
    assert (out.latents - ref.latents).abs().max() < 0.1 * ref.latents.abs().max()  # the same sample up to bf16 passes


def test_pipeline_moves_to_a_device_and_dtype(joint, tmp_path):
    """Issue 11, defect 2: from_export / pipeline.to take a device and a dtype for the frozen parts; the trained
    parts stay fp32; a CUDA device on a machine without one is refused with the fix named."""
    from realisid.pipeline import resolve_device

    joint.export(str(tmp_path / "export"))
    pipe = RealisIDPipeline.from_export(str(tmp_path / "export"), backbone=__import__("copy").deepcopy(joint.backbone), device="cpu",
                                        dtype="bf16")
    assert pipe.device.type == "cpu" and pipe.backbone.unet.dtype == torch.bfloat16 and pipe.backbone.text_encoder.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for part in (pipe.projector, pipe.local_branch, pipe.global_branch) for p in part.parameters())
    img = pipe("a photo of a person", [person((8, 8, 32, 32))], num_inference_steps=2, seed=0, output_type="pt").images
    assert img.dtype in (torch.float32, torch.bfloat16) and torch.isfinite(img.float()).all()
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device; use --device cpu"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="--dtype 'fp8'"):
        pipe.to("cpu", "fp8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pipeline_samples_on_the_gpu_in_half_precision(joint, tmp_path):
    joint.export(str(tmp_path / "export"))
    pipe = RealisIDPipeline.from_export(str(tmp_path / "export"), device=None)
    assert pipe.device.type == "cuda" and pipe.backbone.unet.dtype == torch.float16
    out = pipe("a photo of a person", [person((8, 8, 32, 32))], num_inference_steps=4, seed=0, output_type="pt")
    assert out.latents.dtype == torch.float32 and torch.isfinite(out.images.float()).all()


def test_reference_keypoints_reach_the_identity_encoder(joint, tmp_path, monkeypatch):
    """Issue 11, defect 5 (inference): the reference's detected key points, moved into the identity crop, are what
    the encoder aligns with (inference used a frontal template and dropped the landmarks it had just found)."""
    from realisid.images import identity_crop_kps
    from realisid.pipeline import reference_person

    a, _ = _refs(tmp_path)
    kps = [[16, 22], [30, 20], [24, 28], [18, 34], [29, 35]]
    json.dump({"bbox": [8, 8, 40, 40], "kps": kps}, open(tmp_path / "ref0.json", "w"))
    person_, _ = reference_person(a, (2, 10, 26, 34), 32)
    want = identity_crop_kps(kps, [8, 8, 40, 40], 48, 48, 32)
    torch.testing.assert_close(person_.id_kps, torch.from_numpy(want))
    pipe = joint.pipeline()
    seen = {}
    original = pipe.id_encoder.forward
    monkeypatch.setattr(pipe.id_encoder, "forward", lambda images, mask=None, kps=None: (seen.update(kps=kps), original(images, mask, kps=kps))[1])
    pipe.person_inputs(person_)
    torch.testing.assert_close(seen["kps"], torch.from_numpy(want)[None])
