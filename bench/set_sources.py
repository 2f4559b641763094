"""Where bench/datasets.py's sets come from: one reader per set, each yielding (label, file stem, PNG bytes) from
what scikit-learn or a Debian package installed, and the paths each needs (a missing one names its package)."""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from graft import GraftError  # noqa: E402 - after sys.path points at this checkout

OXYGEN = Path("/usr/share/icons/oxygen/base/48x48")
TUXPAINT = Path("/usr/share/tuxpaint/stamps")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
STAMP_CLASSES = ("animals", "food", "plants", "vehicles", "household")  # object categories with >= 20 PNGs

# Where each set comes from; `version` is what the numbers in docs/benchmarks.md were built with
# (sources.json records the version actually installed when a set is built).
SOURCES: dict[str, dict[str, str]] = {
    "digits": {
        "package": "scikit-learn (PyPI)",
        "version": "1.9.1",
        "folder": "sklearn/datasets/data/digits.csv.gz via sklearn.datasets.load_digits",
        "licence": "BSD-3-Clause (scikit-learn); data: UCI Optical Recognition of Handwritten Digits, CC BY 4.0",
        "labels": "the digit 0-9: 8x8 grey scans written dark on white, 10 classes",
    },
    "icons": {
        "package": "oxygen-icon-theme (Debian 12)",
        "version": "5:5.103.0-1",
        "folder": str(OXYGEN) + "/<context>/*.png (regular files; symlinks skipped)",
        "licence": "LGPL-3+",
        "labels": "the icon's context folder (actions, apps, categories, devices, mimetypes, places, status): "
        "48x48 RGBA cut-outs on transparency",
    },
    "stamps": {
        "package": "tuxpaint-stamps-default (Debian 12)",
        "version": "2022.06.04-1",
        "folder": str(TUXPAINT) + "/<category>/**/*.png (*_mirror.png skipped)",
        "licence": "GPL-2",
        "labels": "the top-level stamp category (" + ", ".join(STAMP_CLASSES) + "): "
        "mostly cut-out photos of real objects, 50-400 px RGBA",
    },
    "emoji": {
        "package": "fonts-noto-color-emoji + unicode-data (Debian 12)",
        "version": "2.042-0+deb12u1 / 15.0.0-1",
        "folder": f"{EMOJI_FONT} (embedded colour bitmaps, drawn at their 109 px strike); groups from {EMOJI_TEST}",
        "licence": "Apache-2.0 (images) / OFL-1.1 (font); Unicode data: Unicode License",
        "labels": "the Unicode emoji group (smileys-emotion, people-body, animals-nature, food-drink, travel-places, "
        "activities, objects, symbols, flags): fully-qualified emoji without skin-tone variants",
    },
}

Item = tuple[str, str, bytes]  # (label, file stem, PNG bytes)


def require(needs: Iterable[tuple[Path, str]]) -> None:
    """One error naming every missing path of ``needs`` ((path, Debian package) pairs, as in :data:`NEEDS`)
    and the packages that install them."""
    missing = [(path, package) for path, package in needs if not path.exists()]
    if missing:
        paths = ", ".join(str(path) for path, _ in missing)
        packages = " ".join(dict.fromkeys(package for _, package in missing))
        raise GraftError(f"{paths} not found: install with `apt-get install -y {packages}`")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def digits_items() -> Iterator[Item]:
    """scikit-learn's 1,797 digit scans, written dark on white like ``graft demo-data``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for i, (img, target) in enumerate(zip(d.images, d.target, strict=True)):
        pixels = (255 - np.clip(img * 16, 0, 255)).astype(np.uint8)
        yield str(int(target)), f"digit-{i:04d}", _png(Image.fromarray(pixels, mode="L"))


def icon_items() -> Iterator[Item]:
    """Oxygen's 48x48 PNG icons, labelled by context folder; symlinks (aliases of other icons) skipped."""
    require(NEEDS["icons"])
    for context in sorted(p for p in OXYGEN.iterdir() if p.is_dir()):
        for f in sorted(context.glob("*.png")):
            if f.is_file() and not f.is_symlink():
                yield context.name, f.stem, f.read_bytes()


def stamp_items() -> Iterator[Item]:
    """Tux Paint's stamps of the object categories, labelled by top-level folder; mirrored copies skipped."""
    require(NEEDS["stamps"])
    root = TUXPAINT
    for label in STAMP_CLASSES:
        for f in sorted((root / label).rglob("*.png")):
            if f.is_file() and not f.is_symlink() and not f.stem.endswith("_mirror"):
                yield label, "__".join(f.relative_to(root / label).with_suffix("").parts), f.read_bytes()


def _emoji_groups() -> Iterator[tuple[str, str, str]]:
    """(group slug, emoji string, name) for each fully-qualified emoji without a skin-tone modifier."""
    group = ""
    for line in EMOJI_TEST.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = re.sub(r"[^a-z]+", "-", line.split(":", 1)[1].strip().lower()).strip("-")
        elif line and not line.startswith("#") and "; fully-qualified" in line and group != "component":
            points = [int(c, 16) for c in line.split(";")[0].split()]
            if not any(0x1F3FB <= c <= 0x1F3FF for c in points):  # skin tones: near-copies of the base emoji
                name = line.split("#", 1)[1].split(None, 2)[2]  # "# 😀 E1.0 grinning face"
                yield group, "".join(map(chr, points)), name


def emoji_items() -> Iterator[Item]:
    """Noto Color Emoji's bitmaps, drawn one per 136x128 canvas, labelled by Unicode emoji group."""
    from PIL import ImageDraw, ImageFont

    require(NEEDS["emoji"])  # the font here, the groups' text file in _emoji_groups
    font = ImageFont.truetype(str(EMOJI_FONT), 109)  # the bitmap strike size

    def draw(text: str) -> Image.Image:
        img = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
        ImageDraw.Draw(img).text((0, 0), text, font=font, embedded_color=True)
        return img

    missing = draw("\U0010fffd").tobytes()  # what the font draws for a code point it lacks
    for group, text, name in _emoji_groups():
        x0, _, x1, _ = font.getbbox(text)
        img = draw(text)
        if x1 - x0 > 136 or img.getbbox() is None or img.tobytes() == missing:
            continue  # a sequence the font draws as several glyphs, or not at all
        stem = "-".join(f"{ord(c):x}" for c in text if ord(c) not in (0x200D, 0xFE0F))
        yield group, f"{stem}_{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}", _png(img)


BUILDERS: dict[str, Callable[[], Iterator[Item]]] = {
    "digits": digits_items,
    "icons": icon_items,
    "stamps": stamp_items,
    "emoji": emoji_items,
}
# What each builder reads from Debian's packages (digits ship with scikit-learn).
NEEDS: dict[str, tuple[tuple[Path, str], ...]] = {
    "digits": (),
    "icons": ((OXYGEN, "oxygen-icon-theme"),),
    "stamps": ((TUXPAINT, "tuxpaint-stamps-default"),),
    "emoji": ((EMOJI_FONT, "fonts-noto-color-emoji"), (EMOJI_TEST, "unicode-data")),
}
