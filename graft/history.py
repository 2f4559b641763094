"""The retrain history (``models/history.parquet``): one row per decision, and no promotion without its row.

A promotion writes its history row into the new version folder (``meta.json``, ``history_row``)
before the champion link is swapped; the row is then appended here. A run killed between the swap
and the append leaves a champion whose row is missing: the next run restores it from the version
folder first (:func:`restore_promotion`), so the promotion and its row cannot part.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa

from graft.atomic import write_parquet

DRIFT_SCHEMA = pa.schema(  # filled by graft.drift: the new images against the champion's data
    [
        ("drift_new_images", pa.int64()),
        ("drift_auroc", pa.float64()),
        ("drift_p_value", pa.float64()),
        ("class_mix_tvd", pa.float64()),
        ("class_mix_p_value", pa.float64()),
        ("unknown_rate", pa.float64()),
        ("drift_alert", pa.bool_()),
    ]
)

HISTORY_SCHEMA = pa.schema(
    [
        ("time", pa.string()),
        ("decision", pa.string()),
        ("reason", pa.string()),
        ("kind", pa.string()),
        ("challenger_macro_f1", pa.float64()),
        ("champion_macro_f1", pa.float64()),
        ("challenger_accuracy", pa.float64()),
        ("champion_accuracy", pa.float64()),
        ("gate_test_images", pa.int64()),
        ("added", pa.int64()),
        ("removed", pa.int64()),
        ("relabelled", pa.int64()),
        ("features_computed", pa.int64()),
        ("data_sha256", pa.string()),
        ("champion", pa.string()),
        *DRIFT_SCHEMA,
    ]
)


def append_history(path: Path, row: dict) -> pd.DataFrame:
    """Append one decision to the history table (rewritten atomically) and return the table."""
    new = pd.DataFrame([{k: row.get(k) for k in HISTORY_SCHEMA.names}])
    table = pd.concat([pd.read_parquet(path), new], ignore_index=True) if path.is_file() else new
    write_parquet(path, pa.Table.from_pandas(table, schema=HISTORY_SCHEMA, preserve_index=False))
    return table


def restore_promotion(path: Path, champion: dict) -> bool:
    """Append the promotion row of ``champion`` (its meta) if the history lacks it; True when it did.

    The row is the one the promoting run meant to write (kept in the version folder); a version
    promoted before rows were kept there gets one rebuilt from its meta.
    """
    version = champion["version"]
    if path.is_file():
        seen = pd.read_parquet(path, columns=["decision", "champion"])
        if ((seen["decision"] == "promoted") & (seen["champion"] == version)).any():
            return False
    row = dict(champion.get("history_row") or {"time": champion.get("promoted_at"), "kind": champion.get("kind")})
    row.setdefault("data_sha256", champion.get("data_sha256"))
    note = "row restored from the version folder: the promoting run stopped before writing it"
    row.update(decision="promoted", champion=version, reason=f"{row.get('reason') or 'promoted'} ({note})")
    append_history(path, row)
    return True
