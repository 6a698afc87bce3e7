import math

import pytest
import torch

from dreamfusion.cameras import VIEW_LABELS, ViewCondition
from dreamfusion.errors import UserInputError
from dreamfusion.evaluate import _downsample, held_out_cameras
from dreamfusion.prior.shapes import OBJECTS, find_object, known_prompts
from dreamfusion.prior.synthetic import (
    PriorSpec,
    SyntheticPrior,
    load_or_build_images,
    prompt_index,
    render_ground_truth,
)
from tests.conftest import views_of

SPEC = PriorSpec(resolution=16, views=48)


@pytest.fixture(scope="module")
def prior() -> SyntheticPrior:
    return SyntheticPrior(SPEC)


def test_library_size_and_fronts():
    assert len(OBJECTS) >= 10
    assert sum(obj.has_front for obj in OBJECTS) >= 3
    assert len(set(known_prompts())) == len(OBJECTS)


def test_prompt_matching_and_unknown_prompt():
    assert find_object("  A   Red BALL. ").prompt == "a red ball"
    with pytest.raises(UserInputError) as err:
        find_object("a flying saucer")
    assert "a red ball" in str(err.value) and "a head with a face" in str(err.value)


def test_posterior_mean_matches_brute_force(prior):
    torch.manual_seed(0)
    mask = prior.candidates(3, views_of(["front", "back"]), 2)
    alpha_bar = torch.tensor([0.7, 0.05])
    noisy = torch.randn(2, prior.flat.shape[1])
    fast = prior.posterior_mean(noisy, alpha_bar, mask)
    images = prior.flat.double()
    for b in range(2):
        members = mask[b].nonzero().squeeze(1).tolist()
        logits = torch.tensor([
            -float(((noisy[b].double() - math.sqrt(alpha_bar[b]) * images[i]) ** 2).sum()) / (2 * (1 - alpha_bar[b]))
            for i in members
        ], dtype=torch.float64)
        weights = torch.softmax(logits, 0)
        expected = (weights[:, None] * images[members]).sum(0)
        torch.testing.assert_close(fast[b].double(), expected, atol=1e-4, rtol=1e-4)


def test_conditioning_restricts_to_prompt_and_view(prior):
    of_prompt = prior.prompt_ids == 6
    for index, label in enumerate(VIEW_LABELS):
        mask = prior.candidates(6, views_of([label]), 1)[0]
        if bool((of_prompt & (prior.view_ids == index) & prior.textureless).any()):
            assert bool(mask.eq(of_prompt & (prior.view_ids == index)).all())
        else:  # no photo with that label: fall back to all of the prompt's photos
            assert bool(mask.eq(of_prompt).all())
    assert int(prior.candidates(None, None, 1).sum()) == prior.flat.shape[0]
    assert bool(prior.candidates(6, None, 1)[0].eq(prior.prompt_ids == 6).all())
    colour = ~prior.textureless
    assert bool(prior.candidates(6, views_of(["front"]), 1, colour)[0].eq(
        colour & (prior.prompt_ids == 6) & (prior.view_ids == 0)).all())


def _angle_degrees(prior: SyntheticPrior, views: ViewCondition, mask: torch.Tensor) -> torch.Tensor:
    cosines = (views.directions() @ prior.directions[mask].T).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cosines))


def test_camera_conditioning_keeps_each_prompts_photos_nearest_the_camera(prior):
    data = load_or_build_images(SPEC)
    colour = ~prior.textureless
    photo = int(((prior.prompt_ids == 4) & colour).nonzero()[5])
    at_photo = views_of(["front"], [float(data["azimuth_degrees"][photo])], [float(data["elevation_degrees"][photo])])
    only = prior.candidates(4, at_photo, 1, colour, camera_neighbours=1)[0]
    assert only.nonzero().squeeze(1).tolist() == [photo]  # the photo taken from the render's own camera

    views = views_of(["back", "side"], [170.0, -80.0], [10.0, 40.0])
    for row, view in enumerate((views_of(["back"], [170.0], [10.0]), views_of(["side"], [-80.0], [40.0]))):
        mask = prior.candidates(4, views, 2, colour, camera_neighbours=5)[row]
        assert int(mask.sum()) == 5 and bool((mask <= (colour & (prior.prompt_ids == 4))).all())
        others = colour & (prior.prompt_ids == 4) & ~mask
        assert float(_angle_degrees(prior, view, mask).max()) <= float(_angle_degrees(prior, view, others).min())
        # Without a prompt (the unconditional): the nearest photos of every prompt.
        everyone = prior.candidates(None, views, 2, colour, camera_neighbours=5)[row]
        assert int(everyone.sum()) == 5 * len(OBJECTS)
        assert [int((everyone & (prior.prompt_ids == p)).sum()) for p in range(len(OBJECTS))] == [5] * len(OBJECTS)


def test_views_are_front_biased(prior):
    colour = ~prior.textureless
    front_share = float((prior.view_ids[colour] == VIEW_LABELS.index("front")).float().mean())
    assert front_share > 0.6  # 70% drawn from the front arc, plus the uniform draws that land there


def test_ground_truth_is_classified_correctly(prior):
    """The classifier's ceiling on this small prior (16 px, 48 photos per object); the default is larger."""
    cameras = held_out_cameras().slice(0, 8)
    colour_hits, flat_hits = [], []
    for index, obj in enumerate(OBJECTS):
        colour, _ = render_ground_truth(obj, cameras, 16)
        flat, _ = render_ground_truth(obj, cameras, 16, textureless=True)
        colour_hits.append(float((prior.classify_prompts(colour).argmax(-1) == index).float().mean()))
        flat_hits.append(float((prior.classify_prompts(flat, textureless=True).argmax(-1) == index).float().mean()))
    assert min(colour_hits) >= 0.5 and sum(colour_hits) / len(colour_hits) >= 0.85, colour_hits
    assert sum(flat_hits) / len(flat_hits) >= 0.6, flat_hits


def test_view_classifier_tells_front_from_back(prior):
    from dreamfusion.evaluate import back_cameras, front_cameras

    head = find_object("a head with a face")
    index = known_prompts().index(head.prompt)
    front, _ = render_ground_truth(head, front_cameras(), 16)
    back, _ = render_ground_truth(head, back_cameras(), 16)
    assert prior.classify_views(_downsample(front, 16), index).count("front") >= 4
    assert prior.classify_views(_downsample(back, 16), index).count("front") == 0


def test_cache_is_reused_and_a_truncated_cache_is_rebuilt(prior_cache):
    first = load_or_build_images(SPEC)
    path = prior_cache / f"synthetic-prior-{SPEC.cache_key()}.safetensors"
    assert path.exists()
    path.write_bytes(path.read_bytes()[:100])
    rebuilt = load_or_build_images(SPEC)
    torch.testing.assert_close(rebuilt["images"], first["images"])


def test_backdrop_sets_the_photos_and_ground_truth_background():
    obj = find_object("a white snowman")
    cameras = held_out_cameras().slice(0, 2)
    white, opacity_white = render_ground_truth(obj, cameras, 16, backdrop=1.0)
    grey, opacity_grey = render_ground_truth(obj, cameras, 16, backdrop=0.5)
    assert torch.allclose(opacity_white, opacity_grey)
    empty = opacity_grey[:, 0] < 1e-3
    assert torch.allclose(grey.permute(0, 2, 3, 1)[empty], torch.full((1, 3), 0.5), atol=1e-3)
    assert torch.allclose(white.permute(0, 2, 3, 1)[empty], torch.ones(1, 3), atol=1e-3)
    assert PriorSpec(backdrop=0.5).cache_key() != PriorSpec(backdrop=1.0).cache_key()


def test_camera_conditioned_guidance_denoises_to_the_photo_from_the_nearest_camera(prior):
    from dreamfusion.config import Config, apply_overrides
    from dreamfusion.guidance.synthetic import SyntheticGuidance

    config = apply_overrides(Config(prompt="a purple donut"),
                             ["guidance.prior_conditioning=camera", "guidance.prior_camera_neighbours=1"])
    guidance = SyntheticGuidance(config, prior=prior)
    data = load_or_build_images(SPEC)
    colour = ~prior.textureless
    photo = int(((prior.prompt_ids == 4) & colour).nonzero()[7])
    views = views_of(["side"], [float(data["azimuth_degrees"][photo]) + 2.0], [float(data["elevation_degrees"][photo])])
    noisy = torch.randn(1, prior.flat.shape[1])  # a sample far from any photo: only the camera decides
    alpha_bar = torch.tensor([0.5])
    conditional, unconditional, guided = guidance.predictions(noisy, alpha_bar, views, 1.0)
    torch.testing.assert_close(conditional[0], prior.flat[photo])
    torch.testing.assert_close(guided, conditional)
    nearest_of_each_prompt = prior.candidates(None, views, 1, colour, camera_neighbours=1)
    torch.testing.assert_close(unconditional, prior.posterior_mean(noisy, alpha_bar, nearest_of_each_prompt))
    # Without view-dependent conditioning the camera is not used: the prompt's photos from everywhere.
    free, _, _ = guidance.predictions(noisy, alpha_bar, None, 1.0)
    torch.testing.assert_close(free, prior.posterior_mean(noisy, alpha_bar, colour & (prior.prompt_ids == 4)))


def test_mean_warmup_answers_with_each_conditions_mean_photo_whatever_the_render(prior):
    from dreamfusion.config import Config, apply_overrides
    from dreamfusion.guidance.synthetic import SyntheticGuidance

    config = apply_overrides(Config(prompt="a house with a red door"),
                             ["guidance.prior_mean_warmup_fraction=0.25", "guidance.prior_conditioning=view_label"])
    guidance = SyntheticGuidance(config, prior=prior)
    colour = ~prior.textureless
    views = views_of(["front", "back"], [0.0, 180.0], [10.0, 10.0])
    house_fronts = colour & (prior.prompt_ids == prompt_index("a house with a red door")) & (prior.view_ids == 0)
    alpha_bar = torch.tensor([0.5, 0.9])
    for noisy in (torch.randn(2, prior.flat.shape[1]), prior.flat[colour][:2]):
        conditional, unconditional, guided = guidance.predictions(noisy, alpha_bar, views, 7.5, progress=0.2)
        torch.testing.assert_close(conditional[0], prior.flat[house_fronts].mean(0))
        torch.testing.assert_close(unconditional[1], prior.flat[colour].mean(0))
        torch.testing.assert_close(guided, unconditional + 7.5 * (conditional - unconditional))
    # Once the warm-up is over, the posterior at the sampled t again.
    after, _, _ = guidance.predictions(noisy, alpha_bar, views, 7.5, progress=0.25)
    masks = prior.candidates(prompt_index("a house with a red door"), views, 2, colour)
    torch.testing.assert_close(after, prior.posterior_mean(noisy, alpha_bar, masks))


def test_surface_photos_show_the_true_surface_sharply_and_shade_it_as_the_volume_photos_do():
    """Sphere-traced photos: their silhouettes are the SDF's zero set (no offset, where the volume photos show
    the ball grown by ~5% of its radius), their edges are antialiased coverage, and a fully covered pixel has
    the colour of the volume photo's at the same camera."""
    from dreamfusion.evaluate import photos_surface_offset
    from dreamfusion.geometry import level_set_silhouettes
    from dreamfusion.prior.synthetic import render_surface_photos

    assert abs(photos_surface_offset("a red ball", 32, photos="surface")) < 0.005
    assert photos_surface_offset("a red ball", 32) > 0.03
    ball = find_object("a red ball")
    cameras = held_out_cameras().slice(0, 3)
    colour, textureless, coverage = render_surface_photos(ball, cameras, 32)
    bare = level_set_silhouettes("a red ball", cameras, 32, 0.0) > 0.5
    covered = coverage > 0.5
    assert float((bare & covered).sum() / (bare | covered).sum()) > 0.97
    # Partly covered pixels exist, and only along the silhouette's edge.
    partial = (coverage > 0.05) & (coverage < 0.95)
    solid = bare.float()
    dilated, eroded = torch.nn.functional.max_pool2d(solid, 3, 1, 1), -torch.nn.functional.max_pool2d(-solid, 3, 1, 1)
    edge = dilated > eroded
    assert partial.any() and not (partial & ~edge).any()
    volume, opacity = render_ground_truth(ball, cameras, 32)
    inside = ((coverage == 1.0) & (opacity > 0.999)).expand_as(colour)
    assert float((colour[inside] - volume[inside]).abs().mean()) < 0.02
    flat, _ = render_ground_truth(ball, cameras, 32, textureless=True, photos="surface")
    torch.testing.assert_close(flat, textureless)
    outside = (coverage == 0.0).expand_as(colour)
    assert torch.allclose(colour[outside], torch.tensor(0.5))


def test_surface_photos_are_their_own_prior_and_the_volume_photos_keep_their_cache():
    surface = PriorSpec(resolution=16, views=8, photos="surface")
    assert surface.cache_key() != PriorSpec(resolution=16, views=8).cache_key()
    images = load_or_build_images(surface)["images"]
    assert images.shape == (len(OBJECTS) * 2 * 8, 3, 16, 16)
    # The volume photos' key is the one they had before photos had a kind (at f3868ac): those caches stay valid.
    assert PriorSpec().cache_key() == "b7c1fb060847d475"
