import math

import numpy as np
import pytest

from realisid.geometry import (DEFAULT_BINS, bins_from_config, box_at_scale, box_iou, expand_square_box, face_size, parse_box,
                               points_to_crop, scale_bin, square_window)


@pytest.mark.parametrize("box,factor,wh,multiple,expected", [
    ((10, 10, 30, 40), 1.5, (100, 100), 1, (0, 3, 45, 48)),       # left border: shifted right, not shrunk
    ((10, 10, 30, 40), 1.5, (100, 100), 2, (0, 2, 46, 48)),       # side rounded up to the grid, corners on it
    ((40, 40, 60, 60), 1.6, (100, 100), 8, (32, 32, 64, 64)),     # centred, 32 = ceil(32/8)*8
    ((90, 40, 100, 50), 2.0, (100, 100), 1, (80, 35, 100, 55)),   # right border
    ((0, 0, 100, 100), 2.0, (100, 100), 1, (0, 0, 100, 100)),     # larger than the image: capped at the image
    ((40, 20, 60, 40), 4.0, (100, 60), 1, (20, 0, 80, 60)),       # non-square image: capped at the short side
    ((95, 95, 99, 99), 1.0, (100, 100), 8, (88, 88, 96, 96)),     # tiny face in the corner: one grid cell, inside
])
def test_expand_square_box(box, factor, wh, multiple, expected):
    out = expand_square_box(box, factor, *wh, multiple=multiple)
    assert out == expected
    x0, y0, x1, y1 = out
    assert x1 - x0 == y1 - y0 and 0 <= x0 and 0 <= y0 and x1 <= wh[0] and y1 <= wh[1]
    assert all(v % multiple == 0 for v in out)


@pytest.mark.parametrize("box,scale,wh,expected", [
    ((3, 5, 9, 12), 0.5, (16, 16), (1, 2, 5, 6)),
    ((7, 7, 8, 8), 0.25, (8, 8), (1, 1, 2, 2)),       # smaller than a cell: still one cell
    ((30, 30, 32, 32), 0.125, (4, 4), (3, 3, 4, 4)),  # at the border of the coarsest level
    ((0, 0, 32, 32), 1.0, (32, 32), (0, 0, 32, 32)),
])
def test_box_at_scale(box, scale, wh, expected):
    assert box_at_scale(box, scale, *wh) == expected


def test_points_to_crop_exact():
    pts = np.array([[20, 30], [10, 20], [50, 60]], dtype=np.float32)
    out = points_to_crop(pts, (10, 20, 50, 60), 80)
    np.testing.assert_allclose(out, [[20, 20], [0, 0], [80, 80]])


def test_face_size_and_bins():
    assert face_size((0, 0, 16, 32), 128, 128) == 0.25
    assert scale_bin(0.25) == "large"
    assert scale_bin(0.2499) == "medium"
    assert scale_bin(1 / 6) == "medium"
    assert scale_bin(0.16) == "small"
    assert scale_bin(0.125) == "small"
    assert scale_bin(0.1249) == "tiny"
    assert scale_bin(0.0) == "tiny"
    # the paper's sizes 1/4 .. 1/7
    assert [scale_bin(1 / k) for k in (4, 5, 6, 7)] == ["large", "medium", "medium", "small"]
    bins = bins_from_config({"_open_": True, "a": [0, 0.5], "b": [0.5, None]})
    assert bins == {"a": (0.0, 0.5), "b": (0.5, math.inf)}
    with pytest.raises(ValueError, match="falls in no bin"):
        scale_bin(0.9, {"a": (0.0, 0.5)})
    assert set(DEFAULT_BINS) == {"tiny", "small", "medium", "large"}


def test_square_window_keeps_face():
    assert square_window(200, 100, (150, 10, 190, 60)) == (100, 0, 200, 100)
    assert square_window(100, 200, (10, 10, 30, 30)) == (0, 0, 100, 100)
    assert square_window(100, 100, (10, 10, 30, 30)) == (0, 0, 100, 100)


def test_iou_and_parse_box():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert parse_box("1,2,3,4.5") == (1, 2, 3, 4.5)
    for bad in ("1,2,3", "a,b,c,d", "5,5,1,1"):
        with pytest.raises(ValueError, match="box"):
            parse_box(bad)
