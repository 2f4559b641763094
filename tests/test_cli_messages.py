"""The command line's conventions and messages: --version, help on every option, a description on every
subcommand, short human summaries (JSON behind --json), a missing input naming the command that makes it,
an empty data folder said plainly, and a failed ingest that leaves no manifest beside a newer quarantine."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import yaml

import graft
from graft.cli import build_parser, main
from graft.console import missing_hint, stage_line
from tests.helpers import make_params, write_tree


def _params_file(ws: Path, overrides: dict | None = None) -> Path:
    path = ws / "params.yaml"
    path.write_text(yaml.safe_dump(make_params(ws, overrides).model_dump()))
    return path


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"graft {graft.__version__}"


def test_every_subcommand_has_a_description_and_every_option_a_help() -> None:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(sub.choices) >= 11
    for name, cmd in sub.choices.items():
        assert cmd.description and len(cmd.description) > 15, name
        for action in cmd._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"graft {name} {'/'.join(action.option_strings) or action.dest}: no help"
    assert all(a.help for a in sub._choices_actions)  # the one-line list in `graft --help`


def test_stage_prints_a_short_line_and_json_on_request(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "raw").mkdir()
    write_tree(tmp_path / "raw", ("cat", "dog"), per_class=6)
    path = _params_file(tmp_path)
    assert main(["ingest", "--params", str(path)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("ingest: 12 images in 2 classes (train ") and "\n" not in line and len(line) < 120
    assert main(["ingest", "--params", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ingest"]["images"] == 12


def test_stage_line_falls_back_to_key_values_for_an_unknown_shape() -> None:
    assert stage_line("export", {"onnx": "m.onnx", "new": 3}) == "export: onnx m.onnx, new 3"
    line = stage_line(
        "train",
        {
            "mode": "auto",
            "chosen": "mlp",
            "val_macro_f1": 0.91234,
            "val_macro_f1_se": 0.01,
            "scored_on": "val split (n=40)",
            "ran": 3,
            "candidates": 4,
            "seconds": 12.0,
        },
    )
    assert line == (
        "train: auto chose mlp (held-out macro-F1 0.9123 ± 0.0100, val split (n=40)); 3 of 4 candidates ran in 12 s"
    )


def test_missing_metrics_names_the_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["metrics", "--path", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"graft: error: {tmp_path / 'nope.json'} not found: run `graft evaluate` (or `dvc repro`) "
        "first, or pass the right path"
    )
    assert "I/O error" not in err and "storage" not in err


def test_missing_manifest_names_ingest(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "raw").mkdir()
    assert main(["featurize", "--params", str(_params_file(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "manifest.parquet not found: run `graft ingest`" in err and "storage" not in err


def test_a_stray_file_not_found_names_its_maker(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Any FileNotFoundError that reaches the CLI names the stage that writes that file."""
    import graft.cli

    def boom(*_a, **_k):
        raise FileNotFoundError(2, "No such file or directory", "data/features.parquet")

    monkeypatch.setattr(graft.cli, "metrics_table", boom)
    assert main(["metrics"]) == 2
    assert "data/features.parquet not found: run `graft featurize`" in capsys.readouterr().err
    assert missing_hint("x/unknown.bin") == "x/unknown.bin not found: check the path"


def test_empty_data_folder_is_said_plainly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw/README.txt").write_text("not an image")
    assert main(["ingest", "--params", str(_params_file(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "no usable images found under" in err and "only 1 non-image file(s)" in err
    assert "refused" not in err and not (tmp_path / "data/quarantine.csv").exists()


def test_failed_ingest_leaves_no_stale_manifest_beside_its_quarantine(tmp_path: Path, capsys) -> None:
    """After a good ingest, a failing one removes the old manifest and class map with its new quarantine:
    the outputs on disk always come from one run."""
    (tmp_path / "raw").mkdir()
    write_tree(tmp_path / "raw", ("cat", "dog"), per_class=4)
    path = _params_file(tmp_path)
    assert main(["ingest", "--params", str(path)]) == 0
    for i in range(6):
        (tmp_path / f"raw/cat/bad{i}.jpg").write_bytes(b"")
    assert main(["ingest", "--params", str(path)]) == 2
    assert "6 of 14 files are unusable" in capsys.readouterr().err
    data = tmp_path / "data"
    assert not (data / "manifest.parquet").exists() and not (data / "classes.json").exists()
    assert len((data / "quarantine.csv").read_text().splitlines()) == 1 + 6
    assert main(["train", "--params", str(path)]) == 2  # and the next stage says what to run
    assert "run `graft ingest`" in capsys.readouterr().err


def test_prefect_telemetry_is_off_unless_the_user_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from graft.cli import quiet_prefect

    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)
    monkeypatch.setenv("DO_NOT_TRACK", "0")
    quiet_prefect()
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert os.environ["DO_NOT_TRACK"] == "0"  # an explicit choice wins


def test_metrics_table_reads_the_headline_and_names_from_evaluation_json(tmp_path: Path, capsys) -> None:
    scores = {"accuracy": 0.9, "macro_f1": 0.89, "balanced_accuracy": 0.88, "ece": 0.05, "n": 40}
    base = {"accuracy": 0.7, "macro_f1": 0.69, "balanced_accuracy": 0.68, "ece": 0.1, "n": 40}
    (tmp_path / "metrics.json").write_text(json.dumps({**scores, "baseline": base}))
    (tmp_path / "evaluation.json").write_text(
        json.dumps({"model_name": "tiny_cnn + logreg head", "baseline_size": 16, "vs_baseline": {"sentence": "wins."}})
    )
    assert main(["metrics", "--path", str(tmp_path / "metrics.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:5] == ["tiny_cnn", "+", "logreg", "head", "0.9000"]
    assert lines[2].startswith("baseline: raw pixels 16px + logreg") and lines[3] == "wins."


_PROBE = """
import sys
from graft.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "prefect", "onnxruntime", "timm") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
sys.exit(code)
"""


def _heavy_modules(args: list[str], cwd: Path) -> list[str]:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("HEAVY="))
    return [m for m in line.removeprefix("HEAVY=").split(",") if m]


def test_light_commands_start_without_torch_or_prefect(tmp_path: Path) -> None:
    """`graft backbones`, `graft metrics` and a fully cached `graft featurize` (the embedded Lite0, described
    from the registry and its weights file) import neither torch nor Prefect: they start in well under a second.
    The first featurize computes features and does need torch: the probe sees it, so it can tell the two apart."""
    ws = tmp_path
    write_tree(ws / "raw", per_class=3)
    params = _params_file(ws, {"featurize": {"backbone": "efficientnet_lite0", "engine": "torch"}})
    assert main(["ingest", "--params", str(params)]) == 0
    assert "torch" in _heavy_modules(["featurize", "--params", str(params)], ws)  # computes: needs torch
    assert _heavy_modules(["featurize", "--params", str(params)], ws) == []  # fully cached
    assert _heavy_modules(["backbones"], ws) == []
    metrics = ws / "metrics.json"
    row = {"accuracy": 0.9, "macro_f1": 0.9, "balanced_accuracy": 0.9, "ece": 0.05, "n": 10}
    metrics.write_text(json.dumps({**row, "baseline": row}))
    assert _heavy_modules(["metrics", "--path", str(metrics)], ws) == []
