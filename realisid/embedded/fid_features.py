"""The embedded default's FID feature network: a fixed, seeded, random (untrained) conv net for machines without
the Inception weights (:class:`~realisid.metrics.BinnedFID` takes it as ``feature=StandInFeatures()``). Its FIDs
rank sets against each other but are NOT comparable with published FID numbers; its ``name`` says so.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from realisid.images import signed_from_uint8


class StandInFeatures(nn.Module):
    """A small fixed conv net (random weights from ``seed``, never trained) mapping uint8 images to features.

    Input ``(N, 3, H, W)`` uint8 (any size: resized to ``input_size`` with antialiasing), output
    ``(N, num_features)`` float32. Weights are non-persistent buffers regenerated from the seed, so the network
    is identical on every machine and rank, adds no trainable parameters and nothing to checkpoints.
    """

    def __init__(self, num_features: int = 64, input_size: int = 64, widths: Sequence[int] = (16, 32, 64), seed: int = 0):
        super().__init__()
        self.num_features = int(num_features)
        self.input_size = int(input_size)
        self.name = (f"standin-random-convnet-{self.num_features} (not Inception: numbers are not comparable with "
                     "published FID)")
        gen = torch.Generator().manual_seed(int(seed))
        self._convs: list[tuple[str, str]] = []
        cin = 3
        for i, w in enumerate(int(v) for v in widths):
            weight = torch.randn(w, cin, 3, 3, generator=gen) * (2.0 / (cin * 9)) ** 0.5
            bias = torch.randn(w, generator=gen) * 0.1
            self.register_buffer(f"conv{i}_w", weight, persistent=False)
            self.register_buffer(f"conv{i}_b", bias, persistent=False)
            self._convs.append((f"conv{i}_w", f"conv{i}_b"))
            cin = w
        # mean- and std-pooled last features, projected to num_features
        self.register_buffer("proj", torch.randn(2 * cin, self.num_features, generator=gen) / (2 * cin) ** 0.5, persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> "StandInFeatures":  # always in eval mode, like torchmetrics' Inception
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.uint8:
            raise TypeError(f"StandInFeatures takes uint8 images (N, 3, H, W), got {x.dtype}")
        h = signed_from_uint8(x).to(self.proj.dtype)
        if h.shape[-2:] != (self.input_size, self.input_size):
            h = F.interpolate(h, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True)
        for w_name, b_name in self._convs:
            h = F.relu(F.conv2d(h, getattr(self, w_name), getattr(self, b_name), stride=2, padding=1))
        pooled = torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1)
        return pooled @ self.proj
