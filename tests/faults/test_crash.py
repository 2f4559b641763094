"""Fault rows 13 and 14: a stage that fails midway, and real `graft` processes killed with SIGKILL.

The killed runs are the real CLI in a subprocess (``python -m graft.cli`` through
tests/faults/slow_cli.py, which only delays each atomic ``os.replace``) so the kill lands at a known
moment: after some outputs were published and while another finished temp file waits beside its
final path. The reruns call the same CLI entry point (``graft.cli.main``) in the test process.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from graft.cache import load_feature_table
from graft.cli import main
from graft.model import load_model
from graft.tasks.featurize import featurize
from graft.tasks.finetune import finetune
from graft.tasks.ingest import ingest
from graft.tasks.train_head import train
from tests.faults.helpers import output_of, params_for, start_graft, tmp_files, wait_until, write_params
from tests.helpers import REPO, write_tree

pytestmark = pytest.mark.timeout(240)

SMALL_PARTS = {"featurize": {"batch_size": 4, "part_rows": 4}}  # many parts: a kill always lands between two


def _parts(ws: Path) -> list[Path]:
    return sorted((ws / "cache").glob("*/part-*.parquet"))


def _part_keys(ws: Path) -> list[str]:
    """Every key in every published cache part (duplicates kept)."""
    return [k for p in _parts(ws) for k in pq.read_table(p, columns=["sha256"]).column(0).to_pylist()]


def _kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _assert_same_features(a: str | Path, b: str | Path) -> None:
    fa, _ = load_feature_table(a)
    fb, _ = load_feature_table(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert np.array_equal(fa[k], fb[k]), k


def _twin_workspaces(tmp_path: Path, per_class: int) -> tuple[Path, Path]:
    """Two workspaces with the same images: one for the reference run, one to be interrupted."""
    ref, ws = tmp_path / "ref", tmp_path / "ws"
    for w in (ref, ws):
        write_tree(w / "raw", per_class=per_class)
    return ref, ws


def test_stage_failing_midway_exits_nonzero_leaves_no_partial_file_and_reruns_clean(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """featurize meets a file changed since ingest after some parts: exit 2, one line, no features.parquet;
    once the file is restored the rerun finishes and equals a clean run."""
    ref, ws = _twin_workspaces(tmp_path, per_class=12)
    for w in (ref, ws):
        ingest(params_for(w, SMALL_PARTS))
    featurize(params_for(ref, SMALL_PARTS))
    late = ws / "raw/dog/dog-011.png"  # the last file in manifest order: earlier parts are published first
    original = late.read_bytes()
    late.write_bytes(original[:-30] + b"\0" * 30)
    params_path = write_params(ws, params_for(ws, SMALL_PARTS))

    rc = main(["featurize", "--params", str(params_path)])

    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and "dog-011.png changed since ingest" in err[0]
    assert not (ws / "data/features.parquet").exists()
    assert tmp_files(ws) == []
    published = _part_keys(ws)
    assert 0 < len(published) < 24 and len(set(published)) == len(published)
    assert all(pq.read_table(p).num_rows == 4 for p in _parts(ws))  # whole parts only
    late.write_bytes(original)
    assert main(["featurize", "--params", str(params_path)]) == 0
    _assert_same_features(ws / "data/features.parquet", ref / "data/features.parquet")
    assert sorted(_part_keys(ws)) == sorted(set(_part_keys(ws)))


@pytest.mark.slow
def test_sigkill_during_featurize_then_rerun_matches_an_uninterrupted_run(tmp_path: Path, capsys) -> None:
    """Kill `graft featurize` while a cache part is being published: finished parts stay whole, the final
    path is untouched, and the rerun computes only the rest and equals an uninterrupted run."""
    ref, ws = _twin_workspaces(tmp_path, per_class=16)
    for w in (ref, ws):
        ingest(params_for(w, SMALL_PARTS))
    featurize(params_for(ref, SMALL_PARTS))
    params_path = write_params(ws, params_for(ws, SMALL_PARTS))

    proc = start_graft("featurize", "--params", str(params_path), cwd=ws, slow=0.8)
    wait_until(lambda: len(_parts(ws)) >= 2 and any(p.name.startswith(".part-") for p in tmp_files(ws / "cache")), proc)
    _kill(proc)

    published = _part_keys(ws)
    assert 8 <= len(published) < 32 and len(set(published)) == len(published)
    assert all(pq.read_table(p).num_rows == 4 for p in _parts(ws))
    assert not (ws / "data/features.parquet").exists()
    assert [p.name.startswith(".") for p in tmp_files(ws)] == [True]  # the interrupted write: a hidden temp file
    assert main(["featurize", "--json", "--params", str(params_path)]) == 0  # the rerun: same CLI entry, here
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])["featurize"]
    assert (summary["computed"], summary["from_cache"]) == (32 - len(published), len(published))
    _assert_same_features(ws / "data/features.parquet", ref / "data/features.parquet")
    keys = _part_keys(ws)
    assert len(keys) == len(set(keys)) == 32  # every key exactly once in the cache


FINETUNE = {
    "train": {
        "mode": "finetune",
        "finetune": {"epochs": 3, "strategy": "staged", "head_epochs": 1, "batch_size": 8, "checkpoint_seconds": 0},
    }
}


@pytest.mark.slow
def test_sigkill_during_finetune_then_rerun_resumes_to_identical_weights(tmp_path: Path, capsys) -> None:
    """Kill `graft train` (finetune) while it publishes the epoch-2 checkpoint: the epoch-1 checkpoint is whole,
    no model.pt appears, and the rerun resumes and ends with the weights of an uninterrupted run."""
    ref, ws = _twin_workspaces(tmp_path, per_class=8)
    for w in (ref, ws):
        ingest(params_for(w, FINETUNE))
    finetune(params_for(ref, FINETUNE))
    reference = load_model(ref / "models")
    params_path = write_params(ws, params_for(ws, FINETUNE))
    checkpoints = ws / "models/checkpoints"

    proc = start_graft("train", "--params", str(params_path), cwd=ws, slow=1.5)
    wait_until(lambda: (checkpoints / "last.pt").is_file() and bool(tmp_files(checkpoints)), proc, timeout=180)
    _kill(proc)

    assert torch.load(checkpoints / "last.pt", weights_only=True)["epoch"] == 1
    assert not (ws / "models/model.pt").exists()
    capsys.readouterr()  # drop the reference run's output
    assert main(["train", "--params", str(params_path)]) == 0
    out = capsys.readouterr().out
    assert "epoch 1:" not in out and "epoch 2:" in out  # resumed after epoch 1, not restarted
    resumed = load_model(ws / "models")
    assert resumed["history"] == reference["history"]
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    for k, v in reference["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    assert not (checkpoints / "last.pt").exists()


@pytest.mark.slow
def test_sigkill_during_head_training_keeps_the_previous_model(tmp_path: Path) -> None:
    """Kill `graft train` (head) while model.pt is being published: the old model.pt is byte-identical, and the
    rerun writes the same model as an uninterrupted run."""
    ws = tmp_path / "ws"
    write_tree(ws / "raw", per_class=12)
    params = params_for(ws, {"train": {"max_epochs": 40}})
    ingest(params)
    featurize(params)
    train(params_for(ws, {"train": {"max_epochs": 40, "lr": 0.05}}))  # an older, different model
    old = (ws / "models/model.pt").read_bytes()
    ref = tmp_path / "ref"
    shutil.copytree(ws, ref)
    train(params_for(ref, {"train": {"max_epochs": 40}}))
    reference = load_model(ref / "models")
    params_path = write_params(ws, params)

    proc = start_graft("train", "--params", str(params_path), cwd=ws, slow=2.0)
    wait_until(lambda: any(p.name.startswith(".model.pt.") for p in tmp_files(ws / "models")), proc)
    _kill(proc)

    assert (ws / "models/model.pt").read_bytes() == old, output_of(proc)
    assert main(["train", "--params", str(params_path)]) == 0
    fresh = load_model(ws / "models")
    for k, v in reference["state_dict"].items():
        assert torch.equal(v, fresh["state_dict"][k]), k
    assert fresh["history"] == reference["history"]


# --- every artifact write goes through graft.atomic -------------------------------------------------

SOURCES = ("graft", "tasks", "flows")  # the pipeline's code (bench/ writes benchmark notes, not artifacts)
_WRITE_ATTRS = {
    "to_csv",
    "to_parquet",
    "to_json",
    "to_pickle",
    "to_feather",
    "savefig",
    "write_text",
    "write_bytes",
    "write_table",
    "save",
    "savez",
    "savez_compressed",
    "quantize_static",
    "quant_pre_process",
    "ParquetWriter",
    "pwrite",
}
_SHUTIL_WRITES = {"copy", "copy2", "copyfile", "copytree", "move"}
_WRITE_NAMES = {"quantize_static", "quant_pre_process", "ParquetWriter", "copyfile", "copy2", "copytree"}
# Functions that write the path they are given; every call must then pass a path from atomic_path.
WRITES_ITS_ARGUMENT = {("graft/onnxexport.py", "export_onnx"), ("graft/quantize.py", "quantize_int8")}
# Writes that are atomic another way, with the reason.
ATOMIC_OTHERWISE = {
    ("graft/auto.py", "onnx_cost"): "exports into an in-memory buffer (io.BytesIO) to measure it: no file",
    ("graft/lock.py", "_record"): "the holder note in the lock file: rewritten in place under its flock",
    ("tasks/retrain.py", "promote"): "copies into a hidden staging folder published with one os.replace of the folder",
    ("graft/publish.py", "publish_together"): "fsyncs a set's temporary files, then publishes them by a journal",
}
ATOMIC_BLOCKS = ("atomic_path", "publish_together")  # `with` blocks whose writes go to temporary files


def _is_write(call: ast.Call) -> bool:
    f = call.func
    if isinstance(f, ast.Attribute):
        if f.attr in _SHUTIL_WRITES:
            return isinstance(f.value, ast.Name) and f.value.id == "shutil"
        if f.attr == "export" and ast.unparse(f.value).endswith("onnx"):
            return True
        if (
            f.attr in ("dump", "safe_dump")
            and isinstance(f.value, ast.Name)
            and f.value.id in ("json", "pickle", "yaml")
        ):
            return len(call.args) >= 2  # dump(obj, stream): writes a file; dumps/dump(obj) returns text
        if f.attr == "open" and isinstance(f.value, ast.Name) and f.value.id == "os":
            flags = ast.unparse(call.args[1]) if len(call.args) > 1 else ""
            return any(flag in flags for flag in ("O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND"))
        if f.attr == "open":  # Path.open(mode)
            mode = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "mode"), None)
            return (
                isinstance(mode, ast.Constant) and isinstance(mode.value, str) and bool(set(mode.value) & set("wax+"))
            )
        return f.attr in _WRITE_ATTRS
    if isinstance(f, ast.Name):
        if f.id == "open":
            mode = (
                call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
            )
            return (
                isinstance(mode, ast.Constant) and isinstance(mode.value, str) and bool(set(mode.value) & set("wax+"))
            )
        return f.id in _WRITE_NAMES
    return False


def _calls_named(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Call) and (
        getattr(node.func, "id", None) == name or getattr(node.func, "attr", None) == name
    )


def _in_atomic_block(chain: list[ast.AST]) -> bool:
    """Inside ``with atomic_path(...)`` (or ``publish_together``), or inside a lambda/def handed to ``write_with``."""
    for i, node in enumerate(chain):
        if isinstance(node, (ast.With, ast.AsyncWith)) and any(
            _calls_named(item.context_expr, name) for item in node.items for name in ATOMIC_BLOCKS
        ):
            return True
        if isinstance(node, ast.Lambda) and i and _calls_named(chain[i - 1], "write_with"):
            return True
        if isinstance(node, ast.FunctionDef) and i:
            scope = next((n for n in reversed(chain[:i]) if isinstance(n, (ast.FunctionDef, ast.Module))), None)
            if scope is not None and any(
                _calls_named(c, "write_with") and any(isinstance(a, ast.Name) and a.id == node.name for a in c.args)
                for c in ast.walk(scope)
            ):
                return True
    return False


def _walk_with_chain(tree: ast.AST):
    """Yield (node, ancestors from the root down)."""
    stack = [(tree, [])]
    while stack:
        node, chain = stack.pop()
        yield node, chain
        stack.extend((child, [*chain, node]) for child in ast.iter_child_nodes(node))


def _function_of(chain: list[ast.AST]) -> str | None:
    return next((n.name for n in reversed(chain) if isinstance(n, ast.FunctionDef)), None)


def _direct_writes(rel: str, source: str) -> list[str]:
    """Every write call in ``source`` that is not atomic, as ``file:line: code``."""
    bad = []
    for node, chain in _walk_with_chain(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        fn = _function_of(chain)
        if (
            _is_write(node)
            and not _in_atomic_block(chain)
            and (rel, fn) not in WRITES_ITS_ARGUMENT | set(ATOMIC_OTHERWISE)
        ):
            bad.append((node.lineno, node.col_offset, f"{rel}:{node.lineno}: {ast.unparse(node)[:80]}"))
        target = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
        if (
            any(target == name for _, name in WRITES_ITS_ARGUMENT)
            and not _in_atomic_block(chain)
            and (rel, fn) not in WRITES_ITS_ARGUMENT
        ):
            bad.append((node.lineno, node.col_offset, f"{rel}:{node.lineno}: {target}() outside atomic_path"))
    return [line for *_, line in sorted(bad)]


def test_every_artifact_write_goes_through_graft_atomic() -> None:
    """No file in graft/, tasks/ or flows/ writes a file except through graft.atomic (or a listed exception)."""
    files = sorted(
        p for d in SOURCES for p in (REPO / d).rglob("*.py") if p.name != "atomic.py" or p.parent.name != "graft"
    )
    assert len(files) > 10

    bad = [b for p in files for b in _direct_writes(p.relative_to(REPO).as_posix(), p.read_text(encoding="utf-8"))]

    assert bad == [], "writes that bypass graft.atomic:\n" + "\n".join(bad)


def test_the_write_audit_catches_direct_writes() -> None:
    """The audit itself: direct writes are flagged, the atomic forms are not."""
    flagged = _direct_writes(
        "x.py",
        """
import json, shutil, torch
def f(df, fig, tbl, p, obj):
    df.to_csv(p)
    fig.savefig(p)
    torch.save(obj, p)
    open(p, "w").write("x")
    Path(p).write_text("x")
    json.dump(obj, open(p, "a"))
    shutil.copy2(p, "b")
    torch.onnx.export(obj, (obj,), p)
    export_onnx(obj, p, 1, 2, {})
""",
    )
    clean = _direct_writes(
        "x.py",
        """
def g(df, fig, p, obj):
    with atomic_path(p) as tmp:
        torch.save(obj, tmp)
        export_onnx(obj, tmp, 1, 2, {})
    write_with(p, lambda tmp: fig.savefig(tmp))
    def write(tmp):
        df.to_parquet(tmp)
    write_with(p, write)
    open(p).read()
    open(p, "rb").read()
    json.dumps(obj)
""",
    )
    assert [line.split(": ", 1)[1][:14] for line in flagged] == [
        "df.to_csv(p)",
        "fig.savefig(p)",
        "torch.save(obj",
        "open(p, 'w')",
        "Path(p).write_",
        "json.dump(obj,",
        "open(p, 'a')",
        "shutil.copy2(p",
        "torch.onnx.exp",
        "export_onnx() ",
    ], flagged
    assert clean == []
