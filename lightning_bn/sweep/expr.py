"""Arithmetic on a run's values for a sweep's ``derived`` options, without eval or exec.

    model.init_args.lr: base_lr * data.init_args.batch_size      # Masters & Luschi's linear scaling

The text is parsed with Python's ``ast`` and evaluated by walking the tree. Allowed: numbers,
names (a dotted name such as ``data.init_args.batch_size`` is one option key), the operators
``+ - * / // % **``, unary ``-``/``+``, parentheses and the functions in :data:`FUNCTIONS`.
Anything else (attribute access on values, strings, subscripts, comparisons, other calls)
is refused when the sweep file is loaded, not when the run starts.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Mapping
from typing import Any

from lightning_bn.errors import ConfigError

FUNCTIONS = {
    "min": min,
    "max": max,
    "abs": abs,
    "int": int,
    "round": round,
    "sqrt": math.sqrt,
    "log2": math.log2,
}
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` (nested Attribute/Name nodes) -> "a.b.c"; None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def parse(expression: str, where: str) -> ast.Expression:
    """Parse and check ``expression``; ``where`` names it in error messages (e.g. the option key)."""
    if not isinstance(expression, (str, int, float)) or isinstance(expression, bool):
        raise ConfigError(f"{where}: expected an arithmetic expression, got {expression!r}")
    try:
        tree = ast.parse(str(expression), mode="eval")
    except SyntaxError as err:
        raise ConfigError(f"{where}: cannot parse {expression!r} ({err.msg})") from None
    for node in ast.walk(tree):
        _check_node(node, expression, where)
    return tree


def _check_node(node: ast.AST, expression: str, where: str) -> None:
    allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Name, ast.Attribute, ast.Call, ast.Load)
    allowed += tuple(_BINARY) + tuple(_UNARY)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ConfigError(f"{where}: only numbers are allowed as constants in {expression!r}, got {node.value!r}")
        return
    if isinstance(node, ast.Attribute) and _dotted(node) is None:
        raise ConfigError(f"{where}: {expression!r} uses an attribute of a value; only dotted option names are allowed")
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in FUNCTIONS or node.keywords:
            known = ", ".join(FUNCTIONS)
            raise ConfigError(f"{where}: {expression!r} calls {ast.unparse(node.func)!r}; allowed functions: {known}")
        return
    if not isinstance(node, allowed):
        raise ConfigError(
            f"{where}: {type(node).__name__} is not allowed in {expression!r}; "
            "use numbers, option names, + - * / // % ** and " + ", ".join(FUNCTIONS)
        )


def names_in(tree: ast.Expression) -> list[str]:
    """The value names an expression reads (dotted option keys or plain variables), in order."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        name = _dotted(node) if isinstance(node, (ast.Name, ast.Attribute)) else None
        if name is not None:
            if name not in found and name not in FUNCTIONS:
                found.append(name)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def evaluate(tree: ast.Expression, values: Mapping[str, Any], where: str) -> int | float:
    """The value of a parsed expression, reading names from ``values``."""

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.Name, ast.Attribute)):
            name = _dotted(node)
            if name not in values:
                known = ", ".join(sorted(values)) or "none"
                raise ConfigError(f"{where}: unknown name {name!r}; known values: {known}")
            found = values[name]
            if isinstance(found, bool) or not isinstance(found, (int, float)):
                raise ConfigError(f"{where}: {name}={found!r} is not a number")
            return found
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](value(node.operand))
        if isinstance(node, ast.Call):
            return FUNCTIONS[node.func.id](*(value(arg) for arg in node.args))
        raise ConfigError(f"{where}: cannot evaluate {type(node).__name__}")  # parse() refuses these first

    try:
        result = value(tree)
    except (ArithmeticError, ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where}: {ast.unparse(tree)!r} fails with {values_used(tree, values)}: {err}") from None
    if isinstance(result, float):
        if not math.isfinite(result):
            raise ConfigError(f"{where}: {ast.unparse(tree)!r} is {result} with {values_used(tree, values)}")
        # 0.1 * 3 = 0.30000000000000004: keep 12 significant digits so names and commands stay readable.
        result = float(f"{result:.12g}")
    return result


def values_used(tree: ast.Expression, values: Mapping[str, Any]) -> str:
    return ", ".join(f"{name}={values.get(name)!r}" for name in names_in(tree))
