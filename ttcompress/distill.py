"""Knowledge distillation from the original network: the teacher, where it comes from, and the loss term.

The loss term is ``alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` (Hinton et al. 2015), added to the
cross-entropy: ``alpha`` weighs the teacher's soft labels against the hard ones, and the ``T²`` keeps the term's
gradient scale independent of the temperature.  The teacher runs in eval mode, without gradients, on the same
(augmented) batch as the student.

With ``features`` (``--kd-features``), a layer term is added: for every layer the decomposition replaced (a TT
layer of the student whose name the teacher's network also has), the relative squared error ``‖s − t‖² / ‖t‖²``
of its output ``s`` against the teacher layer's output ``t`` on the same batch, averaged over those layers and
weighted by ``features``.  Each compressed layer is then told what the original computed there — on every position
of every image, a far richer signal than ten logits when only a few thousand images are at hand — while its input
is the student's own (the errors of earlier layers are compensated, not copied).

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


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean over the layers named in ``student`` of ``‖s − t‖² / ‖t‖²`` (float32)."""
    terms = []
    for name, s in student.items():
        t = teacher[name]
        if s.shape != t.shape:
            raise UserError(f"--kd-features: layer {name} gives {tuple(s.shape)} in the student and {tuple(t.shape)} "
                            "in the teacher")
        t = t.float()
        terms.append((s.float() - t).pow(2).sum() / t.pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny))
    return torch.stack(terms).mean()


def feature_layers(student_net: nn.Module, teacher_net: nn.Module) -> list[str]:
    """The layers the decomposition replaced: TT layers of ``student_net`` whose name ``teacher_net`` also has (as
    a layer that is not itself TT)."""
    from ttcompress.tt import TTConv, conv_layers

    teacher_names = {name for name, m in conv_layers(teacher_net) if not isinstance(m, TTConv)}
    return [name for name, m in conv_layers(student_net) if isinstance(m, TTConv) and name in teacher_names]


class _Taps:
    """Forward hooks keeping the last output of named modules (``when``: whether to keep it this time)."""

    def __init__(self, net: nn.Module, names: list[str], when) -> None:
        self.outputs: dict[str, torch.Tensor] = {}

        def hook_for(name: str):
            def hook(module, _args, output):
                if when(module):
                    self.outputs[name] = output
            return hook

        self.handles = [net.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.outputs = [], {}


class Distillation:
    """The extra loss term of a finetune run: ``alpha · kd_loss(student, teacher)`` (+ ``features ·`` the layer
    term, :func:`feature_loss`).

    Called as ``term(model, images, labels, logits)`` like every extra loss term; :attr:`seconds` is the teacher's
    share of the run's time (its forward passes), reported in the timing breakdown; :attr:`parts` holds the last
    call's weighted terms ``{"kd": …, "kd_feat": …}`` (their sum is the value returned).  With ``features``,
    ``student_net`` and ``teacher_net`` name the networks whose same-named decomposed layers are compared (hooks on
    the student keep its training forward's outputs; :meth:`close` removes them).
    """

    name = "kd"

    def __init__(self, teacher: nn.Module, alpha: float, temperature: float, features: float = 0.0,
                 student_net: nn.Module | None = None, teacher_net: nn.Module | None = None) -> None:
        if not features >= 0:
            raise UserError(f"kd_features must be a non-negative number, got {features}")
        if not (alpha > 0 or (alpha == 0 and features > 0)):
            raise UserError(f"kd_alpha must be positive (or 0 with kd_features), got {alpha}")
        if not temperature > 0:
            raise UserError(f"kd_temperature must be positive, got {temperature}")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.alpha, self.temperature, self.features = float(alpha), float(temperature), float(features)
        self.seconds = 0.0
        self.parts: dict[str, torch.Tensor] = {}
        self.layers: list[str] = []
        self._student = self._teacher = None
        if self.features > 0:
            if student_net is None or teacher_net is None:
                raise ValueError("features needs student_net and teacher_net")
            self.layers = feature_layers(student_net, teacher_net)
            if not self.layers:
                raise UserError("--kd-features: no decomposed (TT) layer of the student has a layer of the same name "
                                "in the teacher")
            self._student = _Taps(student_net, self.layers, lambda m: m.training and torch.is_grad_enabled())
            self._teacher = _Taps(teacher_net, self.layers, lambda m: True)

    def to(self, device: torch.device) -> Distillation:
        self.teacher.to(device)
        return self

    def close(self) -> None:
        """Remove the hooks of the layer term."""
        for taps in (self._student, self._teacher):
            if taps is not None:
                taps.close()

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 logits: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        self.teacher.eval()
        with torch.no_grad():
            target = self.teacher(images)
        if images.is_cuda:
            torch.cuda.synchronize(images.device)
        self.seconds += time.perf_counter() - start
        loss = self.alpha * kd_loss(logits, target, self.temperature)
        self.parts = {"kd": loss}
        if self.features > 0:
            if set(self._student.outputs) != set(self.layers):
                raise RuntimeError("--kd-features: the student's forward pass before this call did not reach every "
                                   "decomposed layer in training mode")
            feat = feature_loss(self._student.outputs, self._teacher.outputs)
            self._student.outputs.clear()
            self._teacher.outputs.clear()
            self.parts["kd_feat"] = self.features * feat
            loss = loss + self.parts["kd_feat"]
        return loss


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
