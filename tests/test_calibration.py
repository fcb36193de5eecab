"""Stage 2: calibration as Lightning training against the frozen teacher."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import BITS, SMALL_ARCH, SMALL_OVERRIDES

from dpq_lightning.calibration import CalibConfig
from dpq_lightning.calibration import DPQCalibration, rule_class
from dpq_lightning.config import load_config
from dpq_lightning.data import DigitsDataModule
from dpq_lightning.data.digits import load_digits_tensors
from dpq_lightning.quant import QuantConfig, quantize_
from dpq_lightning.quant.state import state_of

ROOT = Path(__file__).parents[1]


def student_of(teacher, bits=1):
    student = copy.deepcopy(teacher)
    quantize_(student, QuantConfig(**BITS[bits], overrides=SMALL_OVERRIDES, kmeans_backend="torch"))
    return student


def fit(module, steps, cache_dir, batch=64):
    dm = DigitsDataModule(batch, cache_dir=str(cache_dir), seed=0)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    return trainer


@pytest.mark.slow
def test_trainable_set_is_exactly_the_codebooks(trained_small_dit):
    teacher = copy.deepcopy(trained_small_dit)  # DPQCalibration freezes the teacher it is given
    student = student_of(teacher)
    m = DPQCalibration(student, teacher, CalibConfig())
    names = m.trainable_names()
    assert len(names) == 16 and all(n.endswith(".weight_pq.codebooks") for n in names)
    with_floats = DPQCalibration(student, teacher, CalibConfig(train_floats=True)).trainable_names()
    floats = set(state_of(student).float_names)
    assert set(with_floats) == set(names) | floats and len(floats) > 0
    opt = DPQCalibration(student, teacher, CalibConfig()).configure_optimizers()["optimizer"]
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for n, p in student.named_parameters() if n in names)


@pytest.mark.parametrize("w_rec,w_out", [(0.0, 0.0), (1.0, 0.0), (0.0, 0.5)])
def test_teacher_runs_only_when_the_loss_or_the_log_reads_it(trained_small_dit, w_rec, w_out):
    """A DDPM-only loss skips the teacher's forward on the steps that log nothing, and its step is
    bit-identical to one that ran the teacher: the same loss, the same gradients, one by one."""
    teacher = copy.deepcopy(trained_small_dit)
    m = DPQCalibration(student_of(teacher), teacher, CalibConfig(w_rec=w_rec, w_out=w_out, train_floats=True))
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    x, y = load_digits_tensors()

    def step(diagnostics):
        m.student.zero_grad(set_to_none=True)
        losses = m.compute_losses(x[:32], y[:32], diagnostics=diagnostics)
        losses["loss"].backward()
        return losses, {n: p.grad.clone() for n, p in m.student.named_parameters() if p.grad is not None}

    (with_t, g_with), (without, g_without) = step(True), step(False)
    assert len(calls) == (1 if w_rec == w_out == 0 else 2)
    assert {"loss_rec", "loss_out"} <= set(with_t)
    assert ({"loss_rec", "loss_out"} <= set(without)) == (w_rec != 0 or w_out != 0)
    assert torch.equal(with_t["loss"], without["loss"]) and len(g_with) == len(g_without) > 16
    assert all(torch.equal(g_with[n], g_without[n]) for n in g_with)
    # which steps log: Lightning's log_every_n_steps rule, and the last step
    for step_no, logs in ((0, False), (9, True), (10, False), (19, True), (24, True)):
        m._trainer = SimpleNamespace(global_step=step_no, log_every_n_steps=10, max_steps=25)
        assert m._logs_this_step() is logs, step_no
    m._trainer = None


@pytest.mark.slow
def test_teacher_and_student_see_the_same_inputs(trained_small_dit):
    teacher = copy.deepcopy(trained_small_dit)
    m = DPQCalibration(student_of(teacher), teacher, CalibConfig(label_dropout=0.5))
    seen = {}
    teacher.register_forward_pre_hook(lambda mod, args: seen.__setitem__("t", [a.clone() for a in args]))
    m.student.register_forward_pre_hook(lambda mod, args: seen.__setitem__("s", [a.clone() for a in args]))
    x, y = load_digits_tensors()
    m.compute_losses(x[:32], y[:32])
    for a, b in zip(seen["t"], seen["s"]):
        assert torch.equal(a, b)
    labels = seen["s"][2]
    assert int((labels == 10).sum()) > 0 and int((labels < 10).sum()) > 0  # the same dropped labels
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith("teacher") for k in m.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["output_aware", "frozen"])
def test_calibration_lowers_rec_and_ddpm_loss(trained_small_dit, tmp_path, rule):
    """1-bit student: measured before/after 60 steps (lr 1e-3): rec 0.61 -> 0.02-0.05, eps-MSE
    0.48 -> 0.12-0.13."""
    teacher = copy.deepcopy(trained_small_dit)
    m = DPQCalibration(student_of(teacher), teacher, CalibConfig(lr=1e-3, assignment=rule, assign_every=10))
    x, y = load_digits_tensors()
    with torch.no_grad():
        before = {k: float(v) for k, v in m.compute_losses(x[:512], y[:512]).items()}
    fit(m, 60, tmp_path)
    m.export_student()
    with torch.no_grad():
        after = {k: float(v) for k, v in m.compute_losses(x[:512], y[:512]).items()}
    assert after["loss_rec"] < 0.2 * before["loss_rec"]
    assert after["loss_ddpm"] < 0.5 * before["loss_ddpm"]
    assert not teacher.training


def test_assignment_rules_change_codes(trained_small_dit):
    teacher = copy.deepcopy(trained_small_dit)
    student = student_of(teacher)
    m = DPQCalibration(student, teacher, CalibConfig(assignment="nearest"))
    changed, total = m.adjust_assignments()
    assert total == sum(mod.weight_pq.codes.numel() for mod in m.pq_layers.values())
    assert changed == 0  # right after k-means the codes already are the nearest codewords
    m.cfg.assignment = "output_aware"
    m.rule = rule_class("output_aware")(m.cfg)  # the registry's rule for the new name
    x, y = load_digits_tensors()
    m.train()
    m.compute_losses(x[:256], y[:256])  # collects input moments
    m.moments.flush()
    before = {n: mod.weight_pq.codes.clone() for n, mod in m.pq_layers.items()}
    changed, _ = m.adjust_assignments()
    assert changed > 0  # input-weighted error prefers other codewords for some sub-vectors
    full = {n: (mod.weight_pq.codes != before[n]).sum().item() for n, mod in m.pq_layers.items()}
    # limited: the same adjustment from the same start changes at most 1% of each layer's codes,
    # and only codes the full rule changed too
    for n, mod in m.pq_layers.items():
        mod.weight_pq.codes.copy_(before[n])
    m.cfg.assign_fraction = 0.01
    changed_lim, _ = m.adjust_assignments()
    assert 0 < changed_lim < changed
    for n, mod in m.pq_layers.items():
        moved = (mod.weight_pq.codes != before[n]).sum().item()
        assert moved <= round(0.01 * before[n].numel()) and moved <= full[n], n


def _run_cfg(tmp_path, teacher_path, name, *extra):
    return [
        f"output_dir={tmp_path / name}", f"model.checkpoint={teacher_path}", "model.random_init=false",
        "model.name=DiT-T/2", *[f"model.arch.{k}={v}" for k, v in SMALL_ARCH.items()],
        "data.kind=digits", f"data.cache_dir={tmp_path / 'cache'}", "data.global_batch_size=64",
        "trainer.accelerator=cpu", "trainer.progress_bar=false", "calib.assign_every=4", "calib.lr=0.001",
        "eval.enabled=false",
        *extra,
    ]


@pytest.fixture
def teacher_file(trained_small_dit, tmp_path):
    path = tmp_path / "teacher.pt"
    torch.save(trained_small_dit.state_dict(), path)
    return path


def _final_state(out):
    from dpq_lightning.export.packed import load_packed

    return load_packed(Path(out) / "model.dpq").state_dict()


class StopAt(L.Callback):
    """An interruption: end fit() after ``step`` steps, as a preempted job would."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class StepCounter(L.Callback):
    """Where a fit starts and how many optimizer steps it executes: a run that ignored its
    checkpoint would start at 0 and execute all of them (and, every draw being keyed by
    (seed, step), still end in the same state: only these numbers tell the two apart)."""

    def __init__(self):
        self.start, self.executed = None, 0

    def on_train_start(self, trainer, *args):
        self.start = trainer.global_step

    def on_train_batch_end(self, trainer, *args):
        self.executed += 1


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["calib.ema_decay=0.8"]], ids=["last_step", "ema"])
def test_resume_gives_the_same_final_state(teacher_file, tmp_path, extra):
    """Stop after 6 of 12 steps, resume from the step-6 checkpoint: the resumed fit starts at step
    6 and executes 6 steps, and ends with the same codes and codebooks as an uninterrupted run,
    bit for bit (assignment adjustments at steps 3, 6, 9; cosine LR). With calib.ema_decay the
    checkpoint carries the average, so the exported average is the same too."""
    from dpq_lightning.jobs.run import run

    args = ["trainer.max_steps=12", "calib.assign_every=3", "trainer.ckpt_every_n_steps=6", *extra]
    run(load_config("tests/configs/small_run.yaml", _run_cfg(tmp_path, teacher_file, "full", *args)))
    part = load_config("tests/configs/small_run.yaml", _run_cfg(tmp_path, teacher_file, "part", *args))
    run(part, callbacks=[StopAt(6)])
    ckpt = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6 and "dpq_config" in ckpt
    assert not any(k.startswith("teacher") for k in ckpt["state_dict"])
    assert any(k.startswith("ema.avg_") for k in ckpt["state_dict"]) == bool(extra)
    counter = StepCounter()
    summary = run(part, callbacks=[counter])  # trainer.resume=auto picks up last.ckpt
    assert (counter.start, counter.executed, summary["steps"]) == (6, 6, 12)
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    fa = json.loads((tmp_path / "full" / "fingerprints" / "rank0.json").read_text())
    fb = json.loads((tmp_path / "part" / "fingerprints" / "rank0.json").read_text())
    assert fa["sha256"] == fb["sha256"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(teacher_file, tmp_path):
    from dpq_lightning.calibration import NonFiniteLossError
    from dpq_lightning.jobs.run import run

    cfg = load_config("tests/configs/small_run.yaml", _run_cfg(tmp_path, teacher_file, "nan", "trainer.max_steps=8",
                                                          "trainer.ckpt_every_n_steps=4"))
    run(cfg, callbacks=[StopAt(4)])
    last = tmp_path / "nan" / "checkpoints" / "last.ckpt"
    good = last.read_bytes()
    cfg.calib.w_rec = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 4 \(loss=nan.*last good checkpoint is kept"):
        run(cfg)
    assert last.read_bytes() == good
    assert torch.load(last, weights_only=False)["global_step"] == 4


@pytest.mark.slow
def test_ddp_two_cpu_ranks_hold_identical_state(teacher_file, tmp_path):
    """devices=2 on CPU (gloo): k-means runs once (rank 0), both ranks end bit-identical."""
    out = tmp_path / "ddp"
    args = _run_cfg(tmp_path, teacher_file, "ddp", "trainer.max_steps=8", "trainer.devices=2",
                    "trainer.strategy=ddp", "trainer.ckpt_every_n_steps=8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("SLURM_NTASKS", None)
    proc = subprocess.run([sys.executable, "train.py", "--config", "tests/configs/small_run.yaml", *args],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    f0 = json.loads((out / "fingerprints" / "rank0.json").read_text())
    f1 = json.loads((out / "fingerprints" / "rank1.json").read_text())
    assert f0["sha256"] == f1["sha256"] and f0["pid"] != f1["pid"]
    assert f0["kmeans_ran"] is True and f1["kmeans_ran"] is False
    assert (proc.stdout + proc.stderr).count("stage 1 written to") == 1


def test_missing_teacher_weights_say_what_to_download(tmp_path):
    from dpq_lightning.jobs.run import run

    cfg = load_config("configs/dpq_1bit.yaml", [f"output_dir={tmp_path}", f"model.checkpoint={tmp_path}/DiT-XL-2-256x256.pt"])
    with pytest.raises(FileNotFoundError, match=r"DiT-XL-2-256x256\.pt.*model\.checkpoint"):
        run(cfg)


def test_missing_data_dir_is_named(teacher_file, tmp_path):
    from dpq_lightning.data import DataError
    from dpq_lightning.jobs.run import run

    cfg = load_config("tests/configs/small_run.yaml", _run_cfg(tmp_path, teacher_file, "nodata", "data.kind=latents",
                                                          f"data.path={tmp_path / 'absent'}"))
    with pytest.raises(DataError, match=r"absent"):
        run(cfg)


def test_bf16_mixed_calibration_on_cpu(teacher_file, tmp_path):
    """configs/dpq_1bit.yaml calibrates in bf16-mixed: on CPU that is autocast. Losses stay finite,
    the export works, and the packed file holds exactly the fp32 master codebooks and floats of the
    last checkpoint, rounded to their fp16 storage, with the same codes."""
    from dpq_lightning.export.packed import load_packed
    from dpq_lightning.jobs.run import run

    cfg = load_config("tests/configs/small_run.yaml", _run_cfg(tmp_path, teacher_file, "bf16", "trainer.max_steps=6",
                                                          "trainer.ckpt_every_n_steps=6", "trainer.precision=bf16-mixed",
                                                          "trainer.log_every_n_steps=1"))
    summary = run(cfg)
    assert summary["steps"] == 6
    losses = [v for k, v in summary["final_metrics"].items() if k.startswith("train/")]
    assert losses and all(math.isfinite(v) for v in losses)
    ckpt = torch.load(tmp_path / "bf16" / "checkpoints" / "last.ckpt", weights_only=False)
    master = {k[len("student."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
    packed = load_packed(tmp_path / "bf16" / "model.dpq").state_dict()
    assert set(packed) <= set(master)
    compared = 0
    for k, v in packed.items():
        m = master[k]
        assert m.dtype == v.dtype, k  # master weights stay fp32 (codes int) under bf16-mixed
        stored = m.is_floating_point() and k != "pos_embed"  # the fixed sin-cos table is rebuilt, not stored
        want = m.half().to(m.dtype) if stored else m
        assert torch.equal(v, want), k
        compared += 1
    assert compared == len(packed) > 10


_KILL_SCRIPT = """
import json, os, signal, sys
import torch
torch.set_num_threads(1)
import lightning as L
from dpq_lightning.config import load_config
from dpq_lightning.jobs.run import run
import dpq_lightning.checkpoint_io as cio

config, kill_at, record, *overrides = sys.argv[1:]
kill_at = int(kill_at)
calls = []
real = cio.write_bytes_atomic

def dying(data, path):
    calls.append(str(path))
    if len(calls) == kill_at:  # half of this checkpoint reaches its temp file, then SIGKILL
        tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real(data, path)

cio.write_bytes_atomic = dying

class Start(L.Callback):
    def on_train_start(self, trainer, *a):
        json.dump({"start": trainer.global_step}, open(record, "w"))

run(load_config(config, overrides), callbacks=[Start()])
"""


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_then_resume_finishes_identically(teacher_file, tmp_path):
    """SIGKILL while last.ckpt of step 12 is being written (the 4th checkpoint write: step 6, last,
    step 12, last): trainer.resume=auto then starts from the newest complete checkpoint (step 12),
    and the run ends in the same state as one never interrupted."""
    script = tmp_path / "kill.py"
    script.write_text(_KILL_SCRIPT)
    args = ["trainer.max_steps=18", "calib.assign_every=3", "trainer.ckpt_every_n_steps=6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # all three runs alike: 1 thread, so bit-exact

    def launch(name, kill_at, record):
        cfg = _run_cfg(tmp_path, teacher_file, name, *args)
        return subprocess.run([sys.executable, str(script), "tests/configs/small_run.yaml", str(kill_at), str(record), *cfg],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    full = launch("full", 0, tmp_path / "full.json")
    assert full.returncode == 0, full.stderr[-2000:]
    killed = launch("part", 4, tmp_path / "first.json")
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckdir = tmp_path / "part" / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == [".last.ckpt.tmp", "last.ckpt", "step000006.ckpt",
                                                       "step000012.ckpt"]
    assert torch.load(ckdir / "last.ckpt", weights_only=False)["global_step"] == 6  # the old one, intact
    resumed = launch("part", 0, tmp_path / "second.json")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "second.json").read_text())["start"] == 12
    assert not (ckdir / ".last.ckpt.tmp").exists()  # the next write of last.ckpt replaced it
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("hold", [0.0, 0.99])
def test_soft_hold_keeps_the_codebooks_still_until_the_choices_settle(trained_small_dit, tmp_path, hold):
    """VQ4DiT's procedure: with soft_hold the codewords do not move while fewer than 99% of the
    sub-vectors are locked (8 steps are far too few to lock them), the ratios do (own lr);
    without it both move. The sharpening term joins the loss in the second half only."""
    teacher = copy.deepcopy(trained_small_dit)
    cfg = CalibConfig(lr=1e-3, assignment="soft", soft_candidates=3, soft_threshold=0.99, soft_lr=5e-2,
                      soft_hold=hold, soft_sharpen=0.05, assign_every=4)
    m = DPQCalibration(student_of(teacher), teacher, cfg, max_steps=8)
    m.setup("fit")
    books = {n: mod.weight_pq.effective_codebooks().detach().clone() for n, mod in m.pq_layers.items()}
    logits = {n: m.rule.codes_of(n).logits.detach().clone() for n in m.pq_layers}
    opt = m.configure_optimizers()["optimizer"]
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 5e-2]  # codebooks/pool, then the ratios
    x, y = load_digits_tensors()
    seen = []
    for step in range(8):
        m._trainer = SimpleNamespace(global_step=step, global_rank=0, world_size=1)  # what compute_losses reads
        losses = m.compute_losses(x[:64], y[:64])
        seen.append("loss_sharpen" in losses)
        opt.zero_grad()
        losses["loss"].backward()
        m.on_after_backward()
        opt.step()
    m._trainer = None
    assert seen == [False] * 4 + [True] * 4
    assert m.rule.frozen_fraction(m) < 0.99
    moved_books = max(float((mod.weight_pq.effective_codebooks() - books[n]).abs().max()) for n, mod in m.pq_layers.items())
    moved_logits = max(float((m.rule.codes_of(n).logits - logits[n]).abs().max()) for n in m.pq_layers)
    assert moved_logits > 0.05
    if hold:
        assert moved_books == 0.0
    else:
        assert moved_books > 1e-4


def test_error_weighted_timesteps_follow_the_measured_block_error(trained_small_dit):
    teacher = copy.deepcopy(trained_small_dit)
    m = DPQCalibration(student_of(teacher), teacher, CalibConfig(assignment="frozen", t_sampling="error", t_buckets=10))
    x, y = load_digits_tensors()
    assert not m.t_weights.any()  # measured at the first draw, not before
    t, _, _ = m._draw(x[:64], y[:64])
    w = m.t_weights
    assert w.shape == (1000,) and abs(float(w.sum()) - 1) < 1e-9 and bool((w > 0).all())
    buckets = w.reshape(10, 100)
    assert torch.equal(buckets, buckets[:, :1].expand(10, 100))  # one value per bucket of 100 steps
    assert float(buckets[:, 0].max() / buckets[:, 0].min()) > 1.1  # the error is not flat in t (1.26 here)
    # the weights are the measured errors: bucket 7's over bucket 1's, recomputed by hand
    noise = torch.randn(x[:64].shape, generator=torch.Generator().manual_seed(0 * 1_000_003 + 104_729))

    def err(t_val):
        t_b = torch.full((64,), t_val, dtype=torch.long)
        x_t = m.schedule.q_sample(x[:64], t_b, noise)
        with torch.no_grad():
            m.teacher(x_t, t_b, y[:64])
            m.student.eval()(x_t, t_b, y[:64])
        m.student.train()
        return torch.stack([(hs - ht).pow(2).sum() / ht.pow(2).sum()
                            for hs, ht in zip(m._rec_s.outputs, m._rec_t.outputs)]).mean()
    assert float(w[750] / w[150]) == pytest.approx(float(err(750) / err(150)), rel=1e-5)
    # the draws follow the weights; a weight saved in a checkpoint is kept, not re-measured
    m.t_weights.zero_()
    m.t_weights[300:400] = 0.01
    m.training_draws = [m._draw(x[:64], y[:64])[0] for _ in range(3)]
    assert all(bool(((d >= 300) & (d < 400)).all()) for d in m.training_draws)
    assert float(m.t_weights[:300].sum()) == 0.0
    with pytest.raises(ValueError, match="calib.t_sampling must be 'uniform' or 'error'"):
        CalibConfig(t_sampling="loss")


def test_soft_temperature_annealing_makes_hardening_free(trained_small_dit):
    """soft_tau_end: the ratios' temperature falls geometrically 1 -> tau_end over the first
    soft_anneal_frac of the steps, then every sub-vector locks to its argmax, so the hardened weight
    is the soft one exactly; without annealing the same 8 steps leave mixtures that hardening changes."""
    x, y = load_digits_tensors()
    gaps = {}
    for tau_end in (1.0, 1e-3):
        teacher = copy.deepcopy(trained_small_dit)
        cfg = CalibConfig(lr=1e-3, assignment="soft", soft_candidates=3, soft_lr=5e-2, assign_every=100,
                          soft_tau_end=tau_end, soft_anneal_frac=0.5)
        m = DPQCalibration(student_of(teacher), teacher, cfg, max_steps=8)
        m.setup("fit")
        assert [m.rule.temperature(s, m.max_steps) for s in (0, 2, 4, 8)] == pytest.approx(
            [1.0, tau_end ** 0.5, tau_end, tau_end])
        opt = m.configure_optimizers()["optimizer"]
        for step in range(8):
            m._trainer = SimpleNamespace(global_step=step, global_rank=0, world_size=1)
            m.on_train_batch_start(None, 0)
            losses = m.compute_losses(x[:64], y[:64])
            opt.zero_grad()
            losses["loss"].backward()
            opt.step()
        m._trainer = None
        taus = [float(m.rule.codes_of(n).tau) for n in m.pq_layers]
        assert taus == pytest.approx([tau_end] * len(m.pq_layers))
        assert m.rule.frozen_fraction(m) == (1.0 if tau_end < 1 else 0.0)
        with torch.no_grad():
            soft = {n: mod.weight_pq().clone() for n, mod in m.pq_layers.items()}
            m.export_student()
            gaps[tau_end] = max(float((mod.weight_pq() - soft[n]).abs().max() / soft[n].abs().max())
                                for n, mod in m.pq_layers.items())
    assert gaps[1e-3] == 0.0 and gaps[1.0] > 1e-2


def test_block_reconstruction_alone_leaves_the_final_layer_without_gradient(trained_small_dit):
    """Why `rec_only` does not calibrate (studies/results/results-recipes-analysis.md): the reconstruction loss
    compares block outputs, so nothing after the last block - the final layer and its adaLN - gets a
    gradient from it; the DDPM loss is what reaches them."""
    x, y = load_digits_tensors()
    grads = {}
    for name, cfg in (("rec_only", CalibConfig(w_ddpm=0.0)), ("default", CalibConfig())):
        teacher = copy.deepcopy(trained_small_dit)  # DPQCalibration freezes the teacher it is given
        m = DPQCalibration(student_of(teacher), teacher, cfg)
        torch.manual_seed(0)
        m.compute_losses(x[:32], y[:32])["loss"].backward()
        grads[name] = {n: (0.0 if p.grad is None else float(p.grad.abs().sum()))
                       for n, p in m.student.named_parameters() if p.requires_grad}
    final = [n for n in grads["rec_only"] if n.startswith("final_layer.")]
    blocks = [n for n in grads["rec_only"] if n.startswith("blocks.")]
    assert len(final) == 2 and len(blocks) > 0  # final_layer.linear and its adaLN modulation
    assert all(grads["rec_only"][n] == 0.0 for n in final)
    assert all(grads["rec_only"][n] > 0 for n in blocks)
    assert all(grads["default"][n] > 0 for n in final)
