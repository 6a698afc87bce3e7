"""Benchmarks anyone can rerun: ``dreamfusion bench speed`` and ``dreamfusion bench quality``.

Each writes ``<name>.json`` (raw numbers, machine, date) and ``<name>.md`` (the table) to ``--out``.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import os
import platform as _stdlib_platform
import shlex
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dreamfusion.config import Config, apply_overrides, resolve_device
from dreamfusion.evaluate import photos_surface_offset, truth_silhouette_iou
from dreamfusion.field import NeRFField
from dreamfusion.geometry import FSCORE_THRESHOLD
from dreamfusion.pipeline import compute_metrics, finish_run, mesh_if_any
from dreamfusion.prior.shapes import OBJECTS, find_object
from dreamfusion.trainer import Trainer

log = logging.getLogger(__name__)


def _machine(device: torch.device) -> dict[str, Any]:
    return {
        "date": _dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "processor": _stdlib_platform.processor() or _stdlib_platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _write(out: Path, name: str, payload: dict[str, Any], table: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    machine = payload["machine"]
    where = f"{machine['cpu_count']} CPU cores ({machine['processor']})"
    if machine["device"] != "cpu":
        where = f"one {machine['device']} GPU beside {where}"
    header = [
        f"# {name} benchmark",
        "",
        f"Measured {machine['date']} on {where}, torch {machine['torch']}, by `{payload['command']}`.",
        "",
    ]
    (out / f"{name}.md").write_text("\n".join(header + table) + "\n")
    print("\n".join(table))


def _median_seconds(fn, repeats: int) -> float:
    def finished() -> None:
        if torch.cuda.is_initialized():  # kernels run asynchronously: time them, not their launch
            torch.cuda.synchronize()

    fn()  # warm-up (and Triton's compilation)
    finished()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        finished()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


NORMALS = ("analytic", "autograd")
STEP_MODES = ("albedo", "lambertian", "lambertian_autograd_normals")


def speed(out: Path, repeats: int = 7, samples: int = 2**18, overrides: tuple[str, ...] = (),
          warmup_steps: int = Config.iterations) -> dict[str, Any]:
    """Field and SDS-step timings. ``overrides`` (``--set`` items, applied last) and ``samples`` let the
    tests run it small; the published table uses the defaults (64×64 renders, 2^18 samples)."""
    results: dict[str, Any] = {}
    base = apply_overrides(Config(prompt="a red ball", iterations=10_000),
                           ["render.resolution=64", "render.albedo_warmup_fraction=0", *overrides])
    count = f"2^{samples.bit_length() - 1}" if samples & (samples - 1) == 0 else str(samples)
    size = base.render.resolution
    device = resolve_device(base.device)
    field = NeRFField(copy.deepcopy(base.field)).to(device)
    points = torch.rand(samples, 3, device=device) * 1.2 - 0.6

    def field_forward() -> None:
        with torch.no_grad():
            field.log_density_and_albedo(points)

    def field_forward_backward() -> None:
        log_density, albedo = field.log_density_and_albedo(points)
        (log_density.sum() + albedo.sum()).backward()

    results[f"field_forward_{count}_s"] = _median_seconds(field_forward, repeats)
    results[f"field_forward_backward_{count}_s"] = _median_seconds(field_forward_backward, repeats)
    for normals in NORMALS:
        field.config.normals = normals

        def field_normals_forward_backward() -> None:
            log_density, albedo, gradient = field.log_density_albedo_and_gradient(points)
            (log_density.sum() + albedo.sum() + gradient.norm(dim=-1).sum()).backward()

        results[f"field_normals_{normals}_forward_backward_{count}_s"] = _median_seconds(
            field_normals_forward_backward, repeats
        )

    # The steps are timed on a trained field with a converged grid: a run of the library's defaults first.
    trained = Trainer(apply_overrides(Config(prompt="a red ball", iterations=warmup_steps), list(overrides)))
    trained.train()
    for occupancy in (True, False):
        config = apply_overrides(copy.deepcopy(base), [f"render.occupancy_grid={occupancy}"])
        trainer = Trainer(config)
        trainer.field.load_state_dict(trained.field.state_dict())
        if occupancy:
            trainer.occupancy.load_state_dict(trained.occupancy.state_dict())
        trainer.step = warmup_steps  # past the grid's warm-up
        for mode in STEP_MODES if occupancy else STEP_MODES[:2]:
            config.render.shading_ratios = (1.0, 0.0, 0.0) if mode == "albedo" else (0.0, 1.0, 0.0)
            config.field.normals = "autograd" if mode == "lambertian_autograd_normals" else "analytic"
            per_step: list[dict[str, float]] = []

            def step(per_step: list = per_step, trainer: Trainer = trainer) -> None:
                per_step.append(trainer.train_step())

            key = f"sds_step_{size}px_{mode}_occupancy_{'on' if occupancy else 'off'}"
            results[key + "_s"] = _median_seconds(step, repeats)
            for name in ("sample_fraction", "probe_fraction"):
                results[f"{key}_{name}"] = statistics.median(metrics[name] for metrics in per_step)

    # What a trial does after training (checkpoint, mesh, videos, previews, metrics), with the grid and without.
    grid = trained.occupancy
    for occupancy in (True, False):
        trained.occupancy = grid if occupancy else None
        with tempfile.TemporaryDirectory() as directory:
            started = time.perf_counter()
            finish_run(trained, Path(directory) / "run", 0.0)
            results[f"post_training_occupancy_{'on' if occupancy else 'off'}_s"] = time.perf_counter() - started
    trained.occupancy = grid
    results.update(_refine_step_seconds(trained, repeats, overrides))

    table = _speed_table(results, size, base.render.batch_size, count)
    payload = {"machine": _machine(device), "command": "dreamfusion bench speed", "results": results}
    _write(out, "speed", payload, table)
    return payload


def _refine_step_seconds(trained: Trainer, repeats: int, overrides: tuple[str, ...]) -> dict[str, float]:
    """Stage 2 on the trained field at the refinement's defaults: one step, and its visibility pass alone
    (Embree on the CPU, the torch z-buffer on CUDA)."""
    from dreamfusion.cameras import sample_cameras
    from dreamfusion.rasterizer import embree_visibility, resolve_visibility, zbuffer

    config = apply_overrides(copy.deepcopy(trained.config), ["refine.iterations=10000", *overrides])
    trainer = Trainer(config)
    trainer.field.load_state_dict(trained.field.state_dict())
    trainer.step = config.iterations  # stage 1 done
    step_seconds = _median_seconds(trainer.train_step, repeats)
    mesh = trainer.refiner.mesh()
    vertices, faces, resolution = mesh.vertices.detach(), mesh.faces, config.refine.resolution
    cameras = sample_cameras(config.camera, config.refine.batch_size, torch.Generator().manual_seed(0))
    backend = resolve_visibility(config.refine.visibility, vertices.device)
    visibility = embree_visibility if backend == "embree" else zbuffer
    return {"refine_step_s": step_seconds, "refine_resolution": resolution, "refine_batch": config.refine.batch_size,
            "refine_mesh_faces": float(faces.shape[0]), "refine_visibility_backend": backend,
            "refine_visibility_s": _median_seconds(lambda: visibility(vertices, faces, cameras, resolution), repeats)}


def _speed_table(results: dict[str, float], size: int, batch: int, count: str) -> list[str]:
    """The speed benchmark's Markdown table (four significant digits: GPU times are milliseconds)."""
    table = [
        "| measurement | median seconds |",
        "|---|---|",
        f"| field forward, {count} samples | {results[f'field_forward_{count}_s']:.4g} |",
        f"| field forward+backward, {count} samples | {results[f'field_forward_backward_{count}_s']:.4g} |",
    ]
    for normals in NORMALS:
        table.append(f"| field forward+backward with {normals} normals, {count} samples "
                     f"| {results[f'field_normals_{normals}_forward_backward_{count}_s']:.4g} |")
    autograd_normals = results[f"field_normals_autograd_forward_backward_{count}_s"]
    table.append(f"| ratio autograd/analytic normals (field) "
                 f"| {autograd_normals / results[f'field_normals_analytic_forward_backward_{count}_s']:.2f}x |")
    for mode in ("albedo", "lambertian"):
        on = results[f"sds_step_{size}px_{mode}_occupancy_on_s"]
        off = results[f"sds_step_{size}px_{mode}_occupancy_off_s"]
        fraction = results[f"sds_step_{size}px_{mode}_occupancy_on_sample_fraction"]
        probed = results[f"sds_step_{size}px_{mode}_occupancy_on_probe_fraction"]
        table.append(f"| SDS step, {size}x{size}, batch {batch}, {mode} shading, occupancy on ({fraction:.0%} of "
                     f"samples evaluated, after a density-only pass over {probed:.0%}) | {on:.4g} |")
        table.append(f"| SDS step, {size}x{size}, batch {batch}, {mode} shading, occupancy off | {off:.4g} |")
        table.append(f"| ratio off/on ({mode}) | {off / on:.2f}x |")
    if "post_training_occupancy_on_s" in results:
        on, off = results["post_training_occupancy_on_s"], results["post_training_occupancy_off_s"]
        table.append(f"| after training (checkpoint, export, metrics at the defaults), occupancy on | {on:.4g} |")
        table.append(f"| after training, occupancy off | {off:.4g} |")
        table.append(f"| ratio off/on (after training) | {off / on:.2f}x |")
    if "refine_step_s" in results:
        side = results["refine_resolution"]
        table.append(f"| refinement step, {side}x{side}, batch {results['refine_batch']}, a mesh of "
                     f"{results['refine_mesh_faces']:.0f} faces | {results['refine_step_s']:.4g} |")
        table.append(f"| its visibility pass ({results['refine_visibility_backend']}) | "
                     f"{results['refine_visibility_s']:.4g} |")
    autograd_step = results[f"sds_step_{size}px_lambertian_autograd_normals_occupancy_on_s"]
    table.append(f"| SDS step, {size}x{size}, batch {batch}, lambertian shading, autograd normals, occupancy on "
                 f"| {autograd_step:.4g} |")
    table.append(f"| ratio autograd/analytic normals (lambertian step) "
                 f"| {autograd_step / results[f'sds_step_{size}px_lambertian_occupancy_on_s']:.2f}x |")
    return table


def _benchmark_config(prompt: str, overrides: list[str], iterations: int | None) -> Config:
    config = Config(prompt=prompt)
    if iterations is not None:
        config.iterations = iterations
    return apply_overrides(config, overrides)


def _train_and_evaluate(prompt: str, overrides: list[str], iterations: int | None) -> dict[str, Any]:
    """The run's metrics and seconds; with refinement, also stage 1's (``stage1``), measured on the same run
    when stage 1 ends, so the two stages are compared on one trajectory."""
    config = _benchmark_config(prompt, overrides, iterations)
    started = time.perf_counter()
    trainer = Trainer(config)
    stage1: dict[str, Any] | None = None
    if config.refine.iterations:
        trainer.train(until=config.iterations)
        paused = time.perf_counter()
        stage1 = {**compute_metrics(trainer, mesh=mesh_if_any(trainer)), "wall_seconds": paused - started}
        started += time.perf_counter() - paused  # stage 1's evaluation is not the run's time
    trainer.train()
    metrics: dict[str, Any] = compute_metrics(trainer, mesh=mesh_if_any(trainer))
    metrics["wall_seconds"] = time.perf_counter() - started
    if stage1 is not None:
        metrics["stage1"] = stage1
    log.info("%s %s: %s", prompt, overrides, {k: round(v, 3) for k, v in metrics.items() if k != "stage1"})
    return metrics


# The paper's ablations on objects with a front, and what makes the Janus problem appear on this prior:
# without view conditioning at the default ω = 1 the front is averaged away; mode-seeking guidance
# (ω = 7.5) duplicates it. arm: (label in the table, overrides).
ABLATIONS: dict[str, tuple[str, list[str]]] = {
    "no_view_dependent": ("no view-dependent conditioning", ["sds.view_dependent=false"]),
    "no_view_dependent_guided": ("no view-dependent conditioning, guidance 7.5",
                                 ["sds.view_dependent=false", "sds.guidance_scale=7.5"]),
    "view_labels": ("view labels instead of the camera", ["guidance.prior_conditioning=view_label"]),
    "no_textureless": ("no textureless shading", ["render.shading_ratios=0.3,0.7,0"]),
}


def quality(out: Path, prompts: list[str] | None = None, ablations: bool = True,
            iterations: int | None = None, ablation_prompts: list[str] | None = None,
            settings: list[str] | None = None) -> dict[str, Any]:
    """Writes the table after every run, and resumes: runs already in ``quality.json`` with the same
    iterations and ``settings`` (config overrides for every run, as ``dreamfusion run --set``) are kept."""
    settings = list(settings or [])
    by_prompt = {o.prompt: o for o in OBJECTS}
    chosen = list(OBJECTS) if prompts is None else [by_prompt[find_object(p).prompt] for p in prompts]
    # a bad setting fails before any run
    device = resolve_device(_benchmark_config(chosen[0].prompt, settings, iterations).device)
    previous = out / "quality.json"
    runs: dict[str, Any] = {}
    machine = _machine(device)
    if previous.exists():
        saved = json.loads(previous.read_text())
        same_defaults = saved.get("defaults") == _library_defaults()  # runs of other defaults are not these
        if (same_defaults and saved.get("format") == _QUALITY_FORMAT and saved.get("iterations") == iterations
                and saved.get("settings", []) == settings):
            runs = saved["runs"]
            machine = saved.get("machine", machine)  # a table rewritten elsewhere still names where it ran
    plan: list[tuple[str, str, list[str]]] = []
    for obj in chosen:
        plan.append((obj.prompt, "default", []))
        if ablations and obj.has_front and (ablation_prompts is None or obj.prompt in ablation_prompts):
            plan += [(obj.prompt, arm, overrides) for arm, (_, overrides) in ABLATIONS.items()]
    command = _quality_command(prompts, ablations, iterations, ablation_prompts, settings)
    payload: dict[str, Any] = {}
    todo = [(prompt, arm, overrides) for prompt, arm, overrides in plan if arm not in runs.get(prompt, {})]
    started = time.perf_counter()
    for done, (prompt, arm, overrides) in enumerate(todo):
        eta = f", about {(time.perf_counter() - started) / done * (len(todo) - done) / 60:.0f} min left" if done else ""
        log.info("quality run %d/%d: %s (%s)%s", done + 1, len(todo), prompt, arm.replace("_", " "), eta)
        runs.setdefault(prompt, {})[arm] = _train_and_evaluate(prompt, settings + overrides, iterations)
        machine = _machine(device)
        payload = _write_quality(out, runs, iterations, settings, command, machine)
    return payload or _write_quality(out, runs, iterations, settings, command, machine)


# The metrics a run in quality.json holds; runs saved with another format lack some and are run again.
_QUALITY_FORMAT = 2  # 2: with the 3D accuracy (chamfer, fscore, normal_error_deg)


def _library_defaults() -> dict[str, Any]:
    """The config every run starts from, as stored in JSON."""
    return json.loads(json.dumps(Config().flat()))


def _quality_command(prompts: list[str] | None, ablations: bool, iterations: int | None,
                     ablation_prompts: list[str] | None, settings: list[str]) -> str:
    """The command line that reruns this table, every option that shaped it included."""
    words = ["dreamfusion", "bench", "quality"]
    if iterations is not None:
        words += ["--iters", str(iterations)]
    if prompts is not None:
        words += ["--prompts", ";".join(prompts)]
    if not ablations:
        words.append("--no-ablations")
    elif ablation_prompts is not None:
        words += ["--ablation-prompts", ";".join(ablation_prompts)]
    for setting in settings:
        words += ["--set", setting]
    return shlex.join(words)


def _write_quality(out: Path, runs: dict[str, Any], iterations: int | None, settings: list[str],
                   command: str, machine: dict[str, Any]) -> dict[str, Any]:
    table = ["| prompt | IoU | PSNR | R-prec colour | R-prec textureless | Janus | front recall | Chamfer "
             f"| F-score @{FSCORE_THRESHOLD:.0%} | normal error ° | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(m: dict[str, float], key: str, form: str) -> str:
        return format(m[key], form) if key in m else "-"

    def row(name: str, m: dict[str, float]) -> str:
        return (f"| {name} | {m['silhouette_iou']:.3f} | {m['psnr']:.1f} | {m['r_precision_colour']:.2f} | "
                f"{m['r_precision_textureless']:.2f} | {cell(m, 'janus_rate', '.2f')} | "
                f"{cell(m, 'front_recall', '.2f')} | {cell(m, 'chamfer', '.4f')} | {cell(m, 'fscore', '.3f')} | "
                f"{cell(m, 'normal_error_deg', '.1f')} | {m['wall_seconds']:.0f} |")

    ordered = [o.prompt for o in OBJECTS if o.prompt in runs]
    table += [row(prompt, runs[prompt]["default"]) for prompt in ordered if "default" in runs[prompt]]
    ablated = [(p, arm) for p in ordered for arm in ABLATIONS if arm in runs[p]]
    if ablated:
        table += ["", "Ablations on objects with a front (same seed and settings otherwise):", "", table[0], table[1]]
        table += [row(f"{p} ({ABLATIONS[arm][0]})", runs[p][arm]) for p, arm in ablated]
    staged = [p for p in ordered if "stage1" in runs[p].get("default", {})]
    if staged:
        stage1_photos = apply_overrides(Config(), settings).guidance.prior_photos
        table += ["", "Stage 1 alone and with refinement, side by side (the same run, measured when stage 1 ended "
                  "and at the end; ratios refined / stage 1):", "",
                  "| prompt | Chamfer 1 | Chamfer 2 | ratio | photos' offset | normal error 1 | normal error 2 | ratio "
                  "| IoU 1 | IoU 2 | IoU of the truth | R-prec textureless 1 | 2 | F-score 1 | 2 | seconds 1 "
                  "| seconds 1+2 | ratio |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for prompt in staged:
            two = runs[prompt]["default"]
            one = two["stage1"]

            def ratio(key: str, first: dict = one, second: dict = two) -> str:
                return f"{second[key] / first[key]:.2f}" if key in first and key in second and first[key] else "-"

            table.append(f"| {prompt} | {cell(one, 'chamfer', '.4f')} | {cell(two, 'chamfer', '.4f')} | "
                         f"{ratio('chamfer')} | {photos_surface_offset(prompt, photos=stage1_photos):.4f} | "
                         f"{cell(one, 'normal_error_deg', '.1f')} | "
                         f"{cell(two, 'normal_error_deg', '.1f')} | {ratio('normal_error_deg')} | "
                         f"{one['silhouette_iou']:.3f} | {two['silhouette_iou']:.3f} | "
                         f"{truth_silhouette_iou(prompt):.3f} | "
                         f"{one['r_precision_textureless']:.2f} | {two['r_precision_textureless']:.2f} | "
                         f"{cell(one, 'fscore', '.3f')} | {cell(two, 'fscore', '.3f')} | {one['wall_seconds']:.0f} | "
                         f"{two['wall_seconds']:.0f} | {ratio('wall_seconds')} |")
    table += ["", f"Chamfer: the symmetric mean distance between the exported mesh and the true surface, as a share "
              f"of the object's bounding radius; F-score at {FSCORE_THRESHOLD:.0%} of that radius; normal error: the "
              "mean angle between the rendered and the true normals at the 16 held-out cameras "
              "(`dreamfusion/geometry.py`). Photos' offset: stage 1's photos show the object grown by this share of "
              "its radius (a soft density's silhouette: `dreamfusion.evaluate.photos_surface_offset`), so a field "
              "that reproduced them exactly would lie about this far from the true surface. IoU of the truth: the "
              "silhouette IoU of the true surface itself against the ground truth that IoU is measured with, volume "
              "photos (`dreamfusion.evaluate.truth_silhouette_iou`): a mesh on the truth scores this, not 1."]
    payload = {"machine": machine, "command": command, "iterations": iterations, "settings": settings,
               "defaults": _library_defaults(), "format": _QUALITY_FORMAT, "runs": runs}
    _write(out, "quality", payload, table)
    return payload


def _kernel_cases(device: torch.device) -> dict[str, Any]:
    from dreamfusion.encoding import HashGridEncoding

    generator = torch.Generator().manual_seed(0)
    encoder = HashGridEncoding(16, 2, 19, 16, 2048, backend="torch").to(device)
    points = torch.rand(2**18, 3, generator=generator).to(device)
    rays, samples = 4096, 64
    # Packed, every ray with its full count: the dense layout's work, in the layout the renderer uses.
    sigma = (torch.rand(rays * samples, generator=generator) * 5).to(device)
    colour = torch.rand(rays * samples, 3, generator=generator).to(device)
    delta = torch.full((rays * samples,), 2.0 / samples, device=device)
    t = torch.cumsum(delta.reshape(rays, samples), 1).reshape(-1)
    count = torch.full((rays,), samples, device=device, dtype=torch.long)
    start = torch.arange(rays, device=device) * samples
    return {"encoder": encoder, "points": points, "composite": (sigma, colour, delta, t, start, count),
            "rays": rays, "samples": samples}


def _kernel_bytes(case: dict[str, Any]) -> dict[str, float]:
    """Bytes each kernel must move at least (float32, int32 tables of the level layout)."""
    encoder, points = case["encoder"], case["points"]
    n, levels, features = points.shape[0], encoder.levels, encoder.features_per_level
    gathers = n * levels * 8 * features * 4
    encode_forward = n * 3 * 4 + gathers + n * levels * features * 4
    encode_backward = n * levels * features * 4 + 2 * gathers + n * 3 * 4 * 2
    rays, samples = case["rays"], case["samples"]
    layout = rays * 2 * 8  # start and count
    composite_forward = rays * samples * 4 * (3 + 3) + rays * samples * 4 + rays * 5 * 4 + layout
    composite_backward = (rays * samples * 4 * (3 + 3 + 1 + 1) + rays * samples * 4 * (1 + 3) + rays * 5 * 4
                          + layout)
    return {
        "hash_encode forward": encode_forward,
        "hash_encode forward+backward": encode_forward + encode_backward,
        "composite forward": composite_forward,
        "composite forward+backward": composite_forward + composite_backward,
    }


def _time_kernels(case: dict[str, Any], backend: str, repeats: int) -> dict[str, float]:
    from triton_kernels import composite, hash_encode

    encoder, points = case["encoder"], case["points"]
    args = (encoder.resolutions, encoder.level_offsets, encoder.level_sizes, encoder.dense_count)
    sigma, colour, delta, t, start, count = case["composite"]

    def encode_forward() -> None:
        with torch.no_grad():
            hash_encode(points, encoder.table, *args, backend=backend)

    def encode_forward_backward() -> None:
        hash_encode(points, encoder.table, *args, backend=backend).sum().backward()

    def composite_forward() -> None:
        with torch.no_grad():
            composite(sigma, colour, delta, t, start, count, backend=backend)

    def composite_forward_backward() -> None:
        s, c = sigma.clone().requires_grad_(True), colour.clone().requires_grad_(True)
        _, rgb, opacity, depth = composite(s, c, delta, t, start, count, backend=backend)
        (rgb.sum() + opacity.sum() + depth.sum()).backward()

    return {
        "hash_encode forward": _median_seconds(encode_forward, repeats),
        "hash_encode forward+backward": _median_seconds(encode_forward_backward, repeats),
        "composite forward": _median_seconds(composite_forward, repeats),
        "composite forward+backward": _median_seconds(composite_forward_backward, repeats),
    }


def _interpreter_check() -> dict[str, float]:
    """On a CPU: the Triton kernels run in Triton's interpreter on small inputs, against the reference."""
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are first imported
    from triton_kernels.composite import composite_reference, composite_triton
    from triton_kernels.hashgrid import hash_encode_reference, hash_encode_triton

    case = _kernel_cases(torch.device("cpu"))
    encoder = case["encoder"]
    args = (encoder.resolutions, encoder.level_offsets, encoder.level_sizes, encoder.dense_count)
    points = case["points"][:2048]
    encoder.table.data.normal_()
    errors = {
        "hash_encode max abs error": float(
            (hash_encode_triton(points, encoder.table, *args) - hash_encode_reference(points, encoder.table, *args))
            .detach()
            .abs().max()),
    }
    sigma, colour, delta, t, start, count = case["composite"]
    rays = 64
    samples = int(count[:rays].sum())
    small = (sigma[:samples], colour[:samples], delta[:samples], t[:samples], start[:rays], count[:rays])
    errors["composite max abs error"] = max(
        float((a - b).abs().max()) for a, b in zip(composite_triton(*small), composite_reference(*small), strict=True))
    return errors


def kernels(out: Path, repeats: int = 7) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = _kernel_cases(device)
    backends = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    timings = {backend: _time_kernels(case, backend, repeats) for backend in backends}
    moved = _kernel_bytes(case)
    machine = _machine(device)
    payload: dict[str, Any] = {"machine": machine, "command": "dreamfusion bench kernels", "timings_s": timings,
                               "bytes": moved,
                               "sizes": "hash grid: 2^18 points, 16 levels x 2 features, table 2^19; "
                                        "compositing: 4096 rays x 64 packed samples"}
    table = ["| kernel | backend | median ms | GB/s (minimum bytes / time) |", "|---|---|---|---|"]
    for backend, results in timings.items():
        for name, seconds in results.items():
            table.append(f"| {name} | {backend} | {seconds * 1e3:.1f} | {moved[name] / seconds / 1e9:.2f} |")
    if device.type == "cuda":
        for name in timings["torch"]:
            ratio = timings['torch'][name] / timings['triton'][name]
            table.append(f"| {name} | speed-up triton/torch | {ratio:.1f}x | |")
    else:
        payload["interpreter_check"] = _interpreter_check()
        table += ["", "No GPU here: the Triton kernels were checked in Triton's interpreter against the reference "
                  f"(max abs error: {payload['interpreter_check']})."]
    table += ["", f"Sizes: {payload['sizes']}."]
    _write(out, "kernels", payload, table)
    return payload
