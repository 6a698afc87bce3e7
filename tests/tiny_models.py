"""Tiny random-weight models built with the real diffusers/transformers classes and saved as those
libraries save downloaded weights, so loading runs through the same code path, offline."""

from __future__ import annotations

from pathlib import Path

import torch

from dreamfusion.bench_text import word_level_tokenizer

WORDS = ["a", "red", "ball", "blue", "cube", "cat", "green", "dog", "front", "side", "back", "overhead", "view", ","]


def tokenizer(max_length: int):
    return word_level_tokenizer(WORDS, max_length)


def _scheduler(**kwargs):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, **kwargs)


def build_tiny_sd(root: Path) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer(16).save_pretrained(root / "tokenizer")
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


def build_tiny_if(root: Path) -> Path:
    from diffusers import UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer(77).save_pretrained(root / "tokenizer")
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


def build_tiny_clip(root: Path, image_size: int = 32, crop: int = 32) -> Path:
    """A CLIP model whose processor resizes to ``image_size`` and centre-crops ``crop`` pixels."""
    from transformers import CLIPConfig, CLIPModel

    from dreamfusion.clip_eval import image_processor_class

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(WORDS) + 2, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "pad_token_id": 0,
                     "bos_token_id": 0, "eos_token_id": 0},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": crop, "patch_size": 8},
        projection_dim=8)
    CLIPModel(config).save_pretrained(root)
    tokenizer(16).save_pretrained(root)
    processor = image_processor_class()(size={"shortest_edge": image_size}, crop_size={"height": crop, "width": crop})
    processor.save_pretrained(root)
    return root
