"""Reading ``torch.export`` programs from files a user may have received from anyone, running nothing from them.

``torch.export.load`` and ``torch._export.serde.serialize.deserialize`` trust the file they read:

* a ``.pt2`` archive's weights, constants and sample inputs may be pickles, which
  ``torch.export.load`` unpickles (``torch.load(weights_only=False)``, ``pickle.loads``);
* every symbolic shape expression (``expr_str``) goes through ``sympy.sympify``, which evaluates
  Python: ``__import__('os').system(...)`` as an "expression" runs;
* node, input and argument names are pasted into the Python source that ``torch.fx`` generates
  and ``exec``-s for the graph module, so a name such as ``x=__import__('os').system(...)`` runs
  when the program is deserialised;
* the input spec's argument names are pasted into that source too, its pytree contexts may
  import a module by name (an enum, a ``defaultdict`` factory), and the archive's guard code
  (``guards_code``) is ``exec``-ed once sample inputs are loaded.

:func:`check_program_json` reads a program's JSON and refuses anything outside what torch writes:
expressions in a strict grammar, names that are identifiers, dotted module paths without dunders,
input specs without imports. :func:`deserialize_program` checks the JSON and deserialises that
same parsed JSON, without sample inputs and without guard code. :func:`load_pt2` reads a ``.pt2``
archive with torch's zip reader, raw tensor payloads only; a pickled entry needs ``trust_pickle``.
"""
from __future__ import annotations

import ast
import json
import keyword
import os
import re
import zipfile
from typing import Any, Dict, Iterator, List, Optional, Tuple, Type

import torch

from mexify.errors import BundleError, MexifyError, SpecError

__all__ = ["check_program_json", "check_sym_expr", "deserialize_program", "load_pt2", "TRUST_FLAG"]

TRUST_FLAG = "--trust-pickle"
_ALTERED = "the file was altered or was not written by torch.export; get a fresh copy from a source you trust"

# --- symbolic expressions ------------------------------------------------------------------------

# torch.utils._sympy.functions that the deserialiser hands to sympify (its ``sympy_functions`` table)
_TORCH_FUNCTIONS = {
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt",
    "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
    "ToFloat", "Identity",
}
# torch's sympy functions outside that table (sympify makes them plain undefined functions)
_TORCH_FUNCTION_FAMILIES = re.compile(r"(OpaqueUnaryFn|BitwiseFn)_[a-z0-9_]{1,32}\Z")
# sympy classes and functions that ``srepr`` (torch >= 2.6) and ``str`` (older torch) print for shapes
_SYMPY_FUNCTIONS = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Mod", "Abs", "floor",
    "ceiling", "Equality", "Unequality", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Piecewise", "ExprCondPair",
}
_CONSTANTS = {"True", "False", "true", "false", "oo", "zoo", "nan", "int_oo"}
# bare symbol names in str()-printed expressions: s0, u3, ps1, zf0, zuf12 (torch's SymT prefixes)
_SYMBOL = re.compile(r"[a-z]{1,4}[0-9]{1,9}\Z")
# a Symbol('...') name: a string, never evaluated
_SYMBOL_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}\Z")
# Float('...') text as srepr writes it
_FLOAT_TEXT = re.compile(r"[-+]?(\d{1,40}(\.\d{0,40})?|\.\d{1,40})([eE][-+]?\d{1,4})?\Z|[-+]?(inf|nan)\Z")
_ASSUMPTIONS = {
    "algebraic", "antihermitian", "commutative", "complex", "composite", "even", "extended_negative",
    "extended_nonnegative", "extended_nonpositive", "extended_nonzero", "extended_positive", "extended_real",
    "finite", "hermitian", "imaginary", "infinite", "integer", "irrational", "negative", "noninteger",
    "nonnegative", "nonpositive", "nonzero", "odd", "polar", "positive", "prime", "rational", "real",
    "transcendental", "zero",
}
_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Mod, ast.Pow, ast.FloorDiv, ast.BitAnd, ast.BitOr)
_UNARYOPS = (ast.USub, ast.UAdd, ast.Invert)
_COMPARISONS = (ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq)
# functions whose second argument is an exponent (a shift is a power of two): evaluated on numbers
_POWERS = {"Pow", "PowByNatural", "FloatPow", "LShift", "RShift"}
_MAX_EXPR = 20_000  # characters; torch's shape expressions are far shorter
_MAX_INT = 10 ** 30
_MAX_EXPONENT = 32
_MAX_PRECISION = 256


class _Refused(ValueError):
    """Why an expression is refused (becomes part of the one-line error)."""


def check_sym_expr(expr: object) -> None:
    """Refuse a symbolic expression that is not a plain shape expression.

    Accepts what torch writes: ``srepr`` text (``Mul(Integer(2), Symbol('s0', integer=True,
    positive=True))``) and ``str`` text (``2*s0``, ``Max(1, s1//2)``, ``s0 < 8``): integers and
    floats, symbol names, the functions of torch's deserialiser table and the few sympy classes
    that print for shapes, ``+ - * / % ** //``, comparisons, ``& | ~``, parentheses, commas,
    ``Symbol``'s assumption keywords. Nothing else: no attribute, subscript, lambda, other name
    or string (a string is only a ``Symbol``'s name or a ``Float``'s digits).

    Raises:
        ValueError: the expression is refused; the message says why.
    """
    if not isinstance(expr, str):
        raise _Refused(f"it is a {type(expr).__name__}, not a string")
    if len(expr) > _MAX_EXPR:
        raise _Refused(f"it is {len(expr)} characters long")
    if not expr.isascii() or not expr.isprintable():
        raise _Refused("it holds characters outside printable ASCII")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise _Refused(f"it does not parse ({type(e).__name__})") from None
    try:
        _check_node(tree.body, in_exponent_base=False)
    except RecursionError:
        raise _Refused("it is nested too deeply") from None


def _check_node(node: ast.AST, in_exponent_base: bool) -> None:
    if isinstance(node, ast.Constant):
        _check_number(node.value)
    elif isinstance(node, ast.Name):
        _check_name(node.id)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, _UNARYOPS):
        _check_node(node.operand, in_exponent_base)
    elif isinstance(node, ast.BinOp) and isinstance(node.op, _BINOPS):
        if isinstance(node.op, ast.Pow):
            _check_power(node.left, node.right, in_exponent_base)
        else:
            _check_node(node.left, in_exponent_base)
            _check_node(node.right, in_exponent_base)
    elif isinstance(node, ast.Compare) and all(isinstance(op, _COMPARISONS) for op in node.ops):
        for part in (node.left, *node.comparators):
            _check_node(part, in_exponent_base)
    elif isinstance(node, ast.Tuple) and isinstance(node.ctx, ast.Load):  # Piecewise((e, c), ...) in str form
        for part in node.elts:
            _check_node(part, in_exponent_base)
    elif isinstance(node, ast.Call):
        _check_call(node, in_exponent_base)
    else:
        raise _Refused(f"it holds Python syntax ({type(node).__name__}) that no shape expression has")


def _check_number(value: object) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) >= _MAX_INT:
            raise _Refused("it holds an integer too large for a shape")
        return
    if isinstance(value, float):
        return
    raise _Refused(f"it holds a {type(value).__name__} literal")


def _check_name(name: str) -> None:
    if name in _CONSTANTS:
        return
    if _SYMBOL.match(name) and name not in _sympy_namespace():
        return
    if name in _TORCH_FUNCTIONS or name in _SYMPY_FUNCTIONS or _TORCH_FUNCTION_FAMILIES.match(name):
        return
    raise _Refused(f"it names {name!r}, which is neither a shape symbol nor a sympy function torch writes")


def _check_call(node: ast.Call, in_exponent_base: bool) -> None:
    if not isinstance(node.func, ast.Name):
        raise _Refused("it calls something other than a plain function name")
    name = node.func.id
    if name in _CONSTANTS or _SYMBOL.match(name):
        raise _Refused(f"it calls {name!r}, which is not a function")
    _check_name(name)
    if name in ("Symbol", "Float"):
        _check_text_call(node)
        return
    for kw in node.keywords:
        if kw.arg != "evaluate" or not (isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, bool)):
            raise _Refused(f"it passes {name} the keyword {kw.arg!r}")
    if name in _POWERS and len(node.args) == 2:
        _check_power(node.args[0], node.args[1], in_exponent_base)
        return
    for arg in node.args:
        _check_node(arg, in_exponent_base)


def _check_text_call(node: ast.Call) -> None:
    """``Symbol('s0', integer=True, positive=True)`` and ``Float('0.5', precision=53)``."""
    name = node.func.id  # type: ignore[attr-defined]
    if len(node.args) != 1 or not isinstance(node.args[0], ast.Constant):
        raise _Refused(f"its {name}(...) does not take one literal")
    text = node.args[0].value
    if name == "Symbol":
        if not (isinstance(text, str) and _SYMBOL_TEXT.match(text)):
            raise _Refused(f"its Symbol name {text!r} is not a symbol name")
        allowed = _ASSUMPTIONS
    else:
        if isinstance(text, str):
            if not _FLOAT_TEXT.match(text):
                raise _Refused(f"its Float text {text!r} is not a number")
        else:
            _check_number(text)
        allowed = {"precision"}
    for kw in node.keywords:
        value = kw.value.value if isinstance(kw.value, ast.Constant) else None
        ok = kw.arg in allowed and (
            isinstance(value, bool) if kw.arg != "precision"
            else isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _MAX_PRECISION
        )
        if not ok:
            raise _Refused(f"its {name}(...) takes the keyword {kw.arg!r}")


def _check_power(base: ast.AST, exponent: ast.AST, in_exponent_base: bool) -> None:
    """Numbers raised to powers are evaluated at once: an exponent is a small literal or holds a
    symbol, and a power with a larger literal exponent does not sit inside another one's base
    (``2**2**2**2**2**2`` would never finish)."""
    small = _literal(exponent)
    if small is not None:
        _check_node(exponent, in_exponent_base=True)
        if abs(small) > _MAX_EXPONENT:
            raise _Refused("it raises to a power too large for a shape")
        grows = abs(small) > 2
    elif _has_symbol(exponent):
        grows = True
        _check_node(exponent, in_exponent_base=True)
    else:
        raise _Refused("it raises to a power that is neither a small number nor symbolic")
    if grows and in_exponent_base:
        raise _Refused("it nests powers")
    _check_node(base, in_exponent_base=in_exponent_base or grows)


def _literal(node: ast.AST) -> Optional[float]:
    """The value of a literal number (``3``, ``-1``, ``Integer(3)``, ``Rational(1, 2)``), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        return None if value is None else -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        values = [_literal(a) for a in node.args]
        if any(v is None for v in values):
            return None
        if node.func.id == "Integer" and len(values) == 1:
            return values[0]
        if node.func.id == "Rational" and len(values) == 2 and values[1]:
            return values[0] / values[1]
    return None


def _has_symbol(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and _SYMBOL.match(sub.id):
            return True
        if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id == "Symbol":
            return True
    return False


_NAMESPACE: Optional[frozenset] = None


def _sympy_namespace() -> frozenset:
    """Names that sympify resolves to objects rather than symbols (sympy's namespace, builtins)."""
    global _NAMESPACE
    if _NAMESPACE is None:
        import builtins

        names: Dict[str, Any] = {}
        exec("from sympy import *", names)  # noqa: S102 - a fixed import statement, no input in it
        _NAMESPACE = frozenset(names) | frozenset(dir(builtins))
    return _NAMESPACE


# --- the program JSON ------------------------------------------------------------------------------

# keys whose string values become Python identifiers in the code torch.fx generates
_NAME_KEYS = {"name", "as_name"}
# keys whose string values are module paths (set as attributes, read by dotted lookup)
_PATH_KEYS = {"parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name", "user_input_name", "fqn"}
# keys whose maps are keyed by node names
_VALUE_MAPS = {"tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values", "custom_obj_values"}
_OP_TARGET = re.compile(r"torch\.ops\.[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){1,2}\Z")
_EXTENSION_TARGET = re.compile(r"#[A-Za-z0-9_.]+:[A-Za-z0-9_.]+\Z")
_TARGET = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
# a module path atom: an attribute or a ModuleDict key; ``@n`` numbers repeated calls in the call graph
_ATOM = re.compile(r"[A-Za-z0-9_-]+(@[0-9]+)?\Z")
_SAFE_FACTORIES = {"list", "dict", "set", "int", "float", "str", "tuple", "bool"}


class _Bad(ValueError):
    """A refused value: ``what`` says where, the message why."""

    def __init__(self, what: str, value: object, why: str):
        super().__init__(why)
        self.what, self.value, self.why = what, value, why


def check_program_json(data: bytes, where: str, error: Type[MexifyError] = BundleError) -> None:
    """Refuse a ``torch.export`` program JSON whose deserialisation would run code from it.

    Checks every symbolic expression (``expr_str``, handed to ``sympy.sympify``) with
    :func:`check_sym_expr`, every node, input and argument name (pasted into generated Python)
    for being an identifier, module paths for being dotted names without dunders, node targets
    and operator arguments for being dotted operator names, and the input and output specs for
    imports (enums, ``defaultdict`` factories) and non-identifier argument names.

    Args:
        data: the JSON bytes (``models/model.json`` of a ``.pt2``, ``<name>.json`` of a bundle).
        where: the file, for the message.
        error: the exception class to raise (:class:`BundleError` for bundles, :class:`SpecError` for specs).

    Raises:
        error: one line naming the file and the offending value.
    """
    _checked(data, where, error)


def _checked(data: bytes, where: str, error: Type[MexifyError]) -> Dict[str, Any]:
    """The parsed program JSON, once :func:`check_program_json`'s checks pass."""
    try:
        program = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise error(f"{where} is not a torch.export program (not valid JSON: {_first_line(e)})", _ALTERED) from None
    if not isinstance(program, dict):
        raise error(f"{where} is not a torch.export program (its JSON is a {type(program).__name__})", _ALTERED)
    try:
        for key, value in _items(program):
            _check_item(key, value)
    except _Bad as bad:
        text = bad.value if isinstance(bad.value, str) else json.dumps(bad.value, default=str)
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise error(
            f"{where}: refusing to read the program: {bad.what} {shown!r} is not what torch.export writes ({bad.why}); "
            "reading it could run code from the file",
            _ALTERED,
        ) from None
    return program


def _items(root: Any) -> Iterator[Tuple[str, Any]]:
    """Every (key, value) pair of every dict in ``root``, depth first, without recursion."""
    stack = [root]
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            for key, value in obj.items():
                yield key, value
                if isinstance(value, (dict, list)):
                    stack.append(value)
        elif isinstance(obj, list):
            stack.extend(v for v in obj if isinstance(v, (dict, list)))


def _check_item(key: str, value: Any) -> None:
    if key == "expr_str":
        try:
            check_sym_expr(value)
        except _Refused as e:
            raise _Bad("the symbolic expression", value, str(e)) from None
    elif key in _NAME_KEYS:
        if not (value is None or isinstance(value, dict) or _is_identifier(value)):
            raise _Bad("the name", value, "not a Python identifier")
    elif key in _PATH_KEYS:
        if not _is_path(value, empty=key == "fqn"):
            raise _Bad(f"the {key}", value, "not a dotted name without dunders")
    elif key in _VALUE_MAPS:
        if isinstance(value, dict):
            for name in value:
                if not _is_identifier(name):
                    raise _Bad(f"the {key} entry", name, "not a Python identifier")
    elif key == "forward_arg_names":
        if not (value is None or isinstance(value, list)):
            raise _Bad("the forward argument names", value, "not a list")
        for name in value or ():
            if not _is_identifier(name):
                raise _Bad("the forward argument name", name, "not a Python identifier")
    elif key in ("in_spec", "out_spec"):
        _check_treespec(key, value)
    elif key == "target":
        if not isinstance(value, dict) and not _is_target(value):
            raise _Bad("the node target", value, "not an operator name")
    elif key == "as_operator":
        if not _is_target(value):
            raise _Bad("the operator argument", value, "not an operator name")
        if not _is_operator(value):
            raise _Bad("the operator argument", value, "it names something other than an operator")


def _is_identifier(value: object) -> bool:
    return isinstance(value, str) and value.isascii() and value.isidentifier() and not keyword.iskeyword(value) and len(value) <= 512


def _is_target(value: object) -> bool:
    """``torch.ops.<namespace>.<op>[.<overload>]`` (an op may be a dunder: ``aten.__and__``),
    ``#<extension>:<op>``, or a dotted name without dunders (``_operator.getitem``, ``torch.sym_int``)."""
    if not isinstance(value, str) or len(value) > 512:
        return False
    if value.startswith("torch.ops."):
        return bool(_OP_TARGET.match(value)) and not value.split(".")[2].startswith("__")
    if value.startswith("#"):
        return bool(_EXTENSION_TARGET.match(value)) and "__" not in value
    return bool(_TARGET.match(value)) and not any(atom.startswith("__") for atom in value.split("."))


def _is_operator(value: str) -> bool:
    """An operator argument resolves (as the deserialiser resolves it) to a torch operator, or to
    nothing (it stays a string): never to another callable that an operator could call."""
    import math
    import operator

    # torch's GraphModuleDeserializer.deserialize_operator: the prefix picks the module (no dot
    # needed after it), the atoms after the first are looked up on it
    for prefix, module in (("_operator", operator), ("torch", torch), ("math", math)):
        if value.startswith(prefix):
            break
    else:
        return True
    target: Any = module
    for atom in value.split(".")[1:]:
        if not hasattr(target, atom):
            return True
        target = getattr(target, atom)
    return isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator))


def _is_path(value: object, empty: bool = False) -> bool:
    if not isinstance(value, str) or len(value) > 1024:
        return False
    if value == "":
        return empty
    return all(_ATOM.match(atom) and not atom.startswith("__") for atom in value.split("."))


def _check_treespec(key: str, value: Any) -> None:
    """An input/output spec (pytree JSON): no context may import a module (``__enum__`` objects,
    ``defaultdict`` factories other than builtins), and the keyword-argument names of the input
    spec (pasted into generated code) are identifiers."""
    if not isinstance(value, str):
        raise _Bad(f"the {key}", value, "not a string")
    try:
        protocol, spec = json.loads(value)
    except (ValueError, TypeError, RecursionError):
        raise _Bad(f"the {key}", value, "not a pytree spec") from None
    contexts = []
    for node in _spec_nodes(spec, key, value):
        context = node.get("context")
        if isinstance(context, str):
            try:
                context = json.loads(context)
            except (ValueError, RecursionError):
                pass  # a plain string context (a registered type's name): nothing is imported from it
        _check_context(key, context, value)
        contexts.append(context)
    if key == "in_spec" and isinstance(spec, dict):
        children = spec.get("children_spec") or []
        if spec.get("type") == "builtins.tuple" and len(children) == 2 and isinstance(children[1], dict) \
                and children[1].get("type") == "builtins.dict":
            names = children[1].get("context")
            names = json.loads(names) if isinstance(names, str) else names
            for name in names or ():
                if isinstance(name, str) and not _is_identifier(name):
                    raise _Bad("the keyword argument name", name, "not a Python identifier")


def _spec_nodes(spec: Any, key: str, text: str) -> Iterator[Dict[str, Any]]:
    stack = [spec]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            raise _Bad(f"the {key}", text, "not a pytree spec")
        yield node
        stack.extend(node.get("children_spec") or [])


def _check_context(key: str, context: Any, text: str) -> None:
    for k, v in _items([context]):
        if k == "__enum__":
            raise _Bad(f"the {key}", text, "an enum in a pytree context is imported by module name")
        if k == "default_factory_module" and v != "builtins":
            raise _Bad(f"the {key}", text, "a defaultdict factory is imported by module name")
        if k == "default_factory_name" and v not in _SAFE_FACTORIES:
            raise _Bad(f"the {key}", text, "a defaultdict factory is not a builtin container")
    if isinstance(context, dict) and "default_factory_module" in context and "default_factory_name" not in context:
        raise _Bad(f"the {key}", text, "a defaultdict factory is incomplete")


def deserialize_program(data: bytes, state_dict: Dict[str, Any], constants: Dict[str, Any], where: str,
                        error: Type[MexifyError] = BundleError) -> Any:
    """An ``ExportedProgram`` from its JSON and its tensors, checked first (:func:`check_program_json`).

    The JSON is parsed once: what is checked is what is deserialised. No sample inputs are read
    and the guard code is dropped (torch ``exec``-s it when it has sample inputs).

    Raises:
        error: a refused value (one line). Torch's own errors (a newer schema, a broken graph)
            pass through for the caller to word.
    """
    program = _checked(data, where, error)
    program["guards_code"] = []
    try:
        from torch._export.serde import schema
        from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
    except ImportError:  # pragma: no cover - a torch without these helpers: its own reader, on the checked bytes
        from torch._export.serde.serialize import SerializedArtifact, deserialize

        return deserialize(SerializedArtifact(json.dumps(program).encode(), state_dict, constants, b""))
    serialized = _dict_to_dataclass(schema.ExportedProgram, program)
    return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, b"")


# --- .pt2 archives ---------------------------------------------------------------------------------


def load_pt2(path: Any, trust_pickle: bool = False) -> Any:
    """Read a ``.pt2`` archive written by ``torch.export.save`` without running code from it.

    The archive is read with torch's zip reader; every program JSON is checked
    (:func:`check_program_json`); weights and tensor constants are rebuilt from their raw bytes.
    Sample inputs are not read (they are pickles). An entry that would be unpickled (a pickled
    tensor, a script or opaque object, a weights file in the old format) is refused unless
    ``trust_pickle``, and then the archive is read with ``torch.export.load``.

    Raises:
        SpecError: the file is not a readable archive, a pickled entry without ``trust_pickle``,
            or a program that could run code (one line each).
    """
    path = os.fspath(path)
    try:
        from torch._export.serde import schema
        from torch._export.serde.serialize import _dict_to_dataclass
        from torch.export.pt2_archive import constants as names
        from torch.export.pt2_archive._package import PT2ArchiveReader
    except ImportError:
        return _untrusted_reader_missing(path, trust_pickle)
    reader = _open_archive(path, trust_pickle, PT2ArchiveReader)
    if not hasattr(reader, "read_bytes"):  # the old zip format, read by torch with trust
        return reader
    files, model_file = _archive_files(path, reader, names)
    try:
        model_json = reader.read_bytes(model_file)
        for f in files:
            if f.startswith(names.MODELS_DIR) and f.endswith(".json"):
                check_program_json(model_json if f == model_file else reader.read_bytes(f), f"{path}:{f}", SpecError)
        pickled = _pickled_entries(reader, files, names, schema, _dict_to_dataclass)
    except MexifyError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated records, malformed payload configs
        raise _unreadable(path, e) from None
    if pickled:
        if trust_pickle:
            return _torch_load(path)
        entry, why = pickled[0]
        more = f" (and {len(pickled) - 1} more)" if len(pickled) > 1 else ""
        raise SpecError(
            f"refusing to unpickle {path}: its entry {entry!r} is {why}{more}, and unpickling runs arbitrary code from the file",
            f"pass {TRUST_FLAG} if you trust the file, or re-save the model so that its weights are plain tensors",
        )
    try:
        weights, constants = (_raw_tensors(reader, files, names, schema, _dict_to_dataclass, config_format, base)
                              for config_format, base in ((names.WEIGHTS_CONFIG_FILENAME_FORMAT, names.WEIGHTS_DIR),
                                                          (names.CONSTANTS_CONFIG_FILENAME_FORMAT, names.CONSTANTS_DIR)))
        return deserialize_program(model_json, weights, constants, f"{path}:{model_file}", SpecError)
    except MexifyError:
        raise
    except Exception as e:  # noqa: BLE001 - the deserialiser raises several types for a graph it cannot read
        raise _unreadable(path, e) from None


def _open_archive(path: str, trust_pickle: bool, reader_class: Any) -> Any:
    """Torch's zip reader over ``path``; an old-format archive is read by torch itself with trust, refused without."""
    try:
        return reader_class(path)
    except Exception as e:  # noqa: BLE001 - torch's zip reader raises RuntimeError/AssertionError for a bad file
        if _old_zip_format(path):
            if trust_pickle:
                return _torch_load(path)
            raise SpecError(
                f"{path} is a torch.export archive in the old zip format, whose weights are pickles; refusing to unpickle them",
                f"re-save it with torch.export.save on a current torch, or pass {TRUST_FLAG} if you trust the file",
            ) from None
        raise _unreadable(path, e) from None


def _archive_files(path: str, reader: Any, names: Any) -> Tuple[List[str], str]:
    """The archive's file names and its model's JSON, after checking the archive version."""
    try:
        version = reader.read_string(names.ARCHIVE_VERSION_PATH).strip()
    except Exception as e:  # noqa: BLE001
        raise _unreadable(path, e, "it has no archive version") from None
    if version != names.ARCHIVE_VERSION_VALUE:
        raise SpecError(
            f"cannot read torch.export archive {path}: archive version {version[:20]!r}, this torch reads {names.ARCHIVE_VERSION_VALUE!r}",
            "re-save it with torch.export.save on this torch version",
        )
    try:
        files = list(reader.get_file_names())
    except Exception as e:  # noqa: BLE001
        raise _unreadable(path, e) from None
    model_file = names.MODELS_FILENAME_FORMAT.format("model")
    if model_file not in files:
        raise SpecError(f"cannot read torch.export archive {path}: it has no {model_file}", "re-save the model with torch.export.save")
    return files, model_file


def _raw_tensors(reader: Any, files: List[str], names: Any, schema: Any, to_dataclass: Any, config_format: str,
                 base: str) -> Dict[str, Any]:
    """Weights or tensor constants rebuilt from raw bytes (the caller checked that none is pickled)."""
    from torch._export.serde.serialize import deserialize_size, deserialize_storage_offset, deserialize_stride
    from torch.export.pt2_archive._package import _build_file_map

    config = _payload_config(reader, config_format.format("model"), files, schema, to_dataclass)
    found: Dict[str, Any] = {}
    if config is None:
        return found
    flat = _build_file_map(reader, config, base)
    for fqn, meta in config.config.items():
        t = meta.tensor_meta
        value = torch.as_strided(flat[meta.path_name], size=deserialize_size(t.sizes),
                                 stride=deserialize_stride(t.strides), storage_offset=deserialize_storage_offset(t.storage_offset))
        if base == names.WEIGHTS_DIR and meta.is_param:
            value = torch.nn.Parameter(value, requires_grad=t.requires_grad)
        found[fqn] = value
    return found


def _pickled_entries(reader: Any, files: List[str], names: Any, schema: Any, to_dataclass: Any) -> List[Tuple[str, str]]:
    """The archive's entries for model ``model`` that torch would unpickle: (entry, what it is)."""
    out: List[Tuple[str, str]] = []
    for base, kind in ((names.WEIGHTS_DIR, "weights"), (names.CONSTANTS_DIR, "constants")):
        legacy = f"{base}model.pt"
        if legacy in files:
            out.append((legacy, f"a pickled file of {kind} (the old archive layout)"))
    weights = _payload_config(reader, names.WEIGHTS_CONFIG_FILENAME_FORMAT.format("model"), files, schema, to_dataclass)
    for fqn, meta in (weights.config.items() if weights is not None else ()):
        if meta.use_pickle:
            out.append((fqn, "a pickled weight"))
        elif meta.tensor_meta is None:
            raise ValueError(f"weight {fqn!r} has no tensor metadata")
    constants = _payload_config(reader, names.CONSTANTS_CONFIG_FILENAME_FORMAT.format("model"), files, schema, to_dataclass)
    for fqn, meta in (constants.config.items() if constants is not None else ()):
        if meta.path_name.startswith(names.CUSTOM_OBJ_FILENAME_PREFIX):
            out.append((fqn, "a pickled script object"))
        elif meta.path_name.startswith(names.OPAQUE_OBJ_FILENAME_PREFIX):
            out.append((fqn, "a pickled Python object"))
        elif not meta.path_name.startswith(names.TENSOR_CONSTANT_FILENAME_PREFIX):
            raise ValueError(f"constant {fqn!r} has an unsupported payload {meta.path_name!r}")
        elif meta.use_pickle:
            out.append((fqn, "a pickled tensor constant"))
        elif meta.tensor_meta is None:
            raise ValueError(f"constant {fqn!r} has no tensor metadata")
    return out


def _payload_config(reader: Any, name: str, files: List[str], schema: Any, to_dataclass: Any) -> Any:
    if name not in files:
        return None
    return to_dataclass(schema.PayloadConfig, json.loads(reader.read_string(name)))


def _old_zip_format(path: str) -> bool:
    """A ``torch.export.save`` archive of torch < 2.6 (``torch.export.load`` still reads it, unpickling)."""
    try:
        with zipfile.ZipFile(path) as z:
            listed = set(z.namelist())
    except Exception:  # noqa: BLE001 - not a zip at all
        return False
    return "version" in listed and "serialized_exported_program.json" in listed


def _untrusted_reader_missing(path: str, trust_pickle: bool) -> Any:
    if trust_pickle:
        return _torch_load(path)
    raise SpecError(
        f"cannot read {path} without unpickling: torch {torch.__version__} has no torch.export archive reader that reads raw tensors",
        f"upgrade torch, or pass {TRUST_FLAG} if you trust the file",
    )


def _torch_load(path: str) -> Any:
    """``torch.export.load``: unpickles what the archive holds (only with the user's trust)."""
    try:
        return torch.export.load(path)
    except Exception as e:  # noqa: BLE001
        raise _unreadable(path, e) from None


def _unreadable(path: str, e: BaseException, why: Optional[str] = None) -> SpecError:
    return SpecError(
        f"cannot read torch.export archive {path}: {why or _first_line(e)}",
        "it is not a .pt2 archive written by torch.export.save, or it is truncated or damaged; re-save the model with torch.export.save",
    )


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
