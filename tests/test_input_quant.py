"""The folded input quantizer: exact float32 boundaries of onnxruntime's Clip -> QuantizeLinear."""

import numpy as np
import pytest
from onnx import helper, numpy_helper

from qcompile.input_quant import _from_key, _key, clip_quantize_thresholds, code_thresholds

OPSETS = [helper.make_opsetid("", 17)]


def test_float_order_keys_round_trip_and_sort():
    x = np.array([-np.inf, -3.5, -1e-45, -0.0, 0.0, 1e-45, 2.5, np.finfo(np.float32).max, np.inf], np.float32)
    assert np.array_equal(_from_key(_key(x)).view(np.int32), x.view(np.int32))
    assert np.all(np.diff(_key(x)) >= 0) and _key(np.float32(-0.0)) + 1 == _key(np.float32(0.0))


def test_boundaries_of_a_rounding_step_function():
    code = lambda v: np.clip(np.rint(np.asarray(v, np.float32) / np.float32(0.3)), 0, 3).astype(np.int64)  # noqa: E731
    thr = code_thresholds(code, 2)
    for k, t in enumerate(thr, start=1):
        assert code(np.array([t]))[0] >= k > code(np.nextafter(np.array([t]), np.float32(-np.inf)))[0]


def test_levels_never_reached_and_reached_everywhere():
    thr = code_thresholds(lambda v: np.where(np.asarray(v) > 1, 1, 0) + 1, 2)  # never 0, never 3
    assert thr[0] == -np.inf and np.isnan(thr[2]) and thr[1] == np.nextafter(np.float32(1), np.float32(2))


def test_a_map_that_depends_on_position_is_refused():
    def code(v):  # a "vector body" and a "scalar tail" that round differently
        out = (np.asarray(v) >= 0.5).astype(np.int64)
        out[-3:] = np.asarray(v)[-3:] > 0.5
        return out
    assert code_thresholds(code, 1) is None


@pytest.mark.parametrize("scale, hi", [(1.7 / 3, 1.7), (0.1, 0.25), (2.0, 6.0)])
def test_onnxruntime_clip_quantize_boundaries_reproduce_it(scale, hi):
    import onnxruntime as ort
    inits = {t.name: t for t in [numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(hi), "hi"),
                                 numpy_helper.from_array(np.float32(scale), "s"), numpy_helper.from_array(np.uint8(0), "z")]}
    clip = helper.make_node("Clip", ["v", "lo", "hi"], ["c"])
    quant = helper.make_node("QuantizeLinear", ["c", "s", "z"], ["y"])
    thr = clip_quantize_thresholds(clip, quant, inits, 2, OPSETS)
    assert thr is not None and thr.dtype == np.float32
    graph = helper.make_graph([clip, quant], "g", [helper.make_tensor_value_info("v", 1, ["n"])],
                              [helper.make_tensor_value_info("y", 2, ["n"])], list(inits.values()))
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=OPSETS).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(-1, hi * 1.2, 100_000).astype(np.float32)
    np.testing.assert_array_equal(sess.run(None, {"v": x})[0], (x[:, None] >= thr).sum(axis=1))


def test_codes_past_the_bits_are_not_folded():
    inits = {t.name: t for t in [numpy_helper.from_array(np.float32(2.0), "s"), numpy_helper.from_array(np.uint8(0), "z")]}
    quant = helper.make_node("QuantizeLinear", ["c", "s", "z"], ["y"])  # no Clip: codes up to 255, not 2 bits
    assert clip_quantize_thresholds(None, quant, inits, 2, OPSETS) is None


def test_a_per_channel_or_non_constant_quantizer_is_not_folded():
    inits = {t.name: t for t in [numpy_helper.from_array(np.ones(3, np.float32), "s"),
                                 numpy_helper.from_array(np.zeros(3, np.uint8), "z")]}
    quant = helper.make_node("QuantizeLinear", ["c", "s", "z"], ["y"], axis=0)
    assert clip_quantize_thresholds(None, quant, inits, 2, OPSETS) is None
    assert clip_quantize_thresholds(None, helper.make_node("QuantizeLinear", ["c", "s2", "z"], ["y"]), inits, 2,
                                    OPSETS) is None
