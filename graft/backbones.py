"""Backbones: a registry name plus weights -> a frozen feature extractor, described and fingerprinted.

:func:`build_backbone` turns a :class:`~graft.registry.BackboneConfig` plus its weights file
(:mod:`graft.weights`) into a :class:`Backbone`: a module mapping RGB in [0, 1], NCHW float32, to
features (:mod:`graft.taps`), its Preprocess, and the feature-cache fingerprint.
:func:`describe_backbone` gives the same description without building the model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from graft import GraftError
from graft.images import Preprocess
from graft.registry import REGISTRY, BackboneConfig, backbone_config, canonical_taps, check_raw_size, tap_slices
from graft.weights import weights_digest, weights_path

if TYPE_CHECKING:
    from torch import nn

    from graft.taps import FeatureExtractor

FEATURE_VERSION = 2  # 2: centre box resampled in one pass. Bump when the pooling or preprocessing code changes meaning
RAW_SIZE = 16  # raw-pixel tap side: 256 grey values, enough for a linear baseline on small images


@dataclass
class Backbone:
    """A feature extractor with everything needed to reproduce its features."""

    name: str
    model: FeatureExtractor
    preprocess: Preprocess
    feature_dim: int  # all taps together
    weights_sha256: str | None  # None for the raw-pixel tap alone (no weights)
    weights_source: str
    imagenet_head: nn.Module | None = field(default=None, repr=False)  # original classifier, if any
    taps: tuple[str, ...] = ("last",)
    raw_size: int = RAW_SIZE
    stages: tuple[tuple[str, int], ...] = ()  # (stage name, channels) of the stage tap, if taken

    @property
    def fingerprint(self) -> str:
        """Content key of the features: changes whenever weights, preprocessing or taps change."""
        return fingerprint_of(self.describe())

    @property
    def tap_slices(self) -> dict[str, slice]:
        """Column range of each tap in the features (see :func:`graft.taps.tap_slices`)."""
        return tap_slices(self.describe())

    def describe(self) -> dict:
        return _description(
            self.name, self.weights_sha256, self.feature_dim, self.preprocess, self.taps, self.raw_size, self.stages
        )


def _description(
    name: str,
    weights_sha256: str | None,
    feature_dim: int,
    pp: Preprocess,
    taps: tuple[str, ...] = ("last",),
    raw_size: int = RAW_SIZE,
    stages: Sequence = (),
) -> dict:
    out = {
        "name": name,
        "weights_sha256": weights_sha256,
        "feature_dim": feature_dim,
        "pool": "avg",
        "feature_version": FEATURE_VERSION,
        **pp.as_dict(),
    }
    if taps != ("last",):  # plain features keep today's description: cache keys must not move
        out["taps"] = list(taps)
        out.update({"raw_size": raw_size} if "raw" in taps else {})
        out.update({"stages": [[n, d] for n, d in stages]} if "stages" in taps else {})
    return out


def fingerprint_of(description: dict) -> str:
    """The feature-cache key of a :meth:`Backbone.describe` dict."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def weights_present(name: str, weights: str | None = None) -> bool:
    """Whether the backbone's weights are available offline now (an unknown name is a GraftError)."""
    cfg = backbone_config(name)
    try:
        weights_path(cfg, weights)
    except GraftError:
        return False
    return True


def local_backbones() -> list[str]:
    """Registry names whose weights are available offline now (the test backbone tiny_cnn left out)."""
    return [n for n, c in REGISTRY.items() if c.family != "random" and weights_present(n)]


def _layout(cfg: BackboneConfig, taps: tuple[str, ...], raw_size: int, crop: int) -> tuple[int, tuple]:
    """(total feature width, (stage name, channels) of the stage tap) for these taps."""
    if "raw" in taps:
        check_raw_size(raw_size, crop)
    if "stages" in taps and not cfg.stages:
        raise GraftError(f"{cfg.name} has no stage taps: use taps raw and/or last")
    stages = tuple((n, d) for n, _, d in cfg.stages) if "stages" in taps else ()
    raw = raw_size**2 if "raw" in taps else 0
    return raw + sum(d for _, d in stages) + (cfg.feature_dim if "last" in taps else 0), stages


def describe_backbone(
    name: str,
    weights: str | None = None,
    image_size: int | None = None,
    taps: Sequence[str] = ("last",),
    raw_size: int = RAW_SIZE,
) -> dict:
    """``build_backbone(...).describe()`` without building the model (for any registry or timm name).

    Lets featurize find a complete feature cache (and skip model construction, seconds for Lite0).
    Costs a hash of the weights file (cached per path and mtime); a missing file is a GraftError.
    """
    cfg, taps = backbone_config(name), canonical_taps(taps)
    pp = cfg.preprocess(image_size)
    dim, stages = _layout(cfg, taps, raw_size, pp.crop)
    sha = None if taps == ("raw",) else weights_digest(cfg, weights_path(cfg, weights), weights)
    return _description(cfg.name, sha, dim, pp, taps, raw_size, stages)


def build_backbone(
    name: str,
    weights: str | None = None,
    image_size: int | None = None,
    taps: Sequence[str] = ("last",),
    raw_size: int = RAW_SIZE,
) -> Backbone:
    """Build a frozen backbone in eval mode: a registry name, or ``timm:<model>`` for any timm model.

    Args:
        taps: which feature columns to compute, in one forward pass, concatenated in the order raw,
            stages, last (see :mod:`graft.taps`). ``("raw",)`` alone builds no network: the raw-pixel
            baseline with the same input contract. ``("last",)`` is the plain pooled features.
        raw_size: side of the grey area-averaged raw-pixel tap.
    """
    from graft.bodies import build_body  # torch and timm: only here, so describing a backbone stays light
    from graft.taps import FeatureExtractor, TapExtractor

    cfg, taps = backbone_config(name), canonical_taps(taps)
    pp = cfg.preprocess(image_size)
    dim, stages = _layout(cfg, taps, raw_size, pp.crop)
    net, head, sha, source = None, None, None, "none (raw pixels only)"
    if taps != ("raw",):
        path = weights_path(cfg, weights)
        net, head = build_body(cfg, path)
        sha, source = weights_digest(cfg, path, weights), str(path) if path else cfg.weights
    if taps == ("last",):
        model = FeatureExtractor(net, pp.mean, pp.std)
    else:
        model = TapExtractor(
            net,
            pp.mean,
            pp.std,
            taps=taps,
            crop=pp.crop,
            raw_size=raw_size,
            sequence=cfg.sequence,
            stage_paths=tuple(p for _, p, _ in cfg.stages),
        )
    bb = Backbone(cfg.name, model, pp, dim, sha, source, head, taps, raw_size, stages)
    bb.model.eval().requires_grad_(False)
    return bb
