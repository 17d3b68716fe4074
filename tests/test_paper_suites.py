"""The paper's tables as suites (examples/paper/suites/): each one loads, keeps its protocol (a tuned constant
baseline chosen on a validation split, the cyclical row of its recipe compared with it), and every run it would
start, reported or tuning, passes `cycdata train`'s checks on data of its kind."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cycdata.config import apply_settings, dump_config, parse_config, read_yaml
from cycdata.schedules import Constant, Cyclical
from cycdata.train.builders import validate_run
from cycdata.train.experiment import Suite, load_suite

ROOT = Path(__file__).resolve().parents[1]
SUITES = sorted((ROOT / "examples" / "paper" / "suites").glob("*.yaml"))
RECIPES = sorted((ROOT / "examples" / "paper").glob("*.yaml"))
TABLES = {"cwd": 1, "cst": 2, "cgc": 3}
KNOBS = {"cwd": "optim.weight_decay", "cst": "temperature", "cgc": "grad_clip"}

# The fake CIFAR pickles and ImageNet-style folder of the recipes' tests (tests are not a package: load by path).
_spec = importlib.util.spec_from_file_location("paper_recipes_helpers",
                                               Path(__file__).with_name("test_paper_recipes.py"))
assert _spec is not None and _spec.loader is not None
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)
dataset_for = _helpers.dataset_for  # by the file name's prefix: cifar100*, cifar10*, else an image folder


def knob_of(path: Path) -> str:
    return path.stem.rsplit("-", 1)[1]


def recipe_of(path: Path) -> Path:
    """examples/paper/suites/cifar10-table1-cwd.yaml -> examples/paper/cifar10-cwd.yaml."""
    data, _, knob = path.stem.rpartition("-")
    return ROOT / "examples" / "paper" / f"{data.rsplit('-table', 1)[0]}-{knob}.yaml"


def schedule(config, knob: str):
    """The knob's schedule in a parsed config (None when off)."""
    if knob == "cwd":
        return config.optim.weight_decay
    if knob == "cst":
        return config.temperature
    return None if config.grad_clip is None else config.grad_clip.threshold


def on_fake_data(path: Path, tmp_path: Path) -> Suite:
    """The suite with data.dataset rewritten to a tiny fake copy of its kind (and a train_limit that fits it)."""
    raw = read_yaml(path, "suite")
    base = {**raw["base"], "data.dataset": dataset_for(path, tmp_path)}
    if "data.train_limit" in base:
        base["data.train_limit"] = 20  # the fake CIFAR holds 100 images; 4K CIFAR-10's 4,000 would not fit
    return Suite.from_mapping({**raw, "base": base}, str(path))


def test_every_table_and_dataset_has_a_suite() -> None:
    names = {path.stem for path in SUITES}
    for recipe in RECIPES:  # one suite per recipe: cifar10-cwd -> cifar10-table1-cwd, ...
        data, _, knob = recipe.stem.rpartition("-")
        assert f"{data}-table{TABLES[knob]}-{knob}" in names, recipe.name
    assert len(SUITES) == len(RECIPES)
    assert all(recipe_of(path).is_file() for path in SUITES)


@pytest.mark.parametrize("path", SUITES, ids=[path.stem for path in SUITES])
def test_the_suite_keeps_the_protocol_and_its_recipe(path: Path) -> None:
    suite = load_suite(str(path))  # validates every variant's and every grid point's config
    knob = knob_of(path)
    text = path.read_text()
    assert f"cycdata experiment examples/paper/suites/{path.name} --out runs/{path.stem}" in text
    # The protocol: a constant baseline tuned on validation over 2 tuning seeds, 5 reported seeds.
    assert set(suite.variants) == {"constant", knob}
    assert suite.baseline == "constant" and suite.reference(knob) == "constant"
    assert set(suite.tune) == {"constant"} and suite.tune_seeds == 2 and suite.seeds == 5
    grid = suite.tune["constant"]
    assert list(grid) == [KNOBS[knob]] and len(grid[KNOBS[knob]]) >= 3
    assert suite.select == "val_accuracy" and suite.primary == "test_accuracy"
    assert suite.base["data.val_split"] == (0.02 if path.stem.startswith("imagenet") else 0.1)
    assert "data.draw_seed" in suite.base and suite.base["data.draw_seed"] is None
    assert "Five seeds are what a GPU budget affords" in suite.description and "detect" in suite.description
    # Only the row's knob differs: cyclical in the row's variant, constant in the baseline (and every grid point).
    runs = {run.variant: run.config for run in suite.runs(seeds=1)}
    assert isinstance(schedule(runs[knob], knob), Cyclical)
    assert isinstance(schedule(runs["constant"], knob), Constant)
    assert all(isinstance(schedule(run.config, knob), Constant) for run in suite.tuning_runs())
    assert all(not run.config.data.test for run in suite.tuning_runs())  # tuning never reads the test split
    # The cyclical variant is its recipe's row, plus the validation split drawn per seed (and, for CGC, the
    # paper's value mode where the recipe clips by norm; the progress bar off, as every suite run has it).
    recipe_raw = read_yaml(recipe_of(path))
    assert suite.base["data.dataset"] == recipe_raw["data"]["dataset"]  # the same placeholder path
    changes = {"data.val_split": suite.base["data.val_split"], "data.draw_seed": None, "runtime.progress": False}
    if knob == "cgc":
        changes["grad_clip.mode"] = "value"
    assert runs[knob] == parse_config(apply_settings(recipe_raw, changes))
    # The baseline is the same recipe with the row's knob constant.
    constant = {**changes, KNOBS[knob]: suite.variants["constant"][KNOBS[knob]]}
    assert runs["constant"] == parse_config(apply_settings(recipe_raw, constant))


@pytest.mark.parametrize("path", SUITES, ids=[path.stem for path in SUITES])
def test_every_run_of_the_suite_passes_trains_checks_on_data_of_its_kind(path: Path, tmp_path: Path) -> None:
    suite = on_fake_data(path, tmp_path)
    runs = suite.runs(seeds=1)
    tuning = suite.tuning_runs()
    grid = suite.tune["constant"][KNOBS[knob_of(path)]]
    assert len(runs) == 2 and len(tuning) == len(grid) * suite.tune_seeds
    for run in [*runs, *tuning]:
        data = validate_run(run.config)  # the dataset, the split, the ladder, the model on its images, the optimizer
        assert data.val is not None and len(data.val) > 0, run.name
        assert len(data.train) > 0, run.name


def test_plan_accepts_a_variant_of_a_suite_with_its_data_as_an_override(tmp_path: Path) -> None:
    path = ROOT / "examples" / "paper" / "suites" / "cifar10-table1-cwd.yaml"
    config = {run.variant: run.config for run in load_suite(str(path)).runs(seeds=1)}["cwd"]
    file = tmp_path / "cwd.yaml"
    file.write_text(dump_config(config))
    dataset = dataset_for(path, tmp_path)
    result = subprocess.run([sys.executable, "-m", "cycdata.train.cli", "plan", str(file), f"data.dataset={dataset}",
                             "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout)
    assert plan["epochs"] == 200
    values = plan["knobs"]["optim.weight_decay"]
    assert values[0] == min(values) == pytest.approx(1e-5) and max(values) == values[len(values) // 2]
