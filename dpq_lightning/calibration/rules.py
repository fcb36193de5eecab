"""Assignment rules of calibration: what happens to the codes while the codebooks train.

A rule is one class in :data:`RULES`, looked up by ``calib.assignment``. The calibration module
calls its hooks and never compares rule names:

- ``setup``: before a checkpoint is restored (a rule may add trained state, e.g. the soft mixture);
- ``param_groups``: optimizer groups of the rule's own parameters;
- ``start_step``: at the start of every training step (the forward-pass adjustment of the codes);
- ``extra_losses``: terms the rule adds to the loss;
- ``after_backward``: after every backward (e.g. hold the codebooks still);
- ``harden``: before export, back to one code per sub-vector.

Its persistent state lives in ``state`` (an ``nn.Module``, saved in checkpoints as
``rule_state.*``), never inside the weight modules. ``keys``: the ``calib`` keys only this rule
reads; the keys of every other rule are unused (:func:`unused_keys`), so two configs that differ
only there define the same run.

To add a rule: subclass :class:`Rule`, list it in :data:`RULES`, test it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..quant.assign import assign, code_cost, damped, limit_changes, map_one_thread_each
from ..quant.geometry import to_groups

if TYPE_CHECKING:  # the config and the LightningModule: types only
    from .config import CalibConfig
    from .module import DPQCalibration


class Rule:
    """Codes frozen at stage 1's choice: the base every rule refines."""

    name: ClassVar[str] = "frozen"
    keys: ClassVar[tuple[str, ...]] = ()  # calib keys only this rule reads
    needs_moments: ClassVar[bool] = False  # reads the running input second moments
    mixes: ClassVar[bool] = False  # trains a mixture that export hardens (measured before and after)

    def __init__(self, cfg: "CalibConfig"):
        self.cfg = cfg
        self.state = nn.Module()

    @classmethod
    def describe(cls, cfg: "CalibConfig") -> str:
        """The rule in a few words, for the reports."""
        return "codes frozen" if cls is Rule else f"assignment {cls.name}"

    def setup(self, module: "DPQCalibration") -> None:
        pass

    def param_groups(self) -> list[dict]:
        return []

    def start_step(self, module: "DPQCalibration", step: int) -> None:
        pass

    def extra_losses(self, module: "DPQCalibration") -> dict[str, torch.Tensor]:
        return {}

    def after_backward(self, module: "DPQCalibration") -> None:
        pass

    def harden(self, module: "DPQCalibration") -> None:
        pass

    def adjust(self, module: "DPQCalibration") -> tuple[int, int]:
        raise ValueError(f"calib.assignment={self.name!r} never re-chooses codes by a pass; "
                         f"rules that do: {', '.join(n for n, r in RULES.items() if issubclass(r, Reassign))}")


class Reassign(Rule):
    """Every ``assign_every`` steps, every code re-chosen from the teacher's weights and the
    current codebooks (the forward-pass adjustment); ``assign_fraction`` limits how many move."""

    keys = ("assign_every", "assign_damp", "assign_fraction")
    objective: ClassVar[str] = "nearest"  # quant.assign's objective

    def __init__(self, cfg: "CalibConfig"):
        super().__init__(cfg)
        # (objective, X, C, geo, H, damp) -> codes: quant.assign's dispatch; a benchmark may time
        # another implementation here
        self.assign = assign

    def start_step(self, module: "DPQCalibration", step: int) -> None:
        # At the start of step k+1 (not the end of step k): after any checkpoint saved at step k,
        # so resuming from it redoes exactly this adjustment.
        if step == 0 or step % self.cfg.assign_every != 0:
            return
        changed, total = self.adjust(module)
        module.log("assign/changed_frac", changed / max(1, total), batch_size=1)

    @torch.no_grad()
    def adjust(self, module: "DPQCalibration") -> tuple[int, int]:
        """Re-choose every code; return (codes changed, codes total).

        On CPU the layers are spread over as many Python threads as the caller's torch thread
        count, each op on one torch thread (:func:`map_one_thread_each`): every layer is computed
        alone and deterministically, so the codes do not depend on the thread count."""
        cpu = next(iter(module.pq_layers.values())).weight_pq.codes.device.type == "cpu"
        counts = map_one_thread_each(lambda name: self._adjust_layer(module, name), list(module.pq_layers), cpu)
        return sum(c for c, _ in counts), sum(t for _, t in counts)

    def _adjust_layer(self, module: "DPQCalibration", name: str) -> tuple[int, int]:
        """One layer's codes re-chosen in place; returns (codes changed, codes total)."""
        with torch.no_grad():  # grad mode is per thread: the workers start with it on
            w = module.pq_layers[name].weight_pq
            H = None
            if self.needs_moments and name in module.moments.names:
                H = module.moments.second_moment(name)  # identical on every rank (see flush)
            X = to_groups(module.teacher_weight(name).to(w.codes.device).float(), w.geo)
            C = w.effective_codebooks().detach()  # (G, K, d)
            new = self.assign(self.objective, X, C, w.geo, H, self.cfg.assign_damp)  # (G, N)
            if self.cfg.assign_fraction < 1.0:  # limited: only the codes that gain most move
                Hd = None if H is None else damped(H, self.cfg.assign_damp)
                gain = code_cost(X, C, w.codes, w.geo, Hd) - code_cost(X, C, new, w.geo, Hd)
                new = limit_changes(w.codes, new, gain, self.cfg.assign_fraction)
            changed = int((new != w.codes.long()).sum())
            w.codes.copy_(new.to(w.codes.dtype))
            return changed, new.numel()


class Nearest(Reassign):
    """Each code: the nearest codeword to the teacher's sub-vector (weight distance)."""

    name = "nearest"
    objective = "nearest"


class OutputAware(Reassign):
    """Each code minimises ``(w - c)^T H (w - c)``, ``H`` the layer's running input moments."""

    name = "output_aware"
    objective = "output_aware"
    needs_moments = True


RULES: dict[str, type[Rule]] = {r.name: r for r in (OutputAware, Nearest, Rule)}


def register(rule: type[Rule]) -> type[Rule]:
    """Add a rule to :data:`RULES` (a class decorator; the name must be new)."""
    if rule.name in RULES:
        raise ValueError(f"an assignment rule named {rule.name!r} exists already")
    RULES[rule.name] = rule
    return rule


def rule_class(name: str) -> type[Rule]:
    if name not in RULES:
        raise ValueError(f"calib.assignment must be one of {tuple(RULES)}, got {name!r}")
    return RULES[name]


def unused_keys(name: str) -> tuple[str, ...]:
    """The rule-specific ``calib`` keys that rule ``name`` never reads, in a fixed order."""
    own = set(rule_class(name).keys)
    every = [k for r in RULES.values() for k in r.keys]
    return tuple(dict.fromkeys(k for k in every if k not in own))
