"""The judge's rule (judge.py) and the confirm flow through the real `overnight run`."""

from __future__ import annotations

import random
import signal
import subprocess

import pytest
from conftest import CLI, PYTHON, git, rows, wait_until

from overnight.errors import ConfigError
from overnight.judge import Evidence, Judge, Noise, Outcome, t_quantile
from overnight.spec import Judge as JudgeSpec
from overnight.spec import Objective, parse_spec
from overnight.status import Status

LOWER = Objective(metric="loss")
HIGHER = Objective(metric="acc", direction="higher")


def ok(value: float, **metrics: float) -> Outcome:
    return Outcome("ok", value, metrics={"loss": value, **metrics})


def noise_of(*groups: tuple[float, ...]) -> Noise:
    n = Noise()
    for i, g in enumerate(groups):
        n.set(i, g)
    return n


BASE = Evidence((1.00, 1.02, 0.98), selected=False)  # mean 1.0, sigma 0.02
NOISY = noise_of(BASE.values)


# -- the rule ------------------------------------------------------------------------------


def test_t_quantiles_match_the_tables():
    assert t_quantile(0.95, 1) == pytest.approx(6.314, abs=1e-3)
    assert t_quantile(0.95, 2) == pytest.approx(2.920, abs=1e-3)
    assert t_quantile(0.95, 5) == pytest.approx(2.015, rel=0.01)
    assert t_quantile(0.95, 30) == pytest.approx(1.697, rel=0.005)


def test_noise_is_pooled_over_groups_and_robust_to_a_wild_run():
    n = noise_of((1.0, 1.02, 0.98), (2.0, 2.02, 1.98))
    assert n.sigma == pytest.approx(0.02)
    assert n.df == 4
    # One run far off (a node that was busy) barely moves the pooled figure.
    wild = noise_of((1.0, 1.02, 0.98), (2.0, 2.02, 1.98), (3.0, 3.02, 4.5))
    assert wild.sigma < 0.05
    assert Noise().sigma is None and not Noise().exact
    assert noise_of((0.5, 0.5, 0.5)).exact
    assert not NOISY.exact


def test_a_first_run_that_looks_better_is_confirmed_not_kept():
    d = Judge(LOWER).first(ok(0.97), BASE, NOISY)
    assert d.status == Status.CONFIRM and d.metric == 0.97
    worse = Judge(LOWER).first(ok(1.01), BASE, NOISY)
    assert worse.status == Status.DISCARD
    assert "not better than the incumbent 1" in worse.reason


def test_direction_higher_mirrors_the_rule():
    inc = Evidence((0.80, 0.82, 0.78), selected=False)
    j = Judge(HIGHER)
    assert j.first(ok(0.85), inc, NOISY).status == Status.CONFIRM
    assert j.first(ok(0.75), inc, NOISY).status == Status.DISCARD
    kept = j.candidate(Evidence((0.85, 0.90, 0.91)), inc, noise_of(inc.values, (0.9, 0.91)))
    assert kept.status == Status.KEEP and kept.estimate == pytest.approx(0.905)
    assert kept.delta == pytest.approx(0.105)


def test_the_selecting_draw_does_not_count():
    """A lucky first draw (0.90) followed by two runs at the incumbent's level: discarded,
    though the mean of all three runs would look better."""
    j = Judge(LOWER)
    cand = Evidence((0.90, 1.00, 1.01))
    d = j.candidate(cand, BASE, noise_of(BASE.values, cand.values))
    assert d.status == Status.DISCARD
    assert d.estimate == pytest.approx(1.005) and d.runs == 3
    assert "95% confidence over 2 confirm runs" in d.reason


def test_a_clear_improvement_is_kept_on_one_confirm_run():
    j = Judge(LOWER)
    cand = Evidence((0.80, 0.79))
    d = j.candidate(cand, BASE, noise_of(BASE.values, cand.values))
    assert d.status == Status.KEEP
    assert d.estimate == 0.79 and d.runs == 2 and d.noise == pytest.approx(0.0173, abs=1e-3)
    assert d.spread == pytest.approx(d.noise)


def test_an_unclear_one_runs_again_until_max_runs():
    j = Judge(LOWER)
    cand = Evidence((0.95, 0.99))
    noise = noise_of(BASE.values, cand.values)
    assert j.candidate(cand, BASE, noise).status == Status.CONFIRM
    third = Evidence((0.95, 0.99, 1.01))
    d = j.candidate(third, BASE, noise_of(BASE.values, third.values))
    assert d.status == Status.DISCARD  # max_runs = 3 reached
    more = Judge(LOWER, JudgeSpec(max_runs=5)).candidate(third, BASE,
                                                         noise_of(BASE.values, third.values))
    assert more.status == Status.CONFIRM


def test_min_delta_is_part_of_the_test():
    cand = Evidence((0.80, 0.79))
    noise = noise_of(BASE.values, cand.values)
    assert Judge(LOWER).candidate(cand, BASE, noise).status == Status.KEEP
    strict = Objective(metric="loss", min_delta=0.3)
    assert Judge(strict).first(ok(0.85), BASE, NOISY).status == Status.DISCARD
    d = Judge(strict).candidate(cand, BASE, noise)
    assert d.status == Status.DISCARD and "min_delta 0.3" in d.reason


def test_an_exact_objective_is_judged_on_one_run():
    base = Evidence((1.0, 1.0, 1.0), selected=False)
    exact = noise_of(base.values)
    d = Judge(LOWER).first(ok(0.999), base, exact)
    assert d.status == Status.KEEP and "exact" in d.reason and d.spread == 0
    assert Judge(LOWER).first(ok(1.0), base, exact).status == Status.DISCARD


def test_greedy_keeps_on_one_run_like_before():
    j = Judge(LOWER, JudgeSpec(mode="greedy"))
    one = Evidence((1.0,), selected=False)
    assert j.first(ok(0.999), one, Noise()).status == Status.KEEP
    assert j.first(ok(1.0), one, Noise()).status == Status.DISCARD


def test_failures_are_decided_by_the_judge():
    j = Judge(LOWER)
    assert j.first(Outcome("timeout", reason="deadline"), BASE, NOISY).status == Status.TIMEOUT
    assert j.first(Outcome("crash", reason="exit 1"), BASE, NOISY).status == Status.CRASH
    assert j.first(Outcome("lost"), BASE, NOISY).status == Status.LOST
    assert j.first(Outcome("ok", 0.5, tampered="train.py changed"), BASE,
                   NOISY).status == Status.TAMPERED
    no_number = j.first(Outcome("ok", None, why_none="no loss in the output"), BASE, NOISY)
    assert no_number.status == Status.CRASH and "no loss" in no_number.reason
    assert j.checks(False, "tests failed").status == Status.CHECKS_FAILED
    assert j.checks(True, "") is None
    failed = j.candidate(Evidence((0.8,)), BASE, NOISY, failed="#7 crash: exit 1")
    assert failed.status == Status.DISCARD and "confirm run failed" in failed.reason


def test_constraints_discard_with_the_reason():
    limited = Objective(metric="loss", constraints={"peak_vram_mb": "<= 40960"})
    j = Judge(limited)
    d = j.first(ok(0.5, peak_vram_mb=50000), BASE, NOISY)
    assert d.status == Status.DISCARD
    assert d.reason == "constraint peak_vram_mb <= 40960 broken: peak_vram_mb = 50000"
    assert j.first(ok(0.5, peak_vram_mb=40960), BASE, NOISY).status == Status.CONFIRM
    missing = j.first(ok(0.5), BASE, NOISY)
    assert missing.status == Status.DISCARD and "recorded no peak_vram_mb" in missing.reason
    assert j.repeat(ok(0.5, peak_vram_mb=50000)).reason.startswith("constraint")


def test_constraints_must_parse():
    with pytest.raises(ConfigError, match=r"\[objective\] constraints.*<= 40960"):
        parse_spec({"objective": {"metric": "loss", "constraints": {"vram": "at most 4"}},
                    "run": {"command": "true"}, "files": {"editable": ["a.py"]}})


def test_prefer_simpler_keeps_an_equal_candidate_with_fewer_lines():
    j = Judge(LOWER, JudgeSpec(prefer_simpler=True))
    assert j.first(ok(1.01), BASE, NOISY, simpler=True).status == Status.CONFIRM
    assert j.first(ok(1.01), BASE, NOISY, simpler=False).status == Status.DISCARD
    cand = Evidence((1.01, 1.00, 1.005))
    noise = noise_of(BASE.values, cand.values)
    d = j.candidate(cand, BASE, noise, simpler=True)
    assert d.status == Status.KEEP and "simpler" in d.reason
    assert j.candidate(cand, BASE, noise, simpler=False).status == Status.DISCARD
    clearly_worse = Evidence((1.01, 1.2, 1.21))
    assert j.candidate(clearly_worse, BASE, noise_of(BASE.values, clearly_worse.values),
                       simpler=True).status == Status.DISCARD


def test_false_keeps_stay_rare_on_pure_noise():
    """Candidates that are exactly as good as the incumbent: the rule keeps about 5% of
    the ones it is asked about at most; one-run greedy judging keeps half."""
    rng = random.Random(3)
    j, greedy = Judge(LOWER), Judge(LOWER, JudgeSpec(mode="greedy"))
    base = Evidence(tuple(rng.gauss(1, 0.02) for _ in range(3)), selected=False)
    kept = greedy_kept = 0
    for i in range(400):
        noise = Noise()
        noise.set(-1, base.values)
        values = [rng.gauss(1, 0.02)]
        greedy_kept += greedy.first(ok(values[0]), Evidence(base.values[:1], False),
                                    Noise()).status == Status.KEEP
        d = j.first(ok(values[0]), base, noise)
        while d.status == Status.CONFIRM:
            values.append(rng.gauss(1, 0.02))
            noise.set(i, tuple(values))
            d = j.candidate(Evidence(tuple(values)), base, noise)
        kept += d.status == Status.KEEP
    assert kept / 400 < 0.05
    assert greedy_kept / 400 > 0.35


# -- the confirm flow, end to end ------------------------------------------------------------

# val_loss = the true value of LR (a bowl around 0.004) plus noise; NOISE_SD comes in through
# [run] env. The noise is fresh in every run (the OS's randomness, never a seed we control).
NOISY_TRAIN = """\
import os
import random

LEARNING_RATE = {lr}

true = 1.0 + 100 * abs(LEARNING_RATE - 0.004)
noise = random.Random(os.urandom(16)).gauss(0, float(os.environ.get("NOISE_SD", "0")))
print(f"val_loss: {{true + noise:.6f}}")
"""


def noisy_spec(sd: float, extra: str = "", n_grid: str = "grid") -> str:
    return f"""\
[objective]
metric = "val_loss"

[run]
command = "{PYTHON} train.py"
budget_seconds = 20
timeout_seconds = 30
sandbox = "none"
env = {{ NOISE_SD = "{sd}" }}

[files]
editable = ["train.py"]

[search]
strategy = "{n_grid}"
seed = 3
bounds = {{ LEARNING_RATE = [0.0005, 0.016] }}

{extra}
"""


def test_confirm_flow_end_to_end_on_a_noisy_script(make_repo, cli):
    """Baseline repeats first, then every keep rests on confirm runs recorded as rows of
    their own; the kept commit's message and the JSONL say how sure it is."""
    repo = make_repo({"train.py": NOISY_TRAIN.format(lr=0.001)},
                     noisy_spec(0.01, n_grid="perturb"))
    out = cli("run", "-t", "n", "-n", "14", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    rs = rows(repo, "n")
    counted = [r for r in rs if r["status"] not in ("rejected", "lost", "queued", "running")]
    assert len(counted) == 14  # -n counts runs, repeats included
    base = rs[0]
    assert base["is_baseline"] and base["status"] == "keep"
    repeats_of_base = [r for r in rs if r["repeat_of"] == base["id"]]
    assert [r["status"] for r in repeats_of_base] == ["repeat", "repeat"]
    assert base["runs"] == 3 and base["noise"] > 0
    assert base["estimate"] == pytest.approx(
        (base["metric"] + sum(r["metric"] for r in repeats_of_base)) / 3)
    keeps = [r for r in rs if r["status"] == "keep" and not r["is_baseline"]]
    assert keeps, out.stdout
    for k in keeps:
        confirm_runs = [r for r in rs if r["repeat_of"] == k["id"]]
        assert confirm_runs and all(r["commit_sha"] == k["commit_sha"] for r in confirm_runs)
        assert k["runs"] == 1 + len(confirm_runs)
        assert k["estimate"] == pytest.approx(
            sum(r["metric"] for r in confirm_runs) / len(confirm_runs))
        assert k["spread"] > 0 and k["noise"] > 0
        message = git(repo, "log", "-1", "--format=%B", k["kept_commit"])
        assert f"over {k['runs']} runs" in message
    # A discard after confirmation says so; every row is linked to a commit that ran.
    assert all(r["commit_sha"] for r in rs if r["status"] == "repeat")
    assert git(repo, "rev-parse", "overnight/n") == keeps[-1]["kept_commit"]


def test_an_exact_objective_costs_only_the_baseline_repeats(make_repo, cli):
    repo = make_repo({"train.py": NOISY_TRAIN.format(lr=0.001)}, noisy_spec(0))
    out = cli("run", "-t", "x", "-n", "8", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stderr
    rs = rows(repo, "x")
    assert [r["repeat_of"] is not None for r in rs].count(True) == 2  # the baseline's
    assert "deterministic" in out.stdout
    keeps = [r["knobs"] for r in rs if r["status"] == "keep" and not r["is_baseline"]]
    assert keeps[:2] == ['{"LEARNING_RATE": 0.002}', '{"LEARNING_RATE": 0.004}']


def test_greedy_mode_runs_each_candidate_once(make_repo, cli):
    repo = make_repo({"train.py": NOISY_TRAIN.format(lr=0.001)},
                     noisy_spec(0.01, '[judge]\nmode = "greedy"'))
    out = cli("run", "-t", "g", "-n", "6", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stderr
    rs = rows(repo, "g")
    assert not [r for r in rs if r["repeat_of"] is not None]
    assert {r["status"] for r in rs} <= {"keep", "discard"}


def test_a_constraint_discards_a_candidate_with_the_reason(make_repo, cli):
    train = NOISY_TRAIN.format(lr=0.001) + 'print(f"width: {LEARNING_RATE * 1000:.1f}")\n'
    spec = noisy_spec(0, extra="").replace(
        'metric = "val_loss"', 'metric = "val_loss"\nconstraints = { width = "< 3" }')
    repo = make_repo({"train.py": train}, spec)
    out = cli("run", "-t", "c", "-n", "8", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stderr
    rs = rows(repo, "c")
    broken = [r for r in rs if r["knobs"] == '{"LEARNING_RATE": 0.004}']
    assert broken and broken[0]["status"] == "discard"
    assert broken[0]["reason"] == "constraint width < 3 broken: width = 4"
    kept = [r["knobs"] for r in rs if r["status"] == "keep"]
    assert '{"LEARNING_RATE": 0.002}' in kept


def test_resume_in_the_middle_of_a_confirmation(make_repo, cli_env, tmp_path):
    """Stopped while a candidate's confirm run runs: the candidate stays `confirm`, its
    repeat is lost; the resumed loop runs it again and decides the candidate once."""
    train = NOISY_TRAIN.format(lr=0.001) + (
        "import pathlib, time\n"
        "hold = os.environ.get('HOLD')\n"
        "if hold and LEARNING_RATE != 0.001:\n"
        "    seen = pathlib.Path(hold, f'seen-{LEARNING_RATE}')\n"
        "    if seen.exists():  # the second run of this commit: a confirm run\n"
        "        pathlib.Path(hold, 'confirming').touch()\n"
        "        time.sleep(60)\n"
        "    seen.touch()\n")
    spec = noisy_spec(0.001).replace('sandbox = "none"',
                                     'sandbox = "none"\nallow_env = ["HOLD"]')
    repo = make_repo({"train.py": train}, spec)
    hold = tmp_path / "hold"
    hold.mkdir()
    proc = subprocess.Popen([*CLI, "run", "-t", "r", "-n", "10"], cwd=repo,
                            env={**cli_env, "HOLD": str(hold)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_until(lambda: (hold / "confirming").exists(), 60, "a confirm run to start")
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {r["id"]: r for r in rows(repo, "r")}
    cand = next(r for r in before.values() if r["status"] == "confirm")
    assert cand["knobs"] == '{"LEARNING_RATE": 0.002}'
    assert [r["status"] for r in before.values() if r["repeat_of"] == cand["id"]] == ["lost"]

    out = subprocess.run([*CLI, "run", "-t", "r", "-n", "10"], cwd=repo,
                         env={**cli_env, "HOLD": ""}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    after = {r["id"]: r for r in rows(repo, "r")}
    decided = after[cand["id"]]
    assert decided["status"] == "keep" and decided["runs"] == 2
    assert [r["status"] for r in after.values() if r["repeat_of"] == cand["id"]] == [
        "lost", "repeat"]
    assert len([r for r in after.values() if r["repeat_of"] == after[1]["id"]]) == 2
    assert not [r for r in after.values() if r["status"] == "confirm"
                and r["id"] <= max(before)]
    assert git(repo, "rev-parse", "overnight/r") == [
        r for r in after.values() if r["status"] == "keep"][-1]["kept_commit"]


def test_resume_decides_a_candidate_left_in_confirm(make_repo, cli):
    """The run budget ran out right after a candidate turned `confirm`: it waits so, and
    the next run queues its confirm run and decides it."""
    repo = make_repo({"train.py": NOISY_TRAIN.format(lr=0.001)}, noisy_spec(0.001))
    out = cli("run", "-t", "m", "-n", "5", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stderr
    # baseline, its 2 repeats, 0.0005 (worse: discarded), 0.002 (better: confirm)
    cand = next(r for r in rows(repo, "m") if r["status"] == "confirm")
    assert cand["knobs"] == '{"LEARNING_RATE": 0.002}'
    out = cli("run", "-t", "m", "-n", "6", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stderr
    rs = rows(repo, "m")
    decided = next(r for r in rs if r["id"] == cand["id"])
    assert decided["status"] == "keep", (decided["reason"], out.stdout)
    assert [r["status"] for r in rs if r["repeat_of"] == cand["id"]] == ["lost", "repeat"]


def test_checks_gate_a_keep_decided_on_confirm_runs(make_repo, cli):
    """A candidate decided on its repeats goes through [run] checks like any keep: the
    checks run on a fresh copy of its commit, and failing them means checks_failed."""
    spec = noisy_spec(0.001).replace(
        'env = {', 'checks = "test $(grep -c 0.002 train.py) = 0"\nenv = {')
    repo = make_repo({"train.py": NOISY_TRAIN.format(lr=0.001)}, spec)
    out = cli("run", "-t", "k", "-n", "8", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stderr
    rs = {r["knobs"]: r for r in rows(repo, "k") if r["repeat_of"] is None}
    gated = rs['{"LEARNING_RATE": 0.002}']
    assert gated["status"] == "checks_failed", gated["reason"]
    assert [r["status"] for r in rows(repo, "k") if r["repeat_of"] == gated["id"]] == [
        "repeat"]
    assert gated["kept_commit"] is None


def test_a_first_run_better_only_within_the_noise_says_so():
    d = Judge(LOWER).first(ok(0.995), BASE, NOISY)
    assert d.status == Status.DISCARD
    assert d.reason.startswith("better than the incumbent 1 by 0.005, within the noise: a "
                               "confirm run needs 0.0231")
