"""The ``cycdata`` command: ``plan``, ``train``, ``convert``, ``experiment``, ``range-test`` and ``ladder``.

Every invalid input exits with status 2 and one line on stderr naming the problem and the fix.

Example:
    >>> main(["plan", "--json", "epochs=3"])  # doctest: +ELLIPSIS
    {"epochs": 3, "cycle": {"start": 0.0, "end": 1.0, "t": [0.0, 0.5, 1.0]}, "knobs": {"data.batch_size": [128, ...}}
    0
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Only torch-free modules at the top: `--help`, `plan` and usage errors answer before torch is imported;
# each command imports what it needs.
from cycdata.config import ConfigError, RunConfig, RunStopped, apply_overrides, load_config
from cycdata.plan import Plan, warn_if_short_cycle
from cycdata.train.experiment import SUITES, load_suite, results_table, run_suite
from cycdata.train.paths import check_output, dataset_folder, disk_full_line
from cycdata.train.range_knobs import KNOB_SPECS, STEP_RULES

__all__ = ["main"]

EXIT_USAGE = 2

# The library's one-line errors beyond ConfigError, by the module that defines each (imported by a command
# only when it needs it: an error can only come from a module that was imported).
_USER_ERRORS = (
    ("cycdata.augment_ladder.ladder", "LadderError"),
    ("cycdata.loaders.datasets", "DatasetError"),
    ("cycdata.loaders.ffcv_loader", "FFCVMissingError"),
    ("cycdata.train.checkpoint", "CheckpointError"),
)


def _user_error_types() -> tuple[type[BaseException], ...]:
    return tuple(getattr(sys.modules[module], name) for module, name in _USER_ERRORS if module in sys.modules)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"cycdata {version('cycdata')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "cycdata (not installed)"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (no usage dump) with status 2; every command and
    subcommand takes ``--version``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=_version())

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _split_config_and_overrides(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """The first positional without '=' is the config file; KEY=VALUE items are overrides."""
    config = None
    overrides = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None:
            config = item
        else:
            # `plan epochs 10`: a key and its value given apart, not two config files.
            hint = f" (did you mean {config}={item}?)" if not Path(config).exists() else ""
            raise ConfigError(
                "arguments", f"got a second config file {item!r}; give one CONFIG and KEY=VALUE overrides{hint}"
            )
    return config, overrides


def _add_flag_override(overrides: list[str], key: str, flag: str, value: object) -> None:
    """Add ``--flag VALUE`` as the override ``key=VALUE``; a different ``key=...`` given too is a conflict."""
    if value is None:
        return
    wanted = f"{key}={value}"
    given = [item for item in overrides if item.split("=", 1)[0].strip() == key]
    if any(apply_overrides({}, [item]) != apply_overrides({}, [wanted]) for item in given):
        raise ConfigError(flag, f"{flag} {value} conflicts with {given[-1]}; give one of them")
    overrides.append(wanted)


def _command_plan(args: argparse.Namespace) -> int:
    config_path, overrides = _split_config_and_overrides(args.items)
    _add_flag_override(overrides, "epochs", "--epochs", args.epochs)
    config = load_config(config_path, overrides)
    if args.plot:
        check_output("--plot", args.plot, folder=False)
    plan = Plan.from_config(config)
    if not args.json:  # the table first (no torch needed), then train's slower checks
        print(plan.table(), flush=True)
    checked = _check_like_train(config)
    warn_if_short_cycle(config)
    if args.json:  # stdout holds the JSON object only, and only for a config that train would accept
        print(plan.to_json())
    else:
        print(checked)
    if args.plot:
        path = plan.plot(args.plot)
        print(f"plot written to {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _check_like_train(config: RunConfig) -> str:
    """What ``train`` refuses before it writes anything (dataset, ladder, the model against the images), refused
    here too; a line saying what was checked."""
    from cycdata.train.builders import resolve_ladder, validate_run

    data = validate_run(config)
    ladder = resolve_ladder(config, data)
    return (f"checked as train would: dataset {config.data.dataset} ({len(data.train)} train / {len(data.test)} "  # type: ignore[arg-type]
            f"test images, {data.in_chans}x{data.image_size}x{data.image_size}, {data.num_classes} classes), "
            f"model {config.model}, ladder {'none' if ladder is None else ladder.name}"
            + _planned_passes_line(config, data))


def _planned_passes_line(config: RunConfig, data: Any) -> str:
    """With keep-mode selection in the sampler: the training sample passes the plan makes, against all data."""
    sp = config.self_paced
    if sp is None or sp.keep is None or sp.level != "epoch" or config.semi_supervised is not None:
        return ""
    from cycdata.samplers import kept_count

    size = len(data.train)
    labels = getattr(data.train, "labels", None) if sp.per_class else None
    plan = Plan.from_config(config)
    planned = sum(kept_count(size, float(plan.at(epoch)["self_paced.keep"]), labels) for epoch in range(config.epochs))
    full = size * config.epochs
    saved = 100 * (1 - planned / full)
    return f"\nsample passes planned: {planned:,} of {full:,} with all data every epoch ({saved:.1f}% fewer)"


def _default_run_dir(config: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dataset = config.data.dataset.split(":")[0]
    # A model name may hold '/' (hf-hub:org/name): the folder name is made one safe path component.
    return Path("runs") / dataset_folder(f"{dataset}-{config.model}-{stamp}")


def _check_new_run_folder(out: Path) -> None:
    """A new run never writes into a folder holding another run: finished, unfinished or still being written."""
    if (out / "last.pt").exists():
        raise ConfigError(
            "--out", f"{out} already holds a run (last.pt); continue it with --resume {out} or choose another --out"
        )
    found = [name for name in ("config.yaml", "metrics.csv", "best.pt") if (out / name).exists()]
    if found:
        raise ConfigError(
            "--out", f"{out} holds a run's files ({', '.join(found)}) but no last.pt: a run stopped before its first "
            "checkpoint or one still starting, which --resume cannot continue; remove it or choose another --out"
        )


def _command_train(args: argparse.Namespace) -> int:
    from cycdata.train.trainer import resume, train

    config_path, overrides = _split_config_and_overrides(args.items)
    if args.resume:
        if config_path or overrides or args.out or args.init:
            raise ConfigError(
                "arguments",
                "--resume DIR continues the run with the config stored in DIR/last.pt; "
                "give no CONFIG, KEY=VALUE, --out or --init with it",
            )
        check_output("--resume", args.resume)
        resume(args.resume)
        return 0
    _add_flag_override(overrides, "init", "--init", args.init)
    config = load_config(config_path, overrides)
    out = Path(args.out) if args.out else _default_run_dir(config)
    args.out = str(out)  # named by main's one-line report of a disk that fills up during the run
    _check_new_run_folder(out)
    check_output("--out", out)
    train(config, out)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, once
        print(f"run folder: {out}")
    return 0


def _command_ladder_measure(args: argparse.Namespace) -> int:
    import yaml

    from cycdata.augment_ladder.ladder import LadderError, load_ladder
    from cycdata.augment_ladder.measure import measure_ladder, reorder, train_reference_model
    from cycdata.loaders.datasets import load_dataset

    # Everything that can be wrong is checked before the reference model trains (seconds to minutes).
    for flag, value in (("--samples", args.samples), ("--epochs", args.epochs)):
        if value < 1:
            raise ConfigError(flag, f"got {value}; give an integer >= 1")
    ladder = load_ladder(args.ladder)
    write = Path(args.write) if args.write else None
    if write is not None:
        if write.suffix not in (".yaml", ".yml"):
            raise LadderError(f"--write {write}: the reordered ladder is written as YAML; name the file *.yaml")
        if write.exists():
            raise LadderError(f"--write {write}: the file exists; refusing to overwrite it, choose another name")
        if not write.parent.is_dir():
            raise LadderError(f"--write {write}: the folder {write.parent} does not exist")
        check_output("--write", write, folder=False)
    import timm  # imported here: a second of start-up that only this command needs

    if not timm.is_model(args.model):
        raise ConfigError("--model", f"unknown timm model {args.model!r}; see timm.list_models() for names")
    data = load_dataset(args.dataset)
    notes = sys.stderr if args.json else sys.stdout  # with --json, stdout holds the JSON object only

    start = time.perf_counter()
    model = train_reference_model(data, model=args.model, epochs=args.epochs)
    seconds = time.perf_counter() - start
    measurement = measure_ladder(ladder, data, model=model, samples=args.samples)
    images = min(args.samples, len(data.test))
    print(f"reference model: {args.model} trained {args.epochs} epoch(s) on {args.dataset} without augmentation "
          f"in {seconds:.1f} s; clean accuracy {measurement.clean_accuracy:.1%} on {images} test images", file=notes)
    if args.json:
        print(measurement.to_json())
    else:
        print(measurement.table())
        late = measurement.out_of_order()
        if late:
            print(f"rungs out of order: {late} (measured strength lower than the rung before); "
                  f"measured order: {measurement.order()}")
        else:
            print("rungs in order of measured strength")
    if write is not None:
        text = yaml.safe_dump(reorder(ladder, measurement.order()).to_dict(), sort_keys=False)
        try:
            # Mode "x" creates the file or fails: a file that appeared during the measurement is not overwritten.
            with open(write, "x") as handle:
                handle.write(text)
        except FileExistsError:
            raise LadderError(f"--write {write}: the file appeared meanwhile; refusing to overwrite it") from None
        print(f"ladder reordered by measured strength written to {write}", file=notes)
    return 0


def _command_ladder_show(args: argparse.Namespace) -> int:
    from cycdata.augment_ladder.ladder import load_ladder
    from cycdata.augment_ladder.measure import grid_png
    from cycdata.loaders.datasets import load_dataset

    if args.columns < 1:
        raise ConfigError("--columns", f"got {args.columns}; give an integer >= 1")
    ladder = load_ladder(args.ladder)
    check_output("--out", args.out, folder=False)
    data = load_dataset(args.dataset)
    print(grid_png(ladder, data, args.out, columns=args.columns))
    return 0


def _command_convert(args: argparse.Namespace) -> int:
    from cycdata.loaders.ffcv_loader import beton_paths, convert

    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers", f"got {args.workers}; give an integer >= 1, or leave it out for the default")
    beton_paths(args.out)  # a name that is not NAME.beton is refused before the writable check names its folder
    check_output("OUT.beton", args.out, folder=False)
    started = time.perf_counter()
    info = convert(args.dataset, args.out, jpeg_quality=args.jpeg, max_resolution=args.max_resolution,
                   overwrite=args.overwrite, progress=not args.quiet, num_workers=args.workers)
    paths = beton_paths(args.out)
    for split, stats in info.splits.items():
        print(f"{paths[split]}: {stats['samples']} images, {stats['bytes'] / 2**20:.1f} MiB")
    # A variable-size file keeps whole images (read back at data.image_size); image_size is their longest side.
    size = (f"whole images, {info.in_chans} channels, longer side <= {info.image_size}" if info.variable_size
            else f"{info.in_chans}x{info.image_size}x{info.image_size}")
    print(f"{paths['info']}: {info.num_classes} classes, {size}, "
          f"{info.encoding}; {time.perf_counter() - started:.1f}s. Train on it with: "
          f"cycdata train data.dataset=beton:{args.out}")
    return 0


def _command_experiment(args: argparse.Namespace) -> int:
    if args.seeds is not None and args.seeds < 1:
        raise ConfigError("--seeds", f"got {args.seeds}; give an integer >= 1")
    suite = load_suite(args.suite)  # every variant is validated before the first run starts
    out = Path(args.out or f"runs/experiment-{dataset_folder(Path(args.suite).stem)}")
    args.out = str(out)
    suite.runs(args.seeds, args.epochs)  # --epochs is validated as every variant's epochs before anything runs
    check_output("--out", out)
    if args.jobs is not None and not 1 <= args.jobs <= 64:
        raise ConfigError("--jobs", f"got {args.jobs}; give an integer from 1 to 64 (runs side by side)")
    summary = run_suite(suite, out, seeds=args.seeds, epochs=args.epochs, jobs=args.jobs)
    print(results_table(summary))
    print(f"results: {out / 'results.md'} (and results.json, accuracy.png, knobs.png); {summary['seconds']:.0f}s")
    return 0


def _command_range_test(args: argparse.Namespace) -> int:
    from cycdata.train.range_test import check_sweep, plot_range, range_test

    config_path, overrides = _split_config_and_overrides(args.items)
    config = load_config(config_path, overrides)
    # The sweep's arguments and the output folder are checked before the (minutes long) sweep, not after it.
    check_sweep(config, args.knob, low=args.low, high=args.high, steps=args.steps, rule=args.rule,
                repeats=args.repeats)
    out = Path(args.out or f"runs/range-test-{args.knob}")
    args.out = str(out)
    check_output("--out", out)
    started = time.perf_counter()
    result = range_test(config, args.knob, low=args.low, high=args.high, steps=args.steps, rule=args.rule,
                        repeats=args.repeats, log=lambda line: print(line, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    plot_range(result, out / "range_test.png")
    (out / "range_test.json").write_text(result.to_json() + "\n")
    stop = " (stopped early: the loss diverged)" if result.stopped_early else ""
    print(f"swept {args.knob} over {len(result.values)} values in {time.perf_counter() - started:.0f}s{stop}; "
          f"plot: {out / 'range_test.png'}")
    print(f"rule: {result.rule}")
    for warning in result.warnings():
        print(f"warning: {warning}")
    print("suggested ends, ready to paste into a config:\n")
    print(result.snippet())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cycdata", description="General cyclical training: start easy, train hard, finish easy.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    plan = commands.add_parser("plan", help="validate a config and show every knob per epoch, without training")
    plan.add_argument(
        "items",
        nargs="*",
        metavar="[CONFIG] [KEY=VALUE]",
        help="a YAML config (default: the default recipe) and dotted overrides, e.g. epochs=20",
    )
    plan.add_argument("--epochs", type=int, help="plan this many epochs (same as epochs=N)")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    plan.add_argument("--plot", metavar="FILE.png", help="draw every knob over the epochs to a PNG")
    plan.set_defaults(handler=_command_plan)

    run = commands.add_parser("train", help="train a timm model with the cyclical knobs of a config")
    run.add_argument(
        "items",
        nargs="*",
        metavar="[CONFIG] [KEY=VALUE]",
        help="a YAML config (default: the default recipe on the embedded MNIST) and dotted overrides",
    )
    run.add_argument("--out", metavar="DIR", help="run folder (default: runs/DATASET-MODEL-TIME)")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    run.add_argument("--init", metavar="FILE", help="start from these weights (a checkpoint, run folder or weights "
                     "file; same as init=FILE): weights only, a head of another size is re-initialised")
    run.set_defaults(handler=_command_train)

    convert = commands.add_parser(
        "convert", help="write a dataset's train and test splits to FFCV .beton files (with an index field)")
    convert.add_argument("dataset", metavar="DATASET", help="dataset spec: mnist5k, digits, synthetic:N, cifar10:PATH, "
                         "folder:PATH, ...")
    convert.add_argument("out", metavar="OUT.beton", help="writes OUT.train.beton, OUT.test.beton and OUT.json")
    convert.add_argument("--jpeg", type=int, metavar="QUALITY", help="store JPEG at this quality (default: raw pixels)")
    convert.add_argument("--max-resolution", type=int, metavar="R", help="shrink images larger than R pixels a side")
    convert.add_argument("--overwrite", action="store_true", help="replace existing files")
    convert.add_argument("--workers", type=int, help="writer processes (default: by dataset size and CPUs)")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(handler=_command_convert)

    experiment = commands.add_parser(
        "experiment", help="run a suite of configs x seeds (resumable) and summarise mean ± std and 95%% intervals")
    experiment.add_argument("suite", metavar="SUITE", help=f"a built-in suite ({', '.join(SUITES)}) or a suite "
                            ".yaml file")
    experiment.add_argument("--seeds", type=int, help="seeds per variant (default: the suite's)")
    experiment.add_argument("--epochs", type=int, help="override every variant's epochs (a quick look)")
    experiment.add_argument("--jobs", type=int, help="runs side by side, each on cores/jobs threads (default: the "
                            "suite's jobs, else 1)")
    experiment.add_argument("--out", metavar="DIR", help="suite folder (default runs/experiment-SUITE); an "
                            "interrupted suite continues where it stopped")
    experiment.set_defaults(handler=_command_experiment)

    ranges = commands.add_parser(
        "range-test", help="sweep one knob low to high in a short run and suggest its easy and hard ends")
    ranges.add_argument("knob", metavar="KNOB", help=", ".join(KNOB_SPECS))
    ranges.add_argument("items", nargs="*", metavar="[CONFIG] [KEY=VALUE]", help="the run's config and overrides")
    ranges.add_argument("--low", type=float, help="sweep start (default: per knob)")
    ranges.add_argument("--high", type=float, help="sweep end (default: per knob)")
    ranges.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    ranges.add_argument("--rule", choices=STEP_RULES, default=STEP_RULES[0],
                        help="a step-size knob's easy end: where the loss starts to fall (classic, default) or "
                        "where it falls fastest (steepest)")
    ranges.add_argument("--repeats", type=int, default=1,
                        help="sweeps with seeds seed, seed+1, ...; the ends are read on their mean curve, which "
                        "moves less with the seed and the CPU than one sweep's (default 1)")
    ranges.add_argument("--out", metavar="DIR", help="where the plot and JSON go (default runs/range-test-KNOB)")
    ranges.set_defaults(handler=_command_range_test)

    ladder = commands.add_parser("ladder", help="measure an augmentation ladder's rungs, or show them on images")
    ladder_commands = ladder.add_subparsers(dest="ladder_command", required=True, parser_class=_Parser)
    ladder_help = "a built-in ladder (none, flips, default, digits) or a ladder .yaml file"
    dataset_help = "dataset spec: mnist5k (default), digits, synthetic:N, cifar10:PATH, ..."
    measure = ladder_commands.add_parser(
        "measure", help="measure each rung's strength: pixel change, SSIM drop and a reference model's accuracy drop"
    )
    measure.add_argument("ladder", metavar="LADDER", help=ladder_help)
    measure.add_argument("--dataset", default="mnist5k", help=dataset_help)
    measure.add_argument("--samples", type=int, default=1000, help="test images to measure on (default 1000)")
    measure.add_argument("--epochs", type=int, default=3, help="reference model epochs (default 3)")
    measure.add_argument("--model", default="test_resnet", help="timm model of the reference (default test_resnet)")
    measure.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    measure.add_argument("--write", metavar="FILE.yaml", help="write the ladder reordered by measured strength")
    measure.set_defaults(handler=_command_ladder_measure)
    show = ladder_commands.add_parser("show", help="draw every rung on the same test images to a PNG")
    show.add_argument("ladder", metavar="LADDER", help=ladder_help)
    show.add_argument("--dataset", default="mnist5k", help=dataset_help)
    show.add_argument("--out", default="grid.png", metavar="FILE.png", help="the PNG to write (default grid.png)")
    show.add_argument("--columns", type=int, default=8, help="images per rung (default 8)")
    show.set_defaults(handler=_command_ladder_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cycdata`` command line; returns the exit status."""
    parser = build_parser()
    # KEY=VALUE overrides may follow options (``train --init W epochs=5``): argparse leaves them over.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "items") and all("=" in item and not item.startswith("-") for item in extra):
            args.items = [*args.items, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler: Callable[[argparse.Namespace], int] = args.handler
    warnings.formatwarning = _one_line_warning
    try:
        return handler(args)
    except RunStopped as error:
        print(f"cycdata {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as error:
        print(f"cycdata {args.command}: invalid config: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:
        if isinstance(error, _user_error_types()):
            print(f"cycdata {args.command}: {error}", file=sys.stderr)
            return EXIT_USAGE
        if not isinstance(error, (OSError, RuntimeError)):
            raise
        # A disk that fills up mid-run (a checkpoint, a plot): one line; the last complete checkpoint is kept.
        line = disk_full_line(error, getattr(args, "out", None) or getattr(args, "resume", None))
        if line is None:
            raise
        print(f"cycdata {args.command}: {line}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"cycdata {args.command}: interrupted; {_INTERRUPTED.get(args.command, 'nothing was replaced')}",
              file=sys.stderr)
        return 130


# What an interrupted command leaves behind.
_INTERRUPTED = {
    "train": "the last finished epoch is in last.pt (use --resume)",
    "experiment": "finished runs are kept; the same command continues the suite",
    "convert": "no .beton was replaced and the partial files were removed; run it again",
}


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    """Warnings as one line (``warning: ...``), without the source line argparse users never wrote."""
    return f"warning: {message}\n"


if __name__ == "__main__":
    sys.exit(main())
