"""Real demo data: scikit-learn's bundled handwritten digits (UCI optdigits) as a class-folder tree."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from graft.atomic import write_with


def write_digits(out: str | Path, per_class: int | None = None) -> dict[str, int]:
    """Write the 1,797 8x8 digit scans as dark-on-white PNGs under ``out/<digit>/``.

    Args:
        out: the data root (e.g. ``data/raw``).
        per_class: keep only the first N images of each class (small real subsets for tests).

    Returns:
        Images written per class.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts: dict[str, int] = {}
    for i, (img, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        label = str(int(target))
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        pixels = (255 - np.clip(img * 16, 0, 255)).astype(np.uint8)  # 0..16 ink -> dark on white
        image = Image.fromarray(pixels, mode="L")
        write_with(Path(out) / label / f"digit-{i:04d}.png", partial(image.save, format="PNG"))
        counts[label] = counts.get(label, 0) + 1
    return counts
