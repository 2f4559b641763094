"""Feature taps: the modules that turn a network body into feature columns.

A tap is one group of feature columns (Head2Toe, Evci et al. 2022: features from many depths, plus
raw pixels, often transfer better than the last layer alone). :class:`TapExtractor` computes the
taps in one forward pass and always returns their columns in this order:

1. ``raw``: the input (RGB in [0, 1], before normalisation) turned grey with the ITU-R 601 weights
   and area-averaged to ``raw_size x raw_size``: ``raw_size**2`` columns in [0, 1], row-major.
2. ``stages``: the global-average-pooled output of each backbone stage, shallow to deep.
3. ``last``: the backbone's usual pooled features.

Everything is plain modules (no custom autograd), so an extractor exports to ONNX as one graph.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from graft import GraftError
from graft.registry import check_raw_size

LUMA_601 = (0.299, 0.587, 0.114)  # ITU-R BT.601 grey = weighted R, G, B


def area_matrix(n: int, size: int) -> torch.Tensor:
    """A (size, n) matrix averaging n unit-width samples into ``size`` equal bins (exact area resampling).

    Row i weights sample j by the overlap of [j, j + 1) with bin i, over the bin width, so every row sums
    to 1 and any n (not only multiples of ``size``) works, unlike adaptive pooling in ONNX.
    """
    edges = np.arange(size + 1) * (n / size)
    j = np.arange(n)[None, :]
    overlap = np.minimum(edges[1:, None], j + 1) - np.maximum(edges[:-1, None], j)
    return torch.from_numpy(np.clip(overlap, 0.0, None) / (n / size)).float()


class RawPixels(nn.Module):
    """NCHW RGB in [0, 1] -> (N, size*size) grey pixels area-averaged to ``size x size``."""

    luma: torch.Tensor  # buffers, declared for the type checker (register_buffer sets them)
    area: torch.Tensor

    def __init__(self, crop: int, size: int):
        super().__init__()
        check_raw_size(size, crop)
        self.size = size
        self.register_buffer("luma", torch.tensor(LUMA_601).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("area", area_matrix(crop, size), persistent=False)

    def _matrix(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return self.area if n == self.area.shape[1] else area_matrix(n, self.size).to(like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = (x * self.luma).sum(1)  # (N, H, W)
        rows, cols = self._matrix(x.shape[-2], x), self._matrix(x.shape[-1], x)
        return (rows @ grey @ cols.T).flatten(1)


class Normalize(nn.Module):
    """(x - mean) / std with the constants as buffers, so they travel into ONNX."""

    mean: torch.Tensor  # buffers, declared for the type checker (register_buffer sets them)
    std: torch.Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class FeatureExtractor(nn.Module):
    """Normalise, run the network body, return pooled features of shape (N, D)."""

    def __init__(self, body: nn.Module | None, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body

    @property
    def net(self) -> nn.Module:
        """The network body; only a raw-pixels-alone :class:`TapExtractor` has none, and never runs it."""
        if self.body is None:
            raise GraftError("this feature extractor computes raw pixels only: it has no network body")
        return self.body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


class TimmModel(Protocol):
    """The timm model API graft uses beyond ``nn.Module`` (``timm.create_model`` is typed as a plain module)."""

    num_features: int
    feature_info: list[dict[str, Any]]

    def get_classifier(self) -> nn.Module: ...

    def reset_classifier(self, num_classes: int) -> None: ...

    def forward_intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

    def forward_head(self, x: torch.Tensor) -> torch.Tensor: ...


class TapExtractor(FeatureExtractor):
    """Normalise once, run the body once, return the taps' columns concatenated in :data:`graft.registry.TAP_ORDER`.

    Args:
        body: the network (with its classifier removed), or None for ``taps=("raw",)`` alone.
        taps: canonical taps (see :func:`graft.registry.canonical_taps`).
        crop: the input side the raw tap's area matrix is built for (other sizes still work).
        sequence: ``body`` submodule paths in forward order, ending at the pooled output; empty means
            the body is a timm model and its ``forward_intermediates`` gives the stages.
        stage_paths: the submodules of ``sequence`` whose outputs are pooled as stage taps.
    """

    def __init__(
        self,
        body: nn.Module | None,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        taps: tuple[str, ...],
        crop: int,
        raw_size: int = 16,
        sequence: tuple[str, ...] = (),
        stage_paths: tuple[str, ...] = (),
    ):
        super().__init__(body, mean, std)
        self.taps, self.sequence, self.stage_paths = taps, tuple(sequence), tuple(stage_paths)
        self.raw = RawPixels(crop, raw_size) if "raw" in taps else None

    def _stages(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        if not self.sequence:  # timm: one pass yields the stage outputs and the final feature map
            timm_body = cast(TimmModel, self.net)
            x, inter = timm_body.forward_intermediates(x)
            return [t.mean((2, 3)) for t in inter], timm_body.forward_head(x)
        pooled = []
        for path in self.sequence:  # submodules looked up by name: registered once, under body
            x = self.net.get_submodule(path)(x)
            if path in self.stage_paths:
                pooled.append(x.mean((2, 3)))
        return pooled, torch.flatten(x, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.raw(x)] if self.raw is not None else []
        if "stages" in self.taps:
            stages, last = self._stages(self.normalize(x))
            parts += stages + ([last] if "last" in self.taps else [])
        elif "last" in self.taps:
            parts.append(self.net(self.normalize(x)))
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]
