"""Ladders: built-ins, YAML parsing and validation, strength -> rung, strength 0 = identity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cycdata.augment_ladder.ladder import LADDERS, LadderError, builtin_ladder, load_ladder, parse_ladder


def smooth_images(batch: int = 32, channels: int = 1, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(batch, channels, size // 4, size // 4, generator=generator)
    return (0.2 + 0.6 * F.interpolate(noise, size=size, mode="bilinear", align_corners=False)).clamp(0, 1)


@pytest.mark.parametrize("name", list(LADDERS))
def test_builtin_ladders_parse_and_start_at_the_identity(name: str) -> None:
    ladder = builtin_ladder(name)
    assert ladder.rungs[0].is_identity
    images = smooth_images(channels=3)
    assert torch.equal(ladder.apply(images, 0.0, torch.Generator().manual_seed(0)), images)
    assert parse_ladder(ladder.to_dict(), name=name) == ladder  # the YAML form round-trips


def test_digits_ladder_has_no_flips() -> None:
    ladder = builtin_ladder("digits")
    names = {step.op for rung in ladder.rungs for step in rung.steps}
    names |= {op for rung in ladder.rungs if rung.randaugment for op in rung.randaugment.pool}
    assert "hflip" not in names and "invert" not in names


def test_strength_moves_through_the_rungs() -> None:
    ladder = builtin_ladder("digits")
    assert ladder.position(0.0) == (0, 0.0)
    assert ladder.position(1.0) == (4, 0.0)
    lower, weight = ladder.position(0.3)
    assert lower == 1 and weight == pytest.approx(0.2)
    images = smooth_images()
    change = [float((ladder.apply(images, s, torch.Generator().manual_seed(1)) - images).abs().mean())
              for s in (0.0, 0.25, 0.5, 1.0)]
    assert change[0] == 0.0 and change[1] > 0 and change[3] > change[1]


def test_rung_mixing_is_per_sample() -> None:
    ladder = parse_ladder({"rungs": [[], [{"op": "rotate", "magnitude": 1.0}]]})
    images = smooth_images(batch=64)
    out = ladder.apply(images, 0.5, torch.Generator().manual_seed(0))
    unchanged = [(out[i] == images[i]).all().item() for i in range(64)]
    assert 10 < sum(unchanged) < 54  # about half the samples took the upper rung


def test_yaml_file_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("rungs:\n  - []\n  - [{op: crop, magnitude: 0.5}]\n  - {randaugment: {n: 2, magnitude: 0.6}}\n")
    ladder = load_ladder(path)
    assert ladder.name == "mine" and len(ladder.rungs) == 3
    cases = [
        ({"rungs": []}, "non-empty list of rungs"),
        ({"rungs": [[], [{"op": "rotat"}]]}, "rungs[1][0].op: unknown op 'rotat' (did you mean 'rotate'?)"),
        ({"rungs": [[{"op": "rotate", "magnitude": 1.5}]]}, "rungs[0][0].magnitude: got 1.5"),
        ({"rungs": [{"randaugment": {"n": -1}}]}, "rungs[0].randaugment.n"),
        ({"rungs": [[]], "steps": 3}, "steps: unknown key"),
        ({"rungs": [{"opps": []}]}, "did you mean 'ops'"),
    ]
    for raw, words in cases:
        with pytest.raises(LadderError) as caught:
            parse_ladder(raw)
        assert words in str(caught.value)
    with pytest.raises(LadderError, match="did you mean 'default'"):
        load_ladder("defualt")
    with pytest.raises(LadderError, match="not found"):
        load_ladder(tmp_path / "missing.yaml")
    with pytest.raises(LadderError, match=r"strength must be in \[0, 1\]"):
        builtin_ladder("default").position(1.5)
