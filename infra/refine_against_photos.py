"""Separates what limits the refinement stage on the synthetic prior: the stage itself, or the prior's
photos. Trains stage 1 once, then runs the same refinement from it twice: under SDS as usual, and with the
SDS loss replaced by an L2 loss to the true photo (of ``refine.prior_photos``' kind) at each render's own
camera (an oracle no diffusion model is). If the oracle run moves the surface and SDS does not, the stage can
follow its supervision and the prior's photos (from other cameras; grown by the photos' offset when they are
volume renders) are what hold it back.

    python3 infra/refine_against_photos.py "a house with a red door" [--set KEY=VALUE ...]

The oracle patches two names in ``dreamfusion.trainer`` (the camera draw and the loss) for its own run
only; nothing here is part of the product.
"""

import argparse
import copy
import time
from unittest import mock

import dreamfusion.trainer as trainer_module
from dreamfusion.config import Config, apply_overrides
from dreamfusion.errors import UserInputError
from dreamfusion.pipeline import compute_metrics, mesh_if_any
from dreamfusion.prior.shapes import find_object
from dreamfusion.prior.synthetic import render_ground_truth
from dreamfusion.sds import SDSResult

KEYS = ("chamfer", "normal_error_deg", "silhouette_iou", "r_precision_textureless")


def refine(config: Config, stage1: dict, oracle: bool) -> dict[str, float]:
    """The refinement from the stage-1 state ``stage1``, under SDS or against the true photos."""
    trainer = trainer_module.Trainer(config)
    trainer.load_state_dict(copy.deepcopy(stage1))
    if not oracle:
        trainer.train()
        return compute_metrics(trainer, mesh=mesh_if_any(trainer))
    obj = find_object(config.prompt)
    real_draw = trainer_module.sample_cameras
    drawn = {}

    def draw_and_keep(*args, **kwargs):
        drawn["cameras"] = real_draw(*args, **kwargs)
        return drawn["cameras"]

    def photo_loss(guidance, images, views, sds_config, progress, generator, textureless=False):
        truth, _ = render_ground_truth(obj, drawn["cameras"], images.shape[-1], textureless=textureless,
                                       photos=config.refine.prior_photos)
        return SDSResult(2.0 * ((images - truth.to(images)) ** 2).sum() / images.shape[0], 0.0, 0.0)

    with (mock.patch.object(trainer_module, "sample_cameras", draw_and_keep),
          mock.patch.object(trainer_module, "sds_loss", photo_loss)):
        trainer.train()
    return compute_metrics(trainer, mesh=mesh_if_any(trainer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    try:  # bad input: one line and exit 2, before any training
        find_object(args.prompt)
        config = apply_overrides(Config(prompt=args.prompt), ["refine.iterations=100", *args.set])
    except UserInputError as exc:
        parser.error(str(exc))
    if config.guidance.backend != "synthetic" or not config.refine.iterations:
        parser.error("the oracle needs the synthetic prior's photos and refinement steps: leave guidance.backend "
                     "at synthetic and refine.iterations above 0")
    stage1 = trainer_module.Trainer(config)
    started = time.perf_counter()
    stage1.train(until=config.iterations)
    print(f"stage 1: {time.perf_counter() - started:.0f} s", flush=True)
    rows = {"stage 1": compute_metrics(stage1, mesh=mesh_if_any(stage1))}
    state = stage1.state_dict()
    rows["refined under SDS"] = refine(config, state, oracle=False)
    rows["refined against the true photos"] = refine(config, state, oracle=True)
    print(f"| {args.prompt} {' '.join(args.set)} | " + " | ".join(KEYS) + " |")
    print("|---" * (len(KEYS) + 1) + "|")
    for name, metrics in rows.items():
        print(f"| {name} | " + " | ".join(f"{metrics[key]:.4g}" for key in KEYS) + " |")


if __name__ == "__main__":
    main()
