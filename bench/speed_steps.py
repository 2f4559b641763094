"""bench/train_speed.py's step rows: the plain loop (the reference every target divides by) and the anatomy of
graft's training step, each configuration in a fresh process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

from speed_runs import child_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def plain_loop(size: int, steps: int, batch: int = 32, classes: int = 10, layout: str = "nchw") -> float:
    """img/s of the hand-written loop: timm Lite0 + linear, fp32, AdamW, on in-memory tensors."""
    import torch

    from graft.backbones import build_backbone

    bb = build_backbone("efficientnet_lite0")
    model = torch.nn.Sequential(bb.model, torch.nn.Linear(bb.feature_dim, classes)).train()
    model.requires_grad_(True)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (batch,))
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()  # the first step (allocations, oneDNN primitive creation) is warm-up
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def step_rate(mode: str, size: int, steps: int, batch: int) -> float:
    """img/s of one graft training step configuration (see :func:`step_anatomy`)."""
    import contextlib

    import torch

    import graft.precision as precision
    from graft.backbones import build_backbone
    from graft.fold import fold_frozen_bn
    from graft.layerwise import layer_groups, set_trainable, train_mode
    from graft.memory import keep_freed_memory
    from graft.model import Classifier, head_config, make_head
    from graft.precision import device_and_amp, fp32_depthwise, out_of_place_activations

    if "every depthwise" in mode:  # graft's choice before: all depthwise layers fp32, 3x3 stride-1 ones included
        precision.slow_in_bf16 = precision.is_depthwise

    _, amp = device_and_amp("fp32" if "fp32" in mode else "auto", size)
    bb = build_backbone("efficientnet_lite0")
    model = Classifier(bb.model, make_head(head_config("logreg", bb.feature_dim, 0, 0.0), 10))
    groups = layer_groups(model.features.net)
    set_trainable(model, groups, len(groups) if mode.startswith("full") else 2)
    train_mode(model, groups, freeze_bn=True)  # graft's default (finetune.freeze_bn)
    model = model.to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused="not fused" not in mode)
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    body = cast(Any, model.features.net)

    def flat(gs: list) -> torch.nn.Sequential:
        return torch.nn.Sequential(*[m for g in gs for m in (g if isinstance(g, torch.nn.ModuleList) else [g])])

    prefix, top = flat(groups[:-2]), flat(groups[-2:])

    def forward(x: torch.Tensor) -> torch.Tensor:
        if "no_grad" not in mode:
            return model.logits(x)
        with torch.no_grad():  # timm EfficientNet: stem, blocks[:-1] (the frozen groups)
            h = prefix(model.features.normalize(x))
        return model.head(body.forward_head(top(h)))

    depthwise = fp32_depthwise(model) if amp is not None and "bf16 depthwise" not in mode else contextlib.nullcontext()
    activations = out_of_place_activations(model, amp is not None and "in place" not in mode)
    fuse = "not fused into" not in mode  # the activations computed by the convolutions' oneDNN call (graft.fold)
    folded = fold_frozen_bn(model, fuse_activations=fuse) if "not folded" not in mode else contextlib.nullcontext()
    with keep_freed_memory("malloc defaults" not in mode), depthwise, activations, folded:
        for i in range(steps + 1):
            if i == 1:
                t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                loss = torch.nn.functional.cross_entropy(forward(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return batch * steps / (time.perf_counter() - t0)


def step_anatomy(size: int, steps: int, batch: int = 32, bf16: bool = True) -> dict[str, float]:
    """img/s of graft's training step (channels_last, bf16 where native with the depthwise convolutions that are
    slow in bf16 in fp32 and activations out of place, frozen BatchNorm folded into the convolutions and the
    activations after it computed by them, freed memory kept for reuse), each row in a fresh process: every layer
    trains, also with glibc's default malloc settings, without the fold, with the fold but the activations run on
    their own, in fp32, with every depthwise convolution in fp32, with in-place activations,
    with every depthwise convolution in bf16 (what graft avoids), and with AdamW's per-tensor loop instead of its
    fused kernel; ``last_n: 2`` by ``requires_grad``
    alone; and ``last_n: 2`` with the frozen prefix under an explicit ``no_grad``. Without ``bf16`` (a CPU
    without native bf16, where graft's step is fp32) the rows that differ from ``full`` only in bf16 are left
    out."""
    modes = (
        "full",
        "full, glibc malloc defaults",
        "full, BatchNorm not folded",
        "full, act. not fused into conv",
        "full fp32",
        "full, every depthwise fp32",
        "full, activations in place",
        "full, bf16 depthwise",
        "full, AdamW not fused",
        "last_n 2 (requires_grad)",
        "last_n 2 (+ no_grad prefix)",
    )
    if not bf16:
        modes = tuple(m for m in modes if "fp32" not in m and "bf16" not in m and "in place" not in m)
    out = {}
    for mode in modes:  # each in a fresh process: glibc's malloc state (and oneDNN's caches) start as a user's do
        code = f"import speed_steps as t; print(t.step_rate({mode!r}, {size}, {steps}, {batch}))"
        done = subprocess.run(
            [sys.executable, "-c", code], env=child_env(REPO / "bench"), capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise SystemExit(f"step row {mode!r} failed:\n{done.stderr[-3000:]}")
        out[mode] = float(done.stdout.strip().splitlines()[-1])
        print(f"  step {mode}: {out[mode]:.1f} img/s", flush=True)
    return out
