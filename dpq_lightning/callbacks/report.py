"""The compressed model's size report, logged at the start and the end of calibration."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict

import lightning as L

from ._util import log_scalars, run_dir, wandb_loggers, write_bytes_atomic, write_json_atomic

COLUMNS = ["name", "kind", "shape", "numel", "in_blocks", "d", "K", "groups", "group_size", "pool_size",
           "code_bits", "codebook_bits", "pointer_bits", "pool_bits", "float_bits", "total_bits",
           "effective_bits", "note"]


def report_rows(report) -> list[list]:
    """One row per learnable parameter, in :data:`COLUMNS` order (shape as ``"AxB"``)."""
    rows = []
    for r in report.rows:
        d = asdict(r)
        d.update(shape="x".join(str(s) for s in r.shape), total_bits=r.total_bits, effective_bits=r.effective_bits)
        rows.append([d[c] for c in COLUMNS])
    return rows


def summary_scalars(report) -> dict[str, float]:
    """``size/<key>`` for every numeric entry of ``report.summary()`` (booleans as 0/1; ``None`` left out)."""
    return {f"size/{k}": float(v) for k, v in report.summary().items() if isinstance(v, (int, float))}


class CompressionReportCallback(L.Callback):
    """At train start and train end: the size report of ``pl_module.student`` (``report_of``).

    Logs the summary scalars (``size/ratio``, ``size/blocks_ratio``, ``size/effective_bits``,
    ``size/nominal_bits``, ``size/total_bytes``, ``size/bytes_*``...) to every logger, writes
    ``<run dir>/size/report_{start,end}.json`` and ``.csv`` (per-parameter rows) on rank 0, and,
    when a ``WandbLogger`` is attached, the per-parameter rows as the W&B table
    ``size/params_{start,end}``.
    """

    def __init__(self, out_dir: str | None = None, table: bool = True):
        self.out_dir, self.table = out_dir, table
        self.reports: dict[str, dict] = {}  # tag -> summary, on rank 0

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> None:
        from ..quant import report_of

        report = report_of(pl_module.student)
        log_scalars(trainer, summary_scalars(report))
        if not trainer.is_global_zero:
            return
        self.reports[tag] = report.summary()
        rows = report_rows(report)
        out = run_dir(trainer, self.out_dir) / "size"
        write_json_atomic({"step": trainer.global_step, "summary": report.summary(), **report.to_dict()},
                          out / f"report_{tag}.json")
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
        write_bytes_atomic(buf.getvalue().encode(), out / f"report_{tag}.csv")
        if self.table:
            for lg in wandb_loggers(trainer):
                lg.log_table(f"size/params_{tag}", columns=COLUMNS, data=rows, step=trainer.global_step)

    def on_train_start(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module, "start")

    def on_train_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module, "end")
