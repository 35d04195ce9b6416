"""RealisIDPipeline: sampling with the local and global branches, for one or several people.

Each denoising step, for every person: one global-branch pass with that person's location map and identity
tokens, and one local-branch pass on that person's latent crop (both batched over the three guidance
conditions). Local residuals are relocated to each person's box and SUMMED over people; global residuals
are AVERAGED over people; the frozen UNet runs once on the sum. Guidance:
``eps = eps_none + g_text * (eps_t - eps_none) + g_id * (eps_ti - eps_t)``, with identity conditioning
delayed for the first ``id_delay`` fraction of steps, and ``g_id`` applied only until the ``id_guidance_until`` fraction
of steps (after it the identity still conditions, ``g_id`` = 1: a guidance interval, Kynkaanniemi et al. 2024, so the
low-noise steps that draw the face's detail are not pushed by the amplified identity term). ``guidance_id_by_bin`` gives
``g_id`` per face-size bin instead ({"tiny": 5, "large": 3}): each person's scale applies inside that person's crop
box and the people's mean outside them (:func:`identity_guidance_map`), so with one person the whole picture takes it. ``guidance_rescale`` (phi) then pulls the guided
prediction's spread back toward the fully conditioned one's (:func:`rescale_guidance`), against the over-saturation
that large guidance scales cause with a v-prediction, zero-terminal-SNR backbone.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from realisid.data.guidance import contour_map, location_map
from realisid.data.shards import SampleError, decode_image
from realisid.geometry import DEFAULT_BINS, FRONTAL_KPS, bins_from_config, box_iou, expand_square_box, face_size, scale_bin
from realisid.images import centred_mask, hwc_uint8, identity_crop, identity_crop_kps, to_tensor
from realisid.models.backbone import DTYPES, load_backbone, load_trained_unet
from realisid.models.samplers import sampler_step
from realisid.models.branches import GlobalBranch, LocalBranch, add_residuals
from realisid.models.id_encoder import IdProjector, build_id_encoder

log = logging.getLogger(__name__)


@dataclass
class Person:
    """One person to place: a target box in output pixels and an identity (reference image or features)."""

    box: Sequence[float]
    id_image: torch.Tensor | None = None      # (3, S, S) in [-1, 1], a square face crop
    id_mask: torch.Tensor | None = None       # (1, S, S)
    id_features: torch.Tensor | None = None   # precomputed encoder output (D,) or (N, D)
    kps: np.ndarray | None = None             # (5, 2) in output pixels; default: a frontal face in the box
    id_kps: torch.Tensor | None = None        # (5, 2) the reference face's key points in id_image pixels (alignment)
    landmarks: Mapping[str, Sequence] | None = None


@dataclass
class RealisIDOutput:
    images: list[Image.Image]
    people: list[dict] = field(default_factory=list)
    latents: torch.Tensor | None = None


class RealisIDPipeline:
    def __init__(self, backbone, id_encoder, projector, local_branch=None, global_branch=None, *, resolution: int,
                 crop_expand: float, local_latent_size: int, soft_location: bool = False, bins=None):
        self.backbone, self.id_encoder, self.projector = backbone, id_encoder, projector
        self.local_branch, self.global_branch = local_branch, global_branch
        self.resolution, self.crop_expand = int(resolution), float(crop_expand)
        self.local_latent_size, self.soft_location = int(local_latent_size), bool(soft_location)
        self.bins = bins or DEFAULT_BINS

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module) -> "RealisIDPipeline":
        c = module.cfg
        return cls(module.backbone, module.id_encoder, module.projector, module.local_branch, module.global_branch,
                   resolution=c.data.resolution, crop_expand=c.model.local.crop_expand, local_latent_size=c.model.local.latent_size,
                   soft_location=c.model["global"].soft_location, bins=bins_from_config(c.get("bins")))

    @classmethod
    def from_export(cls, export_dir: str, backbone=None, device: str | torch.device | None = "cpu",
                    dtype: str | torch.dtype | None = None) -> "RealisIDPipeline":
        """Load a run's exported branches (diffusers ``from_pretrained``) with the backbone its config names, then
        move it with :meth:`to` (``device=None``: cuda when available; ``dtype=None``: fp16 frozen parts on a GPU, as
        loaded on a CPU)."""
        from safetensors.torch import load_file

        cfg_path = os.path.join(export_dir, "config.yaml")
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"'{export_dir}' has no config.yaml: not a RealisID export (expected RUN_DIR/export)")
        c = OmegaConf.load(cfg_path)
        unet_dir = os.path.join(export_dir, "unet")
        if os.path.isdir(unet_dir) and backbone is not None:  # loading would change a backbone the caller may share
            raise ValueError(f"'{export_dir}' holds a trained base UNet (unet/, from model.unet_train="
                             f"{list(c.model.get('unet_train') or [])}), which would overwrite the UNet of the backbone passed "
                             "in; call from_export without backbone= so it loads a backbone of its own")
        backbone = backbone or load_backbone(c.model, seed=c.experiment.seed)
        if os.path.isdir(unet_dir):  # the run trained part of the base UNet (model.unet_train): sample with its UNet
            load_trained_unet(backbone, unet_dir)
        enc = build_id_encoder(c.model.id_encoder)
        proj = IdProjector(enc.embed_dim, int(c.model.id_tokens), backbone.cross_attention_dim, sequence=enc.sequence)
        proj.load_state_dict(load_file(os.path.join(export_dir, "id_projector", "model.safetensors")))
        local = LocalBranch.from_pretrained(os.path.join(export_dir, "local")) if os.path.isdir(os.path.join(export_dir, "local")) else None
        glob_ = GlobalBranch.from_pretrained(os.path.join(export_dir, "global")) if os.path.isdir(os.path.join(export_dir, "global")) else None
        for m in (proj, local, glob_):
            if m is not None:
                m.eval().requires_grad_(False)
        pipe = cls(backbone, enc, proj, local, glob_, resolution=c.data.resolution, crop_expand=c.model.local.crop_expand,
                   local_latent_size=c.model.local.latent_size, soft_location=c.model["global"].soft_location,
                   bins=bins_from_config(c.get("bins")))
        return pipe.to(device, dtype)

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> "RealisIDPipeline":
        """Move every part to ``device`` (None: cuda when available, else cpu). ``dtype`` (fp32 | fp16 | bf16, or a
        torch dtype; None: fp16 on a GPU, unchanged on a CPU) is for the frozen parts (UNet, text encoders, a CLIP
        identity encoder; the VAE only where its config does not ask for ``force_upcast``, as SDXL's does); the
        trained branches and the projector keep fp32 weights and run under autocast (see :meth:`autocast`)."""
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev, self.backbone.unet.dtype)
        self.backbone.to(dev)
        if dt != self.backbone.unet.dtype:
            self.backbone.to(dt)  # a force_upcast VAE stays in fp32 (Backbone._apply)
        self.id_encoder.to(dev)
        self.id_encoder.to_frozen_dtype(dt)
        for part in (self.projector, self.local_branch, self.global_branch):
            if part is not None:
                part.to(dev, torch.float32)
        return self

    @property
    def device(self) -> torch.device:
        return self.backbone.unet.device

    # ---- per-person conditioning --------------------------------------------------------------------
    def person_inputs(self, person: Person) -> dict[str, Any]:
        R, f = self.resolution, self.backbone.vae_scale_factor
        box = [float(v) for v in person.box]
        crop_box = expand_square_box(box, self.crop_expand, R, R, multiple=f)
        kps = person.kps if person.kps is not None else FRONTAL_KPS * [box[2] - box[0], box[3] - box[1]] + [box[0], box[1]]
        local_px = self.local_latent_size * f
        pe = contour_map(np.asarray(kps), person.landmarks, crop_box, local_px)
        loc = location_map(box, R, R, soft=self.soft_location)
        if person.id_features is not None:
            feats = person.id_features[None].to(self.device)
        elif person.id_image is not None:
            mask = person.id_mask if person.id_mask is not None else torch.ones_like(person.id_image[:1])
            id_kps = person.id_kps[None].to(self.device) if person.id_kps is not None else None
            feats = self.id_encoder(person.id_image[None].to(self.device), mask[None].to(self.device), kps=id_kps)
        else:
            raise ValueError(f"person at box {box} has neither a reference image nor identity features")
        tokens = self.projector(feats.to(self.backbone.unet.dtype))
        size = face_size(box, R, R)
        return {
            "box": box, "crop_box": list(crop_box), "tokens": tokens,
            "latent_box": [[int(v) // f for v in crop_box]],  # a host list: the branch never reads boxes from the device
            "pe_map": torch.from_numpy(pe.astype(np.float32) / 255.0).permute(2, 0, 1)[None].to(self.device),
            # at the global branch's conditioning size once, not every step
            "loc_map": self.global_branch.fit_location(torch.from_numpy(loc)[None, None].to(self.device), R // f)
            if self.global_branch is not None else None,
            "face_size": size, "bin": scale_bin(size, self.bins), "kps": np.asarray(kps).tolist(),
        }

    # ---- residuals of one step ----------------------------------------------------------------------
    def branch_rows(self, id_on: bool, added_cond_kwargs=None) -> tuple[list[int], list[int]]:
        """Which of the 3 guidance rows (none, text, text+identity) the branches must actually run on.

        The branches see the noisy latent and timestep (the same in all rows), the identity tokens (null, null,
        the person's, or null in all rows while identity is delayed) and, on SDXL only, the pooled text and
        time ids (the negative prompt's in row 0, the prompt's in rows 1 and 2). Returns the rows to compute
        and, for each of the 3 rows, which computed row it equals: on SD1.5 2 passes instead of 3, 1 during
        the identity delay; on SDXL 3 and 2.
        """
        text_rows = (0, 1, 1) if added_cond_kwargs else (0, 0, 0)
        keys = [(text_rows[i], i == 2 and id_on) for i in range(3)]
        distinct = list(dict.fromkeys(keys))
        return [keys.index(k) for k in distinct], [distinct.index(k) for k in keys]

    def step_residuals(self, latents: torch.Tensor, t: torch.Tensor, people: list[dict], id_on: bool,
                       added_cond_kwargs=None, use_local: bool = True, use_global: bool = True):
        """Residuals for a batch of 3 guidance conditions (none, text, text+identity) of one image; each branch
        runs only on the distinct rows (:meth:`branch_rows`) and the result is spread back to the 3 rows."""
        n = latents.shape[0]
        if n == 3:
            run, spread = self.branch_rows(id_on, added_cond_kwargs)
        else:
            run, spread = list(range(n)), list(range(n))
        k = len(run)
        sel = torch.tensor(run, device=latents.device)
        x, tt = latents.index_select(0, sel), t.index_select(0, sel) if t.ndim else t
        added = {key: v.index_select(0, sel) for key, v in added_cond_kwargs.items()} if added_cond_kwargs else None
        local_sum, globals_ = None, []
        for p in people:
            key = ("tokens_batch", n, id_on)  # built once per person and phase, not every step
            if key not in p:
                null = torch.zeros_like(p["tokens"])
                rows = [p["tokens"] if (id_on and r == n - 1) else null for r in range(n)]
                p[key] = torch.cat([rows[r] for r in run], 0)
            tokens = p[key]
            if use_local and self.local_branch is not None:
                r = self.local_branch(x, tt, tokens, p["pe_map"].expand(k, -1, -1, -1), p["latent_box"] * k, added)
                local_sum = add_residuals(local_sum, r)
            if use_global and self.global_branch is not None:
                globals_.append(self.global_branch(x, tt, tokens, p["loc_map"].expand(k, -1, -1, -1), added))
        global_avg = None
        if globals_:
            m = float(len(globals_))
            global_avg = ([sum(g[0][i] for g in globals_) / m for i in range(len(globals_[0][0]))], sum(g[1] for g in globals_) / m)
        res = add_residuals(local_sum, global_avg)
        if res is None or spread == list(range(k)):
            return res
        back = torch.tensor(spread, device=latents.device)
        return [r.index_select(0, back) for r in res[0]], res[1].index_select(0, back)

    # ---- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str, people: Sequence[Person], negative_prompt: str = "", num_inference_steps: int = 30,
                 scheduler: str = "ddim", guidance_text: float = 7.5, guidance_id: float = 5.0, id_delay: float = 0.1,
                 seed: int = 0, use_local: bool = True, use_global: bool = True, output_type: str = "pil",
                 guidance_rescale: float = 0.0, id_guidance_until: float = 1.0,
                 guidance_id_by_bin: Mapping[str, float] | None = None, image: torch.Tensor | None = None,
                 strength: float = 1.0) -> RealisIDOutput:
        """``image`` (3, R, R) or (1, 3, R, R) in [-1, 1], with ``strength`` in [0, 1]: start from that image's latent
        noised to the step ``strength`` of the way back (img2img; the last ``round(strength * steps)`` steps run,
        0 = the image through the VAE, 1 = from noise as without it). Without ``image`` sampling starts from noise."""
        check_guidance_rescale(guidance_rescale)
        check_id_guidance_until(id_guidance_until)
        by_bin = check_guidance_id_by_bin(guidance_id_by_bin, self.bins)
        init = check_init_image(image, strength, self.resolution)
        with self.autocast():
            return self._sample(prompt, people, negative_prompt, num_inference_steps, scheduler, guidance_text, guidance_id,
                                id_delay, seed, use_local, use_global, output_type, guidance_rescale, id_guidance_until, by_bin,
                                init, float(strength))

    def autocast(self):
        """With a half-precision backbone (model.backbone_dtype) and fp32 branches, run every pass under autocast."""
        import contextlib

        dtype = self.backbone.unet.dtype
        return torch.autocast(self.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def _sample(self, prompt, people, negative_prompt, num_inference_steps, scheduler, guidance_text, guidance_id, id_delay, seed,
                use_local, use_global, output_type, guidance_rescale=0.0, id_guidance_until=1.0, by_bin=None, init=None,
                strength=1.0) -> RealisIDOutput:
        if not people:
            raise ValueError("give at least one person (a reference face and a target box)")
        R, f = self.resolution, self.backbone.vae_scale_factor
        inputs = [self.person_inputs(p) for p in people]
        sched = self.backbone.sampling_scheduler(scheduler)
        sched.set_timesteps(num_inference_steps, device=self.device)
        text = self.backbone.encode_text([negative_prompt, prompt, prompt], (R, R))
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        shape = (1, self.backbone.latent_channels, R // f, R // f)
        # the sampler's state stays in fp32 across steps; only each pass's input is cast to the UNet's dtype
        noise = torch.randn(shape, generator=g)
        step_noise = torch.Generator(device="cpu").manual_seed(int(seed) + 1)  # a stochastic sampler's per-step noise
        latents = (noise * sched.init_noise_sigma).to(self.device, torch.float32)
        start = 0
        if init is not None and strength < 1.0:  # img2img: the image's latent, noised to the first step that runs
            start = num_inference_steps - int(round(strength * num_inference_steps))
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(start)
            x0 = self.backbone.encode_images(init.to(self.device), generator=g).float()
            latents = x0 if start >= num_inference_steps else sched.add_noise(x0, noise.to(self.device), sched.timesteps[start:start + 1])
        delay_steps = int(round(id_delay * num_inference_steps))
        until_steps = int(round(id_guidance_until * num_inference_steps))
        g_map = identity_guidance_map(inputs, guidance_id, by_bin, shape[-2:], f)
        g_map = g_map.to(self.device) if torch.is_tensor(g_map) else g_map
        for i, t in enumerate(sched.timesteps[start:], start):
            x = sched.scale_model_input(torch.cat([latents] * 3), t).to(self.backbone.unet.dtype)
            tt = t.expand(3) if t.ndim else t.repeat(3)
            res = self.step_residuals(x, tt, inputs, i >= delay_steps, text.added_cond_kwargs, use_local, use_global)
            eps = self.backbone.unet(x, tt, encoder_hidden_states=text.embeds, added_cond_kwargs=text.added_cond_kwargs,
                                     down_block_additional_residuals=res[0] if res else None,
                                     mid_block_additional_residual=res[1] if res else None, return_dict=False)[0]
            e_none, e_t, e_ti = eps.float().chunk(3)
            g_id = g_map if i < until_steps else 1.0
            eps = rescale_guidance(e_none + guidance_text * (e_t - e_none) + g_id * (e_ti - e_t), e_ti, guidance_rescale)
            latents = sampler_step(sched, eps, t, latents, step_noise)
        image = self.backbone.decode_latents(latents)
        meta = [{k: v for k, v in p.items() if k in ("box", "crop_box", "face_size", "bin", "kps")} for p in inputs]
        if output_type == "pt":
            return RealisIDOutput(image, meta, latents)  # type: ignore[arg-type]
        return RealisIDOutput(tensor_to_pil(image), meta, latents)


def check_init_image(image: torch.Tensor | None, strength: float, resolution: int) -> torch.Tensor | None:
    """img2img's start image as (1, 3, R, R) float, or None; refuses a strength outside [0, 1], a strength below 1
    without an image, and an image of another size."""
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength={strength}: give a value in [0, 1] (1 = from noise, 0 = the image through the VAE)")
    if image is None:
        if float(strength) < 1.0:
            raise ValueError(f"strength={strength} needs an image to start from (image=...); without one sampling starts from noise")
        return None
    x = image[None] if image.ndim == 3 else image
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (resolution, resolution):
        raise ValueError(f"image of shape {tuple(image.shape)}: give (3, {resolution}, {resolution}) in [-1, 1], the pipeline's resolution")
    return x.float()


def check_guidance_rescale(phi: float) -> float:
    """The guidance rescale phi must lie in [0, 1]; the generate CLI checks it before loading any model."""
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"guidance_rescale={phi}: give a value in [0, 1] (--guidance-rescale or sampling.guidance_rescale; "
                         "0 = plain guidance, 0.7 in the paper that introduced it)")
    return phi


def check_id_guidance_until(fraction: float) -> float:
    """The fraction of steps the identity guidance scale applies for must lie in [0, 1]; the generate CLI checks it
    before loading any model."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"id_guidance_until={fraction}: give a fraction of the steps in [0, 1] (--id-guidance-until or "
                         "sampling.id_guidance_until; 1 = identity guidance on every step, 0.5 = the first half only)")
    return fraction


def check_guidance_id_by_bin(by_bin: Mapping[str, float] | None, bins: Mapping[str, Any]) -> dict[str, float] | None:
    """Identity guidance scales per face-size bin: every key a bin name, every value a finite scale >= 0; None or an
    empty mapping means one scale (guidance_id) for every face. The generate CLI checks it before loading any model."""
    if not by_bin:
        return None
    out = {}
    for name, value in dict(by_bin).items():
        if str(name) not in bins:
            raise ValueError(f"guidance_id_by_bin: '{name}' is not a face-size bin; use the bins {list(bins)} "
                             "(--guidance-id-by-bin tiny=5,large=3 or sampling.guidance_id_by_bin)")
        try:
            scale = float(value)
        except (TypeError, ValueError):
            scale = float("nan")
        if not (np.isfinite(scale) and scale >= 0):
            raise ValueError(f"guidance_id_by_bin: {name}={value} is not a guidance scale; give a number >= 0 "
                             "(1 = no identity guidance, 5 = the default guidance_id)")
        out[str(name)] = scale
    return out


def parse_by_bin(text: str) -> dict[str, str]:
    """``tiny=5,large=3`` -> {"tiny": "5", "large": "3"} (values checked by check_guidance_id_by_bin); "" -> {} (off)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"guidance_id_by_bin {text!r}: give BIN=SCALE pairs separated by commas, e.g. --guidance-id-by-bin tiny=5,large=3")
        out[name.strip()] = value.strip()
    return out


def guidance_id_by_bin(sampling: Mapping[str, Any]) -> dict[str, Any] | None:
    """``sampling.guidance_id_by_bin`` of a config as a plain dict (None when unset or empty); checked by the pipeline."""
    value = sampling.get("guidance_id_by_bin")
    if not value:
        return None
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, Mapping):
        raise ValueError(f"sampling.guidance_id_by_bin={value!r}: give a mapping of face-size bin to scale, e.g. "
                         "{tiny: 5, large: 3}, or null")
    return {str(k): v for k, v in value.items()}


def identity_guidance_map(people: Sequence[Mapping[str, Any]], guidance_id: float, by_bin: Mapping[str, float] | None,
                          latent_hw: Sequence[int], vae_scale_factor: int) -> float | torch.Tensor:
    """The identity guidance scale g_id (computed once per sample): ``guidance_id`` for every face without ``by_bin``; with it, a
    (1, 1, h, w) latent map holding each person's bin scale (``guidance_id`` for a bin it leaves out) inside that
    person's crop box (a later person over an earlier one where crops overlap) and the people's mean elsewhere."""
    if not by_bin:
        return float(guidance_id)
    scales = [float(by_bin.get(p["bin"], guidance_id)) for p in people]
    g = torch.full((1, 1, int(latent_hw[0]), int(latent_hw[1])), float(np.mean(scales)))
    for p, scale in zip(people, scales):
        x0, y0, x1, y1 = (int(v) // vae_scale_factor for v in p["crop_box"])
        g[..., y0:y1, x0:x1] = scale
    return g


def rescale_guidance(guided: torch.Tensor, conditioned: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.4):
    scale each sample's guided prediction so its standard deviation matches the fully conditioned prediction's, and
    blend that with the guided one by ``phi`` (0 returns ``guided`` unchanged)."""
    if phi == 0.0:
        return guided
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (conditioned.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12))
    return phi * rescaled + (1.0 - phi) * guided


def resolve_device(device: str | torch.device | None, what: str = "--device") -> torch.device:
    """``None`` or ``auto``: cuda when available, else cpu; a CUDA device asked for on a machine without one is
    refused with the fix named (``what``: the option or config key the value came from)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sep = " " if what.startswith("--") else "="
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{what}{sep}{device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what}{sep}{device} but this machine has no CUDA device; use {what}{sep}cpu (or auto)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, current: torch.dtype = torch.float32) -> torch.dtype:
    """The frozen parts' dtype: given, or by default fp16 on a GPU for a model in fp32 and otherwise the dtype the
    model already has (on a CPU, fp32: CPU half kernels are slow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" and current == torch.float32 else current
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = hwc_uint8(images)
    return [Image.fromarray(a) for a in arr]


def check_boxes(boxes: Sequence[Sequence[float]], size: int, *, min_box: float, max_overlap: float, vae_scale_factor: int) -> None:
    """Refuse boxes the pipeline cannot honour, naming the box and the fix."""

    for i, b in enumerate(boxes):
        x0, y0, x1, y1 = b
        if x0 < 0 or y0 < 0 or x1 > size or y1 > size:
            raise ValueError(f"box {i + 1} {_fmt(b)} is outside the {size}x{size} output; give corners within 0..{size}")
        side = min(x1 - x0, y1 - y0)
        if side < max(min_box, vae_scale_factor):
            raise ValueError(f"box {i + 1} {_fmt(b)} is {side:g} px, too small to crop (minimum {max(min_box, vae_scale_factor):g} px "
                             f"at {size} px output)")
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            iou = box_iou(boxes[i], boxes[j])
            if iou > max_overlap:
                raise ValueError(f"boxes {i + 1} {_fmt(boxes[i])} and {j + 1} {_fmt(boxes[j])} overlap with IoU {iou:.2f} > "
                                 f"{max_overlap:g}; move them apart or raise sampling.max_overlap")


def _fmt(b) -> str:
    return ",".join(f"{v:g}" for v in b)


def reference_face(faces: Sequence[Any], path: str, analyzer_name: str, largest: bool = False, other_face_ratio: float = 0.3):
    """The one face of a reference photo: the largest, provided no other face is at least ``other_face_ratio``
    of its size (the shard builder's single-person rule; a small bystander is allowed). No face, or several
    people without ``largest``, is an error naming the count and the fix."""
    if not faces:
        raise ValueError(f"reference '{path}': no face found by {analyzer_name}; use a photo with a visible face")

    def side(f):
        return float(max(f.bbox[2] - f.bbox[0], f.bbox[3] - f.bbox[1]))

    main = max(faces, key=lambda f: (side(f), f.det_score))
    people = sum(1 for f in faces if side(f) >= other_face_ratio * side(main))
    if people > 1 and not largest:
        raise ValueError(f"reference '{path}': {people} faces found by {analyzer_name}; use a photo of one person, "
                         "or pass --largest-face to take the largest")
    return main


def reference_person(path: str, box: Sequence[float], id_image_size: int, analyzer=None, largest: bool = False) -> tuple[Person, dict]:
    """A :class:`Person` from a reference photo and a target box.

    The face in the photo comes from, in order: a sidecar ``<photo>.json`` in the shard format (bbox, kps),
    the face analyzer (:func:`reference_face`: exactly one person, or the largest with ``largest``), or, with
    neither, the whole photo taken as a face crop.
    Pose/expression for the target come from the reference face's 5 points, moved into the target box.
    """
    import json

    try:
        with open(path, "rb") as f:
            img = decode_image(f.read(), path)
    except FileNotFoundError:
        raise FileNotFoundError(f"reference '{path}' does not exist") from None
    except SampleError as err:
        raise ValueError(f"reference '{path}' is not a readable image ({err.detail})") from None
    sidecar = os.path.splitext(path)[0] + ".json"
    source = "whole image taken as a face crop"
    if os.path.exists(sidecar):
        try:
            meta = json.load(open(sidecar))
            bbox, kps = [float(v) for v in meta["bbox"]], np.asarray(meta["kps"], dtype=np.float32).reshape(5, 2)
            landmarks = meta.get("landmarks")
        except Exception as exc:
            raise ValueError(f"reference sidecar '{sidecar}' is unreadable ({exc}); it needs bbox and kps as in the shard format") from None
        source = f"face from {os.path.basename(sidecar)}"
    elif analyzer is not None:
        faces = analyzer.detect(np.asarray(img))
        face = reference_face(faces, path, analyzer.name, largest)
        bbox, kps, landmarks = face.bbox.tolist(), face.kps, face.landmarks
        source = f"face detected by {analyzer.name} (score {face.det_score:.2f}" + (f", the largest of {len(faces)})" if len(faces) > 1 else ")")
    else:
        bbox, kps, landmarks = None, None, None
    if bbox is None:
        crop = img.resize((id_image_size, id_image_size), Image.BICUBIC)
        id_image, id_mask, target_kps = to_tensor(crop), torch.from_numpy(centred_mask(id_image_size))[None], None
        id_kps = None
    else:
        crop, mask = identity_crop(img, bbox, id_image_size)
        id_image, id_mask = to_tensor(crop), torch.from_numpy(mask)[None]
        # the detected key points align the reference for an ArcFace encoder (not a frontal template)
        id_kps = torch.from_numpy(identity_crop_kps(kps, bbox, img.width, img.height, id_image_size))

        def to_target(points):  # reference face box -> target box
            rel = (np.asarray(points, dtype=np.float32).reshape(-1, 2) - [bbox[0], bbox[1]]) / [bbox[2] - bbox[0], bbox[3] - bbox[1]]
            return (rel * [box[2] - box[0], box[3] - box[1]] + [box[0], box[1]]).astype(np.float32)

        target_kps = to_target(kps)
        # dense contours (dlib's 68 points, or a sidecar's) draw the pose/expression map; else the 5 points do
        landmarks = {k: to_target(v).tolist() for k, v in landmarks.items()} if landmarks else None
    person = Person(box=box, id_image=id_image, id_mask=id_mask, kps=target_kps, id_kps=id_kps, landmarks=landmarks)
    info = {"reference": path, "reference_face": source, "dense_landmarks": sorted(landmarks) if landmarks else None}
    if bbox is not None:  # where the face is in the reference photo
        info.update(reference_box=[round(float(v), 2) for v in bbox], reference_kps=np.round(np.asarray(kps, dtype=np.float64), 2).tolist())
    return person, info
