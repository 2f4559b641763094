"""Shared fixtures: a throwaway workspace, params pointing into it, and small generated image trees."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """A workspace folder with ``raw/`` for images; pair it with ``make_params(ws)``."""
    (tmp_path / "raw").mkdir()
    return tmp_path


@pytest.fixture
def one_torch_thread():
    """Run tiny models on one thread: as fast, steady on shared CPUs, and bit-identical across processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (starting one costs ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
