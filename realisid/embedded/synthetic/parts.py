"""The part painters of :func:`~realisid.embedded.synthetic.render.render_face`, one per part.

Each takes the painter, the identity and the image's layout (:class:`~.geometry._Layout`), and draws its part
in the head frame (see :mod:`.geometry`); ``render_face`` calls them back to front: body and shirt, back
hair, neck, ears, head, beard, nose, mouth, moustache, eye and brow per side, front hair, glasses. The nose,
mouth, eyes and brows return the points the key points and landmarks are read from.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .geometry import _Layout
from .identity import FACIAL_HAIR, GLASSES, RGB, Identity, _mix, _scaled
from .painter import _arc, _band, _Painter


_NECK_BOTTOM = 1.18   # the neck's base (and the shoulders' top), in b
_NECK_TOP = 0.55      # in b

# Hairline (head frame, in a and b) of each style from the right temple to the top; mirrored for the left.
_HAIRLINES: dict[str, list[list[float]]] = {
    "short": [[0.97, 0.02], [0.94, -0.24], [0.78, -0.44], [0.45, -0.52], [0.0, -0.56]],
    "long": [[0.86, 0.9], [0.84, 0.2], [0.8, -0.4], [0.45, -0.52], [0.0, -0.56]],
    "bun": [[0.97, -0.02], [0.94, -0.26], [0.78, -0.46], [0.4, -0.56], [0.0, -0.6]],
    "spiky": [[0.97, 0.02], [0.94, -0.24], [0.78, -0.44], [0.45, -0.5], [0.0, -0.52]],
    "bob": [[0.88, 0.6], [0.88, -0.1], [0.84, -0.44], [0.4, -0.5], [0.0, -0.5]],
}


class _Shades(NamedTuple):
    """The colours derived from an identity's skin, hair and brows."""

    skin_dark: RGB
    skin_shadow: RGB
    hair_dark: RGB
    beard: RGB


def _shades(ident: Identity) -> _Shades:
    hair = ident.hair
    return _Shades(skin_dark=_scaled(ident.skin, 0.82), skin_shadow=_scaled(ident.skin, 0.7),
                   hair_dark=_scaled(hair, 0.75) if sum(hair) > 150 else _mix(hair, (90, 90, 90), 0.25),
                   beard=_scaled(ident.brows, 1.05))


class _Mouth(NamedTuple):
    """The mouth's head-frame geometry (frontal): x across, the line the lips meet on, the lip contours."""

    xs: np.ndarray
    mid: np.ndarray
    outer: np.ndarray
    inner: np.ndarray


# ------------------------------------------------------------------------------------ body, head, hair

def paint_body(P: _Painter, ident: Identity, g: _Layout, shirt: RGB, collar: str) -> None:
    """Shoulders and shirt with its collar (the body frame is less rolled than the head)."""
    a, b = g.a, g.b
    skin_dark = _shades(ident).skin_dark
    sh_y = _NECK_BOTTOM * b + 0.05 * a
    side = np.array([[0.55, 0.0], [1.3, 0.18], [1.9, 0.55], [2.25, 1.2], [2.45, 2.2], [2.6, 6.0]])
    right = np.stack([side[:, 0] * a, sh_y + side[:, 1] * a], axis=1)
    left = right[::-1] * np.array([-1, 1])
    P.poly(np.concatenate([left, right]), shirt, body=True)
    if collar == "round":
        P.poly(_arc(0.5 * a, 0.32 * a, 0, math.pi, 12, 0, sh_y - 0.02 * a), skin_dark, body=True)
    elif collar == "v-neck":
        P.poly(np.array([[-0.5 * a, sh_y - 0.02 * a], [0.5 * a, sh_y - 0.02 * a], [0, sh_y + 0.75 * a]]), skin_dark, body=True)
    else:
        P.poly(_arc(0.5 * a, 0.2 * a, 0, math.pi, 12, 0, sh_y - 0.02 * a), skin_dark, body=True)
        wing = np.array([[0.05, 0.02], [0.6, -0.08], [0.72, 0.35], [0.0, 0.55]]) * a + [0, sh_y]
        wing_colour = _scaled(shirt, 0.75) if sum(shirt) > 200 else (235, 235, 235)
        P.poly(wing, wing_colour, body=True)
        P.poly(wing * [-1, 1], wing_colour, body=True)


def paint_back_hair(P: _Painter, ident: Identity, g: _Layout) -> None:
    """Hair behind the head and neck, in front of the shirt: long hair, a bob or a bun."""
    a, b, vol, style = g.a, g.b, ident.hair_volume, ident.style_name
    hair_dark = _shades(ident).hair_dark
    if style == "long":
        top = _arc(1.12 * a * vol, 1.08 * b * vol, math.pi, 2 * math.pi, 16)
        down = np.array([[1.12 * a * vol, 0.4 * b], [1.22 * a * vol, 1.2 * b], [1.15 * a * vol, 1.75 * b],
                         [0.4 * a, 1.8 * b]])
        P.poly(np.concatenate([top, down, down[::-1] * [-1, 1]]), hair_dark)
    elif style == "bob":
        top = _arc(1.16 * a * vol, 1.1 * b * vol, math.pi, 2 * math.pi, 16)
        down = np.array([[1.16 * a * vol, 0.3 * b], [1.12 * a * vol, 0.8 * b], [0.6 * a, 0.85 * b]])
        P.poly(np.concatenate([top, down, down[::-1] * [-1, 1]]), hair_dark)
    elif style == "bun":
        P.poly(_arc(0.38 * a * vol, 0.36 * a * vol, 0, 2 * math.pi, 20, 0, -1.05 * b - 0.12 * a), ident.hair)
        P.line(_arc(0.38 * a * vol, 0.36 * a * vol, 3.6, 5.4, 6, 0, -1.05 * b - 0.12 * a), hair_dark, g.thin)


def paint_neck(P: _Painter, ident: Identity, g: _Layout) -> None:
    """The neck: its top follows the head, its bottom follows the body."""
    a, b = g.a, g.b
    nw = 0.42 * a
    neck_top = _NECK_TOP * b
    neck_bottom = _NECK_BOTTOM * b + 0.1 * a
    top_pts = P.to_image(np.array([[-nw, neck_top], [nw, neck_top]]))
    bottom_pts = P.to_image(np.array([[nw * 1.08, neck_bottom], [-nw * 1.08, neck_bottom]]), body=True)
    P.poly_pixels(np.concatenate([top_pts, bottom_pts]), _shades(ident).skin_dark)


def paint_ears(P: _Painter, ident: Identity, g: _Layout) -> None:
    """Ears, behind the head; the ear on the side the face turns away from shows more."""
    a, b, shades = g.a, g.b, _shades(ident)
    for s in (-1.0, 1.0):
        rx = 0.15 * a * ident.ear_size * float(np.clip(1 - 1.6 * s * math.sin(g.yaw), 0.15, 1.6))
        ey = 0.03 * b
        P.poly(_arc(rx, 0.2 * b * ident.ear_size, 0, 2 * math.pi, 14, s * 0.97 * a, ey), shades.skin_dark)
        P.poly(_arc(rx * 0.5, 0.11 * b * ident.ear_size, 0, 2 * math.pi, 10, s * a, ey), shades.skin_shadow)


def paint_head(P: _Painter, ident: Identity, g: _Layout) -> None:
    """The head ellipse (the face box is this ellipse's box)."""
    P.poly(_arc(g.a, g.b, 0, 2 * math.pi, 48), ident.skin)


def paint_front_hair(P: _Painter, ident: Identity, g: _Layout) -> None:
    """Hair over the head down to the style's hairline (spikes, a few strands), or a bald head's sides and shine."""
    a, b, vol, style = g.a, g.b, ident.hair_volume, ident.style_name
    hair = ident.hair
    hairline_pts = _HAIRLINES.get(style)
    if hairline_pts is not None:
        hl = np.asarray(hairline_pts, dtype=np.float64) * [a, b]
        hl = np.concatenate([hl, (hl * [-1, 1])[-2::-1]])     # right temple -> top -> left temple
        low = 0.1 if style in ("short", "bun", "spiky") else (0.9 if style == "long" else 0.65)
        fv = 1.0 if style == "bun" else vol
        start = math.asin(min(low / 1.08, 1.0))
        outer = _arc(a * 1.06 * fv, b * 1.08 * fv, math.pi - start, 2 * math.pi + start, 24)
        if style in ("long", "bob"):
            outer[0] = [-1.12 * a * fv, low * b]
            outer[-1] = [1.12 * a * fv, low * b]
        front = P.project(hl)
        P.poly(np.concatenate([outer, front]), hair)
        if style == "spiky":
            for k in np.linspace(math.pi + 0.45, 2 * math.pi - 0.45, 7):
                base = np.array([[math.cos(k - 0.2), math.sin(k - 0.2)], [math.cos(k + 0.2), math.sin(k + 0.2)]]) * [a * 1.02, b * 1.02]
                spike = np.array([[math.cos(k), math.sin(k)]]) * [a * 1.35 * vol, b * 1.3 * vol]
                P.poly(np.concatenate([base[:1], spike, base[1:]]), hair)
        # a few strands for texture
        hair_dark = _shades(ident).hair_dark
        for k in np.linspace(math.pi + 0.5, 2 * math.pi - 0.5, 4):
            P.line(_arc(a * 0.98, b * 0.98, k - 0.25, k + 0.1, 4), hair_dark, g.thin)
    elif style == "bald":
        for s in (-1.0, 1.0):
            t0, t1 = (math.pi - 0.2, math.pi + 0.5) if s < 0 else (-0.5, 0.2)
            outer = _arc(a * 1.03, b * 1.03, t0, t1, 8)
            inner = _arc(a * 0.93, b * 0.95, t0, t1, 8)[::-1]
            P.poly(np.concatenate([outer, inner]), hair)
        P.poly(_arc(0.22 * a, 0.1 * b, 0, 2 * math.pi, 12, -0.25 * a, -0.8 * b), _mix(ident.skin, (255, 255, 255), 0.25))


# ------------------------------------------------------------------------------------ facial hair

def paint_beard(P: _Painter, ident: Identity, g: _Layout) -> None:
    """A full beard (jaw to sideburns) or a goatee, under the nose and mouth."""
    a, b = g.a, g.b
    fh = FACIAL_HAIR[ident.facial_hair]
    if fh == "beard":
        jaw = _arc(a * 1.005, b * 1.005, math.radians(-14), math.radians(194), 26)
        ny = g.nose_y / b
        inner = np.array([[0.97, -0.24], [0.8, 0.1], [0.5, ny + 0.1], [0.22, ny + 0.07], [0.0, ny + 0.06]]) * [a, b]
        inner = np.concatenate([inner, (inner * [-1, 1])[-2::-1]])
        inner_p = P.project(inner)
        inner_p[0], inner_p[-1] = jaw[0], jaw[-1]        # meet the silhouette exactly at the sideburns
        P.poly(np.concatenate([jaw, inner_p[::-1]]), _shades(ident).beard)
    elif fh == "goatee":
        t = np.linspace(math.radians(58), math.radians(122), 9)
        chin = np.stack([a * np.cos(t), b * np.sin(t)], axis=1)
        top_x = np.linspace(0.28, -0.28, 5) * a
        top = P.project(np.stack([top_x, np.full(5, g.mouth_y + 0.08 * b)], axis=1))
        P.poly(np.concatenate([chin, top]), _shades(ident).beard)


def paint_moustache(P: _Painter, ident: Identity, g: _Layout) -> None:
    """The moustache (also part of a full beard), over the upper lip."""
    fh = FACIAL_HAIR[ident.facial_hair]
    if fh == "moustache" or fh == "beard":
        b, mw = g.b, g.mw
        mx = np.linspace(-1.08, 1.08, 9)
        m_lo = g.mouth_y - 0.065 * b - 0.05 * b * g.pose.smile * mx ** 2 + 0.04 * b * (mx ** 2)
        m_hi = m_lo - 0.07 * b * (1 - 0.6 * mx ** 2)
        P.poly(np.concatenate([np.stack([mx * mw, m_hi], 1), np.stack([mx * mw, m_lo], 1)[::-1]]), _shades(ident).beard, face=True)


# ------------------------------------------------------------------------------------ features

def paint_nose(P: _Painter, ident: Identity, g: _Layout) -> np.ndarray:
    """A bridge shadow, a tip and the nostril base; the tip stands out of the face by 0.3 a.
    Returns the tip in the posed head frame."""
    a, b, yaw, eye_y, nose_y = g.a, g.b, g.yaw, g.eye_y, g.nose_y
    skin, shades = ident.skin, _shades(ident)
    tip = P.project(np.array([[0.0, nose_y]]), 0.3 * a)[0]
    bridge_t = np.linspace(0, 1, 6)
    bridge = np.stack([0.07 * a * np.ones(6) * (1 - 0.4 * bridge_t), eye_y + 0.08 * b + bridge_t * (nose_y - eye_y - 0.12 * b)], axis=1)
    side_sign = 1.0 if yaw <= 0 else -1.0   # shade the side facing away from the viewer
    bridge[:, 0] *= side_sign
    bridge_p = P.project(bridge, bridge_t * 0.22 * a)
    P.line(bridge_p, shades.skin_dark, max(0.045 * a, 0.3))
    nose_w = 0.17 * a
    base_x = np.linspace(-1, 1, 7)
    base = np.stack([base_x * nose_w, nose_y + 0.035 * b * (1 - base_x ** 2) ** 0.5 - 0.01 * b], axis=1)
    base_p = P.project(base, 0.3 * a * (1 - 0.6 * np.abs(base_x)))
    tip_r = 0.09 * a
    P.poly(_arc(tip_r * math.cos(yaw) ** 0.5, tip_r * 0.8, 0, 2 * math.pi, 12, tip[0], tip[1] + 0.01 * b), _mix(skin, (255, 255, 255), 0.08))
    P.line(base_p, shades.skin_shadow, max(0.04 * a, 0.3))
    for s in (-1.0, 1.0):
        nost = P.project(np.array([[s * 0.45 * nose_w, nose_y + 0.02 * b]]), 0.22 * a)[0]
        P.poly(_arc(0.05 * a, 0.028 * b, 0, 2 * math.pi, 8, nost[0], nost[1]), _scaled(skin, 0.45))
    return tip


def paint_mouth(P: _Painter, ident: Identity, g: _Layout) -> _Mouth:
    """Lips, and the mouth's inside and teeth when open. t in [-1, 1] across; the corners rise with the smile;
    the gap grows with mouth_open."""
    a, b, mw, smile, mouth_open = g.a, g.b, g.mw, g.pose.smile, g.pose.mouth_open
    n = 13
    t = np.linspace(-1, 1, n)
    mid = g.mouth_y - smile * 0.09 * b * t ** 2 + smile * 0.02 * b
    gap = mouth_open * 0.16 * b
    env = np.sqrt(1 - t ** 2)
    inner_up = mid - 0.25 * gap * env
    inner_lo = mid + 0.75 * gap * env + 0.01 * b * env * max(smile, 0)
    ut = 0.055 * b
    lt = 0.075 * b
    outer_up = inner_up - ut * env * (1 - 0.35 * np.exp(-(t / 0.18) ** 2)) - 0.01 * b * env
    outer_lo = inner_lo + lt * env ** 0.8
    xs = t * mw
    lips_outer = np.concatenate([np.stack([xs, outer_up], 1), np.stack([xs, outer_lo], 1)[::-1][1:-1]])
    lips_inner = np.concatenate([np.stack([xs, inner_up], 1), np.stack([xs, inner_lo], 1)[::-1][1:-1]])
    P.poly(lips_outer, ident.lips, face=True)
    if mouth_open > 0.12:
        P.poly(lips_inner, (70, 22, 30), face=True)
        teeth_lo = inner_up + np.minimum(0.045 * b, 0.4 * gap) * env
        P.poly(np.concatenate([np.stack([xs * 0.8, inner_up], 1), np.stack([xs * 0.8, teeth_lo], 1)[::-1]]), (242, 240, 232), face=True)
    P.line(np.stack([xs, (inner_up + inner_lo) / 2 if mouth_open <= 0.12 else inner_up], 1), _scaled(ident.lips, 0.6),
           max(0.025 * a, 0.3), face=True)
    return _Mouth(xs=xs, mid=mid, outer=lips_outer, inner=lips_inner)


def paint_eye(P: _Painter, ident: Identity, g: _Layout, s: float) -> tuple[np.ndarray, np.ndarray]:
    """The eye on side ``s`` (-1: image left, 1: image right): sclera, iris, pupil, then skin lids cover what
    lies outside the lids. Returns the eye contour (every other point) and the eye centre, in image pixels."""
    a, ew, eye_y = g.a, g.ew, g.eye_y
    eh = ew * 0.6 * g.pose.eye_open
    ir = ew * 0.52
    te = np.linspace(-1, 1, 11)
    ecx = s * g.ex
    # upper lid peaks a bit toward the nose-far side; lower lid is flatter
    upper = np.stack([ecx + te * ew, eye_y - eh * (1 - te ** 2) ** 0.7 * (1 + 0.12 * s * te)], 1)
    lower = np.stack([ecx + te * ew, eye_y + 0.7 * eh * (1 - te ** 2) ** 0.9], 1)
    contour = np.concatenate([upper, lower[::-1][1:-1]])
    P.poly(contour, (246, 246, 240), face=True)
    gaze = g.pose.gaze
    icx, icy = ecx + gaze[0] * ew * 0.35, eye_y + gaze[1] * eh * 0.2
    P.poly(_arc(ir, ir, 0, 2 * math.pi, 14, icx, icy), ident.eyes, face=True)
    P.poly(_arc(ir * 0.45, ir * 0.45, 0, 2 * math.pi, 10, icx, icy), (12, 10, 10), face=True)
    cover = 1.15 * ir + 0.03 * a
    P.poly(np.concatenate([upper, (upper - [0, cover])[::-1]]), ident.skin, face=True)
    P.poly(np.concatenate([lower, (lower + [0, cover])[::-1]]), ident.skin, face=True)
    P.line(upper, (30, 22, 22), max(0.05 * a, 0.35), face=True)
    P.line(lower[2:-2], _shades(ident).skin_shadow, max(0.02 * a, 0.25), face=True)
    return P.to_image(P.project(contour[::2])), P.to_image(P.project(np.array([[ecx, eye_y]])))[0]


def paint_brow(P: _Painter, ident: Identity, g: _Layout, s: float) -> np.ndarray:
    """The brow over the eye on side ``s``: an arched band from image-left to image-right, thicker at the inner
    (nose) end. Returns its centre line in image pixels."""
    a, b, ew = g.a, g.b, g.ew
    ecx = s * g.ex
    bw = ew * 1.35
    tb = np.linspace(-1, 1, 8)
    inner = -s * tb                          # 1 at the inner end, -1 at the outer end
    brow_y = g.eye_y - ew * 0.75 - 0.05 * b - g.pose.brow_raise * 0.07 * b
    centre = np.stack([ecx + tb * bw, brow_y - 0.06 * b * (1 - ((inner + 0.2) / 1.2) ** 2) + 0.015 * b * inner], 1)
    thick = ident.brow_thickness * a * (0.78 + 0.22 * inner)
    P.poly(_band(P.project(centre), thick), ident.brows)
    return P.to_image(P.project(centre))


def paint_glasses(P: _Painter, ident: Identity, g: _Layout) -> None:
    """Round or square rims with arms to the sides of the head and a bridge, if the person wears glasses."""
    if not ident.glasses:
        return
    a, b, ew, ex, eye_y = g.a, g.b, g.ew, g.ex, g.eye_y
    rx, ry = ew * 1.45, ew * 1.1
    for s in (-1.0, 1.0):
        if GLASSES[ident.glasses] == "round":
            rim = _arc(rx, ry, 0, 2 * math.pi, 20, s * ex, eye_y)
        else:
            tt = np.linspace(0, 2 * math.pi, 24, endpoint=False)
            c, sn = np.cos(tt), np.sin(tt)
            rim = np.stack([s * ex + rx * np.sign(c) * np.abs(c) ** 0.35, eye_y + ry * np.sign(sn) * np.abs(sn) ** 0.35], 1)
        P.line(rim, ident.frame, max(0.055 * a, 0.4), face=True, closed=True)
        arm = np.array([[s * (ex + rx), eye_y], [s * 0.99 * a, eye_y - 0.02 * b]])
        P.line(arm, ident.frame, max(0.05 * a, 0.4), face=True)
    P.line(np.array([[-ex + rx, eye_y - 0.05 * b], [0, eye_y - 0.08 * b], [ex - rx, eye_y - 0.05 * b]]),
           ident.frame, max(0.05 * a, 0.4), face=True)
