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


def test_the_report_on_a_cpu_without_bf16_judges_fp32_and_lists_no_bf16_row(speed) -> None:
    """An AVX2 CPU: graft trains in fp32, the run measures no bf16 row, and the report judges last_n in fp32."""

    def run(v: float) -> dict:
        return {"img_per_s": v, "precision": "fp32", "probe_features": "feature cache", "wall_s": 60.0}

    g = {(224, "fp32", "full"): run(16.0), (96, "fp32", "full"): run(60.0)}
    g |= {(224, "fp32", "last_n 2"): run(40.0), (224, "fp32", "full, no table"): run(15.0)}
    res = {
        "precisions": ("fp32",),
        "plain": {224: 8.0, 96: 60.0},
        "graft": g,
        "pairs": [(7.0, run(16.0), 8.0)],
        "anatomy": {"full": 22.0},
        "featurize": {p: {"img_per_s": v, "computed": 240, "setup_s": 5.0} for p, v in (("fp32", 80), ("int8", 130))},
        "startup": {"graft featurize (cached)": 1.0, "graft backbones": 0.2},
        "demo": {
            (s, "fp32"): {"accuracy": a, "macro_f1": a, "wall_s": 80.0, "n": 146} for s, a in ((0, 1.0), (1, 0.98))
        },
    }
    text = speed.report(res)
    rows = text.splitlines()
    assert "(no bf16 rows: this CPU has no native bf16, so graft's `precision: auto` trains in fp32)" in rows
    assert not [r for r in rows if r.startswith(("graft full bf16", "  x plain loop, bf16", "bf16:"))]
    assert "last_n 2 >= 2.0x full (fp32): PASS" in text and "fp32: full 16.0, last_n 2 40.0 img/s: 2.50x" in text
    assert "2.5x plain at 224 px, median of 1 bracketed pairs 2.00x (2.00x): FAIL" in text
    assert "mean accuracy over 2 seeds: fp32 0.9900" in text
