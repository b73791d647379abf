"""What a tag holds to across runs of `overnight run`: the measurement pinned when its
baseline ran, and its branch at the last recorded keep. Drift in either is caught here."""

from __future__ import annotations

import json
from collections.abc import Callable

from overnight.errors import ConfigError, IntegrityHalt
from overnight.ledger import Ledger, keeps_in_order
from overnight.snapshot import Repo, branch_ref
from overnight.spec import Spec


def pin_spec(ledger: Ledger, tag: str, spec: Spec) -> None:
    """The baseline is getting its number: from now on this tag measures exactly this way.
    (A pin left by a start that died before its baseline was recorded is replaced.)"""
    now = spec_record(spec)
    if pinned_spec(ledger, tag) != now:
        ledger.event(tag, "spec", _canonical(now))


def pinned_spec(ledger: Ledger, tag: str) -> dict | None:
    pins = [e for e in ledger.events(tag) if e["kind"] == "spec"]
    return json.loads(pins[-1]["message"]) if pins else None


def check_spec(ledger: Ledger, tag: str, spec: Spec, accept: bool,
               note: Callable[[str], None]) -> None:
    """A resumed tag measures as its baseline did, or says why it may not (refused
    unless --accept-spec-change; either way the change is recorded). Only a tag whose
    baseline has a number is bound by its pin: the caller checks."""
    pinned = pinned_spec(ledger, tag)
    if pinned is None:
        return
    now = spec_record(spec)
    measured = _changes(pinned["measure"], now["measure"])
    if measured and not accept:
        raise ConfigError(
            f"overnight.toml no longer measures what tag '{tag}' measured when its "
            "baseline ran, so new results would not compare with the old ones:\n  "
            + "\n  ".join(measured) + "\nRevert the change, start a new --tag, or pass "
            "--accept-spec-change to go on anyway (the change is recorded).")
    for change in measured:
        ledger.event(tag, "spec_change", f"accepted: {change}")
        note(f"measurement changed (accepted): {change}")
    for change in _changes(pinned.get("settings", {}), now["settings"]):
        ledger.event(tag, "settings_change", change)
    if pinned != now:
        ledger.event(tag, "spec", _canonical(now))


def check_branch(repo: Repo, ledger: Ledger, tag: str, note: Callable[[str], None]) -> None:
    """The branch is at the last recorded keep. An earlier recorded keep is a crash
    between the ledger write and the ref update (repaired); any other commit was put
    there by someone else: the branch is reset and the loop halts."""
    rows = ledger.experiments(tag)
    keeps = [r.kept_commit for r in keeps_in_order(rows) if r.kept_commit]
    baselines = [r.kept_commit for r in rows if r.is_baseline and r.kept_commit]
    expected = (keeps or baselines or [None])[-1]
    if expected is None:
        return
    tip = repo.ref(branch_ref(tag))
    if tip == expected:
        return
    repo.set_ref(branch_ref(tag), expected)
    if tip is None or tip in keeps or tip in baselines:
        if tip is not None:
            note(f"branch overnight/{tag} moved back to the last "
                             "recorded keep")
        return
    ledger.event(tag, "branch_reset", f"{tip} -> {expected}")
    raise IntegrityHalt(
        f"branch overnight/{tag} was moved to {tip}, a commit the ledger never "
        f"recorded (no experiment of tag '{tag}' was kept as it). It was reset to "
        f"{expected}, the last recorded keep, and the loop stopped. Something outside the "
        "loop moved it (an experiment running without a sandbox can: [run] sandbox = "
        f'"bwrap"); `git show {tip[:12]}` shows what was put there.')


def spec_record(spec: Spec) -> dict[str, dict[str, object]]:
    """The keys that define the measurement (pinned per tag) and the rest (may change)."""
    run = spec.run
    objective = spec.objective.model_dump(mode="json")
    for key in ("constraints", "pattern"):
        if not objective[key]:
            del objective[key]  # a tag pinned before these keys existed still matches
    measure: dict[str, object] = {
        "objective": objective,
        "run.command": run.command,
        "run.budget_seconds": run.budget_seconds,
        "run.timeout_seconds": run.timeout_seconds,
        "run.env": dict(run.env),
        "run.metrics_file": run.metrics_file,
        "files": spec.files.model_dump(mode="json", exclude={"context"}),
        "evaluate": spec.evaluate.model_dump(mode="json") if spec.evaluate else None,
        "run.checks": run.checks,
        "run.sandbox": run.sandbox,
        "run.attest": run.attest,
    }
    if run.data:  # absent when empty: a tag pinned before the key existed still matches
        measure["run.data"] = list(run.data)
    dumped = spec.model_dump(mode="json")
    if dumped.get("data") is not None:
        measure["data"] = dumped["data"]
    settings: dict[str, object] = {}
    for section, values in dumped.items():
        if section in measure or section == "data":
            continue
        if isinstance(values, dict):
            for key, value in values.items():
                if f"{section}.{key}" not in measure:
                    settings[f"{section}.{key}"] = value
        else:
            settings[section] = values
    return {"measure": measure, "settings": settings}


def _changes(old: dict[str, object], new: dict[str, object]) -> list[str]:
    """'key: old -> new' for every key whose value differs."""
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
