"""The RealisID training loss: the pure functions and :class:`DiffusionLoss`, which the training step delegates to."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


FACE_NORMS = ("image", "face")


def check_face_norm(norm: str) -> str:
    if norm not in FACE_NORMS:
        raise ValueError(f"model.loss.face_norm={norm!r}; use one of {FACE_NORMS}")
    return norm


def face_term(err: torch.Tensor, face_mask: torch.Tensor, norm: str = "image") -> torch.Tensor:
    """The face term of a squared error ``err`` (B, C, h, w) under ``face_mask`` (B, 1, h, w, fractional coverage at
    the box border), as a mean over:

    - ``image`` (the paper's ``||(eps_hat - eps) * c_loc||^2``): all elements, so a face's weight grows with its
      area; at 128 px a 24 px face (at 512 scale) covers 0.2% of the latent and a 192 px one 14%, a 70x spread;
    - ``face``: per sample the face's own (mask^2-weighted) elements, then the batch, so every face weighs the same
      whatever its size (a sample without a face adds 0).
    """
    w = face_mask.float() ** 2
    if check_face_norm(norm) == "image":
        return (err * w).mean()
    per_sample = (err * w).flatten(1).sum(1)
    area = w.flatten(1).sum(1) * err.shape[1]          # the mask broadcasts over the channels
    return (per_sample / area.clamp_min(1e-8)).mean()


def face_weighted_mse(pred: torch.Tensor, target: torch.Tensor, face_mask: torch.Tensor, face_lambda: float,
                      norm: str = "image") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``||eps_hat - eps||^2 + lambda * face term`` (:func:`face_term` under ``norm``), the first as a mean over all
    elements. ``face_mask`` is (B, 1, h, w) at latent resolution. Returns (total, full-image term, face term)."""
    err = (pred.float() - target.float()) ** 2
    full = err.mean()
    face = face_term(err, face_mask, norm)
    return full + face_lambda * face, full, face


def latent_mask(loc_map: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Location map (B,1,R,R) to latent resolution by area averaging (coverage fraction per latent pixel)."""
    return F.interpolate(loc_map.float(), size=latent_hw, mode="area")


def diffusion_inputs(alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisy latent ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` and the training target, both in fp32.

    Computed in fp32 whatever the backbone's dtype (as diffusers' training scripts do): in bf16, 1 - a_t rounds
    to 0 at t = 0 and dozens of small timesteps get a noise scale off by more than 1%. The caller casts ``x_t``
    to the UNet's dtype. ``prediction_type``: ``epsilon`` (target eps) or ``v_prediction``
    (target ``sqrt(a_t) eps - sqrt(1 - a_t) x_0``).
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"scheduler prediction_type={prediction_type!r}; RealisID trains epsilon or v_prediction backbones")
    a = alphas_cumprod.to(latents.device, torch.float32)[timesteps].view(-1, *([1] * (latents.ndim - 1)))
    x0, eps = latents.float(), noise.float()
    signal, sigma = a.sqrt(), (1.0 - a).sqrt()
    noisy = signal * x0 + sigma * eps
    target = eps if prediction_type == "epsilon" else signal * eps - sigma * x0
    return noisy, target


class DiffusionInputs(NamedTuple):
    noise: torch.Tensor      # eps, fp32
    timesteps: torch.Tensor  # t per sample (int64)
    noisy: torch.Tensor      # x_t, fp32 (the caller casts it to the UNet's dtype)
    target: torch.Tensor     # eps or v, fp32


def check_timestep_shift(shift: float) -> float:
    """A timestep shift must be a finite number > 0 (1: uniform timesteps, the paper's and diffusers' training)."""
    value = float(shift)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"timestep shift {shift} must be a number > 0 (model.loss.timestep_shift or pretrain's "
                         "timestep_shift): 1 draws training timesteps uniformly, 3 puts 3/4 of them in the noisier half")
    return value


def sample_timesteps(n: int, num_train_timesteps: int, shift: float, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` training timesteps on ``device``. ``shift`` 1: uniform (``torch.randint``, as diffusers' scripts draw
    them). ``shift`` s > 1 moves them toward high noise as SD3's resolution shift does, t = T * s u / (1 + (s - 1) u)
    for uniform u: a fraction s / (s + 1) of them lands in the noisier half, where a sample's layout (and, for the
    branches, the person drawn from noise) is decided; s < 1 moves them toward low noise."""
    shift = check_timestep_shift(shift)
    if shift == 1:
        return torch.randint(0, num_train_timesteps, (n,), generator=generator, device=device)
    u = torch.rand(n, generator=generator, device=device)
    shifted = shift * u / (1 + (shift - 1) * u)
    return (shifted * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


class DiffusionLoss:
    """The training objective as one object (in the manner of sgm's ``loss_fn``): what the UNet is given and what
    its prediction is scored against.

    :meth:`inputs` draws the noise, then the timesteps, from ``generator`` on ``device`` (in that order: a
    resumed run draws the same) and builds x_t and the target in fp32 (:func:`diffusion_inputs`); calling the
    object scores a prediction as :func:`face_weighted_mse` does, over the location map at latent resolution
    (tests hold the two equal).
    """

    def __init__(self, num_train_timesteps: int, prediction_type: str, face_lambda: float, face_norm: str = "image",
                 timestep_shift: float = 1.0):
        self.face_norm = check_face_norm(face_norm)  # a bad value fails when the module is built
        self.num_train_timesteps = int(num_train_timesteps)
        self.prediction_type = prediction_type
        self.face_lambda = float(face_lambda)
        self.timestep_shift = check_timestep_shift(timestep_shift)

    def inputs(self, latents: torch.Tensor, alphas_cumprod: torch.Tensor, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, uniform: bool = False) -> DiffusionInputs:
        """``uniform``: draw the timesteps uniformly whatever ``timestep_shift`` trains with (held-out losses, so
        that they compare across runs trained with different shifts)."""
        device = latents.device if device is None else device
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
        t = sample_timesteps(latents.shape[0], self.num_train_timesteps, 1.0 if uniform else self.timestep_shift, generator, device)
        noisy, target = diffusion_inputs(alphas_cumprod, latents, noise, t, self.prediction_type)
        return DiffusionInputs(noise, t, noisy, target)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, loc_map: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"loss", "mse", "face_mse"}`` of ``pred`` against ``target``, the face weighted by ``loc_map``.

        ``face_mse`` is always the paper's face term (a mean over the whole latent), whatever ``face_norm`` trains:
        the logged values and the identity use (which compares it across runs) keep one meaning. With
        ``face_norm=face`` the term the loss uses is added as ``face_mse_per_face``."""
        mask = latent_mask(loc_map, tuple(target.shape[-2:]))
        err = (pred.float() - target.float()) ** 2     # as face_weighted_mse, computed once for both face terms
        full = err.mean()
        face = face_term(err, mask, self.face_norm)
        out = {"loss": full + self.face_lambda * face, "mse": full}
        if self.face_norm == "image":
            return {**out, "face_mse": face}
        return {**out, "face_mse": face_term(err, mask, "image"), "face_mse_per_face": face}


# ---- the identity loss (optional: model.loss.id_lambda) ------------------------------------------------------
def predicted_x0(alphas_cumprod: torch.Tensor, noisy: torch.Tensor, pred: torch.Tensor, timesteps: torch.Tensor,
                 prediction_type: str) -> torch.Tensor:
    """The clean latent the prediction implies, in fp32: the inverse of :func:`diffusion_inputs` given x_t.

    ``v_prediction``: ``x0 = sqrt(a_t) x_t - sqrt(1 - a_t) v``; ``epsilon``: ``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``
    (unstable where a_t is near 0, so the identity loss only uses small timesteps)."""
    a = alphas_cumprod.to(noisy.device, torch.float32)[timesteps].view(-1, *([1] * (noisy.ndim - 1)))
    x_t, p = noisy.float(), pred.float()
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1.0 - a).sqrt() * p
    if prediction_type == "epsilon":
        return (x_t - (1.0 - a).sqrt() * p) / a.sqrt().clamp_min(1e-4)
    raise ValueError(f"scheduler prediction_type={prediction_type!r}; RealisID trains epsilon or v_prediction backbones")


def ddim_step(alphas_cumprod: torch.Tensor, x_t: torch.Tensor, pred: torch.Tensor, t: int, t_prev: int,
              prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM step (eta 0) from timestep ``t`` to ``t_prev`` (-1: to the clean latent), in fp32:
    ``(x_{t_prev}, x0)``. The noise the prediction implies is re-applied at ``t_prev``'s level, so with a perfect
    prediction the step lands on the same x0 at the lower noise. Differentiable in ``x_t`` and ``pred``."""
    a = alphas_cumprod.to(x_t.device, torch.float32)[int(t)]
    a_prev = alphas_cumprod.to(x_t.device, torch.float32)[int(t_prev)] if t_prev >= 0 else torch.ones((), device=x_t.device)
    x, p = x_t.float(), pred.float()
    if prediction_type == "v_prediction":
        x0, eps = a.sqrt() * x - (1.0 - a).sqrt() * p, (1.0 - a).sqrt() * x + a.sqrt() * p
    elif prediction_type == "epsilon":
        x0, eps = (x - (1.0 - a).sqrt() * p) / a.sqrt().clamp_min(1e-4), p
    else:
        raise ValueError(f"scheduler prediction_type={prediction_type!r}; RealisID trains epsilon or v_prediction backbones")
    return a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * eps, x0


def identity_crop_boxes(face_boxes: torch.Tensor, width: int, height: int, expand: float) -> torch.Tensor:
    """Square boxes (B, 4) float around ``face_boxes`` (B, 4) in pixels: the side ``expand`` times the box's long
    side (at most the image's short side), centred on the face, then shifted to lie inside the image; what
    :func:`realisid.images.identity_crop` cuts, without its rounding to whole pixels. On the boxes' device."""
    b = face_boxes.float()
    side = ((b[:, 2:] - b[:, :2]).amax(1) * expand).clamp(1.0, float(min(width, height)))
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    x0 = torch.minimum((cx - side / 2).clamp_min(0.0), width - side)
    y0 = torch.minimum((cy - side / 2).clamp_min(0.0), height - side)
    return torch.stack([x0, y0, x0 + side, y0 + side], 1)


def crop_faces(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """``boxes`` (B, 4) of ``images`` (B, C, H, W) resampled to ``size`` x ``size`` (bilinear, averaging the
    pixels a larger box covers, as an antialiased resize does), differentiable in the images."""
    from torchvision.ops import roi_align

    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None], boxes], 1)
    return roi_align(images, rois.to(images.dtype), output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def identity_cosine(embedded: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine of two identity features, (B,) ; token sequences (B, N, D) are averaged over N first."""
    e = embedded.float().mean(1) if embedded.ndim == 3 else embedded.float()
    r = reference.float().mean(1) if reference.ndim == 3 else reference.float()
    return F.cosine_similarity(e, r.to(e.device), dim=-1)


def identity_loss(cosine: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` averaged over the samples with weight > 0 (weights 0/1: small timestep and identity kept); 0
    when no sample counts, so the term never divides by zero."""
    w = weight.float()
    return ((1.0 - cosine) * w).sum() / w.sum().clamp_min(1.0)
