"""The training modules: frozen backbone and identity encoder, trainable projector and branch(es).

``training_step`` is a few lines; everything it calls is built from config. As in sgm's ``DiffusionEngine``,
the module delegates: ``self.conditioner`` (:class:`~realisid.modules.conditioner.Conditioner`) turns a batch
into text and identity conditioning, ``self.loss_fn`` (:class:`~realisid.modules.losses.DiffusionLoss`) draws
the noise and timesteps and scores the prediction. Both are plain objects, so the state-dict keys are the
parts' own (``backbone.``, ``id_encoder.``, ``projector.``, ``local_branch.``, ``global_branch.``).

The subclasses only say which branches they train: LocalBranchModule (the paper's "w/o global"),
GlobalBranchModule ("w/o local") and JointModule (both, residuals summed into one UNet forward).
"""
from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from realisid.data.batch import ready_batch, unpack_batch
from realisid.models.backbone import load_backbone
from realisid.models.branches import GlobalBranch, LocalBranch, add_residuals
from realisid.models.id_encoder import IdProjector, build_id_encoder
from realisid.modules.conditioner import Conditioner, other_identity_order, with_identity_free_captions, with_references_of
from realisid.modules.efficiency import apply_efficiency, check_precision
from realisid.images import ID_CROP_EXPAND, centred_mask
from realisid.modules.losses import (DiffusionLoss, crop_faces, ddim_step, identity_cosine, identity_crop_boxes, identity_loss,
                                     predicted_x0)
from realisid.pipeline import RealisIDPipeline

if TYPE_CHECKING:
    from realisid.modules.ema import WeightEMA

log = logging.getLogger(__name__)
FROZEN_PREFIXES = ("backbone.", "id_encoder.")
HOST_BOXES = "crop_box_host"  # the crop boxes as a list of ints, kept on the host


class RealisIDModule(L.LightningModule):
    branches: tuple[str, ...] = ()

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)})
        self.strict_loading = False  # checkpoints hold only trainable weights (see on_save_checkpoint)
        m = cfg.model
        self.backbone = load_backbone(m, seed=cfg.experiment.seed)
        # base UNet parameters trained with the branches (model.unet_train; empty: the paper's frozen base)
        self.unet_train = unfreeze_unet(self.backbone.unet, list(m.get("unet_train") or []), str(m.backbone_dtype))
        self.id_encoder = build_id_encoder(m.id_encoder)
        self.projector = IdProjector(self.id_encoder.embed_dim, int(m.id_tokens), self.backbone.cross_attention_dim,
                                     sequence=self.id_encoder.sequence)
        self.local_branch = self.global_branch = None
        init = bool(m.init_from_unet)
        if "local" in self.branches:
            self.local_branch = _load_or_init(LocalBranch, m.local.get("init_from"), lambda: LocalBranch.from_unet(
                self.backbone.unet, 3, m.local.conditioning_embedding_out_channels, init,
                latent_size=m.local.latent_size, upsample=m.local.upsample))
        if "global" in self.branches:
            self.global_branch = _load_or_init(GlobalBranch, m["global"].get("init_from"), lambda: GlobalBranch.from_unet(
                self.backbone.unet, 1, m["global"].conditioning_embedding_out_channels, init,
                soft_location=m["global"].soft_location))
        self.noise_scheduler = self.backbone.noise_scheduler()
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone().float(), persistent=False)
        sched = self.noise_scheduler.config
        # a run saved before face_norm existed trained with the paper's term: its config.yaml has no key
        self.loss_fn = DiffusionLoss(sched.num_train_timesteps, sched.prediction_type, float(m.loss.face_lambda),
                                     str(m.loss.get("face_norm", "image")), float(m.loss.get("timestep_shift", 1.0)))
        self.id_lambda = float(m.loss.get("id_lambda", 0.0))   # the identity loss (off unless set; see shared_step)
        self.id_max_t = int(m.loss.get("id_max_t", 400))
        if self.id_lambda < 0 or not 0 < self.id_max_t <= sched.num_train_timesteps:
            raise ValueError(f"model.loss.id_lambda={self.id_lambda} / id_max_t={self.id_max_t}; give id_lambda >= 0 and "
                             f"0 < id_max_t <= {sched.num_train_timesteps} (the scheduler's training timesteps)")
        self.id_mode = str(m.loss.get("id_mode", "x0"))
        self.id_samples, self.id_sample_steps = int(m.loss.get("id_samples", 4)), int(m.loss.get("id_sample_steps", 4))
        if self.id_mode not in ("x0", "sampled"):
            raise ValueError(f"model.loss.id_mode={self.id_mode!r}; valid: x0 (the step's own x0 prediction), sampled (images "
                             "drawn from noise with gradients)")
        if self.id_samples < 1 or not 1 <= self.id_sample_steps <= sched.num_train_timesteps:
            raise ValueError(f"model.loss.id_samples={self.id_samples} / id_sample_steps={self.id_sample_steps}; give at least 1 "
                             "of each (4 and 4 cost about one more training step's compute)")
        if self.id_lambda > 0 and not self.id_encoder.differentiable:
            self.id_encoder.embed_with_grad(torch.zeros(0))  # raises, naming the encoder and the fix
        self.conditioner = Conditioner(self)  # a plain object: the parts stay registered here (same state-dict keys)
        check_precision(m.backbone_dtype, cfg.trainer.precision, cfg.trainer.accelerator)
        self.ema: WeightEMA | None = None
        self.channels_last = False
        self.applied = apply_efficiency(self, cfg.efficiency, m.backbone_dtype)  # sets ema and channels_last
        self._nonfinite: torch.Tensor | None = None       # non-finite losses since the last optimizer step (no host read)
        self._nonfinite_loss: torch.Tensor | None = None

    def branch_residuals(self, noisy, t, tokens, batch, added=None):
        parts = []
        if self.local_branch is not None:
            f = self.backbone.vae_scale_factor
            host = batch.get(HOST_BOXES)  # read on the host before the transfer: the step never reads the device
            boxes = [[v // f for v in b] for b in host] if host is not None else batch["crop_box"] // f
            parts.append(self.local_branch(noisy, t, tokens, batch["pe_map"], boxes, added))
        if self.global_branch is not None:
            loc = self.global_branch.fit_location(batch["loc_map"], noisy.shape[-1])
            parts.append(self.global_branch(noisy, t, tokens, loc, added))
        return add_residuals(*parts)

    def denoise(self, noisy, t, text_embeds, added, tokens, batch):
        """The frozen UNet's prediction with the branches' residuals (from ``batch``'s guidance maps and boxes)."""
        res = self.branch_residuals(noisy, t, tokens, batch, added)
        return self.backbone.unet(noisy, t, encoder_hidden_states=text_embeds, added_cond_kwargs=added,
                                  down_block_additional_residuals=res[0] if res else None,
                                  mid_block_additional_residual=res[1] if res else None, return_dict=False)[0]

    def on_before_batch_transfer(self, batch, dataloader_idx: int = 0):
        """The crop boxes as a host list, read while the batch is still on the host (the local branch cuts and
        pastes with them: reading them from the device would stall every step)."""
        if isinstance(batch, dict):
            boxes = unpack_batch(batch).get("crop_box")
            if isinstance(boxes, torch.Tensor):
                batch[HOST_BOXES] = boxes.tolist()
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        """The training stream ships one packed buffer with uint8 pixels; here, on the device, it becomes the
        batch the step reads (views of the buffer, pixels in float): one transfer, a quarter of the bytes."""
        return ready_batch(batch) if isinstance(batch, dict) else batch

    # ---- the step -----------------------------------------------------------------------------------
    def shared_step(self, batch: dict, generator: torch.Generator | None = None, dropout: bool = True,
                    id_term: bool = False, held_out: bool = False) -> dict[str, torch.Tensor]:
        """One diffusion training forward. With a precomputed batch (latents, text embeddings, identity features,
        host-side crop boxes) it reads nothing back from the device, so it can be compiled and never stalls the GPU.

        ``id_term`` (the training step, when ``model.loss.id_lambda`` > 0) adds the identity loss: ``id_lambda *
        (1 - cos)`` between the conditioning encoder's features of the face in the decoded x0 prediction and of the
        reference (:meth:`identity_similarity`). Held-out losses leave it out, so they compare across runs, and
        ``held_out`` draws their timesteps uniformly whatever ``model.loss.timestep_shift`` trains with."""
        device_gen = _device_gen(generator, self.device)  # latents, noise and timesteps; ``generator``: dropout
        latents = self.batch_latents(batch, device_gen)
        x = self.loss_fn.inputs(latents, self.alphas_cumprod, device_gen, self.device, uniform=held_out)  # x_t, target in fp32
        noisy = x.noisy.to(self.backbone.unet.dtype)  # only the UNet's input is cast to its dtype
        if self.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        image_hw = tuple(s * self.backbone.vae_scale_factor for s in latents.shape[-2:])
        text, tokens = self.conditioner(batch, image_hw, generator, dropout)
        pred = self.denoise(noisy, x.timesteps, text.embeds, text.added_cond_kwargs, tokens, batch)
        out = self.loss_fn(pred, x.target, batch["loc_map"])
        if id_term and self.id_lambda > 0:
            cos = (self.sampled_identity_similarity(batch, tokens, tuple(latents.shape[1:]), image_hw, generator)
                   if self.id_mode == "sampled" else self.identity_similarity(x, pred, batch, tokens))
            id_loss = identity_loss(cos, torch.ones_like(cos))
            out = {**out, "loss": out["loss"] + self.id_lambda * id_loss, "id_loss": id_loss}
        return out

    def identity_similarity(self, x, pred: torch.Tensor, batch: dict, tokens: torch.Tensor) -> torch.Tensor:
        """The cosine between the conditioning encoder's features of the face in the predicted clean image (x0 from
        the prediction, decoded by the frozen VAE, the face box cut as references are cut) and the reference's
        features, with gradients to the prediction, for the samples where it counts: timestep below
        ``model.loss.id_max_t`` (where x0 is sharp enough to hold a face) and identity not dropped (empty when none).
        Only those are decoded (the VAE decoder is the loss's cost): one read of the selection from the device per
        step. The encoder is the conditioning one: the benchmark judges with another (``evaluation.encoder``)."""
        kept = tokens.detach().flatten(1).abs().amax(1) > 0     # dropped identities get zero tokens
        sel = torch.nonzero(kept & (x.timesteps.to(kept.device) < self.id_max_t)).flatten()
        if sel.numel() == 0:
            return pred.new_zeros(0, dtype=torch.float32)
        x0 = predicted_x0(self.alphas_cumprod, x.noisy[sel], pred[sel], x.timesteps[sel], self.noise_scheduler.config.prediction_type)
        return self._face_cosine(x0, batch, sel, tokens)

    def _face_cosine(self, x0: torch.Tensor, batch: dict, sel: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """x0 latents of the samples ``sel`` decoded by the frozen VAE, each face box cut as references are cut and
        embedded by the conditioning encoder, against the reference's features; with gradients to ``x0``."""
        images = self.backbone.decode_with_grad(x0).float()
        size = int(self.id_encoder.image_size)
        boxes = identity_crop_boxes(batch["face_box"].to(images.device)[sel], images.shape[-1], images.shape[-2], ID_CROP_EXPAND)
        crops = crop_faces(images, boxes, size)
        mask = torch.from_numpy(centred_mask(size)).to(crops.device, crops.dtype)[None, None]
        embedded = self.id_encoder.embed_with_grad(crops.to(self.dtype), mask)
        return identity_cosine(embedded, self.conditioner.identity_features(batch)[sel.to(tokens.device)])

    def sample_timesteps(self) -> list[int]:
        """The ``id_sample_steps`` DDIM timesteps of ``id_mode=sampled``, trailing spacing: from the last training
        timestep (pure noise under the zero-terminal-SNR schedule) down, e.g. [999, 749, 499, 249]."""
        n, k = int(self.noise_scheduler.config.num_train_timesteps), self.id_sample_steps
        return [int(round(n - 1 - i * n / k)) for i in range(k)]

    def sampled_identity_similarity(self, batch: dict, tokens: torch.Tensor, latent_chw: tuple[int, ...],
                                    image_hw: tuple[int, int], generator: torch.Generator | None) -> torch.Tensor:
        """``model.loss.id_mode=sampled``, PuLID's idea: the first ``id_samples`` samples whose identity was kept are
        drawn from pure noise with the identity-free caption, their reference and their boxes, in ``id_sample_steps``
        DDIM steps of the UNet with the branches (no guidance), gradients through every step; the cosine of the
        face drawn against the reference (:meth:`_face_cosine`). The identity must come from the reference, as in the
        benchmark. The noise comes from a stream seeded off ``generator`` after the step's own draws, so the
        diffusion loss draws exactly what it draws without this term. One read of the selection from the device."""
        kept = tokens.detach().flatten(1).abs().amax(1) > 0     # dropped identities get zero tokens
        sel = torch.nonzero(kept).flatten()[: self.id_samples]
        if sel.numel() == 0:
            return tokens.new_zeros(0, dtype=torch.float32)
        rows = sel.tolist()
        n = len(batch["caption"])
        every = torch.ones(n, dtype=torch.bool)
        text = self.conditioner.text_conditioning(batch, every, image_hw, every)
        added = {k: v[sel] for k, v in text.added_cond_kwargs.items()} if text.added_cond_kwargs else None
        sub = {k: batch[k][sel.to(batch[k].device)] for k in ("pe_map", "loc_map", "crop_box")}
        if batch.get(HOST_BOXES) is not None:
            sub[HOST_BOXES] = [batch[HOST_BOXES][i] for i in rows]
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator)) if generator is not None else 0
        z = torch.randn((len(rows), *latent_chw), generator=torch.Generator().manual_seed(seed)).to(self.device)
        steps, prediction = self.sample_timesteps(), self.noise_scheduler.config.prediction_type
        for i, t in enumerate(steps):
            noisy = z.to(self.backbone.unet.dtype)
            tt = torch.full((len(rows),), t, device=self.device, dtype=torch.long)
            pred = self.denoise(noisy, tt, text.embeds[sel], added, tokens[sel], sub)
            z, x0 = ddim_step(self.alphas_cumprod, z, pred, t, steps[i + 1] if i + 1 < len(steps) else -1, prediction)
        return self._face_cosine(x0, batch, sel, tokens)

    def batch_latents(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """The batch's latents: sampled from the precomputed VAE posterior (the VAE does not run), else encoded."""
        if "latent_moments" in batch:
            return self.backbone.latents_from_moments(batch["latent_moments"], generator)
        return self.backbone.encode_images(batch["image"], generator=generator)

    def step_generator(self, batch_idx: int) -> torch.Generator:
        """Noise, timesteps and dropout of a step depend only on (seed, step, micro-batch, rank): a resumed run
        draws the same, and no two ranks or micro-batches share a stream (see :func:`step_seed`)."""
        accum = max(1, int(self.trainer.accumulate_grad_batches)) if self._trainer is not None else 1
        return torch.Generator().manual_seed(step_seed(int(self.cfg.experiment.seed), self.global_step, batch_idx % accum, self.global_rank))

    def training_step(self, batch: dict, batch_idx: int):
        """The loss, always returned: a non-finite one is dealt with before the optimizer step (see
        :meth:`on_before_optimizer_step`), where every rank takes the same decision."""
        out = self.shared_step(batch, generator=self.step_generator(batch_idx), id_term=True)
        bad = (~torch.isfinite(out["loss"].detach())).float()
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite + bad  # summed over accumulated micro-batches
        loss = out["loss"].detach()  # kept for the message: the first non-finite one, else the latest
        prev = self._nonfinite_loss
        self._nonfinite_loss = loss if prev is None else torch.where(torch.isfinite(prev), loss, prev)
        self.log_dict({f"train/{k}": v for k, v in out.items()}, prog_bar=False, batch_size=len(batch["caption"]))
        self.log("loss", out["loss"], prog_bar=True, logger=False)
        if "skipped" in batch:  # per-stream running count of unusable samples, see ExampleMaker
            self.log("data/skipped_samples", float(max(batch["skipped"])))  # a list of ints: no device sync
        return out["loss"]

    def on_before_optimizer_step(self, optimizer) -> None:
        """Non-finite losses: the flag is summed over ranks (every rank joins the all-reduce, so DDP stays in
        step), then all ranks stop together (``trainer.nonfinite_loss=stop``) or all skip the update together
        (``skip``: the gradients are dropped, so the optimizer leaves every weight as it was). The one host read
        of the step happens here, after backward."""
        flag, loss = self._nonfinite, self._nonfinite_loss
        self._nonfinite = self._nonfinite_loss = None
        if flag is None:
            return
        if self.trainer.world_size > 1:
            flag = self.trainer.strategy.reduce(flag, reduce_op="sum")
        if not bool(flag > 0):
            return
        value = loss.item()
        what = f"non-finite training loss {value}" if not math.isfinite(value) else f"non-finite training loss on another rank than {self.global_rank}"
        msg = f"{what} at step {self.global_step}; lower optim.lr, check the data, or set trainer.nonfinite_loss=skip"
        if self.cfg.trainer.nonfinite_loss != "skip":
            raise FloatingPointError(msg)
        log.warning("skipped batch: %s", msg)
        self.log("train/skipped_nonfinite", 1.0, reduce_fx="sum")
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def held_out_loss(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        """The loss on a validation batch with the same noise, timesteps and no dropout every time it is asked:
        values at different steps compare the same draws, so a change is the model's, not the sampling's. Timesteps
        are uniform (the training shift does not apply), so runs trained with different shifts compare too."""
        g = torch.Generator().manual_seed(int(self.cfg.experiment.seed) * 7919 + batch_idx)
        return self.shared_step(batch, generator=g, dropout=False, held_out=True)

    def identity_use(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor] | None:
        """Whether the branches use the reference: the face loss under the held-out noise, with each sample's
        identity-free caption, once with its own reference and once with another identity's reference
        (:func:`other_identity_order`). A model that ignores the identity tokens scores both the same; one that
        carries identity scores its own reference lower. None when the batch holds a single identity."""
        order = other_identity_order(batch.get("identity"))
        if order is None:
            return None
        free = with_identity_free_captions(batch)
        own = self.held_out_loss(free, batch_idx)["face_mse"]
        other = self.held_out_loss(with_references_of(free, order), batch_idx)["face_mse"]
        return {"face_mse_own_ref": own, "face_mse_other_ref": other}

    def validation_step(self, batch: dict, batch_idx: int):
        out = self.held_out_loss(batch, batch_idx)
        n = len(batch["caption"])
        use = self.identity_use(batch, batch_idx)
        if use is not None:
            out.update(use)
        self.log_dict({f"val/{k}": v for k, v in out.items()}, prog_bar=False, batch_size=n, sync_dist=True)
        self.log("val_loss", out["loss"], prog_bar=True, logger=False, batch_size=n, sync_dist=True)

    # ---- optimisation -------------------------------------------------------------------------------
    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        mods = {"projector": self.projector}
        if self.local_branch is not None:
            mods["local"] = self.local_branch
        if self.global_branch is not None:
            mods["global"] = self.global_branch
        if self.unet_train:
            mods["unet"] = self.backbone.unet   # only its parameters under model.unet_train require grad
        return mods

    def configure_optimizers(self):
        o = self.cfg.optim
        groups = [{"params": [p for name, m in self.trainable_modules().items() if name != "unet"
                              for p in m.parameters() if p.requires_grad], "lr": float(o.lr)}]
        if self.unet_train:
            groups.append({"params": [p for p in self.backbone.unet.parameters() if p.requires_grad], "lr": float(o.unet_lr)})
        opt = torch.optim.AdamW(groups, lr=float(o.lr), weight_decay=float(o.weight_decay), betas=tuple(o.betas))
        warm = max(1, int(o.warmup_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- EMA ----------------------------------------------------------------------------------------
    def optimizer_step(self, *args, **kwargs):
        out = super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # once per optimizer step, so gradient accumulation is respected
            self.ema.update()
        return out

    def averaged_weights(self):
        """Context in which the trainable parts hold their EMA weights (a no-op without EMA)."""
        import contextlib

        return self.ema.averaged() if self.ema is not None else contextlib.nullcontext()

    def on_validation_start(self) -> None:  # validation loss, images and metrics all see the averaged weights
        if self.ema is not None:
            self.ema.swap_in()

    def on_validation_end(self) -> None:  # after every callback's on_validation_end (Lightning calls callbacks first)
        if self.ema is not None:
            self.ema.swap_out()

    STATE_PREFIX = {"projector": "projector.", "local": "local_branch.", "global": "global_branch.", "unet": "backbone.unet."}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            if "realisid_ema" not in checkpoint:
                log.warning("the checkpoint has no EMA state (trained without efficiency.ema); the average starts from its weights")
            else:
                self.ema.load_state_dict(checkpoint["realisid_ema"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep checkpoints to the trainable weights: the frozen backbone is reloaded from its path (the UNet
        parameters under ``model.unet_train`` are trained, so they are kept).

        A checkpoint with non-finite weights is refused, so it never replaces a good one. With EMA, the live
        weights are saved even while the average is swapped in (a save during validation), and the average
        is saved beside them.
        """
        for name, mod in self.trainable_modules().items():
            for pname, p in mod.named_parameters():
                if not torch.isfinite(p).all():
                    raise FloatingPointError(f"refusing to write a checkpoint at step {self.global_step}: {name}.{pname} has NaN/Inf "
                                             "weights; the previous checkpoint is kept")
        sd = checkpoint["state_dict"]
        kept = {"backbone.unet." + n for n in self.unet_train}
        for k in [k for k in sd if k.startswith(FROZEN_PREFIXES) and k not in kept]:
            del sd[k]
        if self.ema is not None:
            sd.update(self.ema.live_state(self.STATE_PREFIX))
            checkpoint["realisid_ema"] = self.ema.state_dict()

    # ---- export -------------------------------------------------------------------------------------
    def export(self, out_dir: str) -> dict[str, str]:
        """Trained parts in diffusers format: each branch a ControlNet folder, the projector in safetensors.

        With EMA the averaged weights are exported.
        """
        with self.averaged_weights():
            return self._export(out_dir)

    def _export(self, out_dir: str) -> dict[str, str]:
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        paths = {}
        for name, branch in (("local", self.local_branch), ("global", self.global_branch)):
            if branch is not None:
                branch.save_pretrained(os.path.join(out_dir, name))
                paths[name] = os.path.join(out_dir, name)
        proj_dir = os.path.join(out_dir, "id_projector")
        os.makedirs(proj_dir, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.projector.state_dict().items()},
                  os.path.join(proj_dir, "model.safetensors"))
        OmegaConf.save(self.cfg, os.path.join(out_dir, "config.yaml"), resolve=True)
        paths["id_projector"] = proj_dir
        if self.unet_train:  # the whole UNet as a diffusers folder: the base's frozen parts plus what this run trained
            self.backbone.unet.save_pretrained(os.path.join(out_dir, "unet"))
            paths["unet"] = os.path.join(out_dir, "unet")
        return paths

    def pipeline(self):
        return RealisIDPipeline.from_module(self)


def unfreeze_unet(unet: torch.nn.Module, prefixes: list[str], backbone_dtype: str) -> list[str]:
    """Let the base UNet's parameters whose names start with one of ``prefixes`` (``model.unet_train``, e.g.
    ``[up_blocks]``) train with the branches; returns their names. A departure from the paper, whose base stays
    frozen: a run that uses it exports its UNet (``export/unet``) and every sample from it is drawn with that UNet."""
    if not prefixes:
        return []
    if backbone_dtype != "fp32":
        raise ValueError(f"model.unet_train={prefixes} with model.backbone_dtype={backbone_dtype}: trained UNet weights in half "
                         "precision lose most updates; set model.backbone_dtype=fp32 (trainer.precision *-mixed still runs it in half)")
    params = dict(unet.named_parameters())
    chosen = []
    for pre in prefixes:
        hit = [n for n in params if n == pre or n.startswith(str(pre).rstrip(".") + ".")]
        if not hit:
            top = sorted({n.split(".")[0] for n in params})
            raise ValueError(f"model.unet_train: no UNet parameter is named {pre!r} or under it; give module paths such as "
                             f"up_blocks or up_blocks.2 (top level: {', '.join(top)})")
        chosen += [n for n in hit if n not in chosen]
    for n in chosen:
        params[n].requires_grad_(True)
    log.info("training %d of the base UNet's parameter tensors with the branches (%s): the base is no longer frozen",
             len(chosen), ", ".join(map(str, prefixes)))
    return chosen


def _load_or_init(cls, path, init):
    """A branch from an export folder, from a training checkpoint (.ckpt), or freshly initialised."""
    if not path:
        return init()
    path = str(path)
    if path.endswith(".ckpt"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"branch init_from='{path}' does not exist; give RUN_DIR/checkpoints/last.ckpt of a run that trained the {cls.kind} branch")
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        prefix = f"{cls.kind}_branch."
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not weights:
            raise ValueError(f"checkpoint '{path}' holds no {cls.kind} branch (no '{prefix}*' weights); it was trained without that branch")
        branch = init()
        branch.load_state_dict(weights)
        log.info("initialising the %s branch from checkpoint %s", cls.kind, path)
        return branch
    if not os.path.isdir(path):
        raise FileNotFoundError(f"branch init_from='{path}' is neither an export folder nor a .ckpt; give RUN_DIR/export/{cls.kind} or RUN_DIR/checkpoints/last.ckpt")
    log.info("initialising the %s branch from %s", cls.kind, path)
    return cls.from_pretrained(path)


def step_seed(seed: int, step: int, micro_batch: int, rank: int) -> int:
    """A 63-bit seed from a hash of (seed, step, micro-batch, rank): distinct streams for every rank and every
    accumulated micro-batch (a linear mix like ``(seed * a + step * b + micro) * 7 + rank`` repeats itself
    once there are 8 ranks and gradient accumulation), and the same on every machine (no salted ``hash``)."""
    import hashlib

    key = f"{int(seed)}:{int(step)}:{int(micro_batch)}:{int(rank)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def _device_gen(generator, device):
    """A generator on ``device`` for the step's latents, noise and timesteps, seeded from the step's (host)
    generator's seed without drawing from it (no tensor read back) and apart from its stream."""
    if generator is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed((generator.initial_seed() ^ 0x5DEECE66D) & (2**63 - 1))
    return g


class LocalBranchModule(RealisIDModule):
    branches = ("local",)


class GlobalBranchModule(RealisIDModule):
    branches = ("global",)


class JointModule(RealisIDModule):
    branches = ("local", "global")


MODULES = {"local": LocalBranchModule, "global": GlobalBranchModule, "joint": JointModule}


def build_module(cfg: DictConfig) -> RealisIDModule:
    kind = cfg.experiment.module
    if kind not in MODULES:
        raise ValueError(f"experiment.module={kind!r}; valid: {', '.join(MODULES)}")
    return MODULES[kind](cfg)
