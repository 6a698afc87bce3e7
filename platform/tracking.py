"""MLflow: the tracking server the platform starts, the sweep's parent run and each trial's child run.

A trial finds its child run by a key derived from its config, so a retried or resumed trial logs
into the run it started (no duplicates), and a trial that had already finished is not run again.
Logging that fails (the server down for a while) is kept in memory and sent at the next flush;
training never waits on the tracking server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dreamfusion.errors import UserInputError

log = logging.getLogger(__name__)

TRIAL_KEY_TAG = "dreamfusion.trial_key"
SWEEP_TAG = "dreamfusion.sweep"
PHASE_TAG = "dreamfusion.phase"  # training, then each phase after the last step, then done
PARENT_TAG = "mlflow.parentRunId"
SHARED_VIEW_TAG = "mlflow.sharedViewState."
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# A trial's HTTP calls give up quickly: buffered data is sent again at the next flush.
TRIAL_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
                  # A link per trial in the driver's output drowns the progress lines.
                  "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
MAX_BATCH_METRICS = 1000  # MLflow's log_batch limit


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class TrackingServer:
    """``mlflow server`` over a sqlite store and an artifact folder, serving artifacts over HTTP.
    ``backend_store_uri`` puts the runs elsewhere (PostgreSQL, for ``dreamfusion bench tracking``)."""

    def __init__(self, store: Path, host: str = "127.0.0.1", port: int | None = None, jobs: bool = False,
                 backend_store_uri: str | None = None) -> None:
        self.store = Path(store)
        self.backend_store_uri = backend_store_uri
        self.host = host
        self.port = port or free_port(host)
        # MLflow 3's job runner (a huey consumer per GenAI job kind, ~1.8 GB together) serves features
        # nothing here uses; ``jobs=True`` is for measuring what leaving it out saves.
        self.jobs = jobs
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", self.backend_store_uri or f"sqlite:///{(self.store / 'mlflow.db').resolve()}",
                "--artifacts-destination", str((self.store / "artifacts").resolve()),
                "--host", self.host, "--port", str(self.port), "--workers", "1"]

    def environment(self) -> dict[str, str]:
        return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true" if self.jobs else "false"}

    def processes(self) -> list[int]:
        """The server's process and every process it started."""
        return [self.process.pid, *_descendants(self.process.pid)] if self.process is not None else []

    def start(self, timeout: float = 180.0) -> TrackingServer:
        self.store.mkdir(parents=True, exist_ok=True)
        log_path = self.store / "server.log"
        with open(log_path, "ab") as server_log:
            self.process = subprocess.Popen(self.command(), stdout=server_log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.environment())
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    tail = log_path.read_text(errors="replace").splitlines()[-5:]
                    raise UserInputError(f"the MLflow server exited at start ({' | '.join(tail)}); "
                                         f"see {log_path}, or pass --tracking-uri")
                if self.healthy():
                    return self
                time.sleep(0.5)
        except BaseException:  # interrupted while starting (Ctrl-C, SIGTERM): leave nothing running
            self.stop()
            raise
        self.stop()
        raise UserInputError(f"the MLflow server did not answer on {self.uri} within {timeout:.0f} s; "
                             f"see {log_path}, or pass --tracking-uri")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server and the workers it started (uvicorn, job runners), which outlive it otherwise."""
        if self.process is not None and self.process.poll() is None:
            family = self.processes()
            for pid in reversed(family):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            for pid in family[1:]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.process = None

    def __enter__(self) -> TrackingServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of ``pid`` (Linux /proc; none found elsewhere)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        children = []
        for task in Path(f"/proc/{parent}/task").glob("*"):  # children started by any of its threads
            with contextlib.suppress(OSError):
                children += [int(child) for child in (task / "children").read_text().split()]
        found += children
        pending += children
    return found


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_server(uri: str) -> None:
    """One request to the tracking server at ``uri`` with the credentials every trial will use
    (``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``), before any
    work: a refused login or a server that does not answer is one ``UserInputError`` naming the fix."""
    if not uri.startswith(("http://", "https://")):
        return  # a local store (file, sqlite): nothing to reach
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    credentials = get_default_host_creds(uri)
    try:
        response = http_request(credentials, "/api/2.0/mlflow/experiments/search", "POST",
                                max_retries=0, timeout=15, raise_on_status=False, json={"max_results": 1})
    except Exception as exc:  # noqa: BLE001 - any transport failure means the same to the user
        raise UserInputError(f"cannot reach the tracking server {uri} ({str(exc).splitlines()[0][:160]}); "
                             "check --tracking-uri and that the server is up") from None
    if response.status_code in (401, 403):
        given = "was refused" if os.environ.get("MLFLOW_TRACKING_USERNAME") else "asks for a login and none was given"
        raise UserInputError(f"the tracking server {uri} {given} (HTTP {response.status_code}): set "
                             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment to an "
                             "account of its login (never in the spec)")
    if response.status_code != 200:
        raise UserInputError(f"the tracking server {uri} answered HTTP {response.status_code} to a search; "
                             "check that --tracking-uri is an MLflow server")
    _check_artifact_store(uri, credentials)


def _check_artifact_store(uri: str, credentials) -> None:
    """A probe file put through the server's artifact proxy and deleted: a bucket that does not exist or a
    server without credentials for it fails here, not in the first trial's upload. Where the server does
    not proxy artifacts (HTTP 503) or the login may not write outside runs (401/403), nothing is checked."""
    from mlflow.utils.rest_utils import http_request

    probe = f"/api/2.0/mlflow-artifacts/artifacts/.dreamfusion-check/{uuid.uuid4().hex}"
    try:
        response = http_request(credentials, probe, "PUT", max_retries=0, timeout=60, raise_on_status=False,
                                data=b"dreamfusion")
    except Exception as exc:  # noqa: BLE001 - any transport failure means the same to the user
        raise UserInputError(f"the tracking server {uri} did not answer an artifact upload "
                             f"({str(exc).splitlines()[0][:160]}); check its artifact store") from None
    if response.status_code in (401, 403, 503):
        return
    if response.status_code != 200:
        try:
            reason = str(response.json().get("message", "")).strip().splitlines()[0][:200]
        except (ValueError, IndexError):
            reason = response.text.strip()[:200]
        raise UserInputError(f"the tracking server {uri} could not store an artifact (HTTP {response.status_code}: "
                             f"{reason}); check that the bucket of its --artifacts-destination exists and that "
                             "the server has credentials for it (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                             "MLFLOW_S3_ENDPOINT_URL in the server's environment)")
    http_request(credentials, probe, "DELETE", max_retries=0, timeout=60, raise_on_status=False)


def open_parent_run(uri: str, sweep: str, params: dict[str, Any], parent_run_id: str | None = None
                    ) -> tuple[str, str]:
    """The sweep's experiment and parent run: created, or reopened when ``parent_run_id`` is given."""
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(sweep)
    experiment_id = experiment.experiment_id if experiment else mlflow_client.create_experiment(
        sweep, tags={EXPERIMENT_KIND_TAG: "custom_model_development"})  # the dashboard opens on the runs table
    if parent_run_id:
        mlflow_client.update_run(parent_run_id, status="RUNNING")
        return experiment_id, parent_run_id
    run = mlflow_client.create_run(experiment_id, run_name=f"sweep {sweep}", tags={SWEEP_TAG: sweep})
    mlflow_client.log_batch(run.info.run_id, params=_params(params))
    return experiment_id, run.info.run_id


def share_trials_view(uri: str, experiment_id: str, parent_run_id: str, columns: list[str], metric: str,
                      mode: str) -> str:
    """Store, as MLflow's own "share view" does, a runs-table view of the sweep's trials: only the child
    runs of ``parent_run_id``, the given params and metrics as columns, sorted by ``metric``. Returns its key
    for ``dashboard_url``. (MLflow 3 reads ``viewStateShareKey`` from the URL and the view from the
    experiment tag ``mlflow.sharedViewState.<key>``; search facets in that URL would override it.)"""
    key = f"dreamfusion-{parent_run_id}"
    view = {
        "searchFilter": f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
        "orderByKey": f"metrics.`{metric}`",
        "orderByAsc": mode == "min",
        "selectedColumns": [*columns, "attributes.`Duration`"],
        # MLflow >= 3.17 groups the columns (metrics before params) unless told their order: the prompt and
        # the searched keys first, where a narrow screen shows them, after the table's fixed columns.
        "columnOrder": ["attributes.`Run Name`", "runDateAndNestInfo", *columns, "attributes.`Duration`"],
        "runsHiddenMode": "SHOW_ALL",
    }
    client(uri).set_experiment_tag(experiment_id, f"{SHARED_VIEW_TAG}{key}", json.dumps(view))
    return key


def dashboard_url(base: str, experiment_id: str, view_key: str | None) -> str:
    """Where the dashboard opens on a sweep: its trials in the runs table ("Model training", not GenAI)."""
    url = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return f"{url}&viewStateShareKey={view_key}" if view_key else url


def _params(values: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(key, str(value)[:6000]) for key, value in sorted(values.items())]


def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> list:
    return client(uri).search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                   max_results=10000)


class TrialRun:
    """One trial's child run: found by ``key`` or created; params logged once; metrics buffered."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, key: str, name: str,
                 params: dict[str, Any], tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client = client(uri)
        self.pending: list = []
        self.pending_images: list[tuple[str, int, Any]] = []
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{TRIAL_KEY_TAG}` = '{key}'",
                                        max_results=1)
        if found:
            run = found[0]
            self.run_id = run.info.run_id
            self.finished_metrics: dict[str, float] | None = (
                dict(run.data.metrics) if run.info.status == "FINISHED" else None)
            if self.finished_metrics is None:
                self.client.update_run(self.run_id, status="RUNNING")
                self.client.set_tag(self.run_id, "dreamfusion.attempts",
                                    str(int(run.data.tags.get("dreamfusion.attempts", "1")) + 1))
            if not run.data.params:  # the first attempt died before its params reached the server
                self.client.log_batch(self.run_id, params=_params(params))
        else:
            run = self.client.create_run(experiment_id, run_name=name,
                                         tags={PARENT_TAG: parent_run_id, TRIAL_KEY_TAG: key,
                                               "dreamfusion.attempts": "1"})
            self.run_id = run.info.run_id
            self.finished_metrics = None
            self.client.log_batch(self.run_id, params=_params(params))
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.artifact_uri = run.info.artifact_uri

    def record(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(key, float(value), now, step) for key, value in metrics.items())

    def record_image(self, key: str, step: int, image) -> None:
        """An image for MLflow's image grid (``log_image`` with a key and a step), sent at the next flush."""
        self.pending_images.append((key, step, image))

    def flush(self) -> bool:
        """Send what is buffered; on failure keep it, warn, and return False."""
        try:
            while self.pending:
                batch = self.pending[:MAX_BATCH_METRICS]
                self.client.log_batch(self.run_id, metrics=batch)
                del self.pending[:len(batch)]
            while self.pending_images:
                key, step, image = self.pending_images[0]
                self.client.log_image(self.run_id, image, key=key, step=step, synchronous=True)
                self.pending_images.pop(0)
        except Exception as exc:  # noqa: BLE001 - any transport failure: keep the data, try later
            log.warning("MLflow logging failed (%s); %d metric values and %d images kept and sent at the next "
                        "flush", str(exc).splitlines()[0][:200], len(self.pending), len(self.pending_images))
            return False
        return True

    def set_phase(self, phase: str) -> None:
        """The ``dreamfusion.phase`` tag: what the trial does after its last step (best effort: a phase
        the server missed is stale for a few seconds, not lost data)."""
        try:
            self.client.set_tag(self.run_id, PHASE_TAG, phase)
        except Exception as exc:  # noqa: BLE001 - any transport failure: the next phase tries again
            log.warning("MLflow: the trial's phase tag was not set (%s)", str(exc).splitlines()[0][:200])

    def log_artifacts(self, paths: Iterable[Path], attempts: int = 12, wait: float = 10.0) -> None:
        for path in paths:
            retry(lambda p=path: self.client.log_artifact(self.run_id, str(p)), attempts, wait,
                  f"uploading {path.name}")

    def finish(self, status: str, attempts: int = 12, wait: float = 10.0) -> None:
        def send() -> None:
            if not self.flush():
                raise ConnectionError("metrics not sent")
            self.client.set_terminated(self.run_id, status=status)

        retry(send, attempts, wait, f"ending the run as {status}")


def retry(action, attempts: int, wait: float, what: str):
    """``action()``, tried up to ``attempts`` times ``wait`` seconds apart; its result, or its last error."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - transport errors of any kind are retried
            if attempt == attempts:
                raise
            log.warning("MLflow: %s failed (%s); retry %d/%d in %.0f s", what, str(exc).splitlines()[0][:200],
                        attempt, attempts - 1, wait)
            time.sleep(wait)


def trial_environment() -> None:
    for key, value in TRIAL_HTTP_ENV.items():
        os.environ.setdefault(key, value)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per report
