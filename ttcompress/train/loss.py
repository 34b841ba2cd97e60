"""The training objective: ``ce + orthogonal_k·ortho + f4_weight·f4 (+ gram_weight·gram) (+ kd) (+ extra)``.

* ``ce`` — cross-entropy of the logits (computed in float32 under AMP);
* ``ortho`` — the orthogonal loss on TT frames (:func:`ttcompress.control.orthogonal_loss`, paper eq. 11);
* ``f4`` — the sum of the convs' Fantastic-Four bounds (:func:`ttcompress.spectral.bounds.f4_penalty`, Singla &
  Feizi's differentiable bound on each conv's σmax), a regulariser;
* ``gram`` — with ``gram_weight``, the sum of the convs' Gram-iteration bounds on their periodic σmax at the input size
  each sees (:func:`ttcompress.spectral.gram.gram_penalty`, Delattre et al. 2023), a regulariser;
* ``kd`` — with a teacher (``teacher``), the distillation term ``kd_alpha·T²·KL(teacher ‖ student)``
  (:class:`ttcompress.distill.Distillation`: the teacher in eval mode, no gradients, on the same batch), and with
  ``kd_features`` the layer term ``kd_feat`` (each decomposed layer's relative squared error against the teacher's
  layer of the same name), both logged with their weights;
* ``extra`` — any further term given to :func:`ttcompress.train.finetune` as ``extra_loss(model, images, labels,
  logits) → scalar tensor`` (e.g. distillation), added with weight 1 and logged as the ``extra`` column.

Each term is logged per step (the CSV log's columns after ``loss``).  **Add a loss term** here: a weight setting
in :mod:`ttcompress.train.config`, a term in :meth:`Objective.terms`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ttcompress.control import orthogonal_loss

__all__ = ["ExtraLoss", "Objective"]

ExtraLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Objective:
    net: nn.Module  # the network whose frames / convs the regularisers read
    orthogonal_k: float = 0.0
    f4_weight: float = 0.0
    extra: ExtraLoss | None = None
    distill: ExtraLoss | None = None  # a ttcompress.distill.Distillation
    gram_weight: float = 0.0
    input_sizes: dict | None = None  # layer → spatial input size (the Gram bound needs them)

    @property
    def columns(self) -> tuple[str, ...]:
        """The logged terms, in order."""
        return (("ce", "ortho", "f4") + (("gram",) if self.gram_weight > 0 else ())
                + (("kd",) if self.distill is not None else ())
                + (("kd_feat",) if getattr(self.distill, "features", 0) > 0 else ())
                + (("extra",) if self.extra is not None else ()))

    @staticmethod
    def ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)

    def terms(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor,
              ce: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, {term: value})`` for one batch (terms that are off are logged as 0 and not computed)."""
        from ttcompress.spectral.bounds import f4_penalty

        k, w = self.orthogonal_k, self.f4_weight
        terms = {"ce": ce,
                 "ortho": orthogonal_loss(self.net) if k > 0 else ce.new_zeros(()),
                 "f4": f4_penalty(self.net) if w > 0 else ce.new_zeros(())}
        loss = ce
        if k > 0:
            loss = loss + k * terms["ortho"]
        if w > 0:
            loss = loss + w * terms["f4"]
        if self.gram_weight > 0:
            from ttcompress.spectral.gram import gram_penalty

            terms["gram"] = gram_penalty(self.net, self.input_sizes or {})
            loss = loss + self.gram_weight * terms["gram"]
        if self.distill is not None:
            value = self.distill(model, images, labels, logits)
            parts = getattr(self.distill, "parts", None) or {"kd": value}
            terms.update(parts)
            loss = loss + value
        if self.extra is not None:
            terms["extra"] = self.extra(model, images, labels, logits)
            loss = loss + terms["extra"]
        return loss, terms
