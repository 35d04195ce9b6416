"""The per-image work of both passes and the process pool that runs it.

A :class:`Worker` analyses a photo (decode with EXIF rotation and any colour mode to RGB, downscale to
``max_side``, detect faces, select) into a small :class:`~realisid.data.build.journal.Record`, loads a kept photo
again for writing, and cuts a donor's reference crop. :class:`Runner` streams tasks through it in source order:
in the calling process (``workers=0``) or over ``spawn`` worker processes that each build their own analyzer
from a picklable factory (ONNX sessions do not pickle), with a bounded number of tasks in flight.
"""
from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from realisid.data.build.journal import Record
from realisid.data.build.selection import downscale, face_long_side, select_face
from realisid.data.build.sources import SourceItem, read_sidecar
from realisid.data.shards import SampleError, decode_image
from realisid.faces.analysis import FaceAnalyzer
from realisid.interrupts import leave_interrupts_to_parent

log = logging.getLogger(__name__)


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


class Runner:
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
