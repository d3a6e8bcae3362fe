"""Word-level language models in ONNX: streaming perplexity in onnxruntime, and a detector.

numpy + onnx + onnxruntime only (no torch).

The interface assumed (the bundled `models/kjv_{lstm,gru}_lm.onnx` follow it; see models/README_lm.md):

- inputs: the token ids first (int64, or int32, `[seq, batch]`), then the recurrent states, each float32
  `[layers * directions, batch, hidden]` (an LSTM: `h0`, `c0`; a GRU: `h0`);
- outputs: the logits first (float `[seq, batch, vocab]`, no softmax), then the final states in the same order as
  the state inputs (`hn`[, `cn`]).

A model whose token input's dims are named `(batch, seq)` (or that is run with `batch_first=True`) takes and
returns `[batch, seq]` / `[batch, seq, vocab]` instead. A model without state inputs is evaluated window by window
with nothing carried.

`perplexity` batchifies a token stream like the standard PTB evaluation (Zaremba et al. 2014; the PyTorch
word_language_model example): the stream is cut to a multiple of `batch`, reshaped into `batch` contiguous
columns (column j holds tokens j*n .. j*n+n-1), walked in windows of `seq_len` rows predicting each next token,
and the final states of a window are the initial states of the next (`carry_state=True`). Perplexity is
exp(mean negative log-likelihood) over every predicted token, batch * (n - 1) of them, computed in float64.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from qcompile.errors import QcompileError

#: Recurrent ONNX ops that mark a graph as a recurrent language model.
RECURRENT_OPS = ("LSTM", "GRU", "RNN")

_INT_TYPES = (6, 7)  # onnx.TensorProto.INT32, INT64
_FLOAT_TYPES = (1, 10, 11, 16)  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


@dataclass(frozen=True)
class LMSignature:
    """The inputs/outputs of an ONNX language model, as `perplexity` uses them."""

    tokens: str                 #: token-id input name
    states: tuple[str, ...]     #: state input names (h0[, c0]), in order
    logits: str                 #: logits output name
    final_states: tuple[str, ...]  #: final-state output names, same order as `states`
    state_shapes: tuple[tuple, ...]  #: each state input's dims (int, or str/None where symbolic)
    batch_first: bool           #: True when tokens are [batch, seq]
    vocab: int | None           #: the logits' last dim when the graph states it


def _dims(value_info) -> tuple | None:
    t = value_info.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    out = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return tuple(out)


def _elem(value_info) -> int:
    t = value_info.type
    return t.tensor_type.elem_type if t.HasField("tensor_type") else 0


def _load(model):
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model))
    try:
        return onnx.load(os.fspath(model))
    except (OSError, ValueError) as e:  # DecodeError is a ValueError subclass in protobuf
        raise QcompileError(f"{model}: cannot load ONNX model ({e})") from e


def lm_signature(model) -> LMSignature:
    """The token input, state inputs, logits and final-state outputs of an ONNX LM (path, bytes or ModelProto).

    Raises QcompileError when the graph does not have the interface described in the module docstring.
    """
    proto = _load(model)
    g = proto.graph
    inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if not inputs or _elem(inputs[0]) not in _INT_TYPES:
        raise QcompileError("language model: the first input must be int64/int32 token ids "
                            f"(inputs: {[(i.name, _elem(i)) for i in inputs]})")
    tok = inputs[0]
    tdims = _dims(tok)
    if tdims is not None and len(tdims) != 2:
        raise QcompileError(f"language model: token input {tok.name!r} has rank {len(tdims)}, expected 2")
    states = inputs[1:]
    for s in states:
        d = _dims(s)
        if _elem(s) not in _FLOAT_TYPES or (d is not None and len(d) != 3):
            raise QcompileError(f"language model: state input {s.name!r} must be float [layers, batch, hidden]")
    outs = list(g.output)
    if len(outs) < 1 + len(states):
        raise QcompileError(f"language model: {len(states)} state inputs but only {len(outs)} outputs "
                            "(expected logits then one final state per state input)")
    ld = _dims(outs[0])
    if _elem(outs[0]) not in _FLOAT_TYPES or (ld is not None and len(ld) != 3):
        raise QcompileError(f"language model: first output {outs[0].name!r} must be float logits of rank 3")
    batch_first = bool(tdims and isinstance(tdims[0], str) and "batch" in tdims[0].lower())
    return LMSignature(
        tokens=tok.name,
        states=tuple(s.name for s in states),
        logits=outs[0].name,
        final_states=tuple(o.name for o in outs[1:1 + len(states)]),
        state_shapes=tuple(_dims(s) or (None, None, None) for s in states),
        batch_first=batch_first,
        vocab=ld[-1] if ld and isinstance(ld[-1], int) and ld[-1] > 0 else None,
    )


def is_language_model(model) -> bool:
    """Heuristic: does this ONNX graph look like a (recurrent) word-level language model?

    True when all of these hold (never raises; an unreadable model is False):
      1. the first non-initializer input is integer (int64/int32) token ids of rank 2 (or unknown rank);
      2. the top-level graph has an LSTM, GRU or RNN node;
      3. the first output is float of rank 3 (or unknown rank) - logits [seq, batch, vocab];
      4. any further inputs are float rank-3 states, with one final-state output each (`lm_signature`);
      5. when the vocab size is known on both sides, the logits' last dim equals the row count of the
         embedding table (the initializer a Gather reads from with the token ids).
    """
    try:
        proto = _load(model)
        sig = lm_signature(proto)
    except Exception:  # noqa: BLE001 - a detector answers False, it does not fail
        return False
    g = proto.graph
    if not any(n.op_type in RECURRENT_OPS for n in g.node):
        return False
    vocab = sig.vocab
    if vocab is not None:
        inits = {t.name: t for t in g.initializer}
        for n in g.node:
            if n.op_type == "Gather" and len(n.input) >= 2 and n.input[1] == sig.tokens and n.input[0] in inits:
                rows = inits[n.input[0]].dims[0] if inits[n.input[0]].dims else None
                if rows is not None and rows != vocab:
                    return False
    return True


def batchify(tokens: np.ndarray, batch: int) -> np.ndarray:
    """A 1-D token stream -> int64 [n, batch], column j = tokens[j*n:(j+1)*n] (the tail past batch*n is dropped)."""
    t = np.asarray(tokens)
    if t.ndim != 1:
        raise QcompileError(f"tokens must be a 1-D stream of ids, got shape {t.shape}")
    n = len(t) // batch
    if n < 2:
        raise QcompileError(f"{len(t)} tokens are too few for batch={batch} (need at least {2 * batch})")
    return np.ascontiguousarray(t[:n * batch].astype(np.int64).reshape(batch, n).T)


def _session(model):
    import onnxruntime as ort

    if isinstance(model, (str, os.PathLike)):
        src = os.fspath(model)
    else:
        src = _load(model).SerializeToString()
    so = ort.SessionOptions()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum over rows of -log softmax(logits)[target]: exp in float32 after subtracting the row max, sums and logs
    in float64 (relative error ~1e-7 per token, 3x faster than all-float64)."""
    z = np.ascontiguousarray(logits.reshape(-1, logits.shape[-1]), dtype=np.float32)
    m = z.max(axis=1, keepdims=True)
    buf = np.subtract(z, m)
    np.exp(buf, out=buf)
    lse = np.log(buf.sum(axis=1, dtype=np.float64)) + m[:, 0].astype(np.float64)
    picked = z[np.arange(z.shape[0]), targets.reshape(-1)].astype(np.float64)
    return float((lse - picked).sum())


def stream_nll(model, tokens, *, seq_len: int = 35, batch: int = 10, carry_state: bool = True,
               batch_first: bool | None = None, session=None) -> tuple[float, int]:
    """(total negative log-likelihood in nats, number of predicted tokens) of an ONNX LM over a token stream.

    See the module docstring for the batchifying. `session` reuses an existing onnxruntime InferenceSession of
    the same model.
    """
    if seq_len < 1 or batch < 1:
        raise QcompileError(f"seq_len and batch must be >= 1 (got {seq_len}, {batch})")
    sig = lm_signature(model)
    bf = sig.batch_first if batch_first is None else bool(batch_first)
    data = batchify(tokens, batch)
    sess = session if session is not None else _session(model)
    ttype = sess.get_inputs()[0].type
    tdtype = np.int32 if "int32" in ttype else np.int64
    stypes = {i.name: (np.float16 if "float16" in i.type else np.float64 if "double" in i.type else np.float32)
              for i in sess.get_inputs()}

    def zeros():
        out = {}
        for name, dims in zip(sig.states, sig.state_shapes):
            layers, hidden = dims[0], dims[2]
            if not isinstance(layers, int) or not isinstance(hidden, int):
                raise QcompileError(f"state input {name!r} has symbolic dims {dims}; "
                                    "need fixed [layers, batch, hidden]")
            out[name] = np.zeros((layers, batch, hidden), dtype=stypes[name])
        return out

    states = zeros()
    vocab = sig.vocab
    if vocab is not None and (data.max() >= vocab or data.min() < 0):
        raise QcompileError(f"token ids must be in [0, {vocab}); got {data.min()}..{data.max()}")
    total, count = 0.0, 0
    n = data.shape[0]
    outputs = [sig.logits, *sig.final_states]
    for i in range(0, n - 1, seq_len):
        length = min(seq_len, n - 1 - i)
        x = data[i:i + length]
        y = data[i + 1:i + 1 + length]
        feed = {sig.tokens: (x.T if bf else x).astype(tdtype)}
        feed.update(states if carry_state else zeros())
        res = sess.run(outputs, feed)
        logits = res[0]
        if bf:
            logits = logits.transpose(1, 0, 2)
        if logits.shape[:2] != x.shape:
            raise QcompileError(f"logits have shape {logits.shape}, expected [{length}, {batch}, vocab]"
                                f"{' (batch_first)' if bf else ''}")
        if vocab is None:
            vocab = logits.shape[-1]
            if data.max() >= vocab or data.min() < 0:
                raise QcompileError(f"token ids must be in [0, {vocab}); got {data.min()}..{data.max()}")
        total += _log_softmax_nll(logits, y)
        count += y.size
        states = dict(zip(sig.states, res[1:]))
    return total, count


def perplexity(model, tokens, *, seq_len: int = 35, batch: int = 10, carry_state: bool = True,
               batch_first: bool | None = None, session=None) -> float:
    """Perplexity of an ONNX language model (path, bytes or ModelProto) on a 1-D stream of token ids.

    PTB-style streaming evaluation in onnxruntime: `batch` contiguous columns, windows of `seq_len` tokens, the
    final states carried into the next window (`carry_state=False` restarts every window from zero states).
    Returns exp(total NLL / predicted tokens).
    """
    total, count = stream_nll(model, tokens, seq_len=seq_len, batch=batch, carry_state=carry_state,
                              batch_first=batch_first, session=session)
    return math.exp(total / count)
