"""The config language: one YAML file per run, every key optional, validated before anything runs.

A *knob* is a number (constant) or a mapping ``{easy: ..., hard: ...}`` with optional ``factor``
(default: the run's ``cyclical_factor``) and ``shape`` (default ``cyclical``); it parses to a
:mod:`cycdata.schedules` object. ``null`` turns an optional feature off (``temperature: null``).

The defaults are the default recipe that ``cycdata train`` runs with no config. Every problem
raises :class:`ConfigError` naming the dotted key, the bad value and what is allowed.

Example:
    >>> cfg = parse_config({"epochs": 10, "optim": {"weight_decay": {"easy": 1e-5, "hard": 8e-5}}})
    >>> cfg.optim.weight_decay
    Cyclical(easy=1e-05, hard=8e-05, factor=2.0, shape='cyclical')
    >>> parse_config({"optim": {"wieght_decay": 0.1}})
    Traceback (most recent call last):
    ...
    cycdata.config.ConfigError: optim.wieght_decay: unknown key (did you mean 'optim.weight_decay'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cycdata.schedules import SHAPES, Constant, Cyclical, Piecewise, Schedule

__all__ = [
    "AugmentConfig",
    "ConfigError",
    "DataConfig",
    "GradClipConfig",
    "LossConfig",
    "OptimConfig",
    "RunConfig",
    "RunStopped",
    "RuntimeConfig",
    "SelfPacedConfig",
    "SemiSupervisedConfig",
    "apply_overrides",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_config",
    "read_yaml",
    "validate_config",
    "with_epochs",
]

#: The longest run a config may ask for: a typo such as ``epochs=100000000`` would otherwise plan (and
#: train) for hours before anyone notices.
MAX_EPOCHS = 100_000
#: Seeds are mixed into per-stream generators; numpy's legacy seeding and most tools stop at 32 bits.
MAX_SEED = 2**32 - 1
#: A config is a handful of small keys: larger or deeper files are not configs (or are attacks on the parser).
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
MAX_YAML_VALUES = 100_000


class ConfigError(ValueError):
    """An invalid config: ``str(error)`` is one line naming the key, the value and the fix."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class RunStopped(ConfigError):
    """A run that cannot go on with this config or setup (the loss diverged, a rank never answered): one
    line and exit 2 like a bad config, printed without "invalid config"."""


# A parser turns the raw YAML value at dotted key ``key`` into a typed value; ``ctx`` carries
# run-wide values (the shared cyclical factor).
Parser = Callable[[str, Any, "Mapping[str, Any]"], Any]


# --------------------------------------------------------------------------------------------
# Scalar parsers
# --------------------------------------------------------------------------------------------


def _bound_text(bound: float) -> str:
    # Integers in full: "<= 4294967295" says exactly what is allowed, "<= 4.29497e+09" does not.
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _describe_bounds(ge: float | None, gt: float | None, le: float | None, lt: float | None) -> str:
    parts = []
    for sign, bound in ((">=", ge), (">", gt), ("<=", le), ("<", lt)):
        if bound is not None:
            parts.append(f"{sign} {_bound_text(bound)}")
    return " and ".join(parts)


def _to_number(key: str, raw: Any, integer: bool) -> float | int:
    kind = "an integer" if integer else "a number"
    if isinstance(raw, bool) or raw is None or isinstance(raw, (list, dict)):
        raise ConfigError(key, f"got {raw!r}, expected {kind}")
    if isinstance(raw, str):
        # YAML 1.1 reads "1e-5" (no dot) as a string; accept what is plainly a number.
        try:
            # An integer key may be written "1e3" too: the integer check below decides.
            raw = int(raw) if integer and raw.strip().lstrip("+-").isdigit() else float(raw)
        except ValueError:
            raise ConfigError(key, f"got {raw!r}, expected {kind}") from None
    if integer:
        if isinstance(raw, float) and raw.is_integer():
            raw = int(raw)
        if not isinstance(raw, int):
            raise ConfigError(key, f"got {raw!r}, expected {kind}")
        return raw
    value = float(raw)
    if not math.isfinite(value):
        raise ConfigError(key, f"got {raw!r}, expected a finite number")
    return value


def number(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    integer: bool = False,
) -> Parser:
    """A parser for a number (or integer) within bounds."""

    def parse(key: str, raw: Any, ctx: Mapping[str, Any]) -> float | int:
        value = _to_number(key, raw, integer)
        ok = (
            (ge is None or value >= ge)
            and (gt is None or value > gt)
            and (le is None or value <= le)
            and (lt is None or value < lt)
        )
        if not ok:
            raise ConfigError(key, f"got {raw!r}, must be {_describe_bounds(ge, gt, le, lt)}")
        return value

    return parse


def choice(*options: str) -> Parser:
    """A parser for one string out of ``options``."""

    def parse(key: str, raw: Any, ctx: Mapping[str, Any]) -> str:
        if raw not in options:
            hint = _did_you_mean(str(raw), options)
            raise ConfigError(key, f"got {raw!r}, must be one of: {', '.join(options)}{hint}")
        return raw

    return parse


def optimizer_name(key: str, raw: Any, ctx: Mapping[str, Any]) -> str:
    """An optimizer name as timm spells them (``sgd``, ``adamw``, ``lamb``, ``lookahead_adamw``); whether timm
    has it is checked when the run is built (timm is not imported to read a config)."""
    if not isinstance(raw, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", raw):
        raise ConfigError(key, f"got {raw!r}, expected a timm optimizer name such as sgd, adamw or lamb "
                               "(lower case; timm.optim.list_optimizers() lists them)")
    return raw


def text(key: str, raw: Any, ctx: Mapping[str, Any]) -> str:
    if not isinstance(raw, str) or not raw:
        raise ConfigError(key, f"got {raw!r}, expected a non-empty string")
    return raw


def boolean(key: str, raw: Any, ctx: Mapping[str, Any]) -> bool:
    if not isinstance(raw, bool):
        raise ConfigError(key, f"got {raw!r}, expected true or false")
    return raw


def optional(parser: Parser) -> Parser:
    """``null`` means off; anything else goes to ``parser``."""

    def parse(key: str, raw: Any, ctx: Mapping[str, Any]) -> Any:
        if raw is None:
            return None
        try:
            return parser(key, raw, ctx)
        except ConfigError as error:
            if "must be > 0" not in str(error):
                raise
            # The reference code turns a feature off with 0 (--T_min 0); here that is null.
            message = str(error).removeprefix(f"{error.key}: ")
            raise ConfigError(error.key, f"{message}; to turn {key} off, set {key}: null") from None

    return parse


def _did_you_mean(word: str, known: Iterable[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""


# --------------------------------------------------------------------------------------------
# Knobs
# --------------------------------------------------------------------------------------------

_KNOB_KEYS = ("easy", "hard", "factor", "shape", "value", "points")


def knob(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    integer: bool = False,
) -> Parser:
    """A parser for a knob: a number, ``{value: v}``, ``{easy, hard, factor?, shape?}`` or ``{points: [[t, v], ...]}``
    (straight lines through the points over the run's progress t ∈ [0, 1], flat outside; two points at one t
    make a step)."""
    bound = number(ge=ge, gt=gt, le=le, lt=lt, integer=integer)

    def parse(key: str, raw: Any, ctx: Mapping[str, Any]) -> Schedule:
        if not isinstance(raw, Mapping):
            if isinstance(raw, (list, tuple)) or raw is None:
                raise ConfigError(key, f"got {raw!r}, expected a number or a mapping {{easy: ..., hard: ...}}")
            return Constant(bound(key, raw, ctx))
        for name in raw:
            if name not in _KNOB_KEYS:
                raise ConfigError(
                    f"{key}.{name}",
                    f"unknown knob key{_did_you_mean(str(name), _KNOB_KEYS, key + '.')}; "
                    "a knob takes easy, hard, factor, shape (or value, or points)",
                )
        if "points" in raw:
            return _points_knob(key, raw, bound, ctx)
        if "value" in raw:
            if len(raw) > 1:
                raise ConfigError(key, "a constant knob {value: ...} takes no easy/hard/factor/shape")
            return Constant(bound(f"{key}.value", raw["value"], ctx))
        missing = [end for end in ("easy", "hard") if end not in raw]
        if missing:
            raise ConfigError(key, f"a cyclical knob needs both 'easy' and 'hard'; missing {' and '.join(missing)!s}")
        easy = bound(f"{key}.easy", raw["easy"], ctx)
        hard = bound(f"{key}.hard", raw["hard"], ctx)
        factor = number(ge=1)(f"{key}.factor", raw.get("factor", ctx["cyclical_factor"]), ctx)
        shape = choice(*sorted(SHAPES))(f"{key}.shape", raw.get("shape", "cyclical"), ctx)
        return Cyclical(easy=easy, hard=hard, factor=factor, shape=shape)

    return parse


def _points_knob(key: str, raw: Mapping[str, Any], bound: Parser, ctx: Mapping[str, Any]) -> Piecewise:
    """``{points: [[t, v], ...]}``: t in [0, 1], in order; each v within the knob's bounds."""
    if len(raw) > 1:
        raise ConfigError(key, "a knob {points: [[t, v], ...]} takes no easy/hard/factor/shape/value")
    points = raw["points"]
    if not isinstance(points, (list, tuple)) or not points:
        raise ConfigError(f"{key}.points", f"got {points!r}, expected a list of [t, value] pairs, e.g. "
                          "[[0, 0.57], [0.9, 0.57], [0.9, 1.0]]")
    pairs = []
    for number_, point in enumerate(points):
        where = f"{key}.points[{number_}]"
        if not isinstance(point, (list, tuple)) or len(point) != 2:
            raise ConfigError(where, f"got {point!r}, expected a pair [t, value] with t in [0, 1]")
        t = number(ge=0, le=1)(f"{where}[0]", point[0], ctx)
        if pairs and t < pairs[-1][0]:
            raise ConfigError(where, f"t = {t:g} comes after t = {pairs[-1][0]:g}: give the points in order of t")
        pairs.append((t, bound(f"{where}[1]", point[1], ctx)))
    return Piecewise(tuple(pairs))


def knob_range(schedule: Schedule | None) -> tuple[float, float] | None:
    """The (easy, hard) ends of a knob, or (v, v) for a constant; None when off."""
    if schedule is None:
        return None
    if isinstance(schedule, Cyclical):
        return schedule.easy, schedule.hard
    if isinstance(schedule, Constant):
        return schedule.value, schedule.value
    return None


DEVICE_FORMS = "auto, cpu, cuda, cuda:N"


def device(key: str, raw: Any, ctx: Mapping[str, Any]) -> str:
    """Validate ``runtime.device``: torch would only fail on a bad name when training starts."""
    if isinstance(raw, str) and re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", raw):
        return raw
    raise ConfigError(key, f"got {raw!r}, must be one of: {DEVICE_FORMS}")


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

DATASETS_WITHOUT_ARGUMENT = ("mnist5k", "digits")
DATASETS_WITH_PATH = ("cifar10", "cifar100", "folder", "beton")
DATASET_FORMS = "mnist5k, digits, cifar10:PATH, cifar100:PATH, folder:PATH, beton:PATH, synthetic:N"


def dataset(key: str, raw: Any, ctx: Mapping[str, Any]) -> str:
    """Validate a dataset spec such as ``mnist5k``, ``cifar10:/data/cifar`` or ``synthetic:1000``."""
    if not isinstance(raw, str) or not raw:
        raise ConfigError(key, f"got {raw!r}, expected one of: {DATASET_FORMS}")
    scheme, _, argument = raw.partition(":")
    known = (*DATASETS_WITHOUT_ARGUMENT, *DATASETS_WITH_PATH, "synthetic")
    if scheme not in known:
        raise ConfigError(
            key, f"unknown dataset scheme {scheme!r}{_did_you_mean(scheme, known)}; allowed: {DATASET_FORMS}"
        )
    if scheme in DATASETS_WITHOUT_ARGUMENT and argument:
        raise ConfigError(key, f"{scheme!r} takes no argument, got {raw!r}")
    if scheme in DATASETS_WITH_PATH and not argument:
        raise ConfigError(key, f"{scheme!r} needs a path, e.g. '{scheme}:/data/{scheme}'")
    if scheme == "synthetic" and not re.fullmatch(r"[1-9][0-9]*", argument):
        raise ConfigError(key, f"got {raw!r}; synthetic needs a positive sample count, e.g. 'synthetic:1000'")
    return raw


# --------------------------------------------------------------------------------------------
# The schema: dataclasses whose field metadata holds the parser
# --------------------------------------------------------------------------------------------


def key(parser: Parser, default: Any, doc: str = "") -> Any:
    """A config field: its parser, its default (the default recipe) and a one-line doc."""
    return field(default=default, metadata={"parse": parser, "doc": doc})


def section(cls: type, default_on: bool = True, doc: str = "") -> Any:
    """A nested section; ``default_on=False`` makes it optional and off unless configured."""
    factory = cls if default_on else (lambda: None)
    return field(default_factory=factory, metadata={"section": cls, "optional": not default_on, "doc": doc})


@dataclass(frozen=True)
class DataConfig:
    dataset: str = key(dataset, "mnist5k", "dataset spec: " + DATASET_FORMS)
    batch_size: Schedule = key(knob(gt=0, integer=True), Constant(128), "training batch size (cyclical batch size)")
    train_limit: int | None = key(optional(number(gt=0, integer=True)), None,
                                  "train on a fixed, class-balanced subset of this many samples (limited-data studies)")
    val_split: float = key(number(ge=0, lt=0.5), 0.0,
                           "share of the training split held out (stratified) as the validation split: best.pt and "
                           "every tuned choice are made on it, and the test split is read only at the last epoch")
    label_noise: float = key(number(ge=0, lt=0.9), 0.0,
                             "symmetric label noise: this share of the training (and validation) labels changed to "
                             "another class at random")
    imbalance: float = key(number(ge=1), 1.0, "long-tailed class imbalance, largest : smallest class (e.g. 20); "
                           "class c keeps n_max·ratio^(−c/(K−1)) training samples")
    test: bool = key(boolean, True, "evaluate the test split (every epoch; at the last one only with a validation "
                     "split); false: never (tuning runs, which choose on validation), needs data.val_split")
    draw_seed: int | None = key(optional(number(ge=0, integer=True)), 0,
                                "seed of the subset, the split and the noise; null: the run's seed (each seed "
                                "redraws them)")
    min_last_batch: float = key(number(ge=0, le=1), 0.25,
                                "a training epoch's last batch smaller than this share of the batch joins the batch "
                                "before (BatchNorm's statistics of a 2-sample batch can wreck a run); 0: only a "
                                "single sample does")
    eval_batch_size: int = key(number(gt=0, integer=True), 500, "batch size for evaluation")
    image_size: int | None = key(optional(number(ge=8, le=2048, integer=True)), None,
                                 "the image side the model sees (training crops; evaluation resizes and centre-crops); "
                                 "null: the dataset's own (folder: 64)")
    num_workers: int = key(number(ge=0, integer=True), 2, "DataLoader worker processes (ffcv: decoding threads)")
    placement: str = key(choice("auto", "device", "workers", "ffcv"), "auto",
                         "where batches come from: device-resident tensors, DataLoader workers, ffcv (.beton); "
                         "auto picks the fastest that fits")
    lr_coupling: str = key(choice("none", "linear", "sqrt"), "none", "LR scaling when the batch size cycles")


@dataclass(frozen=True)
class OptimConfig:
    name: str = key(optimizer_name, "sgd", "any timm optimizer (timm.optim.list_optimizers()): sgd (Nesterov with "
                    "optim.nesterov), adamw, adam, lamb, lars, adabelief, ...")
    accumulate: int = key(number(ge=1, le=1024, integer=True), 1,
                          "gradient accumulation: one optimizer step every K batches (the knobs advance per step)")
    lr: Schedule = key(knob(gt=0), Constant(0.1), "learning rate: a number is the peak of optim.sched; "
                       "{easy: small, hard: large} is a cyclical LR (after the warmup)")
    momentum: Schedule = key(knob(ge=0, lt=1), Constant(0.9),
                             "SGD momentum (Adam: beta1); cyclical: {easy: small, hard: large}")
    nesterov: bool = key(boolean, True, "Nesterov momentum for SGD")
    weight_decay: Schedule = key(knob(ge=0), Cyclical(5e-5, 1e-3), "weight decay of decayed param groups (CWD)")
    sched: str = key(choice("cosine", "linear", "constant"), "cosine", "learning-rate schedule over the run")
    warmup_epochs: float = key(number(ge=0), 1.0, "linear LR warmup, in epochs")
    warmup_lr: float | None = key(optional(number(ge=0)), None,
                                  "the LR the warmup starts from (timm's --warmup-lr); null: a tenth of the peak")
    min_lr: float = key(number(ge=0), 0.0, "final learning rate of cosine/linear")


@dataclass(frozen=True)
class GradClipConfig:
    threshold: Schedule = Constant(1.0)
    mode: str = "norm"


CLIP_MODES = ("norm", "value", "agc")


def grad_clip(key_name: str, raw: Any, ctx: Mapping[str, Any]) -> GradClipConfig:
    """``grad_clip: 1.0`` or ``{easy: 0.5, hard: 2.0, mode: norm}``: a knob plus a clip mode."""
    mode = "norm"
    if isinstance(raw, Mapping):
        raw = dict(raw)
        mode = choice(*CLIP_MODES)(f"{key_name}.mode", raw.pop("mode", "norm"), ctx)
    threshold = knob(gt=0)(key_name, raw, ctx)
    return GradClipConfig(threshold=threshold, mode=mode)


@dataclass(frozen=True)
class LossConfig:
    """The training loss. Label smoothing defaults to 0 for ce (with CST's T = 0.5 at the easy
    ends, smoothing leaves the untempered model badly underconfident) and to the reference's 0.1
    for the cyclical focal loss."""

    name: str = key(choice("ce", "cyclical_focal"), "ce", "training loss")
    label_smoothing: float | None = key(optional(number(ge=0, lt=1)), None,
                                        "label smoothing (CFL's eps); default 0 for ce, 0.1 for cyclical_focal")
    gamma_pos: float = key(number(ge=0), 0.0, "CFL focal exponent of the target class")
    gamma_neg: float = key(number(ge=0), 4.0, "CFL focal exponent of the other classes")
    gamma_hc: float = key(number(ge=0), 0.0, "CFL high-confidence exponent")
    factor: float | None = key(optional(number(ge=1)), None, "CFL cyclical factor (default: cyclical_factor)")

    @property
    def smoothing(self) -> float:
        """The label smoothing in effect."""
        if self.label_smoothing is not None:
            return self.label_smoothing
        return 0.1 if self.name == "cyclical_focal" else 0.0


LADDERS = ("auto", "none", "flips", "default", "digits", "imagenet")


def ladder(key_name: str, raw: Any, ctx: Mapping[str, Any]) -> str:
    """A built-in ladder name, or a ladder YAML file that exists (so ``plan`` refuses what ``train`` would)."""
    if isinstance(raw, str) and raw in LADDERS:
        return raw
    if isinstance(raw, str) and raw.endswith((".yaml", ".yml")):
        if not Path(raw).is_file():
            state = "is a folder" if Path(raw).is_dir() else "does not exist"
            raise ConfigError(key_name, f"the ladder file {raw} {state}; give a ladder .yaml file or a built-in "
                              f"ladder ({', '.join(LADDERS)})")
        return raw
    raise ConfigError(
        key_name,
        f"got {raw!r}, must be a built-in ladder ({', '.join(LADDERS)}) or a .yaml file"
        f"{_did_you_mean(str(raw), LADDERS)}",
    )


@dataclass(frozen=True)
class AugmentConfig:
    ladder: str = key(ladder, "auto", "augmentation-strength ladder: a name, a YAML file, or auto (digits for "
                      "1-channel digit datasets, default otherwise)")
    strength: Schedule = key(knob(ge=0, le=1), Cyclical(0.0, 1.0), "ladder strength in [0, 1]")


@dataclass(frozen=True)
class SelfPacedConfig:
    keep: Schedule | None = key(optional(knob(gt=0, le=1)), Cyclical(0.5, 1.0), "kept fraction of lowest-loss samples")
    threshold: Schedule | None = key(optional(knob(gt=0)), None, "absolute loss threshold (instead of keep)")
    weighting: str = key(choice("hard", "linear", "log", "mixture"), "hard", "self-paced weighting (SPEC.md §10)")
    per_class: bool = key(boolean, False, "select within each class so no class vanishes")
    level: str = key(choice("epoch", "batch"), "epoch",
                     "epoch: the sampler selects samples; batch: a loss mask inside each batch")
    refresh: float = key(number(ge=0, le=1), 0.05, "share of excluded samples re-admitted each epoch (stale losses)")
    ema: float | None = key(optional(number(ge=0, lt=1)), None,
                            "loss-ledger smoothing: new = ema·old + (1 − ema)·loss; null keeps the latest loss")
    policy: str = key(choice("easy_first", "prune"), "easy_first",
                      "easy_first: train on the lowest-loss keep share (the paper's self-paced learning); prune: "
                      "drop well-learned samples at random down to the keep share, rescaled (InfoBatch)")
    rescale: bool = key(boolean, True, "prune: weigh kept well-learned samples by 1/keep-probability (unbiased)")
    max_drop: float = key(number(gt=0, lt=1), 0.5,
                          "prune: the largest share of the well-learned (below-mean loss) samples dropped; the pool "
                          "widens by loss rank when the budget needs more")
    ledger: str = key(choice("tempered", "plain"), "tempered",
                      "the loss the ledger records and selection ranks: tempered (on z/T, the trained loss) or "
                      "plain (on z, comparable across CST's temperatures)")


@dataclass(frozen=True)
class SemiSupervisedConfig:
    labeled: int = key(number(gt=0, integer=True), 100, "number of labeled training samples")
    ratio: Schedule = key(knob(ge=0), Cyclical(0.0, 7.0), "unlabeled samples per labeled one")
    confidence: float = key(number(gt=0, le=1), 0.95, "pseudo-label confidence threshold")
    weight: float = key(number(ge=0), 1.0, "weight of the consistency loss")


@dataclass(frozen=True)
class ModelEmaConfig:
    decay: float = key(number(gt=0, lt=1), 0.9998, "EMA decay per optimizer step (timm's ModelEmaV3)")
    warmup: bool = key(boolean, False, "timm's EMA warmup: a smaller decay over the first steps")


@dataclass(frozen=True)
class CycleConfig:
    start: float = key(number(ge=0, lt=1), 0.0, "where in the easy→hard→easy cycle this run starts (0..1)")
    end: float = key(number(gt=0, le=1), 1.0, "where it ends: 0→0.5 pre-trains easy→hard, 0.5→1 fine-tunes hard→easy")


@dataclass(frozen=True)
class DistillConfig:
    teacher: str = key(text, "", "a cycdata checkpoint (last.pt, best.pt or its run folder), or MODEL:WEIGHTS "
                       "(a timm model name and a weights file on disk)")
    weight: Schedule = key(knob(ge=0, le=1), Constant(0.5),
                           "share of the distillation term: (1 − w)·label loss + w·T²·KL(teacher ‖ student)")
    temperature: Schedule = key(knob(gt=0), Cyclical(1.0, 4.0),
                                "distillation temperature T: easy = low (sharp teacher), hard = high (soft)")


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = key(device, "auto", DEVICE_FORMS)
    amp: bool = key(boolean, True, "bf16 autocast on GPU")
    channels_last: bool = key(boolean, True, "channels_last memory format on GPU")
    compile: bool = key(boolean, False, "torch.compile the model")
    log_every: int = key(number(gt=0, integer=True), 20, "progress-bar loss refresh interval in steps")
    progress: bool = key(boolean, True, "per-epoch progress bar on a terminal (the summary line is always printed)")
    log_steps: int | None = key(optional(number(gt=0, integer=True)), None,
                                "also print one line every N training steps (epoch, step, mean loss so far, LR); "
                                "null: one line per epoch")


@dataclass(frozen=True)
class RunConfig:
    epochs: int = key(number(ge=2, le=MAX_EPOCHS, integer=True), 20, "epochs the run (and the cycle) spans")
    cyclical_factor: float = key(number(ge=1), 2.0, "shared cyclical factor (1 = ramp, 2 = easy-hard-easy)")
    seed: int = key(number(ge=0, le=MAX_SEED, integer=True), 0, "random seed")
    model: str = key(text, "resnet10t", "any timm model name")
    init: str | None = key(optional(text), None, "initial weights: a checkpoint, run folder or weights file "
                           "(weights only; a head of another size is re-initialised)")
    schedule_unit: str = key(choice("epoch", "step"), "epoch", "knobs change per epoch (reference) or per step")
    normalization: str = key(choice("reference", "paper"), "reference", "t = e/(E-1) (reference) or e/E (paper)")
    data: DataConfig = section(DataConfig)
    optim: OptimConfig = section(OptimConfig)
    temperature: Schedule | None = key(optional(knob(gt=0)), Cyclical(0.5, 2.0), "softmax temperature (CST)")
    grad_clip: GradClipConfig | None = key(
        optional(grad_clip), GradClipConfig(Cyclical(0.5, 2.0)), "gradient-clip threshold (CGC) and mode"
    )
    loss: LossConfig = section(LossConfig)
    augment: AugmentConfig = section(AugmentConfig)
    self_paced: SelfPacedConfig | None = section(SelfPacedConfig, default_on=False)
    semi_supervised: SemiSupervisedConfig | None = section(SemiSupervisedConfig, default_on=False)
    couple: str = key(choice("none", "noise_scale"), "none",
                      "noise_scale: set the LR so that LR·N/(B·(1 − momentum)) stays at its start while the batch "
                      "size and momentum cycle (SGD; overrides data.lr_coupling)")
    cycle: CycleConfig = section(CycleConfig)
    distill: DistillConfig | None = section(DistillConfig, default_on=False)
    model_ema: ModelEmaConfig | None = section(ModelEmaConfig, default_on=False)
    runtime: RuntimeConfig = section(RuntimeConfig)
    # Not a config key: the dotted keys the parsed mapping set (``optim.lr``, ``optim``, ...), so an explicit
    # ``optim.lr: 0.1`` can be told from the default recipe's (CyclicalHooks drives the LR only then). A config
    # built in code rather than parsed sets none. Never read from or written to YAML; not compared.
    given_keys: frozenset[str] = field(default=frozenset(), compare=False, repr=False, metadata={"provenance": True})


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _parse_section(cls: type, raw: Any, prefix: str, ctx: Mapping[str, Any], given: set[str] | None = None) -> Any:
    where = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"got {raw!r}, expected a mapping of keys")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("provenance")}
    for name in raw:
        if name not in fields:
            raise ConfigError(f"{prefix}{name}", f"unknown key{_did_you_mean(str(name), fields, prefix)}")
    values = {}
    for name, spec in fields.items():
        if name not in raw:
            continue
        dotted = f"{prefix}{name}"
        if given is not None:
            given.add(dotted)
        if "section" in spec.metadata:
            if raw[name] is None and spec.metadata["optional"]:
                values[name] = None
            else:
                values[name] = _parse_section(spec.metadata["section"], raw[name], dotted + ".", ctx, given)
        else:
            values[name] = spec.metadata["parse"](dotted, raw[name], ctx)
    return cls(**values)


def _ends_of(value: Any) -> dict[str, Any]:
    """The easy and hard ends a knob's raw value or default holds (a number holds both)."""
    value = getattr(value, "threshold", value)  # grad_clip's default is a GradClipConfig
    if isinstance(value, Cyclical):
        return {"easy": value.easy, "hard": value.hard}
    if isinstance(value, Constant):
        return {"easy": value.value, "hard": value.value}
    if isinstance(value, Mapping):
        return {end: value[end] for end in ("easy", "hard") if end in value}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"easy": value, "hard": value}
    return {}


def _default_of(dotted: str) -> Any:
    """The default recipe's value at a dotted key, or None where there is none."""
    cls: Any = RunConfig
    value: Any = None
    for name in dotted.split("."):
        found = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if name not in found:
            return None
        spec = found[name]
        if "section" in spec.metadata:
            cls = spec.metadata["section"]
            value = cls
        else:
            cls, value = None, spec.default
    return value


def _fill_one_end(raw: Mapping[str, Any], merged: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """An override of one end alone (``temperature.easy=0.3``) keeps the other end: the config file's, else
    the default recipe's.

    Example:
        >>> _fill_one_end({}, {"temperature": {"easy": 0.3}}, ["temperature.easy=0.3"])
        {'temperature': {'easy': 0.3, 'hard': 2.0}}
    """
    for item in overrides:
        dotted = item.partition("=")[0].strip()
        parent, _, end = dotted.rpartition(".")
        if end not in ("easy", "hard") or not parent:
            continue
        *path, name = parent.split(".")
        node: Any = merged
        file_node: Any = raw
        for part in path:
            node = node.get(part) if isinstance(node, Mapping) else None
            file_node = file_node.get(part) if isinstance(file_node, Mapping) else None
        knob_value = node.get(name) if isinstance(node, Mapping) else None
        if not isinstance(knob_value, dict) or "value" in knob_value:
            continue
        other = "hard" if end == "easy" else "easy"
        if other in knob_value:
            continue
        given = file_node.get(name) if isinstance(file_node, Mapping) else None
        source = _ends_of(given) if given is not None else _ends_of(_default_of(parent))
        if other in source:
            knob_value[other] = source[other]
    return merged


def _check_consistency(config: RunConfig) -> None:
    """Rules that involve more than one key."""
    if config.cycle.start >= config.cycle.end:
        raise ConfigError("cycle", f"start ({config.cycle.start}) must be below end ({config.cycle.end}); "
                          "e.g. {start: 0.0, end: 0.5} to pre-train, {start: 0.5, end: 1.0} to fine-tune")
    if config.couple == "noise_scale":
        if config.optim.name != "sgd":
            raise ConfigError("couple", f"noise_scale is the SGD noise scale LR·N/(B·(1 − m)); optim.name is "
                              f"{config.optim.name!r}: use sgd or couple: none")
        if config.data.lr_coupling != "none":
            raise ConfigError("couple", f"noise_scale sets the LR from the batch size and momentum itself; "
                              f"data.lr_coupling is {config.data.lr_coupling!r}: set it to none")
        if not isinstance(config.optim.lr, Constant):
            raise ConfigError("couple", "noise_scale derives the LR from the batch size and momentum; a cyclical "
                              "optim.lr conflicts with it: give optim.lr as a number (the starting LR)")
    if not config.data.test and config.data.val_split == 0:
        raise ConfigError("data.test", "false leaves the run nothing to evaluate: hold out a validation split "
                          "(data.val_split, e.g. 0.1) or set data.test: true")
    if config.distill is not None and not config.distill.teacher:
        raise ConfigError("distill.teacher", "is required: a checkpoint file or run folder, or MODEL:WEIGHTS")
    _check_lr_run(config)
    sp = config.self_paced
    if sp is not None and (sp.keep is None) == (sp.threshold is None):
        raise ConfigError(
            "self_paced",
            "set exactly one of self_paced.keep (a fraction) or self_paced.threshold "
            "(a loss value); use 'keep: null' to select by threshold",
        )
    if sp is not None and sp.policy == "prune":
        _check_pruning(config, sp)


def _check_pruning(config: RunConfig, sp: SelfPacedConfig) -> None:
    """Pruning needs an exact budget (keep), its own weights (hard weighting), the epoch level and a shorter epoch."""
    if sp.keep is None:
        raise ConfigError("self_paced.threshold", "policy prune trains on an exact share of the data each epoch: "
                          "give self_paced.keep (e.g. 0.6) and threshold: null")
    if sp.weighting != "hard":
        raise ConfigError("self_paced.weighting", f"got {sp.weighting!r}; policy prune's weights are the inverse "
                          "keep probabilities: use weighting: hard")
    if sp.level != "epoch":
        raise ConfigError("self_paced.level", "policy prune shortens the epoch in the sampler: use level: epoch")
    if config.semi_supervised is not None:
        raise ConfigError("self_paced.policy", "prune saves passes by shortening the epoch, but a semi-supervised "
                          "epoch has a fixed step count: use policy: easy_first, or drop semi_supervised")


def _check_lr_run(config: RunConfig) -> None:
    """The LR schedule must fit the run: a warmup within it, and a decay that goes down."""
    optim = config.optim
    if optim.warmup_epochs >= config.epochs:
        raise ConfigError("optim.warmup_epochs", f"got {optim.warmup_epochs:g}, must be below epochs "
                          f"({config.epochs}): the warmup would fill the whole run; e.g. optim.warmup_epochs=1")
    if optim.warmup_lr is not None:
        if optim.warmup_epochs == 0:
            raise ConfigError("optim.warmup_lr", f"got {optim.warmup_lr:g} with optim.warmup_epochs=0: there is no "
                              "warmup to start; set optim.warmup_epochs (e.g. 1) or optim.warmup_lr=null")
        peak = max(knob_range(optim.lr) or (float(optim.lr(0.0)),) * 2)
        if optim.warmup_lr > peak:
            raise ConfigError("optim.warmup_lr", f"got {optim.warmup_lr:g}, above the LR it warms up to "
                              f"({peak:g}); give a smaller start, e.g. optim.warmup_lr={peak / 10:g}")
    decays = isinstance(optim.lr, Constant) and optim.sched != "constant"
    if decays and optim.min_lr > optim.lr.value:
        raise ConfigError("optim.min_lr", f"got {optim.min_lr:g}, above optim.lr ({optim.lr.value:g}): the LR would "
                          f"climb over the run; give optim.min_lr <= optim.lr, e.g. 0")


def validate_config(config: RunConfig) -> RunConfig:
    """Check the rules that involve more than one key (a config built or changed in code); returns it.

    Example:
        >>> import dataclasses
        >>> config = parse_config({"optim": {"lr": 0.1}})
        >>> validate_config(dataclasses.replace(config, optim=dataclasses.replace(config.optim, min_lr=0.5)))
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        cycdata.config.ConfigError: optim.min_lr: got 0.5, above optim.lr (0.1): the LR would climb over the run; ...
    """
    _check_consistency(config)
    return config


def with_epochs(config: RunConfig, epochs: Any) -> RunConfig:
    """``config`` over another number of epochs, validated as if ``epochs`` had been in the file.

    Example:
        >>> with_epochs(parse_config({}), 5).epochs
        5
        >>> with_epochs(parse_config({}), 10**9)
        Traceback (most recent call last):
        ...
        cycdata.config.ConfigError: epochs: got 1000000000, must be >= 2 and <= 100000
    """
    parse = next(f.metadata["parse"] for f in dataclasses.fields(RunConfig) if f.name == "epochs")
    return validate_config(dataclasses.replace(config, epochs=parse("epochs", epochs, {})))


def parse_config(raw: Mapping[str, Any] | None) -> RunConfig:
    """Validate a raw mapping (from YAML) into a :class:`RunConfig`.

    Example:
        >>> parse_config({"epochs": 1})
        Traceback (most recent call last):
        ...
        cycdata.config.ConfigError: epochs: got 1, must be >= 2 and <= 100000
    """
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ConfigError("config", f"the top level must be a mapping of keys, got {type(raw).__name__}")
    default_factor = RunConfig.cyclical_factor
    factor = raw.get("cyclical_factor", default_factor)
    ctx = {"cyclical_factor": number(ge=1)("cyclical_factor", factor, {})}
    given: set[str] = set()
    config = _parse_section(RunConfig, raw, "", ctx, given)
    config = _with_shared_factor(config, ctx["cyclical_factor"], given, "")
    config = dataclasses.replace(config, given_keys=frozenset(given))
    _check_consistency(config)
    return config


def _with_shared_factor(section: Any, factor: float, given: set[str], prefix: str) -> Any:
    """Defaulted cyclical knobs follow the run's ``cyclical_factor``, as the knobs a config writes do.

    Example:
        >>> parse_config({"cyclical_factor": 1}).temperature.factor
        1.0
    """
    changes = {}
    for spec in dataclasses.fields(section):
        value, dotted = getattr(section, spec.name), f"{prefix}{spec.name}"
        if isinstance(value, Cyclical) and dotted not in given and value.factor != factor:
            changes[spec.name] = dataclasses.replace(value, factor=factor)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[spec.name] = _with_shared_factor(value, factor, given, dotted + ".")
    return dataclasses.replace(section, **changes) if changes else section


def apply_settings(raw: Mapping[str, Any] | None, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys to already-parsed values (a suite's variants), on a copy of ``raw``.

    Example:
        >>> apply_settings({"optim": {"lr": 0.1}}, {"optim.lr": 0.05, "temperature": None})
        {'optim': {'lr': 0.05}, 'temperature': None}
    """
    result: dict[str, Any] = _deep_copy(raw or {})
    for dotted, value in settings.items():
        _set_dotted(result, str(dotted), _deep_copy(value) if isinstance(value, Mapping) else value)
    return result


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            if isinstance(child, (int, float)) and parts[depth + 1] in _KNOB_KEYS:
                child = node[part] = {}  # a constant knob becomes a mapping: knob.easy=...
            else:
                raise ConfigError(dotted, f"cannot set a sub-key: '{'.'.join(parts[: depth + 1])}' is {child!r}")
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: Mapping[str, Any] | None, overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` overrides (dotted keys, YAML values) to a raw config mapping.

    Example:
        >>> apply_overrides({"optim": {"lr": 0.1}}, ["optim.lr=0.05", "epochs=5"])
        {'optim': {'lr': 0.05}, 'epochs': 5}
    """
    result: dict[str, Any] = _deep_copy(raw or {})
    for item in overrides:
        dotted, sep, text_value = item.partition("=")
        if not sep or not dotted or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", dotted):
            raise ConfigError("override", f"got {item!r}, expected KEY=VALUE with a dotted key, e.g. optim.lr=0.05")
        try:
            value = _load_yaml(text_value) if text_value else None
        except (_DuplicateKeyError, _ShapeError) as error:
            raise ConfigError(dotted, f"in {item!r}{_yaml_problem(error)}") from None
        except yaml.YAMLError:
            value = text_value  # not YAML: the plain string (a path, a name with a colon)
        _set_dotted(result, dotted, value)
    return result


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names a key twice: plain YAML keeps the last silently, so a config would lose a setting."""


class _ShapeError(yaml.YAMLError):
    """A document nested or aliased beyond anything a config needs (a YAML bomb, or not a config)."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (plain data, never code) that also refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges are meant to be overridden by the keys beside them
            name = self.construct_object(key_node, deep=True)
            try:
                if name in first_line:
                    raise _DuplicateKeyError(None, None, f"duplicate key {name!r} (first at line {first_line[name]}); "
                                             "keep one of them", key_node.start_mark)
                first_line[name] = key_node.start_mark.line + 1
            except TypeError:
                pass  # an unhashable key: the base constructor reports it
        return super().construct_mapping(node, deep=deep)


def _check_shape(data: Any) -> None:
    """Refuse documents deeper than MAX_YAML_DEPTH or with more nodes than a config could hold.

    Walked without recursion and with a budget: aliases can make a small file expand into billions of
    nodes, which copying the config would then try to build.
    """
    budget = MAX_YAML_VALUES
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        budget -= 1
        if budget < 0:
            raise _ShapeError(f"expands to more than {MAX_YAML_VALUES} values (aliases?); a config is a few keys")
        if depth > MAX_YAML_DEPTH:
            raise _ShapeError(f"nested deeper than {MAX_YAML_DEPTH} levels; a config is a few levels of keys")
        children = node.values() if isinstance(node, Mapping) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)


def _load_yaml(source: str) -> Any:
    """Parse YAML text as plain data; raises :class:`yaml.YAMLError` for anything that is not a sane document."""
    try:
        data = yaml.load(source, Loader=_StrictLoader)  # a SafeLoader subclass: no code runs
    except RecursionError:
        raise _ShapeError(f"nested deeper than {MAX_YAML_DEPTH} levels; a config is a few levels of keys") from None
    _check_shape(data)
    return data


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: where the YAML went wrong and what the problem is."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{where}: {problem}"


def _read_text(path: Path, key: str) -> str:
    """The file's text, refusing what cannot be a YAML config: folders, devices, huge or binary files."""
    try:
        if path.is_dir():
            raise ConfigError(key, f"{path} is a folder; give a YAML file")
        if not path.exists():
            raise ConfigError(key, f"file not found: {path}")
        if not path.is_file():
            raise ConfigError(key, f"{path} is not a regular file; give a YAML file")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(key, f"{path} is over {MAX_CONFIG_BYTES >> 20} MiB; a YAML config is a few keys")
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(key, f"cannot read {path}: {error.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(key, f"{path} is not a text file (byte {data[error.start]:#04x} at offset {error.start} "
                          "is not UTF-8); give a YAML file") from None


def read_yaml(path: str | Path, key: str = "config") -> Any:
    """Read a YAML file as plain data; every problem raises one-line :class:`ConfigError` under ``key``.

    Refused: a missing, unreadable, binary, empty or oversized file, a folder, malformed YAML, a duplicate
    key (YAML would keep the last silently) and documents nested or aliased beyond any config.

    Example:
        >>> import pathlib, tempfile
        >>> file = pathlib.Path(tempfile.mkdtemp()) / "run.yaml"
        >>> _ = file.write_text("epochs: 3\\nseed: 1\\nepochs: 5\\n")
        >>> read_yaml(file)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        cycdata.config.ConfigError: config: malformed YAML in ...run.yaml at line 3, column 1: duplicate key 'epochs'...
    """
    path = Path(path)
    source = _read_text(path, key)
    try:
        data = _load_yaml(source)
    except yaml.YAMLError as error:
        raise ConfigError(key, f"malformed YAML in {path}{_yaml_problem(error)}") from None
    if data is None:
        raise ConfigError(key, f"{path} is empty (no keys); write {{}} in it for the defaults, or leave it out")
    return data


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a YAML config (or start from the default recipe), apply overrides, validate.

    Example:
        >>> load_config(None, ["epochs=3"]).epochs
        3
    """
    raw = read_yaml(path) if path is not None else {}
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError("config", f"the top level of {path} must be a mapping of keys, got {type(raw).__name__}")
    overrides = list(overrides)
    return parse_config(_fill_one_end(raw or {}, apply_overrides(raw, overrides), overrides))


# --------------------------------------------------------------------------------------------
# Writing back
# --------------------------------------------------------------------------------------------


def _schedule_to_raw(schedule: Schedule) -> Any:
    if isinstance(schedule, Constant):
        return schedule.value
    if isinstance(schedule, Cyclical):
        return {"easy": schedule.easy, "hard": schedule.hard, "factor": schedule.factor, "shape": schedule.shape}
    if isinstance(schedule, Piecewise):
        return {"points": [[t, value] for t, value in schedule.points]}
    raise TypeError(f"cannot write schedule {schedule!r} to a config")


def config_to_dict(config: Any) -> Any:
    """The resolved config as plain data; ``parse_config(config_to_dict(c)) == c``.

    Example:
        >>> config_to_dict(parse_config({"temperature": 1.5}))["temperature"]
        1.5
    """
    if isinstance(config, GradClipConfig):
        threshold = _schedule_to_raw(config.threshold)
        if isinstance(threshold, dict):
            return {**threshold, "mode": config.mode}
        return threshold if config.mode == "norm" else {"value": threshold, "mode": config.mode}
    if isinstance(config, (Constant, Cyclical, Piecewise)):
        return _schedule_to_raw(config)
    if dataclasses.is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)
                if not f.metadata.get("provenance")}
    return config


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML text (what a run folder stores)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
