"""Liveness of graph values: which values are alive at a cut between two nodes.

Placement scores cuts by how many tensors cross them; splitting makes those values the
outputs of one stage and the inputs of the next.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch.fx as fx

__all__ = ["compute_nodes", "last_uses", "live_values"]


def compute_nodes(graph: fx.Graph) -> List[fx.Node]:
    """Nodes that hold values, in execution order (parameters fetched by get_attr excluded)."""
    return [n for n in graph.nodes if n.op not in ("get_attr", "output")]


def last_uses(nodes: List[fx.Node]) -> Dict[fx.Node, int]:
    """Position of each node's last user in ``nodes`` (``len(nodes)`` for the graph output)."""
    pos = {n: i for i, n in enumerate(nodes)}
    end = len(nodes)
    last = {}
    for n in nodes:
        uses = [pos.get(u, end) for u in n.users]
        last[n] = max(uses) if uses else pos[n]
    return last


def live_values(nodes: List[fx.Node], position: int, last_use: Optional[Dict[fx.Node, int]] = None) -> List[fx.Node]:
    """Values defined at or before ``position`` and used after it, in definition order."""
    last_use = last_use if last_use is not None else last_uses(nodes)
    return [n for n in nodes[: position + 1] if last_use[n] > position]
