"""Pruning under torch.distributed (two gloo processes on the CPU): every rank derives the same pruned
selection and the same weights from the all-gathered ledger, the ranks' shares are disjoint and cover it,
and the trainer's counted sample passes equal the plan's, summed over the ranks."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from cycdata.loaders import CyclicalLoader
from cycdata.schedules import Piecewise

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 101  # odd: the ranks' shares need DistributedSampler's padding
KEEP = Piecewise(((0.0, 0.6), (0.75, 0.6), (0.75, 1.0)))  # epochs 0 and 1 pruned to 61 of 101, epoch 2 on all


class Indexed(Dataset):
    """Item i is (i as a feature, i)."""

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.full((1,), float(index)), index


def _loss_of(indices: torch.Tensor) -> torch.Tensor:
    """A loss that depends on the sample alone, so both ranks' ledgers agree."""
    return ((indices * 37) % SAMPLES).float() / SAMPLES


def _prune_worker(rank: int, folder: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    loader = CyclicalLoader(Indexed(), epochs=3, batch_size=10, keep=KEEP, policy="prune", shuffle=True, seed=3)
    epochs = []
    for _ in range(3):
        batches = []
        for _features, indices in loader:
            weights = loader.batch_weights
            batches.append((indices.clone(), None if weights is None else weights.clone()))
            loader.record_loss(_loss_of(indices))
        epochs.append(batches)
    torch.save(epochs, f"{folder}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_ranks_prune_the_same_samples_with_the_same_weights(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_prune_worker, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    kept = [math.ceil(0.6 * SAMPLES), math.ceil(0.6 * SAMPLES), SAMPLES]
    for epoch, count in enumerate(kept):
        shares = [torch.cat([indices for indices, _ in rank[epoch]]) for rank in ranks]
        assert [len(share) for share in shares] == [math.ceil(count / 2)] * 2  # padded to equal shares
        union = torch.cat(shares)
        assert len(set(union.tolist())) == count  # the padding repeats one sample; nothing else is shared
        weights = {}
        for rank in ranks:
            for indices, batch_weights in rank[epoch]:
                values = torch.ones(len(indices)) if batch_weights is None else batch_weights
                for index, weight in zip(indices.tolist(), values.tolist()):
                    assert weights.setdefault(index, weight) == weight  # one weight per sample on both ranks
        if epoch < 2:  # the pruned epochs: each kept sample of the pool stands in for the dropped ones
            assert max(weights.values()) > 1.0
            assert sum(weights.values()) == SAMPLES or math.isclose(sum(weights.values()), SAMPLES, rel_tol=1e-6)
        else:
            assert set(weights.values()) == {1.0}


def test_ddp_trainer_counts_the_planned_sample_passes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "cycdata.train.cli", "train", "epochs=3",
         "model=test_resnet", "runtime.progress=false", "data.num_workers=0", "data.dataset=synthetic:200",
         "data.batch_size=20", "self_paced.policy=prune",
         "self_paced.keep={points: [[0, 0.6], [0.75, 0.6], [0.75, 1]]}", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["self_paced.kept"]) for row in rows] == [120, 120, 200]
    assert [float(row["train_passes"]) for row in rows] == [120.0, 120.0, 200.0]  # both ranks, 60 + 60 ...
    assert [float(row["train_passes_total"]) for row in rows] == [120.0, 240.0, 440.0]  # 45% fewer than 600
