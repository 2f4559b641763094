"""Tests for scale-out: sharded featurize / predict as Prefect tasks on a Dask cluster.

The cluster tests use real ``distributed.LocalCluster``s of 2 worker processes x 1 thread and the
session's Prefect test server: the cache equals a local run's, a shard that fails on I/O is retried
by Prefect, each worker builds its engine once, and a worker SIGKILLed mid-run loses and duplicates
no rows. Everything uses the tiny random CNN and ~60 small images. Real ``dask scheduler`` /
``dask worker`` processes and the Prefect API the workers report to: ``tests/test_dask_cluster.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from distributed.diagnostics.plugin import WorkerPlugin
from fsspec.implementations.local import LocalFileSystem

from graft import GraftError
from graft.cacheparts import compare_caches
from graft.sources import resolve_url
from graft.tasks.featurize import featurize
from graft.tasks.ingest import ingest
from graft.tasks.shard import FeaturizeJob, make_shards, plan_featurize, run_featurize_shard, shard_id
from tests.helpers import REPO, class_image, make_params, write_tree

TOL = 1e-5  # features of the same pixels through the same ONNX graph, batched differently


def _cache(root: Path) -> Path:
    """The one fingerprint folder under a cache root."""
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return folder


def _assert_same_cache(reference: Path, got: Path) -> None:
    """Same keys, each exactly once in ``got``'s raw parts, values within TOL."""
    cmp = compare_caches(reference, got)
    assert cmp["same_keys"], cmp
    assert cmp["repeated_b"] == 0, cmp
    assert cmp["max_abs_diff"] <= TOL, cmp
    keys = [k for p in got.glob("part-*.parquet") for k in pq.read_table(p, columns=["sha256"]).column(0).to_pylist()]
    assert len(keys) == len(set(keys)) == cmp["rows_a"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An ingested folder of 60 images and the cache a local featurize run made of it."""
    root = tmp_path_factory.mktemp("scale")
    (root / "raw").mkdir()
    write_tree(root / "raw", ("cat", "dog", "owl"), per_class=20)
    params = make_params(root)
    ingest(params)
    summary = featurize(params)
    (root / "local-summary.json").write_text(json.dumps(summary))
    return root, _cache(root / "cache")


def _dask_params(root: Path, name: str, shard_size: int = 8, data_root: str | None = None, **dask):
    """Params for a dask run over the dataset's manifest into its own cache ``root/name``."""
    over: dict = {
        "featurize": {
            "runner": "dask",
            "shard_size": shard_size,
            "cache_dir": str(root / name),
            "out": str(root / f"data/{name}.parquet"),
            "dask": dask,
        }
    }
    if data_root:
        over["data"] = {"root": data_root}
    return make_params(root, over)


# --- shard logic, no cluster


def test_shards_are_deterministic_by_content() -> None:
    items = [(f"{i:064x}", f"/data/img{i}.png") for i in range(10)]
    a = make_shards(items, 4)
    b = make_shards(list(reversed(items)) + [(items[0][0], "/elsewhere/same-bytes.png")], 4)
    assert [s.id for s in a] == [s.id for s in b]  # order and repeated content do not matter
    assert [len(s.items) for s in a] == [4, 4, 2]
    assert a[0].keys == sorted(k for k, _ in items)[:4]
    assert a[0].id == shard_id(a[0].keys)
    assert make_shards(items[1:], 4)[0].id != a[0].id  # different keys, different part file
    with pytest.raises(GraftError):
        make_shards(items, 0)


def test_resolve_url() -> None:
    assert resolve_url("s3://bucket/raw/", "cat/1.jpg") == "s3://bucket/raw/cat/1.jpg"
    assert resolve_url("/data/raw", "cat/1.jpg") == "/data/raw/cat/1.jpg"
    assert resolve_url("/data/raw", "gs://b/x.png") == "gs://b/x.png"


def test_dask_params_validate() -> None:
    p = make_params(Path("/tmp/x"), {"featurize": {"runner": "dask", "dask": {"address": "tcp://h:8786"}}})
    assert p.featurize.dask.address == "tcp://h:8786" and p.featurize.dask.threads_per_worker == 1
    with pytest.raises(GraftError, match="featurize.dask.nworkers"):
        make_params(Path("/tmp/x"), {"featurize": {"dask": {"nworkers": 2}}})
    with pytest.raises(GraftError, match="featurize.runner"):
        make_params(Path("/tmp/x"), {"featurize": {"runner": "ray"}})


def test_shard_is_idempotent_and_reads_urls(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    """A shard read through fsspec (memory://) writes one part; rerunning it rewrites nothing and adds no row."""
    import fsspec

    root, reference = dataset
    mem = fsspec.filesystem("memory")
    for p in (root / "raw").rglob("*.png"):
        mem.pipe(f"/scale-test/{p.relative_to(root / 'raw').as_posix()}", p.read_bytes())
    params = _dask_params(tmp_path, "cache", data_root="memory://scale-test")
    params = params.model_copy(update={"data": params.data.model_copy(update={"out_dir": str(root / "data")})})
    plan = plan_featurize(params)
    assert plan.shards[0].items[0][1].startswith("memory://scale-test/")
    first = [run_featurize_shard(plan.job, s) for s in plan.shards]
    again = [run_featurize_shard(plan.job, s) for s in plan.shards]
    assert sum(r["computed"] for r in first) == 60 and sum(r["computed"] for r in again) == 0
    assert len(list(_cache(tmp_path / "cache").glob("part-shard-*.parquet"))) == len(plan.shards)
    _assert_same_cache(reference, _cache(tmp_path / "cache"))
    mem.rm("/scale-test", recursive=True)


def test_changed_file_is_a_clear_error(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = dataset
    plan = plan_featurize(_dask_params(root, "cache-changed"))
    sha, url = plan.shards[0].items[0]
    job = FeaturizeJob(plan.job.fp, str(tmp_path), plan.job.description)
    copy = tmp_path / "copy.png"
    shutil.copy(url, copy)
    class_image(3, 99).save(copy)
    shard = make_shards([(sha, str(copy))], 1)[0]
    with pytest.raises(GraftError, match="changed since ingest"):
        run_featurize_shard(job, shard)
    with pytest.raises(GraftError, match="not found"):
        run_featurize_shard(job, make_shards([(sha, str(tmp_path / "gone.png"))], 1)[0])


def test_only_io_errors_are_retried() -> None:
    """Prefect retries a shard on OSError (a flaky mount, an object store hiccup), never on a bad input."""
    from graft.tasks import retry_transient as _retry_io

    class State:
        def __init__(self, exc):
            self.exc = exc

        def result(self, raise_on_failure: bool = True):
            return self.exc

    assert _retry_io(None, None, State(ConnectionResetError("reset by peer")))
    assert not _retry_io(None, None, State(GraftError("x.jpg changed since ingest")))
    assert not _retry_io(None, None, State(ValueError("a bug")))


def test_scale_flow_imports_no_torch() -> None:
    """``graft predict --dask`` drives the cluster from a process without torch."""
    code = "import sys, flows.scale, tasks.shard; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --- on LocalClusters


class FlakyFS(LocalFileSystem):
    """Local files under ``flaky://``, configured per worker by :class:`FlakyFSPlugin`.

    Every read is logged (pid, file name) to ``read_log``. The first read of each file named in
    ``fail`` raises a transient OSError; the first read of the file named ``hang`` blocks (the
    worker is then stuck inside a shard until the test kills it). Marker files in ``marker_dir``,
    shared by all workers, make each of these happen once.
    """

    protocol = "flaky"
    marker_dir, fail, hang, read_log = "", frozenset(), "", ""

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("flaky://"))

    def _first_time(self, tag: str) -> bool:
        try:
            fd = os.open(Path(self.marker_dir) / tag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(fd, f"{os.getpid()}\n".encode())  # who got there first (the test kills it)
        os.close(fd)
        return True

    def _open(self, path, mode="rb", **kwargs):
        name = Path(self._strip_protocol(path)).name
        if self.read_log:
            with open(self.read_log, "a", encoding="utf-8") as fh:
                fh.write(f"{os.getpid()} {name}\n")
        if name in self.fail and self._first_time(f"fail-{name}"):
            raise ConnectionResetError(f"injected transient read error for {name}")
        if name == self.hang and self._first_time(f"hang-{name}"):
            time.sleep(120)  # killed long before this ends
        return super()._open(self._strip_protocol(path), mode, **kwargs)


class FlakyFSPlugin(WorkerPlugin):
    """Registers ``flaky://`` on every worker, including one the nanny restarts after a kill."""

    name = "graft-test-fs"  # registering again replaces the previous configuration

    def __init__(self, marker_dir: str, fail: tuple[str, ...] = (), hang: str = "", read_log: str = ""):
        self.config = {"marker_dir": marker_dir, "fail": frozenset(fail), "hang": hang, "read_log": read_log}

    def setup(self, worker) -> None:
        import fsspec

        for k, v in self.config.items():
            setattr(FlakyFS, k, v)
        fsspec.register_implementation("flaky", FlakyFS, clobber=True)


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes x 1 thread, shared by the tests that pass its address."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as lc,
        Client(lc) as client,
    ):
        yield lc, client


@pytest.mark.prefect
def test_local_cluster_cache_equals_local_run(dataset: tuple[Path, Path], prefect_harness) -> None:
    """No address: a LocalCluster is started from params; the cache and features.parquet match the local run."""
    from graft.flows.scale import featurize_dask

    root, reference = dataset
    params = _dask_params(root, "cache-lc", n_workers=2, threads_per_worker=1)
    summary = featurize_dask(params)
    assert summary["computed"] == 60 and summary["shards"] == 8 and summary["workers"] == 2
    assert set(json.loads((root / "local-summary.json").read_text())) <= set(summary)  # a drop-in for featurize()
    assert summary["engine"] == "onnxruntime"
    _assert_same_cache(reference, _cache(root / "cache-lc"))
    local = pd.read_parquet(root / "data/features.parquet").set_index("sha256")
    ours = pd.read_parquet(params.featurize.out).set_index("sha256")
    assert sorted(local.index) == sorted(ours.index)
    assert np.abs(np.stack(local.loc[ours.index, "feature"]) - np.stack(ours["feature"])).max() <= TOL
    again = featurize_dask(params)  # all cached: no cluster is started, nothing computed
    assert again["computed"] == 0 and again["workers"] == 0


@pytest.mark.prefect
def test_retry_and_one_engine_per_worker(dataset: tuple[Path, Path], cluster, prefect_harness, tmp_path: Path) -> None:
    """Two files fail their first read: those shards are retried by Prefect; each worker builds its engine once."""
    from graft.daskworker import load_counts
    from graft.flows.scale import featurize_dask

    root, reference = dataset
    _, client = cluster
    names = (
        sorted(p.name for p in (root / "raw/cat").glob("*.png"))[:1]
        + sorted(p.name for p in (root / "raw/owl").glob("*.png"))[-1:]
    )
    client.register_plugin(FlakyFSPlugin(str(tmp_path), tuple(names)))
    before = client.run(load_counts)
    params = _dask_params(
        root,
        "cache-retry",
        shard_size=4,
        address=cluster[0].scheduler_address,
        retries=2,
        data_root=f"flaky://{root / 'raw'}",
    )
    summary = featurize_dask(params)
    assert summary["shards"] == 15 and summary["computed"] == 60
    assert summary["retried_shards"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"fail-{n}" for n in names)  # each failed once
    after = client.run(load_counts)
    builds = {w: after[w].get("featurize", 0) - before[w].get("featurize", 0) for w in after}
    assert all(n <= 1 for n in builds.values()), builds  # 15 shards, at most one engine per worker
    assert sum(builds.values()) >= 1
    _assert_same_cache(reference, _cache(root / "cache-retry"))


@pytest.mark.prefect
def test_module_entry_point_uses_address(
    dataset: tuple[Path, Path], tmp_path: Path, cluster, prefect_harness, capsys: pytest.CaptureFixture
) -> None:
    """``python -m graft.flows.scale --params P --address A``: a params file, the workspace lock, an existing
    cluster."""
    import yaml

    from graft.flows.scale import main

    root, reference = dataset
    params = _dask_params(root, "cache-main")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")), encoding="utf-8")
    assert main(["--params", str(path), "--address", cluster[0].scheduler_address]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["featurize"]
    assert summary["computed"] == 60 and summary["workers"] == 2
    _assert_same_cache(reference, _cache(root / "cache-main"))


@pytest.mark.prefect
def test_featurize_stage_dispatches_to_dask(dataset: tuple[Path, Path], cluster, prefect_harness) -> None:
    """``featurize.runner: dask`` through the dispatcher (``graft featurize``, dvc, the pipeline flow)."""
    from graft.stages import run_stage

    root, reference = dataset
    summary = run_stage("featurize", _dask_params(root, "cache-hook", address=cluster[0].scheduler_address))
    assert summary["runner"] == "dask" and summary["computed"] == 60
    _assert_same_cache(reference, _cache(root / "cache-hook"))


@pytest.mark.prefect
def test_bad_input_fails_once_with_one_line(tmp_path: Path, cluster, prefect_harness) -> None:
    """A file changed since ingest is not retried: one-line GraftError; the other shards' parts are kept."""
    from graft.flows.scale import featurize_dask

    (tmp_path / "raw").mkdir()
    paths = write_tree(tmp_path / "raw", per_class=8)
    params = _dask_params(tmp_path, "cache", shard_size=4, address=cluster[0].scheduler_address)
    ingest(params)
    class_image(3, 123).save(paths[5])  # new bytes under a path the manifest knows
    with pytest.raises(GraftError, match="changed since ingest") as exc:
        featurize_dask(params)
    assert len(str(exc.value).splitlines()) == 1
    assert len(list(_cache(tmp_path / "cache").glob("part-shard-*.parquet"))) == 3  # 4 shards, 1 failed


@pytest.mark.prefect
def test_predict_over_cluster_matches_local_predict(tmp_path: Path, cluster, prefect_harness) -> None:
    """``graft predict --dask``: one Parquet, the same labels and probabilities as plain ``graft predict``."""
    from graft.cli import main
    from graft.predict import OnnxClassifier, list_images, predict_files

    model = _tiny_onnx_classifier(tmp_path / "model.onnx", ["cat", "dog", "owl"])
    folder = tmp_path / "incoming"
    (folder / "sub").mkdir(parents=True)
    for i in range(9):
        class_image(i % 3, 700 + i).save(folder / ("sub" if i % 2 else ".") / f"img {i}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "preds.parquet"
    rc = main(
        [
            "predict",
            str(folder),
            "--model",
            str(model),
            "--out",
            str(out),
            "--dask",
            "--address",
            cluster[0].scheduler_address,
            "--shard-size",
            "3",
        ]
    )
    assert rc == 0
    got = pd.read_parquet(out)
    assert list(got.columns) == ["path", "predicted", "confidence", "best_guess", "in_distribution", "error"]
    assert len(got) == 10
    assert got["path"].is_monotonic_increasing
    want = pd.DataFrame(predict_files(OnnxClassifier(model), list_images(folder)))
    want["path"] = [str(Path(p).resolve()) for p in want["path"]]
    merged = got.merge(want, on="path", suffixes=("", "_local"))
    assert len(merged) == 10
    assert (merged["predicted"].fillna("-") == merged["predicted_local"].fillna("-")).all()
    ok = merged["error"].isna()
    assert ok.sum() == 9
    assert np.allclose(merged.loc[ok, "confidence"], merged.loc[ok, "confidence_local"], atol=1e-6)
    assert (
        main(
            [
                "predict",
                str(folder),
                "--model",
                str(model),
                "--out",
                str(tmp_path / "p.csv"),
                "--dask",
                "--address",
                cluster[0].scheduler_address,
            ]
        )
        == 2
    )  # Parquet only


@pytest.mark.prefect
def test_killed_worker_loses_and_duplicates_nothing(
    dataset: tuple[Path, Path], cluster, prefect_harness, tmp_path: Path
) -> None:
    """SIGKILL a worker stuck inside a shard: the shard is redone elsewhere, every key lands exactly once."""
    from graft.flows.scale import featurize_dask

    root, reference = dataset
    lc, client = cluster
    hang = sorted(p.name for p in (root / "raw/dog").glob("*.png"))[7]
    reads = tmp_path / "reads.log"
    client.register_plugin(FlakyFSPlugin(str(tmp_path), hang=hang, read_log=str(reads)))
    params = _dask_params(
        root, "cache-kill", shard_size=4, address=lc.scheduler_address, data_root=f"flaky://{root / 'raw'}"
    )
    folder = root / "cache-kill"
    marker = tmp_path / f"hang-{hang}"
    killed: dict = {}

    def kill_the_stuck_worker() -> None:
        deadline = time.monotonic() + 100
        while time.monotonic() < deadline:
            text = marker.read_text() if marker.exists() else ""
            if text.endswith("\n"):  # a worker is blocked reading ``hang``, in the middle of its shard
                killed["pid"] = int(text)
                time.sleep(0.5)  # let the other worker finish a few shards meanwhile
                killed["parts_before"] = len(list(folder.glob("*/part-shard-*.parquet")))
                os.kill(killed["pid"], signal.SIGKILL)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_stuck_worker, daemon=True)
    killer.start()
    summary = featurize_dask(params)
    killer.join(5)
    assert killed, "no worker reached the blocking read"
    assert killed["parts_before"] < summary["shards"] == 15  # killed mid-run
    log = [line.split(" ", 1) for line in reads.read_text().splitlines()]
    assert {int(pid) for pid, name in log if name == hang} - {killed["pid"]}, "the stuck shard was not redone elsewhere"
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed process
    assert killed["pid"] not in client.run(os.getpid).values()
    assert len(list(_cache(folder).glob("part-*.parquet"))) == 15  # one part per shard, none twice
    _assert_same_cache(reference, _cache(folder))
    assert featurize_dask(params)["computed"] == 0


def _tiny_onnx_classifier(path: Path, classes: list[str]) -> Path:
    """A small exported-graft-style ONNX model: mean-pool pixels, a fixed linear layer, softmax."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.array([[4.0, -2.0, -2.0], [-2.0, 4.0, -2.0], [-2.0, -2.0, 4.0]], np.float32)[:, : len(classes)]
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", len(classes)])],
        [numpy_helper.from_array(w, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    spec = {"crop": 32, "resize": 36, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"}
    for k, v in {"graft.classes": json.dumps(classes), "graft.input": json.dumps(spec)}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(path))
    return path
