import math

import pytest
import torch
import torch.nn.functional as F

from dreamfusion.cameras import cameras_from_angles, generate_rays, sample_cameras, view_label
from dreamfusion.config import CameraConfig
from dreamfusion.field import RadianceField, density_from_log
from dreamfusion.prior.shapes import OBJECTS, SDFField, find_object
from dreamfusion.renderer import (
    TERMINATION_SEGMENT,
    OccupancyGrid,
    Shading,
    _march_until_spent,
    render,
    render_batched_shadings,
    render_shadings,
)
from dreamfusion.trainer import Trainer
from triton_kernels import march_rays
from triton_kernels.composite import STOP_TRANSMITTANCE, transmittance


class EmptyField(RadianceField):
    def log_density_and_albedo(self, points):
        return torch.full_like(points[:, 0], -30.0), torch.zeros_like(points)

    def background(self, directions):
        return torch.tensor([0.2, 0.4, 0.6]).expand(directions.shape[0], 3)


def front_camera(count=1, azimuth=0.0, elevation=0.0):
    return cameras_from_angles(torch.full((count,), azimuth), torch.full((count,), elevation),
                               torch.full((count,), 2.5), torch.full((count,), 40.0))


def test_empty_field_shows_background_and_no_opacity():
    out = render(EmptyField(), front_camera(), 8, 16, Shading("albedo"))
    assert float(out.opacity.max()) < 1e-6
    torch.testing.assert_close(out.rgb[0, :, 3, 3], torch.tensor([0.2, 0.4, 0.6]))


def test_solid_sphere_is_opaque_and_normals_face_camera():
    ball = SDFField(find_object("a red ball"))
    out = render(ball, front_camera(), 16, 96, Shading("lambertian"))
    assert float(out.opacity[0, 0, 8, 8]) > 0.99
    assert float(out.opacity[0, 0, 0, 0]) < 0.01  # corner ray misses the ball
    centre_normal = out.normals[0, :, 8, 8]
    assert float(centre_normal[2]) > 0.9  # camera on +z looks at the ball's +z side
    depth = float(out.depth[0, 0, 8, 8])
    assert abs(depth - (2.5 - 0.55)) < 0.05


def test_occupancy_grid_skips_samples_without_changing_the_image():
    ball = SDFField(find_object("a red ball"))
    grid = OccupancyGrid(resolution=16, min_optical_thickness=0.01, step_size=2.0 / 64)
    grid.update(ball, torch.Generator().manual_seed(0))
    assert 0.0 < grid.occupied_fraction < 0.5
    cams = front_camera(2, azimuth=30.0, elevation=20.0)
    full = render(ball, cams, 16, 64, Shading("albedo"))
    skipped = render(ball, cams, 16, 64, Shading("albedo"), occupancy=grid)
    assert skipped.samples_evaluated < 0.75 * full.samples_evaluated
    torch.testing.assert_close(skipped.rgb, full.rgb, atol=2e-3, rtol=0)


def test_textureless_ignores_albedo_and_lambertian_darkens_rim():
    ball = SDFField(find_object("a red ball"))
    flat = render(ball, front_camera(), 16, 96, Shading("textureless", textureless_albedo=0.75))
    centre = flat.rgb[0, :, 8, 8]
    assert torch.allclose(centre, centre[0].expand(3), atol=1e-4)  # grey
    lit = render(ball, front_camera(), 16, 96, Shading("lambertian"))
    assert float(lit.rgb[0, 0, 8, 8]) > float(lit.rgb[0, 0, 8, 4])


def test_view_labels_and_camera_geometry():
    assert view_label(0, 0) == "front"
    assert view_label(90, 0) == "side"
    assert view_label(-170, 10) == "back"
    assert view_label(200, 10) == "back"
    assert view_label(0, 80) == "overhead"
    cams = sample_cameras(CameraConfig(), 64, torch.Generator().manual_seed(0))
    distances = cams.positions.norm(dim=-1)
    assert float(distances.min()) >= 2.0 - 1e-5 and float(distances.max()) <= 2.4 + 1e-5
    origins, directions = generate_rays(cams, 5)
    centre = directions[:, 12]  # the middle pixel looks at the origin
    torch.testing.assert_close(centre, -cams.positions / distances[:, None], atol=1e-5, rtol=0)
    cos_light = (cams.light_directions * cams.positions / distances[:, None]).sum(-1)
    assert float(cos_light.min()) > 0.0  # the light stays on the camera's side


def test_analytic_normals_equal_autograd_normals_and_their_gradients():
    import dataclasses

    from dreamfusion.config import FieldConfig
    from dreamfusion.field import NeRFField

    torch.manual_seed(0)
    config = FieldConfig(levels=4, log2_table_size=10, max_resolution=64, hidden_dim=16)
    results = []
    for normals, checkpointing in (("autograd", False), ("analytic", False), ("analytic", True)):
        torch.manual_seed(0)
        field = NeRFField(dataclasses.replace(config, normals=normals, checkpointing=checkpointing))
        field.encoder.table.data.normal_(0.0, 0.3)
        out = render(field, front_camera(2, azimuth=30.0, elevation=20.0), 12, 24, Shading("lambertian"))
        (out.rgb.square().sum() + out.orientation_loss).backward()
        results.append((out.rgb.detach(), out.normals.detach(), [p.grad for p in field.parameters()]))
    autograd_rgb, autograd_normals, autograd_grads = results[0]
    assert autograd_normals.abs().sum() > 0
    for rgb, normals, grads in results[1:]:
        torch.testing.assert_close(rgb, autograd_rgb)
        torch.testing.assert_close(normals, autograd_normals, rtol=1e-4, atol=1e-5)
        for grad, expected in zip(grads, autograd_grads, strict=True):
            torch.testing.assert_close(grad, expected, rtol=1e-3, atol=1e-6)


def _surface_cells(obj, resolution: int) -> torch.Tensor:
    """Cells whose corners do not all lie on one side of the object's surface (the SDF changes sign)."""
    axis = torch.linspace(-1.0, 1.0, resolution + 1)
    corners = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)
    inside = (obj.sdf(corners.reshape(-1, 3)) < 0).reshape((resolution + 1,) * 3).float()[None, None]
    any_inside = F.max_pool3d(inside, kernel_size=2, stride=1)[0, 0] > 0
    any_outside = F.max_pool3d(1.0 - inside, kernel_size=2, stride=1)[0, 0] > 0
    return any_inside & any_outside


@pytest.mark.parametrize("obj", OBJECTS, ids=[o.prompt for o in OBJECTS])
def test_the_grid_converges_to_the_object_and_never_carves_into_its_surface(obj):
    grid = OccupancyGrid(resolution=32, min_optical_thickness=0.01, step_size=2.0 / 48)
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        grid.update(SDFField(obj), generator)
        surface = _surface_cells(obj, 32)
        assert bool(grid.occupied[surface].all()), "a cell the surface passes through was marked empty"
    assert grid.occupied_fraction < 0.3  # the rest of the cube is skipped


def test_renders_with_the_grid_match_renders_without_it_on_a_trained_field():
    from tests.conftest import tiny_config

    trainer = Trainer(tiny_config("a red ball", iterations=40, extra=["render.occupancy_warmup_steps=8"]))
    trainer.train()
    assert trainer.occupancy.occupied_fraction < 0.9
    cams = front_camera(3, azimuth=40.0, elevation=15.0)
    for mode in ("albedo", "lambertian", "textureless"):
        full = render(trainer.field, cams, 24, 64, trainer.shading(mode))
        skipped = render(trainer.field, cams, 24, 64, trainer.shading(mode), occupancy=trainer.occupancy)
        assert skipped.samples_evaluated < full.samples_evaluated
        # What the grid drops is space whose density dims a ray by less than 1% per march step.
        assert float((skipped.rgb - full.rgb).abs().max()) < 0.03, mode
        assert float((skipped.rgb - full.rgb).abs().mean()) < 0.003, mode


def test_the_termination_pass_keeps_exactly_the_samples_the_compositing_weighs():
    ball = SDFField(find_object("a red ball"))
    cams = front_camera(2, azimuth=30.0, elevation=20.0)
    origins, directions = (x.reshape(-1, 3) for x in generate_rays(cams, 16))
    b = (origins * directions).sum(-1)
    root = (b * b - (origins * origins).sum(-1) + 1.0).clamp_min(0).sqrt()
    near, far = (-b - root).clamp_min(0.0), (-b + root).clamp_min(0.0)
    samples = march_rays(origins, directions, near, far, torch.rand(origins.shape[0], 64), None, "torch")
    delta = ((far - near) / 64)[samples.ray]
    reached, log_density, albedo, probed = _march_until_spent(ball, samples, delta)

    every_log_density, every_albedo = ball.log_density_and_albedo(samples.points)
    before = transmittance(density_from_log(every_log_density) * delta, samples.start, samples.ray)
    assert torch.equal(reached, before >= STOP_TRANSMITTANCE)
    torch.testing.assert_close(log_density, every_log_density[reached])
    torch.testing.assert_close(albedo, every_albedo[reached])
    # Rays through the ball stop: a spent ray is evaluated at most one segment past its last sample.
    assert int(reached.sum()) < probed < len(samples)
    rays = int((samples.count > 0).sum())
    assert probed <= int(reached.sum()) + TERMINATION_SEGMENT * rays


@pytest.mark.parametrize("deferred", [False, True], ids=["each sample", "deferred"])
def test_one_march_renders_each_shading_as_its_own_render_does(deferred):
    ball = SDFField(find_object("a red ball"))
    grid = OccupancyGrid(resolution=16, min_optical_thickness=0.01, step_size=2.0 / 48)
    grid.update(ball, torch.Generator().manual_seed(0))
    cams = front_camera(3, azimuth=50.0, elevation=10.0)
    shadings = (Shading("albedo"), Shading("lambertian"), Shading("textureless"))
    together = render_shadings(ball, cams, 16, 48, shadings, grid, deferred=deferred)
    batched = render_batched_shadings(ball, cams, 16, 48, shadings, grid, max_samples=16 * 16 * 48, deferred=deferred)
    for shading, one, chunked in zip(shadings, together, batched, strict=True):
        alone = render(ball, cams, 16, 48, shading, grid, deferred=deferred)
        torch.testing.assert_close(one.rgb, alone.rgb, rtol=0, atol=1e-6)
        torch.testing.assert_close(chunked.rgb, alone.rgb, rtol=0, atol=1e-6)
        torch.testing.assert_close(one.opacity, alone.opacity, rtol=0, atol=1e-6)
        assert one.samples_evaluated == alone.samples_evaluated


@pytest.mark.parametrize("mode", ["albedo", "lambertian"])
def test_early_termination_gives_the_gradients_of_the_dense_path(mode):
    from tests.conftest import tiny_config

    trainer = Trainer(tiny_config("a red ball", iterations=20))
    trainer.train()
    everything = OccupancyGrid(resolution=8, min_optical_thickness=0.0, step_size=1.0)  # all occupied
    cams = front_camera(2, azimuth=20.0, elevation=10.0)
    grads, evaluated = [], []
    for grid in (None, everything):
        trainer.field.zero_grad(set_to_none=True)
        out = render(trainer.field, cams, 16, 32, trainer.shading(mode), occupancy=grid,
                     generator=torch.Generator().manual_seed(3))
        (out.rgb.square().sum() + out.opacity.sum() + out.orientation_loss).backward()
        grads.append(trainer.field.encoder.table.grad.clone())
        evaluated.append(out.samples_evaluated)
    assert evaluated[1] < evaluated[0]  # rays stopped behind the ball's surface
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_deferred_shading_matches_shading_each_sample_on_a_surface():
    ball = SDFField(find_object("a red ball"))
    cams = front_camera(2, azimuth=30.0, elevation=20.0)
    for mode in ("lambertian", "textureless"):
        each = render(ball, cams, 24, 96, Shading(mode))
        once = render(ball, cams, 24, 96, Shading(mode), deferred=True)
        # One normal at the expected surface point instead of the weighted mean of the samples' normals:
        # the same on a surface, apart from the silhouette's partly covered pixels.
        assert float((once.rgb - each.rgb).abs().mean()) < 0.01, mode
        assert float((once.normals - each.normals).abs().mean()) < 0.02, mode
        torch.testing.assert_close(once.opacity, each.opacity)


def test_a_refreshed_grid_forgets_the_field_it_was_built_on():
    """Early in training the grid's decayed memory still holds the first field; a refresh holds the field as
    it stands, as a grid that only ever saw it would, and the march evaluates fewer samples."""
    ball = SDFField(find_object("a red ball"))

    class InitialBlob(torch.nn.Module):  # a wide, dense start, as a field's initial blob is
        def log_density_and_albedo(self, points):
            inside = points.norm(dim=-1) < 0.9
            return torch.where(inside, math.log(50.0), -20.0), torch.full_like(points, 0.5)

    grid = OccupancyGrid(resolution=16, min_optical_thickness=0.01, step_size=2.0 / 48)
    for _ in range(3):
        grid.update(InitialBlob(), torch.Generator().manual_seed(0))
    grid.update(ball, torch.Generator().manual_seed(1))
    cams = front_camera(2, azimuth=30.0, elevation=10.0)
    stale = render(ball, cams, 16, 48, Shading("albedo"), grid)
    grid.refresh(ball, torch.Generator().manual_seed(2))
    only_ball = OccupancyGrid(resolution=16, min_optical_thickness=0.01, step_size=2.0 / 48)
    generator = torch.Generator().manual_seed(2)
    only_ball.density.zero_()
    for _ in range(4):
        only_ball.update(ball, generator, decay=1.0)
    assert torch.equal(grid.occupied, only_ball.occupied) and torch.equal(grid.density, only_ball.density)
    fresh = render(ball, cams, 16, 48, Shading("albedo"), grid)
    assert fresh.samples_evaluated < stale.samples_evaluated
    assert float((fresh.rgb - stale.rgb).abs().max()) < 0.03


def test_a_short_run_brings_its_grid_up_to_date_and_a_converged_run_keeps_its_own():
    from tests.conftest import tiny_config

    grid_settings = ["render.occupancy_warmup_steps=8", "render.occupancy_update_every=2"]
    short = Trainer(tiny_config("a red ball", iterations=3, extra=grid_settings))
    short.train()
    before = short.occupancy.density.clone()
    assert short.bring_grid_up_to_date() and not torch.equal(short.occupancy.density, before)
    converged = Trainer(tiny_config("a red ball", iterations=8, extra=grid_settings))
    converged.train()
    state = {k: v.clone() for k, v in converged.occupancy.state_dict().items()}
    cams = front_camera(2, azimuth=30.0, elevation=10.0)
    renders = converged.render_views(cams, 16, (converged.shading("albedo"),))[0].rgb
    assert not converged.bring_grid_up_to_date()
    assert all(torch.equal(v, converged.occupancy.state_dict()[k]) for k, v in state.items())
    assert torch.equal(converged.render_views(cams, 16, (converged.shading("albedo"),))[0].rgb, renders)
