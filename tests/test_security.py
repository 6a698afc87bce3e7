"""Security: hostile prompts stay metadata, never paths; no unsafe loaders; servers on loopback only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dreamfusion.config import Config
from dreamfusion.errors import UserInputError
from dreamfusion.export import write_viewer
from dreamfusion.guidance.base import Guidance, scaled_linear_alphas_cumprod
from dreamfusion.pipeline import finish_run
from dreamfusion.trainer import Trainer
from dreamfusion_platform import tracking
from dreamfusion_platform.cli import register
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("dreamfusion", "platform", "triton_kernels") for p in (REPO / folder).rglob("*.py")]
HOSTILE = ["../../../../tmp/owned", "/etc/passwd", "..\\..\\windows\\system32", "a/b/../../c", "~/.ssh/id_rsa",
           "$(touch pwned)", "<script>alert(1)</script>", "x" * 1000]


class AnyPromptGuidance(Guidance):
    """A stand-in for a real model, so any prompt text can be run."""

    def __init__(self) -> None:
        self.alphas_cumprod = scaled_linear_alphas_cumprod()

    def encode(self, images, progress=1.0):
        return images * 2 - 1

    def predict_noise(self, noisy, timesteps, views, guidance_scale, textureless=False, progress=1.0):
        return torch.zeros_like(noisy)


@pytest.mark.parametrize("prompt", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_prompts_write_only_fixed_names_inside_the_run(tmp_path, prompt):
    config = tiny_config()
    config.prompt = prompt
    trainer = Trainer(config.validate(), guidance=AnyPromptGuidance())
    trainer.train(until=2)
    out = tmp_path / "runs" / "one"
    summary = finish_run(trainer, out, 0.0)
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {Path("runs/one") / name for name in [*summary["artifacts"].values(), "summary.json"]}
    assert summary["prompt"] == prompt  # kept as metadata, verbatim
    html = (out / "viewer.html").read_text()
    assert "<script>alert(1)</script>" not in html


@pytest.mark.parametrize("prompt", ["a red ball\x00", "a\nb", "\x1b[31mred", "x" * 1001])
def test_prompts_with_control_characters_or_thousands_of_characters_are_refused(prompt):
    with pytest.raises(UserInputError):
        Config(prompt=prompt).validate()


def test_viewer_title_is_escaped(tmp_path):
    import numpy as np
    import trimesh

    from dreamfusion.mesh import TexturedMesh

    box = trimesh.creation.box()
    mesh = TexturedMesh(np.asarray(box.vertices, np.float32), np.asarray(box.faces), np.zeros((len(box.vertices), 2),
                        np.float32), np.zeros((4, 4, 3), np.uint8), np.asarray(box.vertex_normals, np.float32))
    html = write_viewer(mesh, tmp_path / "viewer.html", '</script><img src=x onerror="alert(1)">').read_text()
    assert "onerror=\"alert" not in html and "&lt;/script&gt;" in html


def test_trial_folders_are_named_by_id_only():
    from dreamfusion_platform.sweep import _trial_name

    class Trial:
        trial_id = "a1b2c_00003"
        config = {"prompt": "../../../etc/passwd"}

    assert _trial_name(Trial()) == "trial_a1b2c_00003"


def test_no_unsafe_loaders_in_the_code():
    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"yaml\.(unsafe_)?load\(", text), f"{path}: use yaml.safe_load"
        for call in re.findall(r"torch\.load\(.*", text):  # one call per line in this code
            assert "weights_only=True" in call, f"{path}: {call}"
        if "pickle.load(" in text:
            # Tune's own searcher state in the workspace, written by the same class: not user input.
            assert path.name == "sweep.py" and text.count("pickle.load(") == 1, path
    assert "include_dashboard=False" in (REPO / "platform" / "sweep.py").read_text()


def test_servers_bind_to_loopback_unless_asked(tmp_path):
    import argparse

    import psutil

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["ui"]).host == "127.0.0.1"
    server = tracking.TrackingServer(tmp_path / "mlflow").start()
    try:
        processes = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
        listening = [c.laddr for p in processes for c in p.net_connections(kind="inet") if c.status == "LISTEN"]
        assert listening and all(address.ip == "127.0.0.1" for address in listening), listening
    finally:
        server.stop()


@pytest.mark.slow
def test_a_sweep_against_a_tracking_server_that_refuses_it_is_one_line_and_nothing_written(tmp_path):
    """MLflow's basic-auth app in front of the store: a wrong password, no login at all and a server that
    does not answer each end the sweep before any work with one line naming the fix, exit code 2; with the
    right login the sweep runs, a client without it is refused, and the password is in no param, tag,
    artifact, console line or workspace file."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.test_platform_sweep import sweep_command, write_spec

    password = "a-correct-horse-battery-staple"
    config = tmp_path / "auth.ini"
    config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path / 'users.db'}\n"
                      "admin_username = admin\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = tracking.free_port()
    server_env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                  "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        spec = write_spec(tmp_path, "login")
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        cases = {
            "was refused (HTTP 401)": ({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "wrong"}, uri),
            "asks for a login and none was given": ({}, uri),
            "cannot reach the tracking server": ({}, f"http://127.0.0.1:{tracking.free_port()}"),
        }
        for expected, (login, target) in cases.items():
            workspace = tmp_path / f"ws-{len(expected)}"
            done = subprocess.run(sweep_command(spec, workspace, "--tracking-uri", target), capture_output=True,
                                  text=True, timeout=300, env={**base_env, **login})
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 2 and len(lines) == 1 and expected in lines[0], done.stderr[-2000:]
            assert "MLFLOW_TRACKING_PASSWORD" in lines[0] or "--tracking-uri" in lines[0]
            assert "wrong" not in done.stderr and password not in done.stderr
            assert not workspace.exists()

        # With the right login the sweep runs, and the password is nowhere it wrote.
        one = write_spec(tmp_path, "signed-in", prompts=["a red ball"], search={"space": {}})
        workspace = tmp_path / "ws-signed-in"
        login = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
        done = subprocess.run(sweep_command(one, workspace, "--tracking-uri", uri), capture_output=True,
                              text=True, timeout=600, env={**base_env, **login})
        assert done.returncode == 0, done.stderr[-3000:]
        assert password not in done.stdout + done.stderr
        assert not [p for p in workspace.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
        import mlflow.exceptions

        with pytest.MonkeyPatch.context() as patch:  # a client without the login is refused
            for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                patch.delenv(key, raising=False)
            patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            with pytest.raises(mlflow.exceptions.MlflowException, match="401|Unauthorized|credentials"):
                tracking.client(uri).search_experiments()
        with pytest.MonkeyPatch.context() as patch:
            for key, value in login.items():
                patch.setenv(key, value)
            client = tracking.client(uri)
            experiment = client.get_experiment_by_name("signed-in")
            runs = client.search_runs([experiment.experiment_id])
            assert len(runs) == 2  # the parent and its trial
            for run in runs:
                written = [*run.data.params.values(), *run.data.tags.values()]
                assert not [value for value in written if password in value]
                download = tmp_path / "download" / run.info.run_id
                client.download_artifacts(run.info.run_id, "", str(download))
                assert not [p for p in download.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_shared_tracking_server_of_the_compose_file_asks_for_a_login(tmp_path):
    """infra/mlflow/docker-compose.yaml (no Docker here): the server runs MLflow's basic-auth app, its secret
    key and admin password are required from the environment, and its one shell line writes an auth config
    that MLflow's reader takes."""
    import configparser
    import subprocess

    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parents[1] / "infra" / "mlflow" / "docker-compose.yaml")
                             .read_text())
    server = compose["services"]["mlflow"]
    shell, flag, script = server["command"]
    assert (shell, flag) == ("sh", "-c") and "\n" not in script and "--app-name basic-auth" in script
    for key in ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert ":?" in server["environment"][key]  # compose refuses to start without it
    config_path = server["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    write = next(part for part in script.split("&&") if "printf" in part).replace(config_path, str(tmp_path / "a.ini"))
    subprocess.run(["sh", "-c", write], check=True)
    parsed = configparser.ConfigParser()
    parsed.read(tmp_path / "a.ini")
    assert parsed["mlflow"]["admin_username"] == "admin" and "admin_password" not in parsed["mlflow"]
    assert parsed["mlflow"]["database_uri"].startswith("sqlite:////auth/")  # in the compose file's volume
