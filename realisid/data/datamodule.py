"""The LightningDataModule: webdataset training stream, fixed validation examples."""
from __future__ import annotations

import logging
from typing import Any, Mapping

import lightning as L
import torch
from torch.utils.data import DataLoader



from realisid.data.batch import collate
from realisid.data.cache_format import check_cache
from realisid.data.example import ExampleMaker
from realisid.data.stream import TrainStream, load_examples, resolve_shards
from realisid.interrupts import leave_interrupts_to_parent

log = logging.getLogger(__name__)


class FaceDataModule(L.LightningDataModule):
    def __init__(self, data_cfg: Mapping[str, Any], *, vae_scale_factor: int, local_latent_size: int, crop_expand: float,
                 id_image_size: int, soft_location: bool = False, seed: int = 0, precomputed_for: dict | None = None):
        super().__init__()
        self.cfg = data_cfg
        self.seed = seed
        self.precomputed_for = precomputed_for  # what a data.precomputed cache must have been made for
        self.maker = ExampleMaker(
            embed_dim=data_cfg.get("embed_dim"), resolution=int(data_cfg["resolution"]), vae_scale_factor=vae_scale_factor,
            local_latent_size=local_latent_size, crop_expand=crop_expand, id_image_size=id_image_size, soft_location=soft_location)
        self.val_examples: list[dict] | None = None
        # data position, saved in checkpoints: raw samples used per stream, batches used in all
        self.consumed: dict[int, int] = {}
        self.batches_used = 0

    def setup(self, stage: str | None = None) -> None:
        if self.cfg.get("precomputed"):
            self.train_urls = check_cache(str(self.cfg["precomputed"]), self.precomputed_for or {})
            log.info("training on precomputed latents and text embeddings from %s", self.cfg["precomputed"])
        else:
            self.train_urls = resolve_shards(self.cfg["train_shards"], "data.train_shards")
        if self.cfg.get("val_shards") and self.val_examples is None:
            urls = resolve_shards(self.cfg["val_shards"], "data.val_shards")
            self.val_examples = load_examples(urls, self.maker, int(self.cfg["val_samples"]))
            log.info("validation: %d fixed examples from %d shards", len(self.val_examples), len(urls))

    def _world(self) -> tuple[int, int]:
        t = getattr(self, "trainer", None)
        return (t.world_size, t.global_rank) if t is not None else (1, 0)

    def train_dataloader(self):
        world, rank = self._world()
        workers = int(self.cfg["num_workers"])
        stream = TrainStream(self.train_urls, self.maker, batch_size=int(self.cfg["batch_size"]), shuffle_buffer=int(self.cfg["shuffle_buffer"]),
                             seed=self.seed, rank=rank, world_size=world, num_workers=workers, resampled=bool(self.cfg["resampled"]),
                             consumed=self.consumed, offset=self.batches_used % max(1, workers))
        return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available(), worker_init_fn=leave_interrupts_to_parent if workers else None)

    def note_batch(self, batch: dict) -> None:
        """Record that a training step used ``batch`` (called after the step)."""
        self.consumed[int(batch["data_stream"])] = int(batch["data_consumed"])
        self.batches_used += 1

    def state_dict(self) -> dict:
        return {"consumed": dict(self.consumed), "batches_used": self.batches_used}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = {int(k): int(v) for k, v in state.get("consumed", {}).items()}
        self.batches_used = int(state.get("batches_used", 0))

    def val_dataloader(self):
        if not self.val_examples:
            return []
        return DataLoader(self.val_examples, batch_size=int(self.cfg["batch_size"]), shuffle=False, collate_fn=collate, num_workers=0)
