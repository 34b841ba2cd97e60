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

__all__ = ["LoadedModel", "ModelMeta", "TTConv2d", "__version__", "decompose", "load", "save", "tt_svd"]
