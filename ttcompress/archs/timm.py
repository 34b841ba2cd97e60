"""``--arch timm:NAME``: any timm model, built with ``pretrained=False`` (the weights come from the checkpoint).

Input size, normalisation and the default number of classes come from timm's pretrained config of ``NAME``; the
number of classes of a checkpoint is read from its classifier (``checkpoint.load``).  timm is an optional extra:
``pip install 'ttcompress[timm]'``.
"""

from __future__ import annotations

from torch import nn

from ttcompress.errors import UserError


def _timm():
    try:
        import timm
    except ModuleNotFoundError:
        raise UserError("--arch timm:NAME needs timm: pip install 'ttcompress[timm]'") from None
    return timm


def timm_info(spec: str, name: str):
    """The :class:`~ttcompress.archs.ArchInfo` of timm model ``name`` (``spec`` is ``timm:NAME``)."""
    from ttcompress.archs import IMAGENET_MEAN, IMAGENET_STD, ArchInfo

    timm = _timm()
    if not timm.is_model(name):
        raise UserError(f"unknown timm model {name!r}; see timm.list_models() (e.g. resnet18, efficientnet_b0)")
    cfg = timm.get_pretrained_cfg(name)
    size = tuple(cfg.input_size) if cfg is not None and cfg.input_size else (3, 224, 224)
    mean = tuple(cfg.mean) if cfg is not None and cfg.mean else IMAGENET_MEAN
    std = tuple(cfg.std) if cfg is not None and cfg.std else IMAGENET_STD
    classes = int(cfg.num_classes) if cfg is not None and cfg.num_classes else 1000

    def factory(num_classes: int = classes) -> nn.Module:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)

    return ArchInfo(spec, factory, mean, std, input_size=size, num_classes=classes,  # type: ignore[arg-type]
                    description=f"timm.create_model({name!r})")
