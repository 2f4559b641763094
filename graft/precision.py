"""Training precision on CPU and CUDA: which autocast dtype fine-tuning uses, and the depthwise layers kept
in fp32 inside CPU bf16 training (measured in ``bench/train_speed.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def cpu_bf16_native() -> bool:
    """Whether this CPU runs bf16 convolutions natively (oneDNN with AVX512-BF16 or AMX): autocast pays."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


# bench/train_speed.py on AVX512-BF16, depthwise convolutions kept fp32: whole runs +5 % at 224 px, +7 % at 96 px
CPU_BF16_MIN_SIZE = 96


def device_and_amp(precision: str = "auto", size: int = 224) -> tuple[torch.device, torch.dtype | None]:
    """The training device and its autocast dtype (None: fp32).

    ``auto``: CUDA with bf16 (fp16 where bf16 is missing); a CPU with native bf16 in bf16 at input sizes from
    :data:`CPU_BF16_MIN_SIZE` (graft's smallest fine-tune size, the smallest measured), with its depthwise
    convolutions in fp32 (:func:`fp32_depthwise`); any other CPU in fp32 (emulated bf16 is slower than fp32).
    ``bf16`` asks for bf16 anywhere; ``fp32`` turns autocast off.
    Weights, optimizer state and the loss stay fp32 either way (autocast only lowers matmuls and convolutions).
    """
    if torch.cuda.is_available():
        device = torch.device("cuda")
        if precision == "fp32":
            return device, None
        return device, torch.bfloat16 if precision == "bf16" or torch.cuda.is_bf16_supported() else torch.float16
    if precision == "bf16" or (precision == "auto" and size >= CPU_BF16_MIN_SIZE and cpu_bf16_native()):
        return torch.device("cpu"), torch.bfloat16
    return torch.device("cpu"), None


class _Fp32DepthwiseConv(nn.Conv2d):
    """A depthwise convolution that runs in fp32 under CPU autocast (its class is swapped in for training)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


@contextlib.contextmanager
def fp32_depthwise(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """While active, every depthwise convolution of ``model`` runs in fp32 under autocast; yields how many.

    oneDNN's bf16 depthwise backward is slow on CPU: one EfficientNet-Lite0 step at 224 px, batch 32, channels_last
    (``bench/train_speed.py``'s step anatomy) takes fwd 0.23 + bwd 1.30 s in bf16 against 0.51 + 0.90 s in fp32;
    with only the depthwise layers in fp32, 0.38 + 0.76 s. The swap changes no parameter name (the state
    dict, checkpoints and export are untouched) and is undone on exit.
    """
    convs = [
        m
        for m in model.modules()
        if enabled and type(m) is nn.Conv2d and m.groups > 1 and m.groups == m.in_channels == m.out_channels
    ]
    for m in convs:
        m.__class__ = _Fp32DepthwiseConv
    try:
        yield len(convs)
    finally:
        for m in convs:
            m.__class__ = nn.Conv2d
