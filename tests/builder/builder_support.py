"""Helpers of the shard-builder tests: draw scenes, write images, read shards and manifests back."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image


def scene(w=256, h=256, squares=((96, 64, 32, 255),), bg=(0, 0, 0)) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = bg
    for x, y, side, value in squares:
        img[y:y + side, x:x + side] = value
    return img


def save(path, img, fmt=None, **kw) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    img.save(str(path), format=fmt, **kw)
    return str(path)


def jpeg_bytes(arr, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def read_shards(out_dir, name) -> dict:
    """{sample key: {ext: bytes}} over all finished shards, asserting no key occurs twice."""
    samples: dict = {}
    for fn in sorted(os.listdir(out_dir)):
        if fn.startswith(name + "-") and fn.endswith(".tar"):
            with tarfile.open(os.path.join(out_dir, fn)) as tf:
                keys_here = set()
                for ti in tf:
                    key, ext = ti.name.split(".", 1)
                    if key not in keys_here:
                        assert key not in samples, f"duplicate key {key} in {fn}"
                        keys_here.add(key)
                        samples[key] = {"_shard": fn}
                    samples[key][ext] = tf.extractfile(ti).read()
    return samples


def by_source(samples: dict) -> dict:
    return {json.loads(s["json"])["source"]: s for s in samples.values()}


def decoded(sample, ext="jpg") -> Image.Image:
    return Image.open(io.BytesIO(sample[ext])).convert("RGB")


def shard_bytes(out_dir, name) -> dict:
    names = sorted(fn for fn in os.listdir(out_dir) if fn.startswith(name + "-") and fn.endswith(".tar"))
    return {fn: (out_dir / fn).read_bytes() for fn in names}


def load_json(path):
    with open(path) as f:
        return json.load(f)


def comparable(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "created"}


# ------------------------------------------------------------------------------------------- selection rules
