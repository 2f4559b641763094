"""Decode memory is bounded across threads: decoders share one budget (graft.images.DECODE_MEMORY_BYTES).

A 9400 x 9400 PNG under Pillow's pixel limit costs 1.76 GB to decode; with ``workers`` decoder
threads each could hold one at once. The test shrinks the budget to 1.5 large images and checks,
with a slowed decoder, that two large images never decode at the same time while small ones flow.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import graft.images
from tests.faults.helpers import run_ingest
from tests.helpers import write_tree

BIG = (1200, 1000)


def test_large_decodes_in_two_threads_share_one_memory_budget(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tree(ws / "raw", per_class=6)
    rng = np.random.default_rng(0)
    for i in range(4):
        arr = rng.integers(0, 256, (BIG[1], BIG[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(ws / "raw" / ("cat", "dog")[i % 2] / f"big-{i}.png")
    one_big = BIG[0] * BIG[1] * (3 + 8)  # graft.images' estimate for an RGB image: pixels + conversion copies
    monkeypatch.setattr(graft.images, "DECODE_MEMORY_BYTES", int(one_big * 1.5), raising=False)
    active, peak, guard = [0], [0], threading.Lock()
    real_load = ImageFile.ImageFile.load

    def slow_load(self):
        big = self.size == BIG
        if big:
            with guard:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.3)  # long enough that two unbounded threads overlap
        try:
            return real_load(self)
        finally:
            if big:
                with guard:
                    active[0] -= 1

    monkeypatch.setattr(ImageFile.ImageFile, "load", slow_load)

    summary, manifest, _ = run_ingest(ws, {"ingest": {"workers": 2}})

    assert peak[0] == 1
    assert summary["images"] == 16 and set(manifest["width"]) == {40, BIG[0]}
