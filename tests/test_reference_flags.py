"""config_from_reference against the reference code's own per-epoch formula (lnsmith54/CFL)."""

from __future__ import annotations

import argparse

import pytest

from cycdata.config import ConfigError
from cycdata.integrations.reference import config_from_reference
from cycdata.plan import Plan


def reference_eta(epoch: int, epochs: int, factor: float) -> float:
    """The reference's eta, as written in lnsmith54/CFL diff_train.py (hunk @@ -614,6 +653,18 @@, patched train.py
    lines 656-662; the same block for T at lines 727-733)."""
    if factor * epoch < epochs:
        return 1.0 - factor * epoch / (epochs - 1)
    if factor == 1.0:
        return 0
    return (factor * epoch / (epochs - 1) - 1.0) / (factor - 1.0)


def reference_value(epoch: int, epochs: int, factor: float, low: float, high: float) -> float:
    """``(1 - eta)*max + eta*min`` (patched train.py lines 664, 666 and 751)."""
    eta = reference_eta(epoch, epochs, factor)
    return (1 - eta) * high + eta * low


def reference_parser() -> argparse.ArgumentParser:
    """The reference's cyclical flags as its argparse lines declare them, plus the timm flags they meet."""
    parser = argparse.ArgumentParser()
    for flag, default in (("--wd_min", 0), ("--wd_max", 1e-3), ("--T_min", 0), ("--T_max", 2), ("--clip_min", 0),
                          ("--clip_max", 100), ("--cyclical_factor", 2), ("--weight-decay", 2e-5)):
        parser.add_argument(flag, type=float, default=default)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--clip-grad", type=float, default=None)
    parser.add_argument("--clip-mode", type=str, default="norm")
    parser.add_argument("--model", default="resnet50")  # a timm flag of its own: ignored
    return parser


@pytest.mark.parametrize(("epochs", "factor"), [(10, 2.0), (7, 2.0), (12, 3.0), (9, 1.0), (20, 4.0)])
def test_every_knob_matches_the_reference_formula_each_epoch(epochs: int, factor: float) -> None:
    args = reference_parser().parse_args(
        ["--epochs", str(epochs), "--cyclical_factor", str(factor), "--wd_min", "5e-5", "--wd_max", "5e-4",
         "--T_min", "0.5", "--T_max", "2", "--clip_min", "0.5", "--clip_max", "10"])
    plan = Plan.from_config(config_from_reference(args))
    for epoch in range(epochs):
        knobs = plan.at(epoch)
        assert knobs["optim.weight_decay"] == pytest.approx(reference_value(epoch, epochs, factor, 5e-5, 5e-4))
        assert knobs["temperature"] == pytest.approx(reference_value(epoch, epochs, factor, 0.5, 2.0))
        # Unlike the reference's elif, clipping stays cyclical alongside cyclical weight decay.
        assert knobs["grad_clip"] == pytest.approx(reference_value(epoch, epochs, factor, 0.5, 10.0))


def test_non_integer_factor_differs_only_where_the_reference_lags() -> None:
    """For f = 1.6 the reference's branch test (f·e < E) lags its formula (divided by E − 1): at e = 6 it takes
    the falling branch past the peak, eta = 1 − 9.6/9 < 0, a weight decay beyond wd_max. cycdata's clock is the
    continuous V there (the rising branch, (r − 1)/(f − 1)); every other epoch is the reference's value."""
    epochs, factor, low, high = 10, 1.6, 1e-4, 1e-3
    plan = Plan.from_config(config_from_reference(
        {"epochs": epochs, "cyclical_factor": factor, "wd_min": low, "wd_max": high}))
    lagged = [e for e in range(epochs) if reference_eta(e, epochs, factor) < 0]
    assert lagged == [6]
    for epoch in range(epochs):
        r = factor * epoch / (epochs - 1)
        eta = (r - 1) / (factor - 1) if epoch in lagged else reference_eta(epoch, epochs, factor)
        assert plan.at(epoch)["optim.weight_decay"] == pytest.approx((1 - eta) * high + eta * low)


def test_off_flags_mean_what_the_reference_does_without_them() -> None:
    config = config_from_reference(reference_parser().parse_args(["--epochs", "10", "--clip-grad", "3"]))
    plan = Plan.from_config(config)
    assert config.temperature is None  # T_min = 0: no CST
    assert [plan.at(e)["optim.weight_decay"] for e in range(10)] == pytest.approx([2e-5] * 10)  # timm's default
    assert {plan.at(e)["grad_clip"] for e in range(10)} == {3.0} and config.grad_clip.mode == "norm"
    assert config_from_reference({"epochs": 10}).grad_clip is None  # neither: no clipping


def test_focal_loss_and_smoothing_map_to_the_loss_section() -> None:
    config = config_from_reference({"--epochs": 10, "--focal_loss": "asym-cyclical", "--gamma_pos": 1,
                                    "--gamma_neg": 3, "--gamma0": 2, "--smoothing": 0.05})
    assert (config.loss.name, config.loss.gamma_pos, config.loss.gamma_neg, config.loss.gamma_hc) == \
        ("cyclical_focal", 1, 3, 2)
    assert config.loss.smoothing == 0.05


@pytest.mark.parametrize(("flags", "message"), [
    ({"epochs": 10, "focal_loss": "sym"}, r"^--focal_loss: 'sym' has no cycdata counterpart; .*asym-cyclical"),
    ({"epochs": 10, "wd_mn": 1e-4}, r"^--wd_mn: not a reference flag \(did you mean --wd_min\?\)$"),
    ({"wd_min": 1e-4}, r"^--epochs: .*need the run's --epochs"),
    ({"epochs": 10, "T_min": 0.5, "cooldown_epochs": 10}, r"^--cooldown-epochs: .*one clock"),
    ({"epochs": 10, "wd_min": 1e-4, "wd_max": -1}, r"^optim\.weight_decay"),
    ({"epochs": 10, "cyclical_factor": 0.5}, r"^cyclical_factor"),
])
def test_flags_it_cannot_map_get_one_line_with_the_fix(flags: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        config_from_reference(flags)
    assert "\n" not in str(caught.value)


def test_readme_timm_snippet_runs_and_prints_the_reference_values() -> None:
    import contextlib
    import io
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text[text.index("### timm's train.py"):], re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md", "exec"), {})
    rows = [line.split() for line in out.getvalue().splitlines()]
    assert [int(row[0]) for row in rows] == [0, 4, 9]
    for epoch, wd, temperature, clip in rows:
        e = int(epoch)
        assert float(wd) == pytest.approx(reference_value(e, 10, 2, 5e-5, 5e-4), rel=1e-5)
        assert float(temperature) == pytest.approx(reference_value(e, 10, 2, 0.5, 2.0), abs=1e-3)
        assert float(clip) == pytest.approx(reference_value(e, 10, 2, 0.5, 10.0), abs=1e-3)


def test_what_the_reference_does_not_cycle_stays_constant() -> None:
    """cycdata's default recipe cycles the batch size and the augmentation strength; the reference cycles neither."""
    from cycdata.integrations.reference import config_from_reference
    from cycdata.plan import Plan

    plan = Plan.from_config(config_from_reference({"epochs": 10, "wd_min": 5e-5, "wd_max": 5e-4, "batch-size": 96}))
    assert {plan.at(epoch)["data.batch_size"] for epoch in range(10)} == {96}
    assert {plan.at(epoch)["augment.strength"] for epoch in range(10)} == {1.0}
