"""Growing a trained UNet deeper without changing what it computes (Net2Net's idea, for diffusers' UNet).

A base trained on a CPU for hours need not be thrown away to try more capacity: :func:`grow_unet` adds resnet (and,
at attention levels, transformer) layers to chosen levels of a ``UNet2DConditionModel``, initialised so that the grown
UNet gives exactly the old one's output; training then moves them from there, as a ControlNet's zero convolutions
start from "no change".

At a level with ``n`` layers grown to ``m``:

- down block: the old layers keep their places, the ``m - n`` new ones follow them; a new resnet's last convolution
  is zero, so it passes its input through (its input and output widths are equal there), and a new transformer's
  output projection is zero, so it adds nothing to its residual. Their skip outputs are copies of the last old
  layer's output.
- up block (``m + 1`` layers, each taking one skip from the end of the down path): the new layers go right after the
  first one, where the skips they take are those copies. A new resnet's input is the hidden state concatenated with
  that skip; its 1x1 shortcut is set to pass the hidden part through and drop the skip, its last convolution is zero.
  The old layers after it take the same skips they took before.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch


def per_level(value, levels: int) -> list[int]:
    """``layers_per_block`` as one number per level."""
    if isinstance(value, int):
        return [int(value)] * levels
    out = [int(v) for v in value]
    if len(out) != levels:
        raise ValueError(f"layers_per_block {list(value)} names {len(out)} levels; the UNet has {levels}")
    return out


def layers_setting(config) -> int | list[int]:
    """A UNet config's ``layers_per_block`` as written: one number, or a list (diffusers keeps a tuple)."""
    value = config.layers_per_block
    return value if isinstance(value, int) else list(value)


def grow_unet(old, layers_per_block: int | Sequence[int]):
    """A copy of ``old`` (a diffusers ``UNet2DConditionModel``) with ``layers_per_block`` layers per level (each at
    least the old count), computing the same function; see the module docstring."""
    from diffusers import UNet2DConditionModel

    levels = len(old.config.block_out_channels)
    before = per_level(old.config.layers_per_block, levels)
    after = per_level(layers_per_block, levels)
    if any(a < b for a, b in zip(after, before)):
        raise ValueError(f"growing a UNet from layers_per_block {before} to {after} would remove layers; a grown UNet keeps "
                         "every layer it had (give at least as many per level)")
    new = UNet2DConditionModel.from_config({**dict(old.config), "layers_per_block": after})
    fresh = new.state_dict()
    state = {}
    for key, value in old.state_dict().items():
        state[_grown_key(key, before, after)] = value
    for key in fresh:
        if key not in state:
            state[key] = _identity_init(key, fresh[key])
    missing = set(fresh) - set(state)
    extra = set(state) - set(fresh)
    if missing or extra:  # a UNet layout this function does not know
        raise ValueError(f"cannot grow this UNet: keys without a source {sorted(missing)[:5]}, keys without a place {sorted(extra)[:5]}")
    new.load_state_dict(state)
    return new if old.dtype == torch.float32 and old.device.type == "cpu" else new.to(device=old.device, dtype=old.dtype)


_UP = re.compile(r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$")


def _grown_key(key: str, before: list[int], after: list[int]) -> str:
    """Where an old weight sits in the grown UNet: down-block layers keep their index; in an up block the old layers
    after the first move back by the number of new layers."""
    m = _UP.match(key)
    if m is None:
        return key
    up, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
    level = len(before) - 1 - up
    k = j if j == 0 else j + after[level] - before[level]
    return f"up_blocks.{up}.{kind}.{k}.{rest}"


def _identity_init(key: str, init: torch.Tensor) -> torch.Tensor:
    """A new layer's weight, set so that the layer passes its input through."""
    if key.endswith(("conv2.weight", "conv2.bias", "proj_out.weight", "proj_out.bias")):
        return torch.zeros_like(init)
    if key.endswith("conv_shortcut.bias"):
        return torch.zeros_like(init)
    if key.endswith("conv_shortcut.weight"):  # (out, hidden + skip, 1, 1): the hidden channels through, the skip dropped
        w = torch.zeros_like(init)
        out = w.shape[0]
        w[:, :out, 0, 0] = torch.eye(out, dtype=w.dtype)
        return w
    return init
