"""The ``cycdata`` command: ``plan`` and ``train``.

Every invalid input exits with status 2 and one line on stderr naming the problem and the fix.

Example:
    >>> main(["plan", "--json", "epochs=3"])  # doctest: +ELLIPSIS
    {"epochs": 3, "knobs": {"data.batch_size": [128, 128, 128], ...}}
    0
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cycdata.loaders.datasets import DatasetError
from cycdata.train.checkpoint import CheckpointError

from cycdata.config import ConfigError, RunConfig, load_config
from cycdata.plan import Plan

__all__ = ["main"]

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (no usage dump) with status 2."""

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
            raise ConfigError(
                "arguments", f"got a second config file {item!r}; give one CONFIG and KEY=VALUE overrides"
            )
    return config, overrides


def _command_plan(args: argparse.Namespace) -> int:
    config_path, overrides = _split_config_and_overrides(args.items)
    if args.epochs is not None:
        overrides.append(f"epochs={args.epochs}")
    config = load_config(config_path, overrides)
    plan = Plan.from_config(config)
    if args.json:
        print(plan.to_json())
    else:
        print(plan.table())
    if args.plot:
        path = plan.plot(args.plot)
        print(f"plot written to {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _default_run_dir(config: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dataset = config.data.dataset.split(":")[0]
    return Path("runs") / f"{dataset}-{config.model}-{stamp}"


def _command_train(args: argparse.Namespace) -> int:
    from cycdata.train.trainer import resume, train

    config_path, overrides = _split_config_and_overrides(args.items)
    if args.resume:
        if config_path or overrides or args.out:
            raise ConfigError(
                "arguments",
                "--resume DIR continues the run with its saved DIR/config.yaml; "
                "give no CONFIG, KEY=VALUE or --out with it",
            )
        resume(args.resume)
        return 0
    config = load_config(config_path, overrides)
    out = Path(args.out) if args.out else _default_run_dir(config)
    if (out / "last.pt").exists():
        raise ConfigError(
            "--out", f"{out} already holds a run (last.pt); continue it with --resume {out} or choose another --out"
        )
    train(config, out)
    print(f"run folder: {out}")
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
    run.set_defaults(handler=_command_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cycdata`` command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigError as error:
        print(f"cycdata {args.command}: invalid config: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (DatasetError, CheckpointError) as error:
        print(f"cycdata {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            f"cycdata {args.command}: interrupted; the last finished epoch is in last.pt (use --resume)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
