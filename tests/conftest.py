import sys
from pathlib import Path

import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from graphs import tiny_cnn, tiny_inputs  # noqa: E402


@pytest.fixture
def tiny_model_path(tmp_path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(), path)
    return path


@pytest.fixture
def tiny_calib():
    return tiny_inputs(64, seed=3)
