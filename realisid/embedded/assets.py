"""Where the embedded default's shipped models live, and the config resolver that names them.

``make pretrain`` writes them into the package (``realisid/assets/``): a config refers to one as
``${asset:tiny-sd}``, which resolves to its folder wherever the package is installed.
"""
from __future__ import annotations

import json
import os

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
RECORD = "PRETRAINED.json"


def asset_path(name: str = "") -> str:
    """The folder (or file) ``name`` of the shipped assets; ``""``: the assets folder itself."""
    return os.path.join(ASSETS_DIR, str(name)) if name else ASSETS_DIR


def pretrained_record(assets_dir: str = ASSETS_DIR) -> dict | None:
    """What ``make pretrain`` recorded about the shipped models (recipe, wall times, accuracy), or None."""
    path = os.path.join(assets_dir, RECORD)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def register_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_resolver("asset", asset_path)
