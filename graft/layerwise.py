"""Fine-tuning's layer-wise rules: which backbone groups train in an epoch, and at what learning rate.

The backbone splits into groups from input to output (:func:`layer_groups`), the unit of the
``last_n`` and ``staged`` strategies and of layer-wise learning-rate decay: the top group trains at
``lr * backbone_lr_mult`` and each group below it ``layer_decay`` times slower. Frozen groups stay in
inference mode, so their BatchNorm running statistics never move.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from graft.params import FinetuneParams

if TYPE_CHECKING:
    from graft.model import Classifier


def layer_groups(body: nn.Module) -> list[nn.Module]:
    """The backbone's blocks from input to output (the unit of ``last_n`` and of layer-wise LR decay)."""
    sub = body.get_submodule
    if hasattr(body, "conv_stem") and hasattr(body, "blocks"):  # timm EfficientNet / MobileNet family
        stem, head = nn.ModuleList([sub("conv_stem"), sub("bn1")]), nn.ModuleList([sub("conv_head"), sub("bn2")])
        return [stem, *sub("blocks").children(), head]
    if hasattr(body, "layer4"):  # torchvision ResNet
        return [nn.ModuleList([sub("conv1"), sub("bn1")]), *(sub(f"layer{i}") for i in range(1, 5))]
    features = getattr(body, "features", None)
    if isinstance(features, nn.Sequential):  # torchvision MobileNet/EfficientNet/ConvNeXt
        return list(features)
    groups: list[list[nn.Module]] = []  # generic: a new group at every convolution
    for child in body.children():
        if isinstance(child, nn.Conv2d) or not groups:
            groups.append([])
        groups[-1].append(child)
    return [nn.ModuleList(g) for g in groups]


def trainable_groups(n_groups: int, fp: FinetuneParams, epoch: int) -> int:
    """How many of the top backbone groups train in ``epoch`` (0-based) under the strategy."""
    if fp.strategy == "head" or (fp.strategy == "staged" and epoch < fp.head_epochs):
        return 0
    if fp.strategy == "full" or (fp.strategy == "staged" and not fp.last_n):
        return n_groups
    return min(fp.last_n or 0, n_groups)


def set_trainable(model: Classifier, groups: list[nn.Module], n_top: int) -> None:
    """Unfreeze the head and the top ``n_top`` groups; freeze everything else."""
    model.features.requires_grad_(False)
    model.head.requires_grad_(True)
    for g in groups[len(groups) - n_top :]:
        g.requires_grad_(True)


def train_mode(model: Classifier, groups: list[nn.Module], freeze_bn: bool = False) -> None:
    """Training mode for trainable parts only: frozen groups stay in eval (BatchNorm stats fixed).

    ``freeze_bn``: every BatchNorm keeps its pretrained running statistics (eval mode) while its weights train.
    """
    model.train()
    for g in groups:
        if not any(p.requires_grad for p in g.parameters()):
            g.eval()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def param_groups(model: Classifier, groups: list[nn.Module], fp: FinetuneParams) -> list[dict]:
    """AdamW groups: the head at ``lr``; backbone group i at ``lr * backbone_lr_mult * layer_decay**depth``.

    Biases and normalisation weights get no weight decay.
    """
    out = []

    def add(params: list[nn.Parameter], lr: float, name: str) -> None:
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        for ps, wd, suffix in ((decay, fp.weight_decay, ""), (no_decay, 0.0, "/no_decay")):
            if ps:
                out.append({"params": ps, "lr": lr, "weight_decay": wd, "name": name + suffix})

    add(list(model.head.parameters()), fp.lr, "head")
    seen = {id(p) for p in model.head.parameters()}
    for i, g in enumerate(groups):
        depth = len(groups) - 1 - i
        ps = [p for p in g.parameters() if id(p) not in seen]
        seen.update(id(p) for p in ps)
        add(ps, fp.lr * fp.backbone_lr_mult * fp.layer_decay**depth, f"backbone.{i}")
    return out


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(
    opt: torch.optim.Optimizer, fp: FinetuneParams, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total = fp.epochs * steps_per_epoch
    if fp.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total)
    warmup = round(fp.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
