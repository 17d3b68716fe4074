"""Bad configs end in one line and exit status 2, before anything runs or is written (issue 15, items 10/11).

The fuzz list drives the real ``cycdata`` command line: most cases through ``cycdata.train.cli.main`` inside
ONE fresh interpreter (torch is imported once, not 90 times), a few through their own ``python -m
cycdata.train.cli`` process, so the exit status and stderr a user sees are checked end to end as well. Each
case runs with a temporary folder as the working directory and ``--out`` inside it; the folder's listing
(names, sizes, modification times) must be the same after the case as before.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cycdata.augment_ladder.ladder import LadderError, load_ladder
from cycdata.config import ConfigError, apply_overrides, load_config, parse_config, read_yaml, validate_config
from cycdata.plan import Plan

# Small enough that a case validation wrongly let through would finish in seconds rather than hang the suite.
TINY = ("model=test_resnet", "data.train_limit=200", "runtime.progress=false", "runtime.device=cpu")


def write_inputs(root: Path) -> None:
    """The bad files the cases pass in, written before any case runs (they are part of the 'before' listing)."""
    (root / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    (root / "nul.yaml").write_bytes(b"epochs: 3\x00\n")
    (root / "empty.yaml").write_text("")
    (root / "comments.yaml").write_text("# nothing set here\n")
    (root / "deep_list.yaml").write_text("epochs: " + "[" * 5000 + "]" * 5000 + "\n")
    nested = "".join("  " * depth + "optim:\n" for depth in range(60))
    (root / "deep_map.yaml").write_text(nested + "  " * 60 + "x: 1\n")
    aliases = ["a0: &a0 {x: 1, y: 2}"]
    aliases += [f"a{i}: &a{i} {{{', '.join(f'k{j}: *a{i - 1}' for j in range(9))}}}" for i in range(1, 9)]
    (root / "alias_bomb.yaml").write_text("\n".join(aliases) + "\n")
    (root / "duplicate.yaml").write_text("epochs: 3\nseed: 1\nepochs: 5\n")
    (root / "duplicate_nested.yaml").write_text("optim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.2\n")
    (root / "list.yaml").write_text("- epochs\n- 3\n")
    (root / "scalar.yaml").write_text("just words\n")
    (root / "malformed.yaml").write_text("epochs: 10\noptim:\n  lr: 0.1\n   momentum: 0.9\n")
    (root / "huge.yaml").write_text("# padding\n" * 120_000)
    (root / "folder.yaml").mkdir()
    (root / "ladder_folder.yaml").mkdir()


def config_cases() -> list[tuple[list[str], list[str]]]:
    """(argv, words the one stderr line must contain: the key, and for files the file's name)."""
    files = [
        ("binary.yaml", ["config", "binary.yaml", "not a text file"]),
        ("nul.yaml", ["config", "nul.yaml"]),
        ("empty.yaml", ["config", "empty.yaml", "empty"]),
        ("comments.yaml", ["config", "comments.yaml", "empty"]),
        ("deep_list.yaml", ["config", "deep_list.yaml", "nested deeper"]),
        ("deep_map.yaml", ["config", "deep_map.yaml", "nested deeper"]),
        ("alias_bomb.yaml", ["config", "alias_bomb.yaml", "aliases"]),
        ("duplicate.yaml", ["duplicate key 'epochs'", "line 3", "first at line 1"]),
        ("duplicate_nested.yaml", ["duplicate key 'lr'", "line 4"]),
        ("list.yaml", ["config", "mapping"]),
        ("scalar.yaml", ["config", "mapping"]),
        ("malformed.yaml", ["config", "malformed.yaml", "line 4"]),
        ("huge.yaml", ["config", "huge.yaml", "MiB"]),
        ("folder.yaml", ["config", "folder.yaml", "folder"]),
        ("missing.yaml", ["config", "missing.yaml", "not found"]),
    ]
    overrides = [
        (["epochs=100000000"], ["epochs", "<= 100000"]),
        (["epochs=1"], ["epochs", ">= 2"]),
        (["epochs=abc"], ["epochs", "integer"]),
        (["epochs=2.5"], ["epochs", "integer"]),
        (["epochs=.inf"], ["epochs"]),
        (["epochs=-3"], ["epochs"]),
        (["seed=1e23"], ["seed", "<= 4294967295"]),
        (["seed=100000000000000000000000"], ["seed", "<= 4294967295"]),
        (["seed=1.5"], ["seed", "integer"]),
        (["seed=-1"], ["seed", ">= 0"]),
        (["seed=.nan"], ["seed"]),
        (["seed=[1, 2]"], ["seed"]),
        (["runtime.device=tpu"], ["runtime.device", "auto, cpu, cuda"]),
        (["runtime.device=cuda:x"], ["runtime.device"]),
        (["runtime.device=3"], ["runtime.device"]),
        (["optim.min_lr=1"], ["optim.min_lr", "climb"]),
        (["optim.lr=0.01", "optim.min_lr=0.02", "optim.sched=linear"], ["optim.min_lr", "climb"]),
        (["optim.min_lr=.inf"], ["optim.min_lr", "finite"]),
        (["optim.min_lr=-1"], ["optim.min_lr"]),
        (["optim.warmup_epochs=50"], ["optim.warmup_epochs", "below epochs"]),
        (["epochs=5", "optim.warmup_epochs=5"], ["optim.warmup_epochs", "below epochs (5)"]),
        (["optim.warmup_epochs=.nan"], ["optim.warmup_epochs", "finite"]),
        (["optim.warmup_epochs=-1"], ["optim.warmup_epochs"]),
        (["optim.lr=.nan"], ["optim.lr", "finite"]),
        (["optim.lr=.inf"], ["optim.lr", "finite"]),
        (["optim.lr=0"], ["optim.lr", "> 0"]),
        (["optim.momentum=1"], ["optim.momentum"]),
        (["optim.momentum=.nan"], ["optim.momentum"]),
        (["optim.weight_decay={easy: .inf, hard: 0.001}"], ["optim.weight_decay.easy", "finite"]),
        (["optim.warmup_lr=5"], ["optim.warmup_lr", "above the LR it warms up to"]),
        (["runtime.log_steps=0"], ["runtime.log_steps", "> 0"]),
        (["self_paced.keep=0"], ["self_paced.keep", "> 0"]),
        (["self_paced.keep=-0.5"], ["self_paced.keep"]),
        (["self_paced.keep=.nan"], ["self_paced.keep", "finite"]),
        (["self_paced.keep=1.5"], ["self_paced.keep", "<= 1"]),
        (["self_paced.keep={easy: 0, hard: 1}"], ["self_paced.keep.easy"]),
        (["self_paced.keep=abc"], ["self_paced.keep"]),
        (["self_paced.refresh=2"], ["self_paced.refresh"]),
        (["self_paced.ema=1"], ["self_paced.ema"]),
        (["data.batch_size=2.7"], ["data.batch_size", "integer"]),
        (["data.batch_size=0"], ["data.batch_size"]),
        (["data.batch_size={easy: 2.7, hard: 64}"], ["data.batch_size.easy", "integer"]),
        (["data.batch_size=.inf"], ["data.batch_size"]),
        (["data.num_workers=-1"], ["data.num_workers"]),
        (["data.eval_batch_size=0"], ["data.eval_batch_size"]),
        (["data.train_limit=0"], ["data.train_limit"]),
        (["data.dataset=imagenet"], ["data.dataset"]),
        (["semi_supervised.ratio=-1"], ["semi_supervised.ratio", ">= 0"]),
        (["semi_supervised.ratio={easy: 0, hard: .inf}"], ["semi_supervised.ratio.hard", "finite"]),
        (["semi_supervised.confidence=1.5"], ["semi_supervised.confidence"]),
        (["temperature=0"], ["temperature"]),
        (["temperature={easy: .nan, hard: 2}"], ["temperature.easy", "finite"]),
        (["temperature={easy: 0.5, hard: 2, factor: .inf}"], ["temperature.factor", "finite"]),
        (["cyclical_factor=.inf"], ["cyclical_factor", "finite"]),
        (["cyclical_factor=0.5"], ["cyclical_factor"]),
        (["grad_clip=-1"], ["grad_clip"]),
        (["grad_clip={easy: 0.5, hard: 2, mode: l3}"], ["grad_clip.mode"]),
        (["augment.strength=1.5"], ["augment.strength"]),
        (["augment.ladder=ladder_folder.yaml"], ["augment.ladder", "is a folder"]),
        (["augment.ladder=no_such_ladder.yaml"], ["augment.ladder", "does not exist"]),
        (["augment.ladder=defualt"], ["augment.ladder", "did you mean 'default'"]),
        (["loss.gamma_neg=.nan"], ["loss.gamma_neg"]),
        (["loss.label_smoothing=1"], ["loss.label_smoothing"]),
        (["cycle.start=0.6", "cycle.end=0.5"], ["cycle", "below end"]),
        (["cycle.end=.nan"], ["cycle.end"]),
        (["distill.weight=2"], ["distill.weight"]),
        (["runtime.log_every=0"], ["runtime.log_every"]),
        (["runtime.amp=sometimes"], ["runtime.amp"]),
        (["model="], ["model"]),
        (["optim.wieght_decay=0.1"], ["optim.wieght_decay", "did you mean"]),
        (["optim={lr: 0.1, lr: 0.2}"], ["optim", "duplicate key 'lr'"]),
        (["temperature=" + "[" * 300 + "]" * 300], ["temperature", "nested deeper"]),
    ]
    cases = [(["plan", name], words) for name, words in files]
    cases += [(["plan", *argv], words) for argv, words in overrides]
    cases.append((["plan", "--epochs", "100000000"], ["epochs", "<= 100000"]))
    # `train` validates the same config before it makes the run folder; TINY keeps a miss from running long.
    for argv, words in [
        (["runtime.device=tpu"], ["runtime.device"]),
        (["epochs=100000000"], ["epochs"]),
        (["seed=1e23"], ["seed"]),
        (["optim.min_lr=1"], ["optim.min_lr"]),
        (["epochs=3", "optim.warmup_epochs=4"], ["optim.warmup_epochs"]),
        (["optim.warmup_lr=0.01", "optim.warmup_epochs=0"], ["optim.warmup_lr", "no warmup"]),
        (["augment.ladder=ladder_folder.yaml"], ["augment.ladder"]),
    ]:
        cases.append((["train", *TINY, *argv, "--out", "run"], words))
    for name in ("binary.yaml", "duplicate.yaml", "empty.yaml", "deep_list.yaml", "folder.yaml"):
        cases.append((["train", name, *TINY, "--out", "run"], [name]))
    return cases


# Runs inside one fresh interpreter with the temporary folder as its working directory: every case through
# the CLI's main(), stdout and stderr captured, the folder listed before and after. One JSON line per case.
DRIVER = textwrap.dedent(
    """
    import contextlib, io, json, sys, traceback
    from pathlib import Path
    from cycdata.train.cli import main

    def listing():
        return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in Path(".").rglob("*"))

    for argv in json.loads(sys.stdin.read()):
        before = listing()
        err, out = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                status = main(argv)
        except SystemExit as stop:
            status = stop.code
        except BaseException:
            status = "exception"
            err.write(traceback.format_exc())
        after = listing()
        changed = sorted(set(before) ^ set(after))
        print(json.dumps({"argv": argv, "status": status, "stderr": err.getvalue(), "changed": changed}), flush=True)
    """
)


def check_outcome(argv: list[str], status: object, stderr: str, words: list[str], changed: list) -> list[str]:
    """What is wrong with one case's outcome (empty when it was refused properly)."""
    problems = []
    lines = stderr.strip().splitlines()
    if status != 2:
        problems.append(f"exit status {status!r}, expected 2")
    if "Traceback" in stderr:
        problems.append("a traceback on stderr")
    if len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines, expected 1")
    missing = [word for word in words if word not in stderr]
    if missing:
        problems.append(f"stderr does not name {missing}")
    if changed:
        problems.append(f"files written or changed: {changed[:3]}")
    return [f"{argv}: {problem}; stderr: {stderr.strip()[-300:]!r}" for problem in problems]


def test_bad_configs_fail_in_one_line_with_nothing_written(tmp_path: Path) -> None:
    write_inputs(tmp_path)
    cases = config_cases()
    assert len(cases) >= 60
    result = subprocess.run(
        [sys.executable, "-c", DRIVER], input=json.dumps([argv for argv, _ in cases]), capture_output=True,
        text=True, cwd=tmp_path, timeout=600,
    )
    outcomes = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(outcomes) == len(cases), f"the driver stopped early: {result.stderr[-2000:]}"
    problems = []
    for (argv, words), outcome in zip(cases, outcomes):
        problems += check_outcome(argv, outcome["status"], outcome["stderr"], words, outcome["changed"])
    assert not problems, "\n".join(problems)


# A few cases as a user runs them: their own process, the real exit status and everything on stderr.
# One runs by default; the others (each a torch import, ~10 s on a busy 2-core machine) are marked slow.
PROCESS_CASES = [
    pytest.param(["train", "duplicate.yaml", *TINY, "--out", "run"], ["duplicate key 'epochs'"], id="train dup"),
    pytest.param(["plan", "binary.yaml"], ["binary.yaml"], id="plan binary", marks=pytest.mark.slow),
    pytest.param(["plan", "deep_list.yaml"], ["nested deeper"], id="plan deep", marks=pytest.mark.slow),
    pytest.param(["plan", "epochs=100000000"], ["epochs"], id="plan epochs", marks=pytest.mark.slow),
    pytest.param(["train", *TINY, "runtime.device=tpu", "--out", "run"], ["runtime.device"], id="train tpu",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("argv", "words"), PROCESS_CASES)
def test_bad_config_in_its_own_process(tmp_path: Path, argv: list[str], words: list[str]) -> None:
    write_inputs(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    result = subprocess.run(
        [sys.executable, "-m", "cycdata.train.cli", *argv], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert check_outcome(argv, result.returncode, result.stderr, words, []) == []
    assert sorted(tmp_path.rglob("*")) == before


# --------------------------------------------------------------------------------------------
# The same rules through the Python API
# --------------------------------------------------------------------------------------------


def test_plan_with_other_epochs_is_validated_like_the_config() -> None:
    config = load_config(None, ["optim.warmup_epochs=3"])
    with pytest.raises(ConfigError, match=r"^epochs: got 100000000, must be >= 2 and <= 100000$"):
        Plan.from_config(config, epochs=100_000_000)
    with pytest.raises(ConfigError, match=r"^optim.warmup_epochs: got 3, must be below epochs \(3\)"):
        Plan.from_config(config, epochs=3)
    assert Plan.from_config(config, epochs=4).epochs == 4


def test_validate_config_catches_a_config_changed_in_code() -> None:
    config = parse_config({"optim": {"lr": 0.1}})
    climbing = dataclasses.replace(config, optim=dataclasses.replace(config.optim, min_lr=0.2))
    with pytest.raises(ConfigError) as caught:
        validate_config(climbing)
    assert caught.value.key == "optim.min_lr"
    # A cyclical LR has no decay to a minimum, and a constant schedule never reaches min_lr: both are fine.
    parse_config({"optim": {"lr": {"easy": 0.01, "hard": 0.1}, "min_lr": 0.5}})
    parse_config({"optim": {"lr": 0.1, "sched": "constant", "min_lr": 0.5}})


def test_duplicate_keys_are_refused_in_files_and_overrides(tmp_path: Path) -> None:
    write_inputs(tmp_path)
    with pytest.raises(ConfigError, match=r"at line 4, column 3: duplicate key 'lr' \(first at line 2\)"):
        read_yaml(tmp_path / "duplicate_nested.yaml")
    with pytest.raises(ConfigError) as caught:
        apply_overrides({}, ["data={batch_size: 64, batch_size: 128}"])
    assert caught.value.key == "data" and "duplicate key 'batch_size'" in str(caught.value)
    # YAML merge keys are not duplicates: the keys beside `<<` override the merged ones on purpose.
    merged = tmp_path / "merge.yaml"
    merged.write_text("base: &base {lr: 0.1, momentum: 0.9}\noptim:\n  <<: *base\n  lr: 0.2\n")
    assert read_yaml(merged)["optim"] == {"lr": 0.2, "momentum": 0.9}


@pytest.mark.parametrize(
    ("name", "words"),
    [("ladder_folder.yaml", "is a folder"), ("binary.yaml", "not a text file"), ("duplicate.yaml", "duplicate key"),
     ("deep_list.yaml", "nested deeper"), ("missing.yaml", "ladder file not found")],
)
def test_ladder_files_are_read_as_safely_as_configs(tmp_path: Path, name: str, words: str) -> None:
    write_inputs(tmp_path)
    with pytest.raises(LadderError) as caught:
        load_ladder(tmp_path / name)
    assert words in str(caught.value) and "\n" not in str(caught.value)
