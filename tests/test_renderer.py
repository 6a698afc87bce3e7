import torch

from dreamfusion.cameras import cameras_from_angles, generate_rays, sample_cameras, view_label
from dreamfusion.config import CameraConfig
from dreamfusion.field import RadianceField
from dreamfusion.prior.shapes import SDFField, find_object
from dreamfusion.renderer import OccupancyGrid, Shading, render


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
    grid = OccupancyGrid(resolution=16, threshold=0.01)
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
