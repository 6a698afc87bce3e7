import json
import re
import subprocess
import sys

import imageio.v2 as imageio
import pytest

from dreamfusion.cli import best_per_prompt, main
from dreamfusion.geometry import GEOMETRY_METRICS
from dreamfusion.pipeline import ARTIFACT_KEYS
from tests.conftest import TINY


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dreamfusion.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["run", "a flying saucer"], "unknown prompt"),
        (["run", "a red ball", "--set", "sds.nope=1"], "unknown config key"),
        (["run", "a red ball", "--set", "optim.lr=-1"], "optim.lr must be a positive number"),
        (["run", "a red ball", "--iters", "0"], "iterations must be >= 1"),
        (["run", "a red ball", "--guidance", "imagen"], "guidance.backend must be one of"),
        (["run", "", ], "prompt is empty"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, fragment, tmp_path, capsys):
    out = tmp_path / "run"
    code = main([*args, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and fragment in err[0], err
    assert not out.exists()


def test_unwritable_output_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code = main(["run", "a red ball", "--out", str(blocker / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot write to --out" in err[0]


def test_prompts_lists_the_library():
    result = run_cli("prompts")
    assert result.returncode == 0
    assert "a red ball" in result.stdout and "a head with a face" in result.stdout


@pytest.mark.slow
def test_run_then_eval_end_to_end(tmp_path, capsys):
    out = tmp_path / "ball"
    overrides = [arg for item in TINY for arg in ("--set", item)]
    assert main(["run", "A Red Ball", "--out", str(out), "--iters", "8", "--seed", "3", *overrides]) == 0
    console = capsys.readouterr().err
    # After the last step, each phase shows itself as it begins; the turntable counts its frames.
    for phase in ("occupancy grid", "checkpoint", "mesh", "texture", "turntable", "previews", "metrics",
                  "3D accuracy"):
        assert f"a red ball [{phase}]" in console, phase
    assert re.search(r"a red ball \[turntable\]: 100%.* 4/4 ", console)  # export.video_frames=4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompt"] == "a red ball" and summary["iterations"] == 8
    # 8 steps leave a half-transparent blob, whose mesh at the density threshold is rightly flagged.
    assert all("the exported mesh departs from the renders" in w for w in summary["warnings"])
    assert {"mesh_psnr", "mesh_silhouette_iou"} <= set(summary["metrics"])
    assert summary["config"]["seed"] == 3 and 0 < summary["post_training_seconds"] < summary["wall_seconds"]
    assert {"silhouette_iou", "psnr", "r_precision_colour", "r_precision_textureless"} <= set(summary["metrics"])
    assert set(GEOMETRY_METRICS) <= set(summary["metrics"])  # the exported mesh and the normals in 3D
    expected = {"mesh_glb", "mesh_obj", "mesh_mtl", "texture_png", "mesh_ply", "video_webm", "video_gif",
                "viewer_html", "checkpoint",
                "renders_colour", "renders_textureless", "renders_normals", "progress"}
    assert set(summary["artifacts"]) == expected == set(ARTIFACT_KEYS)
    for name in summary["artifacts"].values():
        assert (out / name).is_file() and (out / name).resolve().parent == out.resolve()
    # progress.png: a row per snapshot step (8 iterations, 12 asked: steps 0..7) and one for the end
    assert imageio.imread(out / summary["artifacts"]["progress"]).shape == (9 * 16, 8 * 16, 3)
    assert not [p for p in out.iterdir() if p.name.startswith(".incomplete")]

    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    recomputed = json.loads(capsys.readouterr().out)
    assert recomputed == pytest.approx(summary["metrics"], abs=1e-6)

    assert main(["run", "a red ball", "--out", str(out)]) == 2  # never overwrite a finished run

    gallery = tmp_path / "gallery" / "g.png"
    assert main(["gallery", str(tmp_path), "--out", str(gallery), "--best", "silhouette_iou"]) == 0
    colour = imageio.imread(out / summary["artifacts"]["renders_colour"])
    picture = imageio.imread(gallery)
    assert picture.shape[0] == colour.shape[0] and picture.shape[1] > 2 * colour.shape[1]  # colour + textureless
    capsys.readouterr()
    assert main(["gallery", str(tmp_path), "--out", str(gallery), "--best", "beauty"]) == 2
    assert "has no metric 'beauty'" in capsys.readouterr().err
    assert main(["gallery", str(tmp_path / "gallery"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no finished run" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_best_per_prompt_takes_the_lowest_where_lower_is_better(tmp_path):
    runs = []
    for name, prompt, chamfer, iou in [("a", "a red ball", 0.05, 0.9), ("b", "a red ball", 0.02, 0.8),
                                       ("c", "a blue cube", 0.03, 0.7)]:
        run = tmp_path / name
        run.mkdir()
        (run / "summary.json").write_text(json.dumps({"prompt": prompt, "metrics": {"chamfer": chamfer,
                                                                                    "silhouette_iou": iou}}))
        runs.append(run)
    assert sorted(p.name for p in best_per_prompt(runs, "chamfer")) == ["b", "c"]
    assert sorted(p.name for p in best_per_prompt(runs, "silhouette_iou")) == ["a", "c"]


@pytest.mark.slow
def test_a_run_that_ends_empty_finishes_without_mesh_and_says_so(tmp_path, capsys):
    out = tmp_path / "empty"
    overrides = [arg for item in [*TINY, "field.blob_density=0"] for arg in ("--set", item)]
    assert main(["run", "a red ball", "--out", str(out), "--iters", "1", *overrides]) == 0
    summary = json.loads((out / "summary.json").read_text())
    mesh_files = {"mesh_glb", "mesh_obj", "mesh_mtl", "texture_png", "mesh_ply", "viewer_html"}
    assert not mesh_files & set(summary["artifacts"])
    assert {"video_webm", "checkpoint", "renders_colour"} <= set(summary["artifacts"])
    assert "silhouette_iou" in summary["metrics"]  # a sweep still compares the trial
    assert "chamfer" not in summary["metrics"] and "fscore" not in summary["metrics"]  # no mesh to measure
    assert len(summary["warnings"]) == 1 and "no mesh" in summary["warnings"][0]
    assert "warning: no mesh or viewer exported" in capsys.readouterr().err


def test_head_metrics_include_janus(tmp_path):
    from dreamfusion.evaluate import evaluate_field
    from dreamfusion.guidance.synthetic import SyntheticGuidance
    from dreamfusion.prior.shapes import SDFField, find_object
    from tests.conftest import tiny_config

    guidance = SyntheticGuidance(tiny_config("a head with a face"))
    truth = evaluate_field(SDFField(find_object("a head with a face")), "a head with a face", guidance.prior)
    assert truth["silhouette_iou"] > 0.97 and truth["psnr"] > 30
    assert truth["janus_rate"] == 0.0 and truth["front_recall"] >= 0.8
