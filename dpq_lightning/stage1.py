"""Stage 1 as a job: build the full-precision model, quantize it, save the packed file and report.

Used by ``train.py`` (before calibration) and ``dpq quantize``; takes typed sections, not the
whole config, apart from :func:`run_stage1` which entry points call.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import RunConfig, save_resolved
from .models import build_model
from .packed import save_packed
from .quant import QuantConfig, SizeReport, quantize_


def quantize_with_progress(model: torch.nn.Module, quant: QuantConfig, device: str | None = None) -> SizeReport:
    """``quantize_`` with a progress bar over layers (k-means is the long part)."""
    bar = tqdm(total=None, desc="stage 1: k-means", unit="layer", dynamic_ncols=True)

    def progress(name: str, i: int, n: int) -> None:
        bar.total = n
        bar.n = i
        bar.set_postfix_str(name, refresh=True)

    try:
        report = quantize_(model, quant, device=device, progress=progress)
        bar.n = bar.total or 0
        bar.refresh()
    finally:
        bar.close()
    return report


def predict_size(cfg: RunConfig) -> SizeReport:
    """The size report ``cfg`` would give, from shapes alone (a meta-device model: no weights, no
    k-means). ``dpq plan`` prints it; the miniature's arithmetic table compares two of them."""
    from .models.registry import build_dit, resolve_config
    from .quant import predict_report

    with torch.device("meta"):
        model = build_dit(resolve_config(cfg.model.name, **cfg.model.arch))
    return predict_report(model, cfg.quant)


def write_json_atomic(data: dict, path: Path) -> None:
    from .atomic import write_json_atomic as write

    write(data, path, indent=2)


def run_stage1(cfg: RunConfig, device: str | None = None) -> tuple[torch.nn.Module, SizeReport, Path]:
    """Quantize the configured model; write ``model.dpq``, ``report.json``, ``report.txt`` and the
    resolved ``config.yaml`` into ``cfg.output_dir``."""
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out / "config.yaml")
    m = cfg.model
    model = build_model(m.name, m.arch, m.checkpoint, m.pretrained, m.random_init)
    report = quantize_with_progress(model, cfg.quant, device=device)
    path = save_packed(model, out / "model.dpq")
    write_json_atomic({"summary": report.summary(), **report.to_dict()}, out / "report.json")
    from .atomic import write_text_atomic

    write_text_atomic(report.table(), out / "report.txt")
    return model, report, path
