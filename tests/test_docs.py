"""The commands the README and docs show run as written: each `dreamfusion ...` example parses with the real
command line, its `--set` keys and values are accepted by the config, and the specs it names load. A dry
parse: nothing trains."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dreamfusion.cli import build_parser
from dreamfusion.config import Config, apply_overrides, known_keys
from dreamfusion_platform.cli import BENCHMARKS, register
from dreamfusion_platform.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"```(?:bash|sh|console)?\n(.*?)```", re.S)
INLINE = re.compile(r"`(dreamfusion [^`]+)`")
SET = re.compile(r"--set\s+([A-Za-z_][\w.]*)=([^\s`]+)")
# Words that stand for a value the reader fills in.
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9_.]*(?:\.[a-z]+)?|KEY=VALUE)$")
# Where rounds of work would be named instead of dated.
ROUNDS = re.compile(r"\b(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|"
                    r"thirteenth|previous|last|this|that)\s+session\b|\bsessions?\b", re.I)


def fenced_commands(text: str) -> list[str]:
    commands = []
    for block in FENCE.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in re.split(r"&&|;|\|", line):
                part = part.strip()
                if part.startswith("dreamfusion "):
                    commands.append(part)
    return commands


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        text = path.read_text()
        commands = fenced_commands(text) + [re.sub(r"\s+", " ", c) for c in INLINE.findall(text)]
        found += [(path.relative_to(REPO).as_posix(), command) for command in commands]
    return found


def is_synopsis(command: str) -> bool:
    """`dreamfusion sweep SPEC.yaml [--resume] ...` describes a command's form; it is not one to run."""
    return "[" in command or "|" in command or "..." in command


COMMANDS = documented_commands()


def test_the_readme_shows_commands():
    readme = [command for where, command in COMMANDS if where == "README.md"]
    assert any(c.startswith("dreamfusion sweep experiments/quickstart.yaml") for c in readme)
    assert any(c.startswith("dreamfusion run ") for c in readme)


@pytest.mark.parametrize(("where", "command"), [c for c in COMMANDS if not is_synopsis(c[1])],
                         ids=[f"{w}: {c[:60]}" for w, c in COMMANDS if not is_synopsis(c)])
def test_each_documented_command_parses(where, command):
    parser = build_parser([register], BENCHMARKS)
    words = shlex.split(command)[1:]
    try:
        args = parser.parse_args(words)
    except SystemExit as exc:
        pytest.fail(f"{where}: `{command}` does not parse (exit {exc.code})")
    overrides = [item for item in (getattr(args, "set", None) or []) if not PLACEHOLDER.match(item)]
    config = Config()
    if getattr(args, "guidance", None):
        config.guidance.backend = args.guidance
        config.guidance.model = args.model or "some/model"
    apply_overrides(config, overrides)
    if args.command == "sweep" and not PLACEHOLDER.match(Path(args.spec).name):
        load_spec(REPO / args.spec)


def test_every_documented_setting_is_a_config_key():
    keys = set(known_keys())
    texts = [p.read_text() for p in DOCS] + [p.read_text() for p in (REPO / "experiments").glob("*.yaml")]
    for text in texts:
        for key, value in SET.findall(text):
            if PLACEHOLDER.match(key):
                continue
            assert key in keys, f"--set {key}={value}: no such config key"


def test_no_doc_counts_rounds_of_work():
    for path in [*DOCS, *(REPO / "experiments").rglob("*.yaml")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not ROUNDS.search(line), f"{path.relative_to(REPO)}:{number} names a round of work: {line}"
