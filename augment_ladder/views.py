"""Weak and strong views of a batch for consistency training (FixMatch), batched on the device.

Parameters are drawn **per sample** (torchvision v2 draws one set per batch), from an explicit
generator. Both views work on normalized float images ``[B, C, H, W]``; filling with 0 means
filling with the dataset mean. No flips: digits are not mirror-symmetric.

* weak: a random translation of up to ``weak_shift`` of the image size.
* strong: a random affine map (rotation, scale, shear, translation), contrast and brightness
  jitter, and a cutout square.

Example:
    >>> import torch
    >>> images = torch.randn(4, 1, 32, 32)
    >>> generator = torch.Generator().manual_seed(0)
    >>> weak_view(images, generator).shape, strong_view(images, generator).shape
    (torch.Size([4, 1, 32, 32]), torch.Size([4, 1, 32, 32]))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["affine_warp", "cutout", "strong_view", "weak_view"]


def _uniform(size: int, low: float, high: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
    values = torch.rand(size, generator=generator, device=generator.device if generator is not None else device)
    return (low + (high - low) * values).to(device)


def affine_warp(images: Tensor, angle: Tensor, scale: Tensor, shear: Tensor, shift_x: Tensor,
                shift_y: Tensor) -> Tensor:
    """Warp each image by its own affine map (the deterministic kernel; parameters per sample).

    Angles and shear in radians, shifts as fractions of the image size; all zeros (scale 1) is the identity.
    """
    if images.shape[0] == 0:  # affine_grid refuses an empty batch (an SSL step with no unlabeled share)
        return images
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Inverse map from output to input coordinates in normalized [-1, 1] space, as affine_grid wants.
    theta = torch.stack([
        torch.stack([cos / scale, (-sin + shear) / scale, -2 * shift_x], dim=1),
        torch.stack([sin / scale, cos / scale, -2 * shift_y], dim=1),
    ], dim=1).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def cutout(images: Tensor, size_fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """Zero one square of side ``size_fraction·H`` per image, at a per-sample random centre."""
    batch, _, height, width = images.shape
    side = max(1, round(size_fraction * height))
    cy = _uniform(batch, 0, height, generator, images.device).long().view(-1, 1, 1)
    cx = _uniform(batch, 0, width, generator, images.device).long().view(-1, 1, 1)
    rows = torch.arange(height, device=images.device).view(1, -1, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, -1)
    inside = ((rows - cy).abs() <= side // 2) & ((cols - cx).abs() <= side // 2)
    return images.masked_fill(inside.unsqueeze(1), 0.0)


def weak_view(images: Tensor, generator: torch.Generator | None = None, weak_shift: float = 0.125) -> Tensor:
    """A random translation per sample, up to ``weak_shift`` of the image size."""
    batch = images.shape[0]
    zeros = torch.zeros(batch, device=images.device)
    shift_x = _uniform(batch, -weak_shift, weak_shift, generator, images.device)
    shift_y = _uniform(batch, -weak_shift, weak_shift, generator, images.device)
    return affine_warp(images, zeros, torch.ones_like(zeros), zeros, shift_x, shift_y)


def strong_view(images: Tensor, generator: torch.Generator | None = None, *, max_angle_degrees: float = 25.0,
                scale_range: tuple[float, float] = (0.8, 1.2), max_shear: float = 0.3, max_shift: float = 0.15,
                jitter: float = 0.5, cutout_fraction: float = 0.4) -> Tensor:
    """A random affine map, contrast/brightness jitter and a cutout square per sample."""
    batch, device = images.shape[0], images.device
    limit = math.radians(max_angle_degrees)
    warped = affine_warp(
        images,
        _uniform(batch, -limit, limit, generator, device),
        _uniform(batch, *scale_range, generator, device),
        _uniform(batch, -max_shear, max_shear, generator, device),
        _uniform(batch, -max_shift, max_shift, generator, device),
        _uniform(batch, -max_shift, max_shift, generator, device),
    )
    contrast = _uniform(batch, 1 - jitter, 1 + jitter, generator, device).view(-1, 1, 1, 1)
    brightness = _uniform(batch, -jitter, jitter, generator, device).view(-1, 1, 1, 1)
    return cutout(warped * contrast + brightness, cutout_fraction, generator)
