"""Augmentation ops: one contract test run over every registered op, golden values, mix_batch, worker path."""

from __future__ import annotations

import pickle
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from cycdata.augment_ladder.ops import OPS, Op, apply_per_sample, mix_batch, register_op

# Parametrize over the registry, so that every op registered at import time is covered automatically.
NAMES = sorted(OPS)
RANDOM_NAMES = [name for name in NAMES if OPS[name].is_random]
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
DEVICES = ["cpu", CUDA]


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_images(batch: int, channels: int = 3, height: int = 16, width: int = 16, *, seed: int = 0,
                  low: float = 0.2, high: float = 0.8, dtype: torch.dtype = torch.float32,
                  device: str = "cpu") -> torch.Tensor:
    """Natural-ish images: upsampled noise, smooth but with structure, in [low, high]."""
    noise = torch.rand(batch, channels, 4, 4, generator=seeded(seed), dtype=torch.float64)
    images = F.interpolate(noise, size=(height, width), mode="bilinear", align_corners=False)
    return (low + (high - low) * images).to(dtype=dtype, device=device)


def full_range_images(batch: int, channels: int = 3, height: int = 16, width: int = 16) -> torch.Tensor:
    """Images that touch both ends of [0, 1], where a careless op overflows the range."""
    images = smooth_images(batch, channels, height, width, seed=1, low=0.0, high=1.0)
    images[:, :, 0, 0] = 0.0
    images[:, :, -1, -1] = 1.0
    return images


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------
# The kernel contract, over every registered op
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_input_not_mutated_and_output_is_new(name: str) -> None:
    op = OPS[name]
    images = smooth_images(6)
    before = images.clone()
    out = op(images, 1.0, seeded())
    kernel_out = op.kernel(images, **op.draw(torch.ones(6), seeded()))
    assert torch.equal(images, before)
    assert out.data_ptr() != images.data_ptr() and kernel_out.data_ptr() != images.data_ptr()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_dtype_and_device_kept(name: str, dtype: torch.dtype, device: str) -> None:
    op = OPS[name]
    images = smooth_images(4, dtype=dtype, device=device)
    for generator in (seeded(), torch.Generator(device=device).manual_seed(0)):
        out = op(images, 0.8, generator)
        assert out.dtype == dtype and out.device == images.device
        assert out.shape == images.shape
        assert torch.equal(op(images, 0.0, generator), images)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_zero_magnitude_is_exactly_the_identity(name: str, channels: int) -> None:
    op = OPS[name]
    images = full_range_images(4, channels)
    assert torch.equal(op(images, 0.0, seeded()), images)
    assert torch.equal(op(images, torch.tensor(0.0), seeded()), images)
    # Per-sample magnitudes: the m = 0 samples come back unchanged, whatever the others do.
    out = op(images, torch.tensor([0.0, 1.0, 0.0, 0.5]), seeded())
    assert torch.equal(out[0], images[0]) and torch.equal(out[2], images[2])


@pytest.mark.parametrize("name", NAMES)
def test_zero_magnitude_is_the_identity_on_uint8(name: str) -> None:
    image = torch.arange(768).remainder(256).to(torch.uint8).view(3, 16, 16)  # every uint8 value
    assert torch.equal(apply_per_sample(image, [(name, 0.0)], seeded()), image)


def test_all_ops_at_zero_are_the_identity_on_uint8() -> None:
    image = torch.randint(0, 256, (3, 12, 12), dtype=torch.uint8, generator=seeded())
    assert torch.equal(apply_per_sample(image, [(name, 0.0) for name in NAMES], seeded()), image)


@pytest.mark.parametrize("size", [(3, 16, 16), (1, 16, 16), (3, 12, 20)])
@pytest.mark.parametrize("magnitude", [0.5, 1.0])
@pytest.mark.parametrize("name", NAMES)
def test_output_in_range_and_shape_kept(name: str, magnitude: float, size: tuple[int, int, int]) -> None:
    images = full_range_images(8, *size)
    out = OPS[name](images, magnitude, seeded())
    assert out.shape == images.shape
    assert out.min() >= 0 and out.max() <= 1
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_ops_pickle_for_dataloader_workers(name: str) -> None:
    op = OPS[name]
    clone = pickle.loads(pickle.dumps(op))
    assert clone == op and hash(clone) == hash(op)
    images = smooth_images(4)
    assert torch.equal(clone(images, 0.6, seeded()), op(images, 0.6, seeded()))


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch(name: str) -> None:
    images = torch.zeros(0, 3, 8, 8)
    assert OPS[name](images, 1.0, seeded()).shape == (0, 3, 8, 8)


@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_per_image_for_fixed_params(name: str) -> None:
    op = OPS[name]
    images = smooth_images(8, low=0.0, high=1.0)
    params = op.draw(torch.linspace(0, 1, 8), seeded(2))
    batched = op.kernel(images, **params)
    single = torch.cat([op.kernel(images[i:i + 1], **{k: v[i:i + 1] for k, v in params.items()}) for i in range(8)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", RANDOM_NAMES)
def test_random_params_are_drawn_per_sample(name: str) -> None:
    op = OPS[name]
    params = op.draw(torch.ones(16), seeded())
    assert any(value.unique().numel() > 1 for value in params.values()), params
    # The same image 16 times: per-sample draws give different outputs. At m = 0.75, because a hue turn
    # of +0.5 and one of -0.5 are the same colour change.
    images = smooth_images(1).expand(16, -1, -1, -1).contiguous()
    out = op(images, 0.75, seeded())
    assert any(not torch.equal(out[i], out[0]) for i in range(1, 16))


@pytest.mark.parametrize("name", NAMES)
def test_per_sample_magnitudes_give_per_sample_outputs(name: str) -> None:
    images = smooth_images(1).expand(8, -1, -1, -1).contiguous()
    out = OPS[name](images, torch.linspace(0.3, 1.0, 8), seeded())
    assert any(not torch.equal(out[i], out[0]) for i in range(1, 8))


@pytest.mark.parametrize("name", NAMES)
def test_seeded_generator_is_deterministic_and_global_rng_untouched(name: str) -> None:
    op = OPS[name]
    images = smooth_images(16)
    state = torch.get_rng_state()
    first = op(images, 0.75, seeded(3))
    again = op(images, 0.75, seeded(3))
    assert torch.equal(first, again)
    if op.is_random:
        assert not torch.equal(first, op(images, 0.75, seeded(4)))
    apply_per_sample(to_uint8(images[0]), [(name, 0.75)], seeded(3))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name", NAMES)
def test_apply_per_sample_equals_rounded_batched_result(name: str) -> None:
    image = to_uint8(smooth_images(1, low=0.0, high=1.0)[0])
    worker = apply_per_sample(image, [(name, 0.7)], seeded(5))
    batched = OPS[name](image.unsqueeze(0).to(torch.float32) / 255, 0.7, seeded(5))
    assert worker.dtype == torch.uint8 and worker.shape == image.shape
    assert torch.equal(worker, to_uint8(batched[0]))


def test_apply_per_sample_chains_ops_in_float() -> None:
    image = to_uint8(smooth_images(1)[0])
    chain = [("rotate", 0.5), ("contrast", 1.0), ("cutout", 0.6)]
    worker = apply_per_sample(image, chain, seeded(7))
    generator = seeded(7)
    batch = image.unsqueeze(0).to(torch.float32) / 255
    for name, magnitude in chain:
        batch = OPS[name](batch, magnitude, generator)
    assert torch.equal(worker, to_uint8(batch[0]))


@pytest.mark.parametrize("name", NAMES)
def test_strength_grows_with_magnitude(name: str) -> None:
    op = OPS[name]
    images = smooth_images(32)

    def change(magnitude: float) -> float:
        # The same seed couples the draws (same signs, same uniforms), so flags at m = 0.25 are a subset
        # of those at m = 1: probabilistic ops compare on the batch mean.
        return (op(images, magnitude, seeded()) - images).abs().mean().item()

    assert change(0.0) == 0.0
    assert change(1.0) > change(0.25)


# --------------------------------------------------------------------------------------------
# Golden values: the kernels against torchvision and exact geometry
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "reference", "values", "tolerance"), [
    ("brightness", TF.adjust_brightness, (1.6, 1.0, 0.3), 1e-6),
    ("contrast", TF.adjust_contrast, (1.7, 1.0, 0.3), 1e-4),  # torchvision's luma weight for red is 0.2989
    ("saturation", TF.adjust_saturation, (1.7, 1.0, 0.3), 1e-4),
    ("hue", TF.adjust_hue, (0.3, 0.0, -0.45), 1e-5),
    ("sharpness", TF.adjust_sharpness, (1.8, 1.0, 0.2), 1e-6),
])
def test_photometric_kernels_match_torchvision(name: str, reference: Callable[[torch.Tensor, float], torch.Tensor],
                                               values: tuple[float, ...], tolerance: float) -> None:
    images = smooth_images(3, low=0.0, high=1.0)
    factor = torch.tensor(values)  # one value per sample
    out = OPS[name].kernel(images, **{next(iter(OPS[name].params)): factor})
    expected = torch.stack([reference(images[i], factor[i].item()) for i in range(3)])
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=0)


def test_equalize_autocontrast_posterize_match_torchvision() -> None:
    image = to_uint8(smooth_images(4, low=0.1, high=0.7))
    images = image.to(torch.float32) / 255
    ones = torch.ones(4)
    assert torch.equal(to_uint8(OPS["equalize"].kernel(images, weight=ones)), TF.equalize(image))
    torch.testing.assert_close(OPS["autocontrast"].kernel(images, weight=ones), TF.autocontrast(images))
    assert torch.equal(to_uint8(OPS["posterize"].kernel(images, bits=torch.full((4,), 5.0))), TF.posterize(image, 5))


def test_posterize_solarize_invert_golden_values() -> None:
    images = torch.tensor([0.0, 100 / 255, 200 / 255, 1.0]).view(1, 1, 2, 2)
    posterized = OPS["posterize"].kernel(images, bits=torch.tensor([4.0]))
    assert (posterized * 255).round().flatten().tolist() == [0.0, 96.0, 192.0, 240.0]
    solarized = OPS["solarize"].kernel(images, threshold=torch.tensor([0.5]))
    torch.testing.assert_close(solarized.flatten(), torch.tensor([0.0, 100 / 255, 55 / 255, 0.0]))
    inverted = OPS["invert"].kernel(images, flip=torch.tensor([1.0]))
    assert torch.equal(inverted, 1 - images)


def test_geometric_golden_values() -> None:
    images = smooth_images(2, height=8, width=8)
    flipped = OPS["hflip"].kernel(images, flip=torch.tensor([1.0, 0.0]))
    assert torch.equal(flipped[0], images[0].flip(-1)) and torch.equal(flipped[1], images[1])
    # A quarter turn is exact under bilinear sampling with align_corners=False.
    turned = OPS["rotate"].kernel(images, angle=torch.tensor([90.0, -90.0]))
    torch.testing.assert_close(turned[0], images[0].rot90(1, (-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(turned[1], images[1].rot90(-1, (-2, -1)), atol=1e-5, rtol=0)
    # A half turn of a non-square image keeps it rigid: both axes reversed.
    wide = smooth_images(1, height=6, width=10)
    torch.testing.assert_close(OPS["rotate"].kernel(wide, angle=torch.tensor([180.0])), wide.flip(-1, -2),
                               atol=1e-5, rtol=0)
    # Whole-pixel shifts copy values exactly and fill with zeros.
    shifted = OPS["translate_x"].kernel(images, shift=torch.tensor([0.25, -0.25]))
    assert torch.equal(shifted[0, :, :, 2:], images[0, :, :, :-2]) and (shifted[0, :, :, :2] == 0).all()
    assert torch.equal(shifted[1, :, :, :-2], images[1, :, :, 2:]) and (shifted[1, :, :, -2:] == 0).all()
    down = OPS["translate_y"].kernel(images, shift=torch.tensor([0.125, 0.0]))
    assert torch.equal(down[0, :, 1:], images[0, :, :-1]) and torch.equal(down[1], images[1])


def test_crop_shifts_are_whole_pixels_within_the_padding() -> None:
    images = smooth_images(64, height=8, width=8)
    params = OPS["crop"].draw(torch.ones(64), seeded())
    out = OPS["crop"].kernel(images, **params)
    pad = 2  # 0.25 of 8 pixels
    seen = set()
    for i in range(64):
        matches = [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)
                   if torch.equal(out[i:i + 1], OPS["translate_y"].kernel(
                       OPS["translate_x"].kernel(images[i:i + 1], shift=torch.tensor([dx / 8])),
                       shift=torch.tensor([dy / 8])))]
        assert matches, f"sample {i} is not a whole-pixel shift within ±{pad}"
        seen.update(matches)
    assert len(seen) > 10  # offsets really spread over the (2·pad + 1)² positions


def test_scale_zooms_about_the_centre() -> None:
    images = smooth_images(1, height=8, width=8)
    zoomed_out = OPS["scale"].kernel(images, scale=torch.tensor([0.5]))
    assert (zoomed_out[..., :2, :] == 0).all() and (zoomed_out[..., 2:6, 2:6] > 0).all()


def test_blur_keeps_constant_images_and_smooths_edges() -> None:
    constant = torch.full((2, 3, 9, 9), 0.4)
    torch.testing.assert_close(OPS["blur"].kernel(constant, sigma=torch.tensor([1.5, 0.7])), constant)
    edge = torch.zeros(2, 1, 9, 9)
    edge[..., 4:] = 1.0
    blurred = OPS["blur"].kernel(edge, sigma=torch.tensor([1.5, 0.5]))
    assert blurred[0, 0, 4, 3] > blurred[1, 0, 4, 3] > 0  # a wider sigma spreads the edge further


def test_cutout_fills_a_grey_square_of_the_drawn_side() -> None:
    images = torch.zeros(1, 3, 16, 16)
    out = OPS["cutout"].kernel(images, side=torch.tensor([0.5]), center_x=torch.tensor([0.5]),
                               center_y=torch.tensor([0.5]))
    assert (out == 0.5).sum().item() == 3 * 8 * 8
    assert (out[..., 4:12, 4:12] == 0.5).all()


def test_one_channel_colour_ops_are_no_ops() -> None:
    images = smooth_images(4, channels=1)
    for name in ("saturation", "hue", "grayscale"):
        assert torch.equal(OPS[name](images, 1.0, seeded()), images)


def test_colour_ops_reject_other_channel_counts() -> None:
    with pytest.raises(ValueError, match="1 or 3 channels"):
        OPS["hue"](torch.rand(2, 4, 8, 8), 1.0, seeded())


# --------------------------------------------------------------------------------------------
# Drawing and the registry
# --------------------------------------------------------------------------------------------


def test_draw_follows_the_declared_ranges() -> None:
    magnitude = torch.tensor([0.0, 0.25, 0.5, 1.0])
    angle = OPS["rotate"].draw(magnitude, seeded())["angle"]
    torch.testing.assert_close(angle.abs(), torch.tensor([0.0, 7.5, 15.0, 30.0]))
    scale = OPS["scale"].draw(magnitude, seeded())["scale"]
    torch.testing.assert_close((scale - 1).abs(), torch.tensor([0.0, 0.075, 0.15, 0.3]))
    bits = OPS["posterize"].draw(magnitude, seeded())["bits"]
    torch.testing.assert_close(bits, torch.tensor([8.0, 7.0, 6.0, 4.0]))
    flags = OPS["hflip"].draw(torch.ones(4000), seeded())["flip"]
    assert set(flags.unique().tolist()) <= {0.0, 1.0} and abs(flags.mean().item() - 0.5) < 0.05
    assert OPS["hflip"].draw(torch.zeros(100), seeded())["flip"].sum() == 0


def test_draw_takes_the_same_randomness_whatever_the_magnitude() -> None:
    first, second = seeded(9), seeded(9)
    OPS["cutout"].draw(torch.zeros(8), first)
    OPS["cutout"].draw(torch.ones(8), second)
    assert torch.equal(torch.rand(4, generator=first), torch.rand(4, generator=second))


def darken(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return images * factor.view(-1, 1, 1, 1)


def test_registry_and_validation() -> None:
    assert all(op.name == name and op.kind in ("geometric", "photometric", "occlusion") for name, op in OPS.items())
    with pytest.raises(ValueError, match="already registered"):
        register_op(OPS["rotate"])
    op = Op("test_only_darken", "photometric", {"factor": (1.0, 0.5)}, fn=darken)
    try:
        assert register_op(op) is op and OPS[op.name] is op
        assert register_op(op, replace=True) is op
    finally:
        del OPS[op.name]
    with pytest.raises(ValueError, match="kind"):
        Op("bad", "colour", {"x": (0.0, 1.0)}, fn=lambda x: x)
    with pytest.raises(ValueError, match="signed"):
        Op("bad", "photometric", {"x": (0.0, 1.0)}, ("y",), fn=lambda x: x)
    with pytest.raises(ValueError, match="probability"):
        Op("bad", "photometric", {"p": (0.0, 2.0)}, fn=lambda x: x, bernoulli=("p",))
    with pytest.raises(ValueError, match="magnitude"):
        OPS["rotate"](torch.rand(2, 3, 8, 8), 1.5)
    with pytest.raises(ValueError, match="float tensor"):
        OPS["rotate"](torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 0.5)
    with pytest.raises(KeyError, match="unknown ops"):
        apply_per_sample(torch.zeros(3, 8, 8, dtype=torch.uint8), [("nope", 0.5)])
    with pytest.raises(ValueError, match="uint8"):
        apply_per_sample(torch.zeros(3, 8, 8), [("rotate", 0.5)])


def test_ops_are_frozen_and_keep_a_private_copy_of_their_ranges() -> None:
    ranges = {"factor": (1.0, 0.5)}
    op = Op("copy", "photometric", ranges, fn=lambda x, factor: x)
    ranges["factor"] = (0.0, 0.0)
    assert op.params["factor"] == (1.0, 0.5)
    with pytest.raises(AttributeError):
        op.name = "other"  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# mix_batch
# --------------------------------------------------------------------------------------------


def constant_batch(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample i is the constant image (i + 1)/(B + 1) with label i: pixel shares can be read back."""
    levels = (torch.arange(batch, dtype=torch.float64) + 1) / (batch + 1)
    return levels.view(-1, 1, 1, 1).expand(-1, 3, 12, 12).contiguous(), torch.arange(batch)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mix_zero_magnitude_is_the_identity(kind: str) -> None:
    images = smooth_images(6)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    mixed, targets = mix_batch(images, labels, kind, 0.0, seeded(), num_classes=5)
    assert torch.equal(mixed, images) and mixed.data_ptr() != images.data_ptr()
    assert torch.equal(targets, F.one_hot(labels, 5).float())
    soft = torch.softmax(torch.randn(6, 5, generator=seeded()), 1)
    assert torch.equal(mix_batch(images, soft, kind, 0.0, seeded())[1], soft)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mix_targets_follow_the_pixel_share(kind: str) -> None:
    images, labels = constant_batch(16)
    levels = images[:, 0, 0, 0]
    state = torch.get_rng_state()
    mixed, targets = mix_batch(images, labels, kind, 1.0, seeded(1), num_classes=16)
    assert torch.equal(torch.get_rng_state(), state)
    assert mixed.shape == images.shape and targets.shape == (16, 16) and targets.dtype == images.dtype
    torch.testing.assert_close(targets.sum(1), torch.ones(16, dtype=torch.float64))
    own = targets[torch.arange(16), labels]
    assert (own >= 0.5 - 1e-12).all()  # the partner share is at most m/2
    for i in range(16):
        if kind == "cutmix":
            # Each pixel is wholly one image's: count them per class.
            pixel_share = torch.stack([(mixed[i] == levels[k]).to(torch.float64).mean() for k in range(16)])
            torch.testing.assert_close(targets[i], pixel_share)
        else:
            others = targets[i].clone()
            others[i] = -1.0
            partner = int(others.argmax())  # any class when the share is 0: it then has no weight
            share = targets[i, partner]
            expected = (1 - share) * levels[i] + share * levels[partner]
            torch.testing.assert_close(mixed[i], expected.expand(3, 12, 12))
    assert own.unique().numel() > 2  # shares are drawn per sample, not once per batch


def test_mix_is_deterministic_and_validates() -> None:
    images = smooth_images(8)
    targets = F.one_hot(torch.arange(8) % 4, 4).float()
    first = mix_batch(images, targets, "cutmix", 0.8, seeded(2))
    again = mix_batch(images, targets, "cutmix", 0.8, seeded(2))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    with pytest.raises(ValueError, match="num_classes"):
        mix_batch(images, torch.arange(8), "mixup", 0.5)
    with pytest.raises(ValueError, match="kind"):
        mix_batch(images, targets, "mosaic", 0.5)
    with pytest.raises(ValueError, match="magnitude"):
        mix_batch(images, targets, "mixup", -0.1)
    with pytest.raises(ValueError, match="soft targets"):
        mix_batch(images, targets[:4], "mixup", 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_mix_keeps_the_device(device: str) -> None:
    images = smooth_images(4, device=device)
    mixed, targets = mix_batch(images, torch.arange(4, device=device), "cutmix", 1.0, seeded(), num_classes=4)
    assert mixed.device == images.device and targets.device == images.device
