"""mexify.graph.liveness on a hand-built graph: which values cross a cut between two nodes."""
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from mexify.graph.adapt import prepare_graph
from mexify.graph.liveness import compute_nodes, last_uses, live_values


class SkipNet(nn.Module):
    """``s`` is used right after it is made and again at the end: a skip over ``b``, ``relu`` and ``c``.

    Nodes: x, a, scale (get_attr), mul (= s), b, relu, c, getattr_1, getitem, interpolate, mul_1, add, cls.
    """

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.cls = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        s = self.a(x) * self.scale
        y = self.c(self.b(s).relu())
        return self.cls(F.interpolate(y, size=s.shape[-2:]) + s * self.scale)


ORDER = ["x", "a", "mul", "b", "relu", "c", "getattr_1", "getitem", "interpolate", "mul_1", "add", "cls"]


def _nodes():
    gm = prepare_graph(fx.symbolic_trace(SkipNet().eval()))
    return compute_nodes(gm.graph)


def test_compute_nodes_keep_values_in_execution_order_without_parameters_or_the_output():
    nodes = _nodes()
    assert [n.name for n in nodes] == ORDER
    assert all(n.op not in ("get_attr", "output") for n in nodes)


def test_last_uses_are_positions_of_the_last_user_and_the_output_counts_as_the_end():
    nodes = _nodes()
    last = {n.name: p for n, p in last_uses(nodes).items()}
    assert last == {
        "x": 1, "a": 2, "mul": 9,  # the skip: last used by mul_1, long after b
        "b": 4, "relu": 5, "c": 8, "getattr_1": 7, "getitem": 8, "interpolate": 10, "mul_1": 10, "add": 11,
        "cls": len(nodes),  # read by the graph's output, which comes after every node
    }


def test_a_value_without_users_dies_where_it_is_made():
    graph = fx.Graph()
    x = graph.placeholder("x")
    unused = graph.call_function(torch.relu, (x,))
    out = graph.call_function(torch.neg, (x,))
    graph.output(out)
    nodes = compute_nodes(graph)
    last = last_uses(nodes)
    assert last[unused] == 1 and last[x] == 2 and last[out] == 3
    assert live_values(nodes, 1) == [x]  # the unused value is not carried across a cut after it


def test_live_values_at_each_cut_carry_the_skip_until_its_last_use():
    nodes = _nodes()
    live = {nodes[i].name: [v.name for v in live_values(nodes, i)] for i in range(len(nodes))}
    assert live == {
        "x": ["x"],
        "a": ["a"],
        "mul": ["mul"],
        "b": ["mul", "b"],  # a cut inside the skip: the skip crosses it, in definition order
        "relu": ["mul", "relu"],
        "c": ["mul", "c"],
        "getattr_1": ["mul", "c", "getattr_1"],  # a shape is a value too
        "getitem": ["mul", "c", "getitem"],
        "interpolate": ["mul", "interpolate"],
        "mul_1": ["interpolate", "mul_1"],  # the skip's last use: gone
        "add": ["add"],
        "cls": ["cls"],  # the logits stay alive to the output
    }


def test_live_values_reuse_given_last_uses():
    nodes = _nodes()
    last = last_uses(nodes)
    fake = dict(last)
    fake[nodes[0]] = len(nodes)  # pretend the input is read at the very end
    assert live_values(nodes, 4, last) == live_values(nodes, 4)
    assert [v.name for v in live_values(nodes, 4, fake)] == ["x", "mul", "relu"]
