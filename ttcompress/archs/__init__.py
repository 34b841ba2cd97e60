"""Architectures: a registry of named networks, ``torchvision:NAME`` and ``path/to/file.py:ClassName``.

``build(spec)`` returns a :class:`Normalized` module: the network (``.net``, whose parameter names match the
checkpoints people actually have) behind its input normalisation, so every caller feeds images in [0, 1].
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ttcompress.archs.cifar_resnet import CifarResNet
from ttcompress.archs.resnet18_cifar import ResNet18Cifar
from ttcompress.archs.vgg import VGG
from ttcompress.archs.wrn import WideResNet
from ttcompress.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Normalized(nn.Module):
    """``net((x - mean) / std)``.  The statistics are non-persistent buffers: the state dict is the network's."""

    def __init__(self, net: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        super().__init__()
        self.net = net
        if (mean is None) != (std is None):
            raise UserError("give both --mean and --std, or neither")
        for name, values in (("--mean", mean), ("--std", std)):
            if values is not None and not all(math.isfinite(float(v)) for v in values):
                raise UserError(f"{name} values must be finite numbers, got {list(values)}")
        if std is not None and any(s <= 0 for s in std):
            raise UserError(f"--std values must be positive, got {list(std)}")
        self._stats = None if mean is None else {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @property
    def normalization(self) -> dict | None:
        return None if self._stats is None else {k: list(v) for k, v in self._stats.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            if x.shape[1] != self.mean.shape[1]:  # broadcasting would silently turn 1 channel into 3
                raise RuntimeError(f"expected {self.mean.shape[1]} input channels, got {x.shape[1]}")
            shape = (1, -1) + (1,) * (x.ndim - 2)  # (1, C, 1, …): any number of spatial dims
            x = (x - self.mean.to(x.dtype).reshape(shape)) / self.std.to(x.dtype).reshape(shape)
        return self.net(x)


@dataclass(frozen=True)
class ArchInfo:
    """How to build one architecture and what it expects."""

    spec: str
    factory: Callable[..., nn.Module]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    input_size: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 10
    takes_num_classes: bool = True
    description: str = field(default="", compare=False)


REGISTRY: dict[str, ArchInfo] = {}


def register(info: ArchInfo) -> ArchInfo:
    REGISTRY[info.spec] = info
    return info


for _depth in (20, 32, 44, 56, 110):
    register(
        ArchInfo(
            f"resnet{_depth}",
            lambda num_classes=10, d=_depth: CifarResNet(d, num_classes),
            IMAGENET_MEAN,
            IMAGENET_STD,
            description=f"CIFAR ResNet-{_depth}, option-A shortcuts (akamaster layout)",
        )
    )
register(ArchInfo("resnet18-cifar", ResNet18Cifar, None, None, description="CIFAR ResNet-18 (pyautoattack example)"))
register(
    ArchInfo(
        "wrn16-10",
        lambda num_classes=10: WideResNet(16, 10, num_classes),
        CIFAR10_MEAN,
        CIFAR10_STD,
        description="Wide ResNet-16-10 (paper)",
    )
)
register(
    ArchInfo("vgg19", lambda num_classes=10: VGG(num_classes=num_classes), CIFAR10_MEAN, CIFAR10_STD,
             description="VGG-19 with batch norm, CIFAR variant (paper)")
)

# LipConvNet-n (SOC) and LipConvNet-n-tt{rank} (SOC-TT), normalised as in the reference training code.
from ttcompress.archs import lipconvnet as _lipconvnet  # noqa: E402

for _depth in _lipconvnet.DEPTHS:
    register(
        ArchInfo(
            f"lipconvnet-{_depth}",
            lambda num_classes=10, d=_depth: _lipconvnet.LipConvNet(d, num_classes),
            _lipconvnet.LIPCONVNET_MEAN,
            _lipconvnet.LIPCONVNET_STD,
            description=f"LipConvNet-{_depth} with skew orthogonal convolutions (Singla & Feizi 2021)",
        )
    )
    for _rank in _lipconvnet.TT_RANKS:
        register(
            ArchInfo(
                f"lipconvnet-{_depth}-tt{_rank}",
                lambda num_classes=10, d=_depth, r=_rank: _lipconvnet.LipConvNet(
                    d, num_classes, conv_type="soc-tt", rank=r
                ),
                _lipconvnet.LIPCONVNET_MEAN,
                _lipconvnet.LIPCONVNET_STD,
                description=f"LipConvNet-{_depth} with SOC-TT layers of rank {_rank} (Senderovich et al. 2022)",
            )
        )


def _torchvision_info(spec: str, name: str) -> ArchInfo:
    import torchvision

    available = set(torchvision.models.list_models())
    if name not in available:
        raise UserError(f"unknown torchvision model {name!r}; see torchvision.models.list_models()")
    return ArchInfo(
        spec,
        lambda num_classes=1000: torchvision.models.get_model(name, weights=None, num_classes=num_classes),
        IMAGENET_MEAN,
        IMAGENET_STD,
        input_size=(3, 224, 224),
        num_classes=1000,
        description=f"torchvision.models.{name}",
    )


def _file_info(spec: str, path_str: str, class_name: str) -> ArchInfo:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise UserError(f"--arch {spec}: no such Python file {path}")
    module_name = f"ttcompress_user_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"--arch {spec}: cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's own file failed to import
        raise UserError(f"--arch {spec}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if cls is None or not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise UserError(f"--arch {spec}: {path} has no nn.Module subclass named {class_name!r}")

    def factory() -> nn.Module:
        try:
            return cls()
        except TypeError as exc:
            raise UserError(f"--arch {spec}: {class_name}() must be constructible with no arguments ({exc})") from exc

    # an optional class attribute ``input_size`` gives the shape of one input, e.g. (C, L) or (C, D, H, W)
    size = getattr(cls, "input_size", None)
    valid = isinstance(size, (tuple, list)) and 2 <= len(size) <= 4 and all(isinstance(v, int) and v > 0 for v in size)
    shape = tuple(size) if valid else (3, 32, 32)
    return ArchInfo(spec, factory, None, None, input_size=shape, takes_num_classes=False,  # type: ignore[arg-type]
                    description=f"{class_name} from {path}")


def source_file(spec: str) -> Path | None:
    """The Python file a ``path/to/file.py:Class`` spec names (None for every other spec): code that only the person
    running the command may name, never a file's metadata or a recipe."""
    if ".py:" not in spec:
        return None
    return Path(spec.rsplit(":", 1)[0]).expanduser()


def names_code(spec: str) -> bool:
    """Does building ``spec`` run code from a file (rather than a registered network)?"""
    return source_file(spec) is not None


def resolve(spec: str) -> ArchInfo:
    """Turn an ``--arch`` string into an :class:`ArchInfo`."""
    if spec in REGISTRY:
        return REGISTRY[spec]
    if spec.startswith("torchvision:"):
        return _torchvision_info(spec, spec.split(":", 1)[1])
    if spec.startswith("timm:"):
        from ttcompress.archs.timm import timm_info

        return timm_info(spec, spec.split(":", 1)[1])
    if ".py:" in spec:
        path, class_name = spec.rsplit(":", 1)
        return _file_info(spec, path, class_name)
    names = ", ".join(sorted(REGISTRY))
    raise UserError(f"unknown architecture {spec!r}; use one of {names}, torchvision:NAME, timm:NAME or "
                    "path/to/file.py:Class")


def build_net(info: ArchInfo, num_classes: int | None = None) -> nn.Module:
    if info.takes_num_classes:
        return info.factory(num_classes=num_classes or info.num_classes)
    return info.factory()


def build(
    spec: str,
    *,
    num_classes: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Normalized:
    """Build ``spec`` with its default normalisation (or ``mean``/``std``), randomly initialised."""
    info = resolve(spec)
    net = build_net(info, num_classes)
    if mean is None and std is None:
        mean, std = info.mean, info.std
    return Normalized(net, mean, std)


def classifier_out_features(net: nn.Module) -> int | None:
    """Number of classes: the output width of the last ``nn.Linear`` (None if the net has none)."""
    last = None
    for module in net.modules():
        if isinstance(module, nn.Linear):
            last = module
    return None if last is None else last.out_features


def last_linear_key(net: nn.Module) -> str | None:
    name = None
    for n, module in net.named_modules():
        if isinstance(module, nn.Linear):
            name = n
    return None if name is None else f"{name}.weight"


__all__ = ["ArchInfo", "Normalized", "REGISTRY", "build", "build_net", "register", "resolve"]
