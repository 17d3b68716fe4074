"""The per-sample worker path: one uint8 image, augmented at a strength chosen in the main process.

In DataLoader workers each sample is augmented alone, on its uint8 ``[C, H, W]`` tensor. The strength
and the seed travel with the index (DESIGN rule 3: workers never see a knob changed later in the main
process), and :class:`LadderTransform` turns ``(image, strength, seed)`` into the augmented image.

The *parameters* of every op are always drawn by :meth:`Op.draw <cycdata.augment_ladder.ops.Op.draw>`,
so their meaning and ranges are the same whatever executes them; a *backend* only executes one op's
kernel for given parameters, uint8 in, uint8 out:

* ``"torch"``: the batched kernels of :mod:`~cycdata.augment_ladder.ops` on a batch of one, in float,
  rounded back to uint8 once per op (uint8 -> float -> uint8 is exact, so identity stays identity).
* ``"torchvision"``: ``torchvision.transforms.v2.functional`` kernels on the uint8 tensor.
* ``"albumentations"``: albumentations (>= 2.0) functional kernels on an HWC uint8 numpy copy.

Where the libraries differ from ``ops.py`` only by rounding or interpolation details, the library kernel
is used and the test suite bounds the difference (mean absolute difference per op, in grey levels).
Whole-pixel geometry (``crop``, ``translate_x/y``), flips, ``posterize``, ``solarize``, ``invert`` and
``cutout`` are exact on every backend: their integer positions and thresholds are computed here with the
same float32 arithmetic as the ``ops.py`` kernels, and the library moves or fills the pixels.

Mapping (``ops.py`` parameter -> library call; ``w`` blends are done here, in float, as ``ops.py`` does)::

    op            torchvision.transforms.v2.functional          albumentations 2.x functional
    hflip         horizontal_flip                               albucore.hflip
    crop          crop (out of bounds = zero padding + crop)    pad_with_params + crops.crop
    translate_*   affine(translate=[dx, dy], NEAREST)           warp_affine(translate, INTER_NEAREST)
    rotate        rotate(angle, BILINEAR, fill=None)            warp_affine(rotate=angle, INTER_LINEAR)
    shear_x/y     affine(shear=atan(s) degrees, BILINEAR)       warp_affine(shear=-atan(s) degrees)
    scale         affine(scale=s, BILINEAR)                     warp_affine(scale=s, INTER_LINEAR)
    brightness    adjust_brightness                             adjust_brightness_torchvision
    contrast      adjust_contrast                               adjust_contrast_torchvision
    saturation    adjust_saturation                             adjust_saturation_torchvision
    hue           adjust_hue                                    adjust_hue_torchvision (OpenCV 8-bit HSV)
    sharpness     adjust_sharpness                              convolve(A.Sharpen's matrix, lightness 1)
    posterize     posterize(round(bits))                        posterize(round(bits))
    solarize      solarize(first inverted level)                solarize(first inverted level)
    equalize      w-blend with equalize                         torch kernel (fallback, see FALLBACKS)
    autocontrast  w-blend with autocontrast                     w-blend with auto_contrast(method="pil")
    invert        invert                                        invert
    grayscale     w-blend with rgb_to_grayscale(3 channels)     w-blend with to_gray("weighted_average")
    blur          gaussian_blur(11 x 11, sigma)                 separable_convolve(gaussian kernel, 11)
    cutout        erase(box, 128)                               dropout.cutout(box, fill=128)

:data:`FALLBACKS` lists the ops a backend runs on the torch kernel instead, because the library has no
faithful equivalent: albumentations' ``equalize(mode="pil")`` builds its lookup table from the inclusive
cumulative histogram, one bin off PIL's (tens of grey levels on smooth images), and its ``"cv"`` mode is
another algorithm. ``resized_crop`` in its batch form (a crop resized back to the image's size) runs on the
torch kernel everywhere; on full images in workers it is done by the dataset
(:func:`apply_ladder_sized`). Known, bounded differences of mapped kernels (tests/test_backends.py bounds each):
torchvision truncates where ``ops.py`` rounds (brightness, contrast, saturation, grayscale, autocontrast:
< 1 level); albumentations' hue works in OpenCV's 8-bit HSV (hue in 2-degree steps, about 0.5 level on
average), its ``auto_contrast`` histogram leaves out level 255 (a slightly stronger stretch when the image
holds pure white), and its sharpness is the 3x3 matrix ``A.Sharpen`` builds (``lightness=1``,
``alpha=(factor - 1)/13``, negative for blurring, which ``A.Sharpen`` itself does not allow) run through
albumentations' ``convolve``, with the border pixels kept as PIL and torchvision keep them. Blurs pad by
reflection in both libraries and by replication in ``ops.py`` (border pixels only).
Ops registered later with :func:`~cycdata.augment_ladder.ops.register_op` have no library kernel and
run on the torch kernel on every backend. On 1-channel images ``saturation``, ``hue`` and ``grayscale``
are the identity by definition (as in ``ops.py``, PIL and torchvision); everything else runs on the
chosen backend.

Example:
    >>> import torch
    >>> from cycdata.augment_ladder.ladder import load_ladder
    >>> image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    >>> transform = LadderTransform(load_ladder("default"), backend="torchvision")
    >>> out = transform(image, strength=1.0, seed=7)
    >>> out.dtype, out.shape, torch.equal(out, transform(image, strength=1.0, seed=7))
    (torch.uint8, torch.Size([3, 16, 16]), True)
    >>> torch.equal(transform(image, strength=0.0, seed=7), image)
    True
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from functools import cache
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cycdata.augment_ladder.ladder import Ladder, Rung
from cycdata.augment_ladder.ops import OPS, SIZING_OPS, Op

__all__ = ["BACKENDS", "FALLBACKS", "LadderTransform", "apply_ladder", "apply_ladder_sized", "apply_op", "apply_rung"]

BACKENDS = ("torch", "torchvision", "albumentations")

# Built-in ops a backend executes with the torch kernel (reasons in the module docstring).
FALLBACKS: dict[str, set[str]] = {
    "torch": set(),
    "torchvision": {"resized_crop"},
    "albumentations": {"equalize", "resized_crop"},
}

# A kernel executes one op for one sample: uint8 [C, H, W] and scalar parameters -> uint8 [C, H, W].
Kernel = Callable[[Tensor, Mapping[str, float]], Tensor]

# ops.py truncates its Gaussian at ±5 px (a fixed support avoids a host sync on a GPU): same size here.
_BLUR_SIZE = 11
# ops.py fills cutout boxes with grey 0.5, which rounds (half to even) to level 128.
_CUTOUT_LEVEL = 128
# Ops that are the identity on 1-channel images in ops.py (and in PIL and torchvision).
_COLOUR_ONLY = frozenset({"saturation", "hue", "grayscale"})


# --------------------------------------------------------------------------------------------
# Checks and the ops.py arithmetic that decides whole-pixel positions and thresholds.
# --------------------------------------------------------------------------------------------


def _check_image(image: Any) -> None:
    if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.dim() != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        dtype = image.dtype if isinstance(image, Tensor) else None
        raise ValueError(f"expected one uint8 image [C, H, W], got {shape} {dtype}")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _check_params(op: Op, params: Mapping[str, float]) -> None:
    expected = set(op.params) | set(op.positions)
    if set(params) != expected:
        raise KeyError(f"op {op.name!r} takes parameters {sorted(expected)}, got {sorted(params)} "
                       f"(draw them with OPS[{op.name!r}].draw)")


def _is_identity(op: Op, params: Mapping[str, float]) -> bool:
    """Whether the parameters are the op's m = 0 draw, whatever the positions (identity by the Op contract).

    A flag drawn with probability 0 at m = 0 is 0 there; a flag whose m = 0 probability is not 0 is random
    at m = 0, so its value says nothing and the kernel runs.
    """
    return all(params[key] == 0.0 and lo == 0.0 if key in op.bernoulli else params[key] == lo
               for key, (lo, _) in op.params.items())


# Positions and thresholds are recomputed here in numpy float32, operation for operation as the ops.py
# kernels compute them in torch float32 (same IEEE products, round half to even), so that whole-pixel
# ops agree exactly; numpy scalars cost a microsecond where a torch tensor costs ten.
_F32 = np.float32
_LEVELS = np.arange(256, dtype=_F32) / _F32(255)  # uint8 levels as ops.py sees them: level / 255 in float32


def _whole_pixels(fraction: float, size: int) -> int:
    """``round(fraction·size)``, half to even: the shift of the translate kernels."""
    return int(np.rint(_F32(fraction) * _F32(size)))


def _crop_shift(max_shift: float, offset: float, size: int) -> int:
    """The shift of ops.py's crop: uniform over {-p, ..., p} with p = round(max_shift·size)."""
    pad = np.rint(_F32(max_shift) * _F32(size))
    return int(min(np.floor(_F32(offset) * (_F32(2) * pad + _F32(1))), _F32(2) * pad) - pad)


def _box_span(size: int, side: float, center: float) -> tuple[int, int]:
    """``(start, stop)`` of the pixels whose centres lie inside a cutout box along one axis (may be empty)."""
    centres = np.arange(size, dtype=_F32) + _F32(0.5)
    inside = np.flatnonzero(np.abs(centres - _F32(center) * _F32(size)) < _F32(side) * _F32(size) / _F32(2))
    return (int(inside[0]), int(inside[-1]) + 1) if inside.size else (0, 0)


def _cutout_box(params: Mapping[str, float], height: int, width: int) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the cutout box, as ops.py's box mask draws it."""
    top, bottom = _box_span(height, params["side"], params["center_y"])
    left, right = _box_span(width, params["side"], params["center_x"])
    return top, bottom, left, right


def _solarize_level(threshold: float) -> int:
    """The first uint8 level ops.py inverts (``level/255 > threshold``); 256 when none is."""
    return int(np.count_nonzero(_LEVELS <= _F32(threshold)))


def _posterize_bits(bits: float) -> int:
    return int(np.clip(np.rint(_F32(bits)), 0, 8))


def _blend(image: Tensor, other: Tensor, weight: float) -> Tensor:
    """``(1 - w)·image + w·other`` in float, rounded to uint8: the weighted ops blend like ops.py."""
    mixed = (1 - weight) * image.to(torch.float32) + weight * other.to(image.device, torch.float32)
    return mixed.round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------
# torch: ops.py's batched kernels on a batch of one.
# --------------------------------------------------------------------------------------------


def _torch_kernel(name: str) -> Kernel:
    def kernel(image: Tensor, params: Mapping[str, float]) -> Tensor:
        batch = image.unsqueeze(0).to(torch.float32) / 255
        tensors = {key: torch.tensor([value], dtype=torch.float32, device=image.device)
                   for key, value in params.items()}
        out = OPS[name].kernel(batch, **tensors)
        return (out[0] * 255).round().clamp(0, 255).to(torch.uint8)

    return kernel


# --------------------------------------------------------------------------------------------
# torchvision.transforms.v2.functional
# --------------------------------------------------------------------------------------------


@cache
def _torchvision() -> SimpleNamespace:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional

    return SimpleNamespace(F=functional, bilinear=InterpolationMode.BILINEAR, nearest=InterpolationMode.NEAREST)


def _tv_affine(image: Tensor, *, translate: tuple[int, int] = (0, 0), scale: float = 1.0,
               shear: tuple[float, float] = (0.0, 0.0), nearest: bool = False) -> Tensor:
    tv = _torchvision()
    # fill=None pads with zeros inside grid_sample, as ops.py does; fill=0 would also multiply the
    # border pixels by the resampled validity mask (darker edges than ops.py).
    return tv.F.affine(image, angle=0.0, translate=list(translate), scale=scale, shear=list(shear),
                       interpolation=tv.nearest if nearest else tv.bilinear, fill=None)


def _tv_hflip(image: Tensor, p: Mapping[str, float]) -> Tensor:
    return _torchvision().F.horizontal_flip(image) if p["flip"] > 0.5 else image


def _tv_crop(image: Tensor, p: Mapping[str, float]) -> Tensor:
    height, width = image.shape[-2:]
    dy = _crop_shift(p["max_shift"], p["offset_y"], height)
    dx = _crop_shift(p["max_shift"], p["offset_x"], width)
    # A window starting outside the image is zero padding + crop in one call: a whole-pixel shift.
    return _torchvision().F.crop(image, top=-dy, left=-dx, height=height, width=width)


def _tv_translate_x(image: Tensor, p: Mapping[str, float]) -> Tensor:
    return _tv_affine(image, translate=(_whole_pixels(p["shift"], image.shape[-1]), 0), nearest=True)


def _tv_translate_y(image: Tensor, p: Mapping[str, float]) -> Tensor:
    return _tv_affine(image, translate=(0, _whole_pixels(p["shift"], image.shape[-2])), nearest=True)


def _tv_rotate(image: Tensor, p: Mapping[str, float]) -> Tensor:
    tv = _torchvision()
    return tv.F.rotate(image, p["angle"], interpolation=tv.bilinear, fill=None)


def _tv_shear_x(image: Tensor, p: Mapping[str, float]) -> Tensor:
    # torchvision's shear is an angle: x_in = x_out + tan(angle)·y_out, so angle = atan(shear).
    return _tv_affine(image, shear=(math.degrees(math.atan(p["shear"])), 0.0))


def _tv_shear_y(image: Tensor, p: Mapping[str, float]) -> Tensor:
    return _tv_affine(image, shear=(0.0, math.degrees(math.atan(p["shear"]))))


def _tv_scale(image: Tensor, p: Mapping[str, float]) -> Tensor:
    return _tv_affine(image, scale=p["scale"])


def _tv_brightness(image: Tensor, p: Mapping[str, float]) -> Tensor:
    return _torchvision().F.adjust_brightness(image, max(p["factor"], 0.0))


def _tv_contrast(image: Tensor, p: Mapping[str, float]) -> Tensor:
    return _torchvision().F.adjust_contrast(image, max(p["factor"], 0.0))


def _tv_saturation(image: Tensor, p: Mapping[str, float]) -> Tensor:
    return _torchvision().F.adjust_saturation(image, max(p["factor"], 0.0))


def _tv_hue(image: Tensor, p: Mapping[str, float]) -> Tensor:
    return _torchvision().F.adjust_hue(image, min(max(p["shift"], -0.5), 0.5))


def _tv_sharpness(image: Tensor, p: Mapping[str, float]) -> Tensor:
    return _torchvision().F.adjust_sharpness(image, max(p["factor"], 0.0))


def _tv_posterize(image: Tensor, p: Mapping[str, float]) -> Tensor:
    return _torchvision().F.posterize(image, _posterize_bits(p["bits"]))


def _tv_solarize(image: Tensor, p: Mapping[str, float]) -> Tensor:
    level = _solarize_level(p["threshold"])
    # torchvision inverts levels >= its threshold and refuses thresholds above 255 (nothing to invert).
    return _torchvision().F.solarize(image, level) if level <= 255 else image


def _tv_equalize(image: Tensor, p: Mapping[str, float]) -> Tensor:
    return _blend(image, _torchvision().F.equalize(image), p["weight"])


def _tv_autocontrast(image: Tensor, p: Mapping[str, float]) -> Tensor:
    return _blend(image, _torchvision().F.autocontrast(image), p["weight"])


def _tv_invert(image: Tensor, p: Mapping[str, float]) -> Tensor:
    return _torchvision().F.invert(image) if p["flip"] > 0.5 else image


def _tv_grayscale(image: Tensor, p: Mapping[str, float]) -> Tensor:
    return _blend(image, _torchvision().F.rgb_to_grayscale(image, num_output_channels=3), p["weight"])


def _tv_blur(image: Tensor, p: Mapping[str, float]) -> Tensor:
    if p["sigma"] <= 0:
        return image  # torchvision refuses sigma 0; a zero-width Gaussian is the identity
    # Reflect padding needs the half-width below the image size: tiny images get a shorter kernel.
    size = min(_BLUR_SIZE, 2 * min(image.shape[-2:]) - 1)
    return _torchvision().F.gaussian_blur(image, kernel_size=[size, size], sigma=[p["sigma"], p["sigma"]])


def _tv_cutout(image: Tensor, p: Mapping[str, float]) -> Tensor:
    top, bottom, left, right = _cutout_box(p, *image.shape[-2:])
    if bottom == top or right == left:
        return image
    fill = torch.tensor(_CUTOUT_LEVEL, dtype=torch.uint8, device=image.device)
    return _torchvision().F.erase(image, top, left, bottom - top, right - left, fill)


_TORCHVISION: dict[str, Kernel] = {
    "hflip": _tv_hflip, "crop": _tv_crop, "translate_x": _tv_translate_x, "translate_y": _tv_translate_y,
    "rotate": _tv_rotate, "shear_x": _tv_shear_x, "shear_y": _tv_shear_y, "scale": _tv_scale,
    "brightness": _tv_brightness, "contrast": _tv_contrast, "saturation": _tv_saturation, "hue": _tv_hue,
    "sharpness": _tv_sharpness, "posterize": _tv_posterize, "solarize": _tv_solarize, "equalize": _tv_equalize,
    "autocontrast": _tv_autocontrast, "invert": _tv_invert, "grayscale": _tv_grayscale, "blur": _tv_blur,
    "cutout": _tv_cutout,
}


# --------------------------------------------------------------------------------------------
# albumentations (functional API of 2.x) on HWC uint8 numpy arrays.
# --------------------------------------------------------------------------------------------


@cache
def _albumentations() -> SimpleNamespace:
    # albumentations asks PyPI for a newer version when imported (up to 2 s, in every worker that imports
    # it first, and no network in tests): off unless the user set the variable themselves.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations

    if int(albumentations.__version__.split(".")[0]) < 2:
        raise ImportError(f"the albumentations backend needs albumentations >= 2.0, found {albumentations.__version__}"
                          "; upgrade it (pip install -U albumentations) or choose backend='torch'")
    import cv2
    from albucore import hflip
    from albumentations.augmentations.blur import functional as fblur
    from albumentations.augmentations.crops import functional as fcrops
    from albumentations.augmentations.dropout import functional as fdropout
    from albumentations.augmentations.geometric import functional as fgeometric
    from albumentations.augmentations.pixel import functional as fpixel

    return SimpleNamespace(cv2=cv2, hflip=hflip, fblur=fblur, fcrops=fcrops, fdropout=fdropout,
                           fgeometric=fgeometric, fpixel=fpixel,
                           # cutout() wants a generator even for a constant fill; it is never drawn from.
                           rng=np.random.default_rng(0))


def _numpy_kernel(fn: Callable[[np.ndarray, Mapping[str, float]], np.ndarray]) -> Kernel:
    """Wrap an HWC numpy kernel as a uint8 ``[C, H, W]`` tensor kernel (a copy in, the device kept)."""

    def kernel(image: Tensor, params: Mapping[str, float]) -> Tensor:
        # A C-ordered copy: OpenCV wants contiguous arrays, and some albumentations kernels apply their
        # lookup tables in place (a 1-channel HWC view would share the input's memory).
        array = np.array(image.permute(1, 2, 0).cpu().numpy(), order="C", copy=True)
        out = fn(array, params)
        if out.ndim == 2:  # OpenCV drops a single channel axis
            out = out[..., None]
        out = np.require(out, dtype=np.uint8, requirements=("C_CONTIGUOUS", "WRITEABLE"))
        return torch.from_numpy(out).permute(2, 0, 1).contiguous().to(image.device)

    return kernel


def _alb_warp(array: np.ndarray, *, translate: tuple[int, int] = (0, 0), rotate: float = 0.0, scale: float = 1.0,
              shear: tuple[float, float] = (0.0, 0.0), nearest: bool = False) -> np.ndarray:
    alb = _albumentations()
    fg, cv2 = alb.fgeometric, alb.cv2
    shape = array.shape[:2]
    # About the centre of the pixel grid ((W - 1)/2, (H - 1)/2), as affine_grid with align_corners=False.
    matrix = fg.create_affine_transformation_matrix(
        translate={"x": translate[0], "y": translate[1]}, shear={"x": shear[0], "y": shear[1]},
        scale={"x": scale, "y": scale}, rotate=rotate, shift=fg.center(shape))
    return fg.warp_affine(array, matrix, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR,
                          fill=0, border_mode=cv2.BORDER_CONSTANT, output_shape=shape)


def _alb_hflip(array: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    return _albumentations().hflip(array) if p["flip"] > 0.5 else array


def _alb_crop(array: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    alb = _albumentations()
    height, width = array.shape[:2]
    dy = _crop_shift(p["max_shift"], p["offset_y"], height)
    dx = _crop_shift(p["max_shift"], p["offset_x"], width)
    pad_y, pad_x = abs(dy), abs(dx)
    padded = alb.fgeometric.pad_with_params(array, pad_y, pad_y, pad_x, pad_x, alb.cv2.BORDER_CONSTANT, 0)
    if padded.ndim == 2:
        padded = padded[..., None]
    top, left = pad_y - dy, pad_x - dx
    return alb.fcrops.crop(padded, left, top, left + width, top + height)


def _alb_translate_x(array: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    return _alb_warp(array, translate=(_whole_pixels(p["shift"], array.shape[1]), 0), nearest=True)


def _alb_translate_y(array: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    return _alb_warp(array, translate=(0, _whole_pixels(p["shift"], array.shape[0])), nearest=True)


def _alb_rotate(array: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    return _alb_warp(array, rotate=p["angle"])


def _alb_shear_x(array: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    # albumentations shears the forward map (x_out = x_in + tan(angle)·y_in): the inverse of ops.py's.
    return _alb_warp(array, shear=(-math.degrees(math.atan(p["shear"])), 0.0))


def _alb_shear_y(array: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    return _alb_warp(array, shear=(0.0, -math.degrees(math.atan(p["shear"]))))


def _alb_scale(array: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    return _alb_warp(array, scale=p["scale"])


def _alb_brightness(array: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    return _albumentations().fpixel.adjust_brightness_torchvision(array, max(p["factor"], 0.0))


def _alb_contrast(array: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    return _albumentations().fpixel.adjust_contrast_torchvision(array, max(p["factor"], 0.0))


def _alb_saturation(array: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    return _albumentations().fpixel.adjust_saturation_torchvision(array, max(p["factor"], 0.0))


def _alb_hue(array: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    return _albumentations().fpixel.adjust_hue_torchvision(array, min(max(p["shift"], -0.5), 0.5))


def _alb_sharpness(array: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    factor = max(p["factor"], 0.0)
    # factor·identity + (1 - factor)·PIL's SMOOTH (centre 5, ring 1, over 13): A.Sharpen's matrix for
    # lightness 1 and alpha = (factor - 1)/13.
    matrix = np.full((3, 3), (1 - factor) / 13, dtype=np.float32)
    matrix[1, 1] = factor + 5 * (1 - factor) / 13
    out = _albumentations().fpixel.convolve(array, matrix).reshape(array.shape)
    out[0], out[-1], out[:, 0], out[:, -1] = array[0], array[-1], array[:, 0], array[:, -1]  # PIL keeps the border
    return out


def _alb_posterize(array: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    bits = _posterize_bits(p["bits"])
    return _albumentations().fpixel.posterize(array, bits) if bits < 8 else array


def _alb_solarize(array: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    level = _solarize_level(p["threshold"])
    # albumentations inverts levels i >= threshold·255; half a level below ours is robust to rounding.
    return _albumentations().fpixel.solarize(array, (level - 0.5) / 255) if level <= 255 else array


def _alb_autocontrast(array: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    stretched = _albumentations().fpixel.auto_contrast(array, cutoff=0, ignore=None, method="pil")
    return _blend_numpy(array, stretched, p["weight"])


def _alb_invert(array: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    return _albumentations().fpixel.invert(array) if p["flip"] > 0.5 else array


def _alb_grayscale(array: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    gray = _albumentations().fpixel.to_gray(array, num_output_channels=3, method="weighted_average")
    return _blend_numpy(array, gray, p["weight"])


def _alb_blur(array: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    if p["sigma"] <= 0:
        return array
    alb = _albumentations()
    return alb.fpixel.separable_convolve(array, alb.fblur.create_gaussian_kernel_1d(p["sigma"], _BLUR_SIZE))


def _alb_cutout(array: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    top, bottom, left, right = _cutout_box(p, *array.shape[:2])
    if bottom == top or right == left:
        return array
    alb = _albumentations()
    return alb.fdropout.cutout(array, np.array([[left, top, right, bottom]]), _CUTOUT_LEVEL, alb.rng)


def _blend_numpy(array: np.ndarray, other: np.ndarray, weight: float) -> np.ndarray:
    mixed = (1 - weight) * array.astype(np.float32) + weight * other.reshape(array.shape).astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


_ALBUMENTATIONS: dict[str, Kernel] = {name: _numpy_kernel(fn) for name, fn in {
    "hflip": _alb_hflip, "crop": _alb_crop, "translate_x": _alb_translate_x, "translate_y": _alb_translate_y,
    "rotate": _alb_rotate, "shear_x": _alb_shear_x, "shear_y": _alb_shear_y, "scale": _alb_scale,
    "brightness": _alb_brightness, "contrast": _alb_contrast, "saturation": _alb_saturation, "hue": _alb_hue,
    "sharpness": _alb_sharpness, "posterize": _alb_posterize, "solarize": _alb_solarize,
    "autocontrast": _alb_autocontrast, "invert": _alb_invert, "grayscale": _alb_grayscale, "blur": _alb_blur,
    "cutout": _alb_cutout,
}.items()}

_LIBRARY_KERNELS: dict[str, dict[str, Kernel]] = {"torch": {}, "torchvision": _TORCHVISION,
                                                   "albumentations": _ALBUMENTATIONS}


def _kernel(name: str, backend: str) -> Kernel:
    """The kernel that executes ``name`` on ``backend``: the library's, or the torch kernel as the fallback."""
    return _LIBRARY_KERNELS[backend].get(name) or _torch_kernel(name)


def _require(backend: str) -> None:
    """Import the backend's library now, so that a missing or too old one fails before any worker starts."""
    _check_backend(backend)
    if backend == "torchvision":
        _torchvision()
    elif backend == "albumentations":
        _albumentations()


# --------------------------------------------------------------------------------------------
# The public per-sample API.
# --------------------------------------------------------------------------------------------


def apply_op(image: Tensor, name: str, params: Mapping[str, float], backend: str = "torch") -> Tensor:
    """Execute one op on one uint8 image for given parameters, with the chosen backend's kernel.

    Parameters at their identity values (the m = 0 draw) return the input values unchanged on every
    backend, whatever the library kernel would do with them (``Op.__call__`` does the same).

    Args:
        image: uint8 ``[C, H, W]`` (1 or 3 channels for the colour ops).
        name: An op in :data:`~cycdata.augment_ladder.ops.OPS`.
        params: One sample's parameters as numbers: ``{key: float(value[0])}`` of ``OPS[name].draw``.
        backend: ``"torch"``, ``"torchvision"`` or ``"albumentations"``; ops in ``FALLBACKS[backend]``
            (and ops without a library kernel) run on the torch kernel.

    Returns:
        A new uint8 ``[C, H, W]`` tensor on the image's device; the input is not modified.

    Example:
        >>> import torch
        >>> image = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8)
        >>> out = apply_op(image, "translate_x", {"shift": 0.25}, backend="torchvision")
        >>> torch.equal(out[..., 2:], image[..., :-2]), bool((out[..., :2] == 0).all())
        (True, True)
        >>> torch.equal(apply_op(image, "rotate", {"angle": 0.0}, backend="albumentations"), image)
        True
    """
    _check_image(image)
    _check_backend(backend)
    if name not in OPS:
        raise KeyError(f"unknown op {name!r}; registered: {sorted(OPS)}")
    op = OPS[name]
    _check_params(op, params)
    values = {key: float(value) for key, value in params.items()}
    if _is_identity(op, values) or (name in _COLOUR_ONLY and image.shape[0] == 1):
        return image.clone()
    out = _kernel(name, backend)(image, values)
    # Library kernels may return the input itself or a view of it (a crop inside the image): never alias.
    if out.untyped_storage().data_ptr() == image.untyped_storage().data_ptr():
        out = out.clone()
    return out


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _draw_params(name: str, magnitude: float, generator: torch.Generator | None) -> dict[str, float]:
    """One sample's parameters for ``name`` at ``magnitude``, from ``Op.draw`` (the ranges live there)."""
    drawn = OPS[name].draw(torch.tensor([magnitude], dtype=torch.float32), generator)
    return {key: float(value[0]) for key, value in drawn.items()}


def apply_rung(image: Tensor, rung: Rung, generator: torch.Generator | None = None, backend: str = "torch") -> Tensor:
    """Augment one uint8 image with one rung: its explicit steps, then its RandAugment draw.

    Each step fires with its probability (a coin drawn from ``generator`` when the probability is below 1);
    the RandAugment part then applies ``n`` ops, each drawn uniformly from ``rung.randaugment.ops()``, at its
    magnitude. Parameters come from ``OPS[name].draw`` with the same generator; a step at magnitude 0 or a
    missed coin is skipped, so an identity rung returns the input values unchanged. Batch mixing (a rung's
    ``mix``, cutmix or mixup) needs the whole batch and its targets: the per-sample path leaves it out.

    Args:
        image: uint8 ``[C, H, W]``.
        rung: The rung to apply.
        generator: The source of randomness (``None``: torch's global generator).
        backend: Which kernels execute the ops (see :func:`apply_op`).

    Returns:
        A new uint8 ``[C, H, W]`` tensor.

    Example:
        >>> import torch
        >>> from cycdata.augment_ladder.ladder import OpStep, Rung
        >>> image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
        >>> rung = Rung(steps=(OpStep("hflip", 1.0, probability=0.5), OpStep("rotate", 0.5)))
        >>> a = apply_rung(image, rung, torch.Generator().manual_seed(0), backend="albumentations")
        >>> b = apply_rung(image, rung, torch.Generator().manual_seed(0), backend="albumentations")
        >>> torch.equal(a, b), torch.equal(apply_rung(image, Rung()), image)
        (True, True)
    """
    _check_image(image)
    _check_backend(backend)
    device = _generator_device(generator)
    out = image
    for step in rung.steps:
        if step.probability < 1.0 and not bool(torch.rand(1, generator=generator, device=device) < step.probability):
            continue
        if step.magnitude > 0:
            out = apply_op(out, step.op, _draw_params(step.op, step.magnitude, generator), backend)
    extra = rung.randaugment
    if extra is not None and extra.n > 0 and extra.magnitude > 0:
        pool = extra.ops()
        for _ in range(extra.n):
            name = pool[int(torch.randint(len(pool), (1,), generator=generator, device=device))]
            out = apply_op(out, name, _draw_params(name, extra.magnitude, generator), backend)
    return image.clone() if out is image else out


def apply_ladder(image: Tensor, ladder: Ladder, strength: float, generator: torch.Generator | None = None,
                 backend: str = "torch") -> Tensor:
    """Augment one uint8 image at ``strength`` on ``ladder``: the rung below, or the one above by chance.

    As in ``Ladder.apply``, strength ``s`` sits at position ``s·(R − 1)``; the sample takes the rung above
    with probability equal to the fractional part (one coin from ``generator``, drawn only when that part
    is not 0) and the rung below otherwise. Strength 0 is rung 0, the identity on built-in ladders.

    Args:
        image: uint8 ``[C, H, W]``.
        ladder: The ladder.
        strength: In [0, 1].
        generator: The source of randomness (``None``: torch's global generator).
        backend: Which kernels execute the ops (see :func:`apply_op`).

    Returns:
        A new uint8 ``[C, H, W]`` tensor.

    Example:
        >>> import torch
        >>> from cycdata.augment_ladder.ladder import load_ladder
        >>> image = torch.randint(0, 256, (1, 12, 12), dtype=torch.uint8)
        >>> out = apply_ladder(image, load_ladder("digits"), 1.0, torch.Generator().manual_seed(3))
        >>> out.shape, torch.equal(apply_ladder(image, load_ladder("digits"), 0.0), image)
        (torch.Size([1, 12, 12]), True)
    """
    return apply_rung(image, _choose_rung(ladder, strength, generator), generator, backend)


# A sized source: (resized_crop magnitude, generator) -> the uint8 image at the model's size, cropped from the full
# image (cycdata.loaders.ImageFileDataset.resized_crop binds an index to one).
SizedSource = Callable[[float, "torch.Generator | None"], Tensor]


def _choose_rung(ladder: Ladder, strength: float, generator: torch.Generator | None) -> Rung:
    lower, upper_weight = ladder.position(strength)
    rung = lower
    if upper_weight > 0.0:
        coin = torch.rand(1, generator=generator, device=_generator_device(generator))
        rung = lower + 1 if bool(coin < upper_weight) else lower
    return ladder.rungs[rung]


def apply_ladder_sized(source: SizedSource, ladder: Ladder, strength: float,
                       generator: torch.Generator | None = None, backend: str = "torch") -> Tensor:
    """Like :func:`apply_ladder`, for a sample still at its full size: the rung's ``resized_crop`` is done by
    ``source`` on the full image, before anything else, and the rest of the rung on the cropped image.

    The rung is chosen as :func:`apply_ladder` chooses it. Its first ``resized_crop`` step (its coin drawn
    when its probability is below 1) gives the crop's magnitude, 0 when the rung has none or the coin
    missed; ``source(magnitude, generator)`` returns the image at the model's size (magnitude 0: the
    evaluation crop). The rung's other steps then run as in :func:`apply_rung`. Strength 0 on a built-in
    ladder is therefore exactly the evaluation image.

    Args:
        source: ``(magnitude, generator) -> uint8 [C, S, S]``, e.g. ``lambda m, g: data.resized_crop(i, m, g)[0]``.
        ladder: The ladder.
        strength: In [0, 1].
        generator: The source of randomness (``None``: torch's global generator).
        backend: Which kernels execute the other ops (see :func:`apply_op`).

    Returns:
        uint8 ``[C, S, S]``.

    Example:
        >>> import torch
        >>> from cycdata.augment_ladder.ladder import load_ladder
        >>> full = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
        >>> source = lambda m, g: full[:, :8, :8] if m == 0 else full[:, -8:, -8:]
        >>> torch.equal(apply_ladder_sized(source, load_ladder("imagenet"), 0.0), full[:, :8, :8])
        True
    """
    rung = _choose_rung(ladder, strength, generator)
    device = _generator_device(generator)
    magnitude = 0.0
    sizing = next((step for step in rung.steps if step.op in SIZING_OPS), None)
    if sizing is not None:
        coin = sizing.probability >= 1.0 or torch.rand(1, generator=generator, device=device) < sizing.probability
        fires = bool(coin)
        magnitude = sizing.magnitude if fires else 0.0
    image = source(magnitude, generator)
    _check_image(image)
    rest = Rung(steps=tuple(step for step in rung.steps if step is not sizing), randaugment=rung.randaugment,
                mix=rung.mix)
    return apply_rung(image, rest, generator, backend)


class LadderTransform:
    """A picklable per-sample transform for Dataset items augmented in DataLoader workers.

    The main process decides the strength and the seed of every sample (from its index, the epoch and
    the run's seed) and sends them with the index; the worker calls this object. A fresh generator
    seeded from ``seed`` makes each sample's augmentation reproducible, whichever worker draws it.

    Args:
        ladder: The augmentation ladder.
        backend: ``"torch"``, ``"torchvision"`` or ``"albumentations"``; the library is imported here, so a
            missing one fails in the main process, not in a worker.

    Example:
        >>> import pickle, torch
        >>> from cycdata.augment_ladder.ladder import load_ladder
        >>> transform = pickle.loads(pickle.dumps(LadderTransform(load_ladder("default"))))
        >>> image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
        >>> torch.equal(transform(image, 0.7, seed=11), transform(image, 0.7, seed=11))
        True
    """

    def __init__(self, ladder: Ladder, backend: str = "torch") -> None:
        if not isinstance(ladder, Ladder):
            raise TypeError(f"ladder must be a Ladder (see load_ladder), got {type(ladder).__name__}")
        _require(backend)
        self.ladder = ladder
        self.backend = backend

    def __call__(self, image: Tensor, strength: float, seed: int) -> Tensor:
        """Augment one uint8 ``[C, H, W]`` image at ``strength`` with a generator seeded from ``seed``.

        Example:
            >>> import torch
            >>> from cycdata.augment_ladder.ladder import load_ladder
            >>> image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
            >>> torch.equal(LadderTransform(load_ladder("flips"))(image, 0.0, seed=0), image)
            True
        """
        # float()/int() also take the 0-dim tensors and numpy numbers a sampler or collate may produce.
        generator = torch.Generator().manual_seed(int(seed))
        return apply_ladder(image, self.ladder, float(strength), generator, self.backend)

    def sized(self, source: SizedSource, strength: float, seed: int) -> Tensor:
        """Augment a sample still at its full size (see :func:`apply_ladder_sized`), seeded from ``seed``."""
        generator = torch.Generator().manual_seed(int(seed))
        return apply_ladder_sized(source, self.ladder, float(strength), generator, self.backend)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ladder={self.ladder.name!r}, backend={self.backend!r})"

