
import pytest

from realisid.config import ConfigError, list_experiments, load_config, save_config


def test_experiment_states_only_differences():
    base = load_config("base")
    local = load_config("local_branch")
    assert local.experiment.module == "local"
    assert local.experiment.name == "local_branch"
    assert local.model == base.model and local.data == base.data


def test_overrides_apply_and_types_are_kept():
    cfg = load_config("local_branch", ["trainer.max_steps=50", "data.batch_size=2", "optim.lr=1e-5", "model.local.upsample=false"])
    assert cfg.trainer.max_steps == 50 and cfg.data.batch_size == 2 and cfg.optim.lr == 1e-5 and cfg.model.local.upsample is False


@pytest.mark.parametrize("override,needle", [
    ("trainer.max_step=5", "unknown key 'trainer.max_step'.*trainer.max_steps"),
    ("modle.id_tokens=3", "unknown key 'modle.id_tokens'.*model.id_tokens"),
    ("data.batch_size=abc", "wrong type.*data.batch_size.*int"),
    ("data.batch_size=2.5", "wrong type"),
    ("trainer.max_steps", "must look like key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("local_branch", [override])


def test_per_block_model_settings_take_a_number_or_a_list():
    cfg = load_config("base", ["model.tiny.unet.layers_per_block=[2,1,1]"])
    assert list(cfg.model.tiny.unet.layers_per_block) == [2, 1, 1]
    assert load_config("base", ["model.tiny.unet.attention_head_dim=4"]).model.tiny.unet.attention_head_dim == 4
    with pytest.raises(ConfigError, match="wrong type.*layers_per_block"):
        load_config("base", ["model.tiny.unet.layers_per_block=two"])
    with pytest.raises(ConfigError, match="wrong type.*layers_per_block"):
        load_config("base", ["model.tiny.unet.layers_per_block=[2,x]"])
    with pytest.raises(ConfigError, match="wrong type.*block_out_channels"):  # not a per-block setting: a list stays a list
        load_config("base", ["model.tiny.unet.block_out_channels=64"])


def test_unknown_key_in_experiment_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("defaults: [base]\ntrainer:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'trainer.max_stepz' in .*bad.yaml.*trainer.max_steps"):
        load_config(str(p))


def test_unknown_experiment_lists_valid_ones():
    with pytest.raises(ConfigError, match="local_branch"):
        load_config("local_brnch")
    assert "local_branch" in list_experiments()


def test_open_mapping_accepts_new_bins_and_config_saves(tmp_path):
    cfg = load_config("local_branch", ["bins.huge=[0.5,null]"])
    assert list(cfg.bins.huge) == [0.5, None]
    save_config(cfg, str(tmp_path / "run" / "config.yaml"))
    again = load_config(str(tmp_path / "run" / "config.yaml"))
    from omegaconf import OmegaConf

    a, b = OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(again, resolve=True)
    assert a == b  # the whole config survives the round trip, the new bin included
    assert b["bins"]["huge"] == [0.5, None]


REAL = {"sd15": {"layout": "sd15", "resolution": 512, "latent_size": 64}, "sdxl": {"layout": "sdxl", "resolution": 1024, "latent_size": 128}}
MODULES = {"local_branch": "local", "global_branch": "global", "joint": "joint"}


@pytest.mark.parametrize("backbone", sorted(REAL))
@pytest.mark.parametrize("exp", sorted(MODULES))
def test_real_run_experiments_state_paper_settings(backbone, exp):
    """sd15/* and sdxl/* load with model.pretrained given, and none of the tiny default's run settings is inherited."""
    from omegaconf import OmegaConf

    tiny = load_config(exp)
    cfg = load_config(f"{backbone}/{exp}", ["model.pretrained=/models/weights", "model.id_encoder.path=/models/buffalo_l"])
    want = REAL[backbone]
    assert cfg.experiment.module == MODULES[exp] and cfg.experiment.name == f"{backbone}-{exp}"
    assert cfg.model.pretrained == "/models/weights" and cfg.model.layout == want["layout"]
    assert cfg.data.resolution == want["resolution"] and cfg.model.local.latent_size == want["latent_size"]
    assert cfg.model.local.upsample is True
    assert list(cfg.model.local.conditioning_embedding_out_channels) == [16, 32, 96, 256]
    assert list(cfg.model["global"].conditioning_embedding_out_channels) == [16, 32, 96, 256]
    assert cfg.optim.lr == 1e-5 and cfg.optim.weight_decay == 1e-2 and cfg.data.batch_size == 16
    assert cfg.trainer.precision == "bf16-mixed" and cfg.model.backbone_dtype == "bf16"
    assert cfg.prepare.enabled is False and cfg.evaluation.every_n_validations == 0
    for key in ("optim.lr", "optim.warmup_steps", "trainer.max_steps", "trainer.val_check_interval", "trainer.checkpoint_every_n_steps",
                "data.resolution", "model.local.latent_size", "model.pretrained", "trainer.precision", "prepare.enabled"):
        assert OmegaConf.select(cfg, key) != OmegaConf.select(tiny, key), key
    assert cfg.trainer.max_steps >= 10 * cfg.optim.warmup_steps and cfg.trainer.max_steps > 100 * tiny.trainer.max_steps
    # nothing a real run uses points at the embedded default's stand-ins (realisid/assets)
    used = OmegaConf.to_container(cfg, resolve=True)
    for section in ("prepare", "pretrain"):  # `make pretrain` / the embedded preparation, off here
        used.pop(section)
    assert "assets" not in str(used), [k for k, v in used.items() if "assets" in str(v)]


@pytest.mark.parametrize("exp", [f"{b}/{m}" for b in sorted(REAL) for m in sorted(MODULES)] + ["sd15/base", "sdxl/base"])
def test_real_run_without_pretrained_names_the_key_and_the_fix(exp):
    with pytest.raises(ConfigError, match=rf"experiment '{exp}' leaves model.pretrained without a value \(\?\?\?\): give it .*"
                                          rf'make train EXP={exp} ARGS="model.pretrained=/path/to/local/diffusers/folder"'):
        load_config(exp, ["model.id_encoder.path=/models/buffalo_l"])
    # both missing: both named, each with what it takes
    with pytest.raises(ConfigError, match=r"leaves model.id_encoder.path, model.pretrained without a value .*give them .*"
                                          r'ARGS="model.id_encoder.path=/path/to/insightface/model_folder model.pretrained=/path/to/local'):
        load_config(exp)
    assert exp in list_experiments()


def test_real_run_cli_message(capsys):
    from realisid.cli import main

    assert main(["train", "sd15/local_branch"]) == 2
    err = capsys.readouterr().err
    assert 'make train EXP=sd15/local_branch ARGS="model.id_encoder.path=/path/to/insightface/model_folder model.pretrained=' in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_a_file_of_ones_own_may_give_a_mandatory_value(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("defaults: [sd15/joint]\nmodel:\n  pretrained: /models/sd15\n  id_encoder:\n    path: /models/buffalo_l\n"
                 "trainer:\n  max_steps: 7\n")
    cfg = load_config(str(p))
    assert cfg.model.pretrained == "/models/sd15" and cfg.trainer.max_steps == 7 and cfg.optim.lr == 1e-5
    p.write_text("defaults: [sd15/joint]\nmodel:\n  id_encoder:\n    path: /models/buffalo_l\ntrainer:\n  max_steps: 7\n")
    with pytest.raises(ConfigError, match="leaves model.pretrained without a value"):
        load_config(str(p))
