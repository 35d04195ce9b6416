"""The two trainable ControlNet branches of RealisID.

Both are diffusers ``ControlNetModel`` s initialised from the frozen UNet that cross-attend to the identity
tokens (where a ControlNet usually takes text). The ControlNet's conditioning embedding ends in a
zero-initialised conv, so the guidance map enters as ``zero_conv(c)`` added after ``conv_in``.

- :class:`LocalBranch` runs on the noisy latent cropped at the face box and up-sampled to ``latent_size``,
  guided by the pose/expression contour map, then relocates each residual to the box.
- :class:`GlobalBranch` runs on the whole noisy latent, guided by the location map.

A branch exports as a folder: the ControlNet in diffusers format (``ControlNetModel.from_pretrained(folder)``
loads it as it is) plus ``realisid_branch.json`` with the branch settings.

diffusers' ControlNet takes one ``layers_per_block`` for every level while its UNet takes one per level. A branch of a
UNet with per-level layers (one grown by :mod:`realisid.models.grow`, or a shape such as two layers at the 16x16 level
and one below) is built here as a ControlNet with the most layers at every level, cut back to the UNet's count per
level (a down block's first ``n`` layers are what diffusers builds for ``n``), and keeps the per-level list in its
config. Such a folder loads with :func:`load_controlnet` (or ``LocalBranch.from_pretrained``), not with
``ControlNetModel.from_pretrained``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import torch
from torch import nn

from realisid.models.relocate import crop_resize, host_boxes, relocate, relocate_native

Residuals = tuple[list[torch.Tensor], torch.Tensor]
BRANCH_FILE = "realisid_branch.json"


def _uniform_layers(config) -> tuple[int | None, list[int]]:
    """``(n, per_level)``: ``n`` when every level of ``config`` (a UNet's or ControlNet's config, or its dict) has
    ``n`` layers, else None."""
    from realisid.models.grow import per_level

    layers = per_level(config["layers_per_block"], len(config["block_out_channels"]))
    return (layers[0] if len(set(layers)) == 1 else None), layers


def _cut_to_levels(cn, layers: Sequence[int]):
    """Cut a ControlNet built with ``max(layers)`` layers at every level back to ``layers[i]`` at level ``i``: the
    down blocks keep their first layers, the zero convs keep one per kept layer (plus conv_in's and each
    down-sampler's); the per-level list is recorded in its config."""
    top = max(layers)
    zero_convs = list(cn.controlnet_down_blocks)
    kept = [zero_convs[0]]
    at = 1
    for block, n in zip(cn.down_blocks, layers):
        block.resnets = block.resnets[:n]
        if getattr(block, "attentions", None) is not None:
            block.attentions = block.attentions[:n]
        kept += zero_convs[at : at + n]
        at += top
        if block.downsamplers is not None:
            kept.append(zero_convs[at])
            at += 1
    if at != len(zero_convs):
        raise RuntimeError(f"ControlNet layout not understood: {len(zero_convs)} zero convs for layers {list(layers)}")
    cn.controlnet_down_blocks = nn.ModuleList(kept)
    cn.register_to_config(layers_per_block=[int(n) for n in layers])
    return cn


def controlnet_from_unet(unet, conditioning_channels: int, conditioning_embedding_out_channels: Sequence[int],
                         load_weights_from_unet: bool = True):
    """``ControlNetModel.from_unet`` for any UNet, including one with a ``layers_per_block`` per level."""
    from types import SimpleNamespace

    from diffusers import ControlNetModel

    uniform, layers = _uniform_layers(unet.config)
    kwargs = dict(conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels), conditioning_channels=conditioning_channels)
    if uniform is not None:
        return ControlNetModel.from_unet(unet, load_weights_from_unet=load_weights_from_unet, **kwargs)
    # diffusers reads only the UNet's config here; give it one layer count (the most) and cut the levels back after
    view = SimpleNamespace(config=type(unet.config)({**unet.config, "layers_per_block": max(layers)}))
    cn = _cut_to_levels(ControlNetModel.from_unet(view, load_weights_from_unet=False, **kwargs), layers)
    if load_weights_from_unet:
        for name in ("conv_in", "time_proj", "time_embedding", "class_embedding", "add_embedding", "down_blocks", "mid_block"):
            mine = getattr(cn, name, None)
            if mine is not None:
                mine.load_state_dict(getattr(unet, name).state_dict())
    return cn


def load_controlnet(path: str):
    """A ControlNet folder saved by :meth:`_ControlBranch.save_pretrained`, per-level layers or not."""
    from diffusers import ControlNetModel

    config = ControlNetModel.load_config(path)
    uniform, layers = _uniform_layers(config)
    if uniform is not None:
        return ControlNetModel.from_pretrained(path)
    from safetensors.torch import load_file

    weights = os.path.join(path, "diffusion_pytorch_model.safetensors")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"'{path}' has no diffusion_pytorch_model.safetensors; export the branch again with `realisid train`")
    cn = _cut_to_levels(ControlNetModel.from_config({**config, "layers_per_block": max(layers)}), layers)
    cn.load_state_dict(load_file(weights), strict=True)
    return cn


class _ControlBranch(nn.Module):
    kind = "?"

    def __init__(self, controlnet, **settings: Any):
        super().__init__()
        self.controlnet = controlnet
        self.settings = settings

    @classmethod
    def from_unet(cls, unet, conditioning_channels: int, conditioning_embedding_out_channels: Sequence[int],
                  load_weights_from_unet: bool = True, **settings: Any):
        return cls(controlnet_from_unet(unet, conditioning_channels, conditioning_embedding_out_channels, load_weights_from_unet), **settings)

    @property
    def cond_scale_factor(self) -> int:
        """Pixels of guidance map per latent pixel (the conditioning embedding's down-sampling)."""
        return 2 ** (len(self.controlnet.config.conditioning_embedding_out_channels) - 1)

    def _run(self, sample, timesteps, id_tokens, cond, added_cond_kwargs=None) -> Residuals:
        if cond.shape[-1] != sample.shape[-1] * self.cond_scale_factor:
            raise ValueError(f"{self.kind} guidance map is {tuple(cond.shape[-2:])} but the latent is {tuple(sample.shape[-2:])}; "
                             f"it must be {self.cond_scale_factor}x the latent (set data.resolution / model.local.latent_size consistently)")
        down, mid = self.controlnet(sample, timesteps, encoder_hidden_states=id_tokens, controlnet_cond=cond.to(sample.dtype),
                                    added_cond_kwargs=added_cond_kwargs, return_dict=False)
        return list(down), mid

    def save_pretrained(self, path: str) -> None:
        self.controlnet.save_pretrained(path, safe_serialization=True)
        with open(os.path.join(path, BRANCH_FILE), "w") as f:
            json.dump({"kind": self.kind, **self.settings}, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str, **overrides: Any):
        meta_path = os.path.join(path, BRANCH_FILE)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"'{path}' is not an exported RealisID branch (no {BRANCH_FILE}); export one with `realisid train` or point at RUN_DIR/export/<branch>")
        with open(meta_path) as f:
            settings = json.load(f)
        if settings.pop("kind") != cls.kind:
            raise ValueError(f"'{path}' holds a different branch kind than {cls.kind}")
        settings.update(overrides)
        return cls(load_controlnet(path), **settings)


class LocalBranch(_ControlBranch):
    kind = "local"

    def __init__(self, controlnet, latent_size: int = 16, upsample: bool = True):
        if upsample:
            check_local_latent_size(int(latent_size), len(controlnet.config.block_out_channels))
        super().__init__(controlnet, latent_size=int(latent_size), upsample=bool(upsample))
        self.latent_size = int(latent_size)
        self.upsample = bool(upsample)

    @classmethod
    def from_unet(cls, unet, conditioning_channels: int, conditioning_embedding_out_channels: Sequence[int],
                  load_weights_from_unet: bool = True, latent_size: int = 16, upsample: bool = True):
        """As :meth:`_ControlBranch.from_unet`; the crop size is checked against the UNet before the copy is made."""
        if upsample:
            check_local_latent_size(int(latent_size), len(unet.config.block_out_channels))
        return super().from_unet(unet, conditioning_channels, conditioning_embedding_out_channels, load_weights_from_unet,
                                 latent_size=latent_size, upsample=upsample)

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, id_tokens: torch.Tensor, pe_map: torch.Tensor,
                boxes: torch.Tensor | Sequence[Sequence[int]], added_cond_kwargs: dict | None = None) -> Residuals:
        """Residuals for the full-size UNet, non-zero only inside each face box.

        ``boxes``: latent-pixel crop boxes ``(x0, y0, x1, y1)``, a (B, 4) integer tensor (read back once here) or a
        host list of B 4-int sequences (no device->host transfer at all); ``pe_map``: (B, 3, latent_size * f,
        latent_size * f).
        """
        boxes = host_boxes(boxes)
        latent_hw = tuple(noisy_latents.shape[-2:])
        if not self.upsample:
            return self._forward_native(noisy_latents, timesteps, id_tokens, pe_map, boxes, added_cond_kwargs)
        crops = crop_resize(noisy_latents, boxes, self.latent_size)
        down, mid = self._run(crops, timesteps, id_tokens, pe_map, added_cond_kwargs)
        down = [relocate(r, boxes, latent_hw, self.latent_size) for r in down]
        return down, relocate(mid, boxes, latent_hw, self.latent_size)

    def _forward_native(self, noisy_latents, timesteps, id_tokens, pe_map, boxes, added_cond_kwargs) -> Residuals:
        """Ablation: each crop at its own size (padded to the UNet's down-sampling), one pass per sample."""
        import torch.nn.functional as F

        multiple = 2 ** (len(self.controlnet.config.block_out_channels) - 1)
        latent_hw = tuple(noisy_latents.shape[-2:])
        outs: list[Residuals] = []
        crops = crop_resize(noisy_latents, boxes, None)
        t = timesteps.expand(len(crops)) if timesteps.ndim else timesteps.repeat(len(crops))
        for i, crop in enumerate(crops):
            h, w = crop.shape[-2:]
            ph, pw = -h % multiple, -w % multiple
            padded = F.pad(crop, (0, pw, 0, ph))
            cond = F.interpolate(pe_map[i : i + 1], size=(h * self.cond_scale_factor, w * self.cond_scale_factor), mode="bilinear", antialias=True)
            cond = F.pad(cond, (0, pw * self.cond_scale_factor, 0, ph * self.cond_scale_factor))
            added = {k: v[i : i + 1] for k, v in added_cond_kwargs.items()} if added_cond_kwargs else None
            down, mid = self._run(padded, t[i : i + 1], id_tokens[i : i + 1], cond, added)
            box = boxes[i]

            def paste(r):  # drop the padding, then relocate at the residual's level
                s = r.shape[-2] / padded.shape[-2]  # exact: the padded crop divides by every level
                rh, rw = max(1, math.ceil(h * s)), max(1, math.ceil(w * s))
                return relocate_native(r[..., :rh, :rw], box, latent_hw, s)

            outs.append(([paste(r) for r in down], paste(mid)))
        down = [torch.cat([o[0][k] for o in outs], 0) for k in range(len(outs[0][0]))]
        return down, torch.cat([o[1] for o in outs], 0)


def check_local_latent_size(latent_size: int, levels: int) -> None:
    """Refuse a local crop size the UNet cannot halve exactly at every level.

    The crop's residual at level k (k = 0 .. levels-1) has ``ceil(latent_size / 2^k)`` cells and is relocated at
    scale ``cells / latent_size``; unless ``2^(levels-1)`` divides ``latent_size`` that scale is not ``2^-k`` and
    the deep residuals land off the face box.
    """
    multiple = 2 ** (levels - 1)
    if latent_size > 0 and latent_size % multiple == 0:
        return
    below, above = latent_size // multiple * multiple, (latent_size // multiple + 1) * multiple
    near = f"{below} or {above}" if below > 0 else f"{max(above, multiple)}"
    raise ValueError(f"model.local.latent_size={latent_size} is not a multiple of {multiple}, the down-sampling of the "
                     f"{levels}-level UNet (2^{levels - 1}): its deepest residuals would be relocated off the face box; "
                     f"use {near} (or model.local.upsample=false for native-size crops)")


class GlobalBranch(_ControlBranch):
    kind = "global"

    def __init__(self, controlnet, soft_location: bool = False):
        super().__init__(controlnet, soft_location=bool(soft_location))

    def fit_location(self, loc_map: torch.Tensor, latent_size: int) -> torch.Tensor:
        """The location map at this branch's conditioning resolution (area-averaged when it differs)."""
        import torch.nn.functional as F

        size = latent_size * self.cond_scale_factor
        return loc_map if loc_map.shape[-1] == size else F.interpolate(loc_map, size=(size, size), mode="area")

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, id_tokens: torch.Tensor, loc_map: torch.Tensor,
                added_cond_kwargs: dict | None = None) -> Residuals:
        return self._run(noisy_latents, timesteps, id_tokens, loc_map, added_cond_kwargs)


def add_residuals(*parts: Residuals | None) -> Residuals | None:
    """Sum residual sets (local + global into one UNet forward); ``None`` entries are skipped."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    down = [sum(p[0][k] for p in parts) for k in range(len(parts[0][0]))]
    return down, sum(p[1] for p in parts)
