"""Seconds a sweep spec's trial spends training and after its last step (checkpoint, export, metrics),
prompt by prompt, on one thread as a sweep trial with ``resources: {cpus: 1}`` runs.

It uses only what every commit of the library has had (``Config``, ``apply_overrides``, ``Trainer``,
``finish_run``), so one command compares two commits measured side by side:

    git worktree add /tmp/before COMMIT
    PYTHONPATH=/tmp/before python3 infra/time_trial_phases.py experiments/quickstart.yaml "a red ball" &
    python3 infra/time_trial_phases.py experiments/quickstart.yaml "a red ball"; wait

Prints one JSON line per prompt; with ``--profile N``, also the N functions of the post-training phase
with the most cumulative time (cProfile). The spec's first value of each searched key is used.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from dreamfusion.config import Config, apply_overrides
from dreamfusion.pipeline import finish_run
from dreamfusion.trainer import Trainer


def settings(spec: dict) -> list[str]:
    items = [f"{key}={value}" for key, value in (spec.get("config") or {}).items()]
    for key, domain in ((spec.get("search") or {}).get("space") or {}).items():
        values = domain.get("grid") or domain.get("choice") or [domain.get("low")]
        items.append(f"{key}={values[0]}")
    return items


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("prompts", nargs="*", help="default: the spec's prompts")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N functions of the post-training phase with the most cumulative time "
                             "(the phase is then timed under the profiler)")
    args = parser.parse_args()
    if not args.spec.is_file():
        parser.error(f"no spec at {args.spec}; give a sweep spec such as experiments/quickstart.yaml")
    spec = yaml.safe_load(args.spec.read_text())
    torch.set_num_threads(1)
    for prompt in args.prompts or spec["prompts"]:
        config = apply_overrides(Config(prompt=prompt, iterations=spec["iterations"]), settings(spec))
        started = time.perf_counter()
        trainer = Trainer(config)
        trainer.train()
        trained = time.perf_counter()
        profiler = cProfile.Profile() if args.profile else None
        with tempfile.TemporaryDirectory() as directory:
            if profiler:
                profiler.enable()
            finish_run(trainer, Path(directory) / "run", trained - started)
            if profiler:
                profiler.disable()
        print(json.dumps({"prompt": prompt, "train_s": round(trained - started, 1),
                          "post_training_s": round(time.perf_counter() - trained, 1)}), flush=True)
        if profiler:
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
