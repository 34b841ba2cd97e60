"""Distillation (the teacher, ``--teacher auto``, the loss term) and bound schedules."""

from __future__ import annotations

import math

import pytest
import torch

from ttcompress import archs
from ttcompress import checkpoint as ck
from ttcompress.distill import Distillation, file_sha256, kd_loss, load_teacher
from ttcompress.errors import UserError
from ttcompress.schedule import BoundSchedule


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
    assert float(value) == pytest.approx(float(expected), rel=1e-6)
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
