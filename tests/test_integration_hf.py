"""CyclicalTrainer in a real transformers Trainer (CPU): the plan's epochs, losses on their own samples under
gradient accumulation, the hooks, resume from an HF checkpoint, and the README snippet."""

from __future__ import annotations

import itertools
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset
from transformers import TrainerCallback, TrainingArguments

from cycdata.config import parse_config
from cycdata.integrations.hf import INDEX_KEY, CyclicalTrainer
from cycdata.loaders import CyclicalLoader
from cycdata.plan import Plan
from cycdata.schedules import Piecewise

SAMPLES = 400
# The plan: keep half at batch size 100 (easy ends), all 400 at 20 (the hard middle).
PLANNED_SIZES = [[100, 100], [20] * 20, [100, 100]]


class ControlledLosses(Dataset):
    """Sample i has logits [0, score_i] (label 0): its loss is softplus(score_i), known before training."""

    def __init__(self) -> None:
        order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(1))
        self.score = torch.linspace(-3.0, 3.0, SAMPLES)[order]

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.score[index:index + 1], "sample_id": torch.tensor(index), "labels": torch.tensor(0)}


class ScoreModel(nn.Module):
    """Returns the sample's own score as its logit (the weight starts at 0, lr 0 keeps it there, so the losses
    stay exactly softplus(score) while the gradients are real); remembers each training batch's sample ids."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.trained_ids: list[torch.Tensor] = []

    def forward(self, x, sample_id, labels=None):
        if self.training:
            self.trained_ids.append(sample_id.clone())
        logits = torch.cat([torch.zeros_like(x), x + 100.0 * self.weight], dim=1)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def make_loader(dataset: Dataset) -> CyclicalLoader:
    return CyclicalLoader(dataset, epochs=3, batch_size={"easy": 100, "hard": 20}, keep={"easy": 0.5, "hard": 1.0},
                          shuffle=True, seed=0, refresh_fraction=0.0)  # no re-admitted samples: the exact half


def make_args(tmp_path: Path, accumulation: int = 1, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, learning_rate=0.0,
                    gradient_accumulation_steps=accumulation, save_strategy="no", logging_strategy="no",
                    disable_tqdm=True)
    return TrainingArguments(**{**settings, **overrides})


class EpochMarks(TrainerCallback):
    """How many training batches the model had seen at each epoch's end."""

    def __init__(self, model: ScoreModel) -> None:
        self.model, self.marks = model, [0]

    def on_epoch_end(self, args, state, control, **kwargs):
        self.marks.append(len(self.model.trained_ids))


def batches_by_epoch(model: ScoreModel, marks: list[int]) -> list[list[torch.Tensor]]:
    return [model.trained_ids[start:end] for start, end in itertools.pairwise(marks)]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_runs_the_plan_and_credits_each_loss_to_its_sample(tmp_path, accumulation):
    data, model = ControlledLosses(), ScoreModel()
    loader = make_loader(data)
    marks = EpochMarks(model)
    trainer = CyclicalTrainer(model=model, args=make_args(tmp_path, accumulation), cyclical_loader=loader,
                              callbacks=[marks])
    trainer.train()

    epochs = batches_by_epoch(model, marks.marks)
    assert [[len(ids) for ids in epoch] for epoch in epochs] == PLANNED_SIZES
    optimizer_steps = sum(math.ceil(len(sizes) / accumulation) for sizes in PLANNED_SIZES)  # 24 or 12
    assert trainer.state.global_step == trainer.state.max_steps == optimizer_steps
    assert trainer.state.epoch == 3.0
    # Every sample was trained in the hard middle epoch, and each recorded loss is its own sample's.
    assert loader.ledger.num_seen() == SAMPLES
    torch.testing.assert_close(loader.ledger.losses, F.softplus(data.score))
    # The last (easy) epoch keeps the half with the lowest losses.
    last_epoch = torch.cat(epochs[2])
    assert set(last_epoch.tolist()) == set(torch.argsort(data.score)[:200].tolist())


def test_resume_from_an_hf_checkpoint_continues_at_the_saved_batch(tmp_path):
    data, model = ControlledLosses(), ScoreModel()
    loader = make_loader(data)
    args = make_args(tmp_path, accumulation=2, save_strategy="steps", save_steps=5)
    CyclicalTrainer(model=model, args=args, cyclical_loader=loader).train()
    checkpoint = tmp_path / "out" / "checkpoint-5"  # GA 2: step 5 is 8 batches into the 20-batch epoch 1
    assert (checkpoint / "cycdata_loader.pt").is_file()

    resumed_model, resumed_loader = ScoreModel(), make_loader(data)
    trainer = CyclicalTrainer(model=resumed_model, args=args, cyclical_loader=resumed_loader)
    trainer.train(resume_from_checkpoint=str(checkpoint))

    already_trained = 2 + 8
    assert len(resumed_model.trained_ids) == len(model.trained_ids) - already_trained
    for resumed, uninterrupted in zip(resumed_model.trained_ids, model.trained_ids[already_trained:]):
        assert torch.equal(resumed, uninterrupted)
    assert trainer.state.global_step == 12 and trainer.state.epoch == 3.0
    torch.testing.assert_close(resumed_loader.ledger.losses, loader.ledger.losses)
    assert torch.equal(resumed_loader.ledger.seen, loader.ledger.seen)


class RecordingTrainer(CyclicalTrainer):
    """Keeps, for each training batch, its boxed indices and weights and the loss the Trainer minimises."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[tuple[torch.Tensor, torch.Tensor | None, float]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        boxed = inputs.get(INDEX_KEY)
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if boxed is not None and model.training:
            self.steps.append((boxed.tensor.clone(), boxed.weights, float(loss.detach())))
        return loss


def test_pruning_weights_reach_the_trainers_loss(tmp_path):
    """policy="prune": each batch's inverse keep probabilities travel with it and weigh the loss HF minimises;
    over an epoch they sum to N (the unbiased estimate of the full epoch), and the all-data epoch weighs 1."""
    data, model = ControlledLosses(), ScoreModel()
    keep = Piecewise(((0.0, 0.6), (0.75, 0.6), (0.75, 1.0)))  # epochs 0 and 1 pruned to 60%, epoch 2 on all data
    loader = CyclicalLoader(data, epochs=3, batch_size=40, keep=keep, policy="prune", shuffle=True, seed=0)
    trainer = RecordingTrainer(model=model, args=make_args(tmp_path), cyclical_loader=loader)
    trainer.train()

    losses = F.softplus(data.score)
    kept = [240, 240, 400]
    epoch_steps = [math.ceil(count / 40) for count in kept]
    starts = [0, epoch_steps[0], epoch_steps[0] + epoch_steps[1], sum(epoch_steps)]
    assert len(trainer.steps) == sum(epoch_steps)
    for epoch, (start, end) in enumerate(itertools.pairwise(starts)):
        steps = trainer.steps[start:end]
        assert sum(len(indices) for indices, _, _ in steps) == kept[epoch]
        if epoch == 2:
            assert all(weights is None for _, weights, _ in steps)
            continue
        weights = torch.cat([weights for _, weights, _ in steps])
        assert len(set(weights.tolist()) - {1.0}) == 1 and float(weights.max()) > 1.0  # 1, or |W|/(|W| - D)
        assert float(weights.sum()) == pytest.approx(SAMPLES)  # |W| kept-pool weights + the rest, each once
        for indices, batch_weights, loss in steps:
            assert loss == pytest.approx(float((losses[indices] * batch_weights).mean()), rel=1e-5)


class ClipWatch(TrainerCallback):
    """The gradient norm and the knobs just before each optimizer step."""

    def __init__(self, model: nn.Module, trainer_box: list) -> None:
        self.model, self.trainer_box, self.steps = model, trainer_box, []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        hooks = self.trainer_box[0].cyclical_hooks
        group = optimizer.param_groups[0]
        self.steps.append((float(self.model.weight.grad.norm()), hooks.clip_threshold, hooks.values, group["lr"],
                           group["weight_decay"]))


def test_hooks_apply_cst_cgc_and_cwd_inside_the_trainer(tmp_path):
    data, model = ControlledLosses(), ScoreModel()
    loader = make_loader(data)
    plan = Plan.from_config(parse_config({"epochs": 3}))  # the default recipe: CWD, CST and CGC
    box: list = []
    watch = ClipWatch(model, box)
    trainer = CyclicalTrainer(model=model, args=make_args(tmp_path, weight_decay=1e-4), cyclical_loader=loader,
                              hooks=plan, callbacks=[watch])
    box.append(trainer)
    marks = EpochMarks(model)
    trainer.add_callback(marks)
    trainer.train()

    assert len(watch.steps) == 24
    for grad_norm, threshold, values, lr, weight_decay in watch.steps:
        assert threshold == values["grad_clip"] and grad_norm <= threshold + 1e-5  # clipped at the plan's value
        assert weight_decay == values["optim.weight_decay"]  # CWD written into the decayed group
        assert lr == 0.0  # the config left optim.lr out: the user's LR (and HF's scheduler) stay in charge
    # CST: the last epoch's losses are softplus(score / T) at that epoch's temperature, T != 1.
    temperature = plan.at(2)["temperature"]
    assert temperature != 1.0
    last_epoch = torch.cat(batches_by_epoch(model, marks.marks)[2])
    torch.testing.assert_close(loader.ledger.losses[last_epoch], F.softplus(data.score[last_epoch] / temperature))


def test_a_plan_that_drives_the_lr_replaces_hfs_scheduler(tmp_path):
    plan = Plan.from_config(parse_config({"epochs": 3, "optim": {"lr": {"easy": 0.01, "hard": 0.1}},
                                          "temperature": None, "grad_clip": None}))
    model = ScoreModel()
    box: list = []
    watch = ClipWatch(model, box)
    trainer = CyclicalTrainer(model=model, args=make_args(tmp_path, weight_decay=1e-4), cyclical_loader=make_loader(
        ControlledLosses()), hooks=plan, callbacks=[watch])
    box.append(trainer)
    trainer.train()
    assert trainer.cyclical_hooks.drives_lr
    lrs = [lr for _, _, _, lr, _ in watch.steps]
    assert lrs == [values["optim.lr"] for _, _, values, _, _ in watch.steps]
    assert min(lrs) < max(lrs)  # it follows the cycle, not HF's linear decay


def test_tuple_batches_are_refused_with_the_fix_or_mapped_by_inputs(tmp_path):
    data = TensorDataset(torch.randn(40, 1), torch.zeros(40, dtype=torch.long))
    loader = CyclicalLoader(data, epochs=2, batch_size=20)

    class TupleModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(1, 2)

        def forward(self, x, labels=None):
            logits = self.linear(x)
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    with pytest.raises(TypeError, match=r"dicts of model inputs.*inputs=lambda batch"):
        CyclicalTrainer(model=TupleModel(), args=make_args(tmp_path), cyclical_loader=loader).train()
    mapped = CyclicalTrainer(model=TupleModel(), args=make_args(tmp_path), cyclical_loader=CyclicalLoader(
        data, epochs=2, batch_size=20), inputs=lambda batch: {"x": batch[0], "labels": batch[1]})
    mapped.train()
    assert mapped.state.global_step == 4 and mapped.cyclical_loader.ledger.num_seen() == 40


@pytest.mark.parametrize(("overrides", "message"), [
    ({"max_steps": 5}, r"max_steps=5\).*drop max_steps"),
    ({"num_train_epochs": 7}, r"num_train_epochs=7\).*loader's epochs=3"),
    ({"max_grad_norm": 0.3}, r"max_grad_norm=0.3\).*grad_clip"),
])
def test_arguments_that_contradict_the_plan_are_refused(tmp_path, overrides, message):
    plan = Plan.from_config(parse_config({"epochs": 3}))
    with pytest.raises(ValueError, match=message):
        CyclicalTrainer(model=ScoreModel(), args=make_args(tmp_path, **overrides),
                        cyclical_loader=make_loader(ControlledLosses()), hooks=plan)


def test_resume_from_a_checkpoint_without_the_loader_state_is_refused(tmp_path):
    args = make_args(tmp_path, save_strategy="steps", save_steps=5)
    CyclicalTrainer(model=ScoreModel(), args=args, cyclical_loader=make_loader(ControlledLosses())).train()
    checkpoint = tmp_path / "out" / "checkpoint-5"
    (checkpoint / "cycdata_loader.pt").unlink()
    trainer = CyclicalTrainer(model=ScoreModel(), args=args, cyclical_loader=make_loader(ControlledLosses()))
    with pytest.raises(ValueError, match=r"has no cycdata_loader\.pt"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def readme_block(heading: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    after = text[text.index(f"### {heading}\n"):]
    return re.search(r"```python\n(.*?)```", after, re.DOTALL).group(1)


def test_the_readme_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the snippet writes its output folder where it runs
    namespace: dict = {}
    exec(compile(readme_block("transformers Trainer"), "README.md", "exec"), namespace)
    trainer, loader = namespace["trainer"], namespace["loader"]
    # What its comment promises: 2/20/2 batches at accumulation 2 are 1 + 10 + 1 optimizer steps; all 400 seen.
    assert trainer.state.global_step == trainer.state.max_steps == 12
    assert loader.ledger.num_seen() == 400


def test_without_transformers_the_import_names_the_extra():
    script = ("import sys; sys.modules['transformers'] = None\n"
              "try:\n    import cycdata.integrations.hf\nexcept ImportError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "cycdata.integrations.hf needs transformers: pip install cycdata[hf]"
