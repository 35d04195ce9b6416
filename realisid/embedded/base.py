"""The embedded default's base text-to-image model, trained from scratch on the synthetic faces.

It plays SD1.5's part for the embedded default: a frozen backbone that already draws people, so that the
branches learn identity and placement on top of it, as they would on a real model. The recipe, measured
side by side on this project's 2-core CPU (the README states the numbers):

- 128 px images with a factor-8 VAE (SD's factor) and 16 latent channels: 16x16x16 latents. A face of 1/8 of
  the image is 16 px, 2 latent pixels: small enough that the frozen UNet sees little of it (the regime the local
  branch is for). How much of a face this VAE keeps is measured, not assumed: ``make check-embedded`` and
  ``benchmarks/vae_probe.py``.
- The VAE learns on random crops (it is fully convolutional; crops cost a quarter of whole images).
- The UNet learns on latents encoded once and held in memory (posterior mean and log-variance, a fresh
  sample each step), predicting v with a zero-terminal-SNR noise schedule (epsilon prediction left the
  high-noise steps, where the layout is decided, unlearned in this budget), low-noise steps capped min-SNR
  style (gamma 5), an exponential moving average of the weights (the average is what is saved), and caption
  augmentation: the full caption, the caption without the
  person's identity, the bare "a photo of a person", or nothing (classifier-free guidance), so that
  identity-free prompts are in distribution and identity must come from somewhere else.

Everything is seeded; each stage saves its result so an interrupted recipe resumes at the stage it reached.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from realisid.data.shards import SampleError, check_shards_exist, decode_sample
from realisid.data.stream import skip_bad_tar
from realisid.geometry import square_window
from realisid.images import crop_resized, signed_from_uint8, uint8_from_signed
from realisid.models.samplers import sampler_step
from realisid.modules.losses import sample_timesteps

log = logging.getLogger(__name__)

GENERIC_PROMPT = "a photo of a person"
STANDIN_BASE_NAME = "tiny base trained on synthetic faces (stand-in for SD1.5)"


@dataclass
class ImageSet:
    """The images of a set of shards, in memory: uint8 pixels and the two captions of each."""

    images: torch.Tensor                 # (N, 3, R, R) uint8
    captions: list[str]
    captions_no_identity: list[str]
    keys: list[str]
    boxes: torch.Tensor                  # (N, 4) face boxes in view pixels
    kps: torch.Tensor                    # (N, 5, 2) key points in view pixels
    identities: list[str]

    def __len__(self) -> int:
        return len(self.keys)


def load_image_set(urls: Sequence[str], resolution: int) -> ImageSet:
    """Every sample of ``urls`` as its square view at ``resolution`` (the training pipeline's view)."""
    import webdataset as wds

    urls = check_shards_exist(urls, "base model shards")
    images, caps, caps_free, keys, boxes, kps, idents = [], [], [], [], [], [], []
    for raw in wds.WebDataset(list(urls), shardshuffle=False, handler=skip_bad_tar, empty_check=False, nodesplitter=None,
                              workersplitter=None):
        try:
            s = decode_sample(raw, with_ref=False)
        except SampleError as err:
            log.warning("base model data: skipped %s", err)
            continue
        img, meta = s["image"], s["meta"]
        win = square_window(img.width, img.height, meta["bbox"])
        scale = resolution / float(win[2] - win[0])
        view = crop_resized(img, win, resolution)
        images.append(torch.from_numpy(np.array(view, dtype=np.uint8)).permute(2, 0, 1))
        caps.append(str(meta.get("caption") or ""))
        caps_free.append(str(meta.get("caption_no_identity") or GENERIC_PROMPT))
        keys.append(s["key"])
        idents.append(str(meta.get("identity")))
        boxes.append((np.asarray(meta["bbox"], np.float32) - [win[0], win[1], win[0], win[1]]) * scale)
        kps.append((np.asarray(meta["kps"], np.float32).reshape(5, 2) - [win[0], win[1]]) * scale)
    if not images:
        raise ValueError(f"no usable sample in {len(urls)} shards ({urls[0]} ...); regenerate them with `make prepare`")
    return ImageSet(torch.stack(images), caps, caps_free, keys, torch.from_numpy(np.stack(boxes)).float(),
                    torch.from_numpy(np.stack(kps)).float(), idents)



class Progress:
    """Sparse progress lines (every ``every`` steps, 20 in all by default): the mean loss since the last line, when
    there is one, and seconds per step. One line each, so logs and pipes stay readable."""

    def __init__(self, what: str, total: int, every: int | None = None, start: int = 0):
        self.what, self.total = what, int(total)
        self.every = max(1, int(every or max(1, self.total // 20)))
        self.t_last = time.perf_counter()
        self.i_last = int(start)  # a resumed stage: seconds per step count from the step it resumed at
        self.losses: list[float] = []

    def step(self, i: int, loss: float | None = None) -> None:
        if loss is not None:
            self.losses.append(float(loss))
        if (i + 1) % self.every == 0 or i + 1 == self.total:
            now = time.perf_counter()
            n = max(1, i + 1 - self.i_last)
            recent = self.losses[-n:] if loss is not None else []
            text = f" loss {sum(recent) / len(recent):.4f}" if recent else ""
            log.info("%s: %d/%d%s (%.2f s each)", self.what, i + 1, self.total, text, (now - self.t_last) / n)
            self.t_last, self.i_last = now, i + 1

    def fifths(self) -> tuple[float, float]:
        k = max(1, len(self.losses) // 5)
        return float(np.mean(self.losses[:k])), float(np.mean(self.losses[-k:]))


# ------------------------------------------------------------------------------------------------ VAE
def face_crops(data: ImageSet, idx: torch.Tensor, crop: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``crop`` px windows of the images ``idx``, each holding (as much as fits of) its face at a random place,
    and per-pixel loss weights: 1 + 4 on the face box expanded 1.5x (faces are a few percent of the pixels but
    all of the identity)."""
    R = data.images.shape[-1]
    xs, ws = [], []
    for i in idx.tolist():
        x0, y0, x1, y1 = data.boxes[i].tolist()
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        jx, jy = (float(v) for v in (torch.rand(2, generator=generator) - 0.5) * crop * 0.8)
        ox = int(min(max(round(cx + jx - crop / 2), 0), R - crop))
        oy = int(min(max(round(cy + jy - crop / 2), 0), R - crop))
        xs.append(data.images[i, :, oy:oy + crop, ox:ox + crop])
        w = torch.ones(1, crop, crop)
        hx, hy = (x1 - x0) * 0.75, (y1 - y0) * 0.75
        fx0, fx1 = int(max(cx - hx - ox, 0)), int(min(cx + hx - ox, crop))
        fy0, fy1 = int(max(cy - hy - oy, 0)), int(min(cy + hy - oy, crop))
        if fx1 > fx0 and fy1 > fy0:
            w[:, fy0:fy1, fx0:fx1] += 4.0
        ws.append(w)
    return signed_from_uint8(torch.stack(xs)), torch.stack(ws)


def train_vae(vae, data: ImageSet, *, steps: int, batch_size: int, lr: float, crop: int, kl_weight: float,
              generator: torch.Generator, parts: str = "all") -> dict:
    """Face-weighted reconstruction (MSE + L1, see :func:`face_crops`) plus a small KL term, on ``crop`` px crops
    around the faces, Adam with cosine decay. ``parts="decoder"`` trains the decoder alone (the encoder, and so every
    latent a UNet learned from, stays as it is)."""
    if parts not in ("all", "decoder"):
        raise ValueError(f"train_vae(parts={parts!r}): use 'all' or 'decoder'")
    vae.train().requires_grad_(parts == "all")
    if parts == "decoder":
        vae.decoder.requires_grad_(True)
        vae.post_quant_conv.requires_grad_(True)
    trained = [q for q in vae.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps))
    n, R = len(data), data.images.shape[-1]
    crop = min(int(crop), R)
    device = vae.device  # the images stay in host memory; each batch goes to the VAE's device
    prog = Progress("base VAE", steps)
    for i in range(int(steps)):
        idx = torch.randint(0, n, (batch_size,), generator=generator)
        x, w = (v.to(device) for v in face_crops(data, idx, crop, generator))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=None)).sample
        err = rec - x
        loss = ((err * err + 0.5 * err.abs()) * w).sum() / (w.sum() * 3) + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        sched.step()
        prog.step(i, loss.item())
    vae.eval().requires_grad_(False)
    first, last = prog.fifths()
    return {"vae_steps": int(steps), "vae_loss_first_fifth": round(first, 5), "vae_loss_last_fifth": round(last, 5),
            **({"parts": parts} if parts != "all" else {})}


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Posterior parameters (mean and log-variance) of every image, float16 to halve the memory, in host memory
    whatever the VAE's device."""
    out = [vae.encode(signed_from_uint8(images[i:i + batch_size]).to(vae.device)).latent_dist.parameters.half().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def set_latent_scale(vae, moments: torch.Tensor) -> float:
    """SD practice: scale latents to unit standard deviation (measured on the posterior means)."""
    mean = moments[:, : moments.shape[1] // 2].float()
    scale = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    return scale


@torch.no_grad()
def reconstruction_mse(vae, data: ImageSet, count: int = 64, batch_size: int = 64) -> dict[str, float]:
    """Mean squared error of the VAE round trip (in [-1, 1] pixels) over the first ``count`` images, whole and over
    the face boxes alone."""
    total, face, face_px, n = 0.0, 0.0, 0.0, min(int(count), len(data))
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)
        x = signed_from_uint8(data.images[i:j]).to(vae.device)
        err = ((vae.decode(vae.encode(x).latent_dist.mean).sample - x) ** 2).cpu()
        mask = torch.zeros_like(err[:, :1])
        for k, (x0, y0, x1, y1) in enumerate(data.boxes[i:j].tolist()):
            mask[k, :, int(y0):int(math.ceil(y1)), int(x0):int(math.ceil(x1))] = 1.0
        total += float(err.sum())
        face += float((err * mask).sum())
        face_px += float(mask.sum()) * 3
    return {"image": total / (n * data.images[0].numel()), "face": face / face_px}


# ------------------------------------------------------------------------------------------------ UNet
def choose_captions(full: Sequence[str], free: Sequence[str], probs: Mapping[str, float], generator: torch.Generator) -> list[str]:
    """Per sample: the full caption, the identity-free one, the generic prompt or the empty prompt, with ``probs``
    (keys ``full``, ``no_identity``, ``generic``, ``empty``; they must sum to 1)."""
    kinds = ("full", "no_identity", "generic", "empty")
    p = torch.tensor([float(probs[k]) for k in kinds])
    if abs(float(p.sum()) - 1.0) > 1e-6 or bool((p < 0).any()):
        raise ValueError(f"caption probabilities {dict(probs)} must be >= 0 and sum to 1")
    pick = torch.multinomial(p, len(full), replacement=True, generator=generator).tolist()
    return [(full[i], free[i], GENERIC_PROMPT, "")[k] for i, k in enumerate(pick)]


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Loss weights that cap the low-noise steps' share (Hang et al., 2023, "min-SNR").

    epsilon: ``min(SNR, gamma) / SNR``. v: ``min(SNR + 1, gamma) / (SNR + 1)``: the v loss weighs the x0 error by
    SNR + 1, so this caps that weight at gamma for low-noise steps and leaves the high-noise steps, where the
    layout of the image is decided, at full weight (the paper's v variant, min(SNR, gamma) / (SNR + 1), would
    scale them down to almost 0)."""
    a = alphas_cumprod[t]
    snr = a / (1 - a).clamp(min=1e-8)
    if prediction_type == "v_prediction":
        return torch.clamp(snr + 1, max=gamma) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


def head_weights(boxes: torch.Tensor, image_size: int, latent_size: int, face_weight: float, expand: float = 1.6) -> torch.Tensor:
    """(N, 1, L, L) per-latent-pixel loss weights ``1 + face_weight * coverage``, where coverage is the fraction of
    each latent pixel inside the face box scaled by ``expand`` about its centre (the head with its hair), so a face
    smaller than a latent pixel still counts in proportion. Normalised to mean 1 per image, so the loss keeps its
    scale and only its share moves toward the heads (the part of a picture a short schedule leaves as a blob)."""
    b = boxes.float()
    c, half = (b[:, :2] + b[:, 2:]) / 2, (b[:, 2:] - b[:, :2]) * expand / 2
    lo, hi = (c - half) * latent_size / image_size, (c + half) * latent_size / image_size  # in latent pixels
    grid = torch.arange(latent_size, dtype=torch.float32)
    cover = (torch.minimum(hi[:, :, None], grid + 1) - torch.maximum(lo[:, :, None], grid)).clamp(min=0)  # (N, x|y, L)
    w = 1 + face_weight * (cover[:, 1, :, None] * cover[:, 0, None, :])
    return (w / w.mean(dim=(1, 2), keepdim=True))[:, None]


def train_unet(bb, moments: torch.Tensor, data: ImageSet, *, steps: int, batch_size: int, lr: float, weight_decay: float,
               ema_decay: float, min_snr_gamma: float, caption_probs: Mapping[str, float], generator: torch.Generator,
               checkpoint: str | None = None, checkpoint_every: int = 500, timestep_shift: float = 1.0, face_weight: float = 0.0,
               what: str = "base UNet") -> dict:
    """Noise prediction on in-memory latents; the UNet and the text encoder learn together, from whatever weights
    ``bb`` holds. Returns stats; the backbone holds the EMA weights afterwards.

    ``checkpoint``: a file the stage's state is saved to every ``checkpoint_every`` steps and resumed from.
    ``timestep_shift``: see :func:`sample_timesteps`. ``face_weight``: extra loss weight on the heads, see
    :func:`head_weights` (0: every latent pixel alike)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.training_utils import EMAModel

    unet, te = bb.unet, bb.text_encoder
    unet.train().requires_grad_(True)
    te.train().requires_grad_(True)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps))
    ema = EMAModel(params, decay=ema_decay, use_ema_warmup=True, power=2 / 3)
    noise_sched = bb.noise_scheduler()
    acp = noise_sched.alphas_cumprod.float()
    kind = noise_sched.config.prediction_type
    scale = float(bb.vae.config.scaling_factor)
    device = unet.device  # latents, noise and timesteps are drawn on the host (so a seed gives the same run anywhere), then moved
    start, losses = 0, []
    if checkpoint and os.path.exists(checkpoint):
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        unet.load_state_dict(state["unet"])
        te.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        ema.load_state_dict(state["ema"])
        ema.to(device)
        generator.set_state(state["generator"])
        start, losses = int(state["step"]), list(state["losses"])
        log.info("%s: resumed from %s at step %d", what, checkpoint, start)
    n = len(data)
    prog = Progress(what, steps, start=start)
    prog.losses = losses
    for i in range(start, int(steps)):
        idx = torch.randint(0, n, (batch_size,), generator=generator)
        z = DiagonalGaussianDistribution(moments[idx].float()).sample(generator) * scale
        noise = torch.randn(z.shape, generator=generator)
        t = sample_timesteps(batch_size, noise_sched.config.num_train_timesteps, timestep_shift, generator)
        snr_w = min_snr_weights(acp, t, min_snr_gamma, kind).to(device) if min_snr_gamma > 0 else None
        z, noise, t = z.to(device), noise.to(device), t.to(device)
        caps = choose_captions([data.captions[k] for k in idx.tolist()], [data.captions_no_identity[k] for k in idx.tolist()],
                               caption_probs, generator)
        ids = bb.tokenizer(caps, padding="max_length", max_length=bb.tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").input_ids.to(device)
        pred = unet(noise_sched.add_noise(z, noise, t), t, encoder_hidden_states=te(ids)[0], return_dict=False)[0]
        target = noise if kind == "epsilon" else noise_sched.get_velocity(z, noise, t)
        err = F.mse_loss(pred, target, reduction="none")
        if face_weight > 0:
            err = err * head_weights(data.boxes[idx], data.images.shape[-1], z.shape[-1], face_weight).to(device)
        per_sample = err.mean(dim=(1, 2, 3))
        loss = (per_sample * snr_w).mean() if snr_w is not None else per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        prog.step(i, per_sample.mean().item())
        if checkpoint and ((i + 1) % checkpoint_every == 0) and i + 1 < steps:
            tmp = checkpoint + ".tmp"
            torch.save({"unet": unet.state_dict(), "text_encoder": te.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "ema": ema.state_dict(), "generator": generator.get_state(), "step": i + 1, "losses": prog.losses}, tmp)
            os.replace(tmp, checkpoint)
    ema.copy_to(params)
    unet.eval().requires_grad_(False)
    te.eval().requires_grad_(False)
    first, last = prog.fifths()
    return {"unet_steps": int(steps), "unet_loss_first_fifth": round(first, 5), "unet_loss_last_fifth": round(last, 5),
            "ema_decay": ema_decay, "min_snr_gamma": min_snr_gamma, "timestep_shift": timestep_shift,
            **({"face_weight": face_weight} if face_weight > 0 else {})}


def _warmup_cosine(steps: int, warmup_frac: float = 0.03, floor: float = 0.1) -> Callable[[int], float]:
    warm = max(1, int(steps * warmup_frac))

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        p = min(1.0, (i - warm) / max(1, steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))

    return factor


# ------------------------------------------------------------------------------------------------ sampling
@torch.no_grad()
def sample_base(bb, prompts: Sequence[str], *, steps: int = 30, guidance: float = 5.0, seed: int = 0,
                batch_size: int = 16, scheduler: str = "ddim") -> torch.Tensor:
    """Text-to-image with the base alone (classifier-free guidance; ``scheduler`` one of ``SAMPLERS``, DDIM by
    default): (N, 3, R, R) in [-1, 1]."""
    out = []
    R = bb.unet.config.sample_size
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        k = len(chunk)
        sched = bb.sampling_scheduler(scheduler)
        sched.set_timesteps(steps)
        text = bb.encode_text([""] * k + chunk)
        g = torch.Generator().manual_seed(int(seed) + start)  # host noise: the same samples on any device
        lat = torch.randn((k, bb.latent_channels, R, R), generator=g).to(bb.unet.device) * sched.init_noise_sigma
        step_noise = torch.Generator().manual_seed(int(seed) + start + 1)  # a stochastic sampler's per-step noise
        lat = denoise_latents(bb, sched, lat, sched.timesteps, text.embeds, guidance, step_noise)
        out.append(bb.decode_latents(lat).float().cpu())
    return torch.cat(out)


def denoise_latents(bb, sched, lat: torch.Tensor, timesteps, embeds: torch.Tensor, guidance: float,
                    step_noise: torch.Generator) -> torch.Tensor:
    """The base's sampling loop over ``timesteps`` from ``lat``, with classifier-free guidance: ``embeds`` holds the
    empty prompt's embeddings for the first half of the batch, the prompts' for the second."""
    for t in timesteps:
        x = sched.scale_model_input(torch.cat([lat, lat]), t)
        eps = bb.unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
        e_none, e_text = eps.chunk(2)
        lat = sampler_step(sched, e_none + guidance * (e_text - e_none), t, lat, step_noise)
    return lat


def vae_round_trip(vae, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """uint8 images through a VAE (the base's ``bb.vae``: encode to the posterior mean, decode): what generated images
    look like."""
    out = []
    for i in range(0, len(images), batch_size):
        x = signed_from_uint8(images[i:i + batch_size]).to(vae.device)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(uint8_from_signed(rec.float().cpu()))
    return torch.cat(out)
