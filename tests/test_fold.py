"""graft.fold's activation fusion: with a frozen BatchNorm folded into its convolution, the activation of timm's
BatchNormAct2d is computed by the same oneDNN call on the CPU. Outputs and gradients must be those of the plain
layers, in fp32 and under bf16 autocast (with graft's fp32 depthwise layers), and every module must be plain again
on exit. (The fold itself: tests/test_finetune.py.)"""

from __future__ import annotations

import contextlib

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn

import graft.fold as fold
from graft.fold import fold_frozen_bn
from graft.precision import fp32_depthwise


def _block(act: type[nn.Module], kernel: int = 5, stride: int = 1) -> nn.Sequential:
    """An inverted-residual-like chain: 1x1 expand + BN + act, depthwise + BN + act, 1x1 project + BN."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 1, bias=False),
        BatchNormAct2d(8, act_layer=act),
        nn.Conv2d(8, 8, kernel, stride, kernel // 2, groups=8, bias=False),
        BatchNormAct2d(8, act_layer=act),
        nn.Conv2d(8, 4, 1, bias=False),
        BatchNormAct2d(4, apply_act=False),
    )
    for m in net:
        if isinstance(m, nn.BatchNorm2d):  # pretrained-looking statistics and affine weights
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-1, 1)
    return net.eval().to(memory_format=torch.channels_last)


def _run(act: type[nn.Module], mode: str, bf16: bool, kernel: int = 5, stride: int = 1) -> dict:
    """Output, gradients (input and every parameter), the convolutions' grad_fn names and their largest output."""
    net = _block(act, kernel, stride)
    seen: list[tuple[str, str | None, float]] = []  # grad_fn, the oneDNN post-op it computed, largest output
    for conv in net[0::2]:
        conv.register_forward_hook(
            lambda m, a, out: seen.append(
                (
                    type(out.grad_fn).__name__,
                    (getattr(out.grad_fn, "op", None) or [None])[0],
                    float(out.detach().float().max()),
                )
            )
        )
    x = (torch.randn(4, 3, 12, 12) * 4).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with contextlib.ExitStack() as stack:
        if bf16:
            stack.enter_context(fp32_depthwise(net))  # as fit runs CPU bf16: the 5x5 depthwise layer in fp32
        if mode != "plain":
            assert stack.enter_context(fold_frozen_bn(net, net, size=12, fuse_activations=mode == "fused")) == 3
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16))
        seen.clear()  # the fold's own check ran the layers too
        out = net(x)
        (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    assert all(type(m) in (nn.Conv2d, BatchNormAct2d) for m in net)  # plain again on exit
    assert not any(k.startswith("_graft") for m in net.modules() for k in m.__dict__)
    return {"out": out.detach().float(), "grads": [x.grad, *(p.grad for p in net.parameters())], "seen": seen}


def test_this_torch_build_has_the_fused_convolution() -> None:
    assert fold.fused_available()


@pytest.mark.parametrize("act", [nn.ReLU6, nn.ReLU])
@pytest.mark.parametrize(("kernel", "stride"), [(5, 1), (3, 2)])
def test_fused_activation_gives_the_plain_layers_outputs_and_gradients_in_fp32(
    act: type[nn.Module], kernel: int, stride: int
) -> None:
    plain, fused = _run(act, "plain", False, kernel, stride), _run(act, "fused", False, kernel, stride)
    # the two convolutions followed by an activation run fused; the projection (no activation) does not
    expected = "hardtanh" if act is nn.ReLU6 else "relu"
    assert [(name, op) for name, op, _ in fused["seen"]] == [
        ("_FoldedConvGradBackward", expected),
        ("_FoldedConvGradBackward", expected),
        ("ConvolutionBackward0", None),
    ]
    if act is nn.ReLU6:  # the fused convolution's own output is clamped; plain, the convolution's is not
        assert max(v for *_, v in fused["seen"][:2]) <= 6.0 < max(v for *_, v in plain["seen"][:2])
    torch.testing.assert_close(fused["out"], plain["out"], rtol=1e-5, atol=1e-5)
    assert len(fused["grads"]) == 1 + 3 + 6 and all(g is not None for g in fused["grads"])
    for a, b in zip(fused["grads"], plain["grads"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("without_native_bf16", [False, True])
def test_fused_activation_under_bf16_matches_the_unfused_fold(
    without_native_bf16: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under CPU bf16 autocast (the fp32 depthwise layer included) the fused layers give the unfused fold's
    outputs and gradients, and stay near the plain fp32 layers. On a CPU without native bf16 (AVX2: oneDNN's
    fused op refuses bf16) the bf16 layer runs its convolution, then its activation; the fp32 depthwise layer
    stays fused. ``without_native_bf16`` makes any CPU such a CPU; without it the test runs on this CPU as it is."""
    if without_native_bf16:
        monkeypatch.setattr(fold, "fused_dtype", lambda dtype: dtype == torch.float32)
    unfused, fused = _run(nn.ReLU6, "folded", True), _run(nn.ReLU6, "fused", True)
    fp32 = _run(nn.ReLU6, "plain", False)
    bf16_fused = "hardtanh" if fold.fused_dtype(torch.bfloat16) else None
    assert [op for _, op, _ in fused["seen"]] == [bf16_fused, "hardtanh", None]
    assert [op for _, op, _ in unfused["seen"]] == [None, None, None]
    torch.testing.assert_close(fused["out"], unfused["out"], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(fused["out"], fp32["out"], rtol=5e-2, atol=5e-2)
    for a, b in zip(fused["grads"], unfused["grads"], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_activations_without_a_post_op_or_after_dropout_run_unfused() -> None:
    """SiLU has no oneDNN post-op here, and a dropout between the BatchNorm and the activation would be reordered:
    both layers are folded, neither is fused, and the outputs are the plain layers'."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), BatchNormAct2d(4, act_layer=nn.SiLU),
        nn.Conv2d(4, 4, 1), BatchNormAct2d(4, act_layer=nn.ReLU6, drop_layer=nn.Dropout),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
    with fold_frozen_bn(net, net, size=8) as n:
        assert n == 2 and not any("_graft_act" in m.__dict__ for m in net)
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)


def test_without_the_fused_op_or_off_the_cpu_the_activation_runs_after_the_convolution(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A torch without oneDNN folds but does not fuse; on another device (here torch's meta device) a fused layer
    runs its convolution and then its activation module, once."""
    calls: list[int] = []
    net = _block(nn.ReLU6)
    for m in (net[1].act, net[3].act):
        m.register_forward_hook(lambda m, a, out: calls.append(1))
    monkeypatch.setattr(fold, "fused_available", lambda: False)
    with fold_frozen_bn(net) as n:
        assert n == 3 and not any("_graft_act" in m.__dict__ for m in net)
    monkeypatch.undo()
    with fold_frozen_bn(net) as n, torch.no_grad():
        assert (
            n == 3 and [type(m.__dict__["_graft_act"][0]) for m in net if "_graft_act" in m.__dict__] == [nn.ReLU6] * 2
        )
        net(torch.rand(1, 3, 8, 8))
        assert calls == []  # on the CPU the convolution computed both activations
        out = net.to("meta")(torch.empty(1, 3, 8, 8, device="meta"))
    assert out.shape == (1, 4, 8, 8) and calls == [1, 1]


def test_frozen_fused_layers_record_no_graph() -> None:
    """last_n's frozen lower blocks: no parameter trains and the input needs no gradient, so nothing is kept."""
    net = _block(nn.ReLU6).requires_grad_(False)
    with fp32_depthwise(net), fold_frozen_bn(net), torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(torch.rand(1, 3, 8, 8)).grad_fn is None
