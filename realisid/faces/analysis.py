"""The face-analysis interface: what the rest of RealisID asks of a face detector / identity encoder.

A :class:`FaceAnalyzer` finds faces (box, 5 keypoints, score, optionally dense contours and an identity
embedding) in an RGB ``uint8`` image and embeds a face given its 5 keypoints. Implementations are
chosen by ``cfg["kind"]`` through :func:`realisid.faces.registry.load_face_analyzer`; each backend registers
its kind there (``"insightface"``, ``"synthetic"``, ``"yunet-sface"``, ``"dlib"``: docs/faces.md), and tests
or plugins may register more.

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

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

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
