"""Drawing primitives: the head-frame painter, arcs and bands, the pixel grid and the supersampling factor.

Drawing is done with ``PIL.ImageDraw`` polygons on a supersampled canvas that is box-downscaled at the
end (antialiasing); backgrounds are computed at the final resolution with analytic soft edges.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from PIL import ImageDraw

from .identity import RGB


_DEPTH = 0.85                    # face ellipsoid depth in units of the head half-width


def _arc(rx: float, ry: float, t0: float, t1: float, n: int, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = np.linspace(t0, t1, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _band(line: np.ndarray, width: np.ndarray | float) -> np.ndarray:
    """A closed polygon of ``width`` (scalar or per point) around a polyline."""
    d = np.gradient(line, axis=0)
    nrm = np.stack([-d[:, 1], d[:, 0]], axis=1)
    nrm /= np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-9)
    w = np.broadcast_to(np.asarray(width, dtype=np.float64), (len(line),))[:, None] / 2
    return np.concatenate([line + nrm * w, (line - nrm * w)[::-1]])


class _Painter:
    """Maps head-frame points to the supersampled canvas and draws them."""

    def __init__(self, draw: ImageDraw.ImageDraw, ss: int, centre: tuple[float, float], a: float, b: float,
                 yaw: float, pitch: float, roll: float, body_roll: float):
        self.draw, self.ss, self.a, self.b = draw, ss, a, b
        self.c = np.asarray(centre, dtype=np.float64)
        self.cy, self.sy = math.cos(yaw), math.sin(yaw)
        self.cp, self.sp = math.cos(pitch), math.sin(pitch)
        self.rot = self._rot(roll)
        self.body_rot = self._rot(body_roll)

    @staticmethod
    def _rot(angle: float) -> np.ndarray:
        c, s = math.cos(angle), math.sin(angle)
        return np.array([[c, -s], [s, c]])

    def project(self, pts: np.ndarray, extra_depth: np.ndarray | float = 0.0) -> np.ndarray:
        """Points on the face surface (head frame, before yaw/pitch) to the posed head frame."""
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        x, y = pts[:, 0], pts[:, 1]
        z = _DEPTH * self.a * np.sqrt(np.clip(1 - (x / self.a) ** 2 - (y / self.b) ** 2, 0, None)) + extra_depth
        x1 = x * self.cy + z * self.sy
        z1 = -x * self.sy + z * self.cy
        y1 = y * self.cp - z1 * self.sp
        return np.stack([x1, y1], axis=1)

    def to_image(self, pts: np.ndarray, body: bool = False) -> np.ndarray:
        """Posed head-frame points to image pixels (continuous, pixel i covers [i, i + 1))."""
        rot = self.body_rot if body else self.rot
        return np.asarray(pts, dtype=np.float64).reshape(-1, 2) @ rot.T + self.c

    def _canvas(self, pts: np.ndarray, face: bool, body: bool) -> list[float]:
        if face:
            pts = self.project(pts)
        q = self.to_image(pts, body) * self.ss - 0.5   # PIL vertices sit on pixel centres
        return q.ravel().tolist()                      # flat [x0, y0, x1, y1, ...]

    def poly(self, pts: np.ndarray, fill: RGB, face: bool = False, body: bool = False) -> None:
        self.draw.polygon(self._canvas(pts, face, body), fill=fill)

    def poly_pixels(self, pts: np.ndarray, fill: RGB) -> None:
        """A polygon given in image pixels (for shapes whose points come from different frames)."""
        self.draw.polygon((np.asarray(pts, dtype=np.float64) * self.ss - 0.5).ravel().tolist(), fill=fill)

    def line(self, pts: np.ndarray, fill: RGB, width: float, face: bool = False, closed: bool = False) -> None:
        xy = self._canvas(pts, face, False)
        if closed:
            xy = xy + xy[:2]
        w = max(int(round(width * self.ss)), 1)
        self.draw.line(xy, fill=fill, width=w, joint="curve")


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy, xx)`` of a ``size x size`` image (read-only, shared)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _supersample(image_size: int) -> int:
    """The canvas supersampling factor for an image edge of ``image_size`` pixels."""
    return 4 if image_size <= 192 else (2 if image_size <= 512 else 1)
