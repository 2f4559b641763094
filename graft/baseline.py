"""The gate's baseline: metrics as committed at a git revision, read without letting the revision act as an option.

``graft gate --against REV`` compares the workspace's metrics with those committed at ``REV``. The
revision comes from a user or a CI variable, so it is checked before git runs (no leading ``-``, no
spaces or ``:``), resolved with ``git rev-parse --verify --end-of-options`` (after which nothing is an
option), and the file is then read at the resolved commit id. A revision or file that cannot be found
is *missing*: the gate fails on it unless the caller allows a first run.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from graft import GraftError
from graft.console import missing_hint
from graft.params import RetrainParams

_REVISION = re.compile(r"[A-Za-z0-9_@][A-Za-z0-9._/@{}~^+-]*")  # HEAD~1, main, origin/main, v1.2, a1b2c3, @{u}


class Missing(Exception):
    """Nothing to compare with: not a git repository, no such revision, or no such file at it."""


def check_revision(rev: str) -> str:
    """``rev`` if it is a plain revision name; a one-line GraftError otherwise (before any git call)."""
    if not _REVISION.fullmatch(rev) or ".." in rev:
        shown = rev if len(rev) <= 60 else rev[:60] + "..."
        raise GraftError(
            f"--against {shown!r} is not a plain git revision (a branch, tag, commit id or HEAD~N; "
            "no leading '-', spaces, ':' or '..')"
        )
    return rev


def _git(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise Missing("git is not installed") from None


def committed_text(rev: str, path: str) -> tuple[str, str]:
    """(the commit id ``rev`` names, the text of ``path`` in it), ``path`` relative to the repository root.

    Raises:
        GraftError: ``rev`` is not a plain revision name.
        Missing: not inside a git repository, ``rev`` names no commit, or ``path`` is not in it.
    """
    check_revision(rev)
    found = _git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
    if found.returncode != 0:
        why = found.stderr.strip().splitlines()[:1] or [f"no commit named {rev!r}"]
        raise Missing(why[0])
    commit = found.stdout.strip()
    if not re.fullmatch(r"[0-9a-f]{40,64}", commit):
        raise Missing(f"git rev-parse gave {commit[:80]!r}, not a commit id")
    shown = _git("show", f"{commit}:{path.removeprefix('./')}")  # starts with hex digits: never an option
    if shown.returncode != 0:
        raise Missing(f"no {path} at {rev} ({commit[:12]})")
    return commit, shown.stdout


def model_metrics(text: str, where: str) -> dict:
    """The ``model`` part of a metrics.json text (what the gate compares); a one-line GraftError if unusable."""
    try:
        model = json.loads(text)["model"]
        if not isinstance(model["macro_f1"], (int, float)) or not isinstance(model["per_class"], dict):
            raise TypeError("macro_f1 must be a number and per_class a mapping")
    except (ValueError, KeyError, TypeError) as exc:
        detail = f"no key {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0] if str(exc) else ""
        raise GraftError(f"{where} is not a graft metrics.json ({type(exc).__name__}: {detail})") from None
    return model


def gate_against(against: str, path: str, params_path: str, allow_missing: bool = False) -> int:
    """CI's promotion gate: the workspace's test metrics against those committed at ``--against``.

    Fails closed: a revision or file that cannot be found is an error unless ``--allow-missing``.
    """
    from graft.params import load_params

    check_revision(against)  # before any git call
    if not Path(path).is_file():
        raise GraftError(missing_hint(path, "evaluate"))
    current = model_metrics(Path(path).read_text(encoding="utf-8"), path)
    try:
        commit, text = committed_text(against, path)
    except Missing as why:
        if not allow_missing:
            raise GraftError(
                f"no baseline {path} at {against} ({why}): fix --against, or pass --allow-missing "
                "to let a first run pass"
            ) from None
        print(f"gate: PASS: no baseline {path} at {against} ({why}), allowed by --allow-missing")
        return 0
    baseline = model_metrics(text, f"{path} at {against} ({commit[:12]})")
    ok, reason = gate(current, baseline, load_params(params_path).retrain)
    print(f"gate: {'PASS' if ok else 'FAIL'}: {reason}")
    return 0 if ok else 1


def gate(challenger: dict, champion: dict, rp: RetrainParams) -> tuple[bool, str]:
    """Promote only if macro-F1 is not worse than the champion's minus a tolerance and no class's
    recall drops by more than a bound (classes with test support only)."""
    delta = challenger["macro_f1"] - champion["macro_f1"]
    if delta < -rp.max_macro_f1_drop:
        return (
            False,
            f"macro-F1 {challenger['macro_f1']:.4f} < champion {champion['macro_f1']:.4f} - {rp.max_macro_f1_drop:g}",
        )
    for c, stats in champion["per_class"].items():
        new = challenger["per_class"].get(c)
        if stats["support"] and new is not None and stats["recall"] - new["recall"] > rp.max_class_recall_drop:
            return False, (
                f"recall of class {c!r} drops {stats['recall']:.3f} -> {new['recall']:.3f} "
                f"(more than {rp.max_class_recall_drop:g})"
            )
    return True, f"macro-F1 {challenger['macro_f1']:.4f} vs champion {champion['macro_f1']:.4f} (delta {delta:+.4f})"


# --- history and report
