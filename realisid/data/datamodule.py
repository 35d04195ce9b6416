"""The LightningDataModule: webdataset training stream, fixed validation examples."""
from __future__ import annotations

import logging
from typing import Any, Mapping

import lightning as L
import torch
from torch.utils.data import DataLoader

from realisid.data.pipeline import ExampleMaker, collate, load_examples, resolve_shards, train_dataset

log = logging.getLogger(__name__)


class FaceDataModule(L.LightningDataModule):
    def __init__(self, data_cfg: Mapping[str, Any], *, vae_scale_factor: int, local_latent_size: int, crop_expand: float,
                 id_image_size: int, soft_location: bool = False, seed: int = 0):
        super().__init__()
        self.cfg = data_cfg
        self.seed = seed
        self.maker = ExampleMaker(
            embed_dim=data_cfg.get("embed_dim"), resolution=int(data_cfg["resolution"]), vae_scale_factor=vae_scale_factor,
            local_latent_size=local_latent_size, crop_expand=crop_expand, id_image_size=id_image_size, soft_location=soft_location)
        self.val_examples: list[dict] | None = None

    def setup(self, stage: str | None = None) -> None:
        self.train_urls = resolve_shards(self.cfg["train_shards"], "data.train_shards")
        if self.cfg.get("val_shards") and self.val_examples is None:
            urls = resolve_shards(self.cfg["val_shards"], "data.val_shards")
            self.val_examples = load_examples(urls, self.maker, int(self.cfg["val_samples"]))
            log.info("validation: %d fixed examples from %d shards", len(self.val_examples), len(urls))

    def _world(self) -> tuple[int, int]:
        t = getattr(self, "trainer", None)
        return (t.world_size, t.global_rank) if t is not None else (1, 0)

    def train_dataloader(self):
        import webdataset as wds

        world, rank = self._world()
        workers = int(self.cfg["num_workers"])
        ds = train_dataset(self.train_urls, self.maker, batch_size=int(self.cfg["batch_size"]),
                           shuffle_buffer=int(self.cfg["shuffle_buffer"]), batches_per_epoch=int(self.cfg["batches_per_epoch"]),
                           num_workers=workers, resampled=bool(self.cfg["resampled"]), world_size=world,
                           seed=self.seed + 1000 * rank)
        return wds.WebLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                             pin_memory=torch.cuda.is_available())

    def val_dataloader(self):
        if not self.val_examples:
            return []
        return DataLoader(self.val_examples, batch_size=int(self.cfg["batch_size"]), shuffle=False, collate_fn=collate, num_workers=0)
