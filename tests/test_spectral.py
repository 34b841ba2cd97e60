"""Exact periodic spectra and clipping against the dense operator built from basis vectors."""

from __future__ import annotations

import pytest
import torch

from reference import dense_singular_values, periodic_conv, periodic_matrix
from ttcompress.kernel import Geometry
from ttcompress.spectral.periodic import clip, singular_values

CASES = [
    # (Cout, Cin, k, n, stride, dilation)
    (4, 3, 3, 8, (1, 1), (1, 1)),
    (5, 3, 3, 8, (2, 2), (1, 1)),  # stride 2, Cout < s²Cin
    (3, 6, 3, 6, (2, 2), (1, 1)),  # non-square channels
    (9, 2, 3, 6, (2, 2), (1, 1)),  # Cout > s²Cin
    (4, 2, 5, 4, (1, 1), (1, 1)),  # kernel larger than the input: wraps around
    (2, 3, 7, 4, (2, 2), (1, 1)),  # larger than the input and strided
    (3, 2, 3, 6, (1, 1), (2, 2)),  # dilation
    (3, 4, 1, 6, (2, 2), (1, 1)),  # 1×1 strided (a shortcut)
    (4, 4, 3, 6, (2, 1), (1, 1)),  # anisotropic stride
    (3, 3, 3, 5, (1, 1), (1, 1)),  # odd size: no self-mirrored Nyquist column
]


@pytest.mark.parametrize("cout,cin,k,n,stride,dilation", CASES)
def test_singular_values_match_dense_operator(cout, cin, k, n, stride, dilation):
    w = torch.randn(cout, cin, k, k, dtype=torch.float64)
    ref = dense_singular_values(periodic_matrix(w, (n, n), stride, dilation))
    got = singular_values(w, (n, n), Geometry(stride, dilation), dtype=torch.float64)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-10 * ref[0], rtol=0)


@pytest.mark.parametrize("cout,cin,k,n,stride,dilation", CASES[:4])
def test_float32_within_1e4_of_sigma_max(cout, cin, k, n, stride, dilation):
    w = torch.randn(cout, cin, k, k, dtype=torch.float64)
    ref = dense_singular_values(periodic_matrix(w, (n, n), stride, dilation))
    got = singular_values(w.float(), (n, n), Geometry(stride, dilation), dtype=torch.float32).double()
    assert (got - ref).abs().max() <= 1e-4 * ref[0]


def test_chunking_does_not_change_values():
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    a = singular_values(w, (8, 8), Geometry((2, 2)), dtype=torch.float64, chunk=1)
    b = singular_values(w, (8, 8), Geometry((2, 2)), dtype=torch.float64, chunk=1000)
    torch.testing.assert_close(a, b)


def test_stride_not_dividing_input_is_an_error():
    with pytest.raises(ValueError, match="divisible"):
        singular_values(torch.randn(2, 2, 3, 3), (7, 7), Geometry((2, 2)))


@pytest.mark.parametrize("cout,cin,k,n,stride,dilation", CASES)
def test_clip_is_sedghi_projection(cout, cin, k, n, stride, dilation):
    """The clipped kernel equals the dense-matrix construction: SVD of the operator, clamp, back to a kernel by
    reading the kernel's own taps off the (block-circulant) clipped operator."""
    torch.manual_seed(1)
    w = torch.randn(cout, cin, k, k, dtype=torch.float64)
    bound = 0.5 * float(singular_values(w, (n, n), Geometry(stride, dilation), dtype=torch.float64)[0])
    got = clip(w, (n, n), bound, Geometry(stride, dilation), dtype=torch.float64)
    assert got.shape == w.shape

    # reference: clamp the dense operator's singular values; the projection onto "periodic strided convs" is then
    # reading back the kernel at the taps: column of input pixel (c, t) for output (o, 0, 0) holds Σ of the taps at t.
    m = periodic_matrix(w, (n, n), stride, dilation)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    clipped = (u * s.clamp(max=bound)) @ vh
    m1, m2 = n // stride[0], n // stride[1]
    rows = clipped.reshape(cout, m1, m2, cin, n, n)[:, 0, 0]  # output pixel (0,0): y = Σ W[a,b] x[d·a, d·b]
    expected = torch.zeros_like(w)
    used = set()
    for a in range(k):
        for b in range(k):
            t = ((dilation[0] * a) % n, (dilation[1] * b) % n)
            if t in used:
                continue  # a tap wrapping onto an earlier one: the operator only sees their sum
            used.add(t)
            expected[:, :, a, b] = rows[:, :, t[0], t[1]]
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)


def test_clip_is_exact_when_kernel_covers_the_grid():
    w = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    got = clip(w, (4, 4), 1.0, Geometry(), dtype=torch.float64)
    sv = dense_singular_values(periodic_matrix(got, (4, 4)))
    assert sv[0] <= 1.0 + 1e-9
    # values below the bound are untouched
    orig = dense_singular_values(periodic_matrix(w, (4, 4)))
    torch.testing.assert_close(torch.sort(sv).values[: (orig < 1).sum()], torch.sort(orig).values[: (orig < 1).sum()])


def test_clip_reduces_sigma_max_and_keeps_small_kernels_small():
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64)
    before = singular_values(w, (8, 8), dtype=torch.float64)[0]
    got = clip(w, (8, 8), 1.0, dtype=torch.float64)
    after = singular_values(got, (8, 8), dtype=torch.float64)[0]
    assert after < before / 3
    # a kernel already below the bound is a fixed point
    small = w / (2 * before)
    torch.testing.assert_close(clip(small, (8, 8), 1.0, dtype=torch.float64), small, atol=1e-12, rtol=0)


def test_periodic_reference_is_pytorch_conv_with_circular_padding():
    """Sanity of the brute-force reference itself against torch's own circular conv."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="circular", bias=False).double()
    conv.weight.data.copy_(w)
    torch.testing.assert_close(periodic_conv(x, w, (2, 2), (1, 1), (1, 1)), conv(x))
