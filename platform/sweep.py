"""The sweep driver: a spec → Ray Tune trials → MLflow runs → a results table. Where it keeps its state:
``dreamfusion_platform.workspace``."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import pickle
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch

from dreamfusion.errors import UserInputError
from dreamfusion.geometry import GEOMETRY_METRICS
from dreamfusion.mesh import MESH_METRICS
from dreamfusion.pipeline import warm_text_cache
from dreamfusion.text_cache import TextEmbeddingCache
from dreamfusion_platform import tracking
from dreamfusion_platform.spec import (
    CANDIDATE,
    RESULT_METRICS,
    TRAINING_METRICS,
    Dimension,
    SweepSpec,
    load_spec,
)
from dreamfusion_platform.trial import TrialContext, run_trial
from dreamfusion_platform.workspace import RESULTS, SPEC, STATE, Workspace

log = logging.getLogger(__name__)

CLIP_SHOWN = ("clip_score", "clip_r_precision", "clip_r_precision_textureless")


def trial_count(spec: SweepSpec) -> int:
    grid = math.prod(len(d.values) for d in spec.space if d.distribution == "grid"
                     or (spec.algorithm == "grid" and d.distribution == "choice"))
    per_prompt = spec.samples_per_prompt * (grid * max(1, len(spec.candidates)) if spec.algorithm != "optuna" else 1)
    return len(spec.prompts) * len(spec.seeds) * per_prompt


def _domain(dim: Dimension, algorithm: str):
    if dim.distribution == "grid" or (dim.distribution == "choice" and algorithm == "grid"):
        return tune.choice(list(dim.values)) if algorithm == "optuna" else tune.grid_search(list(dim.values))
    if dim.distribution == "choice":
        return tune.choice(list(dim.values))
    if dim.distribution == "uniform":
        return tune.uniform(*dim.values)
    if dim.distribution == "loguniform":
        return tune.loguniform(*dim.values)
    return tune.randint(*dim.values)


class PerPromptOptuna(Searcher):
    """One Optuna study per (prompt, seed): each prompt gets ``samples_per_prompt`` configurations
    suggested from its own results, so every trial is still one prompt × configuration."""

    def __init__(self, spec: SweepSpec) -> None:
        super().__init__(metric=spec.metric, mode=spec.mode)
        space = {d.key: _domain(d, "optuna") for d in spec.space}
        if spec.candidates:
            space[CANDIDATE] = tune.choice(list(spec.candidates))
        self.samples = spec.samples_per_prompt
        self.groups = [(prompt, seed) for prompt in spec.prompts for seed in spec.seeds]
        self.studies = [OptunaSearch(space=space, metric=spec.metric, mode=spec.mode, seed=index)
                        for index in range(len(self.groups))]
        self.issued = [0] * len(self.groups)
        self.owner: dict[str, int] = {}

    def set_search_properties(self, metric, mode, config, **spec_kwargs) -> bool:
        return True  # metric, mode and space are fixed at construction

    def suggest(self, trial_id: str):
        open_groups = [i for i, n in enumerate(self.issued) if n < self.samples]
        if not open_groups:
            return Searcher.FINISHED
        group = min(open_groups, key=lambda i: self.issued[i])
        config = self.studies[group].suggest(trial_id)
        if config is None or config == Searcher.FINISHED:
            return config
        self.issued[group] += 1
        self.owner[trial_id] = group
        prompt, seed = self.groups[group]
        return {**config, "prompt": prompt, "seed": seed}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner:
            self.studies[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.owner:
            self.studies[self.owner.pop(trial_id)].on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__dict__, handle)

    def restore(self, checkpoint_path: str) -> None:
        # Tune's own experiment state, written by this searcher into the workspace: not user input.
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))  # noqa: S301


def _trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def _trainable(spec: SweepSpec, context: TrialContext):
    return tune.with_resources(tune.with_parameters(run_trial, context=context), {"cpu": spec.cpus, "gpu": spec.gpus})


def build_tuner(spec: SweepSpec, workspace: Workspace, context: TrialContext, progress, verbose: bool = False):
    if spec.algorithm == "optuna":
        param_space: dict[str, Any] = {}
        search_alg = PerPromptOptuna(spec)
        num_samples = len(spec.prompts) * len(spec.seeds) * spec.samples_per_prompt
    else:
        param_space = {"prompt": tune.grid_search(spec.prompts), "seed": tune.grid_search(spec.seeds),
                       **{d.key: _domain(d, spec.algorithm) for d in spec.space}}
        if spec.candidates:
            param_space[CANDIDATE] = tune.grid_search(list(spec.candidates))
        search_alg = BasicVariantGenerator(random_state=0)
        num_samples = spec.samples_per_prompt
    storage_path, storage_filesystem = workspace.tune_storage()
    reports = math.ceil((spec.iterations + spec.most_refine_iterations) / spec.report_every)
    scheduler = (ASHAScheduler(time_attr="training_iteration", metric=spec.scheduler_metric,
                               mode=spec.scheduler_mode, max_t=reports, grace_period=spec.grace_period,
                               reduction_factor=spec.reduction_factor)
                 if spec.scheduler == "asha" else FIFOScheduler())
    return tune.Tuner(
        _trainable(spec, context),
        param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=spec.max_concurrent_trials,
                                    # Prompts never reach a path: trial folders are named by id only.
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
            verbose=2 if verbose else 0, callbacks=[progress],
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        ),
    )


STALL_SECONDS = 30.0
# Trials reporting at once that the sqlite store a sweep starts by itself kept up with in `dreamfusion bench
# tracking` on 2 CPU cores (every report sent, p99 0.34 s); at 32 its connection pool ran out and trials waited
# to open their runs (docs/benchmarks/tracking.md, 2026-12-04).
SQLITE_HOLDS = 8


def concurrent_trials(spec: SweepSpec, total: int, resources: dict[str, float]) -> int:
    """How many trials can run at once: the spec's cap, the cluster's CPUs and GPUs, the trials there are."""
    bounds = [total, *([spec.max_concurrent_trials] if spec.max_concurrent_trials else [])]
    bounds += [int(resources.get(name, 0) // need) for name, need in (("CPU", spec.cpus), ("GPU", spec.gpus)) if need]
    return max(1, min(bounds))


def sqlite_load_warning(spec: SweepSpec, total: int, resources: dict[str, float]) -> str | None:
    """A warning when more trials may report at once than the sweep's own sqlite store kept up with."""
    running = concurrent_trials(spec, total, resources)
    if running <= SQLITE_HOLDS:
        return None
    return (f"warning: up to {running} trials may report at once to this sweep's own MLflow store (sqlite), which "
            f"kept up with {SQLITE_HOLDS} in `dreamfusion bench tracking` (docs/benchmarks/tracking.md); past that "
            "reports wait and slow the trials. Pass --tracking-uri of a server on PostgreSQL "
            "(infra/mlflow/docker-compose.yaml), or set max_concurrent_trials in the spec")


class SweepProgress(tune.Callback):
    """Our progress on stderr: trials done/running/failed, best so far, ETA. On a terminal one line that
    updates in place; in a log a line whenever the counts or the best change, and once a minute otherwise.
    Trials that fail (and are retried), metrics waiting for an unreachable tracking server and trials that
    wait for resources the cluster does not have free get lines of their own."""

    def __init__(self, spec: SweepSpec, total: int, heartbeat: float = 60.0, stream=None) -> None:
        self.name, self.metric, self.mode = spec.name, spec.metric, spec.mode
        self.need = {"CPU": spec.cpus, "GPU": spec.gpus}
        self.max_failures = spec.max_failures
        self.total = total
        self.heartbeat = heartbeat
        self.stream = stream
        self.started = time.monotonic()
        self.last_line = ""
        self.last_time = 0.0
        self.best: tuple[float, str] | None = None
        self.backlog: dict[str, int] = {}
        self.backlog_warned = -math.inf
        self.stalled_since: float | None = None  # since when trials wait and none runs

    @property
    def _out(self):
        return self.stream or sys.stderr

    @property
    def _live(self) -> bool:
        return self._out.isatty()

    def _print(self, line: str) -> None:
        """A line of its own, above the updating progress line on a terminal."""
        prefix = "\r\033[K" if self._live else ""
        print(f"{prefix}[sweep {self.name}] {line}", file=self._out, flush=True)
        self.last_line = ""  # the progress line is drawn again below

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.backlog[trial.trial_id] = int(result.get("mlflow_backlog", 0))
        value = result.get(self.metric)
        if isinstance(value, int | float) and math.isfinite(value):
            if self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0]):
                self.best = (float(value), str(trial.config.get("prompt", ""))[:40])

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._failed(trial, retried=False)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._failed(trial, retried=True)

    def _failed(self, trial, retried: bool) -> None:
        prompt = str(trial.config.get("prompt", ""))[:40]
        where = trial.error_file or "the trial's error.txt"
        if retried:
            attempt = trial.num_failures + 1
            self._print(f"warning: trial {trial.trial_id} ('{prompt}') failed and is retried from its last "
                        f"checkpoint (attempt {attempt} of {self.max_failures + 1}); the error: {where}")
        else:
            self._print(f"warning: trial {trial.trial_id} ('{prompt}') failed for good; the error: {where}")

    def on_step_end(self, iteration, trials, **info) -> None:
        self.report(trials)

    def on_experiment_end(self, trials, **info) -> None:
        self.report(trials, force=True)
        if self._live:
            print(file=self._out, flush=True)

    def report(self, trials, force: bool = False) -> None:
        done = sum(t.status == "TERMINATED" for t in trials)
        failed = sum(t.status == "ERROR" for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        pending = sum(t.status == "PENDING" for t in trials)
        best = f"; best {self.metric} {self.best[0]:.3f} ({self.best[1]})" if self.best else ""
        state = f"{done}/{self.total} done, {running} running, {failed} failed{best}"
        now = time.monotonic()
        self.stalled_since = (self.stalled_since or now) if pending and not running else None
        # Trials take a moment to be placed; only a wait that lasts says what the trials wait for.
        if self.stalled_since is not None and now - self.stalled_since >= STALL_SECONDS:
            state += f"; {self.waiting_for(pending)}"
        elapsed = now - self.started
        finished = done + failed
        eta = f", ETA {elapsed / finished * max(self.total - finished, 0) / 60:.1f} min" if finished else ""
        line = f"{state}; {elapsed / 60:.1f} min{eta}"
        if self._live:
            if force or line != self.last_line:
                print(f"\r\033[K[sweep {self.name}] {line}", end="", file=self._out, flush=True)
                self.last_line = line
        elif force or state != self.last_line or now - self.last_time >= self.heartbeat:
            print(f"[sweep {self.name}] {line}", file=self._out, flush=True)
            self.last_line, self.last_time = state, now
        waiting = sum(self.backlog.values())
        if waiting and (force or now - self.backlog_warned >= self.heartbeat):
            self.backlog_warned = now
            self._print(f"warning: {waiting} metric values wait for the MLflow tracking server (unreachable?); "
                        "trials keep training and send them when it answers")

    def waiting_for(self, pending: int) -> str:
        """What the pending trials ask for, and what the cluster has free of it."""
        need = ", ".join(f"{value:g} {key}" for key, value in self.need.items() if value)
        try:
            free, total = ray.available_resources(), ray.cluster_resources()
        except Exception:  # the line is informative only; Ray may be shutting down
            return f"{pending} pending, each needs {need}"
        offer = ", ".join(f"{free.get(key, 0):g}/{total.get(key, 0):g} {key}" for key in self.need)
        return f"{pending} pending, each needs {need}; free in the cluster: {offer}"


def results_table(result_grid, spec: SweepSpec):
    import pandas as pd

    rows = []
    for result in result_grid:
        metrics = result.metrics or {}
        config = result.config or {}
        if result.error is not None:
            status = "FAILED"
        elif metrics.get("final") == 1:
            status = "FINISHED"
        else:
            status = "STOPPED"  # ended early by the scheduler
        row: dict[str, Any] = {
            "trial_id": metrics.get("trial_id", ""),
            "prompt": config.get("prompt"),
            "seed": config.get("seed"),
            **({CANDIDATE: config.get(CANDIDATE)} if spec.candidates else {}),
            **{d.key: config.get(d.key) for d in spec.space},
            "status": status,
            "step": metrics.get("step"),
            **{m: metrics.get(m) for m in TRAINING_METRICS + RESULT_METRICS},
            "wall_seconds": metrics.get("time_total_s"),
            "post_training_seconds": metrics.get("post_training_seconds"),
            "mlflow_run_id": metrics.get("mlflow_run_id"),
            "artifact_uri": metrics.get("artifact_uri"),
            "node_id": metrics.get("node_id"),
            "error": str(result.error).splitlines()[0][:500] if result.error is not None else None,
        }
        rows.append(row)
    table = pd.DataFrame(rows)
    for metric in (*RESULT_METRICS, *TRAINING_METRICS, "post_training_seconds"):
        if metric in table and table[metric].isna().all():
            table = table.drop(columns=metric)
    return table


def warm_cache(spec: SweepSpec, workspace: Workspace) -> None:
    """Every text embedding the trials will ask for, computed once here (and the CLIP model checked)
    before any trial starts: a trial whose texts are cached never builds a text encoder."""
    if not spec.clip_model and spec.guidance == "synthetic":
        return
    import torch

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    texts = warm_text_cache(spec.base_config(), spec.prompts, spec.rank_prompts(spec.prompts[0]),
                            TextEmbeddingCache(workspace.cache, workspace.cache_mirror()), device)
    print(f"[sweep {spec.name}] text embeddings of {texts} texts ready in {workspace.where('cache')} "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)


def dashboard_columns(spec: SweepSpec) -> list[str]:
    """The runs-table columns of a sweep's view: prompt, seed, searched keys, then its metrics."""
    metrics = [spec.metric]
    if spec.guidance == "synthetic":
        metrics += ["silhouette_iou", "r_precision_colour", "r_precision_textureless", *GEOMETRY_METRICS]
    if spec.clip_model:
        metrics += ["clip_score", "clip_r_precision", "clip_r_precision_textureless"]
    metrics += MESH_METRICS
    params = ["prompt", "seed", *([CANDIDATE] if spec.candidates else []), *(d.key for d in spec.space)]
    return [f"params.`{p}`" for p in params] + [f"metrics.`{m}`" for m in dict.fromkeys(metrics)]


def log_sweep_means(mlflow_client, parent_run_id: str, table) -> None:
    """The mean of every result metric over the finished trials, on the sweep's parent run."""
    finished = table[table["status"] == "FINISHED"]
    for metric in RESULT_METRICS:
        if metric in finished and finished[metric].notna().any():
            mlflow_client.log_metric(parent_run_id, f"mean_{metric}", float(finished[metric].mean()))


def _log_file(mlflow_client, run_id: str, name: str, data: bytes) -> None:
    """``data`` as the run's artifact ``name`` (MLflow uploads files: the workspace may be a bucket)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / name
        path.write_bytes(data)
        mlflow_client.log_artifact(run_id, str(path))


def close_child_runs(uri: str, experiment_id: str, parent_run_id: str, table) -> None:
    """No trial's run stays RUNNING: a run the scheduler stopped ends KILLED, a failed one FAILED."""
    # Tune's view decides: a trial stopped by the scheduler may have ended its own run as FAILED.
    expected = {row.mlflow_run_id: {"FINISHED": "FINISHED", "STOPPED": "KILLED"}.get(row.status, "FAILED")
                for row in table.itertuples() if row.mlflow_run_id}
    mlflow_client = tracking.client(uri)
    for run in tracking.child_runs(uri, experiment_id, parent_run_id):
        final = expected.get(run.info.run_id, "FAILED" if run.info.status in ("RUNNING", "SCHEDULED") else None)
        if final is not None and final != run.info.status:
            mlflow_client.set_terminated(run.info.run_id, status=final)


def check_local_resources(spec: SweepSpec) -> None:
    """On a local Ray, a trial that asks for more than this machine has would wait forever: say so first."""
    import torch

    gpus = torch.cuda.device_count()
    cpus = os.cpu_count() or 1
    if spec.gpus > gpus:
        has = "no GPU" if gpus == 0 else f"{gpus} GPU{'s' if gpus > 1 else ''}"
        raise UserInputError(f"resources.gpus is {spec.gpus:g} per trial but this machine has {has}; set "
                             f"resources: {{gpus: {min(gpus, 1) if gpus else 0}}} in the spec, or pass --address "
                             "to run on a Ray cluster that has GPUs")
    if spec.cpus > cpus:
        raise UserInputError(f"resources.cpus is {spec.cpus:g} per trial but this machine has {cpus} CPUs; set "
                             f"resources: {{cpus: {cpus}}} or less in the spec, or pass --address to run on a "
                             "Ray cluster")


@contextlib.contextmanager
def quiet_ray(verbose: bool):
    """Ray's own console output off unless ``verbose``: Tune's boxes and hints (its new console reporter;
    the sweep prints its own progress), Ray's log lines and the trial processes' output, and deprecation
    warnings. Our progress lines and warnings are printed by ``SweepProgress``."""
    if verbose:
        yield
        return
    saved = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the legacy reporter, silent at verbose=0
    ray_logger = logging.getLogger("ray")
    level = ray_logger.level
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        ray_logger.setLevel(level)
        if saved is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved


def run_sweep(spec_path: Path, workspace: str | Path, resume: bool = False, address: str | None = None,
              tracking_uri: str | None = None, verbose: bool = False):
    """Run (or resume) a sweep; returns its results table (a pandas DataFrame). ``verbose`` lets Ray and
    Tune print their own output as well."""
    spec = load_spec(spec_path)
    if not address:
        check_local_resources(spec)
    if tracking_uri:  # before anything is written: a refused login or no answer is one line
        tracking.check_server(tracking_uri)
    ws = Workspace(workspace, spec.name)
    ws.check_writable()
    state = ws.state()
    if resume and state is None:
        raise UserInputError(f"there is no sweep '{spec.name}' in {ws.location} to resume; run it without --resume")
    if not resume and state is not None:
        raise UserInputError(f"sweep '{spec.name}' already exists in {ws.location}; pass --resume to continue it, "
                             "or change the spec's name")
    spec_bytes = Path(spec_path).read_bytes()
    started_with = ws.read_bytes(f"{ws.sweep_folder}/{SPEC}")
    if resume and started_with is not None and started_with != spec_bytes:
        raise UserInputError(f"{spec_path} differs from the spec sweep '{spec.name}' started with "
                             f"({ws.where(ws.sweep_folder, SPEC)}); resume with that file, or start a new sweep under "
                             "another name")
    if resume and state.get("tracking_uri_given") and not tracking_uri:
        tracking_uri = state["tracking_uri_given"]
        tracking.check_server(tracking_uri)
    if ws.remote and not tracking_uri:
        raise UserInputError(f"--workspace {ws.location} holds no MLflow store (its sqlite file needs a "
                             "filesystem): pass --tracking-uri, a tracking server every node can reach")
    if address and not tracking_uri:
        log.warning("--address without --tracking-uri: trials on other nodes cannot reach the MLflow server "
                    "this driver starts on 127.0.0.1; pass a --tracking-uri every node can reach")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    state = state or {}

    total = trial_count(spec)
    warm_cache(spec, ws)
    with contextlib.ExitStack() as stack:
        uri = tracking_uri or stack.enter_context(tracking.TrackingServer(ws.mlflow)).uri
        params = {"prompts": len(spec.prompts), "trials": total, "algorithm": spec.algorithm,
                  "scheduler": spec.scheduler, "metric": spec.metric, "iterations": spec.iterations,
                  "guidance": spec.guidance, **{f"space.{d.key}": f"{d.distribution}{list(d.values)}"
                                                for d in spec.space}}
        if spec.candidates:
            params["candidates"] = ", ".join(spec.candidates)
        experiment_id, parent_run_id = tracking.open_parent_run(uri, spec.name, params,
                                                                state.get("parent_run_id"))
        if not resume:
            view_key = tracking.share_trials_view(uri, experiment_id, parent_run_id, dashboard_columns(spec),
                                                  spec.metric, spec.mode)
            ws.write_bytes(f"{ws.sweep_folder}/{SPEC}", spec_bytes)
            _log_file(tracking.client(uri), parent_run_id, SPEC, spec_bytes)
            ws.write_bytes(f"{ws.sweep_folder}/{STATE}", json.dumps(
                {"name": spec.name, "experiment_id": experiment_id, "parent_run_id": parent_run_id,
                 "tracking_uri_given": tracking_uri, "trials": total, "view_key": view_key}, indent=2).encode())
        prompts = f"{len(spec.prompts)} prompt" + ("s" if len(spec.prompts) != 1 else "")
        print(f"[sweep {spec.name}] {total} trials ({prompts}); MLflow experiment '{spec.name}', parent run "
              f"{parent_run_id}", file=sys.stderr, flush=True)
        # "local" rather than None: Ray would otherwise join whatever cluster a stale
        # /tmp/ray/ray_current_cluster names (left by an old `ray start`) and hang on its dead GCS.
        stack.enter_context(quiet_ray(verbose))
        ray.init(address=address or "local", include_dashboard=False,
                 logging_level=logging.INFO if verbose else logging.ERROR, configure_logging=True,
                 log_to_driver=verbose, ignore_reinit_error=True)
        stack.callback(ray.shutdown)
        if not tracking_uri and (warning := sqlite_load_warning(spec, total, ray.cluster_resources())):
            print(f"[sweep {spec.name}] {warning}", file=sys.stderr, flush=True)
        context = TrialContext(spec, uri, experiment_id, parent_run_id, str(ws.cache), ws.cache_mirror())
        storage_path, storage_filesystem = ws.tune_storage()
        experiment_path = f"{storage_path}/{spec.name}"
        if resume and tune.Tuner.can_restore(experiment_path, storage_filesystem=storage_filesystem):
            tuner = tune.Tuner.restore(experiment_path, _trainable(spec, context), resume_unfinished=True,
                                       resume_errored=True, storage_filesystem=storage_filesystem)
        else:
            tuner = build_tuner(spec, ws, context, SweepProgress(spec, total), verbose)
        result_grid = tuner.fit()

        table = results_table(result_grid, spec)
        results = io.BytesIO()
        table.to_parquet(results, index=False)
        ws.write_bytes(f"{ws.sweep_folder}/{RESULTS}", results.getvalue())
        mlflow_client = tracking.client(uri)
        _log_file(mlflow_client, parent_run_id, RESULTS, results.getvalue())
        mlflow_client.log_table(parent_run_id, table.astype({c: "string" for c in ("error",) if c in table}),
                                "results.json")
        close_child_runs(uri, experiment_id, parent_run_id, table)
        log_sweep_means(mlflow_client, parent_run_id, table)
        failed = int((table["status"] == "FAILED").sum())
        mlflow_client.set_terminated(parent_run_id, status="FAILED" if failed else "FINISHED")
    return table


def dashboard_links(workspace: str | Path, base: str) -> list[tuple[str, str]]:
    """``(sweep name, URL)`` of every sweep in ``workspace``: the dashboard opened on its trials."""
    return [(state["name"], tracking.dashboard_url(base, state["experiment_id"], state.get("view_key")))
            for state in Workspace(workspace, "").sweep_states()]


def configuration_columns(table) -> list[str]:
    """The columns that tell one configuration from another: its candidate and searched keys."""
    return [c for c in table.columns if c == CANDIDATE or "." in c]


def rank_configurations(table, metric: str, mode: str):
    """Each configuration's worst and mean ``metric`` over the prompts (and seeds) it ran on, best worst
    first: a default must hold on every prompt, so the worst case ranks. None when there is nothing to rank
    (one configuration, one prompt, or no finished trial with the metric)."""
    keys = configuration_columns(table)
    if not keys or metric not in table or table["prompt"].nunique() < 2:
        return None
    finished = table[(table["status"] == "FINISHED") & table[metric].notna()].copy()
    if finished.empty:
        return None
    finished[keys] = finished[keys].astype(str)  # list values (e.g. shading ratios) are not hashable
    grouped = finished.groupby(keys, sort=False)[metric]
    worst = grouped.min() if mode == "max" else grouped.max()
    ranked = worst.to_frame(f"worst {metric}").join(grouped.mean().rename(f"mean {metric}"))
    ranked = ranked.join(grouped.size().rename("trials"))
    if len(ranked) < 2:
        return None
    return ranked.sort_values(f"worst {metric}", ascending=mode == "min").reset_index()


def across_seeds(table, metric: str):
    """Each configuration × prompt's mean and spread (standard deviation) over its seeds, for the sweep's metric
    and the quality metrics; None unless some configuration ran with several seeds."""
    if "seed" not in table or table["seed"].nunique() < 2:
        return None
    finished = table[table["status"] == "FINISHED"].copy()
    keys = configuration_columns(finished) + ["prompt"]
    finished[keys] = finished[keys].astype(str)
    metrics = [m for m in dict.fromkeys([metric, *RESULT_METRICS]) if m in finished and finished[m].notna().any()]
    if finished.empty or not metrics:
        return None
    grouped = finished.groupby(keys, sort=False)
    summary = grouped[metrics].agg(["mean", "std"])
    summary.columns = [f"{name} {statistic}" for name, statistic in summary.columns]
    summary.insert(0, "seeds", grouped.size())
    return summary.reset_index()


def format_table(table, metric: str = "", mode: str = "max") -> str:
    """The results table; over several seeds, each configuration × prompt's mean and spread; where a sweep
    compares configurations over several prompts, their ranking."""
    columns = [c for c in ("prompt", "seed") if c in table]
    columns += configuration_columns(table)
    columns += [c for c in ("status", *RESULT_METRICS[:4], *GEOMETRY_METRICS, *CLIP_SHOWN, *MESH_METRICS, "loss",
                                        "wall_seconds", "post_training_seconds") if c in table]
    if metric in table and metric not in columns:
        columns.insert(columns.index("status") + 1, metric)
    shown = table[columns].copy()
    shown["prompt"] = shown["prompt"].str.slice(0, 32)
    text = shown.to_string(index=False, float_format=lambda v: f"{v:.3f}")
    seeds = across_seeds(table, metric) if metric else None
    if seeds is not None:
        text += ("\n\nover the seeds (mean and standard deviation):\n"
                 + seeds.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    ranked = rank_configurations(table, metric, mode) if metric else None
    if ranked is not None:
        text += (f"\n\nconfigurations ranked by their worst {metric} over the prompts:\n"
                 + ranked.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return text
