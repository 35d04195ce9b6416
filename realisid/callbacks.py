"""Lightning callbacks: validation image grid, loss summary, export at the end of training."""
from __future__ import annotations

import logging
import os

import lightning as L
import torch
import torch.nn.functional as F

from realisid.evaluation import Case, build_evaluator, compute_all
from realisid.geometry import bins_from_config, face_size, scale_bin
from realisid.interrupts import StopRequest
from realisid.pipeline import Person

log = logging.getLogger(__name__)


class ValidationImages(L.Callback):
    """After each validation: a grid per example (reference | guidance | location | sample | ground truth).

    Logged to TensorBoard as ``val/samples`` and written to RUN_DIR/samples/step-NNNNNN.png.
    """

    def __init__(self, out_dir: str, num_images: int, steps: int, guidance_text: float, guidance_id: float, id_delay: float):
        self.out_dir, self.num_images, self.steps = out_dir, num_images, steps
        self.guidance_text, self.guidance_id, self.id_delay = guidance_text, guidance_id, id_delay

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.num_images <= 0:
            return
        examples = (trainer.datamodule.val_examples or [])[: self.num_images] if trainer.datamodule else []
        if not examples:
            return
        from torchvision.utils import make_grid, save_image

        pipe = module.pipeline()
        rows = []
        R = int(module.cfg.data.resolution)
        for i, ex in enumerate(examples):
            person = Person(box=ex["face_box"].tolist(), id_image=ex["id_image"], id_mask=ex["id_mask"], kps=ex["kps"].numpy())
            out = pipe(ex["caption"], [person], num_inference_steps=self.steps, guidance_text=self.guidance_text,
                       guidance_id=self.guidance_id, id_delay=self.id_delay, seed=i, output_type="pt")
            sample = out.images[0].cpu()

            def up(x):
                return F.interpolate(x[None].float(), size=(R, R), mode="bilinear", align_corners=False)[0]

            loc = ex["loc_map"].expand(3, -1, -1) * 2 - 1
            rows += [up(ex["id_image"]), up(ex["pe_map"] * 2 - 1), loc, sample, ex["image"]]
        grid = (make_grid(torch.stack(rows), nrow=5, padding=2, pad_value=1.0) + 1) / 2
        step = trainer.global_step
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"step-{step:06d}.png")
        save_image(grid, path)
        if trainer.logger is not None and hasattr(trainer.logger.experiment, "add_image"):
            trainer.logger.experiment.add_image("val/samples (reference|guidance|location|sample|real)", grid, step)


class ProgressLog(L.Callback):
    """Sparse progress lines for logs and pipes, where a progress bar would write every update into one huge line:
    about 20 per run (step, loss, seconds per step, time left)."""

    def __init__(self, max_steps: int, lines: int = 20):
        self.max_steps = int(max_steps)
        self.every = max(1, self.max_steps // max(1, lines))
        self._t = None
        self._step = 0

    def on_train_start(self, trainer, module) -> None:
        import time

        self._t, self._step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        import time

        step = trainer.global_step
        if step == self._step or (step % self.every and step != self.max_steps):
            return
        now = time.perf_counter()
        per = (now - self._t) / max(1, step - self._step)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        text = f" loss {float(loss):.4f}" if loss is not None else ""
        log.info("step %d/%d%s (%.2f s/step, about %.0f s left)", step, self.max_steps, text, per, per * (self.max_steps - step))
        self._t, self._step = now, step


class LossSummary(L.Callback):
    """Keeps every training loss; at the end reports the mean over the first and the last fifth of steps."""

    def __init__(self):
        self._losses: list = []  # device scalars, read back only when asked: no GPU sync per step

    @property
    def losses(self) -> list[float]:
        self._losses = [float(v) for v in self._losses]
        return self._losses

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs  # None: a skipped batch
        if loss is not None:
            self._losses.append(loss.detach())

    def summary(self) -> dict:
        n = len(self.losses)
        if n < 5:
            return {"steps": n}
        k = n // 5
        return {"steps": n, "loss_first_fifth": sum(self.losses[:k]) / k, "loss_last_fifth": sum(self.losses[-k:]) / k}

    def state_dict(self) -> dict:
        return {"losses": self.losses}

    def load_state_dict(self, state: dict) -> None:
        self._losses = list(state.get("losses", []))


class HeldOutLoss(L.Callback):
    """The validation loss before the first step and after every validation, and the identity use beside it.

    The training loss's first and last fifth compare different data, noise and timesteps (and every run with
    the same seed draws the same ones), so on a frozen base whose loss barely moves they can rise while the
    branches learn. The held-out loss compares the same validation samples under the same noise
    (:meth:`RealisIDModule.held_out_loss`), so its change is the model's. The identity use
    (:meth:`RealisIDModule.identity_use`) is how much worse the face loss gets when each held-out sample is given
    another identity's reference: 0 for branches that ignore the identity tokens (and before training, where the
    branches' zero convolutions add nothing), above 0 once they carry identity. The step-0 values are computed
    here, before training, with the weights the run starts from; a resumed run keeps the ones it had. Under DDP,
    Lightning's validation splits the set over ranks (other batches, other noise seeds), so there the step-0 values
    and the later ones are comparable only in expectation.
    """

    def __init__(self):
        self.history: list[tuple[int, float]] = []  # (global step, loss)
        self.use: list[tuple[int, float, float]] = []  # (global step, face loss own reference, other identity's)

    @torch.no_grad()
    def on_train_start(self, trainer: L.Trainer, module) -> None:
        if self.history or trainer.global_step > 0 or trainer.datamodule is None:
            return
        was_training = module.training
        module.eval()
        total, count = 0.0, 0  # loss x samples, samples
        own, other, use_count = 0.0, 0.0, 0
        for i, batch in enumerate(trainer.datamodule.val_dataloader()):
            batch = module.on_before_batch_transfer(batch, 0)
            batch = module.on_after_batch_transfer(module.transfer_batch_to_device(batch, module.device, 0), 0)
            n = len(batch["caption"])
            total, count = total + float(module.held_out_loss(batch, i)["loss"]) * n, count + n
            use = module.identity_use(batch, i)
            if use is not None:
                own, other = own + float(use["face_mse_own_ref"]) * n, other + float(use["face_mse_other_ref"]) * n
                use_count += n
        module.train(was_training)
        if count:  # every rank reads the whole validation set here (no sampler), so all agree without a reduce
            self.history.append((0, total / count))
            log.info("held-out loss before training: %.4f (%d samples, fixed noise)", total / count, count)
        if use_count:
            self.use.append((0, own / use_count, other / use_count))

    def on_validation_end(self, trainer: L.Trainer, module) -> None:
        metrics = trainer.callback_metrics
        value = metrics.get("val_loss")
        if trainer.sanity_checking or value is None:
            return
        if self.history and self.history[-1][0] == trainer.global_step:
            return
        step = int(trainer.global_step)
        self.history.append((step, float(value)))
        own, other = metrics.get("val/face_mse_own_ref"), metrics.get("val/face_mse_other_ref")
        if own is not None and other is not None:
            self.use.append((step, float(own), float(other)))
            log.info("identity use at step %d: held-out face loss %.5f with the own reference, %.5f with another "
                     "identity's (%+.1f%%)", step, float(own), float(other), 100 * identity_use(float(own), float(other)))

    def summary(self) -> dict:
        out = {}
        if len(self.history) >= 2:
            (s0, v0), (s1, v1) = self.history[0], self.history[-1]
            out.update(val_loss_first=v0, val_loss_first_step=s0, val_loss_last=v1, val_loss_last_step=s1)
        if self.use:
            step, own, other = self.use[-1]
            out.update(id_use_step=step, id_use=identity_use(own, other), id_use_face_mse_own=own, id_use_face_mse_other=other)
        return out

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self.history], "use": [list(u) for u in self.use]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [(int(s), float(v)) for s, v in state.get("history", [])]
        self.use = [(int(s), float(a), float(b)) for s, a, b in state.get("use", [])]


def identity_use(own: float, other: float) -> float:
    """The relative rise of the held-out face loss when the reference is another identity's: (other - own) / own."""
    return (other - own) / own if own > 0 else float("nan")


class DataPosition(L.Callback):
    """Tells the datamodule which batches training used, so checkpoints record the data position."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "note_batch") and "data_stream" in batch:
            dm.note_batch(batch)


class SaveOnInterrupt(L.Callback):
    """SIGTERM or Ctrl-C: write ``last.ckpt`` at the next optimizer-step boundary and stop.

    The signal handlers only note the request (:class:`realisid.interrupts.StopRequest`); at each step boundary
    the ranks agree whether any of them was asked to stop (one boolean all-reduce under DDP), so every rank saves
    and stops at the same step whichever of them the signal reached first. The checkpoint never holds a
    half-applied optimizer step or a half-accumulated gradient. A second Ctrl-C interrupts at once.
    DataLoader workers ignore both signals (:func:`realisid.interrupts.leave_interrupts_to_parent`), so a signal to
    the whole process group cannot kill them under the main process.
    """

    def __init__(self, ckpt_path: str):
        self.ckpt_path = ckpt_path
        self.interrupted: str | None = None
        self.request = StopRequest(lambda why: log.warning("%s: saving a checkpoint after this step and stopping%s", why,
                                                           " (press Ctrl-C again to abort now)" if why == "SIGINT" else ""))

    def on_train_start(self, trainer, module) -> None:
        self.request.install()  # after Lightning's own SIGTERM handler, which would start collectives inside the handler

    def _save(self, trainer, why: str) -> None:
        self.interrupted = why
        trainer.save_checkpoint(self.ckpt_path)
        log.warning("%s at step %d: saved %s; resume with `make train RESUME=<run dir>`", why, trainer.global_step, self.ckpt_path)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.interrupted or (batch_idx + 1) % max(1, int(trainer.accumulate_grad_batches)):
            return  # mid-accumulation: not a step boundary
        asked = self.request.reason is not None
        if trainer.world_size > 1:
            asked = trainer.strategy.reduce_boolean_decision(asked, all=False)  # any rank asked: all stop here
        if asked:
            self._save(trainer, f"stopped by {self.request.reason or 'a signal to another rank'}")
            trainer.should_stop = True

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and not self.interrupted:  # Lightning's handler, before ours was installed
            self._save(trainer, "stopped by SIGTERM")

    def on_train_end(self, trainer, module) -> None:
        self.request.restore()

    def teardown(self, trainer, module, stage: str) -> None:
        self.request.restore()


class BatchCounter(L.Callback):
    """Counts the training batches each rank ran and writes ``batches-rank<R>.json`` in the run dir."""

    def __init__(self, run_dir: str):
        self.run_dir, self.count = run_dir, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.count += 1

    def on_train_end(self, trainer, module) -> None:
        import json

        with open(os.path.join(self.run_dir, f"batches-rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"rank": trainer.global_rank, "world_size": trainer.world_size, "batches": self.count,
                       "global_step": trainer.global_step}, f)


class ScaleMetrics(L.Callback):
    """Every N validations: sample a fixed, seeded validation set spanning all face-size bins and log every
    metric per bin (``val_metrics/<metric>/<bin>``) plus an image grid per bin (reference | sample).

    Cases are split over ranks and the torchmetrics states are summed, so values are exact under DDP.
    """

    def __init__(self, cfg, every_n_validations: int, per_bin: int, steps: int):
        self.cfg, self.every, self.per_bin, self.steps = cfg, int(every_n_validations), int(per_bin), int(steps)
        self._evaluator = None
        self._validations = 0

    def cases(self, examples):
        bins = bins_from_config(self.cfg.bins)
        chosen = {b: [] for b in bins}
        for ex in examples:
            b = scale_bin(face_size(ex["face_box"].tolist(), ex["image"].shape[-1], ex["image"].shape[-2]), bins)
            if len(chosen[b]) < self.per_bin:
                chosen[b].append(ex)
        out = []
        for b, exs in chosen.items():
            for i, ex in enumerate(exs):
                out.append(Case(prompt=str(self.cfg.evaluation.prompt), boxes=[ex["face_box"].tolist()], id_images=[ex["id_image"]], id_masks=[ex["id_mask"]],
                                identities=[ex["identity"]], seed=i, tags={"bin": b}))
        return out

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, module) -> None:
        if trainer.sanity_checking or self.every <= 0:
            return
        self._validations += 1
        if self._validations % self.every:
            return
        examples = trainer.datamodule.val_examples if trainer.datamodule is not None else None
        if not examples:
            return

        if self._evaluator is None:
            self._evaluator = build_evaluator(self.cfg, module.id_encoder.name)
        ev = self._evaluator
        cases = self.cases(examples)
        mine = cases[trainer.global_rank :: trainer.world_size]
        metrics = {k: m.to("cpu") for k, m in ev.new_metrics().items()}
        if trainer.is_global_zero:  # the real side once, not once per rank
            ev.add_real(metrics, [e["image"] for e in examples], [e["face_box"].tolist() for e in examples])
        v = self.cfg.validation
        _, images = ev.evaluate(module.pipeline(), mine, metrics, sample_kwargs={
            "num_inference_steps": self.steps, "guidance_text": float(v.guidance_text), "guidance_id": float(v.guidance_id),
            "id_delay": float(v.id_delay)})
        values = compute_all(metrics)  # syncs over ranks when distributed
        if trainer.is_global_zero and trainer.logger is not None:
            trainer.logger.log_metrics({f"val_metrics/{k}": val for k, val in values.items() if val == val}, step=trainer.global_step)
            exp = trainer.logger.experiment
            if hasattr(exp, "add_image"):
                from torchvision.utils import make_grid

                R = images[0].shape[-1] if images else 0
                for b in ev.bins:
                    tiles = []
                    for case, img in zip(mine, images):
                        if case.tags["bin"] == b:
                            ref = F.interpolate(case.id_images[0][None].float(), size=(R, R), mode="bilinear", align_corners=False)[0]
                            tiles += [ref, img]
                    if tiles:
                        exp.add_image(f"val_bins/{b} (reference|sample)", (make_grid(torch.stack(tiles), nrow=2, pad_value=1.0) + 1) / 2,
                                      trainer.global_step)
        log.info("scale metrics at step %d: %s", trainer.global_step,
                 ", ".join(f"{k}={values[k]:.3f}" for k in sorted(values) if k.startswith("id_sim/") and values[k] == values[k]))
