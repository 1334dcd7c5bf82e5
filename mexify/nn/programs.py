"""Exported programs: stages and heads as ``torch.export`` programs, stored without pickles.

An exported bundle holds each stage and each head as a ``torch.export`` program: the graph as
``torch.export``'s JSON schema (``<name>.json``) and its weights and tensor constants in
``<name>.safetensors``. Loading rebuilds the program from the two (:func:`load_program`): no
module of the original model is imported and nothing is unpickled (``torch.export.load`` would
unpickle payloads it cannot store as raw tensors).

Values alive across a cut are tensors, Python ints or sizes (``b = x.shape[0]``, ``x.shape[-2:]``).
A program's inputs and outputs are tensors, so ints and sizes travel as *shape carriers*: empty
tensors whose shape holds the values after a leading 0 (an int ``v`` is a ``(0, v)`` tensor, a
size ``(h, w)`` a ``(0, h, w)`` one). The next stage reads them back from the carrier's shape,
which ``torch.export`` and ONNX keep symbolic, and a batch carried in an int or size shrinks with
the carrier's dimension that holds it (:func:`carrier_batch_dim`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mexify.errors import BundleError, MexifyError
from mexify.files import inside
from mexify.graph.serde import deserialize_program
from mexify.nn.heads import resize_logits

__all__ = [
    "TENSOR",
    "INT",
    "value_kind",
    "to_carrier",
    "from_carrier",
    "carrier_batch_dim",
    "CarrierModule",
    "ProgramModule",
    "ProgramHead",
    "save_program",
    "load_program",
]

TENSOR = "tensor"
INT = "int"
# "size:<type>:<n>": n ints in a torch.Size, a tuple or a list


def value_kind(value: Any) -> str:
    """How a live value crosses a program boundary, or ``""`` when it cannot.

    Tensors as they are, ints and sequences of ints as shape carriers.
    """
    if isinstance(value, torch.Tensor):
        return TENSOR
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        return INT
    if isinstance(value, (torch.Size, tuple, list)) and all(
        isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) for v in value
    ):
        kind = "Size" if isinstance(value, torch.Size) else type(value).__name__
        return f"size:{kind}:{len(value)}"
    return ""


def to_carrier(value: Any, kind: str) -> torch.Tensor:
    """A live value as a program input/output (see the module docstring)."""
    if kind == TENSOR:
        return value
    if kind == INT:
        return torch.empty((0, value))
    return torch.empty((0, *value))


def from_carrier(carrier: torch.Tensor, kind: str) -> Any:
    """Inverse of :func:`to_carrier`."""
    if kind == TENSOR:
        return carrier
    if kind == INT:
        return carrier.shape[1]
    _, container, _ = kind.split(":")
    values = carrier.shape[1:]
    return values if container == "Size" else tuple(values) if container == "tuple" else list(values)


def carrier_batch_dim(batch_dim: str, kind: str) -> str:
    """A value's batch dependence (:class:`~mexify.graph.batching.BatchDim` text) once carried:
    an int holding the batch becomes dimension 1 of its carrier, index ``k`` of a size dimension ``k + 1``."""
    if kind == TENSOR:
        return batch_dim
    what, _, index = batch_dim.partition(":")
    if what == "int":
        return "dim:1"
    if what == "size":
        return f"dim:{int(index) + 1}"
    return batch_dim


class CarrierModule(nn.Module):
    """``module`` with every int or size input and output passed as a shape carrier (what is exported)."""

    def __init__(self, module: nn.Module, in_kinds: Sequence[str], out_kinds: Sequence[str], tuple_out: bool):
        super().__init__()
        self.module = module
        self.in_kinds = list(in_kinds)
        self.out_kinds = list(out_kinds)
        self.tuple_out = tuple_out

    def forward(self, *carriers: torch.Tensor) -> Any:
        out = self.module(*[from_carrier(c, k) for c, k in zip(carriers, self.in_kinds)])
        if not self.tuple_out:
            return to_carrier(out, self.out_kinds[0])
        return tuple(to_carrier(v, k) for v, k in zip(out, self.out_kinds))


class ProgramModule(nn.Module):
    """A loaded program as a module of a :class:`~mexify.nn.MultiExitModel` (inference only).

    ``train()``/``eval()`` only set the flag: an exported program runs in the mode it was
    exported in (eval), and ``torch.export``'s modules refuse to be switched.
    """

    def __init__(self, program: Any, name: str):
        super().__init__()
        self.program = program.module()
        self.program_name = name

    def forward(self, *args: Any) -> Any:
        return self.program(*args)

    def train(self, mode: bool = True) -> "ProgramModule":
        self.training = mode
        return self

    def extra_repr(self) -> str:
        return f"program={self.program_name!r}"


class ProgramHead(ProgramModule):
    """A loaded head program: ``forward(features, size=None, skip=None)`` like :class:`~mexify.nn.ExitHead`
    (``fused``: the program reads the skip feature too)."""

    def __init__(self, program: Any, name: str, fused: bool = False):
        super().__init__(program, name)
        self.fused = bool(fused)

    def forward(self, x: torch.Tensor, size: Optional[Tuple[int, int]] = None, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        logits = self.program(x, skip) if self.fused else self.program(x)
        return logits if size is None else resize_logits(logits, size)


def _serde() -> Any:
    from torch._export.serde import serialize  # torch.export's own (de)serialiser, schema-versioned

    return serialize


def save_program(program: Any, directory: Path, name: str) -> Dict[str, Any]:
    """Write ``program`` as ``<name>.json`` (graph) and ``<name>.safetensors`` (weights, tensor constants).

    Returns:
        what the manifest records for it (file names, serialisation schema version).

    Raises:
        BundleError: a constant that is not a tensor (a script object) cannot be stored without pickling.
    """
    serde = _serde()
    tensors: Dict[str, torch.Tensor] = {}
    for prefix, values in (("state.", program.state_dict), ("const.", program.constants)):
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                raise BundleError(
                    f"program {name!r} holds a constant {key!r} of type {type(value).__name__}, which cannot be stored without pickling",
                    "such modules cannot be exported; keep the source bundle",
                )
            tensors[prefix + key] = value.detach().to("cpu").contiguous().clone()
    try:
        artifact = serde.serialize(program, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False)
    except TypeError:  # torch < 2.6 always serialises them; the bytes are not written
        artifact = serde.serialize(program)
    (directory / f"{name}.json").write_bytes(artifact.exported_program)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    schema = json.loads(artifact.exported_program).get("schema_version", {})
    params = [k for k, v in program.state_dict.items() if isinstance(v, nn.Parameter)]
    return {"graph": f"{name}.json", "weights": f"{name}.safetensors", "schema": [schema.get("major"), schema.get("minor")],
            "parameters": params}


def load_program(directory: Path, entry: Dict[str, Any], name: str) -> Any:
    """Rebuild an ``ExportedProgram`` written by :func:`save_program` (nothing is unpickled, nothing
    in the graph runs: :func:`mexify.graph.serde.check_program_json` checks it first).

    Raises:
        BundleError: missing, truncated or altered files, a file name that leaves ``directory``,
            or a graph this torch cannot read (written by a newer one); one line each.
    """
    if not isinstance(entry, dict):
        raise BundleError(f"{directory}: the manifest entry of program {name!r} is not a mapping", "the file was altered; export the bundle again")
    graph = inside(directory, entry.get("graph"), f"{name} graph")
    weights = inside(directory, entry.get("weights"), f"{name} weights")
    for f in (graph, weights):
        if not f.is_file():
            raise BundleError(f"{directory} is incomplete: {f.name} is missing", "export the bundle again")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a truncated or garbled file
        raise BundleError(f"cannot read {weights}: {_first_line(e)}", "the file is truncated or damaged; export the bundle again") from None
    params = set(entry.get("parameters", ()))
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    state = {k: nn.Parameter(v, requires_grad=False) if k in params else v for k, v in state.items()}
    constants = {k[len("const."):]: v for k, v in tensors.items() if k.startswith("const.")}
    try:
        return deserialize_program(graph.read_bytes(), state, constants, str(graph), BundleError)
    except MexifyError:
        raise
    except Exception as e:  # noqa: BLE001 - the deserialiser raises several types for a graph it cannot read
        major = (entry.get("schema") or [None])[0]
        raise BundleError(
            f"cannot read program {name!r} ({graph.name}, torch.export schema {major}) with torch {torch.__version__}: {_first_line(e)}",
            "load it with the torch version that exported it (see config.yaml: export.torch) or export the bundle again",
        ) from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return text or type(e).__name__


def dynamic_dims(carriers: Sequence[torch.Tensor], kinds: Sequence[str]) -> Tuple[Dict[int, Any], ...]:
    """``torch.export`` dynamic shapes for program inputs: every dimension left to export to decide
    (``Dim.AUTO``), except a carrier's leading 0."""
    auto = torch.export.Dim.AUTO
    return tuple({d: auto for d in range(0 if k == TENSOR else 1, c.dim())} for c, k in zip(carriers, kinds))
