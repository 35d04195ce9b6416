"""Batches: examples stacked by :func:`collate`, and the training stream's one-buffer form (:func:`pack_batch`,
:func:`unpack_batch`) with uint8 pixels that :func:`ready_batch` turns into what the step reads, on its device."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from realisid.images import pixels_to_float

log = logging.getLogger(__name__)


# Pixel fields, and how collate turns their uint8 (H, W, 3) form into float (3, H, W): the stream keeps them as
# uint8 per sample and converts once per batch (one tensor op instead of one per sample and field).
PIXEL_KEYS = {"image": "signed", "id_image": "signed", "pe_map": "unit"}


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


