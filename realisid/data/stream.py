"""The webdataset streams: the infinite, resumable training stream (:class:`TrainStream`) and the fixed
validation list (:func:`load_examples`), both built from shard patterns (:func:`resolve_shards`)."""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch

from realisid.data.batch import finish_batch, stream_collate
from realisid.data.example import ExampleMaker
from realisid.data.shards import check_shards_exist, expand_shards

log = logging.getLogger(__name__)


def skip_bad_tar(exn: Exception) -> bool:
    """webdataset handler: a corrupt tar member or unreadable shard is logged and skipped."""
    log.warning("skipped unreadable shard data: %s: %s", type(exn).__name__, exn)
    return True


def _shuffled(items, bufsize: int, rng):
    """Buffer shuffle driven by ``rng`` only, so the order is a pure function of the seed."""
    buf: list = []
    for x in items:
        buf.append(x)
        if len(buf) >= bufsize:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class TrainStream(torch.utils.data.IterableDataset):
    """The training stream: infinite, deterministic, resumable, equal on every rank.

    Stream ``k`` of rank ``r`` draws shards with ``random.Random(f"{seed}-{r}-{k}")``: with ``resampled``,
    shards are drawn with replacement (any shard count works for any number of ranks); otherwise each
    stream owns every ``world x workers``-th shard and cycles through them in a fresh order each pass,
    which needs at least ranks x workers shards. Raw samples are shuffled in a buffer BEFORE decoding, and
    every batch carries ``data_stream`` and ``data_consumed`` (raw samples that stream has used). To resume,
    each stream skips its consumed raw samples without decoding them, and ``offset`` rotates which worker
    serves which stream so batches arrive in the same order as in an uninterrupted run. The stream never
    ends, so no rank waits on another that ran out of data.
    """

    MAX_FAILED_IN_A_ROW = 1000

    def __init__(self, urls: Sequence[str], maker: ExampleMaker, *, batch_size: int, shuffle_buffer: int, seed: int, rank: int,
                 world_size: int, num_workers: int, resampled: bool, consumed: Mapping[int, int] | None = None, offset: int = 0,
                 collate_fn=None):
        super().__init__()
        self.collate_fn = collate_fn or stream_collate  # the module unpacks and converts once the batch is on its device
        self.urls, self.maker = list(urls), maker
        self.batch_size, self.shuffle_buffer = int(batch_size), int(shuffle_buffer)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.num_workers, self.resampled = max(1, int(num_workers)), bool(resampled)
        self.consumed, self.offset = dict(consumed or {}), int(offset)
        needed = self.world_size * self.num_workers
        if not self.resampled and len(self.urls) < needed:
            raise ValueError(f"{len(self.urls)} train shards for {self.world_size} ranks x {self.num_workers} workers = {needed} readers: "
                             "some would get no data and DDP would hang; write more shards, lower data.num_workers, or set data.resampled=true")

    def _urls(self, stream: int, rng):
        if self.resampled:
            while True:
                yield rng.choice(self.urls)
        mine = self.urls[self.rank * self.num_workers + stream :: self.world_size * self.num_workers]
        while True:
            order = list(mine)
            rng.shuffle(order)
            yield from order

    def __iter__(self):
        import random

        from webdataset.tariterators import tarfile_samples

        info = torch.utils.data.get_worker_info()
        stream = ((info.id if info else 0) + self.offset) % self.num_workers
        rng = random.Random(f"realisid-{self.seed}-{self.rank}-{stream}")
        raw = tarfile_samples(({"url": u} for u in self._urls(stream, rng)), handler=skip_bad_tar)
        skip = int(self.consumed.get(stream, 0))
        used, failed, batch = 0, 0, []
        for sample in _shuffled(raw, self.shuffle_buffer, rng):
            used += 1
            if used <= skip:
                continue
            ex = self.maker(sample)
            if ex is None:
                failed += 1
                if failed >= self.MAX_FAILED_IN_A_ROW:  # an endless stream of unusable samples would hang training silently
                    raise RuntimeError(f"the last {failed} samples of stream {stream} were all unusable ({dict(self.maker.skipped)}); "
                                       "check the shards (data.train_shards / data.precomputed) against the experiment's config")
                continue
            failed = 0
            batch.append(ex)
            if len(batch) == self.batch_size:
                out = self.collate_fn(batch)
                out["data_stream"], out["data_consumed"] = stream, used
                batch = []
                yield out


def load_examples(urls: Sequence[str], maker: ExampleMaker, limit: int) -> list[dict]:
    """The first ``limit`` good examples of ``urls`` in order (validation sets are small and fixed).

    Every rank reads the same list; Lightning's distributed sampler splits it between ranks.
    """
    from webdataset.tariterators import tarfile_samples

    out = []
    for raw in tarfile_samples(({"url": u} for u in urls), handler=skip_bad_tar):
        ex = maker(raw)
        if ex is not None:  # kept one by one, so the pixels are converted here rather than per batch
            out.append(finish_batch(ex))
        if len(out) >= limit:
            break
    return out


def resolve_shards(spec, what: str) -> list[str]:
    return check_shards_exist(expand_shards(spec), what)
