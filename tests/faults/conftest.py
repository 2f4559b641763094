"""Fault-suite fixtures: every fault test runs torch on one thread (the helpers are in helpers.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Identical numbers across processes (subprocess runs use one thread too)."""
    yield
