"""Experiment configs: OmegaConf YAML with ``defaults:`` inheritance, strict dot-list overrides.

An experiment file states only what differs from what it inherits. Every key it sets, and every override
given on the command line, must already exist in what it inherits: a misspelt key fails with its name
and the nearest valid keys instead of silently creating a new one. A value the user must give (``???``,
e.g. ``model.pretrained`` in the real-weight experiments) fails at loading, naming the key and how to give it.
"""
from __future__ import annotations

import difflib
import os
from typing import Iterable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from realisid.embedded.assets import register_resolver

register_resolver()  # ${asset:NAME}: a model shipped with the package (the embedded default's stand-ins)
EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


class ConfigError(ValueError):
    """A config problem, with the offending key or value and what to do about it."""


def all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k in cfg.keys():
        path = f"{prefix}{k}"
        keys.append(path)
        node = cfg._get_node(k)
        if isinstance(node, DictConfig) and not node._is_none():
            keys.extend(all_keys(node, path + "."))
    return keys


def _nearest(key: str, cfg: DictConfig) -> str:
    keys = all_keys(cfg)
    near = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    if not near:  # compare the last component too: "trainer.max_step" vs "trainer.max_steps"
        leaf = key.rsplit(".", 1)[-1]
        near = [k for k in keys if difflib.SequenceMatcher(None, leaf, k.rsplit(".", 1)[-1]).ratio() > 0.75][:3]
    return ", ".join(near) if near else "(none close; see experiments/base.yaml)"


def _check_keys(child: DictConfig, parent: DictConfig, source: str, prefix: str = "") -> None:
    """Every key of ``child`` must exist in ``parent`` (unless the parent value is an open dict/None)."""
    for k in child.keys():
        path = f"{prefix}{k}"
        if k not in parent.keys():  # (a ??? value is "not in" the mapping itself)
            raise ConfigError(f"unknown key '{path}' in {source}; nearest valid keys: {_nearest(path, _root(parent))}")
        pnode = parent._get_node(k)
        cnode = child._get_node(k)
        if isinstance(cnode, DictConfig) and isinstance(pnode, DictConfig) and not pnode._is_none() and not _is_open(pnode):
            _check_keys(cnode, pnode, source, path + ".")


def _root(cfg: DictConfig) -> DictConfig:
    while cfg._get_parent() is not None:
        cfg = cfg._get_parent()
    return cfg


def _is_open(node: DictConfig) -> bool:
    """A mapping whose keys are data (bins, sweep axes), marked by ``_open_: true`` or being empty."""
    return len(node) == 0 or bool(node.get("_open_", False))


def _resolve_path(name: str, base_dir: str) -> str:
    path = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
    if not os.path.isabs(path):
        path = os.path.normpath(os.path.join(base_dir, path))
    return path


def load_yaml_tree(path: str, _seen: tuple[str, ...] = ()) -> DictConfig:
    """Load one YAML file, merging the files its ``defaults:`` list names (relative to experiments/) first."""
    if not os.path.exists(path):
        raise ConfigError(f"config file '{path}' does not exist; experiments are in {EXPERIMENTS_DIR}: {', '.join(list_experiments())}")
    if path in _seen:
        raise ConfigError(f"config inheritance loop: {' -> '.join(_seen + (path,))}")
    cfg = OmegaConf.load(path)
    defaults = cfg.pop("defaults", []) if isinstance(cfg, DictConfig) else []
    defines_keys = bool(cfg.pop("_schema_", False)) if isinstance(cfg, DictConfig) else False
    if isinstance(defaults, str):
        defaults = [defaults]
    merged = None
    for d in defaults:
        parent = load_yaml_tree(_resolve_path(str(d), EXPERIMENTS_DIR), _seen + (path,))
        merged = parent if merged is None else OmegaConf.merge(merged, parent)
    if merged is None:
        return cfg
    if not defines_keys:  # only the schema root (base.yaml) may add keys; experiments change values
        _check_keys(cfg, merged, os.path.relpath(path))
    out = OmegaConf.merge(merged, cfg)
    for key in unset_keys(cfg):  # a merge keeps the inherited value under ???; the file means "the user gives it"
        OmegaConf.update(out, key, "???", merge=False)
    return out


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Apply ``key=value`` overrides; each key must exist already."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. trainer.max_steps=50")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("+")
        if not _has_key(cfg, key) and not _parent_open(cfg, key):
            raise ConfigError(f"unknown key '{key}' in override '{item}'; nearest valid keys: {_nearest(key, cfg)}")
        parsed = OmegaConf.from_dotlist([f"{key}={value}"])
        old = OmegaConf.select(cfg, key)
        new = OmegaConf.select(parsed, key)
        _check_type(key, old, new)
        cfg = OmegaConf.merge(cfg, parsed)
    return cfg


def _has_key(cfg: DictConfig, key: str) -> bool:
    """``key`` exists, with a value or still ``???`` (which ``OmegaConf.select`` reports as absent)."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    return isinstance(parent, DictConfig) and leaf in parent.keys()  # "in parent" is False for a ??? value


def unset_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """The keys whose value is ``???``, sorted; nothing is resolved (a file's interpolations may point outside it)."""
    out = []
    for k in cfg.keys():
        node, path = cfg._get_node(k), f"{prefix}{k}"
        if node._is_missing():
            out.append(path)
        elif isinstance(node, DictConfig) and not node._is_none() and not node._is_interpolation():
            out.extend(unset_keys(node, path + "."))
    return sorted(out)


# what a ``???`` key takes, shown in the error (keys not listed show KEY=...)
VALUE_EXAMPLES = {"model.pretrained": "/path/to/local/diffusers/folder", "model.id_encoder.path": "/path/to/insightface/model_folder"}


def check_mandatory(cfg: DictConfig, exp: str) -> None:
    """Every ``???`` value must have been given; the error names each key and the command line that gives it."""
    missing = unset_keys(cfg)
    if missing:
        given = " ".join(f"{k}={VALUE_EXAMPLES.get(k, '...')}" for k in missing)
        raise ConfigError(f"experiment '{exp}' leaves {', '.join(missing)} without a value (???): give "
                          f"{'it' if len(missing) == 1 else 'them'} after the experiment name, e.g. "
                          f"make train EXP={exp} ARGS=\"{given}\" (or python -m realisid train {exp} {given})")


def _parent_open(cfg: DictConfig, key: str) -> bool:
    if "." not in key:
        return False
    parent = OmegaConf.select(cfg, key.rsplit(".", 1)[0])
    return isinstance(parent, DictConfig) and _is_open(parent)


# diffusers model settings that take one number for every block or a list of one per block
PER_BLOCK_KEYS = frozenset({"layers_per_block", "attention_head_dim", "num_attention_heads", "transformer_layers_per_block"})


def _int_or_ints(v) -> bool:
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    return is_int(v) or (isinstance(v, (ListConfig, list)) and len(v) > 0 and all(is_int(x) for x in v))


def _check_type(key: str, old, new) -> None:
    """Refuse overrides that change a value's kind (a string for a number, a number for a list), except that a
    per-block model setting (:data:`PER_BLOCK_KEYS`) takes a number or a list of numbers either way."""
    if old is None or new is None:
        return
    num = (int, float)
    if key.rsplit(".", 1)[-1] in PER_BLOCK_KEYS and _int_or_ints(old) and _int_or_ints(new):
        return
    if isinstance(old, bool) or isinstance(new, bool):
        ok = isinstance(old, bool) and isinstance(new, bool)
    elif isinstance(old, num):
        ok = isinstance(new, num) and not (isinstance(old, int) and isinstance(new, float) and not float(new).is_integer())
    elif isinstance(old, (ListConfig, list)):
        ok = isinstance(new, (ListConfig, list))
    elif isinstance(old, (DictConfig, dict)):
        ok = isinstance(new, (DictConfig, dict))
    else:
        ok = True  # strings accept anything written on a command line
    if not ok:
        raise ConfigError(f"override {key}={new!r} has the wrong type: '{key}' is {type(old).__name__} (currently {old!r})")


def experiment_path(name: str) -> str:
    if os.path.exists(name) and name.endswith((".yaml", ".yml")):
        return os.path.abspath(name)
    return _resolve_path(name, EXPERIMENTS_DIR)


def list_experiments() -> list[str]:
    out = []
    for root, _dirs, files in os.walk(EXPERIMENTS_DIR):
        for f in files:
            if f.endswith(".yaml"):
                out.append(os.path.relpath(os.path.join(root, f), EXPERIMENTS_DIR)[:-5])
    return sorted(out)


def load_config(exp: str, overrides: Iterable[str] = ()) -> DictConfig:
    """The merged config of experiment ``exp`` (a name under experiments/ or a YAML path) plus overrides."""
    path = experiment_path(exp)
    if not os.path.exists(path):
        near = difflib.get_close_matches(exp, list_experiments(), n=3)
        raise ConfigError(f"experiment '{exp}' not found at {path}; nearest: {', '.join(near) or 'none'}; all: {', '.join(list_experiments())}")
    cfg = load_yaml_tree(path)
    cfg = apply_overrides(cfg, list(overrides))
    if "experiment" in cfg and cfg.experiment.get("name") in (None, "", "???"):
        cfg.experiment.name = os.path.splitext(os.path.relpath(path, EXPERIMENTS_DIR))[0].replace(os.sep, "-")
    check_mandatory(cfg, exp)
    return cfg


def save_config(cfg: DictConfig, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)
