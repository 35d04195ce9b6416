"""From a decoded shard sample to a training example; the webdataset pipeline around it.

An example holds everything the branches need, at the experiment's resolutions (docs/data.md lists them):
``image`` (3,R,R) in [-1,1]; ``face_box`` and ``crop_box`` (4,) in R-pixels (the crop box is square, on the
VAE grid, so it maps onto whole latent pixels); ``pe_map`` (3,P,P) in [0,1], the pose/expression contours in
crop coordinates (P = local latent size x VAE factor); ``loc_map`` (1,R,R);
``id_image`` (3,S,S) and ``id_mask`` (1,S,S), the reference face (another photo of the person when the shard
has one), and ``id_kps`` (5,2) float32, its 5 key points in ``id_image`` pixels; ``id_embed`` (D,) with
``has_id_embed``: the stored embedding of the face in ``id_image`` (the reference's ``ref_id.npy`` when the
sample has a reference, never the target's ``id.npy`` then); ``original_size`` (2,) float32, the photo's
(height, width), and ``crop_top_left`` (2,) float32, the (top, left) of the training crop in the photo resized
so its short side is R (SDXL's micro-conditioning, as diffusers' train_text_to_image_sdxl.py computes it);
``caption`` and ``caption_no_identity`` (the same without the person's identity attributes, when the shard has
it); ``face_size`` (the bins' measure). From a precomputed cache, ``id_features`` as well: the identity
encoder's output for ``id_image`` ((D,) or (N, D)).
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from realisid.data.batch import finish_batch
from realisid.data.cache_format import stored_arrays
from realisid.data.guidance import PART_COLOURS, coarse_parts_from_kps, draw_contours, location_map
from realisid.data.shards import SampleError, decode_sample
from realisid.geometry import expand_square_box, face_size, square_window
from realisid.images import ID_CROP_EXPAND, centred_mask, crop_resized, frontal_id_kps, identity_crop, identity_crop_kps

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def _centred_mask_tensor(size: int) -> torch.Tensor:
    return torch.from_numpy(centred_mask(size))[None]


_NO_EMBED = torch.zeros(0)  # shared by every example without id.npy (collate copies; nothing writes to it)

def sdxl_size_and_crop(width: int, height: int, bbox: Sequence[float], resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """SDXL's micro-conditioning of a training example: ``original_size`` (height, width) of the photo and
    ``crop_top_left`` (top, left) of the example's square view (:func:`square_window`) in the photo resized so its
    short side is ``resolution``, rounded to whole pixels: the convention of diffusers' train_text_to_image_sdxl.py
    (resize the short side to the resolution, then crop). In the stored photo's pixels, so the values do not
    depend on the scale a JPEG was decoded at. Both (2,) float32."""
    win = square_window(width, height, bbox)
    s = resolution / float(win[2] - win[0])
    return (np.array([height, width], dtype=np.float32),
            np.round(np.array([win[1] * s, win[0] * s], dtype=np.float64)).astype(np.float32))


def example_id_kps(decoded: Mapping[str, Any], bbox: Sequence[float], width: int, height: int, id_image_size: int) -> np.ndarray:
    """The 5 key points of the face in an example's ``id_image`` (``id_image_size`` pixels), (5, 2) float32.

    With a reference: the shard's ``ref_kps`` scaled from ``ref.jpg``'s pixels; without: the target's key points
    mapped into its identity crop (``bbox``, ``width``, ``height`` in the decoded photo's pixels); a frontal face in
    the crop's face box as the last resort (a reference from a shard written before ``ref_kps``, or no photo).
    """
    meta = decoded["meta"]
    S = float(id_image_size)
    if decoded.get("has_ref", decoded.get("ref") is not None):
        ref_kps, ref_size = meta.get("ref_kps"), decoded.get("ref_size")
        if ref_kps is not None and ref_size:
            scale = np.array([S / ref_size[0], S / ref_size[1]], np.float32)  # ref.jpg is resized whole to S x S
            return (np.asarray(ref_kps, dtype=np.float32).reshape(5, 2) * scale).astype(np.float32)
        return frontal_id_kps(id_image_size)
    r = float(decoded.get("decode_scale", 1.0))  # meta is in stored-photo pixels; the photo may be decoded smaller
    return identity_crop_kps(np.asarray(meta["kps"], dtype=np.float32) * r, bbox, width, height, id_image_size)


def make_example(decoded: Mapping[str, Any], *, resolution: int, vae_scale_factor: int, local_latent_size: int,
                 crop_expand: float, id_image_size: int, soft_location: bool = False, uint8_pixels: bool = False,
                 stored: Mapping[str, np.ndarray] | None = None) -> dict:
    """One training example from :func:`realisid.data.shards.decode_sample` output.

    ``uint8_pixels``: leave the :data:`PIXEL_KEYS` fields as uint8 (H, W, 3) for :func:`collate` to convert.
    ``stored``: ``pe_map``, ``id_image``, ``id_mask`` and ``id_kps`` from a precomputed cache (``realisid precompute``),
    which this function made when the cache was written; they are used as they are instead of being made again.
    When the sample has a reference, ``id_embed`` is the reference's stored embedding (``ref_id.npy``), never the
    target's ``id.npy``: the conditioning must describe the face in ``id_image``.
    """
    stored = stored or {}
    img: Image.Image | None = decoded["image"]  # None: latents precomputed, the photo's pixels are not needed
    meta = decoded["meta"]
    r = float(decoded.get("decode_scale", 1.0))  # meta is in stored-photo pixels; img may be decoded smaller
    W, H = img.size if img is not None else (meta["width"], meta["height"])
    bbox = [v * r for v in meta["bbox"]] if r != 1.0 else meta["bbox"]
    win = square_window(W, H, bbox)
    s = resolution / float(win[2] - win[0])
    offset = np.array(win[:2], dtype=np.float32)

    def to_global(pts):
        return (np.asarray(pts, dtype=np.float32).reshape(-1, 2) * r - offset) * s

    face_box = np.clip(to_global(meta["bbox"]).reshape(4), 0, resolution)
    if face_box[2] - face_box[0] < 1 or face_box[3] - face_box[1] < 1:
        raise SampleError("face_outside_view", decoded["key"], f"face box {meta['bbox']} is outside the square view {win} of the photo")
    kps = to_global(meta["kps"])
    crop_box = expand_square_box(face_box, crop_expand, resolution, resolution, multiple=vae_factor_ok(vae_scale_factor))
    if "pe_map" in stored:
        pe_map = stored["pe_map"]
    else:
        pe_map = draw_contours(*_contour_points(meta, kps, to_global, decoded["key"]), crop_box, local_latent_size * vae_scale_factor)
    loc = location_map(face_box, resolution, resolution, soft=soft_location)
    if "id_image" in stored:
        id_img, id_mask = stored["id_image"], torch.from_numpy(stored["id_mask"].astype(np.float32))[None]
    elif decoded.get("ref") is not None:
        id_img = decoded["ref"]
        if id_img.size != (id_image_size, id_image_size):
            id_img = id_img.resize((id_image_size, id_image_size), Image.BICUBIC)
        id_mask = _centred_mask_tensor(id_image_size)
    else:
        id_img, mask = identity_crop(img, bbox, id_image_size)
        id_mask = torch.from_numpy(mask)[None]
    has_ref = bool(decoded.get("has_ref", decoded.get("ref") is not None))
    emb = decoded.get("ref_id_embed") if has_ref else decoded.get("id_embed")
    if "id_kps" in stored:
        id_kps = np.array(stored["id_kps"], dtype=np.float32)
    else:
        id_kps = example_id_kps(decoded, bbox, W, H, id_image_size)
    original_size, crop_top_left = sdxl_size_and_crop(meta["width"], meta["height"], meta["bbox"], resolution)
    pixels = {"pe_map": pe_map, "id_image": np.asarray(id_img)}
    if img is not None:
        pixels["image"] = np.asarray(crop_resized(img, win, resolution))
    pixels = {k: torch.from_numpy(np.array(v, dtype=np.uint8)) for k, v in pixels.items()}
    ex = {
        "key": decoded["key"],
        "face_box": torch.from_numpy(face_box),
        "crop_box": torch.from_numpy(np.array(crop_box, dtype=np.int64)),
        "kps": torch.from_numpy(kps),
        "pe_map": pixels["pe_map"],
        "loc_map": torch.from_numpy(loc)[None],
        "id_image": pixels["id_image"],
        "id_mask": id_mask,
        "id_kps": torch.from_numpy(id_kps),
        "id_embed": torch.from_numpy(emb) if emb is not None else _NO_EMBED,
        "has_id_embed": emb is not None,
        "original_size": torch.from_numpy(original_size),
        "crop_top_left": torch.from_numpy(crop_top_left),
        "identity": identity_of(meta, decoded["key"]),
        "caption": str(meta.get("caption") or ""),
        # the caption without the person's identity (hair, glasses, ...) where the shard has one; else the caption
        "caption_no_identity": str(meta.get("caption_no_identity") or meta.get("caption") or ""),
        "face_size": float(face_size(meta["bbox"], meta["width"], meta["height"])),
    }
    if "image" in pixels:
        ex["image"] = pixels["image"]
    return ex if uint8_pixels else finish_batch(ex)


def identity_of(meta: Mapping[str, Any], key: str) -> str:
    """A sample's identity: the shard's ``identity`` field, else its key up to the last ``-`` (``synth-0003-0011``)."""
    ident = meta.get("identity")
    return str(ident) if ident not in (None, "") else key.rsplit("-", 1)[0]


def _contour_points(meta: Mapping[str, Any], kps: np.ndarray, to_global, key: str) -> tuple[list[tuple[str, int]], np.ndarray]:
    """(part, count) pairs and all their points in example pixels: the dense landmarks, converted at once, or the
    coarse parts from the 5 keypoints."""
    dense = [(k, len(v)) for k, v in (meta.get("landmarks") or {}).items()]  # {part: [[x, y], ...]}
    if any(k in PART_COLOURS for k, _ in dense):
        flat = [c for pts in meta["landmarks"].values() for p in pts for c in p]
        if len(flat) != 2 * sum(n for _, n in dense):
            raise SampleError("malformed_json", key, "landmarks must be lists of [x, y] points")
        return dense, to_global(flat)
    coarse = coarse_parts_from_kps(kps)
    return [(k, len(v)) for k, v in coarse.items()], np.concatenate(list(coarse.values()))


def vae_factor_ok(f: int) -> int:
    if f < 1 or f & (f - 1):
        raise ValueError(f"VAE scale factor {f} must be a power of two")
    return f


# what a precomputed sample adds to its example as it is stored (the encoders' outputs)
STORED_BATCH_KEYS = ("latent_moments", "text_embeds", "text_pooled", "text_embeds_no_identity", "text_pooled_no_identity", "id_features")


class ExampleMaker:
    """Picklable map function for webdataset workers: decode, build, and count what had to be skipped.

    JPEGs are decoded at the smallest DCT scale that still gives every pixel the example uses (see
    :meth:`image_min_side`), which is what makes the pipeline keep up with a plain decoder.
    """

    def __init__(self, embed_dim: int | None = None, **example_kwargs: Any):
        self.embed_dim = embed_dim
        self.kwargs = example_kwargs
        self.skipped: Counter = Counter()

    def image_min_side(self, meta: Mapping[str, Any], has_ref: bool) -> int:
        """Short-side pixels the photo must keep: the square view at ``resolution``, and, when the sample has
        no reference photo, the identity crop at ``id_image_size``."""
        W, H = meta["width"], meta["height"]
        need = int(self.kwargs["resolution"])
        if not has_ref:
            box = expand_square_box(meta["bbox"], ID_CROP_EXPAND, W, H)
            need = max(need, -(-int(self.kwargs["id_image_size"]) * min(W, H) // max(1, box[2] - box[0])))
        return need

    def __call__(self, raw: Mapping[str, Any]) -> dict | None:
        has_ref = "ref.jpg" in raw
        key = str(raw.get("__key__", "?"))
        try:
            stored = stored_arrays(raw, key)
            # a precomputed sample carries its latents and its drawn pixels: no JPEG is decoded at all
            done = "id_image" in stored
            decoded = decode_sample(raw, self.embed_dim, min_side=lambda meta: self.image_min_side(meta, has_ref),
                                    ref_min_side=int(self.kwargs["id_image_size"]), with_image="latent_moments" not in stored or not (has_ref or done),
                                    with_ref=not done)
            ex = make_example(decoded, uint8_pixels=True, stored=stored, **self.kwargs)
            if stored:
                ex.pop("image", None)
                ex.update({k: torch.from_numpy(stored[k]) for k in STORED_BATCH_KEYS if k in stored})
        except SampleError as err:
            self.skipped[err.reason] += 1
            n = sum(self.skipped.values())
            if n <= 5 or n % 100 == 0:
                log.warning("skipped %s (%d skipped so far in this worker: %s)", err, n, dict(self.skipped))
            return None
        ex["skipped"] = sum(self.skipped.values())
        return ex


