import os

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
    assert again.trainer.max_steps == cfg.trainer.max_steps
    assert os.path.exists(tmp_path / "run" / "config.yaml")
