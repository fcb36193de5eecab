"""One rule for rank, world size, first process and local device, inside and outside srun-like
environments (the variables as measured on this project's SLURM test cluster)."""

import pytest

from dpq_lightning import distributed as dist

VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_NTASKS",
        "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")

# name -> (environment, expected rank_world(), is_first_process(), local_index())
CASES = {
    "plain process": ({}, (0, 1), True, 0),
    "torchrun rank 2 of 4": ({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2"}, (2, 4), False, 2),
    # a --ntasks=2 batch script: SLURM_NTASKS=2 but it runs as one process (no step variables)
    "sbatch batch script": ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}, (0, 1), True, 0),
    "srun task 1 of 2": ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
                          "SLURM_LOCALID": "1"}, (1, 2), False, 1),
    "srun task 0 of 2": ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
                          "SLURM_LOCALID": "0"}, (0, 2), True, 0),
    # Lightning's launcher re-executes the script with LOCAL_RANK before any group exists; inside a
    # batch script the child inherits SLURM_PROCID=0 and must still not count as the first process
    "Lightning child in a batch script": ({"LOCAL_RANK": "1", "NODE_RANK": "0", "SLURM_PROCID": "0",
                                           "SLURM_NTASKS": "2"}, (0, 1), False, 1),
    "Lightning child, second node": ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, (0, 1), False, 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_rule_for_every_launcher(case, monkeypatch):
    env, rw, first, local = CASES[case]
    for v in VARS:
        monkeypatch.delenv(v, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert dist.rank_world() == rw
    assert dist.is_first_process() is first
    assert dist.local_index() == local
    assert dist.local_device() == "cpu"  # no CUDA here: never a cuda device name


def test_explicit_values_win_and_are_checked(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist.rank_world(0, 3) == (0, 3) and dist.rank_world(world_size=5) == (1, 5)
    with pytest.raises(dist.RankError, match=r"rank 3 is not in \[0, world size 2\)"):
        dist.rank_world(3, 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert dist.local_index(default=4) == 4  # the rank given by hand on one node
