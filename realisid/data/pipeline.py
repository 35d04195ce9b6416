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

from realisid.data.guidance import PART_COLOURS, coarse_parts_from_kps, draw_contours, location_map
from realisid.data.cache_format import stored_arrays
from realisid.data.shards import SampleError, check_shards_exist, decode_sample, expand_shards
from realisid.geometry import expand_square_box, face_size, square_window
from realisid.images import ID_CROP_EXPAND, centred_mask, crop_resized, frontal_id_kps, identity_crop, identity_crop_kps, pixels_to_float

log = logging.getLogger(__name__)

@functools.lru_cache(maxsize=8)
def _centred_mask_tensor(size: int) -> torch.Tensor:
    return torch.from_numpy(centred_mask(size))[None]


_NO_EMBED = torch.zeros(0)  # shared by every example without id.npy (collate copies; nothing writes to it)

# Pixel fields, and how collate turns their uint8 (H, W, 3) form into float (3, H, W): the stream keeps them as
# uint8 per sample and converts once per batch (one tensor op instead of one per sample and field).
PIXEL_KEYS = {"image": "signed", "id_image": "signed", "pe_map": "unit"}


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


def collate(examples: Sequence[dict], float_pixels: bool = True) -> dict:
    """Examples to a batch. ``float_pixels=False`` keeps uint8 pixels (H, W, 3) as they are, for the training
    stream: a quarter of the bytes between processes and to the device, where :func:`finish_batch` converts them."""
    out: dict[str, Any] = {}
    for k in examples[0]:
        vals = [e[k] for e in examples]
        if k == "id_embed":
            sizes = {v.numel() for v in vals}
            out[k] = torch.stack(vals) if len(sizes) == 1 else torch.stack([v if v.numel() else torch.zeros(max(sizes)) for v in vals])
        elif isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], bool):
            out[k] = torch.tensor(vals)
        elif isinstance(vals[0], float):
            out[k] = torch.tensor(vals, dtype=torch.float32)
        else:
            out[k] = vals
    return finish_batch(out) if float_pixels else out


def finish_batch(batch: dict) -> dict:
    """uint8 pixel fields to float (3, H, W), on whatever device the batch is (a no-op for float batches).

    Works on one example as on a batch: the channel axis is always the last but two."""
    for k, kind in PIXEL_KEYS.items():
        v = batch.get(k)
        if isinstance(v, torch.Tensor) and v.dtype == torch.uint8:
            batch[k] = pixels_to_float(v, kind)
    return batch


PACKED = "packed"  # the one buffer a training batch travels in; "packed_layout" says where each tensor lies in it


def pack_batch(batch: dict) -> dict:
    """Every tensor of ``batch`` in one uint8 buffer (8-byte aligned) plus a plain-Python layout.

    A DataLoader worker hands each tensor to the main process separately (one shared-memory segment each), and
    the main process moves each to the device separately; with a dozen fields that costs more than building
    the examples. One buffer is one hand-over and one copy. :func:`unpack_batch` restores the tensors as views.
    """
    layout, pieces, offset = [], [], 0
    out = {}
    for k, v in batch.items():
        if not isinstance(v, torch.Tensor):
            out[k] = v
            continue
        raw = v.contiguous().reshape(-1).view(torch.uint8)
        pad = -raw.numel() % 8
        layout.append((k, str(v.dtype).removeprefix("torch."), tuple(v.shape), offset, raw.numel()))
        pieces += [raw, torch.zeros(pad, dtype=torch.uint8)] if pad else [raw]
        offset += raw.numel() + pad
    out[PACKED] = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.uint8)
    out["packed_layout"] = layout
    return out


def unpack_batch(batch: dict) -> dict:
    """The tensors of a :func:`pack_batch` batch, as views of its buffer (on whatever device the buffer is)."""
    if PACKED not in batch:
        return batch
    buf = batch[PACKED]
    out = {k: v for k, v in batch.items() if k not in (PACKED, "packed_layout")}
    for k, dtype, shape, offset, n in batch["packed_layout"]:
        out[k] = buf[offset : offset + n].view(getattr(torch, dtype)).view(shape)
    return out


def ready_batch(batch: dict) -> dict:
    """A training-stream batch as the step uses it: unpacked, pixels in float (the module does this on its device)."""
    return finish_batch(unpack_batch(batch))


def stream_collate(examples: Sequence[dict]) -> dict:
    """The training stream's batches: uint8 pixels, packed into one buffer."""
    return pack_batch(collate(examples, float_pixels=False))


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


def skip_bad_tar(exn: Exception) -> bool:
    """webdataset handler: a corrupt tar member or unreadable shard is logged and skipped."""
    log.warning("skipped unreadable shard data: %s: %s", type(exn).__name__, exn)
    return True


def _shuffled(items, bufsize: int, rng):
    """Buffer shuffle driven by ``rng`` only, so the order is a pure function of the seed."""
    buf: list = []
    for x in items:
        buf.append(x)
        if len(buf) >= bufsize:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class TrainStream(torch.utils.data.IterableDataset):
    """The training stream: infinite, deterministic, resumable, equal on every rank.

    Stream ``k`` of rank ``r`` draws shards with ``random.Random(f"{seed}-{r}-{k}")``: with ``resampled``,
    shards are drawn with replacement (any shard count works for any number of ranks); otherwise each
    stream owns every ``world x workers``-th shard and cycles through them in a fresh order each pass,
    which needs at least ranks x workers shards. Raw samples are shuffled in a buffer BEFORE decoding, and
    every batch carries ``data_stream`` and ``data_consumed`` (raw samples that stream has used). To resume,
    each stream skips its consumed raw samples without decoding them, and ``offset`` rotates which worker
    serves which stream so batches arrive in the same order as in an uninterrupted run. The stream never
    ends, so no rank waits on another that ran out of data.
    """

    MAX_FAILED_IN_A_ROW = 1000

    def __init__(self, urls: Sequence[str], maker: ExampleMaker, *, batch_size: int, shuffle_buffer: int, seed: int, rank: int,
                 world_size: int, num_workers: int, resampled: bool, consumed: Mapping[int, int] | None = None, offset: int = 0,
                 collate_fn=None):
        super().__init__()
        self.collate_fn = collate_fn or stream_collate  # the module unpacks and converts once the batch is on its device
        self.urls, self.maker = list(urls), maker
        self.batch_size, self.shuffle_buffer = int(batch_size), int(shuffle_buffer)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.num_workers, self.resampled = max(1, int(num_workers)), bool(resampled)
        self.consumed, self.offset = dict(consumed or {}), int(offset)
        needed = self.world_size * self.num_workers
        if not self.resampled and len(self.urls) < needed:
            raise ValueError(f"{len(self.urls)} train shards for {self.world_size} ranks x {self.num_workers} workers = {needed} readers: "
                             "some would get no data and DDP would hang; write more shards, lower data.num_workers, or set data.resampled=true")

    def _urls(self, stream: int, rng):
        if self.resampled:
            while True:
                yield rng.choice(self.urls)
        mine = self.urls[self.rank * self.num_workers + stream :: self.world_size * self.num_workers]
        while True:
            order = list(mine)
            rng.shuffle(order)
            yield from order

    def __iter__(self):
        import random

        from webdataset.tariterators import tarfile_samples

        info = torch.utils.data.get_worker_info()
        stream = ((info.id if info else 0) + self.offset) % self.num_workers
        rng = random.Random(f"realisid-{self.seed}-{self.rank}-{stream}")
        raw = tarfile_samples(({"url": u} for u in self._urls(stream, rng)), handler=skip_bad_tar)
        skip = int(self.consumed.get(stream, 0))
        used, failed, batch = 0, 0, []
        for sample in _shuffled(raw, self.shuffle_buffer, rng):
            used += 1
            if used <= skip:
                continue
            ex = self.maker(sample)
            if ex is None:
                failed += 1
                if failed >= self.MAX_FAILED_IN_A_ROW:  # an endless stream of unusable samples would hang training silently
                    raise RuntimeError(f"the last {failed} samples of stream {stream} were all unusable ({dict(self.maker.skipped)}); "
                                       "check the shards (data.train_shards / data.precomputed) against the experiment's config")
                continue
            failed = 0
            batch.append(ex)
            if len(batch) == self.batch_size:
                out = self.collate_fn(batch)
                out["data_stream"], out["data_consumed"] = stream, used
                batch = []
                yield out


def load_examples(urls: Sequence[str], maker: ExampleMaker, limit: int) -> list[dict]:
    """The first ``limit`` good examples of ``urls`` in order (validation sets are small and fixed).

    Every rank reads the same list; Lightning's distributed sampler splits it between ranks.
    """
    from webdataset.tariterators import tarfile_samples

    out = []
    for raw in tarfile_samples(({"url": u} for u in urls), handler=skip_bad_tar):
        ex = maker(raw)
        if ex is not None:  # kept one by one, so the pixels are converted here rather than per batch
            out.append(finish_batch(ex))
        if len(out) >= limit:
            break
    return out


def resolve_shards(spec, what: str) -> list[str]:
    return check_shards_exist(expand_shards(spec), what)
