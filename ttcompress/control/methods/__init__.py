"""The built-in control methods, one module each; importing this package registers them.  After a step they act
in this order (their ``order``): divide, clip, FastClip, linear, BatchNorm."""

from ttcompress.control.methods import batchnorm, clip, divide, fastclip, linear  # noqa: F401
from ttcompress.control.methods.clip import ClipConvs
from ttcompress.control.methods.divide import DivideConvs
from ttcompress.control.methods.fastclip import FASTCLIP_SV_TOL, FASTCLIP_TOL, FastClipConvs
from ttcompress.control.methods.linear import LinearLimit
from ttcompress.control.methods.batchnorm import BatchNormLimit

__all__ = ["FASTCLIP_SV_TOL", "FASTCLIP_TOL", "BatchNormLimit", "ClipConvs", "DivideConvs", "FastClipConvs",
           "LinearLimit"]
