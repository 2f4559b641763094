"""Fault rows 18-20: bad params files, pretrained weights missing offline, untrusted checkpoints."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import typing
from pathlib import Path

import annotated_types as at
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from graft import GraftError
from graft.cli import main
from graft.model import MODEL_FORMAT, load_model
from graft.params import Params
from graft.tasks.finetune import finetune
from graft.tasks.ingest import ingest
from tests.faults.helpers import params_for, write_params
from tests.helpers import write_tree

# --- row 18: params -----------------------------------------------------------------------------


def _fields(model: type[BaseModel], prefix: str = "") -> dict[str, typing.Any]:
    """Every dotted key of ``model`` (sections included) mapped to its pydantic FieldInfo."""
    out: dict[str, typing.Any] = {}
    for name, field in model.model_fields.items():
        out[prefix + name] = field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out.update(_fields(field.annotation, f"{prefix}{name}."))
    return out


FIELDS = _fields(Params)
SECTIONS = [""] + [
    k for k, f in FIELDS.items() if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
]
_BOUNDED = {k: f for k, f in FIELDS.items() if any(isinstance(m, (at.Ge, at.Gt, at.Le, at.Lt)) for m in f.metadata)}
_junk = st.text(min_size=1, max_size=12).map(lambda s: "x" + s)  # never parses as a number, bool or null
_container = st.one_of(
    st.lists(st.integers(), min_size=1, max_size=3),
    st.dictionaries(st.sampled_from("abc"), st.integers(), min_size=1, max_size=2),
)


def _nest(dotted: str, value: object) -> dict:
    *parents, leaf = dotted.split(".")
    out: dict = {leaf: value}
    for part in reversed(parents):
        out = {part: out}
    return out


def _is_int(field) -> bool:
    return int in {field.annotation, *typing.get_args(field.annotation)}


def _wrong_type(key: str) -> st.SearchStrategy:
    """Values that are the wrong type for ``key`` whatever they are."""
    ann = FIELDS[key].annotation
    if key in SECTIONS:
        return st.one_of(st.integers(), _junk, st.lists(st.integers(), max_size=2))
    if typing.get_origin(ann) is tuple:
        return st.one_of(_junk, st.dictionaries(st.sampled_from("ab"), st.integers(), min_size=1, max_size=2))
    if ann is str or set(typing.get_args(ann)) - {type(None)} == {str}:
        return st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), _container)
    return st.one_of(_junk, _container)


def _out_of_range(key: str) -> st.SearchStrategy:
    """Values just or far beyond one of ``key``'s bounds."""
    field, options = FIELDS[key], []
    step = st.integers(1, 10**6) if _is_int(field) else st.floats(1e-6, 1e6)
    for m in field.metadata:
        if isinstance(m, (at.Ge, at.Gt)):
            low = m.ge if isinstance(m, at.Ge) else m.gt
            options.append(step.map(lambda d, low=low: low - d))
            if isinstance(m, at.Gt):
                options.append(st.just(low))  # the bound itself is already out
        elif isinstance(m, (at.Le, at.Lt)):
            high = m.le if isinstance(m, at.Le) else m.lt
            options.append(step.map(lambda d, high=high: high + d))
            if isinstance(m, at.Lt):
                options.append(st.just(high))
    return st.one_of(options)


@st.composite
def bad_params(draw) -> tuple[dict, str]:
    """A params mapping with one fault, and the dotted key the message must name."""
    kind = draw(st.sampled_from(["unknown", "type", "range"]))
    if kind == "unknown":
        section = draw(st.sampled_from(SECTIONS))
        name = draw(
            st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True).filter(
                lambda n: f"{section}.{n}".lstrip(".") not in FIELDS
            )
        )
        key = f"{section}.{name}".lstrip(".")
        return _nest(key, draw(st.one_of(st.integers(), _junk, st.booleans()))), key
    if kind == "type":
        key = draw(st.sampled_from(sorted(FIELDS)))
        return _nest(key, draw(_wrong_type(key))), key
    key = draw(st.sampled_from(sorted(_BOUNDED)))
    return _nest(key, draw(_out_of_range(key))), key


@pytest.fixture(scope="module")
def params_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bad-params")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=bad_params())
def test_bad_params_fail_with_one_line_naming_the_key(params_dir: Path, case: tuple[dict, str]) -> None:
    """Unknown keys, wrong types and out-of-range values: `graft ingest` exits 2 with one line naming the key."""
    raw, key = case
    path = params_dir / "params.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    err, out = io.StringIO(), io.StringIO()

    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(["ingest", "--params", str(path)])

    lines = err.getvalue().splitlines()
    assert rc == 2 and out.getvalue() == ""
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"graft: error: {path}: {key}: "), (lines[0], raw)
    assert "Traceback" not in err.getvalue()


# --- row 19: pretrained weights missing offline ------------------------------------------------


@pytest.mark.parametrize(
    ("featurize", "expected"),
    [
        pytest.param(
            {"backbone": "resnet18"},
            r"resnet18 weights not found: {hub}/checkpoints/resnet18-[0-9a-f]+\.pth "
            r"is missing \(put resnet18-[0-9a-f]+\.pth at {hub}/checkpoints/resnet18-[0-9a-f]+\.pth or set "
            r"featurize\.weights",
            id="torchvision-hub-cache",
        ),
        pytest.param(
            {"backbone": "efficientnet_lite0", "weights": "{ws}/weights/lite0.pth"},
            r"{ws}/weights/lite0\.pth",
            id="lite0-weights-path",
        ),
        pytest.param(
            {"backbone": "tiny_cnn", "weights": "{ws}/nope.pt"},
            r"tiny_cnn weights not found: {ws}/nope\.pt",
            id="explicit-weights-path",
        ),
    ],
)
def test_missing_pretrained_weights_name_the_file_and_where_to_put_it(
    ws: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, featurize: dict, expected: str
) -> None:
    """Offline and without the weights, `graft featurize` says which file is missing and where it goes, in one line."""
    hub = ws / "torch-home" / "hub"
    monkeypatch.setenv("TORCH_HOME", str(ws / "torch-home"))
    write_tree(ws / "raw", per_class=4)
    fz = {k: v.format(ws=ws) for k, v in featurize.items()}
    params = params_for(ws, {"featurize": fz})
    ingest(params)

    rc = main(["featurize", "--params", str(write_params(ws, params))])

    lines = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert re.search(expected.format(hub=re.escape(str(hub)), ws=re.escape(str(ws))), lines[0]), lines[0]
    assert "weights not found" in lines[0] and "nothing is downloaded" in lines[0]


# --- row 20: untrusted checkpoints -------------------------------------------------------------


class _Payload:
    """Pickles to a call of ``open(marker, "w")``: loading it with full pickle would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _evil(path: Path, marker: Path, wrap: dict | None = None) -> Path:
    """A torch file holding ``wrap`` plus an object whose unpickling runs code."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(wrap or {}), "x": _Payload(marker)}, path)
    assert b"builtins" in path.read_bytes() or b"open" in path.read_bytes()
    return path


def test_untrusted_model_file_is_refused_without_running_it(ws: Path, capsys: pytest.CaptureFixture) -> None:
    """A model.pt that would run code under plain pickle: load_model and `graft evaluate` refuse it, nothing runs."""
    marker = ws / "pwned"
    _evil(ws / "models/model.pt", marker, {"format": MODEL_FORMAT})
    with pytest.raises(pickle.UnpicklingError):  # control: the file really is hostile under plain pickle rules
        torch.load(ws / "models/model.pt", weights_only=True)

    with pytest.raises(GraftError, match=r"cannot load model .*model\.pt: Weights only load failed"):
        load_model(ws / "models/model.pt")
    write_tree(ws / "raw", per_class=6)
    params = params_for(ws)
    ingest(params)
    rc = main(["evaluate", "--params", str(write_params(ws, params))])

    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("graft: error: cannot load model")
    assert not marker.exists()


def test_untrusted_weights_file_is_refused_without_running_it(ws: Path) -> None:
    """featurize.weights pointing at a hostile file: a one-line error, nothing runs."""
    marker = ws / "pwned"
    weights = _evil(ws / "weights.pt", marker)
    write_tree(ws / "raw", per_class=4)
    params = params_for(ws, {"featurize": {"weights": str(weights)}})
    ingest(params)

    from graft.tasks.featurize import featurize

    with pytest.raises(GraftError, match=rf"cannot read weights {weights}: Weights only load failed"):
        featurize(params)
    assert not marker.exists()


def test_untrusted_init_from_and_checkpoint_are_refused_without_running_them(ws: Path) -> None:
    """A hostile train.init_from model and a hostile resume checkpoint: refused, nothing runs."""
    marker = ws / "pwned"
    write_tree(ws / "raw", per_class=6)
    ft = {"train": {"mode": "finetune", "finetune": {"epochs": 1, "batch_size": 8}}}
    params = params_for(
        ws,
        {
            **ft,
            "train": {**ft["train"], "init_from": str(_evil(ws / "other/model.pt", marker, {"format": MODEL_FORMAT}))},
        },
    )
    ingest(params)
    with pytest.raises(GraftError, match="cannot load model"):
        finetune(params)
    _evil(ws / "models/checkpoints/last.pt", marker, {"key": "x"})

    with pytest.raises((GraftError, pickle.UnpicklingError), match="Weights only load failed"):
        finetune(params_for(ws, ft))
    assert not marker.exists()
    assert os.listdir(ws / "models") == ["checkpoints"]  # no model was written from it
