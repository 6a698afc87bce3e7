"""``dreamfusion``: run one prompt, evaluate a run, list the synthetic prompts, benchmark."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamfusion.errors import UserInputError

EXIT_BAD_INPUT = 2


class _Progress:
    """A tqdm bar on a terminal; periodic lines with ETA when stderr is a log file. After the last step, a
    bar per phase of the export and evaluation (frames for the turntable)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar = None
        self.phase_bar = None

    @staticmethod
    def _bar(**options):
        from tqdm import tqdm

        options.setdefault("mininterval", 0.5 if sys.stderr.isatty() else 10.0)
        return tqdm(dynamic_ncols=True, file=sys.stderr, **options)

    def on_train_start(self, trainer) -> None:
        # Created here, not before the trainer: a run refused at set-up prints its error line alone.
        self.bar = self._bar(total=trainer.total_iterations, desc=self._describe(trainer), unit="step",
                             initial=trainer.step)

    def _describe(self, trainer) -> str:
        """The stage the bar is in, where the run has two: the field (coarse), then the mesh (refine)."""
        return f"{self.label} [{trainer.stage}]" if trainer.config.refine.iterations else self.label

    def on_step_end(self, trainer, metrics: dict[str, float]) -> None:
        self.bar.set_description(self._describe(trainer), refresh=False)
        self.bar.set_postfix(loss=f"{metrics['loss']:.3g}", t=f"{metrics['timestep']:.2f}", refresh=False)
        self.bar.update(1)

    def on_train_end(self, trainer) -> None:
        self.bar.close()

    def on_finish_phase(self, trainer, phase: str, done: int, total: int) -> None:
        description = f"{self.label} [{phase}]"
        if self.phase_bar is None or self.phase_bar.desc != description:
            if self.phase_bar is not None:  # a phase ends as the next begins: shown whole, with its time
                self.phase_bar.update(self.phase_bar.total - self.phase_bar.n)
                self.phase_bar.close()
            self.phase_bar = None
            if phase == "done":
                return
            self.phase_bar = self._bar(total=total, desc=description, unit="frame" if total > 1 else "phase",
                                       mininterval=0.5 if sys.stderr.isatty() else 5.0)
            self.phase_bar.refresh()  # shown as the phase begins, not at its first unit
        self.phase_bar.update(done - self.phase_bar.n)


def _cmd_run(args: argparse.Namespace) -> int:
    from dreamfusion.config import BACKEND_DEFAULTS, Config, apply_backend_defaults, apply_overrides
    from dreamfusion.pipeline import prepare_output_dir, run_prompt

    overrides = list(args.set or [])
    if args.model:
        overrides.append(f"guidance.model={args.model}")
    config = Config(prompt=args.prompt)
    if args.iters is not None:
        config.iterations = args.iters
    if args.seed is not None:
        config.seed = args.seed
    config.guidance.backend = args.guidance
    if config.guidance.backend in BACKEND_DEFAULTS:
        apply_backend_defaults(config, {item.partition("=")[0].strip() for item in overrides})
    config = apply_overrides(config, overrides)
    if config.guidance.backend == "synthetic":
        from dreamfusion.prior.shapes import find_object

        config.prompt = find_object(config.prompt).prompt
    prepare_output_dir(Path(args.out))
    summary = run_prompt(config, Path(args.out), callbacks=[_Progress(config.prompt[:40])])
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps({"out": str(args.out), "wall_seconds": round(summary["wall_seconds"], 1),
                      "metrics": summary["metrics"]}, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from dreamfusion.pipeline import evaluate_run

    print(json.dumps(evaluate_run(Path(args.dir), clip_model=args.clip,
                                  prompt_set=Path(args.prompt_set) if args.prompt_set else None), indent=2))
    return 0


def _cmd_prompts(args: argparse.Namespace) -> int:
    from dreamfusion.prior.shapes import OBJECTS

    for obj in OBJECTS:
        print(f"{obj.prompt}{'    (has a front)' if obj.has_front else ''}")
    return 0


@dataclass(frozen=True)
class ExtraBenchmark:
    """A ``dreamfusion bench`` kind that lives outside the library (the platform's ``tracking``)."""

    name: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _cmd_bench(args: argparse.Namespace) -> int:
    from dreamfusion import benchmarks

    started = time.perf_counter()
    if args.which in args.extra_benchmarks:
        args.extra_benchmarks[args.which](args)
    elif args.which == "speed":
        benchmarks.speed(Path(args.out), repeats=args.repeats)
    elif args.which == "kernels":
        benchmarks.kernels(Path(args.out), repeats=args.repeats)
    elif args.which == "guidance":
        from dreamfusion.bench_guidance import guidance

        guidance(Path(args.out), steps=args.repeats)
    elif args.which == "text":
        from dreamfusion.bench_text import text

        text(Path(args.out), repeats=args.repeats)
    elif args.which == "export":
        from dreamfusion.bench_export import export

        export(Path(args.out))
    else:
        prompts = args.prompts.split(";") if args.prompts else None
        ablation_prompts = args.ablation_prompts.split(";") if args.ablation_prompts else None
        benchmarks.quality(Path(args.out), prompts=prompts, ablations=not args.no_ablations,
                           iterations=args.iters, ablation_prompts=ablation_prompts, settings=args.set)
    logging.getLogger(__name__).info("benchmark done in %.0f s", time.perf_counter() - started)
    return 0


def _cmd_gallery(args: argparse.Namespace) -> int:
    from dreamfusion.export import write_gallery

    runs = find_runs([Path(d) for d in args.dirs])
    if args.best:
        runs = best_per_prompt(runs, args.best)
    try:
        print(write_gallery(runs, Path(args.out)))
    except OSError as exc:
        raise UserInputError(f"cannot write {args.out} ({exc.strerror}); choose a writable --out") from None
    return 0


def find_runs(directories: list[Path]) -> list[Path]:
    """Finished runs (folders holding summary.json) in or under ``directories`` (a run, or a sweep's
    workspace), ordered by prompt and path."""
    runs: list[Path] = []
    for directory in directories:
        if not directory.is_dir():
            raise UserInputError(f"{directory} is not a directory; give run directories or a sweep workspace")
        runs += [summary.parent for summary in sorted(directory.rglob("summary.json"))]
    if not runs:
        raise UserInputError(f"no finished run (summary.json) under {', '.join(map(str, directories))}; "
                             "give the --out of `dreamfusion run` or a sweep's --workspace")
    return sorted(dict.fromkeys(runs), key=lambda run: (json.loads((run / "summary.json").read_text())["prompt"],
                                                        str(run)))


def best_per_prompt(runs: list[Path], metric: str) -> list[Path]:
    """Each prompt's run with the best ``metric``: the lowest where lower is better (chamfer), else the highest."""
    from dreamfusion.evaluate import LOWER_IS_BETTER

    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    best: dict[str, tuple[float, Path]] = {}
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        value = summary["metrics"].get(metric)
        if value is None:
            raise UserInputError(f"{run} has no metric '{metric}' (it has {', '.join(summary['metrics'])}); "
                                 "pick one of those for --best")
        if summary["prompt"] not in best or sign * value > best[summary["prompt"]][0]:
            best[summary["prompt"]] = (sign * value, run)
    return [run for _, run in best.values()]


def build_parser(extensions: Sequence[Callable[[Any], None]] = (), benchmarks: Sequence[ExtraBenchmark] = ()
                 ) -> argparse.ArgumentParser:
    """The command line; each of ``extensions`` adds subcommands (the platform's sweep and ui), each of
    ``benchmarks`` a kind of ``dreamfusion bench``."""
    parser = argparse.ArgumentParser(prog="dreamfusion", description="Text-to-3D by Score Distillation Sampling")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="optimise one prompt and export mesh, video, viewer and metrics")
    run.add_argument("prompt")
    run.add_argument("--out", required=True, help="output directory (created; must not hold a finished run)")
    run.add_argument("--iters", type=int, help="optimisation steps (default: the config's iterations)")
    run.add_argument("--seed", type=int)
    run.add_argument("--guidance", default="synthetic",
                     help="guidance backend: synthetic (default), stable-diffusion, deepfloyd-if")
    run.add_argument("--model", help="stable-diffusion / deepfloyd-if weights: a local directory or a hub id")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, repeatable")
    run.set_defaults(func=_cmd_run)

    ev = sub.add_parser("eval", help="recompute the metrics of a finished run")
    ev.add_argument("dir")
    ev.add_argument("--clip", metavar="MODEL", help="CLIP model (directory or hub id) for CLIP R-precision")
    ev.add_argument("--prompt-set", metavar="FILE", help="prompts to rank against, one per line (with --clip)")
    ev.set_defaults(func=_cmd_eval)

    prompts = sub.add_parser("prompts", help="list the synthetic prior's prompts")
    prompts.set_defaults(func=_cmd_prompts)

    bench = sub.add_parser("bench", help="speed, kernels, guidance, text (embedding cache and CLIP judge), export "
                                         "(mesh cost and fidelity) or quality benchmark; writes JSON and Markdown")
    bench.add_argument("which", choices=("speed", "quality", "kernels", "guidance", "text", "export",
                                         *(extra.name for extra in benchmarks)))
    bench.add_argument("--out", default="docs/benchmarks", help="directory for the results")
    bench.add_argument("--repeats", type=int, default=7, help="timed repeats per case (speed, kernels, guidance, text)")
    bench.add_argument("--prompts", help="';'-separated subset of prompts (quality)")
    bench.add_argument("--iters", type=int, help="iterations per run (quality; default: config default)")
    bench.add_argument("--no-ablations", action="store_true", help="skip the paper's ablations (quality)")
    bench.add_argument("--ablation-prompts", help="';'-separated objects to ablate (default: all with a front)")
    bench.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="config override for every run, repeatable (quality)")
    for extra in benchmarks:
        extra.add_arguments(bench)
    bench.set_defaults(func=_cmd_bench, extra_benchmarks={extra.name: extra.run for extra in benchmarks})

    gallery = sub.add_parser("gallery", help="a PNG of finished runs' previews, a row per run (colour, then "
                                             "textureless), labelled with the prompt")
    gallery.add_argument("dirs", nargs="+", help="run directories, or a sweep's workspace (searched for runs)")
    gallery.add_argument("--out", required=True, help="the PNG to write")
    gallery.add_argument("--best", metavar="METRIC",
                         help="keep each prompt's run with the best METRIC (chamfer: the lowest; "
                              "silhouette_iou: the highest)")
    gallery.set_defaults(func=_cmd_gallery)
    for extend in extensions:
        extend(sub)
    return parser


def main(argv: list[str] | None = None, extensions: Sequence[Callable[[Any], None]] = (),
         benchmarks: Sequence[ExtraBenchmark] = ()) -> int:
    parser = build_parser(extensions, benchmarks)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except UserInputError as exc:
        print(f"dreamfusion: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("dreamfusion: interrupted; nothing was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
