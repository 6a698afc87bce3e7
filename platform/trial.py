"""One Ray Tune trial: one prompt × configuration, optimised in chunks of ``report_every`` steps.

After each chunk the trial reports its metrics to Tune with a checkpoint of the whole trainer, so a
killed trial is retried from there; the same metrics, step by step, go to the trial's MLflow run.
At the end it exports mesh, videos, viewer and previews, evaluates, and uploads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from dreamfusion.config import Config
from dreamfusion.export import render_progress_row
from dreamfusion.pipeline import (
    CHECKPOINT,
    SUMMARY,
    compute_metrics,
    finish_run,
    make_judge,
    mesh_if_any,
    warn_export_cost,
)
from dreamfusion.text_cache import TextEmbeddingCache
from dreamfusion.trainer import CheckpointError, Trainer, TrainerCallback
from dreamfusion_platform.spec import CANDIDATE, TRAINING_METRICS, SweepSpec
from dreamfusion_platform.tracking import TrialRun, retry, trial_environment
from dreamfusion_platform.workspace import CacheMirror

log = logging.getLogger(__name__)

VIEWS_IMAGE_KEY = "views"


@dataclasses.dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares; passed to trials through ``tune.with_parameters``."""

    spec: SweepSpec
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    cache_dir: str  # the workspace's text-embedding cache, warmed by the driver (a node-local copy for a bucket)
    cache_mirror: CacheMirror | None = None  # the embeddings in a bucket workspace, fetched into cache_dir


def trial_key(config: Config) -> str:
    """The identity of a trial: the hash of its full config (prompt, seed and every setting)."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:20]


def run_name(config: Config, key: str) -> str:
    return f"{config.prompt[:48]} · seed {config.seed} · {key[:6]}"


class ChunkMetrics(TrainerCallback):
    """A trainer callback: per-step metrics for MLflow, and their means over a chunk for Tune."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, float]]] = []

    def on_train_start(self, trainer: Trainer) -> None:
        self.steps = []

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.steps.append((trainer.step, metrics))

    def means(self) -> dict[str, float]:
        out = {}
        for key in TRAINING_METRICS:
            values = [m[key] for _, m in self.steps if math.isfinite(m[key])]
            out[key] = sum(values) / len(values) if values else float("nan")
        return out


class PhaseTag(TrainerCallback):
    """A trainer callback: the trial's phase (training, then mesh, texture, turntable, metrics, ..., done) as
    its MLflow run's ``dreamfusion.phase`` tag, set when the phase changes, so the dashboard shows where a
    trial is between its last report and its end."""

    def __init__(self, tracked: TrialRun) -> None:
        self.tracked = tracked
        self.phase = ""

    def on_train_start(self, trainer: Trainer) -> None:
        self._enter("training")

    def on_finish_phase(self, trainer: Trainer, phase: str, done: int, total: int) -> None:
        self._enter(phase)

    def _enter(self, phase: str) -> None:
        if phase != self.phase:
            self.phase = phase
            self.tracked.set_phase(phase)


def restore_newest_readable(trainer: Trainer, checkpoint) -> None:
    """Load Tune's latest checkpoint of this trial or, when it is corrupt or truncated, the newest one
    kept before it (``num_to_keep=2``); with none readable the trial starts again from step 0."""
    latest = Path(checkpoint.path)
    if latest.is_dir():  # shared or local storage: the older checkpoints lie beside it
        older = sorted((p for p in latest.parent.glob("checkpoint_*") if p.name < latest.name), reverse=True)
        candidates = [latest, *older]
    else:
        candidates = []
    for candidate in candidates:
        try:
            trainer.load_checkpoint(candidate / CHECKPOINT)
            return
        except (CheckpointError, FileNotFoundError) as exc:
            log.warning("checkpoint %s is unusable (%s); trying the one before it", candidate.name, exc)
    if not candidates:  # remote storage: Tune downloads the latest only
        with checkpoint.as_directory() as directory:
            try:
                trainer.load_checkpoint(Path(directory) / CHECKPOINT)
                return
            except (CheckpointError, FileNotFoundError) as exc:
                log.warning("checkpoint %s is unusable (%s)", checkpoint.path, exc)
    log.warning("no usable checkpoint: the trial starts again from step 0")


def run_trial(params: dict[str, Any], context: TrialContext) -> None:
    """The Tune trainable (function API)."""
    import ray
    import torch
    from ray import tune

    trial_environment()
    torch.set_num_threads(max(1, int(context.spec.cpus)))
    spec = context.spec
    config = spec.trial_config(params)
    key = trial_key(config)
    candidate = {CANDIDATE: params[CANDIDATE]} if CANDIDATE in params else {}
    node = {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
            "pid": str(os.getpid()), "gpu_ids": ",".join(map(str, ray.get_gpu_ids()))}
    tags = {"dreamfusion.prompt": config.prompt[:5000], **{f"dreamfusion.{k}": v for k, v in node.items()}}
    # A tracking server that is down when the trial starts is waited for (about two minutes) before failing.
    tracked = retry(lambda: TrialRun(context.tracking_uri, context.experiment_id, context.parent_run_id, key,
                                     run_name(config, key), {"trial_key": key, **candidate, **config.flat()}, tags),
                    attempts=12, wait=10.0, what="opening the trial's MLflow run")
    identity = {"mlflow_run_id": tracked.run_id, "artifact_uri": tracked.artifact_uri, "trial_key": key, **node}
    if tracked.finished_metrics is not None:
        # Finished before the driver died and lost track of it: report the result, do not rerun.
        tune.report({**tracked.finished_metrics, **identity,
                     "step": config.iterations + config.refine.iterations, "final": 1})
        return

    started = time.perf_counter()
    chunk = ChunkMetrics()
    text_cache = TextEmbeddingCache(Path(context.cache_dir), context.cache_mirror)
    trainer = Trainer(config, callbacks=[chunk, PhaseTag(tracked)], text_cache=text_cache)
    warn_export_cost(trainer, f"trial {key[:8]} ('{config.prompt[:40]}'): ")
    judge = make_judge(config, trainer.device, text_cache)
    rank_prompts = spec.rank_prompts(config.prompt) if judge is not None else None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        restore_newest_readable(trainer, checkpoint)
        tracked.client.set_tag(tracked.run_id, "dreamfusion.resumed_from_step", str(trainer.step))
    run_dir = Path(tune.get_context().get_trial_dir()) / "run"
    try:
        while trainer.step < trainer.total_iterations:
            trainer.train(until=trainer.step + spec.report_every)
            metrics: dict[str, Any] = {**chunk.means(), "step": trainer.step,
                                       "skipped_steps": trainer.skipped_steps}
            for step, values in chunk.steps:
                tracked.record(step, values)
            # The four-view colour strip, step by step: MLflow's image grid compares trials with it.
            tracked.record_image(VIEWS_IMAGE_KEY, trainer.step, render_progress_row(
                trainer.render_views, trainer.shading("albedo"), config.export.progress_resolution,
                with_opacity=False).numpy())
            final = trainer.step >= trainer.total_iterations
            if final:
                summary = finish_run(trainer, run_dir, time.perf_counter() - started, judge, rank_prompts)
                # Checkpoint, export and metrics: what a trial spends after its last step, beside the steps' time.
                finished = {**summary["metrics"], "post_training_seconds": summary["post_training_seconds"]}
                metrics.update(finished)
                tracked.record(trainer.step, finished)
                artifacts = [run_dir / name for name in summary["artifacts"].values()]
                tracked.log_artifacts([*artifacts, run_dir / SUMMARY])
                if summary["warnings"]:  # e.g. an empty scene: no mesh; visible in the dashboard's table
                    warnings = "; ".join(summary["warnings"])[:5000]
                    tracked.client.set_tag(tracked.run_id, "dreamfusion.warnings", warnings)
            elif spec.needs_eval_each_report or spec.needs_clip_each_report:
                mesh = mesh_if_any(trainer) if spec.needs_mesh_each_report else None
                quality = compute_metrics(trainer, mesh=mesh) if spec.needs_eval_each_report else {}
                if spec.needs_clip_each_report:
                    quality.update(judge.judge(trainer))
                metrics.update(quality)
                tracked.record(trainer.step, quality)
            tracked.flush()
            metrics["mlflow_backlog"] = len(tracked.pending)  # > 0 while the tracking server is unreachable
            with tempfile.TemporaryDirectory() as directory:
                trainer.save_checkpoint(Path(directory) / CHECKPOINT)
                tune.report({**metrics, **identity, "final": int(final)},
                            checkpoint=tune.Checkpoint.from_directory(directory))
    except BaseException:
        with contextlib.suppress(Exception):  # the trial's own error is the one to report
            tracked.finish("FAILED", attempts=2, wait=1.0)
        raise
    tracked.finish("FINISHED")
