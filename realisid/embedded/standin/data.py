"""The stand-in encoder's data: every face crop of a set of (small) shards, loaded into memory once."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from realisid.data.shards import SampleError, check_shards_exist, decode_sample

from .model import context_crop, identity_crop

log = logging.getLogger(__name__)


@dataclass
class FaceSet:
    """Face crops of a set of shards, in memory."""

    identities: list[str] = field(default_factory=list)  # per sample
    crops: torch.Tensor | None = None  # (N, 3, S, S) float in [-1, 1], exactly identity_crop
    context: torch.Tensor | None = None  # (N, 3, 2S, 2S) uint8, for augmentation
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.identities)

    def labels(self) -> tuple[np.ndarray, list[str]]:
        names = sorted(set(self.identities))
        index = {n: i for i, n in enumerate(names)}
        return np.array([index[n] for n in self.identities], dtype=np.int64), names


def load_face_set(urls: Sequence[str], image_size: int, *, with_context: bool = False) -> FaceSet:
    """Read shards (raw bytes through :func:`realisid.data.shards.decode_sample`; nothing is unpickled)."""
    import webdataset as wds

    urls = check_shards_exist(urls, "stand-in encoder shards")
    out = FaceSet()
    crops, context = [], []
    # every sample, in this process: no node/worker splitting even when called under DDP
    dataset = wds.WebDataset(list(urls), shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)
    for raw in dataset:
        try:
            sample = decode_sample(raw)
        except SampleError as exc:
            out.skipped[exc.reason] = out.skipped.get(exc.reason, 0) + 1
            continue
        identity = sample["meta"].get("identity")
        if identity is None:
            out.skipped["no_identity"] = out.skipped.get("no_identity", 0) + 1
            continue
        image, bbox = sample["image"], sample["meta"]["bbox"]
        out.identities.append(str(identity))
        crops.append(identity_crop(image, bbox, image_size))
        if with_context:
            context.append(context_crop(image, bbox, image_size))
    if out.skipped:
        log.warning("stand-in encoder: skipped samples %s", out.skipped)
    if crops:
        out.crops = torch.stack(crops)
        out.context = torch.stack(context) if with_context else None
    return out
