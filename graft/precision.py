"""Training precision and the fine-tune step's speed: which autocast dtype fine-tuning uses, the depthwise
layers kept in fp32 inside CPU bf16 training, and frozen BatchNorm folded into the convolutions (measured in
``bench/train_speed.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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


class _Fp32DepthwiseConv(nn.Conv2d):
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
        m.__class__ = _Fp32DepthwiseConv
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


class _FoldedConv(nn.Conv2d):
    """A convolution with the frozen BatchNorm after it folded in: ``conv(x, W * s, beta - mean * s)``, with
    ``s = gamma / sqrt(var + eps)`` recomputed every call, so W, gamma and beta all still train."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.__dict__["_graft_bn"]  # not a registered submodule: the state dict keeps its names
        if bn.training:  # batch statistics cannot be folded: a caller broke fold_frozen_bn's contract
            raise RuntimeError("a folded BatchNorm was switched to training mode (fold only with freeze_bn)")
        s = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * s
        if self.bias is not None:
            bias = bias + self.bias * s
        return self._conv_forward(x, self.weight * s.reshape(-1, 1, 1, 1), bias)


class _FoldedFp32DepthwiseConv(_Fp32DepthwiseConv, _FoldedConv):
    """Both: autocast off and fp32 input (:class:`_Fp32DepthwiseConv`), then the folded convolution, whose bias
    gradient is a plain sum (:class:`_BiasGradBySum`) when a backward pass will run."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        grads = bias is not None and torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias))
        if not grads or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super()._conv_forward(x, weight, bias)
        return _BiasGradBySum.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class _BiasGradBySum(torch.autograd.Function):
    """``conv2d`` whose bias gradient is the output gradient summed over batch and space, outside oneDNN.

    oneDNN's fp32 depthwise backward computes the bias gradient slowly: batch 32, channels_last, input and weight
    gradients with the bias' against without it and a separate sum, 672 channels at 14 px 5x5: 41.0 against
    26.8 + 0.5 ms; over Lite0's fp32 depthwise layers at 224 px 326 against 269 + 5 ms a step. One bf16 step at
    224 px: 37.8 against 36.5 img/s (three fresh processes each, every pair in its favour)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (list(stride), list(padding), list(dilation), groups)
        return nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = None
        if need_x or need_w:
            gx, gw, _ = torch.ops.aten.convolution_backward(
                grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [need_x, need_w, False]
            )
        return gx, gw, grad.sum((0, 2, 3)) if need_b else None, None, None, None, None


def _after_fold(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What is left of a folded BatchNorm: timm's BatchNormAct2d keeps its dropout and activation."""
    drop, act = getattr(self, "drop", None), getattr(self, "act", None)
    x = drop(x) if drop is not None else x
    return act(x) if act is not None else x


_AFTER_FOLD: dict[type, type] = {}


def _conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.BatchNorm2d]]:
    """Each plain convolution registered right before a BatchNorm of its width, in the same parent."""
    pairs = []
    for parent in model.modules():
        kids = list(parent.children())
        for conv, bn in zip(kids, kids[1:], strict=False):
            if (
                type(conv) in (nn.Conv2d, _Fp32DepthwiseConv)
                and isinstance(bn, nn.BatchNorm2d)
                and bn.track_running_stats
                and bn.affine
                and bn.num_features == conv.out_channels
            ):
                pairs.append((conv, bn))
    return pairs


def _eval_outputs(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], size: int) -> torch.Tensor:
    """``forward`` in inference mode on a fixed random batch; every module's train/eval flag restored after."""
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return forward(x.to(next(model.parameters()).device)).float()
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def fold_frozen_bn(
    model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor] | None = None, size: int = 64
) -> Iterator[int]:
    """While active, every BatchNorm in inference mode for the whole run (``finetune.freeze_bn``) is folded
    into the convolution before it; yields how many were folded.

    A frozen BatchNorm is a per-channel affine map, but run as its own layer it costs a pass over the
    activations forward and backward, and under CPU bf16 autocast two dtype casts around it. Folded, one
    Lite0 step at 224 px (bf16, fp32 depthwise layers) went from 20.7-29.6 to 40.8-43.2 img/s (two runs each).
    ``forward`` (the model's forward, e.g. ``Classifier.logits``) is run in inference mode on a ``size`` px
    batch with and without the fold: when the outputs differ (a pairing that is not conv -> BatchNorm in the
    data flow), nothing is folded. Undone on exit; parameter names are unchanged.
    """
    pairs = _conv_bn_pairs(model)
    swapped: list[tuple[nn.Module, type]] = []

    def swap() -> None:
        for conv, bn in pairs:
            swapped.append((conv, type(conv)))
            swapped.append((bn, type(bn)))
            conv.__dict__["_graft_bn"] = bn
            conv.__class__ = _FoldedFp32DepthwiseConv if type(conv) is _Fp32DepthwiseConv else _FoldedConv
            cls = type(bn)
            if cls not in _AFTER_FOLD:
                _AFTER_FOLD[cls] = type(f"Folded{cls.__name__}", (cls,), {"forward": _after_fold})
            bn.__class__ = _AFTER_FOLD[cls]

    def undo() -> None:
        for module, cls in reversed(swapped):
            module.__class__ = cls
            module.__dict__.pop("_graft_bn", None)
        swapped.clear()

    if pairs and forward is not None:
        ref = _eval_outputs(model, forward, size)
        swap()
        got = _eval_outputs(model, forward, size)
        undo()
        if not torch.allclose(ref, got, rtol=1e-3, atol=1e-4):
            pairs = []
    if pairs:
        swap()
    try:
        yield len(pairs)
    finally:
        undo()
