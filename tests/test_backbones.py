"""Tests for graft.backbones: real Lite0 weights, key mapping, fingerprints and missing-weights errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from graft import GraftError
from graft.backbones import (REGISTRY, _load_state_dict, _TinyCNN, build_backbone, embedded_lite0_path,
                             map_lite0_keys)
from graft.images import preprocess
from tests.conftest import make_params

LITE0_TENSORS = 247  # parameters + buffers of timm's efficientnet_lite0, num_batches_tracked excluded


def _one_line(exc_info: pytest.ExceptionInfo) -> str:
    """The error message, checked to be exactly one line."""
    msg = str(exc_info.value)
    assert msg and len(msg.splitlines()) == 1, repr(msg)
    return msg


@pytest.fixture(scope="module")
def lite0():
    """The EfficientNet-Lite0 backbone with its embedded ImageNet weights (built once)."""
    return build_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def lite0_sd() -> dict[str, torch.Tensor]:
    """The raw (lukemelas-keyed) Lite0 state dict shipped by the weights package."""
    return _load_state_dict(embedded_lite0_path())


def _timm_lite0():
    """A fresh timm efficientnet_lite0 without weights."""
    import timm

    return timm.create_model("efficientnet_lite0", pretrained=False)


def _imagenet_top(bb, img: Image.Image, k: int) -> list[int]:
    """ImageNet class indices of the top ``k`` predictions of the backbone's original classifier."""
    x = torch.from_numpy(preprocess(img, bb.preprocess))[None]
    with torch.no_grad():
        logits = bb.imagenet_head(bb.model(x))
    return logits.topk(k, dim=1).indices[0].tolist()


@pytest.mark.slow
def test_lite0_recognises_a_cat(lite0) -> None:
    """scikit-image's chelsea photo gets an ImageNet cat class in the top 3."""
    from skimage import data

    top3 = _imagenet_top(lite0, Image.fromarray(data.chelsea()), 3)
    assert {281, 282, 285} & set(top3), top3  # tabby, tiger cat, Egyptian cat


@pytest.mark.slow
def test_lite0_recognises_espresso(lite0) -> None:
    """scikit-image's coffee photo is top-1 espresso (967)."""
    from skimage import data

    assert _imagenet_top(lite0, Image.fromarray(data.coffee()), 1) == [967]


@pytest.mark.slow
def test_lite0_backbone_shape_and_frozen(lite0) -> None:
    """Lite0 gives 1280-d pooled features, is in eval mode and has no trainable parameter."""
    assert lite0.feature_dim == 1280
    assert lite0.preprocess.crop == 224 and lite0.preprocess.resize == 256
    assert not lite0.model.training
    assert not any(p.requires_grad for p in lite0.model.parameters())
    with torch.no_grad():
        out = lite0.model(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, 1280)


@pytest.mark.slow
def test_map_lite0_keys_maps_every_tensor(lite0_sd) -> None:
    """All 247 tensors are renamed onto timm's names with matching shapes."""
    net = _timm_lite0()
    mapped = map_lite0_keys(lite0_sd, net)
    target = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len([k for k in lite0_sd if not k.endswith("num_batches_tracked")]) == LITE0_TENSORS
    assert len(mapped) == LITE0_TENSORS
    assert set(mapped) == set(target)
    assert all(tuple(mapped[k].shape) == tuple(v.shape) for k, v in target.items())
    missing, unexpected = net.load_state_dict(mapped, strict=False)
    assert unexpected == []
    assert all(k.endswith("num_batches_tracked") for k in missing)
    assert torch.equal(net.conv_stem.weight, lite0_sd["_conv_stem.weight"])


@pytest.mark.slow
def test_map_lite0_keys_rejects_wrong_shape(lite0_sd) -> None:
    """A tensor with the wrong shape fails naming the timm key and both shapes."""
    bad = dict(lite0_sd)
    bad["_bn0.weight"] = torch.ones(7)
    with pytest.raises(GraftError) as info:
        map_lite0_keys(bad, _timm_lite0())
    msg = _one_line(info)
    assert "bn1.weight" in msg
    assert "(7,)" in msg and "(32,)" in msg


@pytest.mark.slow
def test_map_lite0_keys_rejects_missing_tensor(lite0_sd) -> None:
    """A state dict lacking a tensor fails naming the uncovered timm key."""
    bad = {k: v for k, v in lite0_sd.items() if k != "_conv_head.weight"}
    with pytest.raises(GraftError, match=r"no tensor for conv_head\.weight"):
        map_lite0_keys(bad, _timm_lite0())


def test_map_lite0_keys_rejects_unknown_key() -> None:
    """A lukemelas-style key that has no timm counterpart is an error."""
    with pytest.raises(GraftError, match="unexpected key _mystery.weight"):
        map_lite0_keys({"_blocks.0._depthwise_conv.weight": torch.zeros(1), "_mystery.weight": torch.zeros(1)},
                       _timm_lite0())


def test_map_lite0_keys_passes_timm_keys_through() -> None:
    """A state dict already in timm naming is returned unchanged."""
    sd = _timm_lite0().state_dict()
    assert map_lite0_keys(sd, _timm_lite0()) is sd


@pytest.mark.slow
def test_lite0_fingerprint_stable_and_size_sensitive(lite0) -> None:
    """Two Lite0 builds share a fingerprint; another image_size changes it and the crop."""
    again = build_backbone("efficientnet_lite0")
    smaller = build_backbone("efficientnet_lite0", image_size=192)
    assert again.fingerprint == lite0.fingerprint
    assert smaller.fingerprint != lite0.fingerprint
    assert smaller.preprocess.crop == 192
    assert smaller.preprocess.resize == round(192 * 256 / 224)


def test_tiny_fingerprint_stable_and_size_sensitive() -> None:
    """tiny_cnn's fingerprint is the same across builds and changes with image_size."""
    a, b = build_backbone("tiny_cnn"), build_backbone("tiny_cnn")
    c = build_backbone("tiny_cnn", image_size=48)
    assert a.fingerprint == b.fingerprint
    assert re.fullmatch(r"[0-9a-f]{16}", a.fingerprint)
    assert c.fingerprint != a.fingerprint
    assert (c.preprocess.crop, c.preprocess.resize) == (48, 54)


def test_fingerprint_changes_with_weights(tmp_path: Path) -> None:
    """Other tiny_cnn weights give another fingerprint; the same weights file gives the same one."""
    net = _TinyCNN()
    torch.nn.init.zeros_(net[0].weight)
    path = tmp_path / "tiny.pt"
    torch.save(net.state_dict(), path)
    custom = build_backbone("tiny_cnn", weights=str(path))
    assert custom.fingerprint != build_backbone("tiny_cnn").fingerprint
    assert custom.fingerprint == build_backbone("tiny_cnn", weights=str(path)).fingerprint


def test_tiny_features_identical_across_builds() -> None:
    """Two tiny_cnn builds give bit-identical features whatever the global RNG state."""
    x = torch.rand(3, 3, 32, 32)
    torch.manual_seed(1)
    a = build_backbone("tiny_cnn")
    torch.manual_seed(2)
    b = build_backbone("tiny_cnn")
    with torch.no_grad():
        fa, fb = a.model(x), b.model(x)
    assert fa.shape == (3, 32)
    assert torch.equal(fa, fb)


def test_tiny_build_leaves_global_rng_alone() -> None:
    """Building tiny_cnn restores the caller's torch RNG state."""
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    build_backbone("tiny_cnn")
    assert torch.equal(torch.rand(4), expected)


def test_resnet18_missing_weights_names_file_and_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without cached weights, resnet18 fails with one line naming resnet18-*.pth and where to put it."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    with pytest.raises(GraftError) as info:
        build_backbone("resnet18")
    msg = _one_line(info)
    name = re.search(r"resnet18-[0-9a-f]+\.pth", msg)
    assert name, msg
    assert str(hub / "checkpoints" / name.group(0)) in msg
    assert "featurize.weights" in msg


def test_resnet18_loads_weights_from_hub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A state dict placed where the error says is picked up: 512-d features, fc moved to the head."""
    import torchvision

    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    with pytest.raises(GraftError) as info:
        build_backbone("resnet18")
    name = re.search(r"resnet18-[0-9a-f]+\.pth", str(info.value)).group(0)
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), hub / "checkpoints" / name)
    bb = build_backbone("resnet18")
    assert bb.feature_dim == 512
    assert bb.weights_source == str(hub / "checkpoints" / name)
    with torch.no_grad():
        assert bb.model(torch.rand(1, 3, 64, 64)).shape == (1, 512)
        assert bb.imagenet_head(torch.rand(1, 512)).shape == (1, 1000)


def test_resnet18_rejects_foreign_weights(tmp_path: Path) -> None:
    """A readable state dict of another architecture fails naming the file."""
    path = tmp_path / "not_resnet.pt"
    torch.save(_TinyCNN().state_dict(), path)
    with pytest.raises(GraftError) as info:
        build_backbone("resnet18", weights=str(path))
    msg = _one_line(info)
    assert str(path) in msg and "resnet18" in msg


def test_unreadable_weights_file(tmp_path: Path) -> None:
    """A weights file of random bytes fails with one line naming it."""
    path = tmp_path / "garbage.pth"
    path.write_bytes(np.random.default_rng(0).bytes(256))
    with pytest.raises(GraftError) as info:
        build_backbone("tiny_cnn", weights=str(path))
    msg = _one_line(info)
    assert "cannot read weights" in msg and str(path) in msg


@pytest.mark.parametrize("backbone", ["tiny_cnn", "efficientnet_lite0", "resnet18"])
def test_missing_weights_path_from_params(tmp_path: Path, backbone: str) -> None:
    """featurize.weights pointing at a missing file fails naming that path."""
    missing = tmp_path / "no such dir" / "weights.pth"
    fp = make_params(tmp_path, {"featurize": {"backbone": backbone, "weights": str(missing)}}).featurize
    with pytest.raises(GraftError) as info:
        build_backbone(fp.backbone, fp.weights, fp.image_size)
    msg = _one_line(info)
    assert str(missing) in msg
    assert "not found" in msg


def test_unknown_backbone() -> None:
    """An unknown backbone name fails naming it and listing the registered ones."""
    with pytest.raises(GraftError) as info:
        build_backbone("vgg_nonexistent")
    msg = _one_line(info)
    assert "'vgg_nonexistent'" in msg
    assert all(name in msg for name in REGISTRY)
