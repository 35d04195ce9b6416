"""Timing and memory helpers shared by benchmarks/throughput.py and benchmarks/gpu_bench.py.

Timings are wall-clock with the device synchronised; each measurement is repeated in rounds and the median
round is reported, because a shared machine's neighbours make single rounds noisy.
"""
from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], repeat: int, warmup: int = 1, rounds: int = 3, device=None) -> float:
    """Median over ``rounds`` of the mean seconds per call of ``fn`` (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    per_round = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        sync(device)
        per_round.append((time.perf_counter() - t) / repeat)
    return statistics.median(per_round)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of a block: on CUDA the allocator's peak; on CPU the process RSS, sampled every 2 ms.

    ``peak`` is the highest value seen and ``delta`` its rise over the value when the block began (the
    memory the block itself needed, on top of what was already held).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.peak = self.delta = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())
        self.delta = self.peak - self._start


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def machine_description() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    import lightning

    out = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
           "memory": mem, "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
           "lightning": lightning.__version__}
    try:
        import diffusers

        out["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_memory=f"{p.total_memory / 2**30:.1f} GiB", cuda=torch.version.cuda,
                   gpu_count=torch.cuda.device_count())
    else:
        out["gpu"] = "none"
    return out


def write_results(out: str, table: str, res: dict) -> None:
    """A benchmark's ``table.md`` and ``results.json`` into ``out``, and the table to stdout."""
    import json
    import sys

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=2, default=str)
    sys.stdout.write(table + f"\nwritten: {out}\n")


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.0f}"


# ---- training step: the Lightning path `realisid train` runs, and a bare PyTorch loop ------------------------
class _RepeatBatch(torch.utils.data.IterableDataset):
    """The same batch forever: step timings without data loading."""

    def __init__(self, batch: dict):
        super().__init__()
        self.batch = batch

    def __iter__(self):
        while True:
            yield dict(self.batch)


def _trainable_state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if not k.startswith(("backbone.", "id_encoder."))}


class _StepClock:
    """Lightning callback: wall time of each training batch end (device synchronised at the ends only)."""

    def __init__(self, warmup: int, device):
        import lightning as L

        class Clock(L.Callback):
            def on_train_batch_end(inner, trainer, pl_module, outputs, batch, batch_idx):  # noqa: N805
                if batch_idx + 1 == warmup or trainer.global_step == trainer.max_steps:
                    sync(device)
                    self.marks.append(time.perf_counter())

        self.marks: list[float] = []
        self.callback = Clock()


def lightning_step_time(module, batch: dict, cfg, steps: int, warmup: int, run_dir: str) -> tuple[float, PeakMemory]:
    """Seconds per optimizer step of ``module`` trained by the Trainer ``realisid train`` builds, on a fixed batch."""
    from realisid.train import build_trainer, training_callbacks

    clock = _StepClock(warmup, module.device if module.device.type != "cpu" else "cpu")
    accum = int(cfg.trainer.accumulate_grad_batches)
    trainer = build_trainer(cfg, run_dir, [*training_callbacks(cfg, run_dir), clock.callback], max_steps=warmup // accum + steps,
                            enable_checkpointing=False, limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(_RepeatBatch(batch), batch_size=None, num_workers=0)
    with PeakMemory(_device_of(cfg)) as mem:
        trainer.fit(module, train_dataloaders=loader)
    if len(clock.marks) < 2:
        raise RuntimeError(f"timing marks missing ({clock.marks}); warmup {warmup} must be a multiple of accumulate_grad_batches")
    return (clock.marks[-1] - clock.marks[0]) / steps, mem


def bare_step_time(module, batch: dict, cfg, steps: int, warmup: int) -> tuple[float, PeakMemory]:
    """The same step in a plain loop: forward (module.shared_step), backward, clip, AdamW, schedule."""
    o = cfg.optim
    device = _device_of(cfg)
    module.to(device).train()
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    params = [p for m in module.trainable_modules().values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(o.lr), weight_decay=float(o.weight_decay), betas=tuple(o.betas))
    warm = max(1, int(o.warmup_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    amp = _autocast(cfg.trainer.precision, device)
    accum = int(cfg.trainer.accumulate_grad_batches)
    clip = float(cfg.trainer.gradient_clip_val)

    def step(i: int) -> None:
        for k in range(accum):
            with amp:
                loss = module.shared_step(batch, generator=torch.Generator().manual_seed(i * accum + k))["loss"]
            (loss / accum).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if module.ema is not None:
            module.ema.update()

    with PeakMemory(device) as mem:
        for i in range(warmup // accum):
            step(i)
        sync(device)
        t = time.perf_counter()
        for i in range(steps):
            step(warmup + i)
        sync(device)
    return (time.perf_counter() - t) / steps, mem


def _device_of(cfg) -> str:
    acc = str(cfg.trainer.accelerator)
    return "cuda" if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()) else "cpu"


def _autocast(precision: str, device: str):
    import contextlib

    p = str(precision)
    if p.startswith("bf16"):
        return torch.autocast(device, dtype=torch.bfloat16)
    if p.startswith("16"):
        return torch.autocast(device, dtype=torch.float16)
    return contextlib.nullcontext()


def compare_training(module, batch: dict, cfg, steps: int, warmup: int, rounds: int, run_dir: str) -> dict:
    """Lightning vs bare loop, interleaved ``rounds`` times from the same starting weights; medians."""
    start = _trainable_state(module)
    light, bare, light_mem, bare_mem = [], [], [], []
    for r in range(rounds):  # the order alternates, so neither loop always runs on a warmer process
        for which in (("lightning", "bare") if r % 2 == 0 else ("bare", "lightning")):
            module.load_state_dict(start, strict=False)
            if which == "lightning":
                t, m = lightning_step_time(module, batch, cfg, steps, warmup, os.path.join(run_dir, f"round{r}"))
                light.append(t)
                light_mem.append(m)
            else:
                t, m = bare_step_time(module, batch, cfg, steps, warmup)
                bare.append(t)
                bare_mem.append(m)
    module.load_state_dict(start, strict=False)
    return {"lightning_s": statistics.median(light), "bare_s": statistics.median(bare),
            "lightning_rounds": light, "bare_rounds": bare,
            "lightning_peak_delta": max(m.delta for m in light_mem), "bare_peak_delta": max(m.delta for m in bare_mem),
            "lightning_peak": max(m.peak for m in light_mem), "bare_peak": max(m.peak for m in bare_mem)}


def precomputed_batch(module, batch: dict) -> dict:
    """``batch`` as the precomputed cache serves it: VAE posterior and text embeddings instead of the image."""
    out = {k: v for k, v in batch.items() if k != "image"}
    with torch.no_grad():
        out["latent_moments"] = module.backbone.latent_moments(batch["image"].to(module.backbone.vae.device)).float()
        embeds, pooled = module.backbone.text_embeddings(batch["caption"])
        free, free_pooled = module.backbone.text_embeddings(batch.get("caption_no_identity", batch["caption"]))
    out["text_embeds"], out["text_embeds_no_identity"] = embeds.float(), free.float()
    if pooled is not None:
        out["text_pooled"], out["text_pooled_no_identity"] = pooled.float(), free_pooled.float()
    return out


# ---- sampling: the joint pipeline against its pass count, and a plain ControlNet pipeline ---------------------
def sampling_people(resolution: int, n: int, id_size: int):
    """``n`` people with boxes of a fifth of the image, spread over it (no overlap), and blank references."""
    from realisid.pipeline import Person

    side = max(8, resolution // 5)
    corners = [(0.1, 0.1), (0.6, 0.15), (0.3, 0.6), (0.7, 0.65)]
    return [Person(box=(int(x * resolution), int(y * resolution), int(x * resolution) + side, int(y * resolution) + side),
                   id_image=torch.zeros(3, id_size, id_size)) for x, y in corners[:n]]


@torch.no_grad()
def pass_times(pipe, people, repeat: int, rounds: int) -> dict:
    """Each pass the joint pipeline makes per step, timed alone at its real shapes: the UNet on the 3 guidance
    conditions, each branch on the rows it really runs (:meth:`RealisIDPipeline.branch_rows`: 2 on SD1.5 with
    identity on, 1 during the identity delay; ``*_delay`` keys)."""
    bb, device = pipe.backbone, pipe.device
    R, f = pipe.resolution, bb.vae_scale_factor
    inputs = [pipe.person_inputs(p) for p in people]
    p0 = inputs[0]
    x = torch.randn(3, bb.latent_channels, R // f, R // f, device=device, dtype=bb.unet.dtype)
    t = torch.full((3,), 500, device=device, dtype=torch.long)
    text = bb.encode_text(["", "a photo", "a photo"], (R, R))
    out = {}
    with pipe.autocast():
        res = None
        for suffix, id_on in (("", True), ("_delay", False)):
            rows = pipe.branch_rows(id_on, text.added_cond_kwargs)[0]
            k, sel = len(rows), torch.tensor(rows, device=device)
            xk, tk, tokens = x[sel], t[sel], p0["tokens"].expand(k, -1, -1)
            added = {key: v[sel] for key, v in text.added_cond_kwargs.items()} if text.added_cond_kwargs else None
            if pipe.global_branch is not None:
                loc = p0["loc_map"].expand(k, -1, -1, -1)
                out["global" + suffix] = time_call(lambda: pipe.global_branch(xk, tk, tokens, loc, added), repeat, rounds=rounds, device=device)
            if pipe.local_branch is not None:
                pe, box = p0["pe_map"].expand(k, -1, -1, -1), p0["latent_box"] * k
                out["local" + suffix] = time_call(lambda: pipe.local_branch(xk, tk, tokens, pe, box, added), repeat, rounds=rounds, device=device)
        res = pipe.step_residuals(x, t, inputs[:1], True, text.added_cond_kwargs)
        out["unet"] = time_call(lambda: bb.unet(x, t, encoder_hidden_states=text.embeds, added_cond_kwargs=text.added_cond_kwargs,
                                                down_block_additional_residuals=res[0], mid_block_additional_residual=res[1], return_dict=False),
                                repeat, rounds=rounds, device=device)
        # once per image: the prompt, each reference, the decode
        out["text_once"] = time_call(lambda: bb.encode_text(["", "a photo", "a photo"], (R, R)), repeat, rounds=rounds, device=device)
        out["person_once"] = time_call(lambda: pipe.person_inputs(people[0]), repeat, rounds=rounds, device=device)
        z = x[:1]
        out["decode_once"] = time_call(lambda: bb.decode_latents(z), repeat, rounds=rounds, device=device)
    return out


def predicted_sampling_time(passes: dict, people: int, steps: int, id_delay: float = 0.1) -> float:
    """The design's cost: per step one UNet pass plus, per person, a global and a local pass on the distinct
    guidance rows (fewer rows during the first ``id_delay`` of the steps); plus the once-per-image parts."""
    delay = int(round(id_delay * steps))

    def per_step(suffix: str) -> float:
        return passes["unet"] + people * (passes.get("global" + suffix, 0.0) + passes.get("local" + suffix, 0.0))

    return (steps - delay) * per_step("") + delay * per_step("_delay") + passes["text_once"] + people * passes["person_once"] + passes["decode_once"]


def plain_controlnet_pipeline(backbone, conditioning_embedding_out_channels):
    """diffusers' StableDiffusionControlNetPipeline on the same backbone with one ControlNet (the usual single pass)."""
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

    cn = ControlNetModel.from_unet(backbone.unet, conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels))
    cn.to(backbone.unet.device, backbone.unet.dtype)
    pipe = StableDiffusionControlNetPipeline(vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
                                             unet=backbone.unet, controlnet=cn, scheduler=DDIMScheduler.from_config(backbone.scheduler_config),
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare_sampling(pipe, steps: int, rounds: int, plain_channels, id_size: int, repeat: int = 5) -> dict:
    """The joint pipeline for 1, 2, 3 people against the pass-count prediction and a plain ControlNet pipeline.

    Each round times the passes alone and then every pipeline, so both see the machine in the same state (a
    shared machine's speed drifts between minutes); the ratios are per round, then the median is reported.
    """
    from PIL import Image

    for part in (pipe.backbone, pipe.projector, pipe.local_branch, pipe.global_branch):
        if part is not None:
            part.eval()
    R = pipe.resolution
    plain = plain_controlnet_pipeline(pipe.backbone, plain_channels)
    control = Image.new("RGB", (R, R))
    people = {n: sampling_people(R, n, id_size) for n in (1, 2, 3)}
    per_round: list[dict] = []
    for r in range(rounds):
        warm = 1 if r == 0 else 0
        passes = pass_times(pipe, people[1], repeat=repeat, rounds=1)
        row = {"passes": passes}
        for n in (1, 2, 3):
            if pipe.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time_call(lambda: pipe("a photo of a person", people[n], num_inference_steps=steps, id_delay=0.1, seed=0, output_type="pt"), 1,
                          warmup=warm, rounds=1)
            row[n] = (t, predicted_sampling_time(passes, n, steps, id_delay=0.1))
            row[f"peak{n}"] = torch.cuda.max_memory_allocated() if pipe.device.type == "cuda" else None
        with pipe.autocast():
            row["plain"] = time_call(lambda: plain("a photo of a person", image=control, num_inference_steps=steps, height=R, width=R,
                                                   guidance_scale=7.5, output_type="pt"), 1, warmup=warm, rounds=1)
        per_round.append(row)
    med = statistics.median
    rows = [{"people": n, "measured_s": med(r[n][0] for r in per_round), "predicted_s": med(r[n][1] for r in per_round),
             "ratio": med(r[n][0] / r[n][1] for r in per_round), "ratio_rounds": [r[n][0] / r[n][1] for r in per_round],
             "images_per_s": 1.0 / med(r[n][0] for r in per_round), "peak_bytes": max((r[f"peak{n}"] or 0) for r in per_round) or None}
            for n in (1, 2, 3)]
    passes = {k: med(r["passes"][k] for r in per_round) for k in per_round[0]["passes"]}
    return {"steps": steps, "passes": passes, "rows": rows, "plain_controlnet_s": med(r["plain"] for r in per_round)}
