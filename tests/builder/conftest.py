"""Fixtures of the shard-builder tests: the tiny insightface analyzer (a bright square on the detector's stride-32
grid is a "face" with an exact box)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import onnx_models  # noqa: E402

from realisid.faces import load_face_analyzer  # noqa: E402

DET = {"kind": "insightface", "det_size": [256, 256], "det_thresh": 0.3}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    onnx_models.make_scrfd(str(d / "det_tiny.onnx"))
    onnx_models.make_arcface(str(d / "w_tiny.onnx"), dim=64)
    onnx_models.make_landmark_106(str(d / "2d106_tiny.onnx"))
    return str(d)


@pytest.fixture(scope="module")
def face_cfg(model_dir):
    return {**DET, "model_dir": model_dir}


@pytest.fixture(scope="module")
def analyzer(face_cfg):
    # det_size 256: an image whose long side is 256 is fed at scale 1, so a white 32-px square on the 32-px
    # grid fills one stride-32 cell and is found with exactly that box; long side 128 -> scale 2 (16-px faces)
    return load_face_analyzer(face_cfg)
