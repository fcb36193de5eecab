"""Stage 2 of DPQ: calibrate the compressed DiT against the frozen full-precision teacher.

One training step (``training_step``):
  draw ``t``, noise and the label-dropout mask ONCE; both models see the same ``x_t, t, y``;
  loss = ``w_rec * mean_b |h_s^b - h_t^b|^2 / |h_t^b|^2``  (block outputs, normalised per block)
       + ``w_ddpm * (eps MSE + w_vb * variational bound)``    (DiT's own loss, learned sigma)
       + ``w_out * |out_s - out_t|^2``                       (optional final-output matching).
Backward reaches the pool/codebooks through the gather that rebuilds each weight; codes take
no gradient. Every ``assign_every`` steps the codes are re-chosen (forward-pass adjustment) by
the configured rule from the teacher's weights, the current codebooks and the running input
moments (all-reduced first, so every rank computes the same codes). What the rule does lives in
its class (:mod:`.rules`, :mod:`.soft`): this module calls its hooks and never names a rule.

The teacher is held outside the module tree: never in ``state_dict``/checkpoints, never
trained, always in eval mode; runs rebuild it from its path.

With ``calib.ema_decay > 0`` the run exports a moving average of the trained numbers instead of
the last step's (:mod:`.averaging`); the evaluation callbacks measure that average too.
"""

from __future__ import annotations

import contextlib
import math

import lightning as L
import torch
from torch import nn

from ..diffusion import Schedule, ddpm_loss
from ..models.hooks import BlockOutputRecorder
from ..quant import PQ_MODULES
from ..quant.state import state_of
from ..quant.stats import InputMoments
from .averaging import ParameterEMA
from .config import CalibConfig
from .rules import rule_class

def relative_block_error(h_s: list[torch.Tensor], h_t: list[torch.Tensor]) -> torch.Tensor:
    """``mean_b |h_s^b - h_t^b|^2 / |h_t^b|^2`` over the blocks (the loss's reconstruction term)."""
    return torch.stack([(hs.float() - ht.float()).pow(2).sum() / ht.float().pow(2).sum().clamp_min(1e-12)
                        for hs, ht in zip(h_s, h_t)]).mean()


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; training stops, the last good checkpoint is kept."""


class DPQCalibration(L.LightningModule):
    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: CalibConfig, seed: int = 0,
                 max_steps: int | None = None, run_config: str | None = None):
        super().__init__()
        self.student = student.train()  # train mode: input moments are collected in training only
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False)  # hidden from the module tree
        self.cfg = cfg
        self.seed = seed
        self.max_steps = max_steps
        self.run_config = run_config
        self.schedule = Schedule.linear()
        self.moments = InputMoments(student)
        self.pq_layers = {n: m for n, m in student.named_modules() if isinstance(m, PQ_MODULES)}
        if not self.pq_layers:
            raise ValueError("the student has no quantized layers: run stage 1 (quantize_) first")
        self._rec_s = BlockOutputRecorder(student)
        self._rec_t = BlockOutputRecorder(teacher, detach=True)
        self._teacher_w = dict(teacher.named_parameters())
        self.rule = rule_class(cfg.assignment)(cfg)
        self.rule_state = self.rule.state  # the rule's own trained state: in checkpoints as rule_state.*
        if cfg.label_dropout > 0:
            student.null_class  # noqa: B018 - raises a clear error if the DiT has no null class
        # t_sampling=error: how often each training step is drawn, [num_steps]; all zeros until
        # measured at step 0, then saved in every checkpoint (a resumed run draws as this one did).
        self.register_buffer("t_weights", torch.zeros(self.schedule.num_steps, dtype=torch.float64))
        self.ema: ParameterEMA | None = None  # calib.ema_decay > 0: made in setup, once every trained tensor exists
        self._ema_applied = False
        self._set_trainable()

    # ---- what trains ---------------------------------------------------------------------
    def _set_trainable(self) -> None:
        pq_names = {f"{n}.weight_pq.{s}" for n in self.pq_layers for s in ("codebooks", "pool", "lowrank_u", "lowrank_v")}
        float_names = set(state_of(self.student).float_names)
        for name, p in self.student.named_parameters():
            p.requires_grad_(name in pq_names or (self.cfg.train_floats and name in float_names))

    @torch.no_grad()
    def add_lowrank(self, rank: int) -> None:
        """Give every PQ weight that has none a rank-``rank`` correction, initialised to the best
        rank-``rank`` approximation of what stage 1 left wrong (truncated SVD of ``W_teacher -
        decoded``, split as ``U sqrt(S)``, ``sqrt(S) V^T``): the error-reconstruction idea of
        LQER-style methods; calibration then trains it with the codebooks."""
        for name, mod in self.pq_layers.items():
            w = mod.weight_pq
            if w.lowrank_rank:
                continue
            rows, cols = w.matrix_shape()
            r = min(rank, rows, cols)
            resid = (self._teacher_w[f"{name}.weight"].detach().float().to(w.codes.device)
                     - w().detach().float()).reshape(rows, cols)  # (rows, cols)
            U, S, Vh = torch.linalg.svd(resid, full_matrices=False)  # (rows, k), (k,), (k, cols)
            root = S[:r].sqrt()  # (r,)
            w.set_lowrank(U[:, :r] * root, root[:, None] * Vh[:r])  # (rows, r), (r, cols)
        self._set_trainable()

    def trainable_names(self) -> list[str]:
        return sorted(n for n, p in self.student.named_parameters() if p.requires_grad)

    def trainable_count(self) -> int:
        """Numbers trained: the student's and the rule's own (the soft rule's ratios)."""
        return sum(p.numel() for m in (self.student, self.rule_state) for p in m.parameters() if p.requires_grad)

    def teacher_weight(self, layer: str) -> torch.Tensor:
        """The teacher's weight of a quantized layer (detached)."""
        return self._teacher_w[f"{layer}.weight"].detach()

    def configure_optimizers(self):
        groups = [{"params": [p for p in self.student.parameters() if p.requires_grad]}, *self.rule.param_groups()]
        opt = torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
        c = self.cfg
        if c.warmup_steps and step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.schedule == "cosine" and self.max_steps:
            span = max(1, self.max_steps - c.warmup_steps)
            p = min(1.0, (step - c.warmup_steps) / span)
            return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
        return 1.0

    # ---- lifecycle -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Before any checkpoint is restored: the low-rank correction and the rule's state add
        # parameters that must exist then (a resumed run overwrites their initial values).
        if self.cfg.lowrank_rank > 0:
            self.add_lowrank(self.cfg.lowrank_rank)
        self.rule.setup(self)
        if self.cfg.ema_decay > 0 and self.ema is None:
            self.ema = ParameterEMA([p for p in self.student.parameters() if p.requires_grad], self.cfg.ema_decay)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: callbacks (ModelCheckpoint) run that hook before the
        # module's, and a checkpoint must hold the average that includes its own step.
        if self.ema is not None:
            self.ema.update()

    def exported_weights(self) -> contextlib.AbstractContextManager:
        """Inside: the student holds the numbers the run will export (the average, with
        ``calib.ema_decay``); the evaluation callbacks measure the student inside this."""
        if self.ema is None or self._ema_applied:
            return contextlib.nullcontext()
        return self.ema.swapped_in()

    def on_train_end(self) -> None:
        # After every callback's on_train_end (Lightning calls the module's hook last): from here on
        # the student is the exported model (fingerprints, export_student, the final evaluation).
        if self.ema is not None and not self._ema_applied:
            self.ema.copy_to_params()
            self._ema_applied = True

    def on_fit_start(self) -> None:
        self.teacher.to(self.device).eval()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["dpq_config"] = self.run_config  # the resolved YAML of the run
        assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])

    # ---- one step --------------------------------------------------------------------------
    def _draw(self, x0: torch.Tensor, y: torch.Tensor):
        """t, noise and label-dropout mask, drawn once from a generator keyed by (seed, step,
        rank): resuming at step k draws exactly what an uninterrupted run drew at step k."""
        g = torch.Generator(device="cpu").manual_seed(
            self.seed * 1_000_003 + self.global_step * 7919 + self.global_rank
        )
        B = x0.shape[0]
        if self.cfg.t_sampling == "error":
            if not bool(self.t_weights.any()):
                self.t_weights.copy_(self.block_error_by_timestep(x0, y))
            t = torch.multinomial(self.t_weights.cpu().float(), B, replacement=True, generator=g)
        else:
            t = torch.randint(0, self.schedule.num_steps, (B,), generator=g)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float32)
        drop = torch.rand(B, generator=g) < self.cfg.label_dropout
        y = torch.where(drop.to(y.device), torch.full_like(y, self.student.num_classes), y)
        return t.to(x0.device), noise.to(x0.device, x0.dtype), y

    @torch.no_grad()
    def block_error_by_timestep(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sampling weights ``[num_steps]``: the relative block error of the student (mean over
        blocks, on ``x0, y``) at the centre of each of ``t_buckets`` equal buckets of steps,
        averaged over ranks, spread evenly over the bucket's steps and normalised to sum 1."""
        T, nb = self.schedule.num_steps, self.cfg.t_buckets
        edges = [round(i * T / nb) for i in range(nb + 1)]
        g = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + 104_729)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float32).to(x0.device, x0.dtype)
        err = torch.zeros(nb, dtype=torch.float64, device=x0.device)
        was = self.student.training
        self.student.eval()  # no input moments from this measurement
        try:
            for i in range(nb):
                t = torch.full((x0.shape[0],), (edges[i] + edges[i + 1]) // 2, device=x0.device, dtype=torch.long)
                x_t = self.schedule.q_sample(x0, t, noise)
                self.teacher(x_t, t, y)
                self.student(x_t, t, y)
                err[i] = relative_block_error(self._rec_s.outputs, self._rec_t.outputs)
        finally:
            self.student.train(was)
        err = self._reduce_sum(err) / (self.trainer.world_size if self._trainer is not None else 1)
        w = torch.cat([err[i].repeat(edges[i + 1] - edges[i]) for i in range(nb)])  # (T,)
        return (w / w.sum()).to(self.t_weights.device)

    @property
    def uses_teacher(self) -> bool:
        """Whether the loss reads the teacher's outputs (block reconstruction or output matching)."""
        return bool(self.cfg.w_rec or self.cfg.w_out)

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes this step's logged values (its ``log_every_n_steps`` rule; the
        last step too). Without a trainer (a direct call): always."""
        t = self._trainer
        if t is None or not hasattr(t, "log_every_n_steps"):
            return True
        step = self.global_step + 1
        return step % max(1, t.log_every_n_steps) == 0 or step == t.max_steps

    def compute_losses(self, x0: torch.Tensor, y: torch.Tensor, diagnostics: bool = True) -> dict[str, torch.Tensor]:
        """The step's losses. The teacher's forward runs when the loss reads it, or when
        ``diagnostics`` asks for ``loss_rec`` and ``loss_out`` anyway; a loss that does not read
        it (``w_rec = w_out = 0``) skips it on the other steps (a quarter of the step)."""
        t, noise, y = self._draw(x0, y)
        # Only a rule that reads the input moments pays for the per-layer hooks' work (the buffers
        # stay in the state dict, so checkpoints keep one layout).
        self.moments.enabled = self.rule.needs_moments
        x_t = self.schedule.q_sample(x0, t, noise)
        with_teacher = self.uses_teacher or diagnostics
        if with_teacher:
            with torch.no_grad():
                out_t = self.teacher(x_t, t, y)
            h_t = list(self._rec_t.outputs)
        out_s = self.student(x_t, t, y)
        h_s = list(self._rec_s.outputs)
        if not with_teacher:
            # Zero-weighted terms against the student's own detached outputs: the same graph as
            # with the teacher, so autograd sums the gradients in the same order and the step is
            # bit-identical to one that ran the teacher (its terms weigh 0 either way).
            out_t, h_t = out_s.detach(), [h.detach() for h in h_s]
        rec = relative_block_error(h_s, h_t)
        mse, vb = ddpm_loss(self.schedule, out_s.float(), x0.float(), x_t.float(), t, noise.float())
        out = (out_s.float() - out_t.float()).pow(2).mean()
        c = self.cfg
        loss = c.w_rec * rec + c.w_ddpm * (mse + c.w_vb * vb) + c.w_out * out
        losses = {"loss": loss, "loss_ddpm": mse, "loss_vb": vb}
        if with_teacher:
            losses.update(loss_rec=rec, loss_out=out)
        for key, (weight, value) in self.rule.extra_losses(self).items():
            losses["loss"] = losses["loss"] + weight * value
            losses[key] = value
        return losses

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch["x"], batch["y"], diagnostics=self._logs_this_step())
        if not all(torch.isfinite(v) for v in losses.values()):
            bad = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            raise NonFiniteLossError(
                f"non-finite loss at step {self.global_step} ({bad}); training stopped. "
                f"The last good checkpoint is kept: resume from it with a lower calib.lr or check the data."
            )
        B = batch["x"].shape[0]
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=B, prog_bar=False)
        c = self.cfg
        self.log_dict({"train/w_rec": c.w_rec, "train/w_ddpm": c.w_ddpm, "train/w_vb": c.w_vb,
                       "train/w_out": c.w_out}, batch_size=B)
        self.log("train/loss_total", losses["loss"].detach(), prog_bar=True, batch_size=B)
        return losses["loss"]

    # ---- forward-pass assignment adjustment -------------------------------------------------
    def on_after_backward(self) -> None:
        # Every step, before checkpoint callbacks run: the moments in any checkpoint are then the
        # exact global totals (DDP: summed over ranks), so a resumed run reproduces them.
        self.moments.flush(self._reduce_sum)
        self.rule.after_backward(self)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.rule.start_step(self, self.global_step)

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._trainer is not None and self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(tensor, reduce_op="sum")
        return tensor

    def adjust_assignments(self) -> tuple[int, int]:
        """One re-assignment pass of the rule over every layer: (codes changed, codes total)."""
        return self.rule.adjust(self)

    def export_student(self) -> nn.Module:
        """The calibrated student with hard codes, ready for ``save_packed``."""
        self.rule.harden(self)
        return self.student
