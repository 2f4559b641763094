"""Photo-like JPEG folders for the benchmarks, generated offline.

Bases are crops of scikit-image's bundled photos (plus tinted textures), rescaled to camera sizes,
recoloured, overlaid with soft shapes, given sensor-like noise and encoded at quality 75-95, some
with an EXIF rotation. Many files share a base but differ by a JPEG comment segment: distinct bytes
(so distinct cache keys) that decode at full cost, which keeps 20 000 files cheap to write.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

SMALL = (500, 375)  # a typical web photo
LARGE = (4000, 3000)  # a 12-megapixel phone photo


def _sources() -> list[np.ndarray]:
    """RGB uint8 source photos from scikit-image's bundled data (grey textures tinted)."""
    from skimage import data

    colour = [
        data.astronaut(),
        data.chelsea(),
        data.coffee(),
        data.rocket(),
        data.hubble_deep_field(),
        data.immunohistochemistry(),
        data.retina(),
        *data.stereo_motorcycle()[:2],
    ]
    grey = [data.camera(), data.coins(), data.moon(), data.grass(), data.gravel(), data.brick()]
    tints = np.array([[1.0, 0.85, 0.7], [0.7, 0.9, 1.0], [0.9, 1.0, 0.75]])
    tinted = [np.clip(g[..., None] * tints[i % 3], 0, 255).astype(np.uint8) for i, g in enumerate(grey)]
    return [c[..., :3] for c in colour] + tinted


def make_photo(rng: np.random.Generator, sources: list[np.ndarray], size: tuple[int, int]) -> Image.Image:
    """One photo-like RGB image of ``size``: a random crop of a source, recoloured, with shapes and noise."""
    src = Image.fromarray(sources[rng.integers(len(sources))])
    w, h = src.size
    scale = rng.uniform(0.45, 1.0)
    cw, ch = int(w * scale), int(min(h, w * scale * size[1] / size[0]))
    x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for _ in range(rng.integers(0, 5)):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        r = int(rng.integers(size[0] // 20, size[0] // 4))
        colour = (*rng.integers(0, 256, 3).tolist(), int(rng.integers(60, 180)))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r // 2, x + r, y + r // 2), fill=colour)
    img = Image.alpha_composite(img.convert("RGBA"), overlay.filter(ImageFilter.GaussianBlur(size[0] / 200))).convert(
        "RGB"
    )
    noise = rng.normal(0.0, rng.uniform(1.5, 5.0), (size[1], size[0], 1)).astype(np.float32)
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))


def encode(img: Image.Image, quality: int, orientation: int = 1) -> bytes:
    """JPEG bytes, with an EXIF orientation tag when it is not 1."""
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    img.save(buf, format="JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def with_comment(jpeg: bytes, text: str) -> bytes:
    """The same JPEG with a comment segment after its APPn segments: new bytes, identical pixels."""
    pos = 2  # after SOI
    while jpeg[pos] == 0xFF and 0xE0 <= jpeg[pos + 1] <= 0xEF:
        pos += 2 + int.from_bytes(jpeg[pos + 2 : pos + 4], "big")
    payload = text.encode()
    return jpeg[:pos] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[pos:]


def make_bases(distinct: int, large_fraction: float, seed: int = 0) -> tuple[list[bytes], list[bytes]]:
    """(small, large) base JPEGs; about 1 in 10 small ones carries an EXIF rotation (orientation 6)."""
    rng = np.random.default_rng(seed)
    sources = _sources()
    small = [
        encode(make_photo(rng, sources, SMALL), int(rng.integers(75, 96)), 6 if i % 10 == 9 else 1)
        for i in range(distinct)
    ]
    n_large = 0 if large_fraction <= 0 else max(1, min(8, round(distinct * large_fraction)))
    large = [encode(make_photo(rng, sources, LARGE), int(rng.integers(85, 96))) for _ in range(n_large)]
    return small, large


def photo_name(i: int, classes: int = 2) -> str:
    """The relative path of photo ``i``: ``class<k>/img_<i>.jpg``."""
    return f"class{i % classes}/img_{i:06d}.jpg"


def write_photos(
    folder: str | Path,
    start: int,
    stop: int,
    bases: tuple[list[bytes], list[bytes]],
    large_fraction: float,
    classes: int = 2,
) -> list[str]:
    """Write photos ``start .. stop - 1`` under ``folder`` (existing files are kept); return their relative paths.

    Photo ``i`` is large when ``i`` falls on the ``1 / large_fraction`` grid, so a prefix of the
    folder has the same mix as the whole.
    """
    small, large = bases
    every = round(1 / large_fraction) if large and large_fraction > 0 else 0
    names = []
    for i in range(start, stop):
        name = photo_name(i, classes)
        path = Path(folder) / name
        if not path.exists():
            base = large[(i // every) % len(large)] if every and i % every == every - 1 else small[i % len(small)]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")  # a killed run never leaves half a JPEG under the final name
            tmp.write_bytes(with_comment(base, f"graft-bench {i}"))
            os.replace(tmp, path)
        names.append(name)
    return names
