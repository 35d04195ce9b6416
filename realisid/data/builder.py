"""The shard builder: a folder of photos or existing webdataset / img2dataset tars to RealisID face shards.

``build_shards`` keeps single-person photos (one face that is large, confident and not cut by the border;
other faces much smaller) and writes them in the shard format of realisid/data/shards.py through
:class:`~realisid.data.shards.FaceShardWriter`, with the identity embedding when the analyzer has one
(``id.npy``) and a reference face (``ref.jpg``) cut from ANOTHER photo of the same identity, with that face's
embedding (``ref_id.npy``: the analyzer's, on the donor photo, aligned with the donor face's detected key
points) and its 5 key points in ``ref.jpg`` pixels (meta ``ref_kps``). Training conditions on the reference.

It runs in two passes over the source:

1. analysis: decode (EXIF rotation applied, any colour mode to RGB), downscale to ``max_side``, detect
   faces, select. Workers are separate processes that build their own analyzer (ONNX sessions do not
   pickle); only a small record per image comes back, in source order. Records are appended to
   ``OUT/NAME.analysis.jsonl``, so an interrupted analysis resumes where it stopped.
2. writing: the reference crops of the needed donors (the largest face of each identity, and the second
   largest for the donor itself) are cut into a temporary folder (a donor that changed since it was
   analysed gives no reference), then every kept image is decoded again and written. Finished shards and
   the source keys in them go to the journal ``OUT/NAME.progress.json`` (written atomically after each
   shard); a rerun keeps finished shards, deletes leftover ``.tar.tmp`` files, skips what the finished
   shards hold and numbers new shards after them. The manifest counts everything across runs. The journal
   records the shard format: an interrupted build of an older format is not resumed into mixed shards.

Reasons a photo is not kept (the manifest's ``rejected``; one reason per photo):
``corrupt_image``, ``huge_image`` (more than ``max_pixels``; never decoded), ``unreadable_file``,
``no_face``, ``low_score``, ``face_too_small``, ``several_faces``, ``face_cut_by_border``,
``analysis_error`` (the analyzer raised), and for tar sources ``missing_image``, ``corrupt_tar_member``
(a damaged member, skipped; a sample that lost its image that way counts once, as this) and
``duplicate_key``; ``source_changed`` when a photo differs between analysis and writing. An unreadable
caption sidecar does not reject the photo: it is kept with an empty caption and counted under the
manifest's ``warnings`` as ``bad_sidecar``. ``min_face`` is measured in the analysed (downscaled) image.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import functools
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import tarfile
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from realisid.data.shards import SHARD_FORMAT, FaceShardWriter, SampleError, decode_image, expand_shards, face_meta
from realisid.faces.analysis import Face, FaceAnalyzer
from realisid.geometry import box_size
from realisid.io import atomic_write_json

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")  # folder sources, any case
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # tar members, in order of preference
BORDER_TOLERANCE = 0.1  # a face box may stick out of the image by this fraction of its size
JOURNAL_VERSION = 1
ANALYSIS_VERSION = 1
# webdataset's split of a member name into sample key and extension: the key ends at the basename's first dot
_MEMBER_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


# ---------------------------------------------------------------------------------------------- selection

def face_long_side(bbox: Sequence[float]) -> float:
    w, h = box_size(bbox)
    return max(w, h)


def border_overflow(bbox: Sequence[float], width: int, height: int) -> float:
    """How far the box sticks out of the image, as a fraction of its own width (x) or height (y)."""
    w, h = box_size(bbox)
    out_x = max(0.0, -float(bbox[0])) + max(0.0, float(bbox[2]) - width)
    out_y = max(0.0, -float(bbox[1])) + max(0.0, float(bbox[3]) - height)
    return max(out_x / max(w, 1e-6), out_y / max(h, 1e-6))


def select_face(faces: Sequence[Face], width: int, height: int, *, min_face: float = 32, min_score: float = 0.5,
                other_face_ratio: float = 0.3) -> tuple[str | None, Face | None]:
    """``(None, main_face)`` for a single-person photo, else ``(reason, None)``.

    The main face is the largest face with ``det_score >= min_score`` and box long side ``>= min_face``;
    every other detected face (whatever its score) must have a long side below ``other_face_ratio`` times
    the main face's, so a small bystander is allowed but a second person of similar size is not. The main
    face may stick out of the image by at most 10% of its size. Without a qualifying face the reason is
    ``face_too_small`` when some face had the score but not the size, else ``low_score``.
    """
    if not faces:
        return "no_face", None
    qualified = [f for f in faces if f.det_score >= min_score and face_long_side(f.bbox) >= min_face]
    if not qualified:
        return ("face_too_small" if any(f.det_score >= min_score for f in faces) else "low_score"), None
    main = max(qualified, key=lambda f: (face_long_side(f.bbox), f.det_score))
    limit = other_face_ratio * face_long_side(main.bbox)
    if any(face_long_side(f.bbox) >= limit for f in faces if f is not main):
        return "several_faces", None
    if border_overflow(main.bbox, width, height) > BORDER_TOLERANCE:
        return "face_cut_by_border", None
    return None, main


def downscale(img: Image.Image, max_side: int) -> Image.Image:
    """``img`` resized so that its long side is at most ``max_side`` (aspect kept); unchanged if smaller."""
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    s = max_side / float(max(w, h))
    size = (max(1, int(round(w * s))), max(1, int(round(h * s))))
    return img.resize(size, Image.BICUBIC, reducing_gap=3.0)


def sample_key(source_key: str) -> str:
    """A stable shard key for a source: readable stem plus a hash of the whole source key (no dots)."""
    tail = source_key.rsplit("#", 1)[-1].rsplit("/", 1)[-1]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.splitext(tail)[0])[:32].strip("_") or "img"
    return f"{stem}-{hashlib.sha1(source_key.encode('utf-8')).hexdigest()[:12]}"


# ---------------------------------------------------------------------------------------------- sources

@dataclass
class SourceItem:
    """One candidate photo. Folder sources carry ``path`` (and ``sidecar``); tar sources carry ``data``."""
    key: str  # relative path (folder) or "tar url#sample key"
    path: str | None = None
    data: bytes | None = None
    identity: str | None = None
    caption: str = ""
    sidecar: str | None = None
    warnings: tuple = ()
    reason: str | None = None  # known unusable before decoding (tar damage, missing image)
    detail: str = ""


def resolve_source(src: str) -> tuple[str, Any]:
    """``("folder", root)`` or ``("tar", [urls])`` for a build source."""
    hint = "give a folder of photos (one sub-folder per identity) or tar shards as a .tar, a glob, a brace pattern or a folder of .tar"
    if os.path.isdir(src):
        tars = sorted(glob.glob(os.path.join(src, "*.tar")))
        top_images = [n for n in os.listdir(src) if os.path.splitext(n)[1].lower() in IMAGE_EXTS and not n.startswith(".")]
        if tars and not top_images:
            return "tar", tars
        return "folder", src
    if src.endswith(".tar") or any(c in src for c in "*?[{"):
        urls = list(dict.fromkeys(expand_shards(src)))  # each tar once, in order
        if not urls:
            raise FileNotFoundError(f"src {src!r} matched no tar files; {hint}")
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(f"src {src!r}: {len(missing)} of {len(urls)} tar files do not exist, first {missing[0]!r}; fix the pattern")
        return "tar", urls
    if os.path.exists(src):
        raise ValueError(f"src {src!r} is a file but not a .tar; {hint}")
    raise FileNotFoundError(f"src {src!r} does not exist; {hint}")


def folder_items(root: str, skip: Iterable[str] = ()) -> list[SourceItem]:
    """Photos under ``root`` in sorted order; identity = the sub-folder directly under ``root`` (None for
    photos in ``root`` itself); caption sidecar ``<stem>.txt`` or else ``<stem>.json``. Hidden files and
    folders (leading dot, e.g. macOS ``._x.jpg``) are skipped."""
    skip = {os.path.abspath(s) for s in skip}
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and os.path.abspath(os.path.join(dirpath, d)) not in skip)
        lower = {}
        for fn in filenames:
            lower.setdefault(fn.lower(), fn)
        for fn in sorted(filenames):
            stem, ext = os.path.splitext(fn)
            if fn.startswith(".") or ext.lower() not in IMAGE_EXTS:
                continue
            path = os.path.join(dirpath, fn)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            parts = rel.split("/")
            side = lower.get(f"{stem}.txt".lower()) or lower.get(f"{stem}.json".lower())
            items.append(SourceItem(key=rel, path=path, identity=parts[0] if len(parts) > 1 else None,
                                    sidecar=os.path.join(dirpath, side) if side else None))
    return items


def read_sidecar(path: str) -> tuple[str, bool]:
    """``(caption, ok)`` from a ``.txt`` (the text) or ``.json`` (``"caption"`` or ``"text"``) sidecar."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if path.lower().endswith(".txt"):
            return raw.decode("utf-8").strip(), True
        return _json_caption(json.loads(raw)), True
    except (OSError, ValueError) as exc:  # ValueError covers JSON and UTF-8 errors
        log.debug("bad sidecar %s: %s", path, exc)
        return "", False


def _json_caption(obj: Any) -> str:
    cap = obj.get("caption", obj.get("text")) if isinstance(obj, dict) else None
    if not isinstance(cap, str):
        raise ValueError("no 'caption' or 'text' string")
    return cap.strip()


def _nonzero(f, start: int, end: int) -> bool:
    f.seek(start)
    left = end - start
    while left > 0:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            return False
        if chunk.count(0) != len(chunk):
            return True
        left -= len(chunk)
    return False


def tar_items(url: str) -> Iterator[SourceItem]:
    """Samples of one webdataset / img2dataset tar, read raw with :mod:`tarfile` (nothing is unpickled).

    A sample is a run of members sharing a key; its image is the ``jpg``/``jpeg``/``png``/``webp`` member,
    its caption the ``txt`` member or the ``json`` member's ``"caption"``, its identity the json's
    ``"identity"``. Damaged members (bad headers are skipped and found as gaps between members, truncated
    data) are counted as ``corrupt_tar_member``.
    """
    try:
        f = open(url, "rb")
    except OSError as exc:
        yield SourceItem(key=f"{url}#@0", reason="corrupt_tar_member", detail=f"cannot open: {exc}")
        return
    with f:
        size = os.fstat(f.fileno()).st_size
        try:
            tf = tarfile.open(fileobj=f, mode="r:", ignore_zeros=True)
        except (tarfile.TarError, OSError) as exc:
            yield SourceItem(key=f"{url}#@0", reason="corrupt_tar_member", detail=f"not a tar: {exc}")
            return
        state = {"pending": [], "seen": Counter()}  # pending: offsets of damage not yet attributed to a sample
        cur_key, members, suspect = None, {}, False
        expected = 0
        while True:
            damaged_at = None
            try:
                ti = tf.next()
            except (tarfile.TarError, OSError) as exc:
                log.warning("%s: tar damaged at byte %d (%s); rest of the file skipped", url, expected, exc)
                state["pending"].append(expected)
                ti = None
            if ti is None:
                if expected < size and _nonzero(f, expected, size):
                    if not state["pending"] or state["pending"][-1] != expected:
                        state["pending"].append(expected)
                    suspect = True
                break
            if ti.offset > expected and _nonzero(f, expected, ti.offset):
                damaged_at = expected
                state["pending"].append(expected)
            expected = ti.offset_data + (-(-ti.size // 512) * 512 if ti.isfile() else 0)
            m = _MEMBER_RE.match(ti.name)
            if not ti.isfile() or m is None:
                continue
            key, ext = m.group(1), m.group(2).lower()
            if key != cur_key:
                if cur_key is not None:
                    yield _tar_sample(url, cur_key, members, suspect or damaged_at is not None, state)
                cur_key, members, suspect = key, {}, False
            if damaged_at is not None:
                suspect = True
            try:
                data = tf.extractfile(ti).read()
            except (tarfile.TarError, OSError) as exc:
                log.warning("%s: member %s is damaged (%s); rest of the file skipped", url, ti.name, exc)
                state["pending"].append(ti.offset)
                suspect = True
                break
            members.setdefault(ext, data)
        if cur_key is not None:
            yield _tar_sample(url, cur_key, members, suspect, state)
        for offset in state["pending"]:
            yield SourceItem(key=f"{url}#@{offset}", reason="corrupt_tar_member", detail=f"damaged member at byte {offset}")


def _tar_sample(url: str, key: str, members: Mapping[str, bytes], suspect: bool, state: dict) -> SourceItem:
    item = SourceItem(key=f"{url}#{key}")
    state["seen"][key] += 1
    if state["seen"][key] > 1:  # a later sample with a key already used: its own source key, rejected
        item.key = f"{url}#{key}~{state['seen'][key] - 1}"
        item.reason, item.detail = "duplicate_key", f"key {key!r} occurs {state['seen'][key]} times in {url}"
        return item
    img_ext = next((e for e in TAR_IMAGE_EXTS if e in members), None)
    if img_ext is None:
        if suspect and state["pending"]:
            state["pending"].pop()  # the damaged member was this sample's image: count the damage once, here
            item.reason, item.detail = "corrupt_tar_member", "image member damaged"
        else:
            item.reason, item.detail = "missing_image", f"no {'/'.join(TAR_IMAGE_EXTS)} member (has {sorted(members)})"
        return item
    item.data = members[img_ext]
    ok = True
    meta = None
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError:
            ok = False
    if isinstance(meta, dict) and meta.get("identity") is not None:
        item.identity = str(meta["identity"])
    if "txt" in members:
        try:
            item.caption = members["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            ok = False
    elif isinstance(meta, dict) and isinstance(meta.get("caption"), str):
        item.caption = meta["caption"].strip()
    if not ok:
        item.warnings = ("bad_sidecar",)
    return item


# ---------------------------------------------------------------------------------------------- records

@dataclass
class Record:
    """What pass 1 keeps of one photo (small: no pixels)."""
    key: str
    reason: str | None = None
    detail: str = ""
    width: int = 0
    height: int = 0
    bbox: list | None = None
    kps: list | None = None
    score: float = 0.0
    embedding: np.ndarray | None = None
    landmarks: dict | None = None
    caption: str = ""
    identity: str | None = None
    warnings: tuple = ()

    @property
    def face_long(self) -> float:
        return face_long_side(self.bbox) if self.bbox else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["warnings"] = list(self.warnings)
        if self.embedding is not None:
            d["embedding"] = base64.b64encode(np.asarray(self.embedding, "<f4").tobytes()).decode("ascii")
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Record":
        d = dict(d)
        if d.get("embedding") is not None:
            d["embedding"] = np.frombuffer(base64.b64decode(d["embedding"]), "<f4").astype(np.float32)
        d["warnings"] = tuple(d.get("warnings") or ())
        return cls(**d)


@dataclass
class Settings:
    min_face: float
    min_score: float
    other_face_ratio: float
    max_pixels: int
    max_side: int
    ref_size: int


class Worker:
    """Does the per-image work, in a pool process or in the calling process (``workers=0``)."""

    def __init__(self, settings: Settings, analyzer: FaceAnalyzer | None = None,
                 factory: Callable[[], FaceAnalyzer] | None = None):
        self.settings = settings
        self._analyzer = analyzer
        self._factory = factory

    @property
    def analyzer(self) -> FaceAnalyzer:
        if self._analyzer is None:
            self._analyzer = self._factory()
        return self._analyzer

    def run(self, task: tuple) -> Any:
        op, item = task[0], task[1]
        if op == "analyse":
            return self.analyse(item)
        if op == "load":
            try:
                return item.key, self.load(item)
            except SampleError as err:  # SampleError does not pickle; send its parts
                return item.key, (err.reason, err.detail)
        if op == "crop":
            return item.key, self.crop(item, *task[2:])
        raise ValueError(f"unknown task {op!r}")

    def load(self, item: SourceItem) -> Image.Image:
        data = item.data
        if data is None:
            try:
                with open(item.path, "rb") as f:
                    data = f.read()
            except OSError as exc:
                raise SampleError("unreadable_file", item.key, f"{type(exc).__name__}: {exc}") from None
        img = decode_image(data, item.key, max_pixels=self.settings.max_pixels)
        return downscale(img, self.settings.max_side)

    def crop(self, item: SourceItem, bbox: Sequence[float], kps: Sequence[Sequence[float]],
             size: tuple[int, int]) -> tuple[Image.Image, list] | None:
        """The reference crop of the donor face (``bbox``, ``kps`` as analysed in a ``size`` photo) and the face's
        key points in the crop's pixels; None when the donor can no longer be read or changed since its analysis."""
        from realisid.images import identity_crop, identity_crop_kps  # imports torch: only when references are cut

        try:
            img = self.load(item)
        except SampleError as err:
            log.warning("reference donor %s can no longer be read (%s); its identity's samples get no ref.jpg", item.key, err)
            return None
        if img.size != tuple(size):
            log.warning("reference donor %s changed since it was analysed (size %s, analysed %s); its identity's samples get "
                        "no ref.jpg", item.key, img.size, tuple(size))
            return None
        ref_kps = identity_crop_kps(kps, bbox, img.width, img.height, self.settings.ref_size)
        return identity_crop(img, bbox, self.settings.ref_size)[0], ref_kps.tolist()

    def analyse(self, item: SourceItem) -> Record:
        rec = Record(key=item.key, identity=item.identity, caption=item.caption, warnings=tuple(item.warnings))
        if item.reason is not None:
            rec.reason, rec.detail = item.reason, item.detail
            return rec
        if item.sidecar is not None:
            rec.caption, ok = read_sidecar(item.sidecar)
            if not ok:
                rec.warnings = rec.warnings + ("bad_sidecar",)
        try:
            img = self.load(item)
        except SampleError as err:
            rec.reason, rec.detail = err.reason, err.detail
            return rec
        s = self.settings
        rec.width, rec.height = img.size
        analyzer = self.analyzer  # a factory that fails is an error of the build, not of this image
        try:
            faces = analyzer.detect(np.asarray(img))
        except Exception as exc:  # one bad image must not end a long build; the caller aborts if all fail
            rec.reason, rec.detail = "analysis_error", f"{type(exc).__name__}: {exc}"
            return rec
        reason, face = select_face(faces, img.width, img.height, min_face=s.min_face, min_score=s.min_score,
                                   other_face_ratio=s.other_face_ratio)
        if reason is not None:
            rec.reason = reason
            rec.detail = ", ".join(f"{face_long_side(f.bbox):.0f}px@{f.det_score:.2f}" for f in faces[:5])
            return rec
        b = face.bbox
        rec.bbox = [max(0.0, float(b[0])), max(0.0, float(b[1])), min(float(img.width), float(b[2])), min(float(img.height), float(b[3]))]
        rec.kps = [[float(x), float(y)] for x, y in face.kps]
        rec.score = float(face.det_score)
        rec.embedding = None if face.embedding is None else np.asarray(face.embedding, np.float32)
        rec.landmarks = face.landmarks
        return rec


_WORKER: Worker | None = None


def _init_pool_worker(settings: Settings, factory: Callable[[], FaceAnalyzer], log_level: int) -> None:
    global _WORKER
    from realisid.interrupts import leave_interrupts_to_parent

    leave_interrupts_to_parent()  # the parent handles Ctrl-C and SIGTERM (also when sent to the whole group) and stops the pool
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [worker %(process)d]: %(message)s",
                        datefmt="%H:%M:%S")
    try:  # parallelism comes from the processes: one OpenCV thread each (insightface resizes with OpenCV)
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    _WORKER = Worker(settings, factory=factory)


def _pool_work(task: tuple) -> Any:
    return _WORKER.run(task)


class _Runner:
    """In-order streaming over a process pool (bounded number of tasks in flight) or in-process."""

    def __init__(self, worker: Worker, workers: int, factory: Callable[[], FaceAnalyzer] | None):
        self.worker = worker
        self.workers = workers
        self.factory = factory
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None

    def map(self, tasks: Iterable[tuple]) -> Iterator[Any]:
        if self.workers <= 0:
            for t in tasks:
                yield self.worker.run(t)
            return
        if self.pool is None:
            ctx = multiprocessing.get_context("spawn")
            self.pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=_init_pool_worker,
                initargs=(self.worker.settings, self.factory, logging.getLogger().getEffectiveLevel()))
        window = 4 * self.workers
        pending: deque = deque()
        try:
            for t in tasks:
                pending.append(self.pool.submit(_pool_work, t))
                while len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except concurrent.futures.process.BrokenProcessPool as exc:
            raise RuntimeError(
                f"a worker process died ({exc}). Workers are started with 'spawn' and import the main module: a script "
                "that calls build_shards must do so under `if __name__ == '__main__':`. Otherwise it is usually memory: "
                f"lower workers (now {self.workers}) or max_side; rerunning the same command resumes") from None
        finally:
            for fut in pending:
                fut.cancel()

    def close(self, abort: bool = False) -> None:
        """Shut the pool down; ``abort`` (an interruption or error) stops the workers instead of waiting for them."""
        pool, self.pool = self.pool, None
        if pool is None:
            return
        if not abort:
            pool.shutdown(wait=True)
            return
        # no public way to stop running workers before Python 3.14 (terminate_workers); a second Ctrl-C while
        # waiting for them would otherwise leave the pool half shut down and the process hanging at exit
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in processes:
            if proc.is_alive():
                proc.kill()  # workers ignore SIGTERM (see leave_interrupts_to_parent)


# ---------------------------------------------------------------------------------------------- journal

class _Journal:
    """``OUT/NAME.progress.json``: finished shards with the source keys they hold and the counts so far."""

    def __init__(self, out_dir: str, name: str, settings: dict):
        self.path = os.path.join(out_dir, f"{name}.progress.json")
        self.out_dir, self.name, self.settings = out_dir, name, settings
        self.data = {"version": JOURNAL_VERSION, "name": name, "settings": settings, "complete": False, "shards": [],
                     "counts": {"kept": 0, "bin_counts": {}, "size_histogram": {}, "identities": {}, "references": 0},
                     "write_rejected": {}}

    def load_or_start(self) -> None:
        shard_re = re.compile(re.escape(self.name) + r"-\d{6}\.tar$")
        existing = sorted(n for n in os.listdir(self.out_dir) if shard_re.match(n))
        for n in os.listdir(self.out_dir):
            if n.startswith(f"{self.name}-") and n.endswith(".tar.tmp"):
                log.info("removing unfinished shard %s from an interrupted run", n)
                os.remove(os.path.join(self.out_dir, n))
        if not os.path.exists(self.path):
            if existing:
                raise FileExistsError(
                    f"out_dir {self.out_dir!r} already holds shards {existing[0]}... of another build (no {os.path.basename(self.path)} "
                    f"journal); delete them or choose another name")
            atomic_write_json(self.path, self.data, indent=1)
            return
        with open(self.path) as f:
            data = json.load(f)
        if not data.get("shards") and not existing:  # nothing written yet: start over with this run's settings
            atomic_write_json(self.path, self.data, indent=1)
            return
        old = data.get("settings", {})
        diff = {k: (old.get(k), v) for k, v in self.settings.items() if old.get(k) != v}
        if diff:
            changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(
                f"{self.path} records a build with different settings ({changes}); rerun with the same settings to "
                f"resume, or delete {os.path.basename(self.path)} and the {self.name}-*.tar shards to rebuild")
        for i, shard in enumerate(data["shards"]):
            want = f"{self.name}-{i:06d}.tar"
            if shard["file"] != want or not os.path.isfile(os.path.join(self.out_dir, want)):
                raise FileNotFoundError(
                    f"finished shard {want} listed in {self.path} is missing; delete {os.path.basename(self.path)} and the "
                    f"{self.name}-*.tar shards to rebuild")
        for n in existing[len(data["shards"]):]:  # renamed but not yet journaled when the last run stopped: redone
            log.info("removing shard %s: the interrupted run had not recorded it as finished", n)
            os.remove(os.path.join(self.out_dir, n))
        self.data = data
        log.info("resuming %s: %d finished shards with %d samples", self.name, len(data["shards"]), data["counts"]["kept"])

    @property
    def done_keys(self) -> set[str]:
        keys = {k for s in self.data["shards"] for k in s["sources"]}
        return keys | set(self.data["write_rejected"])

    def restore(self, writer: FaceShardWriter) -> int:
        """Put the finished shards' counts into a new writer's manifest; returns the references so far."""
        m, c = writer.manifest, self.data["counts"]
        m.shards = [s["file"] for s in self.data["shards"]]
        m.shard_counts = {s["file"]: s["count"] for s in self.data["shards"]}
        m.kept = int(c["kept"])
        m.bin_counts = Counter(c["bin_counts"])
        m.size_histogram = Counter(c["size_histogram"])
        m.identities = Counter(c["identities"])
        return int(c.get("references", 0))

    def shard_done(self, writer: FaceShardWriter, sources: list[str], write_rejected: Mapping[str, str], references: int,
                   complete: bool = False) -> None:
        m = writer.manifest
        if sources:
            file = m.shards[-1]
            self.data["shards"].append({"file": file, "count": m.shard_counts[file], "sources": list(sources)})
        self.data["counts"] = {"kept": m.kept, "bin_counts": dict(m.bin_counts), "size_histogram": dict(m.size_histogram),
                               "identities": dict(m.identities), "references": references}
        self.data["write_rejected"] = dict(write_rejected)
        self.data["complete"] = complete
        atomic_write_json(self.path, self.data, indent=1)


class _AnalysisCache:
    """``OUT/NAME.analysis.jsonl``: one pass-1 record per line after a settings line; appended as we go."""

    def __init__(self, out_dir: str, name: str, settings: dict):
        self.path = os.path.join(out_dir, f"{name}.analysis.jsonl")
        self.settings = {"version": ANALYSIS_VERSION, **settings}
        self._f = None

    def load(self) -> dict[str, Record]:
        records: dict[str, Record] = {}
        if not os.path.exists(self.path):
            return records
        with open(self.path, "rb") as f:
            raw = f.read()
        end = raw.rfind(b"\n") + 1  # a line cut by an interruption is dropped
        lines = raw[:end].splitlines()
        try:
            head = json.loads(lines[0]) if lines else None
        except ValueError:
            head = None
        if not head or head.get("settings") != self.settings:
            log.warning("%s was made with other settings; analysing again", self.path)
            os.remove(self.path)
            return records
        for line in lines[1:]:
            try:
                rec = Record.from_json(json.loads(line))
            except (ValueError, TypeError):
                continue
            records[rec.key] = rec
        if end != len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(end)
        log.info("reusing %d analysed images from %s", len(records), self.path)
        return records

    def append(self, rec: Record) -> None:
        if self._f is None:
            new = not os.path.exists(self.path)
            self._f = open(self.path, "a")
            if new:
                self._f.write(json.dumps({"settings": self.settings}) + "\n")
        self._f.write(json.dumps(rec.to_json()) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


# ---------------------------------------------------------------------------------------------- build

def _check_args(name: str, workers: int, shard_size: int, min_face: float, min_score: float, other_face_ratio: float,
                max_pixels: int, max_side: int, ref_size: int, jpeg_quality: int) -> None:
    if not name or "/" in name or os.sep in name:
        raise ValueError(f"name {name!r} must be a plain file-name prefix such as 'celeba'")
    checks = [
        (workers >= 0, f"workers {workers} must be >= 0 (0 analyses in this process)"),
        (shard_size >= 1, f"shard_size {shard_size} must be >= 1, e.g. 1000"),
        (min_face > 0, f"min_face {min_face} must be > 0 pixels, e.g. 32"),
        (0.0 <= min_score <= 1.0, f"min_score {min_score} must be in [0, 1], e.g. 0.5"),
        (0.0 < other_face_ratio <= 1.0, f"other_face_ratio {other_face_ratio} must be in (0, 1], e.g. 0.3"),
        (max_pixels > 0, f"max_pixels {max_pixels} must be > 0, e.g. 40000000"),
        (max_side >= 32, f"max_side {max_side} must be >= 32 pixels, e.g. 2048"),
        (ref_size >= 16, f"ref_size {ref_size} must be >= 16 pixels, e.g. 224"),
        (1 <= jpeg_quality <= 100, f"jpeg_quality {jpeg_quality} must be in [1, 100], e.g. 95"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


def _progress(iterable: Iterable, desc: str, total: int | None, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="img", dynamic_ncols=True)


def build_shards(src: str, out_dir: str, name: str, analyzer: FaceAnalyzer, *, workers: int = 2, shard_size: int = 1000,
                 min_face: float = 32, min_score: float = 0.5, other_face_ratio: float = 0.3, max_pixels: int = 40_000_000,
                 max_side: int = 2048, ref_size: int = 224, jpeg_quality: int = 95,
                 analyzer_factory: Callable[[], FaceAnalyzer] | None = None, progress: bool = True) -> dict:
    """Build face shards ``OUT_DIR/NAME-000000.tar``... and ``OUT_DIR/NAME.manifest.json`` from ``src``.

    ``src``: a folder of photos (jpg/jpeg/png/webp/bmp/tif; identity = sub-folder directly under ``src``;
    caption from ``<stem>.txt`` or ``<stem>.json``) or webdataset / img2dataset tars (a ``.tar``, glob,
    brace pattern or folder of ``.tar``). ``analyzer`` names the face model in the manifest and analyses
    in this process when ``workers == 0`` or no ``analyzer_factory`` is given; with a factory (a picklable
    callable, e.g. ``functools.partial(load_face_analyzer, cfg)``) ``workers`` processes each build their
    own. Selection: see :func:`select_face`; images larger than ``max_side`` are downscaled before
    analysis and writing; images above ``max_pixels`` are refused undecoded. Rerunning after an
    interruption resumes (see the module doc). Returns the manifest.
    """
    _check_args(name, workers, shard_size, min_face, min_score, other_face_ratio, max_pixels, max_side, ref_size, jpeg_quality)
    if not isinstance(analyzer, FaceAnalyzer):
        raise TypeError(f"analyzer must be a FaceAnalyzer (name, embedding_dim, detect, embed), got {type(analyzer).__name__}; "
                        "build one with realisid.faces.load_face_analyzer")
    if workers > 0 and analyzer_factory is None:
        log.warning("workers=%d needs analyzer_factory (ONNX sessions do not pickle); analysing in this process", workers)
        workers = 0
    t0 = time.time()
    kind, spec = resolve_source(src)
    os.makedirs(out_dir, exist_ok=True)
    source = os.path.abspath(spec) if kind == "folder" else src
    det = {k: getattr(analyzer, k) for k in ("det_size", "det_thresh") if hasattr(analyzer, k)}
    det = {k: list(v) if isinstance(v, tuple) else v for k, v in det.items()}
    selection = {"min_face": float(min_face), "min_score": float(min_score), "other_face_ratio": float(other_face_ratio),
                 "max_pixels": int(max_pixels), "max_side": int(max_side), "border_tolerance": BORDER_TOLERANCE}
    analysis_settings = {"source": source, "analyzer": analyzer.name, **det, **selection}
    journal = _Journal(out_dir, name, {**analysis_settings, "ref_size": int(ref_size), "jpeg_quality": int(jpeg_quality),
                                       "shard_size": int(shard_size), "shard_format": SHARD_FORMAT})
    journal.load_or_start()
    cache = _AnalysisCache(out_dir, name, analysis_settings)
    refs_dir = os.path.join(out_dir, f"{name}.refs.tmp")
    shutil.rmtree(refs_dir, ignore_errors=True)

    if kind == "folder":
        listed = folder_items(spec, skip=[out_dir])
        total: int | None = len(listed)

        def items() -> Iterator[SourceItem]:
            return iter(listed)
    else:
        total = None

        def items() -> Iterator[SourceItem]:
            for url in spec:
                yield from tar_items(url)

    settings = Settings(float(min_face), float(min_score), float(other_face_ratio), int(max_pixels), int(max_side), int(ref_size))
    runner = _Runner(Worker(settings, analyzer=analyzer), workers, analyzer_factory)
    extra = {"source": source, "analyzer": analyzer.name, "embedding_dim": analyzer.embedding_dim,
             "selection": {**selection, **det, "ref_size": int(ref_size), "jpeg_quality": int(jpeg_quality), "shard_size": int(shard_size)}}
    try:
        records, order = _analyse(items, total, runner, cache, progress)
        manifest = _write(items, records, order, runner, journal, out_dir, name, analyzer, refs_dir, shard_size,
                          jpeg_quality, progress, extra)
    except BaseException:
        runner.close(abort=True)
        raise
    finally:
        cache.close()
        runner.close()
        shutil.rmtree(refs_dir, ignore_errors=True)
    seconds = time.time() - t0
    n = manifest["kept"] + sum(manifest["rejected"].values())
    log.info("%s: kept %d of %d images in %.1f s (%.1f img/s); rejected %s", name, manifest["kept"], n, seconds,
             len(order) / max(seconds, 1e-9), manifest["rejected"])
    return manifest


def _analyse(items: Callable[[], Iterator[SourceItem]], total: int | None, runner: _Runner, cache: _AnalysisCache,
             progress: bool) -> tuple[dict[str, Record], list[str]]:
    records = cache.load()
    order: list[str] = []

    def todo() -> Iterator[tuple]:
        for it in items():
            order.append(it.key)
            if it.key not in records:
                yield ("analyse", it)

    fresh = errors = 0
    first_error = None
    t0 = time.time()
    todo_total = None if total is None else sum(it.key not in records for it in items())
    bar = _progress(runner.map(todo()), "analyse", todo_total, progress)
    for rec in bar:
        records[rec.key] = rec
        cache.append(rec)
        fresh += 1
        if rec.reason == "analysis_error":
            errors += 1
            first_error = first_error or f"{rec.key}: {rec.detail}"
            if errors == fresh == 10:
                raise RuntimeError(f"face analysis failed on the first 10 images (first: {first_error}); check the face analyzer "
                                   "(model_dir, providers) before building")
        elif rec.reason is not None:
            log.debug("rejected %s: %s (%s)", rec.key, rec.reason, rec.detail)
    log.info("analysed %d images in %.1f s (%d more from %s)", fresh, time.time() - t0, len(order) - fresh,
             os.path.basename(cache.path))
    if errors:
        log.warning("face analysis raised on %d images (counted as analysis_error); first: %s", errors, first_error)
    return records, order


def _write(items, records: dict[str, Record], order: list[str], runner: _Runner, journal: _Journal, out_dir: str, name: str,
           analyzer: FaceAnalyzer, refs_dir: str, shard_size: int, jpeg_quality: int, progress: bool, extra: dict) -> dict:
    done = journal.done_keys
    kept = [records[k] for k in order if records[k].reason is None]
    rank = {k: i for i, k in enumerate(order)}
    by_id: dict[str, list[Record]] = {}
    for r in kept:
        if r.identity is not None:
            by_id.setdefault(r.identity, []).append(r)
    top2 = {i: sorted(rs, key=lambda r: (-r.face_long, -r.score, rank[r.key]))[:2] for i, rs in by_id.items() if len(rs) >= 2}
    remaining = [r for r in kept if r.key not in done]
    donor_of = {}
    for r in remaining:
        if r.identity in top2:
            best = top2[r.identity]
            donor_of[r.key] = best[1] if best[0] is r else best[0]

    # references: cut the needed donors' face crops into a temporary folder (bounded memory); their key points in
    # the crop are kept beside them
    crops: dict[str, tuple[str, list]] = {}
    needed = {d.key: d for d in donor_of.values()}
    t0 = time.time()
    if needed:
        os.makedirs(refs_dir, exist_ok=True)
        tasks = (("crop", it, needed[it.key].bbox, needed[it.key].kps, (needed[it.key].width, needed[it.key].height))
                 for it in items() if it.key in needed)
        for key, cut in _progress(runner.map(tasks), "references", len(needed), progress):
            if cut is not None:
                crop, ref_kps = cut
                path = os.path.join(refs_dir, f"{len(crops)}.png")
                crop.save(path, compress_level=1)
                crops[key] = (path, ref_kps)
        log.info("cut %d reference faces in %.1f s", len(crops), time.time() - t0)

    writer = FaceShardWriter(out_dir, name, face_model=analyzer.name, maxcount=shard_size, start_index=len(journal.data["shards"]))
    references = journal.restore(writer)
    write_rejected = dict(journal.data["write_rejected"])
    want = {r.key for r in remaining}
    t0 = time.time()
    try:
        references, open_sources = _write_samples(items, records, runner, journal, writer, want, donor_of, crops, write_rejected, references,
                                    jpeg_quality, progress)
    except BaseException:
        writer.abort()
        raise
    log.info("wrote %d samples in %.1f s (%d already in finished shards)", len(want), time.time() - t0, len(kept) - len(remaining))

    rejected = Counter(r.reason for k, r in records.items() if r.reason is not None and k not in done and k in rank)
    rejected.update(write_rejected.values())
    writer.manifest.rejected = rejected
    warnings = Counter(w for k in order for w in records[k].warnings)
    writer.manifest.extra.update({**extra, "warnings": dict(sorted(warnings.items())), "references": references})
    n_shards = len(writer.manifest.shards)
    manifest = writer.close()
    journal.shard_done(writer, open_sources if len(writer.manifest.shards) > n_shards else [], write_rejected, references,
                       complete=True)
    return manifest


def _write_samples(items, records: dict[str, Record], runner: _Runner, journal: _Journal, writer: FaceShardWriter,
                   want: set[str], donor_of: Mapping[str, Record], crops: Mapping[str, tuple[str, list]], write_rejected: dict[str, str],
                   references: int, jpeg_quality: int, progress: bool) -> tuple[int, list[str]]:
    """Writes the kept samples still to write; returns the references so far and the open shard's sources."""
    shard_sources: list[str] = []
    tasks = (("load", it) for it in items() if it.key in want)
    results = runner.map(tasks)
    for key, img in _progress(results, "write", len(want), progress):
        rec = records[key]
        if isinstance(img, tuple) or img.size != (rec.width, rec.height):
            reason, detail = img if isinstance(img, tuple) else ("source_changed", f"size {img.size} != analysed {(rec.width, rec.height)}")
            log.warning("%s changed since it was analysed and is not written: %s (%s)", key, reason, detail)
            write_rejected[key] = reason
            continue
        meta = face_meta(img.size, rec.bbox, np.asarray(rec.kps), det_score=rec.score, identity=rec.identity, caption=rec.caption,
                         source=rec.key, landmarks=rec.landmarks)
        ref = ref_embed = ref_kps = None
        donor = donor_of.get(key)
        if donor is not None and donor.key in crops:
            path, ref_kps = crops[donor.key]
            with Image.open(path) as f:
                ref = f.convert("RGB")
            ref_embed = donor.embedding  # the analyzer's, on the donor photo, aligned with the donor face's key points
        n_shards = len(writer.manifest.shards)
        writer.write(sample_key(key), img, meta, id_embed=rec.embedding, ref=ref, ref_id_embed=ref_embed, ref_kps=ref_kps,
                     jpeg_quality=jpeg_quality)
        references += ref is not None
        shard_sources.append(key)
        if len(writer.manifest.shards) > n_shards:
            journal.shard_done(writer, shard_sources, write_rejected, references)
            shard_sources = []

    return references, shard_sources


# ---------------------------------------------------------------------------------------------- CLI

def add_build_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``build-shards`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "build-shards", help="turn a folder of photos or webdataset/img2dataset tars into RealisID face shards",
        description="Keeps single-person photos, writes NAME-000000.tar... with face box, keypoints, identity embedding and a "
                    "reference face from another photo of the same person (with its embedding and keypoints), plus "
                    "NAME.manifest.json. Rerun the same command to resume an interrupted build.")
    p.add_argument("--src", required=True, help="folder of photos (one sub-folder per identity) or tars: a .tar, a glob, "
                                                "a brace pattern or a folder of .tar")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", default=None, help="shard name prefix (default: the --out folder's name)")
    p.add_argument("--analyzer", default=None, help="face analyzer: yunet-sface (default: ships in packages), dlib, insightface "
                                                    "(with --model-dir), or an experiment's (--exp)")
    p.add_argument("--model-dir", default=None, help="insightface model folder (e.g. ~/.insightface/models/buffalo_l): selects "
                                                     "insightface unless --analyzer says otherwise")
    p.add_argument("--exp", default=None, help="experiment whose faces section gives model_dir, det_size, det_thresh")
    p.add_argument("--workers", type=int, default=2, help="analysis processes (0: in this process)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--min-face", type=float, default=32.0, help="smallest face box long side kept, in pixels")
    p.add_argument("--min-score", type=float, default=None, help="lowest detection score kept (default: 0.5; 0 for dlib, "
                                                                  "whose score is not a probability)")
    p.add_argument("--max-side", type=int, default=2048, help="larger photos are downscaled to this long side")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_build_shards)
    return p


def faces_config(model_dir: str | None, exp: str | None, analyzer: str | None = None) -> dict:
    """The face-analyzer config: ``--exp``'s ``faces`` section, with ``--analyzer`` / ``--model-dir`` on top; with
    none of them, the real analyzer that ships in packages (yunet-sface, else dlib)."""
    from realisid.faces import analyzer_config

    faces = None
    if exp:
        from omegaconf import OmegaConf

        from realisid.config import load_config

        faces = OmegaConf.to_container(load_config(exp).faces, resolve=True)
    cfg = analyzer_config(faces, analyzer, model_dir)
    if cfg is None:
        raise ValueError("build-shards needs a face analyzer and none is installed: run `make setup` (it installs yunet-sface and "
                         "dlib), or pass --model-dir with an insightface model folder such as ~/.insightface/models/buffalo_l")
    if cfg.get("kind") != "synthetic":
        cfg.pop("recognizer", None)  # the synthetic analyzer's identity encoder; the others embed faces themselves
    return cfg


def cmd_build_shards(args) -> int:
    from realisid.faces import load_face_analyzer

    from realisid.faces import default_min_score

    cfg = faces_config(args.model_dir, args.exp, args.analyzer)
    name = args.name or os.path.basename(os.path.normpath(args.out))
    analyzer = load_face_analyzer(cfg)
    min_score = default_min_score(cfg["kind"]) if args.min_score is None else args.min_score
    sys.stderr.write(f"realisid build-shards: face analyzer {analyzer.name}, min score {min_score:g}\n")
    from realisid.interrupts import INTERRUPTED_EXIT, terminate_as_interrupt

    t0 = time.time()
    try:
        with terminate_as_interrupt():  # SIGTERM (also to the whole group) stops as Ctrl-C does: finished shards are kept
            manifest = build_shards(args.src, args.out, name, analyzer, workers=args.workers, shard_size=args.shard_size,
                                    min_face=args.min_face, min_score=min_score, max_side=args.max_side,
                                    analyzer_factory=functools.partial(load_face_analyzer, cfg),
                                    progress=not args.no_progress and sys.stderr.isatty())
    except KeyboardInterrupt:
        sys.stderr.write(f"realisid build-shards: interrupted; finished shards in {args.out} are kept, run the same command "
                         "again to resume\n")
        # every shard and the journal are closed by now. The killed pool's manager thread can block the interpreter's
        # exit (concurrent.futures joins it at exit, and it may wait on a pipe to a dead worker): leave at once
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED_EXIT)
    sys.stdout.write(format_summary(manifest, args.out, name, time.time() - t0))
    return 0


def format_summary(manifest: Mapping[str, Any], out_dir: str, name: str, seconds: float | None = None) -> str:
    kept, rejected = manifest["kept"], manifest["rejected"]
    total = kept + sum(rejected.values())
    shards = manifest["shards"]
    pattern = (os.path.join(out_dir, f"{name}-{{000000..{len(shards) - 1:06d}}}.tar") if len(shards) > 1
               else os.path.join(out_dir, shards[0]) if shards else "(none)")
    lines = [
        f"kept          : {kept} of {total} images ({100.0 * kept / max(total, 1):.1f}%) in {len(shards)} shards",
        "rejected      : " + (", ".join(f"{k} {v}" for k, v in sorted(rejected.items(), key=lambda kv: -kv[1])) or "none"),
    ]
    if manifest.get("warnings"):
        lines.append("warnings      : " + ", ".join(f"{k} {v} (kept)" for k, v in manifest["warnings"].items()))
    lines += [
        "face sizes    : " + ", ".join(f"{k} {v}" for k, v in manifest["face_size_bins"].items()),
        f"identities    : {len(manifest['identities'])}; {manifest.get('references', 0)} samples carry a reference face from another photo",
        f"face analyzer : {manifest['face_model']}",
        f"shards        : {pattern}",
        f"manifest      : {os.path.join(out_dir, name + '.manifest.json')}",
    ]
    if seconds is not None:
        lines.append(f"wall time     : {seconds:.1f} s ({total / max(seconds, 1e-9):.1f} images/s)")
    return "\n".join(lines) + "\n"
