"""Training efficiency options (config ``efficiency`` and ``model.backbone_dtype``), applied to a built module.

Each option is a plain transformation of the module's parts, so the training step itself never changes:

- half-precision frozen parts: the backbone (UNet, VAE, text encoders) and a CLIP identity encoder are cast to
  fp16/bf16, except a VAE whose config sets ``force_upcast`` (SDXL's), which stays in fp32 and runs outside
  autocast; the VAE and text encoders run under ``no_grad``; the trainable branches and the projector keep
  fp32 master weights and run under the trainer's autocast (``trainer.precision``: 16-mixed / bf16-mixed).
  ``16-true`` / ``bf16-true`` are refused: they would put the branches and their optimizer state in half;
- ``attention``: PyTorch scaled-dot-product attention (flash / memory-efficient kernels on GPU) or eager;
- ``channels_last``: NHWC memory layout for the UNet and the branches;
- ``gradient_checkpointing``: recompute activations in backward, for the branches or for the UNet too;
- ``compile``: ``torch.compile`` the branches in place (parameter names, checkpoints and exports unchanged).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from realisid.models.backbone import DTYPES

log = logging.getLogger(__name__)

# the trainer precision under which a half-precision backbone runs with fp32 branches (autocast)
HALF_PRECISIONS = {"fp16": ("16-mixed",), "bf16": ("bf16-mixed",)}
# Lightning precisions that cast the whole module, trainable branches and their optimizer state included, to half:
# value -> (the half type, the mixed precision that keeps fp32 master weights; model.backbone_dtype goes with the type)
TRUE_HALF_PRECISIONS = {"16-true": ("fp16", "16-mixed"), "bf16-true": ("bf16", "bf16-mixed"),
                        "transformer-engine": ("bf16", "bf16-mixed"), "transformer-engine-float16": ("fp16", "16-mixed")}
MANTISSA_BITS = {"fp16": 10, "bf16": 7}  # an update below half a step (2^-(bits+1) of the weight) rounds away
PRECISION_ALIASES = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}  # Lightning's own
CHECKPOINTING = ("none", "branches", "all")
ATTENTION = ("sdpa", "eager")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def check_precision(backbone_dtype: str, precision: str, accelerator: str = "auto") -> None:
    """Refuse dtype / precision pairs that cannot run or cannot train, naming both and the fix."""
    if backbone_dtype not in DTYPES:
        raise ValueError(f"model.backbone_dtype={backbone_dtype!r}; valid: {', '.join(DTYPES)}")
    precision = PRECISION_ALIASES.get(str(precision), str(precision))
    if precision in TRUE_HALF_PRECISIONS:
        half, mixed = TRUE_HALF_PRECISIONS[precision]
        raise ValueError(f"trainer.precision={precision} puts the trainable branches and their optimizer state in {half}: an Adam "
                         f"update (about optim.lr each, 1e-5 in the paper) smaller than 1/{2 ** (MANTISSA_BITS[half] + 1)} of the weight "
                         f"rounds away, so many weights never change. Use trainer.precision={mixed} (fp32 master weights under "
                         f"autocast), with model.backbone_dtype={half} to keep the frozen parts in half")
    if backbone_dtype == "fp32":
        return
    ok = HALF_PRECISIONS[backbone_dtype]
    if precision not in ok:
        raise ValueError(f"model.backbone_dtype={backbone_dtype} needs the trainer to autocast to the same type: set trainer.precision="
                         f"{ok[0]} (got {precision!r}), or keep model.backbone_dtype=fp32")
    if backbone_dtype == "fp16" and (accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())):
        raise ValueError("model.backbone_dtype=fp16 with trainer.precision=16-mixed needs a GPU (Lightning runs bf16 instead on CPU); "
                         "use model.backbone_dtype=bf16 trainer.precision=bf16-mixed on CPU")


def check_efficiency(eff: Mapping[str, Any]) -> None:
    if eff["gradient_checkpointing"] not in CHECKPOINTING:
        raise ValueError(f"efficiency.gradient_checkpointing={eff['gradient_checkpointing']!r}; valid: {', '.join(CHECKPOINTING)}")
    if eff["attention"] not in ATTENTION:
        raise ValueError(f"efficiency.attention={eff['attention']!r}; valid: {', '.join(ATTENTION)}")
    if eff["compile_mode"] not in COMPILE_MODES:
        raise ValueError(f"efficiency.compile_mode={eff['compile_mode']!r}; valid: {', '.join(COMPILE_MODES)}")
    d = float(eff["ema"]["decay"])
    if not 0.0 < d < 1.0:
        raise ValueError(f"efficiency.ema.decay={d}; it must lie in (0, 1), e.g. 0.999")


def set_attention(model: torch.nn.Module, kind: str) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    model.set_attn_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())


def apply_efficiency(module, eff: Mapping[str, Any], backbone_dtype: str = "fp32") -> list[str]:
    """Set the options on ``module`` (a RealisIDModule) in place; returns what is on, for the log.

    Every option but ``compile`` is also undone by calling this again with it off, so a benchmark can switch
    options on one built module.
    """
    check_efficiency(eff)
    applied = []
    dtype = DTYPES[backbone_dtype]
    module.backbone.to(dtype)  # a force_upcast VAE stays in fp32 (Backbone._apply)
    module.id_encoder.to_frozen_dtype(dtype)
    if dtype != torch.float32:
        kept = " (VAE in fp32: force_upcast)" if module.backbone.vae.dtype == torch.float32 else ""
        applied.append(f"frozen parts in {backbone_dtype}{kept}")
    branches = [b.controlnet for b in (module.local_branch, module.global_branch) if b is not None]
    for m in [module.backbone.unet, *branches]:
        set_attention(m, eff["attention"])
        m.to(memory_format=torch.channels_last if eff["channels_last"] else torch.contiguous_format)
    module.channels_last = bool(eff["channels_last"])
    applied.append(f"attention={eff['attention']}")
    if eff["channels_last"]:
        applied.append("channels_last")
    ckpt = eff["gradient_checkpointing"]
    for m in [module.backbone.unet, *branches]:
        on = ckpt == "all" or (ckpt == "branches" and m is not module.backbone.unet)
        m.enable_gradient_checkpointing() if on else m.disable_gradient_checkpointing()
    if ckpt != "none":
        applied.append(f"gradient checkpointing ({ckpt})")
    if eff["compile"]:
        for m in branches:
            m.compile(mode=None if eff["compile_mode"] == "default" else eff["compile_mode"])
        applied.append(f"torch.compile ({eff['compile_mode']})")
    module.ema = None
    if eff["ema"]["enabled"]:
        from realisid.modules.ema import WeightEMA  # only with EMA on: diffusers.training_utils takes about a second to import

        module.ema = WeightEMA(module.trainable_modules(), float(eff["ema"]["decay"]))
        applied.append(f"EMA (decay {float(eff['ema']['decay'])})")
    log.info("efficiency: %s", ", ".join(applied))
    return applied
