"""Which parts of a compressed model carry its remaining error, measured with the real metric.

For a finished run (its ``config.yaml`` and packed ``model.dpq``), two swaps per part of the model
(the embedders, the final layer, one kind of layer in every block, the first and the last block),
each scored by the FID-proxy under the run's own evaluation protocol (same samples, noise and
classifier):

- **restore**: the student with that part put back to the teacher's full-precision weights;
- **insert**: the teacher with that part taken from the student (its calibrated codes, codebooks
  and floats): the error the part adds on its own.

Calibration trains every part together, so parts compensate for one another; restoring one part
can make the student worse, and the inserted parts' costs need not add up to the student's. Both
directions are reported because neither alone separates a part's error from that compensation.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

from torch import nn

# name -> the dotted module names swapped (``{b}``: every block index)
PARTS = {
    "embedders (x, t, y)": ("x_embedder", "t_embedder", "y_embedder"),
    "final layer (linear + adaLN)": ("final_layer",),
    "adaLN modulation, every block": ("blocks.{b}.adaLN_modulation",),
    "attention (qkv, proj), every block": ("blocks.{b}.attn",),
    "MLP (fc1, fc2), every block": ("blocks.{b}.mlp",),
    "first block": ("blocks.0",),
    "last block": ("blocks.{last}",),
}


def expand(names: tuple[str, ...], depth: int) -> list[str]:
    """``blocks.{b}.x`` -> ``blocks.0.x`` ... ``blocks.<depth-1>.x``, ``{last}`` -> ``depth - 1``;
    other names as they are."""
    return [n.format(b=b, last=depth - 1) for n in names for b in (range(depth) if "{b}" in n else [None])]


def swapped(base: nn.Module, donor: nn.Module, names: list[str]) -> nn.Module:
    """A copy of ``base`` whose modules ``names`` are copies of ``donor``'s; neither model is
    changed. Raises a ValueError naming a module either model lacks."""
    hybrid = copy.deepcopy(base)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        try:
            parent = hybrid.get_submodule(parent_name) if parent_name else hybrid
            hybrid.get_submodule(name)
            source = donor.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"part {name!r}: no such module in both models ({e})") from None
        setattr(parent, child, copy.deepcopy(source))
    return hybrid


def part_params(teacher: nn.Module, names: list[str]) -> int:
    """Learnable parameters of the part (counted on the teacher: in full precision)."""
    return sum(p.numel() for n in names for p in teacher.get_submodule(n).parameters())


def attribute(student: nn.Module, teacher: nn.Module, evaluate: Callable[[nn.Module], dict],
              parts: dict[str, tuple[str, ...]] = PARTS, log: Callable[[str], None] = print) -> dict:
    """FID-proxy (and the rest of ``evaluate``'s numbers) of the student, the teacher, and for
    each part the student with it restored and the teacher with it inserted; one progress line
    per model."""
    depth = len(teacher.blocks)
    todo = [("student", None, None), ("teacher", None, None)]
    todo += [(p, way, expand(n, depth)) for p, n in parts.items() for way in ("restore", "insert")]
    out: dict = {"models": {}, "parts": {}}
    t_all = time.time()
    for i, (label, way, names) in enumerate(todo):
        t0 = time.time()
        if way is None:
            model = student if label == "student" else teacher
        else:
            model = swapped(student, teacher, names) if way == "restore" else swapped(teacher, student, names)
        metrics = {**evaluate(model.eval()), "seconds": round(time.time() - t0, 1)}
        if way is None:
            out["models"][label] = metrics
        else:
            entry = out["parts"].setdefault(label, {"modules": names, "params": part_params(teacher, names)})
            entry[way] = metrics
        log(f"[{i + 1}/{len(todo)}] {label}{f' ({way})' if way else ''}: FID-proxy {metrics['fid_proxy']:.2f}, "
            f"agreement {metrics['agreement']:.3f} ({time.time() - t0:.0f} s)")
    out["seconds"] = round(time.time() - t_all, 1)
    return out


def gap_shares(result: dict) -> dict[str, tuple[float, float]]:
    """Per part, as shares of the student's FID-proxy excess over the teacher's: what restoring it
    removes (1 = scores as the teacher; negative = worse than the student) and what inserting it
    into the teacher adds (1 = as bad as the whole student)."""
    s, t = result["models"]["student"]["fid_proxy"], result["models"]["teacher"]["fid_proxy"]
    return {p: ((s - v["restore"]["fid_proxy"]) / (s - t), (v["insert"]["fid_proxy"] - t) / (s - t))
            for p, v in result["parts"].items()}


def render(results: dict[str, dict], header: list[str]) -> str:
    """Markdown: one table per run (label -> :func:`attribute`'s result plus its provenance keys)."""
    lines = [*header, ""]
    for label, res in results.items():
        s, t = res["models"]["student"]["fid_proxy"], res["models"]["teacher"]["fid_proxy"]
        shares = gap_shares(res)
        lines += [f"## {label}", "",
                  f"Run: `{res['run']}` ({res['protocol']}); {res['seconds'] / 60:.1f} min on {res['machine']} "
                  f"({res['date']}).", "",
                  f"Student FID-proxy {s:.2f}, teacher {t:.2f}: the gap is {s - t:.2f}.", "",
                  "| part | parameters | student with it restored: FID-proxy | gap removed | teacher with it inserted: "
                  "FID-proxy | gap added |", "|---|---|---|---|---|---|"]
        for part, v in res["parts"].items():
            removed, added = shares[part]
            lines.append(f"| {part} | {v['params']:,} | {v['restore']['fid_proxy']:.2f} | {removed:+.0%} | "
                         f"{v['insert']['fid_proxy']:.2f} | {added:+.0%} |")
        lines.append("")
    return "\n".join(lines)


def run_dir_models(run: Path, overrides: list[str] | None = None):
    """``(config, student, teacher)`` of a finished run folder (``config.yaml`` + ``model.dpq``);
    ``overrides``: ``key=value`` applied to its config (say a smaller ``eval.num_samples``)."""
    from dpq_lightning.config import load_config
    from dpq_lightning.models import build_model
    from dpq_lightning.export.packed import load_packed

    for f in ("config.yaml", "model.dpq"):
        if not (run / f).is_file():
            raise FileNotFoundError(f"{run / f}: not a finished run (it needs config.yaml and model.dpq)")
    cfg = load_config(run / "config.yaml", overrides)
    m = cfg.model
    teacher = build_model(m.name, m.arch, m.checkpoint, m.pretrained, m.random_init).eval()
    return cfg, load_packed(run / "model.dpq").eval(), teacher
