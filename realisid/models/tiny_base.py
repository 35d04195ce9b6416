"""Train the embedded default's tiny base text-to-image model on the synthetic faces.

The branches should learn on top of a base that already draws faces, as they would on SD1.5. So the tiny
random backbone is trained once, here: first the VAE (reconstruction + a small KL), its latent scale set
from the data, then the UNet and text encoder on the noise-prediction loss. The result is saved as a
diffusers folder and from then on loaded by path like any real backbone, frozen.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from realisid.models.backbone import build_tiny_backbone, save_backbone

log = logging.getLogger(__name__)


def load_images(urls: Sequence[str], resolution: int) -> tuple[torch.Tensor, list[str]]:
    """All images of the shards as one (N, 3, R, R) tensor in [-1, 1] plus their captions."""
    import webdataset as wds

    from realisid.data.pipeline import crop_resized, skip_bad_tar, to_tensor
    from realisid.data.shards import SampleError, decode_sample
    from realisid.geometry import square_window

    images, captions = [], []
    for raw in wds.WebDataset(list(urls), shardshuffle=False, handler=skip_bad_tar, empty_check=False):
        try:
            s = decode_sample(raw)
        except SampleError as err:
            log.warning("tiny base: skipped %s", err)
            continue
        img = s["image"]
        images.append(to_tensor(crop_resized(img, square_window(img.width, img.height, s["meta"]["bbox"]), resolution)))
        captions.append(s["meta"].get("caption") or "")
    return torch.stack(images), captions


def train_tiny_base(model_cfg: Mapping[str, Any], base_cfg: Mapping[str, Any], urls: Sequence[str], resolution: int,
                    out_dir: str, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    t0 = time.time()
    bb = build_tiny_backbone(model_cfg["tiny"], seed)
    images, captions = load_images(urls, resolution)
    n, bs, lr = len(images), int(base_cfg["batch_size"]), float(base_cfg["lr"])
    g = torch.Generator().manual_seed(seed)

    # 1. VAE
    vae = bb.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae_losses = []
    for _ in tqdm(range(int(base_cfg["vae_steps"])), desc="tiny base: VAE", leave=False):
        x = images[torch.randint(0, n, (bs,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        vae_losses.append(loss.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        mus = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, n, 256)])
        scale = float(1.0 / mus.std())
        vae.register_to_config(scaling_factor=scale)
        recon = F.mse_loss(vae.decode(mus[:64]).sample, images[:64]).item()

    # 2. UNet + text encoder
    unet, te = bb.unet.train().requires_grad_(True), bb.text_encoder.train().requires_grad_(True)
    sched = bb.noise_scheduler()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    steps = int(base_cfg["unet_steps"])
    warm = max(1, steps // 20)  # linear warm-up over 5% of steps, then cosine decay to 10%
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * (0.55 + 0.45 * math.cos(math.pi * min(1.0, i / max(1, steps)))))
    latents_all = mus * scale
    unet_losses = []
    for _ in tqdm(range(steps), desc="tiny base: UNet", leave=False):
        idx = torch.randint(0, n, (bs,), generator=g)
        z = latents_all[idx]
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (bs,), generator=g)
        caps = [captions[i] if torch.rand(1, generator=g).item() > 0.1 else "" for i in idx.tolist()]
        ids = bb.tokenizer(caps, padding="max_length", max_length=bb.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        pred = unet(sched.add_noise(z, noise, t), t, encoder_hidden_states=te(ids)[0], return_dict=False)[0]
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        unet_losses.append(loss.item())
    unet.eval(), te.eval()
    save_backbone(bb, out_dir)
    fifth = max(1, steps // 5)
    stats = {
        "images": n, "seconds": round(time.time() - t0, 1), "vae_recon_mse": round(recon, 5), "latent_scale": round(scale, 4),
        "unet_loss_first_fifth": round(sum(unet_losses[:fifth]) / fifth, 4),
        "unet_loss_last_fifth": round(sum(unet_losses[-fifth:]) / fifth, 4),
    }
    log.info("tiny base model (stand-in for SD1.5) trained on %d synthetic images in %.0fs: VAE recon MSE %.4f, "
             "UNet loss %.4f -> %.4f; saved to %s", n, stats["seconds"], recon, stats["unet_loss_first_fifth"],
             stats["unet_loss_last_fifth"], out_dir)
    return stats
