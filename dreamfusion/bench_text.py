"""``dreamfusion bench text``: what the text-embedding cache saves a trial, its start-up to the first step, and
what the CLIP judge costs.

The text encoders are the published architectures with random weights (timing and memory do not
depend on the weights, and nothing is downloaded): Stable Diffusion 2.1-base's OpenCLIP ViT-H text
tower (340 M parameters, fp32) and DeepFloyd IF-I-XL's T5-v1.1-XXL encoder (4.7 B parameters, saved in
bf16, as IF is run in half precision). They are saved in the diffusers layout and loaded through the
same code as real weights. A trial's text start-up is timed with a cold cache (load the encoder, hash
its files once, encode the prompt's six texts, store them) and a warm one (read six safetensors). Each
case runs in its own process, so its peak memory (RSS on a CPU, allocated memory on a GPU) is its own.

A trial's start-up, from process start to its first SDS step, is timed with full-size Stable Diffusion
2.1-base (text tower, UNet and VAE of the published architectures, random weights, saved in the diffusers
layout): cold and warm text cache, with diffusers' low-memory loading (``accelerate``: the model is built
on the meta device and its weights loaded once) and without it (``low_cpu_mem_usage=False``: with diffusers
0.42 the model is still built uninitialised and its weights mapped, so the two measure the same on
2026-12-04). IF-I-XL is left out: its UNet's published configuration is
not in the repository (nothing is downloaded) and its 4.3 B parameters in float32 would not fit twice in
24 GiB.

The CLIP judge uses ViT-B/32's architecture (``openai/clip-vit-base-patch32``): its load, a report's
``clip_score`` (8 views in colour and textureless at CLIP's 224 pixels) and the end of a trial (the same
with R-precision among 16 prompts), on the synthetic prior's default field.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

PROMPT = "a DSLR photo of a hamburger"
ENCODERS: dict[str, dict[str, Any]] = {
    "sd-2.1-base": {"backend": "stable-diffusion", "class": "CLIPTextModel", "dtype": "fp32",
                    "config": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096,
                               "num_hidden_layers": 23, "num_attention_heads": 16, "max_position_embeddings": 77,
                               "hidden_act": "gelu", "projection_dim": 512}},
    "if-i-xl": {"backend": "deepfloyd-if", "class": "T5EncoderModel", "dtype": "bf16",
                "config": {"vocab_size": 32128, "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64,
                           "num_layers": 24, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32}},
}
CLIP_B32 = {
    "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                    "num_attention_heads": 8, "max_position_embeddings": 77},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "image_size": 224, "patch_size": 32},
    "projection_dim": 512,
}
WORDS = ["a", "dslr", "photo", "of", "hamburger", "front", "side", "back", "overhead", "view", ","]


def word_level_tokenizer(words: list[str], max_length: int):
    """A tokenizer of whole ``words`` (the rest is unknown), saved as a real tokenizer is: where a model's
    own vocabulary is not to be had, what a text encoder costs does not depend on it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="[PAD]", unk_token="[UNK]",
                                   model_max_length=max_length)


def build_encoder(name: str, root: Path) -> None:
    import transformers

    spec = ENCODERS[name]
    config_class = transformers.CLIPTextConfig if spec["class"] == "CLIPTextModel" else transformers.T5Config
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32)
    model = getattr(transformers, spec["class"])(config_class(**spec["config"]))
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(root / "text_encoder")
    word_level_tokenizer(WORDS, 77).save_pretrained(root / "tokenizer")


def build_stable_diffusion(root: Path) -> None:
    """SD 2.1-base in the diffusers layout, random weights: what a trial loads from ``--model``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from dreamfusion.bench_guidance import MODELS, VAE

    build_encoder("sd-2.1-base", root)
    torch.manual_seed(0)
    UNet2DConditionModel(**MODELS["sd-2.1-base"]).save_pretrained(root / "unet")
    AutoencoderKL(**VAE).save_pretrained(root / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  num_train_timesteps=1000).save_pretrained(root / "scheduler")


def run_startup_case(model: str, cache: str, low_memory: bool) -> dict[str, Any]:
    """From this process's start to the end of its first SDS step: imports, text embeddings (from ``cache``
    or the encoder), the UNet and VAE loaded, the field built, one step."""
    import psutil

    if not low_memory:  # diffusers' loading as without accelerate (low_cpu_mem_usage=False)
        from diffusers import ModelMixin

        load = ModelMixin.from_pretrained.__func__
        ModelMixin.from_pretrained = classmethod(
            lambda cls, *args, **kwargs: load(cls, *args, **{**kwargs, "low_cpu_mem_usage": False}))
    from dreamfusion.config import Config, apply_backend_defaults, apply_overrides
    from dreamfusion.text_cache import TextEmbeddingCache
    from dreamfusion.trainer import Trainer

    config = Config(prompt=PROMPT)
    config.guidance.backend = "stable-diffusion"
    apply_backend_defaults(config, set())
    config = apply_overrides(config, [f"guidance.model={model}", "iterations=1"])
    trainer = Trainer(config, text_cache=TextEmbeddingCache(Path(cache)))
    built = time.time() - psutil.Process().create_time()
    memory, loading_peak = _peak(trainer.device)  # what loading took, before the step's activations
    trainer.train_step()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    _, peak = _peak(trainer.device)
    return {"seconds": time.time() - psutil.Process().create_time(), "seconds_to_trainer": built,
            memory: peak, f"{memory}_to_trainer": loading_peak}


def build_clip(root: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    from dreamfusion.clip_eval import image_processor_class

    torch.manual_seed(0)
    CLIPModel(CLIPConfig(**CLIP_B32)).save_pretrained(root)
    word_level_tokenizer(WORDS, 77).save_pretrained(root)
    image_processor_class()(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(root)


def _peak(device: torch.device) -> tuple[str, float]:
    if device.type == "cuda":
        return "gpu_peak_gib", torch.cuda.max_memory_allocated() / 2**30
    return "peak_rss_gib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB


def run_text_case(name: str, model: str, cache: str) -> dict[str, Any]:
    from dreamfusion.guidance.diffusion import DeepFloydIFGuidance, StableDiffusionGuidance, prompt_texts
    from dreamfusion.text_cache import TextEmbeddingCache

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = StableDiffusionGuidance if ENCODERS[name]["backend"] == "stable-diffusion" else DeepFloydIFGuidance
    started = time.perf_counter()
    texts = list(prompt_texts(PROMPT).values())
    embeddings = backend.embed_texts(model, texts, device, TextEmbeddingCache(Path(cache)))
    seconds = time.perf_counter() - started
    memory, peak = _peak(device)
    return {"seconds": seconds, memory: peak, "texts": len(embeddings)}


def run_baseline_case() -> dict[str, Any]:
    import transformers  # noqa: F401 - what every trial process imports before it loads anything

    memory, peak = _peak(torch.device("cpu"))
    return {"seconds": 0.0, memory: peak}


def run_clip_case(model: str, cache: str, repeats: int) -> dict[str, Any]:
    from dreamfusion.clip_eval import ClipJudge
    from dreamfusion.config import Config
    from dreamfusion.text_cache import TextEmbeddingCache
    from dreamfusion.trainer import Trainer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainer = Trainer(Config(prompt="a red ball"), cache_dir=Path(cache))
    for _ in range(20):  # a shape to render, not an empty box
        trainer.train_step()
    prompts = ["a red ball", *(f"a photo of object {i}" for i in range(15))]

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    judge: list[ClipJudge] = []
    load = timed(lambda: judge.append(ClipJudge(model, device, TextEmbeddingCache(Path(cache)))))
    judge[0].judge(trainer, prompts)  # fills the text cache, as the sweep's driver does
    report = statistics.median(timed(lambda: judge[0].judge(trainer)) for _ in range(repeats))
    final = statistics.median(timed(lambda: judge[0].judge(trainer, prompts)) for _ in range(repeats))
    step = statistics.median(timed(trainer.train_step) for _ in range(repeats))
    return {"load_seconds": load, "report_seconds": report, "final_seconds": final, "train_step_seconds": step,
            "views": judge[0].views, "resolution": judge[0].render_resolution, "prompts": len(prompts)}


def _subprocess(case: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "dreamfusion.bench_text", json.dumps(case)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark case {case} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def text(out: Path, repeats: int = 3, models: list[str] | None = None) -> dict[str, Any]:
    from dreamfusion.benchmarks import _machine, _write

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    memory = "gpu_peak_gib" if device.type == "cuda" else "peak_rss_gib"
    results: dict[str, Any] = {"encoders": {}, "startup": None, "clip": None}
    with tempfile.TemporaryDirectory(prefix="bench-text-") as scratch:
        root = Path(scratch)
        results["baseline"] = _subprocess({"kind": "baseline"}) if device.type == "cpu" else None
        for name in models or list(ENCODERS):
            model = root / name
            _subprocess({"kind": "build", "name": name, "root": str(model)})
            cache = root / f"cache-{name}"
            cold = _subprocess({"kind": "text", "name": name, "model": str(model), "cache": str(cache)})
            warm = _subprocess({"kind": "text", "name": name, "model": str(model), "cache": str(cache)})
            results["encoders"][name] = {"cold": cold, "warm": warm}
            print(json.dumps({name: results["encoders"][name]}), flush=True)
        if "sd-2.1-base" in (models or list(ENCODERS)):
            model = root / "sd-2.1-base-pipeline"
            _subprocess({"kind": "build-sd", "root": str(model)})
            results["startup"] = {}
            for low_memory in (True, False):
                cache = root / f"cache-startup-{low_memory}"
                for which in ("cold", "warm"):
                    case = _subprocess({"kind": "startup", "model": str(model), "cache": str(cache),
                                        "low_memory": low_memory})
                    results["startup"][f"{which}, low-memory loading {'on' if low_memory else 'off'}"] = case
                    print(json.dumps({"startup": {which: case, "low_memory": low_memory}}), flush=True)
        clip = root / "clip-vit-b-32"
        _subprocess({"kind": "build-clip", "root": str(clip)})
        results["clip"] = _subprocess({"kind": "clip", "model": str(clip), "cache": str(root / "cache-clip"),
                                       "repeats": repeats})
        print(json.dumps({"clip": results["clip"]}), flush=True)

    table = ["A trial's text start-up: the guidance model's six texts (the prompt alone, with each view suffix, and "
             "the empty prompt), from a cold and a warm text-embedding cache.", "",
             f"| text encoder | cache | seconds | peak memory (GiB, {memory}) |", "|---|---|---|---|"]
    if results["baseline"]:
        table.append(f"| (process with torch and transformers imported) | - | - | {results['baseline'][memory]:.2f} |")
    for name, cases in results["encoders"].items():
        for which in ("cold", "warm"):
            case = cases[which]
            table.append(f"| {name} ({ENCODERS[name]['class']}, {ENCODERS[name]['dtype']}) | {which} | "
                         f"{case['seconds']:.2f} | {case[memory]:.2f} |")
    if results.get("startup"):
        table += ["", "A trial's start-up with full-size Stable Diffusion 2.1-base (random weights), from process "
                  "start to the end of its first SDS step (the field and renders at Stable Diffusion's defaults: "
                  "64² renders resized to 512² for the VAE):", "",
                  f"| text cache, loading | seconds to the trainer | peak memory to the trainer (GiB, {memory}) | "
                  f"seconds to the first step | peak memory to the first step |", "|---|---|---|---|---|"]
        for label, case in results["startup"].items():
            table.append(f"| {label} | {case['seconds_to_trainer']:.1f} | {case[memory + '_to_trainer']:.2f} | "
                         f"{case['seconds']:.1f} | {case[memory]:.2f} |")
    clip_case = results["clip"]
    table += ["", f"The CLIP judge (ViT-B/32 architecture, {clip_case['views']} views at {clip_case['resolution']} px, "
              f"colour and textureless), beside one training step of the synthetic prior's defaults:", "",
              "| what | median seconds |", "|---|---|",
              f"| load (vision tower and processor, once per trial) | {clip_case['load_seconds']:.2f} |",
              f"| each report that needs `clip_score` | {clip_case['report_seconds']:.2f} |",
              f"| end of a trial (scores and R-precision among {clip_case['prompts']} prompts) | "
              f"{clip_case['final_seconds']:.2f} |",
              f"| one training step (for scale) | {clip_case['train_step_seconds']:.3f} |"]
    _write(out, "text", {"machine": _machine(device), "command": f"dreamfusion bench text --repeats {repeats}",
                         "results": results}, table)
    return results


if __name__ == "__main__":
    arguments = json.loads(sys.argv[1])
    kind = arguments["kind"]
    if kind == "build":
        build_encoder(arguments["name"], Path(arguments["root"]))
        print("{}")
    elif kind == "build-sd":
        build_stable_diffusion(Path(arguments["root"]))
        print("{}")
    elif kind == "startup":
        print(json.dumps(run_startup_case(arguments["model"], arguments["cache"], arguments["low_memory"])))
    elif kind == "build-clip":
        build_clip(Path(arguments["root"]))
        print("{}")
    elif kind == "baseline":
        print(json.dumps(run_baseline_case()))
    elif kind == "text":
        print(json.dumps(run_text_case(arguments["name"], arguments["model"], arguments["cache"])))
    else:
        print(json.dumps(run_clip_case(arguments["model"], arguments["cache"], arguments["repeats"])))
