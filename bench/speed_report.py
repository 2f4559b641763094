"""bench/train_speed.py's report: the tables and the PASS/FAIL of each target, the 224 px one on bracketed pairs."""

from __future__ import annotations

import numpy as np

TARGETS = {
    "vs_plain_224": 2.5,
    "last_n_vs_full": 2.0,
    "int8_vs_fp32": 1.5,
    "cached_featurize_s": 1.5,
    "backbones_s": 0.5,
}


def pair_ratio(pair: tuple[float, dict, float]) -> float:
    """graft's img/s over the faster of the plain loops on either side of it."""
    return float(pair[1]["img_per_s"] / max(pair[0], pair[2]))


def pairs_line(pairs: list[tuple[float, dict, float]]) -> tuple[str, bool]:
    """The 224 px target judged on the median of the bracketed pairs' ratios; PASS or FAIL."""
    ratios = [pair_ratio(p) for p in pairs]
    median = float(np.median(ratios))
    listed = ", ".join(f"{r:.2f}x" for r in ratios)
    return f"median of {len(ratios)} bracketed pairs {median:.2f}x ({listed})", median >= TARGETS["vs_plain_224"]


def report(res: dict) -> str:
    """The full run's tables (throughput, last_n and the step anatomy, featurize, start-up, demo accuracy) and its
    target lines."""
    g, plain = res["graft"], res["plain"]
    precisions = res.get("precisions", ("fp32", "bf16"))
    best = precisions[-1]  # bf16 where the CPU has it, else fp32 only
    lines = ["", "== fine-tune throughput (img/s; graft = whole `graft train` processes, start-up and val included)"]
    lines.append(f"{'':<28}{'224 px':>10}{'96 px':>10}")
    lines.append(f"{'plain loop NCHW fp32':<28}{plain[224]:>10.1f}{plain[96]:>10.1f}")
    lines.append(
        f"  (224 px: the faster plain loop beside pair 1's graft run, {res['pairs'][0][0]:.1f} or "
        f"{res['pairs'][0][2]:.1f})"
    )
    for i, pair in enumerate(res["pairs"], 1):
        left, r, right = pair
        lines.append(
            f"  224 px pair {i} (plain | graft {r['precision']} | plain): {left:.1f} | {r['img_per_s']:.1f} | "
            f"{right:.1f} img/s: {pair_ratio(pair):.2f}x"
        )
    for precision in precisions:
        row = [g[(s, precision, "full")]["img_per_s"] for s in (224, 96)]
        lines.append(f"{'graft full ' + precision:<28}{row[0]:>10.1f}{row[1]:>10.1f}")
    for precision in precisions:
        row = [g[(s, precision, "full")]["img_per_s"] / plain[s] for s in (224, 96)]
        lines.append(f"{'  x plain loop, ' + precision:<28}{row[0]:>9.2f}x{row[1]:>9.2f}x")
    cold = g[(224, best, "full, no table")]["img_per_s"]
    lines.append(
        f"{'graft full ' + best + ', no table':<28}{cold:>10.1f}{'':>10}   ({cold / plain[224]:.2f}x plain loop)"
    )
    lines.append(
        "(graft rows run after `graft featurize` at their size, as `dvc repro` does: the LP-FT probe reads its "
        f"features from the table ({g[(224, best, 'full')]['probe_features']}); 'no table' computes them)"
    )
    if best == "fp32":
        lines.append("(no bf16 rows: this CPU has no native bf16, so graft's `precision: auto` trains in fp32)")
    lines.append("")
    lines.append("== last_n: 2 against full (224 px, whole graft train)")
    for precision in precisions:
        full, top = g[(224, precision, "full")]["img_per_s"], g[(224, precision, "last_n 2")]["img_per_s"]
        lines.append(f"{precision}: full {full:.1f}, last_n 2 {top:.1f} img/s: {top / full:.2f}x")
    a = res["anatomy"]
    full = a["full"]
    lines.append(
        "one training step at 224 px (channels_last; bf16 where native, 5x5 and stride-2 depthwise fp32, "
        "activations out of place; BatchNorm folded, activations fused into the convolutions; freed memory reused; "
        "fused AdamW):"
    )
    lines += [
        f"  {k:<30}{v:>7.1f} img/s ({v / full:.2f}x full, {v / plain[224]:.2f}x plain loop)" for k, v in a.items()
    ]
    f = res["featurize"]
    lines.append("")
    lines.append("== featurize, fresh cache (onnxruntime)")
    for precision in ("fp32", "int8"):
        r = f[precision]
        lines.append(
            f"{precision}: {r['img_per_s']:.1f} img/s over {r['computed']} images; set-up {r['setup_s']:.1f} s"
        )
    lines.append(f"int8 / fp32: {f['int8']['img_per_s'] / f['fp32']['img_per_s']:.2f}x")
    lines.append("")
    lines.append("== start-up (fresh processes, best of 3)")
    lines += [f"{k:<32}{v:>6.2f} s" for k, v in res["startup"].items()]
    if res["demo"]:
        lines += ["", *demo_lines(res["demo"], precisions)]
    pairs_text, pairs_ok = pairs_line(res["pairs"])
    checks = {
        f"graft full (best precision) >= {TARGETS['vs_plain_224']}x plain at 224 px, {pairs_text}": pairs_ok,
        f"last_n 2 >= {TARGETS['last_n_vs_full']}x full ({best})": g[(224, best, "last_n 2")]["img_per_s"]
        / g[(224, best, "full")]["img_per_s"]
        >= TARGETS["last_n_vs_full"],
        f"int8 featurize >= {TARGETS['int8_vs_fp32']}x fp32": f["int8"]["img_per_s"] / f["fp32"]["img_per_s"]
        >= TARGETS["int8_vs_fp32"],
        f"cached featurize <= {TARGETS['cached_featurize_s']} s": res["startup"]["graft featurize (cached)"]
        <= TARGETS["cached_featurize_s"],
        f"graft backbones <= {TARGETS['backbones_s']} s": res["startup"]["graft backbones"] <= TARGETS["backbones_s"],
    }
    lines.append("")
    lines += [f"target {k}: {'PASS' if ok else 'FAIL'}" for k, ok in checks.items()]
    return "\n".join(lines)


def demo_lines(d: dict, precisions: tuple[str, ...]) -> list[str]:
    """The demo's final test accuracy per seed in each precision measured (fp32, and bf16 where native)."""
    seeds = sorted({k[0] for k in d})
    lines = [
        f"== demo digits (100 per class), fine-tuned at 96 px: {' against '.join(precisions)} (test split of each seed)"
    ]
    for seed in seeds:
        a, b = d[(seed, "fp32")], d.get((seed, "bf16"))
        line = f"seed {seed}: accuracy fp32 {a['accuracy']:.4f}"
        if b is None:
            line += f", macro-F1 {a['macro_f1']:.4f}; {a['wall_s']:.0f} s"
        else:
            line += (
                f", bf16 {b['accuracy']:.4f} ({round((b['accuracy'] - a['accuracy']) * a['n']):+d} of {a['n']} test "
                f"images); macro-F1 {a['macro_f1']:.4f} / {b['macro_f1']:.4f}; "
                f"{a['wall_s']:.0f} s / {b['wall_s']:.0f} s"
            )
        lines.append(line)
    means = ", ".join(f"{p} {np.mean([d[(s, p)]['accuracy'] for s in seeds]):.4f}" for p in precisions)
    return [*lines, f"mean accuracy over {len(seeds)} seeds: {means}"]
