"""The paper's Figure 2: per-block output error of compressed DiTs along the sampling trajectory,
in absolute and relative terms, for several samplers and along the teacher's and the student's own
trajectory.

    python studies/scripts/figure2.py --model DPQ=runs/fig2/dpq_1bit/model.dpq --model VQ=runs/fig2/vq_1bit/model.dpq \\
        --out studies/results/figure2-mini-stage1 --md studies/results/figure2.md
    python studies/scripts/figure2.py --report-only --out studies/results/figure2-mini-stage1 --md studies/results/figure2.md

For every model (``--model NAME=PATH``, packed ``.dpq`` files, any number), every sampler setting
(``--settings METHOD:STEPS``, default ``ddim:50 ddpm:250``) and every trajectory followed
(``--follow``, default ``teacher student``), one sampling run of ``--samples`` balanced labels
(``x_T`` and DDPM's noise from ``--seed``, guidance ``--cfg-scale``) records for every step and block
the relative error ``||h_s - h_t||^2 / ||h_t||^2`` and the absolute error ``||h_s - h_t||^2 / numel``
(:func:`dpq_lightning.evaluation.trajectory.block_error_trajectories`). Writes, atomically:

* ``<out>.json``: every curve ``[steps, blocks]``, the timesteps, the command, the files' sha256,
  sizes, date, machine and seconds;
* ``<out>.png``: rows = (sampler, trajectory), columns = absolute / relative; one line per model
  (mean over blocks; ``--per-block`` adds a thin line per block); x = sampling step (1 = pure
  noise), y log scale;
* with ``--md FILE``: a table of the curves' means over the first and last fifth of the steps
  (and their ratio), rendered from the JSON between marker comments in FILE; text outside the
  markers is kept, so a hand-written reading can sit next to the generated numbers.

``--report-only`` renders the PNG (and the table) again from ``<out>.json`` without sampling.
One progress line per (model, setting).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

METHODS = ("ddim", "ddpm")
FOLLOWS = ("teacher", "student")
KINDS = ("absolute", "relative")  # the PNG's columns, in this order
YLABEL = {"absolute": "||h_s - h_t||^2 / numel", "relative": "||h_s - h_t||^2 / ||h_t||^2"}
FLOOR = 1e-12  # log axes: an exact zero (student == teacher) is drawn at this floor


def parse_setting(token: str) -> dict[str, Any]:
    """``"ddim:50"`` -> ``{"method": "ddim", "steps": 50}``; a clear error for anything else."""
    method, sep, steps = token.partition(":")
    if not sep or method not in METHODS:
        raise ValueError(f"--settings {token!r}: expected METHOD:STEPS with METHOD one of {', '.join(METHODS)}, "
                         "e.g. ddim:50")
    try:
        n = int(steps)
    except ValueError:
        raise ValueError(f"--settings {token!r}: STEPS must be an integer, got {steps!r}") from None
    if not 1 <= n <= 1000:  # the schedule has 1000 training steps; respacing keeps at most all of them
        raise ValueError(f"--settings {token!r}: STEPS must be in [1, 1000], got {n}")
    return {"method": method, "steps": n}


def parse_model(token: str) -> tuple[str, Path]:
    """``"DPQ=runs/x/model.dpq"`` -> ``("DPQ", Path(...))``; the file must exist."""
    name, sep, path = token.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--model {token!r}: expected NAME=PATH, e.g. DPQ=runs/fig2/dpq_1bit/model.dpq")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--model {token!r}: no such file {path}")
    return name, Path(path)


def setting_key(s: dict[str, Any]) -> str:
    return f"{s['method']}:{s['steps']}"


def load_teacher(checkpoint: Path, arch: Path):
    """The float teacher from ``checkpoint`` with the architecture of ``arch``: a config YAML with a
    ``model:`` section (``name`` and ``arch``, as ``studies/configs/_miniature.yaml``) or an arch JSON
    (as ``checkpoints/digits_teacher.json``)."""
    import yaml

    from dpq_lightning.export.open import load_arch
    from dpq_lightning.models import build_model, load_original_checkpoint

    if not checkpoint.is_file():
        raise FileNotFoundError(f"--teacher {checkpoint}: no such file")
    if not arch.is_file():
        raise FileNotFoundError(f"--arch {arch}: no such file")
    if arch.suffix == ".json":
        return load_original_checkpoint(checkpoint, load_arch(arch))
    doc = yaml.safe_load(arch.read_text()) or {}
    model = doc.get("model") or {}
    if "name" not in model:
        raise ValueError(f"--arch {arch}: no model.name (expected a config with a model: section, "
                         "as studies/configs/_miniature.yaml)")
    return build_model(model["name"], model.get("arch"), checkpoint=str(checkpoint))


def shown(path: str | Path) -> str:
    """``path`` relative to the repository root when it lies inside it (what the JSON and the
    table show: the same on every checkout), else as given."""
    p = Path(path)
    try:
        return p.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def learnable_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def compute(args: argparse.Namespace, models: list[tuple[str, Path]], settings: list[dict[str, Any]]) -> dict:
    """Sample every (model, setting, follow) and return the JSON document (curves as nested lists)."""
    from dpq_lightning.data import balanced_labels
    from dpq_lightning.evaluation.trajectory import block_error_trajectories
    from studies.harness.runner import machine
    from dpq_lightning.export.packed import PackedFileError, load_packed
    from dpq_lightning.sampling import model_shape, spaced_steps

    t_start = time.perf_counter()
    teacher = load_teacher(args.teacher, args.arch).to(args.device).eval()
    n_params = learnable_params(teacher)
    shape = model_shape(teacher)  # (C, H, W)
    labels = balanced_labels(args.samples, teacher.num_classes, seed=args.seed).to(args.device)  # (samples,)
    doc: dict[str, Any] = {
        "command": shlex.join(["python", "studies/scripts/figure2.py", *args.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "teacher": {"path": shown(args.teacher), "sha256": file_sha256(args.teacher), "arch": shown(args.arch),
                    "learnable_params": n_params, "depth": len(teacher.blocks)},
        "samples": args.samples, "cfg_scale": args.cfg_scale, "seed": args.seed,
        "settings": [setting_key(s) for s in settings], "follow": list(args.follow),
        # row i of every curve: the model is called at this training timestep (row 0 = x_T, pure noise)
        "timesteps": {setting_key(s): list(reversed(spaced_steps(1000, s["steps"]))) for s in settings},
        "models": [], "curves": [],
    }
    for name, path in models:
        try:
            student = load_packed(path, device=args.device).eval()
        except PackedFileError as err:
            raise ValueError(f"--model {name}={path}: {err}") from err
        if len(student.blocks) != len(teacher.blocks) or model_shape(student) != shape:
            raise ValueError(f"--model {name}={path}: {len(student.blocks)} blocks drawing {model_shape(student)}, "
                             f"the teacher {args.teacher} has {len(teacher.blocks)} drawing {shape}")
        size = path.stat().st_size
        doc["models"].append({"name": name, "path": shown(path), "sha256": file_sha256(path), "file_bytes": size,
                              # the whole file (codes, codebooks, pool, floats, header) per teacher parameter
                              "bits_per_param": 8 * size / n_params})
        for s in settings:
            t0 = time.perf_counter()
            for follow in args.follow:
                t1 = time.perf_counter()
                err = block_error_trajectories(teacher, student, labels, shape, steps=s["steps"], method=s["method"],
                                               seed=args.seed, follow=follow, cfg_scale=args.cfg_scale)
                doc["curves"].append({"model": name, "setting": setting_key(s), "follow": follow,
                                      "relative": err["relative"].tolist(),  # [steps][blocks]
                                      "absolute": err["absolute"].tolist(),  # [steps][blocks]
                                      "seconds": round(time.perf_counter() - t1, 2)})
            mine = [c for c in doc["curves"] if c["model"] == name and c["setting"] == setting_key(s)]
            means = ", ".join(f"{c['follow']}: mean rel {_mean(c['relative']):.3g}" for c in mine)
            print(f"[figure2] {name} {setting_key(s)} ({', '.join(args.follow)}): "
                  f"{time.perf_counter() - t0:.1f} s; {means}", flush=True)
        del student
    doc["seconds"] = round(time.perf_counter() - t_start, 1)
    return doc


def _mean(rows: list[list[float]]) -> float:
    """Mean of a ``[steps][blocks]`` list over every entry."""
    return sum(sum(r) for r in rows) / sum(len(r) for r in rows)


def teacher_energy(curve: dict) -> list[list[float]]:
    """``[steps][blocks]`` ``||h_t||^2 / numel`` = absolute / relative (0 where the relative error is
    0, as for a student equal to the teacher: there the ratio says nothing)."""
    return [[a / r if r > 0 else 0.0 for a, r in zip(ra, rr)] for ra, rr in zip(curve["absolute"], curve["relative"])]


def fifths(rows: list[list[float]]) -> tuple[float, float]:
    """Mean over blocks and over the first / last fifth of the steps (at least one step each)."""
    k = max(1, len(rows) // 5)
    return _mean(rows[:k]), _mean(rows[-k:])


def _plain_log_formatter():
    """A log-axis formatter that labels the ticks matplotlib's ``LogFormatter`` would label (so
    minor ticks are labelled only on axes spanning about a decade or less), as ``%.3g`` numbers."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:.3g}" if super().__call__(x, pos) else ""

    return Plain


def render_png(doc: dict, path: Path, per_block: bool = False) -> Path:
    """The figure from the JSON document only (so ``--report-only`` draws the same PNG)."""
    import numpy as np

    from studies.harness.report import _plt, _save

    plt = _plt()
    PlainLogFormatter = _plain_log_formatter()
    rows = [(s, f) for s in doc["settings"] for f in doc["follow"]]
    names = [m["name"] for m in doc["models"]]
    fig, axes = plt.subplots(len(rows), len(KINDS), figsize=(11, 2.9 * len(rows)), squeeze=False)
    for r, (setting, follow) in enumerate(rows):
        method, steps = setting.split(":")
        for c, kind in enumerate(KINDS):
            ax = axes[r][c]
            for i, name in enumerate(names):
                curve = next(x for x in doc["curves"]
                             if x["model"] == name and x["setting"] == setting and x["follow"] == follow)
                arr = np.clip(np.asarray(curve[kind], dtype=np.float64), FLOOR, None)  # (steps, blocks)
                x = np.arange(1, arr.shape[0] + 1)  # step 1 = x_T, pure noise
                if per_block:
                    for b in range(arr.shape[1]):
                        ax.plot(x, arr[:, b], color=f"C{i % 10}", linewidth=0.6, alpha=0.35)
                ax.plot(x, arr.mean(axis=1), color=f"C{i % 10}", linewidth=1.8, label=f"{name} (mean of blocks)")
            ax.set_yscale("log")
            # plain numbers (0.62, 1.4) instead of 6.2x10^-1 on the narrow ranges these panels often span
            ax.yaxis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
            ax.tick_params(axis="y", which="both", labelsize=7)
            ax.set_xlabel("sampling step (1 = pure noise)")
            ax.set_ylabel(YLABEL[kind], fontsize=8)
            traj = "teacher's trajectory" if follow == "teacher" else "student's own trajectory"
            ax.set_title(f"{method.upper()} {steps} steps, {traj}: {kind}", fontsize=9)
            ax.grid(True, which="major", alpha=0.3)
            if r == 0 and c == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"Per-block output error vs the teacher ({doc['samples']} samples, guidance {doc['cfg_scale']}, "
                 f"seed {doc['seed']}" + ("; thin lines: single blocks)" if per_block else ")"), fontsize=10)
    return _save(fig, path)


def render_table(doc: dict, link: str) -> list[str]:
    """Markdown lines: the models' sizes and, per (sampler, trajectory, model), the mean error over
    the first and last fifth of the steps and their ratio (growth), relative and absolute.
    ``link``: ``<out>`` as seen from the markdown file's folder."""
    lines = [f"Generated by `{doc['command']}` on {doc['date']} ({doc['machine']}, {doc['seconds']:.0f} s); "
             f"teacher `{shown(doc['teacher']['path'])}` (sha256 {doc['teacher']['sha256'][:12]}, "
             f"{doc['teacher']['learnable_params']:,} learnable parameters); {doc['samples']} samples, "
             f"guidance {doc['cfg_scale']}, seed {doc['seed']}. Figure: [`{link}.png`]({link}.png), "
             f"curves: [`{link}.json`]({link}.json).", "",
             "| model | file | sha256 | bytes | bits per parameter (whole file) |", "|---|---|---|---|---|"]
    for m in doc["models"]:
        lines.append(f"| {m['name']} | `{shown(m['path'])}` | {m['sha256'][:12]} | {m['file_bytes']:,} | "
                     f"{m['bits_per_param']:.3f} |")
    lines += ["", "Mean over blocks and over the first / last fifth of the sampling steps (first = nearest pure "
              "noise); growth = last / first. Teacher energy = absolute / relative = `||h_t||^2 / numel`, the "
              "teacher's own block activations on the inputs both models saw: why the two kinds can disagree.", "",
              "| sampler | trajectory | model | relative, first 1/5 | relative, last 1/5 | relative growth | "
              "absolute, first 1/5 | absolute, last 1/5 | absolute growth | teacher energy growth |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for setting in doc["settings"]:
        for follow in doc["follow"]:
            for m in doc["models"]:
                c = next(x for x in doc["curves"]
                         if x["model"] == m["name"] and x["setting"] == setting and x["follow"] == follow)
                cells = []
                for kind in ("relative", "absolute"):
                    first, last = fifths(c[kind])
                    growth = f"{last / first:.2f}x" if first > 0 else "-"
                    cells += [f"{first:.3g}", f"{last:.3g}", growth]
                e_first, e_last = fifths(teacher_energy(c))
                cells.append(f"{e_last / e_first:.2f}x" if e_first > 0 else "-")
                lines.append(f"| {setting.replace(':', ' ')} | {follow} | {m['name']} | " + " | ".join(cells) + " |")
    return lines


def write_markdown(doc: dict, md: Path, out: Path) -> Path:
    """Put the table of ``<out>.json`` between this figure's markers in ``md`` (created with a title
    if missing; the section appended if the markers are not there); everything else is kept, so
    several figures (stage 1, calibrated) can share one file."""
    from dpq_lightning.atomic import write_text_atomic

    stem = out.name
    link = Path(os.path.relpath(out.resolve(), md.resolve().parent)).as_posix()
    begin = f"<!-- figure2 table {stem}: generated by studies/scripts/figure2.py from {stem}.json; edits here are overwritten -->"
    end = f"<!-- /figure2 table {stem} -->"
    block = "\n".join([begin, *render_table(doc, link), end])
    text = md.read_text() if md.is_file() else "# Figure 2: block error along the sampling trajectory\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    return write_text_atomic(text, md)


def main(argv: list[str] | None = None) -> dict:
    """Run (or with ``--report-only`` re-render) the figure; return the JSON document."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="a compressed model (packed .dpq file); repeat for several")
    p.add_argument("--teacher", type=Path, default=ROOT / "checkpoints" / "digits_teacher.pt")
    p.add_argument("--arch", type=Path, default=ROOT / "studies" / "configs" / "_miniature.yaml",
                   help="the teacher's architecture: a config with a model: section, or an arch JSON")
    p.add_argument("--settings", nargs="+", default=["ddim:50", "ddpm:250"], metavar="METHOD:STEPS")
    p.add_argument("--follow", nargs="+", default=list(FOLLOWS), choices=FOLLOWS)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, required=True, help="writes <out>.json and <out>.png")
    p.add_argument("--md", type=Path, default=None, help="also write the table into this markdown file")
    p.add_argument("--per-block", action="store_true", help="thin lines for single blocks as well")
    p.add_argument("--report-only", action="store_true", help="re-render <out>.png (and --md) from <out>.json")
    args = p.parse_args(argv)
    args.argv = argv
    json_path, png_path = Path(f"{args.out}.json"), Path(f"{args.out}.png")

    if args.report_only:
        import json

        if not json_path.is_file():
            p.error(f"--report-only: {json_path} does not exist; run without --report-only first")
        doc = json.loads(json_path.read_text())
    else:
        if not args.model:
            p.error("give at least one --model NAME=PATH (or --report-only)")
        if args.samples < 1:
            p.error(f"--samples must be >= 1, got {args.samples}")
        try:
            settings = [parse_setting(t) for t in args.settings]
            models = [parse_model(t) for t in args.model]
        except (ValueError, FileNotFoundError) as err:
            p.error(str(err))
        if len({n for n, _ in models}) != len(models):
            p.error(f"--model names must be distinct, got {[n for n, _ in models]}")
        if len({setting_key(s) for s in settings}) != len(settings) or len(set(args.follow)) != len(args.follow):
            p.error("--settings and --follow must not repeat an entry")
        import torch

        from dpq_lightning.atomic import write_json_atomic

        if args.threads:
            torch.set_num_threads(args.threads)
        try:
            doc = compute(args, models, settings)
        except (ValueError, FileNotFoundError) as err:
            p.error(str(err))
        write_json_atomic(doc, json_path)
        print(f"[figure2] wrote {json_path} ({doc['seconds']:.0f} s)", flush=True)
    render_png(doc, png_path, per_block=args.per_block)
    print(f"[figure2] wrote {png_path}", flush=True)
    if args.md is not None:
        write_markdown(doc, args.md, args.out)
        print(f"[figure2] wrote {args.md}", flush=True)
    return doc


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
