import json

import pytest

from dreamfusion import benchmarks
from dreamfusion.errors import UserInputError


def fake_metrics(prompt, overrides, iterations):
    metrics = {"silhouette_iou": 0.9, "psnr": 20.0, "r_precision_colour": 1.0, "r_precision_textureless": 0.5,
               "wall_seconds": 1.0}
    if prompt == "a head with a face":
        metrics.update(janus_rate=0.0, front_recall=1.0 if not overrides else 0.0)
    return metrics


def test_quality_writes_after_each_run_and_resumes(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="dreamfusion.benchmarks")
    calls = []

    def train(prompt, overrides, iterations):
        calls.append((prompt, tuple(overrides)))
        return fake_metrics(prompt, overrides, iterations)

    monkeypatch.setattr(benchmarks, "_train_and_evaluate", train)
    benchmarks.quality(tmp_path, prompts=["a head with a face", "a red ball"], iterations=5)
    assert calls[0] == ("a head with a face", ())
    assert ("a head with a face", ("sds.view_dependent=false",)) in calls
    assert ("a head with a face", ("sds.view_dependent=false", "sds.guidance_scale=7.5")) in calls
    assert ("a head with a face", ("guidance.prior_conditioning=view_label",)) in calls and len(calls) == 6
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert set(saved["runs"]["a head with a face"]) == {
        "default", "no_view_dependent", "no_view_dependent_guided", "view_labels", "no_textureless"}
    table = (tmp_path / "quality.md").read_text()
    assert "| a red ball | 0.900 |" in table and "a head with a face (no view-dependent conditioning) |" in table
    assert "a head with a face (no view-dependent conditioning, guidance 7.5) |" in table

    calls.clear()
    benchmarks.quality(tmp_path, prompts=["a head with a face", "a red ball", "a blue cube"], iterations=5)
    assert calls == [("a blue cube", ())]  # finished runs are kept, not rerun
    assert "quality run 1/1: a blue cube (default)" in caplog.text


def test_the_side_by_side_table_holds_both_stages_ratios_and_the_photos_offset(tmp_path, monkeypatch):
    def train(prompt, overrides, iterations):
        refined = {**fake_metrics(prompt, overrides, iterations), "chamfer": 0.03, "wall_seconds": 3.0}
        return {**refined, "stage1": {**fake_metrics(prompt, overrides, iterations), "chamfer": 0.06}}

    monkeypatch.setattr(benchmarks, "_train_and_evaluate", train)
    monkeypatch.setattr(benchmarks, "photos_surface_offset", lambda prompt, photos: 0.0487 if photos == "volume" else 0)
    monkeypatch.setattr(benchmarks, "truth_silhouette_iou", lambda prompt: 0.9)
    benchmarks.quality(tmp_path, prompts=["a red ball"], ablations=False, settings=["refine.iterations=2"])
    table = (tmp_path / "quality.md").read_text()
    assert "| a red ball | 0.0600 | 0.0300 | 0.50 | 0.0487 |" in table
    assert "| photos' offset |" in table and "| 1 | 3 | 3.00 |" in table and "| IoU of the truth |" in table
    assert "| 0.900 |" in table


def test_a_table_rewritten_without_new_runs_keeps_the_machine_that_measured_them(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmarks, "_train_and_evaluate", fake_metrics)
    benchmarks.quality(tmp_path, prompts=["a red ball"], ablations=False)
    saved = json.loads((tmp_path / "quality.json").read_text())
    saved["machine"].update(device="NVIDIA H200", date="2026-12-04")
    (tmp_path / "quality.json").write_text(json.dumps(saved))
    monkeypatch.setattr(benchmarks, "_train_and_evaluate", lambda *args: pytest.fail("nothing is to run"))
    benchmarks.quality(tmp_path, prompts=["a red ball"], ablations=False)
    assert "Measured 2026-12-04 on one NVIDIA H200 GPU beside" in (tmp_path / "quality.md").read_text()


def test_quality_settings_reach_every_run_and_a_change_of_them_starts_afresh(tmp_path, monkeypatch):
    calls = []

    def train(prompt, overrides, iterations):
        calls.append((prompt, tuple(overrides)))
        return fake_metrics(prompt, overrides[1:], iterations)

    monkeypatch.setattr(benchmarks, "_train_and_evaluate", train)
    benchmarks.quality(tmp_path, prompts=["a head with a face"], iterations=5, settings=["optim.lr=0.03"])
    assert ("a head with a face", ("optim.lr=0.03",)) in calls
    assert ("a head with a face", ("optim.lr=0.03", "sds.view_dependent=false")) in calls
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["settings"] == ["optim.lr=0.03"]
    command = "dreamfusion bench quality --iters 5 --prompts 'a head with a face' --set optim.lr=0.03"
    assert f"`{command}`" in (tmp_path / "quality.md").read_text() and saved["command"] == command

    calls.clear()
    benchmarks.quality(tmp_path, prompts=["a head with a face"], iterations=5, settings=["optim.lr=0.04"])
    assert len(calls) == 5  # other settings: nothing is reused

    with pytest.raises(UserInputError, match="unknown config key 'optim.nope'"):
        benchmarks.quality(tmp_path / "bad", prompts=["a red ball"], iterations=5, settings=["optim.nope=1"])
    assert not (tmp_path / "bad").exists()


def test_quality_reruns_what_was_measured_under_other_library_defaults(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(benchmarks, "_train_and_evaluate", lambda *args: calls.append(args) or fake_metrics(*args))
    benchmarks.quality(tmp_path, prompts=["a red ball"], iterations=5)
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["defaults"]["sds.guidance_scale"] == 1.0
    saved["defaults"]["sds.guidance_scale"] = 7.5  # as if measured before the default changed
    (tmp_path / "quality.json").write_text(json.dumps(saved))
    benchmarks.quality(tmp_path, prompts=["a red ball"], iterations=5)
    assert len(calls) == 2


def test_quality_records_every_option_that_shaped_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmarks, "_train_and_evaluate", fake_metrics)
    benchmarks.quality(tmp_path / "a", ablation_prompts=["a head with a face"], prompts=["a head with a face"])
    assert json.loads((tmp_path / "a" / "quality.json").read_text())["command"] == (
        "dreamfusion bench quality --prompts 'a head with a face' --ablation-prompts 'a head with a face'")
    benchmarks.quality(tmp_path / "b", ablations=False, prompts=["a red ball"], settings=["sds.guidance_scale=1"])
    assert json.loads((tmp_path / "b" / "quality.json").read_text())["command"] == (
        "dreamfusion bench quality --prompts 'a red ball' --no-ablations --set sds.guidance_scale=1")


def test_speed_times_every_case_and_writes_its_table(tmp_path):
    from tests.conftest import TINY

    refine = ("refine.resolution=16", "refine.grid_resolution=16")
    benchmarks.speed(tmp_path, repeats=1, samples=2**8, overrides=(*TINY, *refine), warmup_steps=2)
    results = json.loads((tmp_path / "speed.json").read_text())["results"]
    for key in ("field_forward_2^8_s", "field_normals_analytic_forward_backward_2^8_s",
                "field_normals_autograd_forward_backward_2^8_s", "sds_step_16px_albedo_occupancy_off_s",
                "sds_step_16px_lambertian_autograd_normals_occupancy_on_s"):
        assert results[key] > 0
    table = (tmp_path / "speed.md").read_text()
    assert "| SDS step, 16x16, batch 2, lambertian shading, occupancy on" in table
    assert "ratio autograd/analytic normals (lambertian step)" in table
    assert results["post_training_occupancy_on_s"] > 0 and "ratio off/on (after training)" in table
    assert results["refine_step_s"] > 0 and results["refine_visibility_s"] > 0
    assert "| refinement step, 16x16, batch 4" in table and "| its visibility pass (embree) |" in table


def test_guidance_benchmark_tables_each_case_with_its_machine(tmp_path, monkeypatch):
    """The cases' own processes are stood in for: the full-size UNet takes minutes on a CPU."""
    import subprocess

    from dreamfusion import bench_guidance

    run = subprocess.run

    def case_process(command, **kwargs):
        if command[1:3] != ["-m", "dreamfusion.bench_guidance"]:  # platform.processor() runs uname
            return run(command, **kwargs)
        case = json.loads(command[-1])
        result = {"model": case["model"], **case["setting"], "median_step_seconds": 1.5, "steps": case["steps"],
                  "peak_rss_gib": 2.0, "device": "cpu"}
        return subprocess.CompletedProcess(command, 0, stdout=json.dumps(result) + "\n", stderr="")

    monkeypatch.setattr(bench_guidance.subprocess, "run", case_process)
    results = bench_guidance.guidance(tmp_path, steps=2, models=["sd-1.5"])
    assert [r["checkpointing"] for r in results] == [s["checkpointing"] for s in bench_guidance.settings(
        bench_guidance.torch.device("cpu"))]
    saved = json.loads((tmp_path / "guidance.json").read_text())
    assert saved["machine"]["device"] == "cpu" and saved["command"] == "dreamfusion bench guidance --repeats 2"
    table = (tmp_path / "guidance.md").read_text()
    assert "CPU cores" in table and "| sd-1.5 | fp32 |" in table and "1.50 | 2.00 (peak_rss_gib) |" in table


def test_text_benchmark_cases_time_a_cold_and_a_warm_cache(tmp_path, tiny_sd):
    from dreamfusion import bench_text

    cold = bench_text.run_text_case("sd-2.1-base", str(tiny_sd), str(tmp_path / "cache"))
    warm = bench_text.run_text_case("sd-2.1-base", str(tiny_sd), str(tmp_path / "cache"))
    assert cold["texts"] == warm["texts"] == 6 and cold["peak_rss_gib"] > 0
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 6


def test_text_benchmark_tables_each_case_with_its_machine(tmp_path, monkeypatch):
    """The cases' own processes are stood in for: T5-XXL takes minutes and 10 GiB on a CPU."""
    from dreamfusion import bench_text

    def case_process(case):
        if case["kind"] == "text":
            return {"seconds": 9.0, "peak_rss_gib": 2.0, "texts": 6}
        if case["kind"] == "clip":
            return {"load_seconds": 1.0, "report_seconds": 2.0, "final_seconds": 2.5, "train_step_seconds": 0.1,
                    "views": 8, "resolution": 224, "prompts": 16}
        if case["kind"] == "startup":
            return {"seconds": 30.0, "seconds_to_trainer": 20.0, "peak_rss_gib": 9.5,
                    "peak_rss_gib_to_trainer": 6.0 if case["low_memory"] else 9.0}
        return {"seconds": 0.0, "peak_rss_gib": 0.5}

    monkeypatch.setattr(bench_text, "_subprocess", case_process)
    bench_text.text(tmp_path, repeats=2, models=["if-i-xl"])
    saved = json.loads((tmp_path / "text.json").read_text())
    assert saved["command"] == "dreamfusion bench text --repeats 2" and set(saved["results"]["encoders"]) == {"if-i-xl"}
    table = (tmp_path / "text.md").read_text()
    assert "| if-i-xl (T5EncoderModel, bf16) | cold |" in table and "| if-i-xl (T5EncoderModel, bf16) | warm |" in table
    assert "| each report that needs `clip_score` | 2.00 |" in table and "CPU cores" in table
    assert "start-up with full-size Stable Diffusion" not in table  # only with SD's own encoder
    bench_text.text(tmp_path, repeats=2, models=["sd-2.1-base"])
    table = (tmp_path / "text.md").read_text()
    assert "| cold, low-memory loading on | 20.0 | 6.00 | 30.0 | 9.50 |" in table
    assert "| warm, low-memory loading off | 20.0 | 9.00 | 30.0 | 9.50 |" in table


def test_startup_case_times_a_trial_to_its_first_step_in_its_own_process(tmp_path, tiny_sd):
    from dreamfusion import bench_text

    cache = str(tmp_path / "cache")
    cold = bench_text._subprocess({"kind": "startup", "model": str(tiny_sd), "cache": cache, "low_memory": False})
    warm = bench_text._subprocess({"kind": "startup", "model": str(tiny_sd), "cache": cache, "low_memory": True})
    for case in (cold, warm):
        assert 0 < case["seconds_to_trainer"] < case["seconds"]
        assert 0 < case["peak_rss_gib_to_trainer"] <= case["peak_rss_gib"]
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 6  # the cold start filled the cache
