"""One prompt end to end: train, checkpoint, export, evaluate, ``summary.json``.

Everything is written to a staging folder inside the output directory and moved into place only
when the run has finished, so a failed or interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import trimesh

from dreamfusion.clip_eval import ClipJudge, ranking_prompts
from dreamfusion.config import Config, resolve_device
from dreamfusion.errors import UserInputError
from dreamfusion.export import (
    render_previews,
    render_turntable,
    write_previews,
    write_progress,
    write_videos,
    write_viewer,
)
from dreamfusion.guidance import check_config
from dreamfusion.guidance.synthetic import SyntheticGuidance
from dreamfusion.mesh import (
    NoSurfaceError,
    bake_texture,
    extract_mesh,
    mesh_fidelity,
    refined_mesh,
    write_textured,
)
from dreamfusion.prior.synthetic import default_cache_dir
from dreamfusion.text_cache import TextEmbeddingCache
from dreamfusion.trainer import Trainer, TrainerCallback, read_checkpoint

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM}
CHECKPOINT = "checkpoint.pt"
ARTIFACT_KEYS = ("mesh_glb", "mesh_obj", "mesh_mtl", "texture_png", "mesh_ply", "video_webm", "video_gif",
                 "viewer_html", "renders_colour", "renders_textureless", "renders_normals", "progress", "checkpoint")


# Rays per turntable pixel: Trainer.render_views' default march.
TURNTABLE_SAMPLES_PER_RAY = 64
# The export's worst case beyond which a CPU run says what it will cost before it starts.
EXPORT_NOTE_SECONDS = 120.0
SMALLER_EXPORT = ("export.video_frames=24", "export.video_resolution=128", "export.mesh_resolution=128",
                  "export.texture_size=512")


def field_samples_per_second(field, device: torch.device, count: int = 1 << 15) -> float:
    """How many points the field evaluates per second here (density and albedo, no gradients)."""
    points = torch.rand(count, 3, device=device) * 2.0 - 1.0
    with torch.no_grad():
        field.log_density_and_albedo(points)  # warm-up: first-call allocations, kernel selection
        started = time.perf_counter()
        field.log_density_and_albedo(points)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return count / max(time.perf_counter() - started, 1e-9)


def export_cost_note(config: Config, samples_per_second: float, device: torch.device) -> str | None:
    """On a CPU, what the export after training costs at most (the turntable marched densely, every mesh
    cell and texel queried) when that exceeds ``EXPORT_NOTE_SECONDS``, with the keys that make it smaller;
    None otherwise. The real models' export defaults (``REAL_MODEL_EXPORT``) are sized for a GPU."""
    if device.type != "cpu":
        return None
    export = config.export
    samples = (export.video_frames * export.video_resolution**2 * TURNTABLE_SAMPLES_PER_RAY
               + export.mesh_resolution**3 + export.texture_size**2)
    seconds = samples / samples_per_second
    if seconds <= EXPORT_NOTE_SECONDS:
        return None
    return (f"the export after training will take up to {seconds / 60:.0f} min on this CPU (a "
            f"{export.video_frames}-frame {export.video_resolution}² turntable, a {export.mesh_resolution}³ mesh, "
            f"a {export.texture_size}² texture; the field evaluates {samples_per_second / 1e6:.1f} M samples/s "
            f"here); for a smaller one: " + " ".join(f"--set {item}" for item in SMALLER_EXPORT))


def warn_export_cost(trainer: Trainer, who: str = "") -> None:
    """``export_cost_note`` for ``trainer``, logged once at start; the field's speed is measured on a CPU
    only, where the note can apply."""
    if trainer.device.type != "cpu":
        return
    note = export_cost_note(trainer.config, field_samples_per_second(trainer.field, trainer.device), trainer.device)
    if note:
        log.warning("%s%s", who, note)


def prepare_output_dir(out: Path) -> Path:
    """Check that ``out`` can receive a run before any work starts."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} is a file; give a directory path")
    if (out / SUMMARY).exists():
        raise UserInputError(f"--out {out} already holds a finished run; choose a new directory or remove it")
    created = [p for p in [out, *out.parents] if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise UserInputError(f"cannot write to --out {out} ({exc.strerror}); choose a writable directory") from None
    finally:
        for path in created:  # deepest first: validation leaves no trace
            if path.exists() and not any(path.iterdir()):
                path.rmdir()
    return out


# Below these the exported mesh visibly departs from the renders. An exact mesh of a synthetic object scores
# 27-29 dB and IoU 0.97 at the eval cameras; its texture scrambled, under 15 dB (tests/test_mesh.py).
MESH_PSNR_WARNING = 20.0
MESH_IOU_WARNING = 0.85


def export_mesh(trainer: Trainer) -> trimesh.Trimesh:
    """The run's mesh as the export writes it (before texturing): the refined mesh itself after stage 2,
    otherwise marching cubes of the field's density; ``NoSurfaceError`` for an empty scene."""
    export = trainer.config.export
    if trainer.refiner is not None:
        return refined_mesh(trainer.field, trainer.refiner, export.min_component_share, export.max_faces)
    return extract_mesh(trainer.field, export.mesh_resolution, export.density_threshold, occupancy=trainer.occupancy,
                        min_component_share=export.min_component_share, max_faces=export.max_faces)


def export_artifacts(trainer: Trainer, directory: Path
                     ) -> tuple[dict[str, Path], list[str], dict[str, float], trimesh.Trimesh | None]:
    """The run's files in ``directory``, warnings about what could not be exported, the mesh's fidelity
    metrics (``mesh_psnr``, ``mesh_silhouette_iou``: the textured mesh against the field's albedo renders at
    the held-out cameras) and the mesh (None for an empty scene).

    A field that ended empty is a result, not a crash: a sweep records its metrics, videos and
    previews; only the mesh and the viewer, which need a surface, are left out.
    """
    from dreamfusion.evaluate import held_out_cameras

    cfg = trainer.config
    paths: dict[str, Path] = {}
    warnings: list[str] = []
    fidelity: dict[str, float] = {}
    mesh: trimesh.Trimesh | None = None
    trainer.report_phase("mesh")
    try:
        mesh = export_mesh(trainer)
    except NoSurfaceError as exc:
        warnings.append(f"no mesh or viewer exported: {exc}")
    else:
        trainer.report_phase("texture")
        textured = bake_texture(trainer.field, mesh, cfg.export.texture_size)
        paths.update(write_textured(textured, mesh, directory))
        paths["viewer_html"] = write_viewer(textured, directory / "viewer.html", cfg.prompt)
        trainer.report_phase("mesh fidelity")
        fidelity = mesh_fidelity(trainer.field, textured.trimesh(), held_out_cameras(), cfg.export.eval_resolution,
                                 cfg.export.eval_samples_per_ray, trainer.occupancy)
        if fidelity["mesh_psnr"] < MESH_PSNR_WARNING or fidelity["mesh_silhouette_iou"] < MESH_IOU_WARNING:
            warnings.append(f"the exported mesh departs from the renders (mesh_psnr {fidelity['mesh_psnr']:.1f} dB, "
                            f"mesh_silhouette_iou {fidelity['mesh_silhouette_iou']:.2f}): raise "
                            "export.mesh_resolution or export.texture_size, or lower export.density_threshold")
    frame_count = cfg.export.video_frames
    trainer.report_phase("turntable", 0, frame_count)
    frames = render_turntable(trainer.render_views, frame_count, cfg.export.video_resolution,
                              trainer.shading("lambertian"),
                              on_frames=lambda done: trainer.report_phase("turntable", done, frame_count))
    paths.update(write_videos(frames, directory, cfg.export.video_fps))
    trainer.report_phase("previews")
    previews = render_previews(trainer.render_views, trainer.shading, resolution=cfg.export.preview_resolution)
    paths.update(write_previews(previews, directory))
    if cfg.export.progress_snapshots:
        trainer.report_phase("progress.png")
        trainer.record_snapshot()  # the final state, as the last row
        paths["progress"] = write_progress(trainer.snapshots, directory / "progress.png")
    return paths, warnings, fidelity, mesh


def _quiet(phase: str) -> None:
    """No one to tell."""


def mesh_if_any(trainer: Trainer) -> trimesh.Trimesh | None:
    """``export_mesh``, or None for an empty scene."""
    try:
        return export_mesh(trainer)
    except NoSurfaceError:
        return None


def compute_metrics(trainer: Trainer, judge: ClipJudge | None = None, rank_prompts: list[str] | None = None,
                    mesh: trimesh.Trimesh | None = None, report_phase: Callable[[str], None] = _quiet
                    ) -> dict[str, float]:
    """The synthetic prior's metrics where the prompt is one of its objects, with the 3D accuracy (``chamfer``,
    ``fscore``) of the run's ``mesh`` when one is given; with a CLIP ``judge``, the CLIP scores too, and
    R-precision among ``rank_prompts`` (the run's own prompt among them). ``report_phase`` hears each part
    begin (``Trainer.report_phase`` after training)."""
    metrics: dict[str, float] = {}
    guidance = trainer.guidance
    if isinstance(guidance, SyntheticGuidance):
        report_phase("metrics")
        from dreamfusion.evaluate import evaluate_field, evaluate_views
        from dreamfusion.geometry import mesh_accuracy

        export = trainer.config.export
        if trainer.refiner is not None:  # the refined mesh is the result
            metrics.update(evaluate_views(trainer.render_views, trainer.config.prompt, guidance.prior,
                                          export.eval_resolution))
        else:
            metrics.update(evaluate_field(trainer.field, trainer.config.prompt, guidance.prior, trainer.occupancy,
                                          export.eval_resolution, export.eval_samples_per_ray))
        if mesh is not None:
            report_phase("3D accuracy")
            metrics.update(mesh_accuracy(trainer.config.prompt, mesh))
    if judge is not None:
        report_phase("CLIP judge")
        metrics.update(judge.judge(trainer, rank_prompts))
    return metrics


def make_judge(config: Config, device, text_cache: TextEmbeddingCache | None = None) -> ClipJudge | None:
    """The run's CLIP judge when ``eval.clip_model`` is set (loaded now: a bad model fails before training)."""
    if not config.eval.clip_model.strip():
        return None
    return ClipJudge.from_config(config, device, text_cache or TextEmbeddingCache(default_cache_dir()))


def warm_text_cache(config: Config, prompts: list[str], rank_prompts: list[str], cache: TextEmbeddingCache,
                    device) -> int:
    """Compute, once, every text embedding the runs of ``prompts`` will ask for: the guidance model's per-view
    embeddings (Stable Diffusion, DeepFloyd IF) and CLIP's features of ``rank_prompts``. Checks that the CLIP
    model loads. Returns how many texts were asked for."""
    texts = 0
    if config.eval.clip_model.strip():
        from dreamfusion.clip_eval import check_clip_model, clip_text_features

        check_clip_model(config.eval.clip_model)
        clip_text_features(config.eval.clip_model, rank_prompts, device, cache)
        texts += len(rank_prompts)
    if config.guidance.backend != "synthetic":
        from dreamfusion.guidance.diffusion import DeepFloydIFGuidance, StableDiffusionGuidance, prompt_texts

        backend = StableDiffusionGuidance if config.guidance.backend == "stable-diffusion" else DeepFloydIFGuidance
        guidance_texts = list(dict.fromkeys(t for prompt in prompts
                                            for t in prompt_texts(prompt, config.sds.negative_prompt).values()))
        backend.embed_texts(config.guidance.model, guidance_texts, device, cache)
        texts += len(guidance_texts)
    return texts


def run_prompt(
    config: Config,
    out: Path,
    callbacks: Sequence[TrainerCallback] = (),
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    out = prepare_output_dir(out)
    check_config(config)
    started = time.perf_counter()
    # The prompt set and the CLIP model are checked before any training.
    rank_prompts = ranking_prompts(config.prompt, [], config.eval.clip_prompt_set) if config.eval.clip_model else None
    text_cache = TextEmbeddingCache(cache_dir or default_cache_dir())
    judge = make_judge(config, resolve_device(config.device), text_cache)
    trainer = Trainer(config, callbacks=callbacks, cache_dir=cache_dir, text_cache=text_cache)
    warn_export_cost(trainer)
    trainer.train()
    return finish_run(trainer, out, time.perf_counter() - started, judge, rank_prompts)


def finish_run(trainer: Trainer, out: Path, wall_seconds: float, judge: ClipJudge | None = None,
               rank_prompts: list[str] | None = None) -> dict[str, Any]:
    """Checkpoint, export and evaluate a trained ``trainer`` into ``out`` (CLIP metrics with a ``judge``, see
    ``compute_metrics``); returns the summary.

    Everything goes to a staging folder first; ``summary.json`` is moved in last, so its presence
    marks a finished run and a failure leaves ``out`` as it was.
    """
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".incomplete-{os.getpid()}"
    try:
        shutil.rmtree(staging, ignore_errors=True)  # left by an earlier attempt with the same pid
        staging.mkdir()
        trainer.report_phase("occupancy grid")
        trainer.bring_grid_up_to_date()  # before the checkpoint: `dreamfusion eval` renders with the same grid
        trainer.report_phase("checkpoint")
        trainer.save_checkpoint(staging / CHECKPOINT)
        paths, export_warnings, fidelity, mesh = export_artifacts(trainer, staging)
        warnings = [*trainer.warnings, *export_warnings]
        paths["checkpoint"] = staging / CHECKPOINT
        metrics = {**compute_metrics(trainer, judge, rank_prompts, mesh, trainer.report_phase), **fidelity}
        post_training = time.perf_counter() - started
        summary = {
            "prompt": trainer.config.prompt,
            "config": trainer.config.to_dict(),
            "iterations": trainer.step,
            "skipped_steps": trainer.skipped_steps,
            "wall_seconds": wall_seconds + post_training,
            "post_training_seconds": post_training,
            "metrics": metrics,
            "artifacts": {key: path.name for key, path in paths.items()},
            "warnings": warnings,
        }
        (staging / SUMMARY).write_text(json.dumps(summary, indent=2))
        trainer.report_phase("done", 1, 1)
        for item in staging.iterdir():
            if item.name != SUMMARY:
                os.replace(item, out / item.name)
        os.replace(staging / SUMMARY, out / SUMMARY)  # last: its presence marks a finished run
        staging.rmdir()
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if out.exists() and not any(out.iterdir()):
            out.rmdir()
        if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRORS:
            raise UserInputError(f"writing the run to {out} failed ({exc.strerror}); nothing was left there: "
                                 "free some space or choose a writable --out, then run again") from None
        raise
    return summary


def load_run(directory: Path, cache_dir: Path | None = None) -> tuple[Trainer, dict[str, Any]]:
    directory = Path(directory)
    summary_path = directory / SUMMARY
    if not summary_path.exists():
        raise UserInputError(f"{directory} holds no {SUMMARY}; give the --out directory of a finished run")
    summary = json.loads(summary_path.read_text())
    config = Config.from_dict(summary["config"])
    trainer = Trainer(config, cache_dir=cache_dir)
    trainer.load_state_dict(read_checkpoint(directory / summary["artifacts"]["checkpoint"]))
    return trainer, summary


def evaluate_run(directory: Path, cache_dir: Path | None = None, clip_model: str | None = None,
                 prompt_set: Path | None = None) -> dict[str, float]:
    """Recompute a finished run's metrics from its checkpoint and update its summary. CLIP metrics with
    ``clip_model`` (or the run's own ``eval.clip_model``); R-precision among ``prompt_set`` (or the run's
    ``eval.clip_prompt_set``). Returns the summary's metrics: those recomputed and the export's mesh fidelity."""
    trainer, summary = load_run(directory, cache_dir)
    config = trainer.config
    if clip_model:
        config.eval.clip_model = clip_model
    if prompt_set:
        config.eval.clip_prompt_set = str(prompt_set)
    config.eval.validate()
    rank_prompts = ranking_prompts(config.prompt, [], config.eval.clip_prompt_set) if config.eval.clip_model else None
    judge = make_judge(config, trainer.device, TextEmbeddingCache(cache_dir or default_cache_dir()))
    mesh_file = summary["artifacts"].get("mesh_ply")
    # The 3D accuracy is the exported mesh's: read back, not extracted anew.
    mesh = trimesh.load(Path(directory) / mesh_file, process=False) if mesh_file else None
    metrics = compute_metrics(trainer, judge, rank_prompts, mesh)
    # The mesh's fidelity is the export's, not recomputed here: kept.
    summary["metrics"] = {**{k: v for k, v in summary["metrics"].items() if k.startswith("mesh_")}, **metrics}
    tmp = Path(directory) / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, Path(directory) / SUMMARY)
    return summary["metrics"]
