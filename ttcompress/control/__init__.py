"""Singular-value control during training: clipping, division, FastClip, BatchNorm and linear limits.

* :mod:`~ttcompress.control.layers` — which layers control acts on (one discovery; :func:`is_tt`);
* :mod:`~ttcompress.control.base` — the shape of a control method and the registry (**add a method here**: a
  class with :func:`register`, see the built-in ones in :mod:`~ttcompress.control.methods`);
* :mod:`~ttcompress.control.controller` — the list of configured methods, their timings and state, the final
  verification;
* :mod:`~ttcompress.control.orthogonal` — the orthogonal loss on TT frames;
* :mod:`~ttcompress.control.report` — :class:`BoundReport`, what the verification found per layer.
"""

from ttcompress.control import methods as _methods  # noqa: F401  (registers the built-in methods)
from ttcompress.control.base import METHODS, ControlContext, ControlMethod, method_settings, register
from ttcompress.control.controller import Controller, check_combination
from ttcompress.control.layers import ControlledConv, Layers, discover, is_tt
from ttcompress.control.orthogonal import has_frames, orthogonal_loss
from ttcompress.control.report import BoundReport

__all__ = ["METHODS", "BoundReport", "ControlContext", "ControlMethod", "ControlledConv", "Controller", "Layers",
           "check_combination", "discover", "has_frames", "is_tt", "method_settings", "orthogonal_loss", "register"]
