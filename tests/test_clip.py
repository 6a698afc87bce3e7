"""CLIP as the judge of any run, and the text-embedding cache, on tiny CLIP and diffusion models built
with the real transformers/diffusers classes (tests/tiny_models.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from dreamfusion.cli import main
from dreamfusion.clip_eval import (
    ClipJudge,
    clip_text_features,
    image_processor_class,
    r_precision,
    ranking_prompts,
    read_prompt_set,
)
from dreamfusion.config import Config, apply_backend_defaults, apply_overrides
from dreamfusion.errors import UserInputError
from dreamfusion.guidance.diffusion import DeepFloydIFGuidance, StableDiffusionGuidance, prompt_texts
from dreamfusion.pipeline import warm_text_cache
from dreamfusion.text_cache import TextEmbeddingCache
from dreamfusion.trainer import Trainer
from tests.conftest import TINY, tiny_config
from tests.tiny_models import build_tiny_clip

CPU = torch.device("cpu")


def _unit(output) -> torch.Tensor:
    tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return torch.nn.functional.normalize(tensor, dim=-1)


def direct_clip_score(model: Path, images: torch.Tensor, prompt: str) -> float:
    """CLIP score as a user computes it with transformers: CLIPModel, its processor, its tokenizer."""
    from transformers import AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(model).eval()
    processor = image_processor_class().from_pretrained(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    pixels = processor(images=list((images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)),
                       return_tensors="pt").pixel_values
    # Padded to the tokenizer's length: the tiny tokenizer's end-of-text token is its padding token.
    tokens = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        image = _unit(clip.get_image_features(pixel_values=pixels))
        text = _unit(clip.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask))
    return float((image @ text[0]).mean())


@pytest.fixture(scope="module")
def trained() -> Trainer:
    trainer = Trainer(tiny_config("a red ball", iterations=3))
    trainer.train()
    return trainer


@pytest.mark.parametrize("sizes", [(32, 32), (40, 32)], ids=["no-resize", "centre-crop"])
def test_in_run_clip_score_equals_a_direct_computation_with_clip_model(tmp_path, trained, sizes):
    model = build_tiny_clip(tmp_path / "clip", image_size=sizes[0], crop=sizes[1])
    judge = ClipJudge(str(model), CPU, TextEmbeddingCache(tmp_path / "cache"), views=4)
    assert judge.render_resolution == sizes[0]  # rendered at the processor's resize size: resizing is exact
    metrics = judge.judge(trained)
    views = judge.render_views(trained)
    assert views[""].shape == (4, 3, sizes[0], sizes[0])
    for suffix, images in views.items():
        assert metrics[f"clip_score{suffix}"] == pytest.approx(direct_clip_score(model, images, "a red ball"),
                                                               abs=1e-5)
    assert "clip_r_precision" not in metrics  # one prompt ranks against nothing


def test_preprocessing_matches_the_processor_when_it_must_resize(tmp_path):
    model = build_tiny_clip(tmp_path / "clip", image_size=40, crop=32)
    processor = image_processor_class().from_pretrained(model)
    judge = ClipJudge(str(model), CPU)
    images = torch.rand(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    expected = processor(
        images=list((images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)), return_tensors="pt")
    mine = judge.preprocess(images)
    assert mine.shape == expected.pixel_values.shape == (3, 3, 32, 32)
    # torch's antialiased bicubic against PIL's: the same filter, a few 8-bit levels apart at most.
    assert (mine - expected.pixel_values).abs().mean() < 0.02
    same_size = torch.rand(2, 3, 40, 40)
    exact = processor(
        images=list((same_size.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)), return_tensors="pt")
    torch.testing.assert_close(judge.preprocess(same_size), exact.pixel_values, rtol=0, atol=1e-5)


def test_r_precision_on_a_case_whose_answer_is_known():
    texts = torch.eye(3)
    images = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1, 0.0], [0.9, 0.0, 0.2], [0.1, 1.0, 0.0],
                                                         [0.0, 0.2, 1.0]]), dim=-1)
    assert r_precision(images, texts, 0) == 0.5
    assert r_precision(images, texts, 1) == 0.25
    assert r_precision(images, texts, 2) == 0.25


def test_r_precision_ranks_the_sweeps_prompts_and_the_distractors(tmp_path, trained, tiny_clip):
    distractors = tmp_path / "distractors.txt"
    distractors.write_text("# animals\na cat\n\na green dog\na cat\n", encoding="utf-8")
    prompts = ranking_prompts("a red ball", ["a red ball", "a blue cube"], str(distractors))
    assert prompts == ["a red ball", "a blue cube", "a cat", "a green dog"]
    judge = ClipJudge(str(tiny_clip), CPU, views=4)
    metrics = judge.judge(trained, prompts)
    assert metrics["clip_prompt_set_size"] == 4.0
    image_features = judge.image_features(judge.render_views(trained)[""])
    text_features = clip_text_features(str(tiny_clip), prompts, CPU)
    assert metrics["clip_r_precision"] == r_precision(image_features, text_features, 0)


def test_prompt_sets_that_cannot_be_read_are_one_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        read_prompt_set(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(UserInputError, match="holds no prompts"):
        read_prompt_set(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("a caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserInputError, match="not UTF-8"):
        read_prompt_set(latin)
    with pytest.raises(UserInputError, match="needs a CLIP model"):
        apply_overrides(Config(), [f"eval.clip_prompt_set={empty}"])


def test_clip_models_that_cannot_be_loaded_are_one_clear_error(tmp_path, tiny_sd, monkeypatch):
    with pytest.raises(UserInputError, match="does not exist.*eval.clip_model"):
        ClipJudge(str(tmp_path / "nowhere"), CPU)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserInputError, match="offline"):
        ClipJudge("openai/clip-vit-base-patch32", CPU)
    with pytest.raises(UserInputError, match="cannot load model"):
        ClipJudge(str(tiny_sd), CPU)  # a diffusers pipeline folder: no config at its root
    with pytest.raises(UserInputError, match="not CLIP"):
        ClipJudge(str(tiny_sd / "text_encoder"), CPU)  # a CLIP *text* model only


def test_cache_returns_bit_identical_values_and_recomputes_a_corrupt_entry(tmp_path, tiny_clip):
    cache = TextEmbeddingCache(tmp_path)
    calls = []

    def compute(texts):
        calls.append(list(texts))
        return {text: torch.randn(77, 16, dtype=torch.float32) for text in texts}

    first = cache.lookup(str(tiny_clip), ("",), "kind", ["a cat", "a dog"], compute)
    again = cache.lookup(str(tiny_clip), ("",), "kind", ["a dog", "a cat"], compute)
    assert calls == [["a cat", "a dog"]]
    assert all(torch.equal(first[t], again[t]) for t in first)
    cache.lookup(str(tiny_clip), ("",), "another kind", ["a cat"], compute)
    assert calls[-1] == ["a cat"]  # what is computed is part of the key
    entry = next(cache.root.rglob("*.safetensors"))
    entry.write_bytes(b"truncated")
    cache.lookup(str(tiny_clip), ("",), "kind", ["a cat", "a dog"], compute)
    assert len(calls[-1]) == 1  # only the unreadable entry is computed again


def test_a_changed_model_file_changes_the_key(tmp_path, tiny_clip):
    import shutil

    model = tmp_path / "clip"
    shutil.copytree(tiny_clip, model)
    cache = TextEmbeddingCache(tmp_path / "cache")
    before = cache.model_identity(str(model), ("",))
    assert before == cache.model_identity(str(model), ("",))
    config = json.loads((model / "config.json").read_text())
    config["projection_dim"] = 8  # the same value, other bytes: content is what counts
    (model / "config.json").write_text(json.dumps(config, indent=4))
    assert cache.model_identity(str(model), ("",)) != before
    assert cache.model_identity("someone/not-on-this-machine", ("",)) is None


def _count_constructions(monkeypatch, cls) -> list[int]:
    built = []
    original = cls.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__init__", counting)
    return built


def _real_config(backend: str, model: Path, clip: Path, *overrides: str) -> Config:
    config = Config(prompt="a red ball")
    config.guidance.backend = backend
    apply_backend_defaults(config, set())
    return apply_overrides(config, [*TINY, f"guidance.model={model}", f"eval.clip_model={clip}", "iterations=2",
                                    *overrides])


@pytest.mark.parametrize("backend", ["stable-diffusion", "deepfloyd-if"])
def test_a_trial_with_a_warm_cache_builds_no_text_encoder(tmp_path, monkeypatch, backend, tiny_sd, tiny_if,
                                                          tiny_clip):
    model = tiny_sd if backend == "stable-diffusion" else tiny_if
    guidance_class = StableDiffusionGuidance if backend == "stable-diffusion" else DeepFloydIFGuidance
    encoder_class = transformers.CLIPTextModel if backend == "stable-diffusion" else transformers.T5EncoderModel
    config = _real_config(backend, model, tiny_clip)
    uncached = guidance_class(config)  # no cache: the encoder is built, as without this feature
    cache = TextEmbeddingCache(tmp_path / "cache")
    prompts = ["a red ball", "a blue cube"]
    # CLIP: the 2 prompts; guidance: each prompt alone and with 4 view suffixes, and the empty prompt.
    assert warm_text_cache(config, prompts, prompts, cache, CPU) == 2 + 11

    guidance_encoders = _count_constructions(monkeypatch, encoder_class)
    clip_text_encoders = _count_constructions(monkeypatch, transformers.CLIPTextModelWithProjection)
    trainer = Trainer(config, text_cache=cache)
    judge = ClipJudge.from_config(config, CPU, cache)
    trainer.train()
    metrics = judge.judge(trainer, ["a red ball", "a blue cube"])
    assert guidance_encoders == [] and clip_text_encoders == []
    assert {"clip_score", "clip_score_textureless", "clip_r_precision", "clip_r_precision_textureless"} <= set(metrics)
    for key, text in prompt_texts("a red ball").items():  # the cached embeddings are the computed ones, exactly
        assert torch.equal(trainer.guidance.embeddings[key], uncached.embeddings[key]), text

    cold = TextEmbeddingCache(tmp_path / "cold")
    guidance_class(config, text_cache=cold)
    assert len(guidance_encoders) == 1  # a cold cache builds it once


@pytest.mark.slow
def test_run_and_eval_from_the_cli_report_clip_metrics_beside_the_priors(tmp_path, tiny_clip, capsys):
    out = tmp_path / "run"
    distractors = tmp_path / "prompts.txt"
    distractors.write_text("a blue cube\na cat\n")
    overrides = [arg for item in [*TINY, f"eval.clip_model={tiny_clip}", "eval.clip_views=4",
                                  f"eval.clip_prompt_set={distractors}"] for arg in ("--set", item)]
    assert main(["run", "a red ball", "--out", str(out), "--iters", "2", *overrides]) == 0
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    assert {"silhouette_iou", "clip_score", "clip_score_textureless", "clip_r_precision",
            "clip_r_precision_textureless"} <= set(metrics)
    assert -1.0 <= metrics["clip_score"] <= 1.0 and metrics["clip_prompt_set_size"] == 3.0
    capsys.readouterr()
    other = tmp_path / "others.txt"
    other.write_text("a green dog\n")
    assert main(["eval", str(out), "--clip", str(tiny_clip), "--prompt-set", str(other)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["clip_score"] == pytest.approx(metrics["clip_score"], abs=1e-6)
    assert again["clip_prompt_set_size"] == 2.0
    assert main(["eval", str(out), "--clip", str(tmp_path / "no-clip")]) == 2
    code = main(["run", "a red ball", "--out", str(tmp_path / "bad"), "--set", f"eval.clip_model={tmp_path}"])
    assert code == 2 and not (tmp_path / "bad").exists()
