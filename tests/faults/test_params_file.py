"""Fault row 18, the file itself.

Duplicate or non-string keys, oversized, non-mapping, too deep or non-UTF-8 params files.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from graft import GraftError
from graft.cli import main
from graft.params import Params, load_params
from graft.yamlload import MAX_PARAMS_BYTES


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "params.yaml"
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def _error(path: Path) -> str:
    """The GraftError load_params raises for ``path``, checked to be one line naming the file."""
    with pytest.raises(GraftError) as info:
        load_params(path)
    msg = str(info.value)
    assert len(msg.splitlines()) == 1, msg
    assert msg.startswith(f"{path}: "), msg
    return msg


@pytest.mark.parametrize(
    ("text", "key", "line", "first"),
    [
        ("train:\n  lr: 0.1\n  head: mlp\n  lr: 0.2\n", "train.lr", 4, 2),
        ("seed: 1\ntrain: {lr: 0.1}\nseed: 2\n", "seed", 3, 1),
        (
            "train:\n  finetune:\n    augment:\n      hflip: true\n      hflip: false\n",
            "train.finetune.augment.hflip",
            5,
            4,
        ),
        ("data:\n  split: {train: 0.7, val: 0.15, test: 0.15, val: 0.1}\n", "data.split.val", 2, 2),
        ("train: {}\ntrain: {lr: 0.1}\n", "train", 2, 1),
    ],
)
def test_duplicate_key_is_an_error_naming_the_key_and_both_lines(
    tmp_path: Path, text: str, key: str, line: int, first: int
) -> None:
    """A key given twice in one mapping (plain YAML keeps the last silently) names the dotted key and its lines."""
    msg = _error(_write(tmp_path, text))
    assert f": line {line}: duplicate key {key} (first at line {first})" in msg, msg


def test_same_name_in_different_sections_and_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    """lr under train and under train.finetune are two keys; a `<<` merge overridden by an explicit key is valid
    YAML."""
    text = (
        "train:\n  lr: 0.01\n  finetune:\n    <<: {lr: 0.5, epochs: 3}\n    lr: 0.004\n"
        "    augment: {ratio: &r [0.5, 2.0]}\n"
    )
    p = load_params(_write(tmp_path, text))
    assert (p.train.lr, p.train.finetune.lr, p.train.finetune.epochs) == (0.01, 0.004, 3)
    assert p.train.finetune.augment.ratio == (0.5, 2.0)


def test_duplicate_key_through_the_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    """`graft ingest --params` with a duplicated key exits 2 with one 'graft: error:' line naming it."""
    path = _write(tmp_path, "ingest:\n  workers: 2\n  workers: 4\n")
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(["ingest", "--params", str(path)])
    lines = err.getvalue().splitlines()
    assert rc == 2 and out.getvalue() == "" and len(lines) == 1, lines
    assert lines[0].startswith(f"graft: error: {path}: line 3: duplicate key ingest.workers"), lines[0]


def test_params_file_over_1_mib_is_refused_before_parsing(tmp_path: Path) -> None:
    """A file over 1 MiB is refused with its size, even when its text is not YAML at all (never parsed)."""
    path = _write(tmp_path, b"train: [unclosed\n" + b"#" * MAX_PARAMS_BYTES)
    size = path.stat().st_size
    msg = _error(path)
    assert f"params file is {size} bytes, over the {MAX_PARAMS_BYTES} (1 MiB) limit" in msg, msg
    assert "YAML" not in msg


def test_params_file_of_exactly_1_mib_still_loads(tmp_path: Path) -> None:
    """The limit is inclusive: a 1 MiB file (a setting padded with a comment) is read as usual."""
    head = b"seed: 3\n#"
    path = _write(tmp_path, head + b"x" * (MAX_PARAMS_BYTES - len(head)))
    assert path.stat().st_size == MAX_PARAMS_BYTES
    assert load_params(path).seed == 3


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("- seed: 1\n- train: {}\n", "a sequence"),
        ("seed=1\n", "a string"),
        ("\n42\n", "a number"),
        ("true\n", "a boolean"),
    ],
)
def test_top_level_that_is_not_a_mapping_names_what_yaml_found(tmp_path: Path, text: str, found: str) -> None:
    """A top level that is not a mapping says so in YAML's words (not Python type names), with the line."""
    msg = _error(_write(tmp_path, text))
    line = 2 if text.startswith("\n") else 1
    assert f": line {line}: top level must be a mapping of sections" in msg, msg
    assert msg.endswith(f"got {found}"), msg


def test_empty_and_null_files_still_give_the_defaults(tmp_path: Path) -> None:
    """A comment-only file or a bare `null` is an empty mapping, not an error."""
    assert load_params(_write(tmp_path, "# all defaults\n")) == Params()
    assert load_params(_write(tmp_path, "null\n")) == Params()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("train:\n  on: 1\n", ": line 2: key train.on is a boolean, not a string: quote it ('on')"),
        ("seed: 0\n1: 2\n", ": line 2: key 1 is a number, not a string"),
        ("train:\n  finetune:\n    2024-01-01: x\n", ": line 3: key train.finetune.2024-01-01 is a date, not a string"),
        ("data:\n  ~: raw\n", ": line 2: a key under data is null, not a string"),
        ("? [a, b]\n: 1\n", ": line 1: a key under the top level is a sequence, not a string"),
    ],
)
def test_non_string_key_is_an_error_naming_the_key_and_line(tmp_path: Path, text: str, words: str) -> None:
    """Keys YAML reads as booleans, numbers, dates, null or sequences fail in one line naming the key and line."""
    msg = _error(_write(tmp_path, text))
    assert words in msg, msg


def test_quoted_key_that_looks_like_a_boolean_is_a_string(tmp_path: Path) -> None:
    """Quoting fixes it: 'on' is then an ordinary (here unknown) key, reported as such."""
    msg = _error(_write(tmp_path, "train:\n  'on': 1\n"))
    assert msg.endswith("train.on: unknown key"), msg


def test_deeply_nested_yaml_is_a_one_line_error(tmp_path: Path) -> None:
    """Nesting deep enough to exhaust PyYAML's recursion gives one line, not a RecursionError traceback."""
    msg = _error(_write(tmp_path, "seed: " + "[" * 20000 + "]" * 20000 + "\n"))
    assert "not valid YAML (nested too deeply)" in msg, msg


def test_non_utf8_params_file_is_a_one_line_error(tmp_path: Path) -> None:
    """A Latin-1 file fails in one line naming the byte offset, not a UnicodeDecodeError traceback."""
    msg = _error(_write(tmp_path, "seed: 1  # caf\xe9\n".encode("latin-1")))
    assert ": byte 14: not UTF-8 text" in msg and "save it as UTF-8" in msg, msg
