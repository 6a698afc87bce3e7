import re

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import trimesh

from dreamfusion.export import field_views, render_turntable, write_progress, write_videos, write_viewer
from dreamfusion.mesh import bake_texture, extract_mesh, write_textured
from dreamfusion.prior.shapes import SDFField, find_object
from dreamfusion.renderer import Shading


@pytest.fixture(scope="module")
def cube_mesh():
    return extract_mesh(SDFField(find_object("a blue cube")), resolution=48, density_threshold=10.0)


@pytest.fixture(scope="module")
def cube_textured(cube_mesh):
    return bake_texture(SDFField(find_object("a blue cube")), cube_mesh, 128)


def test_mesh_files_load_back_with_the_object_bounds(cube_mesh, cube_textured, tmp_path):
    paths = write_textured(cube_textured, cube_mesh, tmp_path)
    assert set(paths) == {"mesh_glb", "mesh_obj", "mesh_mtl", "texture_png", "mesh_ply"}
    for key in ("mesh_glb", "mesh_obj", "mesh_ply"):
        loaded = trimesh.load(paths[key], force="mesh")
        assert len(loaded.faces) > 100
        np.testing.assert_allclose(loaded.bounds, [[-0.42] * 3, [0.42] * 3], atol=0.05)
    assert cube_mesh.is_watertight
    assert cube_mesh.volume > 0  # outward-facing normals
    colours = np.asarray(cube_mesh.visual.vertex_colors)[:, :3]
    assert colours[:, 2].mean() > colours[:, 0].mean()  # blue


def test_viewer_is_self_contained(cube_textured, tmp_path):
    path = write_viewer(cube_textured, tmp_path / "viewer.html", "a <blue> cube")
    text = path.read_text()
    assert not re.search(r"(https?:)?//[\w.-]+\.[a-z]{2,}", text), "viewer must make no network request"
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", text)
    assert "a &lt;blue&gt; cube" in text and "<blue>" not in text
    assert '"indices"' in text and '"uvs"' in text and '"texture"' in text and "webgl" in text


def test_turntable_videos_decode(tmp_path):
    field = SDFField(find_object("a house with a red door"))
    frames = render_turntable(field_views(field, samples_per_ray=48), frames=4, resolution=32,
                              shading=Shading("lambertian"))
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    assert not np.array_equal(frames[0], frames[1])  # the camera moves
    paths = write_videos(frames, tmp_path, fps=4)
    gif = imageio.mimread(paths["video_gif"])
    assert len(gif) == 4
    assert paths["video_webm"].stat().st_size > 100
    assert paths["video_webm"].read_bytes()[:4] == b"\x1a\x45\xdf\xa3"  # EBML (WebM) magic


def test_empty_field_gives_a_clear_mesh_error():
    from tests.test_renderer import EmptyField

    with pytest.raises(ValueError, match="never crosses"):
        extract_mesh(EmptyField(), resolution=16)


def test_progress_rows_of_another_resolution_are_scaled_to_the_last(tmp_path):
    # A run resumed with another export.progress_resolution keeps its earlier, smaller rows.
    small = torch.full((16, 8 * 16, 3), 200, dtype=torch.uint8)
    large = torch.full((32, 8 * 32, 3), 50, dtype=torch.uint8)
    image = imageio.imread(write_progress([(0, small), (5, large)], tmp_path / "progress.png"))
    assert image.shape == (2 * 32, 8 * 32, 3)
    assert (image[16:32, 100:] == 200).all() and (image[32 + 16:, 100:] == 50).all()  # below the step labels
