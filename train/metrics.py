"""Metrics accumulated on the device (named training sums; top-1, NLL and expected calibration error
at evaluation) and the run folder's logs (``metrics.csv``, TensorBoard events, PNG plots).

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
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KNOB_PREFIXES", "DeviceSums", "EvalAccumulator", "RunLogger", "summary_line"]

#: Dotted-name prefixes of the knobs in a metrics row (the rest are metrics).
KNOB_PREFIXES = ("optim.", "data.", "temperature", "grad_clip", "loss.", "augment.", "self_paced.", "semi_supervised.",
                 "distill.")


class DeviceSums:
    """Named running sums kept on the device: :meth:`add` reads nothing on the host, :meth:`totals` reads all once.

    One float64 tensor holds every field, so an epoch's DDP reduction is one ``all_reduce`` and its read one
    transfer; float64, so that summing float32 losses over a long epoch loses nothing that shows.

    Example:
        >>> sums = DeviceSums(("loss", "samples"))
        >>> for losses in (torch.tensor([0.5, 1.5]), torch.tensor([1.0])):
        ...     sums.add({"loss": losses.sum()}, samples=len(losses))
        >>> sums.totals()
        {'loss': 3.0, 'samples': 3.0}
    """

    def __init__(self, names: Iterable[str], device: torch.device | None = None) -> None:
        self.names = tuple(names)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"metric sums need distinct names, got {self.names}")
        self._slots = {name: slot for slot, name in enumerate(self.names)}
        self.values = torch.zeros(len(self.names), dtype=torch.float64, device=device)

    def add(self, sums: Mapping[str, Tensor | float] | None = None, **more: Tensor | float) -> None:
        """Add a step's values (device tensors or numbers) to the named sums, on the device."""
        for name, value in {**(sums or {}), **more}.items():
            if name not in self._slots:
                raise KeyError(f"no metric sum named {name!r}; this accumulator has {', '.join(self.names)}")
            self.values[self._slots[name]] += value

    def __getitem__(self, name: str) -> Tensor:
        """The running sum ``name`` as a 0-d device tensor (reading it is the caller's host sync)."""
        return self.values[self._slots[name]]

    def all_reduce(self) -> None:
        """Sum over all DDP ranks."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.values)

    def totals(self) -> dict[str, float]:
        """Every sum by name: the one host read."""
        return dict(zip(self.names, self.values.tolist()))


class EvalAccumulator:
    """Sums for accuracy, NLL and ECE kept as device tensors; one host sync in :meth:`compute`.

    ECE (Guo et al. 2017): samples binned by confidence (max softmax probability) into
    ``num_bins`` equal-width bins; ``ECE = Σ_b (n_b/N)·|accuracy_b − confidence_b|``.

    Samples whose logits are NaN or infinite (a diverged model) go to the first bin, so binning never
    fails; they make the NLL and ECE NaN and are counted in ``compute()["nonfinite"]``.

    With ``num_classes``, also the balanced accuracy: the mean over the classes present of each class's recall
    (what an imbalanced training split is scored by).

    Example:
        >>> scores = EvalAccumulator(num_bins=4)
        >>> scores.add(torch.tensor([[float("nan"), 0.0], [3.0, 0.0]]), torch.tensor([0, 0]))
        >>> result = scores.compute()
        >>> result["nonfinite"], math.isnan(result["ece"])
        (1.0, True)
        >>> scores = EvalAccumulator(num_classes=2)   # class 0: 2 of 3 right, class 1: 1 of 1
        >>> scores.add(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0, 0, 1]))
        >>> result = scores.compute()
        >>> result["accuracy"], round(result["balanced_accuracy"], 4)
        (0.75, 0.8333)
    """

    def __init__(self, num_bins: int = 15, device: torch.device | None = None, num_classes: int | None = None) -> None:
        self.num_bins = num_bins
        # Rows: samples, correct; columns: classes (balanced accuracy).
        self.classes = None if num_classes is None else torch.zeros(2, num_classes, dtype=torch.float64, device=device)
        # Rows: sample count, correct count, confidence sum; columns: bins. Plus NLL sum.
        self.bins = torch.zeros(3, num_bins, dtype=torch.float64, device=device)
        self.nll = torch.zeros((), dtype=torch.float64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.float64, device=device)  # samples with NaN/inf logits

    def add(self, logits: Tensor, labels: Tensor) -> None:
        logits = logits.float()
        self.nll += F.cross_entropy(logits, labels, reduction="sum").double()
        confidence, predicted = logits.softmax(dim=1).max(dim=1)
        self.nonfinite += (~torch.isfinite(logits).all(dim=1)).sum()
        # NaN would turn into an arbitrary (negative) bin index: such samples go to bin 0 (their NaN confidence
        # still makes the ECE NaN, which is what a diverged model's calibration is).
        which = (confidence * self.num_bins).nan_to_num(0.0).long().clamp_(0, self.num_bins - 1)
        correct = (predicted == labels).double()
        ones = torch.ones_like(correct)
        self.bins[0].index_add_(0, which, ones)
        self.bins[1].index_add_(0, which, correct)
        self.bins[2].index_add_(0, which, confidence.double())
        if self.classes is not None:
            self.classes[0].index_add_(0, labels, ones)
            self.classes[1].index_add_(0, labels, correct)

    def all_reduce(self) -> None:
        """Sum the accumulators over all DDP ranks."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.bins)
            torch.distributed.all_reduce(self.nll)
            torch.distributed.all_reduce(self.nonfinite)
            if self.classes is not None:
                torch.distributed.all_reduce(self.classes)

    def compute(self) -> dict[str, float]:
        bins = self.bins.cpu()
        counts, correct, confidence = bins
        total = float(counts.sum())
        if total == 0:
            return {"accuracy": math.nan, "nll": math.nan, "ece": math.nan, "samples": 0.0, "nonfinite": 0.0}
        gaps = (correct - confidence).abs()  # |n_b·acc_b − n_b·conf_b|
        result = {
            "accuracy": float(correct.sum()) / total,
            "nll": float(self.nll) / total,
            "ece": float(gaps.sum()) / total,
            "samples": total,
            "nonfinite": float(self.nonfinite),
        }
        if self.classes is not None:
            seen, right = self.classes.cpu()
            present = seen > 0
            result["balanced_accuracy"] = float((right[present] / seen[present]).mean())
        return result


class RunLogger:
    """Writes a run folder's ``metrics.csv`` (one row per epoch), TensorBoard events and plots.

    The CSV is rewritten whole from the history each epoch, so after a resume it holds exactly
    the epochs the checkpoint knew about. The plots are redrawn after the first epoch, the last one and
    otherwise at most every ``PLOT_EVERY_SECONDS`` (drawing them costs more than an epoch of a small run).
    """

    PLOT_EVERY_SECONDS = 30.0

    def __init__(self, folder: Path, history: Sequence[dict[str, Any]] = (), enabled: bool = True) -> None:
        self.folder = folder
        self.history: list[dict[str, Any]] = list(history)
        self.enabled = enabled
        self._writer: Any = None
        self._plotted_at = -math.inf
        self._stale = False  # epochs logged since the plots were drawn
        if enabled and _tensorboard_installed():
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after its last checkpoint.
            self._writer = SummaryWriter(str(folder / "tensorboard"), purge_step=len(self.history) or None)
        elif enabled:  # said once, before the first epoch: the events are an extra, the CSV and plots are not
            warnings.warn("TensorBoard events are not written (tensorboard is not installed): "
                          "pip install 'cycdata[tensorboard]'", stacklevel=2)

    def log_epoch(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if not self.enabled:
            return
        self._write_csv()
        if self._writer is not None:
            for name, value in row.items():
                if name != "epoch" and isinstance(value, (int, float)):
                    self._writer.add_scalar(name, value, row["epoch"])
            self._writer.flush()
        self._stale = True
        if time.monotonic() - self._plotted_at >= self.PLOT_EVERY_SECONDS:
            self._plot()

    def close(self) -> None:
        """Draw what the last plots missed, close the events file."""
        if self.enabled and self._stale:
            self._plot()
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

    #: The run's plan, for the per-step knob lines of knobs.png; when not set, rebuilt once from the folder's
    #: config.yaml (a folder without one, or with a config this version cannot read, gets per-epoch points).
    plan: Any = None

    def _plot(self) -> None:
        from cycdata.figures import save_figure
        from cycdata.train.figures import knobs_figure, metrics_figure, run_plan

        if self.plan is None:
            self.plan = run_plan(self.folder) or False  # False: tried, none; do not re-read every epoch
        self._plotted_at, self._stale = time.monotonic(), False
        plan = self.plan or None
        knobs = [name for name in self.history[-1] if name.startswith(KNOB_PREFIXES)]
        epochs = plan.epochs if plan is not None else None
        for filename, figure in (("metrics.png", metrics_figure(self.history, epochs)),
                                 ("knobs.png", knobs_figure(self.history, knobs, plan))):
            if figure is not None:
                save_figure(figure, self.folder / filename, dpi=100)


def _tensorboard_installed() -> bool:
    """Whether ``tensorboard`` (the optional ``[tensorboard]`` extra) can be imported."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def summary_line(row: Mapping[str, Any], epochs: int) -> str:
    """The one line printed after each epoch: loss, accuracies, calibration, every knob and the speed."""
    knobs = "  ".join(f"{name} {value:.4g}" for name, value in row.items() if name.startswith(KNOB_PREFIXES))
    scores = ""
    for split in ("val", "test"):  # a run with a validation split reads the test split at its last epoch only
        if f"{split}_accuracy" in row:
            ema = f"ema {100 * row[f'ema_{split}_accuracy']:.2f}%  " if f"ema_{split}_accuracy" in row else ""
            scores += (f"{split} {100 * row[f'{split}_accuracy']:.2f}%  {ema}nll {row[f'{split}_nll']:.4f}  "
                       f"ece {row[f'{split}_ece']:.4f}  ")
    return (
        f"epoch {row['epoch'] + 1:>3}/{epochs}  loss {row['train_loss']:.4f}  "
        f"train {100 * row['train_accuracy']:.2f}%  {scores}{knobs}  "
        f"{row['images_per_second']:.0f} img/s  {row['epoch_seconds']:.1f}s"
    )
