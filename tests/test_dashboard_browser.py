"""The dashboard in a real browser: after a tiny sweep, `dreamfusion ui` shows the sweep's experiment
and trial runs in headless Chromium, and a trial's viewer.html draws the mesh (a non-blank canvas).
Screenshots are kept in $DREAMFUSION_TEST_ARTIFACTS (default: test-artifacts/)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamfusion_platform import tracking
from tests.test_platform_sweep import sweep_command, sweep_runs, write_spec

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As root in a sandbox, with no network beyond loopback; WebGL through SwiftShader (no GPU).
FLAGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--disable-quic", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
ARTIFACTS = Path(os.environ.get("DREAMFUSION_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def wait_until_up(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not come up")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_dashboard_shows_the_sweep_and_the_viewer_draws_the_mesh(tmp_path):
    from playwright.sync_api import sync_playwright

    spec = write_spec(tmp_path, "browser", prompts=["a red ball"], iterations=30, report_every=15)
    workspace = tmp_path / "ws"
    done = subprocess.run(sweep_command(spec, workspace), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    parent, children = sweep_runs(workspace, "browser")
    experiment_id = parent.info.experiment_id

    port = tracking.free_port()
    ui = subprocess.Popen([sys.executable, "-m", "dreamfusion_platform.cli", "ui", "--workspace", str(workspace),
                           "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(f"{base}/health")
        viewer = Path(tracking.client(base).download_artifacts(children[0].info.run_id, "viewer.html",
                                                                str(tmp_path / "download")))
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{base}/#/experiments/{experiment_id}/runs")
            page.get_by_text("Model training", exact=True).click()  # MLflow 3 may open in its GenAI view
            page.get_by_text("sweep browser").wait_for(timeout=60_000)
            page.get_by_text(f"{1 + len(children)} matching runs").wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "dashboard-experiment.png"))

            page.goto(f"{base}/#/experiments/{experiment_id}/runs/{children[0].info.run_id}")
            page.get_by_text(children[0].info.run_name).first.wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "dashboard-trial-run.png"))

            page.goto(viewer.as_uri())
            page.wait_for_timeout(2000)
            page.locator("canvas").screenshot(path=str(ARTIFACTS / "viewer-canvas.png"))
            browser.close()
    finally:
        ui.terminate()
        ui.wait(timeout=30)

    canvas = np.asarray(Image.open(ARTIFACTS / "viewer-canvas.png").convert("RGB")).astype(float)
    background = canvas[2, 2]
    drawn = np.abs(canvas - background).sum(-1) > 30
    assert drawn.mean() > 0.01, "the viewer's canvas is blank"
