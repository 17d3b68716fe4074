"""Augmentation ops with a magnitude ``m`` in [0, 1]: parameter ranges as data, per-sample draws, batched kernels.

Every op declares, for each parameter, its value at ``m = 0`` (the identity) and at ``m = 1`` (the
strongest setting); a drawn value is ``lo + (hi - lo)·m``, with a random sign per sample for the
``signed`` parameters (``lo ± (hi - lo)·m``). Drawing (:meth:`Op.draw`, from an explicit generator)
is separate from the deterministic kernel (:meth:`Op.kernel`), and the batched kernels take one
parameter value **per sample** (torchvision v2 draws one set per batch, vision#8484). ``m = 0`` is the
identity bit for bit: :meth:`Op.__call__` returns the input values of those samples unchanged.

Images are float ``[B, C, H, W]`` in [0, 1]; every kernel is pure torch, device-agnostic and free of
host syncs, so the same code runs on CPU workers and on a GPU batch.

=============  ===========  ==================================  ===================================================
op             kind         parameter: m = 0 -> m = 1           meaning
=============  ===========  ==================================  ===================================================
hflip          geometric    flip: 0 -> 0.5                      probability of a horizontal flip (0/1 flag)
crop           geometric    max_shift: 0 -> 0.25                random crop with zero padding, shift ≤ 0.25·size
translate_x    geometric    shift: 0 -> ±0.3                    whole-pixel shift, fraction of the width
translate_y    geometric    shift: 0 -> ±0.3                    whole-pixel shift, fraction of the height
rotate         geometric    angle: 0 -> ±30                     degrees, bilinear, zero fill
shear_x        geometric    shear: 0 -> ±0.3                    horizontal shear, bilinear, zero fill
shear_y        geometric    shear: 0 -> ±0.3                    vertical shear, bilinear, zero fill
scale          geometric    scale: 1 -> 1 ± 0.3                 zoom about the centre, bilinear, zero fill
brightness     photometric  factor: 1 -> 1 ± 0.9                multiply by the factor
contrast       photometric  factor: 1 -> 1 ± 0.9                blend with the mean grey level
saturation     photometric  factor: 1 -> 1 ± 0.9                blend with the greyscale image (no-op on 1 channel)
hue            photometric  shift: 0 -> ±0.5                    rotate the HSV hue, in turns (no-op on 1 channel)
sharpness      photometric  factor: 1 -> 1 ± 0.9                blend with a 3x3 smoothed image
posterize      photometric  bits: 8 -> 4                        keep the top bits of each 8-bit value
solarize       photometric  threshold: 1 -> 0.5                 invert the pixels above the threshold
equalize       photometric  weight: 0 -> 1                      blend with the histogram-equalized image
autocontrast   photometric  weight: 0 -> 1                      blend with the min-max stretched image
invert         photometric  flip: 0 -> 0.5                      probability of inverting the image (0/1 flag)
grayscale      photometric  weight: 0 -> 1                      blend with the greyscale image (no-op on 1 channel)
blur           photometric  sigma: 0 -> 1.5                     Gaussian blur, sigma in pixels
cutout         occlusion    side: 0 -> 0.5                      grey (0.5) square, side as a fraction of the size
resized_crop   geometric    spread: 0 -> 1                      random-resized crop: 0 = the reference box, 1 = timm's
                                                                RandomResizedCrop (scale 0.08..1, ratio 3/4..4/3)
=============  ===========  ==================================  ===================================================

``resized_crop`` is the large-image regime's crop. On a batch it crops inside each image and resizes the box
back to the image's size (the reference box at ``m = 0`` is the whole image). On one full decoded image
(:meth:`cycdata.loaders.ImageFileDataset.resized_crop`, DataLoader workers) the same draws place the box in
the full image, the reference is the evaluation crop (:data:`CROP_PCT`), and the box is resized to the
model's image size: ``m = 0`` is exactly the evaluation transform. :func:`crop_boxes` maps the draws to boxes
for both. It is a *sizing* op (:data:`SIZING_OPS`): RandAugment pools without an explicit list leave it out.

Example:
    >>> import torch
    >>> images = torch.rand(4, 3, 16, 16)
    >>> generator = torch.Generator().manual_seed(0)
    >>> out = OPS["rotate"](images, 0.5, generator)
    >>> out.shape, bool(out.min() >= 0), bool(out.max() <= 1)
    (torch.Size([4, 3, 16, 16]), True, True)
    >>> torch.equal(OPS["rotate"](images, 0.0, generator), images)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CROP_PCT", "KINDS", "MIX_KINDS", "OPS", "RRC_RATIO", "RRC_SCALE", "SIZING_OPS", "Op", "apply_per_sample",
           "crop_boxes", "mix_batch", "register_op"]

KINDS = ("geometric", "photometric", "occlusion")
MIX_KINDS = ("mixup", "cutmix")

# ITU-R 601 luma weights, as PIL and torchvision use for greyscale.
_LUMA = (0.299, 0.587, 0.114)
# Blur kernels have a fixed support (a data-dependent size would need a host sync): ±5 px covers
# more than 3 sigma at the strongest rung (1.5 px); a larger sigma is truncated there.
_BLUR_RADIUS = 5
# Cutout fills with mid grey: the neutral value of [0, 1] images (0 is black, not the mean).
_CUTOUT_FILL = 0.5
# The random-resized crop at m = 1: torchvision's and timm's RandomResizedCrop defaults, the crop's area as a
# fraction of the image's and its aspect ratio (width / height).
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
# timm's evaluation crop (crop_pct): the shorter side is resized to size / 0.875, then the centre size x size.
CROP_PCT = 0.875
# Ops that choose the image's frame (they act first, on the full image, in the worker path).
SIZING_OPS = frozenset({"resized_crop"})


# --------------------------------------------------------------------------------------------
# Drawing helpers: every random number comes from the given generator, drawn in float32 on the
# generator's device, so a seed gives the same parameters for every image dtype and device.
# --------------------------------------------------------------------------------------------


def _uniform(size: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    device = generator.device if generator is not None else like.device
    values = torch.rand(size, generator=generator, device=device, dtype=torch.float32)
    return values.to(device=like.device, dtype=like.dtype)


def _permutation(size: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    source = generator.device if generator is not None else device
    return torch.randperm(size, generator=generator, device=source).to(device)


def _col(values: Tensor, images: Tensor) -> Tensor:
    """Per-sample values ``[B]`` as ``[B, 1, 1, 1]`` in the images' dtype and device, for broadcasting."""
    return values.to(device=images.device, dtype=images.dtype).view(-1, 1, 1, 1)


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        dtype = images.dtype if isinstance(images, Tensor) else None
        raise ValueError(f"images must be a float tensor [B, C, H, W] in [0, 1], got {shape} {dtype}")


def _as_magnitude(magnitude: float | Tensor, images: Tensor) -> Tensor:
    """The magnitude as a ``[B]`` tensor in the images' dtype and device (a number is broadcast)."""
    batch = images.shape[0]
    if isinstance(magnitude, Tensor):
        values = magnitude.to(device=images.device, dtype=images.dtype)
        if values.dim() == 0:
            return values.expand(batch)
        if values.shape != (batch,):
            raise ValueError(f"magnitude must be a number or a tensor [B] = [{batch}], got {tuple(values.shape)}")
        return values
    if not 0.0 <= float(magnitude) <= 1.0:
        raise ValueError(f"magnitude must be in [0, 1], got {magnitude}")
    return torch.full((batch,), float(magnitude), dtype=images.dtype, device=images.device)


# --------------------------------------------------------------------------------------------
# The op: ranges as data, drawing, kernel.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One augmentation with a magnitude in [0, 1]: its parameter ranges, its drawing and its kernel.

    Attributes:
        name: The registry key.
        kind: ``"geometric"``, ``"photometric"`` or ``"occlusion"``.
        params: Parameter -> ``(value at m = 0, the identity; value at m = 1, the strongest)``.
        signed: Parameters whose deviation from the m = 0 value gets a random sign per sample.
        fn: The deterministic batched kernel, ``fn(images, **params) -> images``.
        bernoulli: Parameters that are probabilities; :meth:`draw` turns them into 0/1 flags per sample.
        positions: Extra per-sample parameters drawn uniform in [0, 1) (where the op acts: crop
            offset, cutout centre); the kernel maps them to pixels.

    Example:
        >>> import torch
        >>> op = OPS["rotate"]
        >>> op.kind, op.params["angle"], op.signed
        ('geometric', (0.0, 30.0), ('angle',))
        >>> images = torch.rand(2, 3, 8, 8)
        >>> op(images, 1.0, torch.Generator().manual_seed(0)).shape
        torch.Size([2, 3, 8, 8])
    """

    name: str
    kind: str
    params: Mapping[str, tuple[float, float]] = field(hash=False)
    signed: tuple[str, ...] = ()
    fn: Callable[..., Tensor] = field(kw_only=True)
    bernoulli: tuple[str, ...] = field(default=(), kw_only=True)
    positions: tuple[str, ...] = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        # Validate up front (DESIGN rule 9): a bad op fails where it is defined, not inside a worker.
        if not self.name:
            raise ValueError("Op.name must be a non-empty string")
        if self.kind not in KINDS:
            raise ValueError(f"Op {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        ranges = {key: (float(lo), float(hi)) for key, (lo, hi) in self.params.items()}
        if not all(math.isfinite(lo) and math.isfinite(hi) for lo, hi in ranges.values()):
            raise ValueError(f"Op {self.name!r}: parameter ranges must be finite, got {ranges}")
        for group in ("signed", "bernoulli"):
            unknown = set(getattr(self, group)) - set(ranges)
            if unknown:
                raise ValueError(f"Op {self.name!r}: {group} names unknown parameters {sorted(unknown)}")
        if set(self.signed) & set(self.bernoulli):
            raise ValueError(f"Op {self.name!r}: a parameter cannot be both signed and bernoulli")
        for key in self.bernoulli:
            if not all(0.0 <= p <= 1.0 for p in ranges[key]):
                raise ValueError(f"Op {self.name!r}: probability {key!r} must stay in [0, 1], got {ranges[key]}")
        if set(self.positions) & set(ranges):
            raise ValueError(f"Op {self.name!r}: positions must not reuse parameter names")
        # A private copy, so that the caller's dict cannot change a frozen op afterwards.
        object.__setattr__(self, "params", ranges)
        object.__setattr__(self, "signed", tuple(self.signed))
        object.__setattr__(self, "bernoulli", tuple(self.bernoulli))
        object.__setattr__(self, "positions", tuple(self.positions))

    @property
    def is_random(self) -> bool:
        """Whether draws at a fixed magnitude vary from sample to sample (a sign, a flag or a position).

        Example:
            >>> OPS["rotate"].is_random, OPS["posterize"].is_random
            (True, False)
        """
        return bool(self.signed or self.bernoulli or self.positions)

    def draw(self, magnitude: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Draw one parameter set per sample: ``lo + (hi - lo)·m``, signs, flags and positions.

        How many random numbers are taken depends on the batch size only, never on the magnitude,
        so a seeded stream stays aligned whatever the schedule does. ``generator=None`` uses torch's
        global generator (the torch convention); pass a generator for explicit, isolated randomness.

        Args:
            magnitude: Float tensor ``[B]`` in [0, 1], one magnitude per sample.
            generator: The source of randomness.

        Returns:
            Parameter name -> tensor ``[B]`` (in the magnitude's dtype and device), ready for :meth:`kernel`.

        Example:
            >>> import torch
            >>> params = OPS["rotate"].draw(torch.tensor([0.0, 0.5, 1.0]), torch.Generator().manual_seed(0))
            >>> params["angle"].abs().tolist()
            [0.0, 15.0, 30.0]
        """
        if not magnitude.is_floating_point():
            magnitude = magnitude.to(torch.float32)
        batch = magnitude.shape[0]
        drawn: dict[str, Tensor] = {}
        for key, (lo, hi) in self.params.items():
            step = (hi - lo) * magnitude
            if key in self.signed:
                step = torch.where(_uniform(batch, generator, magnitude) < 0.5, -step, step)
            value = lo + step
            if key in self.bernoulli:
                # A flag with probability ``value``: u < 0 never holds, so m = 0 never fires.
                value = (_uniform(batch, generator, magnitude) < value).to(magnitude.dtype)
            drawn[key] = value
        for key in self.positions:
            drawn[key] = _uniform(batch, generator, magnitude)
        return drawn

    def kernel(self, images: Tensor, **params: Tensor) -> Tensor:
        """Apply the op with given per-sample parameters (deterministic, batched, never in place).

        Args:
            images: Float ``[B, C, H, W]`` in [0, 1].
            **params: Per-sample tensors ``[B]``, as :meth:`draw` returns them.

        Returns:
            A new tensor, same shape, dtype and device, values in [0, 1].

        Example:
            >>> import torch
            >>> images = torch.rand(2, 3, 8, 8)
            >>> out = OPS["hflip"].kernel(images, flip=torch.tensor([1.0, 0.0]))
            >>> torch.equal(out[0], images[0].flip(-1)), torch.equal(out[1], images[1])
            (True, True)
        """
        _check_images(images)
        if images.shape[0] == 0:  # affine_grid and grouped convs refuse an empty batch
            return images.clone()
        return self.fn(images, **params)

    def __call__(self, images: Tensor, magnitude: float | Tensor,
                 generator: torch.Generator | None = None) -> Tensor:
        """Draw per-sample parameters and apply the kernel; samples with ``m == 0`` come back unchanged.

        Args:
            images: Float ``[B, C, H, W]`` in [0, 1].
            magnitude: A number in [0, 1] for the whole batch, or a tensor ``[B]`` (one per sample; a
                tensor is not range-checked, since that would cost a host sync on an accelerator).
            generator: The source of randomness (``None``: torch's global generator).

        Returns:
            A new tensor, same shape, dtype and device.

        Example:
            >>> import torch
            >>> images = torch.rand(3, 3, 8, 8)
            >>> out = OPS["blur"](images, torch.tensor([0.0, 0.5, 1.0]), torch.Generator().manual_seed(0))
            >>> torch.equal(out[0], images[0]), torch.equal(out[2], images[2])
            (True, False)
        """
        _check_images(images)
        magnitude = _as_magnitude(magnitude, images)
        params = self.draw(magnitude, generator)
        if images.shape[0] == 0:
            return images.clone()
        out = self.fn(images, **params)
        # Kernels at identity parameters are not always bit exact (grid_sample, blends): select the
        # original for the m = 0 samples, so that strength 0 is exactly the identity.
        return torch.where((magnitude == 0).view(-1, 1, 1, 1), images, out)


OPS: dict[str, Op] = {}


def register_op(op: Op, *, replace: bool = False) -> Op:
    """Add an op to :data:`OPS` under its name (so config strings resolve to it) and return it.

    Args:
        op: The op to register.
        replace: Allow replacing an op of the same name (otherwise that is an error).

    Returns:
        The op, so that the call can wrap a definition.

    Example:
        >>> import torch
        >>> def darken(images, factor):
        ...     return images * factor.view(-1, 1, 1, 1)
        >>> op = register_op(Op("darken", "photometric", {"factor": (1.0, 0.5)}, fn=darken))
        >>> OPS["darken"](torch.ones(1, 1, 2, 2), 1.0).flatten().tolist()
        [0.5, 0.5, 0.5, 0.5]
        >>> del OPS["darken"]
    """
    if not isinstance(op, Op):
        raise TypeError(f"register_op expects an Op, got {type(op).__name__}")
    if op.name in OPS and not replace:
        raise ValueError(f"an op named {op.name!r} is already registered (pass replace=True to replace it)")
    OPS[op.name] = op
    return op


# --------------------------------------------------------------------------------------------
# Shared kernel pieces.
# --------------------------------------------------------------------------------------------


def _blend(images: Tensor, other: Tensor, weight: Tensor) -> Tensor:
    """``(1 - w)·images + w·other`` per sample: exactly ``images`` at w = 0 and ``other`` at w = 1."""
    w = _col(weight, images)
    return ((1 - w) * images + w * other).clamp(0, 1)


def _gray(images: Tensor) -> Tensor:
    """Luma ``[B, 1, H, W]`` of RGB images (1-channel images are their own luma)."""
    channels = images.shape[1]
    if channels == 1:
        return images
    if channels != 3:
        raise ValueError(f"colour ops need 1 or 3 channels, got {channels}")
    r, g, b = images.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _shift_pixels(images: Tensor, shift_y: Tensor, shift_x: Tensor) -> Tensor:
    """Move each image by whole pixels (per-sample integer-valued shifts), filling with zeros.

    Gathers instead of resampling: pixel values are copied exactly, never interpolated.
    """
    batch, channels, height, width = images.shape
    rows = torch.arange(height, device=images.device) - shift_y.to(images.device).long().view(-1, 1)
    cols = torch.arange(width, device=images.device) - shift_x.to(images.device).long().view(-1, 1)
    inside = (((rows >= 0) & (rows < height)).view(batch, 1, height, 1)
              & ((cols >= 0) & (cols < width)).view(batch, 1, 1, width))
    out = images.gather(2, rows.clamp(0, height - 1).view(batch, 1, height, 1).expand(-1, channels, -1, width))
    out = out.gather(3, cols.clamp(0, width - 1).view(batch, 1, 1, width).expand(-1, channels, height, -1))
    return out.masked_fill(~inside, 0.0)


def _warp(images: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """Resample each image through its own linear map ``[[a, b], [c, d]]`` about the centre (zero fill).

    The map takes output pixel offsets to input pixel offsets; it is converted to the normalized
    coordinates of ``affine_grid`` (x spans the width, y the height), so rotations stay rigid on
    non-square images.
    """
    batch, _, height, width = images.shape
    aspect = height / width
    a, b, c, d = (value.to(device=images.device, dtype=images.dtype) for value in (a, b, c, d))
    zero = torch.zeros_like(a)
    theta = torch.stack([torch.stack([a, b * aspect, zero], -1), torch.stack([c / aspect, d, zero], -1)], 1)
    grid = F.affine_grid(theta, [batch, images.shape[1], height, width], align_corners=False)
    # Bilinear weights sum to one only up to rounding: clamp keeps the contract of [0, 1].
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)


def _box_mask(height: int, width: int, box_height: Tensor, box_width: Tensor, center_y: Tensor,
              center_x: Tensor) -> Tensor:
    """Per-sample boolean boxes ``[B, 1, H, W]``: the pixels whose centres lie inside the box (in pixels)."""
    device = box_height.device
    rows = torch.arange(height, device=device, dtype=box_height.dtype) + 0.5
    cols = torch.arange(width, device=device, dtype=box_width.dtype) + 0.5
    in_rows = (rows - center_y.view(-1, 1)).abs() < box_height.view(-1, 1) / 2
    in_cols = (cols - center_x.view(-1, 1)).abs() < box_width.view(-1, 1) / 2
    return (in_rows.unsqueeze(2) & in_cols.unsqueeze(1)).unsqueeze(1)


def _rgb_to_hsv(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hue (turns in [0, 1)), saturation and value ``[B, H, W]`` of RGB images."""
    r, g, b = images.unbind(1)
    value = images.amax(1)
    chroma = value - images.amin(1)
    saturation = chroma / torch.where(value > 0, value, torch.ones_like(value))
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))  # grey pixels: every term below is 0
    rc, gc, bc = (value - r) / safe, (value - g) / safe, (value - b) / safe
    hue = torch.where(value == r, bc - gc, torch.where(value == g, 2.0 + rc - bc, 4.0 + gc - rc))
    return torch.remainder(hue / 6.0, 1.0), saturation, value


def _hsv_to_rgb(hue: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    """RGB images ``[B, 3, H, W]`` from hue (turns), saturation and value ``[B, H, W]``."""
    sector = torch.floor(hue * 6.0)
    frac = hue * 6.0 - sector
    index = torch.remainder(sector, 6).long().unsqueeze(1)
    p = (value * (1.0 - saturation)).clamp(0, 1)
    q = (value * (1.0 - saturation * frac)).clamp(0, 1)
    t = (value * (1.0 - saturation * (1.0 - frac))).clamp(0, 1)
    # Each channel takes one of six expressions by hue sector (the usual HSV table), gathered per pixel.
    red = torch.stack((value, q, p, p, t, value), 1).gather(1, index)
    green = torch.stack((t, value, value, q, p, p), 1).gather(1, index)
    blue = torch.stack((p, p, t, value, value, q), 1).gather(1, index)
    return torch.cat((red, green, blue), 1)


def _smooth3(images: Tensor) -> Tensor:
    """PIL's SMOOTH filter (3x3, centre weight 5 of 13) inside, the original pixels on the border."""
    if min(images.shape[-2:]) < 3:
        return images
    # The kernel is a 3x3 box plus 4 x the centre; the box is separable, so six slice additions do it
    # (a 1-channel conv2d over B·C planes is several times slower on CPU).
    rows = images[..., :-2, :] + images[..., 1:-1, :] + images[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    smooth = images.clone()
    smooth[..., 1:-1, 1:-1] = (box + 4 * images[..., 1:-1, 1:-1]) / 13
    return smooth


def _equalized(images: Tensor) -> Tensor:
    """Per-image, per-channel histogram equalization with 256 bins (PIL's ImageOps.equalize, batched)."""
    batch, channels, height, width = images.shape
    levels = (images * 255).round().clamp(0, 255).long().flatten(2)  # [B, C, HW]
    # Integer scatter-add: exact and deterministic on every device (float atomics are not).
    hist = torch.zeros(batch, channels, 256, dtype=torch.long, device=images.device)
    hist.scatter_add_(2, levels, torch.ones_like(levels))
    top_count = hist.gather(2, levels.amax(2, keepdim=True))
    # PIL spreads all pixels but those of the brightest level over 255 steps.
    step = (height * width - top_count) // 255
    below = hist.cumsum(2) - hist  # pixels strictly darker than each level
    lut = ((below + step // 2) // step.clamp_min(1)).clamp(max=255)
    equalized = lut.gather(2, levels).to(images.dtype) / 255
    # A channel with (almost) one level has nothing to spread: PIL leaves it as it is.
    return torch.where(step > 0, equalized, images.flatten(2)).view_as(images)


def _autocontrasted(images: Tensor) -> Tensor:
    """Per-image, per-channel min-max stretch to [0, 1]; flat channels stay as they are."""
    low = images.amin((2, 3), keepdim=True)
    high = images.amax((2, 3), keepdim=True)
    spread = high - low
    stretched = (images - low) / torch.where(spread > 0, spread, torch.ones_like(spread))
    return torch.where(spread > 0, stretched, images).clamp(0, 1)


def _gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with one sigma per sample, as two grouped convolutions."""
    batch, channels, height, width = images.shape
    offsets = torch.arange(-_BLUR_RADIUS, _BLUR_RADIUS + 1, dtype=images.dtype, device=images.device)
    # sigma -> 0 gives a delta kernel (exp underflows to 0), not a division by zero.
    sigma = sigma.to(device=images.device, dtype=images.dtype).clamp_min(1e-3).view(-1, 1)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    taps = (taps / taps.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # [B·C, K]
    size = taps.shape[1]
    # One group per (sample, channel): each image meets its own kernel in a single conv call.
    flat = F.pad(images.reshape(1, batch * channels, height, width), [_BLUR_RADIUS] * 4, mode="replicate")
    flat = F.conv2d(flat, taps.view(-1, 1, 1, size), groups=batch * channels)
    flat = F.conv2d(flat, taps.view(-1, 1, size, 1), groups=batch * channels)
    return flat.view(batch, channels, height, width).clamp(0, 1)


# --------------------------------------------------------------------------------------------
# Kernels: one line of docstring each gives the parameter and its range (m = 0 -> m = 1).
# --------------------------------------------------------------------------------------------


def _hflip(images: Tensor, flip: Tensor) -> Tensor:
    """Horizontal flip where the per-sample flag is 1; flip probability 0 -> 0.5."""
    return torch.where(_col(flip, images) > 0.5, images.flip(-1), images)


def _crop(images: Tensor, max_shift: Tensor, offset_x: Tensor, offset_y: Tensor) -> Tensor:
    """Random crop after zero padding by max_shift·size (0 -> 0.25), offsets uniform over the whole pixels."""
    height, width = images.shape[-2:]

    def shift(offset: Tensor, size: int) -> Tensor:
        # Padding p pixels then cropping at a uniform offset = a shift uniform over {-p, ..., p}.
        pad = (max_shift * size).round()
        return torch.floor(offset * (2 * pad + 1)).clamp(max=2 * pad) - pad

    return _shift_pixels(images, shift(offset_y, height), shift(offset_x, width))


def _translate_x(images: Tensor, shift: Tensor) -> Tensor:
    """Horizontal shift by shift·width whole pixels, zero fill; shift 0 -> ±0.3."""
    return _shift_pixels(images, torch.zeros_like(shift), (shift * images.shape[-1]).round())


def _translate_y(images: Tensor, shift: Tensor) -> Tensor:
    """Vertical shift by shift·height whole pixels, zero fill; shift 0 -> ±0.3."""
    return _shift_pixels(images, (shift * images.shape[-2]).round(), torch.zeros_like(shift))


def _rotate(images: Tensor, angle: Tensor) -> Tensor:
    """Rotation about the centre by angle degrees, bilinear, zero fill; angle 0 -> ±30."""
    radians = torch.deg2rad(angle)
    cos, sin = torch.cos(radians), torch.sin(radians)
    return _warp(images, cos, -sin, sin, cos)


def _shear_x(images: Tensor, shear: Tensor) -> Tensor:
    """Horizontal shear x' = x + shear·y about the centre, bilinear, zero fill; shear 0 -> ±0.3."""
    one, zero = torch.ones_like(shear), torch.zeros_like(shear)
    return _warp(images, one, shear, zero, one)


def _shear_y(images: Tensor, shear: Tensor) -> Tensor:
    """Vertical shear y' = y + shear·x about the centre, bilinear, zero fill; shear 0 -> ±0.3."""
    one, zero = torch.ones_like(shear), torch.zeros_like(shear)
    return _warp(images, one, zero, shear, one)


def _scale(images: Tensor, scale: Tensor) -> Tensor:
    """Zoom about the centre by the factor (> 1 zooms in), bilinear, zero fill; scale 1 -> 1 ± 0.3."""
    inverse, zero = 1.0 / scale, torch.zeros_like(scale)
    return _warp(images, inverse, zero, zero, inverse)


def _brightness(images: Tensor, factor: Tensor) -> Tensor:
    """Multiply by the factor (torchvision's adjust_brightness); factor 1 -> 1 ± 0.9."""
    return (images * _col(factor, images)).clamp(0, 1)


def _contrast(images: Tensor, factor: Tensor) -> Tensor:
    """Blend with the per-image mean grey level (torchvision's adjust_contrast); factor 1 -> 1 ± 0.9."""
    mean = _gray(images).mean((1, 2, 3), keepdim=True)
    return _blend(mean.expand_as(images), images, factor)


def _saturation(images: Tensor, factor: Tensor) -> Tensor:
    """Blend with the greyscale image (adjust_saturation), no-op on 1 channel; factor 1 -> 1 ± 0.9."""
    if images.shape[1] == 1:
        return images.clone()
    return _blend(_gray(images).expand_as(images), images, factor)


def _hue(images: Tensor, shift: Tensor) -> Tensor:
    """Rotate the HSV hue by shift turns, no-op on 1 channel; shift 0 -> ±0.5."""
    if images.shape[1] == 1:
        return images.clone()
    _gray(images)  # rejects channel counts other than 1 and 3
    hue, saturation, value = _rgb_to_hsv(images)
    shift = shift.to(device=images.device, dtype=images.dtype).view(-1, 1, 1)
    return _hsv_to_rgb(torch.remainder(hue + shift, 1.0), saturation, value).clamp(0, 1)


def _sharpness(images: Tensor, factor: Tensor) -> Tensor:
    """Blend with the 3x3 smoothed image (> 1 sharpens, torchvision's adjust_sharpness); factor 1 -> 1 ± 0.9."""
    return _blend(_smooth3(images), images, factor)


def _posterize(images: Tensor, bits: Tensor) -> Tensor:
    """Keep the top round(bits) bits of each 8-bit value (8 bits keeps the image); bits 8 -> 4."""
    bits = _col(bits, images).round()
    quantum = torch.pow(2.0, 8.0 - bits)
    levels = (images * 255).round()
    posterized = torch.floor(levels / quantum) * quantum / 255
    return torch.where(bits >= 8, images, posterized)


def _solarize(images: Tensor, threshold: Tensor) -> Tensor:
    """Invert the pixels strictly above the threshold; threshold 1 -> 0.5."""
    return torch.where(images > _col(threshold, images), 1 - images, images)


def _equalize(images: Tensor, weight: Tensor) -> Tensor:
    """Blend with the per-image, per-channel histogram-equalized image; weight 0 -> 1."""
    return _blend(images, _equalized(images), weight)


def _autocontrast(images: Tensor, weight: Tensor) -> Tensor:
    """Blend with the per-image, per-channel min-max stretched image; weight 0 -> 1."""
    return _blend(images, _autocontrasted(images), weight)


def _invert(images: Tensor, flip: Tensor) -> Tensor:
    """Invert (1 - x) where the per-sample flag is 1; invert probability 0 -> 0.5."""
    return torch.where(_col(flip, images) > 0.5, 1 - images, images)


def _grayscale(images: Tensor, weight: Tensor) -> Tensor:
    """Blend with the greyscale image, no-op on 1 channel; weight 0 -> 1."""
    if images.shape[1] == 1:
        return images.clone()
    return _blend(images, _gray(images).expand_as(images), weight)


def _blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Gaussian blur with a per-sample sigma in pixels (support ±5 px, replicate border); sigma 0 -> 1.5."""
    return _gaussian_blur(images, sigma)


def _cutout(images: Tensor, side: Tensor, center_x: Tensor, center_y: Tensor) -> Tensor:
    """Fill a box of side·(H, W) (a square on square images) at a uniform centre with grey 0.5; side 0 -> 0.5."""
    height, width = images.shape[-2:]
    side, center_x, center_y = (_col(value, images).view(-1) for value in (side, center_x, center_y))
    mask = _box_mask(height, width, side * height, side * width, center_y * height, center_x * width)
    return images.masked_fill(mask, _CUTOUT_FILL)


def crop_boxes(height: float | Tensor, width: float | Tensor, spread: Tensor, area: Tensor, aspect: Tensor,
               offset_x: Tensor, offset_y: Tensor,
               reference: tuple[float | Tensor, float | Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample crop boxes ``(top, left, box_height, box_width)`` in pixels (floats) for ``resized_crop``.

    Each draw moves from the reference box (``spread = 0``: ``reference = (h0, w0)`` centred, by default the
    whole image) towards timm's RandomResizedCrop draw (``spread = 1``), linearly in area, in log aspect ratio
    and in position: ``area_px = a0 + m·(s·H·W - a0)`` with ``s = 0.08 + 0.92·area``, ``log r = log r0 +
    m·(log r_timm - log r0)``, ``left = (W - w)·(0.5 + m·(offset_x - 0.5))``. So the range of scales and
    ratios grows with ``m``, from the reference alone to timm's ``(0.08, 1)`` and ``(3/4, 4/3)``. A box wider
    or taller than the image is clamped to it (timm retries ten times, then falls back to a centre crop;
    clamping keeps one draw per sample whatever the magnitude).

    Args:
        height, width: The image's size in pixels.
        spread: ``m`` per sample ``[B]``.
        area, aspect, offset_x, offset_y: Uniform draws in [0, 1) per sample ``[B]``.
        reference: ``(h0, w0)`` of the box at ``m = 0`` (default: the whole image).

    Returns:
        Four float tensors ``[B]``.

    Example:
        >>> import torch
        >>> half = torch.full((1,), 0.5)
        >>> [round(float(v), 3) for v in crop_boxes(100, 200, torch.zeros(1), half, half, half, half)]
        [0.0, 0.0, 100.0, 200.0]
        >>> top, left, h, w = crop_boxes(100, 100, torch.ones(1), torch.zeros(1), half, half, half)
        >>> round(float(h * w) / 100 ** 2, 3)  # timm's smallest area at m = 1
        0.08
    """
    spread = spread.to(torch.float32)
    ref_h, ref_w = (height, width) if reference is None else reference
    ref_h, ref_w = (torch.as_tensor(value, dtype=torch.float32) for value in (ref_h, ref_w))
    full_h, full_w = (torch.as_tensor(value, dtype=torch.float32) for value in (height, width))
    scale = RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * area.to(torch.float32)
    pixels = ref_h * ref_w + spread * (scale * full_h * full_w - ref_h * ref_w)
    low, high = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    log_ratio = torch.log(ref_w / ref_h)
    log_ratio = log_ratio + spread * (low + (high - low) * aspect.to(torch.float32) - log_ratio)
    ratio = torch.exp(log_ratio)
    box_w = torch.minimum(torch.sqrt(pixels * ratio), full_w)
    box_h = torch.minimum(torch.sqrt(pixels / ratio), full_h)
    left = (full_w - box_w) * (0.5 + spread * (offset_x.to(torch.float32) - 0.5))
    top = (full_h - box_h) * (0.5 + spread * (offset_y.to(torch.float32) - 0.5))
    return top, left, box_h, box_w


def _resized_crop(images: Tensor, spread: Tensor, area: Tensor, aspect: Tensor, offset_x: Tensor,
                  offset_y: Tensor) -> Tensor:
    """Crop each image to its box (crop_boxes) and resize it back to the image's size, bilinear; spread 0 -> 1."""
    batch, _, height, width = images.shape
    # 0-dim CPU tensors (the sizes) combine with tensors on any device, so the boxes stay where the images are.
    top, left, box_h, box_w = (value.to(images.dtype) for value in crop_boxes(
        height, width, spread, area, aspect, offset_x, offset_y))
    zero = torch.zeros_like(top)
    # affine_grid's normalized coordinates: the box's centre and half-extent as fractions of the image.
    center_x = (left + box_w / 2) / width * 2 - 1
    center_y = (top + box_h / 2) / height * 2 - 1
    theta = torch.stack([torch.stack([box_w / width, zero, center_x], -1),
                         torch.stack([zero, box_h / height, center_y], -1)], 1)
    grid = F.affine_grid(theta, [batch, images.shape[1], height, width], align_corners=False)
    # The box lies inside the image: border padding only guards the last half pixel against zero bleed.
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False).clamp(0, 1)


for _op in (
    Op("hflip", "geometric", {"flip": (0.0, 0.5)}, fn=_hflip, bernoulli=("flip",)),
    Op("crop", "geometric", {"max_shift": (0.0, 0.25)}, fn=_crop, positions=("offset_x", "offset_y")),
    Op("translate_x", "geometric", {"shift": (0.0, 0.3)}, ("shift",), fn=_translate_x),
    Op("translate_y", "geometric", {"shift": (0.0, 0.3)}, ("shift",), fn=_translate_y),
    Op("rotate", "geometric", {"angle": (0.0, 30.0)}, ("angle",), fn=_rotate),
    Op("shear_x", "geometric", {"shear": (0.0, 0.3)}, ("shear",), fn=_shear_x),
    Op("shear_y", "geometric", {"shear": (0.0, 0.3)}, ("shear",), fn=_shear_y),
    Op("scale", "geometric", {"scale": (1.0, 1.3)}, ("scale",), fn=_scale),
    Op("brightness", "photometric", {"factor": (1.0, 1.9)}, ("factor",), fn=_brightness),
    Op("contrast", "photometric", {"factor": (1.0, 1.9)}, ("factor",), fn=_contrast),
    Op("saturation", "photometric", {"factor": (1.0, 1.9)}, ("factor",), fn=_saturation),
    Op("hue", "photometric", {"shift": (0.0, 0.5)}, ("shift",), fn=_hue),
    Op("sharpness", "photometric", {"factor": (1.0, 1.9)}, ("factor",), fn=_sharpness),
    Op("posterize", "photometric", {"bits": (8.0, 4.0)}, fn=_posterize),
    Op("solarize", "photometric", {"threshold": (1.0, 0.5)}, fn=_solarize),
    Op("equalize", "photometric", {"weight": (0.0, 1.0)}, fn=_equalize),
    Op("autocontrast", "photometric", {"weight": (0.0, 1.0)}, fn=_autocontrast),
    Op("invert", "photometric", {"flip": (0.0, 0.5)}, fn=_invert, bernoulli=("flip",)),
    Op("grayscale", "photometric", {"weight": (0.0, 1.0)}, fn=_grayscale),
    Op("blur", "photometric", {"sigma": (0.0, 1.5)}, fn=_blur),
    Op("cutout", "occlusion", {"side": (0.0, 0.5)}, fn=_cutout, positions=("center_x", "center_y")),
    Op("resized_crop", "geometric", {"spread": (0.0, 1.0)}, fn=_resized_crop,
       positions=("area", "aspect", "offset_x", "offset_y")),
):
    register_op(_op)
del _op


# --------------------------------------------------------------------------------------------
# Batch mixing and the worker path.
# --------------------------------------------------------------------------------------------


def _soft_targets(targets: Tensor, batch: int, num_classes: int | None, dtype: torch.dtype) -> Tensor:
    if targets.is_floating_point():
        if targets.dim() != 2 or targets.shape[0] != batch:
            raise ValueError(f"soft targets must be [B, K] with B = {batch}, got {tuple(targets.shape)}")
        return targets
    if targets.dim() != 1 or targets.shape[0] != batch:
        raise ValueError(f"integer labels must be [B] with B = {batch}, got {tuple(targets.shape)}")
    if num_classes is None:
        raise ValueError("integer labels need num_classes to become soft targets")
    return F.one_hot(targets.long(), num_classes).to(dtype)


def mix_batch(images: Tensor, targets: Tensor, kind: str, magnitude: float, generator: torch.Generator | None = None,
              *, num_classes: int | None = None) -> tuple[Tensor, Tensor]:
    """Mix each sample with a partner from a per-batch random permutation; targets follow the pixel share.

    The partner share is drawn **per sample**, uniform in ``[0, m/2]`` (so the own image always keeps at
    least half, and no Beta sampler is needed: torch.distributions cannot take a generator):

    * ``"mixup"``: ``x' = (1 - s)·x + s·x_partner`` with share ``s``.
    * ``"cutmix"``: a box of area fraction ``a`` (side ``√a`` of the height and of the width) at a uniform
      centre, clipped at the borders, is pasted from the partner; ``s`` is the share of pixels actually
      pasted, so clipping is accounted for.

    Targets become ``(1 - s)·y + s·y_partner``. ``m = 0`` returns the images' values unchanged and the
    targets as soft one-hot rows.

    Args:
        images: Float ``[B, C, H, W]`` (any normalization).
        targets: Soft float targets ``[B, K]``, or integer labels ``[B]`` with ``num_classes``.
        kind: ``"mixup"`` or ``"cutmix"``.
        magnitude: In [0, 1]; the largest partner share is ``m/2``.
        generator: The source of randomness (``None``: torch's global generator).
        num_classes: The number of classes, for integer labels.

    Returns:
        The mixed images (new tensor) and soft targets ``[B, K]``.

    Example:
        >>> import torch
        >>> images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
        >>> mixed, soft = mix_batch(images, labels, "cutmix", 1.0, torch.Generator().manual_seed(0), num_classes=3)
        >>> mixed.shape, soft.shape, torch.allclose(soft.sum(1), torch.ones(4))
        (torch.Size([4, 3, 8, 8]), torch.Size([4, 3]), True)
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError("images must be a float tensor [B, C, H, W]")
    if kind not in MIX_KINDS:
        raise ValueError(f"kind must be one of {MIX_KINDS}, got {kind!r}")
    if not 0.0 <= float(magnitude) <= 1.0:
        raise ValueError(f"magnitude must be in [0, 1], got {magnitude}")
    batch, _, height, width = images.shape
    soft = _soft_targets(targets, batch, num_classes, images.dtype)
    partner = _permutation(batch, generator, images.device)
    like = torch.empty(0, dtype=images.dtype, device=images.device)
    share = _uniform(batch, generator, like) * (float(magnitude) / 2)
    if kind == "mixup":
        w = _col(share, images)
        mixed = (1 - w) * images + w * images[partner]  # exactly the images at w = 0
    else:
        side = share.sqrt()
        center_y, center_x = _uniform(batch, generator, like), _uniform(batch, generator, like)
        mask = _box_mask(height, width, side * height, side * width, center_y * height, center_x * width)
        mixed = torch.where(mask, images[partner], images)
        share = mask.flatten(1).to(images.dtype).mean(1)  # the pixels actually pasted
    share = share.to(device=soft.device, dtype=soft.dtype).view(-1, 1)
    mixed_targets = (1 - share) * soft + share * soft[partner.to(soft.device)]
    return mixed, mixed_targets


def apply_per_sample(image: Tensor, ops: Sequence[tuple[str, float]],
                     generator: torch.Generator | None = None) -> Tensor:
    """Apply named ops at their magnitudes to ONE uint8 image, the way a DataLoader worker does.

    The image goes to float once, through the batched kernels as a batch of one (so the result is the
    batched one for the same draws), and back to uint8 once by rounding. With every magnitude 0 the
    same uint8 values come back.

    Args:
        image: uint8 ``[C, H, W]``, as datasets yield it.
        ops: ``(op name, magnitude)`` pairs, applied in order.
        generator: The source of randomness (``None``: torch's global generator).

    Returns:
        uint8 ``[C, H, W]``.

    Example:
        >>> import torch
        >>> image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
        >>> out = apply_per_sample(image, [("rotate", 0.5), ("cutout", 1.0)], torch.Generator().manual_seed(0))
        >>> out.dtype, out.shape
        (torch.uint8, torch.Size([3, 8, 8]))
        >>> torch.equal(apply_per_sample(image, [("rotate", 0.0), ("solarize", 0.0)]), image)
        True
    """
    if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.dim() != 3:
        raise ValueError("apply_per_sample expects one uint8 image [C, H, W]")
    unknown = [name for name, _ in ops if name not in OPS]
    if unknown:
        raise KeyError(f"unknown ops {unknown}; registered: {sorted(OPS)}")
    batch = image.unsqueeze(0).to(torch.float32) / 255
    for name, magnitude in ops:
        batch = OPS[name](batch, magnitude, generator)
    return (batch[0] * 255).round().clamp(0, 255).to(torch.uint8)
