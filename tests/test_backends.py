"""The per-sample worker path: every op on every backend, rungs and ladders, and the transform in workers."""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from cycdata.augment_ladder import backends
from cycdata.augment_ladder.backends import (
    BACKENDS,
    FALLBACKS,
    LadderTransform,
    apply_ladder,
    apply_op,
    apply_rung,
)
from cycdata.augment_ladder.ladder import OpStep, RandAugment, Rung, load_ladder
from cycdata.augment_ladder.ops import OPS, Op, register_op

BUILTIN = sorted(name for name, op in OPS.items() if op.fn.__module__ == "cycdata.augment_ladder.ops")

# Largest mean |backend - torch kernel| in grey levels, at magnitude 0.5 on smooth images (ops absent: 0,
# exact). Why each bound holds:
# * whole-pixel ops (flip, crop, translate, cutout) and integer thresholds (posterize, solarize, invert)
#   move or fill the very pixels ops.py does: exact.
# * bilinear geometry: the same sampling grid about the same centre, so only the rounding of the
#   interpolation differs (OpenCV quantizes its weights to 1/32 px); measured <= 0.03.
# * photometric: torchvision truncates to uint8 where ops.py rounds, and blends an already rounded uint8
#   result (equalize, autocontrast, grayscale): less than one level everywhere; measured <= 0.8.
# * blur: reflect padding in the libraries, replicate padding in ops.py: border pixels only; <= 0.03.
# * albumentations hue: OpenCV's 8-bit HSV (hue in 2-degree steps); measured 0.52 (5 levels at most).
# * albumentations autocontrast: its histogram leaves out level 255, so images holding pure white are
#   stretched a little more; measured 0.42 here, 1.4 on images that hold both black and white.
GEOMETRIC_BILINEAR = 0.25
PHOTOMETRIC = 1.0
TOLERANCE: dict[str, float] = {
    "rotate": GEOMETRIC_BILINEAR, "shear_x": GEOMETRIC_BILINEAR, "shear_y": GEOMETRIC_BILINEAR,
    "scale": GEOMETRIC_BILINEAR, "brightness": PHOTOMETRIC, "contrast": PHOTOMETRIC, "saturation": PHOTOMETRIC,
    "hue": PHOTOMETRIC, "sharpness": PHOTOMETRIC, "equalize": PHOTOMETRIC, "autocontrast": PHOTOMETRIC,
    "grayscale": PHOTOMETRIC, "blur": PHOTOMETRIC,
}
COLOUR_ONLY = ("saturation", "hue", "grayscale")  # the identity on 1-channel images, by definition
OVERRIDES: dict[tuple[str, str], float] = {("albumentations", "hue"): 1.5, ("albumentations", "autocontrast"): 2.0}


def smooth_image(channels: int, seed: int, height: int = 32, width: int = 32) -> torch.Tensor:
    """A uint8 image without pixel noise, so interpolation differences stay small (as on real photos).

    Even seeds span about [0.1, 0.9], odd seeds [0.2, 1] with pure white patches: neither spans the full
    range, so that autocontrast acts, and the odd ones probe the level-255 corner cases.
    """
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, channels, 6, 6, generator=generator)
    image = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=False)
    low, high = (0.1, 0.9) if seed % 2 == 0 else (0.2, 1.1)
    return ((low + (high - low) * image).clamp(0, 1)[0] * 255).round().to(torch.uint8)


def fixed_params(name: str, sign: float, seed: int) -> dict[str, float]:
    """The draw at magnitude 0.5 with the sign chosen and any flag set, so that every op really acts."""
    op = OPS[name]
    params = {key: float(value[0]) for key, value in op.draw(torch.tensor([0.5]), torch.Generator().manual_seed(seed))
              .items()}
    for key in op.bernoulli:
        params[key] = 1.0
    for key in op.signed:
        lo, hi = op.params[key]
        params[key] = lo + sign * (hi - lo) * 0.5
    return params


def identity_params(name: str) -> dict[str, float]:
    drawn = OPS[name].draw(torch.zeros(1), torch.Generator().manual_seed(0))
    return {key: float(value[0]) for key, value in drawn.items()}


# --------------------------------------------------------------------------------------------
# One op: identity, agreement with the torch kernel, the kernel contract.
# --------------------------------------------------------------------------------------------


def test_every_builtin_op_has_a_library_kernel_or_a_listed_fallback() -> None:
    assert set(FALLBACKS) == set(BACKENDS)
    for backend in BACKENDS:
        mapped = set(backends._LIBRARY_KERNELS[backend])
        assert not mapped & FALLBACKS[backend], backend  # listed as a fallback, yet mapped
        assert FALLBACKS[backend] <= set(BUILTIN)
        if backend != "torch":
            assert mapped | FALLBACKS[backend] == set(BUILTIN), backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [3, 1])
def test_identity_parameters_return_the_input(backend: str, channels: int) -> None:
    image = torch.randint(0, 256, (channels, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for name in BUILTIN:
        params = identity_params(name)
        out = apply_op(image, name, params, backend)
        assert out.dtype == torch.uint8 and out.shape == image.shape, name
        assert torch.equal(out, image), name
        # Also the kernel itself (apply_op short-cuts identity parameters, and colour ops on grey images):
        # the mapping is right at 0.
        if name in backends._LIBRARY_KERNELS[backend] and not (channels == 1 and name in COLOUR_ONLY):
            assert torch.equal(backends._kernel(name, backend)(image, params), image), (backend, name)


@pytest.mark.parametrize("backend", ["torchvision", "albumentations"])
@pytest.mark.parametrize("channels", [3, 1])
def test_backends_agree_with_the_torch_kernels(backend: str, channels: int) -> None:
    for name in BUILTIN:
        colour_only = name in COLOUR_ONLY and channels == 1
        tolerance = 0.0 if name in FALLBACKS[backend] else OVERRIDES.get((backend, name), TOLERANCE.get(name, 0.0))
        for seed, sign in ((0, 1.0), (1, -1.0), (2, 1.0), (3, -1.0)):
            image = smooth_image(channels, seed, height=28, width=32)  # not square: aspect ratios must hold
            before = image.clone()
            params = fixed_params(name, sign, seed)
            expected = apply_op(image, name, params, "torch")
            out = apply_op(image, name, params, backend)
            assert out.dtype == torch.uint8 and out.shape == image.shape, name
            assert torch.equal(image, before), (name, "input modified")
            assert out.data_ptr() != image.data_ptr(), (name, "output aliases the input")
            assert torch.equal(expected, image) == colour_only, (name, "the op must act (or be a colour no-op)")
            difference = (out.float() - expected.float()).abs().mean().item()
            assert difference <= tolerance, f"{backend} {name} seed {seed}: mean difference {difference:.3f} levels"


@pytest.mark.parametrize("backend", ["torchvision", "albumentations"])
def test_whole_pixel_ops_and_thresholds_are_exact_for_many_draws(backend: str) -> None:
    image = torch.arange(3 * 16 * 16, dtype=torch.int64).remainder(256).to(torch.uint8).view(3, 16, 16)
    generator = torch.Generator().manual_seed(5)
    for name in ("crop", "translate_x", "translate_y", "cutout", "posterize", "solarize"):
        drawn = OPS[name].draw(torch.rand(60, generator=generator), generator)
        for sample in range(60):
            params = {key: float(value[sample]) for key, value in drawn.items()}
            assert torch.equal(apply_op(image, name, params, backend), apply_op(image, name, params, "torch")), (
                name, params)
    # Thresholds that fall exactly on a level: ops.py inverts strictly above, the libraries at or above.
    for level in range(128, 256):
        params = {"threshold": float(torch.tensor(level, dtype=torch.float32) / 255)}
        assert torch.equal(apply_op(image, "solarize", params, backend), apply_op(image, "solarize", params, "torch"))


def test_ops_without_a_library_kernel_run_on_the_torch_kernel() -> None:
    def darken(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        return images * factor.view(-1, 1, 1, 1)

    register_op(Op("darken_for_backends", "photometric", {"factor": (1.0, 0.5)}, fn=darken))
    try:
        image = torch.full((1, 4, 4), 200, dtype=torch.uint8)
        for backend in BACKENDS:
            assert apply_op(image, "darken_for_backends", {"factor": 0.5}, backend).unique().tolist() == [100]
    finally:
        del OPS["darken_for_backends"]


def test_bad_input_fails_with_a_clear_message() -> None:
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8 image"):
        apply_op(image.float(), "rotate", {"angle": 1.0})
    with pytest.raises(ValueError, match="unknown backend"):
        apply_op(image, "rotate", {"angle": 1.0}, "pil")
    with pytest.raises(KeyError, match="unknown op"):
        apply_op(image, "rotat", {"angle": 1.0})
    with pytest.raises(KeyError, match="takes parameters"):
        apply_op(image, "crop", {"max_shift": 0.1})
    with pytest.raises(ValueError, match="unknown backend"):
        LadderTransform(load_ladder("default"), backend="kornia")
    with pytest.raises(TypeError, match="Ladder"):
        LadderTransform("default")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Rungs and ladders.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_ladders_at_strength_zero_are_the_identity_and_seeds_decide(backend: str) -> None:
    for ladder_name, channels in (("default", 3), ("digits", 1)):
        ladder = load_ladder(ladder_name)
        image = smooth_image(channels, seed=7)
        assert torch.equal(apply_ladder(image, ladder, 0.0, torch.Generator().manual_seed(0), backend), image)
        for strength in (0.6, 1.0):
            first = apply_ladder(image, ladder, strength, torch.Generator().manual_seed(3), backend)
            again = apply_ladder(image, ladder, strength, torch.Generator().manual_seed(3), backend)
            assert torch.equal(first, again) and first.dtype == torch.uint8 and first.shape == image.shape
        outputs = {apply_ladder(image, ladder, 1.0, torch.Generator().manual_seed(seed), backend).numpy().tobytes()
                   for seed in range(5)}
        assert len(outputs) == 5, (ladder_name, "different seeds must give different augmentations")


def test_backends_draw_the_same_parameters() -> None:
    # The draws come from Op.draw whatever the backend, so one seed gives nearly the same image everywhere.
    ladder = load_ladder("digits")
    image = smooth_image(1, seed=2)
    for seed in range(6):
        outputs = [apply_ladder(image, ladder, 1.0, torch.Generator().manual_seed(seed), backend)
                   for backend in BACKENDS]
        assert not torch.equal(outputs[0], image)
        for out in outputs[1:]:
            assert (out.float() - outputs[0].float()).abs().mean() < 1.0


def test_rung_steps_fire_with_their_probability() -> None:
    image = smooth_image(3, seed=1)
    rung = Rung(steps=(OpStep("invert", 1.0, probability=0.5),))  # invert's flag fires half the time at m = 1
    changed = sum(not torch.equal(apply_rung(image, rung, torch.Generator().manual_seed(seed)), image)
                  for seed in range(200))
    assert 25 < changed < 75  # P(apply) · P(flag) = 0.25
    never = Rung(steps=(OpStep("rotate", 1.0, probability=0.0), OpStep("crop", 0.0)))
    assert torch.equal(apply_rung(image, never, torch.Generator().manual_seed(0)), image)


def test_randaugment_draws_from_the_pool_at_its_magnitude() -> None:
    image = smooth_image(3, seed=4)
    rung = Rung(randaugment=RandAugment(n=2, magnitude=1.0, pool=("posterize",)))  # deterministic: 4 bits, twice
    expected = image & 0xF0
    for backend in BACKENDS:
        assert torch.equal(apply_rung(image, rung, torch.Generator().manual_seed(0), backend), expected)
    for idle in (RandAugment(n=0, magnitude=1.0), RandAugment(n=2, magnitude=0.0)):
        assert torch.equal(apply_rung(image, Rung(randaugment=idle)), image)


def test_upper_rung_is_taken_with_its_weight() -> None:
    ladder = load_ladder("flips")  # rung 1 flips half the time; strength 0.5 takes rung 1 half the time
    image = smooth_image(3, seed=0)
    flipped = sum(torch.equal(apply_ladder(image, ladder, 0.5, torch.Generator().manual_seed(seed)), image.flip(-1))
                  for seed in range(400))
    assert 60 < flipped < 140  # 0.5 · 0.5 = 0.25 of 400


# --------------------------------------------------------------------------------------------
# The transform in DataLoader workers: the strength travels with the index (DESIGN rule 3).
# --------------------------------------------------------------------------------------------


class Images(Dataset):
    """uint8 images served one by one, augmented in the worker at the strength sent with the index."""

    def __init__(self, images: torch.Tensor, transform: LadderTransform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, float, int]) -> tuple[torch.Tensor, int, float]:
        index, strength, seed = key
        return self.transform(self.images[index], strength, seed), index, strength


class StrengthSampler:
    """Batches of (index, strength, seed): odd indices at strength 1 in epoch 1 only, everything else at 0."""

    def __init__(self, size: int, batch_size: int) -> None:
        self.size, self.batch_size, self.epoch = size, batch_size, 0

    def __iter__(self) -> Iterator[list[tuple[int, float, int]]]:
        keys = [(index, float(self.epoch == 1 and index % 2 == 1), 1000 * self.epoch + index)
                for index in range(self.size)]
        for start in range(0, self.size, self.batch_size):
            yield keys[start:start + self.batch_size]

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)


def test_transform_pickles_and_works_in_persistent_workers() -> None:
    transform = LadderTransform(load_ladder("default"), backend="albumentations")
    restored = pickle.loads(pickle.dumps(transform))
    images = torch.stack([smooth_image(3, seed) for seed in range(12)])
    assert torch.equal(restored(images[0], 1.0, 5), transform(images[0], 1.0, 5))

    sampler = StrengthSampler(len(images), batch_size=4)
    loader = DataLoader(Images(images, transform), batch_sampler=sampler, num_workers=2, persistent_workers=True)
    for epoch in range(3):
        sampler.epoch = epoch  # the workers persist: only what travels with the index reaches them
        seen = 0
        for batch, indices, strengths in loader:
            for image, index, strength in zip(batch, indices.tolist(), strengths.tolist()):
                original = images[index]
                if strength == 0.0:
                    assert torch.equal(image, original), (epoch, index)
                else:
                    assert epoch == 1 and index % 2 == 1
                    assert not torch.equal(image, original)
                    # Reproducible from what the main process decided, whichever worker ran it.
                    assert torch.equal(image, transform(original, strength, 1000 * epoch + index))
                seen += 1
        assert seen == len(images)
