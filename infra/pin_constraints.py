"""Write constraints.txt: every package that `pip install -e '.[dev]'` brings, at the version installed here.

CI and the README's commands install with `-c constraints.txt`, so a new release upstream (MLflow 3.17
regrouped the runs table's columns) changes nothing until this is rerun and the suite passes on it:
    python3 infra/pin_constraints.py && pytest -q
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "dreamfusion-platform"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(name: str, extras: set[str], seen: dict[str, set[str]]) -> None:
    """Every installed distribution ``name`` (with ``extras``) needs, into ``seen``."""
    key = canonical(name)
    if key in seen and extras <= seen[key]:
        return
    seen[key] = seen.get(key, set()) | extras
    try:
        requirements = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return
    for text in requirements:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras | {""}):
            closure(requirement.name, set(requirement.extras), seen)


def main() -> None:
    seen: dict[str, set[str]] = {}
    closure(PROJECT, {"dev", "platform", "guidance"}, seen)
    seen.pop(canonical(PROJECT))
    # public versions: torch 2.13.0, not 2.13.0+cpu, so a CUDA build of the same version satisfies it
    installed = {canonical(d.metadata["Name"]): Version(d.version).public for d in metadata.distributions()}
    pins = sorted(f"{name}=={installed[name]}" for name in seen if name in installed)
    (ROOT / "constraints.txt").write_text(
        "# Versions CI and the README install (`-c constraints.txt`); regenerate: python3 infra/pin_constraints.py\n"
        + "\n".join(pins) + "\n")
    print(f"constraints.txt: {len(pins)} packages")


if __name__ == "__main__":
    main()
