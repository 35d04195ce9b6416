import numpy as np
import pytest

from realisid.data.guidance import coarse_parts_from_kps, contour_map, location_map, square_face_box


def test_square_face_box():
    assert square_face_box((10, 20, 30, 60)) == (0, 20, 40, 60)


def test_location_map_binary_exact():
    m = location_map((2, 3, 6, 5), 8, 10, square=False)
    expected = np.zeros((8, 10), np.float32)
    expected[3:5, 2:6] = 1
    np.testing.assert_array_equal(m, expected)
    sq = location_map((2, 3, 6, 5), 8, 10)  # square box (2, 2, 6, 6)
    expected = np.zeros((8, 10), np.float32)
    expected[2:6, 2:6] = 1
    np.testing.assert_array_equal(sq, expected)
    # fractional corners: a pixel counts when its centre is inside
    np.testing.assert_array_equal(location_map((0.4, 0.4, 1.6, 1.6), 3, 3, square=False), [[1, 1, 0], [1, 1, 0], [0, 0, 0]])


def test_location_map_soft_peak_and_falloff():
    m = location_map((0, 0, 8, 8), 8, 8, soft=True)
    assert m.max() == pytest.approx(np.exp(-0.5 * 2 * (0.5 / 2) ** 2), rel=1e-5)  # pixel centres at 3.5/4.5, sigma 2
    assert m[3, 3] == m[4, 4] and m[0, 0] < m[2, 2] < m[3, 3]
    assert np.allclose(m, m.T)


def test_contour_map_draws_inside_crop_only_where_parts_are():
    kps = np.array([[40, 40], [60, 40], [50, 50], [42, 60], [58, 60]], np.float32)
    pe = contour_map(kps, None, (30, 30, 70, 70), 32)
    assert pe.shape == (32, 32, 3) and pe.dtype == np.uint8 and pe.sum() > 0
    ys, xs = np.nonzero(pe.sum(-1))
    # parts lie between brows (y ~ 40 - 0.33*20 = 33.4 -> crop 2.7) and mouth (y 60 -> crop 24)
    assert ys.min() >= 1 and ys.max() <= 27 and xs.min() >= 3 and xs.max() <= 28  # brows from x 4.8, anti-aliased
    moved = contour_map(kps + [5, 0], None, (30, 30, 70, 70), 32)
    assert np.nonzero(moved.sum(-1))[1].mean() > xs.mean() + 2  # moving the face moves the contours


def test_dense_landmarks_are_used_when_given():
    kps = np.array([[40, 40], [60, 40], [50, 50], [42, 60], [58, 60]], np.float32)
    dense = {"outer_lips": [[40, 62], [50, 66], [60, 62], [50, 58]]}
    pe = contour_map(kps, dense, (30, 30, 70, 70), 32)
    assert pe[..., 0].max() > 0 and pe[..., 1].max() == 0  # only the lips' red/blue, no eye green
    parts = coarse_parts_from_kps(kps)
    assert set(parts) == {"left_eye", "right_eye", "left_brow", "right_brow", "nose", "outer_lips"}
