"""The main job: teacher -> stage 1 (once) -> calibration (Lightning) -> packed export.

An entry point module: it sees the whole :class:`RunConfig` and hands each component its own
section. ``train.py`` is a thin wrapper around :func:`run`.

Distributed runs: stage 1 is computed once. Rank 0 writes ``OUTPUT_DIR/stage1.dpq`` (atomically,
with a key of the quantization config and the teacher source); other ranks, and the processes
Lightning's DDP launcher re-executes, wait for that file and load it, so every rank starts from
identical codes and codebooks without running k-means itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from .calibration import DPQCalibration
from .checkpoint_io import AtomicCheckpointIO
from .config import DataConfig, RunConfig, WandbConfig, save_resolved, to_yaml
from .models import build_model
from .packed import load_packed, save_packed
from .quant import report_of
from .stage1 import quantize_with_progress, write_json_atomic

STAGE1_FILE = "stage1.dpq"


def is_first_process() -> bool:
    """Global rank 0, known before any process group exists: torchrun sets RANK, SLURM sets
    SLURM_PROCID, Lightning's launcher sets LOCAL_RANK/NODE_RANK for the processes it starts."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    if "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def stage1_key(cfg: RunConfig) -> str:
    m = cfg.model
    src = {"quant": cfg.quant.to_dict(), "model": m.name, "arch": dict(m.arch), "seed": cfg.seed}
    for path in (m.checkpoint, m.pretrained):
        if path and Path(path).exists():
            st = Path(path).stat()
            src[str(path)] = [st.st_size, int(st.st_mtime)]
        elif path:
            src[str(path)] = "hub"
    return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()[:16]


def stage1_once(cfg: RunConfig, teacher: torch.nn.Module, out: Path, wait_s: float = 3600.0) -> torch.nn.Module:
    """The stage-1 student: loaded from ``out/stage1.dpq`` if its key matches, computed by rank 0
    otherwise (other ranks wait for it)."""
    import copy

    path, key_file = out / STAGE1_FILE, out / "stage1.key"
    key = stage1_key(cfg)
    ready = lambda: path.is_file() and key_file.is_file() and key_file.read_text().strip() == key  # noqa: E731
    was_ready = ready()
    if not was_ready:
        if is_first_process():
            student = copy.deepcopy(teacher)  # before the teacher is frozen: same learnable set
            report = quantize_with_progress(student, cfg.quant)
            save_packed(student, path)
            print(f"stage 1 written to {path}")
            key_file.with_name(".stage1.key.tmp").write_text(key)
            os.replace(key_file.with_name(".stage1.key.tmp"), key_file)
            write_json_atomic({"summary": report.summary(), **report.to_dict()}, out / "report_stage1.json")
            print(report.table(per_param=False))
        else:
            t0 = time.time()
            while not ready():
                if time.time() - t0 > wait_s:
                    raise TimeoutError(f"{path} did not appear within {wait_s:.0f} s")
                time.sleep(2)
    loaded = load_packed(path)
    if is_first_process() and not was_ready:
        loaded._kmeans_ran_here = True  # recorded in the fingerprint: k-means ran in this process
    return loaded


def write_fingerprint(student: torch.nn.Module, path: Path, kmeans_ran: bool) -> None:
    """A hash of the student's codes, codebooks, pools and floats, per rank: identical on every
    rank after DDP training (tested), and a cheap way to compare runs."""
    h = hashlib.sha256()
    for name, tensor in sorted(student.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"sha256": h.hexdigest(), "kmeans_ran": kmeans_ran, "pid": os.getpid()}, path)


def build_datamodule(data: DataConfig, teacher: torch.nn.Module, seed: int) -> L.LightningDataModule:
    from .data import DigitsDataModule, LatentDataModule, TeacherSamplesDataModule

    if data.kind == "digits":
        return DigitsDataModule(data.global_batch_size, cache_dir=data.cache_dir, num_workers=data.num_workers,
                                shuffle=data.shuffle, seed=seed)
    if not data.path:
        raise ValueError(f"data.path is required for data.kind={data.kind!r}")
    c = teacher.config
    shape = (c.in_channels, c.input_size, c.input_size)
    if data.kind == "latents":
        return LatentDataModule(data.path, data.global_batch_size, num_workers=data.num_workers, shuffle=data.shuffle,
                                seed=seed, expect_shape=shape, expect_num_classes=c.num_classes)
    if data.kind == "teacher":
        from .sampling import sample

        def sample_fn(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            return sample(teacher, labels, shape, steps=data.teacher_steps, cfg_scale=data.teacher_cfg_scale,
                          method="ddim", generator=gen)

        return TeacherSamplesDataModule(sample_fn, data.teacher_samples, c.num_classes, data.path,
                                        data.global_batch_size, num_workers=data.num_workers, shuffle=data.shuffle,
                                        seed=seed, expect_shape=shape)
    raise ValueError(f"data.kind must be digits, latents or teacher, got {data.kind!r}")


def make_logger(wb: WandbConfig, out: Path, name: str):
    if not wb.enabled:
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(out), name="logs")
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(project=wb.project, entity=wb.entity, group=wb.group, tags=list(wb.tags), name=name,
                       save_dir=str(out), mode=wb.mode)


class RequeueAtStepEnd(Callback):
    """SLURM preemption (SIGUSR1 from ``--signal`` or ``scancel --signal=USR1``) handled at a step
    boundary. Lightning's own handler saves ``hpc_ckpt_N.ckpt`` from inside the signal handler,
    i.e. in the middle of a step (the loader already past the batch, its optimizer step not done),
    and the resumed run then skips that batch. Here the signal only sets a flag; at the end of
    the step every rank learns whether any rank was signalled, and Lightning's handler (save
    ``hpc_ckpt_N.ckpt``, ``scontrol requeue``) runs there, where a checkpoint resumes exactly."""

    def __init__(self) -> None:
        self._signalled = False
        self._handler = None
        self._signum = None

    def on_train_start(self, trainer, pl_module) -> None:
        from lightning.fabric.plugins.environments import SLURMEnvironment

        env = getattr(trainer.strategy, "cluster_environment", None)
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None):
            return
        if threading.current_thread() is not threading.main_thread():
            return
        handler = signal.getsignal(env.requeue_signal)  # Lightning's: save hpc_ckpt_N + requeue
        if callable(handler):
            self._signum, self._handler = env.requeue_signal, handler
            signal.signal(self._signum, self._flag)

    def _flag(self, signum, frame) -> None:
        self._signalled = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._handler is None:
            return
        if trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            self._signalled = False
            self._handler(self._signum, None)


def _hpc_number(path: Path) -> int:
    try:
        return int(path.stem.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def _complete(path: Path) -> bool:
    """A torch checkpoint is a zip archive whose directory is written last: a truncated file
    (e.g. copied by another writer and killed mid-copy) has none."""
    import zipfile

    return zipfile.is_zipfile(path)


def resume_path(resume: str, out: Path) -> str | None:
    if resume == "never":
        return None
    if resume == "auto":
        # The newest complete checkpoint: a SLURM requeue checkpoint (hpc_ckpt_N.ckpt in
        # output_dir, written by a preempted run; an explicit ckpt_path makes Lightning skip its
        # own hpc lookup, and a periodic last.ckpt is usually older than the preemption), last.ckpt
        # or a periodic step*.ckpt (newer than last.ckpt when a kill hit last.ckpt's write).
        found = sorted((p for p in out.glob("hpc_ckpt_*.ckpt") if p.is_file()), key=_hpc_number)[-1:]
        found += [p for p in (out / "checkpoints").glob("*.ckpt") if p.is_file()]
        found = [p for p in found if _complete(p)]
        return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None
    if not Path(resume).is_file():
        raise FileNotFoundError(f"trainer.resume: checkpoint {resume} not found")
    return resume


def run(cfg: RunConfig, callbacks: list | None = None) -> dict:
    """Calibrate as configured; return the final summary (rank 0 writes it to ``summary.json``).
    ``callbacks``: extra Lightning callbacks (e.g. evaluation, or a test's interruption)."""
    from .validate import check_paths

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
        return _finish(cfg, out, student, teacher.eval(), stage1_report, steps=0, metrics={})
    t = cfg.trainer
    module = DPQCalibration(student, teacher, cfg.calib, seed=cfg.seed, max_steps=t.max_steps, run_config=to_yaml(cfg))
    dm = build_datamodule(cfg.data, teacher, cfg.seed)
    ckpt = ModelCheckpoint(dirpath=str(out / "checkpoints"), save_last=True, every_n_train_steps=t.ckpt_every_n_steps,
                           save_top_k=-1, filename="step{step:06d}", auto_insert_metric_name=False)
    from .callbacks import build_callbacks

    eval_callbacks = build_callbacks(cfg.eval, out_dir=str(out))
    strategy = t.strategy
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # Codes and input moments are kept identical on every rank by construction (see
        # InputMoments.flush); broadcasting buffers would be redundant, and gloo has no int16.
        strategy = DDPStrategy(broadcast_buffers=False)
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=t.precision, max_steps=t.max_steps, gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps, default_root_dir=str(out),
        callbacks=[RequeueAtStepEnd(), ckpt, *eval_callbacks, *(callbacks or [])],
        logger=make_logger(cfg.wandb, out, cfg.name), deterministic=t.deterministic,
        enable_progress_bar=t.progress_bar, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, datamodule=dm, ckpt_path=resume_path(t.resume, out))
    write_fingerprint(module.student, out / "fingerprints" / f"rank{trainer.global_rank}.json",
                      kmeans_ran=hasattr(student, "_kmeans_ran_here"))
    # A SIGUSR1 after fit would kill the job (Lightning restored the default handler).
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    summary: dict = {}
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        summary = _finish(cfg, out, module.export_student(), module.teacher, stage1_report, trainer.global_step, metrics)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # gloo can abort at exit otherwise
    return summary


def _finish(cfg: RunConfig, out: Path, student: torch.nn.Module, teacher: torch.nn.Module, stage1_report,
            steps: int, metrics: dict) -> dict:
    """Rank 0 at the end of a run: round to storage, write ``model.dpq``, evaluate the exported
    model once (``eval.final``), write ``summary.json`` and ``report.txt``."""
    from .quant import round_to_storage_

    round_to_storage_(student)
    path = save_packed(student, out / "model.dpq")
    report = report_of(student)
    summary = {"packed": str(path), "steps": steps, "stage1_only": cfg.stage1_only, "seed": cfg.seed,
               "size": report.summary(), "stage1_size": stage1_report.summary(), "final_metrics": metrics}
    if cfg.eval.enabled and cfg.eval.final:
        from .final_eval import final_evaluation

        summary["eval"] = final_evaluation(load_packed(path), teacher, cfg.eval)  # what the file holds
    write_json_atomic(summary, out / "summary.json")
    from .atomic import write_text_atomic

    write_text_atomic(report.table(), out / "report.txt")
    return summary
