"""Image decoding and preprocessing, shared by ingest, featurize, the baseline and ``graft predict``.

Only Pillow and NumPy here (no torch), so the ONNX serving path stays light. Every consumer goes
through :func:`load_rgb` and :func:`preprocess`, so a photo becomes the same pixels everywhere.
Files are read by :func:`read_regular` (regular files only, size-bounded), and decoders in all
threads share one memory budget (:data:`DECODE_MEMORY_BYTES`).
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, features

_AVIF = "avif" in features.modules and bool(features.check_module("avif"))  # Pillow >= 11.2 with libavif
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
    | ({".avif"} if _AVIF else set())
)
# Image files graft cannot decode: each gets a quarantine row naming its format instead of vanishing.
UNSUPPORTED_EXTENSIONS = {".svg": "SVG", ".svgz": "SVG", ".heic": "HEIC", ".heif": "HEIF", ".jxl": "JPEG XL"} | (
    {} if _AVIF else {".avif": "AVIF"}
)
# No "MPO": it is not an Image.open format (the JPEG opener returns MPO files itself), and naming it
# makes Pillow raise KeyError for any file no listed format accepts.
_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM") + (("AVIF",) if _AVIF else ())
FILE_BYTES_CEILING = 2**31  # no image file is read past this (ingest.max_file_bytes may lower it, never raise it)
DECODE_MEMORY_BYTES = 1 << 30  # decoders in all threads of a process hold at most about this much pixel memory
_ORIENTATION_SWAPS = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class BadImage(ValueError):
    """A file that cannot be used as an image; the message is the quarantine reason."""


class RefusedFile(BadImage):
    """A path graft does not read: not a regular file, or larger than the read limit."""


_SPECIAL = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


def _check_file(st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _SPECIAL if test(st.st_mode)), "a special file")
        raise RefusedFile(f"not a regular file ({kind}): only regular files are read")
    if st.st_size > max_bytes:
        raise RefusedFile(f"file is {st.st_size} bytes, over the {max_bytes}-byte limit (ingest.max_file_bytes)")


def read_regular(path: str | os.PathLike[str], max_bytes: int = FILE_BYTES_CEILING) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; anything else is refused before it is opened.

    ``stat`` decides first (opening a FIFO blocks, a device never ends); the opened file is checked again
    (it may have been swapped meanwhile), and reading stops past the limit (a file that grows, or a
    /proc file whose size stat does not know).

    Raises:
        RefusedFile: not a regular file, or over the limit. OSError: the file cannot be read.
    """
    _check_file(os.stat(path), max_bytes)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        _check_file(os.fstat(fd), max_bytes)
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise RefusedFile(f"file grew past the {max_bytes}-byte limit while read (ingest.max_file_bytes)")
        return b"".join(chunks)
    finally:
        os.close(fd)


class _DecodeBudget:
    """Pixel memory shared by the decoders of all threads: a decode waits until its estimate fits.

    Decoding is where memory peaks (a 9400 x 9400 PNG under the pixel limit needs GBs); without a
    shared bound, ``workers`` threads would each hold one at once. An image larger than the whole
    budget waits until it can run alone.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._used = 0

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        need = min(nbytes, DECODE_MEMORY_BYTES)
        with self._cond:
            self._cond.wait_for(lambda: self._used == 0 or self._used + need <= DECODE_MEMORY_BYTES)
            self._used += need
        try:
            yield
        finally:
            with self._cond:
                self._used -= need
                self._cond.notify_all()


DECODE_BUDGET = _DecodeBudget()
_SAMPLE_BYTES = {"I": 4, "F": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def _decode_bytes(img: Image.Image) -> int:
    """Estimated peak bytes of decoding ``img`` at its (draft) size: pixels, RGB conversion, upright copy."""
    per_pixel = _SAMPLE_BYTES.get(img.mode, len(img.getbands()))
    return img.size[0] * img.size[1] * (per_pixel + 8)


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
                if min_side and img.format == "JPEG":
                    img.draft(img.mode, (min_side, min_side))  # the size below is then the reduced one
                with DECODE_BUDGET.hold(_decode_bytes(img)):
                    orientation = img.getexif().get(0x0112, 1)  # PNG decodes the whole file here
                    if orientation in _ORIENTATION_SWAPS:
                        width, height = height, width
                    img.load()
                    rgb = _to_rgb(ImageOps.exif_transpose(img))
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                raise BadImage(f"cannot decode: {exc}") from None
            return rgb, (width, height)
        except OSError as exc:
            raise BadImage(f"cannot read file: {exc.strerror or exc}") from None


def _open(source: bytes | str | os.PathLike[str]) -> BinaryIO:
    """The encoded bytes as a file, or the bytes of the regular file at ``source`` (see :func:`read_regular`)."""
    if isinstance(source, bytes):
        return io.BytesIO(source)
    try:
        return io.BytesIO(read_regular(source))
    except OSError as exc:
        raise BadImage(f"cannot read file: {exc.strerror or exc}") from None


def center_crop(img: Image.Image, pp: Preprocess) -> Image.Image:
    """Resize the shorter side to ``pp.resize`` and centre-crop ``pp.crop`` in one resampling pass of only the
    centre box of the source (~2x less work than resize-then-crop)."""
    w, h = img.size
    scale = pp.resize / min(w, h)
    nw, nh = max(pp.crop, round(w * scale)), max(pp.crop, round(h * scale))
    left, top = (nw - pp.crop) // 2, (nh - pp.crop) // 2
    box = (left * w / nw, top * h / nh, (left + pp.crop) * w / nw, (top + pp.crop) * h / nh)
    return img.resize((pp.crop, pp.crop), _RESAMPLE[pp.interpolation], box=box, reducing_gap=3.0)


def preprocess(img: Image.Image, pp: Preprocess) -> np.ndarray:
    """:func:`center_crop` as float32 CHW in [0, 1]; normalisation by mean/std is inside the model (and ONNX)."""
    arr = np.asarray(center_crop(img, pp), dtype=np.float32) * (1.0 / 255.0)
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
