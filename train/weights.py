"""Weights from disk: initialise a model from a checkpoint (``--init``) and build a distillation teacher.

Both read the same files: a cycdata checkpoint (``last.pt``/``best.pt``, or the run folder that holds
them), a plain PyTorch state dict (``.pt``/``.pth``/``.bin``) or a ``.safetensors`` file, such as a
timm pretrained file saved on disk. Files are untrusted: ``.pt`` files are read with ``weights_only=True``
(tensors and plain data only; a file holding other Python objects is refused, never run), and a cycdata
checkpoint's checksum is verified. Wrapping keys (``module.`` from DDP, ``_orig_mod.`` from
``torch.compile``) are stripped.

``--init`` takes the weights only (no optimizer state, no epoch): a fine-tuning run starts its own
schedule. A classifier head of a different size (another dataset's classes) keeps its fresh
initialisation; a first convolution made for other input channels is adapted with timm's
``adapt_input_conv``; any other mismatch is an error that names the tensor and both shapes.

Example:
    >>> import timm, tempfile, pathlib, torch
    >>> source = timm.create_model("test_resnet", num_classes=10)
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "w.pth"
    >>> torch.save(source.state_dict(), path)
    >>> target = timm.create_model("test_resnet", num_classes=5)
    >>> report = load_weights(target, path)
    >>> report.new_head, torch.equal(target.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    (['fc.bias', 'fc.weight'], True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cycdata.train.checkpoint import CheckpointError, UnsafeFileError, load_untrusted, one_line, verify_checksum

__all__ = ["WeightsReport", "apply_weights", "build_teacher", "find_checkpoint", "load_weights", "read_state_dict"]

_WRAPPERS = ("module.", "_orig_mod.")


@dataclass
class WeightsReport:
    """What :func:`load_weights` did."""

    file: Path | None = None
    loaded: int = 0
    new_head: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {self.loaded} tensors from {self.file}"]
        if self.new_head:
            parts.append(f"new classifier head ({', '.join(self.new_head)})")
        if self.adapted:
            parts.append(f"input conv adapted to the data's channels ({', '.join(self.adapted)})")
        if self.ignored:
            parts.append(f"{len(self.ignored)} tensors of the file not in the model ignored")
        return "; ".join(parts)


def find_checkpoint(path: str | Path) -> Path:
    """A file as given, or the ``best.pt`` (else ``last.pt``) of a run folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} is a folder without best.pt or last.pt; give a checkpoint file or run folder")
    if not path.is_file():
        raise CheckpointError(f"no weights file at {path}")
    return path


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The tensors of a weights file and, for a cycdata checkpoint, its run config."""
    path = find_checkpoint(path)
    raw = _read_weights_file(path)
    config = None
    if isinstance(raw, dict) and "checksum" in raw and raw.get("version") is not None:  # a cycdata checkpoint
        verify_checksum(raw, path)
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):  # a cycdata (or similar) checkpoint
        config = raw.get("config") if isinstance(raw.get("config"), dict) else None
        raw = raw["model"]
    elif isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors; give a cycdata checkpoint, a state dict "
                              "(.pt/.pth) or a .safetensors file")
    return {_unwrap(key): value for key, value in raw.items()}, config


def _read_weights_file(path: Path) -> Any:
    """The content of a ``.safetensors`` or torch file, read without running code from it."""
    if path.suffix != ".safetensors":
        try:
            return load_untrusted(path)
        except UnsafeFileError:
            raise
        except CheckpointError:
            raise CheckpointError(f"cannot read weights from {path} (truncated or not a weights file)") from None
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises several types for bad files
        raise CheckpointError(f"cannot read weights from {path} (truncated or not a weights file): "
                              f"{one_line(error)}") from None


def _unwrap(key: str) -> str:
    for prefix in _WRAPPERS:
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _head_names(model: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the classifier head (timm's ``default_cfg['classifier']``)."""
    classifier = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = classifier.get("classifier", "fc") if isinstance(classifier, dict) else "fc"
    return tuple(names) if isinstance(names, (tuple, list)) else (names,)


def load_weights(model: nn.Module, path: str | Path, *, allow_new_head: bool = True) -> WeightsReport:
    """Copy the tensors of ``path`` into ``model`` (see the module docstring for what is adapted)."""
    file = find_checkpoint(path)
    loaded, _ = read_state_dict(file)
    return apply_weights(model, loaded, file, allow_new_head=allow_new_head)


def apply_weights(model: nn.Module, loaded: dict[str, torch.Tensor], file: Path, *,
                  allow_new_head: bool = True) -> WeightsReport:
    """Copy already-read tensors (from ``file``, named in messages) into ``model``."""
    from timm.models import adapt_input_conv

    target = model.state_dict()
    heads = _head_names(model)
    report = WeightsReport(file=file)
    missing = [key for key in target if key not in loaded and not key.endswith("num_batches_tracked")]
    if missing and not all(key.startswith(heads) for key in missing):
        body = [key for key in missing if not key.startswith(heads)]
        raise CheckpointError(f"{file} does not fit this model: {len(body)} of its {len(target)} tensors are missing "
                              f"(first: {', '.join(body[:3])}); is it a checkpoint of the same architecture?")
    state = {}
    for key, value in target.items():
        source = loaded.get(key)
        if source is None:
            if key.startswith(heads):
                report.new_head.append(key)
            continue
        if source.shape == value.shape:
            state[key] = source.to(value.dtype)
        elif key.startswith(heads):
            if not allow_new_head:
                raise CheckpointError(f"{file}: the classifier head ({key}) is for {source.shape[0]} classes, the data "
                                      f"has {value.shape[0]}; a teacher must predict the student's classes")
            report.new_head.append(key)
        elif source.dim() == 4 and source.shape[0] == value.shape[0] and source.shape[2:] == value.shape[2:]:
            state[key] = adapt_input_conv(value.shape[1], source.float()).to(value.dtype)
            report.adapted.append(key)
        else:
            raise CheckpointError(f"{file}: tensor {key} has shape {tuple(source.shape)}, the model's is "
                                  f"{tuple(value.shape)}; is it a checkpoint of the same architecture?")
    model.load_state_dict(state, strict=False)
    report.loaded = len(state)
    report.new_head.sort()
    report.ignored = sorted(key for key in loaded if key not in target)
    return report


def build_teacher(spec: str, *, num_classes: int, in_chans: int, device: torch.device) -> tuple[nn.Module, str]:
    """A frozen teacher in eval mode from ``spec``: a cycdata checkpoint or run folder, or ``MODEL:WEIGHTS``.

    Returns the model and a one-line description. The teacher must predict ``num_classes`` classes.
    """
    import timm

    path = Path(spec).expanduser()
    if path.exists():
        file = find_checkpoint(path)
        loaded, config = read_state_dict(file)
        if config is None or not isinstance(config.get("model"), str):
            raise CheckpointError(f"{file} carries no cycdata config naming its model; give the teacher as "
                                  f"MODEL:{file} (a timm model name and the weights file)")
        name = config["model"]
    else:
        name, sep, weights = spec.partition(":")
        if not sep or not weights:
            raise CheckpointError(f"distill.teacher {spec!r}: no such file or folder; give a cycdata checkpoint, "
                                  "its run folder, or MODEL:WEIGHTS (a timm model name and a weights file)")
        file = find_checkpoint(weights)
        loaded, _ = read_state_dict(file)
    try:
        teacher = timm.create_model(name, num_classes=num_classes, in_chans=in_chans)
    except RuntimeError as error:
        raise CheckpointError(f"distill.teacher: {error}") from None
    report = apply_weights(teacher, loaded, file, allow_new_head=False)  # the file is read once
    teacher.eval().requires_grad_(False)
    return teacher.to(device), f"teacher {name} ({sum(p.numel() for p in teacher.parameters()):,} parameters): " + \
        report.summary()
