"""Captions: the expression word and the caption with and without the person's identity attributes."""
from __future__ import annotations

from .identity import FACIAL_HAIR, Identity


MAX_CAPTION = 77


def _expression(smile: float, mouth_open: float, eye_open: float, brow_raise: float) -> str:
    """The caption word for an expression ("" for a neutral one)."""
    if mouth_open > 0.5 and brow_raise > 0.4 and smile < 0.45:
        return "surprised"
    if smile >= 0.45:
        return "laughing" if mouth_open > 0.3 else "smiling"
    if eye_open < 0.25:
        return "sleepy"
    return ""


def _caption(expression: str, ident: Identity, shirt: str, background: str) -> tuple[str, str]:
    """The caption (identity attributes, clothing, background) and the same without identity attributes.

    The second names only what any person could have (expression, shirt, background), so a model trained on it
    must take hair, glasses and facial hair from somewhere else: the reference face."""
    style = ident.style_name
    expr = f"{expression} " if expression else ""
    subject = "a photo of a " + expr + ("bald " if style == "bald" else "") + "person"
    hair = {"short": f"short {ident.hair_name} hair", "long": f"long {ident.hair_name} hair",
            "bun": f"{ident.hair_name} hair in a bun", "spiky": f"spiky {ident.hair_name} hair",
            "bob": f"a {ident.hair_name} bob"}.get(style)
    extras = []
    if ident.glasses:
        extras.append("glasses")
    fh = FACIAL_HAIR[ident.facial_hair]
    if fh != "none":
        extras.append(f"a {fh}")
    bg_short = background.split(" ", 2)[-1] if " and " in background else background
    scene = [[f"{shirt} shirt", background], [f"{shirt} shirt", bg_short], [f"{shirt} shirt", background.split()[-2] + " background"],
             [f"{shirt} shirt"], []]

    def first_fitting(subject: str, who: list) -> str:
        for parts in [who + sc for sc in scene] + [who[:1]]:
            parts = [p for p in parts if p]
            text = subject + (" with " + ", ".join(parts) if parts else "")
            if len(text) <= MAX_CAPTION:
                return text
        return subject[:MAX_CAPTION]

    return first_fitting(subject, [hair, *extras]), first_fitting("a photo of a " + expr + "person", [])
