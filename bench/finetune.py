"""Head (feature transfer) vs fine-tune (parameter transfer) on the demo digits: accuracy and wall time.

    python bench/finetune.py            # all 1,797 digits, the demo's own fine-tune settings (DEMO_FINETUNE)
    python bench/finetune.py --quick    # 30 digits per class, 2 epochs: a smoke test

Prints one table measured in one run, with the raw-pixel baseline beside both modes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from graft.demo import write_digits
from graft.params import Params, load_params, parse_params
from graft.tasks.evaluate import evaluate
from graft.tasks.featurize import featurize
from graft.tasks.finetune import finetune
from graft.tasks.ingest import ingest
from graft.tasks.train_head import train

REPO = Path(__file__).resolve().parents[1]


# The demo's own fine-tune settings: params.yaml's generic ones (staged LP-FT from the probe, EMA, frozen
# BatchNorm statistics, size from the data) with two facts about digits: 8x8 scans need no more than 96 px,
# and digits are not mirror-symmetric.
DEMO_FINETUNE = {"image_size": 96, "augment": {"hflip": False}}


def workspace_params(ws: Path, mode: str, quick: bool) -> Params:
    raw = load_params(REPO / "params.yaml").model_dump(mode="json")
    raw["data"].update(root=str(ws / "raw"), out_dir=str(ws / "data"))
    raw["featurize"].update(cache_dir=str(ws / "cache"), out=str(ws / "data/features.parquet"))
    raw["train"].update(mode=mode, model_dir=str(ws / mode))
    raw["train"]["finetune"].update({k: v for k, v in DEMO_FINETUNE.items() if k != "augment"})
    raw["train"]["finetune"]["augment"].update(DEMO_FINETUNE["augment"])
    if quick:
        raw["train"]["finetune"].update(epochs=2)
    raw["evaluate"].update(
        metrics_dir=str(ws / mode / "metrics"), plots_dir=str(ws / mode / "plots"), report=str(ws / mode / "report.md")
    )
    return parse_params(raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        write_digits(ws / "raw", per_class=30 if args.quick else None)
        head_p, ft_p = workspace_params(ws, "head", args.quick), workspace_params(ws, "finetune", args.quick)
        t0 = time.perf_counter()
        ingest(head_p)
        featurize(head_p)
        t_feat = time.perf_counter() - t0
        t0 = time.perf_counter()
        train(head_p)
        t_head = time.perf_counter() - t0
        head = evaluate(head_p)
        t0 = time.perf_counter()
        summary = finetune(ft_p)
        t_ft = time.perf_counter() - t0
        ft = evaluate(ft_p)
    fp = ft_p.train.finetune
    print(
        f"\ndemo digits: {head['counts']}  (fine-tune: {fp.strategy}, {summary['epochs']} epochs at {fp.image_size}px)"
    )
    print(f"{'model':<58} {'accuracy':>8} {'macro_f1':>8} {'wall_s':>8}")
    rows = [
        (f"raw pixels {head['baseline_size']}px + logreg (baseline)", head["baseline"], float("nan")),
        (f"{head['model_name']} (featurize {t_feat:.0f}s + train)", head["model"], t_feat + t_head),
        (ft["model_name"], ft["model"], t_ft),
    ]
    for name, m, wall in rows:
        print(f"{name:<58} {m['accuracy']:>8.4f} {m['macro_f1']:>8.4f} {wall:>8.1f}")
    print(
        f"finetune - head accuracy: {ft['model']['accuracy'] - head['model']['accuracy']:+.4f}; "
        f"finetune - baseline: {ft['model']['accuracy'] - head['baseline']['accuracy']:+.4f}"
    )


if __name__ == "__main__":
    main()
