"""The assignment rules' registry: a new rule is one class and one entry; the calibration module
never names a rule; the soft rule's state lives outside the weight modules."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from conftest import BITS, SMALL_OVERRIDES

from dpq_lightning.calibration import RULES, CalibConfig, DPQCalibration, Rule, register, rule_class
from dpq_lightning.calibration.rules import Reassign
from dpq_lightning.quant import QuantConfig, quantize_

ROOT = Path(__file__).resolve().parents[1]


def _student(teacher):
    s = copy.deepcopy(teacher)
    quantize_(s, QuantConfig(**BITS[1], overrides=SMALL_OVERRIDES, kmeans_backend="torch", kmeans_iters=5))
    return s


def test_the_registry_names_every_rule_and_rejects_others():
    assert set(RULES) == {"output_aware", "nearest", "frozen", "soft"}
    with pytest.raises(ValueError, match=r"calib.assignment must be one of \('output_aware', 'nearest', 'frozen', 'soft'\)"):
        CalibConfig(assignment="greedy")
    # each rule's own keys; every other rule's are unused (the experiment key drops them)
    assert set(CalibConfig(assignment="frozen").unused_keys()) == {k for r in RULES.values() for k in r.keys}
    assert set(CalibConfig(assignment="soft").unused_keys()) == {"assign_damp", "assign_fraction"}
    assert "soft_lr" in CalibConfig(assignment="nearest").unused_keys()
    with pytest.raises(ValueError, match="exists already"):
        register(type("Again", (Rule,), {"name": "nearest"}))


def test_a_new_rule_is_one_class_and_one_entry(trained_small_dit):
    """A rule that re-chooses every code by weight distance every step, registered here, runs in
    a calibration step with no other change: the module calls its hooks."""

    class EveryStep(Reassign):
        name = "every_step_nearest"
        keys = ("assign_damp",)
        objective = "nearest"
        calls: list[int] = []

        def start_step(self, module, step):
            self.calls.append(step)
            changed, total = self.adjust(module)
            assert total == sum(m.weight_pq.codes.numel() for m in module.pq_layers.values())

    register(EveryStep)
    try:
        teacher = trained_small_dit
        m = DPQCalibration(_student(teacher), copy.deepcopy(teacher), CalibConfig(assignment="every_step_nearest"))
        assert type(m.rule) is EveryStep and not m.rule.needs_moments
        m.on_train_batch_start(None, 0)
        assert EveryStep.calls == [0]
        assert "assign_every" in CalibConfig(assignment="every_step_nearest").unused_keys()
    finally:
        RULES.pop("every_step_nearest")


def test_the_soft_state_is_the_rules_not_the_weights(trained_small_dit):
    teacher = trained_small_dit
    m = DPQCalibration(_student(teacher), copy.deepcopy(teacher), CalibConfig(assignment="soft", soft_candidates=3))
    m.setup("fit")
    keys = list(m.state_dict())
    assert any(k.startswith("rule_state.") and k.endswith(".logits") for k in keys)
    assert not any(k.startswith("student.") and ("soft" in k or "logits" in k) for k in keys)
    w = next(iter(m.pq_layers.values())).weight_pq
    assert w.mixing and not any("soft" in k or "logits" in k for k in w.state_dict())
    with pytest.raises(ValueError, match="mixes this weight's codewords"):
        w.keep_decoded()
    groups = m.configure_optimizers()["optimizer"].param_groups
    assert len(groups) == 2 and all(p.shape[-1] == 3 for p in groups[1]["params"])  # the ratios, own lr
    student = m.export_student()
    assert not w.mixing and not any(k.startswith("rule_state.") for k in m.state_dict())
    assert all(not m_.weight_pq.mixing for m_ in m.pq_layers.values()) and student is m.student


def test_no_rule_is_named_outside_the_registry():
    """String comparisons of rule names live in calibration/rules.py and soft.py only. (quant/
    names the two objectives a rule may minimise, ``nearest`` and ``output_aware``: its own dispatch.)"""
    pattern = re.compile(r"assignment\s*(==|!=|in\s*\()|==\s*\"(soft|frozen|nearest|output_aware)\"")
    offenders = []
    for path in sorted((ROOT / "dpq_lightning").rglob("*.py")):
        if (path.parent.name == "calibration" and path.name in ("rules.py", "soft.py")) or path.parent.name == "quant":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert offenders == []


def test_rules_choose_what_they_say(trained_small_dit):
    """Nearest right after k-means changes nothing; the frozen rule has no pass to run."""
    teacher = trained_small_dit
    m = DPQCalibration(_student(teacher), copy.deepcopy(teacher), CalibConfig(assignment="nearest"))
    assert m.adjust_assignments()[0] == 0
    frozen = DPQCalibration(_student(teacher), copy.deepcopy(teacher), CalibConfig(assignment="frozen"))
    with pytest.raises(ValueError, match="never re-chooses codes by a pass; rules that do: output_aware, nearest"):
        frozen.adjust_assignments()
    assert rule_class("frozen").describe(frozen.cfg) == "codes frozen"
