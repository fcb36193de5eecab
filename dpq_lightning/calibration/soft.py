"""The soft rule (VQ4DiT-style assignment, an ablation of the calibration): each sub-vector mixes
its ``n`` nearest codewords with learnable softmax ratios; sub-vectors whose top ratio passes a
threshold freeze to it; export keeps every sub-vector's argmax.

The mixture of each layer (:class:`SoftCodes`) is the rule's state, not the weight module's: the
rule attaches it to the layer's :class:`~dpq_lightning.quant.layers.PQWeight` as its mixer (a
seam that knows nothing of softness) and keeps it in ``rule_state`` for checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.geometry import to_groups
from ..quant.layers import PQWeight, gather_rows
from .rules import Rule, register

if TYPE_CHECKING:
    from .module import DPQCalibration


class SoftCodes(nn.Module):
    """One layer's mixture: candidates ``[G, N, n]``, logits ``[G, N, n]``, frozen ``[G, N]``,
    the ratios' temperature (a scalar buffer, so a resumed run anneals as this one did)."""

    def __init__(self, w: PQWeight, X: torch.Tensor, n: int, temperature: float = 1.0):
        super().__init__()
        C = w.effective_codebooks().detach()  # (G, K, d)
        dist = torch.cdist(X.float(), C.float())  # (G, N, K)
        d_n, cand = dist.topk(min(n, w.K), dim=-1, largest=False)  # (G, N, n)
        self.register_buffer("cand", cand.to(w.codes.dtype))
        self.register_buffer("frozen", torch.zeros(cand.shape[:2], dtype=torch.bool, device=cand.device))
        # Softmax temperature of the ratios (1 = plain softmax); the calibration may lower it step
        # by step so that every mixture is one-hot, and hardening free, by the end.
        self.register_buffer("tau", torch.ones((), device=cand.device))
        scale = d_n.mean().clamp_min(1e-12)
        self.logits = nn.Parameter(-(d_n / scale) / temperature)  # (G, N, n)

    def ratios(self) -> torch.Tensor:
        """The mixing ratios ``softmax(logits / tau)`` ``[G, N, n]``."""
        return torch.softmax(self.logits / self.tau, dim=-1)

    def mix(self, w: PQWeight, table: torch.Tensor) -> torch.Tensor:
        """The mixed sub-vectors ``[G, N, d]`` of ``w`` from its codeword table ``[rows, d]``."""
        vecs = gather_rows(table, w.rows_of(self.cand))  # (G, N, n, d)
        probs = self.ratios()  # (G, N, n)
        hard = F.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)
        probs = torch.where(self.frozen.unsqueeze(-1), hard, probs)  # frozen: exactly one codeword
        return (probs.unsqueeze(-1) * vecs).sum(-2)  # (G, N, d)

    @torch.no_grad()
    def step(self, w: PQWeight, threshold: float) -> int:
        """Freeze sub-vectors whose top ratio exceeds ``threshold``; refresh ``w``'s hard codes to
        every sub-vector's current best candidate. Returns how many are frozen now."""
        top, pos = self.ratios().max(-1)  # (G, N)
        self.frozen |= top > threshold
        w.codes.copy_(self.cand.long().gather(-1, pos.unsqueeze(-1)).squeeze(-1).to(w.codes.dtype))
        return int(self.frozen.sum())

    def spread(self) -> torch.Tensor:
        """Mean ``r (1 - r)`` over the ratios: 0 only at one-hot mixtures."""
        r = self.ratios()  # (G, N, n)
        return (r * (1 - r)).sum(-1).mean()


def _key(layer: str) -> str:
    return layer.replace(".", "__")  # a module name may not hold dots


@register
class Soft(Rule):
    name = "soft"
    keys = ("assign_every", "soft_candidates", "soft_threshold", "soft_lr", "soft_hold", "soft_sharpen",
            "soft_tau_end", "soft_anneal_frac")
    mixes = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.state = nn.ModuleDict()

    @classmethod
    def describe(cls, cfg) -> str:
        return (f"soft candidate sets (n={cfg.soft_candidates}, temperature 1 -> {cfg.soft_tau_end:g} over "
                f"{cfg.soft_anneal_frac:.0%} of the steps, then locked)")

    def codes_of(self, layer: str) -> SoftCodes:
        return self.state[_key(layer)]

    def layers(self, module: "DPQCalibration"):
        """``(PQWeight, SoftCodes)`` of every layer still mixing."""
        return [(m.weight_pq, self.state[_key(n)]) for n, m in module.pq_layers.items() if _key(n) in self.state]

    def setup(self, module: "DPQCalibration") -> None:
        # Before any checkpoint is restored: the mixtures' parameters must exist then (a resumed
        # run overwrites their initial values).
        for name, mod in module.pq_layers.items():
            if _key(name) not in self.state:
                w = mod.weight_pq
                X = to_groups(module.teacher_weight(name).float(), w.geo)
                self.state[_key(name)] = soft = SoftCodes(w, X.to(w.codes.device), self.cfg.soft_candidates)
                w.set_mixer(soft.mix)

    def param_groups(self) -> list[dict]:
        # the ratios may move faster than the codewords (VQ4DiT: 5e-2 vs 1e-4)
        logits = [s.logits for s in self.state.values()]
        return [{"params": logits, "lr": self.cfg.soft_lr or self.cfg.lr}] if logits else []

    def temperature(self, step: int, max_steps: int | None) -> float:
        """``soft_tau_end ** p``, p = step / (soft_anneal_frac * max_steps) capped at 1: a
        geometric fall from 1, so the ratios sharpen at a steady rate and are (near) one-hot for
        the last part of the run; from then on every sub-vector is locked to its argmax and the
        codebooks adapt to the codes that will be stored (hardening then costs nothing)."""
        return self.cfg.soft_tau_end ** min(1.0, step / self.anneal_span(max_steps))

    def anneal_span(self, max_steps: int | None) -> float:
        return max(1.0, self.cfg.soft_anneal_frac * (max_steps or 1))

    def frozen_fraction(self, module: "DPQCalibration") -> float:
        frozen = sum(int(s.frozen.sum()) for _, s in self.layers(module))
        return frozen / max(1, sum(m.weight_pq.codes.numel() for m in module.pq_layers.values()))

    def start_step(self, module: "DPQCalibration", step: int) -> None:
        c = self.cfg
        if c.soft_tau_end < 1.0:
            tau, done = self.temperature(step, module.max_steps), step >= self.anneal_span(module.max_steps)
            for w, s in self.layers(module):
                s.tau.fill_(tau)
                if done and not bool(s.frozen.all()):
                    # Annealing over: lock every sub-vector to its argmax (near-ties between
                    # distinct codewords stay mixed at any temperature), so the rest of the run
                    # trains the codebooks for exactly the codes that will be stored.
                    s.step(w, -1.0)
        if step == 0 or step % c.assign_every != 0:
            return
        frozen = sum(s.step(w, c.soft_threshold) for w, s in self.layers(module))
        total = sum(m.weight_pq.codes.numel() for m in module.pq_layers.values())
        module.log("assign/frozen_frac", frozen / total, batch_size=1)

    def extra_losses(self, module: "DPQCalibration") -> dict[str, torch.Tensor]:
        c = self.cfg
        if c.soft_sharpen > 0 and module.max_steps and module.global_step >= module.max_steps // 2:
            # VQ4DiT's sharpening, added once the ratios had half the run to settle: r(1-r) is 0
            # only at one-hot ratios, so it pushes every mixture toward the codeword it favours.
            sharp = torch.stack([s.spread() for _, s in self.layers(module)]).mean()
            return {"loss_sharpen": (c.soft_sharpen, sharp)}
        return {}

    def after_backward(self, module: "DPQCalibration") -> None:
        if self.cfg.soft_hold > 0 and self.frozen_fraction(module) < self.cfg.soft_hold:
            # VQ4DiT: the codebooks wait until the choices have settled (a zero gradient leaves
            # Adam's moments and the codewords exactly where they are). The frozen fraction is
            # read from the frozen buffers, so a resumed run holds exactly when this one did.
            for m in module.pq_layers.values():
                for p in (m.weight_pq.codebooks, m.weight_pq.pool):
                    if p is not None and p.grad is not None:
                        p.grad.zero_()

    def harden(self, module: "DPQCalibration") -> None:
        """Back to hard codes (the argmax candidate of every sub-vector); the mixtures go."""
        for w, s in self.layers(module):
            s.step(w, 2.0)  # refresh codes, freeze nothing new
            w.set_mixer(None)
        self.state.clear()
