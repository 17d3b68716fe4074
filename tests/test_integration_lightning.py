"""CyclicalCallback in a real Lightning Trainer (CPU): each epoch runs the plan's batches, every recorded loss lands on
its sample, the last epoch keeps the low-loss half, under DDP (2 gloo processes) too; a checkpoint resumes the plan
mid-epoch; settings it cannot follow are refused with the fix; the README section runs as written.

The run itself (a dataset whose per-sample loss is a known function of the index) lives in
``lightning_ddp_script.py``, which the DDP test runs as a script (Lightning's launcher re-runs ``sys.argv``).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")  # the dev install brings it: CI runs the real framework

from cycdata.config import ConfigError, parse_config  # noqa: E402
from cycdata.integrations.lightning import CyclicalCallback  # noqa: E402
from cycdata.plan import Plan  # noqa: E402

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
SCRIPT = HERE / "lightning_ddp_script.py"


def _load_script() -> Any:
    spec = importlib.util.spec_from_file_location("lightning_ddp_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _load_script()


def batch_sizes_by_epoch(seen: list[dict[str, Any]]) -> dict[int, list[int]]:
    sizes: dict[int, list[int]] = collections.defaultdict(list)
    for batch in seen:
        sizes[batch["epoch"]].append(len(batch["indices"]))
    return dict(sizes)


def check_ledger(losses: list[float], record_count: list[int], records: int) -> None:
    """Every sample has a loss, it is its own (i / 400), and no record was lost or counted twice."""
    losses_t = torch.tensor(losses)
    assert not torch.isnan(losses_t).any(), "the ledger does not cover the data"
    torch.testing.assert_close(losses_t, run.expected_loss(torch.arange(run.SIZE)))
    assert sum(record_count) == records


def test_one_process_runs_the_plan_and_credits_every_loss_to_its_sample() -> None:
    loader = run.make_loader()
    module = run.index_loss_module(loader)
    run.fit(loader, module)
    result = run.report(loader, module)

    planned = [loader.num_batches(epoch) for epoch in range(run.EPOCHS)]
    assert planned == [2, 20, 2]
    assert batch_sizes_by_epoch(result["seen"]) == {0: [100, 100], 1: [20] * 20, 2: [100, 100]}
    check_ledger(result["losses"], result["record_count"], records=200 + 400 + 200)
    last = sorted(i for batch in result["seen"] if batch["epoch"] == 2 for i in batch["indices"])
    assert last == list(range(200)), "the last epoch keeps the lowest-loss half"


@pytest.mark.slow
def test_ddp_two_gloo_processes_run_the_plan(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--devices", "2", "--strategy", "ddp"],
                          capture_output=True, text=True, timeout=300, cwd=HERE.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in ranks:
        # Each process gets half of each planned batch count: 1/10/1 batches of 100/20/100.
        assert result["num_batches"] == [1, 10, 1]
        assert batch_sizes_by_epoch(result["seen"]) == {0: [100], 1: [20] * 10, 2: [100]}
        # The ledger is gathered from both ranks: it covers all 400 samples with their own losses.
        check_ledger(result["losses"], result["record_count"], records=800)
    for epoch in range(run.EPOCHS):
        shares = [{i for batch in result["seen"] if batch["epoch"] == epoch for i in batch["indices"]}
                  for result in ranks]
        assert not shares[0] & shares[1], f"epoch {epoch}: the ranks' shares overlap"
    last = sorted(i for result in ranks for batch in result["seen"] if batch["epoch"] == 2 for i in batch["indices"])
    assert last == list(range(200))


class _SaveAndStop(pl.Callback):
    """Saves a checkpoint after batch ``batch`` of epoch ``epoch`` and stops the run there (an interruption)."""

    def __init__(self, path: Path, epoch: int, batch: int) -> None:
        self.path, self.epoch, self.batch = path, epoch, batch

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True  # the run ends after this batch


def test_resume_mid_epoch_from_a_lightning_checkpoint_follows_the_plan(tmp_path: Path) -> None:
    checkpoint = tmp_path / "mid.ckpt"
    first_loader = run.make_loader()
    first = run.index_loss_module(first_loader)
    run.fit(first_loader, first, callbacks=[_SaveAndStop(checkpoint, epoch=1, batch=4)])
    assert checkpoint.exists()
    assert batch_sizes_by_epoch(first.seen) == {0: [100, 100], 1: [20] * 5}

    loader = run.make_loader()  # a fresh process's loader: epoch 0, empty ledger, until the checkpoint is loaded
    resumed = run.index_loss_module(loader)
    run.fit(loader, resumed, ckpt_path=str(checkpoint))
    # The resumed epoch 1 runs its 15 remaining batches (not epoch 0's length), then epoch 2's two.
    assert batch_sizes_by_epoch(resumed.seen) == {1: [20] * 15, 2: [100, 100]}
    assert [batch["batch"] for batch in resumed.seen if batch["epoch"] == 1] == list(range(5, 20))
    epoch_one = [i for run_ in (first, resumed) for batch in run_.seen if batch["epoch"] == 1
                 for i in batch["indices"]]
    assert sorted(epoch_one) == list(range(400)), "the resumed epoch continues the saved order, no sample twice"
    last = sorted(i for batch in resumed.seen if batch["epoch"] == 2 for i in batch["indices"])
    assert last == list(range(200))


def _refusal(**trainer_options: Any) -> str:
    loader = run.make_loader()
    with pytest.raises(ConfigError) as error:
        run.fit(loader, run.index_loss_module(loader), **trainer_options)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_settings_the_callback_cannot_follow_are_refused_with_the_fix() -> None:
    assert "leave it at 1.0" in _refusal(limit_train_batches=0.5)
    assert "leave it at 0 or 1" in _refusal(reload_dataloaders_every_n_epochs=2)
    assert "Trainer(max_epochs=3)" in _refusal(max_epochs=5)


def test_a_selecting_loader_refuses_a_training_step_without_per_sample_losses() -> None:
    loader = run.make_loader()
    module = run.index_loss_module(loader)
    module.training_step = lambda batch, batch_idx: module.layer(batch[0]).pow(2).mean()
    with pytest.raises(ConfigError, match="per_sample_loss"):
        run.fit(loader, module)


class _GradNormProbe(pl.Callback):
    """Records the gradient norm the optimizer steps with and the plan's clip threshold at that step."""

    def __init__(self, cyclical: CyclicalCallback) -> None:
        self.cyclical, self.steps = cyclical, []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in pl_module.parameters()]))
        self.steps.append((float(norm), self.cyclical.hooks.clip_threshold,
                           optimizer.param_groups[0]["weight_decay"]))


def test_plan_hooks_clip_each_step_and_refuse_a_second_clipper() -> None:
    plan = Plan.from_config(parse_config({"epochs": run.EPOCHS}))  # the default recipe: CWD and CGC 0.5 .. 2
    loader = run.make_loader()
    module = run.index_loss_module(loader)
    def large_gradients(batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        losses = module.layer(batch[0]).squeeze(1).pow(2)  # inputs up to 399: gradients far above the clip
        return {"loss": losses.mean(), "per_sample_loss": losses.detach()}

    module.training_step = large_gradients
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=1e-6, weight_decay=1e-4)
    cyclical = CyclicalCallback(plan, loader=loader)
    probe = _GradNormProbe(cyclical)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[cyclical, probe], enable_progress_bar=False,
                         logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module)
    assert len(probe.steps) == 2
    for step, (norm, threshold, weight_decay) in enumerate(probe.steps):
        assert threshold is not None and norm <= threshold * (1 + 1e-5)
        assert weight_decay == pytest.approx(plan.at(0, step / 2)["optim.weight_decay"])

    clipping = pl.Trainer(accelerator="cpu", max_epochs=1, gradient_clip_val=1.0, enable_progress_bar=False,
                          callbacks=[CyclicalCallback(plan, loader=run.make_loader())], logger=False,
                          enable_checkpointing=False, enable_model_summary=False)
    with pytest.raises(ConfigError, match="keep one"):
        clipping.fit(run.index_loss_module(run.make_loader()))


def readme_block() -> str:
    """The first python block after the README's Lightning heading."""
    text = README.read_text()
    section = text[text.index("### PyTorch Lightning"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "the README's Lightning section has no python block"
    return match.group(1)


def test_readme_lightning_section_runs_as_written() -> None:
    namespace: dict[str, Any] = {"__name__": "readme_lightning"}
    exec(compile(readme_block(), str(README), "exec"), namespace)
    # The snippet promises: each epoch ran the plan's batch count, and the ledger covers the data.
    assert namespace["batches"] == [namespace["loader"].num_batches(epoch) for epoch in range(3)]
    assert namespace["loader"].ledger.num_seen() == len(namespace["loader"].dataset)


def test_the_pytorch_lightning_distribution_gets_the_same_callback() -> None:
    legacy = pytest.importorskip("pytorch_lightning")
    from cycdata.integrations.lightning import PytorchLightningCyclicalCallback

    loader = run.make_loader()
    module = run.index_loss_module(loader)

    class Legacy(legacy.LightningModule):  # the same steps, on pytorch_lightning's base class
        def __init__(self) -> None:
            super().__init__()
            self.layer = module.layer

        train_dataloader = module.train_dataloader
        training_step = module.training_step
        configure_optimizers = module.configure_optimizers

    legacy.Trainer(accelerator="cpu", max_epochs=2, callbacks=[PytorchLightningCyclicalCallback(loader=loader)],
                   enable_progress_bar=False, logger=False, enable_checkpointing=False,
                   enable_model_summary=False).fit(Legacy())
    # (the borrowed training_step reads the unattached module's current_epoch: compare the batch sequence)
    assert [len(batch["indices"]) for batch in module.seen] == [100, 100] + [20] * 20
    assert [loader.num_batches(epoch) for epoch in range(2)] == [2, 20]
