"""Stage 2 of DPQ: calibrate the compressed DiT against the frozen full-precision teacher.

One training step (``training_step``):
  draw ``t``, noise and the label-dropout mask ONCE; both models see the same ``x_t, t, y``;
  loss = ``w_rec * mean_b |h_s^b - h_t^b|^2 / |h_t^b|^2``  (block outputs, normalised per block)
       + ``w_ddpm * (eps MSE + w_vb * variational bound)``    (DiT's own loss, learned sigma)
       + ``w_out * |out_s - out_t|^2``                       (optional final-output matching).
Backward reaches the pool/codebooks through the gather that rebuilds each weight; codes take
no gradient. Every ``assign_every`` steps the codes are re-chosen (forward-pass adjustment) by
the configured rule from the teacher's weights, the current codebooks and the running input
moments (all-reduced first, so every rank computes the same codes).

The teacher is held outside the module tree: never in ``state_dict``/checkpoints, never
trained, always in eval mode; runs rebuild it from its path.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn

from .calib_config import CalibConfig
from .diffusion import Schedule, ddpm_loss
from .models.hooks import BlockOutputRecorder
from .quant import PQ_MODULES
from .quant.assign import assign, code_cost, damped, limit_changes, map_one_thread_each
from .quant.geometry import to_groups
from .quant.state import state_of
from .quant.stats import InputMoments

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
        self._pq = {n: m for n, m in student.named_modules() if isinstance(m, PQ_MODULES)}
        if not self._pq:
            raise ValueError("the student has no quantized layers: run stage 1 (quantize_) first")
        self._rec_s = BlockOutputRecorder(student)
        self._rec_t = BlockOutputRecorder(teacher, detach=True)
        self._teacher_w = dict(teacher.named_parameters())
        if cfg.label_dropout > 0:
            student.null_class  # noqa: B018 - raises a clear error if the DiT has no null class
        # t_sampling=error: how often each training step is drawn, [num_steps]; all zeros until
        # measured at step 0, then saved in every checkpoint (a resumed run draws as this one did).
        self.register_buffer("t_weights", torch.zeros(self.schedule.num_steps, dtype=torch.float64))
        self._set_trainable()

    # ---- what trains ---------------------------------------------------------------------
    def _set_trainable(self) -> None:
        pq_names = {f"{n}.weight_pq.{s}" for n in self._pq
                    for s in ("codebooks", "pool", "soft_logits", "lowrank_u", "lowrank_v")}
        float_names = set(state_of(self.student).float_names)
        for name, p in self.student.named_parameters():
            p.requires_grad_(name in pq_names or (self.cfg.train_floats and name in float_names))

    @torch.no_grad()
    def add_lowrank(self, rank: int) -> None:
        """Give every PQ weight that has none a rank-``rank`` correction, initialised to the best
        rank-``rank`` approximation of what stage 1 left wrong (truncated SVD of ``W_teacher -
        decoded``, split as ``U sqrt(S)``, ``sqrt(S) V^T``): the error-reconstruction idea of
        LQER-style methods; calibration then trains it with the codebooks."""
        for name, mod in self._pq.items():
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

    def configure_optimizers(self):
        named = [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]
        logits = [p for n, p in named if n.endswith(".soft_logits")]
        groups = [{"params": [p for n, p in named if not n.endswith(".soft_logits")]}]
        if logits:  # the soft rule's ratios may move faster than the codewords (VQ4DiT: 5e-2 vs 1e-4)
            groups.append({"params": logits, "lr": self.cfg.soft_lr or self.cfg.lr})
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
        # Before any checkpoint is restored: the low-rank correction and the soft rule add
        # parameters that must exist then (a resumed run overwrites their initial values).
        if self.cfg.lowrank_rank > 0:
            self.add_lowrank(self.cfg.lowrank_rank)
        if self.cfg.assignment == "soft":
            for name, mod in self._pq.items():
                w = mod.weight_pq
                if w.soft_logits is None:
                    X = to_groups(self._teacher_w[f"{name}.weight"].detach().float(), w.geo)
                    w.start_soft(X.to(w.codes.device), self.cfg.soft_candidates)
            self._set_trainable()

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

    def compute_losses(self, x0: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        t, noise, y = self._draw(x0, y)
        # Only the output-aware rule reads the input moments; the other rules skip the per-layer
        # hooks' work (the buffers stay in the state dict, so checkpoints keep one layout).
        self.moments.enabled = self.cfg.assignment == "output_aware"
        x_t = self.schedule.q_sample(x0, t, noise)
        with torch.no_grad():
            out_t = self.teacher(x_t, t, y)
        h_t = list(self._rec_t.outputs)
        out_s = self.student(x_t, t, y)
        h_s = list(self._rec_s.outputs)
        rec = relative_block_error(h_s, h_t)
        mse, vb = ddpm_loss(self.schedule, out_s.float(), x0.float(), x_t.float(), t, noise.float())
        out = (out_s.float() - out_t.float()).pow(2).mean()
        c = self.cfg
        loss = c.w_rec * rec + c.w_ddpm * (mse + c.w_vb * vb) + c.w_out * out
        losses = {"loss": loss, "loss_rec": rec, "loss_ddpm": mse, "loss_vb": vb, "loss_out": out}
        if c.assignment == "soft" and c.soft_sharpen > 0 and self.max_steps and self.global_step >= self.max_steps // 2:
            # VQ4DiT's sharpening, added once the ratios had half the run to settle: r(1-r) is 0
            # only at one-hot ratios, so it pushes every mixture toward the codeword it favours.
            sharp = torch.stack([self._soft_spread(m.weight_pq) for m in self._pq.values()
                                 if m.weight_pq.soft_logits is not None]).mean()
            losses["loss"] = loss + c.soft_sharpen * sharp
            losses["loss_sharpen"] = sharp
        return losses

    @staticmethod
    def _soft_spread(w) -> torch.Tensor:
        r = w.soft_ratios()  # (G, N, n)
        return (r * (1 - r)).sum(-1).mean()

    def soft_temperature(self, step: int) -> float:
        """``soft_tau_end ** p``, p = step / (soft_anneal_frac * max_steps) capped at 1: a
        geometric fall from 1, so the ratios sharpen at a steady rate and are (near) one-hot for
        the last part of the run; from then on every sub-vector is locked to its argmax and the
        codebooks adapt to the codes that will be stored (hardening then costs nothing)."""
        return self.cfg.soft_tau_end ** min(1.0, step / self._anneal_span())

    def _anneal_span(self) -> float:
        return max(1.0, self.cfg.soft_anneal_frac * (self.max_steps or 1))

    def soft_frozen_fraction(self) -> float:
        frozen = sum(int(m.weight_pq.soft_frozen.sum()) for m in self._pq.values() if m.weight_pq.soft_logits is not None)
        return frozen / max(1, sum(m.weight_pq.codes.numel() for m in self._pq.values()))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch["x"], batch["y"])
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
        if self.cfg.assignment == "soft" and self.cfg.soft_hold > 0 and self.soft_frozen_fraction() < self.cfg.soft_hold:
            # VQ4DiT: the codebooks wait until the choices have settled (a zero gradient leaves
            # Adam's moments and the codewords exactly where they are). The frozen fraction is
            # read from the soft_frozen buffers, so a resumed run holds exactly when this one did.
            for m in self._pq.values():
                for p in (m.weight_pq.codebooks, m.weight_pq.pool):
                    if p is not None and p.grad is not None:
                        p.grad.zero_()

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # Adjusting at the start of step k+1 (not the end of step k) puts the adjustment after any
        # checkpoint saved at step k, so resuming from it redoes exactly this adjustment.
        rule = self.cfg.assignment
        step = self.global_step
        if rule == "soft" and self.cfg.soft_tau_end < 1.0:
            tau, done = self.soft_temperature(step), step >= self._anneal_span()
            for m in self._pq.values():
                w = m.weight_pq
                if w.soft_logits is not None:
                    w.soft_tau.fill_(tau)
                    if done and not bool(w.soft_frozen.all()):
                        # Annealing over: lock every sub-vector to its argmax (near-ties between
                        # distinct codewords stay mixed at any temperature), so the rest of the run
                        # trains the codebooks for exactly the codes that will be stored.
                        w.soft_step(-1.0)
        if rule == "frozen" or step == 0 or step % self.cfg.assign_every != 0:
            return
        if rule == "soft":
            frozen = sum(m.weight_pq.soft_step(self.cfg.soft_threshold) for m in self._pq.values())
            total = sum(m.weight_pq.codes.numel() for m in self._pq.values())
            self.log("assign/frozen_frac", frozen / total, batch_size=1)
            return
        changed, total = self.adjust_assignments()
        self.log("assign/changed_frac", changed / max(1, total), batch_size=1)

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._trainer is not None and self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(tensor, reduce_op="sum")
        return tensor

    @torch.no_grad()
    def adjust_assignments(self) -> tuple[int, int]:
        """Re-choose every code by the rule; return (codes changed, codes total).

        On CPU the layers are spread over as many Python threads as the caller's torch thread
        count, each op on one torch thread (:func:`map_one_thread_each`): every layer is computed
        alone and deterministically, so the codes do not depend on the thread count."""
        cpu = next(iter(self._pq.values())).weight_pq.codes.device.type == "cpu"
        counts = map_one_thread_each(self._adjust_layer, list(self._pq), cpu)
        return sum(c for c, _ in counts), sum(t for _, t in counts)

    def _adjust_layer(self, name: str) -> tuple[int, int]:
        """One layer's codes re-chosen in place; returns (codes changed, codes total)."""
        with torch.no_grad():  # grad mode is per thread: the workers start with it on
            w = self._pq[name].weight_pq
            H = None
            if self.cfg.assignment == "output_aware" and name in self.moments.names:
                H = self.moments.second_moment(name)  # identical on every rank (see flush)
            X = to_groups(self._teacher_w[f"{name}.weight"].detach().to(w.codes.device).float(), w.geo)
            C = w.effective_codebooks().detach()  # (G, K, d)
            new = assign(self.cfg.assignment, X, C, w.geo, H, self.cfg.assign_damp)  # (G, N)
            if self.cfg.assign_fraction < 1.0:  # limited: only the codes that gain most move
                Hd = None if H is None else damped(H, self.cfg.assign_damp)
                gain = code_cost(X, C, w.codes, w.geo, Hd) - code_cost(X, C, new, w.geo, Hd)
                new = limit_changes(w.codes, new, gain, self.cfg.assign_fraction)
            changed = int((new != w.codes.long()).sum())
            w.codes.copy_(new.to(w.codes.dtype))
            return changed, new.numel()

    def export_student(self) -> nn.Module:
        """The calibrated student with hard codes, ready for ``save_packed``."""
        for m in self._pq.values():
            m.weight_pq.end_soft()
        return self.student
