"""Settings of stage 2 (calibration): a plain dataclass, importable without Lightning. The
assignment rules and the keys each reads are the registry's (:mod:`.rules`)."""

from __future__ import annotations

from dataclasses import dataclass

from .rules import rule_class, unused_keys


@dataclass
class CalibConfig:
    """Loss weights, assignment rule, optimisation. (Steps, devices, precision: ``trainer``.)"""

    w_rec: float = 1.0  # block-output reconstruction
    w_ddpm: float = 1.0  # eps MSE of the student against the true noise
    w_vb: float = 1.0  # variational-bound term (learned-sigma channels), inside the DDPM loss
    w_out: float = 0.0  # final-output matching against the teacher
    assignment: str = "output_aware"  # output_aware | nearest | frozen | soft
    assign_every: int = 50  # steps between assignment adjustments (1 = every step)
    assign_damp: float = 0.01  # H + damp * mean(diag H) * I
    assign_fraction: float = 1.0  # at most this fraction of each layer's codes change per adjustment
    soft_candidates: int = 4  # soft rule: nearest codewords mixed per sub-vector
    soft_threshold: float = 0.95  # soft rule: freeze a sub-vector once its top ratio exceeds this
    soft_lr: float | None = None  # soft rule: learning rate of the ratios' logits (None: lr; VQ4DiT: 5e-2)
    soft_hold: float = 0.0  # soft rule: codebooks/pool stay still until this fraction is frozen (VQ4DiT: 0.99)
    soft_sharpen: float = 0.0  # soft rule: weight of mean r(1-r) over the ratios, in the second half of the steps
    soft_tau_end: float = 1.0  # soft rule: ratios' temperature at the end of the annealing (1 = no annealing)
    soft_anneal_frac: float = 0.75  # soft rule: tau falls geometrically 1 -> soft_tau_end over this fraction of the steps, then every code locks
    train_floats: bool = False  # also train biases/norms (and excluded weights) kept in float
    lowrank_rank: int = 0  # > 0: every PQ weight gets a trained correction U [rows, r] @ V [r, cols] (fp16, counted in the size)
    lr: float = 1e-4
    ema_decay: float = 0.0  # > 0: export the moving average of the trained numbers (per-step decay; .averaging)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (to lr * min_lr_ratio at max_steps)
    min_lr_ratio: float = 0.1
    t_sampling: str = "uniform"  # uniform | error: t drawn in proportion to the stage-1 block error
    t_buckets: int = 10  # t_sampling=error: buckets of the 1000 steps, each measured once at step 0
    label_dropout: float = 0.1  # DiT's classifier-free-guidance label dropout (same mask for both)

    def unused_keys(self) -> tuple[str, ...]:
        """Keys this calibration never reads under its ``assignment`` rule. Two configs that differ
        only here define the same run (studies.harness.runner.experiment_key)."""
        return unused_keys(self.assignment)

    def __post_init__(self) -> None:
        rule_class(self.assignment)  # raises, naming the key and the rules known
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"calib.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.assign_every < 1:
            raise ValueError(f"calib.assign_every must be >= 1, got {self.assign_every}")
        if not 0.0 < self.assign_fraction <= 1.0:
            raise ValueError(f"calib.assign_fraction must be in (0, 1] (1 = every code may change), "
                             f"got {self.assign_fraction}")
        if not 0.0 <= self.soft_hold <= 1.0:
            raise ValueError(f"calib.soft_hold must be in [0, 1] (a fraction of frozen sub-vectors), got {self.soft_hold}")
        if not 0.0 < self.soft_tau_end <= 1.0:
            raise ValueError(f"calib.soft_tau_end must be in (0, 1] (1 = no annealing), got {self.soft_tau_end}")
        if not 0.0 < self.soft_anneal_frac <= 1.0:
            raise ValueError(f"calib.soft_anneal_frac must be in (0, 1], got {self.soft_anneal_frac}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"calib.ema_decay must be in [0, 1) (0 = export the last step; 0.99 = a horizon of about "
                             f"100 steps once the warm-up (1+n)/(10+n) has passed it), got {self.ema_decay}")
        if self.lowrank_rank < 0:
            raise ValueError(f"calib.lowrank_rank must be >= 0 (0 = no low-rank correction), got {self.lowrank_rank}")
        if self.t_sampling not in ("uniform", "error"):
            raise ValueError(f"calib.t_sampling must be 'uniform' or 'error', got {self.t_sampling!r}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"calib.label_dropout must be in [0, 1), got {self.label_dropout}")
