"""The model and the train limit are checked against the dataset before anything is written: no download,
no run folder for a model that cannot take the images, one line naming the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from cycdata.config import ConfigError, parse_config
from cycdata.loaders.datasets import load_dataset
from cycdata.train.builders import build_model, check_model, validate_run


def _config(**values: object) -> object:
    return parse_config({"epochs": 2, "model": "test_resnet", "data": {"dataset": "synthetic:64"}, **values})


def test_a_vit_fixed_at_224_px_is_refused_at_32_px_before_the_run_folder(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "cycdata.train.cli", "train", "model=vit_tiny_patch16_224",
                             "data.dataset=synthetic:64", "epochs=2", "runtime.progress=false", "--out", "run"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "model: vit_tiny_patch16_224 cannot take synthetic's 3x32x32 images" in result.stderr
    assert "Input height (32) doesn't match model (224)" in result.stderr  # the model's own reason
    assert not (tmp_path / "run").exists()


def test_an_hf_hub_model_is_refused_without_touching_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy on the discard port: any download attempt would fail with a connection error, not our line.
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ConfigError, match=r"^model: 'hf-hub:timm/resnet18.a1_in1k' would be fetched from the "
                                          r"network, and cycdata never downloads.*init=FILE"):
        validate_run(_config(model="hf-hub:timm/resnet18.a1_in1k"))


def test_train_limit_below_the_class_count_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^data.train_limit: got 5, fewer than mnist5k's 10 classes"):
        validate_run(parse_config({"epochs": 2, "model": "test_resnet", "data": {"train_limit": 5}}))
    data = validate_run(parse_config({"epochs": 2, "model": "test_resnet", "data": {"train_limit": 10}}))
    assert torch.equal(torch.bincount(data.train.labels), torch.ones(10, dtype=torch.long))  # one per class


def test_models_that_fit_pass_and_unknown_ones_are_named() -> None:
    data = load_dataset("synthetic:20")
    for name in ("test_resnet", "resnet18", "vit_tiny_patch16_224.augreg_in21k"):
        size_data = dataclasses.replace(data, image_size=224) if "vit" in name else data
        check_model(_config(model=name), size_data)  # a pretrained tag is a name, not a download
    with pytest.raises(ConfigError, match=r"^model: unknown timm model 'resnet_nope'"):
        check_model(_config(model="resnet_nope"), data)


def test_the_check_leaves_the_models_initial_weights_unchanged() -> None:
    data = load_dataset("synthetic:20")
    torch.manual_seed(3)
    checked = build_model(_config(), data)  # check_model runs first, on the meta device
    torch.manual_seed(3)
    plain = timm.create_model("test_resnet", num_classes=data.num_classes, in_chans=data.in_chans)
    for (name, ours), theirs in zip(checked.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(ours, theirs), name
