"""The insightface implementation of :class:`~realisid.faces.analysis.FaceAnalyzer` (insightface 2.x).

Every ``*.onnx`` in a model folder is loaded through insightface's own ``model_zoo.get_model`` and kept by
the task insightface routes it to (``detection`` = SCRFD, ``recognition`` = ArcFace, ``landmark_2d_106`` /
``landmark_3d_68``). A folder with an insightface *model-package manifest V2* (``manifest.json`` with
``"manifest_version": 2``) is loaded through its declared tasks instead, which also verifies the declared
SHA-256 of each file. Nothing is ever downloaded: insightface's download hooks are blocked while models load
and a model name that is not a local folder is an error, never a fetch.

insightface works on BGR images (``cv2.imread`` order); this class takes RGB, like the rest of RealisID,
and converts.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import threading
import warnings
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from realisid.faces.analysis import Face, FaceAnalyzer, as_rgb_uint8, l2_normalize
from realisid.faces.registry import register_face_analyzer

log = logging.getLogger(__name__)

FIX_HINT = "set faces.model_dir to an insightface model folder such as ~/.insightface/models/buffalo_l"

# Dense contours from insightface's 2d106det mark-up, as ordered polylines. The index lists are the
# widely used 106 -> iBUG-68 correspondence (brows 17-26, eyes 36-47, lips 48-67 of the 68-point order),
# so every contour is ordered along the feature the way the 68-point mark-up orders it.
LANDMARKS_106 = {
    "left_brow": [43, 48, 49, 51, 50],
    "right_brow": [102, 103, 104, 105, 101],
    "left_eye": [35, 41, 42, 39, 37, 36],
    "right_eye": [89, 95, 96, 93, 91, 90],
    "outer_lips": [52, 64, 63, 71, 67, 68, 61, 58, 59, 53, 56, 55],
    "inner_lips": [65, 66, 62, 70, 69, 57, 60, 54],
}
# The same contours in the iBUG 68-point order that insightface's 1k3d68 model predicts.
LANDMARKS_68 = {
    "left_brow": list(range(17, 22)),
    "right_brow": list(range(22, 27)),
    "left_eye": list(range(36, 42)),
    "right_eye": list(range(42, 48)),
    "outer_lips": list(range(48, 60)),
    "inner_lips": list(range(60, 68)),
}
LANDMARK_TASKS = ("landmark_2d_106", "landmark_3d_68")


def contours_from_points(points: np.ndarray) -> dict[str, list[list[float]]]:
    """Named contours (see :data:`realisid.faces.analysis.LANDMARK_NAMES`) from 106 or 68 dense points."""
    pts = np.asarray(points, dtype=np.float32)
    table = {106: LANDMARKS_106, 68: LANDMARKS_68}.get(pts.shape[0])
    if table is None:
        raise ValueError(f"dense landmarks must have 106 or 68 points, got {pts.shape[0]}")
    return {name: [[float(pts[i, 0]), float(pts[i, 1])] for i in idx] for name, idx in table.items()}


class DownloadBlocked(RuntimeError):
    """insightface tried to download something; RealisID never downloads models."""


_HOOK_LOCK = threading.RLock()  # loads that patch the hooks run one at a time, so restores never interleave


@contextlib.contextmanager
def no_downloads(model_dir: str) -> Iterator[None]:
    """Replace insightface's download hooks with an error for the duration of the block."""
    with _HOOK_LOCK:
        with _hooks_replaced(model_dir):
            yield


@contextlib.contextmanager
def _hooks_replaced(model_dir: str) -> Iterator[None]:
    import importlib

    modules = {}
    for mod_name in ("app.face_analysis", "model_zoo.model_zoo", "utils.download", "utils.storage"):
        try:
            modules[mod_name] = importlib.import_module(f"insightface.{mod_name}")
        except ImportError:  # layout differs between insightface versions; nothing to block there
            pass

    def refuse(*args: Any, **kwargs: Any) -> None:
        what = ", ".join(str(a) for a in args[:2]) or "a model"
        raise DownloadBlocked(
            f"insightface tried to download {what}; RealisID never downloads models. "
            f"Put the model files into model_dir '{model_dir}' yourself ({FIX_HINT})"
        )

    targets = [("model_zoo.model_zoo", "download_onnx"), ("utils.storage", "download_file"),
               ("utils.storage", "download"), ("utils.download", "download_file"),
               ("app.face_analysis", "ensure_available")]
    saved = [(modules[m], attr, getattr(modules[m], attr)) for m, attr in targets
             if m in modules and hasattr(modules[m], attr)]
    for mod, attr, _ in saved:
        setattr(mod, attr, refuse)
    try:
        yield
    finally:
        for mod, attr, orig in saved:
            setattr(mod, attr, orig)


@contextlib.contextmanager
def _quiet_alignment() -> Iterator[None]:
    # insightface's face_align calls skimage's SimilarityTransform.estimate, deprecated in skimage 0.26;
    # the warning is about insightface's code, not the caller's, so keep it out of users' logs.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`estimate` is deprecated.*", category=FutureWarning)
        yield


def _static_dim(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, np.integer)) and int(value) > 0 else None


class InsightFaceAnalyzer:
    """Detector + recognition + optional dense landmarks from one insightface model folder."""

    def __init__(self, model_dir: str, det_size: Sequence[int] = (640, 640), det_thresh: float = 0.5,
                 providers: Sequence[Any] = ("CPUExecutionProvider",)):
        raw = str(model_dir)
        path = os.path.abspath(os.path.expanduser(raw))
        if not os.path.exists(path):
            raise FileNotFoundError(f"model_dir '{raw}' does not exist; {FIX_HINT}")
        if not os.path.isdir(path):
            raise NotADirectoryError(f"model_dir '{raw}' is a file, not a folder; {FIX_HINT}")
        if len(det_size) != 2 or any(int(v) <= 0 for v in det_size):
            raise ValueError(f"det_size {list(det_size)} must be two positive integers [width, height], e.g. [640, 640]")
        if not 0.0 <= float(det_thresh) <= 1.0:
            raise ValueError(f"det_thresh {det_thresh} must be in [0, 1], e.g. 0.5")
        self.model_dir = path
        self.det_size = (int(det_size[0]), int(det_size[1]))
        self.det_thresh = float(det_thresh)
        self.providers = list(providers)
        self.name = f"insightface:{path}"
        self.models: dict[str, Any] = {}
        self.model_files: dict[str, str] = {}

        import insightface  # noqa: F401  (heavy; imported only when an insightface analyzer is built)

        try:  # model-package manifests exist from insightface 2.x on; older versions only route by shape
            from insightface.model_zoo.package_manifest import has_model_package_manifest
        except ImportError:
            def has_model_package_manifest(_path: str) -> bool:
                return False

        with no_downloads(raw):
            if has_model_package_manifest(path):
                self._load_manifest_package(path)
            else:
                self._load_folder(path, raw)

        self._det = self.models.get("detection")
        self._rec = self.models.get("recognition")
        self._lmk = next((self.models[t] for t in LANDMARK_TASKS if t in self.models), None)
        if self._det is not None:
            if not getattr(self._det, "use_kps", False):
                raise ValueError(
                    f"detector {self.model_files['detection']} has no keypoint outputs (a 6/10-output SCRFD); "
                    "RealisID needs 5-point keypoints: use a kps detector such as det_10g.onnx")
            self._det.prepare(0, input_size=self.det_size, det_thresh=self.det_thresh)
        for task, model in self.models.items():
            if task != "detection":
                model.prepare(0)
        self.embedding_dim: int | None = None
        if self._rec is not None:
            shape = getattr(self._rec, "output_shape", None) or [None]
            self.embedding_dim = _static_dim(shape[-1])
        log.info("insightface models in %s: %s", path,
                 ", ".join(f"{t}={os.path.basename(f)}" for t, f in sorted(self.model_files.items())) or "none")

    # ------------------------------------------------------------------ loading
    def _load_folder(self, path: str, raw: str) -> None:
        from insightface.model_zoo import get_model

        files = sorted(glob.glob(os.path.join(path, "*.onnx")))
        if not files:
            raise FileNotFoundError(
                f"model_dir '{raw}' contains no .onnx files; put an insightface model pack there "
                f"(e.g. buffalo_l: det_10g.onnx, w600k_r50.onnx, 2d106det.onnx) or {FIX_HINT}")
        for file in files:
            try:
                model = get_model(file, providers=self.providers, download=False)
            except DownloadBlocked:
                raise
            except Exception as exc:
                raise RuntimeError(
                    f"insightface could not load '{file}' ({type(exc).__name__}: {exc}); "
                    "remove or replace that file in model_dir") from exc
            self._keep(model, file)

    def _load_manifest_package(self, path: str) -> None:
        from insightface.model_zoo import get_model
        from insightface.model_zoo.package_manifest import load_model_package

        package = load_model_package(path)
        for task, descriptor in package.tasks.items():
            if task not in ("detection", "recognition"):
                log.info("insightface package %s: task %s is not used by RealisID", package.name, task)
                continue
            try:
                model = get_model(path, model_task=task, model_descriptor=descriptor,
                                  providers=self.providers, download=False)
            except DownloadBlocked:
                raise
            except Exception as exc:
                raise RuntimeError(
                    f"insightface could not load the {task} model '{descriptor.path}' of package "
                    f"'{path}' ({type(exc).__name__}: {exc}); fix or replace the package") from exc
            self._keep(model, str(descriptor.path))

    def _keep(self, model: Any, file: str) -> None:
        if model is None:
            log.warning("insightface does not recognise %s (its shape-based routing returned nothing); ignored", file)
            return
        task = getattr(model, "taskname", None)
        if task in self.models:
            log.info("ignoring %s: task %s already provided by %s", file, task, self.model_files[task])
            return
        if task not in ("detection", "recognition") + LANDMARK_TASKS:
            log.debug("ignoring %s: task %s is not used by RealisID", file, task)
            return
        self.models[task] = model
        self.model_files[task] = file

    # ------------------------------------------------------------------ interface
    @property
    def has_detector(self) -> bool:
        return self._det is not None

    @property
    def has_recognition(self) -> bool:
        return self._rec is not None

    def detect(self, image: np.ndarray) -> list[Face]:
        if self._det is None:
            raise RuntimeError(
                f"model_dir '{self.model_dir}' has no face detection model (SCRFD, e.g. det_10g.onnx), so detect() "
                f"cannot run; add one or {FIX_HINT}")
        bgr = np.ascontiguousarray(as_rgb_uint8(image)[:, :, ::-1])
        bboxes, kpss = self._det.detect(bgr, max_num=0)
        faces: list[Face] = []
        with _quiet_alignment():
            for i in range(bboxes.shape[0]):
                faces.append(self._analyse(bgr, bboxes[i], kpss[i]))
        faces.sort(key=lambda f: -f.det_score)
        return faces

    def _analyse(self, bgr: np.ndarray, det: np.ndarray, kps: np.ndarray) -> Face:
        from insightface.app.common import Face as InsightFace

        raw = InsightFace(bbox=det[0:4], kps=kps, det_score=float(det[4]))
        landmarks = None
        if self._lmk is not None:
            points = self._lmk.get(bgr, raw)
            landmarks = contours_from_points(np.asarray(points)[:, :2])
        embedding = None
        if self._rec is not None:
            embedding = l2_normalize(self._rec.get(bgr, raw))
        return Face(bbox=det[0:4], kps=kps, det_score=float(det[4]), embedding=embedding, landmarks=landmarks)

    def embed(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray:
        if self._rec is None:
            raise RuntimeError(
                f"model_dir '{self.model_dir}' has no recognition model (ArcFace, e.g. w600k_r50.onnx), so embed() "
                f"cannot run; add one or {FIX_HINT}")
        from insightface.utils import face_align

        kps = np.asarray(kps, dtype=np.float32)
        if kps.shape != (5, 2) or not np.all(np.isfinite(kps)):
            raise ValueError(f"kps must be 5 finite [x, y] pairs in insightface order, got shape {kps.shape}")
        bgr = np.ascontiguousarray(as_rgb_uint8(image)[:, :, ::-1])
        with _quiet_alignment():
            aligned = face_align.norm_crop(bgr, landmark=kps, image_size=self._rec.input_size[0])
        return l2_normalize(self._rec.get_feat(aligned))

    def __repr__(self) -> str:
        return f"InsightFaceAnalyzer({self.model_dir!r}, tasks={sorted(self.models)}, det_size={self.det_size})"


def make_analyzer(cfg: Mapping) -> FaceAnalyzer:
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


register_face_analyzer("insightface", make_analyzer)
