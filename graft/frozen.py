"""The frozen prefix of a fine-tune, run once: validation images are not augmented, so while the lower
backbone groups stay frozen (``last_n``, ``staged``, ``head``, LP-FT's probe phase) their output on the val
images is the same every epoch. :class:`ValActivations` keeps it and runs only the trainable top per epoch.

The cut is made where the body's forward is a plain chain of its groups: an ``nn.Sequential`` body whose
groups are its children in order, and timm's ``EfficientNet`` class (graft's Lite0-2, MobileNetV2); any other
body, a cut whose logits differ from the whole model's, or a cache over its memory budget falls back to
running the whole model. Measured in ``bench/train_speed.py`` (``last_n: 2`` whole runs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from graft.layerwise import layer_groups
from graft.model import Classifier

Stage = Callable[[torch.Tensor], torch.Tensor]
Batches = Callable[[], Iterable[torch.Tensor]]


def split_body(body: nn.Module, n_frozen: int) -> tuple[Stage, Stage] | None:
    """``(prefix, rest)`` with ``rest(prefix(x)) == body(x)`` and the first ``n_frozen`` groups of
    :func:`graft.layerwise.layer_groups` in ``prefix``; None where the body is not a known chain."""
    if n_frozen <= 0:  # everything trains (the usual full fine-tune): no cut
        return None
    groups = layer_groups(body)
    if n_frozen > len(groups):
        return None
    if n_frozen == len(groups):  # all frozen: the pooled features themselves
        return body, nn.Identity()
    if isinstance(body, nn.Sequential):
        kids = list(body.children())
        if [m for g in groups for m in g.children()] != kids:  # groups that are not its children in order
            return None
        cut = sum(len(list(g.children())) for g in groups[:n_frozen])
        return nn.Sequential(*kids[:cut]), nn.Sequential(*kids[cut:])
    sub = body.get_submodule
    if all(hasattr(body, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")):
        stages = list(sub("blocks").children())  # groups: [stem, *stages, head]
        pre = nn.Sequential(sub("conv_stem"), sub("bn1"), *stages[: n_frozen - 1])
        post = nn.Sequential(*stages[n_frozen - 1 :], sub("conv_head"), sub("bn2"))
        head: Stage = body.forward_head  # type: ignore[assignment]
        return pre, lambda h: head(post(h))
    return None


class ValActivations:
    """Val logits for :func:`graft.tune.fit`, with the frozen prefix's output on the val images computed once
    per number of frozen groups (``max_bytes`` of activations at most).

    ``batches()`` yields the ``n`` val images (eval transform) as model-ready tensors, in a fixed order;
    ``whole(model)`` is the uncached path (every group run on every image).
    """

    def __init__(
        self,
        n: int,
        batches: Batches,
        whole: Callable[[Classifier], np.ndarray],
        amp: torch.dtype | None,
        max_bytes: int = 256 << 20,
    ) -> None:
        self.n, self._batches, self._whole, self.amp, self.max_bytes = n, batches, whole, amp, max_bytes
        self._key: int | None = None
        self._cut: tuple[Stage, list[torch.Tensor]] | None = None  # the trainable top and the kept activations
        self.prefix_passes = 0  # how many times the prefix ran over the val images (tests read it)

    def logits(self, model: Classifier, n_frozen: int) -> np.ndarray:
        """The model's val logits; ``n_frozen`` lower groups are frozen (their weights as at the call that
        first saw this ``n_frozen``). ``model`` is the same module at every call."""
        model.eval()
        device = next(model.parameters()).device
        autocast = torch.autocast(device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)
        with torch.no_grad(), autocast:
            if self._key != n_frozen:
                self._key, self._cut = n_frozen, self._build(model, n_frozen)
            if self._cut is not None:
                rest, acts = self._cut
                return np.concatenate([model.head(rest(a)).float().cpu().numpy() for a in acts])
        return self._whole(model)  # no cut here, the cut disagreed with the whole model, or over the budget

    def _build(self, model: Classifier, n_frozen: int) -> tuple[Stage, list[torch.Tensor]] | None:
        """The cut for ``n_frozen`` and the prefix's output on every val image, or None (run the whole model)."""
        split = split_body(model.features.net, n_frozen) if self.n else None
        if split is None:
            return None
        prefix, rest = split
        self.prefix_passes += 1
        acts: list[torch.Tensor] = []
        size = seen = 0
        for x in self._batches():
            a = prefix(model.features.normalize(x))
            if not acts:  # the cut must give the whole model's logits (checked on a few images)
                cut = model.head(rest(a[:4])).float()
                if not torch.allclose(cut, model.logits(x[:4]).float(), rtol=1e-3, atol=1e-4):
                    return None
            size, seen = size + a.numel() * a.element_size(), seen + len(a)
            if size / seen * self.n > self.max_bytes:
                return None
            acts.append(a)
        return rest, acts
