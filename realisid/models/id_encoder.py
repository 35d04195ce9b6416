"""Identity tokens ``p_id``: a frozen identity encoder, then a trainable projection to token space.

Encoders (``model.id_encoder.kind``):
- ``clip``: CLIP image encoder on the face crop with the background zeroed, penultimate hidden states
  (the paper's choice); weights from a local folder, or a tiny random CLIP vision model for tests.
- ``arcface``: an insightface recognition model (.onnx in a model folder), as InstantID / IP-Adapter-FaceID.
- ``standin``: the small ArcFace-style network trained on the synthetic identities (embedded default).
All take ``(B, 3, S, S)`` face crops in [-1, 1] plus a ``(B, 1, S, S)`` face mask and ``(B, 5, 2)`` key points of
the face in the crops' pixels (insightface order; the examples' ``id_kps``), and return either ``(B, D)``
embeddings or ``(B, N, D)`` token features. ArcFace aligns each crop with its key points (a frontal face in the
crop's face box only when none are given); the other encoders take the crop as it is and ignore them.
:func:`encoder_fingerprint` says which encoder a config builds (``realisid precompute`` records it with the
features it caches).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from realisid.embedded.standin import STANDIN_NAME, load_standin
from realisid.faces import load_face_analyzer
from realisid.images import frontal_id_kps, hwc_uint8

log = logging.getLogger(__name__)

ENCODER_KINDS = ("standin", "arcface", "clip")


class IdentityEncoder(nn.Module):
    """Frozen; subclasses implement ``_encode``."""

    name = "?"
    embed_dim = 0
    sequence = False       # (B, N, D) token features instead of one (B, D) vector
    mask_background = False

    def __init__(self):
        super().__init__()

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None, kps: torch.Tensor | None = None) -> torch.Tensor:
        """``images`` (B, 3, S, S) in [-1, 1]; ``mask`` (B, 1, S, S); ``kps`` (B, 5, 2) in the pixels of ``images``."""
        if kps is not None:
            kps = torch.as_tensor(kps)
            if tuple(kps.shape) != (images.shape[0], 5, 2):
                raise ValueError(f"kps has shape {tuple(kps.shape)}; give ({images.shape[0]}, 5, 2): each image's 5 face key points "
                                 "in its pixels (the batch's id_kps), or None")
        if self.mask_background and mask is not None:
            images = images * mask + (1 - mask) * -1.0   # background to black, as the paper zeroes it
        return self._encode(images, kps)

    def _encode(self, images: torch.Tensor, kps: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    differentiable = False  # the identity loss (model.loss.id_lambda) backpropagates through the encoder

    def embed_with_grad(self, crops: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Features of face crops (B, 3, S, S) in [-1, 1], cut as the references are, with gradients to the
        crops (the weights stay frozen). Only for encoders that run in torch."""
        if not self.differentiable:
            raise ValueError(f"model.loss.id_lambda > 0 backpropagates through the identity encoder, and {self.name} "
                             "does not run in torch (insightface runs in onnxruntime); use model.id_encoder.kind=standin "
                             "or clip, or set model.loss.id_lambda=0")
        if self.mask_background and mask is not None:
            crops = crops * mask + (1 - mask) * -1.0
        return self._encode(crops)

    def to_frozen_dtype(self, dtype: torch.dtype) -> None:
        """Half precision for encoders worth it (CLIP); small or ONNX encoders stay as they are."""


class StandInEncoder(IdentityEncoder):
    """``features``: ``embedding``, the 64-d identity vector (as ArcFace's, IP-Adapter-FaceID style), or ``grid``,
    the feature map before the last stage as tokens plus the embedding as one more (a sequence, read by the
    projector's resampler as the paper reads CLIP's patch tokens; see :meth:`StandInArcFace.tokens`)."""

    differentiable = True

    def __init__(self, path: str, features: str = "embedding"):
        super().__init__()
        self.net = load_standin(path)
        self.net.requires_grad_(False)
        self.image_size = int(self.net.config["image_size"])
        self.features = features
        self.sequence = features == "grid"
        self.embed_dim = int(self.net.token_dim if self.sequence else self.net.config["embed_dim"])
        self.name = STANDIN_NAME + (" (grid tokens)" if self.sequence else "")

    def _encode(self, images, kps=None):  # the stand-in reads the crop as it is: no alignment
        if images.shape[-1] != self.image_size:
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return self.net.tokens(images) if self.sequence else self.net(images)


class ClipEncoder(IdentityEncoder):
    differentiable = True
    sequence = True
    mask_background = True
    MEAN = (0.48145466, 0.4578275, 0.40821073)
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, path: str | None = None, tiny: Mapping[str, Any] | None = None):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        if path:
            if not os.path.isdir(os.path.expanduser(path)):
                raise FileNotFoundError(f"model.id_encoder.path='{path}' is not a folder; give a local CLIP vision model folder "
                                        "(e.g. a snapshot of laion/CLIP-ViT-H-14 image encoder) or use kind=standin")
            self.model = CLIPVisionModel.from_pretrained(os.path.expanduser(path))
            self.name = f"clip:{path}"
        else:
            tiny = dict(tiny or {})
            known = CLIPVisionConfig().to_dict()
            bad = {k: v for k, v in tiny.items() if k not in known or v is None}
            if bad:  # CLIPVisionConfig ignores unknown keys, which would silently build a full-size ViT-B
                raise ValueError(f"model.id_encoder.tiny_clip has unknown or empty keys {sorted(bad)}; write it as "
                                 "{hidden_size: 32, num_hidden_layers: 2, ...} (a space after each colon)")
            torch.manual_seed(0)
            self.model = CLIPVisionModel(CLIPVisionConfig(**tiny))
            self.name = "clip:tiny-random (stand-in)"
        self.model.requires_grad_(False)
        self.image_size = int(self.model.config.image_size)
        self.embed_dim = int(self.model.config.hidden_size)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def _encode(self, images, kps=None):  # CLIP reads the (masked) crop as it is: no alignment
        x = F.interpolate(images, size=(self.image_size,) * 2, mode="bicubic", align_corners=False).clamp(-1, 1)
        x = ((x + 1) / 2 - self.mean) / self.std
        out = self.model(pixel_values=x.to(self.model.dtype), output_hidden_states=True)
        return out.hidden_states[-2]

    def to_frozen_dtype(self, dtype: torch.dtype) -> None:
        self.model.to(dtype)


class ArcFaceEncoder(IdentityEncoder):
    """insightface recognition model; runs in onnxruntime, so it is frozen by construction."""

    def __init__(self, model_dir: str):
        super().__init__()

        self.analyzer = load_face_analyzer({"kind": "insightface", "model_dir": model_dir})
        dim = self.analyzer.embedding_dim
        if dim is None:  # a recognition model with a dynamic output shape: its width, measured once on a blank face
            import numpy as np

            dim = len(self.analyzer.embed(np.full((112, 112, 3), 128, np.uint8), frontal_id_kps(112)))
        self.embed_dim = int(dim)  # a property of the model (128, 512, ...), never assumed
        self.name = self.analyzer.name

    def _encode(self, images, kps=None):
        import numpy as np

        pixels = hwc_uint8(images)
        # insightface's norm_crop aligns the 5 points to its template; without points, a frontal face in the crop's
        # face box (the face box expanded 1.3x) stands in for detection
        points = kps.detach().float().cpu().numpy() if kps is not None else [frontal_id_kps(pixels.shape[1])] * len(pixels)
        out = [torch.from_numpy(self.analyzer.embed(np.ascontiguousarray(img), np.asarray(p, np.float32)))
               for img, p in zip(pixels, points)]
        return torch.stack(out).to(images.device)


FEATURES = ("embedding", "grid")


def standin_features(cfg: Mapping[str, Any]) -> str:
    """``model.id_encoder.features``, checked: ``grid`` exists for the stand-in only."""
    features = str(cfg.get("features") or "embedding")
    if features not in FEATURES:
        raise ValueError(f"model.id_encoder.features={features!r}; valid: {', '.join(FEATURES)}")
    if features == "grid" and cfg.get("kind") != "standin":
        raise ValueError(f"model.id_encoder.features=grid is for kind=standin (its feature map as tokens); kind={cfg.get('kind')} "
                         "gives what it gives (clip: patch tokens, arcface: one embedding): set model.id_encoder.features=embedding")
    return features


def build_id_encoder(cfg: Mapping[str, Any]) -> IdentityEncoder:
    kind = cfg.get("kind")
    features = standin_features(cfg) if kind in ENCODER_KINDS else "embedding"
    if kind == "standin":
        return StandInEncoder(cfg["path"], features)
    if kind == "clip":
        return ClipEncoder(cfg.get("path"), cfg.get("tiny_clip"))
    if kind == "arcface":
        if not cfg.get("path"):
            raise ValueError("model.id_encoder.kind=arcface needs model.id_encoder.path=/path/to/insightface/model_dir")
        return ArcFaceEncoder(cfg["path"])
    raise ValueError(f"model.id_encoder.kind={kind!r}; valid kinds: {', '.join(ENCODER_KINDS)}")


def encoder_fingerprint(cfg: Mapping[str, Any]) -> str:
    """Which encoder ``build_id_encoder(cfg)`` builds, as one readable string: kind, weights folder (absolute)
    and a digest of its weight and config files (name, size, mtime), or of the tiny random CLIP config.

    Features cached by ``realisid precompute`` are valid only for this string; the dtype the encoder runs in
    does not enter it. Reads file sizes only: nothing is loaded.
    """
    kind = cfg.get("kind")
    if kind not in ENCODER_KINDS:
        raise ValueError(f"model.id_encoder.kind={kind!r}; valid kinds: {', '.join(ENCODER_KINDS)}")
    path = cfg.get("path")
    if path:
        root = os.path.abspath(os.path.expanduser(str(path)))
        files = []
        for folder, dirs, names in os.walk(root):
            dirs.sort()
            for n in sorted(names):
                if n.endswith((".onnx", ".safetensors", ".bin", ".pt", ".pth", ".json")):
                    st = os.stat(os.path.join(folder, n))
                    files.append((os.path.relpath(os.path.join(folder, n), root), st.st_size, int(st.st_mtime)))
        if not files and os.path.isfile(root):
            st = os.stat(root)
            files.append((os.path.basename(root), st.st_size, int(st.st_mtime)))
        grid = ":grid" if standin_features(cfg) == "grid" else ""   # features=embedding keeps existing caches valid
        return f"{kind}{grid}:{root}@{_digest(files)}"
    tiny = cfg.get("tiny_clip") if kind == "clip" else None
    tiny = {str(k): v for k, v in dict(tiny or {}).items()}
    return f"{kind}:tiny-random@{_digest(tiny)}"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class IdProjector(nn.Module):
    """Identity features to ``num_tokens`` tokens of the cross-attention width.

    A vector (ArcFace-like) goes through an MLP to all tokens at once (IP-Adapter-FaceID style); a token
    sequence (CLIP) is read by ``num_tokens`` learned queries with one cross-attention layer (a small
    resampler). Either way the output is layer-normed.
    """

    def __init__(self, in_dim: int, num_tokens: int, out_dim: int, sequence: bool = False, heads: int = 4):
        super().__init__()
        self.num_tokens, self.out_dim, self.sequence = num_tokens, out_dim, sequence
        if sequence:
            self.proj_in = nn.Linear(in_dim, out_dim)
            self.queries = nn.Parameter(torch.randn(1, num_tokens, out_dim) * out_dim ** -0.5)
            self.attn = nn.MultiheadAttention(out_dim, heads if out_dim % heads == 0 else 1, batch_first=True)
            self.ff = nn.Sequential(nn.LayerNorm(out_dim), nn.Linear(out_dim, out_dim * 2), nn.GELU(), nn.Linear(out_dim * 2, out_dim))
        else:
            self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim * 2), nn.GELU(), nn.Linear(in_dim * 2, out_dim * num_tokens))
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if self.sequence:
            kv = self.proj_in(feats)
            q = self.queries.expand(feats.shape[0], -1, -1)
            x = q + self.attn(q, kv, kv, need_weights=False)[0]
            x = x + self.ff(x)
        else:
            x = self.mlp(feats).view(feats.shape[0], self.num_tokens, self.out_dim)
        return self.norm(x)
