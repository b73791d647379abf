"""Proposal admission: the one place that decides whether a proposal's edits may run.

Nothing is spent on a proposal that may not: the scheduler asks here before committing a
candidate, and the model proposers ask the same rules first, to send a reason back to the
model while it can still correct itself.

    problem(rules, base, edits, seen) -> str | None   # why not, or None

The rules, in order: scope (editable, not protected), a real change, not a duplicate,
protected regions intact, Python that parsed still parses, bounds of the knobs. Only Python
files hold knobs and regions-as-code: a `config.yaml` beside `train.py` is text to them.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from overnight import regions
from overnight.errors import OvernightError
from overnight.knobs import Scope, python_files, read_knobs
from overnight.proposers.base import fingerprint
from overnight.spec import Bound, Spec


@dataclass(frozen=True)
class Rules:
    editable: tuple[str, ...]
    protected: tuple[str, ...] = ()
    bounds: dict[str, Bound] = field(default_factory=dict)
    scope: Scope = Scope()

    @classmethod
    def of(cls, spec: Spec) -> Rules:
        return cls(tuple(spec.files.editable), tuple(spec.files.protected),
                   dict(spec.search.bounds), Scope.of(spec))


def problem(rules: Rules, base: Mapping[str, str], edits: Mapping[str, str],
            seen: Callable[[str], int | None] = lambda _fp: None) -> str | None:
    """Why `edits` of the files `base` must not run, or None. `seen(fingerprint)` is the id
    of an experiment that already tried exactly those files."""
    for path in edits:
        if path in rules.protected:
            return f"edits {path}, which is protected"
        if path not in rules.editable:
            return f"edits {path}, which is not in [files] editable"
    changed = {path: text for path, text in edits.items() if base.get(path) != text}
    if not changed:
        return "changes nothing"
    same = seen(fingerprint({**base, **edits}))
    if same is not None:
        return f"duplicate of experiment #{same}: the same files were already tried"
    for path, text in changed.items():
        why = regions.check_edit(path, base.get(path, ""), text)
        if why:
            return why
    for path, text in changed.items():
        why = _syntax(path, base.get(path, ""), text)
        if why:
            return why
    return _bounds(rules, base, edits)


def _syntax(path: str, old: str, new: str) -> str | None:
    """A Python file that parsed must still parse: a run that would crash at once is
    cheaper to refuse here."""
    if not path.endswith(".py"):
        return None
    try:
        ast.parse(new, filename=path)
    except SyntaxError as e:
        try:
            ast.parse(old, filename=path)
        except SyntaxError:
            return None  # it did not parse before either: not this edit's doing
        where = f" (line {e.lineno}: {e.msg})" if e.lineno else f" ({e.msg})"
        return f"leaves {path} not valid Python{where}"
    return None


def _bounds(rules: Rules, base: Mapping[str, str], edits: Mapping[str, str]) -> str | None:
    """A knob the edits moved must stay within its declared bounds (a pow2 knob on a power
    of two)."""
    if not rules.bounds:
        return None
    try:
        knobs = read_knobs(python_files({**base, **edits}), rules.scope)
        before = read_knobs(python_files(base), rules.scope)
    except OvernightError as e:
        return f"cannot read knobs: {e}"
    for name, b in rules.bounds.items():
        k = knobs.get(name)
        old = before.get(name)
        unchanged = k is not None and old is not None and k.value == old.value
        if k is None or unchanged:
            continue
        v = k.value
        if not b.low <= v <= b.high or (b.scale == "pow2" and (v < 1 or int(v) & (int(v) - 1))):
            return f"{name} = {v:g} is outside its bounds {b.shown()}"
    return None
