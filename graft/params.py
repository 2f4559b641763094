"""The one typed params object: ``params.yaml`` is read once into :class:`Params`.

Unknown keys, wrong types and out-of-range values fail with a one-line message naming the key.
Defaults carry a short reason beside them.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from graft import GraftError
from graft.yamlload import load_yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class SplitParams(_Strict):
    train: float = Field(0.7, gt=0, lt=1)
    val: float = Field(0.15, ge=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitParams:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        return self


class DataParams(_Strict):
    root: str = "data/raw"  # class folders, train/val/test folders, or where manifest paths resolve
    manifest: str | None = None  # optional CSV/Parquet of path,label[,split]; paths relative to root
    out_dir: str = "data"  # manifest.parquet, quarantine.csv, classes.json land here
    split: SplitParams = SplitParams()


class IngestParams(_Strict):
    max_bad_fraction: float = Field(0.2, ge=0, le=1)  # fail the stage when more files than this are bad
    label_conflicts: Literal["quarantine", "keep"] = "quarantine"  # same bytes under two labels
    min_images_per_class: int = Field(2, ge=1)
    workers: int = Field(2, ge=1, le=64)  # decoding threads (Pillow releases the GIL)
    max_file_bytes: int = Field(256 * 2**20, ge=1, le=2**31)  # larger files (or a /dev/zero link) are never read
    allow_links_outside_root: bool = False  # folder mode: read symlinks whose target lies outside data.root


class DaskParams(_Strict):
    """Where ``featurize.runner: dask`` runs: an existing Dask scheduler, or a LocalCluster started for the run."""

    address: str | None = None  # e.g. tcp://scheduler:8786; null starts a LocalCluster on this machine
    n_workers: int = Field(2, ge=1, le=1024)  # LocalCluster worker processes (one backbone each)
    threads_per_worker: int = Field(1, ge=1, le=256)  # shards run at once per worker; each shard uses one core
    decode_threads: int = Field(
        0, ge=0, le=64
    )  # per shard: 0 decodes inline (CPU workers); >0 overlaps decoding (GPU workers)
    retries: int = Field(
        2, ge=0, le=10
    )  # Prefect retries of a failed shard (I/O errors; a lost worker is rescheduled by Dask)


class FeaturizeParams(_Strict):
    backbone: str = "efficientnet_lite0"  # see `graft backbones`
    weights: str | None = None  # state-dict path; default: embedded Lite0 / local torch or HF cache
    image_size: int | None = Field(None, ge=16, le=1024)  # override the backbone's crop size
    # What one forward pass caches per image: raw (grey raw_size^2 pixels), stages (pooled output of each
    # stage: Head2Toe's multi-layer features), last (the usual pooled features). auto's candidates use all three.
    taps: tuple[Literal["raw", "stages", "last"], ...] = Field(("raw", "stages", "last"), min_length=1)
    raw_size: int = Field(16, ge=4, le=64)  # side of the raw-pixel tap (16 x 16 grey = 256 values)
    batch_size: int = Field(32, ge=1, le=4096)
    workers: int = Field(2, ge=1, le=64)  # decoder threads feeding the model
    threads: int = Field(0, ge=0, le=256)  # inference threads (torch intra-op, or onnxruntime in total); 0 = all cores
    cache_dir: str = "cache/features"  # shared by every run; keyed by image sha256 x backbone fingerprint
    part_rows: int = Field(2048, ge=1)  # rows per Parquet part: bounds memory and lost work on a crash
    out: str = "data/features.parquet"  # the features of this manifest's images, for the train stage
    engine: Literal["auto", "onnxruntime", "torch"] = (
        "auto"  # auto: torch on CUDA, onnxruntime on CPU (~5x torch eager)
    )
    streams: int = Field(
        0, ge=0, le=64
    )  # onnxruntime sessions run side by side; 0 = one per core, at most 4 (threads split among them)
    amp: bool = True  # torch engine on CUDA: fp16 autocast (features within ~1e-3 of fp32; same cache key)
    # int8: a statically quantized backbone on onnxruntime (VNNI/AMX CPUs), calibrated once per cache on
    # calibration_images of the first images it featurizes; its own fingerprint and cache folder
    precision: Literal["fp32", "int8"] = "fp32"
    calibration_images: int = Field(64, ge=1, le=10_000)
    runner: Literal["local", "dask"] = "local"  # dask: shards run as Prefect tasks on a Dask cluster (docs/scale.md)
    shard_size: int = Field(
        512, ge=1, le=1_000_000
    )  # images per dask shard (one Parquet part each): ~5 s of Lite0 on one core
    dask: DaskParams = DaskParams()

    @model_validator(mode="after")
    def _int8_runs_locally_on_onnxruntime(self) -> FeaturizeParams:
        if self.precision == "int8" and self.engine == "torch":
            raise ValueError("precision int8 runs on onnxruntime: set engine auto or onnxruntime")
        if self.precision == "int8" and self.runner == "dask":  # workers must not calibrate graphs of their own
            raise ValueError("precision int8 runs with runner local (Dask workers would each calibrate their own)")
        return self


class AugmentParams(_Strict):
    random_resized_crop: bool = True
    scale_min: float = Field(0.6, gt=0, le=1)  # smallest crop area share for random resized crop
    ratio: tuple[float, float] = (0.75, 1.3333)  # aspect-ratio range of the random crop
    hflip: bool = True  # off for data where left/right matters (digits, text)
    color_jitter: float = Field(0.0, ge=0, le=1)  # brightness/contrast jitter strength

    @model_validator(mode="after")
    def _ratio_order(self) -> AugmentParams:
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {self.ratio}")
        return self


class FinetuneParams(_Strict):
    strategy: Literal["head", "last_n", "full", "staged"] = "staged"
    last_n: int | None = Field(None, ge=1)  # blocks to unfreeze (last_n; staged: null = all)
    head_epochs: int = Field(1, ge=0)  # staged: epochs with the backbone frozen before unfreezing
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(2e-3, gt=0, le=10)  # head learning rate; peak of the schedule
    backbone_lr_mult: float = Field(0.2, gt=0, le=10)  # discriminative LR: backbone top block gets lr * this
    layer_decay: float = Field(0.8, gt=0, le=1)  # each earlier block gets this factor more (1 = off)
    weight_decay: float = Field(0.02, ge=0)
    schedule: Literal["cosine", "onecycle"] = "cosine"
    warmup_epochs: float = Field(0.5, ge=0)  # linear warm-up (cosine schedule)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    patience: int = Field(4, ge=1)  # epochs without val-loss improvement before stopping
    # null = from the data: median short side rounded up to a multiple of 32, clamped to [96, the backbone's crop]
    image_size: int | None = Field(None, ge=16, le=1024)
    ema: float | None = Field(
        0.999, gt=0, lt=1
    )  # EMA decay of the weights (smoother, better-generalising end point); null = off
    init: Literal["probe", "random"] = (
        "probe"  # probe: new classifier starts from the fitted linear probe (LP-FT, Kumar et al. 2022)
    )
    workers: int = Field(2, ge=1, le=64)  # decoder threads
    threads: int = Field(0, ge=0, le=256)  # torch threads; 0 = all cores
    # seconds between resume checkpoints (each costs ~0.15 s for Lite0); 0 = after every epoch; none after the last
    checkpoint_seconds: float = Field(30.0, ge=0)
    # BatchNorm keeps its pretrained running statistics while its weights train. On small data the batch
    # statistics move the features away from what the LP-FT probe was fitted on (measured on 8x8 digits:
    # val accuracy 0.95 frozen against 0.59 after 3 epochs); false: the usual train-mode BatchNorm
    freeze_bn: bool = True
    # auto: bf16 autocast on CUDA, and on CPUs with native bf16 (AVX512-BF16/AMX) from 96 px; else fp32
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    augment: AugmentParams = AugmentParams()


Candidate = Literal["pixels", "logreg", "mlp", "multilayer", "fusion", "ensemble", "finetune", "other_backbones"]
CANDIDATES: tuple[Candidate, ...] = typing.get_args(Candidate)  # cheapest first: the order auto tries them in


class TrainParams(_Strict):
    # auto: try train.candidates cheapest first within budget_minutes, keep the best on validation
    # (no one mode wins everywhere)
    mode: Literal["auto", "head", "finetune"] = "auto"
    budget_minutes: float = Field(
        20.0, gt=0, allow_inf_nan=False
    )  # auto: CPU wall time for all candidates; one that cannot fit is skipped and reported
    candidates: tuple[Candidate, ...] = Field(CANDIDATES, min_length=1)  # auto: which candidates it may try
    cv_folds: int = Field(5, ge=2, le=20)  # auto: k of the k-fold CV on train+val for cached-feature candidates
    cv_below: int = Field(
        2000, ge=0
    )  # auto: CV when the data set has fewer images than this, else the val split (CV costs k fits)
    refit: Literal["none", "trainval", "all"] = (
        "trainval"  # retrain the winner on train+val before test and export; all: + test, after the test metrics
    )
    head: Literal["logreg", "mlp"] = "logreg"
    hidden: int = Field(512, ge=1)  # MLP hidden width
    dropout: float = Field(0.2, ge=0, lt=1)
    lr: float = Field(3e-3, gt=0, le=10)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(256, ge=1)
    max_epochs: int = Field(300, ge=1)
    patience: int = Field(30, ge=1)  # epochs without val improvement before stopping
    class_weights: bool = False  # weigh the loss (and auto's feature candidates) by inverse class frequency
    model_dir: str = "models"
    init_from: str | None = None  # fine-tuning starts from an earlier graft model (file or folder)
    finetune: FinetuneParams = FinetuneParams()

    @field_validator("candidates")
    @classmethod
    def _no_duplicates(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        dup = sorted({c for c in value if value.count(c) > 1})
        if dup:
            raise ValueError(f"lists {', '.join(dup)} more than once")
        return value

    @model_validator(mode="after")
    def _init_needs_finetune(self) -> TrainParams:
        fine_tunes = self.mode == "finetune" or (self.mode == "auto" and "finetune" in self.candidates)
        if self.init_from and not fine_tunes:  # it would be silently ignored
            raise ValueError("init_from needs mode: finetune (or mode: auto with finetune in train.candidates)")
        if fine_tunes and self.finetune.strategy == "last_n" and not self.finetune.last_n:
            raise ValueError("finetune.strategy last_n needs finetune.last_n")
        return self


class EvaluateParams(_Strict):
    baseline_size: int = Field(16, ge=4, le=128)  # raw-pixel baseline: images downscaled to NxN grey
    ece_bins: int = Field(15, ge=2, le=100)
    metrics_dir: str = "metrics"
    plots_dir: str = "plots"
    report: str = "reports/report.md"
    near_duplicate_threshold: float = Field(
        0.98, gt=0, le=1
    )  # feature cosine at which images in two splits count as one (Lite0: unrelated digits peak ~0.96)


class ExportParams(_Strict):
    opset: int = Field(17, ge=13, le=21)
    atol: float = Field(1e-4, gt=0)  # max |p_onnx - p_torch| allowed at batch 1 and batch N
    check_batch: int = Field(8, ge=2, le=256)
    out: str = "models/model.onnx"
    quantize: Literal["int8"] | None = "int8"  # also write <out>.int8.onnx (static, calibrated): ~2x faster on CPU
    calibration_images: int = Field(
        128, ge=1, le=10000
    )  # train-split images that calibrate the int8 activation ranges (~10 s for Lite0)


class PredictParams(_Strict):
    # share of in-distribution images that pass the unknown threshold (fitted on held-out data at train time)
    accept_rate: float = Field(0.95, gt=0, lt=1)
    # the in-distribution score in the exported graph: energy (T * logsumexp of the logits) or the max
    # softmax probability; evaluate measures both by leave-one-class-out AUROC (metrics.json "unknown")
    unknown_score: Literal["energy", "msp"] = "energy"


class RetrainParams(_Strict):
    models_dir: str = "models"  # champion link, version folders and challengers live here
    history: str = "models/history.parquet"  # one row per retrain decision
    max_macro_f1_drop: float = Field(0.01, ge=0, le=1)  # gate: challenger macro-F1 >= champion's - this
    max_class_recall_drop: float = Field(0.1, ge=0, le=1)  # gate: no class's recall may drop more
    allow_class_change: bool = False  # new or vanished classes change the model contract: opt in
    escalate_below_val_accuracy: float | None = Field(None, ge=0, le=1)  # head challenger below this -> fine-tune
    escalation: Literal["finetune_after", "finetune_instead"] = "finetune_after"  # after: keep the better one
    keep_versions: int = Field(5, ge=1)  # champion version folders kept on disk
    schedule: str = "0 3 * * 1"  # cron of the scheduled deployments (Mondays 03:00)
    # Feature-drift p-value at or below which a run is marked (graft.drift); the permutations grow as it shrinks.
    drift_alert: float = Field(0.01, ge=0.001, lt=1)


class Params(_Strict):
    seed: int = 0
    data: DataParams = DataParams()
    ingest: IngestParams = IngestParams()
    featurize: FeaturizeParams = FeaturizeParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    predict: PredictParams = PredictParams()
    retrain: RetrainParams = RetrainParams()


def _one_line(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"] if not isinstance(p, int)) or "(top level)"
    items = [p for p in err["loc"] if isinstance(p, int)]  # list positions go into the message, the key stays the key
    msg = (f"item {items[-1]}: " if items else "") + err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in err and not isinstance(err["input"], (dict, list, tuple)):
        msg = f"{msg} (got {err['input']!r})"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{source}: {key}: {msg}{more}".replace("\n", " ")


def parse_params(raw: object, source: str = "params") -> Params:
    """Validate a mapping into :class:`Params`; raise :class:`GraftError` with a one-line message."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise GraftError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise GraftError(_one_line(exc, source)) from None


def dump_params(params: Params | None = None) -> str:
    """``params`` (default: the defaults) as YAML text that :func:`load_params` reads back equal; no comments."""
    return yaml.safe_dump((params or Params()).model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def load_params(path: str | os.PathLike[str] = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    p = Path(path)
    return parse_params(load_yaml(p), str(p))
