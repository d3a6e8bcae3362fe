"""Who shares a machine with whom: the node layout HFReduce reduces over.

A *node* is a set of ranks that share host memory (one machine). Its first rank is the node's *leader*: it owns
the node's shared-memory segment, sums the node's gradients and talks to the other nodes' leaders.

Where the layout comes from, first match wins:
1. an override, ``sim_nodes=k`` or the environment variable ``QCOMPILE_SIM_NODES=k``: the ranks of one machine are
   split into k simulated nodes of consecutive ranks (sizes as equal as possible, the first nodes one larger), so a
   single machine can run the multi-node code path;
2. torchrun's environment (``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``): node ``GROUP_RANK`` holds the
   global ranks ``GROUP_RANK * LOCAL_WORLD_SIZE + [0, LOCAL_WORLD_SIZE)``, which is how torchrun numbers ranks when
   every node runs the same ``--nproc-per-node``;
3. nothing: every rank is on one machine (one node).

``RANK``/``WORLD_SIZE`` come from the environment, or from torch.distributed when it is initialized and they are
not set. This module imports torch only inside :meth:`Topology.leader_group`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

SIM_NODES_ENV = "QCOMPILE_SIM_NODES"


class TopologyError(ValueError):
    """The environment describes no consistent node layout."""


@dataclass(frozen=True)
class Topology:
    rank: int
    world: int
    local_rank: int
    local_world: int
    node: int
    n_nodes: int
    nodes: tuple[tuple[int, ...], ...]  # the global ranks of each node, in node order
    simulated: bool = False

    # ---- derived ------------------------------------------------------------------------------------------------
    @property
    def node_ranks(self) -> tuple[int, ...]:
        return self.nodes[self.node]

    @property
    def leader(self) -> int:
        """Global rank of this node's leader (its first rank)."""
        return self.nodes[self.node][0]

    @property
    def leaders(self) -> tuple[int, ...]:
        """Global rank of every node's leader, in node order."""
        return tuple(n[0] for n in self.nodes)

    @property
    def is_leader(self) -> bool:
        return self.local_rank == 0

    def global_rank(self, local_rank: int) -> int:
        return self.node_ranks[local_rank]

    def describe(self) -> str:
        sizes = "+".join(str(len(n)) for n in self.nodes)
        kind = "simulated " if self.simulated else ""
        return (f"{self.n_nodes} {kind}node(s) ({sizes} ranks); rank {self.rank} is local rank {self.local_rank} "
                f"of node {self.node}")

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_nodes(cls, rank: int, nodes: list[list[int]] | tuple[tuple[int, ...], ...],
                   simulated: bool = False) -> "Topology":
        nodes_t = tuple(tuple(int(r) for r in n) for n in nodes)
        flat = sorted(r for n in nodes_t for r in n)
        world = len(flat)
        if flat != list(range(world)) or any(not n for n in nodes_t):
            raise TopologyError(f"nodes {nodes_t} must partition ranks 0..{world - 1} into non-empty nodes")
        node = next((i for i, n in enumerate(nodes_t) if rank in n), None)
        if node is None:
            raise TopologyError(f"rank {rank} is in none of the nodes {nodes_t}")
        return cls(rank=rank, world=world, local_rank=nodes_t[node].index(rank), local_world=len(nodes_t[node]),
                   node=node, n_nodes=len(nodes_t), nodes=nodes_t, simulated=simulated)

    @classmethod
    def simulate(cls, rank: int, world: int, n_nodes: int) -> "Topology":
        """Split ranks 0..world-1 into n_nodes nodes of consecutive ranks (the first world % n_nodes one larger)."""
        if not 1 <= n_nodes <= world:
            raise TopologyError(f"{SIM_NODES_ENV}={n_nodes}: need 1 <= simulated nodes <= world size {world}")
        base, extra = divmod(world, n_nodes)
        nodes, start = [], 0
        for i in range(n_nodes):
            size = base + (1 if i < extra else 0)
            nodes.append(list(range(start, start + size)))
            start += size
        return cls.from_nodes(rank, nodes, simulated=True)

    @classmethod
    def from_env(cls, sim_nodes: int | None = None, *, env: Mapping[str, str] | None = None,
                 rank: int | None = None, world: int | None = None) -> "Topology":
        """The layout from an override, torchrun's environment, or one node (see the module docstring)."""
        env = os.environ if env is None else env
        rank = _int(env, "RANK") if rank is None else rank
        world = _int(env, "WORLD_SIZE") if world is None else world
        if rank is None or world is None:
            import torch.distributed as dist  # only when the environment does not say

            if not dist.is_available() or not dist.is_initialized():
                raise TopologyError("RANK/WORLD_SIZE are not set and torch.distributed is not initialized")
            rank, world = dist.get_rank(), dist.get_world_size()
        if not 0 <= rank < world:
            raise TopologyError(f"rank {rank} is outside world size {world}")
        if sim_nodes is None:
            sim_nodes = _int(env, SIM_NODES_ENV)
        if sim_nodes is not None:
            return cls.simulate(rank, world, sim_nodes)
        local_world, group_rank, local_rank = (_int(env, k) for k in ("LOCAL_WORLD_SIZE", "GROUP_RANK", "LOCAL_RANK"))
        if local_world is not None and group_rank is not None:
            if world % local_world:
                raise TopologyError(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local_world}: "
                                    f"nodes of different sizes need {SIM_NODES_ENV} or Topology.from_nodes")
            nodes = [list(range(g * local_world, (g + 1) * local_world)) for g in range(world // local_world)]
            topo = cls.from_nodes(rank, nodes)
            if topo.node != group_rank or (local_rank is not None and topo.local_rank != local_rank):
                raise TopologyError(f"rank {rank}: GROUP_RANK={group_rank} LOCAL_RANK={local_rank} do not match "
                                    f"torchrun's numbering RANK = GROUP_RANK * LOCAL_WORLD_SIZE + LOCAL_RANK")
            return topo
        return cls.from_nodes(rank, [list(range(world))])

    # ---- process groups -----------------------------------------------------------------------------------------
    def leader_group(self, timeout_s: float | None = None, backend: str | None = None):
        """A torch.distributed group of the node leaders (None with one node).

        Collective: every rank of the default group must call it, leaders or not, in the same order."""
        if self.n_nodes == 1:
            return None
        from datetime import timedelta

        import torch.distributed as dist

        kw = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        return dist.new_group(ranks=list(self.leaders), backend=backend, **kw)


def _int(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise TopologyError(f"{key}={value!r} is not an integer") from None
