"""Recognise recurrent cells that exporters decompose into a ``Loop`` or ``Scan`` body and rewrite each as the one
ONNX ``LSTM``/``GRU`` node it equals, so the recurrent passes (passes/rnn.py) meet a single form.

A body is read by abstract evaluation rather than by matching node sequences. Each body value becomes
  - ``Const``: a constant (weights inside or outside the body; exporter shape arithmetic is folded on the way),
  - ``Lin``:   ``sum_s s @ M_s.T + b``, an affine map of sources (the step input x_t, the state h, or r*h), built by
               MatMul/Gemm, Add/Sub, Slice/Split of gate columns and scaling by constants,
  - ``Poly``:  a polynomial with constant coefficients in atoms: the states, Sigmoid(Lin), Tanh(...), and Lins that
               enter a product (the r * (R_h h + b_r) of GRU linear_before_reset).
A cell is recognised when the new states, as polynomials, equal an update of ONNX's cells exactly (in real
arithmetic; floats may differ in the last bits because sums are grouped differently):
  LSTM  c' = sig(f) c + sig(i) tanh(g),  h' = sig(o) tanh(c')
  GRU   h' = (1 - z) n + z h,  n = tanh(W_n x + b + R_n (r h))  or  tanh(W_n x + b_w + r (R_n h + b_r))  (lbr)
So one update written with Sub(1, z) or Neg+Add, as n + z (h - n), with chunk/Split/Slice (constant or computed
from shapes), Gemm or MatMul + Add, x and h concatenated before one MatMul, weights in the body or outside it, or as
an LSTM/GRU node over a single step reads the same. Gate order and weight layout follow from where each Lin enters
the update, never from names or positions. A Loop/Scan that looks like a cell but cannot be proved equal is left as
it is, and the reason is kept on the node (metadata ``qcompile.rnn_import``) and in the pass's ``notes``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.passes.graph_utils import add_const, const_array, redirect_uses

NOTE_KEY = "qcompile.rnn_import"
RNN_OPS = ("LSTM", "GRU")


class NotACell(Exception):
    """Why a Loop/Scan body is not read as one LSTM/GRU step."""


# ---------------------------------------------------------------------------------------------- abstract values
@dataclass(eq=False)
class Const:
    a: np.ndarray


@dataclass(eq=False)
class ShapeOf:              # a Shape() result with some dimensions unknown (the batch)
    dims: tuple


@dataclass(eq=False)
class Outer:                # a value computed outside the body at run time
    v: ir.Value


@dataclass(eq=False)
class Marker:               # the Loop's iteration counter / condition, or a loop-carried sequence (by index)
    kind: str
    index: int = -1


@dataclass(eq=False)
class Lin:
    terms: dict             # source (a monomial: sorted tuple of atom ids) -> float64 [N, K]
    bias: np.ndarray        # float64 [N]

    @property
    def rows(self) -> int:
        return self.bias.shape[0]


@dataclass(eq=False)
class Poly:
    terms: dict             # monomial (sorted tuple of atom ids) -> float64 coefficient, shape () or [N]


@dataclass(eq=False)
class Cat:                  # Concat along the features of sources (x and h before one MatMul)
    parts: list


@dataclass(eq=False)
class Lifted:               # v with n leading unit axes (the [1, B, H] states of an LSTM node over one step)
    v: object
    n: int


@dataclass(eq=False)
class SeqAppend:            # SequenceInsert(carried sequence k, item): a per-step output collected in a sequence
    index: int
    item: object


def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a, np.float64)
    return hashlib.sha1(repr(a.shape).encode() + a.tobytes()).hexdigest()


def _is(coef: np.ndarray, value: float) -> bool:
    return bool(np.all(np.asarray(coef) == value))


def _vector(a: np.ndarray, n: int | None, what: str) -> np.ndarray:
    """A constant that broadcasts along the feature axis of a [batch, n] value, as float64 () or [n]."""
    a = np.asarray(a, np.float64)
    if a.ndim > 2 or (a.ndim == 2 and a.shape[0] != 1):
        raise NotACell(f"{what}: a constant of shape {list(a.shape)} (broadcasts over the batch)")
    a = a.reshape(-1)
    if a.size == 1:
        return a.reshape(()) if n is None else np.full(n, a[0])
    if n is not None and a.size != n:
        raise NotACell(f"{what}: a constant of {a.size} values against {n} features")
    return a


# ---------------------------------------------------------------------------------------------- linear algebra
def lin_add(a: Lin, b: Lin, sign: float = 1.0) -> Lin:
    if a.rows != b.rows:
        raise NotACell(f"adds {a.rows} to {b.rows} features")
    terms = dict(a.terms)
    for k, m in b.terms.items():
        if k in terms and terms[k].shape != m.shape:
            raise NotACell("one source multiplied by matrices of different widths")
        terms[k] = terms[k] + sign * m if k in terms else sign * m
    return Lin(terms, a.bias + sign * b.bias)


def lin_scale(a: Lin, s: np.ndarray) -> Lin:
    s = np.broadcast_to(np.asarray(s, np.float64), (a.rows,))
    return Lin({k: m * s[:, None] for k, m in a.terms.items()}, a.bias * s)


def lin_rows(a: Lin, rows: range) -> Lin:
    if len(rows) == 0:
        raise NotACell("an empty slice of gate columns")
    idx = np.asarray(rows)
    return Lin({k: m[idx] for k, m in a.terms.items()}, a.bias[idx])


def poly_add(p: Poly, q: Poly, sign: float = 1.0) -> Poly:
    terms = dict(p.terms)
    for mono, c in q.terms.items():
        terms[mono] = terms[mono] + sign * c if mono in terms else sign * c
    return Poly({m: c for m, c in terms.items() if not _is(c, 0)})


def poly_mul(p: Poly, q: Poly) -> Poly:
    out = Poly({})
    for m1, c1 in p.terms.items():
        for m2, c2 in q.terms.items():
            if c1.ndim and c2.ndim and c1.shape != c2.shape:
                raise NotACell("multiplies values of different widths")
            out = poly_add(out, Poly({tuple(sorted(m1 + m2)): c1 * c2}))
    return out


# ---------------------------------------------------------------------------------------------- reading a body
class BodyReader:
    """Abstract evaluation of one Loop/Scan body (see the module docstring). ``roles`` gives the body inputs'
    abstract values; atoms are interned by structure, so a value computed twice is one atom."""

    def __init__(self, body: ir.Graph, widths: dict[int, int | None]):
        self.body = body
        self.memo: dict[ir.Value, object] = {}
        self.atoms: list[tuple[str, object]] = []
        self.atom_ids: dict[tuple, int] = {}
        self.widths = widths            # atom id of x / each state -> its static width, or None
        self.x_read: tuple[ir.Value, int] | None = None   # Loop form: (outer x, axis) read as Gather(x, t, axis)

    # atoms -----------------------------------------------------------------------------------------
    def atom(self, kind: str, payload=None, key=None) -> int:
        k = (kind, key if key is not None else self.key(payload))
        if k not in self.atom_ids:
            self.atom_ids[k] = len(self.atoms)
            self.atoms.append((kind, payload))
        return self.atom_ids[k]

    def key(self, v) -> tuple:
        if isinstance(v, Lin):
            return ("L", tuple(sorted((k, _digest(m)) for k, m in v.terms.items())), _digest(v.bias))
        if isinstance(v, Poly):
            return ("P", tuple(sorted((m, _digest(c)) for m, c in v.terms.items())))
        raise NotACell(f"{type(v).__name__} where a tensor of the cell was expected")

    def source(self, name: str, width: int | None) -> Poly:
        i = self.atom(name, key=name)
        self.widths[i] = width
        return Poly({(i,): np.float64(1)})

    def width(self, v) -> int | None:
        if isinstance(v, Lin):
            return v.rows
        if isinstance(v, Poly):
            for mono, c in v.terms.items():
                if c.ndim:
                    return c.shape[0]
                for a in mono:
                    kind, payload = self.atoms[a]
                    w = self.widths.get(a) if payload is None else self.width(payload)
                    if w is not None:
                        return w
        return None

    # conversions -----------------------------------------------------------------------------------
    def poly(self, v) -> Poly:
        if isinstance(v, Poly):
            return v
        if isinstance(v, Lin):
            if not v.terms:
                return Poly({(): v.bias}) if not _is(v.bias, 0) else Poly({})
            return Poly({(self.atom("lin", v),): np.float64(1)})
        if isinstance(v, Const):
            c = _vector(v.a, None, "a constant term")
            return Poly({(): c}) if not _is(c, 0) else Poly({})
        raise NotACell(self.what(v))

    def lin(self, v) -> Lin | None:
        """v as one affine map when it is one (a Poly of Lin atoms and constants), else None."""
        if isinstance(v, Lin):
            return v
        if not isinstance(v, Poly):
            return None
        lins = [(self.atoms[m[0]][1], c) for m, c in v.terms.items() if len(m) == 1 and self.atoms[m[0]][0] == "lin"]
        if not lins or len(lins) + (() in v.terms) != len(v.terms):
            return None
        out = lin_scale(lins[0][0], lins[0][1])
        for lin, c in lins[1:]:
            out = lin_add(out, lin_scale(lin, c))
        if () in v.terms:
            out = Lin(out.terms, out.bias + np.broadcast_to(v.terms[()], (out.rows,)))
        return out

    def source_key(self, v) -> tuple | None:
        """The monomial a MatMul multiplies: x, h, r*h, ... (None: the value is zero)."""
        if isinstance(v, Lin):
            v = self.poly(v)
        if isinstance(v, Poly):
            if not v.terms:
                return None
            if len(v.terms) == 1:
                (mono, c), = v.terms.items()
                if mono and c.ndim == 0 and c == 1:
                    return mono
            return (self.atom("poly", v),)
        raise NotACell(self.what(v))

    def what(self, v) -> str:
        if isinstance(v, Outer):
            return f"reads '{v.v.name}', computed outside the body at run time"
        if isinstance(v, Marker):
            return f"uses the loop's {v.kind} as a tensor"
        return f"a {type(v).__name__} value where a tensor of the cell was expected"

    # evaluation ------------------------------------------------------------------------------------
    def ev(self, v: ir.Value | None):
        if v is None:
            return None
        if v in self.memo:
            return self.memo[v]
        arr = const_array(v)
        producer = v.producer()
        if arr is not None:
            out = Const(arr)
        elif producer is None or producer.graph is not self.body:
            out = Outer(v)
        else:
            results = self.node(producer)
            for o, r in zip(producer.outputs, results):
                self.memo[o] = r
            return self.memo[v]
        self.memo[v] = out
        return out

    def node(self, node: ir.Node) -> list:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise NotACell(f"{node.domain}::{op} in the body")
        args = [self.ev(i) for i in node.inputs]
        if op in RNN_OPS:
            return self.cell_node(node, args)
        if all(a is None or isinstance(a, Const) for a in args) and not any(
                a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            return _fold(node, [None if a is None else a.a for a in args])
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise NotACell(f"{op} in the body (not part of an LSTM/GRU step)")
        out = handler(node, *args)
        return out if isinstance(out, list) else [out]

    def _attr_int(self, node, name, default):
        return node.attributes.get_int(name, default)

    def op_Identity(self, node, a):
        return a

    def op_Cast(self, node, a):
        if isinstance(a, (Lin, Poly)) and self._attr_int(node, "to", 0) == ir.DataType.FLOAT:
            return a
        raise NotACell(f"Cast of {self.what(a)}")

    def op_Shape(self, node, a):
        if isinstance(a, (Lin, Poly)):
            dims = (None, self.width(a))
        elif isinstance(a, Outer) and a.v.shape is not None:
            dims = tuple(d if isinstance(d, int) else None for d in a.v.shape)
        else:
            raise NotACell(f"Shape of {self.what(a)}")
        start, end = self._attr_int(node, "start", 0), self._attr_int(node, "end", len(dims))
        dims = dims[slice(start, end)]
        return Const(np.array(dims, np.int64)) if None not in dims else ShapeOf(dims)

    def op_Gather(self, node, data, index):
        if isinstance(data, ShapeOf) and isinstance(index, Const):
            got = np.asarray(data.dims, object)[index.a.astype(np.int64)]
            if None in np.asarray(got).reshape(-1).tolist():
                raise NotACell("the cell's shape arithmetic reads the batch size")
            return Const(np.asarray(got, np.int64))
        if isinstance(data, Outer) and isinstance(index, Marker) and index.kind == "iteration":
            rank = len(data.v.shape) if data.v.shape is not None else None
            if rank != 3:
                raise NotACell(f"the step input Gather({data.v.name}, t) is not a [batch, features] slice of a 3-D "
                               "sequence")
            axis = self._attr_int(node, "axis", 0) % 3
            if self.x_read is not None and (self.x_read[0] is not data.v or self.x_read[1] != axis):
                raise NotACell("the body reads more than one step input")
            self.x_read = (data.v, axis)
            return self.source("x", _static(data.v.shape[2 if axis != 2 else 1]))
        raise NotACell(f"Gather of {self.what(data)}")

    def _feature_axis(self, axis: int, what: str):
        if axis not in (1, -1):
            raise NotACell(f"{what} along axis {axis} (the cell's tensors are [batch, features])")

    def op_Slice(self, node, data, starts, ends, axes=None, steps=None):
        if not all(isinstance(c, Const) for c in (starts, ends)) or any(
                c is not None and not isinstance(c, Const) for c in (axes, steps)):
            raise NotACell("a Slice with bounds computed at run time")
        full = np.iinfo(np.int64).max // 2
        if isinstance(data, Outer) and not starts.a.any() and (ends.a >= full).all() and (
                steps is None or (steps.a == 1).all()):
            return data  # x[:, t] in TorchScript: a whole-axis Slice before Gather(x, t, axis=1)
        if isinstance(data, ShapeOf):
            dims = data.dims
            s, e = int(starts.a.reshape(-1)[0]), int(ends.a.reshape(-1)[0])
            step = int(steps.a.reshape(-1)[0]) if steps is not None else 1
            got = dims[slice(s, e, step)]
            return Const(np.array(got, np.int64)) if None not in got else ShapeOf(got)
        if not isinstance(data, Lin):
            raise NotACell(f"Slice of {self.what(data) if not isinstance(data, Poly) else 'a nonlinear value'}")
        if starts.a.size != 1 or (steps is not None and int(steps.a.reshape(-1)[0]) != 1):
            raise NotACell("a strided or multi-axis Slice of the gates")
        self._feature_axis(int(axes.a.reshape(-1)[0]) if axes is not None else 0, "a Slice")
        s, e = int(starts.a.reshape(-1)[0]), int(ends.a.reshape(-1)[0])
        return lin_rows(data, range(data.rows)[slice(s, e)])

    def op_Split(self, node, data, split=None):
        if not isinstance(data, Lin):
            raise NotACell(f"Split of {self.what(data) if not isinstance(data, Poly) else 'a nonlinear value'}")
        self._feature_axis(self._attr_int(node, "axis", 0), "a Split")
        n = len(node.outputs)
        if split is not None:
            if not isinstance(split, Const):
                raise NotACell("a Split with sizes computed at run time")
            sizes = [int(s) for s in split.a.reshape(-1)]
        elif node.attributes.get("split") is not None:
            sizes = list(node.attributes.get_ints("split"))
        else:  # equal parts; opset 18's num_outputs makes the last one smaller when it does not divide
            size = -(-data.rows // n)
            sizes = [min(size, data.rows - k * size) for k in range(n)]
        if sum(sizes) != data.rows or len(sizes) != n:
            raise NotACell(f"a Split into {sizes} of {data.rows} gate columns")
        starts = np.cumsum([0] + sizes)
        return [lin_rows(data, range(starts[k], starts[k + 1])) for k in range(n)]

    def op_Concat(self, node, *parts):
        self._feature_axis(self._attr_int(node, "axis", 0), "a Concat")
        return Cat(list(parts))

    def _addsub(self, a, b, sign):
        if isinstance(a, Lin) and isinstance(b, Lin):
            return lin_add(a, b, sign)
        if isinstance(a, Lin) and isinstance(b, Const):
            return Lin(a.terms, a.bias + sign * _vector(b.a, a.rows, "a bias"))
        if isinstance(a, Const) and isinstance(b, Lin):
            return lin_add(Lin({}, _vector(a.a, b.rows, "a bias")), b, sign)
        return poly_add(self.poly(a), self.poly(b), sign)

    def op_Add(self, node, a, b):
        return self._addsub(a, b, 1.0)

    def op_Sub(self, node, a, b):
        return self._addsub(a, b, -1.0)

    def op_Neg(self, node, a):
        return lin_scale(a, -1.0) if isinstance(a, Lin) else poly_add(Poly({}), self.poly(a), -1.0)

    def op_Mul(self, node, a, b):
        if isinstance(b, Const) and isinstance(a, Lin):
            a, b = b, a
        if isinstance(a, Const) and isinstance(b, Lin):
            return lin_scale(b, _vector(a.a, b.rows, "a scale"))
        return poly_mul(self.poly(a), self.poly(b))

    def op_Div(self, node, a, b):
        if not isinstance(b, Const):
            raise NotACell("a division by a computed value")
        return self.op_Mul(node, a, Const(1.0 / np.asarray(b.a, np.float64)))

    def _matmul(self, a, w: np.ndarray) -> Lin:
        """a @ w, w [K, N] constant."""
        parts = a.parts if isinstance(a, Cat) else [a]
        terms, k0 = {}, 0
        for p in parts:
            width = w.shape[0] if len(parts) == 1 else self.width(p)
            if width is None:
                raise NotACell("a MatMul of concatenated values whose widths are not static")
            key = self.source_key(p)
            block = w[k0:k0 + width].T.astype(np.float64)
            k0 += width
            if key is not None:
                terms[key] = terms[key] + block if key in terms else block
        if k0 != w.shape[0]:
            raise NotACell(f"a MatMul of {k0} features with a {list(w.shape)} weight")
        return Lin(terms, np.zeros(w.shape[1]))

    def op_MatMul(self, node, a, w):
        if not isinstance(w, Const) or w.a.ndim != 2:
            raise NotACell("a MatMul whose second input is not a constant 2-D weight")
        return self._matmul(a, w.a)

    def op_Gemm(self, node, a, w, c=None):
        if not isinstance(w, Const) or w.a.ndim != 2 or (c is not None and not isinstance(c, Const)):
            raise NotACell("a Gemm whose weight or bias is not constant")
        if self._attr_int(node, "transA", 0):
            raise NotACell("a Gemm with transA=1")
        alpha = node.attributes.get_float("alpha", 1.0)
        beta = node.attributes.get_float("beta", 1.0)
        wt = w.a.T if self._attr_int(node, "transB", 0) else w.a
        out = lin_scale(self._matmul(a, wt), alpha)
        if c is not None and beta != 0:
            out = Lin(out.terms, out.bias + beta * _vector(c.a, out.rows, "a Gemm bias"))
        return out

    def _activation(self, kind, a):
        if isinstance(a, (Lin, Poly)):
            lin = self.lin(a)
            payload = lin if lin is not None else self.poly(a)
            return Poly({(self.atom(kind, payload),): np.float64(1)})
        raise NotACell(f"{kind} of {self.what(a)}")

    def op_Sigmoid(self, node, a):
        return self._activation("sigmoid", a)

    def op_Tanh(self, node, a):
        return self._activation("tanh", a)

    def _axes(self, node, axes) -> list[int]:
        if axes is not None:
            if not isinstance(axes, Const):
                raise NotACell("axes computed at run time")
            return sorted(int(a) for a in axes.a.reshape(-1))
        return sorted(node.attributes.get_ints("axes", []))

    def op_Unsqueeze(self, node, a, axes=None):
        ax = self._axes(node, axes)
        inner, n = (a.v, a.n) if isinstance(a, Lifted) else (a, 0)
        if ax != list(range(len(ax))):
            raise NotACell(f"an Unsqueeze on axes {ax}")
        return Lifted(inner, n + len(ax))

    def op_Squeeze(self, node, a, axes=None):
        ax = self._axes(node, axes)
        if not isinstance(a, Lifted) or not ax or ax != list(range(len(ax))) or len(ax) > a.n:
            raise NotACell(f"a Squeeze on axes {ax} of {self.what(a) if not isinstance(a, Lifted) else 'a state'}")
        return a.v if a.n == len(ax) else Lifted(a.v, a.n - len(ax))

    def op_SequenceInsert(self, node, seq, item, position=None):
        if not isinstance(seq, Marker) or seq.kind != "sequence" or position is not None:
            raise NotACell("a SequenceInsert other than appending to a loop-carried sequence")
        return SeqAppend(seq.index, item)

    def cell_node(self, node: ir.Node, args: list) -> list:
        """An LSTM/GRU node over one step (what TorchScript exports for nn.LSTMCell in a scripted loop): its update
        in terms of this reader's atoms, from passes/rnn's spec of the node."""
        from onnx import helper

        from qcompile.passes.rnn import GATES, UnsupportedRecurrent, recurrent_spec

        op = node.op_type
        args = args + [None] * (8 - len(args))
        names = ["X", "W", "R", "B", "L", "H0", "C0", "P"]
        proto = ir.serde.serialize_node(node)
        shim = helper.make_node(op, [n if a is not None else "" for n, a in zip(names, args)], ["Y", "Yh", "Yc"][
            :len(node.outputs)], name=node.name or op)
        shim.attribute.extend(proto.attribute)
        arrays = {n: a.a for n, a in zip(names, args) if isinstance(a, Const)}
        try:
            spec = recurrent_spec(shim, arrays.get)
        except UnsupportedRecurrent as exc:
            raise NotACell(str(exc)) from None
        if spec.direction != "forward" or spec.layout != 0 or args[4] is not None or args[7] is not None:
            raise NotACell(f"{op} node {node.name!r} in the body is not a forward step without lengths")
        lifted = [a if a is None or isinstance(a, Lifted) and a.n == 1 else False for a in (args[0], args[5], args[6])]
        if False in lifted or lifted[0] is None:
            raise NotACell(f"{op} node {node.name!r} in the body does not run on one step of the body's values")
        x, h, c = (a.v if a is not None else Poly({}) for a in lifted)
        H, xk, hk = spec.hidden, self.source_key(x), self.source_key(h)

        def gate(k: int, with_h: bool = True) -> Lin:
            rows = slice(k * H, (k + 1) * H)
            terms = {xk: spec.W[0][rows].astype(np.float64)} if xk is not None else {}
            if with_h and hk is not None:
                terms[hk] = spec.R[0][rows].astype(np.float64)
            return Lin(terms, (spec.Wb[0][rows] + (spec.Rb[0][rows] if with_h else 0)).astype(np.float64))

        sig, tanh = (lambda v: self._activation("sigmoid", v)), (lambda v: self._activation("tanh", v))
        if op == "LSTM":
            i, o, f, g = sig(gate(0)), sig(gate(1)), sig(gate(2)), tanh(gate(3))
            c_new = poly_add(poly_mul(f, self.poly(c)), poly_mul(i, g))
            h_new = poly_mul(o, tanh(c_new))
            return [Lifted(h_new, 2), Lifted(h_new, 1), Lifted(c_new, 1)][:len(node.outputs)]
        assert GATES[op] == 3
        z, r = sig(gate(0)), sig(gate(1))
        rows = slice(2 * H, 3 * H)
        if spec.linear_before_reset:
            lh = Lin({hk: spec.R[0][rows].astype(np.float64)} if hk is not None else {},
                     spec.Rb[0][rows].astype(np.float64))
            n = tanh(poly_add(self.poly(gate(2, with_h=False)), poly_mul(r, self.poly(lh))))
        else:
            cand = gate(2, with_h=False)
            rh = self.source_key(poly_mul(r, self.poly(h)))
            if rh is not None:
                cand.terms[rh] = spec.R[0][rows].astype(np.float64)
            n = tanh(Lin(cand.terms, cand.bias + spec.Rb[0][rows]))
        one = Poly({(): np.float64(1)})
        h_new = poly_add(poly_mul(poly_add(one, z, -1.0), n), poly_mul(z, self.poly(h)))
        return [Lifted(h_new, 2), Lifted(h_new, 1)][:len(node.outputs)]


def _static(d) -> int | None:
    return d if isinstance(d, int) else None


def _fold(node: ir.Node, arrays: list) -> list:
    """Evaluate a node whose inputs are all constant (onnx's reference implementation)."""
    from onnx.reference import ReferenceEvaluator

    proto = ir.serde.serialize_node(node)
    names = [f"i{k}" if a is not None else "" for k, a in enumerate(arrays)]
    del proto.input[:]
    proto.input.extend(names)
    del proto.output[:]
    proto.output.extend(f"o{k}" for k in range(len(node.outputs)))
    try:
        results = ReferenceEvaluator(proto).run(None, {n: a for n, a in zip(names, arrays) if n})
    except Exception as exc:  # noqa: BLE001 - an op the reference cannot fold: not a cell we can read
        raise NotACell(f"cannot evaluate the constant {node.op_type} '{node.name}': {str(exc)[:80]}") from None
    return [Const(np.asarray(r)) for r in results]


# ---------------------------------------------------------------------------------------------- the update
@dataclass
class Cell:
    """A recognised step: ONNX-layout weights (one direction) and which state is h (and c)."""

    op: str
    W: np.ndarray           # [1, G*H, I] float32
    R: np.ndarray           # [1, G*H, H]
    B: np.ndarray           # [1, 2*G*H]
    linear_before_reset: int
    h: int                  # index of h among the body's float states
    c: int = -1             # index of c (LSTM)
    form: str = ""          # how the update was written, for the note

    @property
    def hidden(self) -> int:
        return self.R.shape[2]


def _gate_matrices(lin: Lin, x, h, H: int, I: int, what: str):
    """(W_k [H, I], R_k [H, H]) of one gate's affine map in x and h; anything else it reads is a refusal."""
    extra = set(lin.terms) - {x, h}
    if extra:
        raise NotACell(f"the {what} reads a value other than the step input and the hidden state")
    if lin.rows != H:
        raise NotACell(f"the {what} has {lin.rows} features, the state {H}")
    W = lin.terms.get(x, np.zeros((H, I)))
    R = lin.terms.get(h, np.zeros((H, H)))
    if W.shape != (H, I) or R.shape != (H, H):
        raise NotACell(f"the {what}'s weights {list(W.shape)}, {list(R.shape)} do not fit input {I}, hidden {H}")
    return W, R


def _input_width(reader: BodyReader, lins: list, x) -> int:
    for lin in lins:
        if lin is not None and x in lin.terms:
            return lin.terms[x].shape[1]
    raise NotACell("no gate reads the step input")


def match_lstm(reader: BodyReader, h_new, c_new, h_id: int, c_id: int, x_id: int) -> Cell | None:
    """c' = sig(f) c + sig(i) tanh(g) and h' = sig(o) tanh(c'), or None when the states do not have that form."""
    atoms = reader.atoms
    c_poly, h_poly = reader.poly(c_new), reader.poly(h_new)

    def kinds(mono):
        return sorted(atoms[a][0] for a in mono)

    if len(c_poly.terms) != 2 or len(h_poly.terms) != 1 or not all(_is(c, 1) for c in c_poly.terms.values()):
        return None
    forget = [m for m in c_poly.terms if c_id in m]
    if len(forget) != 1 or len(forget[0]) != 2:
        return None
    f = next(a for a in forget[0] if a != c_id)
    ig = next(m for m in c_poly.terms if m is not forget[0])
    (ho, coef), = h_poly.terms.items()
    if kinds((f,)) != ["sigmoid"] or kinds(ig) != ["sigmoid", "tanh"] or kinds(ho) != ["sigmoid", "tanh"] \
            or not _is(coef, 1):
        return None
    i, g = sorted(ig, key=lambda a: atoms[a][0] != "sigmoid")
    o, t = sorted(ho, key=lambda a: atoms[a][0] != "sigmoid")
    if not isinstance(atoms[t][1], Poly) or reader.key(atoms[t][1]) != reader.key(c_poly):
        return None  # h' must read tanh of the new cell state itself
    gates = [atoms[a][1] for a in (i, o, f, g)]          # ONNX's order: i, o, f, c
    if not all(isinstance(lin, Lin) for lin in gates):
        raise NotACell("an LSTM gate is not an affine map of x and h (a peephole reads c)")
    H = gates[0].rows
    x, h = (x_id,), (h_id,)
    I = _input_width(reader, gates, x)
    mats = [_gate_matrices(lin, x, h, H, I, f"LSTM gate {n}") for lin, n in zip(gates, "iofc")]
    W = np.concatenate([m[0] for m in mats])[None].astype(np.float32)
    R = np.concatenate([m[1] for m in mats])[None].astype(np.float32)
    Wb = np.concatenate([lin.bias for lin in gates])
    B = np.concatenate([Wb, np.zeros_like(Wb)])[None].astype(np.float32)
    return Cell("LSTM", W, R, B, 0, h=-1, c=-1, form="c' = sig(f) c + sig(i) tanh(g), h' = sig(o) tanh(c')")


def match_gru(reader: BodyReader, h_new, h_id: int, x_id: int) -> Cell | None:
    """h' = (1 - z) n + z h (or h' = (1 - z) h + z n, read with z' = sig(-a)) with n either GRU candidate."""
    atoms = reader.atoms
    p = reader.poly(h_new)
    others = {a for m in p.terms for a in m if a != h_id}
    if len(others) != 2:
        return None
    z = next((a for a in others if atoms[a][0] == "sigmoid"), None)
    n = next((a for a in others if atoms[a][0] == "tanh"), None)
    if z is None or n is None:
        return None
    one = np.float64(1)
    onnx_form = {(n,): one, tuple(sorted((z, n))): -one, tuple(sorted((z, h_id))): one}
    swapped = {(h_id,): one, tuple(sorted((z, h_id))): -one, tuple(sorted((z, n))): one}

    def same(terms, want):
        return set(terms) == set(want) and all(_is(terms[m], want[m]) for m in want)

    if same(p.terms, onnx_form):
        z_lin, form = atoms[z][1], "h' = (1 - z) n + z h"
    elif same(p.terms, swapped):  # 1 - sig(a) = sig(-a): the update gate's weights change sign
        z_lin, form = lin_scale(atoms[z][1], -1.0) if isinstance(atoms[z][1], Lin) else None, "h' = (1 - z) h + z n"
    else:
        return None
    if not isinstance(z_lin, Lin):
        raise NotACell("the GRU update gate is not an affine map of x and h")
    x, h = (x_id,), (h_id,)
    cand = atoms[n][1]
    H = z_lin.rows
    sigmoids = [a for a, (kind, payload) in enumerate(atoms) if kind == "sigmoid" and a != z]
    if isinstance(cand, Lin):  # tanh(W_n x + b + R_n (r h))
        rh = [k for k in cand.terms if k != x]
        if len(rh) != 1 or len(rh[0]) != 2 or h_id not in rh[0]:
            raise NotACell("the GRU candidate does not read r * h")
        r = next(a for a in rh[0] if a != h_id)
        if r not in sigmoids:
            raise NotACell("the GRU candidate's r * h does not use a sigmoid reset gate")
        lbr = 0
        Wn = cand.terms.get(x, np.zeros((H, 0)))
        Rn = cand.terms[rh[0]]
        bwn, brn = cand.bias, np.zeros(H)
    else:  # tanh(W_n x + b_w + r (R_n h + b_r))
        terms = dict(cand.terms)
        bias = terms.pop((), np.zeros(H))
        lin_x = [m for m in terms if len(m) == 1 and atoms[m[0]][0] == "lin"]
        gated = [m for m in terms if m not in lin_x]
        rs = {a for m in gated for a in m if a in sigmoids}
        if len(rs) != 1:
            raise NotACell("the GRU candidate is not tanh(W x + r * (R h + b))")
        r = rs.pop()
        lh = [m for m in gated if len(m) == 2]
        rb = [m for m in gated if m == (r,)]
        if len(lh) != 1 or len(lh) + len(rb) != len(gated) or len(lin_x) > 1 or not _is(terms[lh[0]], 1):
            raise NotACell("the GRU candidate is not tanh(W x + r * (R h + b))")
        lin_h = atoms[next(a for a in lh[0] if a != r)][1]
        if atoms[next(a for a in lh[0] if a != r)][0] != "lin" or set(lin_h.terms) - {h}:
            raise NotACell("the GRU candidate's r multiplies something other than R h + b")
        lin_xv = lin_scale(atoms[lin_x[0][0]][1], terms[lin_x[0]]) if lin_x else Lin({}, np.zeros(H))
        if set(lin_xv.terms) - {x}:
            raise NotACell("the GRU candidate's input part reads more than x")
        lbr = 1
        Wn, Rn = lin_xv.terms.get(x, np.zeros((H, 0))), lin_h.terms.get(h, np.zeros((H, H)))
        bwn = lin_xv.bias + np.broadcast_to(bias, (H,))
        brn = lin_h.bias + (np.broadcast_to(terms[rb[0]], (H,)) if rb else 0)
    r_lin = atoms[r][1]
    if not isinstance(r_lin, Lin):
        raise NotACell("the GRU reset gate is not an affine map of x and h")
    I = _input_width(reader, [z_lin, r_lin, Lin({x: Wn}, bwn) if Wn.shape[1] else None], x)
    Wn = Wn if Wn.shape[1] else np.zeros((H, I))
    Wz, Rz = _gate_matrices(z_lin, x, h, H, I, "GRU update gate")
    Wr, Rr = _gate_matrices(r_lin, x, h, H, I, "GRU reset gate")
    if Wn.shape != (H, I) or Rn.shape != (H, H):
        raise NotACell(f"the GRU candidate's weights {list(Wn.shape)}, {list(Rn.shape)} do not fit")
    W = np.concatenate([Wz, Wr, Wn])[None].astype(np.float32)
    R = np.concatenate([Rz, Rr, Rn])[None].astype(np.float32)
    B = np.concatenate([z_lin.bias, r_lin.bias, bwn, np.zeros(2 * H), brn])[None].astype(np.float32)
    return Cell("GRU", W, R, B, lbr, h=-1, form=form + (", linear_before_reset" if lbr else ""))


def match_cell(reader: BodyReader, states: list, state_ids: list[int], x_id: int) -> Cell:
    """The cell whose update the float states' new values are; ``states`` are their abstract new values."""
    if len(states) == 2:
        for h, c in ((0, 1), (1, 0)):
            cell = match_lstm(reader, states[h], states[c], state_ids[h], state_ids[c], x_id)
            if cell is not None:
                cell.h, cell.c = h, c
                return cell
        raise NotACell("two carried states that are not an LSTM's (h, c) update")
    if len(states) == 1:
        cell = match_gru(reader, states[0], state_ids[0], x_id)
        if cell is not None:
            cell.h = 0
            return cell
        raise NotACell("one carried state whose update is not a GRU's")
    raise NotACell(f"{len(states)} carried float states (an LSTM carries 2, a GRU 1; a body of several cells, "
                   "such as stacked layers, is not split into several nodes)")


# ---------------------------------------------------------------------------------------------- the rewrite
@dataclass
class Recognised:
    """What a Loop/Scan was proved to compute, and where its results go."""

    cell: Cell
    x: ir.Value
    x_axis: int                      # the sequence axis of x
    reverse: bool
    h0: ir.Value | None
    c0: ir.Value | None
    finals: dict                     # old output value -> "h" or "c" (the final states, [batch, H])
    stacked: list                    # (old value, output axis of the sequence, time reversed?) of per-step h
    extra_nodes: list                # nodes that read the loop and go with it (ConcatFromSequence)


def _looks_like_a_cell(node: ir.Node) -> bool:
    ops = set()
    for attr in node.attributes.values():
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else \
            list(attr.value) if attr.type == ir.AttributeType.GRAPHS else []
        for g in graphs:
            ops |= {n.op_type for n in g.all_nodes()}
    return bool(ops & {"LSTM", "GRU"}) or bool(ops & {"Sigmoid", "Tanh"} and ops & {"MatMul", "Gemm"})


def _zero(v: ir.Value | None) -> bool:
    """v is provably all zeros (the usual initial state)."""
    if v is None:
        return True
    arr = const_array(v)
    if arr is not None:
        return not np.any(arr)
    node = v.producer()
    if node is None:
        return False
    if node.op_type == "ConstantOfShape":
        t = node.attributes.get("value")
        return t is None or not np.any(t.as_tensor().numpy())
    if node.op_type == "Expand":
        arr = const_array(node.inputs[0])
        return arr is not None and not np.any(arr)
    return False


def _is_length(m: ir.Value | None, x: ir.Value, axis: int) -> bool:
    """The trip count m is x's length along axis (Gather(Shape(x), axis), Shape(x)[axis:axis+1] or a constant
    equal to a static length)."""
    if m is None:
        return False
    arr = const_array(m)
    if arr is not None:
        dim = x.shape[axis] if x.shape is not None else None
        return isinstance(dim, int) and arr.size == 1 and int(arr.reshape(-1)[0]) == dim
    node = m.producer()
    while node is not None and node.op_type in ("Squeeze", "Reshape", "Cast", "Identity"):
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node is None:
        return False
    offset = 0
    if node.op_type == "Gather":
        idx = const_array(node.inputs[1])
        if idx is None or idx.size != 1 or node.attributes.get_int("axis", 0) != 0:
            return False
        offset = int(idx.reshape(-1)[0])
        node = node.inputs[0].producer()
        if node is None or node.op_type != "Shape":
            return False
        start = node.attributes.get_int("start", 0)
        return node.inputs[0] is x and (start + offset) % 3 == axis and offset >= 0
    if node.op_type == "Shape":
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", 3)
        return node.inputs[0] is x and start % 3 == axis and (end - start == 1 or end % 3 == (axis + 1) % 3)
    return False


def _rank2(v: ir.Value | None, what: str) -> int | None:
    """The static feature width of a [batch, features] value; refuses another rank."""
    if v is None or v.shape is None:
        raise NotACell(f"the rank of the {what} is not known")
    if len(v.shape) != 2:
        raise NotACell(f"the {what} has rank {len(v.shape)}, not [batch, features]")
    return _static(v.shape[1])


def _check_io(rec: Recognised) -> Recognised:
    """What the rewritten node cannot take: another dtype than float32, an initial state broadcast over the batch."""
    for v, what in ((rec.x, "input"), (rec.h0, "initial h"), (rec.c0, "initial c")):
        if v is not None and v.dtype is not None and v.dtype != ir.DataType.FLOAT:
            raise NotACell(f"the {what} is {v.dtype.name}; the recurrent recipe takes float32")
    batch = rec.x.shape[1 if rec.x_axis == 0 else 0] if rec.x.shape is not None else None
    for v, what in ((rec.h0, "initial h"), (rec.c0, "initial c")):
        if v is not None and not _zero(v) and v.shape is not None and v.shape[0] == 1 and batch != 1:
            raise NotACell(f"the {what} has batch 1 and is broadcast over the batch (an LSTM/GRU node's is not)")
    return rec


def read_scan(model: ir.Model, node: ir.Node) -> Recognised:
    a = node.attributes
    body = a["body"].as_graph()
    if model.graph.opset_imports.get("", 21) < 9:
        raise NotACell("Scan before opset 9 (batched form) is not covered")
    m = a.get_int("num_scan_inputs", 0)
    if m != 1:
        raise NotACell(f"{m} scan inputs (a cell reads one sequence)")
    n_states = len(node.inputs) - 1
    x = node.inputs[n_states]
    if x is None or x.shape is None or len(x.shape) != 3:
        raise NotACell("the scanned input is not a 3-D sequence")
    in_axis = (a.get_ints("scan_input_axes", [0]) or [0])[0] % 3
    reverse = bool((a.get_ints("scan_input_directions", [0]) or [0])[0])
    n_out = len(body.outputs) - n_states
    out_axes = list(a.get_ints("scan_output_axes", [0] * n_out) or [0] * n_out)
    out_dirs = list(a.get_ints("scan_output_directions", [0] * n_out) or [0] * n_out)
    reader = BodyReader(body, {})
    ids = []
    for k in range(n_states):
        _rank2(body.inputs[k], f"carried state {k}")
        reader.memo[body.inputs[k]] = reader.source(f"state{k}", _static(body.inputs[k].shape[1]))
        ids.append(len(reader.atoms) - 1)
    x_in = body.inputs[n_states]
    reader.memo[x_in] = reader.source("x", _static(x.shape[2 if in_axis != 2 else 1]))
    x_id = len(reader.atoms) - 1
    states = [reader.ev(v) for v in body.outputs[:n_states]]
    cell = match_cell(reader, states, ids, x_id)
    h_new = states[cell.h]
    finals = {node.outputs[cell.h]: "h"}
    if cell.c >= 0:
        finals[node.outputs[cell.c]] = "c"
    stacked = []
    for k, v in enumerate(body.outputs[n_states:]):
        if reader.key(reader.poly(reader.ev(v))) != reader.key(reader.poly(h_new)):
            raise NotACell(f"scan output {k} is not the new hidden state (an LSTM/GRU gives only h per step)")
        stacked.append((node.outputs[n_states + k], out_axes[k] % 3, bool(out_dirs[k]) != reverse))
    return _check_io(Recognised(cell, x, in_axis, reverse, node.inputs[cell.h],
                                node.inputs[cell.c] if cell.c >= 0 else None, finals, stacked, []))


def read_loop(model: ir.Model, node: ir.Node) -> Recognised:
    body = node.attributes["body"].as_graph()
    trip, cond = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    if cond is not None:
        c = const_array(cond)
        if c is None or not c.all():
            raise NotACell("the loop condition is not a constant true (a while loop)")
    reader = BodyReader(body, {})
    reader.memo[body.inputs[0]] = Marker("iteration")
    reader.memo[body.inputs[1]] = Marker("condition")
    carried = node.inputs[2:]
    floats, ids, seqs = [], [], []
    for k, init in enumerate(carried):
        producer = init.producer() if init is not None else None
        if producer is not None and producer.op_type == "SequenceEmpty":
            reader.memo[body.inputs[2 + k]] = Marker("sequence", k)
            seqs.append(k)
            continue
        _rank2(body.inputs[2 + k] if body.inputs[2 + k].shape is not None else init, f"carried state {k}")
        width = _static((body.inputs[2 + k].shape or init.shape)[1])
        reader.memo[body.inputs[2 + k]] = reader.source(f"state{k}", width)
        ids.append(len(reader.atoms) - 1)
        floats.append(k)
    cond_out = reader.ev(body.outputs[0])
    if not (isinstance(cond_out, Const) and cond_out.a.all()) and not (
            isinstance(cond_out, Marker) and cond_out.kind == "condition"):
        raise NotACell("the body's condition output is not a constant true")
    states = [reader.ev(body.outputs[1 + k]) for k in floats]
    if reader.x_read is None:
        # the cell may still read x through states; evaluate the rest first, then insist on one step input
        for v in body.outputs[1 + len(carried):]:
            reader.ev(v)
    x_id = reader.atom_ids.get(("x", "x"))
    if reader.x_read is None or x_id is None:
        raise NotACell("the body does not read x[t] as Gather(x, t)")
    cell = match_cell(reader, states, ids, x_id)
    x, axis = reader.x_read
    if not _is_length(trip, x, axis):
        raise NotACell(f"the trip count is not provably the length of '{x.name}' along axis {axis}")
    h_new = reader.poly(states[cell.h])
    h_key = reader.key(h_new)
    finals = {node.outputs[floats[cell.h]]: "h"}
    if cell.c >= 0:
        finals[node.outputs[floats[cell.c]]] = "c"
    stacked, extra = [], []
    for k in seqs:
        out = reader.ev(body.outputs[1 + k])
        if not isinstance(out, SeqAppend) or out.index != k or reader.key(reader.poly(out.item)) != h_key:
            raise NotACell(f"loop-carried sequence {k} does not collect the new hidden state")
        for use in node.outputs[k].uses():
            user = use.node
            new_axis = user.attributes.get_int("new_axis", 0)
            if user.op_type != "ConcatFromSequence" or new_axis != 1 or user.graph is not node.graph:
                raise NotACell(f"the collected sequence is read by {user.op_type} (only ConcatFromSequence with "
                               "new_axis=1 is covered)")
            stacked.append((user.outputs[0], user.attributes.get_int("axis", 0) % 3, False))
            extra.append(user)
        if node.outputs[k].is_graph_output():
            raise NotACell("the collected sequence is a graph output")
    n_carried = len(carried)
    for k, v in enumerate(body.outputs[1 + n_carried:]):
        if reader.key(reader.poly(reader.ev(v))) != h_key:
            raise NotACell(f"scan output {k} is not the new hidden state (an LSTM/GRU gives only h per step)")
        stacked.append((node.outputs[n_carried + k], 0, False))
    h0 = carried[floats[cell.h]]
    c0 = carried[floats[cell.c]] if cell.c >= 0 else None
    # the Cell's h/c index the float states; finals already name the outputs
    return _check_io(Recognised(cell, x, axis, False, h0, c0, finals, stacked, extra))


class _Emitter:
    """Builds the replacement nodes in the graph of the Loop/Scan; constants go to the main graph, which every
    subgraph sees."""

    def __init__(self, model: ir.Model, node: ir.Node):
        self.model, self.node, self.nodes = model, node, []
        self.opset = model.graph.opset_imports.get("", 21)
        self.base = node.name or node.op_type
        self.taken = _all_names(model)
        self.consts: dict[tuple, ir.Value] = {}

    def name(self, tag: str) -> str:
        name, i = f"{self.base}/{tag}", 1
        while name in self.taken:
            name, i = f"{self.base}/{tag}_{i}", i + 1
        self.taken.add(name)
        return name

    def const(self, tag: str, array) -> ir.Value:
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.consts:
            self.consts[key] = add_const(self.model.graph, self.name(tag), array)
            self.taken.add(self.consts[key].name)
        return self.consts[key]

    def add(self, op: str, inputs: list, attrs: dict | None = None, *, outputs: int = 1, name: str | None = None):
        while inputs and inputs[-1] is None:
            inputs = inputs[:-1]
        node = ir.node(op, inputs, attributes=attrs or {}, num_outputs=outputs, name=name or self.name(op.lower()))
        for k, v in enumerate(node.outputs):
            v.name = self.name(f"{op.lower()}_out{k}" if outputs > 1 else f"{op.lower()}_out")
            v.type = ir.TensorType(ir.DataType.FLOAT)
        self.nodes.append(node)
        return node.outputs if outputs > 1 else node.outputs[0]

    def axes_op(self, op: str, v: ir.Value, axes: list[int]) -> ir.Value:
        if self.opset >= 13:
            return self.add(op, [v, self.const(f"{op.lower()}_axes", np.array(axes, np.int64))])
        return self.add(op, [v], {"axes": axes})

    def to_seq_first(self, x: ir.Value, axis: int) -> ir.Value:
        if axis == 0:
            return x
        return self.add("Transpose", [x], {"perm": [axis] + [d for d in range(3) if d != axis]})

    def from_seq_first(self, y: ir.Value, axis: int) -> ir.Value:
        if axis == 0:
            return y
        perm = [1, 2]
        perm.insert(axis, 0)
        return self.add("Transpose", [y], {"perm": perm})

    def reversed_time(self, y: ir.Value) -> ir.Value:
        i64 = np.iinfo(np.int64)
        return self.add("Slice", [y, self.const("rev_start", np.array([-1], np.int64)),
                                  self.const("rev_end", np.array([i64.min], np.int64)),
                                  self.const("rev_axis", np.array([0], np.int64)),
                                  self.const("rev_step", np.array([-1], np.int64))])


def _all_names(model: ir.Model) -> set[str]:
    names = set(model.graph.initializers)
    for g in [model.graph, *model.graph.subgraphs()]:
        names |= {v.name for v in g.inputs}
        for n in g:
            names |= {v.name for v in n.outputs}
            if n.name:
                names.add(n.name)
    return names


def rewrite(model: ir.Model, node: ir.Node, rec: Recognised) -> ir.Node:
    """Replace the Loop/Scan (and the nodes that only collect its steps) by the LSTM/GRU node and its glue."""
    cell, e = rec.cell, _Emitter(model, node)
    graph = node.graph
    x = e.to_seq_first(rec.x, rec.x_axis)
    inputs = [x, e.const("W", cell.W), e.const("R", cell.R), e.const("B", cell.B), None]
    inputs.append(None if _zero(rec.h0) else e.axes_op("Unsqueeze", rec.h0, [0]))
    if cell.op == "LSTM":
        inputs.append(None if _zero(rec.c0) else e.axes_op("Unsqueeze", rec.c0, [0]))
    attrs = {"hidden_size": cell.hidden, "direction": "reverse" if rec.reverse else "forward"}
    if cell.op == "GRU":
        attrs["linear_before_reset"] = cell.linear_before_reset
    outs = e.add(cell.op, inputs, attrs, outputs=3 if cell.op == "LSTM" else 2, name=node.name or None)
    rnn = e.nodes[-1]
    rnn.metadata_props[NOTE_KEY] = f"read from the {node.op_type} body: {cell.form}"
    replace = {}
    for old, which in rec.finals.items():
        if old.uses() or old.is_graph_output():
            replace[old] = e.axes_op("Squeeze", outs[1 if which == "h" else 2], [0])
    y3 = None
    for old, axis, backwards in rec.stacked:
        if not (old.uses() or old.is_graph_output()):
            continue
        if y3 is None:
            y3 = e.axes_op("Squeeze", outs[0], [1])
        replace[old] = e.from_seq_first(e.reversed_time(y3) if backwards else y3, axis)
    graph.insert_before(node, e.nodes)
    for old, new in replace.items():
        new.shape = old.shape
        if old.type is not None:
            new.type = old.type
        redirect_uses(old, new)
    for extra in rec.extra_nodes:
        graph.remove(extra, safe=True)
    _detach_body(node)
    inputs_before = [v for v in node.inputs if v is not None]
    graph.remove(node, safe=True)
    _drop_unused_producers(graph, inputs_before)
    return rnn


def _detach_body(node: ir.Node) -> None:
    """Drop the body's reads of outer values, so the old weights count as unused and dead-code removal takes them."""
    for attr in node.attributes.values():
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else \
            list(attr.value) if attr.type == ir.AttributeType.GRAPHS else []
        for g in graphs:
            for n in g.all_nodes():
                for k in range(len(n.inputs)):
                    n.replace_input_with(k, None)


def _drop_unused_producers(graph: ir.Graph, values: list) -> None:
    """Remove what only fed the old loop (initial zeros, SequenceEmpty, the trip count) in its own graph."""
    todo = list(values)
    while todo:
        v = todo.pop()
        node = v.producer()
        if node is None or node.graph is not graph or any(o.uses() or o.is_graph_output() for o in node.outputs):
            continue
        todo.extend(i for i in node.inputs if i is not None)
        graph.remove(node, safe=True)


def _loops(graph: ir.Graph):
    """Every Loop/Scan node at any depth, innermost first."""
    for node in list(graph):
        for attr in node.attributes.values():
            graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else \
                list(attr.value) if attr.type == ir.AttributeType.GRAPHS else []
            for g in graphs:
                yield from _loops(g)
        if node.op_type in ("Loop", "Scan") and node.domain in ("", "ai.onnx"):
            yield node


class RecogniseRecurrentCells:
    """Rewrite Loop/Scan nodes whose body is exactly one LSTM or GRU step as the equal ONNX LSTM/GRU node (see the
    module docstring); ``notes`` maps each Loop/Scan that looks like a cell to what became of it."""

    name = "recognise_recurrent_cells"

    def __init__(self):
        self.notes: dict[str, str] = {}

    def __call__(self, model: ir.Model, ctx) -> bool:
        modified = False
        for node in list(_loops(model.graph)):
            if not _looks_like_a_cell(node):
                continue
            label = node.name or f"{node.op_type}->{node.outputs[0].name}"
            try:
                try:  # reading has no side effects: an unforeseen body is a refusal, not a failed compile
                    rec = (read_loop if node.op_type == "Loop" else read_scan)(model, node)
                except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
                    raise NotACell(f"the body could not be read ({type(exc).__name__}: {str(exc)[:80]})") from None
                rnn = rewrite(model, node, rec)
            except NotACell as why:
                note = f"{node.op_type} '{label}' is not read as an LSTM/GRU step, kept as it is: {why}"
                node.metadata_props[NOTE_KEY] = note
                self.notes[label] = note
                continue
            direction = "reverse" if rec.reverse else "forward"
            self.notes[label] = f"{node.op_type} '{label}' -> {rnn.op_type} ({direction}, hidden {rec.cell.hidden}" \
                f"; {rec.cell.form})"
            modified = True
        return modified
