"""Fine-tune batches (graft.batches): the eval crop matches graft's preprocess exactly, batches arrive channels_last
without a copy, augmentation is reproducible per seed and index, colour jitter does what it says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from graft.batches import DecodedImages, image_batches, to_batch, to_device
from graft.images import Preprocess, load_rgb, preprocess
from graft.params import AugmentParams

PP = Preprocess(resize=40, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture
def photos(tmp_path: Path) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(60, 45), (45, 60), (50, 50), (80, 41), (33, 70)]):
        pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        pixels[:, : w // 2] //= 3  # a left/right asymmetry, so a flip is visible
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    return paths


def test_eval_batches_equal_preprocess_and_are_channels_last(photos: list[str]) -> None:
    """Without augmentation a batch holds exactly graft's preprocess of each image, NCHW with NHWC memory."""
    got = list(image_batches(photos, PP, batch_size=2, workers=2))
    assert [sl for sl, _ in got] == [slice(0, 2), slice(2, 4), slice(4, 5)]
    x = torch.cat([b for _, b in got])
    ref = np.stack([preprocess(load_rgb(p, min_side=PP.resize)[0], PP) for p in photos])
    assert x.dtype == torch.float32 and tuple(x.shape) == ref.shape == (5, 3, 32, 32)
    assert all(b.is_contiguous(memory_format=torch.channels_last) for _, b in got)
    assert np.array_equal(x.numpy(), ref)
    batch = got[0][1]
    assert to_device(batch, torch.device("cpu")).data_ptr() == batch.data_ptr()  # no copy on the way in


def test_augmented_batches_are_reproducible_and_flip_some_images(photos: list[str]) -> None:
    """The same (seed, index) gives the same pixels, from cached decodes too; with only hflip on, each image
    is the eval crop or its mirror, and both occur."""
    aug = AugmentParams(random_resized_crop=False, hflip=True, color_jitter=0.0)
    runs = [
        torch.cat([b for _, b in image_batches(photos, PP, 2, 2, aug, (7, 2), decoded)])
        for decoded in (None, DecodedImages(PP.resize), None)
    ]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    plain = torch.cat([b for _, b in image_batches(photos, PP, 2, 2)])
    flipped = [not torch.equal(a, p) for a, p in zip(runs[0], plain, strict=True)]
    for a, p, f in zip(runs[0], plain, flipped, strict=True):
        assert torch.equal(a, p.flip(-1) if f else p)
    assert any(flipped) and not all(flipped)
    other = torch.cat([b for _, b in image_batches(photos, PP, 2, 2, aug, (7, 1))])
    crops = AugmentParams(random_resized_crop=True, hflip=False, color_jitter=0.0)
    cropped = torch.cat([b for _, b in image_batches(photos, PP, 2, 2, crops, (7, 1))])
    assert not torch.equal(other, runs[0]) and not torch.equal(cropped, plain)
    assert cropped.shape == plain.shape and cropped.is_contiguous(memory_format=torch.channels_last)


def test_colour_jitter_scales_contrast_about_the_mean_then_brightness() -> None:
    """Factors (1, 1) leave the image as it is; contrast 0 makes every value the image's mean times the
    brightness factor; results stay within [0, 1]."""
    rng = np.random.default_rng(1)
    images = [Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    plain = to_batch(images)
    torch.testing.assert_close(to_batch(images, np.ones((3, 2))), plain)
    flat = to_batch(images, np.array([[1.0, 0.0], [1.5, 0.0], [9.0, 0.0]]))
    means = plain.mean(dim=(1, 2, 3))
    torch.testing.assert_close(flat[0], means[0].expand(3, 4, 4))
    torch.testing.assert_close(flat[1], (means[1] * 1.5).clamp(0, 1).expand(3, 4, 4))
    assert torch.equal(flat[2], torch.ones(3, 4, 4))  # clipped at 1
