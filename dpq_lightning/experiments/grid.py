"""The miniature's ablation grid: the cells of ``configs/mini/`` run through ``train.py``'s own path.

Every cell is one YAML file and one run of :func:`dpq_lightning.run.run` (the function
``train.py`` calls), so stage 1, calibration, the final evaluation and the seeding are exactly
what ``python train.py --config configs/mini/<cell>.yaml`` does. A grid for one seed ``S`` runs
every cell with ``seed=S quant.seed=S`` (calibration draws and k-means) into
``<runs>/seed<S>/<cell>/`` and copies each ``summary.json`` to ``<results>/seed<S>/<cell>.json``,
the files the report is rendered from. A cell whose copied summary already exists for the same
resolved config is skipped, so an interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..atomic import write_json_atomic

BITS = (3, 2, 1)
# (scheme, calibrated?) of each bit level's cells, in running order
SCHEMES = (("VQ", False), ("PQ", False), ("DPQ", False), ("VQ", True), ("DPQ", True))
# VQ is calibrated at 2 and 1 bits only: a calibration costs about 4.5 minutes on 2 cores, and one
# more would take a seed's grid past its 45-minute budget. At 3 bits claim 1 compares stage 1 only.
CALIBRATED_VQ_BITS = (2, 1)


@dataclass(frozen=True)
class Cell:
    """One cell of the grid: a scheme at a bit level, before or after calibration."""

    scheme: str  # VQ | PQ | DPQ
    bits: int
    calibrated: bool

    @property
    def name(self) -> str:  # the config file's stem, e.g. dpq_1bit or dpq_1bit_stage1
        return f"{self.scheme.lower()}_{self.bits}bit" + ("" if self.calibrated else "_stage1")

    @property
    def label(self) -> str:  # the report's row label
        return self.scheme + ("+calib" if self.calibrated else "")


def cells(bits: tuple[int, ...] = BITS) -> list[Cell]:
    return [Cell(s, b, c) for b in bits for s, c in SCHEMES
            if not (s == "VQ" and c and b not in CALIBRATED_VQ_BITS)]


def cell_config(configs: Path, cell: Cell) -> Path:
    path = configs / f"{cell.name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"grid cell {cell.name}: no config {path}")
    return path


def run_cell(config: Path, out: Path, seed: int, overrides: list[str]) -> dict:
    """``train.py --config CONFIG output_dir=OUT seed=S quant.seed=S OVERRIDES``, in this process."""
    from ..config import load_config
    from ..run import run

    cfg = load_config(config, [f"output_dir={out}", f"seed={seed}", f"quant.seed={seed}", *overrides])
    return run(cfg)


def run_grid(seed: int, configs: Path, runs: Path, results: Path, overrides: list[str] | None = None,
             bits: tuple[int, ...] = BITS, log: Callable[[str], None] = print) -> Path:
    """Run every cell for ``seed``; return ``results/seed<S>``. ``overrides`` go to every cell
    (e.g. tiny counts for a smoke run); only the first cell measures the teacher."""
    from ..config import load_config, to_yaml

    todo = cells(bits)
    dest = results / f"seed{seed}"
    dest.mkdir(parents=True, exist_ok=True)
    started = time.time()
    for i, cell in enumerate(todo):
        extra = list(overrides or []) + ([] if i == 0 else ["eval.final_teacher=false"])
        out = runs / f"seed{seed}" / cell.name
        target = dest / f"{cell.name}.json"
        cfg_text = to_yaml(load_config(cell_config(configs, cell),
                                       [f"output_dir={out}", f"seed={seed}", f"quant.seed={seed}", *extra]))
        if target.is_file() and json.loads(target.read_text()).get("config") == cfg_text:
            log(f"[{i + 1}/{len(todo)}] seed {seed} {cell.name}: done before, skipped")
            continue
        t0 = time.time()
        if out.exists():
            shutil.rmtree(out)  # a half-finished run of another config: start it clean
        summary = run_cell(cell_config(configs, cell), out, seed, extra)
        teacher = load_config(cell_config(configs, cell)).model.checkpoint
        record = {"cell": cell.name, "scheme": cell.scheme, "bits": cell.bits, "calibrated": cell.calibrated,
                  "seed": seed, "seconds": round(time.time() - t0, 1), "teacher": teacher,
                  "teacher_sha256": _sha256(teacher), "config": cfg_text, "summary": summary}
        write_json_atomic(record, target)
        ev = summary.get("eval", {}).get("student", {})
        log(f"[{i + 1}/{len(todo)}] seed {seed} {cell.name}: FID-proxy {ev.get('fid_proxy', float('nan')):.1f}, "
            f"agreement {ev.get('agreement', float('nan')):.3f}, {summary['size']['effective_bits']:.3f} effective "
            f"bits, {record['seconds']:.0f} s (grid so far {(time.time() - started) / 60:.1f} min)")
    records = [json.loads((dest / f"{c.name}.json").read_text()) for c in todo]
    meta = {"seed": seed, "cell_seconds": round(sum(r["seconds"] for r in records), 1),
            "machine": machine(), "date": time.strftime("%Y-%m-%d"), "cells": [c.name for c in todo],
            "overrides": list(overrides or [])}
    write_json_atomic(meta, dest / "grid.json")  # cost = the cells' own times, also when resumed
    return dest


def _sha256(path: str | None) -> str | None:
    import hashlib

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
