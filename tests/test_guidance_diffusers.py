"""Real guidance backends on tiny random-weight models built with the real diffusers/transformers
classes, saved to a folder and loaded through the same code path as downloaded weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dreamfusion.cli import main
from dreamfusion.config import Config, apply_backend_defaults, apply_overrides
from dreamfusion.errors import UserInputError
from dreamfusion.guidance.diffusion import VIEW_SUFFIXES, DeepFloydIFGuidance, StableDiffusionGuidance
from dreamfusion.mesh import MESH_METRICS
from dreamfusion.sds import sds_loss
from dreamfusion.trainer import Trainer
from tests.conftest import TINY, views_of


def real_config(backend: str, model: Path, *overrides: str) -> Config:
    config = Config(prompt="a red ball")
    config.guidance.backend = backend
    apply_backend_defaults(config, set())
    return apply_overrides(config, [*TINY, f"guidance.model={model}", "iterations=4", *overrides])


@pytest.mark.parametrize("backend", ["stable-diffusion", "deepfloyd-if"])
def test_sds_step_trains_the_field_and_never_the_diffusion_model(backend, tiny_sd, tiny_if):
    model = tiny_sd if backend == "stable-diffusion" else tiny_if
    trainer = Trainer(real_config(backend, model))
    assert trainer.config.sds.guidance_scale == 100.0  # the paper's default for real models
    before = trainer.field.encoder.table.detach().clone()
    metrics = trainer.train_step()
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert trainer.field.encoder.table.grad is not None and trainer.field.encoder.table.grad.abs().sum() > 0
    assert not torch.equal(before, trainer.field.encoder.table.detach())
    frozen = [trainer.guidance.unet] + ([trainer.guidance.vae] if backend == "stable-diffusion" else [])
    for module in frozen:
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())


@pytest.mark.parametrize("backend", ["stable-diffusion", "deepfloyd-if"])
def test_text_embeddings_are_cached_per_view_and_the_encoder_freed(backend, tiny_sd, tiny_if):
    model = tiny_sd if backend == "stable-diffusion" else tiny_if
    guidance = (StableDiffusionGuidance if backend == "stable-diffusion" else DeepFloydIFGuidance)(
        real_config(backend, model))
    assert set(guidance.embeddings) == {None, "", *VIEW_SUFFIXES}
    assert not any(isinstance(v, torch.nn.Module) and "Text" in type(v).__name__ or "T5" in type(v).__name__
                   for v in vars(guidance).values())
    front, back = guidance.condition(views_of(["front", "back"]), 2)
    assert not torch.allclose(front, back)
    assert torch.equal(guidance.condition(None, 3)[2], guidance.embeddings[None])


def test_stable_diffusion_encodes_through_the_vae_with_gradients(tiny_sd):
    guidance = StableDiffusionGuidance(real_config("stable-diffusion", tiny_sd))
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    latents = guidance.encode(images)
    assert latents.shape == (2, 4, 8, 8)
    latents.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_latent_colour_warm_up_skips_the_vae(tiny_sd):
    guidance = StableDiffusionGuidance(real_config("stable-diffusion", tiny_sd, "guidance.latent_fraction=0.5"))
    calls = []
    guidance._encode_vae = lambda pixels: calls.append(1) or torch.zeros(1)
    early = guidance.encode(torch.rand(2, 3, 32, 32), progress=0.1)
    assert early.shape == (2, 4, 8, 8) and not calls


@pytest.mark.parametrize("mode", ["torch", "deepspeed"])
def test_activation_checkpointing_gives_the_same_gradients(tiny_sd, mode):
    images = torch.rand(2, 3, 16, 16)
    grads = {}
    for setting in ("off", mode):
        config = real_config("stable-diffusion", tiny_sd, f"guidance.checkpointing={setting}")
        guidance = StableDiffusionGuidance(config)
        pixels = images.clone().requires_grad_(True)
        guidance.encode(pixels).square().sum().backward()
        grads[setting] = pixels.grad
    torch.testing.assert_close(grads[mode], grads["off"], rtol=1e-5, atol=1e-6)


def test_automatic_checkpointing_is_torch_and_imports_no_deepspeed():
    """Auto takes torch's checkpointing (DeepSpeed's saved no memory on a GPU, and on a CPU it compiles a
    communication op in C++)."""
    import subprocess
    import sys

    code = ("import sys; from dreamfusion.memory import checkpointer, _torch_checkpoint; "
            "assert checkpointer('auto') is _torch_checkpoint; "
            "assert 'deepspeed' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_field_checkpointing_gives_the_same_gradients():
    from tests.conftest import tiny_config

    grads = []
    for setting in ("false", "true"):
        trainer = Trainer(apply_overrides(tiny_config("a red ball"), [f"field.checkpointing={setting}",
                                                                      "render.shading_ratios=0,1,0",
                                                                      "render.albedo_warmup_fraction=0"]))
        trainer.train_step()
        grads.append(trainer.field.encoder.table.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_sds_gradient_matches_the_classifier_free_guidance_formula(tiny_if):
    guidance = DeepFloydIFGuidance(real_config("deepfloyd-if", tiny_if))
    config = real_config("deepfloyd-if", tiny_if).sds
    images = torch.rand(1, 3, 16, 16, requires_grad=True)
    result = sds_loss(guidance, images, views_of(["side"]), config, 0.0, torch.Generator().manual_seed(0))
    result.loss.backward()
    assert images.grad.abs().sum() > 0 and result.gradient_norm > 0


def test_missing_weights_are_one_clear_error(tmp_path, monkeypatch, capsys):
    with pytest.raises(UserInputError, match="does not exist"):
        StableDiffusionGuidance(real_config("stable-diffusion", tmp_path / "nowhere"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserInputError, match="offline") as caught:
        DeepFloydIFGuidance(real_config("deepfloyd-if", Path("DeepFloyd/IF-I-XL-v1.0")))
    assert "--model" in str(caught.value)
    with pytest.raises(UserInputError, match="needs a model"):
        apply_overrides(Config(), ["guidance.backend=stable-diffusion"])
    code = main(["run", "a red ball", "--out", str(tmp_path / "run"), "--guidance", "stable-diffusion",
                 "--model", "someone/not-downloaded"])
    assert code == 2 and "huggingface-cli download" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_run_with_deepfloyd_if_from_the_cli(tmp_path, tiny_if):
    out = tmp_path / "run"
    overrides = [arg for item in TINY for arg in ("--set", item)]
    code = main(["run", "a red ball", "--out", str(out), "--guidance", "deepfloyd-if", "--model", str(tiny_if),
                 "--iters", "3", *overrides])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["sds"]["guidance_scale"] == 100.0
    assert set(summary["metrics"]) == set(MESH_METRICS)  # no synthetic ground truth: the mesh's fidelity alone
    assert (out / "mesh.glb").exists() and (out / "viewer.html").exists()


def test_field_under_bf16_autocast_trains():
    from tests.conftest import tiny_config

    trainer = Trainer(apply_overrides(tiny_config("a red ball"), ["render.autocast=bf16"]))
    for _ in range(3):
        metrics = trainer.train_step()
    assert torch.isfinite(torch.tensor(metrics["loss"])) and trainer.skipped_steps == 0
    with pytest.raises(UserInputError, match="needs a CUDA device"):
        Trainer(apply_overrides(tiny_config("a red ball"), ["render.autocast=fp16", "device=cpu"]))


def test_out_of_memory_names_the_knobs(monkeypatch):
    from tests.conftest import tiny_config

    trainer = Trainer(tiny_config("a red ball"))

    def exhausted():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "_train_step", exhausted)
    with pytest.raises(UserInputError) as caught:
        trainer.train_step()
    for knob in ("render.resolution", "render.batch_size", "guidance.checkpointing", "guidance.dtype"):
        assert knob in str(caught.value)


def test_stable_diffusion_runs_refinement_steps(tiny_sd):
    config = real_config("stable-diffusion", tiny_sd, "iterations=2", "refine.iterations=2", "refine.resolution=32",
                         "refine.grid_resolution=16", "refine.batch_size=1")
    assert Config().refine.resolution == 64 and real_config("stable-diffusion", tiny_sd).refine.resolution == 512
    trainer = Trainer(config)
    trainer.train()
    assert trainer.refiner is not None and trainer.step == 4
    assert trainer.refine_guidance is trainer.guidance  # the same model; only the synthetic prior re-renders
    assert trainer.refiner.sdf.grad is not None and trainer.refiner.sdf.grad.abs().sum() > 0


def test_a_real_backend_run_prints_our_lines_only_and_its_phases_after_training(tiny_sd, tmp_path):
    """Diffusers' advice to install accelerate and its float32 cast warning, DeepSpeed's accelerator line and
    its C++ build are gone (fixed at their causes); what follows the last step shows phase by phase."""
    import subprocess
    import sys

    overrides = [arg for item in [*TINY, "export.texture_size=64"] for arg in ("--set", item)]
    done = subprocess.run([sys.executable, "-m", "dreamfusion_platform.cli", "run", "a hamburger", "--guidance",
                           "stable-diffusion", "--model", str(tiny_sd), "--iters", "2", "--out", str(tmp_path / "run"),
                           *overrides], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line.strip() for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith(("a hamburger", "warning: the exported mesh"))]
    assert ours == lines, [line for line in lines if line not in ours]
    for phase in ("occupancy grid", "mesh", "turntable", "previews"):
        assert any(line.startswith(f"a hamburger [{phase}]: 100%") for line in lines), phase


def test_a_cpu_run_says_what_the_real_model_export_will_cost_before_training():
    from dreamfusion.config import REAL_MODEL_EXPORT
    from dreamfusion.pipeline import export_cost_note

    config = apply_overrides(Config(prompt="a hamburger"), [f"{k}={v}" for k, v in REAL_MODEL_EXPORT.items()])
    note = export_cost_note(config, 1e6, torch.device("cpu"))
    # 120 frames of 512² pixels, 64 samples each, a 256³ mesh and a 1024² texture: 2,031 M samples at 1 M/s.
    assert note.startswith("the export after training will take up to 34 min on this CPU (a 120-frame 512² turntable")
    assert "--set export.video_frames=24 --set export.video_resolution=128" in note
    assert export_cost_note(config, 1e6, torch.device("cuda")) is None  # sized for a GPU
    assert export_cost_note(Config(prompt="a red ball"), 1e6, torch.device("cpu")) is None  # the synthetic sizes


def test_a_short_real_backend_run_never_marches_densely_after_training(tiny_sd, tmp_path):
    """Three steps leave the grid inside its warm-up; after training every render marches only what the
    grid, rebuilt from the field, holds: all of the post-training work evaluates fewer samples than its
    turntable alone would march densely (counted, not timed)."""
    from dreamfusion.pipeline import TURNTABLE_SAMPLES_PER_RAY, finish_run

    config = real_config("stable-diffusion", tiny_sd, "iterations=3", "export.video_frames=8",
                         "export.video_resolution=64", "export.mesh_resolution=48", "export.texture_size=128")
    trainer = Trainer(config)
    trainer.train()
    evaluated = []
    field_query = trainer.field.log_density_and_albedo
    trainer.field.log_density_and_albedo = lambda points: evaluated.append(len(points)) or field_query(points)
    finish_run(trainer, tmp_path / "run", 0.0)
    dense_turntable = 8 * 64 * 64 * TURNTABLE_SAMPLES_PER_RAY
    assert sum(evaluated) < dense_turntable, (sum(evaluated), dense_turntable)
