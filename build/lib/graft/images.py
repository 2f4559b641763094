"""Image decoding and preprocessing, shared by ingest, featurize, the baseline and ``graft predict``.

Only Pillow and NumPy here (no torch), so the ONNX serving path stays light. Every consumer goes
through :func:`load_rgb` and :func:`preprocess`, so a photo becomes the same pixels everywhere.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
# No "MPO": it is not an Image.open format (the JPEG opener returns MPO files itself), and naming it
# makes Pillow raise KeyError for any file no listed format accepts.
_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
_ORIENTATION_SWAPS = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class BadImage(ValueError):
    """A file that cannot be used as an image; the message is the quarantine reason."""


@dataclass(frozen=True)
class Preprocess:
    """How a backbone wants its pixels: resize shorter side, centre crop, normalise."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def as_dict(self) -> dict:
        return {
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        """The inverse of :meth:`as_dict`, validated: a bad value is a one-line GraftError naming the key.

        ``interpolation`` may be left out (the class default); any other missing or extra key is an error.
        """
        from graft import GraftError

        keys = tuple(cls.__dataclass_fields__)  # the schema: the as_dict keys
        if not isinstance(d, dict):
            raise GraftError(f"preprocess: expected a mapping with keys {keys}, got {type(d).__name__}")
        if missing := [k for k in ("resize", "crop", "mean", "std") if k not in d]:
            raise GraftError(f"preprocess: missing key {missing[0]!r} (keys are {keys})")
        if extra := sorted(set(d) - set(keys)):
            raise GraftError(f"preprocess: unknown key {extra[0]!r} (keys are {keys})")
        for key in ("resize", "crop"):
            v = d[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise GraftError(f"preprocess {key}: expected a positive integer, got {v!r}")
        if d["crop"] > d["resize"]:
            raise GraftError(f"preprocess: crop {d['crop']} is larger than resize {d['resize']} (crop <= resize)")
        triples: dict[str, tuple[float, float, float]] = {}
        for key in ("mean", "std"):
            v = d[key]
            ok = (
                isinstance(v, (list, tuple))
                and len(v) == 3
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in v)
            )
            if not ok or (key == "std" and min(v) <= 0):
                rule = "3 positive numbers" if key == "std" else "3 finite numbers (R, G, B)"
                raise GraftError(f"preprocess {key}: expected {rule}, got {v!r}")
            triples[key] = (float(v[0]), float(v[1]), float(v[2]))
        interpolation = d.get("interpolation", cls.interpolation)
        if interpolation not in _RESAMPLE:
            raise GraftError(f"preprocess interpolation: {interpolation!r} is not one of {sorted(_RESAMPLE)}")
        return cls(d["resize"], d["crop"], triples["mean"], triples["std"], interpolation)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB deterministically (alpha over white, 16-bit scaled)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.int64)
        top: float = 65535 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max(initial=0.0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(
    source: bytes | str | os.PathLike[str], min_side: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Fully decode an image to upright 8-bit RGB.

    Args:
        source: the encoded bytes, or a path.
        min_side: if given, a large JPEG is decoded at a reduced scale (``Image.draft``) whose
            sides are still at least this long, which bounds memory and time.

    Returns:
        The RGB image and the upright (width, height) of the original file.

    Raises:
        BadImage: with a short reason for the quarantine record.
    """
    with _open(source) as fh:
        try:
            try:
                img = Image.open(fh, formats=_FORMATS)
            except Image.UnidentifiedImageError:
                raise BadImage("not a recognised image format") from None
            except Image.DecompressionBombError:  # raised only while MAX_IMAGE_PIXELS is set
                raise BadImage(f"decompression bomb: more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels") from None
            except (SyntaxError, ValueError, EOFError) as exc:  # e.g. a PPM header with a garbled size
                raise BadImage(f"cannot decode: {exc}") from None
            width, height = img.size
            if width == 0 or height == 0:
                raise BadImage("image has zero width or height")
            # Checked here rather than through Pillow's warning: warning filters are process-global (threads).
            if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
                raise BadImage(f"decompression bomb: {width}x{height} is more than {Image.MAX_IMAGE_PIXELS} pixels")
            try:
                orientation = img.getexif().get(0x0112, 1)  # PNG decodes the whole file here
                if orientation in _ORIENTATION_SWAPS:
                    width, height = height, width
                if min_side and img.format == "JPEG":
                    img.draft(img.mode, (min_side, min_side))
                img.load()
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                raise BadImage(f"cannot decode: {exc}") from None
            return _to_rgb(ImageOps.exif_transpose(img)), (width, height)
        except OSError as exc:
            raise BadImage(f"cannot read file: {exc.strerror or exc}") from None


def _open(source: bytes | str | os.PathLike[str]) -> BinaryIO:
    """The encoded bytes as a file, or the file at ``source`` open for reading."""
    if isinstance(source, bytes):
        return io.BytesIO(source)
    try:
        return open(source, "rb")
    except OSError as exc:
        raise BadImage(f"cannot read file: {exc.strerror or exc}") from None


def preprocess(img: Image.Image, pp: Preprocess) -> np.ndarray:
    """Resize the shorter side to ``pp.resize``, centre-crop ``pp.crop``: float32 CHW in [0, 1].

    Normalisation by mean/std happens inside the model (and the ONNX graph), not here.
    """
    w, h = img.size
    scale = pp.resize / min(w, h)
    nw, nh = max(pp.crop, round(w * scale)), max(pp.crop, round(h * scale))
    left, top = (nw - pp.crop) // 2, (nh - pp.crop) // 2
    # Resample only the centre box of the source (one pass, ~2x less work than resize-then-crop).
    box = (left * w / nw, top * h / nh, (left + pp.crop) * w / nw, (top + pp.crop) * h / nh)
    img = img.resize((pp.crop, pp.crop), _RESAMPLE[pp.interpolation], box=box, reducing_gap=3.0)
    arr = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_batch(paths: Sequence[str | os.PathLike[str]], pp: Preprocess) -> np.ndarray:
    """Decode and preprocess a list of files into one float32 NCHW array."""
    return np.stack([preprocess(load_rgb(p, min_side=pp.resize)[0], pp) for p in paths])


def prefetch_map(fn, chunks, workers: int):
    """Yield ``fn(chunk)`` for each chunk in order, computing up to ``workers`` chunks ahead in threads.

    Decoding in Pillow releases the GIL, so this overlaps image decoding with model work.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(fn, chunk))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
