"""What the synthetic prior asks a run for: the x0 behind the SDS gradient, step by step.

    python experiments/prior_targets.py "a house with a red door" targets.png --steps 0,15,40 [--set KEY=VALUE ...]

trains the prompt with the usual ``Trainer`` and, at each of ``--steps``, renders four fixed cameras
(front low, front high, side, back) with albedo shading, noises each render at t = 0.3, 0.5, 0.7, 0.9
and writes one row per (step, t): for each camera the render, the conditional x0 (prompt and view
condition: the camera, or the view label), the unconditional x0 and the classifier-free-guided x0
that the SDS gradient pulls towards.
It prints the guided x0's range per row: values far outside [-1, 1] are targets no image can meet.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from dreamfusion.cameras import cameras_from_angles, view_condition
from dreamfusion.config import Config, apply_overrides
from dreamfusion.renderer import render
from dreamfusion.trainer import Trainer

TIMESTEPS = (0.3, 0.5, 0.7, 0.9)
AZIMUTHS, ELEVATIONS = (0.0, 0.0, 90.0, 180.0), (5.0, 40.0, 15.0, 15.0)


def _to_image(flat: torch.Tensor, size: int) -> torch.Tensor:
    return ((flat.reshape(3, size, size) + 1.0) / 2.0).clamp(0.0, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--steps", default="0,15,40", help="comma-separated training steps to look at")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    config = apply_overrides(Config(prompt=args.prompt), args.set)
    trainer = Trainer(config)
    guidance = trainer.guidance
    count = len(AZIMUTHS)
    cameras = cameras_from_angles(torch.tensor(AZIMUTHS), torch.tensor(ELEVATIONS), torch.full((count,), 2.2),
                                  torch.full((count,), 45.0))
    views = view_condition(cameras, config.camera)
    noise_generator = torch.Generator().manual_seed(1)
    rows = []
    for step in sorted(int(s) for s in args.steps.split(",")):
        trainer.train(until=step)
        with torch.no_grad():
            output = render(trainer.field, cameras, config.render.resolution, 96, trainer.shading("albedo"), None,
                            torch.Generator().manual_seed(0), "torch")
            latents = guidance.encode(output.rgb)
            size = latents.shape[-1]
            for t in TIMESTEPS:
                alpha_bar = guidance.alphas_cumprod[torch.full((count,), round(t * 999))]
                noise = torch.randn(latents.shape, generator=noise_generator)
                noisy = (alpha_bar.sqrt()[:, None, None, None] * latents
                         + (1 - alpha_bar).sqrt()[:, None, None, None] * noise).reshape(count, -1)
                conditional, unconditional, guided = guidance.predictions(noisy, alpha_bar, views,
                                                                          config.sds.guidance_scale)
                columns = [latents.reshape(count, -1), conditional, unconditional, guided]
                rows.append(torch.cat([_to_image(c[i], size) for i in range(count) for c in columns], dim=2))
                print(f"step {step} t {t}: guided x0 in [{float(guided.min()):.1f}, {float(guided.max()):.1f}]")
    grid = (torch.cat(rows, dim=1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(args.out)


if __name__ == "__main__":
    main()
