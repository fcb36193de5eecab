"""The SLURM template (scripts/slurm/dpq.sbatch), submitted for real to a one-node SLURM cluster.

Two tasks on CPU (gloo) calibrate the digits miniature (tests/configs/small_run.yaml on the committed
digits teacher) through ``sbatch`` -> ``srun python train.py``. Checked: Lightning detected SLURM on
both ranks, both ranks hold the same final state, and a preemption (SIGUSR1, as SLURM sends it
before the time limit or ``scancel --signal=USR1`` does) saves ``hpc_ckpt_N.ckpt``, requeues the
job, and the requeued job resumes from it, losing no step, to the same final state as an
uninterrupted run.

Needs SLURM (``slurm-wlm`` + ``munge``): skipped with the reason when it is absent (a failure
under CI, which installs and starts it with ``.ci/slurm.sh``). If SLURM is installed but not
running, this module starts the test cluster (``scripts/slurm/cluster.sh start``, root only) and
stops it afterwards. Facts and traps: docs/slurm.md.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here runs jobs on a SLURM cluster: pytest -m "not slow" skips them

ROOT = Path(__file__).parents[1]
TEMPLATE = ROOT / "scripts" / "slurm" / "dpq.sbatch"
CLUSTER = ROOT / "scripts" / "slurm" / "cluster.sh"
CONFIG = "tests/configs/small_run.yaml"  # the digits miniature
MAX_STEPS = 120
PREEMPT_AT = 30  # send SIGUSR1 once the run has logged this step
CKPT_EVERY = 25  # periodic checkpoints exist before the preemption: the resume must still pick the newer hpc one
# The same run config for every job here, apart from output_dir (fingerprints hash the student only).
OVERRIDES = [
    "data.global_batch_size=16",  # 8 per task x 2 tasks
    "data.num_workers=0",
    "trainer.accelerator=cpu",
    "trainer.strategy=ddp",
    "trainer.precision=32-true",
    "trainer.progress_bar=false",
    f"trainer.max_steps={MAX_STEPS}",
    f"trainer.ckpt_every_n_steps={CKPT_EVERY}",
    "trainer.log_every_n_steps=1",  # logs/version_N/metrics.csv shows training progress per step
    "calib.assign_every=4",
    "wandb.enabled=false",
    "eval.enabled=false",  # no sampling/FID-proxy callbacks: this tests the launch, not the metrics
]
# sbatch options that turn the GPU template into a 2-task CPU job (command-line options override #SBATCH lines).
SBATCH_CPU = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
JOB_TIMEOUT_S = 420


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _cluster_responds() -> bool:
    try:
        if "is UP" not in _run(["scontrol", "ping"], timeout=20).stdout:
            return False
        states = _run(["sinfo", "-h", "-N", "-o", "%T"], timeout=20).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states)


def _absent(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must provide SLURM: run .ci/slurm.sh before the tests")
    pytest.skip(reason)


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    """A responding SLURM cluster: the one already running, or the test cluster started here."""
    if shutil.which("sbatch") is None:
        _absent("SLURM is not installed (no sbatch on PATH): "
                "bash scripts/slurm/cluster.sh install && bash scripts/slurm/cluster.sh start")
    if _cluster_responds():
        yield
        return
    if os.geteuid() != 0 or shutil.which("slurmctld") is None or shutil.which("slurmd") is None:
        _absent("SLURM is installed but no controller answers, and this user cannot start the test cluster "
                "(needs root and slurmctld/slurmd): sudo bash scripts/slurm/cluster.sh start")
    started = _run(["bash", str(CLUSTER), "start"], timeout=120)
    if started.returncode != 0 or not _cluster_responds():
        pytest.fail(f"scripts/slurm/cluster.sh start failed:\n{started.stdout}\n{started.stderr}")
    yield
    _run(["bash", str(CLUSTER), "stop"], timeout=120)


def _job(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (there is no sacct: accounting is off on the test cluster)."""
    out = _run(["scontrol", "show", "job", "-o", job_id], timeout=30).stdout
    return dict(re.findall(r"(\S+?)=(\S*)", out))


def _tail(path: Path, n: int = 6000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else f"({path} does not exist)"


def submit(out: Path, log: Path, env_extra: dict[str, str] | None = None) -> str:
    """Submit the template as a 2-task CPU job writing to ``out``; return the job id."""
    # A job's environment is the submitter's (--export=ALL): no SLURM_/SBATCH_ leftovers from an
    # enclosing allocation, one thread per task, no network.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(CONFIG=CONFIG, OUTPUT_DIR=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline", **(env_extra or {}))
    cache = out.parent / "cache"
    cmd = ["sbatch", "--parsable", *SBATCH_CPU, f"--output={log}", f"--chdir={ROOT}", str(TEMPLATE),
           *OVERRIDES, f"data.cache_dir={cache}"]
    proc = _run(cmd, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def wait_job(job_id: str, log: Path, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
    """Poll ``scontrol show job`` until a final state (``sbatch --wait`` returns up to ~30 s late).
    A requeued job passes through REQUEUED/PENDING and is waited for too."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        info = _job(job_id)
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(1)
    _run(["scancel", job_id])
    pytest.fail(f"job {job_id} did not finish in {timeout:.0f} s: {_job(job_id)}\n{_tail(log)}")


def logged_steps(out: Path, version: int) -> list[int]:
    """Steps in Lightning's CSV log ``out/logs/version_<version>/metrics.csv`` (rank 0)."""
    path = out / "logs" / f"version_{version}" / "metrics.csv"
    try:
        with path.open() as f:
            return sorted({int(row["step"]) for row in csv.DictReader(f) if row.get("step")})
    except (OSError, ValueError, KeyError):
        return []


def fingerprints(out: Path) -> list[dict]:
    return [json.loads((out / "fingerprints" / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The template run once to the end: the reference final state for the preempted run."""
    base = tmp_path_factory.mktemp("slurm")
    out, log = base / "uninterrupted", base / "uninterrupted.out"
    job = submit(out, log)
    t0 = time.time()
    info = wait_job(job, log)
    return {"job": job, "out": out, "log": log, "info": info, "seconds": time.time() - t0, "base": base}


def test_template_two_tasks_detect_slurm_and_agree(uninterrupted):
    out, log, info = uninterrupted["out"], uninterrupted["log"], uninterrupted["info"]
    text = _tail(log, 10**7)
    assert info["JobState"] == "COMPLETED", f"job {uninterrupted['job']}: {info.get('JobState')}\n{_tail(log)}"
    assert info.get("Restarts") == "0" and info.get("NumTasks") == "2", info
    assert "[dpq.sbatch]" in text and "1 node(s) x 2 task(s)" in text
    # Lightning's SLURMEnvironment was detected on each rank (its requeue handler is installed
    # only then), and the two srun tasks formed one 2-process group.
    assert text.count("SLURM auto-requeueing enabled") == 2, text[-4000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in text and "GLOBAL_RANK: 1, MEMBER: 2/2" in text
    assert text.count("stage 1 written to") == 1  # k-means once (rank 0), the other rank loaded it
    f0, f1 = fingerprints(out)
    assert f0["sha256"] == f1["sha256"] and f0["pid"] != f1["pid"]
    assert f0["kmeans_ran"] is True and f1["kmeans_ran"] is False
    assert (out / "model.dpq").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS
    assert not list(out.glob("hpc_ckpt_*.ckpt"))  # no preemption, no requeue checkpoint


def test_preemption_saves_requeues_and_resumes_to_the_same_state(uninterrupted):
    import torch

    base = uninterrupted["base"]
    out, log = base / "preempted", base / "preempted.out"
    job = submit(out, log, {"CLEAN_HPC_CKPT": "0"})  # keep hpc_ckpt_N.ckpt for inspection
    t0 = time.time()
    while not logged_steps(out, 0) or logged_steps(out, 0)[-1] < PREEMPT_AT:
        state = _job(job).get("JobState")
        if state in TERMINAL or time.time() - t0 > JOB_TIMEOUT_S:
            _run(["scancel", job])
            pytest.fail(f"job {job} ({state}) never logged step {PREEMPT_AT}\n{_tail(log)}")
        time.sleep(0.3)
    signalled_after = logged_steps(out, 0)[-1]
    # What SLURM does at --signal=SIGUSR1@90 (and a preempting scheduler with scancel): SIGUSR1
    # to the job's steps, i.e. to every srun task (not the batch shell).
    sig = _run(["scancel", "--signal=USR1", job], timeout=30)
    assert sig.returncode == 0, sig.stderr
    info = wait_job(job, log)
    seconds = time.time() - t0
    text = _tail(log, 10**7)

    hpc = sorted(out.glob("hpc_ckpt_*.ckpt"))
    facts = {"job": job, "state": info.get("JobState"), "restarts": info.get("Restarts"),
             "signalled_after_step": signalled_after, "hpc": [p.name for p in hpc], "seconds": round(seconds)}
    problems = []
    if info.get("JobState") != "COMPLETED":
        problems.append(f"requeued job ended {info.get('JobState')}")
    if info.get("Restarts") != "1":
        problems.append(f"expected Restarts=1 (one requeue), scontrol says Restarts={info.get('Restarts')}")
    if "Handling auto-requeue signal" not in text or f"Requeued SLURM job: {job}" not in text:
        problems.append("Lightning did not handle SIGUSR1 and requeue the job")
    if "restart 1:" not in text:
        problems.append("the template did not run again as restart 1")
    if len(hpc) != 1:
        problems.append(f"expected one hpc_ckpt_N.ckpt in {out}, found {[p.name for p in hpc]}")
    else:
        ckpt = torch.load(hpc[0], map_location="cpu", weights_only=False)
        loop = ckpt["loops"]["fit_loop"]
        batch = loop["epoch_loop.batch_progress"]["total"]
        opt = loop["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"]["total"]
        facts.update(hpc_global_step=ckpt["global_step"], hpc_batches=batch, hpc_optimizer_steps=opt)
        if not PREEMPT_AT <= ckpt["global_step"] < MAX_STEPS:
            problems.append(f"preemption checkpoint at step {ckpt['global_step']}, not mid-training")
        # A checkpoint at a step boundary (like ModelCheckpoint's, in on_train_batch_end) has every
        # fetched batch processed and every started optimizer step completed. Lightning's own
        # SIGUSR1 handler saves from inside the signal handler, i.e. wherever the step is.
        if batch["processed"] != batch["ready"] or opt["completed"] != opt["ready"]:
            problems.append(
                f"{hpc[0].name} was saved in the middle of a step (batches fetched {batch['ready']}, processed "
                f"{batch['processed']}; optimizer steps started {opt['ready']}, completed {opt['completed']}): "
                "the resumed run skips the batch in flight. The SIGUSR1 handler must only set a flag, and the "
                "checkpoint + requeue must happen at the end of a step, agreed by all ranks (dpq_lightning/callbacks/requeue.py)")
        # The requeued run must go on from the preemption checkpoint (or from a later one, if the
        # first run got further before SLURM stopped it), never from an older periodic last.ckpt.
        resumed = logged_steps(out, 1)
        restored = re.findall(r"Restoring states from the checkpoint path at (\S+)", text)
        facts.update(resumed_at_step=resumed[0] if resumed else None,
                     restored_from=[str(Path(p).relative_to(out)) if p.startswith(str(out)) else p for p in restored])
        if not resumed or resumed[0] < ckpt["global_step"]:
            problems.append(
                f"the requeued run resumed at step {facts['resumed_at_step']}, before the preemption checkpoint's "
                f"step {ckpt['global_step']}: work was lost. trainer.resume=auto passes checkpoints/last.ckpt to "
                "fit(), which overrides Lightning's hpc_ckpt restore (dpq_lightning/callbacks/requeue.py resume_path must "
                "prefer the newer hpc_ckpt_N.ckpt)")
    f0, f1 = fingerprints(out) if (out / "fingerprints" / "rank1.json").is_file() else ({}, {})
    ref = fingerprints(uninterrupted["out"])[0]["sha256"]
    facts.update(sha256=f0.get("sha256"), reference_sha256=ref)
    if not f0 or f0.get("sha256") != f1.get("sha256"):
        problems.append("the ranks of the resumed run disagree or did not finish")
    elif f0["sha256"] != ref:
        problems.append(f"final state differs from the uninterrupted run: {f0['sha256'][:16]} != {ref[:16]}")
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    if summary.get("steps") != MAX_STEPS:
        problems.append(f"summary.json steps {summary.get('steps')} != {MAX_STEPS}")
    print("preemption:", json.dumps(facts))
    assert not problems, "\n".join(problems) + f"\nfacts: {json.dumps(facts)}\n--- log tail ---\n{_tail(log)}"
