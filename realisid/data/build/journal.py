"""What makes a build resumable: the analysis cache (pass 1) and the journal of finished shards (pass 2).

:class:`Record` is what the analysis keeps of one photo (no pixels). :class:`AnalysisCache` appends the records
to ``OUT/NAME.analysis.jsonl`` after a settings line, so an interrupted analysis resumes where it stopped (a line
cut by the interruption is dropped; other settings start the analysis over). :class:`Journal` keeps
``OUT/NAME.progress.json``: finished shards, the source keys in them and the counts so far, written atomically
after each shard. A rerun keeps finished shards, deletes leftover ``.tar.tmp`` files and shards renamed but not
yet journaled, skips what the finished shards hold and numbers new shards after them. The journal records the
build settings, the shard format included: a build with other settings, or an interrupted build of an older
format, is not resumed into mixed shards.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from realisid.data.build.selection import face_long_side
from realisid.data.shard_writer import FaceShardWriter
from realisid.io import atomic_write_json

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1
ANALYSIS_VERSION = 1


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


class Journal:
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


class AnalysisCache:
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
