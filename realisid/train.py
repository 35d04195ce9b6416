"""``realisid train``: prepare (embedded default), build the parts from config, fit, export.

A run lives in ``runs/<experiment>/<timestamp>/``: ``config.yaml`` (the merged config), ``checkpoints/``,
``tb/`` (TensorBoard), ``samples/`` (validation grids) and ``export/`` (the trained branches in diffusers format).
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import time

import lightning as L
from omegaconf import DictConfig, OmegaConf

from realisid.callbacks import (BatchCounter, DataPosition, HeldOutLoss, LossSummary, ProgressLog, SaveOnInterrupt, ScaleMetrics,
                                ValidationImages)
from realisid.config import apply_overrides, save_config
from realisid.data.cache_format import cache_info
from realisid.data.datamodule import FaceDataModule
from realisid.machine import describe_machine
from realisid.modules import build_module
from realisid.prepare import prepare_embedded_default, wait_for_prepared

log = logging.getLogger(__name__)


RUN_DIR_ENV = "REALISID_RUN_DIR"


def env_rank() -> int:
    """This process's global rank as launchers announce it (0 before any launcher ran)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 0


def shared_run_dir(cfg: DictConfig) -> str:
    """The run directory every rank of a job agrees on.

    ``REALISID_RUN_DIR`` wins (ranks that Lightning launches inherit it from rank 0); under SLURM or torchrun
    the job id names it; a lone process makes a new timestamped one.
    """
    if os.environ.get(RUN_DIR_ENV):
        return os.environ[RUN_DIR_ENV]
    job = os.environ.get("SLURM_JOB_ID") or (os.environ.get("TORCHELASTIC_RUN_ID") if os.environ.get("TORCHELASTIC_RUN_ID") not in (None, "none") else None)
    if job:
        return os.path.join(cfg.experiment.runs_dir, cfg.experiment.name, f"job-{job}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("several ranks were launched but none says which run directory to share; "
                         f"set {RUN_DIR_ENV}=runs/<exp>/<name> for every rank (or use torchrun --rdzv-id / SLURM)")
    return new_run_dir(cfg)


def new_run_dir(cfg: DictConfig) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(cfg.experiment.runs_dir, cfg.experiment.name, stamp)
    n = 1
    while os.path.exists(path):
        path = os.path.join(cfg.experiment.runs_dir, cfg.experiment.name, f"{stamp}-{n}")
        n += 1
    return path


def build_datamodule(cfg: DictConfig, module):
    return FaceDataModule(cfg.data, vae_scale_factor=module.backbone.vae_scale_factor, local_latent_size=int(cfg.model.local.latent_size),
                          crop_expand=float(cfg.model.local.crop_expand), id_image_size=int(cfg.model.id_encoder.image_size),
                          soft_location=bool(cfg.model["global"].soft_location), seed=int(cfg.experiment.seed),
                          precomputed_for=cache_info(module.backbone, cfg) if cfg.data.get("precomputed") else None)


RESULT_FILE = "result.yaml"  # what train() returned, beside the run's config


def run_result(run_dir: str) -> dict:
    """A run's ``result.yaml`` (what :func:`train` returned) as a dict; {} when the run has none."""
    path = os.path.join(run_dir, RESULT_FILE)
    return dict(OmegaConf.to_container(OmegaConf.load(path))) if os.path.exists(path) else {}


def machine_history(before: str | None, now: str) -> str:
    """What a run was trained on: this machine, or the earlier one(s) then this one when a resume moved it."""
    if not before or before == now or before.endswith("; then " + now):
        return before or now
    return f"{before}; then {now}"


def resume_config(run_dir: str, overrides=()) -> DictConfig:
    """The saved config of ``run_dir`` (plus overrides, e.g. a larger trainer.max_steps) for resuming it."""

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise FileNotFoundError(f"RESUME={run_dir}: no config.yaml there; give a run directory like runs/local_branch/<timestamp>")
    ckpt = os.path.join(run_dir, "checkpoints", "last.ckpt")
    if not os.path.exists(ckpt):
        raise FileNotFoundError(f"RESUME={run_dir}: no checkpoints/last.ckpt yet; the run stopped before its first checkpoint, start it again")
    return apply_overrides(OmegaConf.load(path), list(overrides))


def training_callbacks(cfg: DictConfig, run_dir: str) -> list:
    """The callbacks every training step runs with (validation and checkpoint callbacks come on top)."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    return [DataPosition(), BatchCounter(run_dir), LearningRateMonitor(logging_interval="step")]


def build_trainer(cfg: DictConfig, run_dir: str, callbacks: list, **overrides) -> L.Trainer:
    """The Trainer `realisid train` runs (benchmarks/throughput.py times this same one)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    import sys

    tr = cfg.trainer
    logger = TensorBoardLogger(save_dir=run_dir, name="tb", version="", default_hp_metric=False)
    bar = bool(tr.enable_progress_bar) and sys.stderr.isatty()  # to a file or pipe a bar puts every update on one line
    if bool(tr.enable_progress_bar) and not bar:
        callbacks = [*callbacks, ProgressLog(int(tr.max_steps))]
    kwargs = dict(
        max_steps=int(tr.max_steps), accelerator=tr.accelerator, devices=tr.devices, num_nodes=int(tr.num_nodes),
        strategy=tr.strategy, precision=tr.precision, val_check_interval=int(tr.val_check_interval), check_val_every_n_epoch=None,
        log_every_n_steps=int(tr.log_every_n_steps), accumulate_grad_batches=int(tr.accumulate_grad_batches),
        gradient_clip_val=float(tr.gradient_clip_val) or None, callbacks=callbacks, logger=logger, default_root_dir=run_dir,
        enable_progress_bar=bar, num_sanity_val_steps=0,
        limit_val_batches=max(1, -(-int(cfg.data.val_samples) // int(cfg.data.batch_size))))
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def train(cfg: DictConfig, run_dir: str | None = None, resume: str | None = None) -> dict:
    """Train the experiment, or resume ``resume`` (a run dir) from its last checkpoint; returns paths and the loss summary."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import warnings

    # the frozen backbone is in eval mode on purpose; say so once instead of Lightning's warning
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    t0 = time.time()
    rank = env_rank()
    prepared = prepare_embedded_default(cfg) if rank == 0 else wait_for_prepared(cfg)
    L.seed_everything(int(cfg.experiment.seed), workers=True)
    run_dir = resume or run_dir or shared_run_dir(cfg)
    os.makedirs(run_dir, exist_ok=True)
    if rank == 0:
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    ckpt_path = os.path.join(run_dir, "checkpoints", "last.ckpt") if resume else None
    module = build_module(cfg)
    dm = build_datamodule(cfg, module)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    summary, held_out = LossSummary(), HeldOutLoss()
    interrupt = SaveOnInterrupt(os.path.join(ckpt_dir, "last.ckpt"))
    v = cfg.validation
    callbacks = [
        *training_callbacks(cfg, run_dir),
        interrupt,
        # one last.ckpt: SaveOnInterrupt writes it too, which would otherwise make this callback write last-v1.ckpt
        ModelCheckpoint(dirpath=ckpt_dir, filename="step-{step:06d}", auto_insert_metric_name=False, save_last=True, enable_version_counter=False,
                        every_n_train_steps=int(cfg.trainer.checkpoint_every_n_steps), save_top_k=-1),
        ValidationImages(os.path.join(run_dir, "samples"), int(v.num_images), int(v.steps), float(v.guidance_text),
                         float(v.guidance_id), float(v.id_delay)),
        summary,
        held_out,
    ]
    e = cfg.evaluation
    if int(e.every_n_validations) > 0:
        callbacks.append(ScaleMetrics(cfg, int(e.every_n_validations), int(e.per_bin), int(e.steps)))
    trainer = build_trainer(cfg, run_dir, callbacks)
    log.info("identity encoder: %s | backbone: %s", module.id_encoder.name, module.backbone.name)
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = run_dir  # ranks that Lightning launches from here write into the same run
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    except SIGTERMException:
        pass  # SaveOnInterrupt wrote last.ckpt
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous
    result = {"run_dir": run_dir, "tensorboard": os.path.join(run_dir, "tb"), "checkpoint": os.path.join(ckpt_dir, "last.ckpt"),
              "samples": os.path.join(run_dir, "samples"), "prepared": prepared, **summary.summary(),
              **held_out.summary()}
    result["global_step"] = trainer.global_step
    result["machine"] = machine_history(run_result(run_dir).get("machine") if resume else None, describe_machine(host=False))
    if interrupt.interrupted:
        result["interrupted"] = f"{interrupt.interrupted} at step {trainer.global_step}; resume with `make train RESUME={run_dir}`"
    elif trainer.is_global_zero:
        result["export"] = os.path.join(run_dir, "export")
        module.export(result["export"])
    result["seconds"] = round(time.time() - t0, 1)
    if trainer.is_global_zero:
        OmegaConf.save(OmegaConf.create({k: v for k, v in result.items() if k != "prepared"}), os.path.join(run_dir, RESULT_FILE))
    return result
