"""Recurrent layers: ONNX LSTM / GRU as one internal representation, and its numpy reference.

:func:`recurrent_spec` reads an ONNX ``LSTM`` or ``GRU`` node (forward, reverse, bidirectional; optional sequence
lengths and initial states; both ``linear_before_reset`` values; ``layout`` 0 or 1) into a :class:`RecurrentSpec`:
per direction the input-to-hidden weights W [G*H, I], hidden-to-hidden R [G*H, H] and biases, with the gates in
ONNX's order (LSTM i, o, f, c; GRU z, r, h). What the recipe does not cover (other activation functions, ``clip``,
``input_forget``, peepholes) is refused with a message naming the node, so the layer stays float and is reported.

:func:`run` is the one reference of the cell arithmetic, in float (``quant=None``: equal to onnxruntime's own
LSTM/GRU, tested) and later with the RNN paper's quantization points (papers.md §3.3), which the fake-quant model
and the compiled kernels are checked against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qcompile.errors import QuantizationError

GATES = {"LSTM": 4, "GRU": 3}
DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"]}


class UnsupportedRecurrent(QuantizationError):
    """A recurrent node outside the recipe: kept in float, and the report says why."""


@dataclass
class RecurrentSpec:
    name: str
    cell: str                       # "LSTM" or "GRU"
    direction: str                  # "forward", "reverse" or "bidirectional"
    hidden: int
    W: np.ndarray                   # [D, G*H, I] float32
    R: np.ndarray                   # [D, G*H, H]
    Wb: np.ndarray                  # [D, G*H] input bias
    Rb: np.ndarray                  # [D, G*H] recurrence bias
    linear_before_reset: bool = False
    layout: int = 0                 # 0: [seq, batch, ...]; 1: [batch, seq, ...]
    inputs: dict = field(default_factory=dict)   # "x", "seq_lens", "h0", "c0" -> value names ("" when absent)
    outputs: dict = field(default_factory=dict)  # "y", "y_h", "y_c" -> value names ("" when absent)

    @property
    def num_directions(self) -> int:
        return 2 if self.direction == "bidirectional" else 1

    @property
    def input_size(self) -> int:
        return self.W.shape[2]

    def describe(self) -> str:
        return (f"{self.cell} {self.direction}, input {self.input_size}, hidden {self.hidden}"
                + (", linear_before_reset" if self.linear_before_reset else ""))


def _attrs(node) -> dict:
    """Attributes of an onnx.NodeProto or an onnx_ir node, as Python values."""
    from onnx import helper

    if hasattr(node, "attribute"):
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: (v.value if hasattr(v, "value") else v) for k, v in node.attributes.items()}


def recurrent_spec(node, constant) -> RecurrentSpec:
    """The spec of ONNX ``LSTM``/``GRU`` ``node`` (an onnx.NodeProto); ``constant(name)`` returns an input's constant
    array or None. Raises UnsupportedRecurrent for what the recipe does not cover."""
    op = node.op_type
    who = f"{op} node {node.name or node.output[0]!r}"
    if op not in GATES:
        raise ValueError(f"{who}: not a recurrent op")
    a = _attrs(node)
    acts = [s.decode() if isinstance(s, bytes) else s for s in a.get("activations", [])]
    direction = a.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if acts and [x.lower() for x in acts] != [x.lower() for x in DEFAULT_ACTIVATIONS[op]] * (
            2 if direction == "bidirectional" else 1):
        raise UnsupportedRecurrent(f"{who}: activations {acts} (the recipe covers the default "
                                   f"{DEFAULT_ACTIVATIONS[op]}); kept in float")
    if a.get("clip") is not None:
        raise UnsupportedRecurrent(f"{who}: cell clip {a['clip']} is not covered; kept in float")
    if a.get("input_forget", 0):
        raise UnsupportedRecurrent(f"{who}: input_forget=1 (coupled input and forget gates) is not covered; "
                                   "kept in float")
    ins = list(node.input) + [""] * 8
    if op == "LSTM" and ins[7]:
        raise UnsupportedRecurrent(f"{who}: peephole weights (input P) are not covered; kept in float")
    W, R = constant(ins[1]), constant(ins[2])
    if W is None or R is None:
        raise UnsupportedRecurrent(f"{who}: weights W/R are not constants; kept in float")
    g = GATES[op]
    d, gh, _ = W.shape
    hidden = int(a.get("hidden_size", gh // g))
    if gh != g * hidden or R.shape != (d, g * hidden, hidden):
        raise UnsupportedRecurrent(f"{who}: weight shapes W {W.shape}, R {R.shape} do not match hidden_size "
                                   f"{hidden}")
    B = constant(ins[3]) if ins[3] else np.zeros((d, 2 * g * hidden), np.float32)
    if B is None:
        raise UnsupportedRecurrent(f"{who}: bias B is not a constant; kept in float")
    for i, what in ((4, "sequence_lens"), (5, "initial_h"), (6, "initial_c")):
        if ins[i] and constant(ins[i]) is None and not isinstance(ins[i], str):
            raise UnsupportedRecurrent(f"{who}: {what} is not a graph value")
    outs = list(node.output) + [""] * 3
    return RecurrentSpec(
        name=node.name or node.output[0], cell=op, direction=direction, hidden=hidden,
        W=np.asarray(W, np.float32), R=np.asarray(R, np.float32),
        Wb=np.asarray(B[:, :g * hidden], np.float32), Rb=np.asarray(B[:, g * hidden:], np.float32),
        linear_before_reset=bool(a.get("linear_before_reset", 0)), layout=int(a.get("layout", 0)),
        inputs={"x": ins[0], "seq_lens": ins[4], "h0": ins[5], "c0": ins[6] if op == "LSTM" else ""},
        outputs={"y": outs[0], "y_h": outs[1], "y_c": outs[2] if op == "LSTM" else ""})


def _sigmoid(x):
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def run(spec: RecurrentSpec, x: np.ndarray, seq_lens: np.ndarray | None = None, h0: np.ndarray | None = None,
        c0: np.ndarray | None = None, quant=None):
    """(Y [seq, D, batch, H], Y_h [D, batch, H], Y_c [D, batch, H] or None) of the layer, as ONNX defines them
    (layout 0; ``x`` [seq, batch, I]). Steps past a sequence's length leave its state alone and write zeros to Y.
    ``quant``: an object with ``act(name, v)`` applied at the quantization points (None: float)."""
    seq, batch, _ = x.shape
    H, D, g = spec.hidden, spec.num_directions, GATES[spec.cell]
    lens = np.full(batch, seq, np.int64) if seq_lens is None else np.asarray(seq_lens, np.int64)
    if (lens > seq).any() or (lens < 0).any():
        raise ValueError(f"{spec.name}: sequence_lens {lens.tolist()} outside 0..{seq} (the padded length)")
    Y = np.zeros((seq, D, batch, H), np.float32)
    Yh = np.zeros((D, batch, H), np.float32)
    Yc = np.zeros((D, batch, H), np.float32) if spec.cell == "LSTM" else None
    q = quant.act if quant is not None else (lambda name, v: v)
    for d in range(D):
        reverse = spec.direction == "reverse" or d == 1
        h = np.zeros((batch, H), np.float32) if h0 is None else h0[d].astype(np.float32).copy()
        c = np.zeros((batch, H), np.float32) if c0 is None else c0[d].astype(np.float32).copy()
        W, R, Wb, Rb = spec.W[d], spec.R[d], spec.Wb[d], spec.Rb[d]
        for t in range(seq):
            # reverse: each sequence runs from its own last valid step back to 0
            live = t < lens
            tt = np.where(live, (lens - 1 - t) if reverse else t, 0)
            xt = x[tt, np.arange(batch)]
            xw = q("x", xt) @ W.T + Wb
            hq = q("h", h)
            if spec.cell == "LSTM":
                gates = xw + hq @ R.T + Rb
                i, o, f, cc = (gates[:, k * H:(k + 1) * H] for k in range(4))
                c_new = _sigmoid(f) * c + _sigmoid(i) * np.tanh(cc)
                h_new = q("h_new", _sigmoid(o) * np.tanh(c_new))
                c = np.where(live[:, None], c_new, c).astype(np.float32)
            else:
                z = _sigmoid(xw[:, :H] + hq @ R[:H].T + Rb[:H])
                r = _sigmoid(xw[:, H:2 * H] + hq @ R[H:2 * H].T + Rb[H:2 * H])
                if spec.linear_before_reset:
                    cand = np.tanh(xw[:, 2 * H:] + r * (hq @ R[2 * H:].T + Rb[2 * H:]))
                else:
                    cand = np.tanh(xw[:, 2 * H:] + q("rh", r * h) @ R[2 * H:].T + Rb[2 * H:])
                cand = q("cand", cand)
                h_new = q("h_new", (1 - z) * cand + z * h)
            h = np.where(live[:, None], h_new, h).astype(np.float32)
            Y[tt[live], d, np.arange(batch)[live]] = h[live]
        Yh[d] = h
        if Yc is not None:
            Yc[d] = c
    return Y, Yh, Yc
