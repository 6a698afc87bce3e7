"""Sweep specs: parsing, prompt files, validation messages, and the platform/ import mapping."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dreamfusion.errors import UserInputError
from dreamfusion_platform.spec import load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]


def spec(**fields):
    return {"name": "s", "prompts": ["a red ball", "a blue cube"], **fields}


def test_standard_platform_module_is_not_shadowed():
    import platform

    assert platform.system()  # the standard module, not the repository's platform/ folder
    for cwd in (REPO, REPO / "tests"):
        out = subprocess.run([sys.executable, "-c", "import platform, dreamfusion_platform.spec; "
                              "print(platform.system(), platform.__file__)"],
                             cwd=cwd, capture_output=True, text=True, check=True).stdout
        assert "platform.py" in out and "/platform/" not in out.split()[1]


def test_cli_keeps_the_standard_platform_module():
    out = subprocess.run([sys.executable, "-c", "import sys; sys.argv=['dreamfusion', 'prompts'];"
                          "from dreamfusion_platform.cli import main; main(); import platform; "
                          "print(platform.python_version())"], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1].count(".") == 2


def test_quickstart_and_shipped_specs_parse():
    for path in sorted((REPO / "experiments").glob("*.yaml")):
        parsed = load_spec(path)
        assert parsed.prompts and parsed.name
    quick = load_spec(REPO / "experiments" / "quickstart.yaml")
    assert len(quick.prompts) >= 4
    assert [d.values for d in quick.space if d.key == "sds.guidance_scale"][0] == (1, 7.5)


def test_trial_config_combines_base_overrides_and_parameters(tmp_path):
    parsed = parse_spec(spec(iterations=40, config={"render": {"resolution": 24}}, overrides=["optim.lr=0.03"],
                             search={"algorithm": "random", "space": {"sds.guidance_scale": {"uniform": [5, 30]}}}),
                        tmp_path)
    config = parsed.trial_config({"prompt": "a red ball", "seed": 3, "sds.guidance_scale": 12.5})
    assert (config.prompt, config.seed, config.iterations) == ("a red ball", 3, 40)
    assert config.render.resolution == 24 and config.optim.lr == 0.03 and config.sds.guidance_scale == 12.5
    assert parsed.report_every == 6  # a sixth of the iterations unless given


def test_candidates_are_bundles_of_settings_crossed_with_the_space(tmp_path):
    from dreamfusion_platform.sweep import trial_count

    parsed = parse_spec(spec(config={"optim.lr": 0.03}, search={
        "candidates": {"default": {}, "wide": {"field": {"blob_radius": 0.8}, "sds.lambda_opacity": 0.01}},
        "space": {"sds.guidance_scale": {"grid": [1, 7.5]}}}), tmp_path)
    assert trial_count(parsed) == 2 * 2 * 2  # prompts × candidates × grid
    wide = parsed.trial_config({"prompt": "a red ball", "seed": 0, "candidate": "wide", "sds.guidance_scale": 7.5})
    assert (wide.field.blob_radius, wide.sds.lambda_opacity, wide.optim.lr) == (0.8, 0.01, 0.03)
    default = parsed.trial_config({"prompt": "a red ball", "seed": 0, "candidate": "default", "sds.guidance_scale": 1})
    assert default.field.blob_radius != 0.8 and default.optim.lr == 0.03


def test_configurations_are_ranked_by_their_worst_prompt():
    import pandas as pd

    from dreamfusion_platform.sweep import format_table, rank_configurations

    table = pd.DataFrame({
        "prompt": ["a", "b", "a", "b", "a"], "seed": 0, "candidate": ["x", "x", "y", "y", "z"],
        "status": ["FINISHED"] * 4 + ["FAILED"], "silhouette_iou": [0.95, 0.70, 0.88, 0.86, None]})
    ranked = rank_configurations(table, "silhouette_iou", "max")
    assert list(ranked["candidate"]) == ["y", "x"]  # y's worst prompt (0.86) beats x's (0.70); z never finished
    assert list(ranked["worst silhouette_iou"]) == [0.86, 0.70] and list(ranked["trials"]) == [2, 2]
    assert rank_configurations(table, "janus_rate", "min") is None  # no such column
    assert "ranked by their worst silhouette_iou" in format_table(table, "silhouette_iou", "max")
    assert rank_configurations(table[table["prompt"] == "a"], "silhouette_iou", "max") is None  # one prompt


def test_several_seeds_get_a_mean_and_spread_per_configuration_and_prompt():
    import pandas as pd

    from dreamfusion_platform.sweep import across_seeds, format_table

    table = pd.DataFrame({
        "prompt": ["a"] * 4, "seed": [0, 1, 2, 0], "candidate": ["x", "x", "x", "y"], "status": "FINISHED",
        "janus_rate": [0.0, 0.5, 1.0, 0.25], "silhouette_iou": [0.9, 0.8, 0.7, 0.6]})
    summary = across_seeds(table, "janus_rate")
    x = summary[summary["candidate"] == "x"].iloc[0]
    assert x["seeds"] == 3 and x["janus_rate mean"] == pytest.approx(0.5) and x["janus_rate std"] == pytest.approx(0.5)
    assert x["silhouette_iou mean"] == pytest.approx(0.8)
    assert "over the seeds" in format_table(table, "janus_rate", "min")
    assert across_seeds(table[table["seed"] == 0], "janus_rate") is None


def test_a_local_sweep_refuses_resources_the_machine_cannot_give(tmp_path, monkeypatch):
    import torch

    from dreamfusion_platform.sweep import check_local_resources

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(UserInputError, match="this machine has no GPU") as caught:
        check_local_resources(parse_spec(spec(resources={"gpus": 1}), tmp_path))
    assert "resources: {gpus: 0}" in str(caught.value) and "--address" in str(caught.value)
    with pytest.raises(UserInputError, match="CPUs; set resources: {cpus:"):
        check_local_resources(parse_spec(spec(resources={"cpus": 4096}), tmp_path))
    check_local_resources(parse_spec(spec(resources={"cpus": 1, "gpus": 0}), tmp_path))


def test_the_sweep_cli_refuses_a_gpu_spec_on_a_machine_without_one_before_any_work(tmp_path):
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(spec(resources={"gpus": 1})))
    done = subprocess.run([sys.executable, "-m", "dreamfusion_platform.cli", "sweep", str(path), "--workspace",
                           str(tmp_path / "ws")], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2 and "this machine has no GPU" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "ws").exists()


def test_a_sweep_without_iterations_runs_the_library_default(tmp_path, monkeypatch):
    from dreamfusion.config import Config

    monkeypatch.setattr(Config, "iterations", 77)  # read when the spec is parsed, not copied from an old default
    parsed = parse_spec(spec(), tmp_path)
    assert parsed.iterations == 77 and parsed.trial_config({"prompt": "a red ball", "seed": 0}).iterations == 77


def test_prompts_match_the_synthetic_prior_loosely(tmp_path):
    parsed = parse_spec(spec(prompts=["  A RED   ball ", "a Blue Cube"]), tmp_path)
    assert parsed.prompts == ["a red ball", "a blue cube"]


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl", ".parquet"])
def test_prompt_files(tmp_path, suffix):
    prompts = ["a red ball", "a blue cube", "a head with a face"]
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".txt":
        path.write_text("# the list\n" + "\n".join(prompts) + "\n\n")
    elif suffix == ".csv":
        path.write_text("prompt,note\n" + "\n".join(f'"{p}",x' for p in prompts) + "\n")
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": prompts}), path)
    assert parse_spec(spec(prompts={"file": path.name}), tmp_path).prompts == prompts


BAD_SPECS = [
    ({"prompts": []}, "there are no prompts"),
    ({"prompts": ["a red ball", "A red ball"]}, "repeats prompt 1"),
    ({"prompts": ["a purple elephant"]}, "known prompts"),
    ({"prompts": ["a red ball\x00"]}, "control characters"),
    ({"prompts": ["x" * 2000]}, "2000 characters"),
    ({"prompts": [""]}, "is empty"),
    ({"prompts": [3]}, "is not text"),
    ({"prompts": {"file": "missing.txt"}}, "does not exist"),
    ({"prompts": {"file": "p.csv", "column": "text"}}, "has no column 'text'"),
    ({"name": "../escape"}, "not a plain name"),
    ({"colour": "red"}, "unknown field 'colour'"),
    ({"iterations": 0}, "iterations must be >= 1"),
    ({"iterations": "many"}, "iterations must be an integer"),
    ({"seeds": [-1]}, "seeds must be a list of integers >= 0"),
    ({"seeds": [1, 1]}, "repeat a value"),
    ({"resources": {"cpus": 0}}, "resources.cpus must be > 0"),
    ({"resources": {"gpus": 1.5}}, "resources.gpus must be a fraction"),
    ({"guidance": "dall-e"}, "guidance.backend must be one of"),
    ({"config": {"optim.lr": -0.1}}, "optim.lr must be a positive number"),
    ({"config": {"render.resoluton": 32}}, "unknown config key 'render.resoluton'"),
    ({"config": {"prompt": "a red ball"}}, "set by the sweep itself"),
    ({"overrides": ["optim.lr"]}, "is not key=value"),
    ({"search": {"algorithm": "bayes"}}, "search.algorithm 'bayes' is unknown"),
    ({"search": {"space": {"sds.guidance_scale": {"uniform": [30, 5]}}, "algorithm": "random"}},
     "low (30) must be < high (5)"),
    ({"search": {"space": {"optim.lr": {"loguniform": [0, 0.1]}}, "algorithm": "random"}},
     "loguniform low must be > 0"),
    ({"search": {"space": {"optim.lr": {"grid": [0.01, -0.01]}}}}, "value -0.01 is invalid"),
    ({"search": {"space": {"sds.guidance_scale": {"grid": [".nan"]}}}}, "is invalid"),
    ({"search": {"space": {"sds.guidance_scale": {"uniform": [5, 30]}}}}, "continuous but search.algorithm is grid"),
    ({"search": {"space": {"sds.guidance": {"grid": [5]}}}}, "is not a config key"),
    ({"search": {"space": {"seed": {"grid": [1, 2]}}}}, "cannot be searched"),
    ({"search": {"space": {"optim.lr": {"normal": [0, 1]}}}}, "must be one of"),
    ({"search": {"metric": "beauty"}}, "search.metric 'beauty' is unknown"),
    ({"scheduler": "hyperband"}, "scheduler.type 'hyperband' is unknown"),
    ({"search": {"algorithm": "optuna", "space": {"render.shading_ratios": {"choice": [[1, 0, 0], [0, 1, 0]]}}}},
     "which Optuna cannot suggest"),
    ({"scheduler": {"type": "asha", "grace_period": 10}, "iterations": 20, "report_every": 10},
     "leaves ASHA nothing to stop"),
    ({"search": {"metric": "clip_score"}}, "needs a CLIP model to judge with"),
    ({"scheduler": {"type": "asha", "metric": "clip_score_textureless"}}, "set config: {eval.clip_model"),
    ({"search": {"metric": "clip_r_precision"}, "config": {"eval.clip_model": "m"}},
     "computed once, at the end of the sweep"),
    ({"config": {"eval.clip_prompt_set": "d.txt"}}, "needs a CLIP model to rank with"),
    ({"config": {"eval.clip_model": "m", "eval.clip_prompt_set": "missing.txt"}}, "does not exist"),
    ({"config": {"eval.clip_model": "m", "eval.clip_prompt_set": "empty.txt"}}, "holds no prompts"),
    ({"config": {"eval.clip_model": "m", "eval.clip_prompt_set": "latin.txt"}}, "is not UTF-8"),
    ({"config": {"eval.clip_views": 0}}, "eval.clip_views must lie in"),
    ({"search": {"candidates": ["a", "b"]}}, "search.candidates must be a mapping"),
    ({"search": {"candidates": {"../x": {}}}}, "is not a plain name"),
    ({"search": {"candidates": {"a": {"optim.lrr": 0.1}}}}, "search.candidates.a.optim.lrr is not a config key"),
    ({"search": {"candidates": {"a": {"optim.lr": -1}}}}, "search.candidates.a is invalid"),
    ({"search": {"candidates": {"a": {"iterations": 9}}}}, "is set by the sweep itself"),
    ({"search": {"candidates": {"a": {"optim.lr": 0.01}, "b": {"optim": {"lr": 0.01}}}}},
     "sets the same values as search.candidates.a"),
    ({"search": {"candidates": {"a": {"optim.lr": 0.01}}, "space": {"optim.lr": {"grid": [0.1]}}}},
     "also in search.space"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_bad_specs_get_one_clear_line(tmp_path, fields, message):
    (tmp_path / "p.csv").write_text("prompt\na red ball\n")
    (tmp_path / "empty.txt").write_text("# none\n")
    (tmp_path / "latin.txt").write_bytes("a caf\xe9\n".encode("latin-1"))
    data = spec(**fields)
    if "name" in fields:
        data["name"] = fields["name"]
    with pytest.raises(UserInputError) as caught:
        parse_spec(yaml.safe_load(yaml.safe_dump(data)), tmp_path)
    text = str(caught.value)
    assert message in text and "\n" not in text


def test_malformed_and_non_utf8_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: s\nprompts: [a red ball\n")
    with pytest.raises(UserInputError, match="line 3"):
        load_spec(bad)
    bad.write_bytes(b"name: s\nprompts: ['\xff\xfe']\n")
    with pytest.raises(UserInputError, match="not UTF-8"):
        load_spec(bad)
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"a red ball\n\xff\n")
    with pytest.raises(UserInputError, match="not UTF-8"):
        parse_spec(spec(prompts={"file": "p.txt"}), tmp_path)
    with pytest.raises(UserInputError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "python.yaml").write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(UserInputError):  # safe_load refuses to build Python objects
        load_spec(tmp_path / "python.yaml")


def test_clip_score_is_searchable_on_any_backend_and_computed_at_reports_only_when_needed(tmp_path):
    (tmp_path / "distractors.txt").write_text("a cat\na red ball\n")
    clip = {"eval.clip_model": "openai/clip-vit-base-patch32", "eval.clip_prompt_set": "distractors.txt"}
    searched = parse_spec(spec(guidance={"backend": "stable-diffusion", "model": "m"}, config=clip,
                               search={"algorithm": "optuna", "space": {"optim.lr": {"loguniform": [0.001, 0.1]}}}),
                          tmp_path)
    assert (searched.metric, searched.mode) == ("clip_score", "max")  # the default where CLIP judges
    assert searched.needs_clip_each_report and not searched.needs_eval_each_report
    assert searched.config["eval.clip_prompt_set"] == str(tmp_path / "distractors.txt")  # absolute, for every node
    assert searched.rank_prompts("a blue cube") == ["a blue cube", "a red ball", "a cat"]
    asha = parse_spec(spec(config=clip, scheduler={"type": "asha", "metric": "clip_score"}, iterations=40,
                           report_every=10), tmp_path)
    assert asha.needs_clip_each_report and asha.metric == "silhouette_iou"
    grid = parse_spec(spec(config=clip, search={"metric": "clip_score"}), tmp_path)
    assert not grid.needs_clip_each_report  # grid search ranks the final results: nothing per report
    assert parse_spec(spec(guidance={"backend": "deepfloyd-if", "model": "m"}), tmp_path).metric == "loss"


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.text, self.tty = "", tty

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.tty


class _Trial:
    def __init__(self, status: str, trial_id: str = "t0") -> None:
        self.status, self.trial_id, self.config = status, trial_id, {"prompt": "a red ball"}
        self.error_file, self.num_failures = "/ws/ray/s/trial_t0/error.txt", 1


def _progress(tmp_path, tty: bool, **fields):
    from dreamfusion_platform.sweep import SweepProgress

    stream = _Stream(tty)
    return SweepProgress(parse_spec(spec(**fields), tmp_path), total=2, stream=stream), stream


def test_progress_in_a_log_is_a_line_per_change_not_per_step(tmp_path):
    progress, stream = _progress(tmp_path, tty=False)
    trials = [_Trial("RUNNING"), _Trial("PENDING", "t1")]
    for _ in range(50):  # Tune calls on_step_end many times a second
        progress.on_step_end(0, trials)
    assert stream.text.count("\n") == 1 and "0/2 done, 1 running, 0 failed" in stream.text
    trials[0].status = "TERMINATED"
    progress.on_step_end(0, trials)
    assert stream.text.count("\n") == 2 and "1/2 done" in stream.text.splitlines()[-1]
    progress.last_time -= 61  # a minute without change: one heartbeat line
    progress.on_step_end(0, trials)
    assert stream.text.count("\n") == 3


def test_progress_on_a_terminal_is_one_updating_line_and_warnings_stand_apart(tmp_path):
    progress, stream = _progress(tmp_path, tty=True)
    trials = [_Trial("RUNNING"), _Trial("PENDING", "t1")]
    for _ in range(20):
        progress.on_step_end(0, trials)
    assert "\n" not in stream.text and stream.text.count("\r") == 1
    progress.on_trial_recover(0, trials, trials[0])
    assert "failed and is retried from its last checkpoint (attempt 2 of 3)" in stream.text
    assert "error.txt" in stream.text.splitlines()[-1]


def test_pending_trials_say_what_they_wait_for(tmp_path, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 7.0})
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    progress, stream = _progress(tmp_path, tty=False, resources={"cpus": 1, "gpus": 1})
    waiting = [_Trial("PENDING"), _Trial("PENDING", "t1")]
    progress.on_step_end(0, waiting)
    assert "pending" not in stream.text  # trials are being placed
    progress.stalled_since -= 31
    progress.on_step_end(0, waiting)
    assert "2 pending, each needs 1 CPU, 1 GPU; free in the cluster: 7/8 CPU, 0/0 GPU" in stream.text


def test_refinement_keys_are_searchable_and_size_the_schedule():
    searched = parse_spec(spec(iterations=40, search={"space": {"refine.iterations": {"grid": [0, 30]},
                                                                 "refine.sdf_threshold": {"grid": [2.0, 5.0]}},
                                                      "metric": "chamfer"},
                               scheduler={"type": "asha", "metric": "chamfer"}), REPO)
    assert searched.most_refine_iterations == 30 and searched.mode == "min" and searched.scheduler_mode == "min"
    assert searched.needs_eval_each_report and searched.needs_mesh_each_report
    config = searched.trial_config({"prompt": "a red ball", "seed": 0, "refine.iterations": 30,
                                    "refine.sdf_threshold": 5.0})
    assert config.refine.iterations == 30 and config.refine.sdf_threshold == 5.0
    with pytest.raises(UserInputError, match="refine.t_min"):
        parse_spec(spec(config={"refine.t_min": 0.9}), REPO)


def test_a_spec_that_may_run_more_trials_at_once_than_sqlite_kept_up_with_is_warned_about(tmp_path):
    from dreamfusion_platform.sweep import SQLITE_HOLDS, concurrent_trials, sqlite_load_warning

    wide = parse_spec(spec(resources={"cpus": 1}), tmp_path)
    many = {"CPU": 4 * SQLITE_HOLDS}
    assert concurrent_trials(wide, 1000, many) == 4 * SQLITE_HOLDS
    warning = sqlite_load_warning(wide, 1000, many)
    assert warning and f"up to {4 * SQLITE_HOLDS} trials" in warning and "--tracking-uri" in warning
    # Fewer trials, a cap, fewer CPUs or GPU-bound trials: as many as the store kept up with, no warning.
    assert sqlite_load_warning(wide, SQLITE_HOLDS, many) is None
    assert sqlite_load_warning(parse_spec(spec(max_concurrent_trials=SQLITE_HOLDS), tmp_path), 1000, many) is None
    assert sqlite_load_warning(wide, 1000, {"CPU": SQLITE_HOLDS}) is None
    assert concurrent_trials(parse_spec(spec(resources={"cpus": 1, "gpus": 0.5}), tmp_path), 1000,
                             {"CPU": 512, "GPU": 8}) == 16


@pytest.mark.parametrize("arguments, message", [
    (["--trials", "0"], "--trials takes positive counts"),
    (["--trials", "eight"], "is not a ','-separated list"),
    (["--backends", "mysql"], "unknown tracking backend 'mysql'"),
    (["--seconds", "0"], "--seconds must be positive"),
])
def test_bench_tracking_rejects_bad_input_before_any_work(tmp_path, arguments, message):
    done = subprocess.run([sys.executable, "-m", "dreamfusion_platform.cli", "bench", "tracking", "--out",
                           str(tmp_path / "out"), *arguments], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
