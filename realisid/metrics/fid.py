"""FID per face-scale bin, with the feature network named.

:class:`BinnedFID` wraps one :class:`torchmetrics.image.fid.FrechetInceptionDistance` per bin plus one for
``all``. Features are computed once per image by the wrapper's feature network and handed to the bin's FID
and to the ``all`` FID (their own feature "network" is a pass-through), so an Inception network is loaded
once, not once per bin. The torchmetrics FIDs keep their sum-reduced float64 states (feature sums, feature
outer-product sums, sample counts), so results are exact under DDP.

Feature networks:

* the real FID Inception-v3 (torch-fidelity's port of the TF 2015-12-05 graph, 2048-d pool features) from a
  LOCAL weights file: ``BinnedFID(bins, feature_extractor_weights_path="/path/weights-inception-2015-12-05-6726825d.pth")``.
  torchmetrics builds it as ``NoTrainInceptionV3`` (needs torch-fidelity); with a path nothing is downloaded
  (without one torch-fidelity would fetch from GitHub, which this wrapper never lets happen). Resizing uses
  ``antialias=False``, the TF-1.x-compatible bilinear resize of the original FID.
* :class:`~realisid.embedded.fid_features.StandInFeatures` (the embedded default's): a fixed, seeded, random
  (untrained) conv net for machines without the Inception weights. Its FIDs rank sets against each other but are
  NOT comparable with published FID numbers.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from realisid.metrics.binned import ALL, BinnedMetric

log = logging.getLogger(__name__)

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_NAME = "inception-v3-compat (torch-fidelity FID weights, 2048-d pool features)"
MIN_SAMPLES = 2


# ------------------------------------------------------------------------------------------- feature nets
class _Precomputed(nn.Module):
    """The per-bin FIDs' "feature network": features were already computed by :class:`BinnedFID`."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: Tensor) -> Tensor:
        return x


def load_inception(weights_path: str) -> nn.Module:
    """torchmetrics' ``NoTrainInceptionV3`` (2048-d features, ``antialias=False``) from a local weights file.

    The file is first opened with ``torch.load(weights_only=True)`` (refusing anything but tensors) because
    torch-fidelity then loads it with ``weights_only=False``.
    """
    path = os.path.expanduser(str(weights_path))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"FID Inception weights not found at '{weights_path}'; download {INCEPTION_URL} on a machine with "
            "internet, copy it here and pass its path as feature_extractor_weights_path, or use "
            "feature=realisid.embedded.fid_features.StandInFeatures() (numbers then not comparable with published FID)")
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError("the FID Inception network needs torch-fidelity; pip install torch-fidelity "
                                  "(or torchmetrics[image]), or use feature=realisid.embedded.fid_features.StandInFeatures()")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable/unsafe file gets the same message
        raise ValueError(f"'{weights_path}' is not a plain tensor state dict ({exc}); use the torch-fidelity "
                         f"weights file from {INCEPTION_URL}") from None
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=path,
                             antialias=False)
    net.num_features = 2048
    return net


# ------------------------------------------------------------------------------------------- metric
class BinnedFID(BinnedMetric):
    """FID per face-scale bin and over all images.

    ``update(images, real, face_size)``: ``images`` ``(N, 3, H, W)`` uint8 in [0, 255] or float in [0, 1]
    (converted as torchmetrics does with ``normalize=True``: ``(x * 255).byte()``); all images of one call
    share a size (resize face crops to one size first); ``real`` says which distribution they belong to;
    ``face_size`` ``(N,)`` routes each image to its bin (and every image also goes to ``all``).

    ``compute()``: ``fid/<bin>``, ``fid/all`` (NaN when fewer than 2 real or 2 generated images),
    ``fid_n_real/<bin>``, ``fid_n_fake/<bin>`` (and ``all``). ``self.feature_name`` names the feature network
    for tables (see :meth:`describe`).

    Args:
        bins: ``{name: (low, high)}`` (default :data:`realisid.geometry.DEFAULT_BINS`).
        feature: a feature ``nn.Module`` taking uint8 ``(N, 3, H, W)`` and returning ``(N, D)``; it needs an int
            ``num_features`` attribute (e.g. :class:`~realisid.embedded.fid_features.StandInFeatures`).
        feature_extractor_weights_path: instead of ``feature``, a local file with torch-fidelity's FID
            Inception-v3 weights (never downloaded).
        feature_name: how tables name the feature network (default: the module's ``name`` attribute, or the
            Inception description).
        key_prefix: prepended to result keys (e.g. ``"crop_"`` and ``"image_"`` for FID on face crops and on
            whole images).
        kwargs: torchmetrics ``Metric`` keyword arguments, also given to the per-bin FIDs.

    Calling the metric (``forward``) only updates it and returns ``None``: a per-batch FID means nothing.
    """

    higher_is_better = False

    def __init__(self, bins: Mapping[str, Sequence[float]] | None = None, feature: nn.Module | None = None,
                 feature_extractor_weights_path: str | None = None, feature_name: str | None = None, *,
                 key_prefix: str = "", **kwargs: Any):
        super().__init__(bins, key_prefix=key_prefix, **kwargs)
        if (feature is None) == (feature_extractor_weights_path is None):
            raise ValueError("give exactly one of feature=<nn.Module> (e.g. realisid.embedded.fid_features.StandInFeatures()) or "
                             "feature_extractor_weights_path=<local Inception weights file>; got "
                             f"feature={type(feature).__name__ if feature is not None else None}, "
                             f"feature_extractor_weights_path={feature_extractor_weights_path!r}")
        if feature is None:
            feature = load_inception(str(feature_extractor_weights_path))
            default_name = INCEPTION_NAME
        else:
            if not isinstance(feature, nn.Module):
                raise TypeError(f"feature must be an nn.Module, got {type(feature).__name__}")
            default_name = getattr(feature, "name", None) or type(feature).__name__
        num = getattr(feature, "num_features", None)
        if isinstance(num, Tensor):
            num = int(num.item())
        if not isinstance(num, int) or num < 1:
            raise ValueError(f"feature module {type(feature).__name__} needs an int attribute num_features (its output "
                             f"dimension), got {num!r}; set feature.num_features = D")
        self.feature_net = feature
        self.num_features = num
        self.feature_name = str(feature_name or default_name)
        self.fids = nn.ModuleDict()
        for name in self.bin_names + [ALL]:
            fid = FrechetInceptionDistance(feature=_Precomputed(num), reset_real_features=True, normalize=False, **kwargs)
            fid.orig_dtype = torch.float32  # set by update(); a rank without images of this bin still computes
            self.fids[name] = fid
        self.add_bin_state("n_real")
        self.add_bin_state("n_fake")

    # nn.Module.forward -> just update (torchmetrics' forward would compute a per-batch FID on reset children)
    def forward(self, *args: Any, **kwargs: Any) -> None:
        self.update(*args, **kwargs)
        return None

    def _as_uint8(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a tensor (N, 3, H, W), got {type(images).__name__}")
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}; permute HWC images with "
                             ".permute(0, 3, 1, 2)")
        if images.dtype == torch.uint8:
            return images
        if images.is_floating_point():
            lo, hi = (float(images.min()), float(images.max())) if images.numel() else (0.0, 0.0)
            if lo < 0.0 or hi > 1.0:
                raise ValueError(f"float images must lie in [0, 1], got values in [{lo:.3f}, {hi:.3f}]; map [-1, 1] "
                                 "outputs with (x + 1) / 2 or pass uint8")
            return (images * 255).byte()
        raise TypeError(f"images must be uint8 or float in [0, 1], got {images.dtype}")

    def update(self, images: Tensor, real: bool, face_size: Tensor) -> None:  # type: ignore[override]
        if not isinstance(real, bool):
            raise TypeError(f"real must be a bool (True for reference images, False for generated), got {real!r}")
        imgs = self._as_uint8(images)
        idx = self.bin_of(face_size, imgs.shape[0])
        if imgs.shape[0] == 0:
            return
        with torch.no_grad():
            feats = self.feature_net(imgs.to(self.device))
        if feats.dim() != 2 or feats.shape[1] != self.num_features:
            raise ValueError(f"feature network {self.feature_name} returned shape {tuple(feats.shape)}, expected "
                             f"(N, {self.num_features}); fix its num_features")
        for b, name in enumerate(self.bin_names):
            mask = idx == b
            if bool(mask.any()):
                self.fids[name].update(feats[mask], real=real)
        self.fids[ALL].update(feats, real=real)
        self.accumulate("n_real" if real else "n_fake", idx, 1.0)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        # The wrapper's own counts are synced here (compute is wrapped), so every rank takes the same branch for
        # every bin and the per-bin FIDs' own syncs (collectives) happen in the same order on all ranks.
        n_real = torch.cat([self.n_real, self.n_real.sum()[None]])
        n_fake = torch.cat([self.n_fake, self.n_fake.sum()[None]])
        values = []
        for i, name in enumerate(self.bin_names + [ALL]):
            if n_real[i] >= MIN_SAMPLES and n_fake[i] >= MIN_SAMPLES:
                with warnings.catch_warnings():  # a rank that saw no image of this bin warns "compute before update"
                    warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
                    values.append(self.fids[name].compute().to(torch.float64).reshape(()))
            else:
                values.append(torch.tensor(float("nan"), dtype=torch.float64, device=self.n_real.device))
        fid = torch.stack(values).to(self.n_real.device)
        out: dict[str, Tensor] = self._pack("fid", fid[:-1], fid[-1])
        out.update(self.binned_total("fid_n_real", self.n_real))
        out.update(self.binned_total("fid_n_fake", self.n_fake))
        return out

    def reset(self) -> None:
        super().reset()
        for fid in self.fids.values():
            fid.reset()

    def describe(self) -> str:
        return f"FID per face-size bin with feature network '{self.feature_name}' ({self.num_features}-d); NaN below {MIN_SAMPLES} images per side"
