"""Finished runs evaluated again under another protocol: more samples, fresh noise.

The recipe comparison ranks models at 1000 samples drawn from one noise stream (``eval.seed`` 0).
Models within 2x of the teacher's FID-proxy are close enough that the ranking can depend on the
samples drawn; this module re-measures the packed models (``model.dpq``, the stored codes) of
chosen runs under a stated protocol, one JSON per run, so a ranking can be checked on samples
that took no part in choosing it. The teacher is measured once per protocol under the same one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from dpq_lightning.atomic import write_json_atomic

PROXY_KEYS = ("fid_proxy", "kid_proxy", "kid_proxy_std", "is_proxy", "agreement",
              "fid_to_teacher", "mse_to_teacher", "match_teacher")


def protocol_tag(overrides: list[str]) -> str:
    """A folder name for a protocol, from its ``eval.key=value`` overrides (sorted, filesystem-safe)."""
    if not overrides:
        raise ValueError("a re-evaluation needs at least one eval.key=value override (otherwise it repeats the run's own)")
    bad = [o for o in overrides if not o.startswith("eval.") or "=" not in o]
    if bad:
        raise ValueError(f"{bad}: only eval.key=value overrides change the protocol (e.g. eval.num_samples=2000)")
    return "_".join(o.removeprefix("eval.").replace("=", "-") for o in sorted(overrides))


def measure(run: Path, overrides: list[str], out_dir: Path, root: Path, log=print) -> dict:
    """Evaluate ``run``'s packed model (and, once per ``out_dir``, its teacher) under the run's
    ``eval`` config with ``overrides``; write ``<out_dir>/<seed folder>-<run>.json`` atomically and
    return it. A run measured before under this protocol is read back, not measured again."""
    from dpq_lightning.metrics import load_digits_classifier
    from .attribution import run_dir_models
    from .runner import machine

    target = out_dir / f"{run.parent.name}-{run.name}.json"
    if target.is_file():
        log(f"{run}: measured before ({target.name}), kept")
        return json.loads(target.read_text())
    from dataclasses import replace

    from dpq_lightning.evaluation.final import paired_evaluate, proxy_evaluate

    cfg, student, teacher = run_dir_models(run, overrides)
    clf = load_digits_classifier(cfg.eval.classifier_path)
    teacher_file = out_dir / "teacher.json"
    if not teacher_file.is_file():
        t0 = time.time()
        res = proxy_evaluate(teacher, cfg.eval, clf)
        write_json_atomic({"teacher": cfg.model.checkpoint, "overrides": overrides,
                           "metrics": {k: res[k] for k in PROXY_KEYS if k in res},
                           "seconds": round(time.time() - t0, 1)}, teacher_file)
        log(f"teacher: FID-proxy {res['fid_proxy']:.2f}")
    t0 = time.time()
    # with the teacher-paired metrics: the teacher's samples under this protocol are cached beside the records
    ev = replace(cfg.eval, teacher_cache=cfg.eval.teacher_cache or str(out_dir / "teacher_samples"))
    res = paired_evaluate(student, teacher, ev, clf)["student"] if ev.paired else proxy_evaluate(student, ev, clf)
    rel = run.resolve().relative_to(root) if run.resolve().is_relative_to(root) else run
    own = _original(run)
    record = {"run": str(rel), "name": cfg.name, "seed": cfg.seed, "overrides": overrides,
              "metrics": {k: res[k] for k in PROXY_KEYS if k in res},
              # the run's own numbers, kept in the record: run folders are scratch, the report is not
              "own": {k: own[k] for k in PROXY_KEYS if k in own},
              "seconds": round(time.time() - t0, 1), "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    write_json_atomic(record, target)
    log(f"{run}: FID-proxy {res['fid_proxy']:.2f}, agreement {res['agreement']:.3f} ({record['seconds']:.0f} s)")
    return record


def _original(run: Path) -> dict:
    """The run's own final evaluation (its ``summary.json``), when the run folder is still there."""
    f = run / "summary.json"
    return json.loads(f.read_text()).get("eval", {}).get("student", {}) if f.is_file() else {}


def lowest_line(means: list[tuple[str, tuple[int, ...], float]],
                per_seed: dict[str, dict[int, float]] | None = None) -> str:
    """The report's verdict line from ``(model, seeds, mean FID-proxy)``: the lowest mean among the
    models measured on the most seeds only, since a one-seed number next to a three-seed mean says
    nothing about which is lower. With ``per_seed`` (model -> seed -> FID-proxy) every model whose
    paired difference from the lowest lies within the noise (:func:`.noise.compare`, at least two
    shared seeds) ties with it, and the line names the tie, not a winner."""
    from .noise import Cell, compare

    most = max(len(seeds) for _, seeds, _ in means)
    ranked = sorted((m for m in means if len(m[1]) == most), key=lambda m: m[2])
    name, _, low = ranked[0]
    scope = "" if all(len(m[1]) == most for m in means) else (
        f" (among the models measured on {most} seeds; those measured on fewer are not ranked against them)")

    def cell(model: str) -> Cell:
        return Cell({(s, 0): v for s, v in per_seed[model].items()})

    ties = []
    for other, _, _ in ranked[1:] if per_seed else []:
        c = compare(cell(other), cell(name))
        if c.n >= 2 and c.verdict == "tie":
            ties.append(c.text(f"**{other}**", f"**{name}**", 3))
    if not ties:
        return f"Lowest mean FID-proxy under this protocol: **{name}**{scope}."
    return (f"No winner under this protocol{scope}: the lowest mean is **{name}** ({low:.3f}), and "
            + "; ".join(ties) + " (differences paired by seed, Student's t 95%).")


def _cell(values: list[float], fmt: str = ".2f") -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:{fmt}}" + (f" [{' / '.join(f'{v:{fmt}}' for v in values)}]" if len(values) > 1 else "")


def render(results: Path, root: Path) -> str:
    """Markdown: one section per protocol folder under ``results``, one row per model name (mean
    over its seeds, each seed in brackets), the run's own numbers next to the re-measured ones."""
    where = results.relative_to(root) if results.resolve().is_relative_to(root.resolve()) else results
    lines = ["# Runs evaluated again under another protocol", "",
             f"Rendered by `python studies/scripts/reevaluate.py --report` from the files under `{where}/` "
             "(one JSON per run, made by `python studies/scripts/reevaluate.py RUN ... eval.key=value`). Each row is a "
             "finished run's packed model (`model.dpq`: the stored codes) sampled again under the protocol of "
             "its section; 'own' is what the run measured at its end (its `summary.json`). Means over seeds, "
             "each seed in brackets (seed order as listed). `fid_to_teacher` (records made since the paired "
             "metrics exist): the Frechet distance to the teacher's samples from the same noise.", ""]
    from .paired_report import floor_sentence

    lines += [floor_sentence(results.parent / "results-paired", "Each section samples one eval-noise set"), ""]
    for proto in sorted(p for p in results.iterdir() if p.is_dir()):
        recs = [json.loads(f.read_text()) for f in sorted(proto.glob("*.json")) if f.name != "teacher.json"]
        if not recs:
            continue
        teacher = json.loads((proto / "teacher.json").read_text())["metrics"]
        overrides = ", ".join(f"`{o}`" for o in recs[0]["overrides"])
        lines += [f"## Protocol {proto.name}", "",
                  f"The runs' own evaluation config with {overrides}. Teacher FID-proxy under it: "
                  f"{teacher['fid_proxy']:.2f} (agreement {teacher['agreement']:.3f}).", "",
                  "| model | seeds | FID-proxy own | FID-proxy here | x teacher here | KID-proxy own | KID-proxy here "
                  "| agreement own | agreement here | fid_to_teacher here | minutes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        by_name: dict[str, list[dict]] = {}
        for r in sorted(recs, key=lambda r: (r["name"], r["seed"])):
            by_name.setdefault(r["name"], []).append(r)
        rows, means, per_seed = [], [], {}
        for name, rs in by_name.items():
            own = [r.get("own") or _original(root / r["run"]) for r in rs]
            here = [r["metrics"] for r in rs]
            fid_here = [m["fid_proxy"] for m in here]
            mean = sum(fid_here) / len(fid_here)
            means.append((name, tuple(r["seed"] for r in rs), mean))
            per_seed[name] = {r["seed"]: m["fid_proxy"] for r, m in zip(rs, here)}
            rows.append((mean, (
                f"| {name} | {', '.join(str(r['seed']) for r in rs)} "
                f"| {_cell([o['fid_proxy'] for o in own if 'fid_proxy' in o])} | {_cell(fid_here)} "
                f"| {mean / teacher['fid_proxy']:.2f}x "
                f"| {_cell([o['kid_proxy'] for o in own if 'kid_proxy' in o])} | {_cell([m['kid_proxy'] for m in here])} "
                f"| {_cell([o['agreement'] for o in own if 'agreement' in o], '.3f')} "
                f"| {_cell([m['agreement'] for m in here], '.3f')} "
                f"| {_cell([m['fid_to_teacher'] for m in here if 'fid_to_teacher' in m])} "
                f"| {sum(r['seconds'] for r in rs) / 60:.1f} |")))
        lines += [row for _, row in sorted(rows)]
        lines += ["", lowest_line(means, per_seed), ""]
    return "\n".join(lines) + "\n"
