"""Sweep specs: a YAML file → a validated :class:`SweepSpec`.

Every mistake is reported as one :class:`UserInputError` line that names the field and the fix,
before Ray, MLflow or any file in the workspace is touched.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import yaml

from dreamfusion.clip_eval import CLIP_METRICS, CLIP_SCORES, ranking_prompts, read_prompt_set
from dreamfusion.config import MAX_PROMPT_CHARS, Config, apply_backend_defaults, flatten_keys, known_keys, set_value
from dreamfusion.errors import UserInputError
from dreamfusion.evaluate import LOWER_IS_BETTER
from dreamfusion.geometry import GEOMETRY_METRICS
from dreamfusion.guidance import check_config
from dreamfusion.mesh import MESH_METRICS

ALGORITHMS = ("grid", "random", "optuna")
SCHEDULERS = ("fifo", "asha")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
# Reported by every trial at every report; ASHA compares trials on one of them at equal steps.
TRAINING_METRICS = ("loss", "sds_loss", "opacity_mean", "sds_gradient_norm")
# The synthetic prior's quality metrics: at the end of each trial, and at every report when a
# scheduler or searcher needs them.
EVAL_METRICS = ("silhouette_iou", "psnr", "r_precision_colour", "r_precision_textureless",
                "janus_rate", "front_recall", *GEOMETRY_METRICS)
# CLIP's judgement, on any backend with eval.clip_model: the scores at the end of each trial and at every
# report when a scheduler or searcher needs them; R-precision among the sweep's prompts at the end only.
# The exported mesh against the field's renders, at the end of each trial (any backend).
RESULT_METRICS = EVAL_METRICS + CLIP_METRICS + MESH_METRICS
RESERVED_KEYS = ("prompt", "seed")  # set by the sweep's own fields, one trial per value
SWEEP_KEYS = ("iterations", "guidance.backend", "guidance.model")  # top-level fields, the same for every trial
CANDIDATE = "candidate"  # the trial parameter that names its candidate bundle
TOP_LEVEL = {
    "name": "a sweep name (letters, digits, '-', '_', '.'), e.g. name: quickstart",
    "prompts": "a list of prompts, or {file: PATH} (.txt, .csv, .jsonl, .parquet)",
    "guidance": "a backend name, or {backend: synthetic, model: PATH_OR_HUB_ID}",
    "iterations": "optimisation steps per trial",
    "seeds": "a list of seeds; each prompt × configuration runs once per seed",
    "samples_per_prompt": "configurations drawn per prompt (random/optuna), or grid repeats",
    "config": "base config values, {key: value} (see `dreamfusion run --help` keys)",
    "overrides": "base config overrides as 'key=value' strings, applied after config",
    "search": "{algorithm: grid|random|optuna, space: {KEY: {DIST: ...}}, candidates: {NAME: {KEY: VALUE, ...}}, "
              "metric: NAME, mode: max|min}",
    "scheduler": "fifo, or {type: asha, metric: NAME, mode: max|min, grace_period: N, reduction_factor: N}",
    "report_every": "steps between metric reports and checkpoints",
    "resources": "{cpus: N, gpus: FRACTION} per trial",
    "max_concurrent_trials": "how many trials run at once (default: as resources allow)",
    "max_failures": "retries of a failed trial from its last checkpoint (default 2)",
}


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched config key: ``values`` for grid/choice, ``(low, high)`` for the others."""

    key: str
    distribution: str
    values: tuple[Any, ...]


@dataclasses.dataclass
class SweepSpec:
    name: str
    prompts: list[str]
    config: dict[str, Any]
    space: list[Dimension]
    algorithm: str = "grid"
    metric: str = "silhouette_iou"
    mode: str = "max"
    scheduler: str = "fifo"
    scheduler_metric: str = "loss"
    scheduler_mode: str = "min"
    grace_period: int = 1
    reduction_factor: int = 2
    samples_per_prompt: int = 1
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    iterations: int = Config.iterations  # the library's default, so a sweep without one runs as `dreamfusion run` does
    report_every: int = 50
    cpus: float = 1.0
    gpus: float = 0.0
    max_concurrent_trials: int | None = None
    max_failures: int = 2
    guidance: str = "synthetic"
    model: str = ""
    # Named bundles of config values, each one configuration (crossed with the space): what a search over
    # candidate settings that change several keys at once needs.
    candidates: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def base_config(self) -> Config:
        config = Config()
        config.guidance.backend = self.guidance
        config.guidance.model = self.model
        apply_backend_defaults(config, set(self.config) | {d.key for d in self.space})
        for key, value in self.config.items():
            set_value(config, key, value)
        config.iterations = self.iterations
        return config

    def trial_config(self, params: dict[str, Any]) -> Config:
        """The config of one trial from its Tune parameters (prompt, seed and searched keys)."""
        config = self.base_config()
        config.prompt = params["prompt"]
        config.seed = int(params["seed"])
        for key, value in self.candidates.get(params.get(CANDIDATE, ""), {}).items():
            set_value(config, key, value)
        for dim in self.space:
            set_value(config, dim.key, params[dim.key])
        return check_config(config)

    @property
    def most_refine_iterations(self) -> int:
        """The longest stage 2 of any trial (``refine.iterations`` may be searched)."""
        values = [self.base_config().refine.iterations]
        for dim in self.space:
            if dim.key == "refine.iterations":
                values += [int(v) for v in dim.values]
        values += [int(c["refine.iterations"]) for c in self.candidates.values() if "refine.iterations" in c]
        return max(values)

    @property
    def clip_model(self) -> str:
        return str(self.config.get("eval.clip_model", "")).strip()

    def rank_prompts(self, prompt: str) -> list[str]:
        """What CLIP R-precision ranks a trial's prompt among: the sweep's prompts and the distractors."""
        return ranking_prompts(prompt, self.prompts, str(self.config.get("eval.clip_prompt_set", "")))

    def _metrics_each_report(self) -> set[str]:
        return {self.scheduler_metric if self.scheduler == "asha" else "",
                self.metric if self.algorithm == "optuna" else ""}

    @property
    def needs_eval_each_report(self) -> bool:
        return bool(self._metrics_each_report() & set(EVAL_METRICS))

    @property
    def needs_mesh_each_report(self) -> bool:
        """A scheduler or searcher compares trials on the exported mesh's 3D accuracy at every report."""
        return bool(self._metrics_each_report() & {"chamfer", "fscore"})

    @property
    def needs_clip_each_report(self) -> bool:
        return bool(self._metrics_each_report() & set(CLIP_SCORES))


def _fail(where: str, problem: str, fix: str) -> UserInputError:
    return UserInputError(f"{where}: {problem}; {fix}")


def load_spec(path: Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"sweep spec {path} does not exist; give the path of a YAML file, "
                             "e.g. experiments/quickstart.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserInputError(f"sweep spec {path} is not UTF-8 text; save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise UserInputError(f"sweep spec {path}: {problem}{where}; fix the YAML syntax") from None
    return parse_spec(data, path.parent, str(path))


def parse_spec(data: Any, base_dir: Path, where: str = "sweep spec") -> SweepSpec:
    if not isinstance(data, dict):
        raise _fail(where, "the top level must be a mapping", "write `name: ...`, `prompts: [...]` and so on")
    unknown = sorted(set(map(str, data)) - set(TOP_LEVEL))
    if unknown:
        raise _fail(where, f"unknown field '{unknown[0]}'", "known fields: " + ", ".join(TOP_LEVEL))
    for required in ("name", "prompts"):
        if required not in data:
            raise _fail(where, f"missing field '{required}'", TOP_LEVEL[required])

    name = data["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
        raise _fail(where, f"name {name!r} is not a plain name", TOP_LEVEL["name"])

    spec = SweepSpec(name=name, prompts=[], config={}, space=[])
    _parse_guidance(spec, data.get("guidance", "synthetic"), where)
    spec.iterations = _integer(data, "iterations", where, Config.iterations, low=1)
    spec.report_every = min(_integer(data, "report_every", where, max(1, spec.iterations // 6), low=1),
                            spec.iterations)
    spec.samples_per_prompt = _integer(data, "samples_per_prompt", where, 1, low=1)
    spec.max_failures = _integer(data, "max_failures", where, 2, low=0)
    if data.get("max_concurrent_trials") is not None:
        spec.max_concurrent_trials = _integer(data, "max_concurrent_trials", where, 1, low=1)
    spec.seeds = _seeds(data.get("seeds", [0]), where)
    _parse_resources(spec, data.get("resources", {}), where)
    spec.config = _base_config(data.get("config", {}), data.get("overrides", []), where)
    _resolve_prompt_set(spec, base_dir, where)
    spec.prompts = _prompts(data["prompts"], base_dir, spec.guidance, where)
    _parse_search(spec, data.get("search", {}), where)
    _parse_scheduler(spec, data.get("scheduler", "fifo"), where)
    check_config(spec.base_config())  # the base config with the sweep's own fields is valid on its own
    return spec


def _integer(data: dict[str, Any], key: str, where: str, default: int, low: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"{key} must be an integer, got {value!r}", TOP_LEVEL.get(key, "give a whole number"))
    if value < low:
        raise _fail(where, f"{key} must be >= {low}, got {value}", TOP_LEVEL.get(key, "give a larger number"))
    return value


def _number(value: Any, what: str, where: str, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(where, f"{what} must be a finite number, got {value!r}", fix)
    return float(value)


def _seeds(value: Any, where: str) -> list[int]:
    seeds = value if isinstance(value, list) else [value]
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise _fail(where, f"seeds must be a list of integers >= 0, got {value!r}", "e.g. seeds: [0, 1]")
    if len(set(seeds)) != len(seeds):
        raise _fail(where, f"seeds {seeds} repeat a value", "list each seed once")
    return seeds


def _parse_guidance(spec: SweepSpec, value: Any, where: str) -> None:
    if isinstance(value, str):
        value = {"backend": value}
    if not isinstance(value, dict) or set(value) - {"backend", "model"}:
        raise _fail(where, f"guidance {value!r} is not understood", TOP_LEVEL["guidance"])
    spec.guidance = str(value.get("backend", "synthetic"))
    spec.model = str(value.get("model") or "")
    probe = Config()
    probe.guidance.backend = spec.guidance
    probe.guidance.model = spec.model
    try:
        probe.guidance.validate()
    except UserInputError as exc:
        raise _fail(where, f"guidance: {exc}", TOP_LEVEL["guidance"]) from None


def _parse_resources(spec: SweepSpec, value: Any, where: str) -> None:
    if not isinstance(value, dict) or set(value) - {"cpus", "gpus"}:
        raise _fail(where, f"resources {value!r} is not understood", TOP_LEVEL["resources"])
    spec.cpus = _number(value.get("cpus", 1), "resources.cpus", where, TOP_LEVEL["resources"])
    spec.gpus = _number(value.get("gpus", 0), "resources.gpus", where, TOP_LEVEL["resources"])
    if spec.cpus <= 0:
        raise _fail(where, f"resources.cpus must be > 0, got {spec.cpus:g}", "give at least a fraction of a CPU")
    if spec.gpus < 0 or (spec.gpus > 1 and not spec.gpus.is_integer()):
        raise _fail(where, f"resources.gpus must be a fraction in [0, 1] or a whole number, got {spec.gpus:g}",
                    "e.g. gpus: 0.5 to share one GPU between two trials")


def _base_config(config: Any, overrides: Any, where: str) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise _fail(where, "config must be a mapping of config keys to values", TOP_LEVEL["config"])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise _fail(where, "overrides must be a list of 'key=value' strings", "e.g. overrides: ['optim.lr=0.01']")
    flat = flatten_keys(config)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            raise _fail(where, f"override '{override}' is not key=value", "e.g. overrides: ['optim.lr=0.01']")
        flat[key.strip()] = value.strip()
    for key in flat:
        if key in RESERVED_KEYS or key in SWEEP_KEYS:
            raise _fail(where, f"config key '{key}' is set by the sweep itself",
                        "use the top-level prompts, seeds, iterations and guidance fields")
    probe = Config()
    try:
        for key, value in flat.items():
            set_value(probe, key, value)
        check_config(probe)
    except UserInputError as exc:
        raise _fail(where, f"config: {exc}", "fix the value in config or overrides") from None
    return flat


def _prompts(value: Any, base_dir: Path, guidance: str, where: str) -> list[str]:
    if isinstance(value, dict):
        if set(value) - {"file", "column"} or "file" not in value:
            raise _fail(where, f"prompts {value!r} is not understood", TOP_LEVEL["prompts"])
        prompts = read_prompt_file(base_dir / str(value["file"]), value.get("column", "prompt"))
    elif isinstance(value, list):
        prompts = value
    else:
        raise _fail(where, "prompts must be a list or {file: PATH}", TOP_LEVEL["prompts"])
    if not prompts:
        raise _fail(where, "there are no prompts", "list at least one prompt")
    cleaned: list[str] = []
    for index, prompt in enumerate(prompts, start=1):
        cleaned.append(_clean_prompt(prompt, f"{where}: prompt {index}", guidance))
    seen: dict[str, int] = {}
    for index, prompt in enumerate(cleaned, start=1):
        if prompt in seen:
            raise _fail(where, f"prompt {index} repeats prompt {seen[prompt]} ('{prompt[:60]}')",
                        "list each prompt once; use samples_per_prompt or seeds for repeats")
        seen[prompt] = index
    return cleaned


def _clean_prompt(prompt: Any, where: str, guidance: str) -> str:
    if not isinstance(prompt, str):
        raise _fail(where, f"{prompt!r} is not text", "quote it as a string")
    text = " ".join(prompt.split())
    if not text:
        raise _fail(where, "is empty", "remove the empty entry")
    if len(text) > MAX_PROMPT_CHARS:
        raise _fail(where, f"has {len(text)} characters", f"shorten it to at most {MAX_PROMPT_CHARS}")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise _fail(where, "contains control characters", "remove them")
    if guidance == "synthetic":
        from dreamfusion.prior.shapes import find_object

        try:
            return find_object(text).prompt
        except UserInputError as exc:
            raise UserInputError(f"{where}: {exc}") from None
    return text


def _resolve_prompt_set(spec: SweepSpec, base_dir: Path, where: str) -> None:
    """``eval.clip_prompt_set`` is relative to the spec, read now (a bad file fails before any trial), and
    handed to the trials as an absolute path."""
    value = str(spec.config.get("eval.clip_prompt_set", "")).strip()
    if not value:
        return
    path = (base_dir / value).resolve()
    try:
        read_prompt_set(path)
    except UserInputError as exc:
        raise UserInputError(f"{where}: {exc}") from None
    spec.config["eval.clip_prompt_set"] = str(path)


def read_prompt_file(path: Path, column: str = "prompt") -> list[Any]:
    """Prompts from .txt (one per line, '#' comments), .csv, .jsonl or .parquet (read with pyarrow)."""
    if not path.is_file():
        raise UserInputError(f"prompt file {path} does not exist; give a path relative to the sweep spec")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if suffix in (".csv", ".jsonl", ".parquet"):
            return _read_table_column(path, suffix, column)
    except UnicodeDecodeError:
        raise UserInputError(f"prompt file {path} is not UTF-8 text; save it as UTF-8") from None
    raise UserInputError(f"prompt file {path} has an unknown type; use .txt, .csv, .jsonl or .parquet")


def _read_table_column(path: Path, suffix: str, column: str) -> list[Any]:
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    if suffix != ".parquet":
        path.read_bytes().decode("utf-8")  # raises UnicodeDecodeError, which the caller words
    try:
        if suffix == ".csv":
            table = pyarrow.csv.read_csv(path)
        elif suffix == ".jsonl":
            table = pyarrow.json.read_json(path)
        else:
            table = pyarrow.parquet.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserInputError(f"prompt file {path} cannot be read ({str(exc).splitlines()[0]}); "
                             "check its format") from None
    if column not in table.column_names:
        raise UserInputError(f"prompt file {path} has no column '{column}' (columns: "
                             f"{', '.join(table.column_names)}); name the column with prompts: "
                             "{file: ..., column: NAME}")
    return table.column(column).to_pylist()


def _parse_search(spec: SweepSpec, value: Any, where: str) -> None:
    if not isinstance(value, dict) or set(value) - {"algorithm", "space", "candidates", "metric", "mode"}:
        raise _fail(where, f"search {value!r} is not understood", TOP_LEVEL["search"])
    spec.algorithm = str(value.get("algorithm", "grid"))
    if spec.algorithm not in ALGORITHMS:
        raise _fail(where, f"search.algorithm '{spec.algorithm}' is unknown", f"use one of {', '.join(ALGORITHMS)}")
    default_metric = "silhouette_iou" if spec.guidance == "synthetic" else "clip_score" if spec.clip_model else "loss"
    spec.metric, spec.mode = _metric(value, "search", default_metric, spec, where)
    space = value.get("space", {})
    if not isinstance(space, dict):
        raise _fail(where, "search.space must be a mapping of config keys", "e.g. space: {optim.lr: {loguniform: "
                    "[0.005, 0.05]}}")
    spec.space = [_dimension(str(key), dist, spec, where) for key, dist in space.items()]
    spec.candidates = _candidates(value.get("candidates", {}), spec, where)
    if spec.algorithm == "optuna":
        for dim in spec.space:
            if any(not isinstance(v, bool | int | float | str) for v in dim.values):
                raise _fail(where, f"search.space.{dim.key} has list values, which Optuna cannot suggest",
                            "use algorithm: grid or random for it")
    continuous = [d.key for d in spec.space if d.distribution in ("uniform", "loguniform", "randint")]
    if spec.algorithm == "grid" and continuous:
        raise _fail(where, f"search.space.{continuous[0]} is continuous but search.algorithm is grid",
                    "use grid/choice values, or algorithm: random or optuna")


def _candidates(value: Any, spec: SweepSpec, where: str) -> dict[str, dict[str, Any]]:
    fix = "e.g. candidates: {default: {}, wide: {field.blob_radius: 0.8, sds.lambda_opacity: 0.01}}"
    if not isinstance(value, dict):
        raise _fail(where, "search.candidates must be a mapping of names to config values", fix)
    searched = {d.key for d in spec.space}
    candidates: dict[str, dict[str, Any]] = {}
    for name, settings in value.items():
        at = f"search.candidates.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
            raise _fail(where, f"candidate name {name!r} is not a plain name", "use letters, digits, '-', '_', '.'")
        if settings is None:
            settings = {}
        if not isinstance(settings, dict):
            raise _fail(where, f"{at} must be a mapping of config keys to values", fix)
        flat = flatten_keys(settings)
        for key in flat:
            if key in RESERVED_KEYS or key in SWEEP_KEYS:
                raise _fail(where, f"{at}.{key} is set by the sweep itself",
                            "use the top-level prompts, seeds, iterations and guidance fields")
            if key in searched:
                raise _fail(where, f"{at}.{key} is also in search.space", "set each key in one of the two")
            if key not in known_keys():
                raise _fail(where, f"{at}.{key} is not a config key", "known keys: " + ", ".join(known_keys()))
        probe = Config()
        try:
            for key, setting in {**spec.config, **flat}.items():
                set_value(probe, key, setting)
            check_config(probe)
        except UserInputError as exc:
            raise _fail(where, f"{at} is invalid ({exc})", "change its values") from None
        same = [other for other, values in candidates.items() if values == flat]
        if same:
            raise _fail(where, f"{at} sets the same values as search.candidates.{same[0]}",
                        "give each candidate different settings (seeds are the top-level seeds field)")
        candidates[name] = flat
    return candidates


def _metric(value: dict[str, Any], section: str, default: str, spec: SweepSpec, where: str) -> tuple[str, str]:
    metric = str(value.get("metric", default))
    known = TRAINING_METRICS + EVAL_METRICS + CLIP_SCORES
    if metric in CLIP_METRICS and metric not in CLIP_SCORES:
        raise _fail(where, f"{section}.metric '{metric}' is computed once, at the end of the sweep",
                    "search on clip_score (or clip_score_textureless); R-precision is in the results table")
    if metric not in known:
        raise _fail(where, f"{section}.metric '{metric}' is unknown", f"use one of {', '.join(known)}")
    if metric in EVAL_METRICS and spec.guidance != "synthetic":
        raise _fail(where, f"{section}.metric '{metric}' needs the synthetic prior's ground truth",
                    f"with guidance {spec.guidance}, use clip_score (with eval.clip_model) or one of "
                    f"{', '.join(TRAINING_METRICS)}")
    if metric in CLIP_SCORES and not spec.clip_model:
        raise _fail(where, f"{section}.metric '{metric}' needs a CLIP model to judge with",
                    "set config: {eval.clip_model: PATH_OR_HUB_ID}, e.g. openai/clip-vit-base-patch32")
    mode = str(value.get("mode", "min" if metric in LOWER_IS_BETTER else "max"))
    if mode not in ("min", "max"):
        raise _fail(where, f"{section}.mode '{mode}' is unknown", "use max or min")
    return metric, mode


def _dimension(key: str, dist: Any, spec: SweepSpec, where: str) -> Dimension:
    at = f"search.space.{key}"
    if key in RESERVED_KEYS or key in ("guidance.backend", "guidance.model"):
        raise _fail(where, f"{at} cannot be searched", "list prompts, seeds and guidance at the top level")
    if key not in known_keys():
        raise _fail(where, f"{at} is not a config key", "known keys: " + ", ".join(known_keys()))
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise _fail(where, f"{at} must be one of {{{': ..}, {'.join(DISTRIBUTIONS)}: ..}}",
                    "e.g. {grid: [7.5, 20]} or {loguniform: [0.005, 0.05]}")
    kind, values = next(iter(dist.items()))
    if not isinstance(values, list) or not values:
        raise _fail(where, f"{at}.{kind} needs a non-empty list", "e.g. [7.5, 20], or [low, high]")
    if kind in ("grid", "choice"):
        if len(set(map(repr, values))) != len(values):
            raise _fail(where, f"{at}.{kind} repeats a value", "list each value once")
        for item in values:
            _check_value(spec, key, item, f"{at}.{kind}", where)
        return Dimension(key, kind, tuple(values))
    if len(values) != 2:
        raise _fail(where, f"{at}.{kind} needs [low, high], got {values}", "give two numbers")
    low = _number(values[0], f"{at}.{kind} low", where, "give two finite numbers")
    high = _number(values[1], f"{at}.{kind} high", where, "give two finite numbers")
    if not low < high:
        raise _fail(where, f"{at}.{kind} low ({low:g}) must be < high ({high:g})", "swap or widen the range")
    if kind == "loguniform" and low <= 0:
        raise _fail(where, f"{at}.loguniform low must be > 0, got {low:g}", "use uniform for ranges that reach 0")
    if kind == "randint" and not (low.is_integer() and high.is_integer()):
        raise _fail(where, f"{at}.randint needs integer bounds, got {values}", "e.g. randint: [32, 128]")
    for bound in (low, high - 1 if kind == "randint" else high):
        _check_value(spec, key, int(bound) if kind == "randint" else bound, f"{at}.{kind}", where)
    return Dimension(key, kind, (int(low), int(high)) if kind == "randint" else (low, high))


def _check_value(spec: SweepSpec, key: str, value: Any, at: str, where: str) -> None:
    """A searched value must make a valid config on top of the base config."""
    probe = Config()
    try:
        for base_key, base_value in spec.config.items():
            set_value(probe, base_key, base_value)
        set_value(probe, key, value)
        check_config(probe)
    except UserInputError as exc:
        raise _fail(where, f"{at} value {value!r} is invalid ({exc})", "change the value or its range") from None


def _parse_scheduler(spec: SweepSpec, value: Any, where: str) -> None:
    if isinstance(value, str):
        value = {"type": value}
    keys = {"type", "metric", "mode", "grace_period", "reduction_factor"}
    if not isinstance(value, dict) or set(value) - keys:
        raise _fail(where, f"scheduler {value!r} is not understood", TOP_LEVEL["scheduler"])
    spec.scheduler = str(value.get("type", "fifo"))
    if spec.scheduler not in SCHEDULERS:
        raise _fail(where, f"scheduler.type '{spec.scheduler}' is unknown", f"use one of {', '.join(SCHEDULERS)}")
    spec.scheduler_metric, spec.scheduler_mode = _metric(value, "scheduler", spec.metric if spec.metric in
                                                         TRAINING_METRICS else "loss", spec, where)
    reports = math.ceil(spec.iterations / spec.report_every)
    spec.grace_period = _integer(value, "grace_period", where, 1, low=1) if "grace_period" in value else 1
    spec.reduction_factor = _integer(value, "reduction_factor", where, 2, low=2) if "reduction_factor" in value else 2
    if spec.scheduler == "asha" and spec.grace_period >= reports:
        raise _fail(where, f"scheduler.grace_period ({spec.grace_period}) leaves ASHA nothing to stop: trials "
                    f"report {reports} times", "lower grace_period or report_every")
