"""Stage 1 as a job: quantize the full-precision model once, save the packed file and its report.

One job for every caller: :func:`stage1_once` is what ``train.py`` (through
:func:`dpq_lightning.jobs.run.run`, before calibration) and ``dpq quantize`` (:func:`run_stage1`) run.

Distributed runs: stage 1 is computed once. Rank 0 writes ``OUTPUT_DIR/stage1.dpq`` (atomically,
with a key of the quantization config and the teacher source); other ranks, and the processes
Lightning's DDP launcher re-executes, wait for that file and load it, so every rank starts from
identical codes and codebooks without running k-means itself.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic import write_json_atomic, write_text_atomic
from ..config import RunConfig, save_resolved
from ..distributed import is_first_process
from ..models import build_model
from ..export.packed import STAGE1_FILE, load_packed, save_packed
from ..quant import QuantConfig, SizeReport, quantize_, report_of
from ..quant.state import state_of


def teacher_moments(cfg: RunConfig, teacher: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Input moments ``H = E[x x^T]`` of every Linear/conv weight stage 1 quantizes, from the
    teacher on ``quant.data_aware_batches`` batches of the run's calibration data (real latents,
    digits, or the teacher's own samples for the zero-data path), each noised at
    ``quant.data_aware_timesteps`` timesteps with the calibration's label dropout."""
    from ..data.factory import build_datamodule
    from ..diffusion import noised_inputs, timestep_grid
    from ..models.hooks import InputMomentRecorder
    from ..quant.plan import make_plan

    q = cfg.quant
    modules = dict(teacher.named_modules())
    names = [layer.param_name for layer in make_plan(teacher, q).layers
             if not isinstance(modules[layer.module_name], torch.nn.Embedding)]
    dm = build_datamodule(cfg.data, teacher, cfg.seed)
    dm.prepare_data()
    dm.setup("fit")

    def batches():
        for i, batch in enumerate(dm.train_dataloader()):
            if i == q.data_aware_batches:
                return
            yield batch["x"].float(), batch["y"].long()

    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 65_537)
    null = teacher.null_class if cfg.calib.label_dropout > 0 else None
    dev = next(teacher.parameters()).device
    teacher.eval()
    t0 = time.time()
    with InputMomentRecorder(teacher, names) as rec, torch.no_grad():
        for x_t, t, y in noised_inputs(batches(), timestep_grid(q.data_aware_timesteps), cfg.calib.label_dropout,
                                       null, g):
            teacher(x_t.to(dev), t.to(dev), y.to(dev))
        moments = rec.moments()
    print(f"stage 1: input moments of {len(names)} layers from {q.data_aware_batches} batches x "
          f"{q.data_aware_timesteps} timesteps ({time.time() - t0:.1f} s)")
    return moments


def quantize_with_progress(model: torch.nn.Module, quant: QuantConfig, device: str | None = None,
                           moments: dict[str, torch.Tensor] | None = None) -> SizeReport:
    """``quantize_`` with a progress bar over layers (k-means is the long part)."""
    bars: list = []  # opened at the first layer, when the count is known (no empty bar before it)

    def progress(name: str, i: int, n: int) -> None:
        if not bars:
            bars.append(tqdm(total=n, desc="stage 1: k-means", unit="layer", dynamic_ncols=True))
        bars[0].n = i
        bars[0].set_postfix_str(name, refresh=True)

    try:
        report = quantize_(model, quant, device=device, progress=progress, moments=moments)
        if bars:
            bars[0].n = bars[0].total
            bars[0].refresh()
    finally:
        for bar in bars:
            bar.close()
    return report


def predict_size(cfg: RunConfig) -> SizeReport:
    """The size report of the file ``cfg`` writes, from shapes alone (a meta-device model: no
    weights, no k-means), a calibration's low-rank correction included. ``dpq plan`` prints it; the
    miniature's arithmetic table compares two of them."""
    from ..models.registry import build_named
    from ..quant import predict_report

    with torch.device("meta"):
        model = build_named(cfg.model.name, **cfg.model.arch)
    return predict_report(model, cfg.quant, 0 if cfg.stage1_only else cfg.calib.lowrank_rank)


def file_identity(path: Path, edge: int = 4 << 20) -> list:
    """A file's size and the sha256 of its first and last ``edge`` bytes (all of a small file):
    its content, not its time, so a fresh checkout of the same teacher keeps the key (a
    half-finished run in a new worktree resumes instead of starting over), at the cost of reading
    8 MiB of a multi-GB checkpoint."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read(edge))
        if size > edge:
            f.seek(max(edge, size - edge))
            h.update(f.read())
    return [size, h.hexdigest()[:16]]


def stage1_key(cfg: RunConfig) -> str:
    """What stage 1 depends on (quantization config, model, seed, the teacher file's identity),
    hashed: a ``stage1.dpq`` is reused only under the same key."""
    m = cfg.model
    src = {"quant": cfg.quant.stage1_dict(), "model": m.name, "arch": dict(m.arch), "seed": cfg.seed}
    if cfg.quant.data_aware:  # the input moments come from the calibration data
        from dataclasses import asdict

        src["data"] = asdict(cfg.data)
    for path in (m.checkpoint, m.pretrained):
        if path and Path(path).exists():
            src[str(path)] = file_identity(Path(path))
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
            moments = teacher_moments(cfg, teacher) if cfg.quant.data_aware else None
            report = quantize_with_progress(student, cfg.quant, moments=moments)
            save_packed(student, path)
            print(f"stage 1 written to {path}")
            write_text_atomic(key, key_file)
            write_json_atomic({"summary": report.summary(), **report.to_dict()}, out / "report_stage1.json", indent=2)
            print(report.table(per_param=False))
        else:
            t0 = time.time()
            while not ready():
                if time.time() - t0 > wait_s:
                    raise TimeoutError(f"{path} did not appear within {wait_s:.0f} s")
                time.sleep(2)
    loaded = load_packed(path)
    if is_first_process() and not was_ready:
        state_of(loaded).kmeans_ran_here = True  # recorded in the fingerprint: k-means ran in this process
    return loaded


def run_stage1(cfg: RunConfig) -> tuple[torch.nn.Module, SizeReport, Path]:
    """``dpq quantize``: the stage-1 job of :func:`dpq_lightning.jobs.run.run` alone (teacher, then
    :func:`stage1_once` into ``cfg.output_dir``: ``stage1.dpq``, ``stage1.key``,
    ``report_stage1.json``) plus the resolved ``config.yaml`` and ``report.txt``."""
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out / "config.yaml")
    m = cfg.model
    teacher = build_model(m.name, m.arch, m.checkpoint, m.pretrained, m.random_init)
    student = stage1_once(cfg, teacher, out)
    report = report_of(student)
    write_text_atomic(report.table(), out / "report.txt")
    return student, report, out / STAGE1_FILE
