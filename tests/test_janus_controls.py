"""Janus controls: a negative prompt, Perp-Neg and interpolated view embeddings, on every backend with views."""

from __future__ import annotations

import pytest
import torch

from dreamfusion.cameras import VIEW_LABELS
from dreamfusion.config import Config, apply_backend_defaults, apply_overrides
from dreamfusion.errors import UserInputError
from dreamfusion.guidance import check_config
from dreamfusion.guidance.diffusion import DeepFloydIFGuidance, StableDiffusionGuidance, prompt_texts
from dreamfusion.guidance.synthetic import SyntheticGuidance
from dreamfusion.sds import guided, perp_neg_views, view_weights
from dreamfusion.trainer import Trainer
from tests.conftest import TINY, views_of

VIEW_LABEL_PRIOR = ["guidance.prior_conditioning=view_label", "sds.guidance_scale=7.5"]


def perpendicular(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten().double(), b.flatten().double()
    return a - (a @ b) / (b @ b) * b


def test_perp_neg_equals_a_direct_computation_on_hand_made_predictions():
    generator = torch.Generator().manual_seed(0)
    unconditional, positive = torch.randn(2, 3, 4, 4, generator=generator)
    negatives = torch.randn(2, 2, 3, 4, 4, generator=generator)  # two samples, two negatives each
    strengths = torch.tensor([[1.5, 0.25], [0.0, 3.0]])
    scale = 7.5
    result = guided(unconditional[None].expand(2, -1, -1, -1), positive[None].expand(2, -1, -1, -1), scale,
                    negatives, strengths)
    for sample in range(2):
        expected = (unconditional + scale * (positive - unconditional)).double().flatten()
        for k in range(2):
            expected -= strengths[sample, k].double() * perpendicular(negatives[sample, k] - unconditional,
                                                                     positive - unconditional)
        torch.testing.assert_close(result[sample].double().flatten(), expected, rtol=1e-5, atol=1e-5)


def test_perp_neg_reduces_to_plain_guidance_for_parallel_negatives_and_zero_weights():
    generator = torch.Generator().manual_seed(1)
    unconditional, positive = torch.randn(2, 1, 3, 8, 8, generator=generator)
    plain = guided(unconditional, positive, 7.5)
    torch.testing.assert_close(plain, unconditional + 7.5 * (positive - unconditional))
    direction = positive - unconditional
    parallel = torch.stack([unconditional + 0.3 * direction, unconditional - 2.0 * direction], dim=1)
    torch.testing.assert_close(guided(unconditional, positive, 7.5, parallel, torch.tensor([[4.0, 9.0]])), plain,
                               rtol=1e-5, atol=1e-5)
    arbitrary = torch.randn(1, 2, 3, 8, 8, generator=generator)
    torch.testing.assert_close(guided(unconditional, positive, 7.5, arbitrary, torch.zeros(1, 2)), plain)


def test_perp_neg_weights_follow_the_azimuth():
    views = views_of(["front", "front", "side", "side", "back"], azimuths=[0.0, 45.0, 90.0, -120.0, 180.0])
    negatives, strengths = perp_neg_views(views, weight=2.0, front_decay=2.0, side_decay=10.0)
    assert negatives.shape == (5, 2, 4) and strengths.shape == (5, 2)
    front, side = VIEW_LABELS.index("front"), VIEW_LABELS.index("side")
    assert bool((negatives[:, 0, front] == 1).all() and (negatives[:, 1, side] == 1).all())
    assert strengths[0].tolist() == [0.0, 2.0]  # a front view negates the side view, not itself
    assert 0 < strengths[1, 0] < 2.0 and 0 < strengths[1, 1] < strengths[1, 0]
    assert strengths[4].tolist() == [2.0, 1.0]  # behind: the front view at full weight, the side at half
    assert strengths[2].tolist() == [2.0, 0.0]  # at the side: the front view
    assert strengths[3, 0] == 2.0  # -120° is behind the side: the front is negated too


def test_interpolated_views_at_the_label_azimuths_are_the_labels():
    views = views_of(["front", "side", "back", "side", "overhead"], azimuths=[0.0, 90.0, 180.0, -90.0, 30.0],
                     elevations=[10.0, 0.0, 20.0, 5.0, 75.0])
    labels = view_weights(views, interpolated=False)
    torch.testing.assert_close(view_weights(views, interpolated=True, overhead_elevation=60.0), labels)
    between = view_weights(views_of(["front"], azimuths=[45.0]), interpolated=True)
    torch.testing.assert_close(between, torch.tensor([[0.5, 0.5, 0.0, 0.0]]))


@pytest.mark.parametrize("backend", ["stable-diffusion", "deepfloyd-if"])
def test_real_backends_interpolate_the_label_embeddings(backend, tiny_sd, tiny_if):
    guidance = make_real(backend, tiny_sd, tiny_if, "sds.view_embedding=interpolated")
    at_labels = guidance.condition(views_of(["front", "side", "back"], azimuths=[0.0, 90.0, 180.0]), 3)
    for index, label in enumerate(("front", "side", "back")):
        torch.testing.assert_close(at_labels[index], guidance.embeddings[label])
    halfway = guidance.condition(views_of(["front"], azimuths=[45.0]), 1)[0]
    torch.testing.assert_close(halfway, (guidance.embeddings["front"] + guidance.embeddings["side"]) / 2)


def make_real(backend: str, tiny_sd, tiny_if, *overrides: str):
    config = Config(prompt="a red ball")
    config.guidance.backend = backend
    apply_backend_defaults(config, set())
    model = tiny_sd if backend == "stable-diffusion" else tiny_if
    config = apply_overrides(config, [*TINY, f"guidance.model={model}", "iterations=3", *overrides])
    return (StableDiffusionGuidance if backend == "stable-diffusion" else DeepFloydIFGuidance)(config)


def test_the_negative_prompt_changes_the_unconditional_text_and_nothing_else():
    plain, negative = prompt_texts("a hamburger"), prompt_texts("a hamburger", "{prompt}, blurry, low quality")
    assert negative[""] == "a hamburger, blurry, low quality" and plain[""] == ""
    assert {k: v for k, v in negative.items() if k != ""} == {k: v for k, v in plain.items() if k != ""}


@pytest.mark.parametrize("backend", ["stable-diffusion", "deepfloyd-if"])
def test_the_negative_prompt_replaces_only_the_unconditional_embedding(backend, tiny_sd, tiny_if):
    plain = make_real(backend, tiny_sd, tiny_if)
    negative = make_real(backend, tiny_sd, tiny_if, "sds.negative_prompt=ugly, blurry")
    assert not torch.allclose(plain.embeddings[""], negative.embeddings[""])
    for key in (None, *VIEW_LABELS):
        torch.testing.assert_close(plain.embeddings[key], negative.embeddings[key])


@pytest.mark.parametrize("backend", ["stable-diffusion", "deepfloyd-if"])
def test_perp_neg_is_one_batched_call_and_matches_the_formula(backend, tiny_sd, tiny_if):
    guidance = make_real(backend, tiny_sd, tiny_if, "sds.perp_neg=true", "sds.negative_prompt=ugly")
    calls = []
    unet = guidance.unet
    guidance.unet = lambda inputs, steps, encoder_hidden_states: calls.append(inputs.shape[0]) or unet(
        inputs, steps, encoder_hidden_states=encoder_hidden_states)
    channels = 4 if backend == "stable-diffusion" else 3
    noisy = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    steps = torch.tensor([500, 700])
    views = views_of(["side", "back"], azimuths=[100.0, 180.0])
    result = guidance.predict_noise(noisy, steps, views, 100.0)
    assert calls == [2 * 4]  # unconditional, positive and two negatives, for both samples, in one call

    def predict(text):
        return unet(noisy, steps, encoder_hidden_states=text).sample.float()[:, :channels]

    unconditional = predict(guidance.embeddings[""].expand(2, -1, -1))
    positive = predict(torch.stack([guidance.embeddings["side"], guidance.embeddings["back"]]))
    front = predict(guidance.embeddings["front"].expand(2, -1, -1))
    side = predict(guidance.embeddings["side"].expand(2, -1, -1))
    negatives, strengths = perp_neg_views(views, 2.0 * 100.0, 2.0, 10.0)
    for sample in range(2):
        expected = (unconditional[sample] + 100.0 * (positive[sample] - unconditional[sample])).double().flatten()
        for k, prediction in enumerate((front, side)):
            expected -= strengths[sample, k].double() * perpendicular(
                prediction[sample] - unconditional[sample], positive[sample] - unconditional[sample])
        torch.testing.assert_close(result[sample].double().flatten(), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["stable-diffusion", "deepfloyd-if"])
def test_the_controls_train_through_the_tiny_pipelines(backend, tiny_sd, tiny_if):
    model = tiny_sd if backend == "stable-diffusion" else tiny_if
    config = Config(prompt="a red ball")
    config.guidance.backend = backend
    apply_backend_defaults(config, set())
    config = apply_overrides(config, [*TINY, f"guidance.model={model}", "iterations=2", "sds.perp_neg=true",
                                      "sds.view_embedding=interpolated", "sds.negative_prompt={prompt}, blurry"])
    trainer = Trainer(config)
    for _ in range(2):
        metrics = trainer.train_step()
    assert torch.isfinite(torch.tensor(metrics["loss"])) and trainer.skipped_steps == 0


def synthetic(*overrides: str) -> SyntheticGuidance:
    config = apply_overrides(Config(prompt="a head with a face"), [*TINY, *VIEW_LABEL_PRIOR, *overrides])
    return SyntheticGuidance(config.validate())


def test_the_synthetic_prior_takes_every_control_with_view_labels():
    noisy = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    steps = torch.tensor([300, 600, 900])
    views = views_of(["front", "side", "back"], azimuths=[0.0, 90.0, 180.0])
    plain = synthetic().predict_noise(noisy, steps, views, 7.5)
    # At the labels' azimuths interpolation changes nothing.
    torch.testing.assert_close(synthetic("sds.view_embedding=interpolated").predict_noise(noisy, steps, views, 7.5),
                               plain)
    perp = synthetic("sds.perp_neg=true").predict_noise(noisy, steps, views, 7.5)
    assert not torch.allclose(perp[2], plain[2])  # behind, the front view is negated
    torch.testing.assert_close(synthetic("sds.perp_neg=true", "sds.perp_neg_weight=0").predict_noise(
        noisy, steps, views, 7.5), plain)
    negative = synthetic("sds.negative_prompt={prompt}, front view").predict_noise(noisy, steps, views, 7.5)
    assert not torch.allclose(negative, plain)
    # Perp-Neg without view-dependent conditioning: the positive is the prompt alone, the negatives follow views.
    unviewed = synthetic("sds.perp_neg=true", "sds.view_dependent=false")
    assert torch.isfinite(unviewed.predict_noise(noisy, steps, views, 7.5)).all()


@pytest.mark.parametrize(("overrides", "message"), [
    (["sds.perp_neg=true"], "guidance.prior_conditioning=view_label"),
    ([*VIEW_LABEL_PRIOR, "sds.negative_prompt=a dog, front view"], "not a condition the synthetic prior knows"),
    (["sds.view_embedding=interpolated", "sds.view_dependent=false"], "set sds.view_dependent=true"),
    (["sds.view_embedding=blended"], "sds.view_embedding must be one of"),
    (["sds.perp_neg_weight=-1"], "sds.perp_neg_weight"),
])
def test_bad_control_settings_are_one_clear_error(overrides, message):
    with pytest.raises(UserInputError, match=message.replace(".", r"\.")):
        check_config(apply_overrides(Config(prompt="a head with a face"), overrides))
