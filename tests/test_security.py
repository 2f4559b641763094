"""Security: no unsafe deserialisation or eval in the code, manifest paths stay inside the data root,
and ONNX metadata strings survive any label (quotes, newlines, backslashes, non-ASCII) as JSON."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import onnx
import pandas as pd

from graft.predict import OnnxClassifier
from graft.tasks.export import export
from graft.tasks.featurize import featurize
from graft.tasks.ingest import ingest
from graft.tasks.train_head import train
from tests.helpers import REPO, class_image, make_params, run_stages

SCANNED = ("graft", "tasks", "flows", "bench")
_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _const(node: ast.AST | None) -> object:
    return node.value if isinstance(node, ast.Constant) else None


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Every unsafe load, eval or exec in ``source``, as ``file:line: code``.

    Flagged: any import of a pickle-like module; ``pickle.load(s)`` and friends; ``torch.load``
    without a literal ``weights_only=True``; ``yaml.load`` without a safe loader, ``yaml.unsafe_load``
    and ``yaml.full_load``; ``np.load(..., allow_pickle=True)``; ``pd.read_pickle``; ``eval``/``exec``.
    """
    bad = []
    for node in ast.walk(ast.parse(source, filename)):
        hit = False
        if isinstance(node, ast.Import):
            hit = any(a.name.split(".")[0] in _PICKLE_MODULES for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            hit = (node.module or "").split(".")[0] in _PICKLE_MODULES
        elif isinstance(node, ast.Call):
            f = node.func
            base = ast.unparse(f.value) if isinstance(f, ast.Attribute) else ""
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if (
                name in ("eval", "exec")
                and isinstance(f, ast.Name)
                or base.split(".")[0] in _PICKLE_MODULES
                and name in ("load", "loads", "open", "Unpickler")
            ):
                hit = True
            elif name == "load" and base == "torch":
                hit = _const(_keyword(node, "weights_only")) is not True
            elif base == "yaml" and name in ("unsafe_load", "full_load", "load_all", "unsafe_load_all"):
                hit = True
            elif base == "yaml" and name == "load":
                loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                hit = loader is None or "Safe" not in ast.unparse(loader)
            elif name == "load" and base in ("np", "numpy"):
                hit = _const(_keyword(node, "allow_pickle")) is not False and _keyword(node, "allow_pickle") is not None
            elif name == "read_pickle":
                hit = True
        if hit:
            bad.append(f"{filename}:{node.lineno}: {ast.unparse(node)[:100]}")
    return bad


def test_no_unsafe_loads_eval_or_exec_in_the_code() -> None:
    """graft/, tasks/, flows/ and bench/ hold no pickle loads, no unsafe torch/yaml/numpy loads, no eval/exec."""
    files = sorted(p for d in SCANNED if (REPO / d).is_dir() for p in (REPO / d).rglob("*.py"))
    assert len(files) > 10

    bad = [b for p in files for b in unsafe_calls(p.read_text(encoding="utf-8"), p.relative_to(REPO).as_posix())]

    assert bad == [], "unsafe calls:\n" + "\n".join(bad)


def test_every_torch_load_in_the_code_says_weights_only_true() -> None:
    """Positive check beside the scan: the code does call torch.load, and each call passes weights_only=True."""
    calls = []
    for p in sorted(p for d in SCANNED if (REPO / d).is_dir() for p in (REPO / d).rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls.append((p.name, _const(_keyword(node, "weights_only"))))
    assert len(calls) >= 3
    assert all(v is True for _, v in calls), calls


def test_the_scan_catches_each_unsafe_pattern() -> None:
    """The scanner flags every unsafe form and none of the safe ones."""
    unsafe = """
import pickle
from joblib import load
pickle.loads(b"")
torch.load(p)
torch.load(p, weights_only=False)
torch.load(p, map_location="cpu", weights_only=flag)
yaml.load(text)
yaml.load(text, Loader=yaml.Loader)
yaml.unsafe_load(text)
yaml.full_load(text)
np.load(p, allow_pickle=True)
pd.read_pickle(p)
eval("1 + 1")
exec("x = 1")
"""
    safe = """
torch.load(p, map_location="cpu", weights_only=True)
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
yaml.load(text, yaml.CSafeLoader)
np.load(p)
np.load(p, allow_pickle=False)
model.eval()
json.loads(text)
"""
    assert len(unsafe_calls(unsafe)) == len([ln for ln in unsafe.splitlines() if ln.strip()])
    assert unsafe_calls(safe) == []


# --- manifest paths may not escape the data root ---------------------------------------------------


def test_manifest_paths_escaping_the_data_root_are_refused(tmp_path: Path) -> None:
    """../, absolute and symlinked paths that resolve outside data.root are quarantined; the files are never used."""
    root = tmp_path / "raw"
    (root / "pool").mkdir(parents=True)
    rows = []
    for ci, c in enumerate(("cat", "dog")):
        for i in range(8):
            class_image(ci, i).save(root / f"pool/{c}-{i}.png")
            rows.append({"path": f"pool/{c}-{i}.png", "label": c})
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    class_image(0, 99).save(secret)  # a valid image: only the path check can stop it
    os.symlink(secret, root / "pool/link.png")
    evil = [
        {"path": "../outside/secret.png", "label": "cat"},
        {"path": str(secret), "label": "dog"},
        {"path": "pool/link.png", "label": "cat"},
        {"path": "pool/../../outside/secret.png", "label": "dog"},
    ]
    pd.DataFrame(rows + evil).to_csv(tmp_path / "labels.csv", index=False)
    params = make_params(
        tmp_path, {"data": {"manifest": str(tmp_path / "labels.csv")}, "ingest": {"max_bad_fraction": 0.5}}
    )

    ingest(params)

    q = pd.read_csv(tmp_path / "data/quarantine.csv", dtype=str, keep_default_na=False)
    m = pd.read_parquet(tmp_path / "data/manifest.parquet")
    assert dict(zip(q["path"], q["reason"], strict=True)) == {r["path"]: "path escapes the data root" for r in evil}
    assert len(m) == 16 and all(not p.startswith("..") and not os.path.isabs(p) for p in m["path"])


# --- ONNX metadata ------------------------------------------------------------------------------------

LABELS = ['say "hi"', "two\nlines", "back\\slash", "ünïcödé 🐦", '{"not": "json"}', "</script><b>"]


def test_onnx_metadata_strings_are_escaped_json(tmp_path: Path) -> None:
    """Labels with quotes, a newline, a backslash, non-ASCII and JSON/HTML look-alikes come back exactly."""
    root = tmp_path / "raw"
    (root / "pool").mkdir(parents=True)
    rows = []
    for ci, label in enumerate(LABELS):
        for i in range(6):
            class_image(ci, i).save(root / f"pool/{ci}-{i}.png")
            rows.append({"path": f"pool/{ci}-{i}.png", "label": label, "split": "test" if i == 5 else "train"})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    params = make_params(
        tmp_path,
        {"data": {"manifest": str(tmp_path / "labels.csv")}, "train": {"max_epochs": 20}, "export": {"quantize": None}},
    )
    run_stages(params, ingest, featurize, train, export)

    meta = {p.key: p.value for p in onnx.load(params.export.out).metadata_props}
    assert json.loads(meta["graft.classes"]) == sorted(LABELS)
    for key in ("graft.input", "graft.output"):
        assert isinstance(json.loads(meta[key]), dict)  # every structured value is one JSON document
    assert all("\n" not in v for k, v in meta.items() if k != "graft.classes")
    assert "\n" not in meta["graft.classes"]  # the newline inside a label is escaped, not raw
    assert OnnxClassifier(params.export.out).classes == sorted(LABELS)  # what serving reads back
