"""The synthetic face analyzer's geometry: targets and decoding agree, augmentations move boxes with pixels."""
import numpy as np
import pytest
import torch

from realisid.embedded import analyzer as D


def _outputs_for(boxes, kps, cells=32):
    """Network outputs that say exactly these faces (logits +20 at each centre cell, -20 elsewhere)."""
    b = torch.tensor(boxes, dtype=torch.float32)[None]
    k = torch.tensor(kps, dtype=torch.float32)[None]
    valid = torch.ones(1, len(boxes), dtype=torch.bool)
    index, size, offset, rel, _ = D.regression_targets(b, k, valid, cells)
    out = {"heat": torch.full((1, 1, cells, cells), -20.0), "size": torch.zeros(1, 2, cells, cells),
           "offset": torch.zeros(1, 2, cells, cells), "kps": torch.zeros(1, 10, cells, cells)}
    for j in range(len(boxes)):
        i, c = divmod(int(index[0, j]), cells)
        out["heat"][0, 0, i, c] = 20.0
        out["size"][0, :, i, c] = size[0, j]
        out["offset"][0, :, i, c] = offset[0, j]
        out["kps"][0, :, i, c] = rel[0, j]
    return out


def test_decode_inverts_the_regression_targets():
    boxes = [[10.0, 20.0, 26.0, 40.0], [70.5, 60.25, 118.0, 121.0]]
    kps = [[[14, 27], [22, 27], [18, 32], [15, 36], [21, 36]], [[82, 80], [104, 80], [93, 95], [85, 105], [101, 105]]]
    faces = D.decode(_outputs_for(boxes, kps), threshold=0.5)[0]
    assert len(faces) == 2
    got = sorted(faces, key=lambda f: f["bbox"][0])
    for f, b, k in zip(got, boxes, kps):
        np.testing.assert_allclose(f["bbox"], b, atol=1e-3)
        np.testing.assert_allclose(f["kps"], k, atol=1e-3)
        assert f["score"] > 0.99


def test_heat_targets_peak_at_each_face_centre():
    boxes = torch.tensor([[[8.0, 8.0, 24.0, 24.0], [64.0, 64.0, 128.0, 128.0]]])
    heat = D.gaussian_targets(boxes, torch.ones(1, 2, dtype=torch.bool), 32)
    assert heat[0, 0, 4, 4] == 1.0 and heat[0, 0, 24, 24] == 1.0 and int((heat == 1).sum()) == 2
    assert heat[0, 0, 0, 31] < 1e-3


def test_focal_loss_prefers_the_right_map():
    target = D.gaussian_targets(torch.tensor([[[40.0, 40.0, 60.0, 60.0]]]), torch.ones(1, 1, dtype=torch.bool), 32)
    right = torch.where(target == 1, torch.tensor(6.0), torch.tensor(-6.0))
    wrong = torch.roll(right, shifts=8, dims=-1)
    assert D.focal_loss(right, target) < 0.1 < D.focal_loss(wrong, target)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_augmented_boxes_and_points_follow_the_pixels(seed):
    """White faces on black images: after mosaics, zooms and flips every box still frames white pixels, and the
    marked left-eye point stays on the left-eye marker."""
    n, S = 12, 128
    rng = np.random.default_rng(seed)
    images = torch.zeros(n, 3, S, S, dtype=torch.uint8)
    boxes, kps = torch.zeros(n, 4), torch.zeros(n, 5, 2)
    for i in range(n):
        side = int(rng.integers(20, 60))
        x0, y0 = (int(v) for v in rng.integers(0, S - side, 2))
        images[i, :, y0:y0 + side, x0:x0 + side] = 255
        boxes[i] = torch.tensor([x0, y0, x0 + side, y0 + side], dtype=torch.float32)
        pts = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]]) * side + [x0, y0]
        kps[i] = torch.from_numpy(pts).float()
        ex, ey = int(pts[0, 0]), int(pts[0, 1])
        images[i, 0, ey - 2:ey + 2, ex - 2:ex + 2] = 0  # a cyan marker at the image-left eye
    g = torch.Generator().manual_seed(seed)
    x, b, k, valid = D.make_batch(images, boxes, kps, 24, g, mosaic_p=0.4, zoom_p=0.4)
    assert x.shape == (24, 3, S, S) and bool(valid[:, 0].all())
    for j in range(24):
        for q in range(D.MAX_FACES):
            if not bool(valid[j, q]):
                continue
            x0, y0, x1, y1 = b[j, q].tolist()
            inner = x[j, 1, int(y0) + 2:int(y1) - 2, int(x0) + 2:int(x1) - 2]
            assert float(inner.mean()) > 0.3, (j, q)  # the (brightness-jittered) white square
            # the marked eye is point 0, or point 1 after a flip (insightface order is by image side)
            on_marker = [float(x[j, 0, int(ey), int(ex)]) < float(x[j, 1, int(ey), int(ex)]) - 0.3 for ex, ey in k[j, q, :2].tolist()]
            assert sum(on_marker) == 1, (j, q, on_marker)
            assert k[j, q, 0, 0] < k[j, q, 1, 0]  # the image-left eye stays left of the other after flips


def test_negatives_have_no_face_to_find_and_faceless_only_touches_the_face():
    import torch

    from realisid.embedded.analyzer import faceless, make_batch

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 64, 64), generator=g).float()
    boxes = torch.tensor([[16.0, 16.0, 40.0, 40.0]]).repeat(6, 1)
    kps = torch.full((6, 5, 2), 28.0)
    x, b, k, valid = make_batch(images, boxes, kps, 12, g, negative_p=1.0)
    assert x.shape == (12, 3, 64, 64) and not bool(valid.any())
    x, b, k, valid = make_batch(images, boxes, kps, 12, g, negative_p=0.0)
    assert bool(valid[:, 0].all())
    out = faceless(images[0], boxes[0], cells=1)
    assert torch.equal(out[:, :8], images[0][:, :8]) and torch.equal(out[:, :, 50:], images[0][:, :, 50:])
    face = out[:, 16:40, 16:40]
    assert float(face.std(dim=(1, 2)).max()) < 1e-3  # one cell: the face is one flat colour
    assert float(images[0][:, 16:40, 16:40].std()) > 50
