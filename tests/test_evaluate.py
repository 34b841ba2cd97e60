"""Tests of ttcompress.evaluate: the result document, CIFAR-C (official and generated), report files."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch

from ttcompress.data import ImageSet
from ttcompress.errors import DataError, UserError
from ttcompress.evaluate import METRICS, evaluate
from ttcompress.metrics import accuracy, predict


class TinyCNN(torch.nn.Module):
    def __init__(self, c=3, k=10):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6, k)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


N, H, W = 20, 8, 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture
def data(model):
    """Images whose labels agree with the model's prediction on exactly the even indices: clean accuracy 1/2."""
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=(N, 3, H, W), dtype=np.uint8))
    with torch.no_grad():
        pred = model(x.float() / 255).argmax(1)
    y = pred.clone()
    y[1::2] = (y[1::2] + 1) % 10
    return ImageSet(x, y, 10, [f"c{i}" for i in range(10)], "synthetic")


@pytest.fixture
def fake_corruptions(monkeypatch):
    """A stand-in for ttcompress.corruptions with known effects, recording its calls."""
    mod = types.ModuleType("ttcompress.corruptions")
    mod.STANDARD = ("gaussian_noise", "fog")
    mod.EXTRA = ("saturate",)
    mod.ALL = mod.STANDARD + mod.EXTRA
    mod.calls = []

    def corrupt(images, name, severity, seed=0):
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3
        mod.calls.append((name, severity, seed, images.copy()))
        out = images.copy()
        if name == "fog":
            out[:severity] = 0  # black out the first `severity` images
        elif name == "saturate":
            out = 255 - out
        return out

    mod.corrupt = corrupt
    monkeypatch.setitem(sys.modules, "ttcompress.corruptions", mod)
    return mod


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def _acc(model, images_nhwc, labels):
    return accuracy(predict(model, _nchw(images_nhwc)), torch.as_tensor(np.asarray(labels), dtype=torch.int64))


# ----------------------------------------------------------------------------------------------------------------


def test_unknown_metric_names_the_known_ones(model, data):
    with pytest.raises(UserError, match="top5.*" + ", ".join(METRICS)):
        evaluate(model, data, metrics=("accuracy", "top5"))


def test_accuracy_and_ece_document(model, data):
    out = evaluate(model, data, metrics=("accuracy", "ece"), batch_size=7)
    assert set(out) == {"n", "accuracy", "ece"}
    assert out["n"] == N and out["accuracy"] == 0.5
    # an independent 15-bin ECE (torchmetrics) of the model's own logits, computed here batch by batch
    metrics = pytest.importorskip("torchmetrics.classification")
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in data.batches(5, "cpu")])
    ref = metrics.MulticlassCalibrationError(num_classes=logits.shape[1], n_bins=15, norm="l1")(logits, data.labels)
    assert out["ece"] == pytest.approx(float(ref), abs=1e-6)
    sub = evaluate(model, data, metrics=["accuracy"], n=6)
    assert set(sub) == {"n", "accuracy"} and sub["n"] == 6 and sub["accuracy"] == 0.5
    json.dumps(out)


def test_incompatible_model_is_a_data_error(data):
    with pytest.raises(DataError):
        evaluate(TinyCNN(c=1), data)
    with pytest.raises(DataError):
        evaluate(TinyCNN(k=5), data)


def _write_official(root, clean_nhwc, labels):
    """Official layout: identity (gaussian_noise), severity-dependent blackouts (fog), inversion (saturate),
    and a corruption unknown to the module (mystery)."""
    root.mkdir()
    m = len(clean_nhwc)
    np.save(root / "labels.npy", np.tile(labels, 5))
    np.save(root / "gaussian_noise.npy", np.tile(clean_nhwc, (5, 1, 1, 1)))
    fog = np.tile(clean_nhwc, (5, 1, 1, 1))
    for s in range(1, 6):
        fog[(s - 1) * m : (s - 1) * m + 2 * s] = 0  # severity s: first 2s images black
    np.save(root / "fog.npy", fog)
    np.save(root / "saturate.npy", np.tile(255 - clean_nhwc, (5, 1, 1, 1)))
    np.save(root / "mystery.npy", np.tile(clean_nhwc[::-1].copy(), (5, 1, 1, 1)))
    return fog


def test_cifar_c_official_identity_and_means(tmp_path, model, data, fake_corruptions):
    clean = data.images.permute(0, 2, 3, 1).numpy()
    labels = data.labels.numpy()
    fog = _write_official(tmp_path / "c", clean, labels)
    out = evaluate(model, data, metrics=("accuracy", "cifar-c"), cifar_c_dir=tmp_path / "c")
    cc = out["cifar_c"]
    assert cc["source"] == "official"
    assert set(cc["corruptions"]) == {"gaussian_noise", "fog", "saturate", "mystery"}
    # identity corruption: exactly the clean accuracy at every severity
    assert cc["corruptions"]["gaussian_noise"] == {str(s): out["accuracy"] for s in range(1, 6)}
    for s in range(1, 6):
        block = fog[(s - 1) * N : s * N]
        assert cc["corruptions"]["fog"][str(s)] == _acc(model, block, labels)
    sat = _acc(model, 255 - clean, labels)
    assert cc["corruptions"]["saturate"] == {str(s): sat for s in range(1, 6)}
    std = list(cc["corruptions"]["gaussian_noise"].values()) + list(cc["corruptions"]["fog"].values())
    assert cc["mean"] == pytest.approx(np.mean(std))
    assert cc["mean_extra"] == pytest.approx(sat)
    assert fake_corruptions.calls == []  # the official files were used, nothing generated

    # first n images of each severity block, chosen severities and names
    part = evaluate(
        model, data, metrics=("cifar-c",), n=8, severities=(2, 5), corruptions=["fog"], cifar_c_dir=tmp_path / "c"
    )
    pc = part["cifar_c"]
    assert list(pc["corruptions"]) == ["fog"] and set(pc["corruptions"]["fog"]) == {"2", "5"}
    for s in (2, 5):
        block = fog[(s - 1) * N : (s - 1) * N + 8]
        assert pc["corruptions"]["fog"][str(s)] == _acc(model, block, labels[:8])
    assert pc["mean_extra"] is None and pc["mean"] == pytest.approx(np.mean(list(pc["corruptions"]["fog"].values())))


def test_cifar_c_official_shape_mismatch(tmp_path, model, data, fake_corruptions):
    root = tmp_path / "c"
    root.mkdir()
    np.save(root / "labels.npy", np.zeros(10, np.int64))
    np.save(root / "fog.npy", np.zeros((10, 16, 16, 3), np.uint8))
    with pytest.raises(DataError, match="16"):
        evaluate(model, data, metrics=("cifar-c",), cifar_c_dir=root)


def test_cifar_c_generated(model, data, fake_corruptions):
    out = evaluate(model, data, metrics=("cifar-c",), n=12, seed=7, corruptions=["fog", "saturate"])
    cc = out["cifar_c"]
    assert cc["source"] == "generated" and out["n"] == 12
    clean = data.images[:12].permute(0, 2, 3, 1).numpy()
    labels = data.labels[:12].numpy()
    # the first n evaluation images, NHWC uint8, every severity, the given seed
    assert [(c[0], c[1], c[2]) for c in fake_corruptions.calls] == [
        (name, s, 7) for name in ("fog", "saturate") for s in range(1, 6)
    ]
    assert all(np.array_equal(c[3], clean) for c in fake_corruptions.calls)
    for s in range(1, 6):
        fogged = clean.copy()
        fogged[:s] = 0
        assert cc["corruptions"]["fog"][str(s)] == _acc(model, fogged, labels)
    sat = _acc(model, 255 - clean, labels)
    assert cc["corruptions"]["saturate"] == {str(s): sat for s in range(1, 6)}
    assert cc["mean"] == pytest.approx(np.mean(list(cc["corruptions"]["fog"].values())))
    assert cc["mean_extra"] == pytest.approx(sat)

    everything = evaluate(model, data, metrics=("cifar-c",), n=4, severities=(3,))["cifar_c"]
    assert list(everything["corruptions"]) == ["gaussian_noise", "fog", "saturate"]  # default: corruptions.ALL
    only_extra = evaluate(model, data, metrics=("cifar-c",), n=4, corruptions=["saturate"])["cifar_c"]
    assert only_extra["mean"] is None and only_extra["mean_extra"] is not None
    with pytest.raises(UserError, match="unknown corruption"):
        evaluate(model, data, metrics=("cifar-c",), corruptions=["rain"])


def test_cifar_c_generated_with_real_module(model):
    try:
        import ttcompress.corruptions as corr
    except ImportError:
        pytest.skip("ttcompress.corruptions not available yet")
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, size=(4, 3, 32, 32), dtype=np.uint8))
    s = ImageSet(x, torch.tensor([0, 1, 2, 3]), 10, None, "t")
    names = list(corr.STANDARD[:2])
    out = evaluate(model, s, metrics=("cifar-c",), corruptions=names, severities=(1, 5))["cifar_c"]
    assert list(out["corruptions"]) == names
    assert all(set(row) == {"1", "5"} for row in out["corruptions"].values())
    assert 0.0 <= out["mean"] <= 1.0 and out["mean_extra"] is None


def test_autoattack_and_lipschitz_sections(model, data):
    out = evaluate(model, data, metrics=("autoattack", "lipschitz"), n=4, eps=0.0, radius=0.25)
    assert set(out) == {"n", "autoattack", "lipschitz"}
    aa = out["autoattack"]
    assert set(aa) == {"norm", "eps", "n", "version", "clean_accuracy", "robust_accuracy", "package"}
    assert aa["n"] == 4 and aa["clean_accuracy"] == 0.5 == aa["robust_accuracy"]
    lip = out["lipschitz"]
    assert set(lip) == {"max", "mean", "radius"} and lip["radius"] == 0.25 and lip["max"] >= lip["mean"] > 0
    json.dumps(out)


def test_report_files(tmp_path, model, data, fake_corruptions):
    out_dir = tmp_path / "report"
    out = evaluate(
        model, data, metrics=("accuracy", "ece", "cifar-c"), n=10, severities=(1, 3, 5), out_dir=out_dir
    )
    assert json.loads((out_dir / "eval.json").read_text()) == out
    for name in ("reliability.png", "cifar_c.png"):
        blob = (out_dir / name).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5000
    plain = tmp_path / "plain"
    evaluate(model, data, metrics=("accuracy",), out_dir=plain)
    assert sorted(p.name for p in plain.iterdir()) == ["eval.json"]


# --- certified robust accuracy ----------------------------------------------------------------------------------


@pytest.fixture
def lip_model():
    """A tiny untrained LipConvNet behind a normalisation (std 0.25 multiplies its Lipschitz bound by 4)."""
    from ttcompress.archs import Normalized
    from ttcompress.archs.lipconvnet import LipConvNet

    torch.manual_seed(0)
    return Normalized(LipConvNet(5, num_classes=10, base_channels=4), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()


@pytest.fixture
def lip_data(lip_model):
    """32×32 images labelled with the model's prediction on even indices and a wrong class on odd ones."""
    x = torch.from_numpy(np.random.default_rng(3).integers(0, 256, size=(12, 3, 32, 32), dtype=np.uint8))
    with torch.no_grad():
        pred = lip_model(x.float() / 255).argmax(1)
    y = pred.clone()
    y[1::2] = (y[1::2] + 1) % 10
    return ImageSet(x, y, 10, None, "synthetic")


def _certified_by_hand(logits, labels, lipschitz, radius):
    """Independent count: sort each row, margin = top − second, certified iff correct and margin > √2·L·ε."""
    ordered = logits.double().sort(dim=1, descending=True).values
    margin = ordered[:, 0] - ordered[:, 1]
    correct = logits.argmax(1) == labels
    return float((correct & (margin > 2 ** 0.5 * lipschitz * radius)).double().mean()), margin, correct


def test_certified_accuracy_matches_margins_by_hand(lip_model, lip_data):
    from ttcompress.archs.lipconvnet import LipConvNet

    logits = predict(lip_model, lip_data)
    # the bound by hand: product of the layers' certified bounds, times 1/std of the normalisation
    inner = lip_model.net
    assert isinstance(inner, LipConvNet)
    lipschitz = 4.0 * float(np.prod([layer.lipschitz_bound() for layer in inner.chain()]))
    _, margin, correct = _certified_by_hand(logits, lip_data.labels, lipschitz, 0.0)
    # a radius between the certified radii of the correctly classified images: some pass, some do not
    radii = (margin[correct] / (2 ** 0.5 * lipschitz)).sort().values
    assert len(radii) >= 2 and radii[0] < radii[-1]
    radius = float((radii[len(radii) // 2 - 1] + radii[len(radii) // 2]) / 2)
    expected, _, _ = _certified_by_hand(logits, lip_data.labels, lipschitz, radius)
    assert 0 < expected < 0.5  # half the labels are wrong: at most 1/2, and the radius cuts the correct ones

    out = evaluate(lip_model, lip_data, metrics="accuracy,certified", cert_radius=radius, batch_size=5)
    assert set(out) == {"n", "accuracy", "certified"}
    cert = out["certified"]
    assert set(cert) == {"norm", "radius", "lipschitz", "clean_accuracy", "certified_accuracy"}
    assert cert["norm"] == "L2" and cert["radius"] == radius
    assert cert["lipschitz"] == pytest.approx(lipschitz, rel=1e-12)
    assert cert["clean_accuracy"] == out["accuracy"] == 0.5
    assert cert["certified_accuracy"] == pytest.approx(expected, abs=1e-12)
    json.dumps(out)
    # the default radius is the papers' 36/255; radius 0 certifies every correct image with a nonzero margin
    default = evaluate(lip_model, lip_data, metrics=["certified"])["certified"]
    assert default["radius"] == pytest.approx(36 / 255)
    assert default["certified_accuracy"] == pytest.approx(
        _certified_by_hand(logits, lip_data.labels, lipschitz, 36 / 255)[0], abs=1e-12)
    zero = evaluate(lip_model, lip_data, metrics=["certified"], cert_radius=0.0)["certified"]
    assert zero["certified_accuracy"] == pytest.approx(float((correct & (margin > 0)).double().mean()))


def test_certified_needs_a_certified_network(model, data):
    with pytest.raises(UserError, match="cannot certify robustness: no certified Lipschitz bound for TinyCNN"):
        evaluate(model, data, metrics="accuracy,certified")
    from ttcompress.archs.lipconvnet import LipConvNet

    with pytest.raises(UserError, match="non-negative"):
        evaluate(LipConvNet(5, base_channels=4), data, metrics="certified", cert_radius=-0.1)


def test_eval_cli_certified(tmp_path, lip_model, lip_data):
    """`ttcompress eval --metrics certified` on a saved tiny LipConvNet (file arch), JSON and table; a ResNet is
    refused in one line with exit code 2."""
    from typer.testing import CliRunner

    import ttcompress.cli.evaluate  # noqa: F401
    from ttcompress import checkpoint as ck
    from ttcompress.cli import app

    arch = tmp_path / "tiny_lip.py"
    arch.write_text(
        "from ttcompress.archs.lipconvnet import LipConvNet\n\n\n"
        "class TinyLip(LipConvNet):\n"
        "    def __init__(self):\n"
        "        super().__init__(5, num_classes=10, base_channels=4)\n"
    )
    spec = f"{arch}:TinyLip"
    model_path = tmp_path / "lip.safetensors"
    meta = ck.ModelMeta(arch=spec, normalization=lip_model.normalization, input_size=[3, 32, 32], num_classes=10)
    ck.save(ck.LoadedModel(lip_model, meta), model_path)
    data_path = tmp_path / "data.npz"
    np.savez(data_path, x=lip_data.images.permute(0, 2, 3, 1).contiguous().numpy(), y=lip_data.labels.numpy())
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(model_path), "--arch", spec, "--data", str(data_path), "--metrics",
                              "accuracy,certified", "--cert-radius", "1/255", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    logits = predict(lip_model, lip_data)
    expected, _, _ = _certified_by_hand(logits, lip_data.labels, doc["certified"]["lipschitz"], 1 / 255)
    assert doc["certified"]["radius"] == pytest.approx(1 / 255)
    assert doc["certified"]["certified_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert doc["accuracy"] == 0.5
    table = runner.invoke(app, ["eval", str(model_path), "--arch", spec, "--data", str(data_path), "--metrics",
                                "certified"])
    assert table.exit_code == 0 and "certified L2 radius 0.1412" in table.stdout
    bad = runner.invoke(app, ["eval", str(model_path), "--arch", spec, "--data", str(data_path), "--metrics",
                              "certified", "--cert-radius", "-1"])
    assert bad.exit_code == 2 and "--cert-radius must be non-negative" in bad.output

    r20 = tmp_path / "r20.pt"
    from ttcompress import archs

    torch.save(archs.build("resnet20").net.state_dict(), r20)
    refused = runner.invoke(app, ["eval", str(r20), "--arch", "resnet20", "--data", str(data_path), "--metrics",
                                  "certified"])
    assert refused.exit_code == 2
    assert "cannot certify robustness" in refused.output and "Traceback" not in refused.output
    assert len(refused.output.strip().splitlines()) == 1
