"""Distributed facts in one place: this process's rank, the world size, its device, whether it is
the first process, with one rule for every launcher.

The rule, in order:
1. explicit arguments (``--rank`` / ``--world-size``);
2. an initialised ``torch.distributed`` process group;
3. torchrun (and Lightning's DDP launcher once it has set them): ``RANK`` / ``WORLD_SIZE``;
4. an ``srun`` step: ``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS``. Not ``SLURM_NTASKS``: a batch
   script sees that too while it runs as ONE process (measured on this project's SLURM test
   cluster: the batch script of a ``--ntasks=2`` job has ``SLURM_NTASKS=2`` and no
   ``SLURM_STEP_NUM_TASKS``; each ``srun`` task has both, = 2);
5. Lightning's process launcher before any group exists: ``LOCAL_RANK`` / ``NODE_RANK`` name a
   re-executed process (rank unknown, but not the first unless both are 0);
6. otherwise a single process: ``(0, 1)``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


class RankError(ValueError):
    """A rank outside ``[0, world size)``."""


def rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world size)`` by the module's rule; explicit values win, and are checked."""
    if rank is None or world_size is None:
        r, w = _detected()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise RankError(f"rank {rank} is not in [0, world size {world_size}): check --rank/--world-size "
                        "or the launcher's RANK/WORLD_SIZE (SLURM_PROCID/SLURM_STEP_NUM_TASKS)")
    return rank, world_size


def _detected() -> tuple[int, int]:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    env = os.environ
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")):
        if r in env and w in env:
            return int(env[r]), int(env[w])
    return 0, 1


def is_first_process() -> bool:
    """Global rank 0, known before any process group exists (rules 3-5; see the module)."""
    env = os.environ
    if "RANK" in env or ("SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env):
        return _detected()[0] == 0
    return int(env.get("LOCAL_RANK", 0)) == 0 and int(env.get("NODE_RANK", 0)) == 0


def local_index(default: int = 0) -> int:
    """This process's index on its node: ``LOCAL_RANK`` (torchrun, Lightning), else an ``srun``
    step's ``SLURM_LOCALID``, else ``default`` (e.g. the rank given by hand on one node)."""
    env = os.environ
    if "LOCAL_RANK" in env:
        return int(env["LOCAL_RANK"])
    if "SLURM_STEP_NUM_TASKS" in env:
        return int(env.get("SLURM_LOCALID", default))
    return default


def local_device() -> str:
    """``cuda:<local index>`` when CUDA is available (wrapped to the visible devices), else cpu."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{local_index() % torch.cuda.device_count()}"


def gather_shards(shard_dir: str | os.PathLike, payload: dict, rank: int, world: int,
                  timeout_s: float = 3600.0, tag: str = "samples") -> dict | None:
    """Write this rank's ``payload`` (tensors with ``indices``) as ``shard-{tag}-{rank}-of-{world}.pt``
    (``tag`` names the run, so shards of different runs in one directory never mix); rank 0
    returns all shards merged in index order, other ranks None. Shards are deleted after
    merging. ``world == 1`` writes nothing."""
    import torch

    from .atomic import save_torch_atomic

    if world == 1:
        return dict(payload)
    d = Path(shard_dir)
    save_torch_atomic(payload, d / f"shard-{tag}-{rank}-of-{world}.pt", unique=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank != 0:
        return None
    paths = [d / f"shard-{tag}-{r}-of-{world}.pt" for r in range(world)]
    t0 = time.time()
    while not all(p.is_file() for p in paths):
        if time.time() - t0 > timeout_s:
            missing = [str(p) for p in paths if not p.is_file()]
            raise TimeoutError(f"rank 0 waited {timeout_s:.0f} s for shards {missing}")
        time.sleep(1.0)
    shards = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    shards = [s for s in shards if s["indices"].numel()] or shards[:1]  # ranks without samples (n < world)
    merged = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    order = torch.argsort(merged["indices"])
    for p in paths:
        p.unlink()
    return {k: v[order] for k, v in merged.items()}
