"""The miniature's ablation grid: the cells of ``studies/configs/`` run through ``train.py``'s own path.

Every cell is one YAML file and one run of :func:`dpq_lightning.jobs.run.run` (the function
``train.py`` calls), so stage 1, calibration, the final evaluation and the seeding are exactly
what ``python train.py --config studies/configs/<cell>.yaml`` does. A grid for one seed ``S`` runs
every cell with ``seed=S quant.seed=S`` (calibration draws and k-means) into
``<runs>/seed<S>/<cell>/`` and copies each ``summary.json`` to ``<results>/seed<S>/<cell>.json``,
the files the report is rendered from (:func:`.runner.run_entries`: resumable, one stage 1 per
distinct quantization config).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .runner import Entry, run_entries, write_meta

BITS = (3, 2, 1)
# (scheme, calibrated?) of each bit level's cells, in running order
SCHEMES = (("VQ", False), ("PQ", False), ("DPQ", False), ("VQ", True), ("DPQ", True))
# VQ is calibrated at 2 and 1 bits only: a calibration costs 7-13 minutes on 2 cores and a seed's
# grid is already about an hour. At 3 bits claim 1 compares stage 1 only.
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


def entries(configs: Path, bits: tuple[int, ...] = BITS) -> list[Entry]:
    return [Entry(c.name, cell_config(configs, c),
                  {"cell": c.name, "scheme": c.scheme, "bits": c.bits, "calibrated": c.calibrated})
            for c in cells(bits)]


def run_grid(seed: int, configs: Path, runs: Path, results: Path, overrides: list[str] | None = None,
             bits: tuple[int, ...] = BITS, log: Callable[[str], None] = print, reuse: tuple[Path, ...] = ()) -> Path:
    """Run every cell for ``seed``; return ``results/seed<S>`` (with ``grid.json``: cost, machine,
    date). ``overrides`` go to every cell (e.g. tiny counts for a smoke run); only the first cell
    measures the teacher. A cell that is the same run as a record under ``reuse`` (say the recipe
    comparison's, whose winner is the calibrated cell's recipe) takes that record."""
    todo = entries(configs, bits)
    records = run_entries(todo, seed, runs, results, overrides, log, reuse=reuse)
    dest = results / f"seed{seed}"
    write_meta(dest, seed, [e.name for e in todo], records, overrides, "grid.json")
    return dest
