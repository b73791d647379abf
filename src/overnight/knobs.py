"""Knobs: module-level numeric constants of editable files, read and rewritten losslessly.

A knob is a top-level statement `NAME = <number>` (or `NAME: float = <number>`) where NAME is
UPPER_CASE and the number is an int or float literal, optionally negated: `-1`, `3e-4`.
Bools, expressions (`2 ** 10`), assignments inside functions, classes or `if` blocks, and
names assigned more than once at top level are not knobs: their runtime value is not the
literal we would edit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

from overnight.errors import ConfigError
from overnight.regions import RegionError, protected_lines

NAME_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")


@dataclass(frozen=True)
class Knob:
    name: str
    value: int | float
    kind: Literal["int", "float"]
    path: str
    line: int  # 1-based line of the assignment


def list_knobs(source: str, path: str) -> list[Knob]:
    """Every knob of one file, in source order. Constants in protected regions are not knobs."""
    module = _parse(source, path)
    wrapper = MetadataWrapper(module, unsafe_skip_copy=True)
    positions = wrapper.resolve(PositionProvider)
    try:
        fixed = protected_lines(source)
    except RegionError as e:
        raise ConfigError(f"{path}: {e}") from None
    knobs = []
    for stmt, name, value_node in _knob_statements(module):
        value, kind = _literal_value(value_node)
        line = positions[stmt].start.line
        if line in fixed:
            continue
        knobs.append(Knob(name=name, value=value, kind=kind, path=path, line=line))
    return knobs


def read_knobs(files: dict[str, str]) -> dict[str, Knob]:
    """Knobs of several files (path -> text) by name. A name must be defined in one file only."""
    found: dict[str, Knob] = {}
    for path, source in files.items():
        for knob in list_knobs(source, path):
            other = found.get(knob.name)
            if other is not None:
                raise ConfigError(
                    f"knob {knob.name} is defined in both {other.path} (line {other.line}) and "
                    f"{knob.path} (line {knob.line}): rename one so each knob has one home"
                )
            found[knob.name] = knob
    return found


def rewrite(source: str, values: dict[str, int | float]) -> str:
    """`source` with the named knobs set to `values`; every other byte is unchanged.

    Values are written exactly (shortest round-trip literal); round them with `format_value`
    first for short literals. An int knob stays an int and a float knob stays a float.
    """
    module = _parse(source, "<source>")
    known = {name: node for _, name, node in _knob_statements(module)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        available = ", ".join(sorted(known)) or "none"
        raise ConfigError(
            f"cannot rewrite {', '.join(unknown)}: not a knob in this file "
            f"(knobs here: {available})"
        )
    replacements: dict[cst.BaseExpression, cst.BaseExpression] = {}
    for name, new in values.items():
        old_node = known[name]
        _, kind = _literal_value(old_node)
        text = _literal_text(name, new, kind)
        new_node = cst.parse_expression(text)
        # Keep parentheses the user wrote around the number.
        new_node = new_node.with_changes(lpar=old_node.lpar, rpar=old_node.rpar)
        replacements[old_node] = new_node
    return module.visit(_Replace(replacements)).code


def format_value(v: int | float, digits: int = 4) -> str:
    """A short literal for `v`: ints exactly, floats rounded to `digits` significant digits.

    The float form is the shortest text that parses back to the rounded value and always
    reads as a float (`3.0`, `0.0006`, `1e-05`), so a float knob never turns into an int.
    """
    if isinstance(v, bool):
        raise TypeError(f"a knob value must be int or float, got bool {v!r}")
    if isinstance(v, int):
        return str(v)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"cannot write {v!r} as a knob value: it has no Python literal")
    rounded = float(f"{v:.{digits - 1}e}")
    # repr is Python's shortest round-trip form and always contains '.' or 'e'.
    return repr(rounded)


# --- internals -----------------------------------------------------------------------------


def _parse(source: str, path: str) -> cst.Module:
    try:
        return cst.parse_module(source)
    except cst.ParserSyntaxError as e:
        raise ConfigError(f"{path} is not valid Python: {e.message} (line {e.raw_line})") from None


def _knob_statements(
    module: cst.Module,
) -> list[tuple[cst.BaseSmallStatement, str, cst.BaseExpression]]:
    """(statement, name, value node) for each knob, top-level statements only."""
    candidates: list[tuple[cst.BaseSmallStatement, str, cst.BaseExpression]] = []
    assigned: dict[str, int] = {}
    for line in module.body:
        if not isinstance(line, cst.SimpleStatementLine):
            continue  # def, class, if, for, with...: not top-level constants
        for stmt in line.body:
            for name in _assigned_names(stmt):
                assigned[name] = assigned.get(name, 0) + 1
            knob = _as_knob(stmt)
            if knob is not None:
                candidates.append((stmt, *knob))
    # A name assigned twice is not a constant: editing one literal may not change what runs.
    return [c for c in candidates if assigned[c[1]] == 1]


def _as_knob(stmt: cst.BaseSmallStatement) -> tuple[str, cst.BaseExpression] | None:
    if isinstance(stmt, cst.Assign):
        if len(stmt.targets) != 1:
            return None  # A = B = 1: two names share one literal
        target, value = stmt.targets[0].target, stmt.value
    elif isinstance(stmt, cst.AnnAssign) and stmt.value is not None:
        target, value = stmt.target, stmt.value
    else:
        return None
    if not isinstance(target, cst.Name) or not NAME_RE.match(target.value):
        return None
    if not _is_number(value):
        return None
    return target.value, value


def _assigned_names(stmt: cst.BaseSmallStatement) -> list[str]:
    if isinstance(stmt, cst.Assign):
        return [t.target.value for t in stmt.targets if isinstance(t.target, cst.Name)]
    if isinstance(stmt, (cst.AnnAssign, cst.AugAssign)) and isinstance(stmt.target, cst.Name):
        return [stmt.target.value]
    return []


def _is_number(node: cst.BaseExpression) -> bool:
    if isinstance(node, cst.UnaryOperation) and isinstance(node.operator, (cst.Minus, cst.Plus)):
        node = node.expression
    return isinstance(node, (cst.Integer, cst.Float))


def _literal_value(node: cst.BaseExpression) -> tuple[int | float, Literal["int", "float"]]:
    sign = 1
    if isinstance(node, cst.UnaryOperation):
        sign = -1 if isinstance(node.operator, cst.Minus) else 1
        node = node.expression
    if isinstance(node, cst.Integer):
        return sign * int(node.value, 0), "int"
    assert isinstance(node, cst.Float)
    return sign * float(node.value), "float"


def _literal_text(name: str, v: int | float, kind: Literal["int", "float"]) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{name}: a knob value must be a number, got {v!r}")
    if kind == "int":
        if isinstance(v, float) and not v.is_integer():
            raise ConfigError(f"{name} is an int knob: cannot set it to {v!r}")
        return str(int(v))
    return format_value(float(v), digits=17)  # 17 digits: exact, still the shortest repr


class _Replace(cst.CSTTransformer):
    """Swap value nodes by identity; nothing else in the tree is touched."""

    def __init__(self, replacements: dict[cst.BaseExpression, cst.BaseExpression]) -> None:
        super().__init__()
        self._replacements = replacements

    def on_leave(
        self, original_node: cst.CSTNode, updated_node: cst.CSTNode
    ) -> cst.CSTNode | cst.RemovalSentinel | cst.FlattenSentinel:
        return self._replacements.get(original_node, updated_node)  # type: ignore[call-overload]
