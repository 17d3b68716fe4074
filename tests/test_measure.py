"""Ladder strength measurement: SSIM and pixel change, the reference model, the measurement, reorder, the CLI."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cycdata.augment_ladder.ladder import LadderError, load_ladder
from cycdata.augment_ladder.measure import (
    LadderMeasurement,
    RungStrength,
    measure_ladder,
    pixel_change,
    reorder,
    ssim,
    train_reference_model,
)
from cycdata.loaders.datasets import DatasetSplits, load_dataset
from cycdata.train.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real console entry point in a fresh interpreter (what a user types)."""
    return subprocess.run(
        [sys.executable, "-m", "cycdata.train.cli", *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=300
    )


def hand_made(values: list[float]) -> LadderMeasurement:
    """A measurement with the given accuracy drops (rung 0 the identity when its value is 0)."""
    rungs = tuple(RungStrength(i, float(i > 0 or v != 0), 0.0, 0.9 - v, v) for i, v in enumerate(values))
    return LadderMeasurement("hand", "none", 0.9, rungs)


@pytest.fixture(scope="module")
def mnist() -> DatasetSplits:
    return load_dataset("mnist5k")


@pytest.fixture(scope="module")
def reference(mnist: DatasetSplits) -> nn.Module:
    # Two epochs: enough for > 90% (the default 3 reaches ~96%) at two thirds of the time.
    return train_reference_model(mnist, epochs=2, seed=0, device="cpu")


@pytest.fixture(scope="module")
def digits_measurement(mnist: DatasetSplits, reference: nn.Module) -> LadderMeasurement:
    return measure_ladder(load_ladder("digits"), mnist, model=reference, samples=500)


# --------------------------------------------------------------------------------------------- image measures


def naive_ssim(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM of two 2-D images with an explicit 2-D Gaussian window at every valid position (no convolutions)."""
    offsets = np.arange(size) - (size - 1) / 2
    window = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    window /= window.sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for row in range(a.shape[0] - size + 1):
        for col in range(a.shape[1] - size + 1):
            x, y = a[row : row + size, col : col + size], b[row : row + size, col : col + size]
            mx, my = (window * x).sum(), (window * y).sum()
            vx, vy = (window * (x - mx) ** 2).sum(), (window * (y - my) ** 2).sum()
            cov = (window * (x - mx) * (y - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_of_identical_images_is_one() -> None:
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert ssim(images, images).tolist() == pytest.approx([1.0] * 4, abs=1e-6)


def test_ssim_matches_a_naive_reference_and_the_luminance_formula() -> None:
    generator = torch.Generator().manual_seed(1)
    a = torch.rand(1, 1, 15, 14, generator=generator)
    b = (a + 0.2 * torch.randn(1, 1, 15, 14, generator=generator)).clamp(0, 1)
    assert float(ssim(a, b)[0]) == pytest.approx(naive_ssim(a[0, 0].double().numpy(), b[0, 0].double().numpy()),
                                                 abs=1e-5)
    # Flat images have no variance: SSIM is the luminance term (2·0.5·0.25 + C1) / (0.5² + 0.25² + C1).
    flat = ssim(torch.full((1, 2, 16, 16), 0.5), torch.full((1, 2, 16, 16), 0.25))
    assert float(flat[0]) == pytest.approx((0.25 + 1e-4) / (0.3125 + 1e-4), rel=1e-5)


def test_ssim_drops_as_noise_grows() -> None:
    generator = torch.Generator().manual_seed(2)
    smooth = torch.nn.functional.interpolate(torch.rand(8, 1, 8, 8, generator=generator), size=32, mode="bilinear")
    noise = torch.randn(smooth.shape, generator=generator)
    scores = [float(ssim(smooth, (smooth + level * noise).clamp(0, 1)).mean()) for level in (0.0, 0.02, 0.05, 0.1, 0.3)]
    assert scores[0] == pytest.approx(1.0, abs=1e-6)
    assert all(later < earlier for earlier, later in itertools.pairwise(scores))
    assert scores[-1] < 0.5


def test_ssim_and_pixel_change_refuse_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match="same shape"):
        pixel_change(torch.zeros(2, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_pixel_change_known_value() -> None:
    original = torch.zeros(2, 1, 4, 4)
    augmented = original.clone()
    augmented[0, 0, :2] = 1.0  # half of image 0 turned white: 8 of 32 pixels change by 1
    augmented[1] = 0.25  # image 1 brightened everywhere by 0.25: 16 of 32 pixels change by 0.25
    assert pixel_change(original, augmented) == pytest.approx((8 * 1.0 + 16 * 0.25) / 32)
    assert pixel_change(original, original) == 0.0


# --------------------------------------------------------------------------------------------- reference model


def test_reference_model_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    data = load_dataset("synthetic:64")
    before = torch.get_rng_state()
    first = train_reference_model(data, epochs=1, seed=3, device="cpu")
    assert torch.equal(torch.get_rng_state(), before)
    second = train_reference_model(data, epochs=1, seed=3, device="cpu")
    other = train_reference_model(data, epochs=1, seed=4, device="cpu")
    pairs = list(zip(first.state_dict().values(), second.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values()))
    assert not first.training


def test_reference_model_refuses_bad_arguments() -> None:
    data = load_dataset("synthetic:16")
    with pytest.raises(ValueError, match="unknown timm model"):
        train_reference_model(data, model="no_such_net")
    with pytest.raises(ValueError, match="epochs"):
        train_reference_model(data, epochs=0)


# --------------------------------------------------------------------------------------------- the measurement


def test_digits_ladder_measurement(digits_measurement: LadderMeasurement, reference: nn.Module) -> None:
    m = digits_measurement
    assert m.ladder == "digits" and m.dataset == "mnist5k"
    assert m.clean_accuracy >= 0.9
    assert [rung.rung for rung in m.rungs] == list(range(len(load_ladder("digits").rungs)))
    identity = m.rungs[0]
    assert identity.pixel_change == 0.0
    assert identity.ssim_drop == pytest.approx(0.0, abs=1e-6)
    assert identity.accuracy_drop == pytest.approx(0.0, abs=1e-9)
    assert identity.accuracy == pytest.approx(m.clean_accuracy)
    changes = [rung.pixel_change for rung in m.rungs]
    assert all(later > earlier for earlier, later in itertools.pairwise(changes))
    assert all(rung.ssim_drop > 0.1 for rung in m.rungs[1:])
    # The strongest rung (cutout + two random ops at 0.8) costs the unaugmented model far more than a crop.
    assert m.rungs[-1].accuracy_drop > m.rungs[1].accuracy_drop + 0.1
    for rung in m.rungs:
        assert rung.accuracy_drop == pytest.approx(m.clean_accuracy - rung.accuracy)
    assert not reference.training  # measuring restores the mode it found (eval here)


def test_measurement_is_reproducible_and_restores_train_mode(mnist: DatasetSplits, reference: nn.Module) -> None:
    ladder = load_ladder("digits")
    reference.train()
    try:
        first = measure_ladder(ladder, mnist, model=reference, samples=32, repeats=2, seed=5)
        assert reference.training
    finally:
        reference.eval()
    assert measure_ladder(ladder, mnist, model=reference, samples=32, repeats=2, seed=5) == first
    assert measure_ladder(ladder, mnist, model=reference, samples=32, repeats=2, seed=6) != first


def test_table_and_json_contain_every_rung(digits_measurement: LadderMeasurement) -> None:
    table = digits_measurement.table()
    lines = table.splitlines()
    assert "pixel change" in lines[1] and "SSIM drop" in lines[1] and "accuracy drop" in lines[1]
    assert len(lines) == 2 + len(digits_measurement.rungs)
    for rung, line in zip(digits_measurement.rungs, lines[2:]):
        assert line.split()[0] == str(rung.rung)
        assert f"{rung.pixel_change:.4f}" in line and rung.ops in line
    payload = json.loads(digits_measurement.to_json())
    assert [entry["rung"] for entry in payload["rungs"]] == [rung.rung for rung in digits_measurement.rungs]
    assert payload["rungs"][2]["accuracy_drop"] == pytest.approx(digits_measurement.rungs[2].accuracy_drop)
    assert payload["clean_accuracy"] == pytest.approx(digits_measurement.clean_accuracy)
    assert payload["order"] == digits_measurement.order()


def test_out_of_order_and_order_on_a_hand_made_measurement() -> None:
    m = hand_made([0.0, 0.10, 0.30, 0.05, 0.40, 0.399, 0.20])
    assert m.out_of_order() == [3, 6]  # 0.399 after 0.40 is within the tolerance
    assert m.order() == [0, 3, 1, 6, 2, 4, 5]
    assert m.out_of_order(tolerance=0.0) == [3, 5, 6]
    assert m.order(tolerance=0.0) == [0, 3, 1, 6, 2, 5, 4]
    in_order = hand_made([0.0, 0.1, 0.099, 0.2])
    assert in_order.out_of_order() == [] and in_order.order() == [0, 1, 2, 3]
    # An identity rung 0 stays first even when a later rung measures a (noisy) negative drop.
    assert hand_made([0.0, -0.01, 0.2]).order() == [0, 1, 2]
    assert hand_made([0.0, -0.01, 0.2]).out_of_order() == [1]
    with pytest.raises(ValueError, match="strength key"):
        m.out_of_order("accuracy")


def test_reorder_puts_rungs_in_the_given_order() -> None:
    ladder = load_ladder("digits")
    order = [0, 3, 1, 4, 2]
    moved = reorder(ladder, order)
    assert moved.name == ladder.name
    assert moved.rungs == tuple(ladder.rungs[i] for i in order)
    assert reorder(ladder, range(len(ladder.rungs))) == ladder
    for bad in ([0, 1, 2, 3], [0, 1, 2, 3, 3], [0, 1, 2, 3, 5]):
        with pytest.raises(LadderError, match="permutation"):
            reorder(ladder, bad)


# --------------------------------------------------------------------------------------------- the CLI


def test_cli_measure_json_and_write(tmp_path: Path) -> None:
    target = tmp_path / "measured.yaml"
    result = run_cli("ladder", "measure", "digits", "--samples", "200", "--epochs", "1", "--json",
                     "--write", str(target))
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["ladder"] == "digits" and len(payload["rungs"]) == 5
    assert payload["rungs"][0]["pixel_change"] == 0.0
    assert "reference model: test_resnet trained 1 epoch(s)" in result.stderr
    written = load_ladder(target)
    assert written.rungs == reorder(load_ladder("digits"), payload["order"]).rungs

    contents = target.read_text()
    again = run_cli("ladder", "measure", "digits", "--samples", "200", "--epochs", "1", "--write", str(target))
    assert again.returncode == 2
    assert len(again.stderr.strip().splitlines()) == 1 and "refusing to overwrite" in again.stderr
    assert "reference model" not in again.stdout  # refused before training
    assert target.read_text() == contents


def test_cli_show_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    result = run_cli("ladder", "show", "default", "--dataset", "synthetic:64", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    rungs = len(load_ladder("default").rungs)
    assert width >= 8 * 80 and height >= rungs * 80  # about 100 px per image at the default 8 columns
    assert len(data) > 20_000


def test_cli_unknown_ladder_exits_2_with_one_line() -> None:
    result = run_cli("ladder", "measure", "nosuchladder")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cycdata ladder: unknown ladder 'nosuchladder'; use one of ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("ladder", "measure", "digits", "--dataset", "imagenet"), "unknown dataset spec"),
        (("ladder", "measure", "digits", "--samples", "0"), "--samples"),
        (("ladder", "measure", "digits", "--model", "no_such_net"), "unknown timm model"),
        (("ladder", "measure", "digits", "--write", "out.txt"), "name the file *.yaml"),
        (("ladder", "show", "missing.yaml"), "ladder file not found"),
        (("ladder", "show", "flips", "--columns", "0"), "--columns"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(
    args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process (the subprocess path is covered above): every check runs before any training.
    assert main(list(args)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == ""
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("cycdata ladder: ")
