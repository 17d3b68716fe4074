"""Evaluation metrics accumulated on the device (top-1, NLL, expected calibration error) and the
run folder's logs (``metrics.csv``, TensorBoard events, PNG plots).

Example:
    >>> import torch
    >>> scores = EvalAccumulator(num_bins=10, device=torch.device("cpu"))
    >>> scores.add(torch.tensor([[4.0, 0.0], [0.0, 4.0]]), torch.tensor([0, 0]))
    >>> result = scores.compute()
    >>> result["accuracy"], round(result["ece"], 4)
    (0.5, 0.482)
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KNOB_PREFIXES", "EvalAccumulator", "RunLogger"]

#: Dotted-name prefixes of the knobs in a metrics row (the rest are metrics).
KNOB_PREFIXES = ("optim.", "data.", "temperature", "grad_clip", "loss.", "augment.", "self_paced.", "semi_supervised.",
                 "distill.")


class EvalAccumulator:
    """Sums for accuracy, NLL and ECE kept as device tensors; one host sync in :meth:`compute`.

    ECE (Guo et al. 2017): samples binned by confidence (max softmax probability) into
    ``num_bins`` equal-width bins; ``ECE = Σ_b (n_b/N)·|accuracy_b − confidence_b|``.
    """

    def __init__(self, num_bins: int = 15, device: torch.device | None = None) -> None:
        self.num_bins = num_bins
        # Rows: sample count, correct count, confidence sum; columns: bins. Plus NLL sum.
        self.bins = torch.zeros(3, num_bins, dtype=torch.float64, device=device)
        self.nll = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, logits: Tensor, labels: Tensor) -> None:
        logits = logits.float()
        self.nll += F.cross_entropy(logits, labels, reduction="sum").double()
        confidence, predicted = logits.softmax(dim=1).max(dim=1)
        which = (confidence * self.num_bins).long().clamp_(max=self.num_bins - 1)
        correct = (predicted == labels).double()
        ones = torch.ones_like(correct)
        self.bins[0].index_add_(0, which, ones)
        self.bins[1].index_add_(0, which, correct)
        self.bins[2].index_add_(0, which, confidence.double())

    def all_reduce(self) -> None:
        """Sum the accumulators over all DDP ranks."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.bins)
            torch.distributed.all_reduce(self.nll)

    def compute(self) -> dict[str, float]:
        bins = self.bins.cpu()
        counts, correct, confidence = bins
        total = float(counts.sum())
        if total == 0:
            return {"accuracy": math.nan, "nll": math.nan, "ece": math.nan, "samples": 0.0}
        gaps = (correct - confidence).abs()  # |n_b·acc_b − n_b·conf_b|
        return {
            "accuracy": float(correct.sum()) / total,
            "nll": float(self.nll) / total,
            "ece": float(gaps.sum()) / total,
            "samples": total,
        }


class RunLogger:
    """Writes a run folder's ``metrics.csv`` (one row per epoch), TensorBoard events and plots.

    The CSV is rewritten whole from the history each epoch, so after a resume it holds exactly
    the epochs the checkpoint knew about.
    """

    def __init__(self, folder: Path, history: Sequence[dict[str, Any]] = (), enabled: bool = True) -> None:
        self.folder = folder
        self.history: list[dict[str, Any]] = list(history)
        self.enabled = enabled
        self._writer: Any = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after its last checkpoint.
            self._writer = SummaryWriter(str(folder / "tensorboard"), purge_step=len(self.history) or None)

    def log_epoch(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if not self.enabled:
            return
        self._write_csv()
        for name, value in row.items():
            if name != "epoch" and isinstance(value, (int, float)):
                self._writer.add_scalar(name, value, row["epoch"])
        self._writer.flush()
        self._plot()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def _write_csv(self) -> None:
        names = list(dict.fromkeys(name for row in self.history for name in row))
        temporary = self.folder / ".metrics.csv.tmp"
        with temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=names)
            writer.writeheader()
            writer.writerows(self.history)
        temporary.replace(self.folder / "metrics.csv")

    def _plot(self) -> None:
        from cycdata.figures import pyplot, save_figure

        epochs = [row["epoch"] for row in self.history]
        groups = {
            "metrics.png": [("train_loss", "test_nll"), ("train_accuracy", "test_accuracy"), ("test_ece",)],
            "knobs.png": [(name,) for name in self.history[-1] if name.startswith(KNOB_PREFIXES)],
        }
        for filename, panels in groups.items():
            panels = [panel for panel in panels if any(name in self.history[-1] for name in panel)]
            if not panels:
                continue
            figure, axes = pyplot().subplots(len(panels), 1, figsize=(7, 2.3 * len(panels)), squeeze=False)
            for axis, panel in zip(axes[:, 0], panels):
                for name in panel:
                    if name in self.history[-1]:
                        axis.plot(
                            epochs,
                            [row.get(name, math.nan) for row in self.history],
                            marker="o",
                            markersize=3,
                            label=name,
                        )
                axis.legend(loc="best", fontsize=8)
                axis.grid(alpha=0.3)
            axes[-1, 0].set_xlabel("epoch")
            save_figure(figure, self.folder / filename, dpi=100)
