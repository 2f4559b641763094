"""Fault rows 5-7: every colour mode, 16-bit files and EXIF rotation become the same upright 8-bit RGB."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from graft.backbones import build_backbone
from graft.cache import load_feature_table
from graft.images import load_rgb, preprocess
from graft.tasks.featurize import featurize
from tests.faults.helpers import encode, params_for, raw_png, run_ingest
from tests.helpers import write_tree


def _rgb(data: bytes) -> np.ndarray:
    """Decode twice (must agree exactly) and return the pixels as int (H, W, 3)."""
    first, second = load_rgb(data)[0], load_rgb(data)[0]
    assert first.mode == second.mode == "RGB"
    a = np.asarray(first).astype(int)
    assert np.array_equal(a, np.asarray(second).astype(int))
    return a


def _la() -> bytes:
    la = Image.new("LA", (3, 1))
    for x, v in enumerate([(50, 255), (0, 0), (0, 128)]):
        la.putpixel((x, 0), v)
    return encode(la, "PNG")


def _rgba() -> bytes:
    rgba = Image.new("RGBA", (3, 1))
    for x, v in enumerate([(255, 0, 0, 255), (0, 0, 255, 0), (0, 0, 0, 128)]):
        rgba.putpixel((x, 0), v)
    return encode(rgba, "PNG")


def _palette(transparent: bool) -> bytes:
    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * 759)
    for x in range(3):
        pal.putpixel((x, 0), x)
    return encode(pal, "PNG", **({"transparency": 1} if transparent else {}))


@pytest.mark.parametrize(
    ("data", "mode", "expected", "atol"),
    [
        pytest.param(
            encode(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95),
            "CMYK",
            [[0, 255, 255]],
            6,
            id="cmyk-jpeg-cyan",
        ),
        pytest.param(
            encode(Image.new("CMYK", (16, 16), (0, 0, 0, 255)), "JPEG", quality=95),
            "CMYK",
            [[0, 0, 0]],
            6,
            id="cmyk-jpeg-black",
        ),
        pytest.param(
            encode(Image.fromarray(np.array([[0, 17, 128, 255]], np.uint8), "L"), "PNG"),
            "L",
            [[0, 0, 0], [17, 17, 17], [128, 128, 128], [255, 255, 255]],
            0,
            id="grayscale",
        ),
        pytest.param(_la(), "LA", [[50, 50, 50], [255, 255, 255], [127, 127, 127]], 1, id="LA-over-white"),
        pytest.param(_rgba(), "RGBA", [[255, 0, 0], [255, 255, 255], [127, 127, 127]], 1, id="RGBA-over-white"),
        pytest.param(_palette(True), "P", [[255, 0, 0], [255, 255, 255], [10, 20, 30]], 0, id="palette-transparent"),
        pytest.param(_palette(False), "P", [[255, 0, 0], [0, 255, 0], [10, 20, 30]], 0, id="palette-opaque"),
    ],
)
def test_colour_modes_convert_to_rgb_deterministically(data: bytes, mode: str, expected: list, atol: int) -> None:
    """Each mode decodes to the expected RGB values (alpha composited over white), the same every time."""
    assert Image.open(io.BytesIO(data)).mode == mode  # the file really is in that mode
    px = _rgb(data).reshape(-1, 3)
    if len(expected) == 1:  # a flat image: compare its mean colour (JPEG blurs single pixels)
        np.testing.assert_allclose(px.mean(0), expected[0], atol=atol)
    else:
        np.testing.assert_allclose(px, expected, atol=atol)


def test_modes_in_a_tree_are_ingested_and_featurized_as_rgb(ws: Path) -> None:
    """CMYK, LA, RGBA and palette files go through ingest and featurize like RGB ones (no quarantine)."""
    write_tree(ws / "raw", per_class=8)
    odd = {
        "cat/cmyk.jpg": encode(Image.new("CMYK", (40, 32), (255, 0, 0, 0)), "JPEG"),
        "cat/la.png": encode(Image.new("LA", (40, 32), (90, 200)), "PNG"),
        "dog/rgba.png": encode(Image.new("RGBA", (40, 32), (10, 200, 10, 100)), "PNG"),
        "dog/pal.png": _palette(True),
    }
    for rel, data in odd.items():
        (ws / "raw" / rel).write_bytes(data)

    _, m, q = run_ingest(ws)
    params = params_for(ws)
    featurize(params)

    assert len(q) == 0 and set(odd) <= set(m["path"])
    feats, _ = load_feature_table(params.featurize.out)
    bb = build_backbone("tiny_cnn")
    for rel, data in odd.items():
        sha = m.set_index("path").loc[rel, "sha256"]
        x = torch.from_numpy(preprocess(load_rgb(data)[0], bb.preprocess)[None])
        with torch.no_grad():
            np.testing.assert_allclose(feats[sha], bb.model(x)[0].numpy(), rtol=1e-5, atol=1e-6)


def test_16_bit_grey_png_is_scaled_not_clipped() -> None:
    """I;16 values 65535, 32768, 25700, 0 become 255, 128, 100, 0 (not everything white)."""
    data = encode(Image.fromarray(np.array([[65535, 32768, 25700, 0]], np.uint16)), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")

    px = _rgb(data)[0]

    assert px[:, 0].tolist() == [255, 128, 100, 0]
    assert (px == px[:, :1]).all()  # grey stays grey


def test_16_bit_rgb_png_is_scaled_not_clipped() -> None:
    """A 48-bit RGB PNG (written by hand: Pillow cannot write one) keeps its colours at 8 bits."""
    samples = [(65535, 0, 0), (32768, 32768, 32768), (0, 25700, 65535)]
    row = b"\0" + b"".join(struct.pack(">HHH", *s) for s in samples)
    data = raw_png(3, 1, 16, 2, row)

    px = _rgb(data)[0]

    assert px.tolist() == [[255, 0, 0], [128, 128, 128], [0, 100, 255]]


def _marked_jpeg(orientation: int) -> tuple[bytes, Image.Image]:
    """A 60x40 JPEG with a red block in its stored top-left corner, tagged with ``orientation``."""
    img = Image.new("RGB", (60, 40), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 12, 12))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, "JPEG", quality=95, exif=exif)
    stored = Image.open(io.BytesIO(data))
    stored.load()
    return data, stored.convert("RGB")


@pytest.mark.parametrize(
    ("orientation", "turn"),
    [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)],
)
def test_exif_orientation_rotated_upright(orientation: int, turn: Image.Transpose) -> None:
    """The decoded pixels are exactly the stored pixels turned as the EXIF tag says; the mark moves with them."""
    data, stored = _marked_jpeg(orientation)

    upright = _rgb(data)

    assert np.array_equal(upright, np.asarray(stored.transpose(turn)).astype(int))
    red = upright[..., 0] > 200
    corner = {3: (-3, -3), 6: (2, -3), 8: (-3, 2)}[orientation]
    assert red[corner]


def test_features_are_computed_on_the_upright_image(ws: Path) -> None:
    """featurize's cached vector of an EXIF-6 photo equals the upright pixels' features, not the stored ones."""
    write_tree(ws / "raw", per_class=8)
    data, stored = _marked_jpeg(6)
    (ws / "raw/cat/rotated.jpg").write_bytes(data)
    _, m, _ = run_ingest(ws)
    params = params_for(ws)
    featurize(params)

    feats, _ = load_feature_table(params.featurize.out)
    got = feats[m.set_index("path").loc["cat/rotated.jpg", "sha256"]]
    bb = build_backbone("tiny_cnn")

    def features(img: Image.Image) -> np.ndarray:
        with torch.no_grad():
            return bb.model(torch.from_numpy(preprocess(img, bb.preprocess)[None]))[0].numpy()

    np.testing.assert_allclose(got, features(stored.transpose(Image.Transpose.ROTATE_270)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, features(stored), rtol=1e-3, atol=1e-4)
    assert tuple(m.set_index("path").loc["cat/rotated.jpg", ["width", "height"]]) == (40, 60)
