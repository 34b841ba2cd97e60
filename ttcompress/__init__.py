"""ttcompress: tensor-train compression of CNNs with exact control of convolution singular values.

    from ttcompress import load, decompose, spectrum
    m = load("resnet20.th", arch="resnet20")
    report = decompose(m.net, rank=8)
    layers = spectrum(m)
"""

from __future__ import annotations

__version__ = "0.1.0"

from ttcompress.checkpoint import LoadedModel, ModelMeta, load, save  # noqa: E402
from ttcompress.tt import TTConv2d, decompose, tt_svd  # noqa: E402


def __getattr__(name: str):  # heavier entry points, imported on first use
    if name in ("finetune", "FinetuneConfig"):
        from ttcompress import train

        return getattr(train, name)
    if name == "evaluate":
        from ttcompress.evaluate import evaluate

        return evaluate
    if name == "spectrum":
        from ttcompress.spectral.network import network_spectrum

        return network_spectrum
    raise AttributeError(name)

__all__ = ["FinetuneConfig", "LoadedModel", "ModelMeta", "TTConv2d", "__version__", "decompose", "evaluate", "finetune",
           "load", "save", "spectrum", "tt_svd"]
