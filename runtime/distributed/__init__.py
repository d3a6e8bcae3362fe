"""Distributed fine-tuning runtime: HFReduce, an allreduce through each node's shared host memory with a double
binary tree between nodes, usable as a DDP communication hook. Needs torch (the deployed runtime does not import it).

    dist.init_process_group("gloo")                      # torchrun's env, or QCOMPILE_SIM_NODES=k on one machine
    engine = HFReduce(algorithm="tree")                  # collective: every rank constructs it
    ddp.register_comm_hook(HFReduceState(engine), hfreduce_hook)
    ...
    engine.close()
"""

from qcompile.runtime.distributed.hfreduce import (
    ALGORITHMS,
    HFReduce,
    HFReduceError,
    HFReduceState,
    btree,
    dorefa_decode,
    dorefa_encode,
    double_binary_tree,
    failure_reason,
    hfreduce_hook,
    message_bytes,
    register,
)
from qcompile.runtime.distributed.shm import NodeSegment, segment_name, sweep_stale
from qcompile.runtime.distributed.topology import SIM_NODES_ENV, Topology, TopologyError

__all__ = [
    "ALGORITHMS", "HFReduce", "HFReduceError", "HFReduceState", "NodeSegment", "SIM_NODES_ENV", "Topology",
    "TopologyError", "btree", "dorefa_decode", "dorefa_encode", "double_binary_tree", "failure_reason", "hfreduce_hook",
    "message_bytes", "register", "segment_name", "sweep_stale",
]
