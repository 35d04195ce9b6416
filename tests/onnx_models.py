"""Tiny ONNX models shaped like insightface's, so tests run the real insightface loading/routing code.

* :func:`make_arcface` - ArcFace-shaped recognition net: input ``N x 3 x 112 x 112``, one output ``N x dim``
  (strided conv + ReLU + flatten + Gemm with random weights).
* :func:`make_scrfd` - SCRFD-shaped detector with 9 outputs (strides 8/16/32, two anchors, keypoints) in
  the order insightface's ``SCRFD.forward`` decodes: 3 score maps, 3 box maps, 3 keypoint maps. Its
  "detection" is deterministic: at stride 32, an anchor's score is ``sigmoid(20 * mean - 10)`` of the
  normalised grey level of its 32x32 cell, so a white 32x32 cell (in detector input pixels) is a face whose
  box is exactly that cell and whose keypoints sit at :data:`SCRFD_KPS` (fractions of the cell). The other
  strides score ~0.
* :func:`make_landmark_106` - 2d106det-shaped landmark net (192x192 in, 212 out) predicting the fixed
  normalised points :func:`landmark_106_points`.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8

# Keypoints of the synthetic detector, as fractions of its 32-pixel cell (insightface order).
SCRFD_KPS = np.array([[0.3, 0.35], [0.7, 0.35], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]], dtype=np.float32)


def _save(graph: onnx.GraphProto, path: str) -> str:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="realisid-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name=name)


def make_arcface(path: str, dim: int = 512, size: int = 112, channels: int = 4, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    k = 8
    cells = (size // k) ** 2
    w_conv = rng.normal(0, 1.0 / np.sqrt(3 * k * k), (channels, 3, k, k)).astype(np.float32)
    b_conv = rng.normal(0, 0.1, (channels,)).astype(np.float32)
    w_fc = rng.normal(0, 1.0 / np.sqrt(channels * cells), (channels * cells, dim)).astype(np.float32)
    b_fc = np.zeros((dim,), np.float32)
    nodes = [
        helper.make_node("Conv", ["data", "w_conv", "b_conv"], ["c1"], name="conv0", kernel_shape=[k, k], strides=[k, k]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu0"),
        helper.make_node("Flatten", ["r1"], ["f1"], name="flatten0", axis=1),
        helper.make_node("Gemm", ["f1", "w_fc", "b_fc"], ["fc1"], name="fc0"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_arcface",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", dim])],
        [_const("w_conv", w_conv), _const("b_conv", b_conv), _const("w_fc", w_fc), _const("b_fc", b_fc)],
    )
    return _save(graph, path)


def make_scrfd(path: str, face_stride: int = 32) -> str:
    strides = (8, 16, 32)
    nodes = [helper.make_node("ReduceMean", ["input.1"], ["grey"], name="grey", axes=[1], keepdims=1)]
    inits = [
        _const("minus_one_by_one", np.array([-1, 1], np.int64)),
        _const("zero", np.array(0.0, np.float32)),
        _const("box_dist", np.array([[0.0, 0.0, 1.0, 1.0]], np.float32)),
        _const("kps_dist", SCRFD_KPS.reshape(1, 10)),
    ]
    scores, boxes, kpss = [], [], []
    for s in strides:
        gain, bias = (20.0, -10.0) if s == face_stride else (0.0, -20.0)
        inits += [_const(f"gain{s}", np.array(gain, np.float32)), _const(f"bias{s}", np.array(bias, np.float32))]
        nodes += [
            helper.make_node("AveragePool", ["grey"], [f"pool{s}"], name=f"pool{s}", kernel_shape=[s, s], strides=[s, s]),
            helper.make_node("Mul", [f"pool{s}", f"gain{s}"], [f"scaled{s}"], name=f"scale{s}"),
            helper.make_node("Add", [f"scaled{s}", f"bias{s}"], [f"logit{s}"], name=f"bias{s}"),
            helper.make_node("Sigmoid", [f"logit{s}"], [f"cell{s}"], name=f"sigmoid{s}"),
            helper.make_node("Reshape", [f"cell{s}", "minus_one_by_one"], [f"col{s}"], name=f"col{s}"),
            # two anchors per cell, cell-major like SCRFD's anchor centres
            helper.make_node("Concat", [f"col{s}", f"col{s}"], [f"pair{s}"], name=f"pair{s}", axis=1),
            helper.make_node("Reshape", [f"pair{s}", "minus_one_by_one"], [f"score_{s}"], name=f"score{s}"),
            helper.make_node("Mul", [f"score_{s}", "zero"], [f"nil{s}"], name=f"nil{s}"),
            helper.make_node("Add", [f"nil{s}", "box_dist"], [f"bbox_{s}"], name=f"bbox{s}"),
            helper.make_node("Add", [f"nil{s}", "kps_dist"], [f"kps_{s}"], name=f"kps{s}"),
        ]
        scores.append(helper.make_tensor_value_info(f"score_{s}", TensorProto.FLOAT, [f"n{s}", 1]))
        boxes.append(helper.make_tensor_value_info(f"bbox_{s}", TensorProto.FLOAT, [f"n{s}", 4]))
        kpss.append(helper.make_tensor_value_info(f"kps_{s}", TensorProto.FLOAT, [f"n{s}", 10]))
    graph = helper.make_graph(
        nodes, "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        scores + boxes + kpss, inits,
    )
    return _save(graph, path)


def landmark_106_points() -> np.ndarray:
    """The fixed prediction of :func:`make_landmark_106` in its normalised [-1, 1] crop coordinates:
    point ``i`` lies at ``x = -0.5 + i / 105``, ``y = 0.25 * sin(i)``, so each index is recognisable."""
    i = np.arange(106, dtype=np.float32)
    return np.stack([-0.5 + i / 105.0, 0.25 * np.sin(i)], axis=1).astype(np.float32)


def make_landmark_106(path: str) -> str:
    points = landmark_106_points().reshape(1, 212)
    nodes = [
        helper.make_node("ReduceMean", ["data"], ["m"], name="mean0", axes=[1, 2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["m", "axis1"], ["m1"], name="unsq0"),
        helper.make_node("Mul", ["m1", "zero"], ["nil"], name="nil0"),
        helper.make_node("Add", ["nil", "points"], ["fc1"], name="points0"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_2d106",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 192, 192])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 212])],
        [_const("axis1", np.array([1], np.int64)), _const("zero", np.array(0.0, np.float32)), _const("points", points)],
    )
    return _save(graph, path)
