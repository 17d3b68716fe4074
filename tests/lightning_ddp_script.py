"""A real Lightning run of a CyclicalLoader through CyclicalCallback, reporting what each epoch ran (one JSON file
per rank). Run as a script for DDP (Lightning's launcher re-runs ``sys.argv``); the tests import it for 1 process.

The loss of sample ``i`` is ``i / 400`` exactly (the model only adds ``0 * output``, so it is still trained), so a
test knows which loss belongs to which sample and which samples the last epoch must keep.

    python tests/lightning_ddp_script.py OUT_DIR --devices 2 --strategy ddp
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

SIZE = 400
EPOCHS = 3


def index_dataset() -> TensorDataset:
    """Sample ``i`` is ``([i], i)``: its label is its index, so a batch says which samples it holds."""
    return TensorDataset(torch.arange(SIZE, dtype=torch.float32).unsqueeze(1), torch.arange(SIZE))


def expected_loss(indices: torch.Tensor) -> torch.Tensor:
    """The per-sample loss the module computes for the samples ``indices``."""
    return indices.to(torch.float32) / SIZE


def make_loader(**options: Any) -> Any:
    from cycdata.loaders import CyclicalLoader

    # refresh_fraction=0: the last epoch keeps exactly the lowest-loss half, with no stale samples re-admitted.
    return CyclicalLoader(index_dataset(), epochs=EPOCHS, batch_size={"easy": 100, "hard": 20},
                          keep={"easy": 0.5, "hard": 1.0}, shuffle=True, seed=0, refresh_fraction=0.0, **options)


def index_loss_module(loader: Any) -> Any:
    """A LightningModule whose training_step logs the samples of each batch and returns their known losses."""
    import lightning.pytorch as pl

    class IndexLoss(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(1, 1)
            self.seen: list[dict[str, Any]] = []

        def train_dataloader(self) -> Any:
            return loader

        def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
            x, index = batch
            self.seen.append({"epoch": self.current_epoch, "batch": batch_idx, "indices": index.tolist()})
            losses = expected_loss(index) + 0.0 * self.layer(x).squeeze(1)
            return {"loss": losses.mean(), "per_sample_loss": losses}

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    return IndexLoss()


def fit(loader: Any, module: Any, ckpt_path: str | None = None, **trainer_options: Any) -> Any:
    """Fit ``module`` on the CPU with a CyclicalCallback (and any ``callbacks=``); returns the trainer."""
    import lightning.pytorch as pl

    from cycdata.integrations.lightning import CyclicalCallback

    options: dict[str, Any] = dict(accelerator="cpu", devices=1, max_epochs=EPOCHS, enable_progress_bar=False,
                                   logger=False, enable_checkpointing=False, enable_model_summary=False)
    options.update(trainer_options)
    callbacks = [CyclicalCallback(loader=loader), *options.pop("callbacks", [])]
    trainer = pl.Trainer(callbacks=callbacks, **options)
    # weights_only: the loader's state in the checkpoint is plain data (tensors, numbers, dicts).
    trainer.fit(module, ckpt_path=ckpt_path, weights_only=True)
    return trainer


def report(loader: Any, module: Any, rank: int = 0) -> dict[str, Any]:
    """What the run did: the batches each epoch trained and the ledger after its last records were applied."""
    loader.ledger.synchronize()  # a collective under DDP: every rank calls it
    ledger = loader.ledger
    return {"rank": rank, "seen": module.seen, "num_batches": [loader.num_batches(e) for e in range(EPOCHS)],
            "losses": ledger.losses.tolist(), "record_count": ledger.record_count.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--strategy", default="ddp")
    args = parser.parse_args()
    loader = make_loader()
    module = index_loss_module(loader)
    trainer = fit(loader, module, devices=args.devices, strategy=args.strategy)
    result = report(loader, module, trainer.global_rank)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
