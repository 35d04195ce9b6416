"""``build_shards``: a source to face shards in two passes, and the summary the CLI prints.

1. analysis: every photo of the source is analysed and its face selected (:mod:`.workers`,
   :mod:`.selection`); records come back in source order and go to the analysis cache (:mod:`.journal`).
2. writing: the reference crops of the needed donors (the largest face of each identity, and the second
   largest for the donor itself) are cut into a temporary folder (a donor that changed since it was
   analysed gives no reference), then every kept image is decoded again and written through
   :class:`~realisid.data.shard_writer.FaceShardWriter`; each finished shard goes to the journal. The manifest
   counts everything across runs.

``min_face`` is measured in the analysed (downscaled) image.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
from PIL import Image

from realisid.data.build.journal import AnalysisCache, Journal, Record
from realisid.data.build.selection import BORDER_TOLERANCE, sample_key
from realisid.data.build.sources import SourceItem, folder_items, resolve_source, tar_items
from realisid.data.build.workers import Runner, Settings, Worker
from realisid.data.shards import SHARD_FORMAT, face_meta
from realisid.data.shard_writer import FaceShardWriter
from realisid.faces.analysis import FaceAnalyzer

log = logging.getLogger(__name__)


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
    interruption resumes (see :mod:`realisid.data.build.journal`). Returns the manifest.
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
    journal = Journal(out_dir, name, {**analysis_settings, "ref_size": int(ref_size), "jpeg_quality": int(jpeg_quality),
                                       "shard_size": int(shard_size), "shard_format": SHARD_FORMAT})
    journal.load_or_start()
    cache = AnalysisCache(out_dir, name, analysis_settings)
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
    runner = Runner(Worker(settings, analyzer=analyzer), workers, analyzer_factory)
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


def _analyse(items: Callable[[], Iterator[SourceItem]], total: int | None, runner: Runner, cache: AnalysisCache,
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


def _write(items, records: dict[str, Record], order: list[str], runner: Runner, journal: Journal, out_dir: str, name: str,
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


def _write_samples(items, records: dict[str, Record], runner: Runner, journal: Journal, writer: FaceShardWriter,
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
