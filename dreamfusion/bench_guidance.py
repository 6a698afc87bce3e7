"""``dreamfusion bench guidance``: SDS step time and peak memory with full-size Stable Diffusion.

The UNet and VAE are built from the published SD 1.5 and SD 2.1-base architectures with random
weights (speed and memory do not depend on the weights, and nothing is downloaded); the text
embeddings are random tensors of the real shape. Each case runs in its own process so its peak
memory is its own: ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on a CPU.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

VAE = {"block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
       "up_block_types": ("UpDecoderBlock2D",) * 4, "latent_channels": 4, "layers_per_block": 2,
       "sample_size": 512, "scaling_factor": 0.18215}
UNET_COMMON = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
               "block_out_channels": (320, 640, 1280, 1280),
               "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
MODELS = {
    "sd-1.5": {**UNET_COMMON, "cross_attention_dim": 768, "attention_head_dim": 8},
    "sd-2.1-base": {**UNET_COMMON, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
                    "use_linear_projection": True},
}
TEXT_TOKENS = 77


def settings(device: torch.device) -> list[dict[str, str]]:
    """fp16 needs a GPU; on a CPU only activation checkpointing is compared. On a GPU torch's checkpointing
    and DeepSpeed's (where installed: what ``auto`` takes there) are measured side by side."""
    if device.type == "cuda":
        checkpointers = ["torch", "deepspeed"] if importlib.util.find_spec("deepspeed") else ["torch"]
        return [{"dtype": "fp32", "checkpointing": "off", "autocast": "off"},
                {"dtype": "fp16", "checkpointing": "off", "autocast": "off"},
                *({"dtype": "fp16", "checkpointing": mode, "autocast": "bf16"} for mode in checkpointers)]
    return [{"dtype": "fp32", "checkpointing": "off", "autocast": "off"},
            {"dtype": "fp32", "checkpointing": "auto", "autocast": "off"}]


def run_case(model: str, setting: dict[str, str], steps: int) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from dreamfusion.config import Config, apply_overrides
    from dreamfusion.guidance.diffusion import StableDiffusionGuidance
    from dreamfusion.trainer import Trainer

    torch.manual_seed(0)
    config = apply_overrides(Config(prompt="a hamburger"), [
        "guidance.backend=stable-diffusion", f"guidance.model=random-weights:{model}",
        "sds.guidance_scale=100", "render.resolution=64", "render.batch_size=1",
        f"guidance.dtype={setting['dtype']}", f"guidance.checkpointing={setting['checkpointing']}",
        f"render.autocast={setting['autocast']}", f"field.checkpointing={setting['checkpointing'] != 'off'}",
        f"iterations={steps + 1}"])
    unet_config = MODELS[model]
    labels = [None, "", "front", "side", "back", "overhead"]
    components = {
        "unet": UNet2DConditionModel(**unet_config), "vae": AutoencoderKL(**VAE),
        "scheduler": DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                   beta_start=0.00085, beta_end=0.012),
        "embeddings": {label: torch.randn(TEXT_TOKENS, unet_config["cross_attention_dim"]) for label in labels},
    }
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainer = Trainer(config, guidance=StableDiffusionGuidance(config, device, components))
    del components
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train_step()  # warm-up
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        memory = "gpu_peak_gib"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
        memory = "peak_rss_gib"
    return {"model": model, **setting, "median_step_seconds": statistics.median(times), "steps": steps,
            memory: peak, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}


def guidance(out: Path, steps: int = 3, models: list[str] | None = None) -> list[dict[str, Any]]:
    from dreamfusion.benchmarks import _machine, _write

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for model in models or list(MODELS):
        for setting in settings(device):
            case = json.dumps({"model": model, "setting": setting, "steps": steps})
            done = subprocess.run([sys.executable, "-m", "dreamfusion.bench_guidance", case],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"benchmark case {case} failed:\n{done.stderr[-2000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    memory = "gpu_peak_gib" if device.type == "cuda" else "peak_rss_gib"
    table = ["| model | guidance dtype | checkpointing | field autocast | median step (s) | peak memory (GiB) |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['dtype']} | {r['checkpointing']} | {r['autocast']} | "
              f"{r['median_step_seconds']:.2f} | {r[memory]:.2f} ({memory}) |" for r in results]
    machine = _machine(device)
    _write(out, "guidance", {"machine": machine, "command": f"dreamfusion bench guidance --repeats {steps}",
                             "results": results}, table)
    return results


if __name__ == "__main__":
    arguments = json.loads(sys.argv[1])
    print(json.dumps(run_case(arguments["model"], arguments["setting"], arguments["steps"])))
