"""graft.images: every bad file becomes a BadImage, every good one the same upright 8-bit RGB pixels."""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from graft.images import BadImage, Preprocess, load_rgb, preprocess


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    """Encode ``img`` in memory."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise_jpeg(size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    """A JPEG of random pixels (noise keeps the entropy-coded data long)."""
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(arr, "RGB"), "JPEG", quality=90)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header claims ``width`` x ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + png_chunk(b"IEND", b"")
    )


def png_with_broken_second_chunk() -> bytes:
    """A PNG that opens (header and first IDAT fine) but whose next chunk has a garbage type."""
    ihdr = struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0)
    raw = b"".join(b"\0" + bytes(range(48)) for _ in range(16))
    z = zlib.compress(raw)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", z[:10])
        + png_chunk(b"(\x94\xd3\xab", z[10:])
        + png_chunk(b"IEND", b"")
    )


def pixels(img: Image.Image) -> np.ndarray:
    """The image as an int array (H, W, 3), after checking it is RGB."""
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


# --- files that are not usable images -------------------------------------------------------


def test_truncated_jpeg_raises_cannot_decode() -> None:
    """A JPEG cut in half opens (header intact) but fails the full decode."""
    data = noise_jpeg()
    cut = data[: len(data) // 2]
    assert Image.open(io.BytesIO(cut)).size == (64, 48)  # only load() can catch this one

    with pytest.raises(BadImage, match="cannot decode"):
        load_rgb(cut)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="zero-bytes"),
        pytest.param(b"these are my holiday notes, not a photo\n" * 5, id="text"),
        pytest.param(encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PCX"), id="pcx-unsupported-format"),
        pytest.param(b"\x89PNG\r\n\x1a\n", id="png-signature-only"),
    ],
)
def test_unrecognised_bytes_raise_bad_image(data: bytes) -> None:
    """Empty, text and unsupported-format bytes are rejected as not an image."""
    with pytest.raises(BadImage, match="not a recognised image format"):
        load_rgb(data)


def test_text_file_named_jpg_raises_bad_image(tmp_path: Path) -> None:
    """Loading by path looks at the bytes, not the extension."""
    path = tmp_path / "holiday.jpg"
    path.write_text("not really a jpeg\n", encoding="utf-8")

    with pytest.raises(BadImage, match="not a recognised image format"):
        load_rgb(path)


def test_missing_path_raises_bad_image(tmp_path: Path) -> None:
    """A path that cannot be opened is a BadImage, not a bare OSError."""
    with pytest.raises(BadImage, match="cannot read file"):
        load_rgb(tmp_path / "gone.png")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"P6\n64 4\x84\n255\n" + b"\0" * 64, id="ppm-garbled-size"),
        pytest.param(png_with_broken_second_chunk(), id="png-broken-chunk-after-idat"),
    ],
)
def test_corrupt_headers_raise_bad_image(data: bytes) -> None:
    """Pillow's ValueError/SyntaxError for a corrupt header or chunk becomes a BadImage."""
    with pytest.raises(BadImage, match="cannot decode"):
        load_rgb(data)


def test_header_claiming_huge_size_is_a_decompression_bomb() -> None:
    """A PNG claiming 100000 x 100000 pixels is refused from its header alone."""
    with pytest.raises(BadImage, match="decompression bomb"):
        load_rgb(png_claiming(100_000, 100_000))


@pytest.mark.parametrize(
    ("size", "pillow_warns"), [((150, 100), True), ((300, 100), False)], ids=["warning-range", "error-range"]
)
def test_image_over_pixel_limit_is_refused_without_decoding(
    size: tuple[int, int], pillow_warns: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over MAX_IMAGE_PIXELS (1x-2x: Pillow warns; >2x: errors) the pixels are never decoded."""
    data = encode(Image.new("RGB", size, (5, 6, 7)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))

    with (  # in Pillow's warning range graft refuses the image all the same
        pytest.warns(Image.DecompressionBombWarning) if pillow_warns else contextlib.nullcontext(),
        pytest.raises(BadImage, match=r"decompression bomb: (\d+x\d+ is )?more than \d+ pixels"),
    ):
        load_rgb(data)
    assert loads == []


def test_bomb_is_refused_even_if_another_thread_lifted_the_warning_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    """warnings filters are process-global; the pixel limit must not depend on them (ingest decodes in threads)."""
    data = encode(Image.new("RGB", (150, 100), (5, 6, 7)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    monkeypatch.setattr(warnings, "simplefilter", lambda *args, **kwargs: None)  # as if a racing thread reset it

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        with pytest.raises(BadImage, match="decompression bomb"):
            load_rgb(data)


# --- modes are converted to RGB deterministically ------------------------------------------------


def test_grayscale_value_becomes_equal_rgb() -> None:
    """Mode L value v becomes (v, v, v)."""
    values = np.array([[0, 17, 128, 255]], np.uint8)
    img, size = load_rgb(encode(Image.fromarray(values, "L"), "PNG"))

    assert size == (4, 1)
    np.testing.assert_array_equal(pixels(img)[0], [[0, 0, 0], [17, 17, 17], [128, 128, 128], [255, 255, 255]])


def test_la_alpha_is_composited_over_white() -> None:
    """LA: opaque grey keeps its value, fully transparent becomes white."""
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (50, 255))
    la.putpixel((1, 0), (0, 0))
    img, _ = load_rgb(encode(la, "PNG"))

    np.testing.assert_array_equal(pixels(img)[0], [[50, 50, 50], [255, 255, 255]])


def test_rgba_alpha_is_composited_over_white() -> None:
    """RGBA: opaque red stays red, transparent becomes white, half-transparent black becomes mid grey."""
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    img, _ = load_rgb(encode(rgba, "PNG"))

    row = pixels(img)[0]
    np.testing.assert_array_equal(row[:2], [[255, 0, 0], [255, 255, 255]])
    np.testing.assert_allclose(row[2], [127, 127, 127], atol=1)


def test_palette_transparency_is_composited_over_white() -> None:
    """P with a transparent index: that index becomes white, the others keep their colour."""
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    data = encode(pal, "PNG", transparency=1)
    assert Image.open(io.BytesIO(data)).mode == "P"

    img, _ = load_rgb(data)
    np.testing.assert_array_equal(pixels(img)[0], [[255, 0, 0], [255, 255, 255]])


def test_cmyk_jpeg_pure_cyan_becomes_cyan() -> None:
    """A CMYK JPEG of pure cyan decodes to about (0, 255, 255)."""
    data = encode(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"

    img, _ = load_rgb(data)
    np.testing.assert_allclose(pixels(img).reshape(-1, 3).mean(axis=0), [0, 255, 255], atol=6)


def test_16_bit_png_is_scaled_not_clipped() -> None:
    """I;16 values 65535, 32768, 0 become 255, ~128, 0 (not everything white)."""
    data = encode(Image.fromarray(np.array([[65535, 32768, 0]], np.uint16)), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")

    row = pixels(load_rgb(data)[0])[0]
    assert row[0].tolist() == [255, 255, 255]
    np.testing.assert_allclose(row[1], [128, 128, 128], atol=1)
    assert row[2].tolist() == [0, 0, 0]


# --- orientation and size -------------------------------------------------------------------------


def marked_jpeg(orientation: int) -> bytes:
    """A black 60x40 JPEG with a red block in its stored top-left corner and the given EXIF orientation."""
    img = Image.new("RGB", (60, 40), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 12, 12))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif)


@pytest.mark.parametrize(
    ("orientation", "upright", "red_corner"),
    [
        (6, (40, 60), "top-right"),  # stored image must turn 90 degrees clockwise
        (8, (40, 60), "bottom-left"),  # 90 degrees counter-clockwise
        (3, (60, 40), "bottom-right"),  # 180 degrees: no size swap
    ],
)
def test_exif_orientation_is_applied(orientation: int, upright: tuple[int, int], red_corner: str) -> None:
    """The image comes back upright: the mark sits in the turned corner, and the size is the upright size."""
    img, size = load_rgb(marked_jpeg(orientation))

    assert img.size == upright
    assert size == upright
    arr = pixels(img)
    corners = {"top-left": arr[2, 2], "top-right": arr[2, -3], "bottom-left": arr[-3, 2], "bottom-right": arr[-3, -3]}
    for name, px in corners.items():
        if name == red_corner:
            assert px[0] > 200 and px[1] < 60 and px[2] < 60, (name, px)
        else:
            assert px.max() < 60, (name, px)


def test_large_jpeg_decodes_at_reduced_size_with_min_side() -> None:
    """A 4000x3000 JPEG with min_side=256 is drafted: shorter side >= 256 but far below 3000."""
    data = encode(Image.new("RGB", (4000, 3000), (20, 120, 220)), "JPEG", quality=80)

    img, size = load_rgb(data, min_side=256)

    assert size == (4000, 3000)  # the original size is still reported
    assert 256 <= min(img.size) <= 3000 // 4
    assert img.size[0] * 3 == img.size[1] * 4  # aspect ratio kept
    np.testing.assert_allclose(pixels(img)[::50, ::50].reshape(-1, 3).mean(axis=0), [20, 120, 220], atol=4)


def test_large_jpeg_decodes_at_full_size_without_min_side() -> None:
    """Without min_side nothing is drafted."""
    data = encode(Image.new("RGB", (2000, 1500), (20, 120, 220)), "JPEG", quality=80)

    img, size = load_rgb(data)

    assert img.size == size == (2000, 1500)


# --- preprocess -----------------------------------------------------------------------------------

PP = Preprocess(resize=64, crop=56, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def test_preprocess_returns_float32_chw_in_unit_range() -> None:
    """Output is (3, crop, crop) float32 within [0, 1], using the full range for a black-white image."""
    arr = np.zeros((90, 120, 3), np.uint8)
    arr[:, 60:] = 255
    out = preprocess(Image.fromarray(arr, "RGB"), PP)

    assert out.shape == (3, 56, 56)
    assert out.dtype == np.float32
    assert out.flags["C_CONTIGUOUS"]
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.min() < 0.01 and out.max() > 0.99


@pytest.mark.parametrize("landscape", [True, False], ids=["landscape", "portrait"])
def test_preprocess_takes_the_centre_crop(landscape: bool) -> None:
    """A 3:1 image red at both ends and green in its middle third yields a green crop."""
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, :, 0] = 255
    arr[:, 100:200] = (0, 255, 0)
    img = Image.fromarray(arr if landscape else arr.transpose(1, 0, 2).copy(), "RGB")

    out = preprocess(img, Preprocess(resize=64, crop=64, mean=PP.mean, std=PP.std))

    assert out.shape == (3, 64, 64)
    inner = out[:, 3:-3, 3:-3]  # bicubic blends a pixel or two at the red/green border
    assert inner[1].min() > 0.95
    assert inner[0].max() < 0.05
    assert inner[2].max() < 0.05
