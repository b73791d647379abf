"""Parsing and applying model answers: SEARCH/REPLACE blocks and unified diffs."""

from __future__ import annotations

import pytest

from overnight.proposers.base import Context, Experiment, fingerprint
from overnight.proposers.edits import (
    EditError,
    apply_answer,
    check_regions,
    check_syntax,
    describe_edits,
    duplicate_message,
    knob_values,
    parse_answer,
    parse_fields,
    real_changes,
)

TRAIN = """\
import time

LEARNING_RATE = 3e-4  # peak learning rate
BATCH_SIZE = 32


def step(model, batch):
    loss = model(batch)
    loss.backward()
    return loss


def evaluate(model, batch):
    loss = model(batch)
    return loss


# overnight: protect
TIME_BUDGET = 300
# overnight: end
"""

MODEL = """\
class Net:
    def forward(self, x):
        return x
"""

FILES = {"train.py": TRAIN, "model.py": MODEL}


def apply(answer: str, files: dict[str, str] | None = None,
          protected: tuple[str, ...] = ("prepare.py",)) -> dict[str, str]:
    files = FILES if files is None else files
    return apply_answer(parse_answer(answer, {*files, *protected}), files, protected)


# --- SEARCH/REPLACE --------------------------------------------------------------------------


def test_basic_block_with_hypothesis_and_description() -> None:
    answer = """\
Hypothesis: a higher learning rate learns faster in a short budget.
Description: raise LEARNING_RATE to 1e-3

train.py
<<<<<<< SEARCH
LEARNING_RATE = 3e-4  # peak learning rate
=======
LEARNING_RATE = 1e-3  # peak learning rate
>>>>>>> REPLACE
"""
    parsed = parse_answer(answer)
    assert parsed.hypothesis == "a higher learning rate learns faster in a short budget."
    assert parsed.description == "raise LEARNING_RATE to 1e-3"
    out = apply(answer)
    assert out == {"train.py": TRAIN.replace("3e-4", "1e-3")}


def test_crlf_fences_backticked_path_and_markdown_fields() -> None:
    answer = (
        "**Hypothesis:** bigger batches\r\n"
        "**Description:** batch 64\r\n\r\n"
        "`train.py`\r\n"
        "```python\r\n"
        "<<<<<<< SEARCH\r\n"
        "BATCH_SIZE = 32\r\n"
        "=======\r\n"
        "BATCH_SIZE = 64\r\n"
        ">>>>>>> REPLACE\r\n"
        "```\r\n"
    )
    parsed = parse_answer(answer)
    assert (parsed.hypothesis, parsed.description) == ("bigger batches", "batch 64")
    assert apply(answer)["train.py"] == TRAIN.replace("BATCH_SIZE = 32", "BATCH_SIZE = 64")


def test_path_inside_the_fence_info_and_marker_lengths() -> None:
    answer = """\
```python:train.py
<<<<<<<<< SEARCH
BATCH_SIZE = 32
=========
BATCH_SIZE = 16
>>>>>>>>> REPLACE
```
"""
    assert apply(answer)["train.py"] == TRAIN.replace("= 32", "= 16")


def test_several_blocks_several_files_path_given_once() -> None:
    answer = """\
Hypothesis: two changes
Description: d

train.py
```
<<<<<<< SEARCH
LEARNING_RATE = 3e-4  # peak learning rate
=======
LEARNING_RATE = 2e-4  # peak learning rate
>>>>>>> REPLACE
```

And the batch size:

```
<<<<<<< SEARCH
BATCH_SIZE = 32
=======
BATCH_SIZE = 8
>>>>>>> REPLACE
```

model.py
<<<<<<< SEARCH
        return x
=======
        return x * 2
>>>>>>> REPLACE
"""
    out = apply(answer)
    assert out["train.py"] == TRAIN.replace("3e-4", "2e-4").replace("= 32", "= 8")
    assert out["model.py"] == MODEL.replace("return x", "return x * 2")


def test_no_path_with_one_editable_file() -> None:
    answer = "<<<<<<< SEARCH\nBATCH_SIZE = 32\n=======\nBATCH_SIZE = 4\n>>>>>>> REPLACE\n"
    out = apply(answer, files={"train.py": TRAIN})
    assert out["train.py"] == TRAIN.replace("= 32", "= 4")
    with pytest.raises(EditError, match="no file path"):
        apply(answer)


def test_whitespace_tolerant_trailing_spaces_and_indentation() -> None:
    # Trailing spaces the file does not have, and the block dedented by 4 spaces.
    answer = """\
train.py
<<<<<<< SEARCH
loss = model(batch)   
loss.backward()
=======
loss = model(batch)
loss = loss * 0.5
loss.backward()
>>>>>>> REPLACE
"""  # noqa: W291 - the trailing spaces are the point
    out = apply(answer)["train.py"]
    assert "    loss = model(batch)\n    loss = loss * 0.5\n    loss.backward()\n" in out
    assert out.count("loss * 0.5") == 1


def test_fragment_of_a_line() -> None:
    answer = "train.py\n<<<<<<< SEARCH\n3e-4\n=======\n5e-4\n>>>>>>> REPLACE\n"
    assert "LEARNING_RATE = 5e-4  # peak" in apply(answer)["train.py"]


def test_ambiguous_search_names_file_and_first_line() -> None:
    answer = """\
train.py
<<<<<<< SEARCH
    loss = model(batch)
=======
    loss = model(batch) * 2
>>>>>>> REPLACE
"""
    with pytest.raises(EditError) as e:
        apply(answer)
    assert "train.py" in str(e.value)
    assert "`loss = model(batch)`" in str(e.value)
    assert "2 places" in str(e.value)


def test_missing_search_names_file_first_line_and_closest() -> None:
    answer = """\
train.py
<<<<<<< SEARCH
LEARNING_RATE = 3e-3  # peak learning rate
=======
LEARNING_RATE = 1e-3
>>>>>>> REPLACE
"""
    with pytest.raises(EditError) as e:
        apply(answer)
    msg = str(e.value)
    assert msg.startswith("train.py: ")
    assert "`LEARNING_RATE = 3e-3  # peak learning rate`" in msg
    assert "does not match" in msg
    assert "line 3" in msg  # the closest line


def test_blank_lines_around_search_are_tolerated() -> None:
    answer = "train.py\n<<<<<<< SEARCH\n\nBATCH_SIZE = 32\n\n=======\nBATCH_SIZE = 2\n" \
             ">>>>>>> REPLACE\n"
    assert "BATCH_SIZE = 2\n" in apply(answer)["train.py"]


def test_delete_lines_with_empty_replace() -> None:
    answer = "train.py\n<<<<<<< SEARCH\nimport time\n\n=======\n>>>>>>> REPLACE\n"
    out = apply(answer)["train.py"]
    assert out.startswith("LEARNING_RATE")


def test_crlf_file_keeps_its_line_endings() -> None:
    files = {"train.py": TRAIN.replace("\n", "\r\n")}
    answer = "train.py\n<<<<<<< SEARCH\nBATCH_SIZE = 32\n=======\nBATCH_SIZE = 1\n" \
             ">>>>>>> REPLACE\n"
    out = apply(answer, files)["train.py"]
    assert out == TRAIN.replace("= 32", "= 1").replace("\n", "\r\n")


def test_malformed_blocks() -> None:
    with pytest.raises(EditError, match="no edits"):
        parse_answer("Hypothesis: x\nDescription: y\nI would raise the learning rate.")
    with pytest.raises(EditError, match="no `=======`"):
        parse_answer("train.py\n<<<<<<< SEARCH\nBATCH_SIZE = 32\n>>>>>>> REPLACE\n")
    with pytest.raises(EditError, match="no `>>>>>>> REPLACE`"):
        parse_answer("train.py\n<<<<<<< SEARCH\nBATCH_SIZE = 32\n=======\nBATCH_SIZE = 1\n")


def test_scope_protected_and_unknown_files() -> None:
    block = "{}\n<<<<<<< SEARCH\nx\n=======\ny\n>>>>>>> REPLACE\n"
    with pytest.raises(EditError, match="prepare.py is protected"):
        apply(block.format("prepare.py"))
    with pytest.raises(EditError, match="other.py is not an editable file.*model.py, train.py"):
        apply(block.format("other.py"))
    # A path with a directory the file does not have still names the one editable file.
    out = apply("src/train.py\n<<<<<<< SEARCH\nBATCH_SIZE = 32\n=======\nBATCH_SIZE = 3\n"
                ">>>>>>> REPLACE\n")
    assert "BATCH_SIZE = 3\n" in out["train.py"]


def test_think_blocks_are_ignored() -> None:
    answer = ("<think>maybe edit prepare.py\n<<<<<<< SEARCH\n</think>\nHypothesis: h\n"
              "train.py\n<<<<<<< SEARCH\nBATCH_SIZE = 32\n=======\nBATCH_SIZE = 5\n"
              ">>>>>>> REPLACE\n")
    assert "BATCH_SIZE = 5\n" in apply(answer)["train.py"]


# --- unified diffs ---------------------------------------------------------------------------


def test_unified_diff_in_a_fence() -> None:
    answer = """\
Hypothesis: scale the loss
Description: halve the loss

```diff
--- a/train.py
+++ b/train.py
@@ -8,4 +8,5 @@ def step(model, batch):
 def step(model, batch):
     loss = model(batch)
+    loss = loss * 0.5
     loss.backward()
     return loss
```
"""
    parsed = parse_answer(answer)
    assert parsed.hypothesis == "scale the loss"
    out = apply(answer)["train.py"]
    assert "    loss = model(batch)\n    loss = loss * 0.5\n    loss.backward()\n" in out


def test_diff_with_wrong_line_numbers_and_several_hunks_and_files() -> None:
    answer = """\
```diff
diff --git a/train.py b/train.py
--- a/train.py
+++ b/train.py
@@ -40,2 +40,2 @@
-LEARNING_RATE = 3e-4  # peak learning rate
+LEARNING_RATE = 6e-4  # peak learning rate
 BATCH_SIZE = 32
@@ -1,3 +1,3 @@
 def evaluate(model, batch):
-    loss = model(batch)
+    loss = model(batch).mean()
     return loss
--- a/model.py
+++ b/model.py
@@ -1,3 +1,3 @@
 class Net:
     def forward(self, x):
-        return x
+        return -x
```
"""
    out = apply(answer)
    assert "LEARNING_RATE = 6e-4" in out["train.py"]
    # The hunk's context names evaluate(): only its line changes, not step()'s.
    assert out["train.py"].count("model(batch).mean()") == 1
    assert "def evaluate(model, batch):\n    loss = model(batch).mean()" in out["train.py"]
    assert out["model.py"] == MODEL.replace("return x", "return -x")


def test_diff_ambiguous_context_uses_the_header_line() -> None:
    answer = """\
--- a/train.py
+++ b/train.py
@@ -14,1 +14,1 @@
-    loss = model(batch)
+    loss = model(batch) + 1
"""
    out = apply(answer)["train.py"]
    assert "def evaluate(model, batch):\n    loss = model(batch) + 1" in out
    assert "def step(model, batch):\n    loss = model(batch)\n" in out


def test_diff_blank_context_lines_without_the_space() -> None:
    answer = "```diff\n--- a/train.py\n+++ b/train.py\n@@ -1,4 +1,4 @@\n import time\n\n" \
             "-LEARNING_RATE = 3e-4  # peak learning rate\n+LEARNING_RATE = 1e-4  # lower\n```\n"
    assert "LEARNING_RATE = 1e-4  # lower\n" in apply(answer)["train.py"]


def test_diff_that_does_not_apply() -> None:
    answer = "--- a/train.py\n+++ b/train.py\n@@ -3 +3 @@\n-LEARNING_RATE = 9\n+LEARNING_RATE = 1\n"
    with pytest.raises(EditError, match="train.py: hunk 1 of your diff starting with "
                                        "`LEARNING_RATE = 9` does not match"):
        apply(answer)


def test_diff_on_protected_file_and_deletion() -> None:
    answer = "--- a/prepare.py\n+++ b/prepare.py\n@@ -1 +1 @@\n-a\n+b\n"
    with pytest.raises(EditError, match="prepare.py is protected"):
        apply(answer)
    with pytest.raises(EditError, match="deleting files is not allowed"):
        parse_answer("--- a/train.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-import time\n")


# --- checks and helpers ----------------------------------------------------------------------


def test_protected_region_edit_is_an_error() -> None:
    answer = "train.py\n<<<<<<< SEARCH\nTIME_BUDGET = 300\n=======\nTIME_BUDGET = 900\n" \
             ">>>>>>> REPLACE\n"
    edits = apply(answer)
    with pytest.raises(EditError, match="protected region of train.py at lines 18-20"):
        check_regions(FILES, edits)
    check_regions(FILES, {"train.py": TRAIN.replace("= 32", "= 1")})  # outside: fine


def test_syntax_check() -> None:
    with pytest.raises(EditError, match="train.py is not valid Python"):
        check_syntax(FILES, {"train.py": TRAIN + "def broken(:\n"})
    check_syntax({"a.py": "def (:"}, {"a.py": "def (: still"})  # was broken before: not ours


def test_real_changes_ignore_trailing_whitespace() -> None:
    edits = {"train.py": TRAIN + "\n\n", "model.py": MODEL.replace("x\n", "x  \n")}
    assert real_changes(FILES, edits) == {}
    changed = {"train.py": TRAIN.replace("= 32", "= 2")}
    assert real_changes(FILES, changed) == changed


def test_parse_fields_last_occurrence_and_knobs_and_describe() -> None:
    out = "Hypothesis: first\nwork...\nHypothesis: final one\nDescription: done\n"
    assert parse_fields(out, last=True) == ("final one", "done")
    assert parse_fields(out) == ("first", "done")
    new = TRAIN.replace("BATCH_SIZE = 32", "BATCH_SIZE = 64\nEXTRA = 1")
    assert knob_values({"train.py": new}) == {"LEARNING_RATE": 3e-4, "BATCH_SIZE": 64,
                                              "EXTRA": 1}
    assert knob_values({"train.py": "def (:"}) == {}
    assert describe_edits(FILES, {"train.py": new}) == "train.py (+2 -1 lines)"


def test_duplicate_message_names_the_experiment() -> None:
    edits = {"train.py": TRAIN.replace("= 32", "= 2")}
    done = Experiment(4, "c4", "c0", "discard", 1.5, "batch 2", {},
                      fingerprint=fingerprint({**FILES, **edits}))
    base = Experiment(0, "c0", None, "keep", 1.0, "baseline", {}, True)
    ctx = Context(base, dict(FILES), [base, done], [], "lower", 1,
                  tried=frozenset({done.fingerprint}))
    assert ctx.is_duplicate(edits)
    assert "duplicate of experiment #4 (discard, 1.5: batch 2)" in duplicate_message(ctx, edits)


def test_more_indented_answer_is_reindented() -> None:
    answer = """\
model.py
<<<<<<< SEARCH
            def forward(self, x):
                return x
=======
            def forward(self, x):
                y = x + 1
                return y
>>>>>>> REPLACE
"""
    assert apply(answer)["model.py"] == """\
class Net:
    def forward(self, x):
        y = x + 1
        return y
"""


def test_diff_pure_insertion_uses_the_header() -> None:
    answer = "--- a/train.py\n+++ b/train.py\n@@ -1,0 +2,1 @@\n+import math\n"
    assert apply(answer)["train.py"].startswith("import time\nimport math\n\nLEARNING_RATE")
