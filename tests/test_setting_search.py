"""experiments/setting_search.py: candidates are checked before any run, run, and ranked."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("setting_search", ROOT / "experiments" / "setting_search.py")
setting_search = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setting_search)


@pytest.mark.parametrize("text, message", [
    ("fast optim.nope=1\n", "unknown config key 'optim.nope'"),
    ("a optim.lr=0.1\na optim.lr=0.2\n", "'a' is not a new candidate name"),
    ("../up optim.lr=0.1\n", "'../up' is not a new candidate name"),
    ("# only a comment\n\n", "names no candidate"),
])
def test_bad_candidates_are_refused_before_any_run(tmp_path, capsys, text, message):
    candidates = tmp_path / "candidates.txt"
    candidates.write_text(text)
    assert setting_search.main([str(candidates), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("file, extra, message", [
    ("candidates.txt", ["--prompts", "a dragon"], "unknown prompt 'a dragon'"),
    ("candidates.txt", ["--out", "/proc/no-such-dir"], "cannot write to /proc/no-such-dir"),
    ("missing.txt", [], "cannot read the candidates file"),
])
def test_bad_prompts_output_or_file_are_refused_before_any_run(tmp_path, capsys, file, extra, message):
    (tmp_path / "candidates.txt").write_text("default\n")
    assert setting_search.main([str(tmp_path / file), "--out", str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_candidates_are_ranked_by_their_lowest_iou(tmp_path, monkeypatch):
    ious = {"good": {"a red ball": 0.95, "a blue cube": 0.9}, "bad": {"a red ball": 0.97, "a blue cube": 0.5}}

    def quality(out, prompts, ablations, iterations, settings):
        name = out.name
        return {"runs": {p: {"default": {"silhouette_iou": iou, "r_precision_colour": 1.0, "wall_seconds": 3.0}}
                         for p, iou in ious[name].items()}}

    monkeypatch.setattr(setting_search, "quality", quality)
    candidates = tmp_path / "candidates.txt"
    candidates.write_text("bad sds.guidance_scale=30\ngood optim.lr=0.01\n")
    assert setting_search.main([str(candidates), "--out", str(tmp_path)]) == 0
    rows = (tmp_path / "search.md").read_text().splitlines()[2:]
    assert rows[0].startswith("| good | `optim.lr=0.01` | 2 | 0.900 (a blue cube) | 1.00 | 3 | yes |")
    assert rows[1].startswith("| bad |") and rows[1].endswith("| no |")


def test_base_settings_come_before_every_candidates_own_and_are_checked_first(tmp_path, monkeypatch, capsys):
    seen = {}

    def quality(out, prompts, ablations, iterations, settings):
        seen[out.name] = settings
        return {"runs": {"a red ball": {"default": {"silhouette_iou": 0.9, "r_precision_colour": 1.0,
                                                    "wall_seconds": 3.0}}}}

    monkeypatch.setattr(setting_search, "quality", quality)
    candidates = tmp_path / "candidates.txt"
    candidates.write_text("default\nlr optim.lr=0.01\n")
    base = ["--set", "sds.guidance_scale=7.5", "--set", "field.background=learned"]
    assert setting_search.main([str(candidates), "--out", str(tmp_path / "out"), *base]) == 0
    assert seen == {"default": ["sds.guidance_scale=7.5", "field.background=learned"],
                    "lr": ["sds.guidance_scale=7.5", "field.background=learned", "optim.lr=0.01"]}
    assert "| lr | `optim.lr=0.01` |" in (tmp_path / "out" / "search.md").read_text()

    assert setting_search.main([str(candidates), "--out", str(tmp_path / "bad"), "--set", "optim.nope=1"]) == 2
    assert "--set: unknown config key 'optim.nope'" in capsys.readouterr().err
    # a candidate is checked with the base before it: this base makes the backdrop dark
    candidates.write_text("grey field.background=fixed\n")
    assert setting_search.main([str(candidates), "--out", str(tmp_path / "bad"), "--set",
                                "guidance.prior_backdrop=0.15", "--set", "field.background=learned"]) == 2
    assert "candidates.txt:1: field.background_color 0.5,0.5,0.5 differs" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_a_real_candidate_writes_its_quality_table(tmp_path):
    candidates = tmp_path / "candidates.txt"
    candidates.write_text("tiny " + " ".join([*TINY, "export.progress_snapshots=0"]) + "\n")
    assert setting_search.main([str(candidates), "--out", str(tmp_path / "out"), "--prompts", "a red ball",
                                "--iters", "2"]) == 0
    assert (tmp_path / "out" / "tiny" / "quality.json").exists()
    assert "| tiny |" in (tmp_path / "out" / "search.md").read_text()
