"""A model's answer as edits: parse SEARCH/REPLACE blocks or a unified diff, apply them.

The answer format (the system prompt in `prompt.py` asks for exactly this):

    Hypothesis: one sentence
    Description: a short summary

    train.py
    <<<<<<< SEARCH
    old lines
    =======
    new lines
    >>>>>>> REPLACE

or a unified diff (`--- a/train.py`, `+++ b/train.py`, `@@` hunks), usually in a ```diff
fence. Models get the details wrong in predictable ways (fences around everything, CRLF,
trailing spaces, a different indentation, wrong hunk line numbers, the path given once for
several blocks), so parsing and matching tolerate those. They never guess: a SEARCH text that
matches nowhere or in more than one place is an `EditError`, whose message is written to be
sent back to the model.
"""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from overnight.errors import OvernightError
from overnight.knobs import UPPER_ONLY, Scope, python_files, read_knobs
from overnight.proposers.base import Context, Experiment, fingerprint, normalize
from overnight.regions import check_edit

SEARCH_RE = re.compile(r"^\s*<{5,9}\s*SEARCH\s*$", re.IGNORECASE)
DIVIDER_RE = re.compile(r"^\s*={5,9}\s*$")
REPLACE_RE = re.compile(r"^\s*>{5,9}\s*REPLACE\s*$", re.IGNORECASE)
FENCE_RE = re.compile(r"^\s*(`{3,}|~{3,})\s*([^`\s]*)\s*$")
HUNK_RE = re.compile(r"^@@\s*-(\d+)(?:,(\d+))?\s+\+(\d+)(?:,(\d+))?\s*@@")
# "Hypothesis: ...", also "**Hypothesis:** ...", "- Hypothesis: ...", "## Hypothesis: ...".
FIELD_RE = re.compile(r"^[\s>#*_-]*(hypothesis|description)[*_]*\s*:[*_]*\s*(.*)$", re.IGNORECASE)
THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


class EditError(OvernightError):
    """An answer that cannot be used. The message is meant for the model: it says what is
    wrong and how to fix it."""


@dataclass(frozen=True)
class SearchReplace:
    path: str  # "" when the answer gave no path (resolved if there is one editable file)
    search: str
    replace: str
    line: int  # 1-based line of `<<<<<<< SEARCH` in the answer, for error messages


@dataclass(frozen=True)
class Hunk:
    old_start: int | None  # 1-based, from the header; only a hint, models get it wrong
    lines: tuple[str, ...]  # body lines, each starting with " ", "-" or "+"

    @property
    def old(self) -> list[str]:
        return [ln[1:] for ln in self.lines if ln[:1] in (" ", "-")]

    @property
    def new(self) -> list[str]:
        return [ln[1:] for ln in self.lines if ln[:1] in (" ", "+")]


@dataclass(frozen=True)
class FilePatch:
    path: str
    hunks: tuple[Hunk, ...]
    creates: bool = False  # `--- /dev/null`


@dataclass(frozen=True)
class Answer:
    hypothesis: str
    description: str
    blocks: tuple[SearchReplace, ...] = ()
    patches: tuple[FilePatch, ...] = ()

    @property
    def paths(self) -> list[str]:
        seen = [b.path for b in self.blocks] + [p.path for p in self.patches]
        return list(dict.fromkeys(seen))


# --- parsing --------------------------------------------------------------------------------


def parse_answer(text: str, known_paths: Collection[str] = ()) -> Answer:
    """The hypothesis, description and edits of an answer. `known_paths` (the editable and
    protected files) help recognize a path line such as `Makefile` that has no dot or slash."""
    lines = _lines(text)
    hypothesis, description = _field(lines, "hypothesis"), _field(lines, "description")
    blocks: list[SearchReplace] = []
    patches: list[FilePatch] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if SEARCH_RE.match(line):
            path = _path_before(lines, i, known_paths)
            if path is None:  # no path given: the same file as the block before
                path = blocks[-1].path if blocks else ""
            block, i = _parse_block(lines, i, path)
            blocks.append(block)
        elif line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            patch, i = _parse_patch(lines, i)
            patches.append(patch)
        elif REPLACE_RE.match(line):
            raise EditError(f"line {i + 1} of your answer has `>>>>>>> REPLACE` without a "
                            "`<<<<<<< SEARCH` before it")
        else:
            i += 1
    if not blocks and not patches:
        raise EditError(
            "your answer contains no edits: give SEARCH/REPLACE blocks (the file path on its "
            "own line, then `<<<<<<< SEARCH`, the exact current lines, `=======`, the new "
            "lines, `>>>>>>> REPLACE`) or a unified diff in a ```diff fence"
        )
    return Answer(hypothesis, description, tuple(blocks), tuple(patches))


def parse_fields(text: str, last: bool = False) -> tuple[str, str]:
    """(hypothesis, description) from `Hypothesis: ...` and `Description: ...` lines: the
    first ones, or the last ones (a coding agent prints its summary at the end)."""
    lines = _lines(text)
    return _field(lines, "hypothesis", last), _field(lines, "description", last)


def _lines(text: str) -> list[str]:
    # Reasoning models served locally may leave their <think> block in the answer.
    return THINK_RE.sub("", text.replace("\r\n", "\n").replace("\r", "\n")).split("\n")


def _field(lines: list[str], name: str, last: bool = False) -> str:
    """A `Name: value` line's value (it may also be on the next non-empty line)."""
    order = range(len(lines) - 1, -1, -1) if last else range(len(lines))
    for i in order:
        line = lines[i]
        m = FIELD_RE.match(line)
        if m and m.group(1).lower() == name:
            value = m.group(2).strip().strip("*_").strip()
            if not value:
                value = next((x.strip() for x in lines[i + 1:i + 3] if x.strip()), "")
                if FIELD_RE.match(value) or SEARCH_RE.match(value) or FENCE_RE.match(value):
                    value = ""
            return value
    return ""


def _parse_block(lines: list[str], start: int, path: str) -> tuple[SearchReplace, int]:
    """One SEARCH/REPLACE block starting at lines[start]; returns it and the next index."""
    search: list[str] = []
    replace: list[str] = []
    part = search
    i = start + 1
    while i < len(lines):
        line = lines[i]
        if DIVIDER_RE.match(line) and part is search:
            part = replace
        elif REPLACE_RE.match(line):
            if part is search:
                break  # REPLACE before the divider: reported below
            return SearchReplace(path, "\n".join(search), "\n".join(replace), start + 1), i + 1
        elif SEARCH_RE.match(line):
            break
        else:
            part.append(line)
        i += 1
    where = f" for {path}" if path else ""
    missing = "`=======`" if part is search else "`>>>>>>> REPLACE`"
    raise EditError(f"the SEARCH block{where} at line {start + 1} of your answer has no "
                    f"{missing}: each block is `<<<<<<< SEARCH`, the old lines, `=======`, "
                    "the new lines, `>>>>>>> REPLACE`")


def _path_before(lines: list[str], i: int, known: Collection[str]) -> str | None:
    """The path written right before a SEARCH marker, skipping blank and fence lines; None
    when the nearest text line is not a path (prose, or the end of the previous block)."""
    j = i - 1
    while j >= 0:
        line = lines[j].strip()
        fence = FENCE_RE.match(line)
        if not line:
            j -= 1
            continue
        if fence:
            # ```python:train.py or ```train.py carry the path in the info string.
            info = fence.group(2).split(":")[-1]
            path = _as_path(info, known)
            if path is not None:
                return path
            j -= 1
            continue
        return _as_path(line, known)
    return None


def _as_path(line: str, known: Collection[str]) -> str | None:
    """`train.py`, `` `train.py` ``, `**train.py**`, `File: train.py`, `# train.py:` -> the
    path; None if the line does not look like one."""
    s = line.strip().strip("#*`'\" ").strip()
    s = re.sub(r"^(file(name)?|path)\s*:\s*", "", s, flags=re.IGNORECASE)
    s = s.strip("*`'\" ").rstrip(":").strip("*`'\" ")
    s = s.removeprefix("./")
    if not s or any(c.isspace() for c in s) or any(c in s for c in "<>=|{}()[];,"):
        return None
    if s in known or "." in s or "/" in s:
        return s
    return None


def _parse_patch(lines: list[str], start: int) -> tuple[FilePatch, int]:
    """A unified diff for one file starting at its `---` line; returns it and the next index."""
    old = _diff_path(lines[start][4:])
    new = _diff_path(lines[start + 1][4:])
    if new == "/dev/null":
        raise EditError(f"your diff deletes {old}: deleting files is not allowed, edit them")
    hunks: list[Hunk] = []
    i = start + 2
    while i < len(lines) and lines[i].startswith("@@"):
        m = HUNK_RE.match(lines[i])
        hint = int(m.group(1)) if m else None
        body: list[str] = []
        i += 1
        while i < len(lines):
            line = lines[i]
            if line.startswith("@@") or FENCE_RE.match(line) or line.startswith("diff --git"):
                break
            if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
                break  # the next file's header
            if line == "":
                body.append(" ")  # a blank context line whose leading space was stripped
            elif line[0] in " +-":
                body.append(line)
            elif line[0] != "\\":  # "\ No newline at end of file" carries nothing we use
                break
            i += 1
        while body and body[-1] == " ":  # blank lines after a hunk are usually not context
            body.pop()
        if body:
            hunks.append(Hunk(hint, tuple(body)))
    if not hunks:
        raise EditError(f"your diff for {new} has no `@@` hunks: each hunk starts with "
                        "`@@ -start,count +start,count @@` followed by ` `, `-` and `+` lines")
    return FilePatch(new, tuple(hunks), creates=old == "/dev/null"), i


def _diff_path(raw: str) -> str:
    path = raw.split("\t")[0].strip().strip('"')
    if path != "/dev/null" and path[:2] in ("a/", "b/"):
        path = path[2:]
    return path.removeprefix("./")


# --- applying -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Match:
    start: int  # index of the first matched line
    end: int  # index after the last one
    indent: tuple[str, str] | None = None  # (answer's, file's) common indentation if they differ


def apply_answer(
    answer: Answer, files: Mapping[str, str], protected: Collection[str] = ()
) -> dict[str, str]:
    """{path: new text} of every file the answer edits; `files` are the editable files
    (path -> current text). Raises EditError for an edit outside them or one that does not
    apply. Files that end up unchanged are still returned (callers decide what "no change"
    means)."""
    out: dict[str, str] = {}
    for block in answer.blocks:
        path = resolve_path(block.path, files, protected)
        out[path] = _apply_block(path, out.get(path, files[path]), block)
    for patch in answer.patches:
        path = resolve_path(patch.path, files, protected)
        out[path] = _apply_patch(path, out.get(path, files[path]), patch)
    return out


def resolve_path(path: str, files: Mapping[str, str], protected: Collection[str] = ()) -> str:
    """The editable file `path` names; EditError if it names none, or a protected file."""
    editable = ", ".join(sorted(files)) or "none"
    if not path:
        if len(files) == 1:
            return next(iter(files))
        raise EditError("a SEARCH block has no file path: put the path on its own line right "
                        f"before `<<<<<<< SEARCH` (editable files: {editable})")
    if path in files:
        return path
    if path in protected:
        raise EditError(f"{path} is protected: it must not be changed. You may edit only: "
                        f"{editable}")
    # "src/train.py" for "train.py" or the reverse: accept when exactly one file fits.
    fits = [f for f in files if f.endswith("/" + path) or path.endswith("/" + f)]
    if len(fits) == 1:
        return fits[0]
    hidden = [f for f in protected if f.endswith("/" + path) or path.endswith("/" + f)]
    if hidden:
        raise EditError(f"{hidden[0]} is protected: it must not be changed. You may edit "
                        f"only: {editable}")
    raise EditError(f"{path} is not an editable file (creating or editing other files is not "
                    f"allowed). You may edit only: {editable}")


def _apply_block(path: str, text: str, block: SearchReplace) -> str:
    lines, crlf = _split(text)
    search = block.search.split("\n")
    replace = block.replace.split("\n") if block.replace else []
    if not block.search.strip():
        if not text.strip():  # an empty file: the block gives its content
            return _join(replace, crlf, trailing_newline=True)
        raise EditError(f"{path}: the SEARCH part of the block at line {block.line} of your "
                        "answer is empty: copy the exact lines to replace from the file")
    matches = _find(lines, search)
    if not matches:
        # Blank lines around the SEARCH text are a common slip; try without them.
        s0, s1 = _blank_edges(search)
        if (s0, s1) != (0, len(search)):
            r0, r1 = _blank_edges(replace)
            search, replace = search[s0:s1], replace[r0:r1]
            matches = _find(lines, search)
    count = len(matches)
    if not matches and "\n" not in block.search.strip():
        # A fragment of one line (`3e-4` in `LR = 3e-4  # peak`): the exact text, once.
        body = "\n".join(lines)
        fragment = block.search.strip()
        count = body.count(fragment)
        if count == 1:
            return _join(body.replace(fragment, block.replace.strip()).split("\n"), crlf)
    if count != 1:
        raise EditError(_not_unique(path, search, lines, count))
    m = matches[0]
    return _join(lines[:m.start] + _reindent(replace, m.indent) + lines[m.end:], crlf)


def _apply_patch(path: str, text: str, patch: FilePatch) -> str:
    if patch.creates and text.strip():
        raise EditError(f"your diff creates {path}, but it already exists: diff against its "
                        "current content instead (--- a/{path} +++ b/{path})")
    lines, crlf = _split(text)
    if not text:
        lines = []
    shift = 0  # how far earlier hunks moved the lines below them
    for n, hunk in enumerate(patch.hunks, start=1):
        old, new = hunk.old, hunk.new
        hint = None if hunk.old_start is None else max(hunk.old_start - 1 + shift, 0)
        if not old:  # a pure insertion: only the header says where
            if hint is None:
                raise EditError(f"{path}: hunk {n} of your diff adds lines without any "
                                "context lines: include a few unchanged lines around them")
            at = min(hint + (1 if hunk.old_start else 0), len(lines))
            lines[at:at] = new
            shift += len(new)
            continue
        matches = _find(lines, old)
        if not matches:
            raise EditError(_not_unique(path, old, lines, 0, what=f"hunk {n} of your diff"))
        if len(matches) > 1 and hint is None:
            raise EditError(_not_unique(path, old, lines, len(matches),
                                        what=f"hunk {n} of your diff"))
        # Several places: the one nearest the header's line number, as `patch` does.
        m = min(matches, key=lambda x: abs(x.start - (hint or 0)))
        lines[m.start:m.end] = _reindent(new, m.indent)
        shift += len(new) - len(old)
    return _join(lines, crlf, trailing_newline=text.endswith("\n") or not text)


def _find(lines: list[str], needle: list[str]) -> list[_Match]:
    """Where `needle` occurs as whole lines: exactly; else ignoring trailing whitespace; else
    with a uniform difference in indentation. The first level with any match decides."""
    m = len(needle)
    if m == 0 or m > len(lines):
        return []
    found = [_Match(i, i + m) for i in range(len(lines) - m + 1) if lines[i:i + m] == needle]
    if found:
        return found
    stripped = [x.rstrip() for x in needle]
    hay = [x.rstrip() for x in lines]
    found = [_Match(i, i + m) for i in range(len(hay) - m + 1) if hay[i:i + m] == stripped]
    if found:
        return found
    if not any(x.strip() for x in needle):
        return []
    ours = _common_indent(stripped)
    dedented = [x[len(ours):] if x.strip() else "" for x in stripped]
    for i in range(len(hay) - m + 1):
        window = hay[i:i + m]
        if any(bool(a.strip()) != bool(b) for a, b in zip(window, dedented, strict=True)):
            continue
        theirs = _common_indent(window)
        if all(a == theirs + b for a, b in zip(window, dedented, strict=True) if b):
            found.append(_Match(i, i + m, (ours, theirs)))
    return found


def _reindent(lines: list[str], indent: tuple[str, str] | None) -> list[str]:
    """Replacement lines shifted the way the matched text was (answer's indent -> file's)."""
    if indent is None:
        return list(lines)
    ours, theirs = indent
    out = []
    for line in lines:
        if not line.strip():
            out.append("")
        elif line.startswith(ours):
            out.append(theirs + line[len(ours):])
        else:
            out.append(theirs + line.lstrip())
    return out


def _common_indent(lines: list[str]) -> str:
    indents = [x[:len(x) - len(x.lstrip())] for x in lines if x.strip()]
    if not indents:
        return ""
    first = indents[0]
    n = min(len(x) for x in indents)
    while n and any(x[:n] != first[:n] for x in indents):
        n -= 1
    return first[:n]


def _blank_edges(lines: list[str]) -> tuple[int, int]:
    a, b = 0, len(lines)
    while a < b and not lines[a].strip():
        a += 1
    while b > a and not lines[b - 1].strip():
        b -= 1
    return a, b


def _not_unique(path: str, needle: list[str], lines: list[str], count: int,
                what: str = "the SEARCH text") -> str:
    first = next((x for x in needle if x.strip()), needle[0] if needle else "")
    quoted = f"`{first.strip()}`"
    if count > 1:
        return (f"{path}: {what} starting with {quoted} matches {count} places: include more "
                "of the surrounding lines so that it matches exactly one")
    msg = (f"{path}: {what} starting with {quoted} does not match the file: copy the lines "
           "exactly as they are in the current file (indentation, comments and all)")
    close = difflib.get_close_matches(first.strip(), [x.strip() for x in lines], n=1,
                                      cutoff=0.6)
    if close:
        line_no = next(i for i, x in enumerate(lines, 1) if x.strip() == close[0])
        msg += f"; the closest line in the file is line {line_no}: `{close[0]}`"
    return msg


def _split(text: str) -> tuple[list[str], bool]:
    crlf = "\r\n" in text
    return text.replace("\r\n", "\n").split("\n"), crlf


def _join(lines: list[str], crlf: bool, trailing_newline: bool = False) -> str:
    out = "\n".join(lines)
    if trailing_newline and out and not out.endswith("\n"):
        out += "\n"
    return out.replace("\n", "\r\n") if crlf else out


# --- checks and summaries -------------------------------------------------------------------


def check_regions(files: Mapping[str, str], edits: Mapping[str, str]) -> None:
    """EditError if an edit changes, moves or removes a protected region of its file."""
    for path, new in edits.items():
        problem = check_edit(path, files.get(path, ""), new)
        if problem and problem.startswith(("edits ", "adds a protected", f"{path}:")):
            raise EditError(
                f"your edit {problem}: the lines from `# overnight: protect` to "
                "`# overnight: end` must stay exactly as they are (markers included)"
            )
        if problem:  # a region hidden, or what it reads rebound: the message says which
            raise EditError(f"your edit {problem}")


def line_stats(old: str, new: str) -> tuple[int, int]:
    """(lines added, lines removed) from `old` to `new`."""
    added = removed = 0
    for op, a0, a1, b0, b1 in difflib.SequenceMatcher(
        None, old.splitlines(), new.splitlines(), autojunk=False
    ).get_opcodes():
        if op != "equal":
            removed += a1 - a0
            added += b1 - b0
    return added, removed


def describe_edits(files: Mapping[str, str], edits: Mapping[str, str]) -> str:
    """`train.py (+3 -1 lines)`: a fallback description when the proposer gave none."""
    parts = []
    for path in sorted(edits):
        added, removed = line_stats(files.get(path, ""), edits[path])
        parts.append(f"{path} (+{added} -{removed} lines)")
    return ", ".join(parts)


def check_syntax(files: Mapping[str, str], edits: Mapping[str, str]) -> None:
    """EditError if an edit leaves a Python file that no longer parses (and did before): a
    run that would crash at once is cheaper to catch here."""
    for path, new in edits.items():
        if not path.endswith(".py"):
            continue
        try:
            ast.parse(new, filename=path)
        except SyntaxError as e:
            try:
                ast.parse(files.get(path, ""), filename=path)
            except SyntaxError:
                continue  # it did not parse before either: not this edit's fault
            where = f"line {e.lineno}: " if e.lineno else ""
            shown = f" `{e.text.strip()}`" if e.text and e.text.strip() else ""
            raise EditError(f"after your edits {path} is not valid Python ({where}{e.msg}"
                            f"{shown})") from None


def find_duplicate(ctx: Context, edits: Mapping[str, str]) -> Experiment | None:
    """The experiment whose editable files equal the incumbent's with `edits` applied."""
    fp = fingerprint({**ctx.files, **edits})
    for e in [*ctx.history, *ctx.in_flight]:
        if e.fingerprint == fp:
            return e
    return None


def duplicate_message(ctx: Context, edits: Mapping[str, str]) -> str:
    same = find_duplicate(ctx, edits)
    if same is None:
        return ("your change is a duplicate: exactly these files were already proposed. "
                "Propose something different")
    result = f"{same.metric:.6g}" if same.metric is not None else "no metric"
    return (f"your change is a duplicate of experiment #{same.id} ({same.status}, {result}: "
            f"{same.description}): exactly these files were already tried. Propose something "
            "different")


def knob_values(files: Mapping[str, str], scope: Scope = UPPER_ONLY) -> dict[str, float | int]:
    """Knob values of the Python files, or {} when they cannot be read (a syntax error, a
    knob defined twice): knobs describe a proposal, they never block it."""
    try:
        knobs = read_knobs(python_files(files), scope)
    except (OvernightError, ValueError, RecursionError):
        return {}
    return {name: k.value for name, k in knobs.items()}


def real_changes(files: Mapping[str, str], edits: Mapping[str, str]) -> dict[str, str]:
    """The edits that change more than whitespace at line ends or the end of the file."""
    return {p: t for p, t in edits.items() if normalize(t) != normalize(files.get(p, ""))}
