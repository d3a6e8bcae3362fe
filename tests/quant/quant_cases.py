"""Inputs for the quantizer tests: named weight families and a hypothesis strategy."""

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


def _outliers(rng, shape):
    w = rng.standard_normal(shape)
    flat = w.reshape(-1)
    flat[rng.choice(flat.size, 3, replace=False)] = [1e4, -3e5, 1e30]
    return w


def _constant_channels(rng, shape):
    w = rng.standard_normal(shape)
    w[1], w[2], w[3] = 0.0, -0.3, 7.0
    return w


#: name -> rng, shape -> weights; every family is non-constant per tensor
FAMILIES = {
    "normal": lambda rng, shape: rng.standard_normal(shape),
    "laplace": lambda rng, shape: rng.laplace(size=shape),
    "student_t2": lambda rng, shape: rng.standard_t(2, size=shape),
    "outliers": _outliers,
    "ties": lambda rng, shape: np.round(rng.standard_normal(shape) * 2) / 2,
    "constant_channels": _constant_channels,
    "positive": lambda rng, shape: rng.random(shape) + 1.0,
}
SHAPE = (6, 3, 3, 3)

# Finite float32 values of moderate size; hypothesis also draws zeros, repeats and tiny tensors.
_values = st.one_of(
    st.floats(-1e3, 1e3, width=32, allow_subnormal=False),
    st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]),
)


@st.composite
def weights(draw, max_rows=4, max_cols=12):
    """float32 (C, M) tensors, 1..max_rows rows of 1..max_cols values."""
    shape = (draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols)))
    return draw(hnp.arrays(np.float32, shape, elements=_values))


def rows(w, axis):
    """w viewed as (rows, M) the way the quantizers see it."""
    return w.reshape(1, -1) if axis is None else w.reshape(w.shape[0], -1)


def is_constant(w, axis=None):
    r = rows(w, axis)
    return (r.min(axis=1) == r.max(axis=1)).all()


def combos(max_bits=4):
    """(registry name, bits) pairs for every quantizer and supported bit width up to max_bits."""
    from qcompile.quant import get, names

    return [(n, b) for n in names() for b in get(n).bits if b <= max_bits]


SYMMETRIC = {"dorefa", "xnor", "rnn-balanced"}
AFFINE = {"balanced", "balanced-mean"}  # registry balanced = scale="affine": half-integer zero point, uniform levels
