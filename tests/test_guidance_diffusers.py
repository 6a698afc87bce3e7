"""Real guidance backends on tiny random-weight models built with the real diffusers/transformers
classes, saved to a folder and loaded through the same code path as downloaded weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dreamfusion.cli import main
from dreamfusion.config import Config, apply_backend_defaults, apply_overrides
from dreamfusion.errors import UserInputError
from dreamfusion.guidance.diffusion import VIEW_SUFFIXES, DeepFloydIFGuidance, StableDiffusionGuidance
from dreamfusion.sds import sds_loss
from dreamfusion.trainer import Trainer
from tests.conftest import TINY, views_of

WORDS = ["a", "red", "ball", "blue", "cube", "cat", "front", "side", "back", "overhead", "view", ","]


def _tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   model_max_length=max_length)


def _scheduler(**kwargs):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, **kwargs)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny-sd")
    _tokenizer(16).save_pretrained(root / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS) + 2, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                 pad_token_id=0, bos_token_id=0, eos_token_id=0)).save_pretrained(root / "text_encoder")
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                         attention_head_dim=2, norm_num_groups=4).save_pretrained(root / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=4, sample_size=16).save_pretrained(root / "vae")
    _scheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="module")
def tiny_if(tmp_path_factory) -> Path:
    from diffusers import UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny-if")
    _tokenizer(77).save_pretrained(root / "tokenizer")
    T5EncoderModel(T5Config(vocab_size=len(WORDS) + 2, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                            pad_token_id=0)).save_pretrained(root / "text_encoder")
    UNet2DConditionModel(sample_size=16, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(8, 16),
                         down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                         mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                         up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                         cross_attention_dim=16, encoder_hid_dim=16, attention_head_dim=8, norm_num_groups=4,
                         addition_embed_type="text", addition_embed_type_num_heads=2,
                         resnet_time_scale_shift="scale_shift",
                         act_fn="gelu").save_pretrained(root / "unet")
    _scheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range").save_pretrained(root / "scheduler")
    return root


def real_config(backend: str, model: Path, *overrides: str) -> Config:
    config = Config(prompt="a red ball")
    config.guidance.backend = backend
    apply_backend_defaults(config, set())
    return apply_overrides(config, [*TINY, f"guidance.model={model}", "iterations=4", *overrides])


@pytest.mark.parametrize("backend", ["stable-diffusion", "deepfloyd-if"])
def test_sds_step_trains_the_field_and_never_the_diffusion_model(backend, tiny_sd, tiny_if):
    model = tiny_sd if backend == "stable-diffusion" else tiny_if
    trainer = Trainer(real_config(backend, model))
    assert trainer.config.sds.guidance_scale == 100.0  # the paper's default for real models
    before = trainer.field.encoder.table.detach().clone()
    metrics = trainer.train_step()
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert trainer.field.encoder.table.grad is not None and trainer.field.encoder.table.grad.abs().sum() > 0
    assert not torch.equal(before, trainer.field.encoder.table.detach())
    frozen = [trainer.guidance.unet] + ([trainer.guidance.vae] if backend == "stable-diffusion" else [])
    for module in frozen:
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())


@pytest.mark.parametrize("backend", ["stable-diffusion", "deepfloyd-if"])
def test_text_embeddings_are_cached_per_view_and_the_encoder_freed(backend, tiny_sd, tiny_if):
    model = tiny_sd if backend == "stable-diffusion" else tiny_if
    guidance = (StableDiffusionGuidance if backend == "stable-diffusion" else DeepFloydIFGuidance)(
        real_config(backend, model))
    assert set(guidance.embeddings) == {None, "", *VIEW_SUFFIXES}
    assert not any(isinstance(v, torch.nn.Module) and "Text" in type(v).__name__ or "T5" in type(v).__name__
                   for v in vars(guidance).values())
    front, back = guidance.condition(views_of(["front", "back"]), 2)
    assert not torch.allclose(front, back)
    assert torch.equal(guidance.condition(None, 3)[2], guidance.embeddings[None])


def test_stable_diffusion_encodes_through_the_vae_with_gradients(tiny_sd):
    guidance = StableDiffusionGuidance(real_config("stable-diffusion", tiny_sd))
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    latents = guidance.encode(images)
    assert latents.shape == (2, 4, 8, 8)
    latents.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_latent_colour_warm_up_skips_the_vae(tiny_sd):
    guidance = StableDiffusionGuidance(real_config("stable-diffusion", tiny_sd, "guidance.latent_fraction=0.5"))
    calls = []
    guidance._encode_vae = lambda pixels: calls.append(1) or torch.zeros(1)
    early = guidance.encode(torch.rand(2, 3, 32, 32), progress=0.1)
    assert early.shape == (2, 4, 8, 8) and not calls


@pytest.mark.parametrize("mode", ["torch", "deepspeed"])
def test_activation_checkpointing_gives_the_same_gradients(tiny_sd, mode):
    images = torch.rand(2, 3, 16, 16)
    grads = {}
    for setting in ("off", mode):
        config = real_config("stable-diffusion", tiny_sd, f"guidance.checkpointing={setting}")
        guidance = StableDiffusionGuidance(config)
        pixels = images.clone().requires_grad_(True)
        guidance.encode(pixels).square().sum().backward()
        grads[setting] = pixels.grad
    torch.testing.assert_close(grads[mode], grads["off"], rtol=1e-5, atol=1e-6)


def test_field_checkpointing_gives_the_same_gradients():
    from tests.conftest import tiny_config

    grads = []
    for setting in ("false", "true"):
        trainer = Trainer(apply_overrides(tiny_config("a red ball"), [f"field.checkpointing={setting}",
                                                                      "render.shading_ratios=0,1,0",
                                                                      "render.albedo_warmup_fraction=0"]))
        trainer.train_step()
        grads.append(trainer.field.encoder.table.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_sds_gradient_matches_the_classifier_free_guidance_formula(tiny_if):
    guidance = DeepFloydIFGuidance(real_config("deepfloyd-if", tiny_if))
    config = real_config("deepfloyd-if", tiny_if).sds
    images = torch.rand(1, 3, 16, 16, requires_grad=True)
    result = sds_loss(guidance, images, views_of(["side"]), config, 0.0, torch.Generator().manual_seed(0))
    result.loss.backward()
    assert images.grad.abs().sum() > 0 and result.gradient_norm > 0


def test_missing_weights_are_one_clear_error(tmp_path, monkeypatch, capsys):
    with pytest.raises(UserInputError, match="does not exist"):
        StableDiffusionGuidance(real_config("stable-diffusion", tmp_path / "nowhere"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserInputError, match="offline") as caught:
        DeepFloydIFGuidance(real_config("deepfloyd-if", Path("DeepFloyd/IF-I-XL-v1.0")))
    assert "--model" in str(caught.value)
    with pytest.raises(UserInputError, match="needs a model"):
        apply_overrides(Config(), ["guidance.backend=stable-diffusion"])
    code = main(["run", "a red ball", "--out", str(tmp_path / "run"), "--guidance", "stable-diffusion",
                 "--model", "someone/not-downloaded"])
    assert code == 2 and "huggingface-cli download" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_run_with_deepfloyd_if_from_the_cli(tmp_path, tiny_if):
    out = tmp_path / "run"
    overrides = [arg for item in TINY for arg in ("--set", item)]
    code = main(["run", "a red ball", "--out", str(out), "--guidance", "deepfloyd-if", "--model", str(tiny_if),
                 "--iters", "3", *overrides])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["sds"]["guidance_scale"] == 100.0 and summary["metrics"] == {}
    assert (out / "mesh.glb").exists() and (out / "viewer.html").exists()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny-clip")
    config = CLIPConfig(
        text_config={"vocab_size": len(WORDS) + 2, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "pad_token_id": 0,
                     "bos_token_id": 0, "eos_token_id": 0},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8)
    CLIPModel(config).save_pretrained(root)
    _tokenizer(16).save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root)
    return root


@pytest.mark.slow
def test_clip_r_precision_from_the_cli(tmp_path, tiny_clip, capsys):
    out = tmp_path / "run"
    overrides = [arg for item in TINY for arg in ("--set", item)]
    assert main(["run", "a red ball", "--out", str(out), "--iters", "2", *overrides]) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue cube\na cat\n")
    capsys.readouterr()
    assert main(["eval", str(out), "--clip", str(tiny_clip), "--prompt-set", str(prompts)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for name in ("clip_r_precision_colour", "clip_r_precision_textureless"):
        assert 0.0 <= metrics[name] <= 1.0
    assert metrics["clip_prompt_set_size"] == 3.0
    assert main(["eval", str(out), "--clip", str(tiny_clip)]) == 2


def test_field_under_bf16_autocast_trains():
    from tests.conftest import tiny_config

    trainer = Trainer(apply_overrides(tiny_config("a red ball"), ["render.autocast=bf16"]))
    for _ in range(3):
        metrics = trainer.train_step()
    assert torch.isfinite(torch.tensor(metrics["loss"])) and trainer.skipped_steps == 0
    with pytest.raises(UserInputError, match="needs a CUDA device"):
        Trainer(apply_overrides(tiny_config("a red ball"), ["render.autocast=fp16", "device=cpu"]))


def test_out_of_memory_names_the_knobs(monkeypatch):
    from tests.conftest import tiny_config

    trainer = Trainer(tiny_config("a red ball"))

    def exhausted():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "_train_step", exhausted)
    with pytest.raises(UserInputError) as caught:
        trainer.train_step()
    for knob in ("render.resolution", "render.batch_size", "guidance.checkpointing", "guidance.dtype"):
        assert knob in str(caught.value)
