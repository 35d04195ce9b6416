"""The stand-in identity encoder's network, its input crop, and loading a trained one.

Input: the square face crop :func:`identity_crop` makes (the face box expanded 1.3x, shifted inside the
image, resized to ``image_size``), RGB scaled to [-1, 1]. Output: an L2-normalised embedding. The network is
named :data:`STANDIN_NAME` in every log, config and table so nobody mistakes its numbers for real ArcFace
similarities.
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from realisid.geometry import expand_square_box
from realisid.images import ID_CROP_EXPAND as CROP_FACTOR  # one crop definition
from realisid.images import identity_crop as pipeline_crop
from realisid.images import to_tensor

STANDIN_NAME = "standin-arcface-synthetic"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MISSING_HINT = "run `make train` once to prepare it or set model.id_encoder.path"


# ---------------------------------------------------------------------------------------------- crops
def identity_crop(image: Image.Image, bbox: Sequence[float], size: int) -> torch.Tensor:
    """The encoder's input for one face, exactly as the training pipeline builds it
    (:func:`realisid.images.identity_crop`: the face box expanded 1.3x, shifted inside the image,
    resized to ``size``), as a ``(3, size, size)`` float tensor in [-1, 1] (RGB)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if image.mode != "RGB":
        image = image.convert("RGB")
    crop, _mask = pipeline_crop(image, bbox, int(size))
    return to_tensor(crop)


def context_crop(image: Image.Image, bbox: Sequence[float], size: int) -> torch.Tensor:
    """uint8 ``(3, 2*size, 2*size)`` crop twice as wide as :func:`identity_crop`'s, on the same centre, so
    its central half is the identity crop at the same resolution (augmentation samples from it)."""
    x0, y0, x1, y1 = expand_square_box(bbox, CROP_FACTOR, image.width, image.height)
    side = x1 - x0
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    box = (int(round(cx - side)), int(round(cy - side)), int(round(cx - side)) + 2 * side, int(round(cy - side)) + 2 * side)
    crop = image.crop(box).resize((2 * size, 2 * size), Image.BILINEAR)  # outside the image: black
    return torch.from_numpy(np.ascontiguousarray(np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1)))


# ---------------------------------------------------------------------------------------------- network
class StandInArcFace(nn.Module):
    """Small CNN: strided stem, one stride-2 stage per width (two 3x3 conv + BN + PReLU, residual),
    global average pooling, linear, BN; returns L2-normalised ``(B, embed_dim)``."""

    name = STANDIN_NAME

    def __init__(self, image_size: int = 32, embed_dim: int = 64, widths: Sequence[int] = (32, 64, 128)):
        super().__init__()
        widths = [int(w) for w in widths]
        if image_size < 2 ** (len(widths) + 1):
            raise ValueError(f"image_size {image_size} is too small for {len(widths)} stages; use at least {2 ** (len(widths) + 1)}")
        self.config = {"name": STANDIN_NAME, "image_size": int(image_size), "embed_dim": int(embed_dim),
                       "widths": widths, "crop_factor": CROP_FACTOR, "input": "RGB identity_crop in [-1, 1]"}
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0]))
        stages = []
        c = widths[0]
        for w in widths:
            stages.append(_Stage(c, w))
            c = w
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c, int(embed_dim))
        self.bn = nn.BatchNorm1d(int(embed_dim))

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    @property
    def embed_dim(self) -> int:
        return self.config["embed_dim"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))
        h = self.bn(self.fc(h.mean(dim=(2, 3))))
        return F.normalize(h, dim=1)

    @property
    def token_dim(self) -> int:
        """Width of :meth:`tokens`: the wider of the grid's channels and the embedding."""
        widths = self.config["widths"]
        return max(widths[-2] if len(widths) > 1 else widths[0], self.embed_dim)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The face as a token sequence ``(B, h*w + 1, token_dim)``: each cell of the feature map before the last
        stage (4x4 for a 32 px crop: where the eyes, mouth, hair and glasses are), layer-normed, then the identity
        embedding scaled to the same per-entry size; the narrower part is zero-padded to ``token_dim``. What the
        paper takes from CLIP (patch tokens), here from the stand-in."""
        h = self.stem(x)
        for stage in self.stages[:-1]:
            h = stage(h)
        grid = h.flatten(2).transpose(1, 2)
        grid = F.layer_norm(grid, grid.shape[-1:])
        emb = F.normalize(self.bn(self.fc(self.stages[-1](h).mean(dim=(2, 3)))), dim=1) * math.sqrt(self.embed_dim)
        width = self.token_dim
        grid = F.pad(grid, (0, width - grid.shape[-1]))
        emb = F.pad(emb, (0, width - emb.shape[-1]))
        return torch.cat([grid, emb[:, None]], dim=1)


class _Stage(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout))
        self.conv = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        return h + self.conv(h)


class ArcMarginHead(nn.Module):
    """Additive angular margin softmax (ArcFace): logits ``s * cos(theta_y + m)`` for the true class."""

    def __init__(self, embed_dim: int, num_classes: int, margin: float = 0.3, scale: float = 16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embed_dim) * 0.01)
        self.margin, self.scale = float(margin), float(scale)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = (emb @ F.normalize(self.weight, dim=1).t()).clamp(-1 + 1e-7, 1 - 1e-7)
        sin = torch.sqrt(1.0 - cos * cos)
        m = self.margin
        phi = cos * math.cos(m) - sin * math.sin(m)
        # keep the target logit monotonic in theta once theta + m passes pi (standard ArcFace fallback)
        phi = torch.where(cos > math.cos(math.pi - m), phi, cos - math.sin(math.pi - m) * m)
        onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        logits = self.scale * (onehot * phi + (1.0 - onehot) * cos)
        return F.cross_entropy(logits, labels)


# ---------------------------------------------------------------------------------------------- embeddings
@torch.no_grad()
def embed_crops(model: StandInArcFace, crops: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Embeddings ``(N, D)`` of ``(N, 3, S, S)`` crops in eval mode."""
    was_training = model.training
    model.eval()
    try:
        outs = [model(crops[i:i + batch_size]) for i in range(0, crops.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0, model.embed_dim)


def embed_faces(model: StandInArcFace, images: Sequence[Image.Image], bboxes: Sequence[Sequence[float]],
                batch_size: int = 512) -> np.ndarray:
    """Stand-in embeddings ``(N, D)`` float32 of the faces at ``bboxes`` in ``images`` (one box per image)."""
    if len(images) != len(bboxes):
        raise ValueError(f"got {len(images)} images but {len(bboxes)} boxes; give one box per image")
    if not len(images):
        return np.zeros((0, model.embed_dim), np.float32)
    crops = torch.stack([identity_crop(im, bb, model.image_size) for im, bb in zip(images, bboxes)])
    return embed_crops(model, crops, batch_size).numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------------- loading
def load_standin(path: str) -> StandInArcFace:
    """The trained stand-in from a folder holding ``model.safetensors`` + ``config.json`` (or the path of the
    ``.safetensors`` file itself), in eval mode with gradients off. ``model.stats`` holds its training stats."""
    from safetensors.torch import load_file

    raw = str(path)
    folder = os.path.expanduser(raw)
    if folder.endswith(".safetensors"):
        folder = os.path.dirname(folder) or "."
    weights, cfg_path = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, CONFIG_FILE)
    missing = [p for p in (weights, cfg_path) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"stand-in identity encoder not found at '{raw}' (missing {', '.join(missing)}); {MISSING_HINT}")
    with open(cfg_path) as f:
        config = json.load(f)
    if config.get("name") != STANDIN_NAME:
        raise ValueError(f"'{cfg_path}' describes {config.get('name')!r}, not the stand-in encoder {STANDIN_NAME!r}; "
                         "point model.id_encoder.path at a folder written by train_standin")
    arch = config["architecture"]
    model = StandInArcFace(arch["image_size"], arch["embed_dim"], arch["widths"])
    model.load_state_dict(load_file(weights), strict=True)
    model.eval()
    model.requires_grad_(False)
    model.stats = config.get("stats", {})
    return model
