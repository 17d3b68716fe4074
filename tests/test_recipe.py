"""The default recipe (what `make demo` runs) reaches >= 97% on the embedded MNIST. Slow: ~2.5 min on 2 cores."""

from __future__ import annotations

from pathlib import Path

import pytest

from cycdata.config import load_config
from cycdata.train.trainer import train


@pytest.mark.slow
def test_default_recipe_reaches_97_percent(tmp_path: Path) -> None:
    config = load_config(None, ["runtime.progress=false"])
    assert config.data.dataset == "mnist5k" and config.model == "resnet10t"
    row = train(config, tmp_path)
    assert row["epoch"] == config.epochs - 1
    assert row["test_accuracy"] >= 0.97
