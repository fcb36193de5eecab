"""Stage 2 of DPQ: calibration against the frozen full-precision teacher.

- :mod:`.config`: ``CalibConfig`` (the ``calib:`` section);
- :mod:`.rules`: the assignment rules, one class each, in one registry (:data:`RULES`);
- :mod:`.soft`: the soft rule and its mixtures;
- :mod:`.module`: ``DPQCalibration``, the LightningModule (imported lazily: the config and the
  rules need no Lightning).
"""

from __future__ import annotations

from . import soft as _soft  # noqa: F401  (registers the soft rule)
from .config import CalibConfig
from .rules import RULES, Rule, register, rule_class

__all__ = ["CalibConfig", "DPQCalibration", "NonFiniteLossError", "RULES", "Rule", "register", "rule_class",
           "relative_block_error"]


def __getattr__(name: str):
    if name in ("DPQCalibration", "NonFiniteLossError", "relative_block_error"):
        from . import module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
