"""Writing shards in the shard format of :mod:`realisid.data.shards`: :class:`FaceShardWriter` fills
``OUT_DIR/NAME-000000.tar``... one sample at a time (each shard written to ``.tar.tmp`` and renamed when full)
and :class:`ShardManifest` counts what was kept (per face-size bin, per identity) for ``NAME.manifest.json``.
Both the shard builder and the synthetic generator write through it."""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from realisid.data.shards import encode_jpeg, validate_meta
from realisid.geometry import DEFAULT_BINS, face_size, scale_bin
from realisid.io import atomic_write_json, encode_array

log = logging.getLogger(__name__)

@dataclass
class ShardManifest:
    name: str
    face_model: str
    bins: Mapping[str, Sequence[float]] = field(default_factory=lambda: dict(DEFAULT_BINS))
    shards: list[str] = field(default_factory=list)
    shard_counts: dict[str, int] = field(default_factory=dict)
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    bin_counts: Counter = field(default_factory=Counter)
    size_histogram: Counter = field(default_factory=Counter)
    identities: Counter = field(default_factory=Counter)
    extra: dict = field(default_factory=dict)

    def add(self, meta: Mapping[str, Any]) -> None:
        self.kept += 1
        size = face_size(meta["bbox"], meta["width"], meta["height"])
        self.bin_counts[scale_bin(size, self.bins)] += 1
        self.size_histogram[f"{min(int(size * 20), 19) / 20:.2f}"] += 1  # 0.05-wide bins of face size
        if meta.get("identity") is not None:
            self.identities[str(meta["identity"])] += 1

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "face_model": self.face_model,
            "shards": self.shards,
            "shard_counts": self.shard_counts,
            "kept": self.kept,
            "rejected": dict(sorted(self.rejected.items())),
            "face_size_bins": {k: self.bin_counts.get(k, 0) for k in self.bins},
            "face_size_histogram": dict(sorted(self.size_histogram.items())),
            "identities": dict(sorted(self.identities.items())),
            **self.extra,
        }


class FaceShardWriter:
    """Writes samples into ``OUT_DIR/NAME-000000.tar``... and ``OUT_DIR/NAME.manifest.json``.

    Each shard is written to ``.tar.tmp`` and renamed when full, so an interrupted run never leaves a
    truncated ``.tar`` that readers would take for a finished shard.
    """

    def __init__(self, out_dir: str, name: str, *, face_model: str, maxcount: int = 1000,
                 bins: Mapping[str, Sequence[float]] | None = None, start_index: int = 0):
        import webdataset as wds  # local import keeps `import realisid` light

        self._wds = wds
        self.out_dir = out_dir
        self.name = name
        self.maxcount = int(maxcount)
        os.makedirs(out_dir, exist_ok=True)
        self.manifest = ShardManifest(name=name, face_model=face_model, bins=bins or dict(DEFAULT_BINS))
        self._index = start_index
        self._writer = None
        self._count = 0
        self._tmp = None

    def _open(self) -> None:
        final = os.path.join(self.out_dir, f"{self.name}-{self._index:06d}.tar")
        self._tmp = final + ".tmp"
        self._final = final
        self._writer = self._wds.TarWriter(self._tmp, mtime=0)  # byte-reproducible; an int (a float mtime costs every member a pax header)
        self._count = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        os.replace(self._tmp, self._final)
        base = os.path.basename(self._final)
        self.manifest.shards.append(base)
        self.manifest.shard_counts[base] = self._count
        self._writer = None
        self._index += 1

    def write(self, key: str, image: Image.Image, meta: Mapping[str, Any], *, id_embed: np.ndarray | None = None,
              ref: Image.Image | None = None, ref_id_embed: np.ndarray | None = None, ref_kps: np.ndarray | None = None,
              jpeg_quality: int = 95) -> None:
        """One sample. ``id_embed``: this photo's face embedding; ``ref``: a reference face crop from another photo,
        ``ref_id_embed`` its embedding and ``ref_kps`` its 5 key points in ``ref``'s pixels (stored as meta
        ``ref_kps``)."""
        meta = dict(meta)
        if ref is None and (ref_id_embed is not None or ref_kps is not None):
            raise ValueError(f"sample {key!r}: ref_id_embed / ref_kps describe a reference face but no ref image was given; "
                             "pass ref= as well or leave them out")
        if ref_kps is not None:
            meta["ref_kps"] = [[round(float(x), 3), round(float(y), 3)] for x, y in np.asarray(ref_kps, dtype=np.float64).reshape(-1, 2)]
        meta = validate_meta(meta, key)
        if (image.width, image.height) != (meta["width"], meta["height"]):
            raise ValueError(f"sample {key!r}: image is {image.size}, meta says {meta['width']}x{meta['height']}")
        if self._writer is None:
            self._open()
        sample = {"__key__": key, "jpg": encode_jpeg(image, jpeg_quality), "json": json.dumps(meta).encode()}
        if id_embed is not None:
            sample["id.npy"] = encode_array(id_embed, np.float32)
        if ref is not None:
            sample["ref.jpg"] = encode_jpeg(ref, jpeg_quality)
        if ref_id_embed is not None:
            sample["ref_id.npy"] = encode_array(ref_id_embed, np.float32)
        self._writer.write(sample)
        self._count += 1
        self.manifest.add(meta)
        if self._count >= self.maxcount:
            self._finish()

    def abort(self) -> None:
        """Close and delete an interrupted run's open ``.tar.tmp`` without finishing it; finished shards stay as they are.

        The file is removed whether or not its writer was ever assigned: an interrupt inside ``TarWriter(...)`` (the
        file created, the constructor not yet returned) leaves ``_tmp`` set and ``_writer`` None."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # best effort: the .tmp file is removed below
                log.debug("closing %s failed", self._tmp, exc_info=True)
            self._writer = None
        if self._tmp is not None:
            try:  # the unfinished shard is redone by the next run (the journal lists finished shards only)
                os.remove(self._tmp)
            except OSError:  # never created, or renamed into a finished shard already
                pass
            self._tmp = None

    def reject(self, reason: str) -> None:
        self.manifest.rejected[reason] += 1

    def close(self) -> dict:
        self._finish()
        manifest = self.manifest.to_json()
        path = os.path.join(self.out_dir, f"{self.name}.manifest.json")
        atomic_write_json(path, manifest)
        log.info("wrote %d samples in %d shards to %s", manifest["kept"], len(manifest["shards"]), self.out_dir)
        return manifest

    def __enter__(self) -> "FaceShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
