"""The exported head of auto's ``ensemble`` candidate (fitted by :mod:`graft.ensemble`): plain modules, so the
model exports to ONNX like any other head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class EnsembleHead(nn.Module):
    """Features -> log of the mean of the members' softmax probabilities; member ``i`` reads the columns in the
    buffer ``columns_i`` (positions in the feature vector, saved with the state dict)."""

    def __init__(self, members: Sequence[nn.Module], widths: Sequence[int], n_classes: int):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.n_classes = n_classes
        for i, width in enumerate(widths):
            self.register_buffer(f"columns_{i}", torch.zeros(width, dtype=torch.int64))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        columns = [getattr(self, f"columns_{i}") for i in range(len(self.members))]
        probs = [torch.softmax(m(f.index_select(1, c)), dim=1) for m, c in zip(self.members, columns, strict=True)]
        return torch.log(torch.stack(probs).mean(0).clamp_min(1e-12))
