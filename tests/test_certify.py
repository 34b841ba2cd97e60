"""Certified robustness from margins, network Lipschitz bounds, and the LipConvNet architectures."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ttcompress import archs
from ttcompress.archs.lipconvnet import LipConvNet
from ttcompress.certify import certified_accuracy, certified_radius, logit_margins, network_lipschitz_bound
from ttcompress.errors import UserError
from ttcompress.soc import SOCLayer, SOCTTConv2d


pytestmark = pytest.mark.usefixtures("one_thread")


LOGITS = torch.tensor([
    [3.0, 1.0, 0.0],  # correct, margin 2
    [2.0, 1.9, 0.0],  # correct, margin 0.1
    [0.0, 5.0, 0.0],  # wrong
    [1.0, 1.0, 0.0],  # tie at the top: margin 0
])
LABELS = torch.tensor([0, 0, 0, 0])


def test_margins_and_radius():
    torch.testing.assert_close(logit_margins(LOGITS), torch.tensor([2.0, 0.1, 5.0, 0.0]))
    torch.testing.assert_close(certified_radius(LOGITS, 2.0), torch.tensor([2.0, 0.1, 5.0, 0.0]) / (2 * math.sqrt(2)))


def test_certified_accuracy_hand_built():
    # threshold √2·L·ε: ε = 1/√2, L = 1 → margin must exceed 1
    assert certified_accuracy(LOGITS, LABELS, 1.0, 1 / math.sqrt(2)) == 0.25
    # L = 0.05 → margin must exceed 0.05: the second row is certified too; the wrong and the tied rows never
    assert certified_accuracy(LOGITS, LABELS, 0.05, 1 / math.sqrt(2)) == 0.5
    # radius 0 is clean accuracy minus ties
    assert certified_accuracy(LOGITS, LABELS, 1.0, 0.0) == 0.5
    # the default radius 36/255 with L = 4 (the normalisation of LipConvNet): threshold √2·4·36/255 ≈ 0.7986
    assert certified_accuracy(LOGITS, LABELS, 4.0) == 0.25
    assert certified_accuracy(LOGITS, LABELS, 10.0) == 0.25  # threshold 1.996 < 2
    assert certified_accuracy(LOGITS, LABELS, 11.0) == 0.0  # threshold 2.196 > 2


def test_threshold_is_strict_and_scales_with_lipschitz():
    logits = torch.tensor([[1.0, 0.0]])
    labels = torch.tensor([0])
    eps = 1 / math.sqrt(2)  # threshold = L
    assert certified_accuracy(logits, labels, 0.999, eps) == 1.0
    assert certified_accuracy(logits, labels, 1.001, eps) == 0.0


def test_invalid_inputs():
    with pytest.raises(ValueError):
        certified_accuracy(LOGITS, LABELS[:2])
    with pytest.raises(ValueError):
        certified_accuracy(LOGITS, LABELS, lipschitz=0.0)
    with pytest.raises(ValueError):
        certified_accuracy(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))


def tiny(conv_type="soc", rank=None):
    torch.manual_seed(0)
    return LipConvNet(5, num_classes=10, conv_type=conv_type, rank=rank, base_channels=4).eval()


@pytest.mark.parametrize("conv_type,rank", [("soc", None), ("soc-tt", 16)])
def test_lipconvnet_is_certifiably_one_lipschitz(conv_type, rank):
    net = tiny(conv_type, rank)
    bound = network_lipschitz_bound(net)
    assert 1.0 <= bound < 1.0 + 1e-3
    x = torch.rand(16, 3, 32, 32)
    y = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        ratio = (net(x) - net(y)).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert ratio.max() <= bound
    normalized = archs.Normalized(net, (0.5, 0.5, 0.5), (0.25, 0.5, 0.5))
    assert network_lipschitz_bound(normalized) == pytest.approx(4 * bound)


def test_certificates_survive_attacks():
    """Inside the certified radius no perturbation — random or along the gradient of the margin — flips it."""
    net = tiny()
    x = torch.rand(8, 3, 32, 32, requires_grad=True)
    logits = net(x)
    radius = certified_radius(logits, network_lipschitz_bound(net))
    top2 = logits.topk(2, dim=1).indices
    rows = torch.arange(8)
    gap = logits[rows, top2[:, 0]] - logits[rows, top2[:, 1]]
    (grad,) = torch.autograd.grad(gap.sum(), x)
    with torch.no_grad():
        for direction in (-grad, torch.randn_like(grad)):
            unit = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            moved = net(x + 0.999 * radius.view(-1, 1, 1, 1) * unit)
            assert torch.equal(moved.argmax(1), top2[:, 0])


def test_bound_tracks_non_orthonormal_frames():
    net = tiny("soc-tt", 16)
    layer = next(m for m in net.modules() if isinstance(m, SOCTTConv2d) and m.has_frames)
    with torch.no_grad():
        layer.frame_out.mul_(3.0)
    assert network_lipschitz_bound(net) == pytest.approx(3.0, rel=1e-3)
    assert net.orthogonal_loss() > 0


def test_non_lipschitz_network_is_refused():
    with pytest.raises(UserError, match="LipConvNet"):
        network_lipschitz_bound(nn.Sequential(nn.Conv2d(3, 3, 3)))
    lin = nn.Linear(4, 3)
    assert network_lipschitz_bound(lin) == pytest.approx(float(torch.linalg.matrix_norm(lin.weight.detach(), 2)))


def test_lipconvnet_layout():
    net = LipConvNet(10, base_channels=32)
    convs = [block.conv for block in net.chain()[:-1]]
    assert len(convs) == 10 and all(isinstance(c, SOCLayer) for c in convs)
    widths = [(c.in_channels, c.out_channels, c.stride, c.kernel_size) for c in convs]
    assert widths == [
        (3, 32, 1, 3), (32, 64, 2, 3), (64, 64, 1, 3), (64, 128, 2, 3), (128, 128, 1, 3), (128, 256, 2, 3),
        (256, 256, 1, 3), (256, 512, 2, 3), (512, 512, 1, 3), (512, 1024, 2, 1),
    ]
    assert (net.final_conv.in_channels, net.final_conv.out_channels) == (1024, 10)
    with pytest.raises(ValueError):
        LipConvNet(12)
    with pytest.raises(ValueError):
        LipConvNet(5, conv_type="soc-tt")


def test_registry_and_paper_compression_ratios():
    """Parameter counts reproduce the compression column of Senderovich et al. (2022), Table 1."""
    for name in ("lipconvnet-5", "lipconvnet-20-tt128", "lipconvnet-30-tt256"):
        info = archs.resolve(name)
        assert info.input_size == (3, 32, 32) and info.std == (0.2507,) * 3
    table = {(5, 128): 2.9, (5, 256): 1.2, (20, 128): 3.3, (20, 256): 1.4, (30, 128): 3.5, (30, 256): 1.5}
    with torch.device("meta"):
        counts = {}
        for depth in (5, 20, 30):
            for rank in (None, 128, 256):
                spec = f"lipconvnet-{depth}" + ("" if rank is None else f"-tt{rank}")
                net = archs.build_net(archs.resolve(spec))
                counts[depth, rank] = sum(p.numel() for p in net.parameters())
    for (depth, rank), ratio in table.items():
        assert round(counts[depth, None] / counts[depth, rank], 1) == ratio, (depth, rank)


def test_registry_build_runs():
    model = archs.build("lipconvnet-5")
    assert isinstance(model.net, LipConvNet) and model.normalization["std"] == [0.2507] * 3


def test_certified_accuracy_is_an_exact_fraction():
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    assert certified_accuracy(logits, torch.tensor([0, 1, 1]), 1.0, 0.5) == 2 / 3
