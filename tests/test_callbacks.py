"""Evaluation callbacks in real (tiny) Lightning fits on CPU: the small trained DiT as teacher, its
1-bit quantized copy as student. One fit with a CSV logger and the callbacks built by hand; one
through ``dpq_lightning.jobs.run.run`` (the config's ``eval`` section) with real W&B in offline mode;
one 2-rank DDP run (gloo) of the sharded proxy metrics."""

import copy
import csv
import glob
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import BITS, SMALL_ARCH, SMALL_OVERRIDES
from PIL import Image

from dpq_lightning.calibration import CalibConfig
from dpq_lightning.callbacks import (BlockErrorTrajectoryCallback, CompressionReportCallback, ProxyMetricsCallback,
                                     SampleGridCallback, build_callbacks)
from dpq_lightning.calibration import DPQCalibration
from dpq_lightning.data import DigitsDataModule, balanced_labels
from dpq_lightning.evaluation.config import EvalConfig
from dpq_lightning.models.hooks import BlockOutputRecorder
from dpq_lightning.quant import QuantConfig, quantize_
from dpq_lightning.evaluation.trajectory import block_error_trajectory

ROOT = Path(__file__).parents[1]
DEPTH = SMALL_ARCH["depth"]
TRAJ_STEPS, TRAJ_N, SEED = 6, 8, 3
GRID_CLASSES, PER_CLASS, SCALE, PAD = [0, 1, 2, 7], 2, 4, 1


def student_of(teacher):
    student = copy.deepcopy(teacher)
    quantize_(student, QuantConfig(**BITS[1], overrides=SMALL_OVERRIDES, kmeans_backend="torch"))
    return student


@pytest.fixture(scope="module")
def csv_fit(trained_small_dit, tmp_path_factory):
    """4 calibration steps, evaluations at steps 0 (start), 2, 4 (and the teacher once)."""
    from lightning.pytorch.loggers import CSVLogger

    tmp = tmp_path_factory.mktemp("csvfit")
    teacher = copy.deepcopy(trained_small_dit)
    module = DPQCalibration(student_of(teacher), teacher, CalibConfig(lr=1e-3, assign_every=2))
    cbs = {
        "report": CompressionReportCallback(),
        "proxy": ProxyMetricsCallback(every_n_steps=2, num_samples=30, steps=4, seed=SEED),
        "grid": SampleGridCallback(every_n_steps=2, classes=GRID_CLASSES, per_class=PER_CLASS, steps=4, seed=SEED,
                                   scale=SCALE, pad=PAD),
        "traj": BlockErrorTrajectoryCallback(steps=TRAJ_STEPS, method="ddpm", seed=SEED, follow="both",
                                             num_samples=TRAJ_N),
    }
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=CSVLogger(str(tmp), name="csv"),
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp), callbacks=list(cbs.values()))
    student_modes = {n: m.training for n, m in module.student.named_modules()}
    trainer.fit(module, datamodule=DigitsDataModule(32, cache_dir=str(tmp / "cache"), seed=0))
    assert {n: m.training for n, m in module.student.named_modules()} == student_modes  # modes restored
    return trainer, module, cbs, tmp


def test_grid_pngs(csv_fit):
    trainer, _, cbs, tmp = csv_fit
    files = sorted((tmp / "samples").glob("grid_step*.png"))
    assert [f.name for f in files] == ["grid_step000000.png", "grid_step000002.png", "grid_step000004.png"]
    assert not list((tmp / "samples").glob(".*tmp"))  # atomic writes leave no temp files
    cell = 8 * SCALE
    rows, cols = 2 * PER_CLASS, len(GRID_CLASSES)  # teacher rows above student rows
    left, top = 6 * len("stage 1") + 8, 14  # the label margins (callbacks/grid.py: label_grid)
    with Image.open(files[-1]) as img:
        assert img.size == (left + cols * (cell + PAD) + PAD, top + rows * (cell + PAD) + PAD) and img.mode == "L"
        px = np.asarray(img)
    with Image.open(files[0]) as img0:
        px0 = np.asarray(img0)
    assert px0.shape == px.shape  # "stage 1" and "step 4" are as wide
    first_teacher = px[top + PAD:top + PAD + cell, left + PAD:left + PAD + cell]
    first_student = px[top + PAD + PER_CLASS * (cell + PAD):][:cell, left + PAD:left + PAD + cell]
    assert first_teacher.std() > 0 and first_student.std() > 0  # real samples, not blank cells
    # Same noise every time: the teacher rows never change between evaluations.
    teacher_block = slice(top, top + PER_CLASS * (cell + PAD))
    assert np.array_equal(px0[teacher_block, left:], px[teacher_block, left:])
    # labelled: dark text in the left margin beside every row and above every column; the row
    # labels of the student differ between step 0 ("stage 1") and step 4 ("step 4")
    for r in range(rows):
        band = px[top + PAD + r * (cell + PAD):top + PAD + r * (cell + PAD) + cell, :left]
        assert (band < 128).sum() > 10, r
    for c in range(cols):
        assert (px[:top, left + PAD + c * (cell + PAD):left + (c + 1) * (cell + PAD)] < 128).sum() > 5, c
    student_labels = slice(top + PER_CLASS * (cell + PAD), None)
    assert np.array_equal(px0[teacher_block, :left], px[teacher_block, :left])
    assert not np.array_equal(px0[student_labels, :left], px[student_labels, :left])


def test_trajectory_files_and_values(csv_fit):
    trainer, module, cbs, tmp = csv_fit
    res = cbs["traj"].results
    assert [r["step"] for r in res] == [0, 4]
    for r in res:
        for follow in ("teacher", "student"):
            arr = np.load(tmp / "trajectory" / f"block_error_step{r['step']:06d}_{follow}.npy")
            assert arr.shape == (TRAJ_STEPS, DEPTH)
            assert np.isfinite(arr).all() and (arr > 0).all()
            np.testing.assert_array_equal(arr, r["errors"][follow])
        meta = json.loads((tmp / "trajectory" / f"block_error_step{r['step']:06d}.json").read_text())
        assert meta["timesteps"][0] == 999 and len(meta["timesteps"]) == TRAJ_STEPS
        assert np.asarray(meta["errors"]["student"]).shape == (TRAJ_STEPS, DEPTH)
        with Image.open(r["png"]) as img:
            assert img.size == (600, 400)  # figsize 6 x 4 in at 100 dpi
    # Calibration lowers the per-block error along the trajectory.
    assert res[-1]["errors"]["teacher"].mean() < res[0]["errors"]["teacher"].mean()

    # Step 0: both follow the same x_T, and the error is the rec error computed directly.
    final = res[-1]["errors"]
    np.testing.assert_array_equal(final["teacher"][0], final["student"][0])
    teacher, student = module.teacher, module.student.eval()
    labels = balanced_labels(TRAJ_N, 10, seed=SEED)
    x_T = torch.randn((TRAJ_N, 1, 8, 8), generator=torch.Generator().manual_seed(SEED))
    t = torch.full((TRAJ_N,), 999)
    with BlockOutputRecorder(teacher) as rt, BlockOutputRecorder(student) as rs, torch.no_grad():
        teacher(x_T, t, labels)
        student(x_T, t, labels)
        direct = [float((s - h).pow(2).sum() / h.pow(2).sum()) for s, h in zip(rs.outputs, rt.outputs)]
    module.student.train()
    np.testing.assert_allclose(final["teacher"][0], direct, rtol=1e-5)
    # ... and its mean is the calibration loss's rec term on those inputs.
    assert math.isclose(float(np.mean(final["teacher"][0])), float(np.mean(direct)), rel_tol=1e-5)


def test_metrics_logged(csv_fit):
    trainer, _, cbs, tmp = csv_fit
    keys = ["val/fid_proxy", "val/is_proxy", "val/kid_proxy", "val/agreement", "val/fid_proxy_gap",
            "val/fid_to_teacher", "val/mse_to_teacher", "val/match_teacher",
            "val/teacher_fid_proxy", "val/teacher_is_proxy", "val/teacher_kid_proxy", "val/teacher_agreement",
            "size/ratio", "size/blocks_ratio", "size/effective_bits", "size/nominal_bits",
            "traj/mean_error_teacher", "traj/last_error_student"]
    for k in keys:
        assert k in trainer.callback_metrics and math.isfinite(float(trainer.callback_metrics[k])), k
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {k: [(int(r["step"]), float(r[k])) for r in rows if r.get(k)] for k in keys + ["train/loss_total"]}
    assert [s for s, _ in logged["val/fid_proxy"]] == [0, 2, 4]
    assert [s for s, _ in logged["val/teacher_fid_proxy"]] == [0]
    assert [s for s, _ in logged["val/fid_to_teacher"]] == [0, 2, 4]  # paired with the teacher's step-0 samples
    assert all(0 <= v <= 1 for _, v in logged["val/match_teacher"]) and all(v > 0 for _, v in logged["val/mse_to_teacher"])
    assert [s for s, _ in logged["size/ratio"]] == [0, 4]  # fit start and end
    assert all(math.isfinite(v) for vals in logged.values() for _, v in vals)
    assert all(0 <= v <= 1 for _, v in logged["val/agreement"]) and logged["train/loss_total"]
    assert 1 < float(trainer.callback_metrics["size/ratio"]) < 32
    # The size report files, per-parameter rows included.
    for tag in ("start", "end"):
        data = json.loads((tmp / "size" / f"report_{tag}.json").read_text())
        with open(tmp / "size" / f"report_{tag}.csv") as f:
            table = list(csv.DictReader(f))
        assert len(table) == len(data["rows"]) > 10 and {"name", "kind", "effective_bits"} <= set(table[0])
    # Proxy history: one entry per evaluation on rank 0, the teacher's measured once.
    assert [s for s, _ in cbs["proxy"].history] == [0, 2, 4] and "fid_proxy" in cbs["proxy"].teacher_metrics


def test_block_error_trajectory_function(trained_small_dit):
    teacher = copy.deepcopy(trained_small_dit).eval()
    labels = torch.arange(4)
    same = block_error_trajectory(teacher, copy.deepcopy(teacher), labels, (1, 8, 8), steps=3, seed=1)
    assert same.shape == (3, DEPTH) and torch.equal(same, torch.zeros_like(same))  # identical models: 0
    student = student_of(teacher).eval()
    a = block_error_trajectory(teacher, student, labels, (1, 8, 8), steps=5, method="ddim", seed=1, follow="teacher")
    b = block_error_trajectory(teacher, student, labels, (1, 8, 8), steps=5, method="ddim", seed=1, follow="student")
    assert a.shape == b.shape == (5, DEPTH) and torch.equal(a[0], b[0]) and not torch.equal(a[1:], b[1:])
    with pytest.raises(ValueError, match="follow"):
        block_error_trajectory(teacher, student, labels, (1, 8, 8), steps=2, follow="both")


# The eval section on tiny settings (small_run.yaml turns evaluation on with full-size settings).
TINY_EVAL = ["eval.enabled=true", "eval.every_n_steps=2", "eval.num_samples=41", "eval.sampling_steps=4",
             "eval.grid_per_class=1", "eval.trajectory_steps=3"]


@pytest.fixture(scope="module")
def teacher_ckpt(trained_small_dit, tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(trained_small_dit.state_dict(), path)
    return path


def test_run_with_wandb_offline(teacher_ckpt, tmp_path):
    """The main job with the ``eval`` section on and W&B offline: scalars, the size table, the grid and
    the trajectory images end up in the offline run. wandb 0.31 writes no ``wandb-summary.json``
    offline (only the synced run gets one): history and summary are read from the run's own
    transaction log, the media from its ``files/`` directory."""
    import wandb

    from dpq_lightning.config import load_config
    from dpq_lightning.jobs.run import run

    out = tmp_path / "wb"
    overrides = [
        f"output_dir={out}", f"model.checkpoint={teacher_ckpt}", "model.random_init=false", "model.name=DiT-T/2",
        *[f"model.arch.{k}={v}" for k, v in SMALL_ARCH.items()], "data.kind=digits",
        f"data.cache_dir={tmp_path / 'cache'}", "data.global_batch_size=32", "trainer.accelerator=cpu",
        "trainer.progress_bar=false", "trainer.max_steps=2", "trainer.ckpt_every_n_steps=2",
        "trainer.log_every_n_steps=1",
        "wandb.enabled=true", "wandb.mode=offline", "name=cbtest",
        *TINY_EVAL, "eval.trajectory_follow=teacher", "eval.final=true",
    ]
    cfg = load_config(ROOT / "tests" / "configs" / "small_run.yaml", overrides)
    try:
        summary = run(cfg)  # run() adds build_callbacks(cfg.eval)
    finally:
        wandb.finish()  # Lightning leaves the run open; finishing flushes its files
    assert math.isfinite(summary["final_metrics"]["val/fid_proxy"])  # also in trainer.callback_metrics
    # the run's final evaluation (evaluation/final.py, what the grid reports) measures the teacher exactly
    # as the callback did at train start: same labels, noise seed and sampling loop
    ev = summary["eval"]
    assert ev["teacher"]["fid_proxy"] == summary["final_metrics"]["val/teacher_fid_proxy"]
    assert ev["teacher"]["agreement"] == summary["final_metrics"]["val/teacher_agreement"]
    assert ev["protocol"]["num_samples"] == 41 and len(ev["trajectory"]["teacher"]) == 3
    assert math.isfinite(ev["student"]["fid_proxy"])
    runs = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    run_dir = Path(runs[0])
    history, summ = _wandb_history_and_summary(next(run_dir.glob("run-*.wandb")))
    for k in ("val/fid_proxy", "val/is_proxy", "val/kid_proxy", "val/agreement", "val/teacher_fid_proxy",
              "val/fid_to_teacher", "val/mse_to_teacher", "val/match_teacher",
              "size/ratio", "size/effective_bits", "traj/mean_error_teacher", "train/loss_total"):
        assert isinstance(summ[k], (int, float)) and math.isfinite(summ[k]), k
    steps = [h["trainer/global_step"] for h in history if "val/fid_proxy" in h]
    assert steps == [0, 2]  # train start and step 2 (= the end: not evaluated twice)
    assert summ["size/params_end"]["_type"] == "table-file" and summ["size/params_end"]["nrows"] > 10
    assert summ["samples/grid"]["_type"] == summ["trajectory/block_error"]["_type"] == "images/separated"
    files = run_dir / "files"
    table = json.loads((files / summ["size/params_end"]["path"]).read_text())
    assert table["columns"][:2] == ["name", "kind"] and len(table["data"]) == summ["size/params_end"]["nrows"]
    for key in ("samples/grid", "trajectory/block_error"):
        pngs = sorted((files / "media" / "images" / key).parent.glob(Path(key).name + "_*.png"))
        assert len(pngs) == 2, key  # train start and end
        with Image.open(pngs[0]) as img:
            assert img.size == (summ[key]["width"], summ[key]["height"])
    assert (out / "samples" / "grid_step000002.png").is_file() and (out / "size" / "report_end.json").is_file()


def _wandb_records(path):
    """The protobuf records of an offline run's ``run-*.wandb`` transaction log (W&B's LevelDB-log
    format: a 7-byte ``:W&B`` header, 32 KiB blocks, chunks of crc32/length/type + payload)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record still being written
            return
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def _wandb_history_and_summary(path, wait_s=60.0):
    """``(history rows, summary)`` of an offline run, nested keys joined with ``/``. ``wandb.finish``
    can return before wandb-core has written the last records: wait for the run's exit record."""
    import time

    t0 = time.time()
    while True:
        records = list(_wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() - t0 > wait_s:
            break
        time.sleep(0.5)
    history, summary = [], {}

    def key(item):
        return item.key or "/".join(item.nested_key)

    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            for i in r.summary.update:
                summary[key(i)] = json.loads(i.value_json)
    nested = {}  # "size/params_end/_type" -> summary["size/params_end"]["_type"]
    for k, v in summary.items():
        for prefix in ("size/params_start", "size/params_end", "samples/grid", "trajectory/block_error"):
            if k.startswith(prefix + "/"):
                nested.setdefault(prefix, {})[k[len(prefix) + 1:]] = v
    return history, {**summary, **nested}


DDP_SCRIPT = """
import json, os, sys
import lightning as L
import torch
torch.set_num_threads(1)
from dpq_lightning.config import load_config
from dpq_lightning.jobs.run import run

class Dump(L.Callback):  # after the evaluation callbacks: what each rank ends with
    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if type(c).__name__ == "ProxyMetricsCallback")
        out = {"metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
               "history": [s for s, _ in cb.history]}
        with open(os.path.join(sys.argv[1], f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(out, f)

run(load_config(sys.argv[2], sys.argv[3:]), callbacks=[Dump()])  # eval callbacks: from the config
"""


@pytest.mark.slow
def test_ddp_two_ranks_shard_and_agree(teacher_ckpt, tmp_path):
    """devices=2 on CPU (gloo): each rank samples its share (41 samples: 21 + 21, one padding
    sample dropped), rank 0 computes, every rank ends with the same ``val/*`` values; the rank-0-only
    grid and trajectory callbacks leave no rank waiting."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "ddp_eval.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    args = [f"output_dir={out}", f"model.checkpoint={teacher_ckpt}", "model.random_init=false", "model.name=DiT-T/2",
            *[f"model.arch.{k}={v}" for k, v in SMALL_ARCH.items()], "data.kind=digits",
            f"data.cache_dir={tmp_path / 'cache'}", "data.global_batch_size=32", "trainer.accelerator=cpu",
            "trainer.progress_bar=false", "trainer.max_steps=2", "trainer.devices=2", "trainer.strategy=ddp",
            *TINY_EVAL]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("SLURM_NTASKS", None)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(ROOT / "tests" / "configs" / "small_run.yaml"),
                             *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group: both ranks can be stopped
    try:
        _, stderr = proc.communicate(timeout=150)  # about 20 s when it works
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("DDP evaluation hung: a collective was reached by one rank only (e.g. torchmetrics "
                    "syncing inside a rank-0-only metric computation: sync_on_compute must be False)")
    assert proc.returncode == 0, stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["metrics"] == r1["metrics"] and math.isfinite(r0["metrics"]["val/fid_proxy"])
    assert {"val/fid_proxy", "val/teacher_fid_proxy", "val/agreement", "val/fid_to_teacher"} <= set(r0["metrics"])
    assert r0["history"] == [0, 2] and r1["history"] == []  # computed on rank 0 only
    assert len(list((out / "samples").glob("*.png"))) == 2 and len(list((out / "trajectory").glob("*.png"))) == 2


def test_build_callbacks_respects_the_config():
    assert build_callbacks(EvalConfig()) == []  # disabled by default
    kinds = [type(c).__name__ for c in build_callbacks(EvalConfig(enabled=True, num_samples=0, trajectory_steps=0))]
    assert kinds == ["CompressionReportCallback", "SampleGridCallback"]
    with pytest.raises(ValueError, match="trajectory_follow"):
        EvalConfig(trajectory_follow="nobody")


def test_lightning_tips_are_dropped(tmp_path, caplog):
    import logging

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from dpq_lightning.callbacks.loggers import quiet_lightning

    quiet_lightning()
    with caplog.at_level(logging.INFO):
        L.Trainer(accelerator="cpu", logger=CSVLogger(str(tmp_path)), enable_progress_bar=False,
                  default_root_dir=str(tmp_path))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "GPU available" in text  # Lightning's own lines still reach the user
    assert "litlogger" not in text
    import warnings

    seen = ("Your `IterableDataset` has `__len__` defined. In combination with multi-process data loading",
            "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`",
            "The `srun` command is available on your system but is not used. HINT: ...")
    with warnings.catch_warnings(record=True) as got:
        quiet_lightning()  # inside: catch_warnings restores the filters afterwards
        for message in seen:
            warnings.warn(message, UserWarning)
        warnings.warn("a warning of the user's own", UserWarning)
    assert [str(w.message) for w in got] == ["a warning of the user's own"]


class _Tiny(__import__("lightning").LightningModule):
    """A one-parameter model: three batches an epoch, so a 7-step fit spans three epochs."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(3, 1)), batch_size=1)


def _bars(text: str) -> list[str]:
    import re

    return re.findall(r"calibration:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", text)


def test_one_progress_bar_over_the_steps_with_the_runs_total(tmp_path, capfd):
    """Lightning's bar restarts every epoch ("Epoch 0 ... 3/3", "Epoch 1 ..."); ours counts the
    optimizer steps to max_steps across epochs, and a resumed fit starts at its step."""
    import lightning as L

    from dpq_lightning.callbacks.progress import StepProgressBar

    def fit(steps, ckpt=None):
        trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_model_summary=False,
                            callbacks=[StepProgressBar()], default_root_dir=str(tmp_path), enable_checkpointing=False)
        trainer.fit(_Tiny(), ckpt_path=ckpt)
        return trainer

    trainer = fit(7)
    err = capfd.readouterr().out  # Lightning's bars write to stdout
    assert "Epoch 1" not in err and "Epoch 2" not in err and trainer.current_epoch >= 2  # three epochs ran
    counts = _bars(err)
    assert counts and counts[-1] == ("7", "7") and {total for _, total in counts} == {"7"}
    trainer.save_checkpoint(tmp_path / "s7.ckpt")
    fit(10, str(tmp_path / "s7.ckpt"))
    counts = _bars(capfd.readouterr().out)
    assert counts[0][0] in ("7", "8") and counts[-1] == ("10", "10")  # from its step, not from 0
