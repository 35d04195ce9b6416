"""Everything that turns a training batch into conditioning (in the manner of sgm's ``conditioner``).

Identity: the frozen encoder's features (from the precompute cache, from stored embeddings, or by running the
encoder) through the trainable projector into tokens. Text: precomputed embeddings or live captions, with the
empty prompt for dropped captions and the identity-free caption for some samples. Classifier-free guidance
dropout: per-sample keep masks drawn from the step's host generator.

The conditioner is a plain object, not an ``nn.Module``: it holds a reference to the LightningModule that owns
the parts and reads them from it on every use (``owner.backbone``, ``owner.id_encoder``, ``owner.projector``,
``owner.device``, ``owner.dtype``, ``owner.cfg``). The parts stay registered where they always were, so the
state-dict keys, checkpoints and exports are those of before, and a device move of the module is followed.
"""
from __future__ import annotations

from typing import Any

import torch


class Conditioner:
    def __init__(self, owner: Any):
        self.owner = owner  # the RealisIDModule whose parts (and device, dtype, config) this reads
        self._null_text: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def __call__(self, batch: dict, image_hw: tuple[int, int], generator: torch.Generator | None = None, dropout: bool = True):
        """(text conditioning, identity tokens) for a training step. With ``dropout`` the keep masks (text,
        identity) and then the identity-free caption mask are drawn from ``generator``, in that order."""
        n = len(batch["caption"])
        keep_text, keep_id = self.dropout_masks(n, generator) if dropout else (torch.ones(n, dtype=torch.bool),) * 2
        free = self.identity_free_mask(n, generator) if dropout else None
        text = self.text_conditioning(batch, keep_text, image_hw, free)
        tokens = self.identity_tokens(batch, keep_id.to(self.owner.device))
        return text, tokens

    # ---- identity -----------------------------------------------------------------------------------
    def identity_features(self, batch: dict) -> torch.Tensor:
        """The frozen identity encoder's output per sample: from the precompute cache (``id_features``, every
        sample, no encoder run), else from stored ArcFace embeddings (``id_embed`` when every sample has one),
        else by running the encoder on the reference crops (with their key points where the batch has them)."""
        device, encoder = self.owner.device, self.owner.id_encoder
        feats = batch.get("id_features")
        if feats is not None:
            return feats.to(device)
        emb = batch.get("id_embed")
        if (emb is not None and emb.numel() and not encoder.sequence and bool(batch["has_id_embed"].all())
                and emb.shape[-1] == encoder.embed_dim):
            return emb.to(device)
        if batch.get("id_kps") is not None:
            return encoder(batch["id_image"], batch["id_mask"], kps=batch["id_kps"])
        return encoder(batch["id_image"], batch["id_mask"])

    def identity_tokens(self, batch: dict, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The projector's tokens; a sample whose ``keep`` is false gets zeros (the null identity)."""
        tokens = self.owner.projector(self.identity_features(batch).to(self.owner.dtype))
        if keep is not None:
            tokens = tokens * keep.to(tokens.dtype)[:, None, None]
        return tokens

    # ---- dropout ------------------------------------------------------------------------------------
    def dropout_masks(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample keep masks (text, identity): drop image only, text only, or both, each with its probability."""
        d = self.owner.cfg.model.dropout
        u = torch.rand(n, generator=generator, device="cpu")
        drop_id = u < d.image
        drop_text = (u >= d.image) & (u < d.image + d.text)
        both = (u >= d.image + d.text) & (u < d.image + d.text + d.both)
        return ~(drop_text | both), ~(drop_id | both)

    def identity_free_mask(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per sample: train on the caption without the person's identity (``data.identity_free_captions``), so the
        branches must carry identity from the reference rather than leave it to the text."""
        p = float(self.owner.cfg.data.identity_free_captions)
        return torch.rand(n, generator=generator, device="cpu") < p if p > 0 else torch.zeros(n, dtype=torch.bool)

    # ---- text ---------------------------------------------------------------------------------------
    def null_text(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The empty prompt's text embeddings (for dropped captions when text embeddings are precomputed)."""
        device = self.owner.device
        if self._null_text is None or self._null_text[0].device != device:
            e, p = self.owner.backbone.text_embeddings([""])
            self._null_text = (e.to(device), p.to(device) if p is not None else None)
        return self._null_text

    def text_conditioning(self, batch: dict, keep_text: torch.Tensor, image_hw: tuple[int, int], free: torch.Tensor | None = None):
        """Text conditioning from precomputed embeddings when the batch has them, else from the captions; ``free``
        marks samples that use their identity-free caption."""
        backbone, device = self.owner.backbone, self.owner.device
        training_free = free is not None
        free = free if free is not None else torch.zeros(len(keep_text), dtype=torch.bool)
        if "text_embeds" not in batch:
            caps = [(f if use_free else c) if k else "" for c, f, k, use_free in
                    zip(batch["caption"], batch.get("caption_no_identity", batch["caption"]), keep_text.tolist(), free.tolist())]
            return backbone.encode_text(caps, image_hw, batch.get("original_size"), batch.get("crop_top_left"))
        embeds, pooled = batch["text_embeds"].to(device), batch.get("text_pooled")
        pooled = pooled.to(device) if pooled is not None else None
        # per-sample choices by torch.where on the device, never a host read of a mask
        if training_free and float(self.owner.cfg.data.identity_free_captions) > 0 or "text_embeds_no_identity" in batch:
            if "text_embeds_no_identity" not in batch:
                raise ValueError("data.identity_free_captions > 0 but the precomputed cache has no identity-free text embeddings; "
                                 "re-run `make precompute` with this version")
            use = free.to(device)
            embeds = torch.where(use[:, None, None], batch["text_embeds_no_identity"].to(device, embeds.dtype), embeds)
            if pooled is not None:
                pooled = torch.where(use[:, None], batch["text_pooled_no_identity"].to(device, pooled.dtype), pooled)
        null_e, null_p = self.null_text()
        drop = (~keep_text).to(device)
        embeds = torch.where(drop[:, None, None], null_e.to(embeds.dtype), embeds)
        if pooled is not None:
            pooled = torch.where(drop[:, None], null_p.to(pooled.dtype), pooled)
        # SDXL's time ids carry each sample's original size and crop (batch keys from the data pipeline)
        return backbone.conditioning(embeds, pooled, image_hw, batch.get("original_size"), batch.get("crop_top_left"))


# ---- swapping references (the identity-use measurement) -----------------------------------------------
REFERENCE_KEYS = ("id_image", "id_mask", "id_kps", "id_features", "id_embed", "has_id_embed")


def other_identity_order(identities) -> list[int] | None:
    """For each sample, the index of the next sample (cyclically) of a DIFFERENT identity; None when the batch
    holds fewer than two identities (nothing to swap with)."""
    ids = [str(i) for i in (identities or [])]
    if len(set(ids)) < 2:
        return None
    n = len(ids)
    return [next((i + k) % n for k in range(1, n) if ids[(i + k) % n] != ids[i]) for i in range(n)]


def with_identity_free_captions(batch: dict) -> dict:
    """A shallow copy of ``batch`` with each sample's identity-free caption (its caption where it has none) and
    without precomputed text embeddings of the full caption, so the text is encoded from the caption given."""
    out = {k: v for k, v in batch.items() if k not in ("text_embeds", "text_pooled")}
    out["caption"] = batch.get("caption_no_identity", batch["caption"])
    return out


def with_references_of(batch: dict, order: list[int]) -> dict:
    """A shallow copy of ``batch`` whose sample i carries the reference of sample ``order[i]`` (image, mask, key
    points, cached features, stored embedding); everything else (target image, box, caption) stays."""
    out = dict(batch)
    for key in REFERENCE_KEYS:
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == len(order):
            out[key] = value.index_select(0, torch.as_tensor(order, device=value.device))
    return out
