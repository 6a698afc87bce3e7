"""CLIP R-precision, DreamFusion's metric: how often CLIP picks a run's prompt, among a set of
prompts, for renders of the run's object; on colour renders and on textureless (geometry) renders."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dreamfusion.errors import UserInputError
from dreamfusion.evaluate import held_out_cameras
from dreamfusion.guidance.diffusion import load_pretrained
from dreamfusion.prior.synthetic import PHOTO_SHADING
from dreamfusion.renderer import render_batched
from dreamfusion.trainer import Trainer


def read_prompt_set(path: Path, prompt: str) -> list[str]:
    """One prompt per line ('#' comments); the run's own prompt is added when missing."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--prompt-set {path} does not exist; give a text file with one prompt per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserInputError(f"--prompt-set {path} is not UTF-8 text; save it as UTF-8") from None
    prompts = list(dict.fromkeys(line.strip() for line in lines if line.strip() and not line.startswith("#")))
    if prompt not in prompts:
        prompts.insert(0, prompt)
    if len(prompts) < 2:
        raise UserInputError(f"--prompt-set {path} needs other prompts than the run's own to rank against")
    return prompts


def _unit(features) -> torch.Tensor:
    # transformers 5 returns the projected features as ``pooler_output``; earlier versions a tensor.
    tensor = features if isinstance(features, torch.Tensor) else features.pooler_output
    return torch.nn.functional.normalize(tensor, dim=-1)


@torch.no_grad()
def clip_r_precision(trainer: Trainer, prompts: list[str], model: str) -> dict[str, float]:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    clip = load_pretrained(CLIPModel, model, "", use_safetensors=True).eval()
    tokenizer = load_pretrained(AutoTokenizer, model, "")
    processor = load_pretrained(CLIPImageProcessor, model, "")
    target = prompts.index(trainer.config.prompt)
    text = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    text_features = _unit(clip.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask))
    cameras = held_out_cameras()
    crop = processor.crop_size
    resolution = int(crop["height"] if isinstance(crop, dict) else getattr(crop, "height", crop))  # CLIP's input size
    metrics = {}
    for mode in ("lambertian", "textureless"):
        out = render_batched(trainer.field, cameras, resolution, trainer.config.export.eval_samples_per_ray,
                             replace(PHOTO_SHADING, mode=mode), trainer.occupancy)
        images = list((out.rgb.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
        pixels = processor(images=images, return_tensors="pt").pixel_values
        image_features = _unit(clip.get_image_features(pixel_values=pixels))
        best = (image_features @ text_features.T).argmax(-1)
        name = "colour" if mode == "lambertian" else "textureless"
        metrics[f"clip_r_precision_{name}"] = float((best == target).float().mean())
    metrics["clip_prompt_set_size"] = float(len(prompts))
    return metrics
