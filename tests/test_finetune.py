"""Parameter transfer: strategies, frozen BatchNorm, LR groups, resume equivalence, init_from."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from graft import GraftError
from graft.backbones import build_backbone
from graft.dataset import read_classes, read_manifest, split_items
from graft.layerwise import layer_groups, lr_factor, param_groups, set_trainable, train_mode, trainable_groups
from graft.model import Classifier, classifier_from_payload, head_config, initial_model, load_model, make_head, run_key
from graft.params import FinetuneParams, Params, parse_params
from graft.tasks.finetune import finetune
from graft.tasks.ingest import ingest
from graft.trust import calibrate
from graft.tune import predict_logits
from tests.helpers import make_params, write_tree

FAST = {"image_size": 32, "epochs": 3, "batch_size": 8, "workers": 1, "patience": 10}


def tiny_classifier(n_classes: int = 3) -> tuple[Classifier, list]:
    bb = build_backbone("tiny_cnn")
    model = Classifier(bb.model, make_head(head_config("logreg", bb.feature_dim, 8, 0.0), n_classes))
    return model, layer_groups(model.features.body)


def ft_params(ws: Path, **finetune: object) -> Params:
    return make_params(ws, {"train": {"mode": "finetune", "finetune": {**FAST, **finetune}}})


def trainable_names(model: Classifier) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lite0_layer_groups_cover_stem_blocks_and_head_conv() -> None:
    """EfficientNet-Lite0 splits into stem, its 7 stages and the head conv, input to output."""
    bb = build_backbone("efficientnet_lite0")
    groups = layer_groups(bb.model.body)
    assert len(groups) == 9
    assert groups[0][0] is bb.model.body.conv_stem and groups[-1][0] is bb.model.body.conv_head
    covered = {id(p) for g in groups for p in g.parameters()}
    assert covered == {id(p) for p in bb.model.body.parameters()}


@pytest.mark.parametrize(
    ("strategy", "extra", "epoch", "expected_groups"),
    [
        ("head", {}, 0, 0),
        ("full", {}, 0, 2),
        ("last_n", {"last_n": 1}, 0, 1),
        ("staged", {"head_epochs": 2}, 1, 0),
        ("staged", {"head_epochs": 2}, 2, 2),
        ("staged", {"head_epochs": 1, "last_n": 1}, 1, 1),
    ],
)
def test_strategies_set_requires_grad(strategy: str, extra: dict, epoch: int, expected_groups: int) -> None:
    """Each strategy trains the head plus exactly the expected top groups of the backbone."""
    model, groups = tiny_classifier()
    fp = FinetuneParams(strategy=strategy, **extra)
    n = trainable_groups(len(groups), fp, epoch)
    set_trainable(model, groups, n)
    assert n == expected_groups
    head = {f"head.{k}" for k, _ in model.head.named_parameters()}
    assert head <= trainable_names(model)
    for i, g in enumerate(groups):
        trains = {p.requires_grad for p in g.parameters()}
        assert trains == {i >= len(groups) - expected_groups}


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_frozen_batchnorm_statistics_do_not_move(ws: Path, freeze_bn: bool) -> None:
    """With last_n=1 the first block's BatchNorm running stats stay put; the trained block's move unless
    ``freeze_bn`` (the default) keeps every BatchNorm's pretrained statistics, while its weights still train."""
    write_tree(ws / "raw", classes=("a", "b", "c"), per_class=8)
    params = ft_params(ws, strategy="last_n", last_n=1, epochs=1, freeze_bn=freeze_bn, ema=None)
    ingest(params)
    model, _, _ = initial_model(params, ["a", "b", "c"])
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k or k.endswith("4.weight")}
    finetune(params)
    after = load_model(Path(params.train.model_dir))["state_dict"]
    frozen = [k for k in before if k.startswith("features.body.1.") and "running_mean" in k]
    trained = [k for k in before if k.startswith("features.body.4.") and "running_mean" in k]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["features.body.4.weight"], after["features.body.4.weight"])  # BN weights train
    if freeze_bn:
        assert all(torch.equal(before[k], after[k]) for k in trained)
    else:
        assert all(not torch.equal(before[k], after[k]) for k in trained)


def test_train_mode_keeps_frozen_groups_in_eval() -> None:
    """train_mode puts frozen groups (and their BatchNorm) in eval, trainable ones in train."""
    model, groups = tiny_classifier()
    set_trainable(model, groups, 1)
    train_mode(model, groups)
    assert not groups[0].training and all(not m.training for m in groups[0].modules())
    assert groups[1].training and model.head.training


def test_param_groups_apply_layerwise_lr_decay() -> None:
    """Head at lr; backbone group i at lr * backbone_lr_mult * layer_decay ** depth; no decay on biases."""
    model, groups = tiny_classifier()
    fp = FinetuneParams(lr=1e-2, backbone_lr_mult=0.5, layer_decay=0.1, weight_decay=0.05)
    pg = {g["name"]: g for g in param_groups(model, groups, fp)}
    assert pg["head"]["lr"] == pytest.approx(1e-2)
    assert pg["backbone.1"]["lr"] == pytest.approx(1e-2 * 0.5)
    assert pg["backbone.0"]["lr"] == pytest.approx(1e-2 * 0.5 * 0.1)
    assert pg["backbone.0"]["weight_decay"] == 0.05 and pg["backbone.0/no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim <= 1 for p in pg["head/no_decay"]["params"])
    n_params = sum(len(g["params"]) for g in pg.values())
    assert n_params == len(list(model.parameters()))


def test_warmup_then_cosine() -> None:
    """The LR factor rises linearly during warm-up, peaks at 1 and decays to 0."""
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0)


def test_resume_after_interruption_matches_an_uninterrupted_run(ws: Path) -> None:
    """Interrupt after epoch 1, resume: the final weights equal those of a run that was never stopped."""
    write_tree(ws / "raw", classes=("a", "b", "c"), per_class=8)
    params = ft_params(ws, strategy="staged", head_epochs=1, epochs=3, checkpoint_seconds=0)
    ingest(params)
    finetune(params)
    reference = load_model(Path(params.train.model_dir))

    class Stop(Exception):
        pass

    def stop_after(n: int) -> Callable[[int], None]:
        def stop(epoch: int) -> None:
            if epoch == n:
                raise Stop

        return stop

    checkpoint = Path(params.train.model_dir) / "checkpoints/last.pt"
    with pytest.raises(Stop):  # after the last epoch: no checkpoint (the model file is what comes next)
        finetune(params, on_epoch_end=stop_after(3))
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2
    with pytest.raises(Stop):
        finetune(params, resume=False, on_epoch_end=stop_after(1))
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
    summary = finetune(params, resume=True)
    resumed = load_model(Path(params.train.model_dir))
    assert summary["epochs"] == 3 and not checkpoint.exists()
    assert resumed["history"] == reference["history"]
    assert resumed["calibration"] == reference["calibration"]  # from the best epoch's val logits, kept across
    for k, v in reference["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k


def test_checkpoints_are_written_at_most_every_checkpoint_seconds(ws: Path) -> None:
    """The default (30 s) writes none in a run of a few seconds; 0 writes one after every epoch but the last.
    The interval is not part of the run key: a run checkpointed at one interval resumes at another."""
    write_tree(ws / "raw", classes=("a", "b"), per_class=6)
    params = ft_params(ws, epochs=3)
    ingest(params)
    checkpoint = Path(params.train.model_dir) / "checkpoints/last.pt"
    seen: list[int | None] = []

    def record(epoch: int) -> None:
        seen.append(torch.load(checkpoint, weights_only=True)["epoch"] if checkpoint.exists() else None)

    finetune(params, on_epoch_end=record)
    assert seen == [None, None, None]
    seen.clear()
    every = ft_params(ws, epochs=3, checkpoint_seconds=0)
    finetune(every, on_epoch_end=record)
    assert seen == [1, 2, 2]
    assert run_key(every, read_manifest(every.data.out_dir), "fp") == run_key(
        params, read_manifest(params.data.out_dir), "fp"
    )


def test_calibration_uses_the_best_epochs_val_logits(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The temperature and threshold come from the val logits the fit kept at its best epoch (no second pass over
    the val images), which equal (fp32 here) a fresh pass of the saved weights."""
    import graft.tasks.finetune as stage

    write_tree(ws / "raw", classes=("a", "b", "c"), per_class=8)
    params = ft_params(ws, precision="fp32")
    ingest(params)
    with monkeypatch.context() as m:
        m.setattr(stage, "predict_logits", lambda *a, **k: pytest.fail("a calibration pass over the val images"))
        finetune(params)
    payload = load_model(Path(params.train.model_dir))
    model, bb = classifier_from_payload(payload)
    manifest, classes = read_manifest(params.data.out_dir), read_classes(params.data.out_dir)
    paths, y = split_items(manifest, params.data.root, classes, "val")
    model.temperature = 1.0
    logits = predict_logits(model, paths, bb.preprocess)
    expect, got = calibrate(logits, y, params.predict.accept_rate, params.predict.unknown_score), payload["calibration"]
    assert got["n"] == expect["n"] == len(y) > 0
    for k in ("temperature", "nll_before", "nll_after"):
        assert got[k] == pytest.approx(expect[k], rel=1e-4), k
    assert got["unknown"]["threshold"] == pytest.approx(expect["unknown"]["threshold"], rel=1e-4, abs=1e-5)


def test_resume_without_a_checkpoint_is_a_clear_error(ws: Path) -> None:
    """--resume with nothing to resume names the checkpoint path."""
    write_tree(ws / "raw", per_class=6)
    params = ft_params(ws)
    ingest(params)
    with pytest.raises(GraftError, match="no checkpoint"):
        finetune(params, resume=True)


def test_init_from_a_source_model_with_other_classes(ws: Path) -> None:
    """A target with 3 classes starts from a 2-class source: backbone copied, classifier rebuilt."""
    src = ws / "source"
    write_tree(src / "raw", classes=("cat", "dog"), per_class=6)
    sp = make_params(src, {"train": {"mode": "finetune", "finetune": {**FAST, "strategy": "full", "epochs": 1}}})
    ingest(sp)
    finetune(sp)
    source = load_model(Path(sp.train.model_dir) / "model.pt")

    write_tree(ws / "raw", classes=("a", "b", "c"), per_class=6)
    tp = make_params(ws, {"train": {"mode": "finetune", "init_from": sp.train.model_dir, "finetune": FAST}})
    model, _, note = initial_model(tp, ["a", "b", "c"])
    state = model.state_dict()
    body = [k for k in source["state_dict"] if k.startswith("features.")]
    assert body and all(torch.equal(state[k], source["state_dict"][k]) for k in body)
    assert model.head.net[-1].out_features == 3
    assert "rebuilt for 3 classes" in note["head"]

    same = make_params(
        src, {"train": {"mode": "finetune", "init_from": str(Path(sp.train.model_dir) / "model.pt"), "finetune": FAST}}
    )
    model2, _, note2 = initial_model(same, ["cat", "dog"])
    assert note2["head"] == "loaded"
    assert torch.equal(model2.head.net[-1].weight, source["state_dict"]["head.net.0.weight"])


def test_init_from_a_model_with_another_backbone_is_refused(ws: Path) -> None:
    """A source trained on tiny_cnn cannot seed a Lite0 fine-tune."""
    src = ws / "source"
    write_tree(src / "raw", per_class=6)
    sp = ft_params(src, epochs=1)
    ingest(sp)
    finetune(sp)
    tp = parse_params(
        {
            "featurize": {"backbone": "efficientnet_lite0"},
            "train": {"mode": "finetune", "init_from": sp.train.model_dir},
        }
    )
    with pytest.raises(GraftError, match="backbone 'tiny_cnn'"):
        initial_model(tp, ["cat", "dog"])


def test_finetuned_model_evaluates_and_exports_like_a_head_model(ws: Path) -> None:
    """Both kinds feed the same evaluate and export stages and give the same ONNX contract."""
    import onnx

    from graft.tasks.evaluate import evaluate
    from graft.tasks.export import export

    write_tree(ws / "raw", classes=("a", "b", "c"), per_class=8)
    params = ft_params(ws, epochs=2)
    ingest(params)
    finetune(params)
    metrics = evaluate(params)
    assert metrics["model_name"] == "tiny_cnn fine-tuned at 32 px"
    assert (Path(params.evaluate.metrics_dir) / "curves.csv").is_file()
    assert (Path(params.evaluate.plots_dir) / "curves.png").is_file()
    export(params)
    meta = {p.key: p.value for p in onnx.load(params.export.out).metadata_props}
    assert meta["graft.kind"] == "finetune" and json.loads(meta["graft.classes"]) == ["a", "b", "c"]
    assert json.loads(meta["graft.input"])["crop"] == 32


def test_finetune_mode_starts_from_the_linear_probe(ws: Path) -> None:
    """``finetune.init: probe`` (LP-FT) in ``train.mode: finetune``: the classifier starts from a probe fitted on the
    frozen features (C by CV), so with a vanishing learning rate the model already separates the classes; a new
    random head (``init: random``) does not."""
    from graft.select import LINEAR_C_GRID

    write_tree(ws / "raw", classes=("a", "b", "c"), per_class=10)
    probe = ft_params(ws, epochs=1, lr=1e-9, ema=None, init="probe", strategy="full")
    ingest(probe)
    lp = finetune(probe)
    assert lp["head"] == "linear probe (LP-FT)" and lp["probe_C"] in LINEAR_C_GRID
    fresh = finetune(ft_params(ws, epochs=1, lr=1e-9, ema=None, init="random", strategy="full"))
    assert fresh["head"] == "new" and "probe_C" not in fresh
    assert lp["val_accuracy"] >= 0.8 and fresh["val_accuracy"] <= 0.6, (lp, fresh)


def test_precision_auto_uses_bf16_only_where_it_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU with native bf16: auto trains in bf16 from 96 px (graft's smallest fine-tune size; whole runs measured
    faster at 96 and 224), in fp32 below; fp32 and bf16 force either; a CPU without native bf16 stays fp32."""
    import graft.precision as precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: True)
    assert precision.device_and_amp("auto", 224) == (torch.device("cpu"), torch.bfloat16)
    assert precision.device_and_amp("auto", 96) == (torch.device("cpu"), torch.bfloat16)
    assert precision.device_and_amp("auto", 64) == (torch.device("cpu"), None)
    assert precision.device_and_amp("fp32", 224)[1] is None
    assert precision.device_and_amp("bf16", 32)[1] is torch.bfloat16
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    assert precision.device_and_amp("auto", 224)[1] is None


def test_bf16_training_keeps_depthwise_convolutions_in_fp32() -> None:
    """Inside fp32_depthwise, under CPU bf16 autocast, the depthwise convolutions that are slow in bf16 (5x5, and
    3x3 with stride 2) compute (and back-propagate) in fp32 while the others, 3x3 stride-1 depthwise included, run
    in bf16; afterwards the modules are plain Conv2d again, with the same state dict."""
    from torch import nn

    from graft.precision import fp32_depthwise

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 1),
        nn.Conv2d(8, 8, 5, padding=2, groups=8),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
        nn.Conv2d(8, 4, 1),
    )
    keys = list(net.state_dict())
    dtypes: dict[int, torch.dtype] = {}
    for i, m in enumerate(net):
        m.register_forward_hook(lambda mod, args, out, i=i: dtypes.__setitem__(i, out.dtype))
    x = torch.rand(2, 3, 8, 8)
    with fp32_depthwise(net) as swapped:
        assert swapped == 2
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        out.float().sum().backward()
    bf16, fp32 = torch.bfloat16, torch.float32
    assert dtypes == {0: bf16, 1: fp32, 2: bf16, 3: fp32, 4: bf16}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())
    with fp32_depthwise(net), torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():  # a forward pass alone (validation): bf16 is fast there
            net(x)
        assert set(dtypes.values()) == {bf16}
        net[:4].requires_grad_(False)  # frozen lower layers (last_n): no backward through them
        net(x).float().sum().backward()
        assert set(dtypes.values()) == {bf16} and net[4].weight.grad is not None
        net[:4].requires_grad_(True)
        net[:2].requires_grad_(False)  # the 5x5 layer frozen below every trainable one; the stride-2 one trains
        net(x)
        assert dtypes == {0: bf16, 1: bf16, 2: bf16, 3: fp32, 4: bf16}
        net.requires_grad_(True)
        net[1].requires_grad_(False)  # frozen, but layer 0's gradient flows back through it
        net(x)
        assert dtypes == {0: bf16, 1: fp32, 2: bf16, 3: fp32, 4: bf16}
        net.requires_grad_(True)
    assert all(type(m) is nn.Conv2d for m in net) and list(net.state_dict()) == keys
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)
    assert dtypes[1] == dtypes[3] == torch.bfloat16  # outside the context: autocast's usual choice
    with fp32_depthwise(net, enabled=False) as swapped:
        assert swapped == 0


def test_cpu_bf16_layers_run_activations_out_of_place_with_the_same_values() -> None:
    """Inside cpu_bf16_layers an in-place ReLU6 leaves its input untouched, gives the same values and gradients
    (bf16 autocast), and is in place again afterwards; disabled, nothing changes."""
    from torch import nn

    from graft.precision import cpu_bf16_layers, fp32_depthwise

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU6(inplace=True), nn.Conv2d(8, 8, 5, padding=2, groups=8))
    seen: list[torch.Tensor] = []
    net[0].register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    x = torch.randn(2, 3, 8, 8) * 4

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        out.float().sum().backward()
        return out.detach().float(), net[0].weight.grad.clone()

    with fp32_depthwise(net):
        ref_out, ref_grad = run()
    assert float(seen[-1].max()) <= 6.0  # in place: the convolution's output itself was clamped
    with cpu_bf16_layers(net) as (dw, act):
        assert (dw, act) == (1, 1)
        out, grad = run()
        assert float(seen[-1].max()) > 6.0  # out of place: the convolution's output is left as it was
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(grad, ref_grad)
    assert net[1].inplace is True
    with cpu_bf16_layers(net, enabled=False) as counts:
        assert counts == (0, 0)


@pytest.mark.parametrize(("precision", "fp32_layers"), [("bf16", True), ("fp32", False)])
def test_fit_keeps_depthwise_layers_fp32_only_in_cpu_bf16(
    ws: Path, monkeypatch: pytest.MonkeyPatch, precision: str, fp32_layers: bool
) -> None:
    """The fine-tune loop itself enters cpu_bf16_layers, enabled exactly when it trains in bf16 on the CPU."""
    import graft.tune as tune

    calls: list[bool] = []
    real = tune.cpu_bf16_layers

    def recording(model: torch.nn.Module, enabled: bool = True):
        calls.append(enabled)
        return real(model, enabled)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(tune, "cpu_bf16_layers", recording)
    write_tree(ws / "raw", classes=("a", "b"), per_class=6)
    params = ft_params(ws, epochs=1, precision=precision, strategy="full")
    ingest(params)
    assert finetune(params)["epochs"] == 1 and calls == [fp32_layers]


def _conv_bn_net() -> torch.nn.Sequential:
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    for bn in (net[1], net[4]):  # pretrained-looking statistics and affine weights
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def test_folded_batchnorm_gives_the_same_outputs_and_gradients() -> None:
    """fold_frozen_bn folds each inference-mode BatchNorm into its convolution: the same outputs and the same
    gradients for the convolution and BatchNorm parameters; afterwards the modules and names are as before."""
    from graft.fold import fold_frozen_bn

    x = torch.rand(2, 3, 12, 12)

    def grads(folded: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        net = _conv_bn_net()
        with fold_frozen_bn(net, net, size=12) if folded else contextlib.nullcontext() as n:
            assert n in (None, 2)
            out = net(x)
            out.pow(2).sum().backward()
        assert [type(m).__name__ for m in net] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d"]
        return out.detach(), [p.grad for p in net.parameters()]

    net = _conv_bn_net()
    with fold_frozen_bn(net), pytest.raises(RuntimeError, match="training mode"):
        net.train()(x)  # batch statistics cannot be folded: refused, not silently wrong
    (ref, ref_grads), (got, got_grads) = grads(False), grads(True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_batchnorm_that_is_not_applied_to_its_convolution_is_not_folded() -> None:
    """A BatchNorm registered after a convolution but used elsewhere in the forward: the check sees different
    outputs and nothing is folded."""
    from torch import nn

    from graft.fold import fold_frozen_bn

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.bn(x))  # BatchNorm first: folding it into conv would be wrong

    net = Odd().eval()
    net.bn.running_mean.fill_(0.5)
    with fold_frozen_bn(net, net, size=8) as n:
        assert n == 0 and type(net.conv) is nn.Conv2d


def test_folded_depthwise_layer_stays_fp32_under_bf16() -> None:
    """Both contexts together (as in fit): the depthwise convolution is folded and still computes in fp32 under
    CPU bf16 autocast, matching the unfolded fp32 layer; on exit every module is plain again."""
    from torch import nn

    from graft.fold import fold_frozen_bn
    from graft.precision import fp32_depthwise

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 3, 5, padding=2, groups=3), nn.BatchNorm2d(3)).eval()
    net[1].running_mean.uniform_(-1, 1), net[1].running_var.uniform_(0.5, 2)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
    with fp32_depthwise(net) as dw, fold_frozen_bn(net, net, size=8) as folded:
        assert (dw, folded) == (1, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)  # its weights train: the backward will pass through it
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)
    assert [type(m) for m in net] == [nn.Conv2d, nn.BatchNorm2d]


def test_lpft_probe_reads_the_feature_table_when_featurize_ran_the_same_backbone(
    ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With featurize's table computed at the fine-tune's size, the LP-FT probe takes its pooled features from it
    (the same values as a probe pass, no pass run); at another size, with init_from, or without the table it
    computes them."""
    import graft.lpft as lpft
    from graft.auto import probe_features
    from graft.cache import cached_pooled_features
    from graft.tasks.featurize import featurize

    write_tree(ws / "raw", classes=("a", "b", "c"), per_class=8)
    params = make_params(ws, {"featurize": {"image_size": 32}, "train": {"mode": "finetune", "finetune": FAST}})
    ingest(params)
    manifest, classes = read_manifest(params.data.out_dir), read_classes(params.data.out_dir)
    shas = manifest.loc[manifest["split"] == "train", "sha256"].tolist()
    model, bb, _ = initial_model(params, classes, 32)
    assert cached_pooled_features(params.featurize.out, bb.describe(), shas) is None  # no table yet
    featurize(params)
    cached = cached_pooled_features(params.featurize.out, bb.describe(), shas)
    paths, _ = split_items(manifest, params.data.root, classes, "train")
    computed, _ = probe_features(model.features, paths, bb.preprocess)
    assert cached is not None and cached.shape == computed.shape == (len(shas), bb.feature_dim)
    np.testing.assert_allclose(cached, computed, rtol=1e-4, atol=1e-4)
    other = build_backbone("tiny_cnn", image_size=64).describe()
    assert cached_pooled_features(params.featurize.out, other, shas) is None
    assert cached_pooled_features(params.featurize.out, bb.describe(), [*shas, "0" * 64]) is None

    passes: list[int] = []
    real = lpft.probe_features
    monkeypatch.setattr(lpft, "probe_features", lambda *a, **k: passes.append(1) or real(*a, **k))
    assert finetune(params)["probe_features"] == "feature cache" and passes == []
    bigger = make_params(ws, {"train": {"mode": "finetune", "finetune": {**FAST, "image_size": 64}}})
    assert finetune(bigger)["probe_features"] == "computed" and passes == [1]


@pytest.mark.parametrize(("kernel", "stride"), [(5, 1), (3, 2)])
def test_folded_fp32_depthwise_gradients_match_the_plain_layers(kernel: int, stride: int) -> None:
    """The folded fp32 depthwise convolution computes its bias gradient as a sum outside oneDNN (faster there):
    the input, convolution and BatchNorm gradients are those of the plain fp32 layers; with nothing to train
    below, no graph is recorded."""
    from torch import nn

    from graft.fold import fold_frozen_bn
    from graft.precision import fp32_depthwise

    def run(fast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(6, 6, kernel, stride, kernel // 2, groups=6, bias=False), nn.BatchNorm2d(6))
        net[1].running_mean.uniform_(-1, 1), net[1].running_var.uniform_(0.5, 2), net[1].bias.data.uniform_(-1, 1)
        net = net.eval().to(memory_format=torch.channels_last)
        x = torch.rand(4, 6, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        ctx = contextlib.ExitStack()
        if fast:
            ctx.enter_context(fp32_depthwise(net))
            assert ctx.enter_context(fold_frozen_bn(net)) == 1
            ctx.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        with ctx:
            out = net(x)
            assert not fast or (type(out.grad_fn).__name__, out.grad_fn.op) == ("_FoldedConvGradBackward", None)
            (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        return out.detach(), [x.grad, *(p.grad for p in net.parameters())]

    (ref, ref_grads), (got, got_grads) = run(False), run(True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert all(g is not None for g in got_grads) and len(got_grads) == 4  # input, conv weight, BatchNorm gamma, beta
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    net = nn.Sequential(nn.Conv2d(6, 6, 5, 1, 2, groups=6, bias=False), nn.BatchNorm2d(6)).eval().requires_grad_(False)
    with fp32_depthwise(net), fold_frozen_bn(net), torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(torch.rand(1, 6, 8, 8)).grad_fn is None  # frozen (last_n's lower blocks): nothing recorded
