"""Tests of ttcompress.metrics: predict, accuracy, ECE, AutoAttack, empirical Lipschitz."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from ttcompress.data import ImageSet
from ttcompress.errors import UserError
from ttcompress.metrics import accuracy, autoattack, ece, empirical_lipschitz, predict, reliability


class TinyCNN(torch.nn.Module):
    def __init__(self, c=3, k=10):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)
        self.fc = torch.nn.Linear(6, k)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def _linear_model(c=1, h=8, w=8, k=10, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c * h * w, k))


pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder:
    """A Progress that records what it is told."""

    def __init__(self):
        self.tasks = []
        self.events = []

    @contextlib.contextmanager
    def task(self, description, total=None):
        self.tasks.append((description, total))

        def advance(n=1, **fields):
            self.events.append((description, n, fields))

        yield advance


# ----------------------------------------------------------------------------------------------------------------
# predict / accuracy
# ----------------------------------------------------------------------------------------------------------------


def test_predict_matches_model_and_restores_mode():
    torch.manual_seed(0)
    model = TinyCNN()
    model.train()
    x8 = torch.randint(0, 256, (13, 3, 8, 8), dtype=torch.uint8)
    s = ImageSet(x8, torch.zeros(13, dtype=torch.int64), 10, None, "t")
    rec = Recorder()
    logits = predict(model, s, batch_size=5, progress=rec)
    assert model.training
    assert logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.shape == (13, 10)
    model.eval()
    with torch.no_grad():
        ref = model(x8.float() / 255)
    assert torch.allclose(logits, ref, atol=1e-6)
    assert torch.allclose(predict(model, x8.float() / 255, batch_size=13), ref, atol=1e-6)
    assert sum(e[1] for e in rec.events) == 13


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75
    assert accuracy(logits, torch.tensor([1, 0, 1, 0])) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# ECE
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_matches_torchmetrics(seed):
    from torchmetrics.classification import MulticlassCalibrationError

    g = torch.Generator().manual_seed(seed)
    k = 10
    logits = torch.randn(2000, k, generator=g) * (1.0 + 2.0 * seed)
    labels = torch.randint(0, k, (2000,), generator=g)
    # make the model right more often than chance so the bins are uneven
    labels[:1000] = logits[:1000].argmax(1)
    ref = MulticlassCalibrationError(num_classes=k, n_bins=15, norm="l1")(logits, labels).item()
    assert ece(logits, labels) == pytest.approx(ref, abs=1e-6)
    probs = torch.softmax(logits, 1)
    assert ece(probs, labels) == pytest.approx(ref, abs=1e-6)


def _probs_with_confidence(conf, predicted, k=10):
    rest = (1.0 - conf) / (k - 1)
    assert rest < conf
    p = np.full(k, rest)
    p[predicted] = conf
    return p


def test_ece_hand_built():
    # (confidence, correct)
    cases = [(0.9, True), (0.9, False), (0.3, True), (0.2, True), (0.15, False), (0.55, True)]
    probs, labels = [], []
    for conf, correct in cases:
        probs.append(_probs_with_confidence(conf, predicted=1))
        labels.append(1 if correct else 0)
    probs = torch.tensor(np.array(probs))
    labels = torch.tensor(labels)
    # right-closed 15 bins: 0.9 -> (13/15, 14/15], 0.3 -> (4/15, 5/15], 0.2 -> (2/15, 3/15] together with 0.15,
    # 0.55 -> (8/15, 9/15]
    expected = (
        2 / 6 * abs(0.5 - 0.9)
        + 1 / 6 * abs(1.0 - 0.3)
        + 2 / 6 * abs(0.5 - (0.2 + 0.15) / 2)
        + 1 / 6 * abs(1.0 - 0.55)
    )
    assert ece(probs, labels) == pytest.approx(expected, abs=1e-12)
    r = reliability(probs, labels)
    assert r["count"].tolist() == [0, 0, 2, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 2, 0]
    assert r["accuracy"][2] == 0.5 and r["confidence"][2] == pytest.approx(0.175)
    assert r["share"].sum() == pytest.approx(1.0)
    # float32 input: 0.2f sits on the 3/15 boundary in float32 too and stays in bin 2
    assert ece(probs.float(), labels) == pytest.approx(expected, abs=1e-6)


def test_ece_perfectly_calibrated_is_zero():
    # in one bin: confidence 0.8, 4 of 5 correct
    probs = torch.tensor(np.array([_probs_with_confidence(0.8, 2)] * 5))
    labels = torch.tensor([2, 2, 2, 2, 0])
    assert ece(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert ece(probs, torch.tensor([0, 0, 0, 0, 0])) == pytest.approx(0.8)


# ----------------------------------------------------------------------------------------------------------------
# AutoAttack
# ----------------------------------------------------------------------------------------------------------------


def _exact_linear_robust(model, x, y, eps):
    """Exact Linf robustness of a linear classifier inside the [0,1] box: per class pair, minimise the margin."""
    lin = model[1]
    W = lin.weight.detach().double()
    b = lin.bias.detach().double()
    xf = x.flatten(1).double()
    lo, hi = (xf - eps).clamp(0, 1), (xf + eps).clamp(0, 1)
    robust, margins = [], []
    for i in range(x.shape[0]):
        yi = int(y[i])
        d = W[yi][None, :] - W  # (K, D)
        c = b[yi] - b
        worst = torch.minimum(d * lo[i], d * hi[i]).sum(1) + c
        worst[yi] = float("inf")
        m = float(worst.min())
        margins.append(m)
        robust.append(m > 0)
    return float(np.mean(robust)), np.array(margins)


def test_autoattack_linear_model_exact():
    model = _linear_model(seed=1)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 1, 8, 8, generator=g)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    y[0] = (y[0] + 1) % 10  # one point misclassified from the start
    # pick eps between two points' critical radii, far from both, so exactly some points survive
    crit = []
    for i in range(1, 10):
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            ok = _exact_linear_robust(model, x[i : i + 1], y[i : i + 1], mid)[0] == 1.0
            lo, hi = (mid, hi) if ok else (lo, mid)
        crit.append(lo)
    crit = sorted(crit)
    eps = (crit[3] + crit[4]) / 2
    assert min(abs(c - eps) for c in crit) > 0.1 * eps
    exact, _ = _exact_linear_robust(model, x, y, eps)
    assert exact == pytest.approx(5 / 10)

    before_rng = torch.get_rng_state()
    rec = Recorder()
    out = autoattack(model, x, y, eps=eps, batch_size=16, seed=0, progress=rec)
    assert torch.equal(torch.get_rng_state(), before_rng)  # global RNG left alone
    assert all(p.requires_grad for p in model.parameters())
    assert set(out) == {"norm", "eps", "n", "version", "clean_accuracy", "robust_accuracy", "package"}
    assert out["package"].startswith("pyautoattack ") or out["package"].startswith("autoattack ")
    assert out["clean_accuracy"] == pytest.approx(0.9)
    assert out["robust_accuracy"] == pytest.approx(exact)
    assert out["n"] == 10 and out["norm"] == "Linf" and out["version"] == "standard" and out["eps"] == eps
    # progress: one task over the four standard attacks, each finished once
    assert rec.tasks and rec.tasks[-1][1] == 4
    finished = [e[2]["attack"] for e in rec.events if e[1] == 1 and "attack" in e[2]]
    assert finished == ["apgd-ce", "apgd-t", "fab-t", "square"]


def test_autoattack_cnn_and_eps_zero():
    torch.manual_seed(0)
    model = TinyCNN(3, 10)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        model.eval()
        pred = model(x.float() / 255).argmax(1)
    y = pred.clone()
    y[:2] = (y[:2] + 1) % 10
    s = ImageSet(x, y, 10, None, "t")
    zero = autoattack(model, s, eps=0.0, batch_size=8)
    assert zero["robust_accuracy"] == zero["clean_accuracy"] == pytest.approx(6 / 8)
    assert zero["package"] and zero["eps"] == 0.0
    # the real gradient attacks on a CNN (the full standard run is exercised on the linear model above)
    real = autoattack(model, s, eps=2 / 255, version="custom", attacks=["apgd-ce", "apgd-t"], batch_size=8)
    assert real["clean_accuracy"] == pytest.approx(6 / 8)
    assert real["robust_accuracy"] <= real["clean_accuracy"]
    # a big budget breaks an untrained network on every image
    big = autoattack(model, s, eps=0.5, version="custom", attacks=["apgd-ce"], batch_size=8)
    assert big["robust_accuracy"] == 0.0 and big["version"] == "custom"


def test_autoattack_l2_and_few_classes():
    model = _linear_model(c=1, h=8, w=8, k=5, seed=3)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    # 5 classes: APGD-T's 9 target classes must be lowered to 4 or the attack fails
    out = autoattack(model, x, y, norm="L2", eps=0.05, version="custom", attacks=["apgd-t"], batch_size=8)
    assert out["norm"] == "L2" and out["robust_accuracy"] <= out["clean_accuracy"] == 1.0
    big = autoattack(model, x, y, norm="L2", eps=5.0, version="custom", attacks=["apgd-ce", "apgd-t"])
    assert big["robust_accuracy"] == 0.0
    with pytest.raises(UserError, match="4 classes"):
        autoattack(_linear_model(k=3), torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), eps=0.1)


def test_autoattack_rejects_bad_arguments():
    model = _linear_model()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(UserError, match="norm"):
        autoattack(model, x, y, norm="L3")
    with pytest.raises(UserError, match="eps"):
        autoattack(model, x, y, eps=-0.1)
    with pytest.raises(UserError, match="custom"):
        autoattack(model, x, y, version="custom")
    with pytest.raises(UserError, match="version"):
        autoattack(model, x, y, version="fast")


# ----------------------------------------------------------------------------------------------------------------
# empirical Lipschitz
# ----------------------------------------------------------------------------------------------------------------


def test_lipschitz_linear_model_matches_formula():
    model = _linear_model(c=3, h=4, w=4, k=6, seed=2)
    x = torch.rand(9, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2])
    A = model[1].weight.detach().double()
    b = model[1].bias.detach().double()
    xf = x.flatten(1).double()
    # gradient of the cross-entropy of f(x) = A x + b w.r.t. x is A^T (softmax(f) - onehot(y))
    p = torch.softmax(xf @ A.T + b, dim=1)
    g = (p - torch.nn.functional.one_hot(y, 6).double()) @ A
    d = g / g.norm(dim=1, keepdim=True)
    expected = (d @ A.T).norm(dim=1)  # ||A d|| / ||d||
    out = empirical_lipschitz(model, x, y, radius=0.5, batch_size=4)
    assert out["radius"] == 0.5
    assert out["max"] == pytest.approx(float(expected.max()), rel=1e-5)
    assert out["mean"] == pytest.approx(float(expected.mean()), rel=1e-5)
    # the estimate never exceeds the true Lipschitz constant, the spectral norm of A
    assert out["max"] <= float(torch.linalg.matrix_norm(A, ord=2)) * (1 + 1e-6)
    # with an ImageSet the labels come from the set
    s = ImageSet((x * 255).round().to(torch.uint8), y, 6, None, "t")
    xs = s.images.double().flatten(1) / 255
    p = torch.softmax(xs @ A.T + b, dim=1)
    g = (p - torch.nn.functional.one_hot(y, 6).double()) @ A
    expected_s = ((g / g.norm(dim=1, keepdim=True)) @ A.T).norm(dim=1)
    out_s = empirical_lipschitz(model, s, radius=2.0)
    assert out_s["mean"] == pytest.approx(float(expected_s.mean()), rel=1e-5)


def test_lipschitz_nonlinear_and_zero_gradient():
    torch.manual_seed(0)
    model = TinyCNN(3, 10).eval()
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([1, 2, 3, 4])
    out = empirical_lipschitz(model, x, y, radius=0.5)
    # recompute one image by hand
    xi = x[:1].clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(xi), y[:1], reduction="sum")
    (gi,) = torch.autograd.grad(loss, xi)
    step = 0.5 * gi / gi.norm()
    with torch.no_grad():
        ratio0 = float((model(x[:1] + step) - model(x[:1])).norm() / step.norm())
    assert out["max"] >= ratio0 * (1 - 1e-5)
    assert np.isfinite(out["mean"]) and out["mean"] <= out["max"]

    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 3) + 0.0 * x.sum()

    flat = empirical_lipschitz(Constant(), x, torch.tensor([0, 1, 2, 0]))
    assert flat["max"] == 0.0 and flat["mean"] == 0.0
    with pytest.raises(UserError, match="radius"):
        empirical_lipschitz(model, x, y, radius=0.0)
