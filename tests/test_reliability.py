"""Faults: a corrupt checkpoint, a full disk, and the MLflow tracking server down for a while.
(Killed trials and a killed driver are in test_platform_sweep.py; NaN steps in test_trainer.py.)"""

from __future__ import annotations

import contextlib
import errno
import time
from types import SimpleNamespace

import pytest

from dreamfusion.errors import UserInputError
from dreamfusion.pipeline import CHECKPOINT, run_prompt
from dreamfusion.trainer import Trainer
from dreamfusion_platform import tracking
from dreamfusion_platform.cli import main
from dreamfusion_platform.trial import restore_newest_readable
from tests.conftest import TINY, tiny_config


def test_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    trainer = Trainer(tiny_config("a red ball"))
    trainer.train(until=3)
    trainer.save_checkpoint(tmp_path / "checkpoint_000000" / CHECKPOINT)
    trainer.train(until=6)
    trainer.save_checkpoint(tmp_path / "checkpoint_000001" / CHECKPOINT)
    latest = tmp_path / "checkpoint_000001" / CHECKPOINT
    latest.write_bytes(latest.read_bytes()[:200])  # truncated, as by a crash mid-copy

    resumed = Trainer(tiny_config("a red ball"))
    restore_newest_readable(resumed, SimpleNamespace(path=str(tmp_path / "checkpoint_000001")))
    assert resumed.step == 3

    (tmp_path / "checkpoint_000000" / CHECKPOINT).write_bytes(b"garbage")
    fresh = Trainer(tiny_config("a red ball"))
    restore_newest_readable(fresh, SimpleNamespace(path=str(tmp_path / "checkpoint_000001")))
    assert fresh.step == 0  # nothing readable: start again rather than fail


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_full_or_read_only_disk_during_export_leaves_nothing(tmp_path, monkeypatch, capsys, code):
    def refuse(*args, **kwargs):
        raise OSError(code, "No space left on device" if code == errno.ENOSPC else "Permission denied")

    monkeypatch.setattr("dreamfusion.pipeline.write_textured", refuse)
    out = tmp_path / "run"
    with pytest.raises(UserInputError, match="nothing was left there"):
        run_prompt(tiny_config("a red ball", iterations=2), out)
    assert not out.exists()
    overrides = [arg for item in TINY for arg in ("--set", item)]
    assert main(["run", "a red ball", "--iters", "2", "--out", str(out), *overrides]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # after the progress bar
    assert len(errors) == 1 and "free some space" in errors[0]
    assert not out.exists()


@pytest.mark.slow
def test_tracking_server_down_for_a_while_loses_nothing(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    server = tracking.TrackingServer(tmp_path / "mlflow").start()
    try:
        experiment_id, parent = tracking.open_parent_run(server.uri, "outage", {"trials": 1})
        run = tracking.TrialRun(server.uri, experiment_id, parent, "key1", "a red ball", {"optim.lr": 0.02}, {})
        run.record(1, {"loss": 1.0})
        assert run.flush()
        server.stop()
        run.record(2, {"loss": 2.0})
        run.record(3, {"loss": 3.0})
        assert not run.flush()  # warned, kept, training goes on
        assert len(run.pending) == 2 and "kept and sent at the next flush" in caplog.text
        time.sleep(1.0)
        server.start()  # back, on the same port and store
        run.record(4, {"loss": 4.0})
        run.finish("FINISHED", attempts=3, wait=1.0)
        history = tracking.client(server.uri).get_metric_history(run.run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
        assert tracking.client(server.uri).get_run(run.run_id).info.status == "FINISHED"
        again = tracking.TrialRun(server.uri, experiment_id, parent, "key1", "a red ball", {"optim.lr": 0.02}, {})
        assert again.run_id == run.run_id and again.finished_metrics == {"loss": 4.0}  # no duplicate run
    finally:
        server.stop()


@pytest.mark.slow
def test_ui_stopped_by_sigterm_stops_its_server(tmp_path):
    import signal
    import subprocess
    import sys
    import urllib.request

    tracking.TrackingServer(tmp_path / "mlflow").start().stop()  # a store for the dashboard to open
    port = tracking.free_port()
    ui = subprocess.Popen([sys.executable, "-m", "dreamfusion_platform.cli", "ui", "--workspace", str(tmp_path),
                           "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/health"

    def answers() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            return False

    deadline = time.monotonic() + 120
    while not answers():
        assert time.monotonic() < deadline and ui.poll() is None, "the dashboard did not start"
        time.sleep(0.5)
    ui.send_signal(signal.SIGTERM)
    assert ui.wait(timeout=60) == 0
    deadline = time.monotonic() + 30
    while answers():  # the MLflow server goes with it
        assert time.monotonic() < deadline, "the MLflow server outlived `dreamfusion ui`"
        time.sleep(0.5)


@pytest.mark.slow
def test_tracking_server_runs_without_mlflow_job_runner(tmp_path):
    """MLflow 3 starts a job runner and its huey consumers (~1.8 GB) by default; ours leaves them out. The
    control with ``jobs=True`` shows the check would see them within the same wait."""
    import psutil

    def job_processes(server: tracking.TrackingServer) -> list[str]:
        commands = []
        for pid in server.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                commands.append(" ".join(psutil.Process(pid).cmdline()))
        return [c for c in commands if "mlflow.server.jobs" in c or "huey" in c]

    for jobs in (True, False):
        server = tracking.TrackingServer(tmp_path / f"mlflow-{jobs}", jobs=jobs).start()
        try:
            deadline = time.monotonic() + 20.0
            while time.monotonic() < deadline and not job_processes(server):
                time.sleep(0.5)
            assert bool(job_processes(server)) == jobs
            assert server.healthy()
        finally:
            server.stop()
