"""One prompt end to end: train, checkpoint, export, evaluate, ``summary.json``.

Everything is written to a staging folder inside the output directory and moved into place only
when the run has finished, so a failed or interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dreamfusion.config import Config
from dreamfusion.errors import UserInputError
from dreamfusion.export import (
    NoSurfaceError,
    extract_mesh,
    render_previews,
    render_turntable,
    write_meshes,
    write_previews,
    write_progress,
    write_videos,
    write_viewer,
)
from dreamfusion.guidance.synthetic import SyntheticGuidance
from dreamfusion.trainer import Trainer, TrainerCallback, read_checkpoint

SUMMARY = "summary.json"
_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM}
CHECKPOINT = "checkpoint.pt"
ARTIFACT_KEYS = ("mesh_glb", "mesh_obj", "mesh_ply", "video_webm", "video_gif", "viewer_html",
                 "renders_colour", "renders_textureless", "renders_normals", "progress", "checkpoint")


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


def export_artifacts(trainer: Trainer, directory: Path) -> tuple[dict[str, Path], list[str]]:
    """The run's files in ``directory``, and warnings about what could not be exported.

    A field that ended empty is a result, not a crash: a sweep records its metrics, videos and
    previews; only the mesh and the viewer, which need a surface, are left out.
    """
    cfg = trainer.config
    paths: dict[str, Path] = {}
    warnings: list[str] = []
    try:
        mesh = extract_mesh(trainer.field, cfg.export.mesh_resolution, cfg.export.density_threshold)
    except NoSurfaceError as exc:
        warnings.append(f"no mesh or viewer exported: {exc}")
    else:
        paths.update(write_meshes(mesh, directory))
        paths["viewer_html"] = write_viewer(mesh, directory / "viewer.html", cfg.prompt)
    frames = render_turntable(trainer.field, cfg.export.video_frames, cfg.export.video_resolution,
                              trainer.shading("lambertian"),
                              occupancy=trainer.occupancy)
    paths.update(write_videos(frames, directory, cfg.export.video_fps))
    previews = render_previews(trainer.field, trainer.shading, resolution=cfg.export.preview_resolution,
                               occupancy=trainer.occupancy)
    paths.update(write_previews(previews, directory))
    if cfg.export.progress_snapshots:
        trainer.record_snapshot()  # the final state, as the last row
        paths["progress"] = write_progress(trainer.snapshots, directory / "progress.png")
    return paths, warnings


def compute_metrics(trainer: Trainer) -> dict[str, float]:
    """The synthetic prior's metrics where the prompt is one of its objects; none otherwise."""
    guidance = trainer.guidance
    if not isinstance(guidance, SyntheticGuidance):
        return {}
    from dreamfusion.evaluate import evaluate_field

    export = trainer.config.export
    return evaluate_field(trainer.field, trainer.config.prompt, guidance.prior, trainer.occupancy,
                          export.eval_resolution, export.eval_samples_per_ray)


def run_prompt(
    config: Config,
    out: Path,
    callbacks: Sequence[TrainerCallback] = (),
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    out = prepare_output_dir(out)
    config.validate()
    started = time.perf_counter()
    trainer = Trainer(config, callbacks=callbacks, cache_dir=cache_dir)
    trainer.train()
    return finish_run(trainer, out, time.perf_counter() - started)


def finish_run(trainer: Trainer, out: Path, wall_seconds: float) -> dict[str, Any]:
    """Checkpoint, export and evaluate a trained ``trainer`` into ``out``; returns the summary.

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
        trainer.save_checkpoint(staging / CHECKPOINT)
        paths, warnings = export_artifacts(trainer, staging)
        paths["checkpoint"] = staging / CHECKPOINT
        metrics = compute_metrics(trainer)
        summary = {
            "prompt": trainer.config.prompt,
            "config": trainer.config.to_dict(),
            "iterations": trainer.step,
            "skipped_steps": trainer.skipped_steps,
            "wall_seconds": wall_seconds + time.perf_counter() - started,
            "metrics": metrics,
            "artifacts": {key: path.name for key, path in paths.items()},
            "warnings": warnings,
        }
        (staging / SUMMARY).write_text(json.dumps(summary, indent=2))
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
    """Recompute a finished run's metrics from its checkpoint and update its summary; with a CLIP
    model and a prompt set, add CLIP R-precision."""
    if clip_model and not prompt_set:
        raise UserInputError("--clip needs --prompt-set FILE: the prompts (one per line) to rank the run's among")
    trainer, summary = load_run(directory, cache_dir)
    metrics = compute_metrics(trainer)
    if clip_model:
        from dreamfusion.clip_eval import clip_r_precision, read_prompt_set

        metrics.update(clip_r_precision(trainer, read_prompt_set(prompt_set, trainer.config.prompt), clip_model))
    summary["metrics"] = metrics
    tmp = Path(directory) / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, Path(directory) / SUMMARY)
    return metrics
