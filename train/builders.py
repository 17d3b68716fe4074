"""What a run is built from, before its first step: the runtime, the data, the model and teacher, the
optimizer and the loaders. Each builder turns one part of a validated config into one object and
refuses what it cannot build with a :class:`~cycdata.config.ConfigError` naming the key.

Example:
    >>> from cycdata.config import parse_config
    >>> from cycdata.loaders.datasets import load_dataset
    >>> config = parse_config({"epochs": 2, "model": "test_resnet", "data": {"dataset": "synthetic:64"}})
    >>> data = load_dataset(config.data.dataset)
    >>> model = build_model(config, data)
    >>> resolve_ladder(config, data).name, sum(p.numel() for p in model.parameters()) > 0
    ('default', True)
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import math
import os
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset

from cycdata.augment_ladder.ladder import Ladder, LadderError, load_ladder
from cycdata.config import ConfigError, RunConfig, RunStopped
from cycdata.loaders.datasets import DatasetSplits, ImageFileDataset, load_dataset
from cycdata.loaders.device_loader import fits_in_memory
from cycdata.loaders.torch_loader import BatchLoader, CyclicalLoader
from cycdata.plan import Plan
from cycdata.samplers import ShuffledBatchSampler
from cycdata.schedules import Constant
from cycdata.train.weights import build_teacher, load_weights

__all__ = [
    "DDP_TIMEOUT_ENV",
    "DistributedTimeout",
    "Normalize",
    "Runtime",
    "autocast",
    "build_eval_loader",
    "build_model",
    "build_normalize",
    "build_optimizer",
    "build_run_model",
    "build_run_teacher",
    "build_test_loader",
    "build_train_loader",
    "check_model",
    "collective_timeout",
    "ddp_timeout",
    "labeled_subset",
    "leave_broken_group",
    "leave_process_group",
    "limit_train",
    "resolve_ladder",
    "setup_runtime",
    "validate_run",
    "wrap_for_training",
]

DDP_TIMEOUT_ENV = "CYCDATA_DDP_TIMEOUT"
DEFAULT_DDP_TIMEOUT_S = 600.0  # long enough for a slow first epoch's evaluation, short enough to notice a hang


# --------------------------------------------------------------------------------------------
# Where the run happens
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: device, rank and world size."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class DistributedTimeout(RunStopped):
    """A rank waited longer than ``CYCDATA_DDP_TIMEOUT`` for the others (``cycdata``: one line, exit 2, as
    :class:`~cycdata.config.RunStopped`): one of them stopped, crashed or never started."""

    def __init__(self, rank: int, world_size: int, what: str, seconds: float) -> None:
        super().__init__("", (
            f"rank {rank} of {world_size}: {what} timed out after {seconds:g} s waiting for the other ranks (one "
            f"stopped, crashed or never started; see their logs); if they are only slow, raise {DDP_TIMEOUT_ENV} "
            f"(seconds, default {DEFAULT_DDP_TIMEOUT_S:g})"))


def ddp_timeout() -> datetime.timedelta:
    """How long a rank waits in a collective (and for the others to join): ``CYCDATA_DDP_TIMEOUT`` seconds.

    Example:
        >>> ddp_timeout().total_seconds() if DDP_TIMEOUT_ENV not in os.environ else 600.0
        600.0
    """
    raw = os.environ.get(DDP_TIMEOUT_ENV, "")
    if not raw:
        return datetime.timedelta(seconds=DEFAULT_DDP_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(DDP_TIMEOUT_ENV, f"got {raw!r}; give the seconds a rank waits for the others, e.g. 600")
    return datetime.timedelta(seconds=seconds)


def collective_timeout(error: BaseException, runtime: Runtime) -> DistributedTimeout | None:
    """The one-line :class:`DistributedTimeout` for a backend error that is a timeout, else None.

    gloo raises a RuntimeError ("Timed out waiting ... for recv", or "Connection closed by peer" when the
    other side was killed) from a collective; a caller that runs collectives converts it with this.
    """
    text = str(error).lower()
    if not runtime.distributed or not isinstance(error, RuntimeError):
        return None
    if "timed out" in text or "timeout" in text or "connection closed by peer" in text or "connection reset" in text:
        return DistributedTimeout(runtime.rank, runtime.world_size, "a collective", ddp_timeout().total_seconds())
    return None


def leave_broken_group() -> None:
    """Leave the process group after one of its collectives timed out, so the rank exits as it says.

    The group is unusable after a timeout. A gloo group is destroyed now (see :func:`leave_process_group` for
    why a gloo group must not outlive the process); NCCL's watchdog ends the process itself after a timeout, so
    an NCCL group is left to it, also at exit.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo":
        dist.destroy_process_group()
    else:
        atexit.unregister(leave_process_group)


def leave_process_group() -> None:
    """Destroy the default process group if one is alive; ``setup_runtime`` runs it when the process exits.

    A process that exits with a gloo group alive is aborted by gloo's threads in many runs ("terminate called
    without an active exception", status -6), even after a run that succeeded, so torchrun reports a failure
    (5 of 8 runs of a plain two-rank torch script that never destroys its group). PyTorch asks every process to
    destroy its group before it exits; an NCCL group otherwise warns at exit.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def setup_runtime(requested: str) -> Runtime:
    """Pick the device and join the process group when launched by ``torchrun``.

    Collectives (and joining) time out after ``CYCDATA_DDP_TIMEOUT`` seconds, so a stopped rank ends
    the others with one line instead of blocking them forever.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested == "auto":
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("runtime.device", f"got {requested!r} but no CUDA device is available; use auto or cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        timeout = ddp_timeout()
        try:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        except (RuntimeError, dist.DistError) as error:  # DistStoreError: the others never joined
            if "time" not in str(error).lower():
                raise
            raise DistributedTimeout(rank, world_size, "joining the process group", timeout.total_seconds()) from None
        atexit.register(leave_process_group)  # the group cycdata joined is left before the interpreter exits
    return Runtime(device=device, rank=rank, world_size=world_size)


def autocast(config: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``runtime.amp`` is on; a no-op context otherwise."""
    if config.runtime.amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _channels_last(config: RunConfig, runtime: Runtime) -> bool:
    # With torch.compile, inductor picks memory layouts itself; channels_last weights on top of it
    # trip a stride assertion in its convolution backward (seen with torch 2.11 on an H200).
    return config.runtime.channels_last and runtime.device.type == "cuda" and not config.runtime.compile


# --------------------------------------------------------------------------------------------
# The data
# --------------------------------------------------------------------------------------------


def limit_train(data: DatasetSplits, count: int | None, generator: torch.Generator | None = None) -> DatasetSplits:
    """The splits with the train split cut to a fixed, class-balanced subset of ``count`` samples (drawn with
    ``generator``; None: seed 0)."""
    if count is None:
        return data
    if count < data.num_classes:  # some classes would have no training sample at all
        raise ConfigError("data.train_limit", f"got {count}, fewer than {data.name}'s {data.num_classes} classes; "
                          f"give at least {data.num_classes} (one sample per class), or null for all")
    labels = getattr(data.train, "labels", None)
    images = getattr(data.train, "images", None)
    files = isinstance(data.train, ImageFileDataset)
    if not isinstance(labels, Tensor) or not (isinstance(images, Tensor) or files):
        raise ConfigError("data.train_limit", f"needs an in-memory dataset or image files; {data.name} is neither")
    if count >= len(labels):
        return data
    from cycdata.train.regimes import take_samples  # the same files (still decoded when read) or tensors, fewer

    return replace(data, train=take_samples(data.train, labeled_subset(labels, count, data.num_classes, generator),
                                            key="data.train_limit"))


def labeled_subset(labels: Tensor, count: int, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """A fixed, class-balanced choice of ``count`` labeled samples (``generator``; None: seed 0, the same for
    every run).

    Example:
        >>> labeled_subset(torch.tensor([0, 1] * 50), 10, 2).numel()
        10
    """
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    per_class = [count // num_classes + (1 if c < count % num_classes else 0) for c in range(num_classes)]
    chosen = []
    for cls, take in enumerate(per_class):
        members = (labels == cls).nonzero().flatten()
        if take > len(members):
            raise ConfigError(
                "semi_supervised.labeled",
                f"asks for {count} labeled samples, but class {cls} has only "
                f"{len(members)}; use at most {len(members) * num_classes}",
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.cat(chosen).sort().values


def crops_whole_images(dataset: object) -> bool:
    """Whether ``dataset`` holds whole images of any size (a ``folder:`` tree, a variable-size ``.beton``),
    which the loader crops per sample from the full image at each batch's strength, before collating."""
    return isinstance(dataset, ImageFileDataset) or bool(getattr(getattr(dataset, "info", None), "variable_size",
                                                                 False))


def resolve_ladder(config: RunConfig, data: DatasetSplits) -> Ladder | None:
    """The run's ladder (``auto``: ``digits`` for 1-channel digit data, ``imagenet`` for whole images of any
    size, else ``default``); None for ``none``."""
    name = config.augment.ladder
    if name == "auto":
        if data.name in ("mnist5k", "digits") or data.in_chans == 1:
            name = "digits"
        else:
            name = "imagenet" if crops_whole_images(data.train) else "default"
    if name == "none":
        return None
    try:
        ladder = load_ladder(name)
    except LadderError as error:
        raise ConfigError("augment.ladder", str(error)) from None
    if ladder.mixes and crops_whole_images(data.train):
        raise ConfigError("augment.ladder", f"{ladder.name} mixes batches (cutmix/mixup), which the per-image path of "
                          f"{data.name} images (cropped from each whole image in the workers) does not do; choose a "
                          "ladder without mix rungs, e.g. imagenet")
    return ladder


def _workers(config: RunConfig, dataset: object) -> int:
    """In-memory datasets are gathered in the main process: worker processes would only add copies."""
    return 0 if hasattr(dataset, "images") else config.data.num_workers


def build_train_loader(config: RunConfig, data: DatasetSplits, runtime: Runtime,
                       plan: Plan | None = None, ladder: Ladder | None = None) -> CyclicalLoader:
    """The training loader: the data knobs of the run's plan (its one clock), rank-aware (the one place a
    CyclicalLoader is built). Whole images of any size get the ``ladder`` here, applied per sample in the
    workers (crops from the full image); other data is augmented on the device by the trainer."""
    options: dict[str, Any] = {
        "plan": Plan.from_config(config) if plan is None else plan,
        # Batch-level self-paced selection is a loss mask in the step: the loader trains on every sample.
        "select_samples": config.self_paced is not None and config.self_paced.level == "epoch",
        "seed": config.seed,
        "shuffle": True,
        "rank": runtime.rank,
        "world_size": runtime.world_size,
        "pin_memory": runtime.device.type == "cuda",
        "ledger_device": runtime.device if runtime.device.type == "cuda" else None,
        "device": runtime.device,
        "min_last_batch": config.data.min_last_batch,
    }
    placement = config.data.placement
    if placement == "auto" and hasattr(data.train, "images"):
        placement = "device" if fits_in_memory(data.train.images.numel(), runtime.device) else "workers"
    options["placement"] = placement
    if placement == "ffcv":
        options["num_workers"] = config.data.num_workers
    elif placement in ("workers", "auto"):
        options["num_workers"] = _workers(config, data.train) if placement == "auto" else config.data.num_workers
        if options["num_workers"] > 0:
            options["persistent_workers"] = True
    sp, ssl = config.self_paced, config.semi_supervised
    if sp is not None:
        options["ledger_ema"] = sp.ema
    if sp is not None and sp.level == "epoch":
        options.update(
            weighting=sp.weighting,
            per_class=sp.per_class,
            refresh_fraction=sp.refresh,
            labels=getattr(data.train, "labels", None),
            policy=sp.policy,
            rescale=sp.rescale,
            max_drop=sp.max_drop,
        )
    if ladder is not None and crops_whole_images(data.train):
        options["ladder"] = ladder
    if ssl is not None:
        labels = getattr(data.train, "labels", None)
        if labels is None:
            raise ConfigError("semi_supervised", f"needs a dataset with in-memory labels; {data.name} has none")
        from cycdata.train.regimes import draw_generator

        options.update(labeled=labeled_subset(labels, ssl.labeled, data.num_classes, draw_generator(config, 0)))
    try:
        return CyclicalLoader(data.train, **options)
    except ValueError as error:  # a placement that cannot serve this dataset
        raise ConfigError("data.placement", str(error)) from None


def build_test_loader(config: RunConfig, data: DatasetSplits, runtime: Runtime) -> BatchLoader:
    """The evaluation loader: every test sample once, in order, split across the ranks."""
    return build_eval_loader(config, data.test, runtime)


def build_eval_loader(config: RunConfig, dataset: Dataset, runtime: Runtime) -> BatchLoader:
    """Every sample of ``dataset`` (the test or the validation split) once, in order, split across the ranks."""
    sampler = ShuffledBatchSampler(
        len(dataset),
        config.data.eval_batch_size,
        shuffle=False,
        pad=False,
        rank=runtime.rank,
        world_size=runtime.world_size,
    )
    # A .beton split is decoded once: evaluation reads every image every epoch anyway.
    dataset = dataset.decoded() if hasattr(dataset, "decoded") else dataset
    return BatchLoader(dataset, sampler, num_workers=_workers(config, dataset),
                       pin_memory=runtime.device.type == "cuda")


class Normalize(nn.Module):
    """uint8 images (or float images in [0, 1]) on the device -> normalized float, done on the device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], channels_last: bool) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("scale", 1.0 / torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, images: Tensor) -> Tensor:
        images = images.to(memory_format=self.memory_format)
        pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return (pixels - self.mean) * self.scale


def build_normalize(config: RunConfig, data: DatasetSplits, runtime: Runtime) -> Normalize:
    """The dataset's normalization on the device, in the model's memory layout."""
    return Normalize(data.mean, data.std, _channels_last(config, runtime)).to(runtime.device)


# --------------------------------------------------------------------------------------------
# The networks and the optimizer
# --------------------------------------------------------------------------------------------


_DOWNLOADING_SOURCES = ("hf-hub",)  # timm model names that fetch a config (and weights) from the network


def check_model(config: RunConfig, data: DatasetSplits) -> None:
    """Refuse a model that cannot be built offline or cannot take the dataset's images, before anything is written.

    The model is built on the meta device (no memory, no weights, the global RNG untouched) and given one
    image of the dataset's shape: a ViT fixed at 224 px fails here on 32 px images, not in the first step.

    Example:
        >>> from cycdata.config import parse_config
        >>> from cycdata.loaders.datasets import load_dataset
        >>> data = load_dataset("synthetic:20")
        >>> try:
        ...     check_model(parse_config({"model": "vit_tiny_patch16_224"}), data)
        ... except ConfigError as error:
        ...     print(str(error).split(" (")[0])
        model: vit_tiny_patch16_224 cannot take synthetic's 3x32x32 images
    """
    import timm

    name = config.model
    source = name.split(":", 1)[0] if ":" in name else ""
    if source in _DOWNLOADING_SOURCES:
        raise ConfigError("model", f"{name!r} would be fetched from the network, and cycdata never downloads; give a "
                          "timm architecture name (timm.list_models()) and load weights with init=FILE")
    if not timm.is_model(name):
        raise ConfigError("model", f"unknown timm model {name!r}; see timm.list_models() for names")
    shape = (1, data.in_chans, data.image_size, data.image_size)
    try:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=data.num_classes, in_chans=data.in_chans).eval()
            with torch.no_grad():
                model(torch.zeros(shape))
    except NotImplementedError:  # an operation without a meta kernel: the check cannot tell, the real run will
        return
    except Exception as error:  # shape and size assertions differ by architecture (AssertionError, RuntimeError, ...)
        if "meta" in str(error):
            return
        raise ConfigError("model", f"{name} cannot take {data.name}'s {data.in_chans}x{data.image_size}x"
                          f"{data.image_size} images ({error}); choose a model for this input size, e.g. resnet18 "
                          "or test_resnet") from None


def build_model(config: RunConfig, data: DatasetSplits) -> nn.Module:
    """The timm model ``config.model`` for the dataset's classes and channels (initialised from the global RNG)."""
    import timm

    check_model(config, data)
    try:
        return timm.create_model(config.model, num_classes=data.num_classes, in_chans=data.in_chans)
    except RuntimeError as error:  # timm's "Unknown model" is a RuntimeError
        raise ConfigError("model", f"{error}; see timm.list_models() for names") from None


def run_dataset(config: RunConfig) -> DatasetSplits:
    """The run's data: ``data.dataset`` at ``data.image_size``, its validation split held out and its training
    regime applied (``data.train_limit``, ``imbalance``, ``label_noise``: :mod:`cycdata.train.regimes`)."""
    from cycdata.train.regimes import prepare_splits

    return prepare_splits(load_dataset(config.data.dataset, image_size=config.data.image_size), config)


def validate_run(config: RunConfig) -> DatasetSplits:
    """Everything ``cycdata train`` checks before it writes anything, for ``plan`` and ``train`` alike.

    Loads the dataset (its path, files and checksums), applies ``data.train_limit`` (at least one sample
    per class), resolves the ladder and checks the model against the data. Returns the run's data.
    """
    data = run_dataset(config)
    resolve_ladder(config, data)
    check_model(config, data)
    check_optimizer(config)
    return data


def build_run_model(config: RunConfig, data: DatasetSplits, runtime: Runtime, *, fresh: bool) -> nn.Module:
    """The run's model on its device: seeded, with ``config.init``'s weights on a ``fresh`` (not resumed) run."""
    torch.manual_seed(config.seed)  # same initial weights on every rank (DDP broadcasts them anyway)
    model = build_model(config, data)
    if config.init is not None and fresh:
        report = load_weights(model, config.init)  # weights only: this run starts its own schedule
        if runtime.is_main:
            print(report.summary(), flush=True)
    model = model.to(runtime.device)
    if _channels_last(config, runtime):
        model = model.to(memory_format=torch.channels_last)
    return model


def build_run_teacher(config: RunConfig, data: DatasetSplits, runtime: Runtime) -> nn.Module | None:
    """The frozen distillation teacher of ``config.distill`` on the device; None without distillation."""
    if config.distill is None:
        return None
    teacher, description = build_teacher(config.distill.teacher, num_classes=data.num_classes,
                                         in_chans=data.in_chans, device=runtime.device)
    if runtime.is_main:
        print(description, flush=True)
    return teacher


def wrap_for_training(model: nn.Module, config: RunConfig, runtime: Runtime) -> nn.Module:
    """The module the steps call: DistributedDataParallel under ``torchrun``, compiled when asked.

    Evaluation and checkpoints keep using the unwrapped ``model`` (its state dict has no ``module.`` prefix).
    """
    wrapped = model
    if runtime.distributed:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
        )
    if config.runtime.compile:
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]
    return wrapped


def timm_optimizer_name(config: RunConfig) -> str:
    """The name timm knows ``optim.name`` by (``sgd`` without ``optim.nesterov`` is timm's ``momentum``)."""
    name = config.optim.name
    return "momentum" if name == "sgd" and not config.optim.nesterov else name


def _momentum_slot(optimizer: torch.optim.Optimizer) -> str | None:
    """Where the optimizer keeps what ``optim.momentum`` drives: ``momentum``, ``betas`` (beta1) or nowhere."""
    defaults = optimizer.defaults
    if "momentum" in defaults:
        return "momentum"
    betas = defaults.get("betas")
    if isinstance(betas, (tuple, list)) and betas and betas[0] is not None:
        return "betas"
    return None


def check_optimizer(config: RunConfig) -> None:
    """Refuse an ``optim.name`` timm does not have (or cannot build here), and a momentum it has no slot for.

    Example:
        >>> from cycdata.config import parse_config
        >>> check_optimizer(parse_config({"optim": {"name": "lamb"}}))
        >>> check_optimizer(parse_config({"optim": {"name": "lamm"}}))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        cycdata.config.ConfigError: optim.name: timm has no optimizer 'lamm' (did you mean lamb, lambw, lambc?); ...
    """
    import difflib

    import timm.optim

    name = timm_optimizer_name(config)
    known = timm.optim.list_optimizers()
    base = name.removeprefix("lookahead_")
    if base not in known:
        close = difflib.get_close_matches(config.optim.name, known, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError("optim.name", f"timm has no optimizer {config.optim.name!r}{hint}; "
                          "timm.optim.list_optimizers() lists them")
    probe = _build_timm_optimizer(nn.Linear(1, 1), name, lr=0.1, weight_decay=0.0, momentum=0.9)
    momentum = config.optim.momentum
    drives_momentum = not isinstance(momentum, Constant) or "optim.momentum" in config.given_keys
    if drives_momentum and _momentum_slot(probe) is None:
        raise ConfigError("optim.momentum", f"timm's {name} has no momentum or beta1 for it to set; leave "
                          "optim.momentum out, or choose an optimizer with one (sgd, adamw, lamb, lars, ...)")


def _build_timm_optimizer(model: nn.Module, name: str, **options: Any) -> torch.optim.Optimizer:
    import timm.optim

    try:
        return timm.optim.create_optimizer_v2(model, opt=name, **options)
    except (ImportError, ModuleNotFoundError) as error:  # bnb*, fused*: optional packages timm imports on demand
        raise ConfigError("optim.name", f"timm's {name} needs a package this environment lacks "
                          f"({' '.join(str(error).split())}); install it or choose another optimizer") from None


def build_optimizer(model: nn.Module, config: RunConfig, plan: Plan) -> torch.optim.Optimizer:
    """timm's optimizer factory for any of its optimizers: biases and norms go to a no-decay group, the rest to
    the decay group; ``optim.momentum`` (its value at the start) goes to SGD-style ``momentum`` or to the
    first of Adam-style ``betas``, the optimizer's other betas kept at timm's defaults.

    Example:
        >>> from cycdata.config import parse_config
        >>> config = parse_config({"optim": {"name": "lamb", "momentum": 0.8}})
        >>> optimizer = build_optimizer(nn.Linear(2, 2), config, Plan.from_config(config))
        >>> type(optimizer).__name__, optimizer.param_groups[0]["betas"]
        ('Lamb', (0.8, 0.999))
    """
    first = plan.at(0)
    knob = plan.knob("optim.weight_decay")
    start = max(knob.ends) if knob.ends else float(first["optim.weight_decay"])
    momentum = float(first.get("optim.momentum", plan.momentum))
    # The initial LR, momentum and weight decay only build the groups; the hooks overwrite them before step 1.
    optimizer = _build_timm_optimizer(model, timm_optimizer_name(config), lr=float(first["optim.lr"]),
                                      weight_decay=start, momentum=momentum)
    if _momentum_slot(optimizer) == "betas":
        for group in optimizer.param_groups:
            if group.get("betas") is not None:
                group["betas"] = (momentum, *tuple(group["betas"])[1:])
    return optimizer


def build_model_ema(config: RunConfig, model: nn.Module) -> nn.Module | None:
    """timm's ``ModelEmaV3`` of ``model`` (on its device) when ``model_ema`` is on; evaluated and checkpointed
    beside the model, updated after every optimizer step."""
    if config.model_ema is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=config.model_ema.decay, use_warmup=config.model_ema.warmup)
