"""CIFAR-10-C corruptions, re-implemented from scratch with numpy, scipy and Pillow.

The 15 standard corruptions (:data:`STANDARD`) and the 4 extra "validation" corruptions (:data:`EXTRA`) of
Hendrycks & Dietterich (ICLR 2019), with the CIFAR parameters of the official generator
(``make_cifar_c.py`` in hendrycks/robustness) at severities 1..5.  The implementation follows a written
description of that generator (a fact sheet, not its code): same parameters, same order of operations, the
same float32/float64 working precision where it matters, truncation (not rounding) to uint8, the same border
rules, and ports of the pieces the original takes from OpenCV, scikit-image and ImageMagick:

* skimage ``gaussian``            -> :func:`scipy.ndimage.gaussian_filter` with the same mode/truncate;
* skimage ``rgb2hsv``/``hsv2rgb`` -> :func:`_rgb2hsv` / :func:`_hsv2rgb` (same formulas and tie rules);
* ImageMagick ``-motion-blur``    -> :func:`_motion_blur` (one-sided Gaussian line kernel, Q16 rounding);
* OpenCV ``filter2D``, ``warpAffine`` (4.x fixed-point coordinates), ``Canny``, ``distanceTransform``
  (float32 5x5 chamfer), ``equalizeHist``, ``blur``, ``cvtColor`` -> small numpy ports below;
* scipy ``zoom`` (order 1)         -> :func:`_clipped_zoom` (same corner-aligned geometry, cached).

Fed the same random draws, every corruption except fog was checked to be bit-identical to a reference
pipeline built from the real libraries (OpenCV 4.10, scikit-image 0.26, scipy 1.17, Pillow 13, ImageMagick
6.9.11-60 Q16) on 200 CIFAR-10 test images x 5 severities (fog, plain numpy in the original, was checked
against an independent scalar diamond-square).  Other builds of those libraries can differ by 1 LSB in a few
values (OpenCV's SIMD/FMA paths, ImageMagick's quantum depth, and the libjpeg build for JPEG).

Differences from the official release that are deliberate:

* **Randomness.**  The original draws from numpy's unseeded global legacy RNG, so its release cannot be
  reproduced bit for bit.  Here every image ``i`` of a call gets its own ``np.random.Generator`` seeded from
  ``(seed, crc32(name), severity, i)``: a call is deterministic, image ``i`` does not depend on the other
  images in the batch (``corrupt(x)[:k] == corrupt(x[:k])``), and the global RNG is never touched.  The
  *distributions* drawn are the original ones (same shapes, ranges and order of draws per image).
* **spatter**: the original divides by ``max(liquid * dist)`` unguarded; if that is 0 it would produce NaN.
  Here such an image is returned unchanged (the case is practically never reached).

Images of other sizes than 32x32 work where the maths allows (at least 8x8; frost needs the image to fit
inside every frost texture, i.e. at most 62x104).  Sizes that are hard-coded to 32 in the original are
generalised: glass blur's loop bounds, the plasma map (next power of two, cropped), and elastic
transform's pixel parameters (scaled by ``min(H, W) / 32``, exactly as the original scales them from the
image size 32).
"""

from __future__ import annotations

import functools
import io
import zlib
from collections.abc import Callable, Sequence
from importlib import resources

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from ttcompress.errors import UserError

__all__ = ["ALL", "EXTRA", "STANDARD", "CorruptionError", "corrupt", "sample_grid", "save_sample_grid"]

STANDARD: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
EXTRA: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL: tuple[str, ...] = STANDARD + EXTRA

MIN_SIZE = 8  # smallest height/width accepted
_CHUNK = 128  # images processed at once (bounds memory; results do not depend on it)


class CorruptionError(UserError, ValueError):
    """Bad arguments to :func:`corrupt` (unknown name, severity outside 1..5, wrong image array)."""


# --------------------------------------------------------------------------------------------------------------
# Parameters per severity (index 0 = severity 1), from the official CIFAR generator.
# --------------------------------------------------------------------------------------------------------------

_PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    # numpy arange end points, exactly as the original (the float rounding of arange decides the lists)
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),
    "snow": (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    # fractions of the image size (32 in the original): alpha, sigma, affine jitter
    "elastic_transform": ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1),
    "spatter": (
        (0.62, 0.1, 0.7, 0.7, 0.5, 0),
        (0.65, 0.1, 0.8, 0.7, 0.5, 0),
        (0.65, 0.3, 1, 0.69, 0.5, 0),
        (0.65, 0.1, 0.7, 0.69, 0.6, 1),
        (0.65, 0.1, 0.5, 0.68, 0.6, 1),
    ),
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
}

# Corruptions that draw random numbers (the rest are deterministic functions of the image).
_RANDOM = frozenset(
    {
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "glass_blur",
        "motion_blur",
        "snow",
        "frost",
        "fog",
        "elastic_transform",
        "speckle_noise",
        "spatter",
    }
)

Rngs = Sequence[np.random.Generator]


# --------------------------------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------------------------------


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    """clip(., 0, 1) * 255, then a C-style cast (truncation toward zero), as the original's ``np.uint8(...)``."""
    return (np.clip(unit, 0, 1) * 255).astype(np.uint8)


def _unit64(x: np.ndarray) -> np.ndarray:
    """uint8 -> float64 in [0, 1] (``np.array(pil) / 255.``)."""
    return x / 255.0


def _unit32(x: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1] (``np.array(pil, dtype=float32) / 255.``)."""
    return x.astype(np.float32) / np.float32(255.0)


def _sk_gaussian(a: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """skimage ``gaussian`` on the spatial axes of an (N, H, W[, C]) batch: scipy's separable Gaussian with
    radius ``int(truncate * sigma + 0.5)``; sigma 0 (or a zero radius) is the identity."""
    sig = [0.0] * a.ndim
    sig[1] = sig[2] = float(sigma)
    return ndimage.gaussian_filter(a, sigma=sig, mode=mode, truncate=truncate)


def _reflect101(idx: np.ndarray, n: int) -> np.ndarray:
    """OpenCV BORDER_REFLECT_101 index mapping (``dcb|abcd|cba``)."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * n - 2
    idx = np.abs(idx) % period
    return np.where(idx >= n, period - idx, idx)


def _reflect_sym(idx: np.ndarray, n: int) -> np.ndarray:
    """scipy ``reflect`` / numpy ``symmetric`` index mapping (``cba|abcd|dcb``)."""
    idx = np.mod(idx, 2 * n)
    return np.where(idx >= n, 2 * n - 1 - idx, idx)


def _box3(a: np.ndarray) -> np.ndarray:
    """Sum over the 3x3 neighbourhood of each pixel of an (N, H, W) array, border reflect-101 (OpenCV default)."""
    p = np.pad(a, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    h, w = a.shape[1:]
    out = np.zeros(a.shape, dtype=np.float64 if a.dtype.kind == "f" else np.int64)
    for dy in range(3):
        for dx in range(3):
            out += p[:, dy : dy + h, dx : dx + w]
    return out


# --------------------------------------------------------------------------------------------------------------
# HSV (scikit-image conventions)
# --------------------------------------------------------------------------------------------------------------


def _rgb2hsv(rgb: np.ndarray) -> np.ndarray:
    """skimage-style RGB -> HSV on float arrays (..., 3).  V = max, S = (max - min) / max (0 for grey), H in [0, 1)
    with H = 0 for grey; where several channels share the maximum, blue's formula wins over green's over red's."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    delta = v - rgb.min(axis=-1)
    grey = delta == 0
    safe = np.where(grey, 1.0, delta)
    s = np.where(grey, 0.0, delta / np.where(v == 0, 1.0, v))
    h = (g - b) / safe
    h = np.where(g == v, 2.0 + (b - r) / safe, h)
    h = np.where(b == v, 4.0 + (r - g) / safe, h)
    h = (h / 6.0) % 1.0
    h = np.where(grey, 0.0, h)
    return np.stack([h, s, v], axis=-1)


def _hsv2rgb(hsv: np.ndarray) -> np.ndarray:
    """skimage-style HSV -> RGB (the standard sextant formula)."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    h6 = h * 6.0
    sector = np.floor(h6)
    f = h6 - sector
    p = v * (1.0 - s)
    q = v * (1.0 - f * s)
    t = v * (1.0 - (1.0 - f) * s)
    sector = sector.astype(np.int64) % 6
    out = np.empty(hsv.shape, dtype=np.result_type(hsv.dtype, np.float64))
    out[..., 0] = np.choose(sector, (v, q, p, p, t, v))
    out[..., 1] = np.choose(sector, (t, v, v, q, p, p))
    out[..., 2] = np.choose(sector, (p, p, t, v, v, q))
    return out


# --------------------------------------------------------------------------------------------------------------
# Geometry helpers: clipped zoom (scipy zoom, order 1), ImageMagick motion blur, OpenCV warpAffine
# --------------------------------------------------------------------------------------------------------------


def _zoom_geometry(n: int, z: float) -> tuple[int, int, int, int]:
    """(crop size, crop start, zoomed size, trim) of ``clipped_zoom`` along an axis of length ``n``."""
    ch = int(np.ceil(n / z))
    top = (n - ch) // 2
    out = round(ch * z)  # scipy.ndimage.zoom output size (Python rounding, ties to even)
    trim = (out - n) // 2
    return ch, top, out, trim


def _linear_resample_axis(a: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Order-1 ``scipy.ndimage.zoom`` along one axis (corner-aligned: output o samples input o*(n-1)/(n_out-1)),
    computed in float64."""
    n_in = a.shape[axis]
    if n_in < 2 or n_out < 2:
        raise CorruptionError("image too small for the zoom used by this corruption")
    coord = np.arange(n_out) * ((n_in - 1) / (n_out - 1))
    i0 = np.clip(np.floor(coord).astype(np.int64), 0, n_in - 2)
    t = coord - i0
    shape = [1] * a.ndim
    shape[axis] = n_out
    t = t.reshape(shape)
    lo = np.take(a, i0, axis=axis).astype(np.float64)
    hi = np.take(a, i0 + 1, axis=axis).astype(np.float64)
    return lo * (1.0 - t) + hi * t


def _clipped_zoom(a: np.ndarray, z: float) -> np.ndarray:
    """The original's ``clipped_zoom`` on a batch (N, H, W, C): crop the central ceil(n/z) square-ish region,
    zoom it by ``z`` with linear interpolation (scipy geometry), and cut the top-left-biased centre back to
    (H, W).  Rows and columns use their own size (identical to the original for square images).  The
    result has the input's dtype (scipy returns the input dtype)."""
    _, h, w, _ = a.shape
    chy, topy, outy, trimy = _zoom_geometry(h, z)
    chx, topx, outx, trimx = _zoom_geometry(w, z)
    crop = a[:, topy : topy + chy, topx : topx + chx]
    r = _linear_resample_axis(crop, 1, outy)
    r = _linear_resample_axis(r, 2, outx)
    return r[:, trimy : trimy + h, trimx : trimx + w].astype(a.dtype)


def _motion_kernel(radius: float, sigma: float) -> np.ndarray:
    """ImageMagick's one-sided motion-blur weights: length 2*ceil(radius)+1, exp(-i^2 / (2 sigma^2)), sum 1."""
    width = 2 * int(np.ceil(radius)) + 1
    i = np.arange(width, dtype=np.float64)
    k = np.exp(-(i * i) / (2.0 * sigma * sigma)) / (np.sqrt(2.0 * np.pi) * sigma)
    return k / k.sum()


def _motion_blur(x: np.ndarray, radius: float, sigma: float, angles_deg: np.ndarray) -> np.ndarray:
    """ImageMagick 6 ``MotionBlurImage`` (Q16) on a uint8 batch (N, H, W, C), one angle per image.

    out(x, y) = sum_i k_i * in(x + ox_i, y + oy_i), with (ox_i, oy_i) = (ceil(i cos t - 0.5), ceil(i sin t - 0.5)),
    x the column and y the row, coordinates clamped to the edge.  Quantisation follows IM Q16: inputs scaled
    by 257, the sum rounded half up to 16 bits, then floor(q16 / 257) back to 8 bits (the model the fact sheet
    verified against IM 6.9.11 on 921,600 of 921,600 values; other IM builds may differ by 1 LSB)."""
    n, h, w, _ = x.shape
    k = _motion_kernel(radius, sigma)
    theta = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    i = np.arange(k.size, dtype=np.float64)
    ox = np.ceil(i[None, :] * np.cos(theta)[:, None] - 0.5).astype(np.int64)  # (N, taps)
    oy = np.ceil(i[None, :] * np.sin(theta)[:, None] - 0.5).astype(np.int64)
    rows = np.arange(h)[None, :, None]
    cols = np.arange(w)[None, None, :]
    base = (np.arange(n) * (h * w))[:, None, None]
    q16_in = 257.0 * x.reshape(n * h * w, x.shape[-1])  # 8-bit -> 16-bit quantum, exact in float64
    acc = np.zeros(x.shape, dtype=np.float64)
    for t in range(k.size):
        r = np.clip(rows + oy[:, t, None, None], 0, h - 1)
        c = np.clip(cols + ox[:, t, None, None], 0, w - 1)
        acc += k[t] * q16_in[base + r * w + c]
    q16 = np.clip(np.floor(acc + 0.5), 0, 65535)
    return (q16 // 257).astype(np.uint8)


def _warp_affine_reflect101(img: np.ndarray, m: np.ndarray) -> np.ndarray:
    """OpenCV 4.x ``warpAffine(img, M, (W, H), INTER_LINEAR, BORDER_REFLECT_101)`` on a float32 batch
    (N, H, W, C) with one forward 2x3 matrix per image (N, 2, 3).

    The matrix is inverted as OpenCV does, and source positions are computed in OpenCV's fixed point
    (1/1024 px accumulation, then 1/32 px sample positions); bilinear weights are float32 products of the
    1/32-step tables.  OpenCV 5 samples at exact positions instead; the difference is below 1/64 px."""
    n, h, w, _ = img.shape
    m = np.asarray(m, dtype=np.float64)
    a11, a12, b1 = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    a21, a22, b2 = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    det = a11 * a22 - a12 * a21
    inv_det = np.where(det != 0, 1.0 / np.where(det != 0, det, 1.0), 0.0)
    i11, i22 = a22 * inv_det, a11 * inv_det
    i12, i21 = -a12 * inv_det, -a21 * inv_det
    j1 = -i11 * b1 - i12 * b2
    j2 = -i21 * b1 - i22 * b2

    xs = np.arange(w, dtype=np.float64)
    ys = np.arange(h, dtype=np.float64)
    adelta = np.rint(i11[:, None] * xs[None, :] * 1024).astype(np.int64)  # (N, W)
    bdelta = np.rint(i21[:, None] * xs[None, :] * 1024).astype(np.int64)
    x0 = np.rint((i12[:, None] * ys[None, :] + j1[:, None]) * 1024).astype(np.int64) + 16  # (N, H)
    y0 = np.rint((i22[:, None] * ys[None, :] + j2[:, None]) * 1024).astype(np.int64) + 16
    sx = (x0[:, :, None] + adelta[:, None, :]) >> 5  # (N, H, W), in 1/32 px
    sy = (y0[:, :, None] + bdelta[:, None, :]) >> 5
    ix, fx = sx >> 5, (sx & 31).astype(np.float32) / np.float32(32)
    iy, fy = sy >> 5, (sy & 31).astype(np.float32) / np.float32(32)
    wx0, wy0 = np.float32(1) - fx, np.float32(1) - fy
    c0, c1 = _reflect101(ix, w), _reflect101(ix + 1, w)
    r0, r1 = _reflect101(iy, h), _reflect101(iy + 1, h)
    batch = np.arange(n)[:, None, None]
    out = (
        img[batch, r0, c0] * (wy0 * wx0)[..., None]
        + img[batch, r0, c1] * (wy0 * fx)[..., None]
        + img[batch, r1, c0] * (fy * wx0)[..., None]
        + img[batch, r1, c1] * (fy * fx)[..., None]
    )
    return out.astype(np.float32)


def _map_linear_reflect(img: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.map_coordinates(order=1, mode='reflect')`` on a batch (N, H, W, C), sampling every channel
    at the same (row, col) positions (N, H, W): linear interpolation of the half-sample symmetric extension."""
    n, h, w, _ = img.shape
    r0 = np.floor(rows)
    c0 = np.floor(cols)
    fr = (rows - r0)[..., None]
    fc = (cols - c0)[..., None]
    r0 = r0.astype(np.int64)
    c0 = c0.astype(np.int64)
    ra, rb = _reflect_sym(r0, h), _reflect_sym(r0 + 1, h)
    ca, cb = _reflect_sym(c0, w), _reflect_sym(c0 + 1, w)
    batch = np.arange(n)[:, None, None]
    src = img.astype(np.float64)
    top = src[batch, ra, ca] * (1.0 - fc) + src[batch, ra, cb] * fc
    bot = src[batch, rb, ca] * (1.0 - fc) + src[batch, rb, cb] * fc
    return (top * (1.0 - fr) + bot * fr).astype(img.dtype)


# --------------------------------------------------------------------------------------------------------------
# OpenCV ports used by spatter: Canny, 5x5 chamfer distance transform, equalizeHist
# --------------------------------------------------------------------------------------------------------------


def _canny(img: np.ndarray, low: float, high: float) -> np.ndarray:
    """OpenCV ``Canny(img, low, high)`` (aperture 3, L1 gradient) on a uint8 batch (N, H, W); True = edge.

    3x3 Sobel with replicated borders, magnitude |gx| + |gy|, non-maximum suppression with OpenCV's integer
    tan(22.5 deg) sectors and its strict/non-strict comparisons (zero magnitude outside the image), then
    8-connected hysteresis: weak pixels (> low) are kept when connected to a strong one (> high)."""
    _, h, w = img.shape
    p = np.pad(img.astype(np.int64), ((0, 0), (1, 1), (1, 1)), mode="edge")

    def at(dy: int, dx: int) -> np.ndarray:
        return p[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    mag = np.abs(gx) + np.abs(gy)
    mp = np.pad(mag, ((0, 0), (1, 1), (1, 1)), mode="constant")

    def mag_at(dy, dx) -> np.ndarray:
        return mp[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    lo, hi = int(np.floor(low)), int(np.floor(high))
    if lo > hi:
        lo, hi = hi, lo
    ax = np.abs(gx)
    ay = np.abs(gy) << 15
    tg22x = ax * 13573  # round(tan(22.5 deg) * 2**15)
    tg67x = tg22x + (ax << 16)
    horiz = ay < tg22x
    vert = ~horiz & (ay > tg67x)
    diag = ~horiz & ~vert
    same_sign = (gx ^ gy) >= 0
    keep_h = (mag > mag_at(0, -1)) & (mag >= mag_at(0, 1))
    keep_v = (mag > mag_at(-1, 0)) & (mag >= mag_at(1, 0))
    # s = +1 (same signs): previous row at col-1, next row at col+1; s = -1: previous row col+1, next row col-1
    keep_d = np.where(
        same_sign,
        (mag > mag_at(-1, -1)) & (mag > mag_at(1, 1)),
        (mag > mag_at(-1, 1)) & (mag > mag_at(1, -1)),
    )
    keep = (horiz & keep_h) | (vert & keep_v) | (diag & keep_d)
    weak = (mag > lo) & keep
    strong = weak & (mag > hi)
    if not strong.any():
        return np.zeros_like(strong)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connectivity inside each image, never across images
    labels, _ = ndimage.label(weak, structure=structure)
    good = np.unique(labels[strong])
    return np.isin(labels, good[good > 0])


_DIST_HV, _DIST_DIAG, _DIST_LONG = np.float32(1.0), np.float32(1.4), np.float32(2.1969)  # OpenCV DIST_L2, mask 5
_DIST_INIT = np.float32(np.finfo(np.float32).max)


def _distance_transform_l2_5(nonzero: np.ndarray) -> np.ndarray:
    """OpenCV 4.x ``distanceTransform(src, DIST_L2, 5)`` on a boolean batch (N, H, W) (True = non-zero pixel).

    The two-pass 5x5 chamfer propagation with weights 1 / 1.4 / 2.1969, each candidate ``neighbour + weight``
    rounded to float32 exactly as OpenCV's float implementation does (so e.g. ten diagonal steps give
    13.999998, not 14); the image border counts as infinitely far (FLT_MAX), so an image without any zero
    pixel gets FLT_MAX everywhere.  The neighbours in the previous two rows are handled a row at a time; the
    in-row neighbour is a sequential sweep over columns, vectorised over the batch."""
    n, h, w = nonzero.shape
    t = np.full((n, h + 4, w + 4), _DIST_INIT, dtype=np.float32)
    zero = ~nonzero
    for sweep in (1, -1):  # forward (top-left to bottom-right), then backward
        rows = range(2, h + 2) if sweep == 1 else range(h + 1, 1, -1)
        for i in rows:
            p1, p2 = i - sweep, i - 2 * sweep  # the previous row and the one before, in sweep order
            cand = np.minimum.reduce(
                [
                    t[:, i, 2 : w + 2],  # the current value (initial value in the forward pass)
                    t[:, p2, 1 : w + 1] + _DIST_LONG,
                    t[:, p2, 3 : w + 3] + _DIST_LONG,
                    t[:, p1, 0:w] + _DIST_LONG,
                    t[:, p1, 1 : w + 1] + _DIST_DIAG,
                    t[:, p1, 2 : w + 2] + _DIST_HV,
                    t[:, p1, 3 : w + 3] + _DIST_DIAG,
                    t[:, p1, 4 : w + 4] + _DIST_LONG,
                ]
            )
            cand[zero[:, i - 2]] = 0
            cols = range(w) if sweep == 1 else range(w - 1, -1, -1)
            for j in cols:
                jj = j + 2
                v = np.minimum(cand[:, j], t[:, i, jj - sweep] + _DIST_HV)
                v[zero[:, i - 2, j]] = 0
                t[:, i, jj] = v
    return t[:, 2 : h + 2, 2 : w + 2].copy()


def _equalize_hist(img: np.ndarray) -> np.ndarray:
    """OpenCV ``equalizeHist`` on each uint8 image of a batch (N, H, W)."""
    out = np.empty_like(img)
    for k in range(img.shape[0]):
        hist = np.bincount(img[k].ravel(), minlength=256)
        first = int(np.flatnonzero(hist)[0])
        total = img[k].size
        if hist[first] == total:
            out[k] = first
            continue
        scale = np.float32(255.0) / np.float32(total - hist[first])
        cum = np.cumsum(hist).astype(np.int64) - hist[first]
        lut = np.rint(cum.astype(np.float32) * scale)
        lut[: first + 1] = 0
        out[k] = np.clip(lut, 0, 255).astype(np.uint8)[img[k]]
    return out


# --------------------------------------------------------------------------------------------------------------
# The corruptions.  Each takes a uint8 chunk (N, H, W, 3), the severity's parameters and one Generator per image.
# --------------------------------------------------------------------------------------------------------------


def _stack_draws(rngs: Rngs, draw: Callable[[np.random.Generator], np.ndarray]) -> np.ndarray:
    return np.stack([draw(g) for g in rngs])


def _gaussian_noise(x, c, rngs):
    noise = _stack_draws(rngs, lambda g: g.normal(0.0, c, size=x.shape[1:]))
    return _to_uint8(_unit64(x) + noise)


def _shot_noise(x, c, rngs):
    lam = _unit64(x) * c
    counts = np.stack([g.poisson(lam[k]) for k, g in enumerate(rngs)])
    return _to_uint8(counts / c)


def _impulse_noise(x, c, rngs):
    """skimage ``random_noise(mode='s&p', amount=c)``: each element flips with probability c, to 1 or 0 with
    equal probability (independent per channel, so the speckles are coloured)."""

    def draw(g):
        u = g.random(size=(2,) + x.shape[1:])
        return np.stack([u[0] < c, u[1] < 0.5])

    flips = _stack_draws(rngs, draw)
    out = np.where(flips[:, 0], np.where(flips[:, 1], 1.0, 0.0), _unit64(x))
    return _to_uint8(out)


def _speckle_noise(x, c, rngs):
    xf = _unit64(x)
    noise = _stack_draws(rngs, lambda g: g.normal(0.0, c, size=x.shape[1:]))
    return _to_uint8(xf + xf * noise)


@functools.cache
def _defocus_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """The original's ``disk`` kernel: a 17x17 (radius <= 8) indicator of X^2 + Y^2 <= radius^2, normalised,
    smoothed by OpenCV's 3x3 Gaussian (sigma = alias_sigma, reflect-101), all in float32.  Returned cropped
    to the central 5x5, outside which it is exactly zero."""
    if radius <= 8:
        span, ksize = 8, 3
    else:  # never reached with the CIFAR parameters
        span, ksize = int(np.ceil(radius)), 5
    ax = np.arange(-span, span + 1)
    xx, yy = np.meshgrid(ax, ax)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float32)
    disk /= np.sum(disk, dtype=np.float32)
    t = np.arange(ksize) - (ksize - 1) / 2
    g = np.exp(-(t * t) / (2.0 * alias_sigma * alias_sigma))
    g = (g / g.sum()).astype(np.float32)
    k = ndimage.correlate1d(disk, g, axis=1, mode="mirror")
    k = ndimage.correlate1d(k, g, axis=0, mode="mirror")
    c = span
    half = 2 if ksize == 3 else span
    inner = k[c - half : c + half + 1, c - half : c + half + 1]
    if np.count_nonzero(k) != np.count_nonzero(inner):  # pragma: no cover - guards the crop above
        raise AssertionError("defocus kernel has mass outside its central crop")
    return inner.astype(np.float64)


def _defocus_blur(x, c, rngs):
    k = _defocus_kernel(*c)
    out = ndimage.correlate(_unit64(x), k[None, :, :, None], mode="mirror")  # filter2D, reflect-101
    return _to_uint8(out)


def _gaussian_blur(x, c, rngs):
    return _to_uint8(_sk_gaussian(_unit64(x), c))


def _glass_blur(x, c, rngs):
    """Gaussian (sigma) -> trunc to uint8 -> ``iterations`` passes of the local pixel move -> Gaussian again.

    Each pass is the parallel gather the original's aliased "swap" really performs: for rows and columns
    2..n-1, new[h, w] = old[h + dy, w + dx] with i.i.d. dx, dy in {-1, 0} (``randint(-1, 1)``); rows and
    columns 0-1 are untouched.  The draws are laid out in the original loop order (h, w descending, dx
    before dy)."""
    sigma, max_delta, iterations = c
    n, h, w, _ = x.shape
    img = (_sk_gaussian(_unit64(x), sigma) * 255).astype(np.uint8)
    lo = max_delta + 1  # first target row/column (2 for max_delta = 1)
    nh, nw = h - lo, w - lo
    draws = _stack_draws(rngs, lambda g: g.integers(-max_delta, max_delta, size=(iterations, nh, nw, 2)))
    draws = draws[:, :, ::-1, ::-1]  # index [a, b] of the draw loop is (h-1-a, w-1-b); flip to ascending
    batch = np.arange(n)[:, None, None]
    rows = np.arange(lo, h)[None, :, None]
    cols = np.arange(lo, w)[None, None, :]
    for it in range(iterations):
        dx, dy = draws[:, it, :, :, 0], draws[:, it, :, :, 1]
        new = img.copy()
        new[:, lo:, lo:] = img[batch, rows + dy, cols + dx]
        img = new
    return _to_uint8(_sk_gaussian(img / 255.0, sigma))


def _motion_blur_c(x, c, rngs):
    radius, sigma = c
    angles = np.array([g.uniform(-45, 45) for g in rngs])
    return _motion_blur(x, radius, sigma, angles)


@functools.cache
def _zoom_factors(end: float) -> tuple[float, ...]:
    return tuple(float(z) for z in np.arange(1, end, 0.01))


def _zoom_blur(x, c, rngs):
    """Average of the image and its clipped zooms by 1.00, 1.01, ... (float32).  Zoom factors that give the same
    crop/output geometry give identical arrays, so each geometry is computed once and re-added."""
    xf = _unit32(x)
    _, h, w, _ = x.shape
    acc = np.zeros_like(xf)
    cache: dict[tuple, np.ndarray] = {}
    zs = _zoom_factors(c)
    for z in zs:
        key = (_zoom_geometry(h, z), _zoom_geometry(w, z))
        if key not in cache:
            cache[key] = _clipped_zoom(xf, z)
        acc += cache[key]
    return _to_uint8((xf + acc) / np.float32(len(zs) + 1))


def _grey32(xf: np.ndarray) -> np.ndarray:
    """OpenCV ``cvtColor(RGB2GRAY)`` on float32 (N, H, W, 3) -> (N, H, W, 1): 0.299 R + 0.587 G + 0.114 B with
    float32 coefficients, evaluated as OpenCV's SIMD code does, fma(B, cb, fma(R, cr, G * cg)) (bit-identical
    to OpenCV 4.10 on x86-64; a build without FMA differs by at most 1 ulp)."""
    r, g, b = (xf[..., k : k + 1].astype(np.float64) for k in range(3))
    inner = (g * np.float32(0.587)).astype(np.float32).astype(np.float64)
    inner = (r * np.float64(np.float32(0.299)) + inner).astype(np.float32).astype(np.float64)
    return (b * np.float64(np.float32(0.114)) + inner).astype(np.float32)


def _snow(x, c, rngs):
    """Snow layer N(mean, std) -> clipped zoom -> threshold -> uint8 -> ImageMagick motion blur at an angle
    U(-135, -45) (streaks within 45 deg of vertical) -> added twice (once rotated 180 deg) to the whitened
    image x' = w x + (1 - w) max(x, 1.5 grey + 0.5)."""
    mean, std, zoom, thr, radius, bsigma, wimg = c
    _, h, w, _ = x.shape
    layers = []
    angles = []
    for g in rngs:  # per image: the normal draw, then the angle
        layers.append(g.normal(mean, std, size=(h, w)))
        angles.append(g.uniform(-135, -45))
    layer = np.stack(layers)[..., None]  # float64 (N, H, W, 1)
    layer = _clipped_zoom(layer, zoom) if zoom != 1 else layer
    layer = np.where(layer < thr, 0.0, layer)
    layer8 = _to_uint8(layer)
    snow = _motion_blur(layer8, radius, bsigma, np.array(angles)) / 255.0  # float64 (N, H, W, 1)

    xf = _unit32(x)
    grey = _grey32(xf)
    wimg32 = np.float32(wimg)
    xf = wimg32 * xf + np.float32(1 - wimg) * np.maximum(xf, grey * np.float32(1.5) + np.float32(0.5))
    return _to_uint8(xf + snow + snow[:, ::-1, ::-1])


@functools.lru_cache(maxsize=1)
def _frost_textures() -> tuple[np.ndarray, ...]:
    """frost1..frost5 as RGB uint8, shrunk by 1/5 the way OpenCV's bilinear resize does for an exact 1/5 factor
    (every 5th pixel starting at index 2; sizes round(0.2 * W) x round(0.2 * H))."""
    folder = resources.files("ttcompress.assets").joinpath("frost")
    out = []
    for fname in ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"):
        with folder.joinpath(fname).open("rb") as fh:
            im = Image.open(fh)
            im.load()
        arr = np.asarray(im.convert("RGB"))
        hh, ww = arr.shape[:2]
        sh, sw = round(hh * 0.2), round(ww * 0.2)
        out.append(np.ascontiguousarray(arr[2::5, 2::5][:sh, :sw]))
    return tuple(out)


def _frost(x, c, rngs):
    """out = clip(a * x + b * crop, 0, 255) on the 0-255 scale, crop a random (H, W) window of one of
    frost1..frost5 (``randint(5)``, then row and column offsets with exclusive upper bounds)."""
    a, b = c
    _, h, w, _ = x.shape
    tex = _frost_textures()
    if any(t.shape[0] <= h or t.shape[1] <= w for t in tex):
        smallest = (min(t.shape[0] for t in tex) - 1, min(t.shape[1] for t in tex) - 1)
        raise CorruptionError(f"frost needs images of at most {smallest[0]}x{smallest[1]} pixels, got {h}x{w}")
    crops = np.empty_like(x)
    for k, g in enumerate(rngs):
        t = tex[int(g.integers(5))]
        r0 = int(g.integers(0, t.shape[0] - h))
        c0 = int(g.integers(0, t.shape[1] - w))
        crops[k] = t[r0 : r0 + h, c0 : c0 + w]
    out = np.clip(a * x.astype(np.float64) + b * crops.astype(np.float64), 0, 255)
    return out.astype(np.uint8)


def _plasma_fractal(u: np.ndarray, size: int, decay: float) -> np.ndarray:
    """Diamond-square height maps on a size x size torus for a batch, normalised to [0, 1].

    ``u`` (N, size*size - 1) holds U(-1, 1) draws consumed level by level (squares, then the diamonds on grid
    rows, then the diamonds on grid columns); the noise added at a level with amplitude a is a * a * u, the
    original's ``a * uniform(-a, a)``; a starts at 100 and is divided by ``decay`` per level."""
    n = u.shape[0]
    grid = np.zeros((n, size, size), dtype=np.float64)
    step = size
    amp = 100.0
    pos = 0

    def noise(shape):
        nonlocal pos
        cnt = shape[0] * shape[1]
        out = u[:, pos : pos + cnt].reshape((n,) + shape)
        pos += cnt
        return amp * (amp * out)

    while step >= 2:
        half = step // 2
        corners = grid[:, 0::step, 0::step]  # (N, m, m) lattice points
        # square step: cell centres get the mean of their 4 corners (torus) + noise
        centres = (
            corners
            + np.roll(corners, -1, axis=1)
            + np.roll(corners, -1, axis=2)
            + np.roll(np.roll(corners, -1, axis=1), -1, axis=2)
        ) / 4.0 + noise(corners.shape[1:])
        grid[:, half::step, half::step] = centres
        # diamonds on lattice rows (r*step, c*step + half): left/right lattice points, centres above/below
        d1 = (corners + np.roll(corners, -1, axis=2) + centres + np.roll(centres, 1, axis=1)) / 4.0
        grid[:, 0::step, half::step] = d1 + noise(corners.shape[1:])
        # diamonds on lattice columns (r*step + half, c*step): lattice points above/below, centres left/right
        d2 = (corners + np.roll(corners, -1, axis=1) + centres + np.roll(centres, 1, axis=2)) / 4.0
        grid[:, half::step, 0::step] = d2 + noise(corners.shape[1:])
        step //= 2
        amp /= decay
    grid -= grid.min(axis=(1, 2), keepdims=True)
    grid /= grid.max(axis=(1, 2), keepdims=True)
    return grid


def _fog(x, c, rngs):
    """out = clip((x + s P) * m / (m + s)) with P a plasma fractal (same for all channels) and m the image max."""
    strength, decay = c
    _, h, w, _ = x.shape
    size = 32
    while size < max(h, w):
        size *= 2
    u = _stack_draws(rngs, lambda g: g.uniform(-1.0, 1.0, size=size * size - 1))
    plasma = _plasma_fractal(u, size, decay)[:, :h, :w, None]
    xf = _unit64(x)
    m = xf.max(axis=(1, 2, 3), keepdims=True)
    return _to_uint8((xf + strength * plasma) * m / (m + strength))


def _brightness(x, c, rngs):
    hsv = _rgb2hsv(_unit64(x))
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return _to_uint8(_hsv2rgb(hsv))


def _saturate(x, c, rngs):
    a, b = c
    hsv = _rgb2hsv(_unit64(x))
    hsv[..., 1] = np.clip(hsv[..., 1] * a + b, 0, 1)
    return _to_uint8(_hsv2rgb(hsv))


def _contrast(x, c, rngs):
    xf = _unit64(x)
    means = xf.mean(axis=(1, 2), keepdims=True)  # per image and channel
    return _to_uint8((xf - means) * c + means)


def _elastic_transform(x, c, rngs):
    """Random affine (3 points jittered by U(-A, A), OpenCV warpAffine, reflect-101), then a smooth random
    displacement (alpha * Gaussian(sigma, reflect, truncate 3) of U(-1, 1) fields) resampled linearly with
    scipy's ``reflect`` border.  All in float32 like the original."""
    n, h, w, _ = x.shape
    size = min(h, w)  # 32 in the original, whose pixel parameters are 32 * (fractions)
    alpha, sigma, jitter = (size * v for v in c)
    c0, c1 = np.float32(h) // 2, np.float32(w) // 2
    sq = np.float32(size // 3)
    pts1 = np.array([[c0 + sq, c1 + sq], [c0 + sq, c1 - sq], [c0 - sq, c1 - sq]], dtype=np.float32)  # as (x, y)
    jit, fx, fy = [], [], []
    for g in rngs:  # per image: affine jitter, then the dx field, then the dy field
        jit.append(g.uniform(-jitter, jitter, size=(3, 2)))
        fx.append(g.uniform(-1, 1, size=(h, w)))
        fy.append(g.uniform(-1, 1, size=(h, w)))
    pts2 = pts1[None] + np.stack(jit).astype(np.float32)  # (N, 3, 2)
    src = np.concatenate([pts1.astype(np.float64), np.ones((3, 1))], axis=1)  # (3, 3)
    # getAffineTransform: M @ [x, y, 1]^T = q for the 3 points; solve src @ M^T = pts2
    m = np.linalg.solve(np.broadcast_to(src, (n, 3, 3)), pts2.astype(np.float64)).transpose(0, 2, 1)
    warped = _warp_affine_reflect101(_unit32(x), m)

    dx = (_sk_gaussian(np.stack(fx), sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    dy = (_sk_gaussian(np.stack(fy), sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    rows = np.arange(h)[None, :, None] + dy.astype(np.float64)
    cols = np.arange(w)[None, None, :] + dx.astype(np.float64)
    out = _map_linear_reflect(warped, rows, cols)
    return _to_uint8(out)


def _pixelate(x, c, rngs):
    """Pillow BOX resize down to int(W*c) x int(H*c) and BOX back up (the way back is nearest-neighbour)."""
    n, h, w, _ = x.shape
    small = (max(1, int(w * c)), max(1, int(h * c)))
    out = np.empty_like(x)
    for k in range(n):
        im = Image.fromarray(x[k]).resize(small, _BOX).resize((w, h), _BOX)
        out[k] = np.asarray(im)
    return out


def _jpeg_compression(x, c, rngs):
    """Pillow JPEG encode (quality c, baseline, 4:2:0, default tables) and decode, in memory."""
    out = np.empty_like(x)
    for k in range(x.shape[0]):
        buf = io.BytesIO()
        Image.fromarray(x[k]).save(buf, format="JPEG", quality=int(c))
        buf.seek(0)
        with Image.open(buf) as im:
            out[k] = np.asarray(im.convert("RGB"))
    return out


_WATER = np.array([175, 238, 238], dtype=np.float64) / 255.0  # PaleTurquoise (RGB)
_MUD = np.array([63, 42, 20], dtype=np.float64) / 255.0  # dark brown (RGB)


def _spatter(x, c, rngs):
    """Liquid layer N(mu, s) -> Gaussian -> threshold; then either "water" (severities 1-3: an additive
    pale-turquoise tint weighted by an embossed, equalised distance-to-Canny-edge map) or "mud" (4-5: a
    brown convex blend where the smoothed liquid mask is >= 0.8).

    Mode 0 follows OpenCV's integer/float behaviour step by step (uint8 wrap-around of layer values >= 1,
    Canny 50/150, 5x5 chamfer distance, cap 20, 3x3 box mean truncated to uint8, equalizeHist, the emboss
    filter saturated to uint8, a 3x3 box mean rounded to uint8, then float32).  If ``liquid * dist`` is zero
    everywhere (the original would divide 0 by 0) the image is returned unchanged."""
    mu, sd, sg, thr, k, mode = c
    n, h, w, _ = x.shape
    layer = _stack_draws(rngs, lambda g: g.normal(mu, sd, size=(h, w)))
    layer = _sk_gaussian(layer, sg)
    layer[layer < thr] = 0
    xf = _unit32(x)
    if mode == 0:
        lq = ((layer * 255).astype(np.int64) & 255).astype(np.uint8)  # C cast of values >= 256 wraps
        edges = _canny(lq, 50, 150)
        dist = _distance_transform_l2_5(~edges)
        dist = np.minimum(dist, np.float32(20))
        dist = (_box3(dist.astype(np.float64)) * (1.0 / 9)).astype(np.float32).astype(np.uint8)
        dist = _equalize_hist(dist)
        p = np.pad(dist.astype(np.int64), ((0, 0), (1, 1), (1, 1)), mode="reflect")
        emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
        acc = np.zeros((n, h, w), dtype=np.int64)
        for dy in range(3):
            for dx in range(3):
                if emboss[dy, dx]:
                    acc += emboss[dy, dx] * p[:, dy : dy + h, dx : dx + w]
        dist = np.clip(acc, 0, 255)
        dist = np.rint(_box3(dist) * (1.0 / 9)).astype(np.float32)  # blur on uint8 (rounded), then float32
        m = lq.astype(np.float32) * dist
        mmax = m.max(axis=(1, 2), keepdims=True)
        m = np.where(mmax > 0, m / np.where(mmax > 0, mmax, 1), 0).astype(np.float32) * np.float32(k)
        out = xf + m[..., None] * _WATER.astype(np.float32)
    else:
        mask = (layer > thr).astype(np.float32)
        mask = _sk_gaussian(mask, k)
        mask[mask < 0.8] = 0
        mask = mask[..., None]
        out = xf * (np.float32(1) - mask) + mask * _MUD.astype(np.float32)
    return _to_uint8(out)


_BOX = getattr(Image, "Resampling", Image).BOX

_FUNCS: dict[str, Callable[[np.ndarray, object, Rngs | None], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur_c,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "spatter": _spatter,
    "saturate": _saturate,
}
assert tuple(_FUNCS) == ALL and set(_PARAMS) == set(ALL)


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def _check_args(images, name, severity, seed) -> tuple[np.ndarray, str, int, int]:
    if not isinstance(name, str) or name not in _FUNCS:
        raise CorruptionError(f"unknown corruption {name!r}; valid names: {', '.join(ALL)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= int(severity) <= 5:
        raise CorruptionError(f"severity must be an integer from 1 to 5, got {severity!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise CorruptionError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(images, np.ndarray):
        raise CorruptionError(f"images must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise CorruptionError(f"images must be uint8 (0-255), got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise CorruptionError(f"images must have shape (N, H, W, 3) (NHWC, RGB), got {images.shape}")
    if images.shape[0] and min(images.shape[1:3]) < MIN_SIZE:
        raise CorruptionError(f"images must be at least {MIN_SIZE}x{MIN_SIZE} pixels, got {images.shape[1:3]}")
    return np.ascontiguousarray(images), name, int(severity), int(seed)


def _generators(seed: int, name: str, severity: int, start: int, stop: int) -> list[np.random.Generator]:
    code = zlib.crc32(name.encode("ascii"))
    return [np.random.default_rng([seed, code, severity, i]) for i in range(start, stop)]


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply CIFAR-10-C corruption ``name`` at ``severity`` (1..5) to a uint8 NHWC RGB batch.

    Returns a new uint8 array of the same shape.  Deterministic for a given (images, name, severity, seed):
    image ``i`` draws from its own ``np.random.Generator`` seeded by (seed, name, severity, i), never from the
    global numpy RNG, so ``corrupt(x)[:k] == corrupt(x[:k])``.  Raises :class:`CorruptionError` (a
    ``ValueError``) for an unknown name, a severity outside 1..5, or a malformed image array."""
    x, name, severity, seed = _check_args(images, name, severity, seed)
    params = _PARAMS[name][severity - 1]
    fn = _FUNCS[name]
    out = np.empty_like(x)
    for start in range(0, x.shape[0], _CHUNK):
        stop = min(start + _CHUNK, x.shape[0])
        rngs = _generators(seed, name, severity, start, stop) if name in _RANDOM else None
        out[start:stop] = fn(x[start:stop], params, rngs)
    return out


def sample_grid(image: np.ndarray, names=ALL, severities=(1, 2, 3, 4, 5), seed=0) -> np.ndarray:
    """One uint8 HWC mosaic: a row per corruption in ``names``, the clean image in the first column and then a
    column per severity (tiles abut, no gaps): shape (len(names) * H, (1 + len(severities)) * W, 3)."""
    img = np.asarray(image)
    if img.ndim != 3:
        raise CorruptionError(f"sample_grid takes one HWC image, got shape {img.shape}")
    names = (names,) if isinstance(names, str) else tuple(names)
    severities = tuple(severities)
    batch = img[None]
    rows = []
    for name in names:
        tiles = [img] + [corrupt(batch, name, s, seed=seed)[0] for s in severities]
        rows.append(np.concatenate(tiles, axis=1))
    if not rows:
        raise CorruptionError("sample_grid needs at least one corruption name")
    return np.concatenate(rows, axis=0)


def save_sample_grid(image: np.ndarray, path, names=ALL, seed=0, scale=3) -> None:
    """Write :func:`sample_grid` (severities 1..5) as a PNG, upscaled ``scale`` times with nearest neighbour,
    with the corruption names as row labels and "clean, 1..5" as column headers (Pillow's default font)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    scale = int(scale)
    if scale < 1:
        raise CorruptionError(f"scale must be a positive integer, got {scale}")
    severities = (1, 2, 3, 4, 5)
    grid = sample_grid(image, names, severities, seed)
    h, w = np.asarray(image).shape[:2]
    th, tw = h * scale, w * scale
    gap = max(2, scale)
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(s: str) -> tuple[int, int]:
        l, t, r, b = probe.textbbox((0, 0), s, font=font)
        return r - l, b - t

    label_w = max(text_size(n)[0] for n in names) + 12
    header_h = max(text_size("clean")[1], 10) + 10
    cols = 1 + len(severities)
    width = label_w + cols * tw + (cols - 1) * gap + gap
    height = header_h + len(names) * th + (len(names) - 1) * gap + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, head in enumerate(["clean"] + [f"severity {s}" if tw >= 70 else str(s) for s in severities]):
        x0 = label_w + j * (tw + gap)
        tw_text, _ = text_size(head)
        draw.text((x0 + (tw - tw_text) // 2, 4), head, fill=(0, 0, 0), font=font)
    for i, name in enumerate(names):
        y0 = header_h + i * (th + gap)
        _, th_text = text_size(name)
        draw.text((4, y0 + (th - th_text) // 2), name, fill=(0, 0, 0), font=font)
        for j in range(cols):
            tile = grid[i * h : (i + 1) * h, j * w : (j + 1) * w]
            big = np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1)
            canvas.paste(Image.fromarray(big), (label_w + j * (tw + gap), y0))
    canvas.save(path, format="PNG")
