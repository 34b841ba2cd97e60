"""Brute-force references: the explicit dense matrix of a convolution, built by applying it to basis vectors; and
the small images and network the data-aware tests share."""

from __future__ import annotations

import torch
from torch import nn


def periodic_conv(x: torch.Tensor, kernel: torch.Tensor, stride=(1, 1), dilation=(1, 1), padding=(0, 0)) -> torch.Tensor:
    """PyTorch cross-correlation with circular boundary, any kernel size: y[i] = Σ_a W[a] x[(s·i + d·a − p) mod n]."""
    n1, n2 = x.shape[-2:]
    out = 0
    for a in range(kernel.shape[2]):
        for b in range(kernel.shape[3]):
            shifted = torch.roll(x, shifts=(-(dilation[0] * a - padding[0]), -(dilation[1] * b - padding[1])), dims=(-2, -1))
            sampled = shifted[..., :: stride[0], :: stride[1]]
            out = out + torch.einsum("oc,nchw->nohw", kernel[:, :, a, b], sampled)
    return out


def operator_matrix(apply, in_shape: tuple[int, ...], dtype=torch.float64) -> torch.Tensor:
    """Dense matrix of a linear map ``apply`` on tensors of shape ``in_shape`` (without batch): columns = images of
    the basis vectors."""
    size = 1
    for d in in_shape:
        size *= d
    basis = torch.eye(size, dtype=dtype).reshape(size, *in_shape)
    with torch.no_grad():
        out = apply(basis)
    return out.reshape(size, -1).T


def periodic_matrix(kernel: torch.Tensor, input_size, stride=(1, 1), dilation=(1, 1)) -> torch.Tensor:
    cin = kernel.shape[1]
    k = kernel.double()
    return operator_matrix(lambda x: periodic_conv(x, k, stride, dilation), (cin, *input_size))


def dense_singular_values(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix.double())


def periodic_conv_nd(x: torch.Tensor, kernel: torch.Tensor, stride=None, dilation=None) -> torch.Tensor:
    """Circular cross-correlation in any number of spatial dims, written tap by tap:
    ``y[o, i] = Σ_c Σ_a W[o, c, a] x[c, (s·i + d·a) mod n]`` for multi-indices ``i``, ``a``; ``x`` is (N, Cin, *n)."""
    import itertools

    dims = kernel.ndim - 2
    stride = (1,) * dims if stride is None else tuple(stride)
    dilation = (1,) * dims if dilation is None else tuple(dilation)
    spatial = tuple(range(-dims, 0))
    sample = (Ellipsis, *(slice(None, None, s) for s in stride))
    out = 0
    for a in itertools.product(*(range(k) for k in kernel.shape[2:])):
        shifted = torch.roll(x, shifts=tuple(-d * i for d, i in zip(dilation, a)), dims=spatial)
        tap = kernel[(slice(None), slice(None), *a)]
        out = out + torch.tensordot(shifted[sample], tap, dims=([1], [1])).movedim(-1, 1)
    return out


def periodic_matrix_nd(kernel: torch.Tensor, input_size, stride=None, dilation=None) -> torch.Tensor:
    """Dense matrix of the circular strided conv with ``kernel`` (Cout, Cin, *k) on ``input_size`` inputs."""
    k = kernel.double()
    return operator_matrix(lambda x: periodic_conv_nd(x, k, stride, dilation), (kernel.shape[1], *input_size))


def random_images(n: int = 12, size: int = 8, seed: int = 0, classes: int = 4):
    """``n`` random RGB images of ``size``² as an :class:`~ttcompress.data.ImageSet`."""
    from ttcompress.data import ImageSet

    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                    torch.randint(0, classes, (n,), generator=g), classes)


class TwoConvNet(nn.Module):
    """conv → ReLU → strided conv → mean pool → linear: small enough to compute every layer's output by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))).mean((2, 3)))
