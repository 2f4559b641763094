"""Atomic writes honour the umask: models and shared cache parts get the mode a plain create would give
(0666 less the umask), not the private 0600 of a temporary file (other users of a shared cache could
not read its parts)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from graft.atomic import write_bytes, write_json


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_atomic_writes_get_0666_less_the_umask(tmp_path: Path, umask_027) -> None:
    write_bytes(tmp_path / "model.pt", b"weights")
    write_json(tmp_path / "sub/meta.json", {"a": 1})

    assert _mode(tmp_path / "model.pt") == 0o640
    assert _mode(tmp_path / "sub/meta.json") == 0o640


def test_a_published_set_gets_the_same_modes(tmp_path: Path, umask_027) -> None:
    from graft.publish import publish_together

    a, b = tmp_path / "models/model.onnx", tmp_path / "metrics/export.json"
    with publish_together([a, b]) as tmp:
        tmp[a].write_bytes(b"onnx")
        tmp[b].write_text("{}")

    assert (_mode(a), _mode(b)) == (0o640, 0o640)
