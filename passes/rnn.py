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

import json
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


# ---------------------------------------------------------------------------------------------- quantization
def tanh_grid(v: np.ndarray, bits: int) -> np.ndarray:
    """A value in [-1, 1] (tanh ranges: h, the GRU candidate, r*h) on the 2^bits-level grid of [-1, 1]:
    u = v/2 + 1/2 quantized to round(n u)/n (the paper's Q on [0, 1]), back as 2u - 1. The codes round(n u) are
    what the bit kernels multiply: R h = (2/n) R codes - R 1."""
    n = (1 << bits) - 1
    u = np.clip(v.astype(np.float32) * np.float32(0.5) + np.float32(0.5), 0, 1)
    codes = np.rint(u * np.float32(n))          # QuantizeLinear's round-half-even, scale 1/n
    return (codes * np.float32(1.0 / n)).astype(np.float32) * np.float32(2) - np.float32(1)


@dataclass
class RecurrentQuant:
    """Where and how a recurrent layer is quantized (papers.md §3.3): the input x_t on a calibrated affine grid
    (``x_scale``, ``x_zero``: uint8 QuantizeLinear parameters), the hidden state feeding R, the GRU's r*h and
    candidate, and the new h on the [-1, 1] grid of ``bits_a`` bits; the LSTM's cell state stays float (it never
    feeds a matrix product). Weights W and R are replaced by their fake-quant values (``Wq``, ``Rq``)."""

    bits_a: int
    x_scale: float
    x_zero: int
    Wq: np.ndarray
    Rq: np.ndarray
    points: tuple = ("x", "h", "rh", "cand", "h_new")
    gates: list | None = None   # per direction IntegerGates: the products on codes (decompose's integer-exact form)

    @classmethod
    def of(cls, spec: "RecurrentSpec", bits_w: int, bits_a: int, quantizer: str, x_scale: float, x_zero: int):
        """The layer's quantization (weights through ``quantizer`` per gate row, their integer gate products) and
        the weights' QuantizedTensors: (RecurrentQuant, [(W tensor, R tensor) per direction])."""
        Wq, Rq, qts = quantize_weights(spec, bits_w, quantizer)
        gates = [IntegerGates.build(tw, tr, spec.Wb[d], spec.Rb[d], x_scale, x_zero, bits_a)
                 for d, (tw, tr) in enumerate(qts)]
        return cls(bits_a, x_scale, x_zero, Wq, Rq, gates=gates), qts

    def act(self, name: str, v: np.ndarray) -> np.ndarray:
        if name not in self.points:
            return v
        if name == "x":
            n = (1 << self.bits_a) - 1
            s = np.float32(self.x_scale)
            q = np.clip(np.rint(v.astype(np.float32) / s) + self.x_zero, 0, n)
            return ((q - self.x_zero).astype(np.float32) * s).astype(np.float32)
        return tanh_grid(v, self.bits_a)

    def quantized(self, spec: RecurrentSpec) -> RecurrentSpec:
        """The spec with its weights replaced by their fake-quant values (what run() multiplies)."""
        import dataclasses

        return dataclasses.replace(spec, W=self.Wq.astype(np.float32), R=self.Rq.astype(np.float32))

    def describe(self, spec: RecurrentSpec) -> str:
        pts = {"x": "x_t (affine, calibrated)", "h": "h_{t-1} into R", "rh": "r*h into R_h (GRU)",
               "cand": "candidate (GRU)", "h_new": "new h"}
        used = [pts[p] for p in self.points if spec.cell == "GRU" or p not in ("rh", "cand")]
        if spec.cell == "GRU" and spec.linear_before_reset:
            used = [u for u in used if not u.startswith("r*h")]
        return (f"A{self.bits_a} on " + ", ".join(used)
                + ("; cell state float" if spec.cell == "LSTM" else "; gates z, r float"))


def quantize_weights(spec: RecurrentSpec, bits_w: int, quantizer: str = "rnn-balanced"):
    """Per direction and gate row, W and R through a registry quantizer (per output row): the fake-quant values
    and the QuantizedTensors (integer codes for the kernels)."""
    from qcompile.quant import get

    q = get(quantizer)
    Wq, Rq, qts = [], [], []
    for d in range(spec.num_directions):
        tw = q.weights(spec.W[d], bits_w, 0, f"{spec.name}.W[{d}]")
        tr = q.weights(spec.R[d], bits_w, 0, f"{spec.name}.R[{d}]")
        Wq.append(tw.dequantize())
        Rq.append(tr.dequantize())
        qts.append((tw, tr))
    return np.stack(Wq), np.stack(Rq), qts


@dataclass
class IntegerGates:
    """One direction's gate products on integer codes, the form the bit kernels compute:
    ``W x_t = acc(Vw, x codes) * mw + bw`` and ``R h = acc(Vr, h codes) * mr + br`` with ``acc(V, p)[n] =
    sum_k V[n, k] p[k]`` exact in int32 and float32 (|acc| < 2^24), then one float32 rounding for the product and
    one for the sum, in that order. V = 2q - wzero2 (the weight codes' integer values; the real weight is
    scale[n]/2 * V). With x = s (p - z) and h = 2c/n - 1 on the [-1, 1] grid:
    mw = scale/2 * s, bw = Wb - mw z sum_k Vw; mr = scale/n, br = Rb - scale/2 sum_k Vr (biases in float64, then
    rounded once). The GRU's third block of R multiplies the codes of r*h (or of h with linear_before_reset)."""

    Vw: np.ndarray      # int32 [G*H, I]
    mw: np.ndarray      # float32 [G*H]
    bw: np.ndarray      # float32 [G*H]
    Vr: np.ndarray      # int32 [G*H, H]
    mr: np.ndarray      # float32 [G*H]
    br: np.ndarray      # float32 [G*H]

    @classmethod
    def build(cls, tw, tr, Wb: np.ndarray, Rb: np.ndarray, x_scale: float, x_zero: int, bits_a: int):
        """From the QuantizedTensors of W and R (per-row scale) and this direction's biases."""
        n = (1 << bits_a) - 1
        Vw, Vr = tw.int_values().astype(np.int32), tr.int_values().astype(np.int32)
        sw = np.broadcast_to(tw.scale.reshape(-1), (Vw.shape[0],)).astype(np.float64)
        sr = np.broadcast_to(tr.scale.reshape(-1), (Vr.shape[0],)).astype(np.float64)
        mw = (sw / 2 * np.float64(np.float32(x_scale))).astype(np.float32)
        bw = (Wb.astype(np.float64) - mw.astype(np.float64) * x_zero * Vw.sum(1)).astype(np.float32)
        mr = (sr / n).astype(np.float32)
        br = (Rb.astype(np.float64) - sr / 2 * Vr.sum(1)).astype(np.float32)
        return cls(Vw, mw, bw, Vr, mr, br)


def x_grid(x_min: float, x_max: float, bits: int) -> tuple[float, int]:
    """uint8 QuantizeLinear (scale, zero point) of an affine bits-bit grid over [min(x_min, 0), max(x_max, 0)]."""
    n = (1 << bits) - 1
    lo, hi = min(float(x_min), 0.0), max(float(x_max), 0.0)
    if hi - lo <= 0:
        hi = lo + 1.0
    scale = np.float32((hi - lo) / n)
    zero = int(np.clip(np.rint(-lo / scale), 0, n))
    return float(scale), zero


# ---------------------------------------------------------------------------------------------- ONNX form
METADATA_KEY = "qcompile.recurrent"   # model metadata: the quantized recurrent layers (lowering compiles them)


def scan_prefix(name: str) -> str:
    """Prefix of the names decompose gives a layer's constants (direction d's Scan body: prefix + f"_d{d}_...")."""
    return "".join(ch if ch.isalnum() else "_" for ch in name) + "_q"


def decompose(spec: RecurrentSpec, quant: RecurrentQuant | None = None, opset: int = 21):
    """The layer as ONNX ``Scan`` loops (one per direction) whose bodies compute the cell step by step; with
    ``quant`` (RecurrentQuant.of) the gate products are in integer-exact form (IntegerGates) on the codes of x_t, h
    and the GRU's r*h, the candidate and new h go through QuantizeLinear/DequantizeLinear: the fake-quant form
    onnxruntime runs. Returns
    (nodes, initializers); the nodes read spec.inputs and write spec.outputs (layout 0), so they replace the
    LSTM/GRU node in place. Equal to :func:`run` up to float summation order (a test)."""
    from onnx import TensorProto, helper, numpy_helper

    if spec.layout != 0:
        raise UnsupportedRecurrent(f"{spec.cell} node {spec.name!r}: layout=1 is not covered yet; kept in float")
    if quant is not None and quant.gates is None:
        raise ValueError(f"decompose {spec.name!r}: the quantized form needs the integer gate products "
                         "(RecurrentQuant.of)")
    H, g = spec.hidden, GATES[spec.cell]
    p = scan_prefix(spec.name)
    inits, nodes = [], []
    W, R = spec.W, spec.R   # the float form's weights (the quantized form multiplies integer ones: IntegerGates)

    def const(name, arr):
        if any(t.name == f"{p}_{name}" for t in inits):
            raise AssertionError(f"decompose: constant {name} added twice")
        inits.append(numpy_helper.from_array(np.asarray(arr), f"{p}_{name}"))
        return f"{p}_{name}"

    def node(op, ins, outs, **kw):  # named under the layer (metadata qcompile.recurrent lists them for lowering)
        nodes.append(helper.make_node(op, ins, outs, name=f"{spec.name}/{outs[0]}", **kw))
        return outs[0]

    x, lens, h0, c0 = (spec.inputs.get(k, "") for k in ("x", "seq_lens", "h0", "c0"))
    batch_like = node("Shape", [x], [f"{p}_xshape"])
    bshape = node("Slice", [batch_like, const("one", np.array([1], np.int64)), const("two", np.array([2], np.int64))],
                  [f"{p}_batch"])
    zeros_shape = node("Concat", [bshape, const("H", np.array([H], np.int64))], [f"{p}_zshape"], axis=0)
    zeros = node("ConstantOfShape", [zeros_shape], [f"{p}_zeros"],
                 value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]))
    if lens:
        seq = node("Slice", [batch_like, const("zero", np.array([0], np.int64)), const("one_", np.array([1], np.int64))],
                   [f"{p}_seq1"])
        seq_s = node("Squeeze", [seq, const("ax0", np.array([0], np.int64))], [f"{p}_seq"])
        steps = node("Range", [const("r0", np.array(0, np.int64)), seq_s, const("r1", np.array(1, np.int64))],
                     [f"{p}_steps"])
        lens64 = node("Cast", [lens], [f"{p}_lens64"], to=TensorProto.INT64)
        mask = node("Less", [node("Unsqueeze", [steps, const("ax1", np.array([1], np.int64))], [f"{p}_st2"]),
                             node("Unsqueeze", [lens64, const("ax0b", np.array([0], np.int64))], [f"{p}_l2"])],
                    [f"{p}_mask2"])
        mask = node("Unsqueeze", [mask, const("ax2", np.array([2], np.int64))], [f"{p}_mask"])   # [seq, B, 1]

    ys, yhs, ycs = [], [], []
    for d in range(spec.num_directions):
        reverse = spec.direction == "reverse" or d == 1
        q = f"{p}_d{d}"
        body_nodes, body_inits = [], []

        seen: set[str] = set()

        def bconst(name, arr):
            if name not in seen:  # shared constants (1/2, 2, 1) are added once
                seen.add(name)
                body_inits.append(numpy_helper.from_array(np.asarray(arr), f"{q}_{name}"))
            return f"{q}_{name}"

        def b(op, ins, outs, **kw):
            body_nodes.append(helper.make_node(op, ins, [f"{q}_{o}" for o in outs], name=f"{q}_{outs[0]}", **kw))
            return f"{q}_{outs[0]}"

        def tanh_codes(v, tag):  # the [-1, 1] grid's uint8 codes of v (tanh_grid)
            n = (1 << quant.bits_a) - 1
            u = b("Add", [b("Mul", [v, bconst("half", np.float32(0.5))], [f"{tag}_m"]), bconst("half_b", np.float32(0.5))],
                  [f"{tag}_u"])
            codes = b("QuantizeLinear", [u, bconst(f"{tag}_s", np.float32(1.0 / n)), bconst(f"{tag}_z", np.uint8(0))],
                      [f"{tag}_c"])
            # a grid wider than n codes (u outside [0, 1]) saturates: clip the codes to n
            return b("Min", [codes, bconst(f"{tag}_n", np.uint8(n))], [f"{tag}_cc"])

        def tanh_q(v, tag):
            if quant is None:
                return v
            n = (1 << quant.bits_a) - 1
            deq = b("DequantizeLinear", [tanh_codes(v, tag), bconst(f"{tag}_s2", np.float32(1.0 / n)),
                                         bconst(f"{tag}_z2", np.uint8(0))], [f"{tag}_dq"])
            return b("Sub", [b("Mul", [deq, bconst("two", np.float32(2))], [f"{tag}_2"]), bconst("onef", np.float32(1))],
                     [f"{tag}_q"])

        ig = quant.gates[d] if quant is not None else None

        def int_product(codes, rows, V, m, bias, tag):
            """acc(V[rows], codes) * m + bias: codes as floats times integer weights (exact), then the two roundings
            the bit kernels' float epilogue makes (IntegerGates)."""
            c = b("Cast", [codes], [f"{tag}_cf"], to=TensorProto.FLOAT)
            acc = b("MatMul", [c, bconst(f"{tag}_V", np.ascontiguousarray(V[rows].T).astype(np.float32))], [f"{tag}_acc"])
            return b("Add", [b("Mul", [acc, bconst(f"{tag}_m", m[rows])], [f"{tag}_am"]), bconst(f"{tag}_b", bias[rows])],
                     [tag])

        h_in, c_in, x_in, m_in = f"{q}_h", f"{q}_c", f"{q}_x", f"{q}_m"
        G = slice(None)
        if ig is not None:  # x_t's and h's codes times the integer weights
            n = (1 << quant.bits_a) - 1
            xc = b("QuantizeLinear", [x_in, bconst("xs", np.float32(quant.x_scale)), bconst("xz", np.uint8(quant.x_zero))],
                   ["xc"])
            xw = int_product(b("Min", [xc, bconst("xn", np.uint8(n))], ["xcc"]), G, ig.Vw, ig.mw, ig.bw, "xw")
            hc = tanh_codes(h_in, "hq")
        else:
            xw = b("Add", [b("MatMul", [x_in, bconst("Wt", np.ascontiguousarray(W[d].T))], ["xw0"]),
                           bconst("Wb", spec.Wb[d])], ["xw"])
        hq = h_in

        def cols(v, k, tag):  # gate k's columns [k*H, (k+1)*H)
            return b("Slice", [v, bconst(f"s{k}", np.array([k * H], np.int64)),
                               bconst(f"e{k}", np.array([(k + 1) * H], np.int64)), bconst("axis1", np.array([1], np.int64))],
                     [f"{tag}{k}"])

        if spec.cell == "LSTM":
            hr = int_product(hc, G, ig.Vr, ig.mr, ig.br, "hr") if ig is not None else \
                b("Add", [b("MatMul", [hq, bconst("Rt", np.ascontiguousarray(R[d].T))], ["hr0"]), bconst("Rb", spec.Rb[d])],
                  ["hr"])
            gates = b("Add", [xw, hr], ["gates"])
            i, o, f, cc = (cols(gates, k, "g") for k in range(4))
            c_new = b("Add", [b("Mul", [b("Sigmoid", [f], ["sf"]), c_in], ["fc"]),
                              b("Mul", [b("Sigmoid", [i], ["si"]), b("Tanh", [cc], ["tc"])], ["ic"])], ["cnew"])
            h_new = b("Mul", [b("Sigmoid", [o], ["so"]), b("Tanh", [c_new], ["tcn"])], ["hnew0"])
        else:
            ZR, HH = slice(0, 2 * H), slice(2 * H, 3 * H)
            hr = int_product(hc, ZR, ig.Vr, ig.mr, ig.br, "hzr") if ig is not None else \
                b("Add", [b("MatMul", [hq, bconst("Rzr", np.ascontiguousarray(R[d][:2 * H].T))], ["hzr0"]),
                          bconst("Rbzr", spec.Rb[d][:2 * H])], ["hzr"])
            xzr = cols(xw, 0, "xz_"), cols(xw, 1, "xr_")
            z = b("Sigmoid", [b("Add", [xzr[0], cols(hr, 0, "hz_")], ["zpre"])], ["z"])
            r = b("Sigmoid", [b("Add", [xzr[1], cols(hr, 1, "hr_")], ["rpre"])], ["r"])
            if spec.linear_before_reset:
                hh = int_product(hc, HH, ig.Vr, ig.mr, ig.br, "hh") if ig is not None else \
                    b("Add", [b("MatMul", [hq, bconst("Rh", np.ascontiguousarray(R[d][2 * H:].T))], ["hh0"]),
                              bconst("Rbh", spec.Rb[d][2 * H:])], ["hh"])
                rec = b("Mul", [r, hh], ["rec"])
            else:
                rh = b("Mul", [r, h_in], ["rh0"])
                rec = int_product(tanh_codes(rh, "rhq"), HH, ig.Vr, ig.mr, ig.br, "rec") if ig is not None else \
                    b("Add", [b("MatMul", [rh, bconst("Rh", np.ascontiguousarray(R[d][2 * H:].T))], ["rec0"]),
                              bconst("Rbh", spec.Rb[d][2 * H:])], ["rec"])
            cand = b("Tanh", [b("Add", [cols(xw, 2, "xh_"), rec], ["cpre"])], ["cand"])
            cand = tanh_q(cand, "candq") if quant is not None and "cand" in quant.points else cand
            one_minus_z = b("Sub", [bconst("onez", np.float32(1)), z], ["omz"])
            h_new = b("Add", [b("Mul", [one_minus_z, cand], ["a1"]), b("Mul", [z, h_in], ["a2"])], ["hnew0"])
        if quant is not None and "h_new" in quant.points:
            h_new = tanh_q(h_new, "hnq")
        # steps past a sequence's length keep the state and write zeros
        h_out = b("Where", [m_in, h_new, h_in], ["hout"]) if lens else b("Identity", [h_new], ["hout"])
        y_t = b("Where", [m_in, h_out, bconst("zf", np.float32(0))], ["y"]) if lens else b("Identity", [h_out], ["y"])
        outs = [h_out]
        ins = [helper.make_tensor_value_info(h_in, TensorProto.FLOAT, ["B", H])]
        if spec.cell == "LSTM":
            c_out = b("Where", [m_in, c_new, c_in], ["cout"]) if lens else b("Identity", [c_new], ["cout"])
            outs.append(c_out)
            ins.append(helper.make_tensor_value_info(c_in, TensorProto.FLOAT, ["B", H]))
        outs.append(y_t)
        ins.append(helper.make_tensor_value_info(x_in, TensorProto.FLOAT, ["B", spec.input_size]))
        if lens:
            ins.append(helper.make_tensor_value_info(m_in, TensorProto.BOOL, ["B", 1]))
        body = helper.make_graph(body_nodes, f"{q}_body", ins,
                                 [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["B", H]) for o in outs],
                                 body_inits)

        def state0(name, tag):
            if not name:
                return zeros
            return node("Squeeze", [node("Slice", [name, const(f"{tag}s{d}", np.array([d], np.int64)),
                                                   const(f"{tag}e{d}", np.array([d + 1], np.int64)),
                                                   const(f"{tag}a{d}", np.array([0], np.int64))], [f"{q}_{tag}0s"]),
                                 const(f"{tag}q{d}", np.array([0], np.int64))], [f"{q}_{tag}0"])

        scan_in = [state0(h0, "h")] + ([state0(c0, "c")] if spec.cell == "LSTM" else []) + [x] + ([mask] if lens else [])
        scan_out = [f"{q}_hT"] + ([f"{q}_cT"] if spec.cell == "LSTM" else []) + [f"{q}_Y"]
        n_scan = 2 if lens else 1
        node("Scan", scan_in, scan_out, body=body, num_scan_inputs=n_scan,
             scan_input_directions=[int(reverse)] * n_scan, scan_output_directions=[int(reverse)])
        ax = const(f"yax{d}", np.array([1], np.int64))
        ax0 = const(f"hax{d}", np.array([0], np.int64))
        ys.append(node("Unsqueeze", [f"{q}_Y", ax], [f"{q}_Y4"]))
        yhs.append(node("Unsqueeze", [f"{q}_hT", ax0], [f"{q}_hT3"]))
        if spec.cell == "LSTM":
            ycs.append(node("Unsqueeze", [f"{q}_cT", ax0], [f"{q}_cT3"]))
    for key, parts, axis in (("y", ys, 1), ("y_h", yhs, 0), ("y_c", ycs, 0)):
        name = spec.outputs.get(key)
        if name:
            node("Concat", parts, [name], axis=axis) if len(parts) > 1 else node("Identity", parts, [name])
    return nodes, inits


# ---------------------------------------------------------------------------------------------- the pass
def quantize_recurrent(proto, ctx):
    """Replace every planned (quantize=True) top-level LSTM/GRU node of the fake-quant model ``proto`` by its
    quantized Scan form; the x_t grid comes from calibration (ctx.act_ranges; [-1, 1] without data). Returns
    (the new model, one report row per recurrent layer)."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}

    def constant(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    rows, new_nodes, new_inits, layers_meta = [], [], [], []
    ranges = getattr(ctx, "act_ranges", None) or {}
    used_weights = set()
    for node in proto.graph.node:
        name = node.name or node.output[0]
        plan = ctx.plan.get(name)
        if node.op_type not in GATES or plan is None or not plan.quantize:
            new_nodes.append(node)
            continue
        spec = recurrent_spec(node, constant)
        st = ranges.get(spec.inputs["x"])
        lo, hi = (st.min, st.max) if st is not None and st.count else (-1.0, 1.0)
        xs, xz = x_grid(lo, hi, plan.bits_a)
        quant, qts = RecurrentQuant.of(spec, plan.bits_w, plan.bits_a, plan.quantizer, xs, xz)
        Wq, Rq = quant.Wq, quant.Rq
        nodes, extra = decompose(spec, quant)
        layers_meta.append({"name": name, "cell": spec.cell, "direction": spec.direction, "hidden": spec.hidden,
                            "input_size": spec.input_size, "linear_before_reset": spec.linear_before_reset,
                            "bits_w": plan.bits_w, "bits_a": plan.bits_a, "x_scale": xs, "x_zero": xz,
                            "inputs": spec.inputs, "outputs": spec.outputs, "prefix": scan_prefix(spec.name),
                            "nodes": [n.name for n in nodes]})
        new_nodes.extend(nodes)
        new_inits.extend(extra)
        used_weights.update(node.input[1:4])
        levels = [int(np.unique(t.codes).size) for pair in qts for t in pair]
        rel = float(np.linalg.norm(np.concatenate([(Wq - spec.W).ravel(), (Rq - spec.R).ravel()]))
                    / max(np.linalg.norm(np.concatenate([spec.W.ravel(), spec.R.ravel()])), 1e-30))
        rows.append({"node": name, "op": spec.cell, "bits_w": plan.bits_w, "bits_a": plan.bits_a,
                     "quantizer": plan.quantizer, "layer": spec.describe(),
                     "quantized": f"W and R ({plan.quantizer}, per gate row, {min(levels)}-{max(levels)} levels used); "
                                  + quant.describe(spec) + f"; x_t grid [{lo:.3g}, {hi:.3g}]",
                     "rel_error": round(rel, 5)})
    if not rows:
        return proto, rows
    still_read = {i for n in new_nodes for i in n.input}
    graph = helper.make_graph(new_nodes, proto.graph.name, list(proto.graph.input), list(proto.graph.output),
                              [t for t in proto.graph.initializer if t.name not in used_weights or t.name in still_read]
                              + new_inits, value_info=list(proto.graph.value_info))
    out = helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    out.metadata_props.extend(p for p in proto.metadata_props if p.key != METADATA_KEY)
    out.metadata_props.add(key=METADATA_KEY, value=json.dumps(layers_meta))
    return out, rows
