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
from graft.precision import keep_freed_memory
from graft.tune import DecodedImages

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
