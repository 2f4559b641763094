"""A simulated week of arrivals scored by graft.drift on real EfficientNet-Lite0 features.

The champion's data is 1,000 of scikit-learn's digit scans. Each day brings 50 new images: five
ordinary days of other digits, then a day of photos (bench/photos.py, another domain) and a day
of digits with 10 photos mixed in. The digits and photos go through ingest and featurize (Lite0,
last-layer features, cached under ``--work``); each day is then scored with
:func:`graft.drift.feature_drift` exactly as the retrain flow does, at ``retrain.drift_alert``.

    python bench/drift.py --work /tmp/graft-drift-bench
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from graft.cache import load_feature_table, select_columns, tap_columns
from graft.demo import write_digits
from graft.drift import feature_drift, permutations_for
from graft.params import Params, parse_params
from graft.stages import run_stage


def features(work: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Digits and 60 photos through ingest + featurize; the manifest and its last-layer features."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from photos import SMALL, _sources, make_photo  # the benchmarks' photo generator

    params: Params = parse_params(
        {
            "data": {"root": str(work / "raw"), "out_dir": str(work / "data")},
            "featurize": {
                "cache_dir": str(work / "cache"),
                "out": str(work / "data/features.parquet"),
                "taps": ["last"],
            },
        }
    )
    if not (work / "raw").is_dir():
        write_digits(work / "raw")
        rng, sources = np.random.default_rng(0), _sources()
        (work / "raw" / "photo").mkdir()
        for i in range(60):
            make_photo(rng, sources, SMALL).save(work / "raw" / "photo" / f"photo-{i:02d}.jpg", quality=90)
    run_stage("ingest", params)
    run_stage("featurize", params)
    manifest = pd.read_parquet(work / "data/manifest.parquet")
    feats, meta = load_feature_table(params.featurize.out)
    x = select_columns(np.stack([feats[s] for s in manifest["sha256"]]), tap_columns(meta, ("last",)))
    return manifest, x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/graft-drift-bench"))
    ap.add_argument("--alert", type=float, default=0.01, help="retrain.drift_alert")
    args = ap.parse_args()
    manifest, x = features(args.work)
    rng = np.random.default_rng(0)
    digits = rng.permutation(np.flatnonzero(manifest["label"] != "photo"))
    photos = np.flatnonzero(manifest["label"] == "photo")
    reference, pool = digits[:1000], digits[1000:]
    days = [(f"day {d + 1}: 50 digits", pool[50 * d : 50 * (d + 1)]) for d in range(5)]
    days.append(("day 6: 50 photos", photos[:50]))
    days.append(("day 7: 40 digits + 10 photos", np.r_[pool[250:290], photos[50:60]]))
    rows = []
    for name, batch in days:
        fd = feature_drift(x[reference], x[batch], permutations_for(args.alert), seed=0)
        assert fd is not None
        rows.append({"batch": name, "auroc": fd.auroc, "p_value": fd.p_value, "alert": fd.p_value <= args.alert})
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
