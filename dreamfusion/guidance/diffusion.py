"""Real diffusion models through diffusers: Stable Diffusion (latent) and DeepFloyd IF stage I (pixels).

Both load their parts from a local directory or a Hugging Face hub id, in the layout diffusers
pipelines are saved in (``tokenizer/``, ``text_encoder/``, ``unet/``, ``scheduler/``, and ``vae/``
for Stable Diffusion), from safetensors only. The text embeddings of the prompt with each view
suffix (", front view", ...) and of the empty prompt are computed once, then the text encoder is
freed: SDS only ever needs those few embeddings. With a text-embedding cache (``dreamfusion.text_cache``)
they are computed once per model and text, and a trial whose texts are cached never builds the encoder.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from dreamfusion.cameras import VIEW_LABELS, ViewCondition
from dreamfusion.config import Config
from dreamfusion.errors import UserInputError
from dreamfusion.guidance.base import Guidance
from dreamfusion.memory import checkpointer
from dreamfusion.sds import guided, negative_text, perp_neg_views, view_weights
from dreamfusion.text_cache import TextEmbeddingCache

log = logging.getLogger(__name__)

VIEW_SUFFIXES = VIEW_LABELS
# The widely used linear preview of Stable Diffusion's scaled latents as RGB in [-1, 1]; its
# pseudo-inverse maps a render's colour to latents for the latent-colour warm-up.
_LATENT_TO_RGB = torch.tensor([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])
_RGB_TO_LATENT = torch.linalg.pinv(_LATENT_TO_RGB)  # [3, 4]


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


@contextlib.contextmanager
def _transformers_errors_only():
    """Loading a tower of a two-tower checkpoint (CLIP's vision or text model) makes transformers print a
    report of every weight of the other tower, as a warning: expected here, so not shown; nor is its bar
    per loaded file (the run's own lines say what it does)."""
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)
        if bars:
            transformers_logging.enable_progress_bar()


def load_pretrained(loader, model: str, subfolder: str, option: str = "--model", **kwargs):
    """``loader.from_pretrained`` with one clear error for every way weights can be missing; ``option``
    is where the user names the model."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    local = Path(model).expanduser()
    source = str(local) if local.exists() else model
    if not local.exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        example = "stabilityai/stable-diffusion-2-1-base" if option == "--model" else "openai/clip-vit-base-patch32"
        raise UserInputError(f"model directory {model} does not exist; give {option} the folder the model was "
                             f"saved to (save_pretrained), or a hub id such as {example}")
    try:
        with _transformers_errors_only():
            return loader.from_pretrained(source, subfolder=subfolder, local_files_only=offline or local.exists(),
                                          **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        where = "offline (HF_HUB_OFFLINE=1)" if offline else "and could not be downloaded"
        part = f"{subfolder}/ of " if subfolder else ""
        raise UserInputError(
            f"cannot load {part}model '{model}' ({first}); it is not on this machine {where}: "
            f"download it where there is internet (huggingface-cli download {model}) and pass its local "
            f"directory with {option}, or check the id (gated models need `huggingface-cli login`)"
        ) from None


def prompt_texts(prompt: str, negative_prompt: str = "") -> dict[str | None, str]:
    """The texts SDS conditions on: the prompt (key None), the unconditional branch's text (key "": the empty
    prompt, or the negative prompt with ``{prompt}`` filled in), and the prompt per view."""
    return {None: prompt, "": negative_text(negative_prompt, prompt),
            **{view: f"{prompt}, {view} view" for view in VIEW_SUFFIXES}}


class DiffusersGuidance(Guidance):
    """What Stable Diffusion and DeepFloyd IF share: text embeddings per view, CFG, precision."""

    text_encoder_class: str
    max_length: int | None = None
    uses_attention_mask = False

    def __init__(self, config: Config, device: torch.device | None = None, components: dict | None = None,
                 text_cache: TextEmbeddingCache | None = None) -> None:
        """Loads ``config.guidance.model``, its text embeddings from ``text_cache`` where they are cached; or
        takes ready ``components`` (``unet``, ``scheduler``, ``embeddings`` and for Stable Diffusion ``vae``),
        as the benchmark does with random weights."""
        from diffusers import DDPMScheduler, UNet2DConditionModel

        self.config = config
        self.device = device or torch.device("cpu")
        self.dtype = _dtype(config.guidance.dtype, self.device)
        model = config.guidance.model
        if components is None:
            texts = prompt_texts(config.prompt, config.sds.negative_prompt)
            embedded = self.embed_texts(model, list(texts.values()), self.device, text_cache)
            components = {"unet": load_pretrained(UNet2DConditionModel, model, "unet", use_safetensors=True,
                                                  torch_dtype=self.dtype),
                          "scheduler": load_pretrained(DDPMScheduler, model, "scheduler"),
                          "embeddings": {key: embedded[text] for key, text in texts.items()}}
        self.alphas_cumprod = components["scheduler"].alphas_cumprod.float().cpu()
        self.embeddings = {key: value.to(self.device, self.dtype) for key, value in components["embeddings"].items()}
        self.unet = self._freeze(components["unet"])  # diffusers' default attention is torch's SDPA
        if config.guidance.compile:
            self.unet = torch.compile(self.unet)

    @classmethod
    def text_kind(cls) -> str:
        """What ``embed_texts`` computes, for the cache key: the encoder's last hidden state, padded as here."""
        return f"{cls.text_encoder_class}/last_hidden_state/max_length={cls.max_length}/mask={cls.uses_attention_mask}"

    @classmethod
    def embed_texts(cls, model: str, texts: list[str], device: torch.device,
                    cache: TextEmbeddingCache | None = None) -> dict[str, torch.Tensor]:
        """Text-encoder outputs ``[tokens, width]`` per text; with a ``cache``, the encoder is built only for
        the texts it lacks."""
        compute = functools.partial(cls._encode_with_new_encoder, model, device=device)
        if cache is None:
            return compute(list(dict.fromkeys(texts)))
        return cache.lookup(model, ("tokenizer", "text_encoder"), cls.text_kind(), texts, compute)

    @classmethod
    @torch.no_grad()
    def _encode_with_new_encoder(cls, model: str, texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        import transformers

        tokenizer = load_pretrained(transformers.AutoTokenizer, model, "tokenizer")
        text_encoder = load_pretrained(getattr(transformers, cls.text_encoder_class), model, "text_encoder",
                                       use_safetensors=True).to(device).eval()
        # Padded to a fixed length, so a text's embedding does not depend on the others in its batch.
        length = cls.max_length or tokenizer.model_max_length
        tokens = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        kwargs = {"attention_mask": tokens.attention_mask.to(device)} if cls.uses_attention_mask else {}
        hidden = text_encoder(tokens.input_ids.to(device), **kwargs)[0].float().cpu()
        del text_encoder, tokenizer  # never needed again: free it before the UNet takes the memory
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {text: hidden[i] for i, text in enumerate(texts)}

    def _freeze(self, module: torch.nn.Module) -> torch.nn.Module:
        # Loaded in self.dtype (``torch_dtype``), so diffusers keeps the modules it must in float32 and has
        # no cast to warn about; ready components (random weights) are cast here.
        if any(p.is_floating_point() and p.dtype != self.dtype for p in module.parameters()):
            module = module.to(self.dtype)
        module = module.to(self.device).eval()
        module.requires_grad_(False)
        return module

    def to(self, device: torch.device) -> DiffusersGuidance:
        if device != self.device:
            self.device = device
            self.unet = self.unet.to(device)
            self.embeddings = {k: v.to(device) for k, v in self.embeddings.items()}
        return self

    def _blend(self, weights: torch.Tensor) -> torch.Tensor:
        """``[..., 4]`` weights over the view labels → the same blend of their embeddings ``[..., T, C]``."""
        labels = torch.stack([self.embeddings[label] for label in VIEW_LABELS])
        return torch.einsum("...l,ltc->...tc", weights.to(labels), labels)

    def condition(self, views: ViewCondition | None, batch: int) -> torch.Tensor:
        """Each render's text condition: the prompt, or with view-dependent conditioning its view label's
        embedding (or, with ``sds.view_embedding=interpolated``, the blend of the labels' by azimuth)."""
        sds = self.config.sds
        if views is None or not sds.view_dependent:
            return self.embeddings[None].expand(batch, -1, -1)
        if sds.view_embedding == "labels":
            return torch.stack([self.embeddings[label] for label in views.labels])
        return self._blend(view_weights(views, True, self.config.camera.overhead_elevation))

    @torch.no_grad()
    def predict_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor, views: ViewCondition | None,
                      guidance_scale: float, textureless: bool = False, progress: float = 1.0) -> torch.Tensor:
        """Classifier-free guidance, or Perp-Neg with ``sds.perp_neg``: the unconditional, positive and negative
        views' predictions all in one batched UNet call."""
        batch = noisy.shape[0]
        sds = self.config.sds
        texts = [self.embeddings[""].expand(batch, -1, -1), self.condition(views, batch)]
        negatives = strengths = None
        if sds.perp_neg and views is not None:
            negatives, strengths = perp_neg_views(views, sds.perp_neg_weight * guidance_scale,
                                                  sds.perp_neg_front_decay, sds.perp_neg_side_decay)
            texts += list(self._blend(negatives).unbind(1))
        copies = len(texts)
        inputs = noisy.repeat(copies, *([1] * (noisy.dim() - 1))).to(self.device, self.dtype)
        steps = timesteps.repeat(copies).to(self.device)
        output = self.unet(inputs, steps, encoder_hidden_states=torch.cat(texts)).sample.float()
        output = output[:, : noisy.shape[1]]  # IF also predicts the variance: keep the noise channels
        unconditional, positive, *negative = output.chunk(copies)
        if negatives is None:
            return guided(unconditional, positive, guidance_scale).to(noisy.dtype)
        stacked = torch.stack(negative, dim=1)
        return guided(unconditional, positive, guidance_scale, stacked, strengths.to(stacked.device)).to(noisy.dtype)


class StableDiffusionGuidance(DiffusersGuidance):
    """Latent SDS: render → 512×512 → VAE encoder (backpropagated) → 4×64×64 latents."""

    text_encoder_class = "CLIPTextModel"

    def __init__(self, config: Config, device: torch.device | None = None, components: dict | None = None,
                 text_cache: TextEmbeddingCache | None = None) -> None:
        from diffusers import AutoencoderKL

        super().__init__(config, device, components, text_cache)
        vae = components["vae"] if components else load_pretrained(AutoencoderKL, config.guidance.model, "vae",
                                                         use_safetensors=True, torch_dtype=self.dtype)
        self.vae = self._freeze(vae)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.image_size = int(self.vae.config.sample_size)
        self.latent_size = self.image_size // 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.checkpoint = checkpointer(config.guidance.checkpointing)

    def to(self, device: torch.device) -> StableDiffusionGuidance:
        if device != self.device:
            self.vae = self.vae.to(device)
        super().to(device)
        return self

    def _encode_vae(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels).latent_dist.mean

    def encode(self, images: torch.Tensor, progress: float = 1.0) -> torch.Tensor:
        if progress < self.config.guidance.latent_fraction:
            # NVIDIA's latent-colour warm-up: the render's colour stands in for the latents directly.
            small = F.interpolate(images, size=(self.latent_size,) * 2, mode="bilinear", align_corners=False)
            return torch.einsum("cl,bchw->blhw", _RGB_TO_LATENT.to(small), small * 2.0 - 1.0)
        pixels = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        pixels = (pixels * 2.0 - 1.0).to(self.dtype)
        latents = self.checkpoint(self._encode_vae, pixels)
        return latents.float() * self.scaling_factor


class DeepFloydIFGuidance(DiffusersGuidance):
    """Pixel-space SDS with IF stage I at 64×64 (Imagen's base model, as in the paper)."""

    text_encoder_class = "T5EncoderModel"
    uses_attention_mask = True
    max_length = 77

    def __init__(self, config: Config, device: torch.device | None = None, components: dict | None = None,
                 text_cache: TextEmbeddingCache | None = None) -> None:
        super().__init__(config, device, components, text_cache)
        self.image_size = int(self.unet.config.sample_size)

    def encode(self, images: torch.Tensor, progress: float = 1.0) -> torch.Tensor:
        pixels = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", align_corners=False,
                               antialias=True)
        return pixels * 2.0 - 1.0
