"""What a quantized model carries besides its modules: one typed record, ``model.dpq_state``.

Set by ``quantize_`` and by ``load_packed``; read by the size report, the packed-file writer,
calibration (which float parameters may train) and the run (whether k-means ran in this
process). The quantization config stays a typed :class:`QuantConfig` here; it becomes a dict only
at the packed-file boundary (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import QuantConfig

ATTR = "dpq_state"


@dataclass
class QuantState:
    quant: QuantConfig
    left_float: dict[str, list[str]]  # parameter -> [kind, why] of what stays float by rule, not by choice
    float_names: list[str]  # every parameter stored in fp16 (biases, norms, embedders kept float, ...)
    kmeans_seconds: float | None = None  # stage 1's k-means time, when it ran in this process
    kmeans_ran_here: bool = False  # this process computed stage 1 (not loaded it): the run's fingerprint


def is_quantized(model: nn.Module) -> bool:
    return isinstance(getattr(model, ATTR, None), QuantState)


def state_of(model: nn.Module) -> QuantState:
    state = getattr(model, ATTR, None)
    if not isinstance(state, QuantState):
        raise ValueError("model is not quantized: run quantize_ first or load a packed file")
    return state


def set_state(model: nn.Module, state: QuantState) -> None:
    # object.__setattr__: a dataclass is not a Module/Parameter/Tensor, so nn.Module would store it
    # in __dict__ anyway; this says so and keeps it out of state_dict and children().
    object.__setattr__(model, ATTR, state)
