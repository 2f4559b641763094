"""Frozen BatchNorm folded into the convolution before it for the length of a fine-tune (``finetune.freeze_bn``),
and the activation after it computed by the same oneDNN call on the CPU (measured in ``bench/train_speed.py``).

A frozen BatchNorm is a per-channel affine map, but run as its own layer it costs a pass over the activations
forward and backward, and under CPU bf16 autocast two dtype casts around it. Folded, the convolution computes
``conv(x, W * s, beta - mean * s)`` with ``s = gamma / sqrt(var + eps)`` recomputed every call, so W, gamma and
beta all still train. timm's ``BatchNormAct2d`` also applies the block's activation (ReLU6 in Lite0): on the CPU
that becomes a post-op of the convolution (``mkldnn._convolution_pointwise``), so the forward writes the
activation once instead of writing the convolution's output and reading it again, and the backward takes the
activation's mask from the output, which the next layer keeps anyway.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from graft.precision import Fp32DepthwiseConv, cpu_bf16_native

Conf = tuple[list[int], list[int], list[int], int]  # stride, padding, dilation, groups
PostOp = tuple[str, list[float]]  # a oneDNN post-op and its scalars
Fused = tuple[nn.Module, PostOp, Conf]  # the activation module, its post-op, the convolution's geometry


def post_op(act: nn.Module) -> PostOp | None:
    """The oneDNN post-op that computes ``act``, or None where there is none (the activation then runs alone)."""
    if type(act) is nn.ReLU6:
        return "hardtanh", [0.0, 6.0]
    if type(act) is nn.Hardtanh and act.min_val < act.max_val:
        return "hardtanh", [float(act.min_val), float(act.max_val)]
    if type(act) is nn.ReLU:
        return "relu", []
    return None


@functools.cache
def fused_available() -> bool:
    """Whether this torch build has oneDNN's convolution with a post-op (a CPU build with oneDNN)."""
    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


@functools.cache
def fused_dtype(dtype: torch.dtype) -> bool:
    """Whether oneDNN's convolution with a post-op runs in ``dtype`` on this CPU: fp32 anywhere, bf16 only where
    the CPU has it (AVX512-BF16/AMX or AVX-NE-CONVERT; elsewhere the op refuses, where a plain convolution falls
    back to a slower path), nothing else."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_bf16_native())


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, conf: Conf, op: PostOp) -> torch.Tensor:
    stride, padding, dilation, groups = conf
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups, *op, "")


class _FoldedConvGrad(torch.autograd.Function):
    """``conv2d(x, weight, bias)``, with ``op`` followed by its activation in the same oneDNN call, and a backward
    that computes the bias gradient itself in fp32.

    With ``op`` the backward first masks the output gradient where the activation is flat, read off the output
    (ReLU6's output is in (0, 6) exactly where its input is), so the pre-activation is never kept. Then oneDNN
    gives the input and weight gradients. In fp32 the bias gradient is a plain sum: oneDNN's fp32 depthwise
    backward computes it slowly (batch 32, channels_last, 672 channels at 14 px 5x5: 41.0 ms with the bias'
    against 26.8 + 0.5 ms without it and a sum; over Lite0's fp32 depthwise layers at 224 px 326 against
    269 + 5 ms a step; one bf16 step 37.8 against 36.5 img/s, three fresh processes each). In bf16 oneDNN
    computes it (PyTorch's CPU sum over a bf16 tensor is slower still)."""

    @staticmethod
    def forward(ctx, x, weight, bias, conf, op):
        y = _pointwise(x, weight, bias, conf, op) if op else nn.functional.conv2d(x, weight, bias, *conf)
        ctx.save_for_backward(x, weight, y if op else None)
        ctx.conf, ctx.op = conf, op
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        if ctx.op is None:
            g = grad
        elif ctx.op[0] == "hardtanh":
            g = torch.ops.aten.hardtanh_backward(grad, y, *ctx.op[1])
        else:
            g = torch.ops.aten.threshold_backward(grad, y, 0)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        by_sum = need_b and g.dtype == torch.float32
        mask = [need_x, need_w, need_b and not by_sum]
        gx = gw = gb = None
        if any(mask):
            size = [weight.shape[0]]
            gx, gw, gb = torch.ops.aten.convolution_backward(
                g, x, weight, size, stride, padding, dilation, False, [0, 0], groups, mask
            )
        return gx, gw, g.sum((0, 2, 3)) if by_sum else gb, None, None


def _geometry(conv: nn.Conv2d) -> Conf | None:
    """``conv``'s stride, padding, dilation and groups as the oneDNN calls take them; None for padding that is
    not explicit zeros (a string, or another padding mode), which those calls cannot express."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _FoldedConv(nn.Conv2d):
    """A convolution with the frozen BatchNorm after it folded in (and, on the CPU, its activation fused)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.__dict__["_graft_bn"]  # not a registered submodule: the state dict keeps its names
        if bn.training:  # batch statistics cannot be folded: a caller broke fold_frozen_bn's contract
            raise RuntimeError("a folded BatchNorm was switched to training mode (fold only with freeze_bn)")
        s = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * s
        if self.bias is not None:
            bias = bias + self.bias * s
        weight = self.weight * s.reshape(-1, 1, 1, 1)
        fused: Fused | None = self.__dict__.get("_graft_act")
        if fused is None:
            return self._conv_forward(x, weight, bias)
        act, op, conf = fused
        # the fused op is oneDNN's (CPU; fp32, or bf16 where native) and has no autocast rule: cast as autocast
        # casts conv2d's arguments; anywhere else the activation runs after the convolution
        cpu = x.device.type == "cpu"
        dtype = torch.get_autocast_dtype("cpu") if cpu and torch.is_autocast_enabled("cpu") else weight.dtype
        if not (cpu and fused_dtype(dtype)):
            return act(self._conv_forward(x, weight, bias))
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        if _needs_grad(x, weight, bias):
            return _FoldedConvGrad.apply(x, weight, bias, conf, op)
        return _pointwise(x, weight, bias, conf, op)


class _FoldedFp32DepthwiseConv(Fp32DepthwiseConv, _FoldedConv):
    """Both: autocast off and fp32 input (:class:`Fp32DepthwiseConv`), then the folded convolution, whose bias
    gradient is a plain sum (:class:`_FoldedConvGrad`) when a backward pass will run."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        conf = _geometry(self)
        if bias is None or conf is None or not _needs_grad(x, weight, bias):
            return super()._conv_forward(x, weight, bias)
        return _FoldedConvGrad.apply(x, weight, bias, conf, None)


def _after_fold(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What is left of a folded BatchNorm: timm's BatchNormAct2d keeps its dropout and activation (unless the
    convolution computes the activation)."""
    drop, act = getattr(self, "drop", None), getattr(self, "act", None)
    x = drop(x) if drop is not None else x
    return act(x) if act is not None and "_graft_fused" not in self.__dict__ else x


_AFTER_FOLD: dict[type, type] = {}


def _conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Each plain convolution registered right before a BatchNorm of its width, in the same parent."""
    pairs = []
    for parent in model.modules():
        kids = list(parent.children())
        for conv, bn in zip(kids, kids[1:], strict=False):
            if (
                isinstance(conv, nn.Conv2d)
                and type(conv) in (nn.Conv2d, Fp32DepthwiseConv)  # not a subclass graft does not know
                and isinstance(bn, nn.BatchNorm2d)
                and bn.track_running_stats
                and bn.affine
                and bn.num_features == conv.out_channels
            ):
                pairs.append((conv, bn))
    return pairs


def _fusable(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Fused | None:
    """The activation of ``bn`` that ``conv`` can compute as its post-op, with the post-op and the convolution's
    geometry, or None: an activation oneDNN has, straight after the BatchNorm (no dropout between), and a
    convolution with explicit zero padding."""
    act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)
    if not isinstance(act, nn.Module) or not isinstance(drop, nn.Identity | None):
        return None
    op, conf = post_op(act), _geometry(conv)
    return None if op is None or conf is None else (act, op, conf)


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
    model: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    size: int = 64,
    fuse_activations: bool = True,
) -> Iterator[int]:
    """While active, every BatchNorm in inference mode for the whole run (``finetune.freeze_bn``) is folded
    into the convolution before it, and with ``fuse_activations`` (where oneDNN is) the activation of timm's
    BatchNormAct2d is computed by the convolution; yields how many BatchNorms were folded.

    Folded, one Lite0 step at 224 px (bf16, fp32 depthwise layers) went from 20.7-29.6 to 40.8-43.2 img/s (two
    runs each); computing its 33 ReLU6 in the convolutions as well, 35.9-39.2 to 39.7-43.2 img/s (six
    fresh processes each, alternating).
    ``forward`` (the model's forward, e.g. ``Classifier.logits``) is run in inference mode on a ``size`` px
    batch with and without the fold: when the outputs differ (a pairing that is not conv -> BatchNorm in the
    data flow), nothing is folded. Undone on exit; parameter names are unchanged.
    """
    pairs = _conv_bn_pairs(model)
    fuse = fuse_activations and fused_available()
    swapped: list[tuple[nn.Module, type]] = []

    def swap() -> None:
        for conv, bn in pairs:
            swapped.append((conv, type(conv)))
            swapped.append((bn, type(bn)))
            conv.__dict__["_graft_bn"] = bn
            fused = _fusable(conv, bn) if fuse else None
            if fused is not None:
                conv.__dict__["_graft_act"], bn.__dict__["_graft_fused"] = fused, True
            conv.__class__ = _FoldedFp32DepthwiseConv if type(conv) is Fp32DepthwiseConv else _FoldedConv
            cls = type(bn)
            if cls not in _AFTER_FOLD:
                _AFTER_FOLD[cls] = type(f"Folded{cls.__name__}", (cls,), {"forward": _after_fold})
            bn.__class__ = _AFTER_FOLD[cls]

    def undo() -> None:
        for module, cls in reversed(swapped):
            module.__class__ = cls
            for key in ("_graft_bn", "_graft_act", "_graft_fused"):
                module.__dict__.pop(key, None)
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
