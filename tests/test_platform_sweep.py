"""End-to-end sweeps on Ray Tune with MLflow: results, resume after a driver crash, trial retries,
and scheduling on a multi-node cluster (one machine, logical GPUs)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dreamfusion_platform import tracking
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

EXPECTED_ARTIFACTS = {"mesh.glb", "mesh.obj", "mesh.mtl", "albedo.png", "mesh.ply", "turntable.webm", "turntable.gif",
                      "viewer.html",
                      "renders_colour.png", "renders_textureless.png", "renders_normals.png", "progress.png",
                      "summary.json", "checkpoint.pt"}


def write_spec(directory: Path, name: str, **fields) -> Path:
    data = {
        "name": name,
        "prompts": ["a red ball", "a blue cube"],
        "iterations": 4,
        "report_every": 2,
        "config": dict(item.split("=", 1) for item in TINY),
        "search": {"space": {"sds.guidance_scale": {"grid": [7.5, 20]}}},
        "resources": {"cpus": 1},
        **fields,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def sweep_command(spec: Path, workspace: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dreamfusion_platform.cli", "sweep", str(spec), "--workspace", str(workspace),
            *extra]


def store_client(workspace: Path):
    """Reads the workspace's MLflow store directly (sqlite), as the dashboard does."""
    return tracking.client(f"sqlite:///{workspace / 'mlflow' / 'mlflow.db'}")


def sweep_runs(workspace: Path, name: str):
    client = store_client(workspace)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return None, []
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if tracking.PARENT_TAG not in r.data.tags]
    children = [r for r in runs if tracking.PARENT_TAG in r.data.tags]
    return (parents[0] if parents else None), children


@pytest.fixture
def stale_ray_cluster_file():
    """An environment whose Ray temp dir names a cluster that is gone, as an old `ray start` leaves it.
    The dir is short because Ray's socket paths under it must fit in 107 characters."""
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    (ray_tmpdir / "ray").mkdir()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text("127.0.0.1:59999")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmpdir)}
    yield env
    shutil.rmtree(ray_tmpdir, ignore_errors=True)


def test_sweep_logs_every_trial_to_mlflow_and_writes_the_table(tmp_path, stale_ray_cluster_file):
    spec = write_spec(tmp_path, "e2e")
    workspace = tmp_path / "ws"
    done = subprocess.run(sweep_command(spec, workspace), capture_output=True, text=True, timeout=900,
                          env=stale_ray_cluster_file)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FINISHED" in done.stdout and f"dreamfusion ui --workspace {workspace}" in done.stdout
    # The console is ours: progress lines and the table, none of Ray's boxes, hints or log lines.
    assert "4/4 done" in done.stderr and "[sweep e2e] 4 trials" in done.stderr
    console = done.stdout + done.stderr
    for noise in ("View detailed results", "tensorboard", "╭", "Trial status", "INFO", "DeprecationWarning",
                  "(run_trial pid="):
        assert noise not in console, f"Ray's own output leaked: {noise!r}\n{console[-3000:]}"
    progress_lines = [line for line in done.stderr.splitlines() if line.startswith("[sweep e2e]")]
    assert len(done.stderr.splitlines()) == len(progress_lines), done.stderr[-3000:]

    parent, children = sweep_runs(workspace, "e2e")
    assert parent.info.status == "FINISHED" and parent.data.tags[tracking.SWEEP_TAG] == "e2e"
    assert len(children) == 4
    assert {c.data.tags[tracking.PARENT_TAG] for c in children} == {parent.info.run_id}
    assert len({c.data.tags[tracking.TRIAL_KEY_TAG] for c in children}) == 4
    assert {(c.data.params["prompt"], c.data.params["sds.guidance_scale"]) for c in children} == {
        (p, g) for p in ("a red ball", "a blue cube") for g in ("7.5", "20.0")}
    client = store_client(workspace)
    for child in children:
        assert child.info.status == "FINISHED"
        assert 0.0 <= child.data.metrics["silhouette_iou"] <= 1.0
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [1, 2, 3, 4]

    table = pd.read_parquet(workspace / "sweeps" / "e2e" / "results.parquet")
    assert len(table) == 4 and set(table["status"]) == {"FINISHED"}
    assert set(table["mlflow_run_id"]) == {c.info.run_id for c in children}
    assert {"prompt", "seed", "sds.guidance_scale", "silhouette_iou", "wall_seconds", "post_training_seconds",
            "artifact_uri"} <= set(table)
    assert (table["post_training_seconds"] < table["wall_seconds"]).all()
    assert "post_training_seconds" in children[0].data.metrics

    with tracking.TrackingServer(workspace / "mlflow") as server:  # artifacts are served over HTTP
        http = tracking.client(server.uri)
        names = {a.path for a in http.list_artifacts(children[0].info.run_id)}
        assert EXPECTED_ARTIFACTS <= names
        assert {"results.parquet", "results.json", "spec.yaml"} <= {a.path for a in
                                                                  http.list_artifacts(parent.info.run_id)}

    again = subprocess.run(sweep_command(spec, workspace), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr and "--resume" in again.stderr


def test_the_candidate_search_spec_runs_and_ranks_its_candidates(tmp_path):
    """experiments/default_candidates.yaml at a tiny size: two prompts, two of its candidates, four steps."""
    from dreamfusion_platform.sweep import format_table, run_sweep

    data = yaml.safe_load((REPO / "experiments" / "default_candidates.yaml").read_text())
    candidates = dict(list(data["search"]["candidates"].items())[:2])
    data.update(prompts=data["prompts"][:2], iterations=4, report_every=2,
                config={**data["config"], **dict(item.split("=", 1) for item in TINY)})
    data["search"]["candidates"] = candidates
    spec = tmp_path / "candidates.yaml"
    spec.write_text(yaml.safe_dump(data))
    table = run_sweep(spec, tmp_path / "ws")
    assert len(table) == 4 and set(table["status"]) == {"FINISHED"}
    assert set(table["candidate"]) == set(candidates)
    text = format_table(table, "silhouette_iou", "max")
    assert "configurations ranked by their worst silhouette_iou" in text
    ranking = text.split("over the prompts:")[1]
    assert all(name in ranking for name in candidates)
    _, children = sweep_runs(tmp_path / "ws", data["name"])
    assert {c.data.params["candidate"] for c in children} == set(candidates)
    assert {c.data.tags["dreamfusion.phase"] for c in children} == {"done"}  # shown phase by phase, then done


def trial_results(workspace: Path, name: str) -> list[dict]:
    """The reports Tune has written so far (read from its files: the MLflow store may be mid-migration)."""
    reports = []
    for path in (workspace / "ray" / name).glob("trial_*/result.json"):
        reports += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return reports


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def test_driver_killed_mid_sweep_then_resumed_finishes_each_trial_once(tmp_path):
    spec = write_spec(tmp_path, "crash", iterations=60, report_every=10, max_concurrent_trials=1,
                      search={"space": {"render.shading_ratios": {"grid": [[0.2, 0.5, 0.3], [0.3, 0.7, 0.0]]}}})
    workspace = tmp_path / "ws"
    driver = subprocess.Popen(sweep_command(spec, workspace), stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "driver.log", "w"), start_new_session=True)
    try:
        finished_first = wait_for(lambda: [r["mlflow_run_id"] for r in trial_results(workspace, "crash")
                                           if r.get("final") == 1], 600, "a first finished trial")
        time.sleep(2.0)  # its MLflow run is ended right after its last report
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, its MLflow server and its local Ray
        driver.wait()
    assert not (workspace / "sweeps" / "crash" / "results.parquet").exists()

    resumed = subprocess.run(sweep_command(spec, workspace, "--resume"), capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    parent, children = sweep_runs(workspace, "crash")
    keys = [c.data.tags[tracking.TRIAL_KEY_TAG] for c in children]
    assert len(children) == 4 and len(set(keys)) == 4  # no duplicate runs
    assert {c.info.status for c in children} == {"FINISHED"}
    again = {c.info.run_id: c for c in children}
    for run_id in finished_first:  # what had finished was not run again
        assert again[run_id].data.tags["dreamfusion.attempts"] == "1"
    table = pd.read_parquet(workspace / "sweeps" / "crash" / "results.parquet")
    assert len(table) == 4 and set(table["status"]) == {"FINISHED"}
    assert sorted(table["mlflow_run_id"]) == sorted(again)
    assert parent.info.status == "FINISHED"


def test_killed_trial_process_is_retried_from_its_checkpoint(tmp_path):
    spec = write_spec(tmp_path, "retry", prompts=["a red ball"], iterations=400, report_every=20,
                      search={"space": {}})
    workspace = tmp_path / "ws"
    driver = subprocess.Popen(sweep_command(spec, workspace), stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "driver.log", "w"), start_new_session=True)
    try:
        reports = wait_for(lambda: [r for r in trial_results(workspace, "retry") if r["step"] >= 40], 600,
                           "a second checkpoint")
        os.kill(int(reports[0]["pid"]), signal.SIGKILL)
        assert driver.wait(timeout=900) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    _, children = sweep_runs(workspace, "retry")
    assert len(children) == 1
    run = children[0]
    assert run.info.status == "FINISHED" and run.data.tags["dreamfusion.attempts"] == "2"
    assert int(run.data.tags["dreamfusion.resumed_from_step"]) >= 40
    table = pd.read_parquet(workspace / "sweeps" / "retry" / "results.parquet")
    assert list(table["status"]) == ["FINISHED"] and table["step"].iloc[0] == 400


def test_optuna_per_prompt_with_asha_runs_every_prompt_its_samples(tmp_path):
    from dreamfusion_platform.sweep import run_sweep

    spec = write_spec(tmp_path, "search", iterations=8, report_every=2, samples_per_prompt=3,
                      search={"algorithm": "optuna", "metric": "loss", "mode": "min",
                              "space": {"sds.guidance_scale": {"loguniform": [3.0, 30.0]},
                                        "optim.lr": {"uniform": [0.005, 0.05]}}},
                      scheduler={"type": "asha", "metric": "loss", "mode": "min", "grace_period": 1,
                                 "reduction_factor": 2}, max_concurrent_trials=2)
    table = run_sweep(spec, tmp_path / "ws")
    # One trial per prompt × configuration: each prompt gets its own three.
    assert len(table) == 6 and sorted(table["prompt"].value_counts().tolist()) == [3, 3]
    assert table["sds.guidance_scale"].between(3.0, 30.0).all() and table["optim.lr"].between(0.005, 0.05).all()
    assert set(table["status"]) <= {"FINISHED", "STOPPED"} and (table["status"] == "FINISHED").any()
    _, children = sweep_runs(tmp_path / "ws", "search")
    assert len(children) == 6 and {c.info.status for c in children} <= {"FINISHED", "KILLED"}
    stopped = table[table["status"] == "STOPPED"]
    assert set(stopped["mlflow_run_id"]) == {c.info.run_id for c in children if c.info.status == "KILLED"}


def test_trials_spread_over_nodes_and_share_gpus_fractionally(tmp_path):
    from ray.cluster_utils import Cluster

    from dreamfusion_platform.sweep import run_sweep

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        spec = write_spec(tmp_path, "cluster", iterations=40, report_every=20,
                          resources={"cpus": 1, "gpus": 0.5})
        table = run_sweep(spec, tmp_path / "ws", address=cluster.address)
    finally:
        cluster.shutdown()
    assert set(table["status"]) == {"FINISHED"} and len(table) == 4
    assert set(table["node_id"]) == {node.node_id for node in nodes}  # both GPU nodes, never the head
    _, children = sweep_runs(tmp_path / "ws", "cluster")
    assert {c.data.tags["dreamfusion.gpu_ids"] for c in children} == {"0"}  # half of each node's one GPU


def test_optuna_searches_clip_score_on_stable_diffusion_and_the_table_has_the_clip_columns(
        tmp_path, tiny_sd, tiny_clip):
    (tmp_path / "distractors.txt").write_text("a cat\na green dog\n")
    config = {**dict(item.split("=", 1) for item in TINY), "eval.clip_model": str(tiny_clip), "eval.clip_views": "2",
              "eval.clip_prompt_set": "distractors.txt"}
    spec = write_spec(tmp_path, "clip", guidance={"backend": "stable-diffusion", "model": str(tiny_sd)},
                      config=config, iterations=4, report_every=2, samples_per_prompt=2, max_concurrent_trials=2,
                      search={"algorithm": "optuna", "metric": "clip_score",
                              "space": {"sds.guidance_scale": {"uniform": [5.0, 50.0]},
                                        "optim.lr": {"loguniform": [0.005, 0.05]}}})
    workspace = tmp_path / "ws"
    done = subprocess.run(sweep_command(spec, workspace), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    # 2 prompts ranked among 4 texts by CLIP, and 11 guidance texts: computed once, before any trial.
    assert "text embeddings of 15 texts ready" in done.stderr
    assert len(list((workspace / "cache" / "text-embeddings").rglob("*.safetensors"))) == 15

    table = pd.read_parquet(workspace / "sweeps" / "clip" / "results.parquet")
    assert len(table) == 4 and set(table["status"]) == {"FINISHED"}
    clip_columns = ["clip_score", "clip_score_textureless", "clip_r_precision", "clip_r_precision_textureless"]
    assert table[clip_columns].notna().all().all()
    assert table["clip_r_precision"].isin([0.0, 0.5, 1.0]).all()  # R@1 over two views
    assert table["sds.guidance_scale"].nunique() == 4  # Optuna suggested a configuration per trial

    parent, children = sweep_runs(workspace, "clip")
    client = store_client(workspace)
    assert parent.data.metrics["mean_clip_r_precision"] == pytest.approx(table["clip_r_precision"].mean())
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "clip_score")] == [2, 4]
    experiment = client.get_experiment(parent.info.experiment_id)
    state = json.loads((workspace / "sweeps" / "clip" / "sweep.json").read_text())
    view = json.loads(experiment.tags[f"{tracking.SHARED_VIEW_TAG}{state['view_key']}"])
    assert view["orderByKey"] == "metrics.`clip_score`" and view["orderByAsc"] is False
    columns = set(view["selectedColumns"])
    assert {"params.`prompt`", "params.`sds.guidance_scale`", "metrics.`clip_r_precision`"} <= columns
    assert f"viewStateShareKey={state['view_key']}" in done.stdout and "workflowType=machine_learning" in done.stdout
    with tracking.TrackingServer(workspace / "mlflow") as server:
        images = tracking.client(server.uri).list_artifacts(children[0].info.run_id, "images")
        assert len([i for i in images if i.path.endswith(".png")]) == 2  # the view strip at each report


def test_a_clip_model_that_cannot_be_loaded_stops_the_sweep_before_any_trial(tmp_path):
    spec = write_spec(tmp_path, "bad-clip", config={"eval.clip_model": str(tmp_path / "no-clip")},
                      search={"metric": "clip_score"})
    workspace = tmp_path / "ws"
    done = subprocess.run(sweep_command(spec, workspace), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "eval.clip_model" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (workspace / "sweeps").exists() and not (workspace / "mlflow").exists()
