"""Knobs: module-level numeric constants of editable files, read and rewritten losslessly.

A knob is a top-level statement `NAME = <number>` (or `NAME: float = <number>`) where NAME is
UPPER_CASE, or any name the spec lists in `[search] knobs` (nanoGPT's `learning_rate`), and
the number is an int or float literal, optionally negated: `-1`, `3e-4`. Bools, expressions
(`2 ** 10`), assignments inside functions, classes or `if` blocks, and names assigned more
than once in one file are not knobs: their runtime value is not the literal we would edit.

A name may be set in two editable files when one of them is a config file the command hands
to the script (`python train.py config/small.py`, which the script exec's after its own
defaults): the config file's value is the one that runs, so that is the knob's home.
"""

from __future__ import annotations

import ast
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from overnight.errors import ConfigError
from overnight.regions import RegionError, protected_lines

if TYPE_CHECKING:
    from overnight.spec import Spec

NAME_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
_OVERRIDE = re.compile(r"^--?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


@dataclass(frozen=True)
class Scope:
    """Which constants are knobs, and which file is a name's home when several set it."""

    named: frozenset[str] = frozenset()  # knobs whatever their case ([search] knobs)
    config: tuple[str, ...] = ()  # editable files the command passes on: later ones win
    # `--name=value` arguments of the command: set after the files, so edits cannot reach them
    overridden: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, spec: Spec) -> Scope:
        return cls.for_command(spec.run.command, spec.files.editable, spec.search.knobs or [])

    @classmethod
    def for_command(cls, command: str, editable: list[str], named: list[str] = ()) -> Scope:
        try:
            words = shlex.split(command)
        except ValueError:
            words = command.split()
        scripts = [w.removeprefix("./") for w in words if w.endswith(".py")]
        config = tuple(w for w in scripts[1:] if w in editable)  # the first is the script
        overridden = {m[1]: m[2] for w in words if (m := _OVERRIDE.match(w))}
        return cls(frozenset(named), config, overridden)

    def is_knob(self, name: str) -> bool:
        return bool(NAME_RE.match(name)) or name in self.named


UPPER_ONLY = Scope()  # the default: UPPER_CASE names, one home each


@dataclass(frozen=True)
class Knob:
    name: str
    value: int | float
    kind: Literal["int", "float"]
    path: str
    line: int  # 1-based line of the assignment


def list_knobs(source: str, path: str, scope: Scope = Scope()) -> list[Knob]:
    """Every knob of one file, in source order. Constants in protected regions are not knobs."""
    module = _parse(source, path)
    try:
        fixed = protected_lines(source)
    except RegionError as e:
        raise ConfigError(f"{path}: {e}") from None
    knobs = []
    for stmt, name, value_node in _knob_statements(module, scope):
        value, kind = _literal_value(value_node)
        if stmt.lineno in fixed:
            continue
        knobs.append(Knob(name=name, value=value, kind=kind, path=path, line=stmt.lineno))
    return knobs


def python_files(files: Mapping[str, str]) -> dict[str, str]:
    """The files that can hold knobs: Python sources (a config.yaml beside them is text)."""
    return {p: t for p, t in files.items() if p.endswith(".py")}


def read_knobs(files: Mapping[str, str], scope: Scope = Scope()) -> dict[str, Knob]:
    """Knobs of several files (path -> text) by name. A name has one home: the one file that
    defines it, or the last config file (see `Scope`) among those that do."""
    found: dict[str, Knob] = {}
    rank = {path: i + 1 for i, path in enumerate(scope.config)}  # 0: not a config file
    for path, source in files.items():
        for knob in list_knobs(source, path, scope):
            other = found.get(knob.name)
            if other is not None and rank.get(other.path, 0) == rank.get(path, 0):
                raise ConfigError(
                    f"knob {knob.name} is defined in both {other.path} (line {other.line}) and "
                    f"{knob.path} (line {knob.line}): rename one so each knob has one home"
                )
            if other is None or rank.get(path, 0) > rank.get(other.path, 0):
                found[knob.name] = knob
    return found


def unreached(proposed: Mapping[str, object], before: Mapping[str, object],
              ran: Mapping[str, object]) -> tuple[list[str], bool]:
    """The edited knobs (`proposed` differs from `before`) whose value at run time (`ran`,
    from the attestation) is not the proposed one: something set them again after the file
    (an exec'd config, a `--name=value` argument). Returns one line per such knob, and
    whether that is every edited knob that was seen at run time."""
    moved = [n for n, v in proposed.items() if n in before and before[n] != v]
    seen = [n for n in moved if _number(ran.get(n))]
    lines = [f"{n} ran as {_show(ran[n])}, not {_show(proposed[n])}"
             for n in seen if float(ran[n]) != float(proposed[n])]  # type: ignore[arg-type]
    return lines, bool(seen) and len(lines) == len(seen) == len(moved)


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _show(v: object) -> str:
    return format_value(v) if _number(v) else repr(v)  # type: ignore[arg-type]


def rewrite(source: str, values: dict[str, int | float], scope: Scope = Scope()) -> str:
    """`source` with the named knobs set to `values`; every other byte is unchanged.

    Values are written exactly (shortest round-trip literal); round them with `format_value`
    first for short literals. An int knob stays an int and a float knob stays a float.
    """
    module = _parse(source, "<source>")
    known = {name: node for _, name, node in _knob_statements(module, scope)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        available = ", ".join(sorted(known)) or "none"
        raise ConfigError(
            f"cannot rewrite {', '.join(unknown)}: not a knob in this file "
            f"(knobs here: {available})"
        )
    offsets = _line_offsets(source)
    spans = []
    for name, new in values.items():
        node = known[name]
        _, kind = _literal_value(node)
        start = _offset(source, offsets, node.lineno, node.col_offset)
        end = _offset(source, offsets, node.end_lineno, node.end_col_offset)
        spans.append((start, end, _literal_text(name, new, kind)))
    out = source
    for start, end, text in sorted(spans, reverse=True):  # from the end: offsets stay valid
        out = out[:start] + text + out[end:]
    return out


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


def _parse(source: str, path: str) -> ast.Module:
    try:
        return ast.parse(source, filename=path)
    except SyntaxError as e:
        raise ConfigError(f"{path} is not valid Python: {e.msg} (line {e.lineno})") from None


def _knob_statements(module: ast.Module,
                     scope: Scope = Scope()) -> list[tuple[ast.stmt, str, ast.expr]]:
    """(statement, name, value node) for each knob, top-level statements only."""
    candidates: list[tuple[ast.stmt, str, ast.expr]] = []
    assigned: dict[str, int] = {}
    for stmt in module.body:  # def, class, if, for, with...: not top-level constants
        for name in _assigned_names(stmt):
            assigned[name] = assigned.get(name, 0) + 1
        knob = _as_knob(stmt, scope)
        if knob is not None:
            candidates.append((stmt, *knob))
    # A name assigned twice is not a constant: editing one literal may not change what runs.
    return [c for c in candidates if assigned[c[1]] == 1]


def _as_knob(stmt: ast.stmt, scope: Scope) -> tuple[str, ast.expr] | None:
    if isinstance(stmt, ast.Assign):
        if len(stmt.targets) != 1:
            return None  # A = B = 1: two names share one literal
        target, value = stmt.targets[0], stmt.value
    elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
        target, value = stmt.target, stmt.value
    else:
        return None
    if not isinstance(target, ast.Name) or not scope.is_knob(target.id):
        return None
    if not _is_number(value):
        return None
    return target.id, value


def _assigned_names(stmt: ast.stmt) -> list[str]:
    if isinstance(stmt, ast.Assign):
        return [t.id for t in stmt.targets if isinstance(t, ast.Name)]
    if isinstance(stmt, (ast.AnnAssign, ast.AugAssign)) and isinstance(stmt.target, ast.Name):
        return [stmt.target.id]
    return []


def _is_number(node: ast.expr) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
    return (isinstance(node, ast.Constant) and isinstance(node.value, (int, float))
            and not isinstance(node.value, bool))


def _literal_value(node: ast.expr) -> tuple[int | float, Literal["int", "float"]]:
    sign = 1
    if isinstance(node, ast.UnaryOp):
        sign = -1 if isinstance(node.op, ast.USub) else 1
        node = node.operand
    assert isinstance(node, ast.Constant)
    if isinstance(node.value, int):
        return sign * node.value, "int"
    return sign * float(node.value), "float"


def _literal_text(name: str, v: int | float, kind: Literal["int", "float"]) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{name}: a knob value must be a number, got {v!r}")
    if kind == "int":
        if isinstance(v, float) and not v.is_integer():
            raise ConfigError(f"{name} is an int knob: cannot set it to {v!r}")
        return str(int(v))
    return format_value(float(v), digits=17)  # 17 digits: exact, still the shortest repr


def _line_offsets(source: str) -> list[int]:
    """Character offset of the start of each line (index 0 is line 1)."""
    # Python's own line ends only: str.splitlines would also split on form feeds and the like.
    return [0] + [m.end() for m in re.finditer(r"\r\n|\r|\n", source)] + [len(source)]


def _offset(source: str, offsets: list[int], lineno: int, col_bytes: int) -> int:
    """ast columns count UTF-8 bytes; turn (line, byte column) into a string offset."""
    start = offsets[lineno - 1]
    line = source[start:offsets[lineno]] if lineno < len(offsets) else source[start:]
    return start + len(line.encode("utf-8")[:col_bytes].decode("utf-8", errors="ignore"))
