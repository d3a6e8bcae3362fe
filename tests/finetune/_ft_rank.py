"""One rank of a data-parallel fine-tune for test_distributed.py: torchrun's environment comes from the test.

argv: kwargs.json result.npz. Rank 0 saves the trained student's parameters and the step losses."""

import json
import os
import sys

import numpy as np

import qcompile
from qcompile import datasets
from qcompile.errors import QcompileError

kw = json.loads(open(sys.argv[1]).read())
x, y = datasets.load_sample()
n = kw.pop("n", 256)
kw["data"] = (x[:n], y[:n])
kw["val"] = (x[n:n + 64], y[n:n + 64])
try:
    res = qcompile.finetune(datasets.bundled_model("mlp"), log=lambda s: None, **kw)
except QcompileError as exc:
    print(f"error: {exc}", file=sys.stderr, flush=True)
    os._exit(3)   # as the CLI does: with a peer gone, an orderly teardown could hang
if res is not None:
    state = res.checkpoint["state"]["student"]
    np.savez(sys.argv[2], step_loss=np.array(res.report["history"]["step_loss"]),
             **{k.replace(".", "/"): v.detach().numpy() for k, v in state.items()})
