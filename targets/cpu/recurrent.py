"""Compiled recurrent layers: a quantized LSTM/GRU (passes/rnn.py's Scan form) as one call into the kernel library.

:func:`recurrent_layers` reads each layer the fake-quant model's metadata lists (``passes/rnn.METADATA_KEY``) back
from its Scan bodies: the integer weights and the float epilogues of its gate products (``IntegerGates``), and the
exact float32 code boundaries of its QuantizeLinear nodes (found by asking onnxruntime, as for a folded input
quantizer). Each gate product becomes an ordinary BitGemm :class:`LayerSpec` of the library (so it is built, run and
tested like any other), and ``templates/layer_rnn.c`` runs the time loop around them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompile.errors import QuantizationError

from .spec import LayerSpec

GATES = {"LSTM": 4, "GRU": 3}


@dataclass
class RecurrentLayer:
    """One quantized LSTM/GRU layer of a library: its geometry, code boundaries and gate products."""

    name: str
    cell: str
    direction: str
    hidden: int
    input_size: int
    linear_before_reset: bool
    bits_a: int
    x_thresholds: np.ndarray        # float32 [n]: code of x = #{k : x >= T[k]}
    h_thresholds: np.ndarray        # float32 [n]: the [-1, 1] grid (h, r*h, candidate, new h)
    h_values: np.ndarray            # float32 [n + 1]: a code's value on that grid, as the fake-quant model computes it
    sublayers: list[dict] = field(default_factory=list)   # per direction {"W": spec, "R": spec, "Rh": spec | None}
    inputs: dict = field(default_factory=dict)            # "x", "seq_lens", "h0", "c0" -> value names ("" absent)
    outputs: dict = field(default_factory=dict)           # "y", "y_h", "y_c"
    nodes: list[str] = field(default_factory=list)        # the fake-quant model's nodes this layer replaces

    @property
    def num_directions(self) -> int:
        return 2 if self.direction == "bidirectional" else 1

    def specs(self) -> list[LayerSpec]:
        return [s for d in self.sublayers for s in (d["W"], d["R"], d["Rh"]) if s is not None]

    def describe(self) -> str:
        return (f"{self.cell} {self.direction}, input {self.input_size}, hidden {self.hidden}, A{self.bits_a}"
                + (", linear_before_reset" if self.linear_before_reset else ""))


def gemm_spec(name: str, V: np.ndarray, mult: np.ndarray, bias: np.ndarray, bits_a: int, bits_w: int) -> LayerSpec:
    """A BitGemm with the float epilogue over integer weights V (= 2q - wzero2): any (q, wzero2) with the same V gives
    the same accumulator; wzero2 = -min V per row keeps q in [0, (max V - min V) / 2] (within the row's grid)."""
    V = np.asarray(V, np.int64)
    wz2 = -V.min(axis=1)
    q = (V + wz2[:, None]) // 2
    if (q.max() if q.size else 0) >= 1 << bits_w or ((V + wz2[:, None]) % 2).any():
        raise QuantizationError(f"recurrent layer {name!r}: weights are not on a {bits_w}-bit grid")
    return LayerSpec(name=name, op="gemm", bits_a=bits_a, bits_w=bits_w, w=q.astype(np.uint8),
                     wzero2=wz2.astype(np.int32), epilogue="float", mult=np.asarray(mult, np.float32),
                     bias=np.asarray(bias, np.float32))


def _code_fn(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x: str, y: str):
    from qcompile.input_quant import _quantizer_session

    return _quantizer_session(nodes, inits, x, y, [helper.make_opsetid("", 21)])


def grid_boundaries(bits: int, *, x_scale: float | None = None, x_zero: int = 0) -> np.ndarray:
    """The exact float32 code boundaries of the Scan form's quantizers: ``Min(QuantizeLinear(x, s, z), n)`` for x_t
    (x_scale given), else the [-1, 1] grid ``Min(QuantizeLinear(v * 0.5 + 0.5, 1/n, 0), n)``."""
    from qcompile.input_quant import code_thresholds

    n = (1 << bits) - 1
    f32 = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    u8 = lambda name, v: numpy_helper.from_array(np.asarray(v, np.uint8), name)    # noqa: E731
    if x_scale is not None:
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["c"]), helper.make_node("Min", ["c", "n"], ["y"])]
        inits = [f32("s", x_scale), u8("z", x_zero), u8("n", n)]
    else:
        nodes = [helper.make_node("Mul", ["x", "half"], ["m"]), helper.make_node("Add", ["m", "half"], ["u"]),
                 helper.make_node("QuantizeLinear", ["u", "s", "z"], ["c"]), helper.make_node("Min", ["c", "n"], ["y"])]
        inits = [f32("half", 0.5), f32("s", 1.0 / n), u8("z", 0), u8("n", n)]
    thr = code_thresholds(_code_fn(nodes, inits, "x", "y"), bits)
    if thr is None:
        raise QuantizationError(f"the {bits}-bit recurrent grid is not a step function onnxruntime agrees with")
    return thr


def grid_values(bits: int) -> np.ndarray:
    """Each code's value on the [-1, 1] grid in the fake-quant model's float32 order: (c * (1/n)) * 2 - 1."""
    n = (1 << bits) - 1
    c = np.arange(n + 1, dtype=np.float32)
    return (c * np.float32(1.0 / n)) * np.float32(2) - np.float32(1)


def _body_constants(scan: onnx.NodeProto) -> dict[str, np.ndarray]:
    body = next(a.g for a in scan.attribute if a.name == "body")
    return {t.name: numpy_helper.to_array(t) for t in body.initializer}


def recurrent_layers(model: onnx.ModelProto) -> list[RecurrentLayer]:
    """Every quantized recurrent layer of the fake-quant ``model`` (its metadata and Scan bodies)."""
    from qcompile.passes.rnn import METADATA_KEY

    raw = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    if not raw:
        return []
    nodes = {n.name: n for n in model.graph.node}
    out = []
    for meta in json.loads(raw):
        name, H, bits_a, bits_w = meta["name"], meta["hidden"], meta["bits_a"], meta["bits_w"]
        missing = [n for n in meta["nodes"] if n not in nodes]
        if missing:
            raise QuantizationError(f"recurrent layer {name!r}: the model's metadata names nodes it lacks "
                                    f"({missing[0]!r}); re-export the model")
        scans = [nodes[n] for n in meta["nodes"] if nodes[n].op_type == "Scan"]
        gru_rh = meta["cell"] == "GRU" and not meta["linear_before_reset"]
        sub = []
        for d, scan in enumerate(scans):
            k = _body_constants(scan)
            q = f"{meta['prefix']}_d{d}"

            def parts(tag):  # (V, m, b) of one product of the body's integer form
                if f"{q}_{tag}_V" not in k:
                    raise QuantizationError(f"recurrent layer {name!r}: its Scan body lacks the integer form "
                                            f"({q}_{tag}_V); compile it again with this qcompile")
                return np.rint(k[f"{q}_{tag}_V"].T).astype(np.int64), k[f"{q}_{tag}_m"], k[f"{q}_{tag}_b"]

            def product(what, *tags):  # one BitGemm over the rows of the products `tags`
                V, m, b = (np.concatenate(a) for a in zip(*(parts(t) for t in tags)))
                return gemm_spec(f"{name}/d{d}/{what}", V, m, b, bits_a, bits_w)

            W = product("W", "xw")
            if meta["cell"] == "LSTM":
                R, Rh = product("R", "hr"), None
            elif gru_rh:
                R, Rh = product("R", "hzr"), product("Rh", "rec")
            else:  # linear_before_reset: all three blocks read h's codes: one call
                R, Rh = product("R", "hzr", "hh"), None
            sub.append({"W": W, "R": R, "Rh": Rh})
        out.append(RecurrentLayer(
            name=name, cell=meta["cell"], direction=meta["direction"], hidden=H, input_size=meta["input_size"],
            linear_before_reset=bool(meta["linear_before_reset"]), bits_a=bits_a,
            x_thresholds=grid_boundaries(bits_a, x_scale=meta["x_scale"], x_zero=meta["x_zero"]),
            h_thresholds=grid_boundaries(bits_a), h_values=grid_values(bits_a), sublayers=sub,
            inputs=meta["inputs"], outputs=meta["outputs"], nodes=list(meta["nodes"])))
    return out
