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

__all__ = ["SUITES", "Run", "Suite", "load_suite", "run_suite", "summarize"]

SUITES = ("optimizer", "factor", "data", "range", "range-recipe", "smoke")
METRICS = ("test_accuracy", "test_nll", "test_ece")


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
        return f"{self.dataset}/{self.variant}" if self.dataset else self.variant


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

    def reference(self, variant: str) -> str | None:
        """The variant ``variant`` is compared with (paired by seed), if any."""
        reference = self.compare.get(variant, self.baseline)
        return None if reference == variant else reference

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str = "suite") -> Suite:
        """A suite from its YAML mapping; every field and every variant's config validated, one line per fault."""
        if not isinstance(raw, Mapping):
            raise ConfigError(where, "a suite must be a mapping with 'variants' (and optional base, seeds, ...)")
        unknown = set(raw) - {"variants", "base", "datasets", "seeds", "baseline", "compare", "description"}
        if unknown:
            raise ConfigError(where, f"unknown keys {sorted(unknown, key=str)}; allowed: description, seeds, "
                              "baseline, compare, base, datasets, variants")
        suite = cls(variants=_variants(raw.get("variants"), f"{where}.variants"),
                    base=_mapping(raw.get("base"), f"{where}.base", "dotted keys applied to every variant"),
                    datasets=_datasets(raw.get("datasets"), f"{where}.datasets"),
                    seeds=number(ge=1, integer=True)(f"{where}.seeds", raw.get("seeds", 5), {}),
                    baseline=raw.get("baseline"),
                    compare=_mapping(raw.get("compare"), f"{where}.compare", "variant -> the variant it is compared "
                                     "with"),
                    description=str(raw.get("description", "")))
        named = ([suite.baseline] if suite.baseline is not None else []) + [*suite.compare, *suite.compare.values()]
        for name in named:
            if not isinstance(name, str) or name not in suite.variants:
                raise ConfigError(f"{where}.baseline", f"{name!r} is not one of the variants {sorted(suite.variants)}")
        suite.runs(seeds=1)  # every variant's config is validated here, before anything runs
        return suite

    def runs(self, seeds: int | None = None, epochs: int | None = None) -> list[Run]:
        """Every run, seed-major (all variants of seed 0 first), each config validated."""
        runs = []
        for seed in range(self.seeds if seeds is None else seeds):
            for dataset in self.datasets or (None,):
                for variant, settings in self.variants.items():
                    check_name("variant", variant)  # a folder name, also for a Suite built without from_mapping
                    raw = apply_settings(apply_settings({}, self.base), {"seed": seed, **settings})
                    if dataset is not None:
                        raw = apply_settings(raw, {"data.dataset": dataset})
                    if epochs is not None:
                        raw = apply_settings(raw, {"epochs": epochs})
                    try:
                        config = parse_config(raw)
                    except ConfigError as error:
                        raise ConfigError(f"variant {variant}", str(error)) from None
                    runs.append(Run(dataset, variant, seed, config))
        return runs


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
              log: Any = print) -> dict[str, Any]:
    """Run (or finish) every run of ``suite`` under ``out``; then write and return the summary."""
    from cycdata.train.trainer import resume, train

    out = Path(out)
    runs = suite.runs(seeds, epochs)
    started = time.perf_counter()
    for position, run in enumerate(runs, 1):
        folder = out / run.name
        if _finished(folder, run.config.epochs):
            continue
        began = time.perf_counter()
        if (folder / "last.pt").is_file():
            row = resume(folder)
        else:
            if folder.exists():
                remove_run_folder(out, folder)  # a run killed before its first checkpoint: nothing to keep
            config = run.config if not run.config.runtime.progress else _quiet(run.config)
            row = train(config, folder)
        log(f"[{position}/{len(runs)}] {run.name}: test {100 * row['test_accuracy']:.2f}%  nll {row['test_nll']:.4f}  "
            f"ece {row['test_ece']:.4f}  ({time.perf_counter() - began:.0f}s, {time.perf_counter() - started:.0f}s "
            "in all)")
    summary = summarize(suite, out, seeds=seeds, epochs=epochs)
    summary["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _quiet(config: RunConfig) -> RunConfig:
    from dataclasses import replace

    return replace(config, runtime=replace(config.runtime, progress=False))


def _read_metrics(folder: Path) -> list[dict[str, float]]:
    import csv

    with (folder / "metrics.csv").open() as handle:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
                for row in csv.DictReader(handle)]


def interval(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation and the 95% t-interval half-width of ``values``.

    Example:
        >>> {k: round(v, 4) for k, v in interval([1.0, 2.0, 3.0]).items()}
        {'n': 3, 'mean': 2.0, 'std': 1.0, 'ci95': 2.4841}
    """
    from scipy.stats import t as student_t

    count = len(values)
    mean = statistics.fmean(values) if values else math.nan
    std = statistics.stdev(values) if count > 1 else math.nan
    half = float(student_t.ppf(0.975, count - 1)) * std / math.sqrt(count) if count > 1 else math.nan
    return {"n": count, "mean": mean, "std": std, "ci95": half}


def summarize(suite: Suite, out: str | Path, *, seeds: int | None = None, epochs: int | None = None) -> dict[str, Any]:
    """Final-epoch metrics per variant (mean, std, 95% interval; paired difference to the baseline),
    written as ``results.md`` with ``accuracy.png`` and ``knobs.png``; finished runs only."""
    out = Path(out)
    finals: dict[str, dict[int, dict[str, float]]] = {}
    curves: dict[str, list[list[dict[str, float]]]] = {}
    configs: dict[str, RunConfig] = {}  # each variant's config: knobs.png draws its plan step by step
    for run in suite.runs(seeds, epochs):
        folder = out / run.name
        if not _finished(folder, run.config.epochs):
            continue
        rows = _read_metrics(folder)
        finals.setdefault(run.group, {})[run.seed] = rows[run.config.epochs - 1]
        curves.setdefault(run.group, []).append(rows[: run.config.epochs])
        configs.setdefault(run.group, run.config)
    groups: dict[str, Any] = {}
    for group, by_seed in finals.items():
        entry = {metric: interval([row[metric] for row in by_seed.values()]) for metric in METRICS}
        dataset, _, variant = group.rpartition("/")
        reference_name = suite.reference(variant)
        if reference_name is not None:
            reference = finals.get(f"{dataset}/{reference_name}" if dataset else reference_name, {})
            paired = [by_seed[s]["test_accuracy"] - reference[s]["test_accuracy"] for s in by_seed if s in reference]
            entry["compared_with"] = reference_name
            entry["accuracy_vs_reference"] = interval(paired)
        groups[group] = entry
    summary = {"description": suite.description, "groups": groups}
    (out / "results.md").write_text(results_table(summary) + "\n")
    if curves:
        _plot(curves, out, configs)
    return summary


def results_table(summary: Mapping[str, Any]) -> str:
    """The summary as a Markdown table (accuracy and NLL/ECE mean ± std, 95% intervals, paired deltas)."""
    lines = ["| variant | seeds | test accuracy % (mean ± std) | 95% CI | Δ accuracy vs (paired by seed, 95% CI) "
             "| NLL | ECE |", "|---|---|---|---|---|---|---|"]
    for group, entry in summary["groups"].items():
        accuracy, nll, ece = entry["test_accuracy"], entry["test_nll"], entry["test_ece"]
        delta = entry.get("accuracy_vs_reference")
        delta_text = "—"
        if delta:
            spread = f" ± {100 * delta['ci95']:.2f}" if delta["n"] > 1 else ""
            delta_text = f"{100 * delta['mean']:+.2f}{spread} vs {entry['compared_with']}"
        lines.append(f"| {group} | {accuracy['n']} | {100 * accuracy['mean']:.2f} ± {_pct(accuracy['std'])} | "
                     f"± {_pct(accuracy['ci95'])} | {delta_text} | {nll['mean']:.4f} ± {_num(nll['std'])} | "
                     f"{ece['mean']:.4f} ± {_num(ece['std'])} |")
    return "\n".join(lines)


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
