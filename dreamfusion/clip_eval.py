"""CLIP as the judge of a run on any backend (DreamFusion's Table 1).

- ``clip_score``: the mean cosine similarity between the prompt's CLIP text features and renders of the
  object at ``eval.clip_views`` evenly spaced azimuths, in colour; ``clip_score_textureless`` on
  textureless (geometry-only) renders.
- ``clip_r_precision`` (and ``_textureless``): the share of those renders for which CLIP ranks the run's
  own prompt first among a set of prompts (a sweep's prompts, plus ``eval.clip_prompt_set``).

Renders are preprocessed as the model's own image processor does (resize, centre crop, rescale,
normalise), in torch on the run's device. Text features come from the text-embedding cache, so a run
whose texts are cached loads CLIP's vision tower only.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dreamfusion.errors import UserInputError
from dreamfusion.export import orbit_cameras
from dreamfusion.guidance.diffusion import load_pretrained
from dreamfusion.renderer import render_surface
from dreamfusion.text_cache import TextEmbeddingCache

CLIP_SCORES = ("clip_score", "clip_score_textureless")
CLIP_METRICS = (*CLIP_SCORES, "clip_r_precision", "clip_r_precision_textureless")
OPTION = "eval.clip_model"
_TEXT_KIND = "CLIPTextModelWithProjection/text_embeds/padding=max_length"
_MODES = {"": "lambertian", "_textureless": "textureless"}


def read_prompt_set(path: Path, option: str = "eval.clip_prompt_set") -> list[str]:
    """Prompts to rank against: one per line, '#' comments and blank lines skipped, repeats once."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{option} {path} does not exist; give a text file with one prompt per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserInputError(f"{option} {path} is not UTF-8 text; save it as UTF-8") from None
    prompts = list(dict.fromkeys(" ".join(line.split()) for line in lines
                                 if line.strip() and not line.lstrip().startswith("#")))
    if not prompts:
        raise UserInputError(f"{option} {path} holds no prompts; write one prompt per line")
    return prompts


def ranking_prompts(prompt: str, others: list[str], prompt_set: str = "") -> list[str]:
    """The run's prompt first, then ``others`` (a sweep's prompts) and the distractors of ``prompt_set``."""
    distractors = read_prompt_set(Path(prompt_set)) if prompt_set.strip() else []
    return list(dict.fromkeys([prompt, *others, *distractors]))


def r_precision(image_features: torch.Tensor, text_features: torch.Tensor, target: int) -> float:
    """R@1: the share of images (rows, unit features) whose most similar text is ``target``."""
    return float(((image_features @ text_features.T).argmax(-1) == target).float().mean())


def _edge(size, *names: str) -> int:
    for name in names:
        value = size.get(name) if isinstance(size, dict) else getattr(size, name, None)
        if value:
            return int(value)
    raise UserInputError(f"the CLIP image processor's size {size!r} is not understood")


def _clip_config(model: str):
    from transformers import AutoConfig

    config = load_pretrained(AutoConfig, model, "", option=OPTION)
    if config.model_type != "clip":
        raise UserInputError(f"{OPTION} '{model}' is a {config.model_type} model, not CLIP; give a CLIP model "
                             "(a folder saved by CLIPModel.save_pretrained, or e.g. openai/clip-vit-base-patch32)")
    return config


def image_processor_class():
    """CLIP's PIL-based image processor, the reference one (transformers 5 calls it ``CLIPImageProcessorPil``
    and makes ``CLIPImageProcessor`` a torchvision port where torchvision is installed)."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def check_clip_model(model: str) -> None:
    """Fail now, with one clear line, if ``model`` is not a loadable CLIP model (config and processor)."""
    _clip_config(model)
    load_pretrained(image_processor_class(), model, "", option=OPTION)


def clip_text_features(model: str, texts: list[str], device: torch.device,
                       cache: TextEmbeddingCache | None = None) -> torch.Tensor:
    """Unit CLIP text features ``[len(texts), D]``; CLIP's text tower is built only for uncached texts."""

    @torch.no_grad()
    def compute(missing: list[str]) -> dict[str, torch.Tensor]:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        config = _clip_config(model)
        text_config = config.text_config
        text_config.projection_dim = config.projection_dim
        tokenizer = load_pretrained(AutoTokenizer, model, "", option=OPTION)
        encoder = load_pretrained(CLIPTextModelWithProjection, model, "", option=OPTION, config=text_config,
                                  use_safetensors=True).to(device).eval()
        # Padded to a fixed length: a text's features never depend on the other texts of its batch.
        length = min(tokenizer.model_max_length, text_config.max_position_embeddings)
        tokens = tokenizer(missing, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        features = encoder(input_ids=tokens.input_ids.to(device),
                           attention_mask=tokens.attention_mask.to(device)).text_embeds.float().cpu()
        return {text: features[i] for i, text in enumerate(missing)}

    if cache is None:
        values = compute(list(dict.fromkeys(texts)))
    else:
        values = cache.lookup(model, ("",), _TEXT_KIND, texts, compute)
    return F.normalize(torch.stack([values[text] for text in texts]).to(device), dim=-1)


class ClipJudge:
    """CLIP's vision tower and image processor, on ``device``; text features through the cache."""

    def __init__(self, model: str, device: torch.device, cache: TextEmbeddingCache | None = None,
                 views: int = 8, elevation: float = 15.0) -> None:
        from transformers import CLIPVisionModelWithProjection

        self.model, self.device, self.cache = model, device, cache
        self.views, self.elevation = views, elevation
        config = _clip_config(model)
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
        self.processor = load_pretrained(image_processor_class(), model, "", option=OPTION)
        self.vision = load_pretrained(CLIPVisionModelWithProjection, model, "", option=OPTION, config=vision_config,
                                      use_safetensors=True).to(device).eval()
        self.vision.requires_grad_(False)
        processor = self.processor
        self.resize_to = _edge(processor.size, "shortest_edge", "height") if processor.do_resize else None
        self.crop = (_edge(processor.crop_size, "height"), _edge(processor.crop_size, "width")) \
            if processor.do_center_crop else None
        self.render_resolution = self.resize_to or (self.crop[0] if self.crop else 224)
        self.mean = torch.tensor(processor.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, device=device).view(1, 3, 1, 1)

    @classmethod
    def from_config(cls, config, device: torch.device, cache: TextEmbeddingCache | None = None) -> ClipJudge:
        return cls(config.eval.clip_model, device, cache, config.eval.clip_views, config.eval.clip_elevation)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] → CLIP's pixel values, as its processor makes them from 8-bit images."""
        processor = self.processor
        pixels = (images.clamp(0, 1) * 255).round()  # the processor is handed 8-bit images
        height, width = pixels.shape[-2:]
        if self.resize_to is not None and min(height, width) != self.resize_to:
            scale = self.resize_to / min(height, width)
            size = (self.resize_to, int(width * scale)) if height <= width else (int(height * scale), self.resize_to)
            pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True)
            pixels = pixels.clamp(0, 255).round()
        if self.crop is not None:
            top = (pixels.shape[-2] - self.crop[0]) // 2
            left = (pixels.shape[-1] - self.crop[1]) // 2
            pixels = pixels[..., top:top + self.crop[0], left:left + self.crop[1]]
        if processor.do_rescale:
            pixels = pixels * processor.rescale_factor
        if processor.do_normalize:
            pixels = (pixels - self.mean) / self.std
        return pixels.float()

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images.to(self.device))
        return F.normalize(self.vision(pixel_values=pixels).image_embeds.float(), dim=-1)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        return clip_text_features(self.model, texts, self.device, self.cache)

    @torch.no_grad()
    def render_views(self, trainer) -> dict[str, torch.Tensor]:
        """The run's object at the judge's cameras, ``{"": colour, "_textureless": ...}`` in [0, 1]: one march
        per view, shaded per pixel (deferred) both ways, as the turntable is."""
        azimuth = torch.arange(self.views) * (360.0 / self.views)
        cameras = orbit_cameras(azimuth, torch.full((self.views,), self.elevation))
        samples = trainer.config.export.eval_samples_per_ray
        images: dict[str, list[torch.Tensor]] = {suffix: [] for suffix in _MODES}
        for view in range(self.views):  # a view at a time: CLIP's 224 px at 96 samples is 4.8 M samples
            camera = cameras.slice(view, view + 1)
            surface = render_surface(trainer.field, camera, self.render_resolution, samples, trainer.occupancy)
            for suffix, mode in _MODES.items():
                images[suffix].append(surface.shade(trainer.shading(mode), 1, self.render_resolution).rgb.cpu())
        return {suffix: torch.cat(parts).clamp(0, 1) for suffix, parts in images.items()}

    def judge(self, trainer, prompts: list[str] | None = None) -> dict[str, float]:
        """``clip_score``s of the run; with ``prompts`` (the run's own among them, two or more), R-precision."""
        prompt = trainer.config.prompt
        texts = list(dict.fromkeys([prompt, *(prompts or [])]))
        text_features = self.text_features(texts)
        metrics: dict[str, float] = {}
        for suffix, images in self.render_views(trainer).items():
            image_features = self.image_features(images)
            metrics[f"clip_score{suffix}"] = float((image_features @ text_features[0]).mean())
            if len(texts) > 1:
                metrics[f"clip_r_precision{suffix}"] = r_precision(image_features, text_features, 0)
        if len(texts) > 1:
            metrics["clip_prompt_set_size"] = float(len(texts))
        return metrics
