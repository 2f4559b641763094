"""Tests for graft.params: defaults, the repo's params.yaml, and one-line errors naming the key."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from graft import GraftError
from graft.params import CANDIDATES, Params, dump_params, load_params, parse_params
from tests.helpers import REPO


def _one_line_error(exc_info: pytest.ExceptionInfo) -> str:
    """The error message, checked to be exactly one non-empty line."""
    msg = str(exc_info.value)
    assert msg.strip(), "empty error message"
    assert len(msg.splitlines()) == 1, f"message is not one line: {msg!r}"
    return msg


def _write(tmp_path: Path, text: str) -> Path:
    """Write ``text`` to a params file under ``tmp_path``."""
    p = tmp_path / "params.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> dict[str, typing.Any]:
    """Every known dotted key of ``model`` mapped to its annotation (nested models included)."""
    out: dict[str, typing.Any] = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        out[key] = field.annotation
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out.update(_leaf_fields(field.annotation, f"{key}."))
    return out


def _nest(dotted: str, value: object) -> dict:
    """``"a.b.c", v`` -> ``{"a": {"b": {"c": v}}}``."""
    parts = dotted.split(".")
    out: dict = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        out = {part: out}
    return out


def test_defaults_load() -> None:
    """An empty mapping (and an empty file) gives the documented defaults."""
    p = parse_params({})
    assert p == Params()
    assert p.train.lr == pytest.approx(3e-3)
    assert p.featurize.backbone == "efficientnet_lite0"
    assert p.data.split.train + p.data.split.val + p.data.split.test == pytest.approx(1.0)
    assert parse_params(None) == Params()


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    """An empty params.yaml is valid and equals the defaults."""
    assert load_params(_write(tmp_path, "")) == Params()


def test_repo_params_yaml_loads() -> None:
    """The repository's own params.yaml validates and matches its raw YAML values."""
    path = REPO / "params.yaml"
    p = load_params(path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert p.seed == raw["seed"]
    assert p.train.lr == pytest.approx(raw["train"]["lr"])
    assert p.featurize.backbone == raw["featurize"]["backbone"]
    assert p.export.out == raw["export"]["out"]
    assert p.model_dump(mode="json")["data"]["split"] == pytest.approx(raw["data"]["split"])


def _yaml_keys(raw: object, prefix: str = "") -> set[str]:
    """Every dotted key of a parsed YAML mapping (nested mappings included, lists are values)."""
    if not isinstance(raw, dict):
        return set()
    keys = set()
    for name, value in raw.items():
        keys.add(f"{prefix}{name}")
        keys |= _yaml_keys(value, f"{prefix}{name}.")
    return keys


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two dumped params mappings."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: params.yaml {va!r} != code {vb!r}")
    return out


def test_repo_params_yaml_is_exactly_the_code_defaults() -> None:
    """params.yaml lists the code's defaults, value for value: the code is the one source of defaults."""
    loaded = load_params(REPO / "params.yaml")
    drift = _diff(loaded.model_dump(mode="json"), Params().model_dump(mode="json"))
    assert not drift, "params.yaml drifted from graft/params.py: " + "; ".join(drift)
    assert loaded == Params()


def test_repo_params_yaml_lists_every_field() -> None:
    """Every field of Params (sections and leaves, recursively) is listed in params.yaml, and nothing else."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    listed, fields = _yaml_keys(raw), set(_leaf_fields(Params))
    assert not fields - listed, f"fields missing from params.yaml: {sorted(fields - listed)}"
    assert not listed - fields, f"keys in params.yaml that Params lacks: {sorted(listed - fields)}"


def test_dump_params_round_trips(tmp_path: Path) -> None:
    """dump_params writes YAML that loads back equal, for the defaults and for changed values."""
    assert load_params(_write(tmp_path, dump_params())) == Params()
    changed = parse_params(
        {
            "seed": 7,
            "train": {
                "mode": "finetune",
                "candidates": ["mlp", "logreg"],
                "finetune": {"ema": None, "augment": {"ratio": [0.5, 2.0]}},
            },
        }
    )
    assert load_params(_write(tmp_path, dump_params(changed))) == changed
    assert changed != Params()


def test_auto_mode_defaults() -> None:
    """train.mode auto and its keys default to the documented values; candidates keep their cheapest-first order."""
    t = Params().train
    assert (t.mode, t.budget_minutes, t.refit, t.cv_folds, t.cv_below) == ("auto", 20, "trainval", 5, 2000)
    assert list(t.candidates) == [
        *("pixels", "logreg", "mlp", "multilayer", "fusion", "ensemble", "finetune", "other_backbones")
    ]
    assert tuple(t.candidates) == CANDIDATES
    assert (t.finetune.ema, t.finetune.init, t.finetune.strategy) == (0.999, "probe", "staged")
    assert t.finetune.image_size is None and Params().retrain.escalate_below_val_accuracy is None


def test_candidates_accept_a_subset_in_any_order() -> None:
    """A subset of the candidates is kept as given (order included)."""
    assert parse_params({"train": {"candidates": ["finetune", "logreg"]}}).train.candidates == ("finetune", "logreg")


@pytest.mark.parametrize(
    ("train", "key", "words"),
    [
        ({"candidates": []}, "train.candidates", "at least 1"),
        ({"candidates": ["logreg", "mlp", "logreg"]}, "train.candidates", "logreg more than once"),
        ({"candidates": ["logreg", "svm"]}, "train.candidates", "item 1"),
        ({"candidates": "logreg"}, "train.candidates", "tuple"),
        ({"mode": "best"}, "train.mode", "'best'"),
        ({"refit": "test"}, "train.refit", "'test'"),
        ({"budget_minutes": 0}, "train.budget_minutes", "greater than 0"),
        ({"budget_minutes": float("nan")}, "train.budget_minutes", "finite"),
        ({"cv_folds": 1}, "train.cv_folds", "greater than or equal to 2"),
        ({"cv_folds": 21}, "train.cv_folds", "less than or equal to 20"),
        ({"cv_below": -1}, "train.cv_below", "greater than or equal to 0"),
        ({"finetune": {"ema": 1.0}}, "train.finetune.ema", "less than 1"),
        ({"finetune": {"ema": 0}}, "train.finetune.ema", "greater than 0"),
        ({"finetune": {"init": "zeros"}}, "train.finetune.init", "'zeros'"),
    ],
)
def test_auto_keys_are_validated(train: dict, key: str, words: str) -> None:
    """Each new train key rejects a bad value in one line naming the key."""
    with pytest.raises(GraftError) as info:
        parse_params({"train": train})
    msg = _one_line_error(info)
    assert msg.startswith(f"params: {key}: "), msg
    assert words in msg, msg


def test_ema_null_turns_it_off() -> None:
    """finetune.ema: null is allowed (EMA off)."""
    assert parse_params({"train": {"finetune": {"ema": None}}}).train.finetune.ema is None


@pytest.mark.parametrize(
    ("train", "ok"),
    [
        ({"mode": "finetune"}, True),
        ({"mode": "auto"}, True),  # only its fine-tune candidate uses init_from
        ({"mode": "auto", "candidates": ["logreg", "finetune"]}, True),
        ({"mode": "head"}, False),
        ({"mode": "auto", "candidates": ["logreg", "mlp"]}, False),  # nothing would use it
    ],
)
def test_init_from_needs_a_fine_tune(train: dict, ok: bool) -> None:
    """init_from is accepted where something fine-tunes, refused where it would be silently ignored."""
    raw = {"train": {**train, "init_from": "models/source"}}
    if ok:
        assert parse_params(raw).train.init_from == "models/source"
        return
    with pytest.raises(GraftError) as info:
        parse_params(raw)
    msg = _one_line_error(info)
    assert msg.startswith("params: train: ") and "init_from needs mode: finetune" in msg, msg


def test_last_n_strategy_needs_last_n_when_auto_fine_tunes() -> None:
    """strategy last_n without last_n fails for auto (which may fine-tune) but not for head mode."""
    with pytest.raises(GraftError, match=r"train: finetune.strategy last_n needs finetune.last_n"):
        parse_params({"train": {"mode": "auto", "finetune": {"strategy": "last_n"}}})
    assert parse_params({"train": {"mode": "head", "finetune": {"strategy": "last_n"}}}).train.mode == "head"


def test_params_are_frozen() -> None:
    """The params object cannot be mutated after loading."""
    p = parse_params({})
    with pytest.raises(ValidationError, match="frozen"):
        p.train.lr = 1.0  # type: ignore[misc]  # the point of the test: a frozen field refuses assignment


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"train": {"learning_rate": 0.1}}, "train.learning_rate"),
        ({"bogus": 1}, "bogus"),
        ({"data": {"split": {"holdout": 0.1}}}, "data.split.holdout"),
    ],
)
def test_unknown_key(raw: dict, key: str) -> None:
    """An unknown key fails with a one-line message naming it as unknown."""
    with pytest.raises(GraftError) as info:
        parse_params(raw)
    msg = _one_line_error(info)
    assert f"{key}: unknown key" in msg


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"max_epochs": 2.5}}, "train.max_epochs"),
        ({"train": {"head": "svm"}}, "train.head"),
        ({"featurize": {"batch_size": [8]}}, "featurize.batch_size"),
        ({"data": {"root": 5}}, "data.root"),
        ({"seed": "zero"}, "seed"),
        ({"data": {"split": 0.5}}, "data.split"),
    ],
)
def test_wrong_type(raw: dict, key: str) -> None:
    """A wrong type fails with a one-line message naming the dotted key."""
    with pytest.raises(GraftError) as info:
        parse_params(raw)
    assert f"{key}: " in _one_line_error(info)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"train": {"lr": 0}}, "train.lr"),
        ({"train": {"lr": 11}}, "train.lr"),
        ({"featurize": {"image_size": 8}}, "featurize.image_size"),
        ({"ingest": {"max_bad_fraction": 1.5}}, "ingest.max_bad_fraction"),
        ({"export": {"opset": 5}}, "export.opset"),
        ({"evaluate": {"ece_bins": 1}}, "evaluate.ece_bins"),
    ],
)
def test_out_of_range(raw: dict, key: str) -> None:
    """An out-of-range value fails with a one-line message naming the key and the bad value."""
    with pytest.raises(GraftError) as info:
        parse_params(raw)
    msg = _one_line_error(info)
    assert f"{key}: " in msg
    value = next(iter(next(iter(raw.values())).values()))
    assert repr(value) in msg


def test_split_must_sum_to_one() -> None:
    """Split fractions that do not sum to 1 fail naming data.split."""
    with pytest.raises(GraftError) as info:
        parse_params({"data": {"split": {"train": 0.5, "val": 0.2, "test": 0.2}}})
    msg = _one_line_error(info)
    assert "data.split" in msg
    assert "must be 1" in msg


def test_valid_split_override() -> None:
    """A split that sums to 1 is accepted as given."""
    p = parse_params({"data": {"split": {"train": 0.6, "val": 0.2, "test": 0.2}}})
    assert (p.data.split.train, p.data.split.val, p.data.split.test) == (0.6, 0.2, 0.2)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_top_level(tmp_path: Path, text: str) -> None:
    """A YAML file whose top level is not a mapping fails naming the file and the problem."""
    path = _write(tmp_path, text)
    with pytest.raises(GraftError) as info:
        load_params(path)
    msg = _one_line_error(info)
    assert str(path) in msg
    assert "top level must be a mapping" in msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train:\n  lr: 0.1\n  head: [logreg\nseed: 1\n", ("not valid YAML", " line ")),  # malformed YAML
        (None, ("not found",)),  # no params file at all
        ("train:\n  lr: -1\n", ("train.lr: ",)),  # a bad value: the file and the dotted key
    ],
    ids=["invalid-yaml", "missing-file", "bad-value"],
)
def test_a_bad_params_file_is_one_line_naming_the_file(tmp_path: Path, text: str | None, expected: tuple) -> None:
    """Malformed YAML, a missing file or a bad value: one line naming the file and what is wrong."""
    path = _write(tmp_path, text) if text is not None else tmp_path / "nope" / "params.yaml"
    with pytest.raises(GraftError) as info:
        load_params(path)
    msg = _one_line_error(info)
    assert msg.startswith(f"{path}") or str(path) in msg
    assert all(part in msg for part in expected)


_KEYS = _leaf_fields(Params)
_NESTED = {k for k, ann in _KEYS.items() if isinstance(ann, type) and issubclass(ann, BaseModel)}
_junk_text = st.text(min_size=1, max_size=20).map(lambda s: "x" + s)  # never parses as a number or bool
_wrong_for_scalar = st.one_of(
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), min_size=1, max_size=2),
)


def _wrong_values(key: str) -> st.SearchStrategy:
    """Values that are the wrong type for ``key`` whatever the value."""
    ann = _KEYS[key]
    if key in _NESTED:  # a section: any scalar or list is wrong
        return st.one_of(st.integers(), st.floats(allow_nan=False), _junk_text, st.lists(st.integers(), max_size=3))
    args = set(typing.get_args(ann)) - {type(None)}
    if typing.get_origin(ann) is tuple:  # a list would be coerced: only text and mappings are always wrong
        return st.one_of(_junk_text, st.dictionaries(st.text(max_size=5), st.integers(), min_size=1, max_size=2))
    if ann is str or args == {str}:
        return st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), _wrong_for_scalar)
    # int, float, bool, Literal[...] and Optional[int]: non-numeric text and containers are all wrong
    return st.one_of(_junk_text, _wrong_for_scalar)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_wrong_type_anywhere_names_the_key(data: st.DataObject) -> None:
    """A wrong-typed value at any known key fails with a one-line message naming that key."""
    key = data.draw(st.sampled_from(sorted(_KEYS)), label="key")
    value = data.draw(_wrong_values(key), label="value")
    with pytest.raises(GraftError) as info:
        parse_params(_nest(key, value))
    msg = str(info.value)
    assert len(msg.splitlines()) == 1, msg
    assert msg.startswith(f"params: {key}: "), msg


def test_cli_bad_params_exits_2_with_one_line(tmp_path: Path) -> None:
    """`graft train --params bad.yaml` exits 2 with one 'graft: error:' line and no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: fast\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "graft.cli", "train", "--params", str(bad)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("graft: error:")
    assert "train.lr" in lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
