"""Augmentation-strength ladders: ordered rungs from weak to strong, and a strength s in [0, 1]
that selects and interpolates them.

A rung is a list of ops with magnitudes and probabilities, or a RandAugment-like draw of ``n``
ops from a pool at one magnitude. Strength ``s`` sits at position ``s·(R − 1)`` on a ladder of
``R`` rungs; each sample takes the rung just above that position with probability equal to the
fractional part and the one just below otherwise (drawn per sample), so the expected strength
moves smoothly with ``s``. Strength 0 is rung 0; every built-in ladder's rung 0 is the identity.

YAML format (also accepted as a Python mapping)::

    name: my-ladder
    rungs:
      - []                                        # rung 0: the identity
      - [{op: crop, magnitude: 0.5}]              # an explicit list (probability defaults to 1)
      - [{op: crop, magnitude: 0.5}, {op: rotate, magnitude: 0.3, probability: 0.5}]
      - {randaugment: {n: 2, magnitude: 0.6, pool: [rotate, shear_x, contrast, brightness]}}
      - {ops: [{op: cutout, magnitude: 0.5}], randaugment: {n: 2, magnitude: 0.8}}
      - {randaugment: {n: 2, magnitude: 0.9}, mix: {kind: cutmix, magnitude: 0.8}}   # batches only

Example:
    >>> ladder = builtin_ladder("digits")
    >>> len(ladder.rungs), ladder.rungs[0].is_identity
    (5, True)
    >>> ladder.position(0.5)
    (2, 0.0)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cycdata.config import ConfigError, read_yaml

__all__ = [
    "LADDERS",
    "Ladder",
    "LadderError",
    "Mix",
    "OpStep",
    "RandAugment",
    "Rung",
    "builtin_ladder",
    "load_ladder",
    "parse_ladder",
]


class LadderError(ValueError):
    """An invalid ladder: one line naming the place (``rungs[2].ops[0].magnitude``), the value and the fix."""


def _known_ops() -> dict[str, Any]:
    from cycdata.augment_ladder.ops import OPS

    return OPS


def _suggest(word: str, known: Sequence[str]) -> str:
    match = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _check_op(where: str, name: Any) -> str:
    known = sorted(_known_ops())
    if not isinstance(name, str) or name not in known:
        raise LadderError(f"{where}: unknown op {name!r}{_suggest(str(name), known)}; known ops: {', '.join(known)}")
    return name


def _check_unit(where: str, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise LadderError(f"{where}: got {value!r}; {what} must be a number in [0, 1]")
    return float(value)


@dataclass(frozen=True)
class OpStep:
    """One op of a rung: applied with ``probability`` (per sample) at ``magnitude``."""

    op: str
    magnitude: float
    probability: float = 1.0


@dataclass(frozen=True)
class RandAugment:
    """``n`` ops drawn per sample from ``pool`` at ``magnitude``; an empty pool means every registered op except
    the sizing ops (``resized_crop`` chooses the image's frame, it is not one of RandAugment's picks)."""

    n: int
    magnitude: float
    pool: tuple[str, ...] = ()

    def ops(self) -> tuple[str, ...]:
        from cycdata.augment_ladder.ops import SIZING_OPS

        return self.pool or tuple(sorted(name for name in _known_ops() if name not in SIZING_OPS))


@dataclass(frozen=True)
class Mix:
    """Batch mixing (``mixup`` or ``cutmix``) at ``magnitude``: soft targets follow the pixel share."""

    kind: str
    magnitude: float


@dataclass(frozen=True)
class Rung:
    """A set of ops: an explicit list, then optionally a RandAugment draw, then optionally batch mixing.

    Mixing needs the whole batch and its targets, so it runs on batches only (the device path);
    the per-sample worker path applies the rung's ops and leaves mixing out.
    """

    steps: tuple[OpStep, ...] = ()
    randaugment: RandAugment | None = None
    mix: Mix | None = None

    @property
    def is_identity(self) -> bool:
        explicit = all(step.magnitude == 0 or step.probability == 0 for step in self.steps)
        random = self.randaugment is None or self.randaugment.n == 0 or self.randaugment.magnitude == 0
        return explicit and random and (self.mix is None or self.mix.magnitude == 0)

    def apply(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Apply the rung to a batch of float images in [0, 1], parameters drawn per sample."""
        ops = _known_ops()
        batch = images.shape[0]
        for step in self.steps:
            magnitude = torch.full((batch,), step.magnitude, device=images.device)
            if step.probability < 1.0:
                draw = torch.rand(batch, generator=generator, device=_generator_device(generator, images))
                magnitude = magnitude * (draw.to(images.device) < step.probability)
            images = _apply_op(ops[step.op], images, magnitude, generator)
        if self.randaugment is not None and self.randaugment.n > 0:
            pool = self.randaugment.ops()
            for _ in range(self.randaugment.n):
                choice = torch.randint(
                    len(pool), (batch,), generator=generator, device=_generator_device(generator, images)
                ).to(images.device)
                for index, name in enumerate(pool):
                    # Each op acts only on the samples that drew it: magnitude 0 elsewhere is the identity.
                    magnitude = torch.where(choice == index, self.randaugment.magnitude, 0.0)
                    images = _apply_op(ops[name], images, magnitude, generator)
        return images


def _apply_op(op: Any, images: Tensor, magnitude: Tensor, generator: torch.Generator | None) -> Tensor:
    """Apply ``op`` at per-sample magnitudes; samples at magnitude 0 stay exactly as they are.

    On a GPU the op runs over the whole batch (masked: no host sync). On a CPU, where finding the
    samples costs nothing and compute is scarce, it runs only on the samples that use it: a
    RandAugment pool of 13 ops then costs about one op per sample instead of thirteen.
    """
    if images.device.type != "cpu":
        return op(images, magnitude, generator)
    chosen = (magnitude > 0).nonzero().flatten()
    if len(chosen) == 0:
        return images
    if len(chosen) == len(images):
        return op(images, magnitude, generator)
    out = images.clone()
    out[chosen] = op(images[chosen], magnitude[chosen], generator)
    return out


def _generator_device(generator: torch.Generator | None, images: Tensor) -> torch.device:
    return generator.device if generator is not None else images.device


@dataclass(frozen=True)
class Ladder:
    """Rungs ordered from weak to strong."""

    name: str
    rungs: tuple[Rung, ...] = field(default_factory=lambda: (Rung(),))

    def position(self, strength: float) -> tuple[int, float]:
        """``(lower rung, weight of the rung above)`` for a strength in [0, 1]."""
        if not math.isfinite(strength) or not 0.0 <= strength <= 1.0:
            raise LadderError(f"strength must be in [0, 1], got {strength!r}")
        place = strength * (len(self.rungs) - 1)
        lower = min(math.floor(place), len(self.rungs) - 1)
        return lower, place - lower

    def apply(self, images: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
        """Augment a batch (float [B, C, H, W] in [0, 1]) at ``strength``, rung chosen per sample."""
        lower, upper_weight = self.position(strength)
        if upper_weight == 0.0:
            return self.rungs[lower].apply(images, generator)
        draw = torch.rand(images.shape[0], generator=generator, device=_generator_device(generator, images))
        upper = (draw < upper_weight).to(images.device)
        out = self.rungs[lower].apply(images, generator)
        high = self.rungs[lower + 1].apply(images, generator)
        return torch.where(upper.view(-1, 1, 1, 1), high, out)

    def apply_with_targets(
        self,
        images: Tensor,
        targets: Tensor,
        strength: float,
        num_classes: int,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Like :meth:`apply`, plus batch mixing where the rungs mix; targets come back soft ``[B, K]``.

        The mixing magnitude interpolates like the rungs: the lower rung's, plus the upper rung's
        weighted by its share of the position.
        """
        from cycdata.augment_ladder.ops import mix_batch

        images = self.apply(images, strength, generator)
        lower, upper_weight = self.position(strength)
        mixes = [(self.rungs[lower].mix, 1.0 - upper_weight)]
        if upper_weight > 0:
            mixes.append((self.rungs[lower + 1].mix, upper_weight))
        soft = torch.nn.functional.one_hot(targets.long(), num_classes).to(images.dtype)
        for kind in ("mixup", "cutmix"):
            magnitude = sum(weight * mix.magnitude for mix, weight in mixes if mix is not None and mix.kind == kind)
            if magnitude > 0:
                images, soft = mix_batch(images, soft, kind, min(1.0, magnitude), generator)
        return images, soft

    def sizing_magnitude(self, strength: float, op: str = "resized_crop") -> float:
        """The expected magnitude of ``op`` at ``strength``: the rungs' own (0 where a rung lacks it, times its
        probability), weighted as :meth:`apply` weights the two rungs. A loader that can only crop a whole batch
        at one setting (ffcv's decoder) crops at this one.

        Example:
            >>> builtin_ladder("imagenet").sizing_magnitude(0.1)
            0.25
        """
        lower, upper_weight = self.position(strength)

        def magnitude(rung: Rung) -> float:
            return next((step.magnitude * step.probability for step in rung.steps if step.op == op), 0.0)

        value = (1.0 - upper_weight) * magnitude(self.rungs[lower])
        if upper_weight > 0:
            value += upper_weight * magnitude(self.rungs[lower + 1])
        return value

    def without(self, ops: frozenset[str] | set[str]) -> Ladder:
        """The ladder with the explicit steps of ``ops`` removed from every rung (for a loader that applied them
        already, such as a crop done while decoding).

        Example:
            >>> [len(rung.steps) for rung in builtin_ladder("imagenet").without({"resized_crop"}).rungs][:3]
            [0, 1, 1]
        """
        rungs = tuple(dataclasses.replace(rung, steps=tuple(step for step in rung.steps if step.op not in ops))
                      for rung in self.rungs)
        return dataclasses.replace(self, rungs=rungs)

    @property
    def mixes(self) -> bool:
        """Whether any rung mixes batches (the targets then become soft)."""
        return any(rung.mix is not None and rung.mix.magnitude > 0 for rung in self.rungs)

    def to_dict(self) -> dict[str, Any]:
        """The ladder in its YAML form."""
        rungs: list[Any] = []
        for rung in self.rungs:
            steps = [{"op": s.op, "magnitude": s.magnitude, "probability": s.probability} for s in rung.steps]
            if rung.randaugment is None and rung.mix is None:
                rungs.append(steps)
                continue
            entry: dict[str, Any] = {"ops": steps}
            if rung.randaugment is not None:
                ra = rung.randaugment
                entry["randaugment"] = {"n": ra.n, "magnitude": ra.magnitude, "pool": list(ra.pool)}
            if rung.mix is not None:
                entry["mix"] = {"kind": rung.mix.kind, "magnitude": rung.mix.magnitude}
            rungs.append(entry)
        return {"name": self.name, "rungs": rungs}


# --------------------------------------------------------------------------------------------
# Parsing and validation
# --------------------------------------------------------------------------------------------


def _parse_steps(where: str, raw: Any) -> tuple[OpStep, ...]:
    if not isinstance(raw, list):
        raise LadderError(f"{where}: got {raw!r}; expected a list of {{op: NAME, magnitude: M}}")
    steps = []
    for index, item in enumerate(raw):
        place = f"{where}[{index}]"
        if not isinstance(item, Mapping) or "op" not in item:
            raise LadderError(f"{place}: got {item!r}; expected {{op: NAME, magnitude: M, probability: P}}")
        unknown = set(item) - {"op", "magnitude", "probability"}
        if unknown:
            key = sorted(unknown)[0]
            raise LadderError(f"{place}.{key}: unknown key{_suggest(key, ['op', 'magnitude', 'probability'])}")
        steps.append(
            OpStep(
                op=_check_op(f"{place}.op", item["op"]),
                magnitude=_check_unit(f"{place}.magnitude", item.get("magnitude", 1.0), "magnitude"),
                probability=_check_unit(f"{place}.probability", item.get("probability", 1.0), "probability"),
            )
        )
    return tuple(steps)


def _parse_randaugment(where: str, raw: Any) -> RandAugment:
    if not isinstance(raw, Mapping):
        raise LadderError(f"{where}: got {raw!r}; expected {{n: N, magnitude: M, pool: [ops...]}}")
    unknown = set(raw) - {"n", "magnitude", "pool"}
    if unknown:
        key = sorted(unknown)[0]
        raise LadderError(f"{where}.{key}: unknown key{_suggest(key, ['n', 'magnitude', 'pool'])}")
    n = raw.get("n", 2)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise LadderError(f"{where}.n: got {n!r}; the number of ops must be an integer >= 0")
    pool = raw.get("pool", [])
    if not isinstance(pool, list):
        raise LadderError(f"{where}.pool: got {pool!r}; expected a list of op names")
    names = tuple(_check_op(f"{where}.pool[{i}]", name) for i, name in enumerate(pool))
    return RandAugment(
        n=n, magnitude=_check_unit(f"{where}.magnitude", raw.get("magnitude", 0.5), "magnitude"), pool=names
    )


def _parse_rung(where: str, raw: Any) -> Rung:
    if raw is None or isinstance(raw, list):
        return Rung(steps=_parse_steps(f"{where}", raw or []))
    if not isinstance(raw, Mapping):
        raise LadderError(f"{where}: got {raw!r}; a rung is a list of ops or {{ops: [...], randaugment: {{...}}}}")
    unknown = set(raw) - {"ops", "randaugment", "mix"}
    if unknown:
        key = sorted(unknown)[0]
        raise LadderError(f"{where}.{key}: unknown key{_suggest(key, ['ops', 'randaugment', 'mix'])}")
    randaugment = _parse_randaugment(f"{where}.randaugment", raw["randaugment"]) if "randaugment" in raw else None
    mix = _parse_mix(f"{where}.mix", raw["mix"]) if "mix" in raw else None
    return Rung(steps=_parse_steps(f"{where}.ops", raw.get("ops", [])), randaugment=randaugment, mix=mix)


def _parse_mix(where: str, raw: Any) -> Mix:
    if not isinstance(raw, Mapping) or raw.get("kind") not in ("mixup", "cutmix") or set(raw) - {"kind", "magnitude"}:
        raise LadderError(f"{where}: got {raw!r}; expected {{kind: mixup | cutmix, magnitude: M}}")
    return Mix(kind=raw["kind"], magnitude=_check_unit(f"{where}.magnitude", raw.get("magnitude", 0.5), "magnitude"))


def parse_ladder(raw: Any, name: str = "custom") -> Ladder:
    """Validate a ladder mapping (the YAML form) into a :class:`Ladder`.

    Example:
        >>> parse_ladder({"rungs": [[], [{"op": "rotate", "magnitude": 0.5}]]}).rungs[1].steps[0].op
        'rotate'
        >>> try:
        ...     parse_ladder({"rungs": [[], [{"op": "rotat"}]]})
        ... except LadderError as error:
        ...     print(str(error).split(";")[0])
        rungs[1][0].op: unknown op 'rotat' (did you mean 'rotate'?)
    """
    if not isinstance(raw, Mapping):
        raise LadderError(f"a ladder is a mapping {{name: ..., rungs: [...]}}, got {type(raw).__name__}")
    unknown = set(raw) - {"name", "rungs"}
    if unknown:
        key = sorted(unknown)[0]
        raise LadderError(f"{key}: unknown key{_suggest(key, ['name', 'rungs'])}; a ladder has name and rungs")
    rungs = raw.get("rungs")
    if not isinstance(rungs, list) or not rungs:
        raise LadderError(f"rungs: got {rungs!r}; a ladder needs a non-empty list of rungs, weakest first")
    return Ladder(
        name=str(raw.get("name", name)), rungs=tuple(_parse_rung(f"rungs[{i}]", rung) for i, rung in enumerate(rungs))
    )


def load_ladder(spec: str | Path) -> Ladder:
    """A built-in ladder by name or a ladder YAML file.

    Example:
        >>> load_ladder("flips").name
        'flips'
    """
    if str(spec) in LADDERS:
        return builtin_ladder(str(spec))
    path = Path(spec)
    if path.suffix not in (".yaml", ".yml"):
        raise LadderError(
            f"unknown ladder {str(spec)!r}{_suggest(str(spec), list(LADDERS))}; use one of "
            f"{', '.join(LADDERS)} or a .yaml file"
        )
    if not path.exists():
        raise LadderError(f"ladder file not found: {path}")
    try:
        # The config's reader: plain data only, and binary files, folders, duplicate keys and YAML bombs refused.
        raw = read_yaml(path, key="ladder")
    except ConfigError as error:
        raise LadderError(str(error)) from None
    return parse_ladder(raw, name=path.stem)


# --------------------------------------------------------------------------------------------
# Built-in ladders
# --------------------------------------------------------------------------------------------

_GEOMETRIC_POOL = ["translate_x", "translate_y", "rotate", "shear_x", "shear_y", "scale"]
_PHOTOMETRIC_POOL = ["brightness", "contrast", "sharpness", "posterize", "solarize", "equalize", "autocontrast"]

LADDERS: dict[str, dict[str, Any]] = {
    "none": {"rungs": [[]]},
    "flips": {"rungs": [[], [{"op": "hflip", "magnitude": 1.0}]]},
    # flip/crop -> RandAugment-like at rising magnitude -> plus cutout -> plus cutmix (soft targets).
    "default": {
        "rungs": [
            [],
            [{"op": "hflip", "magnitude": 1.0}, {"op": "crop", "magnitude": 0.5}],
            {
                "ops": [{"op": "hflip", "magnitude": 1.0}, {"op": "crop", "magnitude": 0.5}],
                "randaugment": {"n": 2, "magnitude": 0.3, "pool": _GEOMETRIC_POOL + _PHOTOMETRIC_POOL},
            },
            {
                "ops": [{"op": "hflip", "magnitude": 1.0}, {"op": "crop", "magnitude": 0.5}],
                "randaugment": {"n": 2, "magnitude": 0.6, "pool": _GEOMETRIC_POOL + _PHOTOMETRIC_POOL},
            },
            {
                "ops": [
                    {"op": "hflip", "magnitude": 1.0},
                    {"op": "crop", "magnitude": 0.5},
                    {"op": "cutout", "magnitude": 0.6},
                ],
                "randaugment": {"n": 2, "magnitude": 0.9, "pool": _GEOMETRIC_POOL + _PHOTOMETRIC_POOL},
            },
            {
                "ops": [
                    {"op": "hflip", "magnitude": 1.0},
                    {"op": "crop", "magnitude": 0.5},
                    {"op": "cutout", "magnitude": 0.6},
                ],
                "randaugment": {"n": 2, "magnitude": 0.9, "pool": _GEOMETRIC_POOL + _PHOTOMETRIC_POOL},
                "mix": {"kind": "cutmix", "magnitude": 0.8},
            },
        ]
    },
    # Large images (ImageNet-style folders at 224 px): the frame first, a random-resized crop growing from the
    # evaluation crop (m = 0) to timm's RandomResizedCrop (m = 1) with flips, then RandAugment-like rungs.
    "imagenet": {
        "rungs": [
            [],
            [{"op": "resized_crop", "magnitude": 0.5}, {"op": "hflip", "magnitude": 1.0}],
            [{"op": "resized_crop", "magnitude": 1.0}, {"op": "hflip", "magnitude": 1.0}],
            {
                "ops": [{"op": "resized_crop", "magnitude": 1.0}, {"op": "hflip", "magnitude": 1.0}],
                "randaugment": {"n": 2, "magnitude": 0.3, "pool": _GEOMETRIC_POOL + _PHOTOMETRIC_POOL},
            },
            {
                "ops": [{"op": "resized_crop", "magnitude": 1.0}, {"op": "hflip", "magnitude": 1.0}],
                "randaugment": {"n": 2, "magnitude": 0.6, "pool": _GEOMETRIC_POOL + _PHOTOMETRIC_POOL},
            },
            {
                "ops": [{"op": "resized_crop", "magnitude": 1.0}, {"op": "hflip", "magnitude": 1.0}],
                "randaugment": {"n": 2, "magnitude": 0.9, "pool": _GEOMETRIC_POOL + _PHOTOMETRIC_POOL},
            },
        ]
    },
    # Digits: no flips, no colour; small shifts and rotations first, then stronger geometry and cutout.
    "digits": {
        "rungs": [
            [],
            [{"op": "crop", "magnitude": 0.3}],
            {
                "ops": [{"op": "crop", "magnitude": 0.3}],
                "randaugment": {"n": 1, "magnitude": 0.4, "pool": _GEOMETRIC_POOL},
            },
            {
                "ops": [{"op": "crop", "magnitude": 0.4}],
                "randaugment": {"n": 2, "magnitude": 0.6, "pool": [*_GEOMETRIC_POOL, "contrast", "blur"]},
            },
            {
                "ops": [{"op": "crop", "magnitude": 0.4}, {"op": "cutout", "magnitude": 0.5}],
                "randaugment": {"n": 2, "magnitude": 0.8, "pool": [*_GEOMETRIC_POOL, "contrast", "blur"]},
            },
        ]
    },
}


def builtin_ladder(name: str) -> Ladder:
    """One of the built-in ladders: ``none``, ``flips``, ``default``, ``imagenet`` (large images), ``digits``."""
    if name not in LADDERS:
        raise LadderError(
            f"unknown built-in ladder {name!r}{_suggest(name, list(LADDERS))}; built-ins: {', '.join(LADDERS)}"
        )
    return parse_ladder(LADDERS[name], name=name)
