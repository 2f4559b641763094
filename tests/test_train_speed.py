"""The fine-tune loop's speed helpers: freed memory kept for reuse, checkpoints written in the background,
decoded images kept across epochs. Each must be invisible in what the run produces."""

from __future__ import annotations

import platform
import resource
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from graft import GraftError
from graft.atomic import BackgroundWriter
from graft.batches import DecodedImages
from graft.memory import keep_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _faults_of_a_training_step() -> int:
    """Minor page faults of a forward/backward pass of a small conv net (33 MiB activations), after a warm-up
    pass: the fewest of three."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    x = torch.rand(16, 3, 128, 128)
    faults = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        net(x).square().mean().backward()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(faults[1:])


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def _drop_on_free(mib: int = 256) -> int:
    """malloc and fill ``mib`` MiB, free it: the resident bytes the free gave back to the kernel."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    block = libc.malloc(mib << 20)
    libc.memset(block, 1, mib << 20)
    held = _rss()
    libc.free(block)
    return held - _rss()


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_freed_memory_is_reused_inside_and_returned_outside() -> None:
    """Outside keep_freed_memory a freed 256 MiB block goes back to the kernel at once (glibc's default: an
    mmap per large block); inside it stays for reuse, and a training step's activations come back without page
    faults (measured: 0 against ~147,000 per step with glibc's defaults); on exit the kept memory is released."""
    block = 256 << 20
    assert _drop_on_free() > 0.9 * block
    with keep_freed_memory() as kept:
        assert kept
        with keep_freed_memory():  # nested: the inner exit leaves the outer setting in place
            pass
        assert _drop_on_free() < 0.05 * block
        held = _rss()
        assert _faults_of_a_training_step() < 20_000  # at most one 33 MiB activation again (8,192 pages)
    assert held - _rss() > 0.9 * block  # released on exit (malloc_trim)
    assert _drop_on_free() > 0.9 * block  # and glibc's defaults are back
    with keep_freed_memory(enabled=False) as kept:
        assert not kept


def test_background_writer_writes_in_order_and_reports_errors(tmp_path: Path) -> None:
    writer = BackgroundWriter()
    target = tmp_path / "ck.pt"
    for i in range(3):
        writer.submit(target, bytes([i]) * 1000)
    writer.wait()
    assert target.read_bytes() == bytes([2]) * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary files left
    (tmp_path / "dir").mkdir()
    writer.submit(tmp_path / "dir", b"x")  # a folder cannot be replaced by a file
    with pytest.raises((OSError, GraftError)):
        writer.wait()
    writer.wait()  # the error is reported once
    writer.submit(tmp_path / "dir", b"x")
    writer.wait(raise_error=False)  # joins, raises nothing
    with pytest.raises(KeyError), BackgroundWriter() as w:  # a training error wins over the write's error
        w.submit(tmp_path / "dir", b"x")
        raise KeyError("training failed")
    with pytest.raises((OSError, GraftError)), BackgroundWriter() as w:  # a clean block: exit reports the write
        w.submit(tmp_path / "dir", b"x")


def test_decoded_images_are_kept_within_the_budget(tmp_path: Path) -> None:
    for name in ("a", "b"):
        Image.fromarray(np.full((40, 50, 3), 7 if name == "a" else 9, np.uint8)).save(tmp_path / f"{name}.png")
    decoded = DecodedImages(32, max_bytes=40 * 50 * 3)  # room for one image
    first = decoded.load(str(tmp_path / "a.png"))
    decoded.load(str(tmp_path / "b.png"))
    (tmp_path / "a.png").unlink()
    (tmp_path / "b.png").unlink()
    assert decoded.load(str(tmp_path / "a.png")) is first  # kept: not read again
    with pytest.raises((OSError, ValueError)):  # over the budget: read again, and the file is gone
        decoded.load(str(tmp_path / "b.png"))


def _val_source(model_ctor, n: int = 10, size: int = 32):
    """A classifier and ``n`` fixed val images in two batches, as fit's ValActivations sees them."""
    from graft.frozen import ValActivations

    model = model_ctor()
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)).numpy()
    whole_calls: list[int] = []

    def batches():
        yield from (
            torch.from_numpy(x[i : i + 6]).contiguous(memory_format=torch.channels_last) for i in range(0, n, 6)
        )

    def whole(m):
        whole_calls.append(1)
        with torch.no_grad():
            return m.eval().logits(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).numpy()

    return model, (lambda **kw: ValActivations(n, batches, whole, None, **kw)), whole, whole_calls


def _tiny() -> torch.nn.Module:
    from tests.test_finetune import tiny_classifier

    return tiny_classifier()[0]


def _lite0() -> torch.nn.Module:
    import timm

    from graft.model import Classifier, head_config, make_head
    from graft.taps import FeatureExtractor

    torch.manual_seed(0)
    body = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
    feats = FeatureExtractor(body, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return Classifier(feats, make_head(head_config("logreg", body.num_features, 0, 0.0), 3))


@pytest.mark.parametrize("ctor", [_tiny, _lite0], ids=["sequential", "timm_efficientnet"])
def test_val_logits_from_kept_frozen_activations_equal_the_whole_model(ctor) -> None:
    """For every number of frozen groups the cut gives the whole model's val logits; the frozen prefix runs
    over the val images once per number of frozen groups, and the trainable top every call."""
    from graft.layerwise import layer_groups

    model, make, whole, whole_calls = _val_source(ctor)
    n_groups = len(layer_groups(model.features.net))
    val = make()
    for n_frozen in range(1, n_groups + 1):
        expected = whole(model)
        for _ in range(2):
            np.testing.assert_allclose(val.logits(model, n_frozen), expected, rtol=1e-5, atol=1e-6)
    assert val.prefix_passes == n_groups  # not 2 * n_groups: the second call reused the kept activations
    assert len(whole_calls) == n_groups  # only the expected values: the cached path never fell back
    with torch.no_grad():  # the trainable top moves: the next call sees it, the prefix is not rerun
        model.head.net[0].weight.mul_(2.0)
    np.testing.assert_allclose(val.logits(model, n_groups), whole(model), rtol=1e-5, atol=1e-6)
    assert val.prefix_passes == n_groups


def test_val_logits_fall_back_to_the_whole_model() -> None:
    """Nothing frozen, activations over the memory budget, or a body that is not a chain of its groups:
    the whole model runs (and the numbers are the same)."""
    model, make, whole, whole_calls = _val_source(_tiny)
    expected = whole(model)
    whole_calls.clear()
    np.testing.assert_array_equal(make().logits(model, 0), expected)
    np.testing.assert_array_equal(make(max_bytes=1).logits(model, 1), expected)
    assert len(whole_calls) == 2

    class Branchy(nn.Module):  # groups found by the generic rule, but the forward is not a chain
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return (h + self.b(h)).mean((2, 3))

    from graft.frozen import split_body

    assert split_body(Branchy(), 1) is None


def test_fit_with_kept_val_activations_matches_the_whole_val_pass(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A staged run (all frozen, then the top group) keeps the frozen val activations, and every number
    it produces equals a run that passes every val image through the whole model each epoch."""
    import graft.frozen as frozen
    from graft.model import load_model
    from graft.tasks.finetune import finetune
    from graft.tasks.ingest import ingest
    from tests.helpers import write_tree
    from tests.test_finetune import ft_params

    write_tree(ws / "raw", classes=("a", "b", "c"), per_class=8)
    params = ft_params(ws, strategy="staged", head_epochs=1, last_n=1, epochs=3, init="random")
    ingest(params)
    passes: list[int] = []
    real = frozen.ValActivations._build
    monkeypatch.setattr(frozen.ValActivations, "_build", lambda self, *a: passes.append(1) or real(self, *a))
    finetune(params)
    kept = load_model(Path(params.train.model_dir))
    assert len(passes) == 2  # all groups frozen in epoch 1, all but the top one in epochs 2-3
    monkeypatch.setattr(frozen, "split_body", lambda body, n: None)
    finetune(params)
    whole = load_model(Path(params.train.model_dir))
    assert kept["history"] == whole["history"]
    for k, v in whole["state_dict"].items():
        assert torch.equal(v, kept["state_dict"][k]), k
