"""Exponential moving average of the trainable weights (branches and projector), on diffusers' ``EMAModel``.

After ``n`` optimizer steps the decay is ``min(decay, (1 + n) / (10 + n))`` (the usual warm-up, so early
averages are not dominated by the random start). The average is kept in fp32 beside the live weights and is
swapped in, in place, for validation and export; checkpoints always hold the live weights plus the average.

How ``diffusers.training_utils.EMAModel`` is set up to do exactly that:

- the schedule: without ``use_ema_warmup``, ``EMAModel.get_decay(k)`` (``k``: the optimizer step being
  averaged, 1 for the first) takes ``step = k - update_after_step - 1`` and returns
  ``max(min_decay, min(decay, (1 + step) / (10 + step)))``, which with ``update_after_step=0`` and
  ``min_decay=0`` is our formula with ``n = step`` (the updates made before this one): 2/11, 3/12, ... from
  the second update on. Its one difference is the first update: ``step <= 0`` returns 0, so the average
  would jump to the live weights, where ours takes ``min(decay, 1/10)``. No argument removes that special
  case (with ``update_after_step=-1`` every decay is one step ahead, 2/11 first; the warm-up form
  ``1 - (1 + step / inv_gamma) ** -power`` with ``inv_gamma=9, power=1`` equals it on paper but differs from
  it by up to 6 ulps in 84 of the first 200k steps), so :class:`_WarmupEMA` overrides ``get_decay`` alone,
  keeping diffusers' step counting and its ``min_decay`` / ``decay`` clamps;
- fp32: ``EMAModel`` clones the parameters in their own dtype; the shadow is cast to fp32 once
  (``EMAModel.to(dtype=float32)``; exact from bf16/fp16). ``step`` then subtracts the half live weights from
  the fp32 shadow in fp32 (``foreach=True``: multi-tensor kernels), and ``copy_to`` casts back on swap-in.
  The update is ``shadow -= (1 - d) * (shadow - live)`` where the old code used ``lerp``: same maths, the
  average may differ from the old one in the last bit of some elements;
- swap in / out: ``EMAModel.store`` (the live weights, copied to the host, where the old code kept a device
  copy) + ``copy_to``, then ``restore`` (overridden only to move the stored copies back to the parameters'
  devices first: diffusers 0.42's foreach ``restore`` fails across devices, see huggingface/diffusers#13782);
- checkpoints (``checkpoint["realisid_ema"]``) are written as before: ``{"decay", "updates", "shadow":
  {name: fp32 tensor}}``, named rather than ``EMAModel.state_dict``'s positional ``shadow_params`` list, so
  they survive a change of parameter order and older RealisID versions read them. Both that format and
  ``EMAModel.state_dict()``'s load; the configured decay wins over a stored one (as before).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
from diffusers.training_utils import EMAModel
from torch import nn


class _WarmupEMA(EMAModel):
    def get_decay(self, optimization_step: int) -> float:
        """``min(decay, (1 + n) / (10 + n))`` with ``n`` the earlier updates, also for the first (see the module doc)."""
        n = max(0, optimization_step - self.update_after_step - 1)
        return max(min(self.decay, (1 + n) / (10 + n)), self.min_decay)

    def restore(self, parameters) -> None:
        """``EMAModel.restore``, with the stored live weights first moved to their parameters' devices: ``store``
        keeps them on the host, and the foreach path of diffusers <= 0.42 copies them into the parameters in one
        ``_foreach_copy_``, which fails across devices (huggingface/diffusers#13782)."""
        parameters = list(parameters)
        if self.temp_stored_params is not None:
            self.temp_stored_params = [c.to(p.device) for c, p in zip(self.temp_stored_params, parameters)]
        super().restore(parameters)


class WeightEMA:
    def __init__(self, modules: Mapping[str, nn.Module], decay: float):
        self.params = {f"{name}.{p_name}": p for name, m in modules.items() for p_name, p in m.named_parameters() if p.requires_grad}
        self.model = _WarmupEMA(list(self.params.values()), decay=float(decay), min_decay=0.0, update_after_step=0,
                                use_ema_warmup=False, foreach=True)
        self.model.to(dtype=torch.float32)

    @property
    def decay(self) -> float:
        return self.model.decay

    @property
    def updates(self) -> int:
        """Optimizer steps averaged so far."""
        return self.model.optimization_step

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        """The average (fp32) by parameter name."""
        return dict(zip(self.params, self.model.shadow_params))

    @property
    def swapped(self) -> bool:
        """Whether the average is in place (the live weights stored aside)."""
        return self.model.temp_stored_params is not None

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return self.model.get_decay(self.model.optimization_step + 1)

    @torch.no_grad()
    def update(self) -> None:
        if self.swapped:
            raise RuntimeError("EMA update while the averaged weights are swapped in")
        live = list(self.params.values())
        shadow = self.model.shadow_params
        if shadow and shadow[0].device != live[0].device:
            self.to(live[0].device)
        self.model.step(live)

    def to(self, device) -> "WeightEMA":
        self.model.to(device=device)
        return self

    @torch.no_grad()
    def swap_in(self) -> None:
        if self.swapped:
            return
        live = list(self.params.values())
        self.model.store(live)
        self.model.copy_to(live)

    @torch.no_grad()
    def swap_out(self) -> None:
        if self.swapped:
            self.model.restore(list(self.params.values()))

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """The averaged weights in place for the duration (nested uses are fine)."""
        was_in = self.swapped
        self.swap_in()
        try:
            yield
        finally:
            if not was_in:
                self.swap_out()

    def live_state(self, prefix_map: Mapping[str, str]) -> dict[str, torch.Tensor]:
        """The live weights under state-dict names (``prefix_map``: module name -> state-dict prefix), while swapped."""
        if not self.swapped:
            return {}
        out = {}
        for k, v in zip(self.params, self.model.temp_stored_params):
            name, rest = k.split(".", 1)
            out[prefix_map[name] + rest] = v
        return out

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """A ``state_dict()`` (named shadow) or an ``EMAModel.state_dict()`` (``shadow_params`` in parameter order)."""
        if "shadow" in state:
            missing = set(self.params) - set(state["shadow"])
            if missing:
                raise KeyError(f"EMA state lacks {sorted(missing)[:3]}...; the checkpoint was written with other branches")
            shadow, step = [state["shadow"][k] for k in self.params], int(state["updates"])
        else:
            shadow, step = list(state["shadow_params"]), int(state["optimization_step"])
            shapes = [tuple(p.shape) for p in self.params.values()]
            if [tuple(s.shape) for s in shadow] != shapes:
                raise KeyError(f"EMA state holds {len(shadow)} tensors that do not match the {len(shapes)} trainable parameters; "
                               "the checkpoint was written with other branches")
        shadow = [s.float().to(p.device) for s, p in zip(shadow, self.params.values())]
        self.model.load_state_dict({"optimization_step": step, "shadow_params": shadow})
