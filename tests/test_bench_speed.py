"""bench/train_speed.py's 224 px target: every graft run sits between two plain-loop runs and is divided by the
faster of them, and the target is judged on the median of those ratios, not on one noisy pair."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import load_bench


@pytest.fixture(scope="module")
def speed():
    return load_bench("train_speed")


def test_each_graft_run_is_bracketed_by_plain_loops(speed, monkeypatch, tmp_path: Path) -> None:
    calls: list[str] = []
    plain = iter([12.0, 9.0, 11.0])  # the reference drifts: each ratio must use the faster neighbour
    graft = iter([30.0, 27.0, 33.0])

    def fake_plain(size: int, steps: int) -> float:
        calls.append("plain")
        return next(plain)

    def fake_graft(ws, data_root, size, epochs, precision, strategy) -> dict:
        calls.append(f"graft {precision}")
        return {"img_per_s": next(graft), "wall_s": 1.0, "precision": precision}

    monkeypatch.setattr(speed, "plain_loop", fake_plain)
    monkeypatch.setattr(speed, "graft_train", fake_graft)
    pairs = speed.bracketed_pairs(3, tmp_path, tmp_path, 8, plain_before=10.0, precision="bf16")
    assert calls == ["graft bf16", "plain"] * 3
    assert [(left, right) for left, _, right in pairs] == [(10.0, 12.0), (12.0, 9.0), (9.0, 11.0)]
    assert [round(speed.pair_ratio(p), 4) for p in pairs] == [2.5, 2.25, 3.0]  # 30/12, 27/12, 33/11
    text, ok = speed.pairs_line(pairs)
    assert ok and "median of 3 bracketed pairs 2.50x (2.50x, 2.25x, 3.00x)" in text


def test_the_target_fails_when_the_median_pair_misses(speed) -> None:
    pairs = [(10.0, {"img_per_s": v}, 10.0) for v in (30.0, 24.9, 24.0)]  # one pair passes, the median does not
    text, ok = speed.pairs_line(pairs)
    assert not ok and "2.49x" in text
