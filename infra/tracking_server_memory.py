"""Processes and resident memory of the MLflow server a sweep and `dreamfusion ui` start, with MLflow 3's
job runner (its default) and without it (ours): `python3 infra/tracking_server_memory.py`."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import psutil

from dreamfusion_platform.tracking import TrackingServer

SETTLE_SECONDS = 20.0  # the job runner starts its consumers after the server answers
SAMPLES = 5


def measure(jobs: bool) -> tuple[int, float]:
    with tempfile.TemporaryDirectory() as store, TrackingServer(Path(store), jobs=jobs) as server:
        time.sleep(SETTLE_SECONDS)
        counts, totals = [], []
        for _ in range(SAMPLES):
            rss = [psutil.Process(pid).memory_info().rss for pid in server.processes() if psutil.pid_exists(pid)]
            counts.append(len(rss))
            totals.append(sum(rss) / 2**30)
            time.sleep(1.0)
        return max(counts), statistics.median(totals)


def main() -> None:
    print("| MLflow server | processes | RSS GiB (median of 5) |\n|---|---|---|")
    for jobs, label in ((True, "with the job runner (MLflow's default)"), (False, "without it (ours)")):
        count, gib = measure(jobs)
        print(f"| {label} | {count} | {gib:.2f} |", flush=True)


if __name__ == "__main__":
    main()
