"""The main job: teacher -> stage 1 (once) -> calibration (Lightning) -> packed export.

An entry point module, wiring only: it sees the whole :class:`RunConfig` and hands each
component its own section. ``train.py`` is a thin wrapper around :func:`run`. Where the parts
live: stage 1 and its once-per-job cache in :mod:`.stage1`, the DataModule factory in
:mod:`.data.factory`, the logger, the SLURM requeue callback and the resume lookup in
:mod:`.callbacks`, kill-safe checkpoint writes in :mod:`.checkpoint_io`, the end of the run (export, final evaluation, summary) in
:mod:`.export`.
"""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ..calibration import DPQCalibration
from ..callbacks import RequeueAtStepEnd, build_callbacks, make_logger, resume_path
from ..callbacks.loggers import quiet_lightning, wandb_note
from ..callbacks.progress import StepProgressBar
from ..checkpoint_io import AtomicCheckpointIO
from ..config import RunConfig, TrainerConfig, save_resolved, to_yaml
from ..data.factory import build_datamodule
from ..distributed import is_first_process
from .export import finish_run
from .fingerprint import write_fingerprint
from ..models import build_model
from ..quant import report_of
from ..quant.state import state_of
from .stage1 import stage1_once


def run(cfg: RunConfig, callbacks: list | None = None) -> dict:
    """Calibrate as configured; return the final summary (rank 0 writes it to ``summary.json``).
    ``callbacks``: extra Lightning callbacks (e.g. evaluation, or a test's interruption)."""
    from ..validate import check_paths

    check_paths(cfg)  # a missing data folder or resume file fails now, not after stage 1
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_first_process():
        save_resolved(cfg, out / "config.yaml")
    m = cfg.model
    teacher = build_model(m.name, m.arch, m.checkpoint, m.pretrained, m.random_init)
    student = stage1_once(cfg, teacher, out)  # DPQCalibration then freezes the teacher
    stage1_report = report_of(student)
    if cfg.stage1_only:
        return finish_run(cfg, out, student, teacher.eval(), stage1_report, steps=0, metrics={})
    t = cfg.trainer
    module = DPQCalibration(student, teacher, cfg.calib, seed=cfg.seed, max_steps=t.max_steps, run_config=to_yaml(cfg))
    ckpt = ModelCheckpoint(dirpath=str(out / "checkpoints"), save_last=True, every_n_train_steps=t.ckpt_every_n_steps,
                           save_top_k=-1, filename="step{step:06d}", auto_insert_metric_name=False)
    trainer = build_trainer(t, out, [RequeueAtStepEnd(), ckpt, *build_callbacks(cfg.eval, out_dir=str(out)),
                                     *(callbacks or [])], make_logger(cfg.wandb, out, cfg.name))
    trainer.fit(module, datamodule=build_datamodule(cfg.data, teacher, cfg.seed), ckpt_path=resume_path(t.resume, out))
    write_fingerprint(module.student, out / "fingerprints" / f"rank{trainer.global_rank}.json",
                      kmeans_ran=state_of(student).kmeans_ran_here)
    # A SIGUSR1 after fit would kill the job (Lightning restored the default handler).
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    summary: dict = {}
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        trained = module.trainable_count()  # before hardening
        if module.rule.mixes:  # the mixture's numbers: what hardening costs
            from ..evaluation.final import before_hardening

            metrics.update({f"soft/{k}": v for k, v in before_hardening(module.student, cfg.eval).items()})
        summary = finish_run(cfg, out, module.export_student(), module.teacher, stage1_report, trainer.global_step,
                             metrics, trainable_params=trained)
        if (line := wandb_note(cfg.wandb, out)) is not None:
            print(line)
    if cfg.wandb.enabled and trainer.is_global_zero:
        import wandb

        wandb.finish()  # Lightning leaves the run open: the next run in this process would join it
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # gloo can abort at exit otherwise
    return summary


def build_trainer(t: TrainerConfig, out: Path, callbacks: list, logger) -> L.Trainer:
    quiet_lightning()
    strategy = t.strategy
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # Codes and input moments are kept identical on every rank by construction (see
        # InputMoments.flush); broadcasting buffers would be redundant, and gloo has no int16.
        strategy = DDPStrategy(broadcast_buffers=False)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=t.precision, max_steps=t.max_steps, gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps, default_root_dir=str(out), logger=logger,
        callbacks=[*callbacks, *([StepProgressBar()] if t.progress_bar else [])],
        deterministic=t.deterministic, enable_progress_bar=t.progress_bar, enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
    )
