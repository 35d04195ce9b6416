"""The shard format: the contract between the shard builder (and the synthetic generator) and the pipeline.

One sample is a group of tar members sharing a key (the format users write and read; docs/data.md has the
whole format):

- ``KEY.jpg``: the full RGB photo;
- ``KEY.json``: face metadata: ``width``, ``height``, ``bbox`` (x0, y0, x1, y1), ``kps`` (5 [x, y] in insightface
  order), all in the photo's pixels, plus ``det_score``, ``face_scale``, ``identity``, ``caption``, ``source``,
  optional ``landmarks``; with a reference, ``ref_kps``: the reference face's 5 key points in ``ref.jpg`` pixels
  (as detected on the photo the reference was cut from);
- optional ``KEY.id.npy``: the identity embedding of THIS photo's face (float32, (D,));
- optional ``KEY.ref.jpg``: a reference face crop cut from ANOTHER photo of the same identity (the face box
  expanded 1.3x, square), so the model does not learn to copy the target;
- optional ``KEY.ref_id.npy``: the identity embedding of the reference face (float32, (D,)), computed by the
  face analyzer on the photo the reference was cut from, aligned with that face's detected key points.

Training conditions on the reference whenever a sample has one: its embedding is ``ref_id.npy`` and never
``id.npy`` (which describes the target). Format history: shards written before ``ref_id.npy`` / ``ref_kps``
existed are still read: their references have no stored embedding (the identity encoder runs on the
reference crop) and no key points (a frontal face in the crop stands in). Beside the shards,
``NAME.manifest.json`` counts what was kept and rejected. Nothing here ever unpickles. Writing:
:mod:`realisid.data.shard_writer`.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps

from realisid.geometry import face_scale

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("width", "height", "bbox", "kps")
SHARD_FORMAT = 2  # 2: ref_id.npy and meta ref_kps beside ref.jpg (1: ref.jpg alone); both are read
# Decompression-bomb guard: larger images are refused, not decoded (bounded memory).
MAX_PIXELS = 64_000_000


try:  # every sample's JSON is parsed on the training path: orjson does it 5x faster than the standard library
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - orjson is a dependency; the standard parser gives the same dicts
    _loads = json.loads


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` is the short code counted in manifests and logs."""

    def __init__(self, reason: str, key: str, detail: str):
        super().__init__(f"sample {key!r}: {reason}: {detail}")
        self.reason = reason
        self.key = key
        self.detail = detail


def decode_image(data: bytes, key: str = "?", max_pixels: int = MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Bytes to an RGB PIL image with EXIF orientation applied; any failure is a ``corrupt_image``.

    ``min_side``: the caller needs no more than this many pixels on the short side, so a JPEG may be decoded
    at a reduced DCT scale (1/2, 1/4, 1/8) that still keeps at least ``min_side`` pixels on each side. This
    is several times cheaper than decoding every pixel and downscaling after; callers rescale geometry by
    the returned image's size.
    """
    if not data:
        raise SampleError("corrupt_image", key, "zero-byte image")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only: the size is known before any decoding
        w, h = img.size
        if w * h > max_pixels:
            raise SampleError("huge_image", key, f"{w}x{h} exceeds {max_pixels} pixels")
        if min_side and img.format == "JPEG" and min(w, h) >= 2 * min_side:
            img.draft("RGB", (max(1, min_side * w // min(w, h)), max(1, min_side * h // min(w, h))))
        img.load()
        if any(k in img.info for k in ("exif", "xmp", "XML:com.adobe.xmp")):  # only these can carry an orientation
            img = ImageOps.exif_transpose(img)
    except SampleError:
        raise
    except Image.DecompressionBombError as exc:
        raise SampleError("huge_image", key, str(exc)) from None
    except Exception as exc:  # PIL raises many types for bad files
        raise SampleError("corrupt_image", key, f"{type(exc).__name__}: {exc}") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any mode: 16-bit and float greyscale are rescaled, alpha is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def image_header_size(data: bytes, key: str = "?") -> tuple[int, int]:
    """``(width, height)`` of an encoded image as :func:`decode_image` would show it (EXIF rotation applied),
    from its header alone: nothing is decoded."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        turned = img.getexif().get(0x0112) in (5, 6, 7, 8)  # orientations that swap width and height
    except Exception as exc:  # PIL raises many types for bad files
        raise SampleError("corrupt_image", key, f"unreadable image header ({type(exc).__name__}: {exc})") from None
    return (h, w) if turned else (w, h)


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_npy(data: bytes, key: str = "?", dim: int | None = None) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise SampleError("bad_embedding", key, f"unreadable .npy ({type(exc).__name__}: {exc})") from None
    arr = np.asarray(arr, dtype=np.float32).reshape(-1)
    if dim is not None and arr.shape[0] != dim:
        raise SampleError("bad_embedding", key, f"embedding has {arr.shape[0]} values, expected {dim}")
    if not np.all(np.isfinite(arr)):
        raise SampleError("nan_embedding", key, "embedding contains NaN or Inf")
    return arr


def validate_meta(meta: Any, key: str) -> dict:
    """Check a sample's JSON against the shard format; returns it with numeric fields as floats."""
    if not isinstance(meta, dict):
        raise SampleError("malformed_json", key, f"expected an object, got {type(meta).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise SampleError("malformed_json", key, f"missing fields {missing}")
    try:
        bbox = [float(v) for v in meta["bbox"]]
        kps = np.asarray(meta["kps"], dtype=np.float32)
        width, height = int(meta["width"]), int(meta["height"])
    except (TypeError, ValueError) as exc:
        raise SampleError("malformed_json", key, f"bad bbox/kps/size: {exc}") from None
    if len(bbox) != 4 or not bbox[2] > bbox[0] or not bbox[3] > bbox[1]:
        raise SampleError("malformed_json", key, f"bbox {bbox} is not x0<x1, y0<y1")
    if kps.shape != (5, 2) or not np.all(np.isfinite(kps)):
        raise SampleError("malformed_json", key, f"kps must be 5 finite [x, y] pairs, got shape {kps.shape}")
    out = dict(meta)
    out.update(bbox=bbox, kps=kps.tolist(), width=width, height=height)
    if meta.get("ref_kps") is not None:
        try:
            ref_kps = np.asarray(meta["ref_kps"], dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise SampleError("malformed_json", key, f"bad ref_kps: {exc}") from None
        if ref_kps.shape != (5, 2) or not np.all(np.isfinite(ref_kps)):
            raise SampleError("malformed_json", key, f"ref_kps must be 5 finite [x, y] pairs in ref.jpg pixels, got shape {ref_kps.shape}")
        out["ref_kps"] = ref_kps.tolist()
    return out


def decode_sample(raw: Mapping[str, Any], embed_dim: int | None = None,
                  min_side: int | Callable[[dict], int] | None = None, ref_min_side: int | None = None, with_image: bool = True,
                  with_ref: bool = True) -> dict:
    """A raw webdataset sample (member suffix -> bytes) to ``{key, image, meta, id_embed, ref, has_ref,
    ref_id_embed, ref_size, decode_scale}``.

    ``id_embed`` / ``ref_id_embed``: the target's / the reference's stored embedding (None without one);
    ``has_ref``: the sample has a reference (whether or not it was decoded); ``ref_size``: ``ref.jpg``'s
    (width, height) as stored, from its header: the frame of ``meta["ref_kps"]`` (None without them).
    ``min_side`` (pixels, or a function of the validated meta) and ``ref_min_side`` let the JPEGs be decoded
    at a reduced scale (see :func:`decode_image`); the meta stays in the stored photo's pixels and
    ``decode_scale`` (1, 1/2, 1/4 or 1/8) maps them onto the decoded image.
    ``with_image=False`` / ``with_ref=False`` leave the photo / the reference undecoded (None), for samples whose
    latents and pixels are precomputed.
    Raises :class:`SampleError` with a reason code for anything unusable.
    """
    key = str(raw.get("__key__", "?"))
    if "json" not in raw:
        raise SampleError("missing_json", key, "no .json member")
    if "jpg" not in raw:
        raise SampleError("missing_image", key, "no .jpg member")
    try:
        meta = _loads(raw["json"])
    except Exception as exc:
        raise SampleError("malformed_json", key, f"{type(exc).__name__}: {exc}") from None
    meta = validate_meta(meta, key)
    id_embed = decode_npy(raw["id.npy"], key, embed_dim) if "id.npy" in raw else None
    has_ref = "ref.jpg" in raw
    if "ref_id.npy" in raw and not has_ref:
        raise SampleError("bad_embedding", key, "ref_id.npy without ref.jpg: the reference embedding has no reference face")
    ref_id_embed = decode_npy(raw["ref_id.npy"], key, embed_dim) if "ref_id.npy" in raw else None
    ref_size = image_header_size(raw["ref.jpg"], key) if has_ref and "ref_kps" in meta else None  # ref_kps' frame
    ref = decode_image(raw["ref.jpg"], key, min_side=ref_min_side) if with_ref and has_ref else None
    out = {"key": key, "image": None, "meta": meta, "id_embed": id_embed, "ref": ref, "has_ref": has_ref,
           "ref_id_embed": ref_id_embed, "ref_size": ref_size, "decode_scale": 1.0}
    if not with_image:
        return out
    need = min_side(meta) if callable(min_side) else min_side
    image = decode_image(raw["jpg"], key, min_side=need)
    width, height = meta["width"], meta["height"]
    r = 1
    if image.size != (width, height):
        r = round(width / image.size[0]) if image.size[0] else 0
        if not need or r not in (2, 4, 8) or image.size != (-(-width // r), -(-height // r)):
            raise SampleError("malformed_json", key, f"json size {width}x{height} != image size {image.size[0]}x{image.size[1]}")
    # DCT scaling: decoded pixel i covers stored pixels [i*r, (i+1)*r)
    return {**out, "image": image, "decode_scale": 1.0 / r}


def face_meta(image_size: tuple[int, int], bbox: Sequence[float], kps: np.ndarray, *, det_score: float,
              identity: str | None, caption: str, source: str, landmarks: Mapping[str, Any] | None = None) -> dict:
    """The JSON record of one sample, in the shard format above."""
    width, height = image_size
    meta = {
        "width": int(width),
        "height": int(height),
        "bbox": [round(float(v), 3) for v in bbox],
        "kps": [[round(float(x), 3), round(float(y), 3)] for x, y in np.asarray(kps).reshape(5, 2)],
        "det_score": round(float(det_score), 4),
        "face_scale": round(face_scale(bbox, height), 5),
        "identity": identity,
        "caption": caption,
        "source": source,
    }
    if landmarks is not None:
        meta["landmarks"] = {k: [[round(float(x), 3), round(float(y), 3)] for x, y in v] for k, v in landmarks.items()}
    return meta


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs from a brace pattern (``a-{000000..000007}.tar``), a glob, a directory or a list."""
    import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for s in specs:
        s = str(s)
        if os.path.isdir(s):
            urls.extend(sorted(glob.glob(os.path.join(s, "*.tar"))))
        elif any(c in s for c in "*?["):
            urls.extend(sorted(glob.glob(s)))
        else:
            urls.extend(braceexpand.braceexpand(s))
    return urls


def check_shards_exist(urls: Iterable[str], what: str) -> list[str]:
    urls = list(urls)
    if not urls:
        raise FileNotFoundError(f"{what}: the shard pattern matched no files; set it to a tar pattern like data/shards/NAME/NAME-{{000000..000009}}.tar")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(f"{what}: {len(missing)} of {len(urls)} shards do not exist, first {missing[0]!r}; build them with `make shards` or fix the path")
    return urls


def read_manifest(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
