"""Run a list of configs through ``train.py``'s own path, one seed at a time, resumably.

Shared by the ablation grid (:mod:`.grid`) and the calibration-recipe comparison
(:mod:`.recipes`). Each entry is one YAML file and one call of :func:`dpq_lightning.jobs.run.run`
(what ``train.py`` calls) with ``seed=S quant.seed=S`` into ``<runs>/seed<S>/<name>/``; its
``summary.json`` is copied, with the resolved config and the run's own time, to
``<results>/seed<S>/<name>.json``, the file reports are rendered from. An entry whose record
already exists for the same resolved config is skipped, so an interrupted list resumes where it
stopped. A run whose stage 1 (same quantization config, teacher and seed: the key of
:func:`dpq_lightning.jobs.stage1.stage1_key`) was already computed by an earlier entry starts from a copy
of that ``stage1.dpq``, so k-means runs once per distinct stage 1.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dpq_lightning.atomic import write_json_atomic

# Tiny counts for a smoke run (the commands' --quick, the tests): a few calibration steps, few samples and steps.
QUICK = ["trainer.max_steps=4", "trainer.ckpt_every_n_steps=2", "calib.assign_every=2", "eval.num_samples=40",
         "eval.sampling_steps=4", "eval.trajectory_steps=4", "quant.kmeans_iters=2", "quant.pool.iters=2",
         "data.teacher_samples=128", "data.teacher_steps=2"]


@dataclass(frozen=True)
class Entry:
    """One run of a list: its name (the record's file stem), its config and what the report
    needs to know about it (scheme, bits, recipe, ...), stored in the record as is."""

    name: str
    config: Path
    meta: dict = field(default_factory=dict, hash=False, compare=False)


def resolved(entry: Entry, out: Path, seed: int, overrides: list[str]):
    from dpq_lightning.config import load_config

    if not entry.config.is_file():
        raise FileNotFoundError(f"{entry.name}: no config {entry.config}")
    # the studies' records are their log: no W&B run per entry (a key=value override turns it on)
    return load_config(entry.config, [f"output_dir={out}", f"seed={seed}", f"quant.seed={seed}", "wandb.enabled=false",
                                      *overrides])


def share_stage1(key: str, seed_dir: Path, out: Path) -> bool:
    """Copy the first ``stage1.dpq`` under ``seed_dir/*/`` whose key is ``key`` into ``out``; the
    run's own key check then loads it (and would recompute a mismatch, never use it)."""
    from dpq_lightning.export.packed import STAGE1_FILE

    for key_file in sorted(seed_dir.glob("*/stage1.key")):
        src = key_file.parent
        if src != out and key_file.read_text().strip() == key and (src / STAGE1_FILE).is_file():
            out.mkdir(parents=True, exist_ok=True)
            for name in (STAGE1_FILE, "stage1.key"):
                shutil.copy2(src / name, out / name)
            return True
    return False


def run_entries(entries: list[Entry], seed: int, runs: Path, results: Path, overrides: list[str] | None = None,
                log: Callable[[str], None] = print, measure_teacher_once: bool = True,
                reuse: tuple[Path, ...] = ()) -> list[dict]:
    """Run every entry for ``seed``; return their records (also those skipped as done).
    ``overrides`` go to every entry; with ``measure_teacher_once`` only the first measures the
    teacher (its numbers do not depend on the entry). ``reuse``: other lists' results directories;
    an entry whose run one of them already holds (:func:`same_experiment`: the same run under
    another name) takes that record, marked ``reused_from``, instead of running again."""
    from dpq_lightning.config import to_yaml
    from dpq_lightning.jobs.run import run
    from dpq_lightning.jobs.stage1 import stage1_key

    dest, seed_dir = results / f"seed{seed}", runs / f"seed{seed}"
    dest.mkdir(parents=True, exist_ok=True)
    started, records = time.time(), []
    for i, entry in enumerate(entries):
        extra = list(overrides or []) + ([] if i == 0 or not measure_teacher_once else ["eval.final_teacher=false"])
        out, target = seed_dir / entry.name, dest / f"{entry.name}.json"
        cfg = resolved(entry, out, seed, extra)
        cfg_text = to_yaml(cfg)
        head = f"[{i + 1}/{len(entries)}] seed {seed} {entry.name}"
        if target.is_file() and same_experiment(json.loads(target.read_text()).get("config"), cfg):
            log(f"{head}: done before, skipped")
            records.append(json.loads(target.read_text()))
            continue
        source = find_same(cfg, [d / f"seed{seed}" for d in reuse])
        if source is not None:
            record = {**json.loads(source.read_text()), "name": entry.name, **entry.meta, "seed": seed,
                      "config": cfg_text, "reused_from": str(source.relative_to(source.parents[2]))}
            write_json_atomic(record, target)
            records.append(record)
            log(f"{head}: the same run as {record['reused_from']} (differs only in its name), its record reused")
            continue
        t0 = time.time()
        if out.exists() and not same_config(out, cfg_text):
            shutil.rmtree(out)  # a half-finished run of another config: start it clean
        # else a half-finished run of this config: run() resumes from its last.ckpt (trainer.resume=auto);
        # its record's seconds then count only this invocation's part, and the record says from which step
        from_step = resumed_step(cfg, out)
        share_stage1(stage1_key(cfg), seed_dir, out)
        summary = run(cfg)
        teacher = cfg.model.checkpoint
        record = {"name": entry.name, **entry.meta, "seed": seed, "seconds": round(time.time() - t0, 1),
                  **({"resumed_at_step": from_step} if from_step else {}),
                  "teacher": teacher, "teacher_sha256": sha256_of(teacher), "config": cfg_text, "summary": summary}
        write_json_atomic(record, target)
        records.append(record)
        ev = summary.get("eval", {}).get("student", {})
        log(f"{head}: FID-proxy {ev.get('fid_proxy', float('nan')):.1f}, agreement {ev.get('agreement', float('nan')):.3f}, "
            f"{summary['size']['effective_bits']:.3f} effective bits, {record['seconds']:.0f} s "
            f"(so far {(time.time() - started) / 60:.1f} min)")
    return records


def resumed_step(cfg, out: Path) -> int:
    """The training step a run in ``out`` will resume from (its newest complete checkpoint, as
    ``trainer.resume`` picks it); 0 when it starts fresh."""
    from dpq_lightning.callbacks.requeue import resume_path

    path = resume_path(cfg.trainer.resume, out) if out.is_dir() else None
    if path is None:
        return 0
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("global_step", 0))


# Keys that name a run or say where it writes, not what it computes; eval.final_teacher only adds
# the teacher's numbers (measured once per list) next to the student's; eval.teacher_cache only says
# where the teacher's samples are kept.
# Keys that name, place or log a run but change nothing it computes.
IDENTITY_KEYS = (("name",), ("output_dir",), ("eval", "final_teacher"), ("eval", "teacher_cache"), ("wandb",))


def experiment_key(cfg) -> dict:
    """What a resolved config computes, as a plain dict: without :data:`IDENTITY_KEYS`, without
    the calibration keys its rule never reads (``CalibConfig.unused_keys``), and without the whole
    calib section for a stage-1-only run."""
    from dpq_lightning.config import to_dict

    d = to_dict(cfg)
    for path in IDENTITY_KEYS:
        d_at = d
        for k in path[:-1]:
            d_at = d_at[k]
        d_at.pop(path[-1], None)
    if cfg.stage1_only:
        d.pop("calib")
    else:
        for k in cfg.calib.unused_keys():
            d["calib"].pop(k)
    return d


def same_experiment(cfg_text: str | None, cfg) -> bool:
    """Whether a record's saved config computes what ``cfg`` does. The text is read back through
    today's schema, so a key added since it was written takes its default (the rule for new keys:
    the default keeps the old behaviour); a key since removed or renamed makes it a different run."""
    saved = saved_config(cfg_text)
    return saved is not None and experiment_key(saved) == experiment_key(cfg)


def saved_config(cfg_text: str | None):
    """A record's resolved config text read back through today's schema; None when it no longer
    loads (a key removed or renamed since)."""
    if not cfg_text:
        return None
    from dpq_lightning.config import ConfigError, load_config_text

    try:
        return load_config_text(cfg_text)
    except (ConfigError, FileNotFoundError):  # FileNotFoundError: its teacher file is gone
        return None


def find_same(cfg, seed_dirs: list[Path]) -> Path | None:
    """The first record under ``seed_dirs`` (``<results>/seed<S>/*.json``) of the same run as ``cfg``."""
    for d in seed_dirs:
        for path in sorted(d.glob("*.json")):
            record = json.loads(path.read_text())
            if "summary" in record and same_experiment(record.get("config"), cfg):
                return path
    return None


def same_config(out: Path, cfg_text: str) -> bool:
    """Whether ``out`` holds a run (finished or not) of exactly this resolved config."""
    saved = out / "config.yaml"
    return saved.is_file() and saved.read_text() == cfg_text


def write_meta(dest: Path, seed: int, names: list[str], records: list[dict], overrides: list[str] | None,
               file: str) -> dict:
    """``dest/<file>``: the list's cost (the runs' own times, also when resumed), machine, date.
    A list run later for the same seed with other entries (say 2 bits after 1 bit) adds its
    entries to the file's: the cost is then the sum over every entry's record in ``dest``."""
    # one record per name, in order (records written before 'name' was stored have only 'cell')
    seconds = {n: r["seconds"] for n, r in zip(names, records)}
    if (dest / file).is_file():
        before = json.loads((dest / file).read_text())
        for old in before.get("cells", []):
            if old not in seconds and (dest / f"{old}.json").is_file():
                seconds[old] = json.loads((dest / f"{old}.json").read_text())["seconds"]
        names = [n for n in before.get("cells", []) if n in seconds and n not in names] + list(names)
    meta = {"seed": seed, "cell_seconds": round(sum(seconds[n] for n in names if n in seconds), 1),
            "machine": machine(), "date": time.strftime("%Y-%m-%d"), "cells": names,
            "overrides": list(overrides or [])}
    write_json_atomic(meta, dest / file)
    return meta


def sha256_of(path: str | None) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else None


def machine() -> str:
    """e.g. '2 CPU cores (AMD EPYC 9B14), 2 torch threads': what the times were measured on."""
    import os
    import platform

    import torch

    name = platform.processor() or "CPU"
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({name}), {torch.get_num_threads()} torch threads"


def list_parser(doc: str, root: Path, results: str, runs: str, reuse: str):
    """The options every experiment-list command shares (``studies/scripts/grid.py``, ``studies/scripts/recipes.py``):
    ``--seed``, ``--report``, ``--quick``, where configs, results, runs and the report live, threads,
    ``--reuse`` (default: ``studies/results/<reuse>``, the other list's results) and ``key=value`` overrides
    for every run."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, help="run the list for this seed (k-means and calibration)")
    p.add_argument("--report", action="store_true", help="render the report from --results")
    p.add_argument("--quick", action="store_true", help="tiny counts (smoke run; never for the docs)")
    p.add_argument("--configs", type=Path, default=root / "studies" / "configs", help="the miniature's configs")
    p.add_argument("--results", type=Path, default=root / "studies" / "results" / results)
    p.add_argument("--runs", type=Path, default=root / "runs" / runs)
    p.add_argument("--out", type=Path, default=None, help="report path (default: <results>.md)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reuse", type=Path, nargs="*", default=[root / "studies" / "results" / reuse],
                   help="results of other lists: a run that is the same run as one of their records "
                        f"(only the name differs) takes it (default: studies/results/{reuse}; none: --reuse with no path)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    return p


def run_then_report(args, run: Callable[[list[str]], object], report: Callable[[Path], Path]) -> int:
    """A list command's body: ``run(overrides)`` for ``--seed`` (tiny counts with ``--quick``),
    then ``report(path)`` (also alone with ``--report``)."""
    import torch

    torch.set_num_threads(args.threads)
    if args.seed is not None:
        run((QUICK if args.quick else []) + list(args.overrides))
        args.report = True
    if args.report:
        print(f"wrote {report(args.out or args.results.with_suffix('.md'))}")
    return 0
