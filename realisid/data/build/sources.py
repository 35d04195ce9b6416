"""Build sources: a folder of photos or webdataset / img2dataset tars, as :class:`SourceItem` candidates.

:func:`resolve_source` tells a folder from tars; :func:`folder_items` lists a folder's photos (identity = the
sub-folder, caption from a ``.txt`` / ``.json`` sidecar read by :func:`read_sidecar`); :func:`tar_items` reads
a tar's samples raw with :mod:`tarfile` and marks damaged, imageless and duplicate samples with their reason
(``corrupt_tar_member``, ``missing_image``, ``duplicate_key``) before anything is decoded.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

from realisid.data.shards import expand_shards

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")  # folder sources, any case
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # tar members, in order of preference
# webdataset's split of a member name into sample key and extension: the key ends at the basename's first dot
_MEMBER_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


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
