"""Tests for components.maps: Gaussian smoothing against scipy, upsampling shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from components.maps import gaussian_blur, gaussian_kernel1d, to_input_resolution, upsample


@pytest.mark.parametrize(("shape", "sigma"), [((2, 64, 48), 4.0), ((1, 40, 40), 2.5), ((3, 17, 33), 1.0),
                                              ((1, 256, 256), 4.0)])
def test_gaussian_blur_equals_scipy_mirror(shape: tuple, sigma: float) -> None:
    maps = np.random.default_rng(0).random(shape).astype(np.float32)
    maps[:, 5:9, 3:12] += 5.0  # a bright block near the border exercises the padding
    ours = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    ref = ndimage.gaussian_filter(maps.astype(np.float64), sigma=(0, sigma, sigma), mode="mirror", truncate=4.0)
    assert ours.shape == shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_gaussian_blur_identity_and_mass() -> None:
    maps = torch.rand(2, 20, 30)
    assert gaussian_blur(maps, 0.0) is maps
    k = gaussian_kernel1d(4.0)
    assert k.shape == (33,)  # radius int(4 * 4 + 0.5) = 16
    assert float(k.sum()) == pytest.approx(1.0)
    flat = torch.full((1, 50, 50), 3.0)
    torch.testing.assert_close(gaussian_blur(flat, 3.0), flat)


def test_gaussian_blur_small_maps_do_not_crash() -> None:
    """A map smaller than the kernel radius (reflect padding impossible) still blurs, mass preserved."""
    maps = torch.rand(1, 6, 8)
    out = gaussian_blur(maps, 4.0)
    assert out.shape == (1, 6, 8)
    assert float(out.min()) >= float(maps.min()) - 1e-6 and float(out.max()) <= float(maps.max()) + 1e-6


def test_upsample_shapes_and_values() -> None:
    grid = torch.rand(3, 8, 6)
    up = upsample(grid, (64, 48))
    assert up.shape == (3, 64, 48)
    assert upsample(grid, (8, 6)) is grid
    const = torch.full((2, 4, 4), 7.0)
    torch.testing.assert_close(upsample(const, (33, 17)), torch.full((2, 33, 17), 7.0))
    # bilinear without align_corners: each 8 x 8 block's centre lies between source pixel centres
    assert float(up.min()) >= float(grid.min()) - 1e-6 and float(up.max()) <= float(grid.max()) + 1e-6


def test_to_input_resolution_composes() -> None:
    grid = torch.rand(2, 16, 16)
    out = to_input_resolution(grid, (64, 64), 4.0)
    assert out.shape == (2, 64, 64)
    torch.testing.assert_close(out, gaussian_blur(upsample(grid, (64, 64)), 4.0))
    # the peak of a single hot patch stays where it was (scaled by the stride)
    spike = torch.zeros(1, 16, 16)
    spike[0, 5, 10] = 1.0
    peak = to_input_resolution(spike, (64, 64), 2.0)[0]
    r, c = divmod(int(peak.argmax()), 64)
    assert abs(r - (5 * 4 + 1.5)) <= 1 and abs(c - (10 * 4 + 1.5)) <= 1


@pytest.mark.parametrize(("shape", "size", "sigma"), [
    ((2, 32, 32), (256, 256), 4.0),   # PatchCore's stride-8 grid at 256 px
    ((3, 17, 9), (100, 57), 2.5),     # non-square, non-integer scale factors
    ((1, 6, 8), (6, 8), 4.0),         # no resize, map smaller than the kernel radius (replicate padding)
    ((2, 7, 5), (12, 30), 4.0),       # replicate padding after the resize
    ((1, 16, 16), (64, 64), 0.0),     # resize only
])
def test_fused_resize_blur_equals_upsample_then_blur(shape: tuple, size: tuple, sigma: float) -> None:
    """to_input_resolution's per-axis operators give the two-step result within float32 rounding."""
    grid = torch.from_numpy(np.random.default_rng(1).random(shape).astype(np.float32) * 5)
    fused = to_input_resolution(grid, size, sigma)
    two_step = gaussian_blur(upsample(grid, size), sigma)
    assert fused.shape == (shape[0], *size) and fused.dtype == torch.float32
    torch.testing.assert_close(fused, two_step, rtol=1e-5, atol=1e-5)
