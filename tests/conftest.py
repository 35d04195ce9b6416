"""Shared fixtures. Tests shrink the real experiment configs rather than keeping a separate config world."""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the commands tests run announce themselves here, not beside the user's real jobs (realisid/jobs.py)
os.environ["REALISID_JOBS_DIR"] = tempfile.mkdtemp(prefix="realisid-jobs-tests-")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# (OmegaConf needs the space after each colon: "{hidden_size:32}" would be one key named "hidden_size:32")
TINY_CLIP = "{hidden_size: 32, intermediate_size: 37, num_hidden_layers: 2, num_attention_heads: 4, image_size: 32, patch_size: 8}"
# The embedded default's architecture shrunk to diffusers' test sizes: 64 px images, a factor-2 VAE with 4 latent
# channels, a 2-level UNet (32, 64), a 32-wide text encoder; about 20x cheaper per step than the shipped base.
SHRUNK_ARCH = [
    "data.resolution=64", "model.tiny.unet.sample_size=32", "model.tiny.unet.in_channels=4", "model.tiny.unet.out_channels=4",
    "model.tiny.unet.block_out_channels=[32,64]", "model.tiny.unet.down_block_types=[DownBlock2D,CrossAttnDownBlock2D]",
    "model.tiny.unet.up_block_types=[CrossAttnUpBlock2D,UpBlock2D]", "model.tiny.unet.cross_attention_dim=32",
    "model.tiny.vae.block_out_channels=[16,32]", "model.tiny.vae.down_block_types=[DownEncoderBlock2D,DownEncoderBlock2D]",
    "model.tiny.vae.up_block_types=[UpDecoderBlock2D,UpDecoderBlock2D]", "model.tiny.vae.latent_channels=4", "model.tiny.vae.sample_size=64",
    "model.tiny.text.hidden_size=32", "model.tiny.text.intermediate_size=37", "model.tiny.text.num_hidden_layers=5",
    "model.tiny.text.max_position_embeddings=77",
    "model.local.conditioning_embedding_out_channels=[16,32]", "model.global.conditioning_embedding_out_channels=[16,32]",
]
# The real local_branch experiment with a random shrunk backbone and a tiny random CLIP encoder: no preparation, no
# shipped model needed (identity is scored by a stand-in on the target box unless a test says otherwise).
RANDOM_TINY = SHRUNK_ARCH + ["model.pretrained=", "model.id_encoder.kind=clip", "model.id_encoder.path=",
                             f"model.id_encoder.tiny_clip={TINY_CLIP}", "prepare.enabled=false", "evaluation.every_n_validations=0",
                             "evaluation.encoder=standin", "faces.model_dir="]


def tiny_run_config(tmp_path, name, shards, *extra):
    """A short local_branch training run on ``shards`` (train-*.tar / val-*.tar) in ``tmp_path/name``, saved as
    ``tmp_path/name.yaml`` for a subprocess: (cfg, path). ``extra`` overrides come last and win."""
    from realisid.config import load_config, save_config

    cfg = load_config("local_branch", RANDOM_TINY + [
        f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar", "data.batch_size=2",
        "data.num_workers=0", "data.shuffle_buffer=4", "data.val_samples=2", "trainer.max_steps=16", "trainer.val_check_interval=1000",
        "trainer.checkpoint_every_n_steps=2", "trainer.enable_progress_bar=false", "validation.num_images=0",
        f"experiment.runs_dir={tmp_path}/{name}", *extra])
    path = tmp_path / f"{name}.yaml"
    save_config(cfg, str(path))
    return cfg, path


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def record_host_reads(monkeypatch) -> list[str]:
    """A list that records every Tensor method call that reads values back to the host (a device sync on a GPU),
    by name, from now until the test ends or calls ``monkeypatch.undo()``."""
    calls: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _original=original, **k):
            calls.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls


@pytest.fixture
def tiny_cfg():
    from realisid.config import load_config

    def make(exp: str = "local_branch", *overrides: str):
        return load_config(exp, RANDOM_TINY + list(overrides))

    return make


def write_face_shards(out_dir, name="train", n=12, size=96, identities=3, with_embed=False, with_ref=True, maxcount=5):
    """Small shards of drawn faces (ellipse head, eyes, mouth) through the real writer; returns the manifest."""
    import numpy as np
    from PIL import Image, ImageDraw

    from realisid.data.shards import face_meta
    from realisid.data.shard_writer import FaceShardWriter

    rng = np.random.default_rng(0)
    with FaceShardWriter(str(out_dir), name, face_model="test-drawn", maxcount=maxcount) as w:
        for i in range(n):
            img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 255, 3)))
            d = ImageDraw.Draw(img)
            side = int(rng.integers(size // 8, size // 2))
            x0, y0 = int(rng.integers(0, size - side)), int(rng.integers(0, size - side))
            box = (x0, y0, x0 + side, y0 + side)
            d.ellipse(box, fill=(200, 160 + 20 * (i % identities), 120))
            kps = np.array([[x0 + 0.3 * side, y0 + 0.4 * side], [x0 + 0.7 * side, y0 + 0.4 * side], [x0 + 0.5 * side, y0 + 0.6 * side],
                            [x0 + 0.35 * side, y0 + 0.8 * side], [x0 + 0.65 * side, y0 + 0.8 * side]])
            meta = face_meta(img.size, box, kps, det_score=0.9, identity=f"id{i % identities}", caption="a photo of a person", source="test")
            ref = img.crop(box).resize((32, 32)) if with_ref else None
            emb = rng.standard_normal(8).astype("float32") if with_embed else None
            w.write(f"s{i:04d}", img, meta, id_embed=emb, ref=ref)
        return w.manifest.to_json()


@pytest.fixture
def face_shards(tmp_path):
    write_face_shards(tmp_path, "train", n=12)
    write_face_shards(tmp_path, "val", n=4)
    return tmp_path


@pytest.fixture(scope="session")
def eval_standin(tmp_path_factory):
    """A stand-in evaluation encoder trained for a few steps on drawn faces (path)."""
    from realisid.embedded.standin import train_standin

    root = tmp_path_factory.mktemp("standin")
    write_face_shards(root, "train", n=12)
    write_face_shards(root, "val", n=6)
    train_standin([str(p) for p in sorted(root.glob("train-*.tar"))], [str(p) for p in sorted(root.glob("val-*.tar"))],
                  str(root / "model"), steps=5, batch_size=8, image_size=32, embed_dim=16)
    return str(root / "model")
