"""Protected regions of editable files: lines between `# overnight: protect` and `# overnight: end`.

An editable file may still hold things that are there for a reason (the time
budget, the evaluation call). A proposal is rejected before anything runs when it

- changes, moves out, or removes such a region (any file: the text must stay);
- in a Python file, puts a region where its lines are not the module's own statements
  (inside a string, an `if False:`, a `def`, a `with`...): a region must stay whole
  top-level statements. A region the parent already nested in compound statements (the
  budget check inside the training loop) may stay there, under exactly the same headers;
- rebinds, outside the regions, a name a region reads (`print`, `evaluate_bpb`, `time`...)
  in a way the parent did not: an import from elsewhere, a `def`, an assignment, an
  attribute assignment such as `time.time = ...`, or uses a back door to the same end
  (`exec`, `globals()`, `sys.modules`, `__dict__`, `__code__`) that the parent did not;
- monkeypatches builtins (`import builtins`, `__builtins__`), in any editable Python file.

These are static checks of one file: they close the obvious ways around a region, not
every way (another editable module patching `prepare` is not seen here). A trusted
evaluator (`[evaluate]`) is the way to a metric the experiment cannot touch at all.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

START = re.compile(r"^\s*#\s*overnight:\s*protect\b")
END = re.compile(r"^\s*#\s*overnight:\s*end\b")


class RegionError(ValueError):
    pass


def regions(text: str) -> list[tuple[int, int]]:
    """1-based inclusive (first, last) line numbers of each protected region, markers included."""
    out: list[tuple[int, int]] = []
    start: int | None = None
    for n, line in enumerate(text.splitlines(), start=1):
        if START.match(line):
            if start is not None:
                raise RegionError(f"line {n}: `# overnight: protect` inside a protected region "
                                  f"opened at line {start}")
            start = n
        elif END.match(line):
            if start is None:
                raise RegionError(f"line {n}: `# overnight: end` without a matching protect")
            out.append((start, n))
            start = None
    if start is not None:
        raise RegionError(f"line {start}: `# overnight: protect` is never closed by "
                          "`# overnight: end`")
    return out


def protected_blocks(text: str) -> list[str]:
    lines = text.splitlines()
    return ["\n".join(lines[a - 1:b]) for a, b in regions(text)]


def protected_lines(text: str) -> set[int]:
    return {n for a, b in regions(text) for n in range(a, b + 1)}


def is_python(path: str) -> bool:
    return path.endswith((".py", ".pyw"))


def check_edit(path: str, old: str, new: str) -> str | None:
    """Why an edit of `path` from `old` to `new` breaks a protected region, or None."""
    try:
        before = protected_blocks(old)
    except RegionError as e:
        return f"{path}: {e}"
    try:
        after = protected_blocks(new)
    except RegionError as e:
        return f"edits a protected region of {path}: {e}"
    if before != after:
        spans = regions(old)
        for i, block in enumerate(before):
            if i >= len(after) or after[i] != block:
                a, b = spans[i]
                return f"edits the protected region of {path} at lines {a}-{b}"
        return f"adds a protected region to {path}"
    if not is_python(path):
        return None  # a config file has no statements: its regions are text, checked above
    return _check_python(path, old, new)


# --- Python files ----------------------------------------------------------------------------


def _check_python(path: str, old: str, new: str) -> str | None:
    spans, lines = regions(new), new.splitlines()
    new_tree = _parse(new)
    old_tree = _parse(old)
    if new_tree is None:
        if spans and old_tree is not None:
            return (f"leaves {path} not valid Python, so its protected regions cannot be "
                    f"checked ({_syntax_error(new)})")
        return None  # it will not run; nothing to hide a region from
    problem = _builtins_patched(path, old_tree, new_tree)
    if problem or not spans:
        return problem
    old_spans = regions(old)
    old_chains = _chains(old_tree, old_spans, old.splitlines()) if old_tree is not None else None
    new_chains = []
    for i, span in enumerate(spans):
        placed = _place(new_tree.body, span, lines)
        if isinstance(placed, str):
            return f"{placed.format(path=path)}: a region must stay whole top-level statements"
        chain, _ = placed
        if chain and (old_chains is None or old_chains[i] != chain):
            a, b = span
            return (f"moves the protected region at lines {a}-{b} of {path} inside "
                    f"{chain[-1].what} at line {chain[-1].line}: a region must stay whole "
                    "top-level statements of the module")
        new_chains.append(placed[1])
    reads = _Reads.of(new_chains, spans)
    return _rebinding(path, old_tree, new_tree, (old_spans, spans), reads)


def _parse(text: str) -> ast.Module | None:
    try:
        return ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _syntax_error(text: str) -> str:
    try:
        ast.parse(text)
    except SyntaxError as e:
        return f"line {e.lineno}: {e.msg}"
    except (ValueError, RecursionError, MemoryError) as e:
        return f"{type(e).__name__}: {e}"
    return "it parses"


# --- where a region sits ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    """One compound statement around a region: what it is, where, and its header's AST (its
    bodies left out, so that edits inside them do not count as a change of header)."""

    what: str  # e.g. "the `while` statement"
    line: int
    key: str  # ast.dump of the statement without its bodies, and which body holds the region

    def __eq__(self, other: object) -> bool:  # where it is may move; what it is may not
        return isinstance(other, _Header) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


_BODIES = ("body", "orelse", "finalbody", "handlers", "cases")


def _first_line(stmt: ast.stmt) -> int:
    lines = [stmt.lineno]
    lines += [d.lineno for d in getattr(stmt, "decorator_list", ())]
    return min(lines)


def _place(body: list[ast.stmt], span: tuple[int, int], lines: list[str]
           ) -> tuple[list[_Header], list[ast.stmt]] | str:
    """(the compound statements around the region, outermost first; the region's statements)
    or why the region is not whole statements ("{path}" left to fill in)."""
    a, b = span
    chain: list[_Header] = []
    while True:
        inside: list[ast.stmt] = []
        around: ast.stmt | None = None
        overlapping = 0
        for stmt in body:
            first, last = _first_line(stmt), stmt.end_lineno or stmt.lineno
            if last < a or first > b:
                continue
            overlapping += 1
            if a < first and last < b:
                inside.append(stmt)
            elif first < a <= last:  # its block (or string) holds the start marker
                around = stmt
            else:
                return (f"splits the protected region at lines {a}-{b} of {{path}}: the "
                        f"statement at line {first} runs across its end marker")
        if around is not None and overlapping > 1:
            return (f"splits the protected region at lines {a}-{b} of {{path}}: it begins "
                    f"inside the statement at line {_first_line(around)} and ends outside it")
        if around is None:
            break
        sub = _body_holding(around, a, b)
        if sub is None:
            return (f"puts the protected region at lines {a}-{b} of {{path}} inside "
                    f"{_kind(around)} at line {_first_line(around)}, where its lines are not "
                    "statements")
        name, index, body = sub
        chain.append(_Header(_kind(around), _first_line(around),
                             f"{_header_dump(around)}|{name}|{index}"))
    # Every line of code in the region belongs to one of its statements (not to an `else:`,
    # a condition, or a string that began before it).
    covered = {n for stmt in inside for n in range(_first_line(stmt), (stmt.end_lineno or 0) + 1)}
    for n in range(a + 1, b):
        text = lines[n - 1].strip() if n <= len(lines) else ""
        if text and not text.startswith("#") and n not in covered:
            return (f"puts line {n} of {{path}} inside the protected region at lines {a}-{b} "
                    "without it being a statement of its own")
    return chain, inside


def _body_holding(stmt: ast.stmt, a: int, b: int) -> tuple[str, int, list[ast.stmt]] | None:
    """Which statement list of a compound statement the lines a..b overlap."""
    for name in _BODIES:
        value = getattr(stmt, name, None)
        if not isinstance(value, list):
            continue
        parts = [(i, p.body) for i, p in enumerate(value)] if name in ("handlers", "cases") \
            else [(0, value)]
        for i, inner in parts:
            if inner and a <= _lines_of(inner)[1] and _lines_of(inner)[0] <= b:
                return name, i, inner
    return None


def _lines_of(body: list[ast.stmt]) -> tuple[int, int]:
    return _first_line(body[0]), body[-1].end_lineno or body[-1].lineno


def _kind(stmt: ast.stmt) -> str:
    names = {"FunctionDef": "def", "AsyncFunctionDef": "async def", "ClassDef": "class",
             "AsyncFor": "async for", "AsyncWith": "async with", "TryStar": "try"}
    name = type(stmt).__name__
    if name in ("Assign", "AnnAssign", "AugAssign"):
        return "an assignment"
    if name == "Expr":
        return "an expression (a string?)"
    if isinstance(stmt, (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.FunctionDef,
                         ast.AsyncFunctionDef, ast.ClassDef, ast.AsyncFor, ast.AsyncWith)
                  ) or name in ("Match", "TryStar"):
        return f"the `{names.get(name, name.lower())}` statement"
    return f"a `{name}` statement"


def _header_dump(stmt: ast.stmt) -> str:
    fields = {}
    for name, value in ast.iter_fields(stmt):
        if name in _BODIES:
            if name in ("handlers", "cases"):
                value = [ast.dump(_without_body(p)) for p in value]
            else:
                value = len(value) > 0
        elif isinstance(value, ast.AST):
            value = ast.dump(value)
        elif isinstance(value, list):
            value = [ast.dump(v) if isinstance(v, ast.AST) else v for v in value]
        fields[name] = value
    return f"{type(stmt).__name__}{fields}"


def _without_body(node: ast.AST) -> ast.AST:
    copy = type(node)(**{k: v for k, v in ast.iter_fields(node) if k != "body"})
    copy.body = []  # type: ignore[attr-defined]
    return copy


def _chains(tree: ast.Module, spans: list[tuple[int, int]],
            lines: list[str]) -> list[list[_Header] | None]:
    out: list[list[_Header] | None] = []
    for span in spans:
        placed = _place(tree.body, span, lines)
        out.append(None if isinstance(placed, str) else placed[0])
    return out


# --- what a region reads ---------------------------------------------------------------------


@dataclass
class _Reads:
    names: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> region span
    dotted: dict[str, tuple[int, int]] = field(default_factory=dict)  # "time.time" -> span
    called: dict[str, tuple[int, int]] = field(default_factory=dict)  # "evaluate_bpb" -> span

    @classmethod
    def of(cls, stmts: list[list[ast.stmt]], spans: list[tuple[int, int]]) -> _Reads:
        reads = cls()
        for body, span in zip(stmts, spans, strict=True):
            bound: set[str] = set()
            loads: list[str] = []
            for node in (n for stmt in body for n in ast.walk(stmt)):
                if isinstance(node, ast.Name):
                    if isinstance(node.ctx, ast.Load):
                        loads.append(node.id)
                    else:
                        bound.add(node.id)
                elif isinstance(node, ast.arg):
                    bound.add(node.arg)
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    bound.add(node.name)
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    bound.update(_imported_name(a) for a in node.names)
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                    d = _dotted(node)
                    if d:
                        reads.dotted.setdefault(d, span)
                if isinstance(node, ast.Call):
                    d = _dotted(node.func)
                    if d:
                        reads.called.setdefault(d, span)
            for name in loads:
                if name not in bound:
                    reads.names.setdefault(name, span)
                    reads.dotted.setdefault(name, span)
            if "print" in reads.names:  # print writes where sys.stdout points
                for d in ("sys.stdout", "sys.stderr", "sys.__stdout__", "builtins.print"):
                    reads.dotted.setdefault(d, reads.names["print"])
        return reads


def _imported_name(alias: ast.alias) -> str:
    return alias.asname or alias.name.split(".")[0]


def _dotted(node: ast.AST) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


# --- what binds names ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Binding:
    line: int
    name: str  # a module-level name, "*" for a star import, or a dotted attribute path
    how: str  # e.g. "assignment", "def", "from prepare import evaluate_bpb"


class _Scope:
    """Whether a name bound here is the module's: at module level, or declared `global`."""

    def __init__(self, kind: str, declared: frozenset[str] = frozenset(),
                 parent: _Scope | None = None):
        self.kind, self.declared, self.parent = kind, declared, parent

    def is_module(self, name: str) -> bool:
        if self.kind == "module":
            return True
        if self.kind == "comprehension":  # only `:=` binds there, in the enclosing scope
            return self.parent is not None and self.parent.is_module(name)
        return self.kind == "function" and name in self.declared


_LOCAL = _Scope("local")


def _bindings(tree: ast.Module) -> list[_Binding]:
    """Every binding of a module-level name and every attribute assignment, in any scope."""
    out: list[_Binding] = []
    stack: list[tuple[ast.AST, _Scope]] = [(tree, _Scope("module"))]
    while stack:
        node, scope = stack.pop()
        line = getattr(node, "lineno", 0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if scope.is_module(node.name):
                out.append(_Binding(line, node.name,
                                    "class" if isinstance(node, ast.ClassDef) else "def"))
            inner = (_Scope("class") if isinstance(node, ast.ClassDef)
                     else _Scope("function", _declared_global(node.body)))
            for field_name, value in ast.iter_fields(node):
                for child in value if isinstance(value, list) else [value]:
                    if isinstance(child, ast.AST):
                        stack.append((child, inner if field_name == "body" else scope))
            continue
        if isinstance(node, ast.Lambda):
            stack.append((node.args, scope))
            stack.append((node.body, _Scope("function")))
            continue
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            comp = _Scope("comprehension", parent=scope)
            for child in ast.iter_child_nodes(node):
                stack.append((child, comp))
            continue
        if isinstance(node, ast.comprehension):
            stack.append((node.target, _LOCAL))
            stack.extend((child, scope) for child in [node.iter, *node.ifs])
            continue
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            if scope.is_module(node.id):
                how = "deletion" if isinstance(node.ctx, ast.Del) else "assignment"
                out.append(_Binding(line, node.id, how))
        elif isinstance(node, ast.Attribute) and not isinstance(node.ctx, ast.Load):
            d = _dotted(node)
            if d:
                out.append(_Binding(line, d, "attribute assignment"))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if scope.is_module(_imported_name(a)):
                    as_ = f" as {a.asname}" if a.asname else ""
                    out.append(_Binding(line, _imported_name(a), f"import {a.name}{as_}"))
        elif isinstance(node, ast.ImportFrom):
            source = "." * node.level + (node.module or "")
            for a in node.names:
                if a.name == "*":
                    out.append(_Binding(line, "*", f"from {source} import *"))
                elif scope.is_module(_imported_name(a)):
                    out.append(_Binding(line, _imported_name(a), f"from {source} import {a.name}"))
        elif isinstance(node, ast.ExceptHandler) and node.name and scope.is_module(node.name):
            out.append(_Binding(line, node.name, "except ... as"))
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            if scope.is_module(node.name):
                out.append(_Binding(line, node.name, "match pattern"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("setattr", "delattr") and node.args:
            d = _dotted(node.args[0])
            if d:
                attr = node.args[1] if len(node.args) > 1 else None
                name = attr.value if isinstance(attr, ast.Constant) else None
                out.append(_Binding(line, f"{d}.{name}" if isinstance(name, str) else f"{d}.*",
                                    node.func.id))
        stack.extend((child, scope) for child in ast.iter_child_nodes(node))
    return out


def _declared_global(body: list[ast.stmt]) -> frozenset[str]:
    """Names a function declares `global` (not looking into functions nested in it)."""
    names: set[str] = set()
    stack: list[ast.AST] = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Global):
            names.update(node.names)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                   ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))
    return frozenset(names)


def _outside(line: int, spans: list[tuple[int, int]]) -> bool:
    return not any(a <= line <= b for a, b in spans)


Spans = list[tuple[int, int]]


def _rebinding(path: str, old: ast.Module | None, new: ast.Module,
               spans: tuple[Spans, Spans], reads: _Reads) -> str | None:
    """A binding, outside the regions, of a name a region reads, that the parent lacks."""
    had = {(b.name, b.how) for b in _bindings(old)} if old is not None else set()
    old_spans, new_spans = spans
    for b in sorted(_bindings(new), key=lambda b: b.line):
        if not _outside(b.line, new_spans) or (b.name, b.how) in had:
            continue
        span = _relevant(b, reads)
        if span is not None:
            a, z = span
            what = "binds every name" if b.name == "*" else f"rebinds `{b.name}`"
            return (f"{what} at line {b.line} of {path} ({b.how}), which the protected region "
                    f"at lines {a}-{z} reads; the parent did not bind it this way")
    return _back_doors(path, old, new, spans)


def _relevant(b: _Binding, reads: _Reads) -> tuple[int, int] | None:
    if b.name == "*":
        return next(iter(reads.names.values()), None)
    if "." not in b.name:
        return reads.names.get(b.name)
    for d, span in reads.dotted.items():  # time.time = ..., prepare.evaluate_bpb = ...
        if d == b.name or d.startswith(b.name + "."):
            return span
    for c, span in reads.called.items():  # evaluate_bpb.__code__ = ...
        if b.name.startswith(c + "."):
            return span
    return None


# --- back doors ------------------------------------------------------------------------------

_BUILTINS = frozenset({"builtins", "__builtins__", "__builtin__"})


def _builtins_patched(path: str, old: ast.Module | None, new: ast.Module) -> str | None:
    """Builtins reached in any editable Python file: every module shares them."""
    before = Counter(what for what, _ in _builtins_uses(old)) if old is not None else Counter()
    seen: Counter[str] = Counter()
    for what, line in sorted(_builtins_uses(new), key=lambda u: u[1]):
        seen[what] += 1
        if seen[what] > before[what]:
            return (f"monkeypatches builtins ({what} at line {line} of {path}): they are "
                    "shared by every module, protected regions included")
    return None


def _builtins_uses(tree: ast.Module) -> Iterator[tuple[str, int]]:
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in _BUILTINS:
                    yield f"`import {a.name}`", line
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _BUILTINS:
            yield f"`from {node.module} import ...`", line
        elif isinstance(node, ast.Name) and node.id in _BUILTINS:
            yield f"`{node.id}`", line
        elif isinstance(node, ast.Attribute) and node.attr in _BUILTINS:
            yield f"`.{node.attr}`", line
        elif isinstance(node, ast.Constant) and node.value in _BUILTINS:
            yield f"the string {node.value!r}", line


def _back_doors(path: str, old: ast.Module | None, new: ast.Module,
                spans: tuple[Spans, Spans]) -> str | None:
    """Ways to rebind names without naming them, counted outside the regions: one more than
    the parent had is rejected."""
    old_spans, new_spans = spans
    before = Counter(what for what, line in _door_uses(old) if _outside(line, old_spans)) \
        if old is not None else Counter()
    seen: Counter[str] = Counter()
    for what, line in sorted(_door_uses(new), key=lambda u: u[1]):
        if not _outside(line, new_spans):
            continue
        seen[what] += 1
        if seen[what] > before[what]:
            return (f"adds {what} at line {line} of {path}: it can rebind names the protected "
                    "regions read")
    return None


_DUNDERS = frozenset({"__code__", "__globals__", "__dict__", "__defaults__", "__kwdefaults__",
                      "__class__"})


def _door_uses(tree: ast.Module) -> Iterator[tuple[str, int]]:
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Name) and node.id in ("exec", "eval", "globals", "vars"):
            yield f"`{node.id}`", line
        elif isinstance(node, ast.Attribute):
            if node.attr == "modules" and _dotted(node.value) == "sys":
                yield "`sys.modules`", line
            elif node.attr in _DUNDERS:
                yield f"`.{node.attr}`", line
