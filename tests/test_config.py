import math

import pytest

from dreamfusion.config import Config, apply_backend_defaults, apply_overrides, known_keys
from dreamfusion.errors import UserInputError


def test_overrides_coerce_types():
    config = apply_overrides(
        Config(),
        ["sds.guidance_scale=30", "render.occupancy_grid=false", "camera.fov_range=30,60", "iterations=12"],
    )
    assert config.sds.guidance_scale == 30.0
    assert config.render.occupancy_grid is False
    assert config.camera.fov_range == (30.0, 60.0)
    assert config.iterations == 12


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("sds.nope=1", "unknown config key 'sds.nope'"),
        ("nope", "--set expects key=value"),
        ("sds.guidance_scale=nan", "finite"),
        ("sds.guidance_scale=abc", "bad value"),
        ("optim.lr=-0.1", "optim.lr must be a positive number"),
        ("camera.fov_range=60,30", "low (60.0) > high (30.0)"),
        ("render.resolution=3", "render.resolution must lie in"),
        ("iterations=0", "iterations must be >= 1"),
        ("iterations=1.5", "expected an integer"),
        ("render.occupancy_grid=maybe", "expected true or false"),
        ("field.backend=cuda", "field.backend must be one of"),
        ("field.normals=finite", "field.normals must be one of"),
        ("sds.t_min=0.99", "sds.t_min (0.99) must be < sds.t_max"),
        ("sds.t_max_final=0.01", "sds.t_max_final (0.01) must lie in"),
        ("render.shading_ratios=0,0,0", "three non-negative weights"),
        ("field.max_resolution=4", "must be >= field.base_resolution"),
        ("guidance.backend=imagen", "guidance.backend must be one of"),
        ("export.progress_snapshots=-1", "export.progress_snapshots must lie in"),
        ("export.progress_resolution=8", "export.progress_resolution must lie in"),
        ("guidance.prior_conditioning=pose", "guidance.prior_conditioning must be one of view_label, camera"),
        ("guidance.prior_camera_neighbours=0", "must lie in [1, guidance.prior_views = 128], got 0"),
        ("guidance.prior_camera_neighbours=129", "must lie in [1, guidance.prior_views = 128], got 129"),
        ("guidance.prior_mean_warmup_fraction=1.5", "guidance.prior_mean_warmup_fraction must lie in"),
    ],
)
def test_bad_values_name_the_problem(override, fragment):
    with pytest.raises(UserInputError) as err:
        apply_overrides(Config(), [override])
    assert fragment in str(err.value)


def test_a_fixed_background_on_the_synthetic_prior_must_be_its_backdrop():
    with pytest.raises(UserInputError, match=r"set field.background_color=0.15,0.15,0.15 or field.background=learned"):
        apply_overrides(Config(), ["guidance.prior_backdrop=0.15"])
    dark = apply_overrides(Config(), ["guidance.prior_backdrop=0.15", "field.background_color=0.15,0.15,0.15"])
    assert dark.field.background_color == (0.15, 0.15, 0.15)
    assert apply_overrides(Config(), ["guidance.prior_backdrop=0.15", "field.background=learned"])


@pytest.mark.parametrize("backend", ["stable-diffusion", "deepfloyd-if"])
def test_real_backends_default_to_the_papers_guidance_and_a_learned_background(backend):
    config = Config()
    config.guidance.backend = backend
    apply_backend_defaults(config, {"field.background"} if backend == "deepfloyd-if" else set())
    assert config.sds.guidance_scale == 100.0
    # a key the user set keeps its value
    assert config.field.background == ("fixed" if backend == "deepfloyd-if" else "learned")
    synthetic = Config()
    assert (synthetic.sds.guidance_scale, synthetic.field.background) == (1.0, "fixed")
    assert synthetic.guidance.prior_conditioning == "camera"


def test_unknown_key_lists_known_keys():
    with pytest.raises(UserInputError) as err:
        apply_overrides(Config(), ["guidance_scale=3"])
    assert "sds.guidance_scale" in str(err.value)


def test_dict_round_trip_and_flat_keys():
    config = apply_overrides(Config(), ["sds.guidance_scale=42", "field.levels=6"])
    again = Config.from_dict(config.to_dict())
    assert again == config
    assert set(config.flat()) == set(known_keys())
    assert all(math.isfinite(v) for v in config.flat().values() if isinstance(v, float))
