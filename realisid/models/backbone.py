"""The frozen text-to-image backbone: UNet, VAE, text encoder(s), tokenizer(s), noise scheduler.

Loaded from a local diffusers folder (``model.pretrained``), in the SD1.5 layout or the SDXL layout (two text
encoders and the added time ids), or built at random from the tiny config for tests. The code after loading
is the same for all of them.

Two diffusers conventions hold here as in diffusers' own pipelines and training scripts:

- a VAE whose config sets ``force_upcast`` (SDXL's: it overflows to NaN in fp16) stays in float32 whatever
  dtype the backbone is cast to, and runs outside autocast; the latents it gives are cast to the UNet's dtype;
- SDXL layout: an empty prompt is all zeros (text and pooled embeddings; ``force_zeros_for_empty_prompt`` in
  the folder's model_index.json, true by default), and the added ``time_ids`` carry each sample's original size
  and crop corner (``original_size + crop_top_left + target_size``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from realisid.models.samplers import SAMPLERS
from realisid.models.tokenizer import CAPTION_WORDS, build_tiny_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # model.backbone_dtype, --dtype
SD15_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = SD15_PARTS + ("text_encoder_2", "tokenizer_2")
HALF_DTYPES = (torch.float16, torch.bfloat16)


def vae_force_upcast(vae_config: Mapping[str, Any]) -> bool:
    """Whether the VAE must run in float32 (diffusers' ``force_upcast``; AutoencoderKL's default is true)."""
    return bool(vae_config.get("force_upcast", True))


def vae_dtype_for(vae_config: Mapping[str, Any], dtype: torch.dtype) -> torch.dtype:
    """The dtype the VAE runs in when the backbone runs in ``dtype``: float32 for a force_upcast VAE, else ``dtype``."""
    return torch.float32 if dtype in HALF_DTYPES and vae_force_upcast(vae_config) else dtype


def _keep_float32(fn):
    """``fn`` (what ``Module.to`` / ``.half()`` apply to each tensor) with any cast of a float32 tensor to half
    dropped: device moves still apply, the values are never rounded through half precision."""
    def apply(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        return t.to(out.device) if t.dtype == torch.float32 and out.dtype in HALF_DTYPES else out
    return apply


def as_size_rows(value, name: str, n: int, default: Sequence[float], device) -> torch.Tensor:
    """``value`` as a float32 (n, 2) tensor of per-sample pairs; None: ``default`` for every sample; one pair: for all."""
    if value is None:
        return torch.tensor([list(default)], dtype=torch.float32, device=device).expand(n, 2)
    rows = torch.as_tensor(value).to(device=device, dtype=torch.float32)
    if rows.shape == (2,):
        rows = rows.expand(n, 2)
    if rows.shape != (n, 2):
        raise ValueError(f"{name} has shape {tuple(rows.shape)}; give one pair per sample: a ({n}, 2) tensor "
                         f"({'height, width' if name == 'original_size' else 'top, left'} in pixels)")
    return rows


def sdxl_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_hw: tuple[int, int]) -> torch.Tensor:
    """SDXL's added time ids per sample, as diffusers' train_text_to_image_sdxl.py and pipelines make them:
    (original height, width) + (crop top, left) + (target height, width); (n, 6) float32."""
    target = torch.tensor([list(target_hw)], dtype=torch.float32, device=original_size.device).expand(len(original_size), 2)
    return torch.cat([original_size, crop_top_left, target], dim=1)


@dataclass
class TextConditioning:
    """What the UNet (and the ControlNets) need from the prompt."""

    embeds: torch.Tensor                                  # (B, L, cross_attention_dim)
    added_cond_kwargs: dict[str, torch.Tensor] | None = None   # SDXL: text_embeds (pooled) and time_ids


class Backbone(nn.Module):
    """Holds the frozen parts; ``encode_text``, ``encode_images``, ``decode_latents`` are its whole API.

    ``force_zeros_for_empty_prompt`` (SDXL layout only; None: true, as diffusers' SDXL pipelines): empty prompts
    give zero text and pooled embeddings. A VAE with ``force_upcast`` in its config stays in float32 when the
    backbone is cast to fp16 / bf16 (``.to``, ``.half()``, ...).
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: Mapping[str, Any], layout: str = "sd15",
                 text_encoder_2=None, tokenizer_2=None, name: str = "tiny-random", force_zeros_for_empty_prompt: bool | None = None):
        super().__init__()
        if layout not in ("sd15", "sdxl"):
            raise ValueError(f"model.layout={layout!r}; valid layouts: sd15, sdxl")
        if vae.dtype in HALF_DTYPES and vae_force_upcast(vae.config):
            vae = vae.float()
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scheduler_config = dict(scheduler_config)
        self.layout = layout
        self.name = name
        self.unet_trained_by: str | None = None  # an export's unet/ folder when a run trained part of the UNet
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        zeros = force_zeros_for_empty_prompt
        self.force_zeros_for_empty_prompt = layout == "sdxl" and (zeros is None or bool(zeros))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: always in eval mode (no dropout, fixed norms)
        return super().train(False)

    @property
    def vae_stays_fp32(self) -> bool:
        return vae_force_upcast(self.vae.config)

    def _apply(self, fn, recurse: bool = True):
        """Every cast and move reaches every part, except that a force_upcast VAE is never cast to half."""
        if not (recurse and self.vae_stays_fp32):
            return super()._apply(fn, recurse)
        super()._apply(fn, recurse=False)  # the backbone's own tensors (none today)
        for child in self.children():
            child._apply(_keep_float32(fn) if child is self.vae else fn)
        return self

    def _vae_autocast_off(self):
        """The VAE runs in its own dtype: under the trainer's autocast a float32 VAE would otherwise run in half."""
        return torch.autocast(self.vae.device.type, enabled=False)

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    def noise_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config)

    def sampling_scheduler(self, kind: str = "ddim"):
        """A sampler from the backbone's noise schedule: one of :data:`SAMPLERS`.

        ``ddim``, ``dpm`` (DPM-Solver++ 2M) and ``euler`` follow the probability-flow ODE: the starting noise fixes the
        image. ``ddpm`` (ancestral DDPM), ``euler_a`` (Euler ancestral) and ``dpm_sde`` (SDE DPM-Solver++) add fresh
        noise at every step, drawn from the generator given to :func:`sampler_step`, so a seed still fixes the image.
        """
        if kind not in SAMPLERS:
            raise ValueError(f"scheduler {kind!r} unknown; valid: {', '.join(SAMPLERS)} (sampling.scheduler, --scheduler)")
        import diffusers

        cls_name, extra = SAMPLERS[kind]
        return getattr(diffusers, cls_name).from_config(self.scheduler_config, **extra)

    def _tokenize(self, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return ids.to(self.unet.device)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str], image_hw: tuple[int, int] | None = None, original_size=None,
                    crop_top_left=None) -> TextConditioning:
        embeds, pooled = self.text_embeddings(prompts)
        return self.conditioning(embeds, pooled, image_hw, original_size, crop_top_left)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text encoders' outputs for ``prompts``: (B, L, D) embeddings and, for SDXL, (B, P) pooled ones.

        This is what ``realisid precompute`` stores per sample. SDXL layout: an empty prompt gives zeros for both
        (``force_zeros_for_empty_prompt``), the unconditional input SDXL was trained with.
        """
        if self.layout == "sd15":
            return self.text_encoder(self._tokenize(self.tokenizer, prompts))[0], None
        # SDXL: penultimate hidden states of both encoders concatenated; pooled output of the second
        h1 = self.text_encoder(self._tokenize(self.tokenizer, prompts), output_hidden_states=True).hidden_states[-2]
        out2 = self.text_encoder_2(self._tokenize(self.tokenizer_2, prompts), output_hidden_states=True)
        embeds, pooled = torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2[0]
        empty = [not str(p).strip() for p in prompts]
        if self.force_zeros_for_empty_prompt and any(empty):
            mask = torch.tensor(empty, device=embeds.device)
            embeds, pooled = embeds.masked_fill(mask[:, None, None], 0.0), pooled.masked_fill(mask[:, None], 0.0)
        return embeds, pooled

    def conditioning(self, embeds: torch.Tensor, pooled: torch.Tensor | None = None, image_hw: tuple[int, int] | None = None,
                     original_size=None, crop_top_left=None) -> TextConditioning:
        """Text embeddings (computed now or precomputed) to what the UNet takes.

        SDXL layout: ``image_hw`` is the target size; ``original_size`` (B, 2: height, width of the photo before it
        was resized) and ``crop_top_left`` (B, 2: top, left of the crop in the resized photo) go into the time ids
        per sample; absent, the original size is the target size and the crop (0, 0). The time ids are float32
        (the UNet embeds them in float32; half would round sizes above 256 in bf16)."""
        embeds = embeds.to(self.unet.device, self.unet.dtype)
        if self.layout == "sd15":
            return TextConditioning(embeds)
        if pooled is None:
            raise ValueError("the SDXL layout needs the pooled text embedding as well; re-run `realisid precompute` for this backbone")
        hw = tuple(image_hw or (self.unet.config.sample_size * self.vae_scale_factor,) * 2)
        n, dev = len(embeds), embeds.device
        time_ids = sdxl_time_ids(as_size_rows(original_size, "original_size", n, hw, dev),
                                 as_size_rows(crop_top_left, "crop_top_left", n, (0, 0), dev), hw)
        return TextConditioning(embeds, {"text_embeds": pooled.to(dev, embeds.dtype), "time_ids": time_ids})

    @torch.no_grad()
    def latent_moments(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to the VAE posterior's parameters (B, 2C, h, w): mean and log-variance.

        This is what ``realisid precompute`` stores per sample; :meth:`latents_from_moments` samples from it. The
        images are cast to the VAE's dtype; the moments come back in it (float32 for a force_upcast VAE).
        """
        with self._vae_autocast_off():
            return self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist.parameters

    def latents_from_moments(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A scaled latent sampled from the posterior ``moments`` (exactly what :meth:`encode_images` does), in the
        UNet's dtype; sampled and scaled in the VAE's dtype."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        with self._vae_autocast_off():
            dist = DiagonalGaussianDistribution(moments.to(self.vae.device, self.vae.dtype))
            z = dist.sample(generator) if generator is not None else dist.sample()
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            return ((z - shift) * self.vae.config.scaling_factor).to(self.unet.dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] to scaled latents (sampled from the VAE posterior) in the UNet's dtype."""
        return self.latents_from_moments(self.latent_moments(images), generator)

    def fingerprint(self) -> dict:
        """What precomputed latents and text embeddings depend on; a cache made with another backbone is refused.

        For a folder: the VAE and text-encoder configs and their weight files (name, size, mtime), so a retrained
        or replaced model is noticed; the dtype it runs in does not matter. For a random backbone: its configs
        (it is rebuilt identically from them).
        """
        import hashlib
        import json

        def digest(obj) -> str:
            return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

        text = [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])
        out = {"backbone": str(self.name), "layout": self.layout, "vae_config": digest(dict(self.vae.config)),
               "text_config": digest([{k: v for k, v in t.config.to_dict().items() if k not in ("dtype", "torch_dtype")} for t in text])}
        if os.path.isdir(str(self.name)):
            files = []
            for part in ("vae", "text_encoder", "text_encoder_2"):
                folder = os.path.join(str(self.name), part)
                for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                    if f.endswith((".safetensors", ".bin")):
                        st = os.stat(os.path.join(folder, f))
                        files.append((part, f, st.st_size, int(st.st_mtime)))
            out["weight_files"] = digest(files)
        return out

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents of any dtype to images in [-1, 1], in the VAE's dtype."""
        return self.decode_with_grad(latents)

    def decode_with_grad(self, latents: torch.Tensor) -> torch.Tensor:
        """:meth:`decode_latents` with gradients to the latents (the VAE's weights stay frozen): the identity loss."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        with self._vae_autocast_off():
            z = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor + shift
            return self.vae.decode(z).sample.clamp(-1, 1)


def _missing_parts(path: str, layout: str | None) -> list[str]:
    parts = SDXL_PARTS if layout == "sdxl" else SD15_PARTS
    return [p for p in parts if not os.path.isdir(os.path.join(path, p))]


def detect_layout(path: str) -> str:
    return "sdxl" if os.path.isdir(os.path.join(path, "text_encoder_2")) else "sd15"


def read_model_index(path: str) -> dict:
    """The folder's model_index.json (diffusers' pipeline config), or {} when it has none."""
    import json

    index = os.path.join(path, "model_index.json")
    if not os.path.exists(index):
        return {}
    with open(index) as f:
        return json.load(f)


def load_pretrained_backbone(path: str, layout: str | None = None, dtype: torch.dtype = torch.float32) -> Backbone:
    """Load every part from a local diffusers folder; errors name the folder and what is missing."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = os.path.expanduser(str(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model.pretrained='{path}' is not a folder; point it at a local diffusers model folder "
                                f"(with {', '.join(SD15_PARTS)}), e.g. a snapshot of stable-diffusion-v1-5")
    layout = layout or detect_layout(path)
    missing = _missing_parts(path, layout)
    if missing:
        raise FileNotFoundError(f"model.pretrained='{path}' lacks {', '.join(m + '/' for m in missing)} "
                                f"needed for the {layout} layout; use a complete diffusers folder")
    if layout == "sd15" and detect_layout(path) == "sdxl":
        raise ValueError(f"model.layout=sd15 but model.pretrained='{path}' is an SDXL folder (it has text_encoder_2/); "
                         "use an sdxl experiment (e.g. sdxl/local_branch) or model.layout=sdxl")
    from diffusers import DDPMScheduler

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
    vae_dtype = vae_dtype_for(AutoencoderKL.load_config(path, subfolder="vae"), dtype)  # never rounded through half
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    scheduler_config = DDPMScheduler.load_config(path, subfolder="scheduler")
    te2 = tok2 = None
    if layout == "sdxl":
        te2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", torch_dtype=dtype)
        tok2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2")
    zeros = read_model_index(path).get("force_zeros_for_empty_prompt", True)
    log.info("loaded %s backbone from %s (VAE in %s%s)", layout, path, str(vae_dtype).replace("torch.", ""),
             ", empty prompt = zeros" if layout == "sdxl" and zeros else "")
    return Backbone(unet, vae, text_encoder, tokenizer, scheduler_config, layout, te2, tok2, name=path,
                    force_zeros_for_empty_prompt=zeros)


def build_tiny_backbone(cfg: Mapping[str, Any], seed: int = 0) -> Backbone:
    """Random tiny backbone from the ``model.tiny`` config (diffusers test sizes), SD1.5 layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer(CAPTION_WORDS, max_length=int(cfg["text"]["max_position_embeddings"]))
    text_cfg = dict(cfg["text"])
    text_cfg["vocab_size"] = len(tokenizer)
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id, **text_cfg))
    unet = UNet2DConditionModel(**_plain(cfg["unet"]))
    vae = AutoencoderKL(**_plain(cfg["vae"]))
    return Backbone(unet, vae, text_encoder, tokenizer, _plain(cfg["scheduler"]), "sd15", name="tiny-random")


def save_backbone(backbone: Backbone, path: str, half_unet: bool = False) -> None:
    """Write the backbone as a diffusers folder that :func:`load_pretrained_backbone` reads back.

    ``half_unet``: store the UNet's weights in float16 (half the bytes; loading casts them to the dtype asked for)."""
    import copy
    import json

    from diffusers import DDPMScheduler

    unet = copy.deepcopy(backbone.unet).to(torch.float16) if half_unet else backbone.unet
    unet.save_pretrained(os.path.join(path, "unet"))
    backbone.vae.save_pretrained(os.path.join(path, "vae"))
    backbone.text_encoder.save_pretrained(os.path.join(path, "text_encoder"))
    backbone.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    DDPMScheduler.from_config(backbone.scheduler_config).save_pretrained(os.path.join(path, "scheduler"))
    index = {"_class_name": "StableDiffusionPipeline", "_realisid": "tiny base trained on synthetic faces (stand-in)"}
    if backbone.layout == "sdxl":
        backbone.text_encoder_2.save_pretrained(os.path.join(path, "text_encoder_2"))
        backbone.tokenizer_2.save_pretrained(os.path.join(path, "tokenizer_2"))
        index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": backbone.force_zeros_for_empty_prompt}
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def _plain(node) -> dict:
    from omegaconf import DictConfig, OmegaConf

    d = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def vae_scale_factor_of(model_cfg: Mapping[str, Any]) -> int:
    """The VAE's down-sampling factor, read from config files without loading any weights."""
    import json

    if model_cfg.get("pretrained"):
        path = os.path.join(os.path.expanduser(str(model_cfg["pretrained"])), "vae", "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"model.pretrained='{model_cfg['pretrained']}' has no vae/config.json; use a complete diffusers folder")
        with open(path) as f:
            channels = json.load(f)["block_out_channels"]
    else:
        channels = model_cfg["tiny"]["vae"]["block_out_channels"]
    return 2 ** (len(channels) - 1)


def load_trained_unet(backbone: Backbone, unet_dir: str) -> None:
    """Put the UNet weights a run trained (``model.unet_train``, exported as ``export/unet``) into ``backbone``;
    the folder holds the whole UNet (diffusers ``save_pretrained``), so its shapes must match the base's."""
    from safetensors.torch import load_file

    path = os.path.join(unet_dir, "diffusion_pytorch_model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"'{unet_dir}' has no diffusion_pytorch_model.safetensors: the run's UNet export is incomplete; "
                                "export the run again (its checkpoints/last.ckpt holds the trained UNet weights)")
    weights = load_file(path)
    own = backbone.unet.state_dict()
    bad = sorted(set(own) ^ set(weights))[:3] or [k for k in own if tuple(own[k].shape) != tuple(weights[k].shape)][:3]
    if bad:
        raise ValueError(f"'{unet_dir}' is not a UNet of the base '{backbone.name}' (differs at {bad}); the run was trained "
                         "on another base: give the model.pretrained it was trained with")
    backbone.unet.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()})
    backbone.unet_trained_by = unet_dir


def load_backbone(model_cfg: Mapping[str, Any], seed: int = 0) -> Backbone:
    """``model.pretrained`` set: load that folder; unset: the random tiny backbone."""
    dtype = DTYPES[model_cfg.get("backbone_dtype", "fp32")]
    if model_cfg.get("pretrained"):
        return load_pretrained_backbone(model_cfg["pretrained"], model_cfg.get("layout"), dtype)
    return build_tiny_backbone(model_cfg["tiny"], seed)
