"""The per-prompt SDS optimiser: a trainer that can be stepped, checkpointed and restored.

It knows nothing of Ray or MLflow: drivers observe it through ``TrainerCallback``.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dreamfusion.cameras import CameraBatch, sample_cameras, view_condition
from dreamfusion.config import Config, resolve_device
from dreamfusion.dmtet import face_neighbours
from dreamfusion.errors import UserInputError
from dreamfusion.export import render_progress_row
from dreamfusion.field import NeRFField
from dreamfusion.guidance import Guidance, make_guidance
from dreamfusion.memory import out_of_memory_message
from dreamfusion.rasterizer import resolve_visibility
from dreamfusion.refine import EmptySceneError, MeshRefiner, render_mesh
from dreamfusion.renderer import (
    SHADING_MODES,
    OccupancyGrid,
    RenderOutput,
    Shading,
    concatenated_on_cpu,
    render,
    render_batched_shadings,
)
from dreamfusion.sds import sds_loss
from dreamfusion.text_cache import TextEmbeddingCache
from triton_kernels import BackendUnavailable
from triton_kernels import resolve as resolve_backend

CHECKPOINT_FORMAT = 1
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: truncated, corrupted, or from another configuration."""


# Updates of the occupancy grid after which it follows the field (with the warm-up, see bring_grid_up_to_date).
MIN_GRID_UPDATES = 4


class TrainerCallback:
    """Hooks a driver (CLI progress bar, Ray Tune, MLflow) implements; all are optional."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...

    def on_finish_phase(self, trainer: Trainer, phase: str, done: int, total: int) -> None:
        """After the last step (``pipeline.finish_run``): ``done`` of ``total`` units of ``phase`` (frames of
        the turntable; 0 of 1 as any other phase begins)."""


class Trainer:
    def __init__(
        self,
        config: Config,
        guidance: Guidance | None = None,
        callbacks: Sequence[TrainerCallback] = (),
        cache_dir: Path | None = None,
        text_cache: TextEmbeddingCache | None = None,
    ) -> None:
        self.config = config.validate()
        self.device = resolve_device(config.device)
        if config.render.autocast == "fp16" and self.device.type == "cpu":
            raise UserInputError("render.autocast=fp16 needs a CUDA device; on the CPU use render.autocast=bf16")
        try:  # fail before any work when the kernel backend cannot run here
            resolve_backend(config.field.backend, self.device)
        except BackendUnavailable as exc:
            raise UserInputError(str(exc)) from None
        if config.refine.iterations:
            try:  # a visibility backend this machine lacks fails now, not when stage 1 is over
                resolve_visibility(config.refine.visibility, self.device)
            except ValueError as exc:
                raise UserInputError(f"refine.visibility: {exc}; use refine.visibility=auto or torch") from None
        # Parameter initialisation draws from the global RNG; seed it so a run is a function of its seed.
        torch.manual_seed(config.seed)
        self.field = NeRFField(config.field).to(self.device)
        self.guidance = (guidance or make_guidance(config, cache_dir, text_cache)).to(self.device)
        self.occupancy = (
            OccupancyGrid(config.render.occupancy_resolution, config.render.occupancy_threshold,
                          2.0 / config.render.samples_per_ray).to(self.device)
            if config.render.occupancy_grid
            else None
        )
        self.optimizer = torch.optim.Adam(
            self.field.parameter_groups(config.optim.lr, config.optim.mlp_lr_ratio),
            betas=config.optim.betas,
            eps=1e-15,
            weight_decay=config.optim.weight_decay,
        )
        final_ratio = config.optim.lr_final_ratio
        iterations = config.iterations
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: final_ratio ** min(step / iterations, 1.0)
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.callbacks = list(callbacks)
        self.step = 0
        self.skipped_steps = 0
        total = self.total_iterations
        snapshots = config.export.progress_snapshots
        self.snapshot_steps = {total * k // snapshots for k in range(snapshots)} if snapshots else set()
        self.snapshots: list[tuple[int, torch.Tensor]] = []  # (step, progress.png row), checkpointed
        # Stage 2 (refine.iterations > 0): built at its first step, from the field as stage 1 left it.
        self._cache_dir, self._text_cache = cache_dir, text_cache
        self.refiner: MeshRefiner | None = None
        self.refine_optimizer: torch.optim.Optimizer | None = None
        self.refine_guidance: Guidance | None = None
        self.warnings: list[str] = []  # e.g. refinement skipped on an empty scene; checkpointed

    @property
    def progress(self) -> float:
        """Stage 1's share done: what its schedules (timesteps, albedo warm-up) follow."""
        return min(self.step / self.config.iterations, 1.0)

    @property
    def total_iterations(self) -> int:
        """Both stages' steps: ``iterations`` of the field, then ``refine.iterations`` of the mesh."""
        return self.config.iterations + self.config.refine.iterations

    @property
    def stage(self) -> str:
        return "coarse" if self.step < self.config.iterations else "refine"

    def _shading_for_step(self) -> Shading:
        render_cfg = self.config.render
        ratios = torch.tensor(render_cfg.shading_ratios, dtype=torch.float64)
        draw = int(torch.multinomial(ratios, 1, generator=self.generator))
        mode = "albedo" if self.progress < render_cfg.albedo_warmup_fraction else SHADING_MODES[draw]
        return self.shading(mode)

    def shading(self, mode: str) -> Shading:
        r = self.config.render
        return Shading(mode, r.ambient, r.diffuse, r.textureless_albedo)

    def train_step(self) -> dict[str, float]:
        try:
            return self._train_step()
        except torch.OutOfMemoryError as exc:
            self.optimizer.zero_grad(set_to_none=True)
            raise UserInputError(out_of_memory_message(exc, self.config)) from None

    def _train_step(self) -> dict[str, float]:
        if self.step >= self.config.iterations:
            return self._refine_step()
        started = time.perf_counter()
        cfg = self.config
        if self.occupancy is not None and self.step % cfg.render.occupancy_update_every == 0:
            self.occupancy.update(self.field, self.generator, cfg.field.backend)
        if self.step in self.snapshot_steps:
            self.record_snapshot()
        shading = self._shading_for_step()
        cameras = sample_cameras(cfg.camera, cfg.render.batch_size, self.generator)
        # Perp-Neg needs each render's view for its negatives even where the positive has no view condition.
        views = view_condition(cameras, cfg.camera) if cfg.sds.view_dependent or cfg.sds.perp_neg else None
        with torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES.get(cfg.render.autocast),
                            enabled=cfg.render.autocast != "off"):
            output = render(
                self.field, cameras, cfg.render.resolution, cfg.render.samples_per_ray, shading,
                self.occupancy if self.step >= cfg.render.occupancy_warmup_steps else None,
                self.generator, cfg.field.backend,
            )
        textureless = shading.mode == "textureless"
        sds = sds_loss(self.guidance, output.rgb.float(), views, cfg.sds, self.progress, self.generator, textureless)
        # Regularisers are summed per image, like the SDS surrogate, so their weights do not depend on
        # the render resolution and compare directly with the SDS gradient per pixel.
        batch = output.opacity.shape[0]
        opacity = output.opacity.clamp(1e-5, 1 - 1e-5)
        opacity_reg = torch.sqrt(opacity**2 + 0.01).sum() / batch
        entropy = -(opacity * opacity.log() + (1 - opacity) * (1 - opacity).log()).sum() / batch
        pixels = opacity[0].numel()
        loss = (
            sds.loss
            + cfg.sds.lambda_orientation * output.orientation_loss * pixels
            + cfg.sds.lambda_opacity * opacity_reg
            + cfg.sds.lambda_entropy * entropy
        )
        finite = self._optimise(loss, self.optimizer, cfg.optim.grad_clip)
        self.scheduler.step()
        self.step += 1
        metrics = {
            "loss": float(loss.detach()) if finite else float("nan"),
            "sds_loss": float(sds.loss.detach()),
            "sds_gradient_norm": sds.gradient_norm,
            "orientation_loss": float(output.orientation_loss.detach()),
            "opacity_mean": float(output.opacity.detach().mean()),
            "timestep": sds.timestep,
            "lr": self.scheduler.get_last_lr()[0],
            "sample_fraction": output.samples_evaluated / output.samples_total,
            # The density-only early-termination pass's share (0 without the grid).
            "probe_fraction": output.samples_probed / output.samples_total,
            "occupied_fraction": self.occupancy.occupied_fraction if self.occupancy is not None else 1.0,
            "skipped_steps": float(self.skipped_steps),
            "shading": float(SHADING_MODES.index(shading.mode)),
            "stage": 1.0,
            "step_seconds": time.perf_counter() - started,
        }
        for callback in self.callbacks:
            callback.on_step_end(self, metrics)
        return metrics

    def _optimise(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, grad_clip: float = 0.0) -> bool:
        """Backward and an optimiser step; False when the loss or a gradient is not finite."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        finite = math.isfinite(float(loss.detach())) and all(
            bool(torch.isfinite(p.grad).all()) for p in parameters if p.grad is not None)
        if not finite:
            # NaN guard: a poisoned step is skipped (and counted) rather than written into the weights.
            optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            return False
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        optimizer.step()
        return True

    # --- stage 2: the mesh ---------------------------------------------------------------------------

    def _start_refinement(self) -> bool:
        """Build the mesh stage from the field; False (with a warning) when the scene is empty."""
        cfg = self.config
        try:
            refiner = MeshRefiner.from_field(self.field, cfg.refine, cfg.export.density_threshold)
        except EmptySceneError as exc:
            self.warnings.append(f"refinement skipped: {exc}")
            return False
        self._build_refinement(refiner.to(self.device))
        return True

    def _build_refinement(self, refiner: MeshRefiner) -> None:
        cfg = self.config.refine
        self.refiner = refiner
        self.refine_optimizer = torch.optim.Adam(
            [{"params": [refiner.sdf], "lr": cfg.lr_sdf}, {"params": [refiner.deform], "lr": cfg.lr_deform},
             {"params": list(self.field.parameters()), "lr": cfg.lr_texture}], betas=(0.9, 0.99), eps=1e-15)
        self.refine_guidance = self._refine_guidance()

    def _refine_guidance(self) -> Guidance:
        """The guidance of stage 2: the same model; on the synthetic prior, its photos at the refinement's
        resolution and of ``refine.prior_photos``' kind, so the finer renders are judged at their own detail."""
        cfg = self.config
        finer = copy.deepcopy(cfg)
        finer.guidance.prior_resolution = cfg.refine.resolution
        finer.guidance.prior_photos = cfg.refine.prior_photos
        if cfg.guidance.backend != "synthetic" or finer.guidance == cfg.guidance:
            return self.guidance
        return make_guidance(finer, self._cache_dir, self._text_cache).to(self.device)

    @property
    def refine_progress(self) -> float:
        return min(max(self.step - self.config.iterations, 0) / max(self.config.refine.iterations, 1), 1.0)

    def _refine_step(self) -> dict[str, float]:
        started = time.perf_counter()
        cfg = self.config
        if self.refiner is None and not self._start_refinement():
            self.step = self.total_iterations  # nothing to refine: the run ends with stage 1's result
            return {"stage": 2.0, "skipped_steps": float(self.skipped_steps)}
        assert self.refiner is not None and self.refine_optimizer is not None and self.refine_guidance is not None
        if self.step in self.snapshot_steps:
            self.record_snapshot()
        shading = self._shading_for_step()  # stage 1's draw; its albedo warm-up is long over
        cameras = sample_cameras(cfg.camera, cfg.refine.batch_size, self.generator)
        views = view_condition(cameras, cfg.camera) if cfg.sds.view_dependent or cfg.sds.perp_neg else None
        mesh = self.refiner.mesh()
        if mesh.faces.shape[0] == 0:
            raise UserInputError("the refined mesh vanished (its SDF is positive everywhere): lower refine.lr_sdf")
        neighbours = face_neighbours(mesh.faces)  # the mesh's topology, for the antialias and the regularisers
        [output] = render_mesh(self.field, mesh, cameras, cfg.refine.resolution, (shading,), cfg.refine.visibility,
                               neighbours)
        sds_config = dataclasses.replace(cfg.sds, t_min=cfg.refine.t_min, t_max=cfg.refine.t_max,
                                         t_max_final=cfg.refine.t_max)
        sds = sds_loss(self.refine_guidance, output.rgb.float(), views, sds_config, self.refine_progress,
                       self.generator, shading.mode == "textureless")
        regularisers = self.refiner.regularisers(mesh, neighbours)
        # Regularisers are weighted per image as stage 1's are: against an SDS surrogate summed over pixels.
        pixels = cfg.refine.resolution**2
        loss = (sds.loss + pixels * (cfg.refine.lambda_normal_consistency * regularisers["normal_consistency"]
                                     + cfg.refine.lambda_laplacian * regularisers["laplacian"]))
        finite = self._optimise(loss, self.refine_optimizer)
        self.step += 1
        metrics = {
            "loss": float(loss.detach()) if finite else float("nan"),
            "sds_loss": float(sds.loss.detach()),
            "sds_gradient_norm": sds.gradient_norm,
            "opacity_mean": float(output.opacity.detach().mean()),
            "timestep": sds.timestep,
            "normal_consistency": float(regularisers["normal_consistency"].detach()),
            "laplacian": float(regularisers["laplacian"].detach()),
            "mesh_faces": float(mesh.faces.shape[0]),
            "skipped_steps": float(self.skipped_steps),
            "shading": float(SHADING_MODES.index(shading.mode)),
            "stage": 2.0,
            "step_seconds": time.perf_counter() - started,
        }
        for callback in self.callbacks:
            callback.on_step_end(self, metrics)
        return metrics

    def render_views(self, cameras: CameraBatch, resolution: int, shadings: tuple[Shading, ...],
                     samples_per_ray: int = 64) -> list[RenderOutput]:
        """The result as it stands, without gradients: the refined mesh once stage 2 has begun, the field
        before (marched with its occupancy grid, shaded once per pixel)."""
        with torch.no_grad():
            if self.refiner is not None:
                return [concatenated_on_cpu([output]) for output in render_mesh(
                    self.field, self.refiner.mesh(), cameras, resolution, shadings, self.config.refine.visibility)]
            return render_batched_shadings(self.field, cameras, resolution, samples_per_ray, shadings,
                                           self.occupancy, deferred=True)

    def bring_grid_up_to_date(self) -> bool:
        """Before a run's results are rendered: a grid that has not converged (the run ended inside its
        warm-up, or after too few updates) still holds the decayed initial blob, so the exports would march
        space the field has left; it is rebuilt from the field's density now. Returns whether it was."""
        render = self.config.render
        converged_after = max(render.occupancy_warmup_steps, MIN_GRID_UPDATES * render.occupancy_update_every)
        if self.occupancy is None or self.refiner is not None or self.step >= converged_after:
            return False
        self.occupancy.refresh(self.field, self.generator, self.config.field.backend)
        return True

    def report_phase(self, phase: str, done: int = 0, total: int = 1) -> None:
        for callback in self.callbacks:
            callback.on_finish_phase(self, phase, done, total)

    def record_snapshot(self) -> None:
        """A row of ``progress.png``: albedo and opacity at fixed cameras, now."""
        if not self.snapshots or self.snapshots[-1][0] != self.step:
            row = render_progress_row(self.render_views, self.shading("albedo"),
                                      self.config.export.progress_resolution)
            self.snapshots.append((self.step, row))

    def train(self, until: int | None = None) -> None:
        """Run steps until ``until`` (default: both stages' iterations)."""
        total = self.total_iterations
        stop = total if until is None else min(until, total)
        for callback in self.callbacks:
            callback.on_train_start(self)
        while self.step < stop:
            self.train_step()
        for callback in self.callbacks:
            callback.on_train_end(self)

    # --- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "field": self.field.state_dict(),
            "occupancy": self.occupancy.state_dict() if self.occupancy is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "snapshot_steps": torch.tensor([step for step, _ in self.snapshots], dtype=torch.long),
            "snapshots": [row for _, row in self.snapshots],
            "warnings": list(self.warnings),
            "refine": ({"geometry": self.refiner.state_dict(), "grid": self.refiner.extra_state(),
                        "optimizer": self.refine_optimizer.state_dict()}
                       if self.refiner is not None and self.refine_optimizer is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any], strict_config: bool = True) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
        saved = json.loads(state["config"])
        mine = json.loads(json.dumps(self.config.to_dict()))
        if strict_config and _architecture(saved) != _architecture(mine):
            raise CheckpointError("checkpoint was written with a different field or render configuration")
        self.field.load_state_dict(state["field"])
        if self.occupancy is not None and state["occupancy"]:
            self.occupancy.load_state_dict(state["occupancy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        # Checkpoints written before progress snapshots existed have none.
        self.snapshots = list(zip(state.get("snapshot_steps", torch.empty(0)).tolist(),
                                  state.get("snapshots", []), strict=True))
        self.warnings = list(state.get("warnings", []))
        refine = state.get("refine") or {}
        if refine:
            refiner = MeshRefiner.empty(int(refine["grid"]["resolution"]), float(refine["grid"]["scale"]), self.device)
            refiner.load_state_dict(refine["geometry"])
            self._build_refinement(refiner)
            assert self.refine_optimizer is not None
            self.refine_optimizer.load_state_dict(refine["optimizer"])

    def save_checkpoint(self, path: Path) -> None:
        """Atomic: a crash mid-write leaves the previous checkpoint intact."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)

    def load_checkpoint(self, path: Path) -> None:
        self.load_state_dict(read_checkpoint(path))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load with ``weights_only=True``: a checkpoint is data, never code."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from exc


def _architecture(config: dict[str, Any]) -> dict[str, Any]:
    return {"field": config["field"], "occupancy": config["render"]["occupancy_resolution"]}
