"""The end of a run (rank 0): round to storage, write ``model.dpq``, evaluate what the file holds
once (``eval.final``), write ``summary.json`` and ``report.txt``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import write_json_atomic, write_text_atomic
from ..config import RunConfig
from ..export.packed import load_packed, save_packed
from ..quant import SizeReport, report_of, round_to_storage_


def finish_run(cfg: RunConfig, out: Path, student: torch.nn.Module, teacher: torch.nn.Module,
               stage1_report: SizeReport, steps: int, metrics: dict, trainable_params: int = 0) -> dict:
    """The run's summary (also written to ``out/summary.json``)."""
    round_to_storage_(student)
    path = save_packed(student, out / "model.dpq")
    report = report_of(student)
    summary = {"packed": str(path), "steps": steps, "stage1_only": cfg.stage1_only, "seed": cfg.seed,
               "size": report.summary(), "stage1_size": stage1_report.summary(), "final_metrics": metrics,
               "trainable_params": trainable_params}
    if cfg.eval.enabled and cfg.eval.final:
        from ..evaluation.final import final_evaluation

        # what the file holds, decoded once (inference mode): the same weights as decoding in every forward
        summary["eval"] = final_evaluation(load_packed(path, decode=True), teacher, cfg.eval)
    write_json_atomic(summary, out / "summary.json", indent=2)
    write_text_atomic(report.table(), out / "report.txt")
    return summary
