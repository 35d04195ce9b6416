"""A tiny CLIP tokenizer built offline from a word list, for the tiny backbone.

Real backbones ship their tokenizer; the embedded default has none and cannot download one. This builds
CLIP's byte-level BPE from scratch: every byte symbol is in the vocabulary (so any text tokenizes), and each
given word gets merges that assemble it into one token, so common caption words cost one token.
"""
from __future__ import annotations

from typing import Iterable


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode mapping."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_tiny_tokenizer(words: Iterable[str], max_length: int = 77):
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    for s in symbols:
        vocab.setdefault(s + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words if w.isascii() and w.isalpha() and len(w) > 1}):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        current = parts[0]
        for nxt in parts[1:]:
            merges.append((current, nxt))
            current = current + nxt
            vocab.setdefault(current, len(vocab))
    merges = list(dict.fromkeys(merges))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = max_length
    return tok


CAPTION_WORDS = (
    "a photo of the person man woman face portrait smiling neutral surprised laughing serious with and in on "
    "short long black brown blond red grey gray white blue green yellow orange purple pink hair bald bun shirt "
    "striped checkered plain gradient dotted blobs background glasses beard looking left right up down at camera "
    "outdoors indoors close up small wide shot blonde bob goatee moustache sleepy spiky spotted teal neck collar"
).split()
