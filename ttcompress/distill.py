"""Knowledge distillation from the original network: the teacher, where it comes from, and the loss term.

The loss term is ``alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` (Hinton et al. 2015), added to the
cross-entropy: ``alpha`` weighs the teacher's soft labels against the hard ones, and the ``T²`` keeps the term's
gradient scale independent of the temperature.  The teacher runs in eval mode, without gradients, on the same
(augmented) batch as the student.

``teacher="auto"`` finds the checkpoint the student was decomposed from: ``decompose`` records its path and SHA-256
in the student's history, and a file that changed since is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ttcompress import checkpoint as ck
from ttcompress.checkpoint import file_sha256
from ttcompress.errors import UserError

AUTO = "auto"


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(p_teacher ‖ p_student)`` at temperature ``T``, averaged over the batch."""
    t = float(temperature)
    student = F.log_softmax(student_logits.float() / t, dim=1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * (t * t)


@dataclass(frozen=True)
class TeacherSource:
    """Which file the teacher comes from and the network it holds."""

    path: Path
    arch: str | None
    sha256: str | None = None  # expected content (``auto``): refused when the file changed


def source_of(student: ck.LoadedModel) -> TeacherSource:
    """The checkpoint ``student`` was decomposed from, as its history records it (``--teacher auto``)."""
    for entry in reversed(student.meta.history):
        args = entry.get("args") if isinstance(entry, dict) else None
        if entry.get("command") == "decompose" and isinstance(args, dict) and isinstance(args.get("checkpoint"), str):
            digest = args.get("checkpoint_sha256")
            arch = args.get("arch") if isinstance(args.get("arch"), str) else None
            return TeacherSource(Path(args["checkpoint"]), arch, digest if isinstance(digest, str) else None)
    raise UserError("--teacher auto: this file's history has no decompose step naming its source checkpoint; "
                    "pass --teacher CHECKPOINT")


class Distillation:
    """The extra loss term of a finetune run: ``alpha · kd_loss(student, teacher)``.

    Called as ``term(model, images, labels, logits)`` like every extra loss term; :attr:`seconds` is the teacher's
    share of the run's time (its forward passes), reported in the timing breakdown.
    """

    name = "kd"

    def __init__(self, teacher: nn.Module, alpha: float, temperature: float) -> None:
        if not alpha > 0:
            raise UserError(f"kd_alpha must be positive, got {alpha}")
        if not temperature > 0:
            raise UserError(f"kd_temperature must be positive, got {temperature}")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.seconds = 0.0

    def to(self, device: torch.device) -> Distillation:
        self.teacher.to(device)
        return self

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 logits: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        self.teacher.eval()
        with torch.no_grad():
            target = self.teacher(images)
        if images.is_cuda:
            torch.cuda.synchronize(images.device)
        self.seconds += time.perf_counter() - start
        return self.alpha * kd_loss(logits, target, self.temperature)


def load_teacher(spec: str, student: ck.LoadedModel, *, arch: str | None = None,
                 trust_pickle: bool = False) -> tuple[ck.LoadedModel, Path]:
    """The teacher network named by ``spec`` (a checkpoint path or ``auto``), checked against ``student``.

    ``arch`` names a foreign teacher's architecture (``--teacher-arch``); with ``auto`` it defaults to the one
    ``decompose`` recorded — unless that is a Python file, which only the person running the command may name.
    """
    if spec == AUTO:
        source = source_of(student)
        if not source.path.is_file():
            raise UserError(f"--teacher auto: the source checkpoint {source.path} recorded by decompose is gone; "
                            "pass --teacher CHECKPOINT")
        if source.sha256 is not None and file_sha256(source.path) != source.sha256:
            raise UserError(f"--teacher auto: {source.path} changed since it was decomposed (SHA-256 differs); pass "
                            "--teacher CHECKPOINT if you mean to distil from it as it is now")
        path = source.path
        recorded = source.arch
        from ttcompress.archs import names_code

        if arch is None and recorded is not None and names_code(recorded):
            raise UserError(f"--teacher auto: the source was read with --arch {recorded}, a Python file; pass "
                            f"--teacher-arch {recorded} if you trust it")
        arch = arch or recorded
    else:
        path = Path(spec)
    teacher = ck.load(path, arch=arch, trust_pickle=trust_pickle)
    if teacher.meta.num_classes and student.meta.num_classes and teacher.meta.num_classes != student.meta.num_classes:
        raise UserError(f"the teacher {path} has {teacher.meta.num_classes} classes and the student "
                        f"{student.meta.num_classes}")
    return teacher, path
