"""Experiment suites: configs × seeds, resumable, summarised as mean ± std with 95% intervals.

A suite is a YAML file (or a built-in name: see ``SUITES``)::

    description: the optimizer-side knobs of the paper's Tables 1-3
    seeds: 5
    baseline: constant                 # the variant the others are compared with (paired by seed)
    base:                              # dotted keys applied to every variant
      model: test_resnet
      epochs: 12
      data.train_limit: 1000
    datasets: [mnist5k, digits]        # optional: every variant on each dataset
    variants:
      constant: {optim.weight_decay: 5.0e-4, temperature: null, grad_clip: null}
      cwd: {optim.weight_decay: {easy: 1.0e-4, hard: 1.0e-3}, temperature: null, grad_clip: null}

Runs go to ``OUT/DATASET/VARIANT/seed-K`` (ordinary run folders), seed by seed so an interrupted
suite is balanced; a finished run is skipped, a partial one resumed from its ``last.pt``. The
summary (``results.json``, ``results.md``, ``accuracy.png``, ``knobs.png``) is rebuilt from the run
folders, so it can be regenerated at any time.

The protocol is fixed in the suite file before anything runs:

* ``tune: {VARIANT: {KEY: [v1, v2, ...]}}``: the variant's constants are chosen from the grid (every
  combination) by the mean final ``select`` metric (default ``val_accuracy``: give the base a
  ``data.val_split``) over ``tune_seeds`` seeds numbered from 1000, distinct from the reported seeds. Tuning
  runs go to ``OUT/tune/...``; the choice is written to ``tuned.json`` and used by the reported runs.
* ``primary`` (default ``test_accuracy``; ``test_balanced_accuracy`` for an imbalanced regime) is what the
  comparisons test: paired by seed, 95% intervals, Holm across the suite's comparisons, TOST at ±0.3
  points and the detection limit (:mod:`cycdata.train.analysis`).
* ``level``: time to accuracy, the first epoch (and the seconds) at which a run's validation accuracy (test,
  without a validation split) reaches this level; a run that never does counts as ``epochs + 1``.
* ``jobs``: runs side by side (``--jobs`` overrides), each on ``cores / jobs`` threads.

Example:
    >>> suite = Suite.from_mapping({"base": {"epochs": 3}, "variants": {"a": {}, "b": {"temperature": None}}})
    >>> [run.name for run in suite.runs(seeds=2)]
    ['a/seed-0', 'b/seed-0', 'a/seed-1', 'b/seed-1']
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cycdata.config import ConfigError, RunConfig, apply_settings, number, parse_config, read_yaml
from cycdata.train.paths import check_name, dataset_folder, remove_run_folder

__all__ = ["SUITES", "Run", "Suite", "group_name", "load_suite", "passes_saved", "run_suite", "summarize"]

SUITES = ("optimizer", "factor", "data", "range", "range-recipe", "smoke", "labels-500", "noise-30",
          "imbalance-20", "data-side", "cwd-schedules", "endings-labels-500", "endings-noise-30",
          "endings-imbalance-20", "endings-default")
METRICS = ("test_accuracy", "test_balanced_accuracy", "test_nll", "test_ece")
TUNE_SEED_BASE = 1000  # tuning seeds are 1000, 1001, ...: never a reported seed
SUITE_KEYS = ("variants", "base", "datasets", "seeds", "baseline", "compare", "description", "tune", "tune_seeds",
              "select", "primary", "level", "jobs")


def group_name(dataset: str | None, variant: str) -> str:
    """A variant's name in the summary: ``DATASET/VARIANT`` in a suite over datasets, else ``VARIANT``.

    Example:
        >>> group_name("digits", "cwd"), group_name(None, "cwd")
        ('digits/cwd', 'cwd')
    """
    return f"{dataset}/{variant}" if dataset else variant


@dataclass(frozen=True)
class Run:
    """One (dataset, variant, seed) of a suite."""

    dataset: str | None
    variant: str
    seed: int
    config: RunConfig

    @property
    def name(self) -> str:
        """The run folder's path inside the suite folder: every part a validated, safe name."""
        prefix = f"{dataset_folder(self.dataset)}/" if self.dataset else ""
        return f"{prefix}{self.variant}/seed-{self.seed}"

    @property
    def group(self) -> str:
        return group_name(self.dataset, self.variant)


@dataclass(frozen=True)
class Suite:
    """Variants of a base config, each run with several seeds."""

    variants: dict[str, dict[str, Any]]
    base: dict[str, Any] = field(default_factory=dict)
    datasets: tuple[str, ...] = ()
    seeds: int = 5
    baseline: str | None = None
    compare: dict[str, str] = field(default_factory=dict)  # variant -> the variant it is compared with
    description: str = ""
    tune: dict[str, dict[str, list[Any]]] = field(default_factory=dict)  # variant -> key -> grid values
    tune_seeds: int = 3
    select: str = "val_accuracy"  # what tuning maximises (mean final value over the tuning seeds)
    primary: str = "test_accuracy"  # what the comparisons test
    level: float | None = None  # time to accuracy: the validation accuracy to reach
    jobs: int = 1  # runs side by side

    def reference(self, variant: str) -> str | None:
        """The variant ``variant`` is compared with (paired by seed), if any."""
        reference = self.compare.get(variant, self.baseline)
        return None if reference == variant else reference

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str = "suite") -> Suite:
        """A suite from its YAML mapping; every field and every variant's config validated, one line per fault."""
        if not isinstance(raw, Mapping):
            raise ConfigError(where, "a suite must be a mapping with 'variants' (and optional base, seeds, ...)")
        unknown = set(raw) - set(SUITE_KEYS)
        if unknown:
            raise ConfigError(where, f"unknown keys {sorted(unknown, key=str)}; allowed: {', '.join(SUITE_KEYS)}")
        suite = cls(variants=_variants(raw.get("variants"), f"{where}.variants"),
                    base=_mapping(raw.get("base"), f"{where}.base", "dotted keys applied to every variant"),
                    datasets=_datasets(raw.get("datasets"), f"{where}.datasets"),
                    seeds=number(ge=1, integer=True)(f"{where}.seeds", raw.get("seeds", 5), {}),
                    baseline=raw.get("baseline"),
                    compare=_mapping(raw.get("compare"), f"{where}.compare", "variant -> the variant it is compared "
                                     "with"),
                    description=str(raw.get("description", "")),
                    tune=_grids(raw.get("tune"), f"{where}.tune"),
                    tune_seeds=number(ge=1, integer=True)(f"{where}.tune_seeds", raw.get("tune_seeds", 3), {}),
                    select=_metric(raw.get("select", "val_accuracy"), f"{where}.select", "val_"),
                    primary=_metric(raw.get("primary", "test_accuracy"), f"{where}.primary", "test_"),
                    level=None if raw.get("level") is None else number(gt=0, le=1)(f"{where}.level", raw["level"], {}),
                    jobs=number(ge=1, le=64, integer=True)(f"{where}.jobs", raw.get("jobs", 1), {}))
        for name in suite.tune:
            if name not in suite.variants:
                raise ConfigError(f"{where}.tune", f"{name!r} is not one of the variants {sorted(suite.variants)}")
        named = ([suite.baseline] if suite.baseline is not None else []) + [*suite.compare, *suite.compare.values()]
        for name in named:
            if not isinstance(name, str) or name not in suite.variants:
                raise ConfigError(f"{where}.baseline", f"{name!r} is not one of the variants {sorted(suite.variants)}")
        suite.runs(seeds=1)  # every variant's config is validated here, before anything runs
        suite.tuning_runs()  # and every grid point's
        return suite

    def runs(self, seeds: int | None = None, epochs: int | None = None,
             tuned: Mapping[str, Mapping[str, Any]] | None = None) -> list[Run]:
        """Every run, seed-major (all variants of seed 0 first), each config validated; ``tuned`` (group ->
        settings, from the tuning phase) overrides the variants' grid keys."""
        runs = []
        for seed in range(self.seeds if seeds is None else seeds):
            for dataset in self.datasets or (None,):
                for variant, settings in self.variants.items():
                    check_name("variant", variant)  # a folder name, also for a Suite built without from_mapping
                    group = group_name(dataset, variant)
                    settings = {**self.inherited(tuned or {}, dataset, variant), **settings,
                                **(tuned or {}).get(group, {})}
                    config = self._config({"seed": seed, **settings}, dataset, epochs, f"variant {variant}")
                    runs.append(Run(dataset, variant, seed, config))
        return runs

    def _config(self, settings: Mapping[str, Any], dataset: str | None, epochs: int | None, where: str) -> RunConfig:
        """The base with ``settings`` (and the dataset, the epochs override) applied, validated."""
        raw = apply_settings(apply_settings({}, self.base), dict(settings))
        if dataset is not None:
            raw = apply_settings(raw, {"data.dataset": dataset})
        if epochs is not None:
            raw = apply_settings(raw, {"epochs": epochs})
        try:
            return parse_config(raw)
        except ConfigError as error:
            raise ConfigError(where, str(error)) from None

    def inherited(self, tuned: Mapping[str, Mapping[str, Any]], dataset: str | None, variant: str) -> dict[str, Any]:
        """The baseline's tuned constants that ``variant`` takes over: those it neither sets nor tunes itself, so
        every variant differs from the tuned baseline in its own knob only."""
        if self.baseline is None or variant == self.baseline or variant in self.tune:
            return {}
        chosen = tuned.get(group_name(dataset, self.baseline), {})
        return {name: value for name, value in chosen.items() if name not in self.variants[variant]}

    def tuning_runs(self, epochs: int | None = None) -> list[TuningRun]:
        """Every tuning run (each grid point of each tuned variant, on seeds 1000, 1001, ...), seed-major."""
        out = []
        for offset in range(self.tune_seeds if self.tune else 0):
            seed = TUNE_SEED_BASE + offset
            for dataset in self.datasets or (None,):
                for variant, grid in self.tune.items():
                    for index, point in enumerate(_grid_points(grid)):
                        # A tuning run chooses on validation: it never reads the test split.
                        settings = {**self.variants[variant], **point, "seed": seed, "data.test": False}
                        config = self._config(settings, dataset, epochs, f"tune.{variant} point {point}")
                        group = group_name(dataset, variant)
                        out.append(TuningRun(group, index, point, seed, config))
        return out


@dataclass(frozen=True)
class TuningRun:
    """One grid point of a tuned variant on one tuning seed."""

    group: str
    index: int
    point: dict[str, Any]
    seed: int
    config: RunConfig

    @property
    def name(self) -> str:
        """Its folder inside the suite folder: ``tune/[DATASET/]VARIANT/point-I/seed-K``."""
        dataset, _, variant = self.group.rpartition("/")
        prefix = f"{dataset_folder(dataset)}/" if dataset else ""
        return f"tune/{prefix}{variant}/point-{self.index}/seed-{self.seed}"


def _grid_points(grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of a variant's grid, in the file's order.

    Example:
        >>> _grid_points({"a": [1, 2], "b": [3]})
        [{'a': 1, 'b': 3}, {'a': 2, 'b': 3}]
    """
    import itertools

    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _grids(raw: Any, key: str) -> dict[str, dict[str, list[Any]]]:
    """``tune``: variant -> {dotted key: non-empty list of values}."""
    grids = _mapping(raw, key, "variant -> {dotted key: [values]}")
    for variant, grid in grids.items():
        grid = _mapping(grid, f"{key}.{variant}", "dotted key -> [values]")
        for name, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{key}.{variant}.{name}", f"got {values!r}; give a non-empty list of values")
        grids[variant] = grid
    return grids


def _metric(raw: Any, key: str, prefix: str) -> str:
    """A logged metric's name starting with ``prefix`` (``val_accuracy``, ``test_balanced_accuracy``, ...)."""
    allowed = [f"{prefix}{name}" for name in ("accuracy", "balanced_accuracy")]
    if raw not in allowed:
        raise ConfigError(key, f"got {raw!r}; give one of {', '.join(allowed)}")
    return str(raw)


def _mapping(raw: Any, key: str, what: str) -> dict[str, Any]:
    """A suite field that must be a mapping (or absent): ``base``, ``compare``, a variant's settings."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"got {raw!r}; give a mapping ({what})")
    return dict(raw)


def _variants(raw: Any, key: str) -> dict[str, dict[str, Any]]:
    """Variant name -> settings; each name becomes a folder, so it must be one safe path component."""
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(key, "needs at least one variant: a name -> dotted keys mapping")
    return {check_name(key, name): _mapping(settings, f"{key}.{name}", "dotted keys, e.g. {temperature: null}")
            for name, settings in raw.items()}


def _datasets(raw: Any, key: str) -> tuple[str, ...]:
    """A list of dataset specs (a bare string would be read letter by letter), each with a distinct folder."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(spec, str) and spec for spec in raw):
        raise ConfigError(key, f"got {raw!r}; give a list of dataset specs, e.g. [mnist5k, digits]")
    folders = [dataset_folder(spec) for spec in raw]
    if len(set(folders)) != len(folders):
        raise ConfigError(key, f"{raw!r} name the same folder twice ({folders}); list each dataset once")
    return tuple(raw)


def load_suite(name_or_path: str) -> Suite:
    """A built-in suite by name, or a suite YAML file."""
    path = Path(name_or_path)
    if name_or_path in SUITES:
        text = resources.files("cycdata.train").joinpath(f"suites/{name_or_path}.yaml").read_text()
        import yaml

        return Suite.from_mapping(yaml.safe_load(text), name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError("suite", f"{name_or_path!r} is neither a built-in suite ({', '.join(SUITES)}) "
                          "nor a .yaml file")
    return Suite.from_mapping(read_yaml(path), str(path))


def _finished(folder: Path, epochs: int) -> bool:
    metrics = folder / "metrics.csv"
    return metrics.is_file() and len(metrics.read_text().strip().splitlines()) - 1 >= epochs


def run_suite(suite: Suite, out: str | Path, *, seeds: int | None = None, epochs: int | None = None,
              jobs: int | None = None, log: Any = print) -> dict[str, Any]:
    """Run (or finish) every run of ``suite`` under ``out`` (tuning first, when the suite tunes); then write
    and return the summary."""
    out = Path(out)
    started = time.perf_counter()
    jobs = suite.jobs if jobs is None else jobs
    tuning = suite.tuning_runs(epochs)
    _execute([(run.name, run.config) for run in tuning], out, jobs, log, started)
    tuned = choose_tuned(suite, out, epochs) if tuning else {}
    runs = suite.runs(seeds, epochs, tuned)
    _execute([(run.name, run.config) for run in runs], out, jobs, log, started)
    summary = summarize(suite, out, seeds=seeds, epochs=epochs)
    summary["seconds"] = time.perf_counter() - started
    summary["machine"] = machine_record(jobs)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def machine_record(jobs: int) -> dict[str, Any]:
    """What a run's floating point sums depend on beyond the code: CPU, kernels, GPU, libraries, threads per run.

    The same code reproduces a suite bit for bit only where all of these match: forcing torch's and oneDNN's
    kernels down to AVX2 on one machine changes a 15-epoch run's final accuracy, as does a second thread.

    Example:
        >>> record = machine_record(jobs=2)
        >>> sorted(record)
        ['cores', 'cpu', 'cpu_capability', 'gpu', 'jobs', 'threads_per_run', 'timm', 'torch']
    """
    import os
    import platform

    import timm
    import torch

    threads = threads_per_run(jobs) if jobs > 1 else torch.get_num_threads()  # one at a time: torch's default
    return {"cpu": _cpu_model() or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count() or 1, "jobs": jobs, "threads_per_run": threads, "torch": torch.__version__,
            "timm": timm.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def threads_per_run(jobs: int) -> int:
    """Each side-by-side run's share of the cores (at least one thread).

    Example:
        >>> threads_per_run(jobs=10**6)  # more runs than cores: still one thread each
        1
    """
    import os

    return max(1, (os.cpu_count() or 1) // jobs)


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), or "" where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    return names[0] if names else ""


def _execute(runs: list[tuple[str, RunConfig]], out: Path, jobs: int, log: Any, started: float) -> None:
    """Run every unfinished run (in order; ``jobs`` side by side, each on ``cores / jobs`` threads)."""
    todo = [(position, name, config) for position, (name, config) in enumerate(runs, 1)
            if not _finished(out / name, config.epochs)]
    if not todo:
        return
    if jobs <= 1:
        for position, name, config in todo:
            began = time.perf_counter()
            row = _run_one(config, str(out / name), str(out))
            _log_run(log, position, len(runs), name, row, began, started)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = threads_per_run(jobs)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited torch thread pools
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_set_threads, initargs=(threads,)) as pool:
        futures = {pool.submit(_run_one, config, str(out / name), str(out)): (position, name)
                   for position, name, config in todo}
        for future in as_completed(futures):
            position, name = futures[future]
            _log_run(log, position, len(runs), name, future.result(), None, started)


def _set_threads(threads: int) -> None:
    """A side-by-side worker: its share of the cores, and quiet (the suite logs one line per finished run)."""
    import os
    import sys

    import torch

    torch.set_num_threads(threads)
    sys.stdout = open(os.devnull, "w")


def _run_one(config: RunConfig, folder_name: str, out_name: str) -> dict[str, Any]:
    """One run into its folder: resumed from its ``last.pt`` when it has one."""
    from cycdata.train.trainer import resume, train

    folder, out = Path(folder_name), Path(out_name)
    if (folder / "last.pt").is_file():
        return resume(folder)
    if folder.exists():
        remove_run_folder(out, folder)  # a run killed before its first checkpoint: nothing to keep
    return train(config if not config.runtime.progress else _quiet(config), folder)


def _log_run(log: Any, position: int, total: int, name: str, row: Mapping[str, Any], began: float | None,
             started: float) -> None:
    """One line per finished run (its own seconds only when runs go one at a time)."""
    split = "val" if "val_accuracy" in row and "test_accuracy" not in row else "test"
    own = f"{time.perf_counter() - began:.0f}s, " if began is not None else ""
    log(f"[{position}/{total}] {name}: {split} {100 * row[f'{split}_accuracy']:.2f}%  nll {row[f'{split}_nll']:.4f}  "
        f"ece {row[f'{split}_ece']:.4f}  ({own}{time.perf_counter() - started:.0f}s in all)")


def choose_tuned(suite: Suite, out: Path, epochs: int | None = None) -> dict[str, dict[str, Any]]:
    """Each tuned variant's grid point with the best mean final ``suite.select`` over the tuning seeds (the
    first such point on a tie), written with every point's mean to ``tuned.json``; returns group -> settings."""
    scores: dict[str, dict[int, list[float]]] = {}
    points: dict[str, dict[int, dict[str, Any]]] = {}
    for run in suite.tuning_runs(epochs):
        folder = out / run.name
        points.setdefault(run.group, {})[run.index] = run.point
        if not _finished(folder, run.config.epochs):
            raise ConfigError("tune", f"{folder} did not finish; run the suite again to finish it")
        final = _read_metrics(folder)[run.config.epochs - 1]
        if suite.select not in final or math.isnan(final[suite.select]):
            raise ConfigError("select", f"{folder} logged no {suite.select}; give the suite's base a data.val_split")
        scores.setdefault(run.group, {}).setdefault(run.index, []).append(final[suite.select])
    chosen, record = {}, {}
    for group, by_point in scores.items():
        means = {index: statistics.fmean(values) for index, values in by_point.items()}
        best = max(means, key=lambda index: (means[index], -index))
        chosen[group] = points[group][best]
        record[group] = {"chosen": points[group][best], "select": suite.select, "seeds": len(by_point[best]),
                         "points": [{"settings": points[group][i], "mean": means[i]} for i in sorted(means)]}
    (out / "tuned.json").write_text(json.dumps(record, indent=2) + "\n")
    return chosen


def _read_tuned(out: Path) -> dict[str, dict[str, Any]]:
    path = out / "tuned.json"
    if not path.is_file():
        return {}
    return {group: entry["chosen"] for group, entry in json.loads(path.read_text()).items()}


def _quiet(config: RunConfig) -> RunConfig:
    from dataclasses import replace

    return replace(config, runtime=replace(config.runtime, progress=False))


def _read_metrics(folder: Path) -> list[dict[str, float]]:
    import csv

    with (folder / "metrics.csv").open() as handle:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
                for row in csv.DictReader(handle)]


def interval(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation and the 95% t-interval half-width of ``values`` (NaN left out).

    Example:
        >>> {k: round(v, 4) for k, v in interval([1.0, 2.0, 3.0]).items()}
        {'n': 3, 'mean': 2.0, 'std': 1.0, 'ci95': 2.4841}
    """
    from scipy.stats import t as student_t

    values = [value for value in values if not math.isnan(value)]  # NaN: not measured (a level never reached)
    count = len(values)
    mean = statistics.fmean(values) if values else math.nan
    std = statistics.stdev(values) if count > 1 else math.nan
    half = float(student_t.ppf(0.975, count - 1)) * std / math.sqrt(count) if count > 1 else math.nan
    return {"n": count, "mean": mean, "std": std, "ci95": half}


def time_to_level(rows: list[dict[str, float]], level: float, epochs: int) -> tuple[float, float]:
    """(epochs, seconds) until a run's validation accuracy (test, without a validation split) first reaches
    ``level``; ``(epochs + 1, NaN)`` when it never does.

    Example:
        >>> rows = [{"val_accuracy": 0.5, "epoch_seconds": 2.0}, {"val_accuracy": 0.9, "epoch_seconds": 2.0}]
        >>> time_to_level(rows, 0.8, 2), time_to_level(rows, 0.95, 2)
        ((2, 4.0), (3, nan))
    """
    split = "val_accuracy" if "val_accuracy" in rows[0] else "test_accuracy"
    seconds = 0.0
    for epoch, row in enumerate(rows[:epochs], 1):
        seconds += row.get("epoch_seconds", math.nan)
        if row.get(split, math.nan) >= level:
            return epoch, seconds
    return epochs + 1, math.nan


def summarize(suite: Suite, out: str | Path, *, seeds: int | None = None, epochs: int | None = None) -> dict[str, Any]:
    """Final-epoch metrics per variant (mean, std, 95% interval) and each comparison's paired analysis
    (:mod:`cycdata.train.analysis`: 95% interval, Holm-adjusted p, TOST, detection limit), written as
    ``results.md`` with ``accuracy.png`` and ``knobs.png``; finished runs only."""
    from cycdata.train.analysis import holm, paired, verdict

    out = Path(out)
    finals: dict[str, dict[int, dict[str, float]]] = {}
    curves: dict[str, list[list[dict[str, float]]]] = {}
    configs: dict[str, RunConfig] = {}  # each variant's config: knobs.png draws its plan step by step
    for run in suite.runs(seeds, epochs, _read_tuned(out)):
        folder = out / run.name
        if not _finished(folder, run.config.epochs):
            continue
        rows = _read_metrics(folder)
        final = dict(rows[run.config.epochs - 1])
        if suite.level is not None:
            final["epochs_to_level"], final["seconds_to_level"] = time_to_level(rows, suite.level, run.config.epochs)
        final["train_seconds"] = sum(row.get("epoch_seconds", math.nan) for row in rows[: run.config.epochs])
        final["train_passes"] = final.get("train_passes_total", math.nan)  # counted by the trainer, not estimated
        finals.setdefault(run.group, {})[run.seed] = final
        curves.setdefault(run.group, []).append(rows[: run.config.epochs])
        configs.setdefault(run.group, run.config)
    primary = suite.primary
    metrics = [m for m in dict.fromkeys((primary, *METRICS, "epochs_to_level", "seconds_to_level", "train_seconds",
                                         "train_passes"))
               if any(m in row for by_seed in finals.values() for row in by_seed.values())]
    groups: dict[str, Any] = {}
    for group, by_seed in finals.items():
        entry: dict[str, Any] = {metric: interval([row.get(metric, math.nan) for row in by_seed.values()])
                                 for metric in metrics}
        dataset, _, variant = group.rpartition("/")
        reference_name = suite.reference(variant)
        if reference_name is not None:
            reference = finals.get(group_name(dataset, reference_name), {})
            common = [s for s in by_seed if s in reference]
            entry["compared_with"] = reference_name
            entry["paired"] = {metric: paired([by_seed[s][metric] - reference[s][metric] for s in common])
                               for metric in metrics if metric in ("test_accuracy", "test_balanced_accuracy",
                                                                   "test_nll", "epochs_to_level")}
            entry["accuracy_vs_reference"] = interval([by_seed[s]["test_accuracy"] - reference[s]["test_accuracy"]
                                                       for s in common])
        if suite.baseline is not None and variant != suite.baseline:
            entry["passes_saved"] = passes_saved(by_seed, finals.get(group_name(dataset, suite.baseline), {}))
        groups[group] = entry
    compared = [group for group, entry in groups.items() if primary in entry.get("paired", {})]
    p_holm = holm([groups[g]["paired"][primary]["p"] for g in compared])
    tost_holm = holm([groups[g]["paired"][primary]["tost_p"] for g in compared])
    for group, p_value, tost_value in zip(compared, p_holm, tost_holm):
        analysis = groups[group]["paired"][primary]
        analysis.update(p_holm=p_value, tost_p_holm=tost_value,
                        verdict=verdict(analysis["mean"], p_value, tost_value))
    summary = {"description": suite.description, "primary": primary, "level": suite.level,
               "tuned": _read_tuned(out), "groups": groups}
    (out / "results.md").write_text(results_table(summary) + "\n")
    if curves:
        _plot(curves, out, configs)
    return summary


def passes_saved(runs: Mapping[int, Mapping[str, float]], baseline: Mapping[int, Mapping[str, float]]) -> float:
    """The share of the baseline's training sample passes a variant saved, over the seeds both ran (NaN if none).

    Example:
        >>> passes_saved({0: {"train_passes": 60.0}, 1: {"train_passes": 60.0}},
        ...              {0: {"train_passes": 100.0}, 1: {"train_passes": 100.0}})
        0.4
    """
    common = [seed for seed in runs if seed in baseline]
    done = sum(runs[seed].get("train_passes", math.nan) for seed in common)
    full = sum(baseline[seed].get("train_passes", math.nan) for seed in common)
    return 1.0 - done / full if common and full > 0 else math.nan


def results_table(summary: Mapping[str, Any]) -> str:
    """The summary as Markdown: each variant's final metrics (mean ± std) and, against its reference, the
    paired difference of the primary metric with its 95% interval, Holm-adjusted p, TOST p (±0.3 points),
    the detection limit and the verdict; then what was tuned."""
    from cycdata.train.analysis import EQUIVALENCE_MARGIN

    primary = summary.get("primary", "test_accuracy")
    level = summary.get("level")
    label = primary.replace("test_", "test ").replace("_", " ")
    timing = f" | epochs to {100 * level:.0f}% val" if level is not None else ""
    counted = any("train_passes" in entry and not math.isnan(entry["train_passes"]["mean"])
                  for entry in summary["groups"].values())
    passes = " | sample passes (saved)" if counted else ""
    lines = [f"| variant | seeds | {label} % (mean ± std) | NLL | ECE{timing}{passes} | Δ {label} vs (paired, 95% CI) "
             "| p (Holm) | TOST p (Holm) | detectable Δ | verdict |",
             "|---|---|---|---|---|" + ("---|" if timing else "") + ("---|" if passes else "") + "---|---|---|---|---|"]
    for group, entry in summary["groups"].items():
        score, nll, ece = entry[primary], entry["test_nll"], entry["test_ece"]
        cells = [group, str(score["n"]), f"{100 * score['mean']:.2f} ± {_pct(score['std'])}",
                 f"{nll['mean']:.4f} ± {_num(nll['std'])}", f"{ece['mean']:.4f} ± {_num(ece['std'])}"]
        if timing:
            steps = entry.get("epochs_to_level", {"mean": math.nan, "std": math.nan})
            cells.append(f"{steps['mean']:.1f} ± {_one(steps['std'])}")
        if passes:
            cells.append(_passes(entry))
        analysis = entry.get("paired", {}).get(primary)
        if analysis is None:
            cells += ["—", "", "", "", ""]
        else:
            spread = f" ± {100 * analysis['ci95']:.2f}" if analysis["n"] > 1 else ""
            cells += [f"{100 * analysis['mean']:+.2f}{spread} vs {entry['compared_with']}",
                      _p(analysis.get("p_holm", math.nan)), _p(analysis.get("tost_p_holm", math.nan)),
                      _pct(analysis["detectable"]), analysis.get("verdict", "n/a")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Paired by seed; p: paired t-test, Holm-adjusted across this table's comparisons; TOST: equivalence "
                 f"within ±{100 * EQUIVALENCE_MARGIN:.1f} points (Holm-adjusted); detectable Δ: the smallest paired "
                 "difference this many seeds find with power 0.8 at α 0.05; verdict at α 0.05.")
    for group, settings in (summary.get("tuned") or {}).items():
        lines.append(f"Tuned on validation: {group} {json.dumps(settings)}.")
    return "\n".join(lines)


def _passes(entry: Mapping[str, Any]) -> str:
    """Mean training sample passes per run and the share of the baseline's saved, e.g. ``4,048 (40.0%)``."""
    count = entry.get("train_passes", {"mean": math.nan})["mean"]
    if math.isnan(count):
        return "n/a"
    saved = entry.get("passes_saved", math.nan)
    return f"{count:,.0f}" + ("" if math.isnan(saved) else f" ({100 * saved:.1f}%)")


def _p(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _one(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f}"


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def _num(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


KNOB_COLUMNS = ("optim.weight_decay", "temperature", "grad_clip", "augment.strength", "self_paced.keep",
                "data.batch_size", "semi_supervised.ratio", "optim.lr", "distill.temperature")


def _plot(curves: Mapping[str, list[list[dict[str, float]]]], out: Path,
          configs: Mapping[str, RunConfig] | None = None) -> None:
    """``accuracy.png`` and ``knobs.png`` of the summary (the knobs step by step from each variant's plan)."""
    from cycdata.figures import save_figure
    from cycdata.plan import Plan
    from cycdata.train.figures import suite_accuracy_figure, suite_knobs_figure

    save_figure(suite_accuracy_figure(curves), out / "accuracy.png")
    plans = {group: Plan.from_config(config) for group, config in (configs or {}).items()}
    figure = suite_knobs_figure(curves, KNOB_COLUMNS, plans)
    if figure is not None:
        save_figure(figure, out / "knobs.png")
