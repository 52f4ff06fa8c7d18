"""A captured program as plain data (JSON-able) and back: what :mod:`fxpeft.capture.disk_cache` stores.

Why not ``torch.export.save``: its loader re-parses every symbolic size with sympy's string parser and rebuilds the
schema dataclasses through ``typing.get_type_hints``; for a 7B llama that is 4.3 s, more than the cache may cost in
all. This codec writes only what a captured :class:`~fxpeft.graph.program.Program` is made of, after capture's
clean-ups (so the entry is exactly what ``capture`` returns, before any rewrite):

- the graph: per node its name, op, target, arguments, and the metadata fxpeft and its passes read:
  ``val`` (fake tensors with their symbolic sizes, sym-ints, plain values), ``nn_module_stack``, ``stack_trace``.
  The rest (``tensor_meta``, ``torch_fn``, ``source_fn_stack``, ``from_node``, ...) is dropped: nothing in fxpeft
  reads it, and ``torch.compile`` traces the graph's code, not its metadata.
- the symbols of the sizes, each with its example value (hint) and range, and each size expression as a tree of
  allow-listed sympy functions, so that decoding rebuilds one ``ShapeEnv``/``FakeTensorMode`` the way export left it.
- the input sources, the pytree specs (``treespec_dumps``: registered types only), the mutated buffers and the
  lifted constants' names (their values travel as tensors beside the JSON).

Decoding executes nothing from the file: targets resolve through ``torch.ops`` (operator overloads only) or a fixed
allow-list of Python functions, expressions through a fixed allow-list of sympy functions, types through pytree's
registry; there is no ``eval``, no ``pickle``, no import by name. Anything the codec does not know (a get_attr or
call_module node, a higher-order op, an unbacked size, a custom object) makes :func:`encode_program` raise
:class:`Unsupported`: that capture is simply not cached.
"""

from __future__ import annotations

import builtins
import json
import math
import operator
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
import torch.utils._sympy.functions as sympy_functions
from torch._guards import SLoc
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv, ValueRangesSLoc
from torch.fx.immutable_collections import immutable_list
from torch.utils._sympy.numbers import int_oo
from torch.utils._sympy.value_ranges import ValueRanges

from fxpeft.graph.program import InputSource, Program

__all__ = ["FORMAT", "Unsupported", "encode_program", "decode_program"]

FORMAT = 1  # bump when the encoding changes: it is part of every cache key

_META_KEYS = ("nn_module_stack", "stack_trace")  # copied as they are (strings and tuples of strings)


class Unsupported(Exception):
    """A program (or an entry) holds something this codec does not encode; the capture is not cached."""


def _python_functions() -> dict[str, Any]:
    functions = {f"operator.{name}": getattr(operator, name) for name in (
        "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne", "lt",
        "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift")}
    functions.update({f"math.{name}": getattr(math, name) for name in ("sqrt", "floor", "ceil", "trunc")})
    functions.update({f"torch.{name}": getattr(torch, name) for name in (
        "sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum", "_check",
        "_check_is_size") if hasattr(torch, name)})
    functions.update({f"builtins.{name}": getattr(builtins, name) for name in ("min", "max", "abs", "round")})
    return functions


_FUNCTIONS = _python_functions()
_FUNCTION_NAMES = {id(function): name for name, function in _FUNCTIONS.items()}
# Every sympy function a size expression may be built of: sympy's arithmetic and torch's own (FloorDiv, ...).
_SYMPY = {cls.__name__: cls for cls in (sympy.Add, sympy.Mul, sympy.Pow, sympy.Max, sympy.Min, sympy.Eq, sympy.Ne,
                                        sympy.Lt, sympy.Le, sympy.Gt, sympy.Ge, sympy.And, sympy.Or, sympy.Not)}
_SYMPY.update({name: getattr(sympy_functions, name) for name in dir(sympy_functions)
               if isinstance(getattr(sympy_functions, name), type)
               and issubclass(getattr(sympy_functions, name), sympy.Basic)})


# -- encoding --------------------------------------------------------------------------------------------------------
class _Encoder:
    def __init__(self):
        self.exprs: list[Any] = []  # expression trees, referred to by index
        self.expr_hints: list[Any] = []
        self._expr_index: dict[sympy.Expr, int] = {}
        self.symbols: dict[str, list] = {}  # name: [hint, lower, upper or None]

    def expression(self, value: torch.SymInt) -> str:
        node = value.node
        expr = node.expr
        index = self._expr_index.get(expr)
        if index is None:
            shape_env = node.shape_env
            tree = self._tree(expr, shape_env)
            index = self._expr_index[expr] = len(self.exprs)
            self.exprs.append(tree)
            hint = node.hint
            self.expr_hints.append(int(hint) if hint is not None else None)
        return f"#{index}"

    def _tree(self, expr: sympy.Basic, shape_env: ShapeEnv) -> Any:
        if isinstance(expr, sympy.Symbol):
            name = expr.name
            if not (name.startswith("s") and name[1:].isdigit()):
                raise Unsupported(f"size symbol {name} (only backed sizes s<N> are cached)")
            if name not in self.symbols:
                hint = _symbol_hint(shape_env, expr)
                ranges = shape_env.var_to_range.get(expr)
                lower, upper = (None, None) if ranges is None else (_bound(ranges.lower), _bound(ranges.upper))
                self.symbols[name] = [hint, lower, upper]
            return name
        if isinstance(expr, sympy.Integer):
            return int(expr)
        if expr is sympy.true or expr is sympy.false:
            return bool(expr)
        name = type(expr).__name__
        if _SYMPY.get(name) is not type(expr):
            raise Unsupported(f"size expression {expr} ({name})")
        return [name, *(self._tree(arg, shape_env) for arg in expr.args)]

    def value(self, value: Any) -> Any:
        """A node's ``val``."""
        if isinstance(value, torch.Tensor):
            return {"T": [[self.size(s) for s in value.shape], [self.size(s) for s in value.stride()],
                          str(value.dtype).removeprefix("torch."), str(value.device), bool(value.requires_grad)]}
        if isinstance(value, torch.SymInt):
            return {"S": self.expression(value)}
        if isinstance(value, (torch.SymFloat, torch.SymBool)):
            raise Unsupported(f"a {type(value).__name__} value")
        return self.argument(value, nodes=False)

    def size(self, size: Any) -> Any:
        return self.expression(size) if isinstance(size, torch.SymInt) else int(size)

    def argument(self, value: Any, nodes: bool = True) -> Any:
        if isinstance(value, fx.Node) and nodes:
            return {"n": value.name}
        if value is None or type(value) in (bool, int, float, str):
            return value
        if isinstance(value, (list, tuple)) and type(value) in (list, tuple, immutable_list):
            items = [self.argument(item, nodes) if not isinstance(item, torch.Tensor) else self.value(item)
                     for item in value]
            return {"t": items} if type(value) is tuple else items
        if isinstance(value, torch.dtype):
            return {"d": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"v": str(value)}
        if isinstance(value, torch.layout):
            return {"l": str(value).removeprefix("torch.")}
        if isinstance(value, torch.memory_format):
            return {"m": str(value).removeprefix("torch.")}
        raise Unsupported(f"an argument of type {type(value).__name__}")


def _bound(bound: Any) -> int | None:
    """A range bound as an int, or None for an infinite one (sympy's ``oo`` or torch's ``int_oo``)."""
    return int(bound) if isinstance(bound, (int, sympy.Integer)) else None


def _symbol_hint(shape_env: ShapeEnv, symbol: sympy.Symbol) -> int | None:
    for table in ("backed_var_to_val", "var_to_val"):
        hint = getattr(shape_env, table, {}).get(symbol)
        if hint is not None:
            return int(hint)
    return None


def _target(node: fx.Node) -> str | None:
    if node.op in ("placeholder", "output"):
        return None
    if node.op != "call_function":
        raise Unsupported(f"a {node.op} node ({node.name})")
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"op:{target.namespace}::{target._opname}.{target._overloadname}"
    name = _FUNCTION_NAMES.get(id(target))
    if name is None:
        raise Unsupported(f"the call target {target} of {node.name}")
    return f"py:{name}"


def encode_program(program: Program) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``program`` (as capture returns it) as JSON-able data and its lifted constants (CPU tensors; a meta constant
    travels as its shape and dtype). Raises :class:`Unsupported` for what the codec cannot encode."""
    encoder = _Encoder()
    nodes = []
    for node in program.graph.nodes:
        meta = {key: node.meta[key] for key in _META_KEYS if key in node.meta}
        if "val" in node.meta:
            meta["val"] = encoder.value(node.meta["val"])
        if node.op == "placeholder" and node.target != node.name:
            raise Unsupported(f"placeholder {node.name} with target {node.target}")
        nodes.append([node.name, node.op, _target(node), encoder.argument(list(node.args)),
                      {key: encoder.argument(value) for key, value in node.kwargs.items()}, meta])
    for source in program.sources:
        if not isinstance(source.target, (str, type(None))):
            raise Unsupported(f"an input of kind {source.kind} with target {source.target!r}")
    constants, meta_constants = {}, {}
    for name, tensor in program.constants.items():
        if not isinstance(tensor, torch.Tensor) or type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            raise Unsupported(f"the constant {name} of type {type(tensor).__name__}")
        if tensor.device.type == "meta":
            meta_constants[name] = [list(tensor.shape), str(tensor.dtype).removeprefix("torch.")]
        else:
            constants[name] = tensor.detach().to("cpu").contiguous()
    try:
        specs = [pytree.treespec_dumps(program.in_spec), pytree.treespec_dumps(program.out_spec)]
    except Exception as error:  # an unregistered or unserializable pytree type: several error types
        raise Unsupported(f"pytree specs: {error}") from error
    data = {
        "format": FORMAT,
        "nodes": nodes,
        "symbols": encoder.symbols,
        "exprs": encoder.exprs,
        "expr_hints": encoder.expr_hints,
        "sources": [[source.kind, source.target] for source in program.sources],
        "specs": specs,
        "user_output_count": program.user_output_count,
        "mutated_buffers": [[index, name] for index, name in program.mutated_buffers.items()],
        "meta_constants": meta_constants,
    }
    return data, constants


# -- decoding --------------------------------------------------------------------------------------------------------
class _Decoder:
    def __init__(self, data: dict[str, Any]):
        self.shape_env = ShapeEnv(assume_static_by_default=True)
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=self.shape_env)
        self.symbols: dict[str, sympy.Symbol] = {}
        for name, (hint, lower, upper) in data["symbols"].items():
            symbol = self.symbols[name] = sympy.Symbol(name, integer=True, positive=True)
            if hint is not None:
                if hasattr(self.shape_env, "add_backed_var_to_val"):
                    self.shape_env.add_backed_var_to_val(symbol, int(hint))
                else:
                    self.shape_env.add_var_to_val(symbol, int(hint))
            if lower is not None or upper is not None:
                self._constrain(symbol, -int_oo if lower is None else lower, int_oo if upper is None else upper)
        self.exprs = data["exprs"]
        self.expr_hints = data["expr_hints"]
        self._symints: dict[str, torch.SymInt] = {}
        self._tensors: dict[str, torch.Tensor] = {}

    def _constrain(self, symbol: sympy.Symbol, lower: Any, upper: Any) -> None:
        """``constrain_symbol_range``, told where the range comes from: the public method looks for the user's stack
        frame, and finding it imports ``torch.export`` (a third of a second, most of a small model's cached load)."""
        where = SLoc("fxpeft capture cache", None)
        try:
            self.shape_env._update_var_to_range(symbol, ValueRanges(lower, upper), ValueRangesSLoc(where, where))
        except (AttributeError, TypeError):  # another torch: the public way
            self.shape_env.constrain_symbol_range(symbol, compiler_min=lower, compiler_max=upper)

    def _expr(self, tree: Any) -> sympy.Basic:
        if isinstance(tree, bool):
            return sympy.true if tree else sympy.false
        if isinstance(tree, int):
            return sympy.Integer(tree)
        if isinstance(tree, str):
            return self.symbols[tree]  # KeyError: an entry that is not self-consistent
        function = _SYMPY[tree[0]]
        return function(*(self._expr(arg) for arg in tree[1:]))

    def symint(self, ref: str) -> torch.SymInt:
        value = self._symints.get(ref)
        if value is None:
            index = int(ref[1:])
            value = self.shape_env.create_symintnode(self._expr(self.exprs[index]), hint=self.expr_hints[index])
            self._symints[ref] = value
        return value

    def size(self, size: Any) -> Any:
        return self.symint(size) if isinstance(size, str) else size

    def value(self, value: Any) -> Any:
        if isinstance(value, dict) and "T" in value:
            # Nodes with the same sizes, strides, dtype and device share one fake tensor: making each costs ~0.5 ms
            # of symbolic arithmetic (a 7B llama has 2000 of them and 30 distinct ones), and only its properties
            # are ever read.
            spec = json.dumps(value["T"])
            tensor = self._tensors.get(spec)
            if tensor is None:
                sizes, strides, dtype, device, requires_grad = value["T"]
                with self.fake_mode:
                    tensor = torch.empty_strided([self.size(s) for s in sizes], [self.size(s) for s in strides],
                                                 dtype=_dtype(dtype), device=torch.device(device),
                                                 requires_grad=requires_grad)
                self._tensors[spec] = tensor
            return tensor
        if isinstance(value, dict) and "S" in value:
            return self.symint(value["S"])
        if isinstance(value, list):
            return [self.value(item) for item in value]
        if isinstance(value, dict) and "t" in value:
            return tuple(self.value(item) for item in value["t"])
        return self.argument(value, {})

    def argument(self, value: Any, env: dict[str, fx.Node]) -> Any:
        if value is None or type(value) in (bool, int, float, str):
            return value
        if isinstance(value, list):
            return [self.argument(item, env) for item in value]
        (tag, content), = value.items()
        if tag == "n":
            return env[content]
        if tag == "t":
            return tuple(self.argument(item, env) for item in content)
        if tag == "T":
            return self.value(value)
        if tag == "d":
            return _dtype(content)
        if tag == "v":
            return torch.device(content)
        if tag in ("l", "m"):
            found = getattr(torch, content, None)
            if not isinstance(found, torch.layout if tag == "l" else torch.memory_format):
                raise Unsupported(f"unknown {'layout' if tag == 'l' else 'memory format'} {content!r}")
            return found
        raise Unsupported(f"unknown argument tag {tag!r}")


def _dtype(name: str) -> torch.dtype:
    found = getattr(torch, name, None)
    if not isinstance(found, torch.dtype):
        raise Unsupported(f"unknown dtype {name!r}")
    return found


def _resolve_target(code: str) -> Any:
    kind, _, name = code.partition(":")
    if kind == "py":
        if name not in _FUNCTIONS:
            raise Unsupported(f"call target {name!r} is not allowed")
        return _FUNCTIONS[name]
    if kind != "op":
        raise Unsupported(f"call target {code!r}")
    namespace, _, qualified = name.partition("::")
    op_name, _, overload = qualified.rpartition(".")
    if namespace == "fxpeft":
        import fxpeft.ops.dropout  # noqa: F401  (registers fxpeft::dropout_noise)
        import fxpeft.ops.quantized  # noqa: F401  (registers the quantized-linear op)
    try:
        found = getattr(getattr(getattr(torch.ops, namespace), op_name), overload)
    except (AttributeError, RuntimeError) as error:
        raise Unsupported(f"operator {name} is not registered") from error
    if not isinstance(found, torch._ops.OpOverload):
        raise Unsupported(f"{name} is not an operator overload")
    return found


def decode_program(data: dict[str, Any], constants: dict[str, torch.Tensor], *, kwarg_names: tuple[str, ...],
                   fixed_kwargs: dict[str, Any], device: torch.device) -> Program:
    """The :class:`Program` that :func:`encode_program` encoded (``kwarg_names``, ``fixed_kwargs`` and ``device``
    come from the call being captured; the cache key guarantees they are the ones it was captured with). Raises
    :class:`Unsupported` (or ``KeyError``/``ValueError``/``TypeError`` on a malformed entry) instead of guessing."""
    if data.get("format") != FORMAT:
        raise Unsupported(f"entry format {data.get('format')!r}, expected {FORMAT}")
    decoder = _Decoder(data)
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for name, op, target, args, kwargs, meta in data["nodes"]:
        if op == "placeholder":
            node = graph.placeholder(name)
        elif op == "output":
            node = graph.output(decoder.argument(args, env)[0])
        elif op == "call_function":
            node = graph.create_node("call_function", _resolve_target(target), tuple(decoder.argument(args, env)),
                                     {key: decoder.argument(value, env) for key, value in kwargs.items()}, name=name)
        else:
            raise Unsupported(f"a {op} node")
        if node.name != name:  # fx's namespace gave another name: the entry's names are not unique or not valid
            raise Unsupported(f"node name {name!r} was not kept")
        for key in _META_KEYS:
            if key in meta:
                node.meta[key] = _as_module_stack(meta[key]) if key == "nn_module_stack" else meta[key]
        if "val" in meta:
            node.meta["val"] = decoder.value(meta["val"])
        env[name] = node
    graph_module = fx.GraphModule(torch.nn.Module(), graph)
    tensors = dict(constants)
    for name, (shape, dtype) in data["meta_constants"].items():
        tensors[name] = torch.empty(shape, dtype=_dtype(dtype), device="meta")
    sources = [InputSource(kind, target) for kind, target in data["sources"]]
    if len(sources) != len(graph.find_nodes(op="placeholder")) or \
            any(source.kind == "constant" and source.target not in tensors for source in sources):
        raise Unsupported("the entry's inputs do not match its graph")
    return Program(
        graph_module=graph_module,
        sources=sources,
        in_spec=pytree.treespec_loads(data["specs"][0]),
        out_spec=pytree.treespec_loads(data["specs"][1]),
        user_output_count=int(data["user_output_count"]),
        mutated_buffers={int(index): name for index, name in data["mutated_buffers"]},
        constants={name: tensor.to(device) if tensor.device.type != "meta" else tensor
                   for name, tensor in tensors.items()},
        kwarg_names=kwarg_names,
        fixed_kwargs=fixed_kwargs,
        device=device,
    )


def _as_module_stack(stack: Any) -> dict[str, tuple[str, str]]:
    if not isinstance(stack, dict):
        raise Unsupported("nn_module_stack is not a mapping")
    return {str(key): tuple(value) for key, value in stack.items()}
