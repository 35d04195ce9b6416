"""Exponential moving average of the trainable weights (branches and projector).

After ``n`` optimizer steps the decay is ``min(decay, (1 + n) / (10 + n))`` (the usual warm-up, so early
averages are not dominated by the random start). The average is kept in fp32 beside the live weights and is
swapped in, in place, for validation and export; checkpoints always hold the live weights plus the average.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
from torch import nn


class WeightEMA:
    def __init__(self, modules: Mapping[str, nn.Module], decay: float):
        self.decay = float(decay)
        self.params = {f"{name}.{p_name}": p for name, m in modules.items() for p_name, p in m.named_parameters() if p.requires_grad}
        self.shadow = {k: p.detach().float().clone() for k, p in self.params.items()}
        self.updates = 0
        self.swapped: dict[str, torch.Tensor] | None = None  # the live weights while the average is swapped in

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        if self.swapped is not None:
            raise RuntimeError("EMA update while the averaged weights are swapped in")
        d = self.current_decay()
        keys = list(self.params)
        shadow = [self.shadow[k] for k in keys]
        live = [self.params[k].detach().float() for k in keys]
        if shadow and shadow[0].device != live[0].device:
            self.to(live[0].device)
            shadow = [self.shadow[k] for k in keys]
        torch._foreach_lerp_(shadow, live, 1.0 - d)  # shadow += (1 - d) * (live - shadow)
        self.updates += 1

    def to(self, device) -> "WeightEMA":
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    @torch.no_grad()
    def swap_in(self) -> None:
        if self.swapped is not None:
            return
        self.swapped = {k: p.detach().clone() for k, p in self.params.items()}
        for k, p in self.params.items():
            p.copy_(self.shadow[k].to(p.device, p.dtype))

    @torch.no_grad()
    def swap_out(self) -> None:
        if self.swapped is None:
            return
        for k, p in self.params.items():
            p.copy_(self.swapped[k])
        self.swapped = None

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """The averaged weights in place for the duration (nested uses are fine)."""
        was_in = self.swapped is not None
        self.swap_in()
        try:
            yield
        finally:
            if not was_in:
                self.swap_out()

    def live_state(self, prefix_map: Mapping[str, str]) -> dict[str, torch.Tensor]:
        """The live weights under state-dict names (``prefix_map``: module name -> state-dict prefix), while swapped."""
        if self.swapped is None:
            return {}
        out = {}
        for k, v in self.swapped.items():
            name, rest = k.split(".", 1)
            out[prefix_map[name] + rest] = v
        return out

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}...; the checkpoint was written with other branches")
        self.shadow = {k: state["shadow"][k].float().to(self.params[k].device) for k in self.shadow}
        self.updates = int(state["updates"])
