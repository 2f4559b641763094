"""Training precision and the fine-tune step's speed: which autocast dtype fine-tuning uses, the depthwise
layers kept in fp32 and the activations run out of place inside CPU bf16 training (measured in
``bench/train_speed.py``; frozen BatchNorm folding is :mod:`graft.fold`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeGuard

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


class Fp32DepthwiseConv(nn.Conv2d):
    """A depthwise convolution that runs in fp32 under CPU autocast when a backward pass will go through it (its
    class is swapped in for training). A forward alone stays in bf16, where oneDNN is fast: validation, and the
    frozen lower blocks of ``last_n`` (Lite0 inference at 224 px: 172 img/s against 136 with these in fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def is_depthwise(m: nn.Module) -> TypeGuard[nn.Conv2d]:
    """A plain depthwise convolution: one group per channel."""
    return type(m) is nn.Conv2d and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def slow_in_bf16(m: nn.Module) -> bool:
    """A depthwise convolution whose oneDNN bf16 backward is slower than fp32 with the casts around it: kernels
    over 3 wide or strides over 1. Lite0's 3x3 stride-1 ones are faster in bf16 (batch 32, 224 px, fwd + bwd:
    32 channels at 112 px 62 against 81 ms, 144 at 56 px 79 against 104 ms; a stride-2 3x3 one 195 against
    107 ms, a 5x5 one at 28 px 142 against 70 ms)."""
    return is_depthwise(m) and (max(m.kernel_size) > 3 or max(m.stride) > 1)


@contextlib.contextmanager
def fp32_depthwise(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """While active, the depthwise convolutions of ``model`` that are slow in bf16 (:func:`slow_in_bf16`) run in
    fp32 under autocast; yields how many.

    oneDNN's bf16 depthwise backward is slow on CPU: one EfficientNet-Lite0 step at 224 px, batch 32, channels_last
    (``bench/train_speed.py``'s step anatomy) takes fwd 0.23 + bwd 1.30 s in bf16 against 0.51 + 0.90 s in fp32;
    with only the depthwise layers in fp32, 0.38 + 0.76 s. Leaving the 3x3 stride-1 ones in bf16 as well: 39.6
    against 37.3 img/s at 224 px, 147 against 135 at 96 px (means of two to four fresh processes each). The swap
    changes no parameter name (the state dict, checkpoints and export are untouched) and is undone on exit.
    """
    convs = [m for m in model.modules() if enabled and slow_in_bf16(m)]
    for m in convs:
        m.__class__ = Fp32DepthwiseConv
    try:
        yield len(convs)
    finally:
        for m in convs:
            m.__class__ = nn.Conv2d


@contextlib.contextmanager
def out_of_place_activations(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """While active, the in-place activation modules of ``model`` (timm's ReLU6, ReLU, Hardswish: any module with
    ``inplace=True``) compute out of place; yields how many. On CPU an in-place clamp of a bf16 channels_last
    tensor takes about twice as long as writing a new one (32x96x112x112: 24 against 12 ms; relu 22 against
    9 ms); one Lite0 bf16 step at 224 px went from 37.6 to 42.1 img/s (two fresh processes each). The cost is
    memory: the activation's input is kept for its backward as well as its output."""
    mods = [m for m in model.modules() if enabled and getattr(m, "inplace", None) is True]
    for m in mods:
        m.inplace = False  # type: ignore[assignment]
    try:
        yield len(mods)
    finally:
        for m in mods:
            m.inplace = True  # type: ignore[assignment]


@contextlib.contextmanager
def cpu_bf16_layers(model: nn.Module, enabled: bool = True) -> Iterator[tuple[int, int]]:
    """Both CPU bf16 training adjustments while active: the depthwise convolutions that are slow in bf16 run in
    fp32 (:func:`fp32_depthwise`) and activations run out of place (:func:`out_of_place_activations`); yields
    how many of each."""
    with fp32_depthwise(model, enabled) as dw, out_of_place_activations(model, enabled) as act:
        yield dw, act
