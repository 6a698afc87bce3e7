"""Candidate settings over synthetic prompts: one quality table each, then a ranking.

    python experiments/setting_search.py CANDIDATES --out DIR [--prompts 'a;b'] [--iters N] [--set KEY=VALUE ...]

CANDIDATES holds one candidate per line: a name, then its settings as ``dreamfusion run --set`` takes
them (``lr-0.01 optim.lr=0.01``; ``default`` with no settings is the baseline). Blank lines and lines
starting with ``#`` are skipped. ``--set`` settings come before every candidate's own (a common base,
such as the defaults of another day). Each candidate's table is the quality benchmark's, in DIR/NAME/
(resumable: a candidate already run keeps its runs); DIR/search.md ranks the candidates by their
lowest IoU and says which meet issue 2's bar (every prompt IoU >= 0.85 and colour R-precision >= 0.9).
On a GPU a 300-step run takes seconds, so a search that would take hours on the CPU fits in minutes;
the runs' random streams are drawn on the CPU, so the numbers carry over to CPU runs (to float noise).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from dreamfusion.benchmarks import quality
from dreamfusion.config import Config, apply_overrides
from dreamfusion.errors import UserInputError
from dreamfusion.prior.shapes import find_object

IOU_BAR, R_PRECISION_BAR = 0.85, 0.9
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def read_candidates(path: Path, base: list[str]) -> dict[str, list[str]]:
    """Each candidate's own settings, checked with the ``base`` settings before them."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UserInputError(f"cannot read the candidates file {path} ({exc.strerror})") from None
    candidates: dict[str, list[str]] = {}
    for number, line in enumerate(lines, 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        name, settings = words[0], words[1:]
        if not NAME.match(name) or name in candidates:
            raise UserInputError(f"{path}:{number}: '{name}' is not a new candidate name "
                                 "(letters, digits, '.', '_', '-'; each name once)")
        try:
            apply_overrides(Config(), base + settings)
        except UserInputError as exc:
            raise UserInputError(f"{path}:{number}: {exc}") from None
        candidates[name] = settings
    if not candidates:
        raise UserInputError(f"{path} names no candidate; write one per line: NAME KEY=VALUE ...")
    return candidates


def writable_directory(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as exc:
        raise UserInputError(f"cannot write to {out} ({exc.strerror}); choose a writable --out") from None


def ranking(results: dict[str, dict], candidates: dict[str, list[str]]) -> list[str]:
    rows = []
    for name, runs in results.items():
        metrics = [arms["default"] for arms in runs.values()]
        worst_iou = min(m["silhouette_iou"] for m in metrics)
        worst_r = min(m["r_precision_colour"] for m in metrics)
        worst_prompt = min(runs, key=lambda p: runs[p]["default"]["silhouette_iou"])
        passes = worst_iou >= IOU_BAR and worst_r >= R_PRECISION_BAR
        slowest = max(m["wall_seconds"] for m in metrics)
        rows.append((worst_iou, f"| {name} | `{' '.join(candidates[name]) or '(defaults)'}` | {len(metrics)} | "
                                f"{worst_iou:.3f} ({worst_prompt}) | {worst_r:.2f} | {slowest:.0f} | "
                                f"{'yes' if passes else 'no'} |"))
    rows.sort(key=lambda row: -row[0])
    return ["| candidate | settings | prompts run | lowest IoU | lowest colour R-prec | slowest run (s) | meets bar |",
            "|---|---|---|---|---|---|---|", *(row for _, row in rows)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("candidates", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", help="';'-separated prompts (default: all synthetic prompts)")
    parser.add_argument("--iters", type=int, help="iterations per run (default: each candidate's setting)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every candidate, before its own (repeatable)")
    args = parser.parse_args(argv)
    try:
        try:
            apply_overrides(Config(), args.set)
        except UserInputError as exc:
            raise UserInputError(f"--set: {exc}") from None
        candidates = read_candidates(args.candidates, args.set)
        prompts = args.prompts.split(";") if args.prompts else None
        for prompt in prompts or ():
            find_object(prompt)  # an unknown prompt fails before any run
        writable_directory(args.out)
        results: dict[str, dict] = {}
        for index, (name, settings) in enumerate(candidates.items(), 1):
            print(f"candidate {index}/{len(candidates)}: {name} {' '.join(settings)}", flush=True)
            results[name] = quality(args.out / name, prompts=prompts, ablations=False, iterations=args.iters,
                                    settings=args.set + settings)["runs"]
            table = ranking(results, candidates)
            (args.out / "search.md").write_text("\n".join(table) + "\n")
            print("\n".join(table), flush=True)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
