"""Damaged state files give one-line errors naming the file, never tracebacks: a cache ``meta.json`` that
is empty or not JSON, an ``init_from`` model file with only a format key, a state dict holding a number."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graft import GraftError
from graft.cli import main
from graft.model import initial_model
from graft.tasks.featurize import featurize
from graft.tasks.train_head import train
from tests.faults.helpers import params_for, run_ingest, write_params
from tests.helpers import write_tree


@pytest.mark.parametrize("text", ["", "{", "[1, 2"], ids=["empty", "truncated", "unclosed"])
def test_a_damaged_cache_meta_json_is_one_line(ws: Path, text: str) -> None:
    write_tree(ws / "raw", per_class=6)
    run_ingest(ws)
    cache = Path(featurize(params_for(ws))["cache"])
    (cache / "meta.json").write_text(text, encoding="utf-8")

    with pytest.raises(GraftError) as info:
        featurize(params_for(ws))

    msg = str(info.value)
    assert msg.startswith(f"feature cache {cache / 'meta.json'} is unreadable (") and "\n" not in msg
    assert msg.endswith(f"): remove {cache} and rerun featurize")


def test_an_init_from_file_with_only_a_format_key_is_one_line(ws: Path) -> None:
    bare = ws / "bare.pt"
    torch.save({"format": "graft-model/1"}, bare)
    params = params_for(ws, {"train": {"mode": "finetune", "init_from": str(bare)}})

    with pytest.raises(GraftError) as info:
        initial_model(params, ["cat", "dog"])

    assert str(info.value) == (
        f"{bare} is not a usable graft model: 'kind' is missing or not a str; retrain it or use another file"
    )


def test_a_state_dict_holding_a_number_is_one_line(ws: Path, capsys: pytest.CaptureFixture) -> None:
    write_tree(ws / "raw", per_class=8)
    run_ingest(ws)
    params = params_for(ws, {"train": {"max_epochs": 5}})
    featurize(params)
    train(params)
    model_pt = ws / "models/model.pt"
    payload = torch.load(model_pt, weights_only=True)
    name = next(iter(payload["state_dict"]))
    payload["state_dict"][name] = 3
    torch.save(payload, model_pt)

    rc = main(["export", "--params", str(write_params(ws, params))])

    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0] == (
        f"graft: error: {model_pt} is not a usable graft model: state_dict entry {name!r} is a int, "
        "not a tensor; retrain it or use another file"
    )
