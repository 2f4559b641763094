"""A corrupt data page inside a feature-cache part is named as corruption, with the part's path, and is not
an I/O error that Prefect retries as transient (it used to say "I/O error ... rerun when the storage is
back", naming no file)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from graft import GraftError
from graft.cli import main
from graft.sources import is_transient
from graft.tasks.featurize import featurize
from tests.faults.helpers import params_for, run_ingest, write_params
from tests.helpers import write_tree


def _corrupt_feature_page(part: Path) -> None:
    """Flip the bytes of the feature column's first page header: the sha256 column stays readable."""
    column = pq.ParquetFile(part).metadata.row_group(0).column(1)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(part.read_bytes())
    for i in range(start, start + 48):
        data[i] ^= 0x5A
    part.write_bytes(bytes(data))


def test_a_corrupt_page_names_the_part_and_is_not_transient(ws: Path, capsys: pytest.CaptureFixture) -> None:
    write_tree(ws / "raw", per_class=8)
    run_ingest(ws)
    params = params_for(ws, {"featurize": {"part_rows": 4}})
    cache = Path(featurize(params)["cache"])
    part = sorted(cache.glob("part-*.parquet"))[1]
    rows = pq.read_metadata(part).num_rows
    _corrupt_feature_page(part)

    with pytest.raises(GraftError) as info:
        featurize(params)
    assert str(info.value).startswith(f"feature cache part {part} is corrupt (")
    assert str(info.value).endswith("): delete it and rerun featurize")
    assert not is_transient(info.value)

    assert main(["featurize", "--params", str(write_params(ws, params))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(part) in err[0] and "I/O error" not in err[0]

    part.unlink()  # the fix the message names
    assert featurize(params)["computed"] == rows
