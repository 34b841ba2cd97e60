"""Evaluation metrics: accuracy, calibration (ECE), AutoAttack robustness and an empirical Lipschitz estimate.

Every model takes float images in ``[0, 1]`` of shape ``(N, C, H, W)`` (normalisation lives inside the model) and
returns logits.  Functions accept an :class:`~ttcompress.data.ImageSet` or a tensor of images (``uint8`` in
``0..255`` or float in ``[0, 1]``) with a separate label tensor.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import progress as _progress
from .data import ImageSet
from .errors import UserError
from .progress import Progress

__all__ = [
    "eval_mode",
    "predict",
    "accuracy",
    "ece",
    "reliability",
    "autoattack",
    "empirical_lipschitz",
    "ATTACK_NORMS",
    "ATTACK_VERSIONS",
]

ATTACK_NORMS = ("Linf", "L2", "L1")
ATTACK_VERSIONS = ("standard", "plus", "rand", "custom")
STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def _as_float_images(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise UserError(f"images must be uint8 or float tensors, got {images.dtype}")
    return images.float()


def _unpack(images: ImageSet | torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(float images in [0,1] on CPU, labels or None)."""
    if isinstance(images, ImageSet):
        return images.float_images(), images.labels if labels is None else labels
    if images.ndim != 4:
        raise UserError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    return _as_float_images(images), labels


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module, freeze: bool = False) -> Iterator[None]:
    """model.eval() for the duration; with ``freeze`` also stop gradients reaching the parameters."""
    was_training = model.training
    frozen: list[torch.nn.Parameter] = []
    model.eval()
    if freeze:
        frozen = [p for p in model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)


def _batch_count(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


# ----------------------------------------------------------------------------------------------------------------
# predictions, accuracy, calibration
# ----------------------------------------------------------------------------------------------------------------


def predict(
    model: torch.nn.Module,
    images: ImageSet | torch.Tensor,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    description: str = "predict",
) -> torch.Tensor:
    """Logits of ``model`` on every image, as a float32 CPU tensor ``(N, K)``."""
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    if isinstance(images, ImageSet):
        raw = images.images
    else:
        if images.ndim != 4:
            raise UserError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        raw = images
    n = int(raw.shape[0])
    outs: list[torch.Tensor] = []
    prog = _progress.ensure(progress)
    with eval_mode(model), torch.inference_mode(), prog.task(description, total=n) as advance:
        for start in range(0, n, batch_size):
            x = _as_float_images(raw[start : start + batch_size].to(device))
            outs.append(model(x).float().cpu())
            advance(x.shape[0])
    if not outs:
        return torch.empty(0, 0)
    return torch.cat(outs)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    if logits.shape[0] != labels.shape[0]:
        raise UserError(f"{logits.shape[0]} predictions but {labels.shape[0]} labels")
    if logits.shape[0] == 0:
        raise UserError("cannot compute accuracy on an empty set")
    return float((logits.argmax(dim=1).cpu() == labels.cpu()).double().mean())


def _probabilities(probs_or_logits: torch.Tensor) -> torch.Tensor:
    """Softmax unless the rows already are probability vectors."""
    t = torch.as_tensor(probs_or_logits)
    if t.ndim != 2:
        raise UserError(f"expected (N, K) probabilities or logits, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.double()
    is_prob = bool(((t >= 0) & (t <= 1)).all()) and bool(
        torch.allclose(t.sum(dim=1), torch.ones((), dtype=t.dtype), atol=1e-4)
    )
    return t if is_prob else torch.softmax(t, dim=1)


def reliability(probs_or_logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin statistics of the top-1 confidence, for reliability diagrams and ECE.

    Bins are equal-width and right-closed: bin ``i`` covers ``(i/n_bins, (i+1)/n_bins]``.  Returns numpy arrays
    ``lower``, ``upper``, ``accuracy``, ``confidence`` (0 in empty bins), ``count`` and ``share`` (count / N).
    """
    if n_bins <= 0:
        raise UserError(f"n_bins must be positive, got {n_bins}")
    probs = _probabilities(probs_or_logits)
    labels = torch.as_tensor(labels).cpu()
    if probs.shape[0] != labels.shape[0]:
        raise UserError(f"{probs.shape[0]} predictions but {labels.shape[0]} labels")
    if probs.shape[0] == 0:
        raise UserError("cannot compute calibration on an empty set")
    probs = probs.cpu()
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    # boundaries k/n_bins in the confidences' own precision, so that e.g. 0.2f falls on the 3/15 boundary
    boundaries = (torch.arange(n_bins + 1, dtype=torch.float64) / n_bins).to(conf.dtype)
    idx = (torch.bucketize(conf, boundaries, right=False) - 1).clamp_(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, idx, torch.ones_like(correct))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, idx, conf.double())
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, idx, correct)
    safe = count.clamp(min=1)
    b = boundaries.double()
    return {
        "lower": b[:-1].numpy(),
        "upper": b[1:].numpy(),
        "accuracy": (acc_sum / safe).numpy(),
        "confidence": (conf_sum / safe).numpy(),
        "count": count.numpy().astype(np.int64),
        "share": (count / count.sum()).numpy(),
    }


def ece(probs_or_logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al., 2017): ``sum_b |acc_b - conf_b| * n_b / N`` over ``n_bins``
    equal-width, right-closed confidence bins.

    Matches torchmetrics' ``MulticlassCalibrationError(n_bins=15, norm="l1")`` except for confidences lying exactly
    on a bin boundary (torchmetrics bins are left-closed and put confidence 1.0 in a bin of its own).  Rows that are
    non-negative, at most 1 and sum to 1 are taken as probabilities; anything else as logits (softmax applied).
    """
    r = reliability(probs_or_logits, labels, n_bins)
    return float(np.sum(np.abs(r["accuracy"] - r["confidence"]) * r["share"]))


# ----------------------------------------------------------------------------------------------------------------
# AutoAttack
# ----------------------------------------------------------------------------------------------------------------


def _import_autoattack() -> tuple[type, str]:
    try:
        mod = importlib.import_module("pyautoattack")
        return mod.AutoAttack, f"pyautoattack {getattr(mod, '__version__', 'unknown')}"
    except ImportError:
        pass
    try:
        mod = importlib.import_module("autoattack")
    except ImportError:
        raise UserError("AutoAttack is not installed; pip install pyautoattack") from None
    try:
        from importlib.metadata import version

        ver = version("autoattack")
    except Exception:
        ver = getattr(mod, "__version__", "unknown")
    return mod.AutoAttack, f"autoattack {ver}"


class _AttackLogWatcher(logging.Handler):
    """Turns AutoAttack's log lines into progress updates; re-raises its warnings as Python warnings."""

    _DONE = re.compile(r"robust accuracy after ([A-Z0-9-]+)")
    _BATCH = re.compile(r"^([a-z0-9-]+) - (\d+)/(\d+) - ")

    def __init__(self, advance, attacks: Sequence[str]) -> None:
        super().__init__(level=logging.DEBUG)
        self.advance = advance
        self.pending = [a.lower() for a in attacks]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:
            return
        if record.levelno >= logging.WARNING:
            warnings.warn(f"AutoAttack: {msg}", RuntimeWarning, stacklevel=2)
            return
        m = self._DONE.search(msg)
        if m:
            name = m.group(1).lower()
            if name in self.pending:
                self.pending.remove(name)
            self.advance(1, attack=name)
            return
        m = self._BATCH.match(msg)
        if m:
            self.advance(0, attack=m.group(1), batch=f"{m.group(2)}/{m.group(3)}")

    def finish(self) -> None:
        # attacks skipped because no robust point was left
        for name in list(self.pending):
            self.advance(1, attack=name)
        self.pending.clear()


@contextlib.contextmanager
def _watch_log(advance, attacks: Sequence[str]) -> Iterator[_AttackLogWatcher]:
    logger = logging.getLogger("auto-attack")
    handler = _AttackLogWatcher(advance, attacks)
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def autoattack(
    model: torch.nn.Module,
    images: ImageSet | torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    norm: str = "Linf",
    eps: float = 8 / 255,
    version: str = "standard",
    attacks: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> dict:
    """Robust accuracy under AutoAttack (Croce & Hein, 2020) in ``[0, 1]`` pixel space.

    ``version="standard"`` is the real standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square, with the package's
    standard settings); ``"plus"`` and ``"rand"`` are the package's other versions and ``"custom"`` runs the
    ``attacks`` given.  The one change to the standard settings: with fewer than 10 classes the number of target
    classes of APGD-T and FAB-T is lowered to ``num_classes - 1`` (the package would fail otherwise).
    ``eps == 0`` reports the clean accuracy as the robust accuracy without running the attack.  The global torch
    RNG state is restored afterwards.

    Returns ``{"norm", "eps", "n", "version", "clean_accuracy", "robust_accuracy", "package"}``.
    """
    if norm not in ATTACK_NORMS:
        raise UserError(f"unknown norm {norm!r}; use one of {', '.join(ATTACK_NORMS)}")
    if version not in ATTACK_VERSIONS:
        raise UserError(f"unknown AutoAttack version {version!r}; use one of {', '.join(ATTACK_VERSIONS)}")
    eps = float(eps)
    if not np.isfinite(eps) or eps < 0:
        raise UserError(f"eps must be a non-negative number, got {eps}")
    if version == "custom" and not attacks:
        raise UserError("AutoAttack version 'custom' needs a list of attacks (e.g. apgd-ce, square)")
    if version != "custom" and attacks:
        raise UserError("a list of attacks can only be given with AutoAttack version 'custom'")
    x, y = _unpack(images, labels)
    if y is None:
        raise UserError("autoattack needs labels")
    y = torch.as_tensor(y, dtype=torch.int64).cpu()
    if x.shape[0] != y.shape[0]:
        raise UserError(f"{x.shape[0]} images but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise UserError("cannot attack an empty set")
    AutoAttack, package = _import_autoattack()
    prog = _progress.ensure(progress)

    clean_logits = predict(model, x, batch_size, device)
    clean = accuracy(clean_logits, y)
    n_classes = int(clean_logits.shape[1])
    result = {
        "norm": norm,
        "eps": eps,
        "n": int(x.shape[0]),
        "version": version,
        "clean_accuracy": clean,
        "robust_accuracy": clean,
        "package": package,
    }
    if eps == 0.0:
        return result

    dev = torch.device(device)
    fork_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with eval_mode(model, freeze=True), torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        if package.startswith("pyautoattack"):
            kwargs = dict(device=dev, eps=eps, norm=norm, seed=seed, version=version)
            if version == "custom":
                kwargs["attacks"] = list(attacks)
            aa = AutoAttack(model, **kwargs)
        else:  # the original fra31/auto-attack package
            kwargs = dict(norm=norm, eps=eps, version=version, seed=seed, device=dev)
            if version == "custom":
                kwargs["attacks_to_run"] = list(attacks)
            aa = AutoAttack(model, **kwargs)
        to_run = list(aa.attacks_to_run)
        if n_classes < 4 and ("apgd-t" in to_run or "apgd-dlr" in to_run):
            raise UserError(
                f"AutoAttack's DLR attacks need at least 4 classes, the model has {n_classes}; "
                "use version 'custom' with attacks apgd-ce, fab, square"
            )
        if norm == "L2" and "square" in to_run and min(x.shape[2], x.shape[3]) < 5:
            raise UserError(
                f"AutoAttack's L2 Square attack needs images of at least 5x5 pixels, got "
                f"{x.shape[2]}x{x.shape[3]}; use norm Linf or version 'custom' without square"
            )
        for attr in ("apgd_targeted", "fab"):
            sub = getattr(aa, attr, None)
            if sub is not None and getattr(sub, "n_target_classes", 0) > n_classes - 1:
                sub.n_target_classes = n_classes - 1
        with prog.task(f"AutoAttack {norm} eps={eps:.4g}", total=len(to_run)) as advance, _watch_log(
            advance, to_run
        ) as watcher:
            if package.startswith("pyautoattack"):
                out = aa.run_standard_evaluation(x, y, batch_size=batch_size)
            else:
                out = aa.run_standard_evaluation(x, y, bs=batch_size)
            watcher.finish()
    x_adv = out[0] if isinstance(out, tuple) else out
    x_adv = x_adv.detach().cpu()
    delta = (x_adv - x).reshape(x.shape[0], -1)
    size = {"Linf": delta.abs().amax(1), "L2": delta.norm(dim=1), "L1": delta.abs().sum(1)}[norm]
    if bool((size > eps * (1 + 1e-4) + 1e-6).any()) or bool(((x_adv < -1e-6) | (x_adv > 1 + 1e-6)).any()):
        raise RuntimeError("AutoAttack returned points outside the threat model; refusing to report them")
    adv_logits = predict(model, x_adv, batch_size, device)
    result["robust_accuracy"] = accuracy(adv_logits, y)
    return result


# ----------------------------------------------------------------------------------------------------------------
# empirical Lipschitz constant
# ----------------------------------------------------------------------------------------------------------------


def empirical_lipschitz(
    model: torch.nn.Module,
    images: ImageSet | torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    radius: float = 0.5,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: Progress | None = None,
) -> dict:
    """Empirical Lipschitz estimate along the L2-FGSM direction (paper, App. C.1).

    For every image, ``x' = x + radius * g / ||g||_2`` with ``g`` the gradient of the cross-entropy loss at ``x``
    (w.r.t. the true label; the predicted one when no labels are given), and the ratio
    ``||f(x') - f(x)||_2 / ||x' - x||_2`` of logits.  ``x'`` is **not** clamped to ``[0, 1]``: the estimate is
    about the network as a function, and clamping would shrink the step unevenly.  An image whose gradient is
    exactly zero is moved along a random direction (seeded by ``seed``).

    Returns ``{"max", "mean", "radius"}`` over the images.
    """
    radius = float(radius)
    if not np.isfinite(radius) or radius <= 0:
        raise UserError(f"the Lipschitz radius must be positive, got {radius}")
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    x_all, y_all = _unpack(images, labels)
    n = int(x_all.shape[0])
    if n == 0:
        raise UserError("cannot estimate a Lipschitz constant on an empty set")
    gen = torch.Generator().manual_seed(int(seed))
    ratios: list[torch.Tensor] = []
    prog = _progress.ensure(progress)
    with eval_mode(model, freeze=True), prog.task("Lipschitz", total=n) as advance:
        for start in range(0, n, batch_size):
            x = x_all[start : start + batch_size].to(device).detach().clone().requires_grad_(True)
            with torch.enable_grad():
                logits = model(x)
                y = (
                    y_all[start : start + batch_size].to(device)
                    if y_all is not None
                    else logits.argmax(1).detach()
                )
                loss = F.cross_entropy(logits, y, reduction="sum")
                (g,) = torch.autograd.grad(loss, x)
            g = g.detach().double()
            gn = g.flatten(1).norm(dim=1)
            zero = gn == 0
            if bool(zero.any()):
                rnd = torch.randn(g.shape, generator=gen, dtype=torch.float64).to(g.device)
                g = torch.where(zero[:, None, None, None], rnd, g)
                gn = g.flatten(1).norm(dim=1)
            step = (radius * g / gn[:, None, None, None]).to(x.dtype)
            x0 = x.detach()
            x1 = x0 + step
            with torch.inference_mode():
                f0 = model(x0).double()
                f1 = model(x1).double()
            dist = (x1.double() - x0.double()).flatten(1).norm(dim=1)
            ratios.append(((f1 - f0).norm(dim=1) / dist).cpu())
            advance(x.shape[0])
    r = torch.cat(ratios)
    return {"max": float(r.max()), "mean": float(r.mean()), "radius": radius}
