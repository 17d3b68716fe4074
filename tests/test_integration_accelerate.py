"""cycdata.integrations.accelerate in a real Accelerator on CPU: the plan's epochs, losses on their samples,
device placement, accumulation at the epoch's end, mid-epoch resume through save_state/load_state, and a real
2-process launch (torchrun, gloo)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator  # the [hf] extra, which the dev install brings
from torch.utils.data import DataLoader, TensorDataset

from cycdata.integrations.accelerate import loader_state_file, prepare
from cycdata.loaders import CyclicalLoader

ROOT = Path(__file__).resolve().parents[1]
SIZE, EPOCHS = 400, 3
# A loss we control per sample, not ordered like the indices: sample i's loss is SCORE[i].
SCORE = ((torch.arange(SIZE) * 37) % SIZE).float() / SIZE


def make_loader(**overrides: object) -> CyclicalLoader:
    data = TensorDataset(SCORE.unsqueeze(1), torch.arange(SIZE))
    options = dict(epochs=EPOCHS, batch_size={"easy": 100, "hard": 20}, keep={"easy": 0.5, "hard": 1.0},
                   shuffle=True, seed=0, refresh_fraction=0.0)  # no refresh: the last epoch is exactly the lowest
    options.update(overrides)
    return CyclicalLoader(data, **options)


def train_epoch(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader,
                stop_after: int | None = None, save_to: Path | None = None) -> list[dict]:
    """One epoch of a real accelerate loop; what each batch was (indices, size, device, sync). With
    ``stop_after``, ``save_state(save_to)`` inside the loop after that batch, then stop (a kill)."""
    seen = []
    for number, (x, index) in enumerate(loader, start=1):
        with accelerator.accumulate(model):
            loader.record_loss(x[:, 0].clone())  # the controlled loss of each sample
            accelerator.backward(model(x).pow(2).mean())
            optimizer.step()
            optimizer.zero_grad()
            seen.append({"indices": index.tolist(), "loader_indices": loader.batch_indices.tolist(),
                         "device": x.device, "sync": accelerator.sync_gradients})
        if number == stop_after:
            accelerator.save_state(str(save_to))  # inside the loop: the pass is still running
            break
    return seen


def setup(accumulation: int = 3):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    net = torch.nn.Linear(1, 2)
    model, optimizer = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.01))
    return accelerator, model, optimizer


def test_plan_epochs_losses_and_selection_in_a_real_accelerator() -> None:
    accelerator, model, optimizer = setup(accumulation=3)
    raw = make_loader()
    loader = prepare(accelerator, raw)
    epochs = [train_epoch(accelerator, model, optimizer, loader) for _ in range(EPOCHS)]

    assert [len(batches) for batches in epochs] == [raw.num_batches(e) for e in range(EPOCHS)] == [2, 20, 2]
    assert [{len(b["indices"]) for b in batches} for batches in epochs] == [{100}, {20}, {100}]
    for batches in epochs:
        assert all(b["device"] == accelerator.device for b in batches)
        assert all(b["indices"] == b["loader_indices"] for b in batches)  # nothing fetched ahead
        # accumulate syncs every 3rd batch and at the epoch's last one (end_of_dataloader), never in between
        assert [b["sync"] for b in batches] == [n % 3 == 0 or n == len(batches) for n in range(1, len(batches) + 1)]
    raw.ledger.synchronize()
    assert raw.ledger.num_seen() == SIZE  # the middle epoch covered the data
    torch.testing.assert_close(raw.ledger.losses, SCORE)  # every loss on its own sample
    last = {i for b in epochs[-1] for i in b["indices"]}
    assert last == set(torch.argsort(SCORE)[: SIZE // 2].tolist())  # the last epoch keeps the low-loss half


def test_save_state_load_state_resumes_mid_epoch_with_the_same_batches(tmp_path: Path) -> None:
    accelerator, model, optimizer = setup(accumulation=1)
    reference = prepare(accelerator, make_loader())
    expected = [b["indices"] for _ in range(2) for b in train_epoch(accelerator, model, optimizer, reference)]

    accelerator, model, optimizer = setup(accumulation=1)
    interrupted = prepare(accelerator, make_loader())
    before = train_epoch(accelerator, model, optimizer, interrupted)
    before += train_epoch(accelerator, model, optimizer, interrupted, stop_after=7, save_to=tmp_path / "ckpt")
    assert loader_state_file(tmp_path / "ckpt", 0).is_file()

    accelerator, model, optimizer = setup(accumulation=1)
    resumed = prepare(accelerator, make_loader())
    accelerator.load_state(str(tmp_path / "ckpt"))
    after = train_epoch(accelerator, model, optimizer, resumed)
    assert len(after) == 20 - 7
    assert [b["indices"] for b in before + after] == expected


def test_skip_first_batches_points_to_load_state() -> None:
    accelerator, _, _ = setup(accumulation=1)
    loader = prepare(accelerator, make_loader())
    with pytest.raises(AttributeError, match=r"skip_first_batches cannot skip .* accelerator\.load_state"):
        accelerator.skip_first_batches(loader, 3)
    assert getattr(loader, "sampler", None) is None  # frameworks probing with getattr still work


def test_prepare_refuses_a_plain_dataloader_with_the_fix() -> None:
    accelerator, _, _ = setup(accumulation=1)
    with pytest.raises(TypeError, match=r"accelerator\.prepare\(loader\)"):
        prepare(accelerator, DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2))


def readme_block(heading: str) -> str:
    """The first ```python block after ``heading`` in README.md."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_readme_accelerate_snippet_runs_as_written(tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(readme_block("### Accelerate"))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["epoch 0: 2 batches of 100", "epoch 1: 20 batches of 20",
                                        "epoch 2: 2 batches of 100"]


LAUNCHED = textwrap.dedent('''
    import json, sys
    import torch
    from torch.utils.data import TensorDataset
    from accelerate import Accelerator
    from cycdata.integrations.accelerate import prepare
    from cycdata.loaders import CyclicalLoader

    accelerator = Accelerator(cpu=True)
    score = ((torch.arange(400) * 37) % 400).float() / 400
    raw = CyclicalLoader(TensorDataset(score.unsqueeze(1), torch.arange(400)), epochs=3,
                         batch_size={"easy": 50, "hard": 10}, keep={"easy": 0.5, "hard": 1.0}, shuffle=True,
                         seed=0, refresh_fraction=0.0)
    loader = prepare(accelerator, raw)
    epochs = []
    for epoch in range(3):
        batches = []
        for x, index in loader:
            loader.record_loss(x[:, 0].clone())
            batches.append(index.tolist())
        epochs.append(batches)
    with open(f"{sys.argv[1]}/rank{accelerator.process_index}.json", "w") as handle:
        json.dump({"world": accelerator.num_processes, "epochs": epochs}, handle)
    accelerator.end_training()  # destroys the gloo group: alive at exit it aborts the process (-6) in many runs
''')


@pytest.mark.slow
def test_two_process_launch_gives_disjoint_shares(tmp_path: Path) -> None:
    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # torchrun, as accelerate's docs launch CPU runs (accelerate launch --cpu starts one process); Accelerator
    # reads torchrun's environment and sets up gloo.
    launcher = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(launcher), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    # per process: 400 samples / 2 ranks; easy epochs keep half at 50 a batch, the hard one all at 10
    for rank in ranks:
        assert [len(batches) for batches in rank["epochs"]] == [2, 20, 2]
        assert [{len(b) for b in batches} for batches in rank["epochs"]] == [{50}, {10}, {50}]
    for epoch in range(3):
        shares = [{i for b in rank["epochs"][epoch] for i in b} for rank in ranks]
        assert not shares[0] & shares[1]
    assert {i for rank in ranks for b in rank["epochs"][1] for i in b} == set(range(400))
    # both ranks derive the same selection from the gathered ledger: the last epoch is the low-loss half
    score = ((torch.arange(400) * 37) % 400).float() / 400
    last = {i for rank in ranks for b in rank["epochs"][2] for i in b}
    assert last == set(torch.argsort(score)[:200].tolist())
