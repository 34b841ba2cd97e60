"""Distillation (the teacher, ``--teacher auto``, the loss term) and bound schedules."""

from __future__ import annotations

import math

import pytest
import torch

from ttcompress import archs
from ttcompress import checkpoint as ck
from ttcompress.checkpoint import file_sha256
from ttcompress.distill import Distillation, kd_loss, load_teacher
from ttcompress.errors import UserError
from ttcompress.schedule import BoundSchedule

from reference import TwoConvNet


def test_kd_loss_is_t2_times_the_kl_divergence_by_hand():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    for temperature in (1.0, 4.0):
        ps, pt = torch.softmax(s / temperature, 1), torch.softmax(t / temperature, 1)
        by_hand = sum(float((pt[i] * (pt[i].log() - ps[i].log())).sum()) for i in range(5)) / 5
        assert float(kd_loss(s, t, temperature)) == pytest.approx(temperature**2 * by_hand, rel=1e-6)
    assert float(kd_loss(t, t, 3.0)) == pytest.approx(0.0, abs=1e-7)


def test_kd_gradient_moves_the_student_towards_the_teacher():
    torch.manual_seed(1)
    student = torch.randn(4, 10, requires_grad=True)
    teacher = torch.randn(4, 10)
    before = float(kd_loss(student.detach(), teacher, 2.0))
    kd_loss(student, teacher, 2.0).backward()
    with torch.no_grad():
        stepped = student - 0.5 * student.grad
    assert float(kd_loss(stepped, teacher, 2.0)) < before


def test_distillation_term_uses_a_frozen_teacher_in_eval_mode():
    torch.manual_seed(2)
    teacher = archs.build("resnet20")
    teacher.train()
    term = Distillation(teacher, alpha=0.7, temperature=3.0)
    student = archs.build("resnet20").train()
    x = torch.rand(4, 3, 32, 32)
    logits = student(x)
    value = term(student, x, torch.zeros(4, dtype=torch.long), logits)
    with torch.no_grad():
        expected = 0.7 * kd_loss(logits, teacher.eval()(x), 3.0)
    assert float(value.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    value.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())
    assert term.seconds > 0
    with pytest.raises(UserError, match="kd_alpha"):
        Distillation(teacher, alpha=0.0, temperature=1.0)
    with pytest.raises(UserError, match="kd_temperature"):
        Distillation(teacher, alpha=1.0, temperature=float("nan"))


def _student_of(tmp_path, source, arch="resnet20", digest=True):
    student = ck.load(source, arch=arch)
    args = {"checkpoint": str(source), "arch": arch}
    if digest:
        args["checkpoint_sha256"] = file_sha256(source)
    student.meta.history.append({"command": "decompose", "args": args})
    return student


def test_teacher_auto_finds_the_source_and_refuses_a_changed_file(tmp_path):
    torch.manual_seed(3)
    source = tmp_path / "r20.pt"
    torch.save(archs.build("resnet20").net.state_dict(), source)
    student = _student_of(tmp_path, source)
    teacher, path = load_teacher("auto", student)
    assert path == source
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(teacher.model(x), ck.load(source, arch="resnet20").model(x))

    torch.save(archs.build("resnet20").net.state_dict(), source)  # other weights under the same name
    with pytest.raises(UserError, match="changed since it was decomposed"):
        load_teacher("auto", student)
    source.unlink()
    with pytest.raises(UserError, match="is gone"):
        load_teacher("auto", student)
    bare = ck.initialize("resnet20")
    with pytest.raises(UserError, match="no decompose step"):
        load_teacher("auto", bare)


def test_teacher_auto_never_runs_a_recorded_python_file(tmp_path):
    marker = tmp_path / "MARKER"
    source_py = tmp_path / "net.py"
    source_py.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
                         "from ttcompress.archs.cifar_resnet import CifarResNet\n"
                         "class Net(CifarResNet):\n    def __init__(self):\n        super().__init__(20, 10)\n")
    weights = tmp_path / "w.pt"
    torch.save(archs.build("resnet20").net.state_dict(), weights)
    student = ck.initialize("resnet20")
    student.meta.history.append({"command": "decompose", "args": {"checkpoint": str(weights),
                                                                  "arch": f"{source_py}:Net"}})
    with pytest.raises(UserError, match="--teacher-arch"):
        load_teacher("auto", student)
    assert not marker.exists()


def test_teacher_with_other_classes_is_refused(tmp_path):
    path = tmp_path / "c100.safetensors"
    ck.save(ck.initialize("resnet20", num_classes=100), path)
    with pytest.raises(UserError, match="100 classes"):
        load_teacher(str(path), ck.initialize("resnet20"))


# --- bound schedules ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["linear:0", "linear:1.5", "linear:x", "step:0.5", "linear:nan"])
def test_bad_schedules_are_refused(text):
    with pytest.raises(UserError, match="bound_schedule"):
        BoundSchedule.parse(text)


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_schedule_goes_from_the_start_to_the_target_and_stays(shape):
    sched = BoundSchedule.parse(f"{shape}:0.5")
    total, start, target = 100, 5.0, 1.0
    values = [sched.bound(s, total, start, target) for s in range(total + 1)]
    assert values[0] == start and values[50] == pytest.approx(target) and all(v == target for v in values[50:])
    assert all(a >= b for a, b in zip(values, values[1:]))  # never goes back up
    assert sched.bound(10, total, 0.5, target) == target  # a layer already below the bound is held at it
    if shape == "linear":
        assert values[25] == pytest.approx(3.0)
    else:
        assert values[25] == pytest.approx(start + (target - start) * (0.5 - 0.5 * math.cos(math.pi / 2)))
    assert BoundSchedule.parse("none").bound(0, total, start, target) == target
    assert str(BoundSchedule.parse(f"{shape}:0.5")) == f"{shape}:0.5"


# --- in finetune --------------------------------------------------------------------------------------------------

@pytest.fixture
def small(tmp_path):
    """A dense CIFAR-size ResNet-20 (random weights, BN statistics set) decomposed from a file, and 32×32 data."""
    import numpy as np

    from ttcompress.tt import decompose

    torch.manual_seed(4)
    dense = ck.initialize("resnet20")
    source = tmp_path / "dense.safetensors"
    ck.save(dense, source)
    student = ck.load(source)
    decompose(student.net, rank=4)
    student.meta.history.append(ck.history_entry("decompose", checkpoint=str(source),
                                                 checkpoint_sha256=file_sha256(source)))
    tt = tmp_path / "tt.safetensors"
    ck.save(student, tt)
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, train_x=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), train_y=rng.integers(0, 10, 16),
             test_x=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), test_y=rng.integers(0, 10, 8))
    return {"source": source, "tt": tt, "data": data, "dir": tmp_path}


def _config(small, **kw):
    from ttcompress.train import FinetuneConfig

    base = dict(data=str(small["data"]), steps=2, batch_size=8, lr=0.01, device="cpu", bn_recalibrate=0)
    base.update(kw)
    return FinetuneConfig.from_recipe(None, **base)


def test_finetune_with_teacher_logs_the_term_and_times_the_teacher(small):
    import csv

    from ttcompress.train import finetune
    from ttcompress.train.state import run_paths

    out = small["dir"] / "kd.safetensors"
    result = finetune(ck.load(small["tt"]), _config(small, teacher="auto", kd_alpha=2.0, kd_temperature=3.0),
                      out_path=out)
    assert result.time_teacher > 0 and result.config["teacher"] == "auto"
    with open(run_paths(out)["log"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and all(float(r["kd"]) > 0 for r in rows)
    for r in rows:  # the loss is the sum of its terms
        assert float(r["loss"]) == pytest.approx(float(r["ce"]) + float(r["kd"]), rel=1e-4)
    without = finetune(ck.load(small["tt"]), _config(small), out_path=small["dir"] / "plain.safetensors")
    assert without.time_teacher == 0
    # the source changed since decompose: --teacher auto refuses it before any work
    ck.save(ck.initialize("resnet20", seed=1), small["source"])
    with pytest.raises(UserError, match="changed since"):
        finetune(ck.load(small["tt"]), _config(small, teacher="auto"), out_path=small["dir"] / "x.safetensors")
    assert not (small["dir"] / "x.safetensors").exists()


def test_finetune_cli_teacher_flags(small):
    from typer.testing import CliRunner

    import ttcompress.cli.finetune  # noqa: F401
    from ttcompress.cli import app

    out = small["dir"] / "cli.safetensors"
    res = CliRunner().invoke(app, ["finetune", str(small["tt"]), "--data", str(small["data"]), "--steps", "1",
                                   "--batch-size", "8", "--teacher", str(small["source"]), "--kd-alpha", "0.5",
                                   "--bound-schedule", "linear:0.5", "--clip-to", "1", "--clip-every", "1",
                                   "--device", "cpu", "--bn-recalibrate", "0", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    import json

    doc = json.loads(res.stdout)
    assert doc["config"]["kd_alpha"] == 0.5 and doc["config"]["bound_schedule"] == "linear:0.5"
    assert doc["time_teacher"] > 0 and all(b["sigma_after"] <= 1.01 for b in doc["bounds"])
    bad = CliRunner().invoke(app, ["finetune", str(small["tt"]), "--data", str(small["data"]), "--steps", "1",
                                   "--teacher-arch", "resnet20", "-o", str(out)])
    assert bad.exit_code == 2 and "--teacher" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(app, ["finetune", str(small["tt"]), "--data", str(small["data"]), "--steps", "1",
                                   "--clip-to", "1", "--bound-schedule", "step:3", "-o", str(out)])
    assert bad.exit_code == 2 and "--bound-schedule" in bad.output


def test_scheduled_clip_follows_the_schedule_and_ends_at_the_bound(small):
    """Every clip during the run brings each conv to at most its scheduled bound (start σmax → C), measured with the
    exact periodic spectrum after each step; the saved model meets C."""
    from ttcompress.control.methods.clip import exact_sigma
    from ttcompress.schedule import BoundSchedule
    from ttcompress.train import finetune
    from ttcompress.train.hooks import Hook
    from ttcompress.tt import effective_factors

    seen: list[tuple[int, float, float]] = []

    class Watch(Hook):
        def after_step(self, run, info):
            clip = run.controller["clip"]
            for conv in clip.convs[:3]:
                kernel, _ = effective_factors(conv.layer, torch.float64)
                sigma = exact_sigma(conv, kernel, torch.float64)
                bound = BoundSchedule.parse("linear:1").bound(run.step, 4, clip.scheduled.start[conv.name], 1.0)
                seen.append((run.step, sigma, bound))

    result = finetune(ck.load(small["tt"]), _config(small, steps=4, clip_to=1.0, clip_every=1,
                                                    bound_schedule="linear:1"), hooks=[Watch()])
    assert len(seen) == 12, seen
    first = [(sigma, bound) for step, sigma, bound in seen[::3]]  # the first conv, starting well above C
    assert first[0][1] > 1.4  # its bound after step 1: most of the way from its start, not C
    assert all(a[0] > b[0] for a, b in zip(first, first[1:]))  # it comes down step by step ...
    assert first[0][0] > 1.4 and first[-1][0] < 1.25  # ... from far above C to near it
    # the crop to the 3×3 support makes one projection approximate (at rank 4 up to ~20 % above its bound)
    assert all(sigma <= 1.25 * bound for _, sigma, bound in seen)
    assert result.max_ratio <= 1.01


def test_decompose_records_its_source_for_teacher_auto(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import ttcompress.cli.decompose  # noqa: F401
    from ttcompress.cli import app

    monkeypatch.chdir(tmp_path)
    torch.save(archs.build("resnet20").net.state_dict(), tmp_path / "r20.pt")
    res = CliRunner().invoke(app, ["decompose", "r20.pt", "--arch", "resnet20", "--rank", "4", "-o", "tt.safetensors"])
    assert res.exit_code == 0, res.output
    student = ck.load(tmp_path / "tt.safetensors")
    args = student.meta.history[-1]["args"]
    assert args["checkpoint"] == str(tmp_path / "r20.pt") and args["arch"] == "resnet20"
    assert args["checkpoint_sha256"] == file_sha256(tmp_path / "r20.pt")
    monkeypatch.chdir("/")
    teacher, path = load_teacher("auto", student)
    assert path == tmp_path / "r20.pt" and teacher.meta.arch == "resnet20"


# ---------------------------------------------------------------------------------------------------------------
# the layer term (--kd-features)
# ---------------------------------------------------------------------------------------------------------------


def _rel(s, t):
    return float(((s - t) ** 2).sum() / (t ** 2).sum())


def test_feature_loss_is_the_mean_relative_squared_error_by_hand():
    from ttcompress.distill import feature_loss

    torch.manual_seed(5)
    t = {"a": torch.randn(2, 3, 4, 4), "b": torch.randn(2, 5, 2, 2)}
    s = {k: v + 0.3 * torch.randn_like(v) for k, v in t.items()}
    assert float(feature_loss(s, t)) == pytest.approx((_rel(s["a"], t["a"]) + _rel(s["b"], t["b"])) / 2, rel=1e-6)
    assert float(feature_loss(t, t)) == 0.0
    with pytest.raises(UserError, match="layer a"):
        feature_loss({"a": torch.randn(2, 3, 4, 4)}, {"a": torch.randn(2, 3, 2, 2)})


def test_layer_term_compares_each_decomposed_layer_with_the_teachers():
    import copy

    from ttcompress.distill import feature_layers
    from ttcompress.tt import decompose

    torch.manual_seed(6)
    teacher = TwoConvNet().eval()
    student = copy.deepcopy(teacher)
    decompose(student, rank=2, skip=("a",))  # only b is decomposed
    assert feature_layers(student, teacher) == ["b"]
    term = Distillation(teacher, alpha=0.5, temperature=2.0, features=3.0, student_net=student, teacher_net=teacher)
    x = torch.rand(4, 3, 8, 8)
    student.train()
    logits = student(x)
    value = term(student, x, torch.zeros(4, dtype=torch.long), logits)
    with torch.no_grad():
        s_b = student.b(torch.relu(student.a(x)))
        t_b = teacher.b(torch.relu(teacher.a(x)))
        expected = 0.5 * kd_loss(logits, teacher(x), 2.0) + 3.0 * _rel(s_b, t_b)
    assert float(value.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(term.parts["kd_feat"].detach()) == pytest.approx(3.0 * _rel(s_b, t_b), rel=1e-5)
    value.backward()
    assert student.b.core.weight.grad is not None and all(p.grad is None for p in teacher.parameters())
    # outside training (eval mode or no gradients) the student's outputs are not kept
    student.eval()
    student(x)
    with pytest.raises(RuntimeError, match="did not reach"):
        term(student, x, torch.zeros(4, dtype=torch.long), logits)
    term.close()
    student.train()
    student(x)
    assert term._student.outputs == {}
    with pytest.raises(UserError, match="no decomposed"):
        Distillation(teacher, 1.0, 1.0, features=1.0, student_net=teacher, teacher_net=teacher)
    Distillation(teacher, 0.0, 1.0, features=1.0, student_net=student, teacher_net=teacher).close()  # layers only
    with pytest.raises(UserError, match="kd_alpha"):
        Distillation(teacher, 0.0, 1.0)


def test_finetune_with_layer_term_logs_it_and_removes_its_hooks(small):
    import csv

    from ttcompress.train import finetune
    from ttcompress.train.state import run_paths
    from ttcompress.errors import SettingError

    out = small["dir"] / "feat.safetensors"
    student = ck.load(small["tt"])
    result = finetune(student, _config(small, teacher="auto", kd_alpha=1.0, kd_features=2.0), out_path=out)
    assert result.config["kd_features"] == 2.0
    with open(run_paths(out)["log"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and all(float(r["kd_feat"]) > 0 for r in rows)
    for r in rows:
        assert float(r["loss"]) == pytest.approx(float(r["ce"]) + float(r["kd"]) + float(r["kd_feat"]), rel=1e-4)
    assert not any(m._forward_hooks for m in student.net.modules())
    with pytest.raises(SettingError, match="teacher"):
        _config(small, kd_features=1.0)


def test_resume_with_both_distillation_terms_gives_the_same_weights(small):
    """A run crashed after step 2 and resumed ends bit-equal to one run straight through (one thread)."""
    from safetensors.torch import load_file

    from test_train import CrashAt
    from ttcompress.train import finetune

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = dict(teacher="auto", kd_alpha=1.0, kd_features=1.0, steps=4, save_every=1)
        straight = small["dir"] / "straight.safetensors"
        finetune(ck.load(small["tt"]), _config(small, **settings), out_path=straight)
        out = small["dir"] / "resumed.safetensors"
        with pytest.raises(KeyboardInterrupt):
            finetune(ck.load(small["tt"]), _config(small, **settings), out_path=out, progress=CrashAt(3))
        result = finetune(ck.load(small["tt"]), _config(small, resume=True, **settings), out_path=out)
        assert result.resumed_from == 2
    finally:
        torch.set_num_threads(threads)
    a, b = load_file(str(straight)), load_file(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
