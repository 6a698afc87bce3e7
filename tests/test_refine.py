"""Stage 2, the mesh: DMTet refinement of a stage-1 field under the same SDS loss."""

import json

import pytest
import torch

from dreamfusion.config import apply_overrides
from dreamfusion.evaluate import evaluate_views, held_out_cameras
from dreamfusion.geometry import mesh_accuracy
from dreamfusion.mesh import extract_mesh
from dreamfusion.pipeline import compute_metrics, export_mesh, run_prompt
from dreamfusion.renderer import Shading
from dreamfusion.trainer import Trainer
from tests.conftest import tiny_config

# Stage 2 at the tiny prior's own resolution, on a small grid: seconds a step on a CPU.
TINY_REFINE = ["refine.resolution=16", "refine.grid_resolution=20", "refine.batch_size=2"]


def refining(iterations: int, refine_iterations: int, *extra: str):
    return tiny_config(iterations=iterations, extra=[*TINY_REFINE, f"refine.iterations={refine_iterations}", *extra])


def test_stage_two_follows_stage_one_and_renders_the_mesh():
    trainer = Trainer(refining(3, 2))
    trainer.train(until=3)
    assert trainer.stage == "refine" and trainer.refiner is None  # built at its first step, not before
    metrics = trainer.train_step()
    assert metrics["stage"] == 2.0 and metrics["mesh_faces"] > 0 and trainer.refiner is not None
    trainer.train()
    assert trainer.step == trainer.total_iterations == 5
    [out] = trainer.render_views(held_out_cameras().slice(0, 2), 16, (Shading("albedo"),))
    assert out.rgb.shape == (2, 3, 16, 16) and 0 < float(out.opacity.mean()) < 1


def test_refinement_moves_the_sdf_and_the_vertices_and_keeps_the_texture_learning():
    trainer = Trainer(refining(3, 3))
    trainer.train(until=4)
    sdf, deform = trainer.refiner.sdf.detach().clone(), trainer.refiner.deform.detach().clone()
    table = trainer.field.encoder.table.detach().clone()
    trainer.train()
    assert not torch.equal(sdf, trainer.refiner.sdf) and not torch.equal(deform, trainer.refiner.deform)
    assert not torch.equal(table, trainer.field.encoder.table)


def test_a_run_stopped_inside_stage_two_resumes_to_the_same_weights(tmp_path):
    config = refining(3, 5)
    straight = Trainer(config)
    straight.train()
    first = Trainer(config)
    first.train(until=5)
    first.save_checkpoint(tmp_path / "checkpoint.pt")
    resumed = Trainer(config)
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed.step == 5 and resumed.refiner is not None
    resumed.train()
    for name, value in straight.refiner.state_dict().items():
        torch.testing.assert_close(resumed.refiner.state_dict()[name], value, rtol=0, atol=0)
    for name, value in straight.field.state_dict().items():
        torch.testing.assert_close(resumed.field.state_dict()[name], value, rtol=0, atol=0)
    assert [s for s, _ in resumed.snapshots] == [s for s, _ in straight.snapshots]


def test_progress_rows_come_from_both_stages():
    trainer = Trainer(refining(4, 4, "export.progress_snapshots=4"))
    trainer.train()
    assert [step for step, _ in trainer.snapshots] == [0, 2, 4, 6]  # two of the field, two of the mesh


def test_the_exported_mesh_is_the_refined_mesh():
    trainer = Trainer(refining(6, 2))
    trainer.train()
    exported = export_mesh(trainer)
    refined = trainer.refiner.mesh()
    assert len(exported.faces) == len(refined.faces)
    cubes = extract_mesh(trainer.field, 32, 5.0)
    assert len(exported.faces) != len(cubes.faces)


@pytest.mark.slow
def test_a_short_refinement_of_the_red_ball_lowers_its_normal_error():
    config = tiny_config(iterations=40, extra=["refine.resolution=32", "guidance.prior_resolution=32",
                                               "render.resolution=32", "refine.grid_resolution=28",
                                               "refine.iterations=25", "export.eval_resolution=32"])
    trainer = Trainer(config)
    trainer.train(until=config.iterations)
    coarse = compute_metrics(trainer, mesh=export_mesh(trainer))
    trainer.train()
    refined = compute_metrics(trainer, mesh=export_mesh(trainer))
    assert refined["normal_error_deg"] < coarse["normal_error_deg"]
    assert refined["chamfer"] < coarse["chamfer"]


@pytest.mark.slow
def test_an_empty_scene_skips_refinement_with_the_warning(tmp_path, capsys):
    config = refining(1, 3, "field.blob_density=0")
    summary = run_prompt(config, tmp_path / "empty")
    assert any("refinement skipped" in w for w in summary["warnings"])
    assert any("no mesh" in w for w in summary["warnings"])
    assert summary["iterations"] == 4 and "silhouette_iou" in summary["metrics"]
    saved = json.loads((tmp_path / "empty" / "summary.json").read_text())
    assert saved["warnings"] == summary["warnings"]


def test_refinement_settings_are_validated():
    from dreamfusion.errors import UserInputError

    for bad, message in (("refine.t_min=0.6", "refine.t_min"), ("refine.grid_resolution=4", "grid_resolution"),
                         ("refine.visibility=opengl", "refine.visibility"), ("refine.iterations=-1", "iterations"),
                         ("refine.prior_photos=mesh", "refine.prior_photos"),
                         ("guidance.prior_photos=sharp", "guidance.prior_photos")):
        with pytest.raises(UserInputError, match=message):
            apply_overrides(tiny_config(), [bad]).validate()


def test_the_refinement_is_judged_by_photos_of_the_true_surface_at_its_own_resolution():
    trainer = Trainer(refining(1, 1, "refine.resolution=24"))
    trainer.train()
    spec = trainer.refine_guidance.prior.spec
    assert (spec.photos, spec.resolution) == ("surface", 24)
    assert trainer.guidance.prior.spec.photos == "volume"  # stage 1's photos are unchanged
    same = Trainer(refining(1, 1, "refine.prior_photos=volume"))
    same.train()
    assert same.refine_guidance is same.guidance  # nothing differs: the stage-1 prior serves both stages


def test_a_visibility_backend_the_machine_lacks_is_refused_before_training(monkeypatch):
    from dreamfusion import rasterizer
    from dreamfusion.errors import UserInputError

    monkeypatch.setattr(rasterizer, "_has_embree", lambda: False)
    with pytest.raises(UserInputError, match="refine.visibility: .*embreex"):
        Trainer(refining(2, 2, "refine.visibility=embree"))


def test_the_initial_sdf_is_the_distance_to_the_isosurface_in_cells():
    """A sphere's radial level set: each vertex's value is its distance to the sphere in cells, with the sign
    of the level, out to the band and constant beyond; the zero set stays where the level's was."""
    from dreamfusion.dmtet import marching_tetrahedra, tet_grid
    from dreamfusion.refine import SDF_BAND_CELLS, signed_distance_in_cells

    grid = tet_grid(24, 1.0)
    cell = 2.0 / 24
    radius = grid.vertices.norm(dim=-1)
    level = radius**2 - 0.6**2  # zero on the sphere, but no distance: 0.3 a cell out at the surface
    sdf = signed_distance_in_cells(grid, level)
    exact = (radius - 0.6) / cell
    band = exact.abs() < SDF_BAND_CELLS - 0.5
    # the distance is to the sphere's chordal surface: within a hundredth of the radius, a seventh of a cell
    assert (sdf[band] - exact[band]).abs().max() < 0.01 * 0.6 / cell
    assert torch.equal(sdf < 0, level < 0)
    assert (sdf[~band].abs() > SDF_BAND_CELLS - 0.6).all() and sdf.abs().max() <= SDF_BAND_CELLS
    before = marching_tetrahedra(grid.vertices, level, grid.tets).vertices.norm(dim=-1)
    after = marching_tetrahedra(grid.vertices, sdf, grid.tets).vertices.norm(dim=-1)
    assert (before - 0.6).abs().max() < 0.1 * cell and (after - 0.6).abs().max() < 0.1 * cell


def test_evaluating_the_truth_as_a_mesh_scores_like_the_truth():
    """The metrics of a render function: the refined path's evaluation on the truth's own mesh."""
    from dreamfusion.dmtet import TetMesh
    from dreamfusion.geometry import truth_surface
    from dreamfusion.guidance.synthetic import SyntheticGuidance
    from dreamfusion.prior.shapes import SDFField, find_object
    from dreamfusion.refine import render_mesh

    truth = truth_surface("a red ball").mesh
    mesh = TetMesh(torch.tensor(truth.vertices, dtype=torch.float32), torch.tensor(truth.faces),
                   torch.zeros(0, 2, dtype=torch.long))
    field = SDFField(find_object("a red ball"))
    guidance = SyntheticGuidance(tiny_config())
    metrics = evaluate_views(lambda c, r, s: render_mesh(field, mesh, c, r, s), "a red ball", guidance.prior, 32)
    assert metrics["normal_error_deg"] < 1.5 and metrics["r_precision_colour"] == 1.0
    assert mesh_accuracy("a red ball", truth)["chamfer"] < 1e-3


@pytest.mark.slow
def test_run_with_refinement_then_eval_from_the_cli(tmp_path, capsys):
    from dreamfusion.cli import main
    from tests.conftest import TINY

    out = tmp_path / "ball"
    settings = [arg for item in [*TINY, *TINY_REFINE, "refine.iterations=3"] for arg in ("--set", item)]
    assert main(["run", "a red ball", "--out", str(out), "--iters", "4", *settings]) == 0
    assert "a red ball [refine]" in capsys.readouterr().err  # the bar shows the stage
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 7 and {"chamfer", "normal_error_deg", "mesh_psnr"} <= set(summary["metrics"])
    assert main(["eval", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(summary["metrics"], abs=1e-6)


def test_the_initial_surface_is_where_the_renders_show_it_not_a_density_level():
    """On the analytic ball as a soft field (VolSDF, β = 0.012): the fused median depth starts the mesh within
    0.012 of the true sphere (oblique rays stop a little early in the soft shell), where the anchors' way, a
    density level (3 here), starts it grown by ~2.6 β."""
    from dreamfusion.config import RefineConfig
    from dreamfusion.prior.shapes import SDFField, find_object
    from dreamfusion.refine import DepthMaps, MeshRefiner

    ball = find_object("a red ball")
    field = SDFField(ball)

    def offset(config: RefineConfig) -> float:
        vertices = MeshRefiner.from_field(field, config, 3.0).mesh().vertices.detach().double()
        with torch.no_grad():
            return float(ball.sdf(vertices).mean())

    fused, level = offset(RefineConfig(grid_resolution=32)), offset(RefineConfig(grid_resolution=32, sdf_threshold=3))
    assert abs(fused) < 0.012 and level > 0.025  # the ball's radius is 0.55: under 2.2% of it against over 4.5%
    maps = DepthMaps.render(field, resolution=32)
    points = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.7], [0.0, 0.9, 0.0], [0.5, 0.0, 0.0]])
    distance = maps.fused_distance(points, 0.1)
    # the centre: behind every ray's stop, so no camera speaks of it: inside; two points some ray passes empty:
    # outside; one 0.05 inside the sphere: inside by at least that (along oblique rays the distance is longer)
    assert distance[:3].tolist() == pytest.approx([-0.1, 0.1, 0.1])
    assert -0.1 < float(distance[3]) < -0.045
