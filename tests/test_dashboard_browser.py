"""The dashboard in a real browser: after a tiny sweep, the link `dreamfusion ui` prints opens on the
sweep's trials (prompt, searched key and metric as columns, sorted by the metric) in headless Chromium,
and a trial's viewer.html draws the mesh (a non-blank canvas).
Screenshots are kept in $DREAMFUSION_TEST_ARTIFACTS (default: test-artifacts/)."""

from __future__ import annotations

import os
import re
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

    spec = write_spec(tmp_path, "browser", iterations=8, report_every=4)
    workspace = tmp_path / "ws"
    done = subprocess.run(sweep_command(spec, workspace), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    parent, children = sweep_runs(workspace, "browser")
    experiment_id = parent.info.experiment_id

    port = tracking.free_port()
    ui = subprocess.Popen([sys.executable, "-m", "dreamfusion_platform.cli", "ui", "--workspace", str(workspace),
                           "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        base = f"http://127.0.0.1:{port}"
        printed = [ui.stdout.readline() for _ in range(2)]  # the server, then a link per sweep
        link = re.search(r"sweep browser: (\S+)", printed[1]).group(1)
        assert link.startswith(f"{base}/#/experiments/{experiment_id}/runs")
        assert link.split("/#/")[1] in done.stdout  # the sweep printed the same link
        wait_until_up(f"{base}/health")
        viewer = Path(tracking.client(base).download_artifacts(children[0].info.run_id, "viewer.html",
                                                                str(tmp_path / "download")))
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1800, "height": 800})
            try:
                page.goto(link)  # as a user would: the link `dreamfusion ui` printed, nothing clicked
                # The sweep's trials only (its parent run filtered out), sorted by its metric, in "Model training".
                page.get_by_text(f"{len(children)} matching runs").wait_for(timeout=60_000)
                page.get_by_text("Sort: silhouette_iou").wait_for(timeout=30_000)
                for column in ("prompt", "sds.guidance_scale", "silhouette_iou"):
                    page.get_by_role("columnheader", name=re.compile(f"^{re.escape(column[:12])}")).first.wait_for(
                        timeout=30_000)
                left = {name: page.get_by_role("columnheader", name=name, exact=True).first.bounding_box()["x"]
                        for name in ("prompt", "silhouette_iou", "chamfer")}
                assert left["prompt"] < left["silhouette_iou"] < left["chamfer"], left  # the view's order
                assert page.get_by_text("No data available").count() == 0  # not the GenAI overview
                values = {str(c.data.metrics["silhouette_iou"]) for c in children}
                rows = [cells.split("\n") for cells in page.locator("[role=row]").all_inner_texts()]
                shown = [float(next(cell for cell in cells if cell in values)) for cells in rows
                         if {"a red ball", "a blue cube"} & set(cells)]
                assert len(shown) == len(children) and shown == sorted(shown, reverse=True), shown
            except Exception:
                page.screenshot(path=str(ARTIFACTS / "dashboard-failure.png"))  # what the browser showed
                raise
            page.screenshot(path=str(ARTIFACTS / "dashboard-experiment.png"))

            page.goto(f"{base}/#/experiments/{experiment_id}/runs/{children[0].info.run_id}")
            page.get_by_text(children[0].info.run_name).first.wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "dashboard-trial-run.png"))

            page.goto(viewer.as_uri())
            page.wait_for_timeout(2000)
            page.locator("canvas").screenshot(path=str(ARTIFACTS / "viewer-canvas.png"))
            page.goto(red_ball_viewer(tmp_path).as_uri())  # the texture's colour, on a field whose colour is known
            page.wait_for_timeout(2000)
            page.locator("canvas").screenshot(path=str(ARTIFACTS / "viewer-red-ball.png"))
            browser.close()
    finally:
        ui.terminate()
        ui.wait(timeout=30)

    canvas = np.asarray(Image.open(ARTIFACTS / "viewer-canvas.png").convert("RGB")).astype(float)
    background = canvas[2, 2]
    drawn = np.abs(canvas - background).sum(-1) > 30
    assert drawn.mean() > 0.01, "the viewer's canvas is blank"
    red = np.asarray(Image.open(ARTIFACTS / "viewer-red-ball.png").convert("RGB")).astype(float)
    ball = red[np.abs(red - red[2, 2]).sum(-1) > 30]
    assert len(ball) > 0.05 * red.shape[0] * red.shape[1], "the red ball's viewer drew nothing"
    reddish = (ball[:, 0] > 1.5 * ball[:, 1]) & (ball[:, 0] > 1.5 * ball[:, 2])
    assert reddish.mean() > 0.8, f"the ball is not red on the canvas (mean colour {ball.mean(0)})"


def red_ball_viewer(directory: Path) -> Path:
    from dreamfusion.export import write_viewer
    from dreamfusion.mesh import bake_texture, extract_mesh
    from dreamfusion.prior.shapes import SDFField, find_object

    field = SDFField(find_object("a red ball"))
    return write_viewer(bake_texture(field, extract_mesh(field, 48), 128), directory / "red.html", "a red ball")
