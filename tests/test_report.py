"""What a user reads about a noise-aware tag: results.tsv, the JSONL, progress lines,
`overnight status` and `overnight show`, from real ledgers written through the Ledger API."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from conftest import create_repo, rows, spec_toml, train_py
from rich.console import Console

from overnight.ledger import Ledger, Row, export_jsonl, export_tsv
from overnight.report import STATUS_STYLE, ConsoleReporter, show_view, status_view
from overnight.spec import Judge as JudgeSpec
from overnight.spec import Objective
from overnight.status import Status

TAG = "t"
OBJ = Objective(metric="val_bpb", direction="lower")
CONFIRM = JudgeSpec()  # the default: mode "confirm", 95% confidence


def _run(ledger: Ledger, status: str, **values: object) -> int:
    """A row as the loop writes it: queued first, then what became of it."""
    queued = {k: values.pop(k) for k in ("is_baseline", "repeat_of", "commit_sha", "parent",
                                         "description") if k in values}
    rid = ledger.insert(TAG, "queued", **queued)
    if status != "queued":
        ledger.update(rid, status=status, started_at=100.0 + rid, finished_at=103.0 + rid,
                      **values)
    return rid


@pytest.fixture
def story(tmp_path: Path) -> tuple[Ledger, dict[str, int]]:
    """A noise-aware tag: a baseline run three times, a keep decided on its confirm runs, a
    candidate confirming (its repeat queued), and each other way a candidate can end."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ids: dict[str, int] = {}
    ids["base"] = _run(ledger, "keep", is_baseline=1, commit_sha="b" * 40, metric=1.0,
                       description="baseline", kept_commit="b" * 40, peak_vram_mb=2048.0,
                       estimate=1.0, runs=1, reason="baseline")
    ids["base2"] = _run(ledger, "repeat", repeat_of=ids["base"], commit_sha="b" * 40,
                        metric=1.004, description=f"repeat of #{ids['base']}: baseline")
    ids["base3"] = _run(ledger, "repeat", repeat_of=ids["base"], commit_sha="b" * 40,
                        metric=0.999, description=f"repeat of #{ids['base']}: baseline")
    ledger.update(ids["base"], estimate=1.001, runs=3, spread=0.0012, noise=0.0021)
    ids["keep"] = _run(ledger, "confirm", commit_sha="c" * 40, parent="b" * 40, metric=0.985,
                       description="wider MLP", runs=1, noise=0.0021)
    ids["keep2"] = _run(ledger, "repeat", repeat_of=ids["keep"], commit_sha="c" * 40,
                        metric=0.9903, description=f"repeat of #{ids['keep']}: wider MLP")
    ids["keep3"] = _run(ledger, "repeat", repeat_of=ids["keep"], commit_sha="c" * 40,
                        metric=0.9921, description=f"repeat of #{ids['keep']}: wider MLP")
    ledger.update(ids["keep"], status="keep", estimate=0.9912, runs=3, spread=0.0011,
                  noise=0.0019, delta=0.9912 - 1.001, kept_commit="k" * 40,
                  reason="better than the incumbent 1.001 at 95% confidence (2 confirm runs)")
    ids["confirm"] = _run(ledger, "confirm", commit_sha="d" * 40, metric=0.9871, runs=1,
                          noise=0.0019, description="lr 0.04",
                          reason="looks better than the incumbent 0.9912: running it again")
    ids["pending"] = _run(ledger, "queued", repeat_of=ids["confirm"], commit_sha="d" * 40,
                          description=f"repeat of #{ids['confirm']}: lr 0.04")
    ids["constraint"] = _run(ledger, "discard", commit_sha="e" * 40, metric=0.97,
                             description="huge batch", noise=0.0019, runs=1,
                             reason="constraint peak_vram_mb <= 40960 broken: "
                                    "peak_vram_mb = 81920")
    ids["discard"] = _run(ledger, "discard", commit_sha="1" * 40, metric=0.995, runs=3,
                          estimate=0.9951, spread=0.0013, noise=0.0019,
                          description="no dropout")
    ids["timeout"] = _run(ledger, "timeout", commit_sha="2" * 40, description="deeper")
    ids["tampered"] = _run(ledger, "tampered", commit_sha="3" * 40, description="sneaky")
    ids["checks"] = _run(ledger, "checks_failed", commit_sha="4" * 40, description="fast",
                         reason="pytest failed")
    ids["crash"] = _run(ledger, "crash", commit_sha="5" * 40, description="bad import")
    ids["rejected"] = ledger.insert(TAG, "rejected", description="edits prepare.py",
                                    reason="prepare.py is protected")
    ids["lost"] = _run(ledger, "lost", commit_sha="6" * 40, description="interrupted")
    yield ledger, ids
    ledger.close()


def _text(renderable: object) -> str:
    console = Console(width=240, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


# -- results.tsv and the JSONL ---------------------------------------------------------------


def test_tsv_has_one_row_per_decided_candidate_in_karpathys_statuses(story):
    ledger, ids = story
    parsed = list(csv.reader(io.StringIO(export_tsv(ledger.experiments(TAG), "val_bpb")),
                             delimiter="\t"))
    assert parsed[0] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert [(c, m, s, d) for c, m, _, s, d in parsed[1:]] == [
        ("bbbbbbb", "1.001000", "keep", "baseline"),  # the estimate of its 3 runs
        ("kkkkkkk", "0.991200", "keep", "wider MLP"),  # kept commit; not its first draw
        ("eeeeeee", "0.970000", "discard", "huge batch"),  # a constraint broken
        ("1111111", "0.995100", "discard", "no dropout"),
        ("2222222", "0.000000", "crash", "deeper"),  # timeout
        ("3333333", "0.000000", "crash", "sneaky"),  # tampered
        ("4444444", "0.000000", "discard", "fast"),  # checks_failed
        ("5555555", "0.000000", "crash", "bad import"),
    ]  # no repeat, confirm, queued, rejected or lost row
    assert parsed[1][2] == "2.0"  # memory_gb


def test_jsonl_keeps_every_row_with_the_judges_fields(story):
    ledger, ids = story
    experiments = ledger.experiments(TAG)
    objs = [json.loads(line) for line in export_jsonl(experiments).splitlines()]
    assert [o["id"] for o in objs] == [r.id for r in experiments] == sorted(ids.values())
    by_id = {o["id"]: o for o in objs}
    keep = by_id[ids["keep"]]
    assert (keep["estimate"], keep["runs"], keep["spread"], keep["noise"]) == (
        0.9912, 3, 0.0011, 0.0019)
    assert keep["metric"] == 0.985 and keep["value"] == 0.9912 and keep["repeat_of"] is None
    repeat = by_id[ids["keep2"]]
    assert repeat["status"] == "repeat" and repeat["repeat_of"] == ids["keep"]
    assert repeat["metric"] == repeat["value"] == 0.9903 and repeat["estimate"] is None
    assert by_id[ids["pending"]]["status"] == "queued"
    assert by_id[ids["rejected"]]["reason"] == "prepare.py is protected"
    assert by_id[ids["timeout"]]["value"] is None
    assert by_id[ids["confirm"]]["value"] == 0.9871  # no estimate yet: its one run


# -- progress lines ---------------------------------------------------------------------------


def test_progress_lines_carry_estimate_confirm_and_repeat(story):
    ledger, ids = story
    console = Console(width=240, file=io.StringIO(), force_terminal=False)
    reporter = ConsoleReporter(console, ledger, OBJ, TAG, 20)
    best = ledger.get(ids["keep"])
    for name in ("keep", "confirm", "keep2", "constraint", "pending"):
        reporter.finished(ledger.get(ids[name]), best, 9)
    keep, confirm, repeat, constraint, failed = console.file.getvalue().splitlines()
    assert keep.startswith(f"#{ids['keep']:<4}keep     val_bpb 0.991200 ± 0.0011 "
                           "(3 runs, noise σ 0.0019) +0.98% vs baseline")
    assert "wider MLP" in keep and keep.endswith("3.0s  [9/20 runs, best 0.991200]")
    assert confirm.startswith(f"#{ids['confirm']:<4}confirm  val_bpb 0.987100 (1 run) "
                              "looks better: running again  lr 0.04")
    assert repeat.startswith(f"#{ids['keep2']:<4}repeat   repeat of #{ids['keep']}: "
                             "val_bpb 0.990300  3.0s")
    assert "wider MLP" not in repeat  # the line names its candidate instead
    assert "constraint peak_vram_mb <= 40960 broken" in constraint
    assert f"repeat of #{ids['confirm']}:" in failed  # a repeat without a measurement


def test_progress_line_of_a_greedy_keep_has_no_uncertainty(tmp_path: Path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    base = _run(ledger, "keep", is_baseline=1, metric=1.3, estimate=1.3, runs=1,
                description="baseline")
    kept = _run(ledger, "keep", metric=1.2, estimate=1.2, runs=1, delta=-0.1,
                description="LEARNING_RATE 0.001 -> 0.002")
    console = Console(width=240, file=io.StringIO(), force_terminal=False)
    reporter = ConsoleReporter(console, ledger, OBJ, TAG, None)
    reporter.finished(ledger.get(base), ledger.get(base), 1)
    reporter.finished(ledger.get(kept), ledger.get(kept), 2)
    lines = console.file.getvalue().splitlines()
    ledger.close()
    assert lines[0].startswith(f"#{base:<4}keep     val_bpb 1.300000  ")
    assert lines[1].startswith(f"#{kept:<4}keep     val_bpb 1.200000 +7.69% vs baseline")
    assert "±" not in "".join(lines) and "run" not in lines[1].split("[")[0]
    assert lines[1].endswith("[2 runs, best 1.200000]")


def test_every_status_has_a_style():
    assert {str(s) for s in Status} <= set(STATUS_STYLE)


# -- overnight status -------------------------------------------------------------------------


def test_status_counts_runs_candidates_and_repeats_and_reads_the_estimates(story):
    ledger, ids = story
    text = _text(status_view(ledger, TAG, OBJ, CONFIRM))
    assert "tag t: 13 runs: 9 candidates, 4 repeats" in text
    assert ("candidates  checks_failed 1, confirm 1, crash 1, discard 2, keep 2, tampered 1, "
            "timeout 1") in text
    assert "repeats     repeat 4" in text
    assert "not counted lost 1, rejected 1" in text
    assert (f"baseline    #{ids['base']}  val_bpb 1.001000 ± 0.0012 (3 runs, noise σ 0.0021)"
            in text)
    assert (f"best        #{ids['keep']}  val_bpb 0.991200 ± 0.0011 (3 runs, noise σ 0.0019)  "
            "(+0.98% vs baseline, 1 kept improvement)") in text
    assert "noise       one run of val_bpb varies by σ 0.0019" in text
    assert "± is one standard error of the estimate" in text
    assert "a keep beat its incumbent at 95% confidence" in text
    assert (f"#{ids['confirm']} val_bpb 0.987100 first, 1 run so far: lr 0.04") in text
    assert f"queued (waiting for a slot, not running):\n    #{ids['pending']} repeat of " \
           f"#{ids['confirm']}: lr 0.04" in text


def test_status_of_a_greedy_tag_says_so(tmp_path: Path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    _run(ledger, "keep", is_baseline=1, metric=1.3, estimate=1.3, runs=1, description="b")
    kept = _run(ledger, "keep", metric=1.2, estimate=1.2, runs=1, description="lr up",
                kept_commit="f" * 40)
    text = _text(status_view(ledger, TAG, OBJ, JudgeSpec(mode="greedy")))
    ledger.close()
    assert "tag t: 2 runs: 2 candidates, 0 repeats" in text
    assert f"best        #{kept}  val_bpb 1.200000  (+7.69% vs baseline" in text
    assert "±" not in text and "noise  " not in text
    assert "greedy judging: each keep beat its incumbent on one run" in text


def test_status_of_an_exact_objective_says_it_has_no_noise(tmp_path: Path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    base = _run(ledger, "keep", is_baseline=1, metric=1.3, description="b")
    for _ in range(2):
        _run(ledger, "repeat", repeat_of=base, metric=1.3, description="again")
    ledger.update(base, estimate=1.3, runs=3, spread=0.0, noise=0.0)
    text = _text(status_view(ledger, TAG, OBJ, CONFIRM))
    ledger.close()
    assert "val_bpb 1.300000 (3 runs, exact: its repeats measure the same)" in text
    assert "noise       none: repeats measure exactly the same" in text


# -- overnight show ---------------------------------------------------------------------------


def _repeats(ledger: Ledger, rid: int) -> list[Row]:
    return [r for r in ledger.experiments(TAG) if r.repeat_of == rid]


def test_show_of_a_kept_candidate_lists_its_runs_and_how_to_read_them(story):
    ledger, ids = story
    keep = ledger.get(ids["keep"])
    text = _text(show_view(keep, OBJ, "", repeats=_repeats(ledger, keep.id),
                           judge_spec=CONFIRM))
    assert ("val_bpb      0.991200 ± 0.0011 (3 runs, noise σ 0.0019)  (delta -0.009800)"
            in text)
    assert (f"runs         #{ids['keep']} 0.985000 (first, left out of the estimate), "
            f"#{ids['keep2']} 0.990300, #{ids['keep3']} 0.992100") in text
    assert "reading      ± is one standard error" in text
    assert "a keep beat its incumbent at 95% confidence" in text


def test_show_of_a_repeat_names_its_candidate(story):
    ledger, ids = story
    repeat = ledger.get(ids["keep2"])
    text = _text(show_view(repeat, OBJ, "", candidate=ledger.get(ids["keep"])))
    assert "status       repeat" in text
    assert f"repeat of    #{ids['keep']} (keep: wider MLP)" in text
    assert "val_bpb      0.990300\n" in text  # its own measurement, no ±


def test_show_of_a_confirm_and_of_the_baseline(story):
    ledger, ids = story
    confirm = ledger.get(ids["confirm"])
    text = _text(show_view(confirm, OBJ, "", repeats=_repeats(ledger, confirm.id)))
    assert "status       confirm" in text
    assert "val_bpb      0.987100\n" in text
    assert f"#{ids['confirm']} 0.987100 (first, left out of the estimate), #{ids['pending']} " \
           "queued" in text
    base = ledger.get(ids["base"])
    text = _text(show_view(base, OBJ, "", repeats=_repeats(ledger, base.id), judge_spec=CONFIRM))
    assert (f"runs         #{ids['base']} 1.000000 (first), #{ids['base2']} 1.004000, "
            f"#{ids['base3']} 0.999000") in text
    assert "reading      ± is one standard error" in text and "a keep beat" not in text


# -- end to end: a noisy script in the default (confirm) mode, through the CLI ------------------


NOISY = "import random\nloss += random.gauss(0, 0.01)\n"


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = create_repo(tmp_path_factory.mktemp("noisy") / "repo",
                       {"train.py": train_py(0.001, NOISY)}, spec_toml("grid", judge=""))
    from conftest import run_cli

    out = run_cli("run", "-t", TAG, "-n", "6", cwd=repo)
    assert out.returncode == 0, out.stderr
    return repo


def test_a_noisy_run_reads_through_the_cli(noisy, cli):
    rs = rows(noisy, TAG)
    base = rs[0]
    base_repeats = [r for r in rs if r["repeat_of"] == base["id"]]
    assert len(base_repeats) == 2 and base["runs"] == 3
    assert base["estimate"] == pytest.approx(
        (base["metric"] + sum(r["metric"] for r in base_repeats)) / 3)

    out = cli("status", cwd=noisy)
    assert out.returncode == 0, out.stderr
    ran = [r for r in rs if r["status"] not in ("rejected", "lost", "queued", "running")]
    repeats = [r for r in ran if r["repeat_of"] is not None]
    assert f"tag t: {len(ran)} runs: {len(ran) - len(repeats)} candidates, " \
           f"{len(repeats)} repeats" in out.stdout
    assert f"val_loss {base['estimate']:.6f} ± {base['spread']:.2g} (3 runs, noise σ " \
           f"{base['noise']:.2g})" in out.stdout
    assert "a keep beat its incumbent at 95% confidence" in out.stdout

    out = cli("show", str(base["id"]), cwd=noisy)
    assert out.returncode == 0, out.stderr
    runs = ", ".join(f"#{r['id']} {r['metric']:.6f}" for r in base_repeats)
    assert f"runs         #{base['id']} {base['metric']:.6f} (first), {runs}" in out.stdout
    out = cli("show", str(base_repeats[0]["id"]), cwd=noisy)
    assert f"repeat of    #{base['id']} (keep: " in out.stdout

    out = cli("export", "-t", TAG, cwd=noisy)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()[1:]
    decided = [r for r in rs if r["repeat_of"] is None
               and r["status"] not in ("rejected", "lost", "confirm", "queued", "running")]
    named = [(r["kept_commit"] if r["status"] == "keep" else r["commit_sha"])[:7]
             for r in decided]  # a keep by its commit on the branch
    assert [line.split("\t")[0] for line in lines] == named
    assert lines[0].split("\t")[1] == f"{base['estimate']:.6f}"


def test_a_complete_grid_wave_reports_its_main_effects(make_repo, cli) -> None:
    repo = make_repo({"train.py": train_py(0.001)}, spec_toml("grid"))
    out = cli("run", "-t", "w", "-n", "3", cwd=repo)
    assert out.returncode == 0, out.stderr
    line = ("wave #1 (2 of 2 measured), main effects on val_loss: LEARNING_RATE: "
            "0.0005 -> 1.35, 0.002 -> 1.2 (best 0.002)")
    assert line in out.stdout  # said as the wave completes...
    shown = cli("hypotheses", "-t", "w", cwd=repo)
    assert line in shown.stdout  # ...and kept in the hypothesis log


def test_progress_lines_stay_readable_past_experiment_1000() -> None:
    from overnight.report import _label

    assert _label(7) == "#7   " and _label(999) == "#999 "
    assert _label(1977) == "#1977  " and _label(99999) == "#99999 "
    assert len({len(_label(i)) for i in range(1000, 100000, 997)}) == 1  # aligned among them
