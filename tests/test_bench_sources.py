"""bench/datasets.py checks every requested set's Debian package before a benchmark run does any work."""

from __future__ import annotations

import json

import pytest

from graft import GraftError
from tests.helpers import load_bench


@pytest.fixture(scope="module")
def datasets():
    return load_bench("datasets")


def test_missing_packages_are_named_together_before_any_set_is_built(datasets, tmp_path, monkeypatch):
    present = tmp_path / "present.txt"
    present.write_text("here")
    monkeypatch.setattr(
        datasets,
        "NEEDS",
        {
            "digits": (),
            "icons": ((tmp_path / "no-icons", "oxygen-icon-theme"),),
            "stamps": ((present, "tuxpaint-stamps-default"),),
            "emoji": ((tmp_path / "no-test.txt", "unicode-data"), (tmp_path / "no-font.ttf", "fonts-noto-color-emoji")),
        },
    )
    out = tmp_path / "out"
    datasets.check_sources(["digits", "stamps"], out)  # nothing missing: no error

    with pytest.raises(GraftError) as err:
        datasets.check_sources(["digits", "icons", "stamps", "emoji"], out)
    message = str(err.value)
    assert "apt-get install -y oxygen-icon-theme unicode-data fonts-noto-color-emoji" in message
    assert str(tmp_path / "no-icons") in message and "tuxpaint" not in message
    assert not out.exists()  # nothing was built

    # A set already built under out with the same spec reuses its images and needs no package, unless it is
    # rebuilt; a build with another seed is rebuilt, so it needs the package again.
    (out / "icons").mkdir(parents=True)
    (out / "icons" / "sources.json").write_text(json.dumps({"spec": datasets._spec("icons", 0)}))
    datasets.check_sources(["icons"], out, seed=0)
    with pytest.raises(GraftError, match="oxygen-icon-theme"):
        datasets.check_sources(["icons"], out, seed=1)
    with pytest.raises(GraftError, match="oxygen-icon-theme"):
        datasets.check_sources(["icons"], out, seed=0, force=True)


def test_a_builder_names_the_package_it_misses(tmp_path, monkeypatch):
    sources = load_bench("set_sources")  # the readers, beside bench/datasets.py
    missing = tmp_path / "no-stamps"
    monkeypatch.setattr(sources, "NEEDS", {**sources.NEEDS, "stamps": ((missing, "tuxpaint-stamps-default"),)})
    monkeypatch.setattr(sources, "TUXPAINT", missing)
    with pytest.raises(
        GraftError, match=r"no-stamps not found: install with `apt-get install -y tuxpaint-stamps-default`"
    ):
        list(sources.stamp_items())


def test_every_set_declares_what_it_reads(datasets):
    assert set(datasets.NEEDS) == set(datasets.BUILDERS)
